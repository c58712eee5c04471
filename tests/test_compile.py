"""The compiled path. torch 2.11's compile routes the gradient of an autograd.Function to the wrong output when
its forward mutates a tensor in place (pytorch/pytorch#180642): TP under --compile trained with wrong
gradients over NCCL, and so did one GPU (the MoE permutation). CI's torch does not have that bug, so the
first test checks the cause itself, on any torch: no autograd function of ours runs an in-place op in its
forward or backward. Then: the profiler's ranges cause no recompilation, and TP2 compiled and profiled
trains as one eager process."""
from __future__ import annotations


import pytest
import torch


from helpers import _base_argv, _launch, _load_trace, assert_same_run


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process (the TP autograd functions need a group to run)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _in_place_ops(fn) -> list:
    """The in-place (or out=) ops that fn() dispatches: a mutable schema or an aten/c10d name ending in '_'
    (c10d's allreduce_ does not mark its schema mutable)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.is_mutable or func._schema.name.split("::")[-1].endswith("_"):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.seen


def test_autograd_functions_run_no_in_place_op(one_rank_group):
    import moe_ops
    import parallel
    g = torch.Generator().manual_seed(0)
    T, k, d, V = 6, 2, 8, 10
    inverse = torch.randperm(T * k, generator=g)

    def case(fn, *shapes):
        inputs = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]

        def forward_and_backward():
            out = fn(*inputs)
            torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=g))
        return forward_and_backward

    cases = {
        parallel._CopyToTP: case(lambda x: parallel._CopyToTP.apply(x, one_rank_group.group_name), (T, d)),
        parallel._ReduceFromTP: case(lambda x: parallel._ReduceFromTP.apply(x, one_rank_group.group_name), (T, d)),
        parallel._VocabParallelCrossEntropy: case(lambda z: parallel._VocabParallelCrossEntropy.apply(
            z, torch.randint(0, V, (T,), generator=g), 0, one_rank_group.group_name), (T, V)),
        parallel._SplitToTP: case(lambda x: parallel._SplitToTP.apply(x, 0, 1, one_rank_group.group_name), (T, d)),
        parallel._GatherFromTP: case(lambda x: parallel._GatherFromTP.apply(x, 0, 1, one_rank_group.group_name), (T, d)),
        parallel._AllToAll: case(lambda x: parallel._AllToAll.apply(x, [T], [T], one_rank_group.group_name), (T, d)),
        moe_ops._PermuteTokens: case(lambda x: moe_ops.permute_tokens(x, inverse, k), (T, d)),
        moe_ops._UnpermuteCombine: case(lambda y, w: moe_ops.unpermute_combine(y, inverse, w), (T * k, d), (T, k)),
        moe_ops._SwiGLU: case(moe_ops.swiglu, (T, 2 * d)),
    }
    ours = {c for m in (parallel, moe_ops) for c in vars(m).values()
            if isinstance(c, type) and issubclass(c, torch.autograd.Function) and c.__module__ == m.__name__}
    assert ours == set(cases), "a new autograd function needs a case here"
    for cls, run in cases.items():
        assert _in_place_ops(run) == [], cls.__name__


def test_named_ranges_change_nothing_that_torch_compile_compiles():
    """Switching the profiler's ranges on must not recompile: code that torch.compile traces never reads
    the switch (a guard on it recompiled the model inside the traced window)."""
    from torch._dynamo.testing import CompileCounter
    import profiling
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def f(x):
        with profiling.phase("moe/router"):
            return x * 2

    torch._dynamo.reset()
    try:
        for on in (False, True, False, True):
            profiling.set_enabled(on)
            f(torch.ones(3))
    finally:
        profiling.set_enabled(False)
        torch._dynamo.reset()
    assert counter.frame_count == 1


@pytest.mark.multiprocess
def test_tp2_compiled_and_profiled_matches_one_eager_process(tmp_path):
    """The path users take for speed (TP2 + --compile), also profiled: the same losses, gradient norms and
    parameters as one eager process, and no compilation inside the recorded steps. With --log-interval 3
    the logging steps (which record statistics, a guarded switch) and the others compile apart: steps 1
    and 2 compile both, the window is steps 3-5 and holds logging steps 3 and 5."""
    argv = _base_argv("mixed") + ["--max-steps", "5", "--log-interval", "3", "--moe-metrics", "brief"]
    (tmp_path / "ref").mkdir()
    ref = _launch(1, argv, tmp_path / "ref")
    got = _launch(2, argv + ["--tensor-parallel-size", "2", "--compile", "--profile", "--profile-wait", "1",
                             "--profile-warmup", "1", "--profile-steps", "3"], tmp_path, timeout=600)
    assert [r["step"] for r in ref["records"]] == [1, 3, 5]
    assert_same_run(got, ref)
    traces = sorted((tmp_path / "run" / "traces").iterdir())
    assert [p.name for p in traces] == ["trace_rank0_step3.json", "trace_rank1_step3.json"]
    for path in traces:
        names = {e["name"] for e in _load_trace(path) if e.get("ph") == "X"}
        assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3",
                                                                       "ProfilerStep#4"}
        compiling = sorted(n for n in names if n.endswith("(dynamo_timed)"))
        assert not compiling, f"{path.name} holds compilation: {compiling[:5]}"
