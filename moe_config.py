"""The MoE layer's options, MoEConfig: each field with its flag, help text, choices and check (options.option),
and the checks between them (MoEConfig.check). SparseMoE takes this config; ModelConfig holds it as `moe`.

Adding an MoE option: a field here (its help, check, whether it may change on resume), its use in
moe_layers.py, its test. The flag, the --help line, MOE_GUIDE's flag table (python tests/test_docs.py), the
checkpoint's model dict and resume's rules follow from the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from errors import InputError
from options import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, check_fields, flag_of, option

ROUTINGS = ("token-choice", "expert-choice", "hash")
GATES = ("soft", "hard")
DROP_POLICIES = ("position", "probs")
ROUTER_SCORES = ("softmax", "sigmoid")
EXPERT_IMPLS = ("auto", "grouped", "loop")
# Expert choice always has a capacity (C tokens per expert); --moe-capacity-factor 0 means this factor.
EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR = 1.0


@dataclass
class MoEConfig:
    HELP_GROUP: ClassVar[str] = "mixture of experts"
    FLAG_PREFIX: ClassVar[str] = "moe-"  # every MoE flag but the design card's three below

    num_experts: int = option(8, "experts per MoE layer (0 = dense model)", check=NON_NEGATIVE,
                              flag="--num-experts")
    num_experts_per_token: int = option(2, "top-k experts per token", flag="--num-experts-per-token")
    layer_interval: int = option(1, "every N-th layer is MoE: layers N-1, 2N-1, ... (1 = all layers)",
                                 check=POSITIVE)
    expert_intermediate_size: Optional[int] = option(None, "expert SwiGLU FFN width (default: --intermediate-size)",
                                                     check=POSITIVE, flag="--expert-intermediate-size")
    aux_loss_coef: float = option(0.01, "Switch load-balancing loss coefficient", check=NON_NEGATIVE,
                                  aliases=("--router-aux-loss-coef",), changeable=True, reported=True)
    z_loss_coef: float = option(0.001, "router z-loss coefficient", check=NON_NEGATIVE,
                                aliases=("--router-z-loss-coef",), changeable=True, reported=True)
    normalize_topk: bool = option(True, "combine weights: the top-k experts' scores renormalised to sum to 1 (off: "
                                        "their raw scores)", aliases=("--no-router-normalize-topk",))
    expert_impl: str = option("auto", "expert GEMMs: torch._grouped_mm, a per-expert loop (syncs with the host), or "
                                      "auto", choices=EXPERT_IMPLS, changeable=True)
    capacity_factor: float = option(0.0, "each expert takes at most ceil(C * tokens * k / experts) assignments per "
                                         "microbatch, the rest are dropped (0 = no-drop)", check=NON_NEGATIVE,
                                    changeable=True, reported=True)
    drop_policy: str = option("position", "over capacity, drop the latest positions in the sequence, or the lowest "
                                          "router scores", choices=DROP_POLICIES, changeable=True, reported=True)
    renorm_after_drop: bool = option(False, "rescale a token's kept combine weights to sum to 1 after drops",
                                     changeable=True, reported=True)
    router_score: str = option("softmax", "router scores: softmax over experts, or per-expert sigmoid (DeepSeek-V3)",
                               choices=ROUTER_SCORES)
    input_jitter_eps: float = option(0.0, "in training forwards the router's input is multiplied by noise drawn "
                                          "uniformly from [1 - eps, 1 + eps] (Switch Transformer); the experts' "
                                          "input is not (0 = off)", check=UNIT_INTERVAL, changeable=True,
                                     reported=True)
    bias_update_rate: float = option(0.0, "auxiliary-loss-free balancing: after each step every expert bias moves by "
                                          "R * sign(mean load - load) (0 = off)", check=NON_NEGATIVE,
                                     changeable=True, reported=True)
    routing: str = option("token-choice", "token-choice: each token takes its top-k experts; expert-choice (Zhou et "
                                          "al. 2022): in training each expert takes its top C = capacity factor "
                                          f"(default {EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR}) * tokens * k / experts tokens of the microbatch, later "
                                          "positions included, while evaluation and generation route by top-k over "
                                          "the same scores; hash (Roller et al. 2021): a fixed random map from token "
                                          "id to k experts, no learned router", choices=ROUTINGS)
    gate: str = option("soft", "combine weights: soft = the router's scores (1/k each under hash routing); hard = "
                               "every chosen expert weighted 1 (the router then learns only from its losses; not with "
                               "expert-choice routing, whose router would learn nothing)", choices=GATES)

    def flag(self, field: str) -> str:
        """The flag that set `field` to its value, as an error names it."""
        return flag_of(MoEConfig, field).name(getattr(self, field))

    def check(self) -> None:
        """Each field's own check, then the fields against each other (a dense model, num_experts 0, has no MoE
        layer to check): flags that mean nothing under the chosen routing and gate are refused, not ignored."""
        check_fields(self)
        if self.num_experts == 0:
            return
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise InputError(f"--num-experts-per-token must be between 1 and --num-experts {self.num_experts}, "
                              f"got {self.num_experts_per_token}")
        routing, gate = self.routing, self.gate
        if routing != "token-choice" and self.bias_update_rate > 0:
            raise InputError(f"--moe-bias-update-rate {self.bias_update_rate} needs --moe-routing token-choice: bias "
                              f"balancing steers a top-k choice ({routing} routing has none to steer)")
        if routing == "hash" and self.input_jitter_eps > 0:
            raise InputError(f"--moe-input-jitter-eps {self.input_jitter_eps}: --moe-routing hash has no router input to "
                              f"jitter (valid: 0, the default)")
        if routing == "hash" and self.router_score != "softmax":
            raise InputError("--moe-router-score sigmoid: --moe-routing hash has no router scores (valid: softmax, "
                              "the default)")
        if routing != "token-choice" and not self.normalize_topk:
            raise InputError(f"{self.flag('normalize_topk')} applies to --moe-routing token-choice only ({routing} "
                              f"routing never renormalises its weights)")
        if routing == "expert-choice" and self.drop_policy != "position":
            raise InputError("--moe-drop-policy applies to token-choice and hash routing: expert choice keeps each "
                              "expert's top-C tokens by score")
        if self.renorm_after_drop and (routing == "expert-choice" or gate == "hard"):
            why = "expert choice drops no assignment of a token" if routing == "expert-choice" else \
                "--moe-gate hard weights every kept expert 1"
            raise InputError(f"--moe-renorm-after-drop applies to token-choice and hash routing with --moe-gate soft "
                              f"({why})")
        if routing == "expert-choice" and gate == "hard":
            raise InputError("--moe-gate hard with --moe-routing expert-choice: the choice is a top-C selection and "
                              "the weights would all be 1, so no gradient would reach the router (valid: --moe-gate "
                              "soft)")
        if gate == "hard" and not self.normalize_topk:
            raise InputError(f"{self.flag('normalize_topk')} applies to --moe-gate soft only (hard gates are all 1)")
