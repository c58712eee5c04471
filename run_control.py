"""Run control of the trainer: run directories and their locks, the garbage-collection schedule, the
decisions every rank takes at the same step (stop requests), the non-finite watch and the throughput clock."""
from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from checkpoint import MANIFEST
from errors import InputError
from parallel import Topology


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


class Throughput:
    """Tokens/s between logging steps, with evaluation time taken out; and the wall-clock time since the
    training loop started, with everything in (what a whole run costs)."""

    def __init__(self, last_step: int):
        self.last_time, self.last_step, self.excluded = time.perf_counter(), last_step, 0.0
        self.started = self.last_time

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

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
