"""Mixture-of-Experts layers: the routers (token-choice top-k, expert choice, hash), stacked experts, SparseMoE
and the router losses; optional expert capacity (token dropping) and auxiliary-loss-free bias balancing.

Expert parallelism: EP rank g owns experts [g*E/EP, (g+1)*E/EP) in full. By default EP is tied to tensor
parallelism (the EP group is the TP group): the router is replicated, every rank routes all tokens, runs its
local experts on the tokens sent to them, and one all-reduce over the TP group adds the partial outputs; the
forward pass then never reads a device value back to the host (on the grouped-GEMM path): counts and group
offsets stay on the device. With --expert-parallel-size > TP the EP group spans data-parallel ranks and the
token rows travel to their experts by all-to-all (moe_dispatch.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_config import (DROP_POLICIES, EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR, EXPERT_IMPLS, GATES, ROUTER_SCORES,
                        MoEConfig)
from moe_dispatch import expert_choice_all_to_all, token_choice_all_to_all
from moe_ops import combine_expert_rows, inverse_permutation, permute_tokens, swiglu, unpermute_combine
from parallel import (Topology, all_reduce_, all_reduce_grad_tp, compute_dtype, copy_to_tp, mark_sharded,
                      reduce_from_tp)
from profiling import phase


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------
HASH_SEED = 20211  # hash routing's map of layer l is drawn from seed HASH_SEED + l (Roller et al. 2021)


@dataclass
class RouterOutput:
    indices: torch.Tensor  # [T, k] expert ids
    weights: torch.Tensor  # [T, k] combine weights (fp32)
    probs: torch.Tensor    # [T, E] routing distribution (fp32): the softmax, or the sigmoid scores / their sum
    logits: Optional[torch.Tensor]  # [T, E] fp32 (None: hash routing has no router)
    scores: Optional[torch.Tensor] = None  # [T, E] unbiased scores: softmax probabilities or sigmoids (fp32)


@dataclass
class ExpertChoice:
    """Expert-choice routing of T tokens: expert e takes tokens[e, :] (C of them, highest score first)."""
    tokens: torch.Tensor   # [E, C] token index of each expert's picks
    weights: torch.Tensor  # [E, C] combine weights (fp32): the scores s[t, e] (soft gate) or 1 (hard gate)


class RoutingRecord(NamedTuple):
    """What one training forward of a SparseMoE leaves for the step statistics: references to tensors
    the forward made anyway, no copies and no kernels (not even a detach). moe_stats.StepStats takes
    the records of all layers right after each microbatch's forward and reads them without autograd."""
    counts: torch.Tensor  # [E] assignments per expert (fp32, no gradient)
    aux: torch.Tensor     # load-balancing loss (scalar)
    z: torch.Tensor       # router z-loss (scalar)
    probs: torch.Tensor   # [T, E] router probabilities (fp32), for the entropy
    drops: Optional[torch.Tensor] = None  # [2] dropped assignments, tokens with none kept (capacity only)
    kept: Optional[torch.Tensor] = None   # [E] assignments each expert keeps (capacity only): what its EP rank computes
    fill: Optional[torch.Tensor] = None   # [2] busiest and mean expert's kept / capacity (capacity only)
    gates: Optional[torch.Tensor] = None  # [4] gate_statistics: gate entropy, kept probabilities, kept, tokens


def router_scores(logits: torch.Tensor, score: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (scores, probs), both [T, E]. score "softmax": s = softmax(logits);
    "sigmoid": s = sigmoid(logits) (DeepSeek-V3), and probs = s / sum_e s, a distribution for the aux loss
    and the entropy (for softmax probs is s)."""
    if score == "softmax":
        scores = logits.softmax(dim=-1)
        return scores, scores
    if score == "sigmoid":
        scores = logits.sigmoid()
        return scores, scores / scores.sum(dim=-1, keepdim=True)
    raise ValueError(f"router score must be one of {ROUTER_SCORES}, got {score}")


def route_topk(logits: torch.Tensor, top_k: int, score: str = "softmax", normalize_topk: bool = True,
               bias: Optional[torch.Tensor] = None, gate: str = "soft") -> RouterOutput:
    """Router logits [T, E] (fp32) -> top-k experts and combine weights.

    The k experts are the top-k of s + bias (s: router_scores; bias: [E], aux-loss-free balancing; it
    steers the choice only). Soft gate: the combine weights are the chosen unbiased s, divided by their
    sum when normalize_topk. Hard gate: every chosen expert is weighted 1 (no gradient reaches the router
    through the weights; it learns from its losses only)."""
    scores, probs = router_scores(logits, score)
    if bias is None:
        weights, indices = scores.topk(top_k, dim=-1)
    else:
        indices = (scores.detach() + bias).topk(top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
    if gate == "hard":
        weights = torch.ones_like(weights)  # [T, k], no gradient
    elif normalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RouterOutput(indices, weights, probs, logits, scores)


def expert_choice_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: expert_capacity with the capacity factor (its default,
    EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR, when 0), at most the T tokens there are."""
    factor = capacity_factor if capacity_factor > 0 else EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR
    return min(num_tokens, expert_capacity(num_tokens, top_k, num_experts, factor))


# Scores within this relative distance of the cut tie with it (keep_highest: expert choice, the "probs" drop
# policy). Tokens with the same hidden state (a sequence that opens with a run of one token, sequences that open
# with the same token) have mathematically equal scores that fp32 rounding leaves up to 1.5e-7 apart (measured
# in the layout tests' runs), in an order that changes with the parallel layout and the CPU kernels. 2^-21
# (4.8e-7, about 4 ulps) is above that and below the closest distinct scores those runs had at a cut (6.3e-7).
SCORE_TIE_RTOL = 2.0 ** -21


def _tie_broken(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """scores [R, N] -> [R, N] float64 keys whose top `capacity` of each row are the row's `capacity` highest
    scores, with ties at the cut going to the lowest indices: the scores within SCORE_TIE_RTOL (relative) of the
    row's capacity-th highest become the cut's value less index * 2^-48 of it, so that the earliest of them come
    first. The shift (at most 2^-28 of the cut for a million columns) stays far inside the tolerance, and far above
    float64's resolution, so no other order changes. Only elementwise ops and a top-k: no scan or sort, which
    inductor's CUDA code generation failed on here (a cumsum along the rows, measured on an H200)."""
    kth = scores.topk(capacity, dim=-1).values[:, -1:].double()  # [R, 1] the cut
    tied = (scores.double() - kth).abs() <= kth.abs() * SCORE_TIE_RTOL
    index = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float64)
    step = kth.abs().clamp_min(1e-30) * 2.0 ** -48
    return torch.where(tied, kth - index * step, scores.double())


def keep_highest(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """scores [R, N] (-inf: not a candidate) -> [R, N] bool: every row keeps its `capacity` highest candidates
    (all of them if it has no more). Ties at the cut go to the lowest indices (_tie_broken), so the rounding, which
    differs between layouts and CPU kernels, does not decide which of equal tokens are kept. On the device, no
    host sync."""
    candidates = scores > -math.inf
    if capacity >= scores.shape[-1]:
        return candidates
    top = _tie_broken(scores, capacity).topk(capacity, dim=-1).indices  # [R, capacity]
    keep = torch.zeros_like(candidates).scatter(-1, top, True) & candidates
    has_more = candidates.sum(dim=-1, keepdim=True) > capacity  # rows with fewer candidates keep them all
    return torch.where(has_more, keep, candidates)


def route_expert_choice(scores: torch.Tensor, capacity: int, gate: str = "soft") -> ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): scores [T, E] -> every expert takes the `capacity` tokens
    with its highest scores s[t, e], so every expert gets exactly C tokens and a token zero, one or several
    experts. Soft gate: token t's output from expert e is weighted s[t, e] (not renormalised); hard: 1.
    The choice of a token depends on every token of the batch, later positions included. Ties at the cut go
    to the earlier tokens (_tie_broken)."""
    s = scores.detach().t()  # [E, T]
    tokens = _tie_broken(s, capacity).topk(capacity, dim=-1).indices  # [E, C] taken, highest score first
    weights = scores.t().gather(1, tokens) if gate == "soft" else torch.ones_like(tokens, dtype=scores.dtype)
    return ExpertChoice(tokens, weights)


class TopKRouter(nn.Module):
    """Linear router in fp32, softmax or sigmoid scores, top-k, optionally renormalised top-k weights (soft
    gate) or weights 1 (hard gate). With bias balancing on, `expert_bias` [E] is a persistent buffer (saved
    with the model, not trained by the optimizer) added to the scores for choosing the experts; see
    update_expert_biases. Expert choice uses `logits` and route_expert_choice instead of the top-k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize_topk: bool = True,
                 init_std: float = 0.02, score: str = "softmax", expert_bias: bool = False, gate: str = "soft",
                 input_jitter_eps: float = 0.0):
        super().__init__()
        if score not in ROUTER_SCORES:
            raise ValueError(f"router score must be one of {ROUTER_SCORES}, got {score}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate}")
        self.num_experts, self.top_k, self.normalize_topk, self.score = num_experts, top_k, normalize_topk, score
        self.gate, self.input_jitter_eps = gate, input_jitter_eps
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.weight.init_std = init_std
        self.expert_bias: Optional[torch.Tensor]
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None, persistent=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] -> [T, E] router logits, in fp32 whatever the autocast. With input jitter, a training forward
        multiplies x by noise uniform in [1 - eps, 1 + eps] first (Switch Transformer): the logits change, the
        experts' input does not. The noise comes from the global RNG, which TP ranks seed alike (as dropout):
        every TP rank draws the same; with eps 0 nothing is drawn."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.input_jitter_eps > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.input_jitter_eps, 1.0 + self.input_jitter_eps)
            return F.linear(x, self.weight.float())

    def forward(self, x: torch.Tensor) -> RouterOutput:
        return route_topk(self.logits(x), self.top_k, self.score, self.normalize_topk, self.expert_bias, self.gate)


class HashRouter(nn.Module):
    """Hash routing (Roller et al. 2021): a fixed random map from token id to k distinct experts, no learned
    parameter. `table` [V, k] is a persistent buffer, so a checkpoint keeps the map it was trained with; it
    is drawn on the CPU from seed HASH_SEED + layer_id (not --seed): every layout and run builds the same.
    The routing distribution puts 1/k on each of a token's k experts; the soft gate weights each by 1/k
    (their mean), the hard gate by 1 (their sum)."""

    def __init__(self, vocab_size: int, num_experts: int, top_k: int, layer_id: int = 0, gate: str = "soft"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate}")
        self.num_experts, self.top_k, self.gate = num_experts, top_k, gate
        gen = torch.Generator().manual_seed(HASH_SEED + layer_id)
        # k distinct experts per token id, uniformly at random (explicitly on the CPU: a model built on the
        # meta device, for counting parameters, still gets a real map).
        table = torch.rand(vocab_size, num_experts, generator=gen, device="cpu").argsort(dim=-1)[:, :top_k]
        self.table: torch.Tensor
        self.register_buffer("table", table.contiguous(), persistent=True)

    def forward(self, token_ids: torch.Tensor) -> RouterOutput:
        indices = self.table[token_ids.reshape(-1)]  # [T, k]
        num_tokens, k = indices.shape
        weights = torch.full((num_tokens, k), 1.0 / k if self.gate == "soft" else 1.0, device=indices.device)
        probs = torch.zeros(num_tokens, self.num_experts, device=indices.device).scatter(1, indices, 1.0 / k)  # [T, E]
        return RouterOutput(indices, weights, probs, None, probs)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style aux loss E * sum_i f_i * P_i, with f_i the fraction of the T*k assignments routed to
    expert i (no gradient) and P_i the mean router probability of expert i."""
    num_tokens, num_experts = probs.shape
    f = counts / (num_tokens * top_k)
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# --------------------------------------------------------------------------------------------------
# Capacity (token dropping) and auxiliary-loss-free bias balancing
# --------------------------------------------------------------------------------------------------
def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(C * T * k / E) assignments per expert, at least 1: a host number from the shapes alone.
    The product is rounded to 6 decimals first so that float noise (1.1 * 10 = 11.000000000000002)
    does not add a slot."""
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 6)))


def capacity_mask(indices: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, capacity: int,
                  policy: str = "position", seq_len: Optional[int] = None) -> torch.Tensor:
    """Which of the T*k assignments each expert keeps: [T, k] bool, at most `capacity` per expert.

    indices [T, k] expert ids of the T tokens in [batch * seq] order; scores [T, E] the router's unbiased
    scores; counts [E] assignments per expert (as SparseMoE computes them). Every expert keeps its
    `capacity` highest-priority assignments:
      position: the earliest positions in the sequence, across the microbatch's sequences (position 0 of
                every sequence, then position 1, ...; ties by sequence index). seq_len: tokens per
                sequence (default: all T tokens are one sequence).
      probs:    the highest router scores s[t, e] (ties, to within SCORE_TIE_RTOL: the earlier token in
                [batch * seq] order; keep_highest).
    On the device, no host sync: a sort and a cumsum (position), keep_highest (probs)."""
    if policy == "probs":  # each expert's row holds the scores of the tokens routed to it
        routed = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)  # [T, E]
        keep = keep_highest(torch.where(routed, scores.detach(), -math.inf).t(), capacity)  # [E, T]
        return keep.t().gather(1, indices)
    num_tokens, k = indices.shape
    n = num_tokens * k
    flat = indices.reshape(-1)  # [T*k]
    arange = torch.arange(n, device=flat.device)
    if policy == "position":
        seq_len = seq_len or num_tokens
        token = arange // k
        # Rank of each token in position-major order: t = (b, p) -> p * B + b.
        priority = (token % seq_len) * (num_tokens // seq_len) + token // seq_len
    else:
        raise ValueError(f"drop policy must be one of {DROP_POLICIES}, got {policy}")
    # Sort by (expert, priority); keys are unique (a token is routed to an expert at most once).
    order = torch.argsort(flat * n + priority)
    counts = counts.long()
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    slot = arange - starts[flat[order]]  # rank of the sorted assignment inside its expert's group
    kept = torch.empty(n, dtype=torch.bool, device=flat.device)
    kept[order] = slot < capacity
    return kept.view(num_tokens, k)


@torch.no_grad()
def capacity_statistics(experts_per_token: torch.Tensor, kept: torch.Tensor, capacity: int,
                        top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one forward with a capacity (a token-choice capacity factor, or expert choice) leaves for the
    step statistics: drops [2] = (dropped assignments sum_t max(0, k - n_t), tokens with n_t = 0) and
    fill [2] = (the busiest expert's kept / capacity, the mean expert's kept / capacity).
    experts_per_token [T]: n_t, the experts that process token t (at most k under token choice, any number
    under expert choice); kept [E]: the assignments each expert keeps. On the device, no host sync."""
    n = experts_per_token.float()
    kept = kept.float()
    drops = torch.stack([(top_k - n).clamp_min(0).sum(), (n == 0).sum().float()])
    return drops, torch.stack([kept.amax(), kept.mean()]) / capacity


@torch.no_grad()
def gate_statistics(weights: torch.Tensor, kept_probs: torch.Tensor, num_kept) -> torch.Tensor:
    """[4] sums of one forward, for the step statistics: (sum over tokens of the entropy of its gates, sum
    of the kept assignments' router probabilities, kept assignments, tokens).

    weights [T, n]: each token's combine weights, 0 where it has no expert (dropped, or not chosen under
    expert choice); a token's gates are its weights divided by their sum, so the entropy is over the kept
    gates only (ln k for k equal gates, 0 for a token with one expert or none). kept_probs: the routing
    distribution's probability of every kept assignment (0 elsewhere; any shape). num_kept: a tensor or a
    host number."""
    gates = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    entropy = torch.special.entr(gates).sum()
    kept = num_kept.float() if torch.is_tensor(num_kept) else entropy.new_full((), float(num_kept))
    return torch.stack([entropy, kept_probs.sum(), kept, entropy.new_full((), float(weights.shape[0]))])


@torch.no_grad()
def update_expert_biases(moe_layers: Iterable["SparseMoE"], topo: Topology) -> None:
    """Auxiliary-loss-free balancing, called once after each optimizer step: every MoE layer with a
    bias update rate R moves its expert bias by R * sign(mean load - load), from the expert counts of
    the step's training forwards (all microbatches, summed over the DP group). One all-reduce for all
    layers, no host sync. TP ranks route the same tokens with the same router, so they need no
    reduction; each pipeline stage updates the layers it holds."""
    layers = [m for m in moe_layers if m.bias_update_rate > 0]
    if not layers:
        return
    loads = torch.stack([m.step_load for m in layers])  # [L, E]
    all_reduce_(loads, topo.dp_group)
    deltas = list(torch.sign(loads.mean(dim=-1, keepdim=True) - loads).unbind(0))  # L x [E]
    torch._foreach_mul_(deltas, [m.bias_update_rate for m in layers])  # host scalars: no copy to the device
    torch._foreach_add_([m.router.expert_bias for m in layers], deltas)
    torch._foreach_zero_([m.step_load for m in layers])


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------
def grouped_mm_available(x: torch.Tensor, *dims: int) -> bool:
    """torch._grouped_mm needs rows of a multiple of 16 bytes; it runs on the CPU (float dtypes) and on
    CUDA for bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16
    return False


def _grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    h = torch._grouped_mm(x, w1, offs=ends)  # [rows, 2f]: gate | up
    return torch._grouped_mm(swiglu(h), w2, offs=ends)


# torch.compile's meta kernel for _grouped_mm accepts bf16 only; other dtypes run it eagerly.
_grouped_swiglu_eager = torch.compiler.disable(_grouped_swiglu)


class GroupedExperts(nn.Module):
    """The local experts' SwiGLU FFNs as stacked weights: w_gate_up [E, d, 2f], w_down [E, f, d].

    forward(x, ends) takes tokens sorted by local expert, ends[e] being the exclusive end row of expert
    e's group (int32, on the device). Rows at and after ends[-1] belong to no local expert (they exist
    under EP, when some experts live on other ranks, and with a capacity factor, for dropped
    assignments): they are not computed, their outputs are undefined, and the caller never reads them
    (moe_ops' num_valid), so no pass over all rows masks them.
    """

    def __init__(self, num_experts: int, num_local: int, hidden_size: int, ffn_size: int,
                 init_std: float = 0.02, out_init_std: float = 0.02, impl: str = "auto"):
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert impl must be one of {EXPERT_IMPLS}, got {impl}")
        self.num_local, self.hidden_size, self.ffn_size, self.impl = num_local, hidden_size, ffn_size, impl
        # Sharded over the EP group along the expert dimension.
        self.w_gate_up = mark_sharded(nn.Parameter(torch.empty(num_local, hidden_size, 2 * ffn_size)), 0, [num_experts],
                                      axis="ep")
        self.w_down = mark_sharded(nn.Parameter(torch.empty(num_local, ffn_size, hidden_size)), 0, [num_experts],
                                   axis="ep")
        self.w_gate_up.init_std, self.w_down.init_std = init_std, out_init_std
        # (w_gate_up, w_down) in bf16, kept by mixed_precision.ExpertWeightCopies when training under bf16:
        # used instead of casting the fp32 weights at every forward.
        self.compute_copies: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "loop":
            return False
        ok = grouped_mm_available(x, self.hidden_size, self.ffn_size)
        if self.impl == "grouped" and not ok:
            raise RuntimeError(f"torch._grouped_mm is not available for {x.dtype} on {x.device}")
        return ok

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gate_up, w_down) in the compute dtype: the kept bf16 copies if there are any, else a cast."""
        if self.compute_copies is not None and self.compute_copies[0].dtype == dtype:
            return self.compute_copies
        return self.w_gate_up.to(dtype), self.w_down.to(dtype)

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.weights(x.dtype)
        if self.use_grouped(x):
            return (_grouped_swiglu if x.dtype == torch.bfloat16 else _grouped_swiglu_eager)(x, w1, w2, ends)
        return self._loop(x, ends, w1, w2)

    @staticmethod
    def _loop(x, ends, w1, w2):
        """Reference path, one matmul pair per expert. It reads the group boundaries back to the host."""
        bounds = [0] + ends.tolist()
        outs = []
        for e in range(w1.shape[0]):
            rows = x[bounds[e]:bounds[e + 1]]
            gate, up = (rows @ w1[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ w2[e])
        outs.append(x.new_zeros(x.shape[0] - bounds[-1], w2.shape[-1]))
        return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------
# SparseMoE
# --------------------------------------------------------------------------------------------------
def in_recomputation() -> bool:
    """Whether this forward is activation checkpointing's recomputation (model.recomputed, --recompute): in eager
    mode torch.utils.checkpoint runs the layer's Python again inside the backward, where it must not count its
    tokens again (step_load) nor leave another RoutingRecord. A forward running inside the autograd engine is
    that (FSDP2 tells the backward the same way). Compiled code never runs Python in the backward (the
    partitioner recomputes in the backward graph), so it is traced as False."""
    if torch.compiler.is_compiling():
        return False
    if not hasattr(torch._C, "_current_graph_task_id"):  # private: a torch without it must not count silently twice
        raise RuntimeError("this torch has no torch._C._current_graph_task_id: --recompute cannot tell a "
                           "recomputation from a forward")
    return torch._C._current_graph_task_id() != -1


class SparseMoE(nn.Module):
    """Mixture-of-experts FFN: route, sort the assignments by expert -> gather -> grouped GEMM -> combine.
    Built from a MoEConfig (moe_config.py, checked there), as torchtitan's MoE(moe_args, dim, hidden_dim).

    routing "token-choice" (default): every token goes to its top-k experts (TopKRouter), no-drop unless
    capacity_factor C > 0: then each expert keeps at most expert_capacity(T, k, E, C) assignments of the T
    tokens this rank routes (capacity_mask; under EP every rank routes all tokens, so every layout drops
    the same ones). A dropped assignment sorts after every local expert, so no expert computes it, and its
    combine weight is zero: a token with all k dropped keeps only its residual.
    routing "hash": the same with the fixed token-id -> experts map of HashRouter (forward needs token_ids).
    routing "expert-choice": in training forwards every expert takes its top-C tokens by score
    (route_expert_choice, C = expert_choice_capacity); in eval mode (evaluation, generation) the same
    scores route by token-choice top-k, no capacity, since expert choice is not causal (it ranks each
    token against the whole batch, later positions included). expert_choice_eval = True makes eval
    forwards use expert choice too (to measure it). It trains no aux loss: every expert's load is C.
    gate "soft": combine weights from the router's scores; "hard": every chosen expert weighted 1.
    With bias_update_rate > 0 (token choice) the router's expert bias steers the top-k choice and the
    training forwards add their expert counts to `step_load`, which update_expert_biases consumes.

    forward returns (output, loss) where loss = aux_coef * aux + z_coef * z for this layer. A training
    forward also leaves `last_routing` (counts, losses, probabilities: references, no copies; and small
    device-side sums) for the step statistics of moe_stats.StepStats.
    """

    def __init__(self, moe: MoEConfig, hidden_size: int, ffn_size: int, topo: Topology, init_std: float = 0.02,
                 out_init_std: float = 0.02, vocab_size: Optional[int] = None, layer_id: int = 0):
        super().__init__()
        moe.check()  # the options' own checks and those between them (InputError, a ValueError)
        num_experts, top_k, routing, gate = moe.num_experts, moe.num_experts_per_token, moe.routing, moe.gate
        if num_experts % topo.ep:
            raise ValueError(f"num experts {num_experts} not divisible by the EP size {topo.ep}")
        if routing == "hash" and vocab_size is None:
            raise ValueError("hash routing needs the vocabulary size")
        self.capacity_factor, self.drop_policy, self.renorm_after_drop = (moe.capacity_factor, moe.drop_policy,
                                                                          moe.renorm_after_drop)
        self.bias_update_rate = bias_update_rate = moe.bias_update_rate
        self.routing, self.gate = routing, gate
        self.topo = topo
        self.num_experts, self.top_k = num_experts, top_k
        self.num_local = num_experts // topo.ep
        self.first_local = topo.ep_rank * self.num_local
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.router: nn.Module
        if routing == "hash":
            self.router = HashRouter(vocab_size, num_experts, top_k, layer_id, gate)
        else:  # expert choice weights by the raw scores: its token-choice fallback does not renormalise either
            self.router = TopKRouter(hidden_size, num_experts, top_k, moe.normalize_topk and routing == "token-choice",
                                     init_std, moe.router_score, expert_bias=bias_update_rate > 0, gate=gate,
                                     input_jitter_eps=moe.input_jitter_eps)
        # This step's expert counts of the training forwards, for the bias update (not saved).
        self.step_load: Optional[torch.Tensor]
        self.register_buffer("step_load", torch.zeros(num_experts) if bias_update_rate > 0 else None,
                             persistent=False)
        self.experts = GroupedExperts(num_experts, self.num_local, hidden_size, ffn_size, init_std,
                                      out_init_std, moe.expert_impl)
        # Sorted rows past the local experts' groups exist under EP (other ranks' experts) and with a
        # capacity factor (dropped assignments, sorted past every expert): the permutation skips them.
        self.tail_rows = self.num_local < num_experts or self.token_capacity_factor > 0
        self.expert_choice_eval = False  # eval forwards of an expert-choice layer: expert choice, not top-k
        # Statistics: while record_routing is set (by moe_stats.StepStats, at logging steps), a training
        # forward leaves its RoutingRecord here; StepStats takes it after each microbatch.
        self.record_routing = False
        self.last_routing: Optional[RoutingRecord] = None

    @property
    def token_capacity_factor(self) -> float:
        """The capacity factor of the token-choice path (expert choice's factor sizes its C instead, and its
        top-k fallback in eval mode runs without capacity)."""
        return 0.0 if self.routing == "expert-choice" else self.capacity_factor

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (output [..., d], this layer's loss). token_ids [...] (x's leading shape): the input
        token ids, needed by hash routing only."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.routing == "expert-choice" and (self.training or self.expert_choice_eval):
            out, loss = self._expert_choice(x)
        else:
            out, loss = self._token_choice(x, shape, token_ids)
        return out.view(shape), loss

    def _token_choice(self, x: torch.Tensor, shape: torch.Size,
                      token_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, k, E = x.shape[0], self.top_k, self.num_experts
        counted = self.training and not in_recomputation()  # its tokens go into the load and statistics
        record = counted and self.record_routing

        with phase("moe/router"):
            if self.routing == "hash":
                if token_ids is None:
                    raise ValueError("hash routing needs the input token ids (GPT.forward's token_ids on every stage)")
                r = self.router(token_ids)
            else:
                r = self.router(x)
            flat_expert = r.indices.reshape(-1)  # [T*k]
            counts = torch.zeros(E, device=x.device, dtype=torch.float32)
            counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.float32))
            aux = load_balancing_loss(r.probs, counts, k)
            # Hash routing has no router, hence no logits and no z-loss (its aux loss has no gradient).
            z = router_z_loss(r.logits) if r.logits is not None else x.new_zeros((), dtype=torch.float32)
            if self.step_load is not None and counted:
                self.step_load.add_(counts)
        weights, routed, kept, drops, capacity = r.weights, counts, None, None, None  # routed: what the experts compute
        if self.token_capacity_factor > 0:
            with phase("moe/capacity"):
                capacity = expert_capacity(num_tokens, k, E, self.token_capacity_factor)
                kept = capacity_mask(r.indices, r.scores, counts, capacity, self.drop_policy,
                                     shape[-2] if len(shape) > 2 else None)  # [T, k]
                routed = counts.clamp(max=capacity)  # [E] the assignments each expert keeps
                weights = torch.where(kept, weights, 0.0)
                if self.renorm_after_drop:  # kept weights sum to 1 (a token with none kept stays all zero)
                    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
                if record:
                    drops, fill = capacity_statistics(kept.sum(dim=-1), routed, capacity, k)
        if record:  # read without autograd, taken right after
            kept_probs = r.probs.detach().gather(-1, r.indices)  # [T, k]
            if kept is not None:
                kept_probs = torch.where(kept, kept_probs, 0.0)
            gates = gate_statistics(weights.detach(), kept_probs, kept.sum() if kept is not None else num_tokens * k)
            self.last_routing = RoutingRecord(counts, aux, z, r.probs, drops, routed if kept is not None else None,
                                              fill if kept is not None else None, gates)
        loss = self.aux_loss_coef * aux + self.z_loss_coef * z
        if self.topo.ep_all_to_all:
            with phase("moe/all_to_all_experts"):
                out = token_choice_all_to_all(x.to(compute_dtype(x)), r.indices, weights, kept, capacity, self.experts,
                                              self.topo, E)
            return out, loss

        with phase("moe/permute"):
            # Sort the T*k assignments by expert, local experts first: key = (expert - first_local) mod E
            # puts this rank's experts at 0..L-1.
            key = ((flat_expert - self.first_local) % E).to(torch.int32)  # 32-bit keys: half the radix passes
            if kept is not None:  # dropped assignments after every expert: outside all groups
                key = torch.where(kept.view(-1), key, E)
            order = torch.argsort(key, stable=True)  # [T*k] sorted row -> assignment t*k + j
            inverse = inverse_permutation(order)     # [T*k] assignment t*k + j -> sorted row
            local_counts = torch.roll(routed, -self.first_local)[: self.num_local]
            ends = torch.cumsum(local_counts, 0).to(torch.int32)
            num_valid = ends[-1:] if self.tail_rows else None  # sorted rows past it: no local expert's
            # Cast before the copy: its backward all-reduce then moves compute-dtype bytes.
            x_in = copy_to_tp(x.to(compute_dtype(x)), self.topo)
            x_sorted = permute_tokens(x_in, inverse, k, num_valid)  # [T*k, d]: row inverse[t*k + j] is token t
        with phase("moe/experts"):
            y_sorted = self.experts(x_sorted, ends)  # [T*k, d] grouped GEMM; rows past num_valid undefined

        with phase("moe/unpermute_combine"):
            weights = all_reduce_grad_tp(weights, self.topo)
            out = unpermute_combine(y_sorted, inverse, weights, num_valid)  # [T, d] unsort + weighted sum
            out = reduce_from_tp(out, self.topo)
        return out, loss

    def _expert_choice(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert takes its top-C tokens. The assignments come out grouped by expert already (expert
        e's C tokens are rows e*C .. (e+1)*C - 1), so there is no sort: this rank gathers its local experts'
        E_local*C token rows, runs them, and adds each back into its token weighted by its gate (index_add,
        whose backward is the gather: a token picked by several experts gets the sum of their gradients).
        Every shape is fixed by T, E and C, host numbers: no host sync."""
        num_tokens, k, E, L = x.shape[0], self.top_k, self.num_experts, self.num_local
        with phase("moe/router"):
            logits = self.router.logits(x)
            scores, probs = router_scores(logits, self.router.score)
            capacity = expert_choice_capacity(num_tokens, k, E, self.capacity_factor)
            choice = route_expert_choice(scores, capacity, self.gate)  # [E, C] tokens and weights
            z = router_z_loss(logits)
        if self.training and self.record_routing and not in_recomputation():
            self.last_routing = self._expert_choice_record(choice, scores, probs, z, capacity)
        if self.topo.ep_all_to_all:
            with phase("moe/all_to_all_experts"):
                out = expert_choice_all_to_all(x.to(compute_dtype(x)), choice.tokens, choice.weights, self.experts,
                                               self.topo)
            return out, self.z_loss_coef * z

        with phase("moe/permute"):
            rows = choice.tokens[self.first_local:self.first_local + L].reshape(-1)  # [L*C] local experts' tokens
            ends = torch.arange(1, L + 1, device=x.device, dtype=torch.int32) * capacity  # C rows per expert
            x_in = copy_to_tp(x.to(compute_dtype(x)), self.topo)
            x_sorted = x_in.index_select(0, rows)  # [L*C, d]
        with phase("moe/experts"):
            y_sorted = self.experts(x_sorted, ends)  # [L*C, d]

        with phase("moe/unpermute_combine"):
            # The weights' gradient is nonzero only for this rank's experts: summed over the group, whole.
            weights = all_reduce_grad_tp(choice.weights, self.topo)[self.first_local:self.first_local + L]
            out = reduce_from_tp(combine_expert_rows(y_sorted, rows, weights, num_tokens), self.topo)  # [T, d]
        # No aux loss: every expert takes exactly C tokens, so there is nothing to balance.
        return out, self.z_loss_coef * z

    @torch.no_grad()
    def _expert_choice_record(self, choice: ExpertChoice, scores: torch.Tensor, probs: torch.Tensor,
                              z: torch.Tensor, capacity: int) -> RoutingRecord:
        """The statistics of an expert-choice forward. The load statistics (counts, aux, cv) describe the
        demand: the top-k each token would pick by the same scores, which is how eval mode routes; the
        experts themselves keep exactly C each (kept). The capacity statistics count, per token, the
        experts that took it."""
        num_tokens, k, E = scores.shape[0], self.top_k, self.num_experts
        demand = scores.topk(k, dim=-1).indices.reshape(-1)  # [T*k]
        counts = torch.zeros(E, device=scores.device).scatter_add_(0, demand, torch.ones_like(demand, dtype=torch.float32))
        aux = load_balancing_loss(probs, counts, k)  # logged only: expert choice trains no aux loss
        tokens = choice.tokens.reshape(-1)  # [E*C]
        served = torch.zeros(num_tokens, device=scores.device).index_add(0, tokens, torch.ones_like(tokens, dtype=torch.float32))
        kept = torch.full((E,), float(capacity), device=scores.device)
        drops, fill = capacity_statistics(served, kept, capacity, k)
        experts = torch.arange(E, device=scores.device).unsqueeze(1).expand_as(choice.tokens)  # [E, C]
        dense = torch.zeros(num_tokens * E, device=scores.device).scatter(
            0, tokens * E + experts.reshape(-1), choice.weights.reshape(-1)).view(num_tokens, E)  # [T, E] gates
        kept_probs = probs.t().gather(1, choice.tokens)  # [E, C]
        gates = gate_statistics(dense, kept_probs, E * capacity)
        return RoutingRecord(counts, aux, z, probs, drops, kept, fill, gates)
