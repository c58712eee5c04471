"""Where a training step's time goes on the GPU: kernel time against wall time, and the top kernels.

    python bench/profile_step.py [--skip 10] [--steps 3] [--out profile_step.json] -- <minimal_pretrain flags>

Trains with the given flags and wraps the optimizer's step: after `--skip` steps a torch.profiler
window (CUDA kernels) covers the next `--steps` steps. Reports per step: the wall time (host clock
between optimizer steps, synchronised at the window's ends), the summed kernel time, the GPU busy
fraction (the union of kernel intervals over the window: below 1, the GPU waits for the host), and the
kernels that take the most time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimal_pretrain  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            busy += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = spans[-1][1] - spans[0][0]
    totals = {}
    for e in kernels:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.time_range.end - e.time_range.start
        t[1] += 1
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]
    kernel_ms = sum(v[0] for v in totals.values()) / a.steps / 1e3
    res = {"flags": train_argv, "wall_ms_per_step": state["wall"] * 1e3, "kernel_ms_per_step": kernel_ms,
           "gpu_busy_fraction": busy / window, "kernels_per_step": len(kernels) / a.steps,
           "top": [{"kernel": k[:160], "ms_per_step": v[0] / a.steps / 1e3, "calls_per_step": v[1] / a.steps}
                   for k, v in top]}
    print(f"wall {res['wall_ms_per_step']:.1f} ms/step, kernels {kernel_ms:.1f} ms/step "
          f"({res['kernels_per_step']:.0f} launches), GPU busy {100 * res['gpu_busy_fraction']:.1f}% of the window")
    for t in res["top"][:18]:
        print(f"  {t['ms_per_step']:8.3f} ms  x{t['calls_per_step']:<5.0f} {t['kernel'][:110]}")
    json.dump(res, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
