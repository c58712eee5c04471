"""The trainer's options: the run options declared as dataclass fields (help text, default, check: options.py;
the model's are ModelConfig's and MoEConfig's), the parser built from all of them, the checks between them
(one line and exit code 2 for bad input), the model flags a checkpoint fixes, and the ModelConfig they build.
The trainer's `args` is the parsed Namespace: one attribute per option, named by its flag (Flag.dest)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from checkpoint import CheckpointError, check_hub, read_manifest
from errors import InputError, OneLineParser
from model import RECOMPUTE_MODES, ModelConfig
from moe_config import MoEConfig
from options import (NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, HelpFormatter, add_options, check_flags, flag_defaults,
                     flag_values, flags, option, renamed)
from data_parallel import REDUCE_DTYPES
from parallel import check_layout, env_world_size
from run_log import check_sinks


@dataclass
class TrainingConfig:
    HELP_GROUP: ClassVar[str] = "training"
    micro_batch_size: Optional[int] = option(None, "sequences per microbatch per DP rank (default min(8, global/DP), "
                                                   "or derived from --num-microbatches)", check=POSITIVE)
    global_batch_size: int = option(32, "sequences per optimizer step, all DP ranks", check=POSITIVE, reported=True)
    num_microbatches: Optional[int] = option(None, "microbatches per step per DP rank (gradient accumulation / "
                                                   "pipeline microbatches); default global / (micro * DP)",
                                             check=POSITIVE)
    max_steps: int = option(200, "optimizer steps", check=POSITIVE, reported=True)
    learning_rate: float = option(3e-3, "peak learning rate", check=POSITIVE, reported=True)
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay", check=NON_NEGATIVE, reported=True)
    warmup_steps: int = option(20, "linear warm-up steps", check=NON_NEGATIVE, reported=True)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", check=NON_NEGATIVE, reported=True)
    adam_beta1: float = option(0.9, "AdamW beta1", check=UNIT_INTERVAL, reported=True)
    adam_beta2: float = option(0.95, "AdamW beta2", check=UNIT_INTERVAL, reported=True)
    adam_eps: float = option(1e-8, "AdamW epsilon", check=POSITIVE, reported=True)
    grad_clip: float = option(1.0, "global gradient-norm clip (0 = off)", check=NON_NEGATIVE, reported=True)
    seed: int = option(1337, "seed of initialisation, data order and dropout (the dropout seed also varies with the "
                             "PP stage and DP rank; TP ranks share it)", reported=True)
    device: str = option("auto", "where to train", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    moe_bf16_weights: bool = option(True, "under bf16: keep bf16 copies of the expert weights, refreshed once per "
                                          "optimizer step, with their gradients added straight into the fp32 ones "
                                          "(off: cast at every microbatch)", on_off=True)
    compile: bool = option(False, "torch.compile the model (see --compile-scope)")
    compile_scope: str = option("model", "with --compile: the whole stage in one graph (fewer launches and Python "
                                         "calls per step) or each transformer block on its own (one graph shared by "
                                         "the layers, shorter compilation)", choices=("blocks", "model"))
    recompute: str = option("none", "activation recomputation in every layer: attention = the attention sublayer "
                                    "(norm + attention), moe = the feed-forward sublayer of the MoE layers (norm + "
                                    "MoE; dense MLP layers are not recomputed), block = the whole layer. Its "
                                    "activations are freed after the forward and recomputed from its input in the "
                                    "backward: one more forward of that part for less activation memory "
                                    "(non-reentrant torch.utils.checkpoint; the same dropout and router jitter noise; "
                                    "MoE statistics and bias-balancing loads counted once)", choices=RECOMPUTE_MODES)
    gc_interval: int = option(50, "0: Python's automatic garbage collector; N: freeze the objects of set-up, turn "
                                  "automatic collection off while training and collect the young generations every N "
                                  "steps", check=NON_NEGATIVE)
    data: Optional[str] = option(None, "UTF-8 text file, directory of UTF-8 text files (other files are refused, as "
                                       "prepare_data.py refuses them), a prepare_data.py output directory, or uint16 "
                                       ".bin tokens (default: embedded stdlib corpus)", reported=True)


@dataclass
class ParallelConfig:
    HELP_GROUP: ClassVar[str] = "parallelism (under torchrun)"
    tensor_parallel_size: int = option(1, "TP size; expert parallelism uses the same group unless "
                                          "--expert-parallel-size says otherwise")
    expert_parallel_size: Optional[int] = option(None, "EP size: the experts are split over this many ranks, a multiple "
                                                       "of --tensor-parallel-size that divides TP x DP. Equal to TP (the "
                                                       "default) the EP group is the TP group; larger, it spans EP / TP "
                                                       "data-parallel ranks, whose tokens travel to their experts' ranks "
                                                       "by all-to-all (no-drop routing then reads the split sizes on the "
                                                       "host once per MoE layer)")
    pipeline_parallel_size: int = option(1, "PP stages")
    pipeline_schedule: str = option("1f1b", "pipeline schedule", choices=("gpipe", "1f1b"))
    ddp_bucket_size_mb: float = option(25.0, "DP gradient all-reduce bucket size", check=POSITIVE)
    grad_reduce_dtype: str = option("fp32", "dtype of the DP gradient all-reduce: bf16 halves its bytes; each "
                                            "rank's gradient is rounded to bf16 and summed in bf16, the accumulation "
                                            "over microbatches stays fp32 (Megatron's --grad-reduce-in-bf16; needs "
                                            "DP > 1)", choices=tuple(REDUCE_DTYPES), reported=True)
    shard_optimizer: bool = option(False, "ZeRO-1 (Megatron's distributed optimizer): each data-parallel rank keeps the "
                                          "AdamW moments of 1/DP of every gradient bucket, the gradients are "
                                          "reduce-scattered and the parameters all-gathered after the step (the "
                                          "experts' over the ranks holding them); checkpoints are saved sharded and "
                                          "resume under any layout, with or without it (needs DP > 1)")


@dataclass
class LoggingConfig:
    HELP_GROUP: ClassVar[str] = "logging"
    log_interval: int = option(10, "steps between log lines (the first and the last step of a run are always "
                                   "logged); step N is the state after N optimizer steps, as in the step_0000000N "
                                   "checkpoint", check=POSITIVE)
    eval_interval: int = option(100, "steps between validation runs (0 = only at the end)", check=NON_NEGATIVE)
    eval_iters: int = option(10, "validation batches per evaluation (0 = no evaluation)", check=NON_NEGATIVE)
    output_dir: Optional[str] = option(None, "run directory for config.json and metrics.jsonl (default "
                                             "runs/<time>); one run at a time: locked while the run lasts")
    moe_metrics: str = option("brief", "MoE load statistics: off, the summary, or also per-layer metrics and the "
                                       "count matrix", choices=("off", "brief", "detailed"))
    moe_detailed_every: int = option(0, "in brief mode, log the detailed MoE metrics every N steps (0 = never)",
                                     check=NON_NEGATIVE)
    moe_histogram_every: int = option(50, "expert-load histogram every N steps (wandb/TB)", check=NON_NEGATIVE)
    wandb: bool = option(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = option("minimal-moe", "wandb project")
    tensorboard: bool = option(False, "log to TensorBoard under <output-dir>/tensorboard")
    progress: bool = option(True, "tqdm progress bar (there is none anyway when stdout is not a terminal)")


@dataclass
class CheckpointConfig:
    HELP_GROUP: ClassVar[str] = "checkpoints"
    save_interval: int = option(1000, "save a checkpoint every N steps (0 = no periodic saves; the final one is "
                                      "still saved)", check=NON_NEGATIVE)
    checkpoint_dir: Optional[str] = option(None, "where checkpoints go (default <output-dir>/checkpoints); locked "
                                                 "while the run lasts")
    keep_last: int = option(3, "keep the newest K step checkpoints up to the one just saved; older ones are deleted "
                               "once a newer one is complete (0 = keep all)", check=NON_NEGATIVE)
    resume: Optional[str] = option(None, "auto: the newest complete checkpoint in --checkpoint-dir, or a fresh start "
                                         "if there is none; PATH: a step_* checkpoint, or a checkpoint directory (its "
                                         "newest). Model flags not given take the checkpoint's values. A damaged one "
                                         "(a file missing or cut short) stops the run, naming the newest whole one to "
                                         "pass instead", metavar="auto|PATH")
    save: bool = option(True, "a final checkpoint at the end (--no-save: none; --save-interval still applies)")
    eval_only: bool = option(False, "with --resume: print the checkpoint's validation loss, no training; writes "
                                    "nothing")
    hf_repo: Optional[str] = option(None, "upload each saved checkpoint to this Hugging Face Hub repo (needs "
                                          "huggingface_hub and a token)", metavar="OWNER/NAME")


@dataclass
class ProfilingConfig:
    HELP_GROUP: ClassVar[str] = "profiling"
    profile: bool = option(False, "torch.profiler trace of a window of steps, one per rank")
    profile_wait: int = option(5, "steps before the profiler starts", check=NON_NEGATIVE)
    profile_warmup: int = option(3, "profiler warm-up steps (events dropped)", check=NON_NEGATIVE)
    profile_steps: int = option(5, "steps recorded in the trace", check=POSITIVE)
    trace_dir: Optional[str] = option(None, "where every rank writes trace_rank{R}_step{N}.json (default "
                                            "<output-dir>/traces)")
    profile_gzip: bool = option(False, "write .json.gz traces")


MODEL_OPTIONS = (ModelConfig, MoEConfig)
RUN_OPTIONS = (TrainingConfig, ParallelConfig, LoggingConfig, CheckpointConfig, ProfilingConfig)
ALL_OPTIONS = MODEL_OPTIONS + RUN_OPTIONS  # the order of the help's groups

# The model flags a checkpoint fixes: with --resume, those not given take the checkpoint's values.
SHAPE_FLAGS = tuple(f.dest for cls in MODEL_OPTIONS for f in flags(cls) if not f.option.changeable)
# The model fields that may change on resume (they alter how training goes on, not what the parameters mean),
# and the flags the resume line names when they differ from the checkpoint's run.
CHANGEABLE_MODEL_FIELDS = frozenset(f.dest for cls in MODEL_OPTIONS for f in flags(cls) if f.option.changeable)
REPORTED_FLAGS = tuple(f.dest for cls in RUN_OPTIONS + MODEL_OPTIONS for f in flags(cls) if f.option.reported)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a GPT-style Mixture-of-Experts model with hand-rolled DP/TP/EP/PP.",
                      formatter_class=HelpFormatter)
    for cls in ALL_OPTIONS:
        add_options(p, cls)
    return p


def validate(args: argparse.Namespace, world_size: int) -> None:
    """Every check that needs no work done; raises InputError naming the flag. Sets the micro-batch size and
    the number of microbatches (batch_sizes). With --resume the model flags are checked once the checkpoint
    they come from is known (check_model_flags, in setup)."""
    for cls in ALL_OPTIONS:  # each option on its own (a model flag left to the checkpoint is None: skipped)
        check_flags(args, cls)
    if args.min_lr > args.learning_rate:
        raise InputError(f"--min-lr {args.min_lr} must not exceed --learning-rate {args.learning_rate}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    tp, pp, ep = args.tensor_parallel_size, args.pipeline_parallel_size, args.expert_parallel_size
    dp = check_layout(world_size, tp, pp, ep)
    for flag, on in (("--grad-reduce-dtype bf16", args.grad_reduce_dtype != "fp32"),
                     ("--shard-optimizer", args.shard_optimizer)):
        if on and dp == 1:
            raise InputError(f"{flag} needs data parallelism: DP is 1 here (world size {world_size} / (TP {tp} x PP "
                             f"{pp})), so no gradient is reduced over data-parallel ranks")
    if args.resume is None:
        check_model_flags(args)
    args.micro_batch_size, args.num_microbatches = batch_sizes(args, dp)
    if ep is not None and ep > tp and tp > 1 and (args.micro_batch_size * args.max_seq_length) % tp:
        raise InputError(f"--expert-parallel-size {ep} > --tensor-parallel-size {tp}: the TP ranks share a microbatch's "
                          f"--micro-batch-size {args.micro_batch_size} x --max-seq-length {args.max_seq_length} tokens, "
                          f"which must be divisible by {tp}")
    check_run_flags(args)


def batch_sizes(args: argparse.Namespace, dp: int) -> tuple[int, int]:
    """(micro-batch size, microbatches per step) from the batch flags given: global = micro * microbatches * DP."""
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
    return mbs, per_dp // mbs


def check_run_flags(args: argparse.Namespace) -> None:
    """What the run writes and traces: --eval-only, the log sinks, the profiler window, the Hub upload."""
    if args.eval_only and (args.wandb or args.tensorboard):
        raise InputError("--eval-only writes nothing (it prints the validation loss): drop --wandb and --tensorboard")
    check_sinks(args.wandb, args.tensorboard)
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
    """The model flags against each other and against the TP / PP sizes (ModelConfig.check); raises InputError
    naming the flag. Called by validate, or with --resume by setup, once the checkpoint's values are in."""
    model_config(args, args.vocab_size).check(args.tensor_parallel_size, args.pipeline_parallel_size,
                                              args.expert_parallel_size)


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


def read_run_manifest(path: Path) -> dict:
    """A checkpoint's manifest with its model config and flags under today's names: one written before a flag
    was renamed holds the old name (router_aux_loss_coef), one written before an option existed lacks it (it
    was trained with the default, which it gets here). A model field this code does not know (a checkpoint
    of a newer version) is refused: CheckpointError, one line."""
    manifest = read_manifest(path)
    try:
        model = ModelConfig.from_dict(manifest["model"]).to_dict()
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build its model here ({e}; written by a newer version?)") from None
    args = {**flag_defaults(ALL_OPTIONS), **renamed(manifest.get("args", {}), ALL_OPTIONS)}
    return {**manifest, "model": model, "args": args}


def take_model_flags(args: argparse.Namespace, saved_model: Optional[dict]) -> None:
    """--resume: the model flags parse_args left unset (None) take the checkpoint's values (saved_model, as
    read_run_manifest gives it), or their defaults when there is no checkpoint (--resume auto, a fresh start);
    then the flags are checked together."""
    defaults = flag_defaults(MODEL_OPTIONS)
    for name in SHAPE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, saved_model[name] if saved_model is not None else defaults[name])
    check_model_flags(args)


def model_config(args: argparse.Namespace, vocab_size: Optional[int]) -> ModelConfig:
    """The model the flags describe, with the corpus's vocabulary size."""
    return ModelConfig(**{**flag_values(args, ModelConfig), "vocab_size": vocab_size},
                       moe=MoEConfig(**flag_values(args, MoEConfig)))
