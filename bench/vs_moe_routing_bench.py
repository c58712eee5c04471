"""Pack + combine with capacity, side by side with moe-routing-bench (yuninxia/moe-routing-bench), one run.

    python bench/vs_moe_routing_bench.py --theirs /path/to/moe-routing-bench [--num-tokens 32768]
        [--hidden-dim 8192] [--num-experts 128] [--top-ks 1,2,4] [--capacity-factors 1.1,1.25,1.5]
        [--dtype float16] [--iters 50] [--out vs_moe_routing_bench.json]

For each k, runs their `scripts/bench_capacity.py` (with their checkout on PYTHONPATH) and our
`bench/bench_routing.py capacity` on the same shape, dtype and capacity factors, one after the other on
the same GPU, and prints tokens/s and strict GiB/s of both with the ratio ours / theirs.

The two scripts time different things; the ratio is of what each reports:
- theirs: host clock around `iters` calls (mean), each call reading the drop rate back with `.item()`
  (a host sync per call); packs the kept rows only; the combine is unweighted (`gate_w_kept=None`).
- ours: CUDA events per call (median), no host sync; the permutation covers all T*k rows (dropped rows
  get weight 0) and the combine is weighted, as in training.
Both draw N(0, 1) logits (softmax top-k) so the load is even, and both count (2 + 2k) * d * bytes per
token as the strict traffic. Needs a CUDA GPU; the moe-routing-bench checkout must hold its
`moe_routing_bench` package and `scripts/bench_capacity.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import OneLineParser  # noqa: E402


def json_lines(cmd: list, env: dict) -> list:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--theirs", required=True, help="a checkout of yuninxia/moe-routing-bench")
    ap.add_argument("--num-tokens", type=int, default=32768)
    ap.add_argument("--hidden-dim", type=int, default=8192)
    ap.add_argument("--num-experts", type=int, default=128)
    ap.add_argument("--top-ks", default="1,2,4")
    ap.add_argument("--capacity-factors", default="1.1,1.25,1.5")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="vs_moe_routing_bench.json")
    a = ap.parse_args()
    script = os.path.join(a.theirs, "scripts", "bench_capacity.py")
    if not os.path.isfile(script):
        ap.exit(2, f"--theirs {a.theirs}: no scripts/bench_capacity.py there\n")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.theirs) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shape = ["--num-tokens", str(a.num_tokens), "--hidden-dim", str(a.hidden_dim), "--num-experts",
             str(a.num_experts), "--capacity-factors", a.capacity_factors, "--iters", str(a.iters), "--dtype", a.dtype]
    rows = []
    for k in [int(v) for v in a.top_ks.split(",")]:
        theirs = json_lines([sys.executable, script, *shape, "--top-k", str(k), "--device", "cuda"], env)
        ours = json_lines([sys.executable, os.path.join(ROOT, "bench", "bench_routing.py"), "capacity", *shape,
                           "--top-k", str(k), "--device", "cuda", "--skew", "0", "--drop-policies", "position"], env)
        ours_by_cf = {round(r["capacity_factor"], 4): r for r in ours}
        for t in theirs:
            o = ours_by_cf[round(t["capacity_factor"], 4)]
            rows.append({"top_k": k, "capacity_factor": t["capacity_factor"],
                         "theirs_tokens_per_s": t["tokens_per_s"], "ours_tokens_per_s": o["tokens_per_s"],
                         "theirs_GiBps_strict": t["bw_GiBps_strict"], "ours_GiBps_strict": o["bw_GiBps_strict"],
                         "theirs_drop_rate": t["avg_drop_rate"], "ours_drop_rate": o["avg_drop_rate"],
                         "ratio": o["tokens_per_s"] / t["tokens_per_s"]})
    import torch
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {a.dtype}, T {a.num_tokens}, "
          f"d {a.hidden_dim}, E {a.num_experts}")
    print(f"{'k':>2} {'CF':>5} {'theirs tok/s':>13} {'ours tok/s':>12} {'theirs GiB/s':>13} {'ours GiB/s':>11} "
          f"{'drop theirs/ours':>17} {'ours/theirs':>11}")
    for r in rows:
        print(f"{r['top_k']:>2} {r['capacity_factor']:>5.2f} {r['theirs_tokens_per_s'] / 1e6:>12.2f}M "
              f"{r['ours_tokens_per_s'] / 1e6:>11.2f}M {r['theirs_GiBps_strict']:>13.0f} {r['ours_GiBps_strict']:>11.0f} "
              f"{r['theirs_drop_rate']:>8.4f}/{r['ours_drop_rate']:.4f} {r['ratio']:>10.2f}x")
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(a), "rows": rows},
              open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
