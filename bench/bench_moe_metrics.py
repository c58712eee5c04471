"""Cost of the MoE load statistics: step time with --moe-metrics detailed (and brief) against off.

    python bench/bench_moe_metrics.py [--steps 40] [--repeats 2] [--out bench_moe_metrics.json]
    python bench/bench_moe_metrics.py --attribute [--steps 40]

One GPU, a model with 16 MoE layers, logging every step (the worst case: the statistics are packed,
reduced and read back every step). Runs alternate between modes to spread drift; the table reports
the median tokens/s per mode and the overhead against off. Writes JSON.

This model is bound by host-side kernel launches, so step time swings by ~15% from step to step and
end-to-end differences of a few percent drown in it. --attribute measures the statistics' own cost
instead, in-process: host time spent in MoEStepStats.record (per microbatch), pack_step_stats,
moe_metrics (after a synchronize, so waiting for the GPU is not counted) and the log write, per step,
for off and detailed, against the median step time. In a launch-bound step, host time added is step
time added.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--hidden-size", "768", "--intermediate-size", "3072", "--num-layers", "16", "--num-attention-heads", "12",
         "--num-key-value-heads", "4", "--max-seq-length", "1024", "--num-experts", "16", "--num-experts-per-token", "2",
         "--moe-layer-interval", "1", "--expert-intermediate-size", "1024", "--global-batch-size", "16",
         "--micro-batch-size", "8", "--eval-iters", "0", "--no-progress", "--log-interval", "1"]


def run(mode: str, steps: int) -> list:
    out = tempfile.mkdtemp(prefix=f"bench_moe_{mode}_")
    cmd = [sys.executable, os.path.join(ROOT, "minimal_pretrain.py"), *MODEL, "--moe-metrics", mode,
           "--max-steps", str(steps), "--output-dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in l]
    return [r["tokens_per_sec"] for r in recs if r["step"] >= 10]  # skip warm-up


def attribute(steps: int) -> dict:
    import time
    import torch
    sys.path.insert(0, ROOT)
    import minimal_pretrain
    import moe_layers
    import run_log

    timers: dict = {}

    def timed(name, fn, sync=False):
        def wrapper(*a, **k):
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] = timers.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    record, pack, metrics, log = (moe_layers.MoEStepStats.record, minimal_pretrain.pack_step_stats,
                                  minimal_pretrain.moe_metrics, run_log.RunLog.log)
    moe_layers.MoEStepStats.record = timed("record", record)
    minimal_pretrain.pack_step_stats = timed("pack", pack)
    minimal_pretrain.moe_metrics = timed("metrics", metrics, sync=True)
    run_log.RunLog.log = timed("log", log)
    result = {}
    for mode in ("off", "detailed"):
        timers.clear()
        out = tempfile.mkdtemp(prefix=f"bench_moe_attr_{mode}_")
        args = minimal_pretrain.parse_args(MODEL + ["--moe-metrics", mode, "--max-steps", str(steps), "--output-dir", out])
        res = minimal_pretrain.train(args)
        tokens = args.global_batch_size * args.max_seq_length
        step_ms = statistics.median(1000 * tokens / r["tokens_per_sec"] for r in res.records[10:])
        result[mode] = {"step_ms": step_ms, **{k: 1000 * v / steps for k, v in timers.items()}}
    stats_ms = {k: result["detailed"].get(k, 0.0) - result["off"].get(k, 0.0) for k in ("record", "pack", "metrics", "log")}
    base = result["off"]["step_ms"]
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; median step (off) {base:.1f} ms")
    print(f"{'cost per step, detailed minus off':<36} {'ms':>7} {'% of step':>10}")
    for k, v in stats_ms.items():
        print(f"{k:<36} {v:>7.3f} {100 * v / base:>9.2f}%")
    total = sum(stats_ms.values())
    print(f"{'total':<36} {total:>7.3f} {100 * total / base:>9.2f}%")
    return {"per_mode_ms": result, "detailed_minus_off_ms": stats_ms, "overhead_pct": 100 * total / base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_moe_metrics.json")
    ap.add_argument("--attribute", action="store_true", help="time the statistics code itself, in-process")
    a = ap.parse_args()
    if a.attribute:
        json.dump(attribute(a.steps), open(a.out, "w"), indent=2)
        print(f"wrote {a.out}")
        return
    import torch
    samples = {"off": [], "brief": [], "detailed": []}
    for _ in range(a.repeats):
        for mode in samples:
            samples[mode] += run(mode, a.steps)
    med = {m: statistics.median(v) for m, v in samples.items()}
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}; 16 MoE layers x 16 experts, log every step")
    print(f"{'--moe-metrics':<14} {'tokens/s':>12} {'step ms':>9} {'overhead vs off':>16}")
    tokens = 16 * 1024
    for mode, tps in med.items():
        print(f"{mode:<14} {tps:>12,.0f} {1000 * tokens / tps:>9.2f} {100 * (med['off'] / tps - 1):>15.2f}%")
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model_flags": MODEL,
               "median_tokens_per_sec": med, "samples": samples,
               "overhead_pct": {m: 100 * (med["off"] / t - 1) for m, t in med.items()}}, open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
