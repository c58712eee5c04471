"""MoE load statistics (moe_stats.py): the metrics by hand and by their references' own formulas (Megatron-LM,
NeMo Automodel), overload factors and the cumulative overload under pipeline schedules, what a logging
step records and what it costs (one collective per group), and the same metrics under every layout."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import minimal_pretrain
from model import GPT
from moe_stats import (StatsLayout, StepStats, held_after_events, moe_metrics, overload_factors, pack_step_stats,
                       routing_metrics)
from parallel import StepFunctions, Topology, run_schedule

from helpers import _base_argv, _close, _launch, make_moe, run_ranks, tiny_cfg


MODULE = Path(__file__).stem  # the worker subprocesses import this file by name


# --------------------------------------------------------------------------------------------------
# MoE statistics, hand-computed
# --------------------------------------------------------------------------------------------------
def stats_case(counts, losses, overload=None, cum=None):
    layout = StatsLayout(moe_layer_ids=[1, 3], num_experts=4, num_microbatches=2, dp=1)
    flat = torch.zeros(layout.numel())
    v = layout.split(flat)
    v["lm"][0], v["lm"][1] = 9.0, 2.0
    v["counts"][:] = torch.tensor(counts, dtype=torch.float32)
    v["losses"][:] = torch.tensor(losses, dtype=torch.float32)
    if overload is not None:
        v["overload"][:] = torch.tensor(overload)
        v["cum_overload"][:] = torch.tensor(cum)
    return layout, flat


def test_stats_layout_split_views():
    layout, flat = stats_case([[6, 4, 4, 2], [8, 0, 4, 4]], [[0.02, 0.004, 2.6], [0.04, 0.008, 2.0]])
    assert layout.numel() == 2 + 2 * 4 + 2 * 3 + 1 * 2 * 2 + 1 * 2
    assert flat.sum() == pytest.approx(9 + 2 + 32 + 0.02 + 0.004 + 2.6 + 0.04 + 0.008 + 2.0, rel=1e-6)


def test_moe_metrics_by_hand():
    counts = [[6, 4, 4, 2],   # layer 1: mean 4, std sqrt(8/3) (Bessel: 8 / (4 - 1)), util [1.5, 1, 1, 0.5]
              [8, 0, 4, 4]]   # layer 3: mean 4, std sqrt(32/3), util [2, 0, 1, 1]
    losses = [[0.02, 0.004, 2.6],  # sums over 2 microbatches: means [0.01, 0.002, 1.3]
              [0.04, 0.008, 2.0]]  # means [0.02, 0.004, 1.0]
    overload = [[[1.0, 1.5], [2.0, 1.25]]]
    cum = [[1.25, 1.75]]
    layout, flat = stats_case(counts, losses, overload, cum)
    m = moe_metrics(layout, flat, detailed=True)
    s2 = math.sqrt(8 / 3)  # layer 1's std; layer 3's is 2 * s2
    approx = lambda v: pytest.approx(v, rel=1e-6, abs=1e-9)

    assert m["moe/cv_min"] == approx(s2 / 4)
    assert m["moe/cv_max"] == approx(s2 / 2)
    assert m["moe/cv_mean"] == approx(3 * s2 / 8)
    assert m["moe/cv_median"] == approx(3 * s2 / 8)
    # all utilisations sorted: [0, 0.5, 1, 1, 1, 1, 1.5, 2]; quartiles sorted[n // 4], sorted[3n // 4]
    assert m["moe/expert_utilization_min"] == approx(0.0)
    assert m["moe/expert_utilization_p25"] == approx(1.0)   # sorted[2]
    assert m["moe/expert_utilization_median"] == approx(1.0)
    assert m["moe/expert_utilization_p75"] == approx(1.5)   # sorted[6]
    assert m["moe/expert_utilization_max"] == approx(2.0)
    assert m["moe/dead_experts"] == 1
    # counts summed over the layers [14, 4, 8, 6]: mean 8, squared deviations 36+16+0+4 = 56, variance 56 / 3
    assert m["moe/load_std"] == approx(math.sqrt(56 / 3))
    assert m["moe/load_min"] == approx(4.0)
    assert m["moe/load_max"] == approx(14.0)
    assert m["moe/load_imbalance"] == approx(3.5)  # 14 / 4
    assert m["moe/load_imbalance_worst_layer"] == approx(8.0)  # layer 1: 6 / 2 = 3; layer 3: 8 / max(0, 1) = 8
    assert m["moe/aux_loss_mean"] == approx(0.015)
    assert m["moe/z_loss_mean"] == approx(0.003)
    assert m["moe/router_entropy_mean"] == approx(1.15)
    assert m["moe/avg_overload_factor"] == approx(1.4375)
    assert m["moe/max_overload_factor"] == approx(2.0)
    assert m["moe/max_cum_overload_factor"] == approx(1.75)

    util = {(1, 0): 1.5, (1, 1): 1.0, (1, 2): 1.0, (1, 3): 0.5,
            (3, 0): 2.0, (3, 1): 0.0, (3, 2): 1.0, (3, 3): 1.0}
    named = {k: v for k, v in m.items() if k.startswith("moe_expert_utilization/")}
    assert "moe_expert_utilization/layer_3_expert_0" in named  # the busiest, with its global layer id
    assert "moe_expert_utilization/layer_3_expert_1" in named  # the idle one
    assert "moe_expert_utilization/layer_1_expert_3" in named
    for key, val in named.items():
        lay, exp = key.split("/")[1].split("_expert_")
        l, e = int(lay.removeprefix("layer_")), int(exp)
        assert l in (1, 3), key
        assert val == approx(util[(l, e)]), key

    assert m["moe/layer_1/cv"] == approx(s2 / 4)
    assert m["moe/layer_3/cv"] == approx(s2 / 2)
    assert m["moe/layer_1/aux_loss"] == approx(0.01)
    assert m["moe/layer_3/aux_loss"] == approx(0.02)
    assert m["moe/layer_1/utilization_max"] == approx(1.5)
    assert m["moe/layer_3/utilization_max"] == approx(2.0)
    assert m["moe/layer_1/utilization_mean"] == approx(1.0)
    assert m["moe/avg_overload_factor_layer_1"] == approx(1.25)  # mean of [1.0, 1.5]
    assert m["moe/max_overload_factor_layer_1"] == approx(1.5)
    assert m["moe/avg_overload_factor_layer_3"] == approx(1.625)  # mean of [2.0, 1.25]
    assert m["moe/max_overload_factor_layer_3"] == approx(2.0)
    assert m["moe/counts"] == {"1": [6, 4, 4, 2], "3": [8, 0, 4, 4]}
    assert not any(k.startswith("moe/layer_0/") or k.startswith("moe/layer_2/") for k in m)

    # top_n=2: exactly the two busiest and the two least-used layer-expert pairs.
    m2 = moe_metrics(layout, flat, detailed=False, top_n=2)
    named2 = {k: v for k, v in m2.items() if k.startswith("moe_expert_utilization/")}
    assert named2 == {"moe_expert_utilization/layer_3_expert_0": approx(2.0),
                      "moe_expert_utilization/layer_1_expert_0": approx(1.5),
                      "moe_expert_utilization/layer_3_expert_1": approx(0.0),
                      "moe_expert_utilization/layer_1_expert_3": approx(0.5)}
    assert "moe/counts" not in m2 and "moe/layer_1/cv" not in m2 and "moe/max_overload_factor_layer_1" not in m2


def test_moe_metrics_imbalance_without_dead_experts():
    layout, flat = stats_case([[6, 4, 4, 2], [8, 2, 3, 3]], [[0.0] * 3, [0.0] * 3])
    m = moe_metrics(layout, flat)
    assert m["moe/dead_experts"] == 0
    # summed over the layers: [14, 6, 7, 5]
    assert m["moe/load_imbalance"] == pytest.approx(2.8)  # 14 / 5
    assert m["moe/load_min"] == 5.0
    assert m["moe/load_imbalance_worst_layer"] == pytest.approx(4.0)  # layer 3: 8 / 2


def test_load_metrics_are_over_the_counts_summed_over_layers():
    # The issue's counterexample: each layer uses half the experts, together they use all of them evenly.
    layout, flat = stats_case([[4, 4, 0, 0], [0, 0, 4, 4]], [[0.0] * 3, [0.0] * 3])
    m = moe_metrics(layout, flat)
    assert m["moe/load_std"] == 0.0
    assert m["moe/load_min"] == m["moe/load_max"] == 4.0
    assert m["moe/load_imbalance"] == 1.0
    assert m["moe/load_imbalance_worst_layer"] == 4.0  # each layer alone: 4 / max(0, 1)
    assert m["moe/dead_experts"] == 4


def _stats_torch_calls(num_layers: int) -> tuple[int, int]:
    """torch-level calls made by the statistics of one step (2 microbatches) of a GPT with num_layers
    MoE layers: (calls in StepStats.end_microbatch, calls in pack_step_stats)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    model = GPT(tiny_cfg(num_layers=num_layers, moe_layer_interval=1), Topology())
    model.init_weights(0)
    stats = StepStats(model.moe_layers(), top_k=2)
    fold_calls = 0
    for i in range(2):
        model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
        Count.n = 0
        with Count():
            stats.end_microbatch()
        fold_calls = Count.n
    layout = StatsLayout(model.cfg.moe_layer_ids(), 4, 2, 1)
    Count.n = 0
    with Count():
        pack_step_stats(layout, stats, torch.tensor(1.0), Topology(), GPIPE)
    return fold_calls, Count.n


def test_statistics_cost_does_not_grow_with_layers():
    """The host cost of the statistics is their number of torch calls: the same for 2 and for 8 MoE
    layers (per microbatch and per logging step), since both are batched over the layers."""
    fold2, pack2 = _stats_torch_calls(2)
    fold8, pack8 = _stats_torch_calls(8)
    assert fold2 == fold8 and pack2 == pack8, (fold2, fold8, pack2, pack8)
    assert fold8 < 20 and pack8 < 40, (fold8, pack8)


def test_statistics_recorded_at_logging_steps_only(tmp_path, monkeypatch):
    """Steps between logging steps record nothing (their statistics would never be read): no fold and
    no routing record kept alive; logging steps record every microbatch."""
    import moe_stats
    seen = []  # (step enabled?, layers holding a record) per end_microbatch call
    real = moe_stats.StepStats.end_microbatch

    def spy(self):
        seen.append((self.enabled, sum(moe.last_routing is not None for moe in self.layers)))
        return real(self)
    monkeypatch.setattr(moe_stats.StepStats, "end_microbatch", spy)
    argv = _base_argv("mixed") + ["--log-interval", "2", "--output-dir", str(tmp_path)]
    argv[argv.index("--max-steps") + 1] = "5"
    argv[argv.index("--moe-metrics") + 1] = "brief"
    res = minimal_pretrain.train(minimal_pretrain.parse_args(argv))
    assert [r["step"] for r in res.records] == [1, 2, 4, 5]  # the first, every 2nd and the last
    assert all("moe/cv_mean" in r for r in res.records)
    m = 4  # global batch 8 / micro batch 2
    logged = (0, 1, 3, 4)  # 0-based positions of steps 1, 2, 4, 5
    assert seen == [(i in logged, 2 if i in logged else 0) for i in range(5) for _ in range(m)], seen


# --------------------------------------------------------------------------------------------------
# Overload factors
# --------------------------------------------------------------------------------------------------
GPIPE = [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
ONE_F_ONE_B = [("F", 0), ("B", 0), ("F", 1), ("B", 1)]


def test_held_after_events_by_hand():
    # A microbatch is held from its forward until its backward releases it.
    assert held_after_events(GPIPE, 2).tolist() == [[1, 0], [1, 1], [0, 1], [0, 0]]
    assert held_after_events(ONE_F_ONE_B, 2).tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]]


def test_overload_factors_by_hand():
    mb = torch.tensor([[[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])  # one layer, two microbatches
    # ep=2: ranks own experts {0,1} and {2,3}; per-rank tokens [[8, 0], [2, 2]], balanced [4, 2]
    ov, cum = overload_factors(mb, 2, held_after_events(GPIPE, 2))
    assert ov[0].tolist() == pytest.approx([2.0, 1.0])
    # GPipe held per rank after each event: [8,0], [10,2], [2,2], [0,0] -> peak 10; balanced 4, 6, 2, 0 -> 6
    assert float(cum) == pytest.approx(10 / 6)
    ov, cum = overload_factors(mb, 2, held_after_events(ONE_F_ONE_B, 2))
    assert ov[0].tolist() == pytest.approx([2.0, 1.0])
    # 1F1B held per rank: [8,0], [0,0], [2,2], [0,0] -> peak 8; balanced 4, 0, 2, 0 -> 4
    assert float(cum) == pytest.approx(2.0)
    # ep=1: one rank holds everything, nothing can be overloaded.
    for order in (GPIPE, ONE_F_ONE_B):
        ov, cum = overload_factors(mb, 1, held_after_events(order, 2))
        assert ov[0].tolist() == pytest.approx([1.0, 1.0])
        assert float(cum) == pytest.approx(1.0)


def test_cumulative_overload_can_cancel_when_held_together():
    # Microbatch 0 loads rank 0, microbatch 1 loads rank 1: each is 2x overloaded on its own, but
    # when both are held at once (GPipe) the ranks are balanced.
    mb = torch.tensor([[[6.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 7.0]]])
    ov, cum = overload_factors(mb, 2, held_after_events(GPIPE, 2))
    assert ov[0].tolist() == pytest.approx([2.0, 2.0])
    # held [8,0], [8,8], [0,8], [0,0] -> 8; balanced 4, 8, 4, 0 -> 8
    assert float(cum) == pytest.approx(1.0)
    _, cum = overload_factors(mb, 2, held_after_events(ONE_F_ONE_B, 2))
    assert float(cum) == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------
# max_cum_overload_factor as Megatron defines it. Per rank, ONE running sum over the records of
# all MoE layers of the stage in schedule order (a forward adds its tokens layer by layer, its
# backward removes them in reverse layer order), for the actual tokens and for the balanced
# T*k/EP; peak of the actual over peak of the balanced, max over EP ranks, then over DP and PP.
# --------------------------------------------------------------------------------------------------
# Two stages, four microbatches, as run_schedule orders them (1F1B: stage s warms up with pp - s - 1
# forwards); test_hand_written_orders_are_what_run_schedule_runs checks them against the real schedule.
PP2_M4_ORDERS = {
    ("gpipe", 0): [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("B", 1), ("B", 2), ("B", 3)],
    ("gpipe", 1): [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("B", 1), ("B", 2), ("B", 3)],
    ("1f1b", 0): [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)],
    ("1f1b", 1): [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)],
}


class _NoPeerComm:
    """Stands in for PipeComm so one process can run one stage's real schedule: nothing to send or receive."""
    def recv_forward(self): return None
    def recv_backward(self): return None
    def send_forward(self, y): pass
    def send_backward(self, g): pass
    def send_forward_recv_backward(self, y): return None
    def send_backward_recv_forward(self, g): return None


def _run_stage_schedule(schedule: str, m: int, stage: int, on_forward=lambda i: None) -> list:
    def forward(i, x):
        on_forward(i)
        return torch.zeros(1), None  # (output sent down the pipeline, own loss: none to backpropagate)
    topo = Topology(pp=2, pp_rank=stage, pp_ranks=[0, 1])
    return run_schedule(schedule, m, StepFunctions(forward, before_backward=lambda i: None), _NoPeerComm(), topo)


@pytest.mark.parametrize("schedule,stage", list(PP2_M4_ORDERS))
def test_hand_written_orders_are_what_run_schedule_runs(schedule, stage):
    assert _run_stage_schedule(schedule, 4, stage) == PP2_M4_ORDERS[(schedule, stage)]


def _megatron_cum_overload(mb_counts: list, ep: int, events: list) -> float:
    """Brute force, record by record as Megatron's tracker journals them: mb_counts[l][i][e]."""
    L, E = len(mb_counts), len(mb_counts[0][0])
    actual, balanced = [0.0] * ep, 0.0
    peaks, peak_balanced = [-math.inf] * ep, -math.inf
    for kind, i in events:
        sign = 1.0 if kind == "F" else -1.0
        for l in (range(L) if kind == "F" else reversed(range(L))):
            for r in range(ep):
                actual[r] += sign * sum(mb_counts[l][i][r * E // ep:(r + 1) * E // ep])
                peaks[r] = max(peaks[r], actual[r])
            balanced += sign * sum(mb_counts[l][i]) / ep
            peak_balanced = max(peak_balanced, balanced)
    return max(p / peak_balanced for p in peaks)


def test_cum_overload_counterexample_by_hand():
    # The issue's counterexample: layer A sends everything to EP rank 0, layer B everything to rank 1.
    # After each forward both ranks hold 8 per microbatch, like a balanced router: 1.0. Per layer it was 2.0.
    layer_a, layer_b = [[4.0, 4.0, 0.0, 0.0]] * 2, [[0.0, 0.0, 4.0, 4.0]] * 2
    mb = torch.tensor([layer_a, layer_b])  # [L=2, m=2, E=4]
    for order in (GPIPE, ONE_F_ONE_B):
        ov, cum = overload_factors(mb, 2, held_after_events(order, 2))
        assert ov.tolist() == [[2.0, 2.0], [2.0, 2.0]]
        assert float(cum) == 1.0
        assert _megatron_cum_overload(mb.tolist(), 2, order) == 1.0


@pytest.mark.parametrize("ep", [2, 4])
def test_cum_overload_matches_record_by_record_running_sum(ep):
    g = torch.Generator().manual_seed(13)
    for trial in range(20):
        mb = torch.randint(0, 9, (3, 4, 8), generator=g).float()  # [L, m, E], small integers: exact sums
        mb[..., 0] += 1  # every layer and microbatch routes something
        for order in PP2_M4_ORDERS.values():
            _, cum = overload_factors(mb, ep, held_after_events(order, 4))
            assert float(cum) == pytest.approx(_megatron_cum_overload(mb.tolist(), ep, order), rel=1e-6), (trial, order)


class _RecordedLayer:
    """What StepStats reads from a SparseMoE: the routing record its last training forward left."""
    def __init__(self):
        self.record_routing, self.last_routing = False, None


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_cum_overload_across_stages_by_hand(schedule):
    """A 4-layer all-MoE model on PP2 (stage 0: layers 0, 1; stage 1: layers 2, 3), EP2, four microbatches,
    8 assignments per layer and microbatch. Each stage runs its real schedule, records through StepStats
    and packs its share; the sum of the two packed tensors is what the PP all-reduce forms."""
    from moe_layers import RoutingRecord
    rank0, rank1, even = [4.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 2.0, 2.0]
    routing = {  # layer -> counts of microbatch i
        0: lambda i: rank0, 1: lambda i: rank1,  # stage 0: the issue's counterexample
        2: lambda i: rank0 if i % 2 == 0 else even, 3: lambda i: rank0 if i % 2 == 0 else even,
    }
    layout = StatsLayout(moe_layer_ids=[0, 1, 2, 3], num_experts=4, num_microbatches=4, dp=1)
    total = torch.zeros(layout.numel())
    for stage, layer_ids in ((0, [0, 1]), (1, [2, 3])):
        layers = {l: _RecordedLayer() for l in layer_ids}
        stats = StepStats(layers, top_k=2)

        def on_forward(i):
            for l, layer in layers.items():
                counts = torch.tensor(routing[l](i))
                layer.last_routing = RoutingRecord(counts, torch.tensor(1.0), torch.tensor(0.0), torch.full((4, 4), 0.25))
            stats.end_microbatch()
        events = _run_stage_schedule(schedule, 4, stage, on_forward)
        assert events == PP2_M4_ORDERS[(schedule, stage)]
        topo = Topology(world_size=4, tp=2, pp=2, pp_rank=stage, pp_ranks=[0, 1])
        total += pack_step_stats(layout, stats, None, topo, events)
    cum = layout.split(total)["cum_overload"][0].tolist()  # one slot per layer, each holding its stage's value
    # Stage 0: after every forward both ranks hold 8 per microbatch held, as balanced: 1.0 (per layer: 2.0).
    # Stage 1: microbatches alternate 16 on rank 0 / 8 and 8 spread evenly. 1F1B holds one at a time:
    # peak 16 over balanced 8 = 2.0. GPipe holds all four: rank 0 reaches 16+8+16+8 = 48, balanced 32: 1.5.
    stage1 = {"gpipe": 1.5, "1f1b": 2.0}[schedule]
    assert cum == pytest.approx([1.0, 1.0, stage1, stage1])
    m = moe_metrics(layout, total, detailed=True)
    assert m["moe/max_cum_overload_factor"] == pytest.approx(stage1)
    # Per microbatch: 2.0 for every entry of layers 0 and 1; [2, 1, 2, 1] on layers 2 and 3.
    assert m["moe/max_overload_factor"] == pytest.approx(2.0)
    assert m["moe/avg_overload_factor"] == pytest.approx(1.75)
    for l, avg in ((0, 2.0), (1, 2.0), (2, 1.5), (3, 1.5)):
        assert m[f"moe/avg_overload_factor_layer_{l}"] == pytest.approx(avg)
        assert m[f"moe/max_overload_factor_layer_{l}"] == pytest.approx(2.0)


def test_routing_metrics_by_hand():
    layout = StatsLayout(moe_layer_ids=[1, 3], num_experts=4, num_microbatches=2, dp=2, drops=True, bias=True)
    flat = np.zeros(layout.numel())
    v = layout.split(flat)
    v["counts"][:] = [[40, 30, 20, 10], [25, 25, 25, 25]]  # 100 assignments per layer = 50 tokens x k 2
    v["drops"][:] = [[10, 2, 50], [0, 0, 50]]
    v["bias"][:] = [0.2, 0.4]  # summed over 2 DP ranks
    m = moe_metrics(layout, flat, detailed=True)
    assert m["moe/drop_rate"] == pytest.approx(10 / 200) and m["moe/token_drop_rate"] == pytest.approx(2 / 100)
    assert m["moe/layer_1/drop_rate"] == pytest.approx(0.1) and m["moe/layer_3/drop_rate"] == 0.0
    assert m["moe/layer_1/token_drop_rate"] == pytest.approx(0.04)
    assert m["moe/bias_abs_mean"] == pytest.approx(0.15) and m["moe/layer_3/bias_abs_mean"] == pytest.approx(0.2)
    assert routing_metrics(StatsLayout([1, 3], 4, 2, 2), StatsLayout([1, 3], 4, 2, 2).split(np.zeros(
        StatsLayout([1, 3], 4, 2, 2).numel()))) == {}  # neither on: no keys, no slots


# --------------------------------------------------------------------------------------------------
# MoE load statistics under parallel layouts: the logged moe/* metrics describe the global batch,
# so every layout must log what the single process logs. Only the overload factors depend on the
# layout: they measure the busiest EP rank, so they are exactly 1 when EP = 1 and >= 1 under EP.
# --------------------------------------------------------------------------------------------------
OVERLOAD_KEYS = ("moe/avg_overload_factor", "moe/max_overload_factor", "moe/max_cum_overload_factor")


def _overload_keys(rec: dict) -> set:
    """The step-level overload keys and, in detailed mode, moe/avg|max_overload_factor_layer_{l}."""
    return {k for k in rec if k.startswith("moe/") and "_overload_factor" in k}
METRIC_LAYOUTS = [  # (id, world size, extra flags, expert-parallel size)
    ("dp2", 2, [], 1),
    ("pp2-1f1b", 2, ["--pipeline-parallel-size", "2", "--pipeline-schedule", "1f1b"], 1),
    ("tp2-ep2", 2, ["--tensor-parallel-size", "2"], 2),
]
_METRICS_REFERENCE = {}


def _metrics_argv(moe: str, flags: list) -> list:
    argv = _base_argv(moe)
    argv[argv.index("--moe-metrics") + 1] = "detailed"
    return argv + flags


def _metrics_reference(tmp_path_factory) -> list:
    """The single-process run of the 'mixed' model with detailed MoE metrics, computed once."""
    if "mixed" not in _METRICS_REFERENCE:
        _METRICS_REFERENCE["mixed"] = _launch(1, _metrics_argv("mixed", []), tmp_path_factory.mktemp("ref_metrics"))
    return _METRICS_REFERENCE["mixed"]["records"]


def _check_counts_are_global(rec: dict) -> None:
    """Independent of the reference: 'mixed' has MoE layers 1 and 3 with 4 experts, and every layer routes
    each token of the global batch (8 sequences x 16 tokens) to top-2 experts."""
    counts = rec["moe/counts"]
    assert sorted(counts) == ["1", "3"] and all(len(c) == 4 for c in counts.values()), counts
    for layer, c in counts.items():
        assert sum(c) == 8 * 16 * 2, f"step {rec['step']} layer {layer}: {sum(c)} routed tokens, expected 256: {c}"


def _util_items(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith("moe_expert_utilization/")}


@pytest.mark.multiprocess
@pytest.mark.layout_equivalence
@pytest.mark.parametrize("world_size,flags,ep", [l[1:] for l in METRIC_LAYOUTS], ids=[l[0] for l in METRIC_LAYOUTS])
def test_moe_metrics_same_under_layouts(world_size, flags, ep, tmp_path, tmp_path_factory):
    ref = _metrics_reference(tmp_path_factory)
    got = _launch(world_size, _metrics_argv("mixed", flags), tmp_path)["records"]
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [1, 2, 3]
    for r, g in zip(ref, got):
        step = r["step"]
        _check_counts_are_global(r)
        _check_counts_are_global(g)
        for key in ("loss", "aux_loss", "z_loss"):
            assert g[key] is not None and _close(g[key], r[key]), f"step {step} {key}: got {g[key]}, single {r[key]}"
        # The reference's overload factors: EP = 1, so every token is on the one rank.
        overload_keys = _overload_keys(r)
        assert overload_keys == set(OVERLOAD_KEYS) | {f"moe/{s}_overload_factor_layer_{l}" for l in (1, 3)
                                                     for s in ("avg", "max")}, sorted(overload_keys)
        assert _overload_keys(g) == overload_keys
        for key in overload_keys:
            assert r[key] == 1.0, f"single process, step {step}: {key} = {r[key]}, expected exactly 1.0"
        moe_keys = {k for k in r if k.startswith("moe/")} - overload_keys
        assert len(moe_keys) >= 20 and "moe/counts" in moe_keys and "moe/layer_3/cv" in moe_keys, sorted(moe_keys)
        received = "moe/ep_received_tokens"  # the rows each EP rank received, logged when EP > 1
        assert {k for k in g if k.startswith("moe/")} - overload_keys - {received} == moe_keys
        assert (received in g) == (ep > 1)
        if ep > 1:  # one EP group (TP2): each rank's rows are its experts' counts
            assert g[received] == {l: [float(sum(c[i * 4 // ep:(i + 1) * 4 // ep])) for i in range(ep)]
                                   for l, c in g["moe/counts"].items()}, (g[received], g["moe/counts"])
        assert g["moe/counts"] == r["moe/counts"], f"step {step}: counts {g['moe/counts']} vs single {r['moe/counts']}"
        for key in sorted(moe_keys - {"moe/counts"}):
            assert _close(g[key], r[key]), f"step {step} {key}: got {g[key]}, single {r[key]}"
        # Top/bottom-5 utilisation: values must agree; the key set only where the ranking has no ties.
        ru, gu = _util_items(r), _util_items(g)
        assert len(ru) >= 5 and len(gu) == len(ru), (ru, gu)
        assert all(_close(a, b) for a, b in zip(sorted(gu.values()), sorted(ru.values()))), (gu, ru)
        for key in ru.keys() & gu.keys():
            assert _close(gu[key], ru[key]), f"step {step} {key}: got {gu[key]}, single {ru[key]}"
        all_util = sorted(u for c in r["moe/counts"].values() for u in np.array(c) / (sum(c) / len(c)))
        if all(b - a > 1e-6 for a, b in zip(all_util, all_util[1:])):
            assert gu.keys() == ru.keys(), (sorted(gu), sorted(ru))
        # Overload factors of this layout.
        if ep == 1:
            for key in overload_keys:
                assert g[key] == 1.0, f"EP = 1, step {step}: {key} = {g[key]}, expected exactly 1.0"
        else:
            for key in overload_keys:
                assert 1.0 <= g[key] <= ep + 1e-6, f"EP = {ep}, step {step}: {key} = {g[key]}"
            assert g["moe/avg_overload_factor"] <= g["moe/max_overload_factor"] + 1e-9
            # Both layers have the same number of (DP rank, microbatch) entries: the step's mean and max
            # are the mean and max of the per-layer ones.
            layer_avg = [g[f"moe/avg_overload_factor_layer_{l}"] for l in (1, 3)]
            layer_max = [g[f"moe/max_overload_factor_layer_{l}"] for l in (1, 3)]
            assert _close(g["moe/avg_overload_factor"], sum(layer_avg) / 2) and _close(g["moe/max_overload_factor"], max(layer_max))
            assert all(a <= b + 1e-9 for a, b in zip(layer_avg, layer_max)), (layer_avg, layer_max)
            # The busiest microbatch is at least as overloaded as the step's summed counts are.
            step_level = max(max(sum(c[i * 4 // ep:(i + 1) * 4 // ep]) for i in range(ep)) / (sum(c) / ep)
                             for c in g["moe/counts"].values())
            assert g["moe/max_overload_factor"] >= step_level - 1e-6, (g["moe/max_overload_factor"], step_level)
    if ep > 1:
        assert any(g[key] > 1.0 for g in got for key in OVERLOAD_KEYS), [[g[k] for k in OVERLOAD_KEYS] for g in got]
        assert any(g["moe/max_overload_factor"] > 1.0 for g in got), [g["moe/max_overload_factor"] for g in got]


# --------------------------------------------------------------------------------------------------
# The statistics of a logging step cost one collective per group (PP, then DP), not one per MoE
# layer or per metric: count the collectives issued while pack_step_stats runs on every rank.
# --------------------------------------------------------------------------------------------------
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
                "all_to_all_single", "gather", "scatter", "barrier", "batch_isend_irecv")  # send/irecv...: P2POp checks their identity


def _collective_count_worker(argv_json: str, out_path: str) -> None:
    import inspect
    import torch.distributed as dist
    import minimal_pretrain
    import moe_stats
    calls = []  # one entry per pack_step_stats call
    inside = [False]

    def ranks_of(group):
        return None if group is None else sorted(dist.get_process_group_ranks(group))

    def counting(name, real):
        sig = inspect.signature(real)

        def wrapper(*a, **kw):
            if inside[0]:
                if name == "all_reduce":
                    calls[-1]["all_reduce"].append(ranks_of(sig.bind(*a, **kw).arguments.get("group")))
                else:
                    calls[-1]["other"].append(name)
            return real(*a, **kw)
        return wrapper

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counting(name, getattr(dist, name)))
    real_pack = moe_stats.pack_step_stats
    pack_sig = inspect.signature(real_pack)

    def counting_pack(*a, **kw):
        bound = pack_sig.bind(*a, **kw).arguments
        topo = bound["topo"]
        calls.append({"all_reduce": [], "other": [], "pp": ranks_of(topo.pp_group), "dp": ranks_of(topo.dp_group),
                      "L": bound["layout"].L, "local_layers": len(bound["step_stats"].layers)})
        inside[0] = True
        try:
            return real_pack(*a, **kw)
        finally:
            inside[0] = False

    moe_stats.pack_step_stats = minimal_pretrain.pack_step_stats = counting_pack
    rank = int(os.environ["RANK"])
    result = minimal_pretrain.train(minimal_pretrain.parse_args(json.loads(argv_json)))
    torch.save({"calls": calls, "records": result.records if rank == 0 else None}, f"{out_path}.{rank}")


def _launch_collective_count(tmp: Path, argv: list, world_size: int, timeout: int = 180) -> list:
    run_ranks(world_size, MODULE, "_collective_count_worker",
              [json.dumps(argv + ["--output-dir", str(tmp / "run")]), str(tmp / "c")], timeout, cwd=tmp)
    return [torch.load(tmp / f"c.{r}") for r in range(world_size)]


@pytest.mark.multiprocess
def test_one_collective_per_group_per_log_step(tmp_path):
    argv = _base_argv("mixed") + ["--moe-layer-interval", "1", "--pipeline-parallel-size", "2"]  # 4 MoE layers
    argv[argv.index("--moe-metrics") + 1] = "detailed"
    results = _launch_collective_count(tmp_path, argv, world_size=4)  # DP2 x PP2
    recs = results[0]["records"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for rec in recs:  # the statistics are really there: 4 layers of counts, dozens of metrics
        assert sorted(rec["moe/counts"]) == ["0", "1", "2", "3"]
        assert all(sum(c) == 8 * 16 * 2 for c in rec["moe/counts"].values()), rec["moe/counts"]
        assert sum(k.startswith("moe") for k in rec) >= 30
    dp_groups, pp_groups = set(), set()
    for rank, res in enumerate(results):
        calls = res["calls"]
        assert len(calls) == 3, f"rank {rank}: pack_step_stats ran {len(calls)} times in 3 logged steps"
        for step, c in enumerate(calls):
            assert c["L"] == 4 and c["local_layers"] == 2, c
            assert c["pp"] is not None and c["dp"] is not None and len(c["pp"]) == len(c["dp"]) == 2, c
            assert rank in c["pp"] and rank in c["dp"] and c["pp"] != c["dp"], c
            assert len(c["all_reduce"]) == 2, (f"rank {rank} step {step}: {len(c['all_reduce'])} all_reduce calls "
                                               f"inside pack_step_stats, expected 2 (one per group): {c}")
            assert sorted(c["all_reduce"]) == sorted([c["pp"], c["dp"]]), f"rank {rank} step {step}: {c}"
            assert c["other"] == [], f"rank {rank} step {step}: other collectives {c['other']}"
            dp_groups.add(tuple(c["dp"]))
            pp_groups.add(tuple(c["pp"]))
    assert len(dp_groups) == len(pp_groups) == 2  # two DP groups and two PP groups over the 4 ranks


# --------------------------------------------------------------------------------------------------
# MoE metrics equal their references' formulas
# --------------------------------------------------------------------------------------------------
# Each test builds a hand-made count matrix (the issue's examples), computes the value by the reference's
# own formula, written out here, and compares it with what moe_metrics logs.
ISSUE_COUNTS = [[6, 4, 4, 2], [8, 0, 4, 4]]  # MoE layers 1 and 3 of stats_case, 4 experts


def test_reference_load_std_and_cv_use_bessel_std():
    """1. The monitoring plan's load_std and NeMo Automodel's cv: torch's std(), divided by n - 1."""
    layout, flat = stats_case(ISSUE_COUNTS, [[0.0] * 3] * 2)
    m = moe_metrics(layout, flat, detailed=True)
    load = torch.tensor(ISSUE_COUNTS).sum(0)  # [14, 4, 8, 6]
    assert float(load.float().std()) == pytest.approx(4.3205, abs=1e-4)  # the issue's figure (ours was 3.7417)
    assert m["moe/load_std"] == pytest.approx(float(load.float().std()), rel=1e-6)
    # NeMo: cv = (load.std() / load.mean()) per layer, then mean / median / min / max over the layers.
    cvs = [float(t.std() / t.mean()) for t in torch.tensor(ISSUE_COUNTS).float()]
    assert [m["moe/layer_1/cv"], m["moe/layer_3/cv"]] == pytest.approx(cvs, rel=1e-6)
    assert m["moe/cv_mean"] == pytest.approx(sum(cvs) / 2, rel=1e-6)
    assert (m["moe/cv_min"], m["moe/cv_max"]) == pytest.approx((min(cvs), max(cvs)), rel=1e-6)
    # A single value has no spread: 0.0 where torch's std() of one value is nan.
    one = StatsLayout(moe_layer_ids=[0], num_experts=1, num_microbatches=1, dp=1)
    flat1 = torch.zeros(one.numel())
    one.split(flat1)["counts"][:] = 5.0
    m1 = moe_metrics(one, flat1, detailed=True)
    assert m1["moe/load_std"] == 0.0 and m1["moe/cv_mean"] == 0.0 and m1["moe/layer_0/cv"] == 0.0


def test_reference_utilization_quartiles_are_nemo_order_statistics():
    """2. NeMo's expert_utilization_p25 / p75: sorted[n // 4] and sorted[3n // 4] of all (layer, expert)
    utilisations load / (load.sum() / E), no interpolation."""
    import statistics
    layout, flat = stats_case(ISSUE_COUNTS, [[0.0] * 3] * 2)
    m = moe_metrics(layout, flat)
    ratios = []
    for load in torch.tensor(ISSUE_COUNTS).float():
        ratios += (load / (load.sum() / load.shape[0])).tolist()
    s, n = sorted(ratios), len(ratios)
    assert (s[n // 4], s[3 * n // 4]) == (1.0, 1.5)  # the issue's figures (ours were 0.875 / 1.125)
    assert m["moe/expert_utilization_p25"] == pytest.approx(s[n // 4])
    assert m["moe/expert_utilization_p75"] == pytest.approx(s[3 * n // 4])
    assert m["moe/expert_utilization_median"] == pytest.approx(statistics.median(ratios))
    assert (m["moe/expert_utilization_min"], m["moe/expert_utilization_max"]) == pytest.approx((s[0], s[-1]))


def _pack_hand_made(mb_counts: list, ep: int, mb_kept: Optional[list] = None) -> tuple:
    """(layout, packed statistics) of one stage whose MoE layers 1 and 3 (E = 4) routed mb_counts[l][i] in
    microbatch i (and kept mb_kept[l][i]), packed under EP = ep as pack_step_stats packs them."""
    from moe_layers import RoutingRecord
    m = len(mb_counts[0])
    layers = {1: _RecordedLayer(), 3: _RecordedLayer()}
    stats = StepStats(layers, top_k=2)
    for i in range(m):
        for row, layer in enumerate(layers.values()):
            capacity = {} if mb_kept is None else {"drops": torch.zeros(2),
                                                    "kept": torch.tensor(mb_kept[row][i], dtype=torch.float32)}
            layer.last_routing = RoutingRecord(torch.tensor(mb_counts[row][i], dtype=torch.float32), torch.tensor(1.0),
                                               torch.tensor(0.0), torch.full((4, 4), 0.25), **capacity)
        stats.end_microbatch()
    layout = StatsLayout(moe_layer_ids=[1, 3], num_experts=4, num_microbatches=m, dp=1, drops=mb_kept is not None)
    events = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    return layout, pack_step_stats(layout, stats, None, Topology(world_size=ep, tp=ep), events)


def _megatron_overload(tokens: list, all_counts: list, ep: int) -> float:
    """Megatron's overload factor of one layer and microbatch: the tokens the busiest EP rank receives over
    the balanced count T*k / EP."""
    per_rank = [sum(tokens[r * len(tokens) // ep:(r + 1) * len(tokens) // ep]) for r in range(ep)]
    return max(per_rank) / (sum(all_counts) / ep)


def test_reference_per_layer_overload_keys_are_megatron_names():
    """3. Megatron logs moe/avg_overload_factor_layer_{i} and moe/max_overload_factor_layer_{i}: the mean
    and max of the layer's overload factor over its microbatches."""
    mb_counts = [[[6, 2, 0, 0], [2, 2, 2, 2], [1, 0, 3, 4]],   # layer 1, three microbatches of T*k = 8
                 [[4, 4, 0, 0], [0, 1, 3, 4], [3, 3, 1, 1]]]   # layer 3
    layout, flat = _pack_hand_made(mb_counts, ep=2)
    m = moe_metrics(layout, flat, detailed=True)
    for row, layer_id in enumerate((1, 3)):
        factors = [_megatron_overload(c, c, 2) for c in mb_counts[row]]
        assert m[f"moe/avg_overload_factor_layer_{layer_id}"] == pytest.approx(sum(factors) / len(factors))
        assert m[f"moe/max_overload_factor_layer_{layer_id}"] == pytest.approx(max(factors))
    assert not any(k.startswith("moe/layer_") and k.endswith("_overload_factor") for k in m)  # the old names


def test_reference_per_layer_utilization_mean_is_nemo():
    """4. NeMo's moe/layer_{i}/utilization_mean: the mean over experts of load / (load.sum() / E), 0 for a
    layer that routed nothing; utilization_max stays."""
    counts = [[6, 4, 4, 2], [0, 0, 0, 0]]
    layout, flat = stats_case(counts, [[0.0] * 3] * 2)
    m = moe_metrics(layout, flat, detailed=True)
    for layer_id, load in zip((1, 3), torch.tensor(counts).float()):
        ideal = load.sum() / load.shape[0]
        util = load / ideal if ideal > 0 else torch.zeros_like(load)
        assert m[f"moe/layer_{layer_id}/utilization_mean"] == pytest.approx(float(util.mean()))
        assert m[f"moe/layer_{layer_id}/utilization_max"] == pytest.approx(float(util.max()))


def test_reference_overload_factor_counts_the_kept_tokens():
    """5. With capacity, Megatron's overload factor counts the tokens a rank receives, the kept ones, over
    T*k / EP. The issue's case: T = 8, k = 1, E = 4, C = 1.0 (capacity 2), every token to expert 0, EP = 2:
    0.5. The demand's factor, 2.0, is logged as moe/max_overload_factor_before_drop."""
    moe = make_moe(d=8, f=16, E=4, k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # positive inputs: expert 0's logit is the largest for every token
    stats = StepStats({0: moe}, top_k=1)
    moe(torch.rand(8, 8) + 0.5)
    stats.end_microbatch()
    counts = [8, 0, 0, 0]
    assert stats.counts[0].tolist() == counts
    capacity = math.ceil(1.0 * 8 * 1 / 4)
    kept = [min(c, capacity) for c in counts]  # what each expert computes: [2, 0, 0, 0]
    assert _megatron_overload(kept, counts, 2) == 0.5
    layout = StatsLayout(moe_layer_ids=[0], num_experts=4, num_microbatches=1, dp=1, drops=True)
    flat = pack_step_stats(layout, stats, None, Topology(world_size=2, tp=2), GPIPE[:1] + GPIPE[2:3])
    m = moe_metrics(layout, flat, detailed=True)
    assert m["moe/max_overload_factor"] == pytest.approx(_megatron_overload(kept, counts, 2))
    assert m["moe/avg_overload_factor"] == pytest.approx(0.5)
    assert m["moe/max_overload_factor_layer_0"] == pytest.approx(0.5)
    assert m["moe/max_overload_factor_before_drop"] == pytest.approx(_megatron_overload(counts, counts, 2))  # 2.0
    # Through StepStats with several layers and microbatches too: every entry is Megatron's over the kept.
    mb_counts = [[[6, 2, 0, 0], [1, 1, 2, 4]], [[0, 0, 5, 3], [2, 2, 2, 2]]]
    mb_kept = [[[min(c, 3) for c in mb] for mb in layer] for layer in mb_counts]
    layout, flat = _pack_hand_made(mb_counts, 2, mb_kept)
    m = moe_metrics(layout, flat)
    want = [_megatron_overload(k, c, 2) for kl, cl in zip(mb_kept, mb_counts) for k, c in zip(kl, cl)]
    assert m["moe/max_overload_factor"] == pytest.approx(max(want))
    assert m["moe/avg_overload_factor"] == pytest.approx(sum(want) / len(want))
