"""--recompute none|attention|moe|block (activation checkpointing, model.recomputed): every mode trains as `none`
does (losses, gradient norms, parameters, MoE statistics, bias-balanced expert biases), with dropout and router
jitter drawing the same noise in the recomputation; the recomputed forward counts no token twice; the part
really is recomputed in the backward and its activations are not kept; and the same holds under TP/EP, PP
(1F1B), DP and torch.compile (the partitioner's recomputation, and eager checkpointing where a region does
not trace whole)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import minimal_pretrain
import moe_layers
from model import GPT, MLP, RECOMPUTE_MODES, Attention, compile_model, recomputed
from moe_layers import SparseMoE
from moe_stats import StepStats
from parallel import Topology

from helpers import (REL_TOL, _close, _detailed_argv, _run_against_one_process, assert_same_run, run_ranks,
                     tiny_cfg)

MODULE = Path(__file__).stem  # the worker subprocesses import this file by name

MODES = [m for m in RECOMPUTE_MODES if m != "none"]
NOISE = ["--dropout", "0.1", "--moe-input-jitter-eps", "0.1"]  # the recomputation must draw the same noise
BIAS = ["--moe-bias-update-rate", "1e-2"]  # aux-loss-free balancing: its step load must count every token once
TIMING = {"tokens_per_sec", "elapsed_s", "mfu"}


def _train(argv: list, monkeypatch) -> dict:
    """One in-process run, as helpers._dist_worker saves it."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    r = minimal_pretrain.train(minimal_pretrain.parse_args(argv), return_state=True)
    return {"losses": r.losses, "grad_norms": [x["grad_norm"] for x in r.records], "state": r.state_dict,
            "records": r.records}


def assert_same_statistics(got: dict, ref: dict, other_layout: bool = False) -> None:
    """Every logged MoE metric of every step: the count matrices exactly, the rest to REL_TOL. other_layout: not
    the overload factors and the EP ranks' received rows, which depend on the EP size and the schedule, nor which
    experts the top/bottom-5
    utilisation keys name, which ties decide (test_stats checks both under layouts)."""
    assert len(got["records"]) == len(ref["records"]) == 3
    for g, r in zip(got["records"], ref["records"]):
        skip = TIMING | ({k for k in r.keys() | g.keys() if "_overload_factor" in k or k.startswith("moe_expert_")
                          or k == "moe/ep_received_tokens"} if other_layout else set())
        assert g.keys() - skip == r.keys() - skip and "moe/counts" in r, sorted(r)
        for key, want in r.items():
            if key in skip:
                continue
            if isinstance(want, float):
                assert _close(g[key], want), f"step {r['step']} {key}: {g[key]} vs {want}"
            else:
                assert g[key] == want, f"step {r['step']} {key}: {g[key]} vs {want}"


# --------------------------------------------------------------------------------------------------
# One process, eager
# --------------------------------------------------------------------------------------------------
CASES = {  # the mixed D M D M model of _detailed_argv, dropout and jitter on
    "token-choice": NOISE + BIAS + ["--moe-capacity-factor", "1.0"],  # with drops, so their statistics count too
    "expert-choice": NOISE + ["--moe-routing", "expert-choice"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_trains_as_none(case, tmp_path, monkeypatch, one_thread):
    argv = _detailed_argv(CASES[case])
    ref = _train(argv + ["--output-dir", str(tmp_path / "none")], monkeypatch)
    assert any(r["moe/drop_rate"] > 0 for r in ref["records"])  # capacity: tokens are dropped in both cases
    for mode in MODES:
        got = _train(argv + ["--recompute", mode, "--output-dir", str(tmp_path / mode)], monkeypatch)
        assert_same_run(got, ref)  # the parameters include the expert biases
        assert_same_statistics(got, ref)
    if case == "token-choice":  # the biases moved, and their statistics are among those compared
        assert any(v.abs().max() > 0 for k, v in ref["state"].items() if k.endswith("expert_bias"))
        assert all("moe/bias_abs_mean" in r for r in ref["records"])


def _microbatches(routing: str, mode: str) -> dict:
    """Two microbatches' forward and backward of a 2-layer all-MoE GPT with statistics on, as the trainer
    runs them (end_microbatch after each forward): what the MoE layers counted, and what they left behind."""
    extra = {"moe_bias_update_rate": 1e-2} if routing == "token-choice" else {}
    cfg = tiny_cfg(num_layers=2, moe_layer_interval=1, dropout=0.1, moe_input_jitter_eps=0.1, moe_routing=routing,
                   **extra)
    model = GPT(cfg, Topology(), recompute=mode)
    model.init_weights(0)
    stats = StepStats(model.moe_layers(), top_k=2)
    torch.manual_seed(0)
    left = []
    for _ in range(2):
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        loss, moe_loss = model(ids, ids)
        stats.end_microbatch()
        (loss + moe_loss).backward()
        left.append([moe.last_routing is not None for moe in model.moe_layers().values()])
    loads = [moe.step_load.clone() for moe in model.moe_layers().values() if moe.step_load is not None]
    counts, losses = stats.per_microbatch()
    return {"loads": loads, "counts": counts, "losses": losses, "left": left,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _assert_counted_once(routing: str) -> None:
    ref = _microbatches(routing, "none")
    assert ref["left"] == [[False, False]] * 2  # end_microbatch took every record
    for mode in MODES:
        got = _microbatches(routing, mode)
        assert got["left"] == ref["left"], f"{mode}: the recomputation left a routing record"
        for a, b in zip(got["loads"], ref["loads"]):
            assert torch.equal(a, b), f"{mode}: step load {a.tolist()} vs {b.tolist()}"
        assert torch.equal(got["counts"], ref["counts"]) and torch.equal(got["losses"], ref["losses"]), mode
        for name, g in ref["grads"].items():  # the same noise in the recomputation: the same gradient
            assert torch.equal(got["grads"][name], g), f"{mode}: {name}"


@pytest.mark.parametrize("routing", ["token-choice", "expert-choice"])
def test_recomputed_forward_counts_nothing_twice(routing):
    """The step load that bias balancing consumes and the statistics' records are those of the forward alone.
    (The trainer-level test above cannot see a second count: doubling every load leaves sign(mean - load), the
    bias update, as it is, and the next forward replaces a record the recomputation left.)"""
    _assert_counted_once(routing)


@pytest.mark.parametrize("routing", ["token-choice", "expert-choice"])
def test_counted_once_check_detects_a_recomputation_that_counts(routing, monkeypatch):
    """Negative control for the test above: with the recomputation taken for a first forward, the step load
    doubles (token choice) and a routing record is left behind after the backward."""
    monkeypatch.setattr(moe_layers, "in_recomputation", lambda: False)
    with pytest.raises(AssertionError, match="step load|left a routing record"):
        _assert_counted_once(routing)


def _calls_and_saved_bytes(mode: str) -> tuple[Counter, Counter, int]:
    """(forward calls during the forward, calls during the backward, per module kind; bytes of the activations
    autograd keeps outside the recomputed parts) of one training step's forward and backward of the mixed D M D M
    model."""
    cfg = tiny_cfg(num_layers=4, moe_layer_interval=2, hidden_size=32, max_seq_length=32)
    model = GPT(cfg, Topology(), recompute=mode)
    model.init_weights(0)
    calls = {"forward": Counter(), "backward": Counter()}
    phase = ["forward"]
    for module in model.modules():
        if isinstance(module, (Attention, MLP, SparseMoE)):
            # a pre-hook: the recomputation stops as soon as it has what the backward needs (checkpoint's early
            # stop), inside the part's last module, whose forward then never returns
            module.register_forward_pre_hook(lambda m, _: calls[phase[0]].update([type(m).__name__]))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage -> bytes: the activations kept for the backward, each once, the parameters not

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # a checkpointed part saves through its own
        loss, moe_loss = model(ids, ids)
    phase[0] = "backward"
    (loss + moe_loss).backward()
    return calls["forward"], calls["backward"], sum(saved.values())


def test_recompute_reruns_its_part_in_the_backward_and_keeps_less():
    """Each mode runs its part's modules once more, in the backward (moe: not the dense layers' MLPs), and keeps
    fewer bytes of activations for the backward than none: block least, only what lies outside the layers."""
    fwd, bwd, saved = {}, {}, {}
    for mode in RECOMPUTE_MODES:
        fwd[mode], bwd[mode], saved[mode] = _calls_and_saved_bytes(mode)
    layers = Counter({"Attention": 4, "MLP": 2, "SparseMoE": 2})
    assert all(fwd[m] == layers for m in RECOMPUTE_MODES), fwd
    assert bwd["none"] == Counter()
    assert bwd["attention"] == Counter({"Attention": 4})
    assert bwd["moe"] == Counter({"SparseMoE": 2})  # the dense layers' MLPs are not recomputed
    assert bwd["block"] == layers
    assert saved["attention"] < saved["none"] and saved["moe"] < saved["none"]
    assert saved["block"] < min(saved["attention"], saved["moe"]) and saved["block"] < saved["none"] / 4, saved


def _dropout_times_input(x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x, 0.5, training=True) * x  # d/dx = 2 * mask * scale * x = 2 y / x: needs the same mask


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_recomputation_draws_the_same_noise(compiled):
    """The backward sees the forward's dropout mask although the recomputation draws it again, eagerly (the
    RNG state is replayed) and compiled (inductor's functionalised RNG), with other draws in between."""
    torch._dynamo.reset()
    f = torch.compile(recomputed, fullgraph=True) if compiled else recomputed
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    y = f(_dropout_times_input, x)
    torch.rand(100)  # the global RNG moves on before the backward
    y.sum().backward()
    assert 0.4 < (y == 0).float().mean() < 0.6
    torch.testing.assert_close(x.grad, 2 * y.detach() / x.detach())
    torch._dynamo.reset()


def test_noise_check_detects_a_recomputation_without_the_rng_state():
    """Negative control for the test above: without the replayed RNG state the recomputed mask differs."""
    torch.manual_seed(0)
    x = torch.randn(64, 64, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(_dropout_times_input, x, use_reentrant=False, preserve_rng_state=False)
    torch.rand(100)
    y.sum().backward()
    assert not torch.allclose(x.grad, 2 * y.detach() / x.detach())


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def _compiled_microbatches(mode: str, side_effects_allowed: bool = True) -> dict:
    """Two bf16 microbatches of a D M model compiled per block as the trainer compiles it (aot_eager: the same
    graphs and partitioner as inductor, without its code generation), statistics and bias balancing on. bf16:
    the CPU's fp32 expert GEMMs run eagerly, a graph break, so only bf16 traces a MoE layer whole here.
    side_effects_allowed False undoes compile_model's dynamo option before the first call compiles."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg(num_layers=2, moe_layer_interval=2, hidden_size=32, moe_bias_update_rate=1e-2)
    model = GPT(cfg, Topology(), recompute=mode)
    model.init_weights(0)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):  # restored after
        compile_model(model, "blocks", backend="aot_eager")
        if not side_effects_allowed:
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = False
        stats = StepStats(model.moe_layers(), top_k=2)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(0)
        for _ in range(2):
            ids = torch.randint(0, cfg.vocab_size, (2, 16))
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, moe_loss = model(ids, ids)
            stats.end_microbatch()
            (loss + moe_loss).backward()
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return {"loads": [moe.step_load.clone() for moe in model.moe_layers().values()], "stats": stats.per_microbatch(),
            "grads": {n: p.grad for n, p in model.named_parameters()}, "saved": sum(saved.values()),
            "graph_breaks": breaks}


def _assert_same_microbatches(got: dict, ref: dict, tol: float = REL_TOL) -> None:
    """The same loads and statistics exactly, every gradient to `tol` relative (per tensor, as assert_same_run)."""
    assert all(torch.equal(a, b) for a, b in zip(got["loads"], ref["loads"])), (got["loads"], ref["loads"])
    assert all(torch.equal(a, b) for a, b in zip(got["stats"], ref["stats"]))
    for name, g in ref["grads"].items():
        err = ((got["grads"][name] - g).norm() / g.norm()).item()
        assert err <= tol, f"{name}: relative difference {err:.3e}"


def test_compiled_recompute_traces_whole_and_counts_once(one_thread):
    """Compiled, a recomputed part (the MoE layer's statistics included) is one checkpoint region that the
    partitioner recomputes in the backward: no graph break, less kept for the backward, the forward's loads,
    statistics and gradients. Without compile_model's dynamo option the statistics break the graph, and the
    region falls back to eager checkpointing, which counts once too (moe_layers.in_recomputation)."""
    ref = _compiled_microbatches("none")
    assert ref["graph_breaks"] == 0
    for mode in ("moe", "block"):
        got = _compiled_microbatches(mode)
        assert got["graph_breaks"] == 0, mode
        assert got["saved"] < ref["saved"], (mode, got["saved"], ref["saved"])
        _assert_same_microbatches(got, ref)
    fallback = _compiled_microbatches("block", side_effects_allowed=False)
    assert fallback["graph_breaks"] > 0
    # bf16: the MoE layer now runs as eager kernels round, not as the compiled graph does (measured 2e-3)
    _assert_same_microbatches(fallback, ref, tol=1e-2)


# --------------------------------------------------------------------------------------------------
# Layouts and the compiled trainer: gloo processes against one eager process without recompute
# --------------------------------------------------------------------------------------------------
_ONE_PROCESS = {}  # one-process runs without recompute, per case
QUIET = _detailed_argv(BIAS)  # no noise: dropout and jitter seeds differ between DP ranks and PP stages
# TP ranks draw the jitter one process draws (not the attention dropout: a rank draws its own heads' masks)
NOISY = _detailed_argv(BIAS + ["--moe-input-jitter-eps", "0.1"])
LAYOUTS = [  # (id, reference argv, world size, flags)
    ("tp2-ep2-block", "noisy", 2, ["--tensor-parallel-size", "2", "--recompute", "block"]),
    ("pp2-1f1b-moe", "quiet", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "1f1b",
                                  "--recompute", "moe"]),
    ("dp2-attention", "quiet", 2, ["--recompute", "attention"]),
    ("compiled-block", "quiet", 1, ["--compile", "--recompute", "block"]),  # CPU inductor, the trainer's scope
]


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("case,world_size,flags", [l[1:] for l in LAYOUTS], ids=[l[0] for l in LAYOUTS])
def test_layout_with_recompute_matches_one_process(case, world_size, flags, tmp_path, tmp_path_factory):
    argv = NOISY if case == "noisy" else QUIET
    ref, got = _run_against_one_process(_ONE_PROCESS, case, argv, world_size, flags, tmp_path, tmp_path_factory)
    assert_same_run(got, ref)
    assert_same_statistics(got, ref, other_layout=world_size > 1)


def _tp_all_reduce_worker(out_path: str) -> None:
    """One TP2 rank: the model's all-reduces in the forward and in the backward of one microbatch of a D M model,
    per mode (parallel.all_reduced carries every TP all-reduce of the model)."""
    import torch.distributed as dist
    import parallel
    topo = parallel.init_topology(2, 1, "cpu")
    calls, where = Counter(), ["forward"]
    plain = parallel.all_reduced

    def counted(t, group_name, op="sum"):
        calls[where[0]] += 1
        return plain(t, group_name, op)
    parallel.all_reduced = counted
    out = {}
    for mode in RECOMPUTE_MODES:
        model = GPT(tiny_cfg(num_layers=2, moe_layer_interval=2, hidden_size=32, num_key_value_heads=2), topo,
                    recompute=mode)
        model.init_weights(0)
        calls.clear()
        where[0] = "forward"
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        loss, moe_loss = model(ids, ids)
        where[0] = "backward"
        (loss + moe_loss).backward()
        out[mode] = dict(calls)
    Path(f"{out_path}.{topo.rank}").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_tp_recomputation_repeats_only_the_all_reduces_it_needs(tmp_path):
    """Under TP the recomputation runs on every rank alike and stops once it has what the backward needs, so a
    part's closing all-reduce is not repeated: attention and moe add none, block one per layer (the attention
    projection's, whose output the feed-forward part's recomputation needs). Forward: the embedding's, 2 per
    layer, 3 for the cross-entropy; backward: 2 per dense layer, 3 per MoE layer, 1 for the LM head."""
    run_ranks(2, MODULE, "_tp_all_reduce_worker", [str(tmp_path / "calls")], timeout=180)
    for rank in range(2):
        calls = json.loads((tmp_path / f"calls.{rank}").read_text())
        assert calls == {"none": {"forward": 8, "backward": 6}, "attention": {"forward": 8, "backward": 6},
                         "moe": {"forward": 8, "backward": 6}, "block": {"forward": 8, "backward": 8}}, calls
