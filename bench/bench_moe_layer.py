"""The MoE layer alone on one GPU against a dense SwiGLU MLP of the same FLOPs, the grouped-GEMM roof and
the copy bandwidth, in one run so that the ratios are comparable.

    python bench/bench_moe_layer.py [--shapes T,d,f,E,k ...] [--regimes autocast copies bf16] [--profile]
                                    [--compile] [--iters 30] [--out bench_moe_layer.json]

Per shape (T tokens, d_model d, expert FFN f, E experts, top-k) and precision regime:
  - MoE layer (SparseMoE) forward + backward: ms and TFLOP/s of its expert GEMMs (18 T k d f FLOPs);
  - dense same-FLOPs MLP (model.MLP, width k*f, the same tokens) forward + backward;
  - roof: torch._grouped_mm alone, forward + backward of both expert GEMMs on the same sorted shapes;
  - pack + combine (forward): the gather into expert order and the unsort + weighted sum, fused
    (moe_ops) and as plain torch indexing, against a measured device-to-device copy, counting the strict
    bytes (2 + 2k) * d * 2 per token (each token read once, written k times sorted, k rows read back,
    one row written);
    The same pair is also timed as one CUDA graph ("graph" columns): the kernels alone, without the
    host's launch cost, which dominates at small shapes when each call is timed on its own;
  - peak memory of one forward + backward above what was allocated before it.
Regimes: "autocast" = fp32 parameters and fp32 input under bf16 autocast, the expert weights cast to
bf16 at every forward (training with --no-moe-bf16-weights); "copies" = the same under the trainer's
default, mixed_precision.ExpertWeightCopies: bf16 expert weights refreshed from the fp32 masters in
every iteration (one microbatch per optimizer step, the worst case) and the bf16 weight gradients added
into persistent fp32 gradients, every other gradient accumulated as the trainer's buffers do too (the
dense MLP casts as in training); "bf16" = bf16 parameters and input, no autocast. Except under
"copies", gradients are set to None before each iteration (written fresh, not accumulated). Timing:
CUDA events around each call, warm-up first, median of --iters. --profile adds a torch.profiler breakdown of the
layer's GPU kernels (the expert grouped GEMMs' share) at every shape. --compile also times the MoE
layer and the MLP under torch.compile.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import MLP, ModelConfig  # noqa: E402
from moe_config import MoEConfig  # noqa: E402
from moe_layers import SparseMoE  # noqa: E402
from mixed_precision import ExpertWeightCopies  # noqa: E402
from parallel import Topology  # noqa: E402
from errors import OneLineParser  # noqa: E402

try:
    from moe_ops import permute_tokens, unpermute_combine
except ImportError:  # an older tree without moe_ops: the fused pack + combine rows are skipped
    permute_tokens = unpermute_combine = None

SHAPES = ["16384,2048,1024,64,8", "16384,2048,2048,16,2", "32768,1024,512,64,4", "8192,1024,4096,32,2"]
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas", re.I)


def time_ms(fn, iters: int, warmup: int = 5, before=None) -> float:
    """Median over `iters` calls of fn, each between its own pair of CUDA events."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(iters):
        if before:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, iters: int) -> float:
    """Median over `iters` replays of fn captured in a CUDA graph: the kernels' own time, without the host's
    launch cost (a training step queues its kernels ahead, so they do not wait on the host there either)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture (Triton compiles, allocator settles)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, iters)


def copy_bandwidth(iters: int) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    a = torch.randn(2 ** 29, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), iters)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def fwd_bwd(module, x, grad, regime: str):
    """A closure running one forward + backward of module on x (MoE: output and loss; MLP: output)."""
    params = list(module.parameters())
    copies = None
    if regime == "copies" and hasattr(module, "experts"):  # the MoE layer: bf16 expert weights as training keeps them
        copies = ExpertWeightCopies([module.experts], torch.bfloat16)

    def zero():
        if regime != "copies":  # under "copies" gradients accumulate into persistent fp32 buffers
            for p in params:
                p.grad = None
        x.grad = None

    def step():
        if copies is not None:
            copies.refresh()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=regime in ("autocast", "copies")):
            out, loss = module(x)
        if loss is None:
            out.backward(grad)
        else:
            torch.autograd.backward([out, loss], [grad, torch.ones_like(loss)])
    return step, zero


def kernel_profile(step, zero, iters: int = 5) -> dict:
    """GPU kernel time per fwd+bwd, grouped: expert grouped GEMMs (CUTLASS), other GEMMs (the router's),
    everything else; with the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        zero()
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            zero()
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if e.device_type == DeviceType.CUDA and t > 0:  # kernels only, not the CPU ops that launched them
            rows.append((e.key, t / iters / 1e3, e.count // iters))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    grouped = sum(r[1] for r in rows if "cutlass" in r[0].lower() or "grouped" in r[0].lower())
    gemm = sum(r[1] for r in rows if GEMM.search(r[0]))
    return {"total_kernel_ms": total, "grouped_gemm_ms": grouped, "other_gemm_ms": gemm - grouped,
            "grouped_gemm_share": grouped / total, "all_gemm_share": gemm / total,
            "top": [{"kernel": k[:160], "ms": ms, "calls": c} for k, ms, c in rows[:30]]}


def bench_shape(shape: str, regime: str, iters: int, copy_bw: float, do_profile: bool, do_compile: bool) -> dict:
    T, d, f, E, k = (int(v) for v in shape.split(","))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    topo = Topology(device=dev)
    moe = SparseMoE(MoEConfig(num_experts=E, num_experts_per_token=k), d, f, topo).to(dev)
    mlp = MLP(ModelConfig(hidden_size=d, intermediate_size=k * f), topo, 0.02).to(dev)
    with torch.no_grad():
        for p in list(moe.parameters()) + list(mlp.parameters()):
            p.normal_(0.0, 0.02)
    pdtype = torch.bfloat16 if regime == "bf16" else torch.float32
    moe.to(pdtype), mlp.to(pdtype)
    x = torch.randn(T, d, device=dev, dtype=pdtype, requires_grad=True)
    grad = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    flops = 18 * T * k * d * f
    res = {"shape": shape, "T": T, "d": d, "f": f, "E": E, "k": k, "regime": regime, "fwd_bwd_flops": flops}

    def timed(name, module):
        step, zero = fwd_bwd(module, x, grad, regime)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        zero()
        step()
        torch.cuda.synchronize()
        res[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = time_ms(step, iters, before=zero)
        res[f"{name}_ms"], res[f"{name}_tflops"] = ms, flops / (ms * 1e-3) / 1e12
        return step, zero

    moe_step, moe_zero = timed("moe", moe)
    timed("dense", mlp)
    res["moe_over_dense"] = res["moe_ms"] / res["dense_ms"]
    if do_compile:
        timed("moe_compiled", torch.compile(moe))
        timed("dense_compiled", torch.compile(mlp))
        res["moe_over_dense_compiled"] = res["moe_compiled_ms"] / res["dense_compiled_ms"]

    # The same routing as the layer sees: sorted order, group ends and combine weights.
    with torch.no_grad():
        r = moe.router(x.detach())
        flat = r.indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse.scatter_(0, order, torch.arange(order.numel(), device=dev))
        ends = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        weights = r.weights
    res["max_over_mean_load"] = float((torch.diff(ends, prepend=ends.new_zeros(1)).max() * E / (T * k)).item())

    # Roof: the expert GEMMs alone (forward + backward), bf16, the same group sizes.
    bf = dict(device=dev, dtype=torch.bfloat16)
    xs = torch.randn(T * k, d, **bf, requires_grad=True)
    act = torch.randn(T * k, f, **bf, requires_grad=True)
    w1 = (0.02 * torch.randn(E, d, 2 * f, **bf)).requires_grad_(True)
    w2 = (0.02 * torch.randn(E, f, d, **bf)).requires_grad_(True)
    gh, gy = torch.randn(T * k, 2 * f, **bf), torch.randn(T * k, d, **bf)

    def roof():
        h = torch._grouped_mm(xs, w1, offs=ends)
        y = torch._grouped_mm(act, w2, offs=ends)
        torch.autograd.backward([h, y], [gh, gy])

    def roof_zero():
        for t in (xs, act, w1, w2):
            t.grad = None
    ms = time_ms(roof, iters, before=roof_zero)
    res["grouped_mm_roof_ms"], res["grouped_mm_roof_tflops"] = ms, flops / (ms * 1e-3) / 1e12
    del xs, act, gh, gy
    res["moe_over_roof"] = res["moe_ms"] / ms

    # Pack + combine (forward), strict bytes against the measured copy bandwidth.
    xb = torch.randn(T, d, **bf)
    yb = torch.randn(T * k, d, **bf)
    strict = (2 + 2 * k) * d * 2 * T
    res["copy_gib_s"] = copy_bw / 2 ** 30
    variants = {"torch": (lambda: xb[order // k], lambda: (yb[inverse].view(T, k, d) * weights.unsqueeze(-1).to(yb.dtype)).sum(1))}
    if permute_tokens is not None:
        variants["fused"] = (lambda: permute_tokens(xb, inverse, k), lambda: unpermute_combine(yb, inverse, weights))
    with torch.no_grad():
        for name, (pack, combine) in variants.items():
            ms = time_ms(lambda: (pack(), combine()), iters)
            res[f"pack_combine_{name}_ms"] = ms
            res[f"pack_combine_{name}_gib_s"] = strict / (ms * 1e-3) / 2 ** 30
            res[f"pack_combine_{name}_of_copy"] = strict / (ms * 1e-3) / copy_bw
            graph_ms = graph_time_ms(lambda: (pack(), combine()), iters)
            res[f"pack_combine_{name}_graph_ms"] = graph_ms
            res[f"pack_combine_{name}_graph_of_copy"] = strict / (graph_ms * 1e-3) / copy_bw
            res[f"pack_{name}_ms"] = time_ms(pack, iters)
            res[f"combine_{name}_ms"] = time_ms(combine, iters)
    if do_profile:
        res["profile"] = kernel_profile(moe_step, moe_zero)
    del moe, mlp
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="T,d,f,E,k per shape")
    ap.add_argument("--regimes", nargs="+", choices=["autocast", "copies", "bf16"],
                    default=["autocast", "copies", "bf16"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="kernel breakdown of the MoE layer at every shape")
    ap.add_argument("--compile", action="store_true", help="also time both layers under torch.compile")
    ap.add_argument("--out", default="bench_moe_layer.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_layer.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # the router's fp32 GEMM as training runs it
    copy_bw = copy_bandwidth(a.iters)
    rows = [bench_shape(s, reg, a.iters, copy_bw, a.profile, a.compile) for s in a.shapes for reg in a.regimes]
    gpu = torch.cuda.get_device_name(0)
    print(f"GPU: {gpu}, torch {torch.__version__}, copy bandwidth {copy_bw / 2 ** 30:,.0f} GiB/s (read + write)")
    print(f"{'T,d,f,E,k':<22} {'regime':<8} {'MoE ms':>7} {'TFLOP/s':>7} {'dense ms':>8} {'MoE/dense':>9} "
          f"{'roof ms':>7} {'MoE/roof':>8} {'p+c fused':>9} {'graph':>6} {'p+c torch':>9} {'graph':>6} {'MoE GiB':>7} "
          f"{'dense GiB':>9}")
    for r in rows:
        fused = f"{100 * r['pack_combine_fused_of_copy']:.0f}%" if "pack_combine_fused_of_copy" in r else "n/a"
        fused_graph = (f"{100 * r['pack_combine_fused_graph_of_copy']:.0f}%"
                       if "pack_combine_fused_graph_of_copy" in r else "n/a")
        print(f"{r['shape']:<22} {r['regime']:<8} {r['moe_ms']:>7.2f} {r['moe_tflops']:>7.0f} {r['dense_ms']:>8.2f} "
              f"{r['moe_over_dense']:>8.2f}x {r['grouped_mm_roof_ms']:>7.2f} {r['moe_over_roof']:>7.2f}x {fused:>9} "
              f"{fused_graph:>6} {100 * r['pack_combine_torch_of_copy']:>8.0f}% "
              f"{100 * r['pack_combine_torch_graph_of_copy']:>5.0f}% {r['moe_peak_gib']:>7.2f} {r['dense_peak_gib']:>9.2f}")
        if "moe_compiled_ms" in r:
            print(f"{'':<22} {'compiled':<8} {r['moe_compiled_ms']:>7.2f} {'':>7} {r['dense_compiled_ms']:>8.2f} "
                  f"{r['moe_over_dense_compiled']:>8.2f}x")
        if "profile" in r:
            p = r["profile"]
            print(f"  kernels per fwd+bwd: {p['total_kernel_ms']:.2f} ms; expert grouped GEMMs {p['grouped_gemm_ms']:.2f} ms "
                  f"= {100 * p['grouped_gemm_share']:.1f}%, other GEMMs {p['other_gemm_ms']:.2f} ms")
            for t in p["top"][:10]:
                print(f"    {t['ms']:7.3f} ms  x{t['calls']:<3} {t['kernel'][:110]}")
    json.dump({"gpu": gpu, "torch": torch.__version__, "copy_bytes_per_s": copy_bw, "rows": rows},
              open(a.out, "w"), indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
