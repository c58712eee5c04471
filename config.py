"""The trainer's flags: the parser (each flag with its help text and default), their checks (one line and
exit code 2 for bad input), the model flags a checkpoint fixes, and the ModelConfig they build."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional

import torch

from checkpoint import CHANGEABLE_MODEL_FIELDS, check_hub
from errors import InputError, OneLineParser
from model import ModelConfig
from parallel import check_layout, env_world_size
from run_log import check_sinks


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a GPT-style Mixture-of-Experts model with hand-rolled DP/TP/EP/PP.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size; ignored by byte-level corpora (256); for .bin and prepare_data.py data it "
                        "defaults to the tokens' need rounded up to a multiple of 64")
    m.add_argument("--hidden-size", type=int, default=128, help="model width d_model")
    m.add_argument("--intermediate-size", type=int, default=512, help="dense SwiGLU FFN width")
    m.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    m.add_argument("--num-attention-heads", type=int, default=4, help="query heads")
    m.add_argument("--num-key-value-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    m.add_argument("--max-seq-length", type=int, default=128, help="sequence length of training samples")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout on embeddings, attention and residual branches")
    e = p.add_argument_group("mixture of experts")
    e.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (0 = dense model)")
    e.add_argument("--num-experts-per-token", type=int, default=2, help="top-k experts per token")
    e.add_argument("--moe-layer-interval", type=int, default=1,
                   help="every N-th layer is MoE: layers N-1, 2N-1, ... (1 = all layers)")
    e.add_argument("--expert-intermediate-size", type=int, default=None,
                   help="expert SwiGLU FFN width (default: --intermediate-size)")
    e.add_argument("--router-aux-loss-coef", type=float, default=0.01, help="Switch load-balancing loss coefficient")
    e.add_argument("--router-z-loss-coef", type=float, default=0.001, help="router z-loss coefficient")
    e.add_argument("--no-router-normalize-topk", dest="router_normalize_topk", action="store_false",
                   help="use the raw softmax probabilities of the top-k experts as combine weights")
    e.add_argument("--moe-expert-impl", choices=["auto", "grouped", "loop"], default="auto",
                   help="expert GEMMs: torch._grouped_mm, a per-expert loop (syncs with the host), or auto")
    e.add_argument("--moe-bf16-weights", choices=["on", "off"], default="on",
                   help="under bf16: keep bf16 copies of the expert weights, refreshed once per optimizer step, with "
                        "their gradients added straight into the fp32 ones (off: cast at every microbatch)")
    e.add_argument("--moe-capacity-factor", type=float, default=0.0,
                   help="each expert takes at most ceil(C * tokens * k / experts) assignments per microbatch, "
                        "the rest are dropped (0 = no-drop)")
    e.add_argument("--moe-drop-policy", choices=["position", "probs"], default="position",
                   help="over capacity, drop the latest positions in the sequence, or the lowest router scores")
    e.add_argument("--moe-renorm-after-drop", action="store_true",
                   help="rescale a token's kept combine weights to sum to 1 after drops")
    e.add_argument("--moe-router-score", choices=["softmax", "sigmoid"], default="softmax",
                   help="router scores: softmax over experts, or per-expert sigmoid (DeepSeek-V3)")
    e.add_argument("--moe-bias-update-rate", type=float, default=0.0,
                   help="auxiliary-loss-free balancing: after each step every expert bias moves by "
                        "R * sign(mean load - load) (0 = off)")
    e.add_argument("--moe-routing", choices=["token-choice", "expert-choice", "hash"], default="token-choice",
                   help="token-choice: each token takes its top-k experts; expert-choice (Zhou et al. 2022): in "
                        "training each expert takes its top C = capacity factor (default 1.0) * tokens * k / experts "
                        "tokens of the microbatch, later positions included, while evaluation and generation route "
                        "by top-k over the same scores; hash (Roller et al. 2021): a fixed random map from token id "
                        "to k experts, no learned router")
    e.add_argument("--moe-gate", choices=["soft", "hard"], default="soft",
                   help="combine weights: soft = the router's scores (1/k each under hash routing); hard = every "
                        "chosen expert weighted 1 (the router then learns only from its losses; not with expert-choice "
                        "routing, whose router would learn nothing)")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per microbatch per DP rank (default min(8, global/DP), or derived from --num-microbatches)")
    t.add_argument("--global-batch-size", type=int, default=32, help="sequences per optimizer step, all DP ranks")
    t.add_argument("--num-microbatches", type=int, default=None,
                   help="microbatches per step per DP rank (gradient accumulation / pipeline microbatches); "
                        "default global / (micro * DP)")
    t.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    t.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine decay")
    t.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    t.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    t.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    t.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    t.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0 = off)")
    t.add_argument("--seed", type=int, default=1337,
                   help="seed of initialisation, data order and dropout (the dropout seed also varies with the PP "
                        "stage and DP rank; TP ranks share it)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (see --compile-scope)")
    t.add_argument("--compile-scope", choices=["blocks", "model"], default="model",
                   help="with --compile: the whole stage in one graph (fewer launches and Python calls per step) or "
                        "each transformer block on its own (one graph shared by the layers, shorter compilation)")
    t.add_argument("--gc-interval", type=int, default=50,
                   help="0: Python's automatic garbage collector; N: freeze the objects of set-up, turn automatic "
                        "collection off while training and collect the young generations every N steps")
    t.add_argument("--data", default=None,
                   help="UTF-8 text file, directory of UTF-8 text files (other files are refused, as prepare_data.py "
                        "refuses them), a prepare_data.py output directory, or uint16 .bin tokens (default: embedded "
                        "stdlib corpus)")
    par = p.add_argument_group("parallelism (under torchrun)")
    par.add_argument("--tensor-parallel-size", type=int, default=1, help="TP size; expert parallelism uses the same group")
    par.add_argument("--expert-parallel-size", type=int, default=None,
                     help="EP size; expert parallelism is tied to TP, so it must equal --tensor-parallel-size (default: TP)")
    par.add_argument("--pipeline-parallel-size", type=int, default=1, help="PP stages")
    par.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b"], default="1f1b", help="pipeline schedule")
    par.add_argument("--ddp-bucket-size-mb", type=float, default=25.0, help="DP gradient all-reduce bucket size")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=10,
                    help="steps between log lines (the first and the last step of a run are always logged); step N "
                         "is the state after N optimizer steps, as in the step_0000000N checkpoint")
    lg.add_argument("--eval-interval", type=int, default=100, help="steps between validation runs (0 = only at the end)")
    lg.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation (0 = no evaluation)")
    lg.add_argument("--output-dir", default=None,
                    help="run directory for config.json and metrics.jsonl (default runs/<time>); one run at a time: "
                         "locked while the run lasts")
    lg.add_argument("--moe-metrics", choices=["off", "brief", "detailed"], default="brief",
                    help="MoE load statistics: off, the summary, or also per-layer metrics and the count matrix")
    lg.add_argument("--moe-detailed-every", type=int, default=0,
                    help="in brief mode, log the detailed MoE metrics every N steps (0 = never)")
    lg.add_argument("--moe-histogram-every", type=int, default=50, help="expert-load histogram every N steps (wandb/TB)")
    lg.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    lg.add_argument("--wandb-project", default="minimal-moe", help="wandb project")
    lg.add_argument("--tensorboard", action="store_true", help="log to TensorBoard under <output-dir>/tensorboard")
    lg.add_argument("--no-progress", action="store_true",
                    help="no tqdm progress bar (there is none anyway when stdout is not a terminal)")
    ck = p.add_argument_group("checkpoints")
    ck.add_argument("--save-interval", type=int, default=1000,
                    help="save a checkpoint every N steps (0 = no periodic saves; the final one is still saved)")
    ck.add_argument("--checkpoint-dir", default=None,
                    help="where checkpoints go (default <output-dir>/checkpoints); locked while the run lasts")
    ck.add_argument("--keep-last", type=int, default=3,
                    help="keep the newest K step checkpoints up to the one just saved; older ones are deleted once a newer "
                         "one is complete (0 = keep all)")
    ck.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="auto: the newest complete checkpoint in --checkpoint-dir, or a fresh start if there is none; "
                         "PATH: a step_* checkpoint, or a checkpoint directory (its newest). Model flags not given "
                         "take the checkpoint's values. A damaged one (a file missing or cut short) stops the run, "
                         "naming the newest whole one to pass instead")
    ck.add_argument("--no-save", action="store_true", help="no final checkpoint at the end")
    ck.add_argument("--eval-only", action="store_true",
                    help="with --resume: print the checkpoint's validation loss, no training; writes nothing")
    ck.add_argument("--hf-repo", default=None, metavar="OWNER/NAME",
                    help="upload each saved checkpoint to this Hugging Face Hub repo (needs huggingface_hub and a token)")
    pr = p.add_argument_group("profiling")
    pr.add_argument("--profile", action="store_true", help="torch.profiler trace of a window of steps, one per rank")
    pr.add_argument("--profile-wait", type=int, default=5, help="steps before the profiler starts")
    pr.add_argument("--profile-warmup", type=int, default=3, help="profiler warm-up steps (events dropped)")
    pr.add_argument("--profile-steps", type=int, default=5, help="steps recorded in the trace")
    pr.add_argument("--trace-dir", default=None, help="where every rank writes trace_rank{R}_step{N}.json "
                                                       "(default <output-dir>/traces)")
    pr.add_argument("--profile-gzip", action="store_true", help="write .json.gz traces")
    return p


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Every check that needs no work done; raises InputError naming the flag. With --resume the
    model flags are checked once the checkpoint they come from is known (check_model_flags, in setup)."""
    for name, v in vars(args).items():  # --learning-rate inf or nan would train NaNs
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {v}")

    def positive(*names):
        for n in names:
            v = getattr(args, n)
            if v is not None and v <= 0:
                raise InputError(f"--{n.replace('_', '-')} must be positive, got {v}")

    def non_negative(*names):
        for n in names:
            v = getattr(args, n)
            if v is not None and v < 0:
                raise InputError(f"--{n.replace('_', '-')} must be >= 0, got {v}")

    positive("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads",
             "max_seq_length", "micro_batch_size", "global_batch_size", "num_microbatches", "max_steps",
             "learning_rate", "log_interval", "moe_layer_interval", "ddp_bucket_size_mb",
             "expert_intermediate_size", "vocab_size")
    non_negative("num_experts", "warmup_steps", "weight_decay", "grad_clip", "min_lr", "eval_interval",
                 "eval_iters", "moe_detailed_every", "moe_histogram_every", "router_aux_loss_coef",
                 "router_z_loss_coef", "gc_interval", "save_interval", "keep_last", "moe_capacity_factor",
                 "moe_bias_update_rate")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    positive("adam_eps")
    if not 0.0 <= args.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.min_lr > args.learning_rate:
        raise InputError(f"--min-lr {args.min_lr} must not exceed --learning-rate {args.learning_rate}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")

    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if args.expert_parallel_size is not None and args.expert_parallel_size != tp:
        raise InputError(f"--expert-parallel-size {args.expert_parallel_size} must equal --tensor-parallel-size {tp}: "
                          f"expert parallelism is tied to TP (leave it unset)")
    dp = check_layout(world_size, tp, pp)
    if args.resume is None:
        check_model_flags(args)

    # Batch arithmetic: global = micro * microbatches * DP.
    gbs, mbs, m = args.global_batch_size, args.micro_batch_size, args.num_microbatches
    if gbs % dp:
        raise InputError(f"--global-batch-size {gbs} must be divisible by the data-parallel size {dp}")
    per_dp = gbs // dp
    if mbs is None and m is None:
        mbs = min(8, per_dp)
    if mbs is None:
        if per_dp % m:
            raise InputError(f"--num-microbatches {m} must divide --global-batch-size / DP = {per_dp}")
        mbs = per_dp // m
    if per_dp % mbs:
        raise InputError(f"--micro-batch-size {mbs} must divide --global-batch-size / DP = {per_dp} "
                          f"(valid: {', '.join(str(d) for d in range(1, per_dp + 1) if per_dp % d == 0)})")
    if m is not None and m != per_dp // mbs:
        raise InputError(f"--num-microbatches {m} disagrees with --global-batch-size {gbs} / (--micro-batch-size "
                          f"{mbs} x DP {dp}) = {per_dp // mbs}")
    args.micro_batch_size, args.num_microbatches = mbs, per_dp // mbs
    if args.eval_only and (args.wandb or args.tensorboard):
        raise InputError("--eval-only writes nothing (it prints the validation loss): drop --wandb and --tensorboard")
    check_sinks(args.wandb, args.tensorboard)
    non_negative("profile_wait", "profile_warmup")
    positive("profile_steps")
    if args.profile:
        window = args.profile_wait + args.profile_warmup + args.profile_steps
        if window > args.max_steps:
            raise InputError(f"--profile-wait + --profile-warmup + --profile-steps = {window} exceeds --max-steps "
                              f"{args.max_steps}: the trace window would never end")
        if args.trace_dir is not None and os.path.exists(args.trace_dir) and not os.path.isdir(args.trace_dir):
            raise InputError(f"--trace-dir {args.trace_dir} is a file, not a directory")
        if args.eval_only:
            raise InputError("--profile traces training steps and --eval-only runs none")
    elif args.trace_dir is not None or args.profile_gzip:
        raise InputError("--trace-dir and --profile-gzip need --profile")
    if args.eval_only and not args.resume:
        raise InputError("--eval-only needs --resume PATH (the checkpoint to evaluate)")
    if args.eval_only and args.eval_iters == 0:
        raise InputError("--eval-only needs --eval-iters > 0")
    if args.hf_repo:
        check_hub(args.hf_repo)


def check_model_flags(args: argparse.Namespace) -> None:
    """The model flags against each other and against the TP / PP sizes; raises InputError
    naming the flag. Called by validate, or with --resume by setup, once the checkpoint's values are in."""
    if args.hidden_size % args.num_attention_heads:
        raise InputError(f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads "
                          f"{args.num_attention_heads}")
    if (args.hidden_size // args.num_attention_heads) % 2:
        raise InputError(f"head size --hidden-size / --num-attention-heads = "
                          f"{args.hidden_size // args.num_attention_heads} must be even (rotary embeddings)")
    if args.num_attention_heads % args.num_key_value_heads:
        raise InputError(f"--num-attention-heads {args.num_attention_heads} must be divisible by "
                          f"--num-key-value-heads {args.num_key_value_heads}")
    if args.num_experts > 0:
        if not 1 <= args.num_experts_per_token <= args.num_experts:
            raise InputError(f"--num-experts-per-token must be between 1 and --num-experts {args.num_experts}, "
                              f"got {args.num_experts_per_token}")
        if args.moe_layer_interval > args.num_layers:
            raise InputError(f"--moe-layer-interval {args.moe_layer_interval} exceeds --num-layers "
                              f"{args.num_layers}: no layer would be MoE (use --num-experts 0 for a dense model)")
        check_routing_flags(args)
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    for flag, value in (("--num-attention-heads", args.num_attention_heads),
                        ("--num-key-value-heads", args.num_key_value_heads),
                        ("--intermediate-size", args.intermediate_size),
                        ("--num-experts", args.num_experts)):
        if value % tp:
            why = " (expert parallelism is tied to TP)" if flag == "--num-experts" else ""
            raise InputError(f"{flag} {value} must be divisible by --tensor-parallel-size {tp}{why}")
    if args.num_layers < pp:
        raise InputError(f"--num-layers {args.num_layers} must be at least --pipeline-parallel-size {pp}")


def check_routing_flags(args: argparse.Namespace) -> None:
    """Flags that mean nothing under the chosen --moe-routing / --moe-gate are refused rather than ignored."""
    routing, gate = args.moe_routing, args.moe_gate
    if routing != "token-choice" and args.moe_bias_update_rate > 0:
        raise InputError(f"--moe-bias-update-rate {args.moe_bias_update_rate} needs --moe-routing token-choice: bias "
                          f"balancing steers a top-k choice ({routing} routing has none to steer)")
    if routing == "hash" and args.moe_router_score != "softmax":
        raise InputError("--moe-router-score sigmoid: --moe-routing hash has no router scores (valid: softmax, the "
                          "default)")
    if routing != "token-choice" and not args.router_normalize_topk:
        raise InputError(f"--no-router-normalize-topk applies to --moe-routing token-choice only ({routing} routing "
                          f"never renormalises its weights)")
    if routing == "expert-choice" and args.moe_drop_policy != "position":
        raise InputError("--moe-drop-policy applies to token-choice and hash routing: expert choice keeps each "
                          "expert's top-C tokens by score")
    if args.moe_renorm_after_drop and (routing == "expert-choice" or gate == "hard"):
        why = "expert choice drops no assignment of a token" if routing == "expert-choice" else \
            "--moe-gate hard weights every kept expert 1"
        raise InputError(f"--moe-renorm-after-drop applies to token-choice and hash routing with --moe-gate soft ({why})")
    if routing == "expert-choice" and gate == "hard":
        raise InputError("--moe-gate hard with --moe-routing expert-choice: the choice is a top-C selection and the "
                          "weights would all be 1, so no gradient would reach the router (valid: --moe-gate soft)")
    if gate == "hard" and not args.router_normalize_topk:
        raise InputError("--no-router-normalize-topk applies to --moe-gate soft only (hard gates are all 1)")


# The model flags a checkpoint fixes (every ModelConfig field but those that may change on resume; rope_theta
# is no flag): with --resume, those not given take the checkpoint's values.
SHAPE_FLAGS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                    if f.name not in CHANGEABLE_MODEL_FIELDS and f.name != "rope_theta")


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, validated. With --resume, the model flags not given on the command line are None: the
    checkpoint's values replace them in setup (take_model_flags), so a given flag that contradicts the
    checkpoint is still refused there."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:
        for action in parser._actions:  # parsed again without defaults: what is left was given
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
        for name in SHAPE_FLAGS:
            if name not in given:
                setattr(args, name, None)
    validate(args, env_world_size())
    return args


def take_model_flags(args: argparse.Namespace, saved_model: Optional[dict]) -> None:
    """--resume: the model flags parse_args left unset (None) take the checkpoint's values, or their defaults
    when there is no checkpoint (--resume auto, a fresh start); then the flags are checked together."""
    defaults = build_parser()
    for name in SHAPE_FLAGS:
        if getattr(args, name) is None:
            default = defaults.get_default(name)
            setattr(args, name, saved_model.get(name, default) if saved_model is not None else default)
    check_model_flags(args)


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, max_seq_length=args.max_seq_length, dropout=args.dropout,
        num_experts=args.num_experts, num_experts_per_token=args.num_experts_per_token,
        moe_layer_interval=args.moe_layer_interval, expert_intermediate_size=args.expert_intermediate_size,
        router_aux_loss_coef=args.router_aux_loss_coef, router_z_loss_coef=args.router_z_loss_coef,
        router_normalize_topk=args.router_normalize_topk, moe_expert_impl=args.moe_expert_impl,
        moe_capacity_factor=args.moe_capacity_factor, moe_drop_policy=args.moe_drop_policy,
        moe_renorm_after_drop=args.moe_renorm_after_drop, moe_router_score=args.moe_router_score,
        moe_bias_update_rate=args.moe_bias_update_rate, moe_routing=args.moe_routing, moe_gate=args.moe_gate)
