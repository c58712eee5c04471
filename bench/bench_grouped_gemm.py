"""The expert GEMMs alone against the dense twin's GEMMs of the same FLOPs: forward, dX and dW, TFLOP/s.

    python bench/bench_grouped_gemm.py [--tokens 16384] [--hidden 1024] [--ffn 512] [--experts 32] [--top-k 4]
                                       [--skew 0 0.5] [--iters 50] [--out bench_grouped_gemm.json]

The MoE layer's two expert GEMMs, gate_up ([T*k, d] @ [E, d, 2f]) and down ([T*k, f] @ [E, f, d]), each in
its three products: forward (x @ W), dX (dy @ W^T) and dW (x^T @ dy, per expert). The dense twin's MLP has
the same FLOPs with width F = k*f: gate_up [T, d] @ [d, 2F] and down [T, F] @ [F, d], in nn.Linear's layout
(weights [out, in]), timed the same three ways. The expert GEMMs run as the layer runs them:
  - `grouped`: torch._grouped_mm, weights [E, in, out] (GroupedExperts' layout);
  - `grouped, weights K-major`: the same weights stored [E, out, in] and passed transposed;
  - `grouped dW fp32 out`: the weight gradient written in fp32 (out_dtype), as an fp32 .grad would take it;
  - `triton`, when the build has moe_gemm's kernels (moe_gemm.py): our grouped GEMM (`triton BN=256`: its
    wider tile; `triton dW accumulate fp32`: dW added into an fp32 gradient, Megatron's accumulation fusion).
Before timing, every variant's output on the first input set is checked against `grouped`'s: relative
Frobenius error over the defined part (rows below ends[-1]; dW of non-empty groups), printed, and the bench
stops with an error if one exceeds REL_TOL (bf16 outputs of sums of products: a few 1e-3 expected).
Group sizes: balanced (--skew 0) or drawn with that coefficient of variation (log-normal, seeded), as real
routing gives. Timing: CUDA events, warm-up first, median of --iters, inputs rotated over 3 sets so that
no run reads its operands from L2 left by the last. Prints one table; JSON has every number.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import OneLineParser  # noqa: E402

try:
    import moe_gemm  # our Triton grouped GEMM, where the tree has it
except ImportError:
    moe_gemm = None


def group_sizes(rows: int, experts: int, skew: float, seed: int = 0) -> torch.Tensor:
    """[E] int64 rows per expert summing to `rows`: equal, or log-normal with coefficient of variation `skew`."""
    if skew <= 0:
        base = torch.full((experts,), rows // experts, dtype=torch.int64)
        base[: rows - int(base.sum())] += 1
        return base
    sigma = math.sqrt(math.log(1 + skew ** 2))
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(experts, generator=g, dtype=torch.float64) * sigma)
    sizes = torch.floor(w / w.sum() * rows).to(torch.int64)
    sizes[torch.argsort(-w)[: rows - int(sizes.sum())]] += 1
    return sizes


REL_TOL = 2e-2  # relative Frobenius error a correct bf16 variant stays well below


def defined_part(out: torch.Tensor, product: str, ends: list) -> torch.Tensor:
    """The part of a product's output that is defined: fwd, dX [M, N] rows below ends[-1]; dW [E, K, N]
    the non-empty groups."""
    if product == "dW":
        sizes = [b - a for a, b in zip([0] + ends, ends)]
        return out[[e for e, s in enumerate(sizes) if s > 0]]
    return out[: ends[-1]]


def check_variants(variants: dict, offs: torch.Tensor, reference: str = "grouped", tol: float = REL_TOL) -> dict:
    """{(variant, product): relative Frobenius error} of each variant's first callable against the
    reference variant's; SystemExit naming the failures if any exceeds tol."""
    ends = offs.tolist()
    refs = {p: defined_part(fns[0](), p, ends).float() for p, fns in variants[reference].items()}
    errors, failed = {}, []
    for vname, prods in variants.items():
        for p, fns in prods.items():
            if vname == reference:
                continue
            out = defined_part(fns[0](), p, ends).float()
            err = float((out - refs[p]).norm() / refs[p].norm().clamp_min(1e-30))
            errors[(vname, p)] = err
            if not err <= tol:  # NaN fails too
                failed.append(f"{vname} {p}: {err:.2e}")
        cells = " ".join(f"{p} {errors[(vname, p)]:.1e}" for p in prods if (vname, p) in errors)
        if cells:
            print(f"check {vname:<28} relative error vs {reference}: {cells}")
    if failed:
        raise SystemExit(f"error: outputs differ from {reference}'s by more than {tol:.0e} (relative "
                         f"Frobenius): {'; '.join(failed)}")
    return errors


def time_ms(fns, iters: int, warmup: int = 5) -> float:
    """Median over iters of one call, cycling through fns (one per input set)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(T: int, d: int, f: int, E: int, k: int, skew: float, iters: int) -> list:
    dev, bf = torch.device("cuda"), torch.bfloat16
    rows_total = T * k
    sizes = group_sizes(rows_total, E, skew)
    offs = torch.cumsum(sizes, 0).to(torch.int32).to(dev)
    sets = 3
    out = []
    for name, K, N in (("gate_up", d, 2 * f), ("down", f, d)):
        flops = 2 * rows_total * K * N
        # Dense twin: [T, K*k or K] ... the same FLOPs with the twin's width (F = k f).
        dK, dN = (d, 2 * k * f) if name == "gate_up" else (k * f, d)
        xs = [torch.randn(T, dK, device=dev, dtype=bf) for _ in range(sets)]
        ws = [torch.randn(dN, dK, device=dev, dtype=bf) * 0.02 for _ in range(sets)]  # nn.Linear [out, in]
        gs = [torch.randn(T, dN, device=dev, dtype=bf) for _ in range(sets)]
        dense = {"fwd": [lambda i=i: torch.mm(xs[i], ws[i].t()) for i in range(sets)],
                 "dX": [lambda i=i: torch.mm(gs[i], ws[i]) for i in range(sets)],
                 "dW": [lambda i=i: torch.mm(gs[i].t(), xs[i]) for i in range(sets)]}
        dense_tf = {p: flops / (time_ms(fns, iters) * 1e-3) / 1e12 for p, fns in dense.items()}
        out.append({"gemm": name, "variant": "dense twin", "skew": skew, **dense_tf})
        del xs, ws, gs
        xs = [torch.randn(rows_total, K, device=dev, dtype=bf) for _ in range(sets)]
        gs = [torch.randn(rows_total, N, device=dev, dtype=bf) for _ in range(sets)]
        w_n = [torch.randn(E, K, N, device=dev, dtype=bf) * 0.02 for _ in range(sets)]      # [E, in, out]
        w_k = [w.transpose(-2, -1).contiguous().transpose(-2, -1) for w in w_n]              # K-major
        variants = {
            "grouped": {"fwd": [lambda i=i: torch._grouped_mm(xs[i], w_n[i], offs=offs) for i in range(sets)],
                        "dX": [lambda i=i: torch._grouped_mm(gs[i], w_n[i].transpose(-2, -1), offs=offs)
                               for i in range(sets)],
                        "dW": [lambda i=i: torch._grouped_mm(xs[i].t(), gs[i], offs=offs) for i in range(sets)]},
            "grouped, weights K-major": {
                "fwd": [lambda i=i: torch._grouped_mm(xs[i], w_k[i], offs=offs) for i in range(sets)],
                "dX": [lambda i=i: torch._grouped_mm(gs[i], w_k[i].transpose(-2, -1), offs=offs)
                       for i in range(sets)]},
        }
        try:
            torch._grouped_mm(xs[0].t(), gs[0], offs=offs, out_dtype=torch.float32)
            variants["grouped dW fp32 out"] = {"dW": [lambda i=i: torch._grouped_mm(
                xs[i].t(), gs[i], offs=offs, out_dtype=torch.float32) for i in range(sets)]}
        except (RuntimeError, TypeError) as e:
            print(f"_grouped_mm out_dtype fp32: {str(e).splitlines()[0][:120]}")
        if moe_gemm is not None:
            variants.update(moe_gemm.bench_variants(xs, gs, w_n, offs, sets))
        print(f"{name}, skew {skew}:")
        errors = check_variants(variants, offs)
        for vname, prods in variants.items():
            row = {"gemm": name, "variant": vname, "skew": skew}
            for p, fns in prods.items():
                if (vname, p) in errors:
                    row[f"{p}_rel_err"] = errors[(vname, p)]
                row[p] = flops / (time_ms(fns, iters) * 1e-3) / 1e12
                row[f"{p}_of_dense"] = row[p] / dense_tf[p]
            out.append(row)
        del xs, gs, w_n, w_k
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--skew", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="bench_grouped_gemm.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_grouped_gemm.py needs a CUDA device")
    rows = [r for s in a.skew for r in bench(a.tokens, a.hidden, a.ffn, a.experts, a.top_k, s, a.iters)]
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}, torch {torch.__version__}; T {a.tokens}, d {a.hidden}, f {a.ffn}, E {a.experts}, "
          f"k {a.top_k} ({a.tokens * a.top_k // a.experts} rows per expert on average); TFLOP/s (of dense)")
    print(f"{'gemm':<8} {'skew':>4} {'variant':<28} {'fwd':>13} {'dX':>13} {'dW':>13}")
    for r in rows:
        cells = []
        for p in ("fwd", "dX", "dW"):
            if p not in r:
                cells.append(f"{'-':>13}")
            elif f"{p}_of_dense" in r:
                cells.append(f"{r[p]:>6.0f} ({r[f'{p}_of_dense']:.2f})")
            else:
                cells.append(f"{r[p]:>6.0f}       ")
        print(f"{r['gemm']:<8} {r['skew']:>4.1f} {r['variant']:<28} " + " ".join(cells))
    json.dump({"gpu": gpu, "torch": torch.__version__, "args": vars(a), "rows": rows}, open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
