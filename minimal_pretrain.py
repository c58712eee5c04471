"""Minimal MoE pretraining: the training loop (flags in config.py, run control in run_control.py).

    python minimal_pretrain.py                       # one CPU or GPU, embedded default corpus
    torchrun --nproc_per_node=8 minimal_pretrain.py --tensor-parallel-size 2 --pipeline-parallel-size 2
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (CheckpointError, HubUploader, complete_checkpoints, describe_resume, load_checkpoint,
                        newest_checkpoint, resolve_checkpoint, save_checkpoint)
from config import (CHANGEABLE_MODEL_FIELDS, REPORTED_FLAGS, model_config, parse_args, read_run_manifest,
                    take_model_flags)
from data import (Corpus, DataError, batch_offsets, check_lengths, codec_description, corpus_fingerprint, get_batch,
                  load_corpus)
from errors import InputError
from model import GPT, ModelConfig, compile_model, count_parameters
from moe_layers import grouped_mm_available, update_expert_biases
from mixed_precision import ExpertWeightCopies
from moe_stats import StatsLayout, StepStats, moe_metrics, pack_step_stats
from data_parallel import REDUCE_DTYPES, DataParallelGrads, adamw_param_groups, clip_grads_, grad_norm
from parallel import (PipeComm, StepFunctions, Topology, all_reduce_, destroy_topology, full_state_dict, init_topology,
                      run_forward_only, run_schedule, stage_layer_ids)
from profiling import phase, start_profiler
from run_log import RunLog, console_line
from run_control import (FiniteWatch, NonFiniteError, RunControl, Throughput, check_shared_checkpoints, dir_lock,
                         probe_file, scheduled_gc)


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
    params: list  # what the optimizer steps: the parameters, or their slices with --shard-optimizer
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
    topo = init_topology(args.tensor_parallel_size, args.pipeline_parallel_size, device_type, args.expert_parallel_size)
    with contextlib.ExitStack() as cleanup:  # closes the run log even when training fails
        try:
            result = _train(args, topo, precision, return_state, cleanup)
        except BaseException:
            destroy_topology(topo, finished=False)
            raise
        destroy_topology(topo, finished=True)
        return result


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
    if t.is_main and args.progress and sys.stdout.isatty():  # a bar in a log file is noise
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
        if args.save and args.max_steps > start:
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
    if cfg.moe.num_experts and cfg.moe.expert_impl == "grouped":
        probe = torch.empty(0, device=topo.device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        if not grouped_mm_available(probe, cfg.hidden_size, cfg.expert_ffn_size):
            raise InputError(f"--moe-expert-impl grouped: torch._grouped_mm does not run {precision} on {topo.device} "
                              f"with these sizes (use auto or loop)")
    layer_ids = stage_layer_ids(cfg.num_layers, topo.pp, topo.pp_rank)
    model = GPT(cfg, topo, layer_ids, first=topo.is_first_stage, last=topo.is_last_stage,
                recompute=args.recompute)
    model.init_weights(args.seed)
    model.to(topo.device)
    torch.manual_seed(args.seed + 100 * topo.pp_rank + 10_007 * topo.dp_rank)  # dropout; TP ranks share it
    if args.compile:
        compile_model(model, args.compile_scope)

    total, active = count_parameters(cfg)
    m, mbs, T = args.num_microbatches, args.micro_batch_size, args.max_seq_length
    say(f"data: {corpus.description}")
    say(f"topology: {topo.describe()}, {precision}, device {topo.device}")
    say(f"layers: {cfg.layer_pattern()}  (M = MoE with {cfg.moe.num_experts} experts, top-{cfg.moe.num_experts_per_token}; D = dense)")
    say(f"parameters: {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token")
    if topo.pp > 1:
        say("pipeline stages: " + "; ".join(f"stage {s}: layers {stage_layer_ids(cfg.num_layers, topo.pp, s)}"
                                            for s in range(topo.pp)) + f"; schedule {args.pipeline_schedule}")
    say(f"batch: global {args.global_batch_size} = micro {mbs} x {m} microbatches x DP {topo.dp}, "
        f"{args.global_batch_size * T:,} tokens per step")

    dp_grads = DataParallelGrads(list(model.parameters()), topo, args.ddp_bucket_size_mb,
                                 REDUCE_DTYPES[args.grad_reduce_dtype], shard_optimizer=args.shard_optimizer)
    params = dp_grads.optimizer_params  # the model's parameters, or this rank's slices of them (--shard-optimizer)
    weight_copies = None
    if precision == "bf16" and args.moe_bf16_weights and cfg.moe.num_experts:
        weight_copies = ExpertWeightCopies([moe.experts for moe in model.moe_layers().values()], torch.bfloat16,
                                           dp_grads.grad_ready)
    optimizer = torch.optim.AdamW(adamw_param_groups(params, args.weight_decay),
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
        step_stats=StepStats(model.moe_layers(), cfg.moe.num_experts_per_token, enabled=stats_on),
        stats_layout=StatsLayout(cfg.moe_layer_ids() if stats_on else [], cfg.moe.num_experts, m, topo.dp,
                                 drops=cfg.has_capacity, bias=cfg.moe.bias_update_rate > 0, gates=True, ep=topo.ep),
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
                will_save = args.save or 0 < args.save_interval < args.max_steps
                if not args.eval_only:
                    cleanup.enter_context(dir_lock(output_dir, "--output-dir"))
                if will_save and not args.eval_only:
                    # Locked on its own too: another run may point its --checkpoint-dir here from elsewhere.
                    if os.path.realpath(checkpoint_dir) != os.path.realpath(output_dir):
                        cleanup.enter_context(dir_lock(checkpoint_dir, "--checkpoint-dir"))
                    probe = os.path.basename(keep.enter_context(probe_file(checkpoint_dir, "--checkpoint-dir")))
                resume_from = checkpoint_to_resume(args, Path(checkpoint_dir), will_save)
                if resume_from is not None:
                    saved_model = read_run_manifest(resume_from)["model"]
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
        norm = grad_norm(t.params, topo, t.dp_grads.zero_axes)
        clip_grads_(t.params, norm, args.grad_clip, t.optimizer)  # inside fused AdamW's step on CUDA
        t.optimizer.step()
        t.dp_grads.gather_params()  # --shard-optimizer: every rank's updated slices to every rank
        if t.weight_copies is not None:
            t.weight_copies.refresh()
        update_expert_biases(t.model.moe_layers().values(), topo)  # aux-loss-free balancing (if on)
    return StepOutput(lr, norm, lm_loss_sum, events)


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
           "lr": out.lr, "grad_norm": float(host[-1]), "tokens_per_sec": tps, "elapsed_s": clock.elapsed(),
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
    if t.cfg.moe.num_experts and t.cfg.moe.routing == "expert-choice":
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
                           keep_last=t.args.keep_last, protected=t.uploader.protected() if t.uploader else frozenset(),
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
    manifest = read_run_manifest(path)  # a model field it lacks counts as its default, trained with
    t.emit(describe_resume(path, manifest, checkpoint_meta(t), t.topo, changeable=CHANGEABLE_MODEL_FIELDS,
                           reported=REPORTED_FLAGS))
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
