"""MoE load statistics: device-side collection, one packed all-reduce per group, host-side metrics.

Each SparseMoE accumulates, on the device and without host syncs, the per-expert token counts of every
microbatch of the step plus its aux loss, z-loss and router entropy (moe_layers.MoEStepStats). At a
logging step `pack_step_stats` writes everything this rank knows into one flat tensor laid out over
the *global* MoE layers; one all-reduce over the PP group fills in the other stages' layers, and one
over the DP group sums the replicas. TP/EP ranks share the replicated router, so they are not reduced.
`moe_metrics` then turns the packed numbers into the logged metrics on the host. Formulas: MOE_GUIDE.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from moe_layers import MoEStepStats
from parallel import Topology, all_reduce_


@dataclass
class StatsLayout:
    """Offsets of each block inside the packed statistics tensor."""
    moe_layer_ids: list  # global layer index of each MoE layer, in order
    num_experts: int
    num_microbatches: int  # per DP rank per step
    dp: int

    @property
    def L(self) -> int:
        return len(self.moe_layer_ids)

    def sizes(self) -> dict:
        L, E, m, dp = self.L, self.num_experts, self.num_microbatches, self.dp
        # lm: [LM loss sum, number of microbatches]; losses: per layer [aux, z, entropy] sums;
        # overload / cum_overload: one slot per DP rank, so a SUM all-reduce gathers every entry.
        return {"lm": 2, "counts": L * E, "losses": L * 3, "overload": dp * L * m, "cum_overload": dp * L}

    def numel(self) -> int:
        return sum(self.sizes().values())

    def split(self, flat: torch.Tensor) -> dict:
        out, off = {}, 0
        for name, n in self.sizes().items():
            out[name] = flat[off:off + n]
            off += n
        L, E, m, dp = self.L, self.num_experts, self.num_microbatches, self.dp
        out["counts"] = out["counts"].view(L, E)
        out["losses"] = out["losses"].view(L, 3)
        out["overload"] = out["overload"].view(dp, L, m)
        out["cum_overload"] = out["cum_overload"].view(dp, L)
        return out


def in_flight_matrix(events: Sequence[tuple], num_microbatches: int) -> torch.Tensor:
    """[len(events), m] 0/1: after each forward/backward event, which microbatches' activations are held."""
    held = set()
    rows = []
    for kind, i in events:
        if kind == "F":
            held.add(i)
        rows.append([1.0 if j in held else 0.0 for j in range(num_microbatches)])
        if kind == "B":
            held.discard(i)
    return torch.tensor(rows)


@functools.lru_cache(maxsize=8)
def _in_flight_on(events: tuple, num_microbatches: int, device: str) -> torch.Tensor:
    return in_flight_matrix(events, num_microbatches).to(device)  # the schedule repeats every step


def overload_factors(mb_counts: torch.Tensor, ep: int, in_flight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mb_counts [..., m, E] (any leading layer dims). Returns (per-microbatch overload [..., m],
    cumulative overload [...]): tokens on the busiest EP rank over the balanced T*k/EP; and the peak over
    the step's event order of the tokens held on the busiest rank over the peak of the balanced count."""
    *lead, m, E = mb_counts.shape
    per_rank = mb_counts.reshape(*lead, m, ep, E // ep).sum(-1)  # [..., m, ep]
    balanced = mb_counts.sum(-1) / ep  # [..., m]
    overload = per_rank.amax(-1) / balanced.clamp_min(1e-9)
    a = in_flight.to(mb_counts)
    cum = (a @ per_rank).amax(dim=(-2, -1)) / (a @ balanced.unsqueeze(-1)).amax(dim=(-2, -1)).clamp_min(1e-9)
    return overload, cum


def pack_step_stats(layout: StatsLayout, moe_layers: dict, lm_loss_sum: Optional[torch.Tensor], topo: Topology,
                    events: Sequence[tuple]) -> torch.Tensor:
    """This rank's share of the step statistics, reduced over PP then DP (two collectives in all).
    A fixed number of batched ops whatever the number of layers: the statistics cost stays flat."""
    flat = torch.zeros(layout.numel(), device=topo.device, dtype=torch.float32)
    v = layout.split(flat)
    if lm_loss_sum is not None:
        v["lm"][0] = lm_loss_sum.detach().float()
        v["lm"][1] = layout.num_microbatches
    if layout.L and moe_layers:
        ids = sorted(moe_layers)
        stats = [moe_layers[l].stats for l in ids]
        rows = torch.tensor([layout.moe_layer_ids.index(l) for l in ids], device=topo.device)
        shape = (len(ids), layout.num_microbatches)
        mb_counts = torch.stack([c for s in stats for c in s.counts]).view(*shape, layout.num_experts)
        scalars = torch.stack([x for s in stats for x in s.scalars]).view(*shape, 4)
        mb_losses = MoEStepStats.summarize(mb_counts, scalars, stats[0].top_k)  # [local layers, m, 3]
        v["counts"].index_copy_(0, rows, mb_counts.sum(1))
        v["losses"].index_copy_(0, rows, mb_losses.sum(1))
        in_flight = _in_flight_on(tuple(events), layout.num_microbatches, str(topo.device))
        overload, cum = overload_factors(mb_counts, topo.ep, in_flight)
        v["overload"][topo.dp_rank].index_copy_(0, rows, overload)
        v["cum_overload"][topo.dp_rank].index_copy_(0, rows, cum)
    all_reduce_(flat, topo.pp_group)
    all_reduce_(flat, topo.dp_group)
    return flat


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def moe_metrics(layout: StatsLayout, flat: torch.Tensor, detailed: bool = False, top_n: int = 5) -> dict:
    """Host-side metrics from the reduced statistics (moved to the host once, if not there already)."""
    v = {k: t.numpy() for k, t in layout.split(flat.detach().double().cpu()).items()}  # one transfer
    n_mb = layout.num_microbatches * layout.dp
    out = {}
    if layout.L == 0:
        return out
    c = v["counts"]  # [L, E]
    losses = v["losses"] / n_mb  # per-layer means over microbatches and DP ranks
    mean = c.mean(axis=1)
    cv = c.std(axis=1) / np.maximum(mean, 1e-12)
    ideal = c.sum(axis=1, keepdims=True) / layout.num_experts
    util = c / np.maximum(ideal, 1e-12)
    out["moe/aux_loss_mean"] = float(losses[:, 0].mean())
    out["moe/z_loss_mean"] = float(losses[:, 1].mean())
    out["moe/router_entropy_mean"] = float(losses[:, 2].mean())
    out["moe/cv_mean"] = float(cv.mean())
    out["moe/cv_median"] = float(np.median(cv))
    out["moe/cv_min"] = float(cv.min())
    out["moe/cv_max"] = float(cv.max())
    flat_u = util.reshape(-1)
    for name, q in (("min", 0), ("p25", 25), ("median", 50), ("p75", 75), ("max", 100)):
        out[f"moe/expert_utilization_{name}"] = _pct(flat_u, q)
    out["moe/dead_experts"] = int((c == 0).sum())
    order = np.argsort(flat_u, kind="stable")
    picks = list(order[::-1][:top_n]) + list(order[:top_n])
    for idx in picks:
        l, e = divmod(int(idx), layout.num_experts)
        out[f"moe_expert_utilization/layer_{layout.moe_layer_ids[l]}_expert_{e}"] = float(flat_u[idx])
    out["moe/load_std"] = float(c.std())
    out["moe/load_min"] = float(c.min())
    out["moe/load_max"] = float(c.max())
    out["moe/load_imbalance"] = float(c.max() / max(c.min(), 1.0))
    overload = v["overload"]  # [dp, L, m]
    out["moe/avg_overload_factor"] = float(overload.mean())
    out["moe/max_overload_factor"] = float(overload.max())
    out["moe/max_cum_overload_factor"] = float(v["cum_overload"].max())
    if detailed:
        for row, layer_id in enumerate(layout.moe_layer_ids):
            out[f"moe/layer_{layer_id}/cv"] = float(cv[row])
            out[f"moe/layer_{layer_id}/aux_loss"] = float(losses[row, 0])
            out[f"moe/layer_{layer_id}/utilization_max"] = float(util[row].max())
        out["moe/counts"] = {str(layer_id): [int(x) for x in c[row]] for row, layer_id in enumerate(layout.moe_layer_ids)}
    return out


def reset_stats(moe_layers: dict, enabled: bool = True) -> None:
    for moe in moe_layers.values():
        moe.stats.reset()
        moe.stats.enabled = enabled
