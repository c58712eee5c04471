"""The MoE layer's memory-bound steps as autograd functions, each one pass over memory:

    x_sorted = permute_tokens(x, inverse, k)         # gather:  x_sorted[inverse[t*k + j]] = x[t]
    act = swiglu(h)                                  # silu(h[:, :f]) * h[:, f:]
    out = unpermute_combine(y_sorted, inverse, w)    # unsort + weighted sum:
                                                     #   out[t] = sum_j w[t, j] * y_sorted[inverse[t*k + j]]

`inverse[t*k + j]` is the row, in expert order, of token t's j-th assignment. Because `inverse` is a
permutation of the T*k rows, the gather and the weighted sum are adjoint: the backward of one is the
other (with the combine weights), so no backward needs atomic adds, and each token's k rows are summed in
registers instead of materialising a [T, k, d] copy.

`num_valid` (optional, a 1-element int tensor on the device): only sorted rows below it are computed by
this rank's experts (under EP the other rows belong to other ranks' experts; with a capacity factor they
are dropped assignments). Rows at and past it are never read: they count as zeros, and their contents
(left undefined by the grouped GEMM) need no masking pass. On CUDA the kernels skip their loads and
stores, so under EP a rank moves only its own experts' rows.

Three primitives do the work: scatter_rows (a row to its k sorted positions, optionally scaled),
gather_sum (the k sorted rows of a token, weighted and summed) and row_dots (the gradient of the combine
weights). Run eagerly on CUDA, each is one Triton kernel that accumulates in fp32. Elsewhere, and while
torch.compile traces the model, each is the plain torch formula (`(y[inverse].view(T, k, d) * w).sum(1)`
and so on): on the CPU in fp32 the results are those of the reference path, and under torch.compile the
compiler fuses the formula into its own kernels with no Python call per op. (The Triton kernels were first
wrapped as torch custom ops for torch.compile; on an H100 a compiled MoE model at micro-batch 8 then
spent about 0.2 ms of host time per op call under cProfile, 224 calls a step, in a step whose GPU was
busy only 44% of the time.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds run the torch formulas below.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# Triton kernels. Grids put one token (or one row) per program along axis 0 and column blocks along
# axis 1; offsets are int64 so T*k*d may exceed 2^31.
# --------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _scatter_rows_kernel(src, inverse, weights, dst, num_valid, d, K: tl.constexpr, HAS_W: tl.constexpr,
                             HAS_NV: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        nv = tl.load(num_valid) if HAS_NV else 0
        row = tl.load(src + t * d + cols, mask=mask).to(tl.float32)
        for j in tl.static_range(K):
            r = tl.load(inverse + t * K + j)
            v = row
            if HAS_W:
                v = row * tl.load(weights + t * K + j)
            keep = (mask & (r < nv)) if HAS_NV else mask
            tl.store(dst + r * d + cols, v.to(dst.dtype.element_ty), mask=keep)

    @triton.jit
    def _gather_sum_kernel(src, inverse, weights, out, num_valid, d, K: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_NV: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        nv = tl.load(num_valid) if HAS_NV else 0
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(inverse + t * K + j)
            keep = (mask & (r < nv)) if HAS_NV else mask
            v = tl.load(src + r * d + cols, mask=keep, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(weights + t * K + j)
            acc += v
        tl.store(out + t * d + cols, acc.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_dots_kernel(a, b, inverse, dots, num_valid, d: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         HAS_NV: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        js = tl.arange(0, K_PAD)
        rows = tl.load(inverse + t * K + js, mask=js < K, other=0)  # [K_PAD]
        row_ok = (js < K) & (rows < tl.load(num_valid)) if HAS_NV else js < K
        acc = tl.zeros([K_PAD, BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < d
            av = tl.load(a + t * d + cols, mask=mask, other=0.0).to(tl.float32)
            bv = tl.load(b + rows[:, None] * d + cols[None, :], mask=row_ok[:, None] & mask[None, :], other=0.0)
            acc += bv.to(tl.float32) * av[None, :]
        tl.store(dots + t * K + js, tl.sum(acc, axis=1), mask=js < K)

    @triton.jit
    def _swiglu_fwd_kernel(h, act, f, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < f
        gate = tl.load(h + n * 2 * f + cols, mask=mask).to(tl.float32)
        up = tl.load(h + n * 2 * f + f + cols, mask=mask).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(act + n * f + cols, out.to(act.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(grad, h, grad_h, f, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < f
        g = tl.load(grad + n * f + cols, mask=mask).to(tl.float32)
        gate = tl.load(h + n * 2 * f + cols, mask=mask).to(tl.float32)
        up = tl.load(h + n * 2 * f + f + cols, mask=mask).to(tl.float32)
        s = tl.sigmoid(gate)
        d_gate = g * up * s * (1.0 + gate * (1.0 - s))  # d silu(x)/dx = s * (1 + x * (1 - s))
        d_up = g * gate * s
        tl.store(grad_h + n * 2 * f + cols, d_gate.to(grad_h.dtype.element_ty), mask=mask)
        tl.store(grad_h + n * 2 * f + f + cols, d_up.to(grad_h.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(n), 1024)


# --------------------------------------------------------------------------------------------------
# Primitives: Triton on CUDA (eager), the reference torch formula elsewhere and under torch.compile
# --------------------------------------------------------------------------------------------------
def scatter_rows(src: torch.Tensor, inverse: torch.Tensor, weights: Optional[torch.Tensor], k: int,
                 num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, d] -> [T*k, d]: dst[inverse[t*k + j]] = src[t] (times weights[t, j] if given). With num_valid,
    rows at and past it are left undefined (on CUDA they are not written)."""
    num_tokens, d = src.shape
    if _use_triton(src):
        src, inverse = src.contiguous(), inverse.contiguous()
        dst = src.new_empty(num_tokens * k, d)
        w = weights.contiguous() if weights is not None else src
        _scatter_rows_kernel[(num_tokens, triton.cdiv(d, _block(d)))](
            src, inverse, w, dst, num_valid if num_valid is not None else inverse, d, K=k,
            HAS_W=weights is not None, HAS_NV=num_valid is not None, BLOCK=_block(d))
        return dst
    rows = src.repeat_interleave(k, dim=0)  # [T*k, d] in assignment order t*k + j
    if weights is not None:
        rows = rows * weights.reshape(-1, 1).to(rows.dtype)
    # Out of place: an in-place op inside an autograd.Function breaks torch 2.11's compile (see
    # parallel.all_reduced). Rows past num_valid are written too: their values are simply never read.
    return torch.empty_like(rows).index_copy(0, inverse, rows)


def _valid_rows(inverse: torch.Tensor, num_valid: Optional[torch.Tensor], k: int) -> Optional[torch.Tensor]:
    """[T, k, 1] bool: which assignments sit in rows below num_valid (None: all of them)."""
    return None if num_valid is None else (inverse < num_valid).view(-1, k, 1)


def gather_sum(src: torch.Tensor, inverse: torch.Tensor, weights: Optional[torch.Tensor], k: int,
               num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T*k, d] -> [T, d]: out[t] = sum_j (weights[t, j] *) src[inverse[t*k + j]], rows at and past
    num_valid (if given) counting as zeros."""
    rows, d = src.shape
    num_tokens = rows // k
    if _use_triton(src):
        src, inverse = src.contiguous(), inverse.contiguous()
        out = src.new_empty(num_tokens, d)
        w = weights.contiguous() if weights is not None else src
        _gather_sum_kernel[(num_tokens, triton.cdiv(d, _block(d)))](
            src, inverse, w, out, num_valid if num_valid is not None else inverse, d, K=k,
            HAS_W=weights is not None, HAS_NV=num_valid is not None, BLOCK=_block(d))
        return out
    gathered = src[inverse].view(num_tokens, k, d)
    valid = _valid_rows(inverse, num_valid, k)
    if valid is not None:  # where, not a product: an undefined row may hold inf or NaN
        gathered = torch.where(valid, gathered, 0.0)
    if weights is not None:
        gathered = gathered * weights.unsqueeze(-1).to(gathered.dtype)
    out = gathered.sum(dim=1)
    # In src's dtype, as the kernel: autocast runs this sum (and so the TP all-reduce after it) in fp32.
    # Only a real conversion: a no-op .to() returned from this autograd.Function breaks torch 2.11's
    # compile (fp32 gradients off by 0.5%), as in-place ops do (see parallel.all_reduced).
    return out if out.dtype == src.dtype else out.to(src.dtype)


def row_dots(a: torch.Tensor, b: torch.Tensor, inverse: torch.Tensor,
             num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [T, d], b [T*k, d] -> [T, k] fp32: dots[t, j] = <a[t], b[inverse[t*k + j]]> (0 for rows at and past
    num_valid, if given)."""
    num_tokens, d = a.shape
    k = b.shape[0] // num_tokens
    if _use_triton(a):
        dots = torch.empty(num_tokens, k, device=a.device, dtype=torch.float32)
        k_pad = triton.next_power_of_2(k)
        block = max(16, min(triton.next_power_of_2(d), 4096 // k_pad))
        _row_dots_kernel[(num_tokens,)](a.contiguous(), b.contiguous(), inverse.contiguous(), dots,
                                        num_valid if num_valid is not None else inverse, d,
                                        K=k, K_PAD=k_pad, HAS_NV=num_valid is not None, BLOCK=block)
        return dots
    gathered = b[inverse].view(num_tokens, k, d)
    valid = _valid_rows(inverse, num_valid, k)
    if valid is not None:
        gathered = torch.where(valid, gathered, 0.0)
    return (a.unsqueeze(1) * gathered).sum(dim=-1).float()


def swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """[N, 2f] -> [N, f]: silu(gate) * up with gate, up = h.chunk(2, -1)."""
    n, two_f = h.shape
    f = two_f // 2
    if _use_triton(h):
        act = h.new_empty(n, f)
        _swiglu_fwd_kernel[(n, triton.cdiv(f, _block(f)))](h.contiguous(), act, f, BLOCK=_block(f))
        return act
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_bwd(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gradient of swiglu_fwd with respect to h: [N, f], [N, 2f] -> [N, 2f]."""
    n, f = grad.shape
    if _use_triton(h):
        grad_h = torch.empty_like(h)
        _swiglu_bwd_kernel[(n, triton.cdiv(f, _block(f)))](grad.contiguous(), h.contiguous(), grad_h, f,
                                                          BLOCK=_block(f))
        return grad_h
    gate, up = h.chunk(2, dim=-1)  # the same products autograd forms for F.silu(gate) * up
    return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)


# --------------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------------
class _PermuteTokens(torch.autograd.Function):
    """Forward: each token row to its k sorted rows. Backward: the sum of its k rows' gradients."""

    @staticmethod
    def forward(ctx, x, inverse, k, num_valid):
        ctx.save_for_backward(inverse, num_valid)
        ctx.k = k
        return scatter_rows(x, inverse, None, k, num_valid)

    @staticmethod
    def backward(ctx, grad):  # grad: [T*k, d]
        inverse, num_valid = ctx.saved_tensors
        return gather_sum(grad.contiguous(), inverse, None, ctx.k, num_valid), None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    """Forward: the weighted sum of each token's k sorted rows. Backward: the output gradient scaled by
    each weight, back to the sorted rows; the weights' gradient is <grad_out[t], y_sorted[row]>."""

    @staticmethod
    def forward(ctx, y_sorted, inverse, weights, num_valid):
        ctx.save_for_backward(y_sorted, inverse, weights, num_valid)
        return gather_sum(y_sorted, inverse, weights, weights.shape[1], num_valid)

    @staticmethod
    def backward(ctx, grad):  # grad: [T, d]
        y_sorted, inverse, weights, num_valid = ctx.saved_tensors
        grad = grad.contiguous()
        k = weights.shape[1]
        grad_y = scatter_rows(grad, inverse, weights, k, num_valid) if ctx.needs_input_grad[0] else None
        grad_w = row_dots(grad, y_sorted, inverse, num_valid) if ctx.needs_input_grad[2] else None
        return grad_y, None, grad_w, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu_fwd(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_bwd(grad.contiguous(), h)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """order [N] (sorted row -> assignment) -> inverse [N] (assignment -> sorted row), the index permute_tokens
    and unpermute_combine take."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def combine_expert_rows(y_rows: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
                        num_tokens: int) -> torch.Tensor:
    """Expert choice's combine: y_rows [R, d], the rows of tokens[R] through their experts, weighted by weights
    (R values) and added into their tokens -> [num_tokens, d] in y_rows' dtype. Summed in fp32, as the
    token-choice combine; index_add, whose backward is the gather (a token taken by several experts gets the
    sum of their gradients)."""
    contrib = y_rows.float() * weights.reshape(-1, 1)  # [R, d]
    out = torch.zeros(num_tokens, y_rows.shape[-1], device=y_rows.device, dtype=torch.float32)
    return out.index_add(0, tokens, contrib).to(y_rows.dtype)


def permute_tokens(x: torch.Tensor, inverse: torch.Tensor, k: int,
                   num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, d] -> [T*k, d] in expert order: row inverse[t*k + j] is a copy of x[t] (rows at and past
    num_valid, if given, are undefined and get no gradient)."""
    return _PermuteTokens.apply(x, inverse, k, num_valid)


def unpermute_combine(y_sorted: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor,
                      num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_sorted [T*k, d], weights [T, k] (fp32) -> [T, d]: out[t] = sum_j weights[t, j] * y_sorted[inverse[t*k + j]],
    in y_sorted's dtype (fp32 accumulation on CUDA); rows at and past num_valid (if given) count as zeros."""
    return _UnpermuteCombine.apply(y_sorted, inverse, weights, num_valid)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[N, 2f] -> [N, f]: silu(h[:, :f]) * h[:, f:]."""
    return _SwiGLU.apply(h)
