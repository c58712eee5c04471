"""The MoE layer's permutation, combine and SwiGLU as autograd functions (moe_ops.py): the outputs and gradients
of the plain indexing formulas they replace, exactly in fp32 on the CPU; the Triton kernels against the
torch formulas on CUDA."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from moe_layers import SparseMoE

from helpers import make_moe, skewed_router_case


def _routing_case(T: int, k: int, E: int, seed: int):
    """A random routing: order sorts the T*k assignments by expert (stable), inverse is its inverse."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, E, (T * k,), generator=g)
    order = torch.argsort(expert, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T * k)
    return order, inverse, g


def _grads(fn, inputs, grad_out):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("T,d,k", [(13, 8, 2), (9, 16, 3), (5, 4, 1)])
def test_permute_tokens_matches_indexing(T, d, k):
    from moe_ops import permute_tokens
    order, inverse, g = _routing_case(T, k, 4, seed=T)
    x = torch.randn(T, d, generator=g)
    grad = torch.randn(T * k, d, generator=g)
    out, (dx,) = _grads(lambda x: permute_tokens(x, inverse, k), [x], grad)
    ref, (dx_ref,) = _grads(lambda x: x[order // k], [x], grad)  # the former gather, atomic backward
    assert torch.equal(out, ref)
    if k <= 2:  # the sum over a token's k rows is then the same fp32 addition in any order
        assert torch.equal(dx, dx_ref)
    else:
        torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    # Independent check of the backward: token t's gradient is the sum of its k sorted rows.
    by_hand = torch.stack([sum(grad[inverse[t * k + j]] for j in range(k)) for t in range(T)])
    torch.testing.assert_close(dx, by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,d,k", [(13, 8, 2), (9, 16, 3), (5, 4, 1)])
def test_unpermute_combine_matches_indexing(T, d, k):
    from moe_ops import unpermute_combine
    _, inverse, g = _routing_case(T, k, 4, seed=10 + T)
    y = torch.randn(T * k, d, generator=g)
    w = torch.rand(T, k, generator=g)
    grad = torch.randn(T, d, generator=g)
    out, (dy, dw) = _grads(lambda y, w: unpermute_combine(y, inverse, w), [y, w], grad)
    ref, (dy_ref, dw_ref) = _grads(lambda y, w: (y[inverse].view(T, k, d) * w.unsqueeze(-1)).sum(dim=1), [y, w], grad)
    assert torch.equal(out, ref) and torch.equal(dy, dy_ref) and torch.equal(dw, dw_ref)
    # By hand: row inverse[t*k + j] gets w[t, j] * grad[t]; w[t, j] gets <grad[t], y[inverse[t*k + j]]>.
    for t in range(T):
        for j in range(k):
            r = inverse[t * k + j]
            torch.testing.assert_close(dy[r], w[t, j] * grad[t], rtol=0, atol=0)
            torch.testing.assert_close(dw[t, j], (grad[t].double() @ y[r].double()).float(), rtol=1e-6, atol=1e-6)


def test_rows_past_num_valid_are_never_read():
    """Under EP (and with drops) the sorted rows past num_valid belong to no local expert and are left
    undefined by the grouped GEMM: permute, combine and their backwards must treat them as zeros even when
    they hold NaN, and match the masked reference."""
    from moe_ops import permute_tokens, unpermute_combine
    T, d, k, n_valid = 11, 8, 2, 13
    _, inverse, g = _routing_case(T, k, 4, seed=7)
    num_valid = torch.tensor([n_valid], dtype=torch.int32)
    valid = (torch.arange(T * k) < n_valid).unsqueeze(-1)  # [T*k, 1] over sorted rows
    y = torch.randn(T * k, d, generator=g)
    w = torch.rand(T, k, generator=g)
    grad = torch.randn(T, d, generator=g)
    y_nan = torch.where(valid, y, float("nan"))
    out, (dy, dw) = _grads(lambda y, w: unpermute_combine(y, inverse, w, num_valid), [y_nan, w], grad)
    ref, (dy_ref, dw_ref) = _grads(
        lambda y, w: (torch.where(valid, y, 0.0)[inverse].view(T, k, d) * w.unsqueeze(-1)).sum(dim=1), [y, w], grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6)  # no NaN from the undefined rows
    torch.testing.assert_close(dy[:n_valid], dy_ref[:n_valid], rtol=0, atol=0)

    x = torch.randn(T, d, generator=g)
    grad_sorted = torch.where(valid, torch.randn(T * k, d, generator=g), float("nan"))  # undefined past n_valid
    out, (dx,) = _grads(lambda x: permute_tokens(x, inverse, k, num_valid), [x], grad_sorted)
    assert torch.equal(out[:n_valid], x[_routing_case(T, k, 4, seed=7)[0] // k][:n_valid])
    by_hand = torch.stack([sum(grad_sorted[inverse[t * k + j]] if inverse[t * k + j] < n_valid else torch.zeros(d)
                               for j in range(k)) for t in range(T)])
    torch.testing.assert_close(dx, by_hand, rtol=1e-6, atol=1e-6)


def test_swiglu_matches_autograd_of_silu_times_up():
    from moe_ops import swiglu
    g = torch.Generator().manual_seed(3)
    h = 3 * torch.randn(11, 2 * 24, generator=g)
    grad = torch.randn(11, 24, generator=g)
    out, (dh,) = _grads(swiglu, [h], grad)
    ref, (dh_ref,) = _grads(lambda h: F.silu(h[:, :24]) * h[:, 24:], [h], grad)
    assert torch.equal(out, ref) and torch.equal(dh, dh_ref)


def _former_sparse_moe_forward(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """SparseMoE's forward written with plain indexing, without moe_ops (single process): an indexing gather
    with an atomic backward, masks around the experts, an indexing unsort and a broadcast weighted sum."""
    x = x.reshape(-1, x.shape[-1])
    T, k, E = x.shape[0], moe.top_k, moe.num_experts
    r = moe.router(x)
    order = torch.argsort(r.indices.reshape(-1), stable=True)
    ends = torch.cumsum(torch.bincount(r.indices.reshape(-1), minlength=E), 0).to(torch.int32)
    x_sorted = x[order // k]
    valid = (torch.arange(x_sorted.shape[0]) < ends[-1]).unsqueeze(-1)
    x_sorted = torch.where(valid, x_sorted, 0.0)
    gate, up = torch._grouped_mm(x_sorted, moe.experts.w_gate_up, offs=ends).chunk(2, dim=-1)
    y_sorted = torch.where(valid, torch._grouped_mm(F.silu(gate) * up, moe.experts.w_down, offs=ends), 0.0)
    inverse = torch.empty_like(order)
    inverse.scatter_(0, order, torch.arange(order.numel()))
    return (y_sorted[inverse].view(T, k, -1) * r.weights.unsqueeze(-1)).sum(dim=1)


@pytest.mark.parametrize("case", ["random", "idle_experts"])
def test_sparse_moe_matches_the_plain_indexing_layer_exactly(case):
    """The whole layer, forward and backward, against the plain indexing forward: bit for bit in fp32
    with k = 2 (the only reordered sum, a token's two rows, is then order-independent)."""
    if case == "random":
        moe = make_moe(d=16, f=24, E=8, k=2, seed=5)
        x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(5))
    else:
        moe, x = skewed_router_case(6, 2, [1, 4], seed=6)
    g = torch.randn(x.reshape(-1, 16).shape, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (lambda x: moe(x)[0].reshape(-1, 16), lambda x: _former_sparse_moe_forward(moe, x)):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}))
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = results
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    for name in grads_ref:
        assert torch.equal(grads[name], grads_ref[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_torch_formulas(dtype, monkeypatch):
    """Each CUDA kernel against the torch formula it replaces, on the same GPU inputs (fp32 accumulation
    in the kernels; bf16 within rounding)."""
    import moe_ops
    torch.manual_seed(0)
    T, d, k, f = 300, 200, 3, 72
    _, inverse, _ = _routing_case(T, k, 5, seed=1)
    inverse = inverse.cuda()
    x, y, w = (torch.randn(T, d, device="cuda", dtype=dtype), torch.randn(T * k, d, device="cuda", dtype=dtype),
               torch.rand(T, k, device="cuda"))
    h, gact = torch.randn(T, 2 * f, device="cuda", dtype=dtype), torch.randn(T, f, device="cuda", dtype=dtype)
    calls = [(moe_ops.scatter_rows, (x, inverse, None, k)), (moe_ops.scatter_rows, (x, inverse, w, k)),
             (moe_ops.gather_sum, (y, inverse, None, k)), (moe_ops.gather_sum, (y, inverse, w, k)),
             (moe_ops.row_dots, (x, y, inverse)), (moe_ops.swiglu_fwd, (h,)), (moe_ops.swiglu_bwd, (gact, h))]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for op, args in calls:
        got = op(*args)
        monkeypatch.setattr(moe_ops, "_use_triton", lambda t: False)
        ref = op(*(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        monkeypatch.undo()
        torch.testing.assert_close(got.double(), ref.double(), **tol, msg=str(op))
