"""Profiler traces of a window of training steps, and the named ranges that label them.

    with phase("moe/router"):
        ...

While a trace window is open (`set_enabled(True)`, done by StepProfiler for its warm-up and recorded
steps), `phase` is a torch.profiler.record_function range; otherwise it returns one shared no-op context, so the hot path pays
a function call and a global read, and no range object is ever built.

StepProfiler runs torch.profiler over `--profile-wait` idle steps, `--profile-warmup` warm-up steps and
`--profile-steps` recorded steps, then every rank writes its own Chrome/Perfetto trace (open it in
https://ui.perfetto.dev or chrome://tracing). Rank 0 also prints how much of the step each named range took.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Callable, Optional

import torch

from errors import InputError

_enabled = False
_NULL = contextlib.nullcontext()
_seen: set = set()  # names entered while enabled: the rows of the summary table


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def phase(name: str):
    """A named profiler range while profiling is on, a shared no-op context otherwise (and inside code that
    torch.compile traces, which would drop the range anyway). The compile test comes first: torch.compile
    then never reads the switch, so switching ranges on changes nothing it compiled (reading it would add
    a guard, and every switch would recompile the model, inside the traced window)."""
    if torch.compiler.is_compiling() or not _enabled:
        return _NULL
    _seen.add(name)
    return torch.profiler.record_function(name)


def trace_name(rank: int, step: int, gzip: bool, partial: bool = False) -> str:
    """trace_rank{R}_step{N}.json[.gz], N the first recorded step; `partial` while it is being written."""
    return f"trace_rank{rank}_step{step}" + (".partial" if partial else "") + ".json" + (".gz" if gzip else "")


_MB_INDEX = re.compile(r"/mb\d+$")
_COMPILE_MARK = "(dynamo_timed)"  # the suffix of torch.compile's own ranges (tracing, lowering, codegen)


def compilation_ms(events) -> float:
    """Host milliseconds inside torch.compile's compilation ranges among profiler events (FunctionEvents):
    the union of their time spans, so nested ranges count once."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.name.endswith(_COMPILE_MARK))
    total_us, covered = 0.0, float("-inf")
    for start, end in spans:
        if end > covered:
            total_us += end - max(start, covered)
            covered = end
    return total_us / 1e3


def phase_table(averages, names: set, steps: int) -> tuple[float, list]:
    """(host ms per step, [(name, calls per step, ms per step, share of the step)]) from key_averages.

    Times are the host (CPU) wall time inside each range, summed over the recorded steps and their threads;
    the step is the profiler's own ProfilerStep range. Ranges of all microbatches are merged into one row
    (`forward/mb*`). On a GPU the host time of a range is the time to launch its work plus any wait for the
    device inside it; the device timeline is in the trace.
    """
    step_us, rows = 0.0, {}
    for e in averages:
        if e.key.startswith("ProfilerStep"):
            step_us += e.cpu_time_total
        elif e.key in names:
            key = _MB_INDEX.sub("/mb*", e.key)
            calls, us = rows.get(key, (0, 0.0))
            rows[key] = (calls + e.count, us + e.cpu_time_total)
    step_ms = step_us / 1e3 / steps
    table = [(k, calls / steps, us / 1e3 / steps, us / step_us if step_us else float("nan"))
             for k, (calls, us) in rows.items()]
    return step_ms, sorted(table, key=lambda r: -r[2])


def format_table(step_ms: float, table: list, first: int, last: int, rank: int = 0) -> str:
    lines = [f"profile: rank {rank}, steps {first}-{last}: host time per step {step_ms:.2f} ms; "
             f"ranges nest (moe/* inside forward/mb*), so shares do not add up to 100%",
             f"  {'range':<30}{'calls/step':>11}{'ms/step':>10}{'% of step':>11}"]
    lines += [f"  {name:<30}{calls:>11.1f}{ms:>10.3f}{100 * share:>10.1f}%" for name, calls, ms, share in table]
    return "\n".join(lines)


class StepProfiler:
    """torch.profiler over one window of training steps; call step() once at the end of every training
    step and close() at the end (it is idempotent, and a window cut short by an error writes nothing).

    Steps first_step .. first_step + wait - 1 are not watched, the next `warmup` steps run the profiler
    but drop its events (its start-up cost stays out of the trace), the next `active` steps are recorded.
    Named ranges are on during the warm-up and recorded steps (code that torch.compile traces never reads
    the switch, so it compiles nothing new). Compilation inside the recorded steps (a first step, or a
    recompilation) is reported as a warning with its time. Without `enabled` every method returns at once.
    """

    def __init__(self, enabled: bool, trace_dir: str = "", wait: int = 5, warmup: int = 3, active: int = 5,
                 rank: int = 0, world_size: int = 1, cuda: bool = False, gzip: bool = False,
                 first_step: int = 0, write: Callable[[str], None] = print, wandb=None):
        self._prof = None
        if not enabled:
            return
        self.trace_dir, self.rank, self.world_size, self.gzip = trace_dir, rank, world_size, gzip
        self.write, self.wandb = write, wandb  # wandb: rank 0's wandb module when --wandb, else None
        self.first = first_step + wait + warmup  # first recorded training step
        self.last = self.first + active - 1
        self.done = 0  # training steps finished since the start
        self.wait, self.start_offset, self.active = wait, wait + warmup, active
        self.path: Optional[str] = None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities, on_trace_ready=self._on_trace_ready,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1))
        self._prof.start()
        _seen.clear()
        set_enabled(self.wait == 0)

    def step(self) -> float:
        """Ends a training step; returns the seconds spent writing the trace (0 but at the window's end),
        which are not training time."""
        if self._prof is None:
            return 0.0
        self.done += 1
        start = time.perf_counter()
        self._prof.step()  # writes the trace at the end of the last recorded step
        set_enabled(self.wait <= self.done < self.start_offset + self.active)
        return time.perf_counter() - start if self.done == self.start_offset + self.active else 0.0

    def _on_trace_ready(self, prof) -> None:
        if self.done < self.start_offset + self.active:  # stopped inside the window (an error): no trace
            return
        final = os.path.join(self.trace_dir, trace_name(self.rank, self.first, self.gzip))
        partial = os.path.join(self.trace_dir, trace_name(self.rank, self.first, self.gzip, partial=True))
        prof.export_chrome_trace(partial)  # a .gz name is gzipped by torch
        os.replace(partial, final)  # whole files only: rank 0 may be looking for it
        self.path = final
        self.write(f"profile: rank {self.rank} wrote {final} (steps {self.first}-{self.last})")
        compiling = compilation_ms(prof.events())
        if compiling > 0:
            self.write(f"profile: rank {self.rank}: warning: the recorded steps include {compiling:.0f} ms of "
                       f"torch.compile compilation, so they are not steady steps (start the window later: "
                       f"--profile-wait)")
        if self.rank == 0:
            step_ms, table = phase_table(prof.key_averages(), set(_seen), self.active)
            self.write(format_table(step_ms, table, self.first, self.last))

    def close(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.stop()
        set_enabled(False)
        if self.path is None:
            self.write(f"profile: rank {self.rank}: training stopped before the end of the trace window "
                       f"(steps {self.first}-{self.last}); no trace written")
        if self.wandb is not None and self.path is not None:
            self._log_artifacts()

    def _log_artifacts(self, timeout_s: float = 60.0) -> None:
        """Rank 0 logs every rank's trace as a wandb artifact of type `trace` (the other ranks have no wandb
        run). All ranks write their trace at the same step; each appears whole (renamed into place), so
        rank 0 only waits for the files, without a collective. Traces on another node's local disk never
        appear here: those are named and skipped."""
        paths = [os.path.join(self.trace_dir, trace_name(r, self.first, self.gzip)) for r in range(self.world_size)]
        deadline = time.monotonic() + timeout_s
        while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
            time.sleep(0.5)
        missing = [r for r, p in enumerate(paths) if not os.path.exists(p)]
        for r, p in enumerate(paths):
            if r not in missing:
                artifact = self.wandb.Artifact(os.path.basename(p).split(".")[0], type="trace")
                artifact.add_file(p)
                self.wandb.log_artifact(artifact)
        if missing:
            self.write(f"profile: traces of ranks {missing} are not in {self.trace_dir} on this node; "
                       f"not logged to wandb")


def start_profiler(args, topo, run_log, emit: Callable[[str], None] = print, first_step: int = 0) -> StepProfiler:
    """The trainer's StepProfiler from the --profile flags (a disabled one without --profile); the window
    starts at `first_step`. Rank 0 writes its lines through `emit` (the progress bar's writer), the other
    ranks print theirs. The default --trace-dir is <rank 0's output dir>/traces: rank 0 tells the others."""
    if not args.profile:
        return StepProfiler(False)
    trace_dir = args.trace_dir
    if trace_dir is None:
        trace_dir = [os.path.join(run_log.output_dir, "traces") if run_log is not None else None]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(trace_dir, src=0)
        trace_dir = trace_dir[0]
    try:
        os.makedirs(trace_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"--trace-dir {trace_dir}: cannot create it ({e.strerror})") from None
    return StepProfiler(True, trace_dir, args.profile_wait, args.profile_warmup, args.profile_steps, topo.rank,
                        topo.world_size, cuda=topo.device.type == "cuda", gzip=args.profile_gzip,
                        first_step=first_step, write=emit if topo.rank == 0 else print,
                        wandb=run_log.wandb if run_log is not None else None)
