"""Minimal MoE pretraining: flags and the training loop.

    python minimal_pretrain.py                       # one CPU or GPU, embedded default corpus
    torchrun --nproc_per_node=8 minimal_pretrain.py --tensor-parallel-size 2 --pipeline-parallel-size 2
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (CHANGEABLE_MODEL_FIELDS, MANIFEST, CheckpointError, HubUploader, check_hub, complete_checkpoints,
                        describe_resume, load_checkpoint, newest_checkpoint, read_manifest, resolve_checkpoint,
                        save_checkpoint)
from data import (Corpus, DataError, batch_offsets, check_lengths, codec_description, corpus_fingerprint, get_batch,
                  load_corpus)
from errors import InputError, OneLineParser
from model import GPT, ModelConfig, compile_model, count_parameters
from moe_layers import grouped_mm_available, update_expert_biases
from mixed_precision import ExpertWeightCopies
from moe_stats import StatsLayout, StepStats, moe_metrics, pack_step_stats
from parallel import (DataParallelGrads, PipeComm, StepFunctions, Topology, all_reduce_, check_layout,
                      clip_grads_, destroy_topology, env_world_size, full_state_dict, grad_norm, init_topology,
                      run_forward_only, run_schedule, stage_layer_ids)
from profiling import phase, start_profiler
from run_log import RunLog, check_sinks, console_line


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
                        "chosen expert weighted 1 (the router then learns only from its losses)")
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
    if gate == "hard" and not args.router_normalize_topk:
        raise InputError("--no-router-normalize-topk applies to --moe-gate soft only (hard gates are all 1)")


@contextlib.contextmanager
def probe_file(path: str, flag: str):
    """Creates `path` (and its missing parents) and a probe file in it, yields the probe's path, then removes
    the probe and every directory it had to create, so a run that fails later (bad --data, say) leaves
    nothing behind; each directory is made for real when something is first written into it. Raises
    InputError naming the flag if `path` cannot be created or written."""
    created, probe = missing_dirs(path), os.path.join(path, f".write-test-{os.getpid()}")
    try:
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
        except OSError as e:
            raise InputError(f"{flag} {path}: cannot create or write it ({e.strerror or e})") from None
        yield probe
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()


def missing_dirs(path: str) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first (what creating it will make)."""
    missing, p = [], Path(path).absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


LOCK_FILE = ".lock"


@contextlib.contextmanager
def dir_lock(path: str, flag: str) -> Iterator[None]:
    """Makes the directory `path` this run's alone while the context lasts: an exclusive flock on
    `path/.lock`, a file that names the holder (pid, host, start time) for the error line of a second run.
    The OS drops the lock when the process ends, however it ends, so a killed run leaves a file but never
    a stuck lock; flock reaches other machines on NFS v4 and on Lustre mounted with `-o flock`. Creates
    `path` if needed; on exit removes the lock file, then every directory it created that is still empty,
    so a run refused later leaves nothing behind. Raises InputError naming the flag (and the holder)."""
    created, lock, fd, owned = missing_dirs(path), os.path.join(path, LOCK_FILE), None, False
    try:
        for _ in range(3):
            try:
                os.makedirs(path, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InputError(f"{flag} {path}: cannot create or write it ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "it has not named itself yet"
                raise InputError(f"{flag} {path} is in use by another run ({holder}); wait for it to end or "
                                  f"choose another {flag}") from None
            except OSError as e:  # no locks on this filesystem (Lustre without -o flock, NFS without lockd)
                print(f"warning: {flag} {path}: cannot lock it ({e.strerror or e}); nothing keeps a second run "
                      f"out of it", file=sys.stderr)
                owned = True
                break
            try:  # the file we locked may have been unlinked by its last holder after we opened it
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    owned = True
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = None
        else:
            raise InputError(f"{flag} {path}: its {LOCK_FILE} keeps changing; is another run starting into it?")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield
    finally:
        if fd is not None:
            if owned:  # removed while still locked: a run that opened it meanwhile sees it go and retries
                with contextlib.suppress(OSError):
                    os.remove(lock)
            os.close(fd)
        for d in created:  # deepest first; a directory that received files stays
            with contextlib.suppress(OSError):
                d.rmdir()


def check_shared_checkpoints(checkpoint_dir: str, probe: Optional[str], resume_from: Optional[Path],
                             topo: Topology) -> None:
    """Every rank writes its files into the checkpoint directory rank 0 creates and reads the checkpoint it
    resumes from: on several machines both must be on a filesystem that every node shares. Rank 0 holds a
    probe file (named `probe`; None: this run saves nothing) in the directory while every rank looks for it
    and for the checkpoint (a relative path is taken from each rank's own working directory). Collective;
    raises InputError on every rank, naming what some rank cannot see."""
    blind = torch.tensor([probe is not None and not os.path.exists(os.path.join(checkpoint_dir, probe)),
                          resume_from is not None and not os.path.exists(os.path.join(resume_from, MANIFEST))],
                         dtype=torch.int32)
    dist.all_reduce(blind, group=topo.control_group)  # host-side (gloo): no GPU stream involved
    unseen = [f"{flag} {path} ({n} of {topo.world_size} ranks)" for flag, path, n in
              (("--checkpoint-dir", checkpoint_dir, int(blind[0])), ("--resume", resume_from, int(blind[1]))) if n]
    if unseen:
        raise InputError(f"ranks cannot see what rank 0 sees in {' and '.join(unseen)}; on several machines "
                          f"checkpoints must be on a filesystem every node shares")


def load_same_corpus(args, topo: Topology) -> Corpus:
    """Every rank loads --data itself (on several machines, from its own node's disk): all must get the same
    tokens. Collective; a rank that cannot load it, or loads other tokens than rank 0, stops every rank with
    one line, instead of leaving the others waiting in the next collective."""
    corpus, report = None, None
    try:
        corpus = load_corpus(args.data, args.vocab_size)
        check_lengths(corpus, args.max_seq_length, args.data)
        report = ("ok", corpus_fingerprint(corpus))
    except DataError as e:
        report = ("error", str(e))
    if topo.world_size > 1:
        reports = [None] * topo.world_size
        dist.all_gather_object(reports, report, group=topo.control_group)
    else:
        reports = [report]
    for rank, (kind, text) in enumerate(reports):
        if kind == "error":
            raise DataError(text if rank == topo.rank else f"rank {rank}: {text}")
    for rank, (_, fingerprint) in enumerate(reports):
        if fingerprint != reports[0][1]:
            raise DataError(f"--data {args.data or '(default corpus)'}: rank {rank} loaded other tokens than rank 0 "
                            f"({fingerprint} against {reports[0][1]}); on several machines every node must read "
                            f"the same data")
    return corpus


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


def lr_at(step: int, args) -> float:
    """Linear warm-up to the peak, then cosine decay to --min-lr at --max-steps."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.learning_rate - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# Dense bf16 peak FLOP/s by GPU name (first match wins).
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(cfg: ModelConfig, active_params: int) -> float:
    """6 * (active parameters except the embedding table) + 12 * layers * d_model * seq_len (attention)."""
    return 6 * (active_params - cfg.vocab_size * cfg.hidden_size) + 12 * cfg.num_layers * cfg.hidden_size * cfg.max_seq_length


@dataclass
class TrainResult:
    losses: list = field(default_factory=list)  # LM loss of every logged step (rank 0)
    records: list = field(default_factory=list)  # logged records (rank 0)
    val_loss: Optional[float] = None
    state_dict: Optional[dict] = None  # full unsharded parameters at the end (rank 0, if asked for)
    checkpoint: Optional[str] = None  # the last checkpoint written or loaded


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; reported as one line and exit code 3."""


@contextlib.contextmanager
def scheduled_gc():
    """Python's automatic collector stops the host at unpredictable steps, each full pass walking every
    object of the process. Instead: collect once, freeze what set-up built (model, optimizer, data) so no
    pass walks it again, and leave collection to the training loop's schedule. Restored on exit (objects a
    caller froze before are left frozen: then nothing is frozen or unfrozen here)."""
    was_enabled, we_freeze = gc.isenabled(), gc.get_freeze_count() == 0
    gc.collect()
    if we_freeze:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if we_freeze:
            gc.unfreeze()
        if was_enabled:
            gc.enable()


class RunControl:
    """Decisions every rank must take at the same step. SIGTERM/SIGINT ask the run to stop (after a
    checkpoint); a second SIGINT interrupts at once. Rank 0 may also have seen a non-finite loss at a
    logging step. `exchange` shares these as a code (0 go on, STOP, NONFINITE; the largest wins) through a
    host-side (gloo) all-reduce that never touches the GPU stream. It is asynchronous: the exchange launched
    after step s is read after step s + 1, so no rank waits for the others' hosts, and every rank reads the
    same verdict at the same step."""
    STOP, NONFINITE = 1, 2

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}
        self._pending = None  # (work, buffer) of the exchange in flight

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def exchange(self, topo: Topology, nonfinite_seen: bool) -> int:
        code = max(self.NONFINITE if nonfinite_seen else 0, self.STOP if self.received else 0)
        if topo.world_size == 1:
            return code
        verdict = 0
        if self._pending is not None:
            work, buf = self._pending
            work.wait()
            verdict = int(buf.item())  # a CPU tensor: no device sync
        buf = torch.tensor([code], dtype=torch.int32)
        self._pending = (dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=topo.control_group, async_op=True), buf)
        if verdict == self.STOP and self.received is None:
            self.received = "a signal on another rank"
        return verdict

    def finish(self) -> None:
        """Completes the exchange still in flight (every rank calls it after its last step)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


class FiniteWatch:
    """Remembers, on the device and without a host sync, the first step whose loss or gradient norm was
    not finite. Rank 0 reads whether there is one in its logging transfer (`seen_on_host`); `check`, a
    collective, reads the step on every rank before each save, at the end, and when rank 0 saw one."""
    NONE = 2 ** 62

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.seen_on_host = False

    def update(self, step: int, norm: torch.Tensor, loss_sum: torch.Tensor) -> None:
        bad = ~torch.isfinite(norm.detach().float() + loss_sum.detach().float())  # NaN/inf survive the sum
        self.first_bad = torch.minimum(self.first_bad, torch.where(bad, step, self.NONE))

    def flag(self) -> torch.Tensor:
        """1.0 if a non-finite step was seen (device scalar), to ride along a transfer the host makes anyway."""
        return (self.first_bad != self.NONE).float().view(1)

    def check(self, topo: Topology, last_good: Optional[str]) -> None:
        first = self.first_bad.clone()
        if topo.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if int(first.item()) != self.NONE:
            kept = f"the last good checkpoint {last_good} is kept as it was" if last_good else "no checkpoint was written"
            raise NonFiniteError(f"non-finite loss or gradient norm at step {int(first.item())}; stopped, {kept}")


@dataclass
class Trainer:
    """Everything set-up builds; the pieces of the loop read it."""
    args: argparse.Namespace
    topo: Topology
    cfg: ModelConfig
    corpus: Corpus
    codec: dict  # how the tokens decode (data.codec_description), recorded in every checkpoint
    codec_files: dict  # {name: bytes} the codec needs (a tokenizer.json), copied into every checkpoint (rank 0)
    model: GPT
    params: list
    optimizer: torch.optim.Optimizer
    dp_grads: DataParallelGrads
    weight_copies: Optional[ExpertWeightCopies]  # bf16 expert weights: refresh() after every change of the masters
    autocast: contextlib.AbstractContextManager
    comm: Optional[PipeComm]
    step_stats: StepStats
    stats_layout: StatsLayout
    run_log: Optional[RunLog]  # rank 0's, opened once the run is accepted (never with --eval-only)
    output_dir: Path
    checkpoint_dir: Path
    resume_from: Optional[Path]  # the checkpoint --resume resolved to (None: start at step 0)
    uploader: Optional[HubUploader]
    emit: Callable  # prints on rank 0 without garbling the progress bar
    flops_per_token: float
    peak_flops: Optional[float]

    @property
    def is_main(self) -> bool:
        return self.topo.rank == 0


@dataclass
class StepOutput:
    lr: float
    norm: torch.Tensor        # global gradient norm (device scalar)
    lm_loss_sum: torch.Tensor  # sum over microbatches of the LM loss (device scalar; 0 off the last stage)
    events: list              # the schedule's ('F'|'B', microbatch) order, for the MoE statistics


def train(args: argparse.Namespace, return_state: bool = False) -> TrainResult:
    device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    precision = args.precision if args.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    topo = init_topology(args.tensor_parallel_size, args.pipeline_parallel_size, device_type)
    with contextlib.ExitStack() as cleanup:  # closes the run log even when training fails
        try:
            return _train(args, topo, precision, return_state, cleanup)
        finally:
            destroy_topology()


def _train(args, topo: Topology, precision: str, return_state: bool, cleanup: contextlib.ExitStack) -> TrainResult:
    t = setup(args, topo, precision, cleanup)
    result = TrainResult()
    start = resume(t, result)
    if t.is_main and not args.eval_only:  # accepted: only now is anything written into the output directory
        open_run_log(t, cleanup)
        if t.resume_from is not None:
            t.run_log.log({"step": start, "resumed_from": str(t.resume_from)})
    if args.eval_only:
        evaluate_and_log(t, start, result)  # the state after the checkpoint's steps
    else:
        train_loop(t, start, result, cleanup)
    if return_state:
        result.state_dict = full_state_dict(t.model, topo)
    return result


def open_run_log(t: Trainer, cleanup: contextlib.ExitStack) -> None:
    """Rank 0's config.json, metrics.jsonl and the optional sinks, closed with `cleanup`."""
    args = t.args
    t.run_log = RunLog(str(t.output_dir), {**vars(args), "model": t.cfg.to_dict(), "world_size": t.topo.world_size},
                       args.wandb, args.wandb_project, args.tensorboard, args.moe_histogram_every)
    cleanup.callback(t.run_log.close)
    t.emit(f"logging to {t.output_dir}/metrics.jsonl")


def train_loop(t: "Trainer", start: int, result: TrainResult, cleanup: contextlib.ExitStack) -> None:
    """Steps start + 1 .. --max-steps: train, log, evaluate, save; stops early (after a checkpoint) on
    SIGTERM/SIGINT and raises NonFiniteError when the loss or gradient norm stops being finite.
    Step numbers count: what is logged, evaluated or saved as step N is the state after N optimizer steps,
    as in the step_0000000N checkpoint. Only the 0-based index `step` (learning rate, data, dropout) is
    internal."""
    args, topo = t.args, t.topo
    progress = None
    if t.is_main and not args.no_progress and sys.stdout.isatty():  # a bar in a log file is noise
        from tqdm import tqdm
        progress = tqdm(total=args.max_steps, initial=start, desc="train", dynamic_ncols=True, leave=False)
        t.emit = progress.write
        if t.uploader is not None:  # its thread prints too
            t.uploader.say = t.emit
    if args.gc_interval:
        cleanup.enter_context(scheduled_gc())
    control = cleanup.enter_context(RunControl())
    watch = FiniteWatch(topo.device)
    clock = Throughput(start)
    t.model.train()
    profiler = start_profiler(args, topo, t.run_log, t.emit, first_step=start + 1)
    cleanup.callback(profiler.close)  # also logs the traces to wandb
    for step in range(start, args.max_steps):
        if args.gc_interval and step % args.gc_interval == 0:
            gc.collect(1)  # the young generations only: what the steps since the last collection left
        done = step + 1  # the number every user-facing line gives this step
        log_now = done % args.log_interval == 0 or step == start or done == args.max_steps  # first, every N-th, last
        out = train_step(t, step, record_stats=log_now and args.moe_metrics != "off")
        watch.update(done, out.norm, out.lm_loss_sum)
        if log_now:
            log_step(t, done, out, clock, result, watch)
        if progress is not None:
            progress.update(1)
        if args.eval_iters > 0 and ((args.eval_interval > 0 and done % args.eval_interval == 0)
                                    or done == args.max_steps):
            with clock.paused():  # evaluation time is not training throughput
                evaluate_and_log(t, done, result)
        verdict = control.exchange(topo, watch.seen_on_host)
        if verdict == RunControl.NONFINITE:
            watch.check(topo, result.checkpoint)  # raises on every rank
        stop = verdict == RunControl.STOP
        if stop or (args.save_interval and done % args.save_interval == 0 and done < args.max_steps):
            watch.check(topo, result.checkpoint)  # never save a broken state over a good checkpoint
            with clock.paused():  # nor is saving
                save(t, done, result)
        if stop:
            control.finish()
            t.emit(f"stopped by {control.received} after step {done}: checkpoint {result.checkpoint}; "
                   f"continue with --resume auto (or --resume {result.checkpoint})")
            break
        clock.excluded += profiler.step()  # writing the trace is not training throughput
    else:
        watch.check(topo, result.checkpoint)
        control.finish()
        if not args.no_save and args.max_steps > start:
            save(t, args.max_steps, result)
    if progress is not None:
        progress.close()


def setup(args, topo: Topology, precision: str, cleanup: contextlib.ExitStack) -> Trainer:
    """Data, model, optimizer, communication and statistics: everything before the first step but loading the
    checkpoint (resume) and opening the run log (open_run_log); nothing is written here but the locks."""
    is_main = topo.rank == 0
    say = print if is_main else (lambda *a, **k: None)
    output_dir, checkpoint_dir, resume_from, saved_model = run_dirs(args, topo, cleanup)
    if args.resume is not None:
        take_model_flags(args, saved_model)  # the same on every rank: rank 0's checkpoint
    corpus = load_same_corpus(args, topo)
    codec, codec_files = run_codec(args.data, is_main, say)
    if corpus.vocab_size % topo.tp:
        raise InputError(f"vocabulary size {corpus.vocab_size} must be divisible by --tensor-parallel-size {topo.tp}")
    cfg = model_config(args, corpus.vocab_size)
    if cfg.num_experts and args.moe_expert_impl == "grouped":
        probe = torch.empty(0, device=topo.device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        if not grouped_mm_available(probe, cfg.hidden_size, cfg.expert_ffn_size):
            raise InputError(f"--moe-expert-impl grouped: torch._grouped_mm does not run {precision} on {topo.device} "
                              f"with these sizes (use auto or loop)")
    layer_ids = stage_layer_ids(cfg.num_layers, topo.pp, topo.pp_rank)
    model = GPT(cfg, topo, layer_ids, first=topo.is_first_stage, last=topo.is_last_stage)
    model.init_weights(args.seed)
    model.to(topo.device)
    torch.manual_seed(args.seed + 100 * topo.pp_rank + 10_007 * topo.dp_rank)  # dropout; TP ranks share it
    if args.compile:
        compile_model(model, args.compile_scope)

    total, active = count_parameters(cfg)
    m, mbs, T = args.num_microbatches, args.micro_batch_size, args.max_seq_length
    say(f"data: {corpus.description}")
    say(f"topology: {topo.describe()}, {precision}, device {topo.device}")
    say(f"layers: {cfg.layer_pattern()}  (M = MoE with {cfg.num_experts} experts, top-{cfg.num_experts_per_token}; D = dense)")
    say(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token")
    if topo.pp > 1:
        say("pipeline stages: " + "; ".join(f"stage {s}: layers {stage_layer_ids(cfg.num_layers, topo.pp, s)}"
                                            for s in range(topo.pp)) + f"; schedule {args.pipeline_schedule}")
    say(f"batch: global {args.global_batch_size} = micro {mbs} x {m} microbatches x DP {topo.dp}, "
        f"{args.global_batch_size * T:,} tokens per step")

    params = list(model.parameters())
    dp_grads = DataParallelGrads(params, topo, args.ddp_bucket_size_mb)
    weight_copies = None
    if precision == "bf16" and args.moe_bf16_weights == "on" and cfg.num_experts:
        weight_copies = ExpertWeightCopies([moe.experts for moe in model.moe_layers().values()], torch.bfloat16,
                                           dp_grads.grad_ready)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                  fused=topo.device.type == "cuda")
    uploader = None
    if args.hf_repo and is_main:
        uploader = HubUploader(args.hf_repo, say)
        cleanup.callback(uploader.close)
    stats_on = args.moe_metrics != "off"
    return Trainer(
        args=args, topo=topo, cfg=cfg, corpus=corpus, codec=codec, codec_files=codec_files, model=model, params=params,
        optimizer=optimizer,
        dp_grads=dp_grads, weight_copies=weight_copies,
        autocast=torch.autocast(topo.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        comm=PipeComm(topo, (mbs, T, cfg.hidden_size), torch.float32) if topo.pp > 1 else None,
        step_stats=StepStats(model.moe_layers(), cfg.num_experts_per_token, enabled=stats_on),
        stats_layout=StatsLayout(cfg.moe_layer_ids() if stats_on else [], cfg.num_experts, m, topo.dp,
                                 drops=cfg.has_capacity, bias=cfg.moe_bias_update_rate > 0, gates=True),
        run_log=None, output_dir=output_dir, checkpoint_dir=checkpoint_dir, resume_from=resume_from, uploader=uploader,
        emit=say,
        flops_per_token=flops_per_token(cfg, active), peak_flops=peak_flops(topo.device, precision))


def run_dirs(args, topo: Topology, cleanup: contextlib.ExitStack) -> tuple[Path, Path, Optional[Path], Optional[dict]]:
    """The output and checkpoint directories, the checkpoint to resume from (None: a fresh start) and its
    model config, the same on every rank. Rank 0 decides, before any model is built, and shares its verdict,
    so a bad path or a busy directory is one line and exit code 2 on every rank and no rank waits for another
    that failed. Rank 0 first locks the directories the run writes into (dir_lock, released when `cleanup`
    closes at the end of the run), so that a second run into them stops here and a fresh run's check for an
    earlier run's checkpoints cannot race with another start; --eval-only writes nothing and locks nothing."""
    output_dir = args.output_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    checkpoint_dir = args.checkpoint_dir or os.path.join(output_dir, "checkpoints")
    resume_from, saved_model, error, probe = None, None, None, None
    with contextlib.ExitStack() as keep:  # rank 0's probe in the checkpoint directory, until every rank looked
        if topo.rank == 0:
            try:
                will_save = not args.no_save or 0 < args.save_interval < args.max_steps
                if not args.eval_only:
                    cleanup.enter_context(dir_lock(output_dir, "--output-dir"))
                if will_save and not args.eval_only:
                    # Locked on its own too: another run may point its --checkpoint-dir here from elsewhere.
                    if os.path.realpath(checkpoint_dir) != os.path.realpath(output_dir):
                        cleanup.enter_context(dir_lock(checkpoint_dir, "--checkpoint-dir"))
                    probe = os.path.basename(keep.enter_context(probe_file(checkpoint_dir, "--checkpoint-dir")))
                resume_from = checkpoint_to_resume(args, Path(checkpoint_dir), will_save)
                if resume_from is not None:
                    saved_model = read_manifest(resume_from)["model"]
            except InputError as e:
                error = str(e)
        if topo.world_size > 1:  # ranks may also read the clock in different seconds: rank 0's names win
            shared = [output_dir, checkpoint_dir, resume_from, error, probe, saved_model]
            dist.broadcast_object_list(shared, src=0)
            output_dir, checkpoint_dir, resume_from, error, probe, saved_model = shared
        if error:
            raise InputError(error)
        if topo.world_size > 1 and (probe or resume_from):
            check_shared_checkpoints(checkpoint_dir, probe, resume_from, topo)
    return Path(output_dir), Path(checkpoint_dir), resume_from, saved_model


def checkpoint_to_resume(args, checkpoint_dir: Path, will_save: bool) -> Optional[Path]:
    """--resume PATH or auto -> the checkpoint to load (None: start at step 0). A fresh run that would save
    into a directory holding an earlier run's checkpoints is refused: --keep-last would delete its new
    checkpoints in favour of the old ones, and a later --resume auto would take the old run's."""
    found = complete_checkpoints(checkpoint_dir)
    if args.resume is None:
        if found and will_save:
            raise InputError(f"--checkpoint-dir {checkpoint_dir} already holds checkpoints of an earlier run (newest "
                              f"{found[-1][1].name}): continue it with --resume auto, or choose another "
                              f"--output-dir / --checkpoint-dir")
        return None
    if args.resume != "auto":
        return resolve_checkpoint(args.resume)
    if found:  # the newest; a damaged one stops the run, naming the newest whole one to pass
        return newest_checkpoint(checkpoint_dir, "--resume auto", "--resume")
    if args.eval_only:
        raise CheckpointError(f"--eval-only --resume auto: no checkpoint in {checkpoint_dir} to evaluate")
    return None


def rank_batch(t: Trainer, split: str, tokens, step: int):
    """This DP rank's microbatches of the global batch of `step` (a pure function of seed and step)."""
    args, topo = t.args, t.topo
    offsets = batch_offsets(len(tokens), args.max_seq_length, args.global_batch_size, args.seed, step, split)
    per_dp = args.global_batch_size // topo.dp
    mine = offsets[topo.dp_rank * per_dp:(topo.dp_rank + 1) * per_dp]
    x, y = get_batch(tokens, mine, args.max_seq_length, topo.device)
    return x.split(args.micro_batch_size), y.split(args.micro_batch_size)


def train_step(t: Trainer, step: int, record_stats: bool) -> StepOutput:
    """One optimizer step: the pipeline schedule over every microbatch, the DP gradient all-reduce,
    clipping and AdamW. No host-device sync."""
    args, topo, m = t.args, t.topo, t.args.num_microbatches
    lr = lr_at(step, args)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.dp_grads.zero_grad()
    t.step_stats.reset(enabled=record_stats)  # only a logging step's statistics are read
    xs, ys = rank_batch(t, "train", t.corpus.train, step)
    lm_loss_sum = torch.zeros((), device=topo.device)

    def forward(i, h):
        nonlocal lm_loss_sum
        with t.autocast:
            # Every stage gets the microbatch's token ids (hash routing reads them in every MoE layer).
            out, moe_loss = t.model(xs[i] if topo.is_first_stage else h, ys[i] if topo.is_last_stage else None,
                                    token_ids=xs[i])
        with phase("moe/stats"):
            t.step_stats.end_microbatch()
        # The mean over the global batch: 1/m for the microbatches, 1/DP for the DP ranks (whose gradients
        # DataParallelGrads sums: no pass over the gradients to divide them).
        scale = 1.0 / (m * topo.dp)
        if topo.is_last_stage:
            lm_loss_sum = lm_loss_sum + out.detach()
            return out, (out + moe_loss) * scale
        return out.float(), moe_loss * scale

    def before_backward(i):
        t.dp_grads.sync = i == m - 1  # all-reduce buckets during the last backward only

    events = run_schedule(args.pipeline_schedule, m, StepFunctions(forward, before_backward), t.comm, topo)
    t.dp_grads.finish()
    with phase("optimizer"):
        norm = grad_norm(t.params, topo)
        clip_grads_(t.params, norm, args.grad_clip)
        t.optimizer.step()
        if t.weight_copies is not None:
            t.weight_copies.refresh()
        update_expert_biases(t.model.moe_layers().values(), topo)  # aux-loss-free balancing (if on)
    return StepOutput(lr, norm, lm_loss_sum, events)


class Throughput:
    """Tokens/s between logging steps, with evaluation time taken out."""

    def __init__(self, last_step: int):
        self.last_time, self.last_step, self.excluded = time.perf_counter(), last_step, 0.0

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - start

    def tokens_per_sec(self, step: int, tokens_per_step: int) -> float:
        now = time.perf_counter()
        tps = tokens_per_step * (step - self.last_step) / max(now - self.last_time - self.excluded, 1e-9)
        self.last_time, self.last_step, self.excluded = now, step, 0.0
        return tps


def log_step(t: Trainer, step: int, out: StepOutput, clock: Throughput, result: TrainResult,
             watch: FiniteWatch) -> None:
    """Reduces this step's statistics (two collectives) and, on rank 0, logs one record everywhere."""
    args, topo = t.args, t.topo
    detailed = args.moe_metrics == "detailed" or (args.moe_detailed_every > 0 and step % args.moe_detailed_every == 0)
    with phase("moe/stats"):
        flat = pack_step_stats(t.stats_layout, t.step_stats, out.lm_loss_sum if topo.is_last_stage else None, topo, out.events)
    if not t.is_main:
        return
    tps = clock.tokens_per_sec(step, args.global_batch_size * args.max_seq_length)
    # The one device-to-host transfer of the logging step: the statistics, the grad norm, the non-finite flag.
    host = torch.cat([flat, out.norm.detach().float().view(1), watch.flag()]).cpu().numpy().astype(np.float64)
    watch.seen_on_host = bool(host[-1])
    host = host[:-1]
    parts = t.stats_layout.split(host[:-1])
    lm = parts["lm"].tolist()
    metrics = moe_metrics(t.stats_layout, host[:-1], detailed)
    rec = {"step": step, "loss": lm[0] / max(lm[1], 1),
           "aux_loss": metrics.get("moe/aux_loss_mean"), "z_loss": metrics.get("moe/z_loss_mean"),
           "lr": out.lr, "grad_norm": float(host[-1]), "tokens_per_sec": tps,
           "mfu": tps * t.flops_per_token / (t.peak_flops * topo.world_size) if t.peak_flops else None, **metrics}
    counts = parts["counts"] if t.run_log.wants_histogram(step) and t.stats_layout.L else None
    t.run_log.log(rec, counts)
    result.records.append(rec)
    result.losses.append(rec["loss"])
    t.emit(console_line(rec, capacity=t.cfg.has_capacity))


def evaluate(t: Trainer, expert_choice: bool = False) -> float:
    """Mean validation loss over --eval-iters global batches (the same batches at every evaluation).
    expert_choice (expert-choice models): route by expert choice over each validation microbatch, as
    training does, instead of the causal top-k over the same scores that evaluation and generation use."""
    args, topo, model = t.args, t.topo, t.model
    model.eval()
    for moe in model.moe_layers().values():
        moe.expert_choice_eval = expert_choice
    total_loss = torch.zeros(2, device=topo.device)
    with torch.no_grad(), t.autocast:
        for it in range(args.eval_iters):
            xs, ys = rank_batch(t, "val", t.corpus.val, it)

            def fwd(i, h):
                out, _ = model(xs[i] if topo.is_first_stage else h, ys[i] if topo.is_last_stage else None,
                               token_ids=xs[i])
                if topo.is_last_stage:
                    total_loss[0] += out.float()
                    total_loss[1] += 1
                return out.float()
            run_forward_only(args.num_microbatches, fwd, t.comm, topo)
    all_reduce_(total_loss, topo.pp_group)
    all_reduce_(total_loss, topo.dp_group)
    for moe in model.moe_layers().values():
        moe.expert_choice_eval = False
    model.train()
    return (total_loss[0] / total_loss[1]).item()


def evaluate_and_log(t: Trainer, step: int, result: TrainResult) -> None:
    """The validation loss; expert-choice models add val_loss_expert_choice, the same batches routed by expert
    choice as in training (not causal: it ranks each token against its whole microbatch)."""
    val = evaluate(t)
    result.val_loss = val
    rec = {"step": step, "val_loss": val}
    line = f"step {step:>5d} | val loss {val:.4f}"
    if t.cfg.num_experts and t.cfg.moe_routing == "expert-choice":
        rec["val_loss_expert_choice"] = evaluate(t, expert_choice=True)
        line += f" | with expert choice (not causal) {rec['val_loss_expert_choice']:.4f}"
    if t.run_log is not None:
        t.run_log.log(rec)
    t.emit(line)


def run_codec(data: Optional[str], is_main: bool, say: Callable) -> tuple[dict, dict]:
    """What every checkpoint carries to decode its tokens without --data (which may move or vanish): the
    codec's description and, on rank 0, the files it needs (a prepare_data.py directory's tokenizer.json),
    read now, while --data is known to be there. Training does not need the tokenizer: if rank 0 cannot
    read it (load_corpus saw it there), a warning, and the checkpoints say why they cannot decode; raising
    on rank 0 alone would leave the other ranks waiting."""
    codec = codec_description(data)
    files = {}
    if is_main and codec["kind"] == "tokenizer":
        try:
            files[codec["file"]] = (Path(data) / codec["file"]).read_bytes()
        except OSError as e:
            why = f"--data {data}: its {codec['file']} could not be read at start-up ({e.strerror or e})"
            say(f"warning: {why}; the checkpoints will not be able to decode their tokens")
            codec = {"kind": "none", "why": why}
    return codec, files


def checkpoint_meta(t: Trainer) -> dict:
    """The manifest's record of the run: the model config, every flag (--data as an absolute path) and the
    codec that decodes its tokens (sample.py needs nothing else)."""
    data = os.path.abspath(t.args.data) if t.args.data else None
    return {"model": t.cfg.to_dict(), "args": {**vars(t.args), "data": data}, "codec": t.codec}


def save(t: Trainer, done_steps: int, result: TrainResult) -> None:
    """A checkpoint of the state after `done_steps` optimizer steps (every rank takes part)."""
    start = time.perf_counter()
    path = save_checkpoint(t.checkpoint_dir, done_steps, t.model, t.optimizer, t.topo, checkpoint_meta(t),
                           keep_last=t.args.keep_last, protected=frozenset(t.uploader.busy) if t.uploader else frozenset(),
                           extra_files=t.codec_files)
    result.checkpoint = str(path)
    t.emit(f"saved checkpoint {path} ({time.perf_counter() - start:.1f}s)")
    if t.uploader is not None:
        t.uploader.upload(path)


def resume(t: Trainer, result: TrainResult) -> int:
    """Loads the checkpoint --resume resolved to into the model (and, to train on, the optimizer); returns
    the first step to run. Runs before anything is written: a checkpoint refused here leaves no trace."""
    args, path = t.args, t.resume_from
    if path is None:
        if args.resume == "auto":
            t.emit(f"resume auto: no checkpoint in {t.checkpoint_dir}, starting from step 0")
        return 0
    manifest = read_manifest(path)
    # A checkpoint written before a model field existed was trained with its default.
    t.emit(describe_resume(path, manifest, checkpoint_meta(t), t.topo, defaults=dataclasses.asdict(ModelConfig())))
    load_checkpoint(path, t.model, None if args.eval_only else t.optimizer, t.topo, manifest)
    if t.weight_copies is not None:
        t.weight_copies.refresh()
    result.checkpoint = str(path)
    if manifest["step"] >= args.max_steps and not args.eval_only:
        t.emit(f"the checkpoint has {manifest['step']} steps, --max-steps is {args.max_steps}: nothing to train")
    return manifest["step"]


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        train(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
