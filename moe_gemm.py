"""Grouped GEMMs of the expert FFNs as Triton kernels: forward/dX (y = x @ W[e] per group of rows) and the
weight gradient (out[e] (+)= x[group]^T @ dy[group]) written straight into an fp32 buffer.

Rows are sorted by expert: group e is rows ends[e-1] .. ends[e]-1 of x [M, K] (`ends` int32 on the device,
cumulative, groups may be empty); rows at and past ends[-1] belong to no expert and are neither read nor
written. Nothing here reads `ends` on the host: the grids and every host-side bound come from the shapes
(M, K, N, E and the tile sizes) and each program turns tile indices into groups on the device.

grouped_mm, the tile mapping. A row tile never crosses a group boundary: group e has cdiv(size_e, BM) row
tiles, the last one row-masked. Every program loads the E ends once (E <= 256, one vector), forms the
per-group tile counts and their cumulative sum (tl.cumsum), and for a tile index finds its group as the
number of groups whose tiles end at or before it. Tiles are numbered row tile major, column tile minor, row
tiles in group order: programs running at the same time work on neighbouring row blocks of one expert, so
its weights W[e] and the x rows stay in L2. The host bounds the number of row tiles by cdiv(M, BM) + E (each
group adds at most one partial tile) only to size the grid; the loop itself runs to the device's count.

Persistent grid: one program per SM, each looping over tiles pid, pid + P, ... The host does not know how
many tiles there are (that depends on the group sizes on the device), so a grid of all possible tiles
would launch up to E * N/BN programs that exit at once; and a persistent loop overlaps one tile's epilogue
with the next tile's loads.

grouped_mm_wgrad: one program owns each output tile (e, k block, n block) of out [E, K, N] and reduces over
its group's rows (a loop whose bounds are loaded from `ends`), so there are no atomics and the result is
deterministic. Tiles are numbered expert major, so the tiles running together read the same rows of x and
dy. With accumulate=True the tile is added to `out` in fp32 in the epilogue: this is Megatron's
gradient-accumulation fusion: the bf16 weight copies' gradient goes straight into the fp32 main gradient,
with no bf16 gradient buffer, no separate fp32 += bf16 pass, and no bf16 rounding of the per-microbatch
gradient. GroupedLinear (below) is the autograd function that does this.

Precision: bf16 operands go to tl.dot directly, fp32 accumulation. fp32 operands use IEEE fp32 products
(torch's default for fp32 matmuls). Under Triton's interpreter (TRITON_INTERPRET=1, read at import, as
triton.jit does) operands are upcast to fp32 before tl.dot: the interpreter's bf16 dot is wrong.

Without Triton, on CPU tensors (unless interpreting) and while torch.compile traces, the public functions
run the torch formulas (torch._grouped_mm), as moe_ops does.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch formulas below.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_PROGRAMS = 3  # under the interpreter: a few programs, so that each loops over several tiles


class GemmConfig(NamedTuple):
    """Tile sizes and launch options. grouped_mm: a [block_m, block_n] tile of y, K in steps of block_k.
    grouped_mm_wgrad: a [block_m, block_n] tile of out[e] ([K, N]), the group's rows in steps of block_k."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Starting configs for an H100 (not yet tuned by measurement; bench/bench_grouped_gemm.py compares BN 128
# against 256). bf16: 2 * (128*64 + 64*128) bytes a stage, 4 stages = 128 KiB of shared memory.
BF16_CONFIG = GemmConfig(128, 128, 64, num_warps=8, num_stages=4)
BF16_WIDE_CONFIG = GemmConfig(128, 256, 64, num_warps=8, num_stages=3)  # 144 KiB
FP32_CONFIG = GemmConfig(64, 64, 32, num_warps=4, num_stages=3)  # fp32 is for checks, not speed


def default_config(dtype: torch.dtype) -> GemmConfig:
    return BF16_CONFIG if dtype == torch.bfloat16 else FP32_CONFIG


def _use_triton(t: torch.Tensor) -> bool:
    return (triton is not None and (t.is_cuda or _INTERPRET) and not torch.compiler.is_compiling())


_sm_counts: dict = {}


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _grouped_mm_kernel(x, w, y, ends, stride_we, stride_wk, stride_wn,
                           K: tl.constexpr, N: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                           NUM_PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        N_TILES: tl.constexpr = (N + BN - 1) // BN
        # The group table, once per program: [E_PAD] vectors, padding groups empty.
        g = tl.arange(0, E_PAD)
        g_end = tl.load(ends + g, mask=g < E, other=0)
        g_start = tl.load(ends + g - 1, mask=(g > 0) & (g < E), other=0)
        g_tiles = (g_end - g_start + BM - 1) // BM
        g_tiles_end = tl.cumsum(g_tiles, 0)  # row tiles of groups 0..g
        num_tiles = tl.sum(g_tiles) * N_TILES
        ks = tl.arange(0, BK)
        for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
            row_tile = tile // N_TILES
            col_tile = tile % N_TILES
            e = tl.sum((g_tiles_end <= row_tile).to(tl.int32))  # empty groups end where the last did
            in_e = g == e
            row_end = tl.sum(tl.where(in_e, g_end, 0))
            first_tile = tl.sum(tl.where(in_e, g_tiles_end - g_tiles, 0))  # the group's first row tile
            row0 = tl.sum(tl.where(in_e, g_start, 0)) + (row_tile - first_tile) * BM
            rows = row0 + tl.arange(0, BM)
            row_ok = rows < row_end
            cols = col_tile * BN + tl.arange(0, BN)
            col_ok = cols < N
            x_ptrs = x + rows.to(tl.int64)[:, None] * K + ks[None, :]  # [BM, BK]
            w_ptrs = w + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn  # [BK, BN]
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, K, BK):
                k_ok = k0 + ks < K
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                x_ptrs += BK
                w_ptrs += BK * stride_wk
            y_ptrs = y + rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(x, dy, out, ends, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
                              NUM_PROGRAMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        K_TILES: tl.constexpr = (K + BM - 1) // BM
        N_TILES: tl.constexpr = (N + BN - 1) // BN
        rs = tl.arange(0, BK)
        for tile in tl.range(pid, E * K_TILES * N_TILES, NUM_PROGRAMS):
            e = tile // (K_TILES * N_TILES)
            k_tile = (tile // N_TILES) % K_TILES
            n_tile = tile % N_TILES
            start = tl.load(ends + tl.maximum(e - 1, 0))
            start = tl.where(e > 0, start, 0)
            end = tl.load(ends + e)
            kk = k_tile * BM + tl.arange(0, BM)
            nn = n_tile * BN + tl.arange(0, BN)
            k_ok = kk < K
            n_ok = nn < N
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for r0 in tl.range(start, end, BK):
                rows = r0 + rs
                row_ok = rows < end  # masked loads give 0 for other groups' rows, even NaN ones
                rows64 = rows.to(tl.int64)
                a = tl.load(x + rows64[None, :] * K + kk[:, None], mask=k_ok[:, None] & row_ok[None, :],
                            other=0.0)  # [BM, BK]: x^T
                b = tl.load(dy + rows64[:, None] * N + nn[None, :], mask=row_ok[:, None] & n_ok[None, :],
                            other=0.0)  # [BK, BN]
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            out_ptrs = out + e.to(tl.int64) * K * N + kk[:, None] * N + nn[None, :]
            out_ok = k_ok[:, None] & n_ok[None, :]
            if ACCUMULATE:
                if end > start:  # an empty group leaves its gradient as it was (no read-modify-write)
                    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_ok) + acc, mask=out_ok)
            else:
                tl.store(out_ptrs, acc, mask=out_ok)


def _launch_options(x: torch.Tensor, config: GemmConfig) -> dict:
    # "ieee" for fp32 operands (the interpreter's upcast ones too); bf16 operands take Triton's default,
    # which has no effect on them, as in every bf16 Triton matmul.
    precision = "ieee" if x.dtype == torch.float32 or _INTERPRET else "tf32"
    return dict(UPCAST=_INTERPRET, PRECISION=precision, BM=config.block_m, BN=config.block_n, BK=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages)


# --------------------------------------------------------------------------------------------------
# Products: the Triton kernels where they can run, torch._grouped_mm elsewhere
# --------------------------------------------------------------------------------------------------
def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, config: Optional[GemmConfig] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K], w [E, K, N] (any strides, e.g. a transposed [E, N, K]), ends [E] int32 -> y [M, N] in x's
    dtype, y[rows of e] = x[rows of e] @ w[e]. Rows at and past ends[-1] are undefined: the kernel does not
    write them (y is allocated empty, or is `out`, [M, N] contiguous, if given)."""
    M, K = x.shape
    E, K_w, N = w.shape
    if K_w != K or ends.shape != (E,) or ends.dtype != torch.int32 or w.dtype != x.dtype or (
            out is not None and (out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous())):
        raise ValueError(f"grouped_mm: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}, "
                         f"ends {tuple(ends.shape)} {ends.dtype}")
    if not _use_triton(x):
        y = torch._grouped_mm(x, w, offs=ends)
        return y if out is None else out.copy_(y)
    x = x.contiguous()
    y = x.new_empty(M, N) if out is None else out
    config = config or default_config(x.dtype)
    max_tiles = (triton.cdiv(M, config.block_m) + E) * triton.cdiv(N, config.block_n)
    programs = min(_num_programs(x.device), max_tiles)
    if programs > 0:
        _grouped_mm_kernel[(programs,)](x, w, y, ends, w.stride(0), w.stride(1), w.stride(2), K=K, N=N, E=E,
                                        E_PAD=max(2, triton.next_power_of_2(E)), NUM_PROGRAMS=programs,
                                        **_launch_options(x, config))
    return y


def grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, out: torch.Tensor,
                     accumulate: bool, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """out[e] = x[rows of e]^T @ dy[rows of e] (accumulate=False; 0 for an empty group) or += it
    (accumulate=True; an empty group's out[e] unchanged). x [M, K], dy [M, N], out [E, K, N] fp32 contiguous.
    Returns out."""
    M, K = x.shape
    E = ends.shape[0]
    if dy.shape[0] != M or out.shape != (E, K, dy.shape[1]) or out.dtype != torch.float32 \
            or not out.is_contiguous() or dy.dtype != x.dtype or ends.dtype != torch.int32:
        raise ValueError(f"grouped_mm_wgrad: x {tuple(x.shape)} {x.dtype}, dy {tuple(dy.shape)} {dy.dtype}, "
                         f"out {tuple(out.shape)} {out.dtype}, ends {tuple(ends.shape)}")
    N = dy.shape[1]
    if not _use_triton(x):
        grad = torch._grouped_mm(x.t(), dy, offs=ends)  # [E, K, N] in x's dtype
        return out.add_(grad) if accumulate else out.copy_(grad)
    x, dy = x.contiguous(), dy.contiguous()
    config = config or default_config(x.dtype)
    tiles = E * triton.cdiv(K, config.block_m) * triton.cdiv(N, config.block_n)
    programs = min(_num_programs(x.device), tiles)
    if programs > 0:
        _grouped_wgrad_kernel[(programs,)](x, dy, out, ends, K=K, N=N, E=E, NUM_PROGRAMS=programs,
                                           ACCUMULATE=accumulate, **_launch_options(x, config))
    return out


# --------------------------------------------------------------------------------------------------
# Autograd: dW accumulated into the fp32 main gradient
# --------------------------------------------------------------------------------------------------
class GroupedLinear(torch.autograd.Function):
    """y = grouped_mm(x, w, ends), whose backward adds dW straight into `main_grad` (fp32 [E, K, N], e.g.
    the fp32 master weight's .grad, which must exist) and then calls `on_grad_ready()` if given (the DP
    reducer's readiness count). w (the bf16 compute copy) gets no gradient of its own: its .grad stays
    None. dX rows at and past ends[-1] are undefined, as the forward's rows are.

    The backward writes main_grad in place, by design; torch 2.11's compile mishandles autograd functions
    that mutate tensors (tests/test_compile.py), so a compiled model should call this outside the compiled
    graph (torch.compiler.disable). Not yet tried under torch.compile."""

    @staticmethod
    def forward(ctx, x, w, ends, main_grad, on_grad_ready):
        ctx.save_for_backward(x, w, ends)
        ctx.main_grad, ctx.on_grad_ready = main_grad, on_grad_ready
        return grouped_mm(x, w, ends)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: [M, N]
        x, w, ends = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grouped_mm(grad_y, w.transpose(-2, -1), ends) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            grouped_mm_wgrad(x, grad_y, ends, ctx.main_grad, accumulate=True)
            if ctx.on_grad_ready is not None:
                ctx.on_grad_ready()
        return grad_x, None, None, None, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, main_grad: torch.Tensor,
                   on_grad_ready: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """x [M, K] @ w[e] per group -> [M, N]; backward: dX, and dW added into main_grad (fp32 [E, K, N]) when w
    requires grad."""
    return GroupedLinear.apply(x, w, ends, main_grad, on_grad_ready)


# --------------------------------------------------------------------------------------------------
# bench/bench_grouped_gemm.py's variants
# --------------------------------------------------------------------------------------------------
def bench_variants(xs: list, gs: list, w_n: list, offs: torch.Tensor, sets: int) -> dict:
    """Callables per product and input set i, each returning its output: fwd x @ W, dX g @ W^T (the transposed
    view of W [E, K, N]), dW x^T g into a preallocated fp32 buffer (overwritten, or accumulated into). xs[i]
    [M, K], gs[i] [M, N], w_n[i] [E, K, N] bf16 CUDA tensors, offs [E] int32 ends. The accumulate variant's
    buffer starts at zero, so its first call returns x^T g. Empty where the kernels cannot run."""
    if not _use_triton(xs[0]):
        return {}
    E, K, N = w_n[0].shape
    variants = {}
    for name, config in (("triton", BF16_CONFIG), ("triton BN=256", BF16_WIDE_CONFIG)):
        dw = torch.empty(E, K, N, device=xs[0].device, dtype=torch.float32)
        variants[name] = {
            "fwd": [lambda i=i, c=config: grouped_mm(xs[i], w_n[i], offs, c) for i in range(sets)],
            "dX": [lambda i=i, c=config: grouped_mm(gs[i], w_n[i].transpose(-2, -1), offs, c) for i in range(sets)],
            "dW": [lambda i=i, c=config, dw=dw: grouped_mm_wgrad(xs[i], gs[i], offs, dw, False, c)
                   for i in range(sets)]}
    acc = torch.zeros(E, K, N, device=xs[0].device, dtype=torch.float32)
    variants["triton dW accumulate fp32"] = {
        "dW": [lambda i=i: grouped_mm_wgrad(xs[i], gs[i], offs, acc, True) for i in range(sets)]}
    return variants
