"""MoE load statistics: device-side collection, one packed all-reduce per group, host-side metrics.

Each SparseMoE forward leaves references to its expert counts, aux loss, z-loss and router
probabilities (moe_layers.RoutingRecord). After each microbatch's forward, `StepStats.end_microbatch`
folds those of all local MoE layers at once, on the device and without a host sync, into a handful of
small tensors (the cost does not grow with the number of layers). At a logging step `pack_step_stats`
writes everything this rank knows into one flat tensor laid out over the *global* MoE layers; one
all-reduce over the PP group fills in the other stages' layers, and one over the DP group sums the
replicas. TP/EP ranks share the replicated router, so they are not reduced (with EP over DP one all-reduce over
the EP group adds its DP ranks' counts for the overload factors). `moe_metrics` then turns
the packed numbers into the logged metrics on the host. Formulas: MOE_GUIDE.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from parallel import Topology, all_reduce_


@dataclass
class StatsLayout:
    """Offsets of each block inside the packed statistics tensor."""
    moe_layer_ids: list  # global layer index of each MoE layer, in order
    num_experts: int
    num_microbatches: int  # per DP rank per step
    dp: int
    drops: bool = False  # capacity on: per layer [dropped assignments, tokens with all k dropped, tokens], the
    #                      overload factors of the demand (before the drop) beside those of the kept tokens, and
    #                      per layer [busiest, mean] expert fill (kept / capacity) summed over microbatches and DP
    bias: bool = False   # bias balancing on: per layer mean |expert bias|, summed over DP ranks
    gates: bool = False  # per layer [gate entropy, kept probabilities, kept assignments, tokens] sums (the trainer
    #                      always sets it; hand-made layouts may leave it out)
    ep: int = 1  # EP size: with ep > 1, per layer the token rows each EP rank received (summed over the step's
    #              microbatches, summed over the EP groups by the reduction; moe_metrics divides by dp)

    @property
    def L(self) -> int:
        return len(self.moe_layer_ids)

    def sizes(self) -> dict:
        L, E, m, dp = self.L, self.num_experts, self.num_microbatches, self.dp
        # lm: [LM loss sum, number of microbatches]; losses: per layer [aux, z, entropy] sums;
        # overload / cum_overload: one slot per DP rank, so a SUM all-reduce gathers every entry.
        # cum_overload is one number per stage (its running sum crosses the stage's layers); the stage
        # writes it into the slots of each of its layers, so the max over the block is over DP and PP.
        sizes = {"lm": 2, "counts": L * E, "losses": L * 3, "overload": dp * L * m, "cum_overload": dp * L}
        if self.drops:  # the routing options' blocks exist only when the options are on
            sizes["drops"] = L * 3
            sizes["overload_before_drop"] = dp * L * m
            sizes["fill"] = L * 2
        if self.bias:
            sizes["bias"] = L
        if self.gates:
            sizes["gates"] = L * 4
        if self.ep > 1:
            sizes["received"] = L * self.ep
        return sizes

    def numel(self) -> int:
        return sum(self.sizes().values())

    def split(self, flat):
        """Views of each block of a flat torch tensor or numpy array."""
        L, E, m, dp = self.L, self.num_experts, self.num_microbatches, self.dp
        shapes = {"lm": (2,), "counts": (L, E), "losses": (L, 3), "overload": (dp, L, m), "cum_overload": (dp, L),
                  "drops": (L, 3), "overload_before_drop": (dp, L, m), "fill": (L, 2), "bias": (L,),
                  "gates": (L, 4), "received": (L, self.ep)}
        out, off = {}, 0
        for name, n in self.sizes().items():
            out[name] = flat[off:off + n].reshape(shapes[name])
            off += n
        return out


def held_after_events(events: Sequence[tuple], num_microbatches: int) -> torch.Tensor:
    """[len(events), m] 0/1: which microbatches' MoE activations are held right after each schedule event.
    A microbatch is held from its forward ('F', i) until its backward ('B', i) releases it: the row of
    its backward no longer holds it. Row t is the running sum of +1 per forward and -1 per backward."""
    signs = torch.zeros(len(events), num_microbatches)
    for t, (kind, i) in enumerate(events):
        signs[t, i] = 1.0 if kind == "F" else -1.0
    return signs.cumsum(0)


@functools.lru_cache(maxsize=8)
def _held_on(events: tuple, num_microbatches: int, device: str) -> torch.Tensor:
    return held_after_events(events, num_microbatches).to(device)  # the schedule repeats every step


def overload_factors(mb_counts: torch.Tensor, ep: int, held: torch.Tensor,
                     mb_kept: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pipeline stage's overload factors. mb_counts [L, m, E]: assignments per expert of each of the
    stage's MoE layers and microbatches; held [N, m] = held_after_events of the stage's schedule.
    mb_kept [L, m, E] (capacity on): the assignments each expert keeps. As in Megatron, the rank's tokens
    are those it receives, the kept ones, while the balanced count stays T*k/EP of all T*k assignments.

    Returns (overload [L, m], cum_overload scalar):
    - overload: tokens on the busiest EP rank over the balanced count T*k/EP, per layer and microbatch.
    - cum_overload (Megatron's max_cum_overload_factor): every EP rank keeps ONE running sum over the
      stage's schedule; a microbatch's forward adds its tokens on that rank layer after layer, its backward
      removes them in reverse layer order. The same runs for the balanced count. Result: the peak of the
      busiest rank's running sum over the peak of the balanced one. Within one forward every record adds
      and within one backward every record subtracts, so each running sum peaks at the end of a forward:
      summing over the layers first and stepping per event gives exactly the same peaks."""
    L, m, E = mb_counts.shape
    received = mb_counts if mb_kept is None else mb_kept
    per_rank = received.reshape(L, m, ep, E // ep).sum(-1)  # [L, m, ep]
    balanced = mb_counts.sum(-1) / ep  # [L, m]
    overload = per_rank.amax(-1) / balanced.clamp_min(1e-9)
    h = held.to(mb_counts)
    peak = (h @ per_rank.sum(0)).amax()  # [N, ep] tokens each rank holds after each event -> busiest peak
    peak_balanced = (h @ balanced.sum(0)).amax()  # [N] -> peak
    return overload, peak / peak_balanced.clamp_min(1e-9)


class StepStats:
    """This rank's MoE statistics of one optimizer step, for all its MoE layers at once.

    The trainer calls `end_microbatch` after every microbatch's forward (the routing records are then
    still alive for the backward anyway) and `reset` at the start of each step. Per microbatch and layer
    it keeps references to the [E] counts and the two losses, and one [L] tensor of router entropy
    summed over the microbatch's tokens. L = this rank's MoE layers, in global layer order."""

    def __init__(self, moe_layers: dict, top_k: int, enabled: bool = True):
        self.layer_ids = sorted(moe_layers)
        self.layers = [moe_layers[i] for i in self.layer_ids]
        self.top_k = top_k
        self.reset(enabled)

    def reset(self, enabled: Optional[bool] = None) -> None:
        """Start a step; `enabled` (if given) says whether this step records anything at all."""
        if enabled is not None:
            self.enabled = enabled
        self.counts: list = []   # [E] per microbatch and layer, microbatch-major
        self.losses: list = []   # per microbatch: L aux losses, then L z-losses (scalars)
        self.entropy: list = []  # per microbatch [L]: sum over tokens of -sum_e p ln p
        self.drops: list = []    # per microbatch [L, 2] (capacity only): dropped assignments, dropped tokens
        self.kept: list = []     # [E] per microbatch and layer (capacity only): assignments each expert keeps
        self.fill: list = []     # per microbatch [L, 2] (capacity only): busiest and mean expert's kept / capacity
        self.gates: list = []    # per microbatch [L, 4]: moe_layers.gate_statistics
        for moe in self.layers:
            moe.record_routing = self.enabled
            moe.last_routing = None

    @property
    def num_microbatches(self) -> int:
        return len(self.entropy)

    @torch.no_grad()
    def end_microbatch(self) -> None:
        """Take the routing records the last forward left in every layer; the entropy needs the [T, E]
        probabilities, so it is reduced now, for all layers at once (three kernels)."""
        if not (self.enabled and self.layers):
            return
        records = [moe.last_routing for moe in self.layers]
        if any(r is None for r in records):
            raise RuntimeError("StepStats.end_microbatch: a MoE layer ran no training forward since the last call")
        for moe in self.layers:
            moe.last_routing = None
        self.counts += [r.counts for r in records]
        self.losses += [r.aux for r in records] + [r.z for r in records]
        if records[0].drops is not None:
            self.drops.append(torch.stack([r.drops for r in records]))
        if records[0].kept is not None:
            self.kept += [r.kept for r in records]
        if records[0].fill is not None:
            self.fill.append(torch.stack([r.fill for r in records]))
        if records[0].gates is not None:
            self.gates.append(torch.stack([r.gates for r in records]))
        # -p ln p with 0 ln 0 = 0, written over the stacked copy of the probabilities (one [L, T, E] buffer).
        probs = torch.stack([r.probs for r in records])
        self.entropy.append(torch.special.entr(probs, out=probs).sum(dim=(1, 2)))

    @torch.no_grad()
    def per_microbatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [L, m, E], losses [L, m, 3] = aux, z, mean router entropy) of this step so far."""
        m, L = self.num_microbatches, len(self.layers)
        counts = torch.stack(self.counts).view(m, L, -1).transpose(0, 1)
        assignments = counts.sum(-1).clamp_min(1)  # [L, m] = tokens * k
        entropy = torch.stack(self.entropy, dim=1) * self.top_k / assignments
        aux_z = torch.stack(self.losses).view(m, 2, L).permute(2, 0, 1)  # [L, m, 2]
        return counts, torch.cat([aux_z, entropy.unsqueeze(-1)], dim=-1)

    @torch.no_grad()
    def kept_per_microbatch(self) -> Optional[torch.Tensor]:
        """[L, m, E] assignments each expert kept (capacity on), else None."""
        if not self.kept:
            return None
        return torch.stack(self.kept).view(self.num_microbatches, len(self.layers), -1).transpose(0, 1)


def ep_group_counts(mb_counts: torch.Tensor, mb_kept: Optional[torch.Tensor],
                    topo: Topology) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Under EP over DP: the per-microbatch counts [L, m, E] (and kept counts) of the whole EP group, whose DP ranks'
    tokens all travel to the same experts: one all-reduce over the EP group, divided by TP (every TP rank of a DP
    rank routes the same tokens). The counts are integers, exact in fp32."""
    both = mb_counts if mb_kept is None else torch.stack([mb_counts, mb_kept])
    both = all_reduce_(both.contiguous(), topo.ep_group) / topo.tp
    return (both, None) if mb_kept is None else (both[0], both[1])


def pack_step_stats(layout: StatsLayout, step_stats: Optional[StepStats], lm_loss_sum: Optional[torch.Tensor],
                    topo: Topology, events: Sequence[tuple]) -> torch.Tensor:
    """This rank's share of the step statistics, reduced over PP then DP (two collectives in all; with EP over DP a
    third comes first, over the EP group, for its overload factors: ep_group_counts). A fixed number of batched
    ops whatever the number of layers: the statistics cost stays flat."""
    flat = torch.zeros(layout.numel(), device=topo.device, dtype=torch.float32)
    v = layout.split(flat)
    if lm_loss_sum is not None:
        v["lm"][0] = lm_loss_sum.detach()
        v["lm"][1] = layout.num_microbatches
    if layout.L and step_stats is not None and step_stats.enabled and step_stats.layers:
        if step_stats.num_microbatches != layout.num_microbatches:
            raise RuntimeError(f"pack_step_stats: {step_stats.num_microbatches} microbatches recorded, "
                               f"expected {layout.num_microbatches}")
        # A stage's MoE layers are a contiguous run of the global ones (stages own contiguous layers).
        first = layout.moe_layer_ids.index(step_stats.layer_ids[0])
        rows = slice(first, first + len(step_stats.layer_ids))
        if layout.moe_layer_ids[rows] != step_stats.layer_ids:
            raise RuntimeError(f"pack_step_stats: local MoE layers {step_stats.layer_ids} are not a contiguous run "
                               f"of {layout.moe_layer_ids}")
        mb_counts, mb_losses = step_stats.per_microbatch()  # [L, m, E], [L, m, 3]
        v["counts"][rows] = mb_counts.sum(1)
        v["losses"][rows] = mb_losses.sum(1)
        mb_kept = step_stats.kept_per_microbatch()  # None without capacity
        if topo.ep_all_to_all:  # the EP group's load is its DP ranks' tokens together
            mb_counts, mb_kept = ep_group_counts(mb_counts, mb_kept, topo)
        if layout.ep > 1:  # rows each EP rank received: its experts' kept (or routed) assignments
            received = mb_counts if mb_kept is None else mb_kept
            v["received"][rows] = received.reshape(*received.shape[:2], layout.ep, -1).sum(dim=(1, 3))
        # One EP rank with nothing dropped holds every token: 1.0 by definition, nothing to compute.
        if topo.ep > 1 or mb_kept is not None:
            held = _held_on(tuple(events), layout.num_microbatches, str(topo.device))
            overload, cum = overload_factors(mb_counts, topo.ep, held, mb_kept)
            v["overload"][topo.dp_rank, rows] = overload
            v["cum_overload"][topo.dp_rank, rows] = cum  # the stage's one value, in each of its layers' slots
        else:
            v["overload"][topo.dp_rank, rows] = 1.0
            v["cum_overload"][topo.dp_rank, rows] = 1.0
        if layout.drops:  # the demand's overload, as if nothing were dropped
            v["overload_before_drop"][topo.dp_rank, rows] = \
                overload_factors(mb_counts, topo.ep, held)[0] if topo.ep > 1 else 1.0
        if layout.drops or layout.bias or layout.gates:
            _pack_routing_stats(layout, step_stats, v, rows)
    all_reduce_(flat, topo.pp_group)
    all_reduce_(flat, topo.dp_group)
    return flat


def _pack_routing_stats(layout: StatsLayout, step_stats: StepStats, v: dict, rows: slice) -> None:
    """The capacity, bias-balancing and gate blocks: per layer the step's dropped assignments, tokens with
    all k assignments dropped and tokens routed, the experts' fill (sums over microbatches), the mean
    |expert bias|, and the gate sums."""
    if layout.drops:
        if len(step_stats.drops) != layout.num_microbatches:
            raise RuntimeError(f"pack_step_stats: drop counts of {len(step_stats.drops)} microbatches, "
                               f"expected {layout.num_microbatches}")
        v["drops"][rows, :2] = torch.stack(step_stats.drops).sum(0)
        v["drops"][rows, 2] = v["counts"][rows].sum(-1) / step_stats.top_k  # counts sum to T*k (the demand)
        if step_stats.fill:
            v["fill"][rows] = torch.stack(step_stats.fill).sum(0)
    if layout.bias:
        v["bias"][rows] = torch.stack([moe.router.expert_bias for moe in step_stats.layers]).abs().mean(-1)
    if layout.gates and step_stats.gates:
        v["gates"][rows] = torch.stack(step_stats.gates).sum(0)


def routing_metrics(layout: StatsLayout, v: dict, detailed: bool = False) -> dict:
    """moe/drop_rate (dropped assignments / T*k), moe/token_drop_rate (tokens with all k dropped / T),
    pooled over layers; moe/used_capacity (the busiest expert's kept / capacity) and
    moe/used_capacity_mean (the mean expert's), averaged over layers, microbatches and DP ranks;
    moe/bias_abs_mean; moe/gate_entropy_mean and moe/mean_topk_prob, averaged over layers; per layer too in
    detailed mode. v: the host-side blocks."""
    out = {}
    ids = layout.moe_layer_ids
    if layout.drops:
        d = v["drops"]  # [L, 3]
        assignments = v["counts"].sum(axis=1)  # [L] = T*k summed over the step
        out["moe/drop_rate"] = float(d[:, 0].sum() / max(assignments.sum(), 1.0))
        out["moe/token_drop_rate"] = float(d[:, 1].sum() / max(d[:, 2].sum(), 1.0))
        fill = v["fill"] / (layout.num_microbatches * layout.dp)  # [L, 2] means over microbatches and DP ranks
        out["moe/used_capacity"] = float(fill[:, 0].mean())
        out["moe/used_capacity_mean"] = float(fill[:, 1].mean())
        if detailed:
            for row, layer_id in enumerate(ids):
                out[f"moe/layer_{layer_id}/drop_rate"] = float(d[row, 0] / max(assignments[row], 1.0))
                out[f"moe/layer_{layer_id}/token_drop_rate"] = float(d[row, 1] / max(d[row, 2], 1.0))
                out[f"moe/layer_{layer_id}/used_capacity"] = float(fill[row, 0])
    if layout.gates:
        g = v["gates"]  # [L, 4] sums: gate entropy, kept probabilities, kept assignments, tokens
        entropy = g[:, 0] / np.maximum(g[:, 3], 1.0)  # [L] mean over tokens
        topk_prob = g[:, 1] / np.maximum(g[:, 2], 1.0)  # [L] mean over kept assignments
        out["moe/gate_entropy_mean"] = float(entropy.mean())
        out["moe/mean_topk_prob"] = float(topk_prob.mean())
        if detailed:
            for row, layer_id in enumerate(ids):
                out[f"moe/layer_{layer_id}/gate_entropy"] = float(entropy[row])
                out[f"moe/layer_{layer_id}/mean_topk_prob"] = float(topk_prob[row])
    if layout.bias:
        b = v["bias"] / layout.dp  # the same on every DP rank, summed by the reduction
        out["moe/bias_abs_mean"] = float(b.mean())
        if detailed:
            for row, layer_id in enumerate(ids):
                out[f"moe/layer_{layer_id}/bias_abs_mean"] = float(b[row])
    return out


def _sorted_median(sorted_values: np.ndarray) -> float:
    """The median of already sorted values (the mean of the two middle ones for an even count), as
    statistics.median; np.median would sort again: measured, it makes moe_metrics about 50% slower."""
    n = sorted_values.size
    return float((sorted_values[(n - 1) // 2] + sorted_values[n // 2]) / 2)


def sample_std(x: np.ndarray, axis: Optional[int] = None) -> np.ndarray:
    """Standard deviation with Bessel's correction (n - 1), torch's default `std()`, which NeMo Automodel
    and the monitoring plan use. A single value has no spread: 0.0 for n = 1, where torch gives nan."""
    n = x.size if axis is None else x.shape[axis]
    return x.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(x.mean(axis=axis))


def moe_metrics(layout: StatsLayout, flat, detailed: bool = False, top_n: int = 5) -> dict:
    """Host-side metrics from the reduced statistics (a numpy array, or a tensor moved to the host here).
    It runs at every logging step while the GPU may wait, so it is one sort of the utilisations and a
    few row reductions, whatever the number of layers."""
    if layout.L == 0:
        return {}
    if isinstance(flat, torch.Tensor):
        flat = flat.detach().cpu().double().numpy()
    v = layout.split(np.asarray(flat, dtype=np.float64))
    c = v["counts"]  # [L, E]
    L, E = c.shape
    losses = v["losses"] / (layout.num_microbatches * layout.dp)  # per-layer means over microbatches and DP ranks
    loss_means = losses.mean(axis=0)
    mean = c.mean(axis=1, keepdims=True)
    cv = sample_std(c, axis=1) / np.maximum(mean[:, 0], 1e-12)  # 0.0 for a layer that routed nothing
    util = c / np.maximum(mean, 1e-12)  # mean = sum_e c / E = the ideal count
    flat_u = util.reshape(-1)
    n = flat_u.size
    order = np.argsort(flat_u, kind="stable")
    u_sorted = flat_u[order]
    # NeMo Automodel's quartiles: the order statistics sorted[n // 4] and sorted[3n // 4], no interpolation.
    u_pct = (u_sorted[0], u_sorted[n // 4], _sorted_median(u_sorted), u_sorted[3 * n // 4], u_sorted[-1])
    cv_sorted = np.sort(cv)
    load = c.sum(axis=0)  # [E] counts summed over the layers: the load_* metrics describe this vector
    load_min, load_max = float(load.min()), float(load.max())
    layer_imbalance = c.max(axis=1) / np.maximum(c.min(axis=1), 1.0)  # [L]
    out = {"moe/aux_loss_mean": float(loss_means[0]), "moe/z_loss_mean": float(loss_means[1]),
           "moe/router_entropy_mean": float(loss_means[2]),
           "moe/cv_mean": float(cv.mean()), "moe/cv_median": _sorted_median(cv_sorted),
           "moe/cv_min": float(cv_sorted[0]), "moe/cv_max": float(cv_sorted[-1])}
    for name, value in zip(("min", "p25", "median", "p75", "max"), u_pct):
        out[f"moe/expert_utilization_{name}"] = float(value)
    out["moe/dead_experts"] = int(np.count_nonzero(c == 0))
    ids = layout.moe_layer_ids
    for idx in order[::-1][:top_n].tolist() + order[:top_n].tolist():
        out[f"moe_expert_utilization/layer_{ids[idx // E]}_expert_{idx % E}"] = float(flat_u[idx])
    out.update({"moe/load_std": float(sample_std(load)), "moe/load_min": load_min, "moe/load_max": load_max,
                "moe/load_imbalance": load_max / max(load_min, 1.0),
                "moe/load_imbalance_worst_layer": float(layer_imbalance.max()),
                "moe/avg_overload_factor": float(v["overload"].mean()),
                "moe/max_overload_factor": float(v["overload"].max()),
                "moe/max_cum_overload_factor": float(v["cum_overload"].max())})
    if layout.drops:  # the same factors for the demand, before the capacity drops
        out["moe/avg_overload_factor_before_drop"] = float(v["overload_before_drop"].mean())
        out["moe/max_overload_factor_before_drop"] = float(v["overload_before_drop"].max())
    if detailed and layout.ep > 1:  # token rows each EP rank received per layer, the mean over the EP groups
        received = v["received"] / layout.dp
        out["moe/ep_received_tokens"] = {str(layer_id): row for layer_id, row in zip(ids, received.tolist())}
    if detailed:
        util_mean, util_max = util.mean(axis=1), util.max(axis=1)
        overload_avg = v["overload"].mean(axis=(0, 2))  # [L]: over DP ranks and microbatches
        overload_max = v["overload"].max(axis=(0, 2))
        for row, layer_id in enumerate(ids):
            out[f"moe/layer_{layer_id}/cv"] = float(cv[row])
            out[f"moe/layer_{layer_id}/aux_loss"] = float(losses[row, 0])
            out[f"moe/layer_{layer_id}/utilization_mean"] = float(util_mean[row])  # NeMo's; 1.0 unless nothing routed
            out[f"moe/layer_{layer_id}/utilization_max"] = float(util_max[row])
            # Megatron's key names
            out[f"moe/avg_overload_factor_layer_{layer_id}"] = float(overload_avg[row])
            out[f"moe/max_overload_factor_layer_{layer_id}"] = float(overload_max[row])
        out["moe/counts"] = {str(layer_id): row for layer_id, row in zip(ids, c.astype(np.int64).tolist())}
    out.update(routing_metrics(layout, v, detailed))
    return out
