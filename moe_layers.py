"""Mixture-of-Experts layers: TopKRouter, stacked experts, SparseMoE (no-drop) and the router losses.

Expert parallelism is tied to tensor parallelism: TP rank r owns experts [r*E/TP, (r+1)*E/TP) in full.
The router is replicated; every rank routes all tokens, runs its local experts on the tokens sent to
them, and one all-reduce over the TP group adds the partial outputs. The forward pass never reads a
device value back to the host (on the grouped-GEMM path): counts and group offsets stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_ops import permute_tokens, swiglu, unpermute_combine
from parallel import Topology, all_reduce_grad_tp, copy_to_tp, mark_sharded, reduce_from_tp
from profiling import phase


# --------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------
@dataclass
class RouterOutput:
    indices: torch.Tensor  # [T, k] expert ids
    weights: torch.Tensor  # [T, k] combine weights (fp32)
    probs: torch.Tensor    # [T, E] softmax over all experts (fp32)
    logits: torch.Tensor   # [T, E] fp32


class RoutingRecord(NamedTuple):
    """What one training forward of a SparseMoE leaves for the step statistics: references to tensors
    the forward made anyway, no copies and no kernels (not even a detach). moe_stats.StepStats takes
    the records of all layers right after each microbatch's forward and reads them without autograd."""
    counts: torch.Tensor  # [E] assignments per expert (fp32, no gradient)
    aux: torch.Tensor     # load-balancing loss (scalar)
    z: torch.Tensor       # router z-loss (scalar)
    probs: torch.Tensor   # [T, E] router probabilities (fp32), for the entropy


class TopKRouter(nn.Module):
    """Linear router in fp32, softmax over experts, top-k, optionally renormalised top-k weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize_topk: bool = True,
                 init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k, self.normalize_topk = num_experts, top_k, normalize_topk
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.weight.init_std = init_std

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, indices = probs.topk(self.top_k, dim=-1)
        if self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(indices, weights, probs, logits)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style aux loss E * sum_i f_i * P_i, with f_i the fraction of the T*k assignments routed to
    expert i (no gradient) and P_i the mean router probability of expert i."""
    num_tokens, num_experts = probs.shape
    f = counts / (num_tokens * top_k)
    p = probs.mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------
def grouped_mm_available(x: torch.Tensor, *dims: int) -> bool:
    """torch._grouped_mm needs rows of a multiple of 16 bytes; it runs on the CPU (float dtypes) and on
    CUDA for bf16 on sm90+."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16
    return False


def _grouped_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    h = torch._grouped_mm(x, w1, offs=ends)  # [rows, 2f]: gate | up
    return torch._grouped_mm(swiglu(h), w2, offs=ends)


# torch.compile's meta kernel for _grouped_mm accepts bf16 only; other dtypes run it eagerly.
_grouped_swiglu_eager = torch.compiler.disable(_grouped_swiglu)


class GroupedExperts(nn.Module):
    """The local experts' SwiGLU FFNs as stacked weights: w_gate_up [E, d, 2f], w_down [E, f, d].

    forward(x, ends) takes tokens sorted by local expert, ends[e] being the exclusive end row of expert
    e's group (int32, on the device). Rows at and after ends[-1] belong to no local expert (they exist
    only under EP, when some experts live on other ranks): their outputs are zero.
    """

    def __init__(self, num_experts: int, num_local: int, hidden_size: int, ffn_size: int,
                 init_std: float = 0.02, out_init_std: float = 0.02, impl: str = "auto"):
        super().__init__()
        if impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"expert impl must be auto, grouped or loop, got {impl}")
        self.num_local, self.hidden_size, self.ffn_size, self.impl = num_local, hidden_size, ffn_size, impl
        self.all_local = num_local == num_experts  # then every row belongs to a local expert
        # Sharded over the EP (= TP) group along the expert dimension.
        self.w_gate_up = mark_sharded(nn.Parameter(torch.empty(num_local, hidden_size, 2 * ffn_size)), 0, [num_experts])
        self.w_down = mark_sharded(nn.Parameter(torch.empty(num_local, ffn_size, hidden_size)), 0, [num_experts])
        self.w_gate_up.init_std, self.w_down.init_std = init_std, out_init_std

    def use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "loop":
            return False
        ok = grouped_mm_available(x, self.hidden_size, self.ffn_size)
        if self.impl == "grouped" and not ok:
            raise RuntimeError(f"torch._grouped_mm is not available for {x.dtype} on {x.device}")
        return ok

    def forward(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.w_gate_up.to(x.dtype), self.w_down.to(x.dtype)
        if self.all_local:  # no rows past the last group: nothing to mask
            return self._run(x, ends, w1, w2)
        valid = (torch.arange(x.shape[0], device=x.device) < ends[-1]).unsqueeze(-1)
        # Rows past the last group are never written by the grouped GEMM: mask them in and out so
        # neither values nor gradients of those rows are garbage.
        return torch.where(valid, self._run(torch.where(valid, x, 0.0), ends, w1, w2), 0.0)

    def _run(self, x, ends, w1, w2):
        if self.use_grouped(x):
            return (_grouped_swiglu if x.dtype == torch.bfloat16 else _grouped_swiglu_eager)(x, w1, w2, ends)
        return self._loop(x, ends, w1, w2)

    @staticmethod
    def _loop(x, ends, w1, w2):
        """Reference path, one matmul pair per expert. It reads the group boundaries back to the host."""
        bounds = [0] + ends.tolist()
        outs = []
        for e in range(w1.shape[0]):
            rows = x[bounds[e]:bounds[e + 1]]
            gate, up = (rows @ w1[e]).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ w2[e])
        outs.append(x.new_zeros(x.shape[0] - bounds[-1], w2.shape[-1]))
        return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------
# SparseMoE
# --------------------------------------------------------------------------------------------------
class SparseMoE(nn.Module):
    """No-drop top-k MoE: every token is processed by exactly its k experts.

    sort the T*k assignments by expert -> gather -> grouped GEMM -> unsort -> weighted sum over k.

    forward returns (output, loss) where loss = aux_coef * aux + z_coef * z for this layer. A training
    forward also leaves `last_routing` (counts, losses, probabilities: references, no copies) for the
    step statistics of moe_stats.StepStats.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int, topo: Topology,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001, normalize_topk: bool = True,
                 init_std: float = 0.02, out_init_std: float = 0.02, expert_impl: str = "auto"):
        super().__init__()
        if num_experts % topo.ep:
            raise ValueError(f"num experts {num_experts} not divisible by the EP size {topo.ep}")
        self.topo = topo
        self.num_experts, self.top_k = num_experts, top_k
        self.num_local = num_experts // topo.ep
        self.first_local = topo.ep_rank * self.num_local
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = TopKRouter(hidden_size, num_experts, top_k, normalize_topk, init_std)
        self.experts = GroupedExperts(num_experts, self.num_local, hidden_size, ffn_size, init_std,
                                      out_init_std, expert_impl)
        # Statistics: while record_routing is set (by moe_stats.StepStats, at logging steps), a training
        # forward leaves its RoutingRecord here; StepStats takes it after each microbatch.
        self.record_routing = False
        self.last_routing: Optional[RoutingRecord] = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_tokens, k, E = x.shape[0], self.top_k, self.num_experts

        with phase("moe/router"):
            r = self.router(x)
            flat_expert = r.indices.reshape(-1)  # [T*k]
            counts = torch.zeros(E, device=x.device, dtype=torch.float32)
            counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.float32))
            aux = load_balancing_loss(r.probs, counts, k)
            z = router_z_loss(r.logits)
        if self.training and self.record_routing:
            self.last_routing = RoutingRecord(counts, aux, z, r.probs)  # read without autograd, taken right after

        with phase("moe/permute"):
            # Sort the T*k assignments by expert, local experts first: key = (expert - first_local) mod E
            # puts this rank's experts at 0..L-1.
            key = (flat_expert - self.first_local) % E
            order = torch.argsort(key, stable=True)  # [T*k] sorted row -> assignment t*k + j
            inverse = torch.empty_like(order)        # [T*k] assignment t*k + j -> sorted row
            inverse.scatter_(0, order, torch.arange(order.numel(), device=order.device))
            local_counts = torch.roll(counts, -self.first_local)[: self.num_local]
            ends = torch.cumsum(local_counts, 0).to(torch.int32)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            x_in = copy_to_tp(x, self.topo).to(dtype)
            x_sorted = permute_tokens(x_in, inverse, k)  # [T*k, d] gather: row inverse[t*k + j] is token t
        with phase("moe/experts"):
            y_sorted = self.experts(x_sorted, ends)  # [T*k, d] grouped GEMM; non-local rows are zero

        with phase("moe/unpermute_combine"):
            weights = all_reduce_grad_tp(r.weights, self.topo)
            out = unpermute_combine(y_sorted, inverse, weights)  # [T, d] unsort + weighted sum over k
            out = reduce_from_tp(out, self.topo)
        loss = self.aux_loss_coef * aux + self.z_loss_coef * z
        return out.view(shape), loss
