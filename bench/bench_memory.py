"""Memory per GPU under the two memory levers, activation recompute (--recompute) and the sharded optimizer
(--shard-optimizer), measured and computed from the shapes.

    python bench/bench_memory.py measure [--modes none attention moe block] [--steps 20] [--out memory.json] -- <flags>
    python bench/bench_memory.py states [--dp 1 2 4 8] [--shard] [--tp 1] [--ep-over-dp] -- <model flags>
    torchrun --nproc_per_node=2 bench/bench_memory.py check -- <flags>      # CPU, gloo: the count against the ranks

measure: trains with the given flags once per recompute mode (one GPU), and reports the peak allocated memory
(torch's caching allocator, bench/peak_memory.py), the tokens/s (median of the logged windows after the first
two) and the step's final loss, which the modes must share to rounding.
states: the model states per rank computed from the shapes: fp32 parameters (4 bytes), fp32 gradient buckets (4),
AdamW's two fp32 moments (8, or 8 / N with the sharded optimizer over N = DP ranks, the experts' over the
expert-data-parallel ranks), and under bf16 the expert weights' bf16 copies (2), for each DP size.
check: every rank builds the trainer's model, buckets and optimizer (one step, so the moments exist), counts
the bytes it holds and prints them beside the computed ones (they must agree; exit 1 otherwise).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import OneLineParser  # noqa: E402

GIB = 2 ** 30


def measure(flags: list, modes: list, steps: int) -> list:
    rows = []
    for mode in modes:
        out = tempfile.mkdtemp(prefix=f"mem_{mode}_")
        cmd = [sys.executable, os.path.join(ROOT, "bench", "peak_memory.py"), os.path.join(ROOT, "minimal_pretrain.py"),
               *flags, "--recompute", mode, "--max-steps", str(steps), "--log-interval", "5", "--eval-iters", "0",
               "--no-save", "--no-progress", "--output-dir", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"--recompute {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in line]
        peak = json.load(open(os.path.join(out, "peak_memory_rank0.json")))
        windows = [r["tokens_per_sec"] for r in recs if r["step"] >= 10]
        rows.append({"recompute": mode, "peak_allocated_gib": peak["allocated_gib"],
                     "peak_reserved_gib": peak["reserved_gib"], "tokens_per_sec": statistics.median(windows),
                     "final_loss": recs[-1]["loss"], "losses": [r["loss"] for r in recs]})
        print(f"--recompute {mode:<9}: peak {peak['allocated_gib']:.2f} GiB allocated, "
              f"{statistics.median(windows):,.0f} tokens/s, loss at step {recs[-1]['step']} {recs[-1]['loss']:.4f}",
              flush=True)
    return rows


def model_state_bytes(flags: list, dp: int, tp: int = 1, ep: Optional[int] = None, shard: bool = False,
                      bf16: bool = True) -> dict:
    """Bytes of model states on one rank of stage 0 (pp 1) of the layout, from the shapes alone."""
    import torch
    from config import build_parser, model_config
    from model import GPT
    from parallel import Topology, is_expert_param
    args = build_parser().parse_args(flags)  # the model flags only: no layout checks for this process
    cfg = model_config(args, args.vocab_size or 256)
    ep = ep or tp
    with torch.device("meta"):
        model = GPT(cfg, Topology(world_size=dp * tp, tp=tp, dp=dp, ep=ep))
    expert = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    other = sum(p.numel() for p in model.parameters() if not is_expert_param(p))
    edp = dp * tp // ep
    n_dense, n_expert = (dp, edp) if shard else (1, 1)
    out = {"params": 4 * (expert + other), "grads": 4 * (expert + other),
           "moments": 8 * (-(-other // n_dense) + -(-expert // n_expert)),
           "bf16_expert_copies": 2 * expert if bf16 and cfg.moe.num_experts else 0}
    out["total"] = sum(out.values())
    return out


def states(flags: list, dps: list, shard: bool, tp: int, ep_over_dp: bool) -> list:
    rows = []
    for dp in dps:
        for sharded in ([False, True] if shard else [False]):
            if sharded and dp == 1:
                continue
            ep = tp * dp if ep_over_dp else tp
            b = model_state_bytes(flags, dp, tp, ep=ep, shard=sharded)
            rows.append({"dp": dp, "tp": tp, "ep": ep, "shard_optimizer": sharded, **{k: v / GIB for k, v in b.items()}})
            print(f"DP {dp} TP {tp} EP {ep}{' sharded' if sharded else '':<8}: params {b['params'] / GIB:.2f}, grads "
                  f"{b['grads'] / GIB:.2f}, moments {b['moments'] / GIB:.2f}, bf16 copies "
                  f"{b['bf16_expert_copies'] / GIB:.2f}, total {b['total'] / GIB:.2f} GiB per GPU", flush=True)
    return rows


def check(flags: list) -> int:
    """Under torchrun: each rank's own count of the bytes it holds against model_state_bytes."""
    import torch
    import minimal_pretrain
    from config import parse_args
    from parallel import destroy_topology, init_topology
    args = parse_args(flags + ["--no-save", "--no-progress", "--eval-iters", "0", "--output-dir", tempfile.mkdtemp()])
    topo = init_topology(args.tensor_parallel_size, args.pipeline_parallel_size, "cpu", args.expert_parallel_size)
    import contextlib
    with contextlib.ExitStack() as cleanup:
        t = minimal_pretrain.setup(args, topo, "fp32", cleanup)
        minimal_pretrain.train_step(t, 0, record_stats=False)
        held = {"params": 4 * sum(p.numel() for p in t.model.parameters()),
                "grads": 4 * sum(b.flat.numel() for b in t.dp_grads.buckets),
                "moments": sum(v.numel() * v.element_size() for s in t.optimizer.state.values()
                               for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))}
    want = model_state_bytes(flags, topo.dp, topo.tp, ep=topo.ep, shard=args.shard_optimizer, bf16=False)
    # The buckets are padded to a multiple of their group's size: up to N - 1 elements each.
    ok = held["params"] == want["params"] and abs(held["grads"] - want["grads"]) <= 4 * len(t.dp_grads.buckets) * topo.dp \
        and abs(held["moments"] - want["moments"]) <= 8 * len(t.dp_grads.buckets) * topo.dp
    print(json.dumps({"rank": topo.rank, "held": held, "computed": {k: want[k] for k in held}, "agree": ok}), flush=True)
    destroy_topology(topo, finished=True)
    return 0 if ok else 1


def main() -> int:
    argv = sys.argv[1:]
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["measure", "states", "check"])
    ap.add_argument("--modes", nargs="+", default=["none", "attention", "moe", "block"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shard", action="store_true", help="states: also with the sharded optimizer")
    ap.add_argument("--tp", type=int, default=1, help="states: the TP size")
    ap.add_argument("--ep-over-dp", action="store_true", help="states: EP = TP x DP (the experts split over every rank)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(own)
    if a.what == "check":
        return check(flags)
    rows = measure(flags, a.modes, a.steps) if a.what == "measure" else states(flags, a.dp, a.shard, a.tp, a.ep_over_dp)
    if a.out:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        json.dump({"gpu": gpu, "torch": torch.__version__, "flags": flags, "rows": rows}, open(a.out, "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
