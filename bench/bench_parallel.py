"""Throughput of the parallel layouts on this machine's GPUs, in one run so the ratios are comparable.

    python bench/bench_parallel.py [--steps 30] [--out bench_parallel.json]

Runs (each through torchrun, the same model and global batch): 1 GPU; DP2 with our bucketed
all-reduce; DP2 with torch DistributedDataParallel (bench/ddp_baseline.py); TP2 (EP2); PP2 GPipe and
PP2 1F1B. Prints a table of tokens/s (median over the logged windows after warm-up), the DP scaling
efficiency, ours vs DDP, and the measured pipeline bubble against (p-1)/(m+p-1). Writes JSON.
Needs 2 GPUs (NCCL); NVLink multicast is kept off (NCCL_NVLS_ENABLE=0).
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
MODEL = ["--hidden-size", "1024", "--intermediate-size", "4096", "--num-layers", "8", "--num-attention-heads", "16",
         "--num-key-value-heads", "4", "--max-seq-length", "1024", "--num-experts", "8", "--num-experts-per-token", "2",
         "--moe-layer-interval", "2", "--expert-intermediate-size", "2048", "--global-batch-size", "32",
         "--micro-batch-size", "4", "--eval-iters", "0", "--no-progress", "--moe-metrics", "brief",
         "--warmup-steps", "5", "--learning-rate", "3e-4", "--min-lr", "3e-5"]


def run(name: str, nproc: int, flags: list, steps: int, log_every: int, script: str = "minimal_pretrain.py") -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_{name}_")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29533",
           os.path.join(ROOT, script), *MODEL, *flags, "--max-steps", str(steps), "--log-interval", str(log_every),
           "--no-save", "--output-dir", out]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               OMP_NUM_THREADS="4")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in l]
    windows = [r["tokens_per_sec"] for r in recs if r["step"] >= 2 * log_every]  # skip warm-up windows
    return {"name": name, "nproc": nproc, "flags": flags, "tokens_per_sec": statistics.median(windows),
            "final_loss": recs[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--out", default="bench_parallel.json")
    a = ap.parse_args()
    import torch
    m = 32 // 4  # microbatches per step at DP1
    rows = [run("1 GPU", 1, [], a.steps, a.log_every),
            run("DP2 (ours)", 2, [], a.steps, a.log_every),
            run("DP2 (torch DDP)", 2, [], a.steps, a.log_every, "bench/ddp_baseline.py"),
            run("TP2 (EP2)", 2, ["--tensor-parallel-size", "2"], a.steps, a.log_every),
            run("PP2 GPipe", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "gpipe"], a.steps, a.log_every),
            run("PP2 1F1B", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "1f1b"], a.steps, a.log_every)]
    base = rows[0]["tokens_per_sec"]
    by = {r["name"]: r for r in rows}
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    print(f"{'layout':<18} {'GPUs':>4} {'tokens/s':>12} {'vs 1 GPU':>9} {'per-GPU eff.':>12} {'final loss':>10}")
    for r in rows:
        r["speedup"] = r["tokens_per_sec"] / base
        r["efficiency"] = r["speedup"] / r["nproc"]
        print(f"{r['name']:<18} {r['nproc']:>4} {r['tokens_per_sec']:>12,.0f} {r['speedup']:>8.2f}x "
              f"{100 * r['efficiency']:>11.1f}% {r['final_loss']:>10.4f}")
    ours_vs_ddp = by["DP2 (ours)"]["tokens_per_sec"] / by["DP2 (torch DDP)"]["tokens_per_sec"]
    print(f"DP2 ours / DDP: {ours_vs_ddp:.3f}")
    # Bubble: a perfect 2-stage pipeline would take half the 1-GPU step time; the rest is bubble (+ comm).
    theory = (2 - 1) / (m + 2 - 1)
    bubbles = {}
    for name in ("PP2 GPipe", "PP2 1F1B"):
        bubbles[name] = 1 - by[name]["speedup"] / 2
        print(f"{name}: measured idle fraction {bubbles[name]:.3f} vs (p-1)/(m+p-1) = {theory:.3f} (p=2, m={m})")
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model_flags": MODEL,
               "rows": rows, "dp_ours_over_ddp": ours_vs_ddp, "pp_bubble_measured": bubbles,
               "pp_bubble_theory": theory}, open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
