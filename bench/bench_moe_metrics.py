"""Cost of the MoE load statistics: step time with --moe-metrics detailed (and brief) against off.

    python bench/bench_moe_metrics.py [--steps 40] [--repeats 2] [--out bench_moe_metrics.json]

One GPU, a model with 16 MoE layers, logging every step (the worst case: the statistics are packed,
reduced and read back every step). Runs alternate between modes to spread drift; the table reports
the median tokens/s per mode and the overhead against off. Writes JSON.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_moe_metrics.json")
    a = ap.parse_args()
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
