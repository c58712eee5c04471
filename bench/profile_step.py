"""Where a training step's time goes on the GPU: kernel time against wall time, and the top kernels.

    python bench/profile_step.py [--skip 10] [--steps 3] [--out profile_step.json] -- <minimal_pretrain flags>

    torchrun --nproc_per_node=2 bench/profile_step.py ... -- <flags> --tensor-parallel-size 2

Trains with the given flags and wraps the optimizer's step: after `--skip` steps a torch.profiler
window (CUDA kernels) covers the next `--steps` steps. Reports per step: the wall time (host clock
between optimizer steps, synchronised at the window's ends), the summed kernel time, the GPU busy
fraction (the union of kernel intervals over the window: below 1, the GPU waits for the host), kernel
time by kind (communication = NCCL kernels, GEMM, the rest), the exposed communication (time in which
only communication kernels run), the peak allocated memory and the kernels that take the most time (all of them in the JSON).
Under torchrun every rank reports; the JSON goes to OUT with `_rank{R}` before its suffix.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimal_pretrain  # noqa: E402
from errors import OneLineParser  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="profile_step.json")
    a = ap.parse_args(own)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    state = {"n": 0, "prof": None, "t0": None}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        state["n"] += 1
        if state["n"] == a.skip:
            torch.cuda.synchronize()
            state["prof"] = profile(activities=[ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif state["n"] == a.skip + a.steps:
            torch.cuda.synchronize()
            state["wall"] = (time.perf_counter() - state["t0"]) / a.steps
            state["prof"].__exit__(None, None, None)
        return out
    torch.optim.AdamW.step = step
    args = minimal_pretrain.parse_args(train_argv + ["--max-steps", str(a.skip + a.steps + 1), "--eval-iters", "0",
                                                     "--no-progress", "--output-dir", tempfile.mkdtemp()])
    minimal_pretrain.train(args)

    prof = state["prof"]
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy = union_length(spans)
    window = spans[-1][1] - spans[0][0]
    busy_without_comm = union_length(sorted((e.time_range.start, e.time_range.end) for e in kernels
                                            if kind(e.name) != "communication"))
    totals = {}
    for e in kernels:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])
    kernel_ms = sum(v[0] for v in totals.values()) / a.steps / 1e3
    by_kind = {}
    for name, (us, _) in totals.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + us / a.steps / 1e3
    rank = int(os.environ.get("RANK", "0"))
    res = {"flags": train_argv, "rank": rank, "wall_ms_per_step": state["wall"] * 1e3, "kernel_ms_per_step": kernel_ms,
           "gpu_busy_fraction": busy / window, "kernels_per_step": len(kernels) / a.steps,
           "kernel_ms_by_kind": by_kind, "exposed_communication_ms_per_step": (busy - busy_without_comm) / a.steps / 1e3,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "top": [{"kernel": k[:160], "ms_per_step": v[0] / a.steps / 1e3, "calls_per_step": v[1] / a.steps}
                   for k, v in top]}  # every kernel, by time
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items()))
    lines = [f"[rank {rank}] wall {res['wall_ms_per_step']:.1f} ms/step, kernels {kernel_ms:.1f} ms/step "
             f"({res['kernels_per_step']:.0f} launches; {kinds}), exposed communication "
             f"{res['exposed_communication_ms_per_step']:.1f} ms, GPU busy {100 * res['gpu_busy_fraction']:.1f}% "
             f"of the window, peak allocated {res['peak_allocated_gib']:.1f} GiB"]
    lines += [f"  {t['ms_per_step']:8.3f} ms  x{t['calls_per_step']:<5.0f} {t['kernel'][:110]}" for t in res["top"][:18]]
    print("\n".join(lines), flush=True)
    root, ext = os.path.splitext(a.out)
    json.dump(res, open(f"{root}_rank{rank}{ext}" if "WORLD_SIZE" in os.environ else a.out, "w"), indent=2)


def union_length(spans: list) -> float:
    """Total length covered by sorted (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            total += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0 if cur_e is None else cur_e - cur_s)


def kind(kernel: str) -> str:
    name = kernel.lower()
    if "nccl" in name:
        return "communication"
    if any(k in name for k in ("gemm", "cutlass", "nvjet", "matmul", "sm90_", "cublas")):
        return "gemm"
    return "other"


if __name__ == "__main__":
    main()
