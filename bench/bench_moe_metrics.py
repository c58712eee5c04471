"""Cost of the MoE load statistics: step time with --moe-metrics detailed against off, on one GPU.

    python bench/bench_moe_metrics.py [--repeats 3] [--steps 30] [--attribute-steps 15] [--modes off detailed]
                                      [--batches large small] [--out bench_moe_metrics.json]

A model with 16 MoE layers (16 experts, top-2, d_model 768), logging every step: the worst case, as
the statistics are then packed, reduced and read back at every step. Two batch sizes:

- large: 32 sequences of 2048 tokens per step (64k tokens). The GPU is the bottleneck, as in a real run.
- small: 16 sequences of 1024 tokens per step (16k tokens). The host's kernel launches are the
  bottleneck, so every microsecond of Python the statistics add is a microsecond of step time.

All runs are in one process and alternate between modes (off, detailed, off, detailed, ...) so that
drift hits both. Each run drops its first steps as warm-up. Reported: the median step time per mode and
the overhead against off with a 95% bootstrap interval.

Then, per batch, one more run per mode measures the host time spent inside the statistics code itself
(StepStats.end_microbatch, pack_step_stats, moe_metrics, the log write), with a synchronize before each
timed call so that the timer never counts a launch that waits for a full GPU queue. That host time, set
against the median step, bounds what the statistics can add to a launch-bound step. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minimal_pretrain  # noqa: E402
import moe_stats  # noqa: E402
import run_log  # noqa: E402

MODEL = ["--hidden-size", "768", "--intermediate-size", "3072", "--num-layers", "16", "--num-attention-heads", "12",
         "--num-key-value-heads", "4", "--num-experts", "16", "--num-experts-per-token", "2",
         "--moe-layer-interval", "1", "--expert-intermediate-size", "1024", "--eval-iters", "0", "--no-progress",
         "--log-interval", "1"]
BATCHES = {"large": ["--max-seq-length", "2048", "--global-batch-size", "32", "--micro-batch-size", "16"],
           "small": ["--max-seq-length", "1024", "--global-batch-size", "16", "--micro-batch-size", "8"]}
WARMUP = 5

host_seconds: dict = {}
SYNC_BEFORE_TIMING = [False]


def timed(name: str, fn):
    def wrapper(*a, **k):
        if SYNC_BEFORE_TIMING[0]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            host_seconds[name] = host_seconds.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def instrument() -> None:
    """Time the statistics code in place (a perf_counter pair per call, well under a microsecond)."""
    moe_stats.StepStats.end_microbatch = timed("end_microbatch", moe_stats.StepStats.end_microbatch)
    minimal_pretrain.pack_step_stats = timed("pack_step_stats", minimal_pretrain.pack_step_stats)
    minimal_pretrain.moe_metrics = timed("moe_metrics", minimal_pretrain.moe_metrics)
    run_log.RunLog.log = timed("log_write", run_log.RunLog.log)


def one_run(batch: str, mode: str, steps: int) -> tuple[list, dict]:
    args = minimal_pretrain.parse_args(MODEL + BATCHES[batch] + ["--moe-metrics", mode, "--max-steps", str(steps),
                                                                  "--output-dir", tempfile.mkdtemp(prefix="bench_moe_")])
    host_seconds.clear()
    res = minimal_pretrain.train(args)
    tokens = args.global_batch_size * args.max_seq_length
    step_ms = [1000 * tokens / r["tokens_per_sec"] for r in res.records[WARMUP:]]
    return step_ms, {k: 1000 * v / steps for k, v in host_seconds.items()}


def bootstrap_overhead(base: list, other: list, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of median(other) / median(base) - 1, resampling the steps of each mode."""
    rng = np.random.default_rng(seed)
    b, o = np.asarray(base), np.asarray(other)
    ratios = [np.median(rng.choice(o, o.size)) / np.median(rng.choice(b, b.size)) - 1 for _ in range(n)]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return 100 * lo, 100 * hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="steps per run (the first 5 are dropped)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode and batch size")
    ap.add_argument("--attribute-steps", type=int, default=15, help="steps of the synchronised host-time runs (0: skip)")
    ap.add_argument("--batches", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    ap.add_argument("--modes", nargs="+", default=["off", "detailed"], choices=["off", "brief", "detailed"])
    ap.add_argument("--out", default="bench_moe_metrics.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_metrics.py measures GPU step time: it needs a CUDA device")
    if a.steps <= WARMUP + 1:
        raise SystemExit(f"--steps must be more than {WARMUP + 1}")
    instrument()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model_flags": MODEL,
              "batches": {}, "date": time.strftime("%Y-%m-%d")}
    for batch in a.batches:
        steps = {m: [] for m in a.modes}
        for _ in range(a.repeats):
            for mode in a.modes:
                steps[mode] += one_run(batch, mode, a.steps)[0]
        host = {}
        if a.attribute_steps:
            SYNC_BEFORE_TIMING[0] = True
            host = {mode: one_run(batch, mode, a.attribute_steps)[1] for mode in a.modes}
            SYNC_BEFORE_TIMING[0] = False
        base = statistics.median(steps["off"]) if "off" in steps else None
        entry = {"flags": BATCHES[batch], "step_ms": steps, "median_step_ms": {m: statistics.median(v) for m, v in steps.items()},
                 "host_ms_per_step": host}
        if base is not None:
            entry["overhead_pct"] = {m: 100 * (statistics.median(v) / base - 1) for m, v in steps.items()}
            entry["overhead_ci95_pct"] = {m: bootstrap_overhead(steps["off"], v) for m, v in steps.items() if m != "off"}
        result["batches"][batch] = entry
    print(f"\nGPU: {result['gpu']}, torch {result['torch']}; 16 MoE layers x 16 experts, logging every step")
    print(f"{'batch':<7}{'mode':<10}{'median step ms':>15}{'overhead vs off':>17}{'95% interval':>20}"
          f"{'stats host ms/step':>20}")
    total = lambda e, mode: sum(e["host_ms_per_step"][mode].values()) if e["host_ms_per_step"] else float("nan")
    for batch, e in result["batches"].items():
        for mode in a.modes:
            ci = e.get("overhead_ci95_pct", {}).get(mode)
            ci_s = f"[{ci[0]:+.2f}%, {ci[1]:+.2f}%]" if ci else ""
            oh = e.get("overhead_pct", {}).get(mode)
            print(f"{batch:<7}{mode:<10}{e['median_step_ms'][mode]:>15.1f}{(f'{oh:+.2f}%' if oh is not None else ''):>17}"
                  f"{ci_s:>20}{total(e, mode):>20.3f}")
        if "off" in a.modes and e["host_ms_per_step"]:
            for mode in a.modes:
                if mode == "off":
                    continue
                parts = {k: e["host_ms_per_step"][mode][k] - e["host_ms_per_step"]["off"].get(k, 0.0)
                         for k in e["host_ms_per_step"][mode]}
                off_ms = e["median_step_ms"]["off"]
                print(f"  {batch}/{mode}, host time in the statistics code, {mode} minus off: " + ", ".join(
                    f"{k} {v:.3f} ms ({100 * v / off_ms:.2f}%)" for k, v in parts.items())
                    + f"; total {sum(parts.values()):.3f} ms = {100 * sum(parts.values()) / off_ms:.2f}% of the step")
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
