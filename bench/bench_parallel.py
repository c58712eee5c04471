"""Throughput and memory of the parallel layouts on this machine's GPUs, in one run so the ratios compare.

    python bench/bench_parallel.py [--hidden-size 1024] [--layouts 1,dp2,tp2,pp2-1f1b-m4] [--steps 30]
                                   [--eager] [--out bench_parallel.json] [-- extra trainer flags]

The model: 8 layers, d_model D (default 1024), D/64 heads, D/256 kv heads, 32 experts top-4 with expert
FFN D/2 in every layer, sequence 1024, global batch 32 sequences, `--compile` (unless --eager),
`--moe-metrics brief`. Layouts (each a torchrun run of the trainer on the same model and global batch):

    1           one GPU                  dp2       DP2, our bucketed all-reduce
    ddp2        DP2 with torch DDP (bench/ddp_baseline.py)
    tp2         TP2 (EP2)                pp2-S-mM  PP2, schedule S (gpipe or 1f1b), M microbatches

Layouts take micro-batch --micro-batch-size (default 8; PP: 32 / M); the one-GPU baseline runs at every micro-batch size a layout
uses, and each layout is compared with the baseline at its own micro-batch size (leave layout 1 out for a
model one GPU cannot hold: the table then has no ratios). tokens/s is the median
of the logged windows after the first two; memory is each rank's peak of allocated (and reserved)
memory. PP rows also show the ideal speed-up 2 (1 - bubble), bubble = (p-1)/(m+p-1). Needs NCCL GPUs;
NVLink multicast is kept off (NCCL_NVLS_ENABLE=0).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import OneLineParser  # noqa: E402

GLOBAL_BATCH = 32


def model_flags(d: int) -> list:
    return ["--hidden-size", str(d), "--num-layers", "8", "--num-attention-heads", str(d // 64),
            "--num-key-value-heads", str(max(1, d // 256)), "--max-seq-length", "1024", "--num-experts", "32",
            "--num-experts-per-token", "4", "--expert-intermediate-size", str(d // 2),
            "--global-batch-size", str(GLOBAL_BATCH), "--eval-iters", "0", "--no-progress", "--moe-metrics", "brief",
            "--warmup-steps", "5", "--learning-rate", "3e-4", "--min-lr", "3e-5"]


def layout(name: str, micro: int) -> tuple[int, list, int, str]:
    """(processes, trainer flags, micro-batch size, script) of a layout name; `micro` for non-PP layouts."""
    if name == "dp2":
        return 2, [], micro, "minimal_pretrain.py"
    if name == "ddp2":
        return 2, [], micro, "bench/ddp_baseline.py"
    if name == "tp2":
        return 2, ["--tensor-parallel-size", "2"], micro, "minimal_pretrain.py"
    if name.startswith("pp2-"):
        _, schedule, m = name.split("-")
        micro = GLOBAL_BATCH // int(m[1:])
        return 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", schedule], micro, "minimal_pretrain.py"
    raise SystemExit(f"--layouts: unknown layout {name!r} (1, dp2, ddp2, tp2, pp2-gpipe-mM, pp2-1f1b-mM)")


def run(name: str, nproc: int, flags: list, steps: int, log_every: int, script: str) -> dict:
    out = tempfile.mkdtemp(prefix="bench_parallel_")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29533",
           os.path.join(ROOT, "bench", "peak_memory.py"), os.path.join(ROOT, script), *flags,
           "--max-steps", str(steps), "--log-interval", str(log_every), "--no-save", "--output-dir", out]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               OMP_NUM_THREADS="4")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in l]
    windows = [r["tokens_per_sec"] for r in recs if r["step"] >= 2 * log_every]  # skip warm-up windows
    memory = [json.load(open(os.path.join(out, f"peak_memory_rank{r}.json"))) for r in range(nproc)]
    return {"name": name, "nproc": nproc, "flags": flags, "tokens_per_sec": statistics.median(windows),
            "final_loss": recs[-1]["loss"], "peak_allocated_gib": [m["allocated_gib"] for m in memory],
            "peak_reserved_gib": [m["reserved_gib"] for m in memory]}


def main() -> None:
    argv = sys.argv[1:]
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--layouts", default="1,dp2,tp2,pp2-gpipe-m4,pp2-1f1b-m4,pp2-gpipe-m8,pp2-1f1b-m8")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="of the non-PP layouts")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="without --compile")
    ap.add_argument("--out", default="bench_parallel.json")
    a = ap.parse_args(own)
    import torch
    names = [n for n in a.layouts.split(",") if n != "1"]
    specs = {n: layout(n, a.micro_batch_size) for n in names}
    base_flags = model_flags(a.hidden_size) + ([] if a.eager else ["--compile"])
    micro_sizes = set()
    if "1" in a.layouts.split(","):  # without layout 1 (a model one GPU cannot hold): no ratios
        micro_sizes = {micro for _, _, micro, _ in specs.values()} | {a.micro_batch_size}
    baselines = {mb: run(f"1 GPU, micro {mb}", 1, base_flags + ["--micro-batch-size", str(mb)] + extra, a.steps,
                         a.log_every, "minimal_pretrain.py") for mb in sorted(micro_sizes)}
    rows = list(baselines.values())
    for name, (nproc, flags, micro, script) in specs.items():
        r = run(name, nproc, base_flags + flags + ["--micro-batch-size", str(micro)] + extra, a.steps, a.log_every,
                script)
        if micro in baselines:
            r["speedup"] = r["tokens_per_sec"] / baselines[micro]["tokens_per_sec"]
        if name.startswith("pp2-"):
            m = GLOBAL_BATCH // micro
            r["ideal_speedup"] = 2 * (1 - 1 / (m + 1))
        rows.append(r)
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
          f"d_model {a.hidden_size}, {'eager' if a.eager else 'compiled'}")
    print(f"{'layout':<18} {'tokens/s':>12} {'vs 1 GPU':>9} {'ideal':>6} {'peak alloc GiB/GPU':>20} {'final loss':>10}")
    for r in rows:
        mem = "/".join(f"{g:.1f}" for g in r["peak_allocated_gib"])
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ("1.00x" if r["nproc"] == 1 else "")
        ideal = f"{r['ideal_speedup']:.2f}" if "ideal_speedup" in r else ""
        print(f"{r['name']:<18} {r['tokens_per_sec']:>12,.0f} {sp:>9} {ideal:>6} {mem:>20} {r['final_loss']:>10.4f}")
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "model_flags": base_flags + extra,
               "rows": rows}, open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
