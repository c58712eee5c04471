"""Routing micro-benchmarks on the project's own MoE code: top-k, pack, combine, both, and capacity.

    python bench/bench_routing.py topk     [common flags]
    python bench/bench_routing.py pack     [common flags] [--capacity-factor C --drop-policy position|probs]
    python bench/bench_routing.py combine  [same]
    python bench/bench_routing.py routing  [same]
    python bench/bench_routing.py capacity [common flags] [--capacity-factors 1.0,1.1,1.25,1.5] [--skew 0.25]

common: --num-tokens 16384 --hidden-dim 4096 --num-experts 128 --top-k 2 --iters 100 --warmup 10
        --dtype bfloat16|float16|float32 --seed 17 --device auto|cuda|cpu --router-score softmax|sigmoid
        --out FILE.jsonl (appends)

What runs is the training code itself, not a copy:
- topk: moe_layers.route_topk on fixed fp32 router logits [T, E] (scores, top-k, normalised weights).
- pack / combine / routing / capacity: a SparseMoE forward (no autograd) whose router returns the top-k
  of fixed logits (route_topk again) and whose experts are the identity. The timed ranges are SparseMoE's
  own `profiling.phase` ranges: pack = moe/capacity (when on) + moe/permute (sort key, argsort, group
  offsets, gather), combine = moe/unpermute_combine (inverse permutation, gather back, weighted sum over
  k), routing = pack + combine. The router and expert phases are not counted.

Timing: on CUDA each phase is bracketed by CUDA events; on the CPU by a wall clock (every op is
synchronous there). --warmup iterations first, then --iters timed ones; reported are the median and the
10th / 90th percentiles over iterations (of the per-iteration sum of the counted phases).

Bandwidth counts the bytes a perfect kernel must move per token ("strict"): pack reads the token once
and writes k copies, (1 + k) * d * bytes; combine reads k rows and writes one, (k + 1) * d * bytes;
routing and capacity both, (2 + 2k) * d * bytes (with drops the same formula, so rows compare at equal
work asked). bw_GiBps_strict = bytes_per_token_strict * T / median time / 2^30.

Logits: "random" are N(0, 1); "skewed" add a fixed per-expert offset skew * z_e, z_e ~ N(0, 1), as a
trained router's favourites do (random logits spread the load evenly and hide the drops). At the default
sizes (16384 tokens, 128 experts, top-2) load_cv is 0.07 for random logits and 0.66 with --skew 0.25,
where capacity factor 1.25 drops 16% of the assignments (probs policy; CPU run, seed 17).
load_cv = std (Bessel, n - 1) / mean of the per-expert assignment counts, as moe/cv_*. Capacity rows add the capacity
per expert, avg_drop_rate (dropped assignments / T*k) and token_drop_rate (tokens with all k dropped / T).
Output: one JSON line per configuration on stdout, appended to --out if given. Drop rate against capacity
factor per k: run `capacity` once per --top-k into one --out file, then `python bench/plot_routing.py drops
FILE`. The routing strategies of --moe-routing / --moe-gate are not benchmarked here (this times the
token-choice top-k path; compare strategies by training them, bench/sweep.py --strategies).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Iterator, Optional

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import profiling  # noqa: E402
from errors import InputError, OneLineParser  # noqa: E402
from moe_config import DROP_POLICIES, ROUTER_SCORES, MoEConfig  # noqa: E402
from moe_layers import SparseMoE, capacity_mask, expert_capacity, route_topk  # noqa: E402
from parallel import Topology  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PHASES = {"pack": ("moe/capacity", "moe/permute"), "combine": ("moe/unpermute_combine",),
          "routing": ("moe/capacity", "moe/permute", "moe/unpermute_combine")}
PHASES["capacity"] = PHASES["routing"]


# --------------------------------------------------------------------------------------------------
# Timing the training code's own phases
# --------------------------------------------------------------------------------------------------
class PhaseTimer:
    """Stands in for profiling.phase in every loaded module that uses it (moe_layers and any other), and
    times each named range: CUDA events on the GPU, perf_counter on the CPU. Restored on exit."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.iterations: list = []  # per timed iteration: [(name, start, end)]
        self.recording = False
        self._patched: list = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.recording:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.iterations[-1].append((name, start, end))

    def __enter__(self) -> "PhaseTimer":
        for mod in list(sys.modules.values()):
            if getattr(mod, "phase", None) is profiling.phase and mod is not profiling:
                self._patched.append(mod)
                mod.phase = self.phase
        if not self._patched:
            raise RuntimeError("no loaded module uses profiling.phase: nothing to time")
        return self

    def __exit__(self, *exc) -> None:
        for mod in self._patched:
            mod.phase = profiling.phase
        self._patched.clear()

    def start_iteration(self) -> None:
        self.recording = True
        self.iterations.append([])

    def stop(self) -> None:
        self.recording = False

    def totals_ms(self, names: tuple) -> list:
        """Per iteration, the summed time of the named phases (ms). Waits for the GPU once."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for it in self.iterations:
            spans = [(s.elapsed_time(e) if self.cuda else (e - s) * 1e3) for n, s, e in it if n in names]
            if not spans:
                raise RuntimeError(f"none of the phases {names} ran; seen: {sorted({n for n, _, _ in it})}")
            out.append(sum(spans))
        return out


def summary_ms(samples: list) -> dict:
    """Median and 10th / 90th percentiles (linear interpolation) of the per-iteration times."""
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return {"ms": statistics.median(samples), "ms_p10": q[0], "ms_p90": q[-1]}


def timed(fn, iters: int, warmup: int, device: torch.device) -> list:
    """Wall-clock or CUDA-event time (ms) of each of `iters` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def make_logits(args, skewed: bool, device: torch.device) -> torch.Tensor:
    """Fixed fp32 router logits [T, E]: N(0, 1), plus skew * z_e per expert when skewed."""
    g = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(args.num_tokens, args.num_experts, generator=g)
    if skewed:
        logits += args.skew * torch.randn(args.num_experts, generator=g)
    return logits.to(device)


def load_cv(indices: torch.Tensor, num_experts: int) -> float:
    counts = torch.zeros(num_experts, device=indices.device).scatter_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))
    return float(counts.std() / counts.mean())  # Bessel std, as moe/cv_* (torch's std, NeMo's cv)


class IdentityExperts(nn.Module):
    """Experts that return their input: SparseMoE's contract of GroupedExperts without the GEMMs (rows
    at and after ends[-1] belong to no local expert; SparseMoE never reads them)."""

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return x


def routing_moe(args, logits: torch.Tensor, device: torch.device, capacity_factor: float,
                drop_policy: str) -> SparseMoE:
    """The training code's SparseMoE on one process, routed by the fixed logits, identity experts."""
    moe = SparseMoE(MoEConfig(num_experts=args.num_experts, num_experts_per_token=args.top_k,
                              router_score=args.router_score, capacity_factor=capacity_factor, drop_policy=drop_policy),
                    args.hidden_dim, 16, Topology(device=device))
    moe.experts = IdentityExperts()  # before moving: the real experts' weights never reach the device
    moe.to(device)
    moe.router.forward = lambda x: route_topk(logits, args.top_k, args.router_score, True)
    return moe.eval()


def check_identity_routing(moe: SparseMoE, x: torch.Tensor, logits: torch.Tensor, args) -> None:
    """With identity experts each token comes back times the sum of its kept combine weights: a check
    that the timed pipeline really routes (independently of its code: top-k and capacity recomputed)."""
    with torch.no_grad():
        out, _ = moe(x)
        r = route_topk(logits, args.top_k, args.router_score, True)
        w = r.weights
        if moe.capacity_factor > 0:
            counts = torch.zeros(args.num_experts, device=x.device).scatter_add_(
                0, r.indices.reshape(-1), torch.ones(r.indices.numel(), device=x.device))
            cap = expert_capacity(args.num_tokens, args.top_k, args.num_experts, moe.capacity_factor)
            w = torch.where(capacity_mask(r.indices, r.scores, counts, cap, moe.drop_policy), w, 0.0)
        expected = x.float() * w.sum(-1, keepdim=True)
        tol = 1e-4 if x.dtype == torch.float32 else 3e-2
        if not torch.allclose(out.float(), expected, rtol=tol, atol=tol):
            raise RuntimeError(f"routing check failed: max error {(out.float() - expected).abs().max():.3e}")


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------
def base_record(args, device: torch.device, bench: str) -> dict:
    return {"bench": bench, "num_tokens": args.num_tokens, "hidden_dim": args.hidden_dim,
            "num_experts": args.num_experts, "top_k": args.top_k, "dtype": args.dtype, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "router_score": args.router_score, "seed": args.seed, "iters": args.iters, "warmup": args.warmup,
            "timer": "cuda_events" if device.type == "cuda" else "wall_clock", "torch": torch.__version__}


def bench_topk(args, device: torch.device) -> list:
    logits = make_logits(args, False, device)
    r = route_topk(logits, args.top_k, args.router_score, True)
    stats = summary_ms(timed(lambda: route_topk(logits, args.top_k, args.router_score, True),
                             args.iters, args.warmup, device))
    return [{**base_record(args, device, "topk"), **stats, "tokens_per_s": args.num_tokens / (stats["ms"] / 1e3),
             "load_cv": load_cv(r.indices, args.num_experts)}]


def bench_routing(args, device: torch.device, bench: str, logits_kind: str, capacity_factor: float,
                  drop_policy: Optional[str]) -> dict:
    """One configuration of pack / combine / routing / capacity."""
    logits = make_logits(args, logits_kind == "skewed", device)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.num_tokens, args.hidden_dim, generator=g).to(device=device, dtype=DTYPES[args.dtype])
    moe = routing_moe(args, logits, device, capacity_factor, drop_policy or "position")
    check_identity_routing(moe, x, logits, args)
    with PhaseTimer(device) as timer, torch.no_grad():
        for i in range(args.warmup + args.iters):
            if i >= args.warmup:
                timer.start_iteration()
            moe(x)
            timer.stop()
        stats = summary_ms(timer.totals_ms(PHASES[bench]))
    k, d, nbytes = args.top_k, args.hidden_dim, DTYPES[args.dtype].itemsize
    per_token = {"pack": (1 + k) * d * nbytes, "combine": (k + 1) * d * nbytes}.get(bench, (2 + 2 * k) * d * nbytes)
    seconds = stats["ms"] / 1e3
    r = route_topk(logits, args.top_k, args.router_score, True)
    rec = {**base_record(args, device, bench), "logits": logits_kind,
           "skew": args.skew if logits_kind == "skewed" else 0.0,
           "capacity_factor": capacity_factor, "drop_policy": drop_policy if capacity_factor > 0 else None,
           **stats, "tokens_per_s": args.num_tokens / seconds,
           "bw_GiBps_strict": per_token * args.num_tokens / seconds / 2 ** 30, "bytes_per_token_strict": per_token,
           "load_cv": load_cv(r.indices, args.num_experts)}
    if bench == "capacity":
        n = args.num_tokens * args.top_k
        if capacity_factor > 0:
            counts = torch.zeros(args.num_experts, device=device).scatter_add_(
                0, r.indices.reshape(-1), torch.ones(n, device=device))
            cap = expert_capacity(args.num_tokens, args.top_k, args.num_experts, capacity_factor)
            kept = capacity_mask(r.indices, r.scores, counts, cap, drop_policy)
            rec.update(capacity=cap, avg_drop_rate=float((~kept).sum()) / n,
                       token_drop_rate=float((~kept.any(-1)).sum()) / args.num_tokens)
        else:
            rec.update(capacity=None, avg_drop_rate=0.0, token_drop_rate=0.0)
    return rec


def run(args) -> list:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.bench == "topk":
        return bench_topk(args, device)
    if args.bench != "capacity":
        return [bench_routing(args, device, args.bench, "random", args.capacity_factor, args.drop_policy)]
    recs = []
    for kind in ["random"] + (["skewed"] if args.skew > 0 else []):
        for cf in args.capacity_factors:
            for policy in (args.drop_policies if cf > 0 else [None]):
                recs.append(bench_routing(args, device, "capacity", kind, cf, policy))
    return recs


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def float_list(text: str) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bench_routing.py", description="Routing micro-benchmarks on the project's MoE code "
                      "(see the module docstring for what is timed and how).")
    sub = p.add_subparsers(dest="bench", required=True, parser_class=OneLineParser)
    helps = {"topk": "router logits -> top-k experts and weights", "pack": "sort and gather tokens by expert",
             "combine": "unsort and weighted sum over k", "routing": "pack + combine",
             "capacity": "routing with expert capacity, per capacity factor and drop policy"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--num-tokens", type=int, default=16384, help="tokens T routed per call")
        s.add_argument("--hidden-dim", type=int, default=4096, help="token width d")
        s.add_argument("--num-experts", type=int, default=128, help="experts E")
        s.add_argument("--top-k", type=int, default=2, help="experts per token k")
        s.add_argument("--iters", type=int, default=100, help="timed iterations")
        s.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
        s.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="token dtype")
        s.add_argument("--seed", type=int, default=17, help="seed of logits and tokens")
        s.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
        s.add_argument("--router-score", choices=ROUTER_SCORES, default="softmax", help="router scores")
        s.add_argument("--out", default=None, help="append the JSON lines to this file")
        if name in ("pack", "combine", "routing"):
            s.add_argument("--capacity-factor", type=float, default=0.0, help="expert capacity factor (0 = no-drop)")
            s.add_argument("--drop-policy", choices=DROP_POLICIES, default="position", help="over capacity, drop by")
        if name == "capacity":
            s.add_argument("--capacity-factors", type=float_list, default=[1.0, 1.1, 1.25, 1.5],
                           help="comma-separated capacity factors (0 = a no-drop row)")
            s.add_argument("--drop-policies", type=lambda t: t.split(","), default=list(DROP_POLICIES),
                           help="comma-separated drop policies")
            s.add_argument("--skew", type=float, default=0.25,
                           help="std of the per-expert logit offsets of the skewed rows (0 = random logits only)")
    return p


def validate(args) -> None:
    for name in ("num_tokens", "hidden_dim", "num_experts", "top_k", "iters"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.top_k > args.num_experts:
        raise InputError(f"--top-k {args.top_k} must not exceed --num-experts {args.num_experts}")
    factors = [("--capacity-factor", args.capacity_factor)] if hasattr(args, "capacity_factor") else []
    if hasattr(args, "capacity_factors"):
        if not args.capacity_factors:
            raise InputError("--capacity-factors is empty")
        factors += [("--capacity-factors", v) for v in args.capacity_factors]
        if not math.isfinite(args.skew) or args.skew < 0:
            raise InputError(f"--skew must be a finite number >= 0, got {args.skew}")
        bad = [p for p in args.drop_policies if p not in DROP_POLICIES]
        if bad or not args.drop_policies:
            raise InputError(f"--drop-policies must be a comma-separated subset of {','.join(DROP_POLICIES)}, "
                             f"got {','.join(args.drop_policies)}")
    for flag, v in factors:
        if not math.isfinite(v) or v < 0:
            raise InputError(f"{flag} must hold finite numbers >= 0, got {v}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    if args.out and os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a directory")


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except InputError as e:
        print(f"bench_routing.py: error: {e}", file=sys.stderr)
        return 2
    recs = run(args)
    lines = [json.dumps(r) for r in recs]
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
