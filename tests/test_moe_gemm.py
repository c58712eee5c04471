"""moe_gemm's Triton grouped GEMMs under Triton's interpreter on the CPU, against float64 per-group matmuls:
grouped_mm (both weight layouts, fp32 and bf16), grouped_mm_wgrad (overwrite and accumulate into fp32) and
the GroupedLinear autograd function; the torch fallback where the kernels do not run; and on CUDA the
compiled kernels, against float64, with no host sync.

Triton runs a kernel interpreted only if TRITON_INTERPRET=1 when triton itself is imported (its own
tl.sum, tl.cumsum... are jit functions too), so test_kernels_under_the_interpreter runs this file again in
a subprocess with that variable set; there the kernel tests run and the others skip (and in a plain run,
the reverse). The interpreter needs triton >= 3.9: triton 3.6's interpreter under numpy 2 fails on any loop
with runtime bounds, which the kernels have (the subprocess then skips, saying so).

Tolerances. fp32: the reference is exact in float64 and the kernel sums at most 64 fp32 products, so
rtol = atol = 1e-5 is some 30 times the expected rounding. bf16 inputs: the reference takes the same
bf16 values, so only the fp32 sum and the output's rounding differ; fp32 outputs (wgrad) keep the fp32
tolerance, bf16 outputs are within one bf16 ulp (rtol 2^-7): the interpreter's fp32 -> bf16 cast truncates
(measured; on the GPU it rounds to nearest, within half an ulp).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_without_host_sync

ROOT = Path(__file__).resolve().parent.parent
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in test_kernels_under_the_interpreter's "
                                                              "subprocess (TRITON_INTERPRET=1)")
NOT_HERE = "moe_gemm runs its kernels under TRITON_INTERPRET=1"
not_in_interpreter = pytest.mark.skipif(INTERPRETING, reason=NOT_HERE)


@pytest.mark.multiprocess
@not_in_interpreter
def test_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-20000:] + p.stderr[-5000:]
    if not re.search(r"\d+ passed", p.stdout):
        reasons = [r for r in re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", p.stdout) if r != NOT_HERE]
        pytest.skip(reasons[0] if reasons else p.stdout[-2000:])


def _load_moe_gemm(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "moe_gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interpreter_runs_runtime_loops() -> bool:
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out, n):
        acc = 0
        for _ in tl.range(0, n, 2):
            acc += 1
        tl.store(out, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 5)
    except Exception:  # triton 3.6 + numpy 2: InterpreterError(TypeError('only 0-dimensional arrays ...'))
        return False
    return int(out) == 3


@pytest.fixture(scope="module")
def interpreted():
    """moe_gemm with its kernels under Triton's interpreter (this process has TRITON_INTERPRET=1)."""
    triton = pytest.importorskip("triton")
    if not _interpreter_runs_runtime_loops():
        pytest.skip(f"triton {triton.__version__}'s interpreter fails on loops with runtime bounds "
                    "(numpy 2); the interpreter tests need triton >= 3.9")
    import moe_gemm
    assert moe_gemm._INTERPRET
    return moe_gemm


def _small_tiles(module):
    """16-wide tiles, so that the small groups here span several row tiles and row steps."""
    return module.GemmConfig(16, 16, 16, num_warps=1, num_stages=1)


# Groups of the hand-made case: an empty first group, one smaller than a 16-row tile, one of 3 tiles (the last
# partial), one of exactly a tile, an empty one in the middle; 9 rows after ends[-1] belong to no group.
HAND_SIZES = [0, 3, 37, 16, 0, 20]
TAIL = 9


def _random_sizes(seed: int, groups: int = 6) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (groups,), generator=g)
    sizes[torch.randperm(groups, generator=g)[:2]] = 0  # two empty groups, anywhere (last included)
    return sizes.tolist()


def _ends(sizes: list) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


def _poisoned_rows(rows: int, cols: int, valid: int, dtype, g) -> torch.Tensor:
    """[rows, cols] random, rows at and past `valid` NaN: a kernel that reads them spreads the NaN."""
    t = torch.randn(rows, cols, generator=g).to(dtype)
    t[valid:] = float("nan")
    return t


def _reference_mm(x, w, ends) -> torch.Tensor:
    """float64 [ends[-1], N]: each group's rows times its weight."""
    bounds = [0] + ends.tolist()
    return torch.cat([x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])


def _reference_wgrad(x, dy, ends) -> torch.Tensor:
    """float64 [E, K, N]: x[group]^T @ dy[group], zero for an empty group."""
    bounds = [0] + ends.tolist()
    return torch.stack([x[a:b].double().T @ dy[a:b].double() for a, b in zip(bounds, bounds[1:])])


def _tolerance(dtype) -> dict:
    return dict(rtol=2 ** -7, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


SIZES = pytest.mark.parametrize("sizes", [HAND_SIZES, _random_sizes(1), _random_sizes(2)],
                                ids=["hand", "random1", "random2"])


@SIZES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["stored", "transposed"])
@in_interpreter
def test_grouped_mm_matches_float64(interpreted, sizes, dtype, layout):
    K, N = 40, 24  # neither a multiple of the 16-wide tiles: the K and N masks are exercised too
    g = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    ends = _ends(sizes)
    valid = int(ends[-1])
    x = _poisoned_rows(valid + TAIL, K, valid, dtype, g)
    if layout == "stored":
        w = torch.randn(len(sizes), K, N, generator=g).to(dtype)                     # [E, K, N]
    else:  # dX's operand: W^T as a view of [E, N, K]
        w = torch.randn(len(sizes), N, K, generator=g).to(dtype).transpose(-2, -1)  # [E, K, N], K contiguous
    y = torch.full((valid + TAIL, N), float("nan"), dtype=dtype)
    assert interpreted.grouped_mm(x, w, ends, _small_tiles(interpreted), out=y) is y
    assert torch.isnan(y[valid:]).all(), "rows at and past ends[-1] must stay unwritten"
    assert not torch.isnan(y[:valid]).any(), "every row below ends[-1] must be written, from its own group only"
    torch.testing.assert_close(y[:valid].double(), _reference_mm(x, w, ends), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@in_interpreter
def test_grouped_mm_with_the_gpu_config(interpreted, dtype):
    """The default config (128-row tiles for bf16): every group is smaller than one tile."""
    g = torch.Generator().manual_seed(3)
    K, N, ends = 64, 48, _ends(HAND_SIZES)
    valid = int(ends[-1])
    x = _poisoned_rows(valid + TAIL, K, valid, dtype, g)
    w = torch.randn(len(HAND_SIZES), K, N, generator=g).to(dtype)
    y = interpreted.grouped_mm(x, w, ends)
    assert y.shape == (valid + TAIL, N) and y.dtype == dtype
    torch.testing.assert_close(y[:valid].double(), _reference_mm(x, w, ends), **_tolerance(dtype))


@SIZES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
@in_interpreter
def test_grouped_mm_wgrad_matches_float64(interpreted, sizes, dtype, accumulate):
    K, N = 40, 24
    g = torch.Generator().manual_seed(7 + sum(sizes))
    ends = _ends(sizes)
    valid = int(ends[-1])
    x = _poisoned_rows(valid + TAIL, K, valid, dtype, g)
    dy = _poisoned_rows(valid + TAIL, N, valid, dtype, g)
    before = torch.randn(len(sizes), K, N, generator=g) if accumulate else \
        torch.full((len(sizes), K, N), float("nan"))  # overwrite: every element, empty groups too, is written
    out = before.clone()
    assert interpreted.grouped_mm_wgrad(x, dy, ends, out, accumulate, _small_tiles(interpreted)) is out
    expected = _reference_wgrad(x, dy, ends) + (before.double() if accumulate else 0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    empty = [e for e, s in enumerate(sizes) if s == 0]
    if accumulate:  # an empty group's gradient is left exactly as it was
        assert torch.equal(out[empty], before[empty])
    else:
        assert (out[empty] == 0).all()


@in_interpreter
def test_grouped_mm_wgrad_with_the_gpu_config(interpreted):
    g = torch.Generator().manual_seed(4)
    K, N, ends = 64, 48, _ends(HAND_SIZES)
    valid = int(ends[-1])
    x = _poisoned_rows(valid + TAIL, K, valid, torch.bfloat16, g)
    dy = _poisoned_rows(valid + TAIL, N, valid, torch.bfloat16, g)
    before = torch.randn(len(HAND_SIZES), K, N, generator=g)
    out = interpreted.grouped_mm_wgrad(x, dy, ends, before.clone(), accumulate=True)
    torch.testing.assert_close(out.double(), _reference_wgrad(x, dy, ends) + before.double(), rtol=1e-5, atol=1e-5)


def _grouped_linear_case(module, dtype, config_sizes):
    """GroupedLinear's output, dX, main_grad and callback count against float64 autograd of the per-group
    matmuls; main_grad starts as a random fp32 gradient (the accumulation of earlier microbatches)."""
    K, N = 32, 24
    g = torch.Generator().manual_seed(11)
    ends = _ends(config_sizes)
    valid = int(ends[-1])
    x = _poisoned_rows(valid + TAIL, K, valid, dtype, g).requires_grad_(True)
    w = torch.randn(len(config_sizes), K, N, generator=g).to(dtype).requires_grad_(True)  # the compute copy
    grad_y = _poisoned_rows(valid + TAIL, N, valid, dtype, g)  # the undefined rows' gradient too
    main_grad = torch.randn(len(config_sizes), K, N, generator=g)
    before = main_grad.clone()
    calls = []
    y = module.grouped_linear(x, w, ends, main_grad, lambda: calls.append(main_grad.clone()))
    y.backward(grad_y)

    x64 = x.detach()[:valid].double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = _reference_mm(x64, w64, ends)
    y64.backward(grad_y[:valid].double())
    tol = _tolerance(dtype)
    torch.testing.assert_close(y[:valid].detach().double(), y64.detach(), **tol)
    torch.testing.assert_close(x.grad[:valid].double(), x64.grad, **tol)
    torch.testing.assert_close(main_grad.double(), before.double() + w64.grad, rtol=1e-5, atol=1e-5)
    assert w.grad is None, "the weight's gradient goes to main_grad only"
    assert len(calls) == 1 and torch.equal(calls[0], main_grad), "on_grad_ready: once, after the accumulation"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@in_interpreter
def test_grouped_linear_matches_autograd(interpreted, dtype):
    _grouped_linear_case(interpreted, dtype, HAND_SIZES)


@not_in_interpreter
def test_grouped_linear_falls_back_to_torch_on_the_cpu():
    """Not interpreted and on the CPU (no Triton kernel can run): torch._grouped_mm does the three products."""
    import moe_gemm
    _grouped_linear_case(moe_gemm, torch.float32, HAND_SIZES)


@not_in_interpreter
def test_imports_and_falls_back_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _load_moe_gemm("moe_gemm_without_triton")
    assert module.triton is None and module.bench_variants([torch.zeros(1, 1)], [], [], None, 1) == {}
    g = torch.Generator().manual_seed(5)
    ends = _ends([4, 0, 8])
    x, w = torch.randn(14, 8, generator=g), torch.randn(3, 8, 4, generator=g)
    torch.testing.assert_close(module.grouped_mm(x, w, ends)[:12].double(), _reference_mm(x, w, ends),
                               **_tolerance(x.dtype))


@in_interpreter
def test_bench_variants_pass_the_bench_check(interpreted):
    """bench_grouped_gemm's wiring at a small size: every Triton variant's products against torch._grouped_mm
    (bf16 on the CPU) through the bench's own correctness check."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_grouped_gemm
    g = torch.Generator().manual_seed(6)
    ends = _ends(HAND_SIZES)
    M, K, N, E = int(ends[-1]), 32, 48, 6  # the bench's groups cover every row
    xs = [torch.randn(M, K, generator=g).bfloat16()]
    gs = [torch.randn(M, N, generator=g).bfloat16()]
    w_n = [torch.randn(E, K, N, generator=g).bfloat16()]
    variants = {"grouped": {"fwd": [lambda: torch._grouped_mm(xs[0], w_n[0], offs=ends)],
                            "dX": [lambda: torch._grouped_mm(gs[0], w_n[0].transpose(-2, -1), offs=ends)],
                            "dW": [lambda: torch._grouped_mm(xs[0].t(), gs[0], offs=ends)]}}
    variants.update(interpreted.bench_variants(xs, gs, w_n, ends, 1))
    errors = bench_grouped_gemm.check_variants(variants, ends)
    assert {v for v, _ in errors} == {"triton", "triton BN=256", "triton dW accumulate fp32"}
    assert max(errors.values()) < 1e-2


on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="the compiled kernels need CUDA")


@on_cuda
@pytest.mark.parametrize("config", ["default", "wide"])
def test_compiled_kernels_match_float64_without_a_host_sync(config):
    """On the GPU, with groups of a few hundred rows: the forward (weights as stored), dX (their transposed
    view) and the accumulating wgrad, run a second time (after compiling) under
    torch.cuda.set_sync_debug_mode("error"), where a host sync raises (helpers.run_without_host_sync). bf16 outputs round to nearest on the
    GPU: within half an ulp, 2^-8, plus the fp32 sum's rounding."""
    pytest.importorskip("triton")
    import moe_gemm
    cfg = moe_gemm.BF16_CONFIG if config == "default" else moe_gemm.BF16_WIDE_CONFIG
    g = torch.Generator().manual_seed(8)
    sizes = [0, 100, 700, 128, 0, 1301, 5, 0]
    ends = _ends(sizes)
    valid = int(ends[-1])
    K, N, E = 512, 384, len(sizes)
    x = _poisoned_rows(valid + 300, K, valid, torch.bfloat16, g)
    dy = _poisoned_rows(valid + 300, N, valid, torch.bfloat16, g)
    w = (torch.randn(E, K, N, generator=g) * 0.05).bfloat16()
    before = torch.randn(E, K, N, generator=g)
    xc, dyc, wc, endsc = x.cuda(), dy.cuda(), w.cuda(), ends.cuda()

    # Buffers made before the checked run: a copy from the host is itself a sync there (clones are not).
    y0 = torch.full((valid + 300, N), float("nan"), dtype=torch.bfloat16).cuda()
    main_grad0 = before.cuda()

    def products():
        y, main_grad = y0.clone(), main_grad0.clone()
        moe_gemm.grouped_mm(xc, wc, endsc, cfg, out=y)
        dx = moe_gemm.grouped_mm(dyc, wc.transpose(-2, -1), endsc, cfg)  # W^T: N is the contiguous dim
        moe_gemm.grouped_mm_wgrad(xc, dyc, endsc, main_grad, True, cfg)
        return y, dx, main_grad

    y, dx, main_grad = run_without_host_sync(products)
    y, dx, main_grad = y.cpu(), dx.cpu(), main_grad.cpu()
    assert torch.isnan(y[valid:]).all() and not torch.isnan(y[:valid]).any()
    bf16 = dict(rtol=2 ** -8 + 1e-4, atol=1e-4)
    torch.testing.assert_close(y[:valid].double(), _reference_mm(x, w, ends), **bf16)
    torch.testing.assert_close(dx[:valid].double(), _reference_mm(dy, w.transpose(-2, -1), ends), **bf16)
    # fp32 sums of up to 1301 products of size ~1, partial sums ~36: a random walk of roundings of 2^-19
    # each, ~7e-5 typical, a few times that at worst over 1.5M elements; a wrong row would add ~1.
    torch.testing.assert_close(main_grad.double(), _reference_wgrad(x, dy, ends) + before.double(),
                               rtol=1e-5, atol=1e-3)
