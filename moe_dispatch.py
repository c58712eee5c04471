"""Expert parallelism over data-parallel ranks: token rows travel to the ranks holding their experts by all-to-all
and come back the same way (--expert-parallel-size larger than --tensor-parallel-size; MOE_GUIDE section 5).

One MoE layer on one rank of an EP group of `ep` ranks, each holding L = E / ep experts (EP rank g holds experts
g*L .. g*L + L - 1, so the destination of an assignment is its expert // L):

    route all T tokens of this rank's microbatch (replicated over TP, as everywhere)
    keep this TP rank's share (a TP group's ranks share its tokens: each sends a disjoint part)
    sort the assignments by expert (= by destination), dropped ones last       -> x_sorted [n*k, d]
    all-to-all of the counts per expert                                         -> rows each rank sends me
    all-to-all of the rows                                                      -> x_recv, by source then expert
    regroup by local expert, grouped GEMM, back to the received order
    all-to-all back                                                             -> y_sorted [n*k, d]
    unsort + weighted sum (moe_ops), TP shares all-gathered                     -> out [T, d]

A rank permutes, computes and combines only its own rows. No-drop: the split sizes depend on the routing, so
they reach the host once per layer (one `.tolist()` of a [2, ep] tensor) and this part runs outside
torch.compile's graphs (its shapes change every step). With a capacity factor every source reserves C slots per
expert in its send buffer, so every shape is fixed by (T, k, E, C) and nothing waits for the host; slots past
an expert's count are never computed (the grouped GEMM's group ends stop before them) and carry zeros. Expert
choice is fixed-shape by construction: every expert takes C tokens, which the TP ranks split between them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from moe_ops import combine_expert_rows, inverse_permutation, permute_tokens, unpermute_combine
from parallel import (Topology, all_reduce_grad_tp, all_to_all, copy_to_tp, exchange_rows, gather_from_tp,
                      reduce_from_tp, split_to_tp)

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows sorted by local expert, group ends) -> rows


def _group_ends(recv_counts: torch.Tensor, num_local: int) -> torch.Tensor:
    """[L] int32 group ends of the rows regrouped by local expert, from the rows per (source, expert)."""
    return torch.cumsum(recv_counts.view(-1, num_local).sum(0), 0).to(torch.int32)


def _local_experts(x_recv: torch.Tensor, expert_of_row: torch.Tensor, valid: Optional[torch.Tensor],
                   ends: torch.Tensor, experts: ExpertsFn, num_local: int) -> torch.Tensor:
    """The received rows [R, d] through this rank's experts, returned in the received order. expert_of_row [R]:
    the local expert of each row; valid [R] (None: all rows): rows past a source's count for an expert, which
    are not computed and come back as zeros; ends [L]: the valid rows' group ends once regrouped by expert."""
    key = expert_of_row if valid is None else torch.where(valid, expert_of_row, num_local)  # invalid rows last
    order = torch.argsort(key.to(torch.int32), stable=True)
    y = experts(x_recv.index_select(0, order), ends).index_select(0, inverse_permutation(order))  # [R, d]
    # Rows past the last group end are left undefined by the GEMM: zeros travel back instead (a select, not a
    # product, so nothing undefined survives, and their gradient is zero).
    return y if valid is None else torch.where(valid.unsqueeze(-1), y, 0.0)


@torch.compiler.disable  # shapes set by the routing: eager (one graph per step would recompile every step)
def _exchange_no_drop(x_sorted: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                      experts: ExpertsFn, topo: Topology, num_local: int) -> torch.Tensor:
    ep, L = topo.ep, num_local
    # The layer's one host sync: how many rows go to and come from each EP rank.
    send_splits, recv_splits = torch.stack([send_counts.view(ep, L).sum(1), recv_counts.view(ep, L).sum(1)]).tolist()
    x_recv = exchange_rows(x_sorted, recv_splits, send_splits, topo)  # [R, d] by source, then local expert
    local = torch.arange(L, device=x_sorted.device).repeat(ep)  # [ep * L] the expert of each (source, expert) run
    expert_of_row = local.repeat_interleave(recv_counts, output_size=sum(recv_splits))  # [R]
    y_recv = _local_experts(x_recv, expert_of_row, None, _group_ends(recv_counts, L), experts, L)
    return exchange_rows(y_recv, send_splits, recv_splits, topo)  # [n*k, d] back in x_sorted's order


def _exchange_capacity(x_sorted: torch.Tensor, key_sorted: torch.Tensor, send_counts: torch.Tensor,
                       recv_counts: torch.Tensor, capacity: int, experts: ExpertsFn, topo: Topology,
                       num_local: int) -> torch.Tensor:
    ep, L, C = topo.ep, num_local, capacity
    E, dev = ep * L, x_sorted.device
    slots = torch.arange(C, device=dev)
    starts = torch.cumsum(send_counts, 0) - send_counts  # [E] first sorted row of each expert
    used = slots < send_counts.unsqueeze(1)  # [E, C]: slot c of expert e holds its c-th kept row
    src = (starts.unsqueeze(1) + slots).clamp(max=x_sorted.shape[0] - 1).view(-1)  # [E*C]
    send = torch.where(used.view(-1, 1), x_sorted.index_select(0, src), 0.0)  # [E*C, d], C slots per expert
    x_recv = exchange_rows(send, [L * C] * ep, [L * C] * ep, topo)  # [ep*L*C, d]: from each source, my experts' slots
    row = torch.arange(ep * L * C, device=dev)
    valid = row % C < recv_counts.repeat_interleave(C)  # [ep*L*C]
    y_recv = _local_experts(x_recv, (row // C) % L, valid, _group_ends(recv_counts, L), experts, L)
    y_send = exchange_rows(y_recv, [L * C] * ep, [L * C] * ep, topo)  # [E*C, d] my slots, through their experts
    # Back to the sorted rows: kept row i of expert e sits in slot i - starts[e]; dropped rows (key E) get zeros.
    kept = key_sorted < E
    e = key_sorted.clamp(max=E - 1)
    slot_of_row = torch.where(kept, e * C + torch.arange(key_sorted.numel(), device=dev) - starts[e], 0)
    return torch.where(kept.unsqueeze(-1), y_send.index_select(0, slot_of_row), 0.0)  # [n*k, d]


def token_choice_all_to_all(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, kept: Optional[torch.Tensor],
                            capacity: Optional[int], experts: ExpertsFn, topo: Topology, num_experts: int) -> torch.Tensor:
    """One token-choice MoE layer's expert computation under EP over DP. x [T, d] (the compute dtype), indices and
    weights [T, k] (fp32) of all T tokens, replicated over TP; kept [T, k] bool and capacity C with a capacity
    factor (None: no-drop). Returns the weighted sum of each token's experts' outputs [T, d], replicated over TP."""
    num_tokens, k = indices.shape
    L = num_experts // topo.ep
    if topo.tp > 1:  # each TP rank sends a disjoint share of the tokens; the outputs are all-gathered at the end
        if num_tokens % topo.tp:
            raise ValueError(f"{num_tokens} tokens per microbatch cannot be shared by {topo.tp} TP ranks")
        n = num_tokens // topo.tp
        mine = slice(topo.tp_rank * n, (topo.tp_rank + 1) * n)
        x = split_to_tp(x, topo)
        # The combine weights' gradient then exists for this rank's tokens only: summed over TP, it is whole.
        indices, weights = indices[mine], all_reduce_grad_tp(weights, topo)[mine]
        kept = kept[mine] if kept is not None else None
    flat = indices.reshape(-1)  # [n*k] the expert (and so the EP rank) of each assignment
    assigned = torch.ones_like(flat) if kept is None else kept.reshape(-1).long()
    key = flat if kept is None else torch.where(kept.reshape(-1), flat, num_experts)  # dropped ones after all
    order = torch.argsort(key.to(torch.int32), stable=True)  # [n*k] sorted row -> assignment
    inverse = inverse_permutation(order)
    send_counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, assigned)  # [E]
    num_valid = None if kept is None else send_counts.sum().view(1)
    x_sorted = permute_tokens(x, inverse, k, num_valid)  # [n*k, d] by expert; dropped rows (last) undefined
    recv_counts = all_to_all(send_counts, [L] * topo.ep, [L] * topo.ep, topo.ep_group_name)  # [ep*L] rows for my experts
    if kept is None:
        y_sorted = _exchange_no_drop(x_sorted, send_counts, recv_counts, experts, topo, L)
    else:
        y_sorted = _exchange_capacity(x_sorted, key[order], send_counts, recv_counts, capacity, experts, topo, L)
    out = unpermute_combine(y_sorted, inverse, weights, num_valid)  # [n, d]
    return gather_from_tp(out, topo)


def expert_choice_all_to_all(x: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, experts: ExpertsFn,
                             topo: Topology) -> torch.Tensor:
    """One expert-choice MoE layer's expert computation under EP over DP. x [T, d] (compute dtype), tokens and
    weights [E, C]: expert e takes tokens[e] weighted by weights[e], replicated over TP. The TP ranks split every
    expert's C slots (TP rank r takes slots r, r + tp, ...), so every shape is known from C; their partial sums
    are added over TP. Returns [T, d], replicated over TP."""
    tp, ep = topo.tp, topo.ep
    E, C = tokens.shape
    L = E // ep
    x = copy_to_tp(x, topo)  # each TP rank's slots give part of x's gradient: summed over TP
    weights = all_reduce_grad_tp(weights, topo)  # and of the weights' gradient
    rows, w = tokens[:, topo.tp_rank::tp], weights[:, topo.tp_rank::tp]  # [E, c] this TP rank's slots
    c = rows.shape[1]
    per_source = [len(range(s % tp, C, tp)) for s in range(ep)]  # slots EP rank s takes (its TP rank is s % tp)
    recv_splits = [L * cs for cs in per_source]
    send = x.index_select(0, rows.reshape(-1))  # [E*c, d], expert-major: L experts' rows per EP rank
    x_recv = exchange_rows(send, recv_splits, [L * c] * ep, topo)
    dev = x.device
    # Every count is a host number: the rows' experts and the group ends are built on the device from them,
    # with no copy from the host (which would wait for the stream).
    expert_of_row = torch.cat([torch.arange(L, device=dev).repeat_interleave(cs) for cs in per_source])  # [R]
    ends = torch.arange(1, L + 1, device=dev, dtype=torch.int32) * sum(per_source)  # [L]
    y_recv = _local_experts(x_recv, expert_of_row, None, ends, experts, L)
    y_send = exchange_rows(y_recv, [L * c] * ep, recv_splits, topo)  # [E*c, d]
    return reduce_from_tp(combine_expert_rows(y_send, rows.reshape(-1), w, x.shape[0]), topo)  # [T, d]
