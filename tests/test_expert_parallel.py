"""Expert parallelism over data-parallel ranks (--expert-parallel-size > TP, all-to-all token dispatch): every layout
equals one process on the same global batch (losses, gradient norms, parameters at helpers.REL_TOL) under the
softmax and sigmoid routers, with and without a capacity factor, under hash routing and expert choice, with
recompute and compiled; the load statistics are the EP group's; checkpoints resume bit-exact in the same layout
and load into any other; refused layouts are one line."""
from __future__ import annotations


import pytest
import torch

import checkpoint as ckpt
import minimal_pretrain
from moe_stats import StatsLayout, moe_metrics
from parallel import Topology, check_layout

from helpers import (REL_TOL, _assert_checkpoints_equal, _base_argv, _ckpt_dist_argv, _detailed_argv, _launch,
                     _reference, _run_against_one_process, assert_same_run)

EP2, EP4 = ["--expert-parallel-size", "2"], ["--expert-parallel-size", "4"]
TP2, PP2 = ["--tensor-parallel-size", "2"], ["--pipeline-parallel-size", "2"]
SIGMOID = ["--moe-router-score", "sigmoid"]
CAPACITY = ["--moe-capacity-factor", "1.0"]

LAYOUTS = [  # (id, world size, model, model flags (the one-process run has them too), layout flags)
    # The four layouts, each with the softmax router without capacity and the sigmoid one with it.
    ("dp2-ep2", 2, "mixed", [], EP2),
    ("dp2-ep2-sigmoid-capacity", 2, "mixed", SIGMOID + CAPACITY, EP2),
    ("dp4-ep4", 4, "all8", [], EP4),
    ("dp4-ep4-sigmoid-capacity", 4, "all8", SIGMOID + CAPACITY, EP4),
    ("tp2-dp2-ep4", 4, "mixed", [], TP2 + EP4),  # the TP ranks send disjoint halves of their tokens
    ("tp2-dp2-ep4-sigmoid-capacity", 4, "mixed", SIGMOID + CAPACITY, TP2 + EP4),
    ("pp2-dp2-ep2", 4, "mixed", [], PP2 + EP2),
    ("pp2-dp2-ep2-sigmoid-capacity", 4, "mixed", SIGMOID + ["--moe-capacity-factor", "1.25", "--moe-drop-policy",
                                                              "probs"], PP2 + EP2),
    # Two ranks hold each expert: their gradients are summed over the expert-data-parallel group.
    ("dp4-ep2", 4, "all8", [], EP2),
    # The other routers: fixed-shape expert choice (the TP ranks split every expert's slots) and hash routing.
    ("dp2-ep2-expert-choice", 2, "mixed", ["--moe-routing", "expert-choice"], EP2),
    ("tp2-dp2-ep4-expert-choice", 4, "mixed", ["--moe-routing", "expert-choice"], TP2 + EP4),
    ("dp2-ep2-hash", 2, "mixed", ["--moe-routing", "hash"], EP2),
    ("dp2-ep2-recompute", 2, "mixed", [], EP2 + ["--recompute", "block"]),  # the exchanges run again in the backward
    # Compiled (CPU inductor): the capacity path is traced whole, the no-drop exchange runs between graphs.
    ("dp2-ep2-compiled", 2, "mixed", [], EP2 + ["--compile"]),
    ("dp2-ep2-capacity-compiled", 2, "mixed", CAPACITY, EP2 + ["--compile"]),
]
_REFERENCES = {}


def _one_process(moe: str, flags: list, tmp_path_factory) -> dict:
    key = (moe, tuple(flags))
    if not flags:
        return _reference(moe, tmp_path_factory)
    if key not in _REFERENCES:
        _REFERENCES[key] = _launch(1, _base_argv(moe) + flags, tmp_path_factory.mktemp("ref_ep"))
    return _REFERENCES[key]


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("world_size,moe,model_flags,layout", [l[1:] for l in LAYOUTS], ids=[l[0] for l in LAYOUTS])
def test_all_to_all_layout_matches_one_process(world_size, moe, model_flags, layout, tmp_path, tmp_path_factory):
    ref = _one_process(moe, model_flags, tmp_path_factory)
    assert_same_run(_launch(world_size, _base_argv(moe) + model_flags + layout, tmp_path, timeout=600), ref)


# --------------------------------------------------------------------------------------------------
# Statistics: the overload factors and the received rows are the EP group's, computed here from the
# one-process run's expert counts. One microbatch per DP rank (global batch 4, micro-batch 2, DP 2): the EP
# group's one microbatch is then the whole step, whose counts the one-process run logs.
# --------------------------------------------------------------------------------------------------
def _stats_argv() -> list:
    argv = _detailed_argv([])
    argv[argv.index("--global-batch-size") + 1] = "4"
    return argv


@pytest.mark.multiprocess
def test_overload_and_received_rows_are_the_ep_groups(tmp_path):
    (tmp_path / "one").mkdir()
    ref = _launch(1, _stats_argv(), tmp_path / "one")["records"]
    got = _launch(2, _stats_argv() + EP2, tmp_path)["records"]
    assert [r["step"] for r in got] == [1, 2, 3]
    ep, layers = 2, ("1", "3")
    for r, g in zip(ref, got):
        counts = r["moe/counts"]  # the step's counts: here the EP group's one microbatch
        assert g["moe/counts"] == counts, (g["moe/counts"], counts)
        received = {l: [sum(counts[l][i * 2:(i + 1) * 2]) for i in range(ep)] for l in layers}  # experts 0-1, 2-3
        assert g["moe/ep_received_tokens"] == {l: [float(v) for v in received[l]] for l in layers}
        per_layer = {l: max(received[l]) / (sum(received[l]) / ep) for l in layers}
        for l in layers:
            assert g[f"moe/max_overload_factor_layer_{l}"] == pytest.approx(per_layer[l], rel=1e-6)
            assert g[f"moe/avg_overload_factor_layer_{l}"] == pytest.approx(per_layer[l], rel=1e-6)
        assert g["moe/max_overload_factor"] == pytest.approx(max(per_layer.values()), rel=1e-6)
        # The busiest rank's rows held at once (both layers' forward) over the balanced count.
        cum = max(sum(received[l][i] for l in layers) for i in range(ep)) / (sum(map(sum, received.values())) / ep)
        assert g["moe/max_cum_overload_factor"] == pytest.approx(cum, rel=1e-6)
        assert r["loss"] == pytest.approx(g["loss"], rel=REL_TOL)
    assert any(g["moe/max_overload_factor"] > 1.0 for g in got)


STATS_LAYOUTS = [("tp2-dp2-ep4", 4, TP2 + EP4, 4), ("pp2-dp2-ep2", 4, PP2 + EP2, 2)]
_STATS_REFERENCE = {}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,flags,ep", [l[1:] for l in STATS_LAYOUTS], ids=[l[0] for l in STATS_LAYOUTS])
def test_ep_group_statistics_under_tp_and_pp(world_size, flags, ep, tmp_path, tmp_path_factory):
    """Two microbatches per DP rank, with TP (its ranks route the same tokens: the EP-group sum is divided by TP) or
    PP (each stage's layers): the counts are one process's; with one EP group per stage each EP rank's received
    rows are its experts' counts of the step; the overload factors lie between the step's summed-count overload
    (a busier microbatch can only raise it) and EP."""
    ref, got = _run_against_one_process(_STATS_REFERENCE, "ep_stats", _detailed_argv([]), world_size, flags,
                                        tmp_path, tmp_path_factory)
    ref, got = ref["records"], got["records"]
    per_rank = 4 // ep  # experts of each EP rank
    for r, g in zip(ref, got):
        counts = g["moe/counts"]
        assert counts == r["moe/counts"], (counts, r["moe/counts"])
        received = {l: [float(sum(c[i * per_rank:(i + 1) * per_rank])) for i in range(ep)] for l, c in counts.items()}
        assert g["moe/ep_received_tokens"] == received, (g["moe/ep_received_tokens"], received)
        step_level = max(max(v) / (sum(v) / ep) for v in received.values())
        assert step_level - 1e-6 <= g["moe/max_overload_factor"] <= ep + 1e-6
        assert 1.0 - 1e-6 <= g["moe/avg_overload_factor"] <= g["moe/max_overload_factor"] + 1e-9
        assert 1.0 - 1e-6 <= g["moe/max_cum_overload_factor"] <= ep + 1e-6


def test_received_rows_block_is_the_mean_over_ep_groups():
    """moe_metrics: the packed received rows are summed over the DP group (m copies of each of the dp / m EP groups'
    values, or one of each of dp groups when EP is TP): divided by dp, the mean over the EP groups."""
    layout = StatsLayout(moe_layer_ids=[1], num_experts=4, num_microbatches=1, dp=4, ep=2)
    flat = torch.zeros(layout.numel())
    v = layout.split(flat)
    v["counts"][0] = torch.tensor([10.0, 6.0, 4.0, 12.0])
    v["received"][0] = torch.tensor([4 * 16.0, 4 * 16.0]) + torch.tensor([8.0, -8.0])
    metrics = moe_metrics(layout, flat, detailed=True)
    assert metrics["moe/ep_received_tokens"] == {"1": [18.0, 14.0]}
    assert "moe/ep_received_tokens" not in moe_metrics(layout, flat, detailed=False)


# --------------------------------------------------------------------------------------------------
# Checkpoints: saved under DP2 EP2 (the experts split over the two DP ranks), resumed bit-exact in the same
# layout, loaded bit for bit into one process, TP2 (EP tied to TP) and DP4 EP4.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ep2_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_ep2")
    (root / "a").mkdir()
    straight = _launch(2, _ckpt_dist_argv(root / "ckpts", "--max-steps", "4", "--save-interval", "2", *EP2), root / "a")
    return root, straight


@pytest.mark.multiprocess
def test_ep_over_dp_checkpoint_resumes_bit_exact(ep2_checkpoints, tmp_path):
    root, straight = ep2_checkpoints
    half = root / "ckpts" / "step_00000002"
    assert sorted(p.name for p in half.glob("*.pt")) == ["experts_pp0_ep0.pt", "experts_pp0_ep1.pt", "rng_rank0.pt",
                                                         "rng_rank1.pt", "shard_pp0_tp0.pt"]
    manifest = ckpt.read_manifest(half)
    assert manifest["layout"]["ep"] == 2 and manifest["tensors"]["model/layers.0.ffn.experts.w_down"]["files"] == [
        "experts_pp0_ep0.pt", "experts_pp0_ep1.pt"]
    resumed = _launch(2, _ckpt_dist_argv(tmp_path / "ckpts", "--max-steps", "4", *EP2, "--resume", str(half)), tmp_path)
    assert resumed["losses"] == straight["losses"][2:]
    _assert_checkpoints_equal(root / "ckpts" / "step_00000004", tmp_path / "ckpts" / "step_00000004")


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size,flags", [(1, []), (2, TP2), (4, EP4)], ids=["one-process", "tp2-ep2", "dp4-ep4"])
def test_ep_over_dp_checkpoint_loads_into_other_layouts(ep2_checkpoints, world_size, flags, tmp_path):
    root, _ = ep2_checkpoints
    half = root / "ckpts" / "step_00000002"
    _, saved = ckpt.load_consolidated(half)
    loaded = _launch(world_size, _ckpt_dist_argv(tmp_path / "e", "--max-steps", "2", "--resume", str(half),
                                                 "--eval-only", "--eval-iters", "1") + flags, tmp_path)
    assert loaded["state"].keys() == saved.keys()
    for key, t in saved.items():
        assert torch.equal(loaded["state"][key], t), key


@pytest.mark.multiprocess
def test_ep_over_dp_checkpoint_continues_as_one_process(ep2_checkpoints, tmp_path):
    """From the DP2 EP2 checkpoint, two more steps (dropout off: its random streams depend on the layout) in one
    process and in DP4 EP2 with the sharded optimizer (the experts' moments then split over the two ranks holding
    each expert) give the same losses (another layout: fp32 sums in another order)."""
    root, _ = ep2_checkpoints
    half = root / "ckpts" / "step_00000002"
    losses = []
    for world_size, flags in ((1, []), (4, EP2 + ["--shard-optimizer"])):
        run = tmp_path / str(world_size)
        run.mkdir()
        losses.append(_launch(world_size, _ckpt_dist_argv(run / "c", "--max-steps", "4", "--resume", str(half),
                                                          "--dropout", "0") + flags, run)["losses"])
    assert len(losses[0]) == 2
    for a, b in zip(losses[1], losses[0]):
        assert abs(a - b) <= REL_TOL * abs(b), losses


# --------------------------------------------------------------------------------------------------
# Topology and refused layouts
# --------------------------------------------------------------------------------------------------
def test_topology_places_ep_and_edp_ranks():
    """rank = pp * dp * tp + dp * tp + tp; EP groups are runs of ep ranks, EDP groups the same place in them."""
    t = Topology(world_size=8, rank=6, tp=2, dp=4, dp_rank=3, tp_rank=0, ep=4)
    assert (t.ep_rank, t.edp_rank, t.edp, t.ep_all_to_all) == (2, 1, 2, True)
    tied = Topology(world_size=4, rank=3, tp=2, dp=2, dp_rank=1, tp_rank=1)
    assert (tied.ep, tied.ep_rank, tied.edp_rank, tied.edp, tied.ep_all_to_all) == (2, 1, 1, 2, False)
    assert check_layout(8, 2, 1, 4) == 4


REFUSED = [  # (id, world size, flags, what the one line names)
    ("not-a-multiple-of-tp", 4, TP2 + ["--expert-parallel-size", "3"], "--expert-parallel-size 3"),
    ("does-not-divide-tp-x-dp", 4, ["--expert-parallel-size", "3"], "valid here: 1, 2, 4"),
    ("experts", 4, EP4 + ["--num-experts", "6"], "--num-experts 6"),
    ("tokens-not-shared-by-tp", 4, TP2 + EP4 + ["--max-seq-length", "15", "--micro-batch-size", "1",
                                               "--global-batch-size", "2"], "--max-seq-length 15"),
]


@pytest.mark.parametrize("world_size,flags,expect", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_expert_parallel_layout(world_size, flags, expect, monkeypatch, capsys):
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert minimal_pretrain.main(flags + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expect in err, err
    assert not dist.is_initialized()
