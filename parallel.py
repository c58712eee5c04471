"""Hand-rolled parallelism on raw torch.distributed: topology, TP, EP, PP and the collectives' autograd functions.

Rank layout: TP is fastest, then DP, then PP, i.e.
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so a TP group is a run of consecutive ranks (inside one node). Expert parallelism (EP) groups are runs of `ep`
consecutive ranks of one pipeline stage, ep a multiple of tp dividing tp * dp: with ep = tp (the default) the EP
group *is* the TP group (every TP rank sees all the group's tokens and the outputs are all-reduced); with ep > tp
it spans ep / tp data-parallel ranks, whose tokens travel to the experts' ranks by all-to-all (moe_dispatch.py).
The ranks holding the same experts form the expert-data-parallel (EDP) group, over which the expert gradients are
summed; with ep = tp it is the DP group. With world size 1 every group is None and every collective is a no-op.
DP gradient reduction and the sharded optimizer are in data_parallel.py.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from errors import InputError
from profiling import phase


# --------------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------------
@dataclass
class Topology:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Optional[dist.ProcessGroup] = None
    tp_group_name: Optional[str] = None  # what the model's compiled code uses: a name, so no graph keeps the group
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    pp_ranks: list = field(default_factory=lambda: [0])  # global ranks of my pipeline, by stage
    control_group: Optional[dist.ProcessGroup] = None  # all ranks over gloo: host-side agreement (stop requests)
    # Expert parallelism (None: tied to TP, ep = tp, and the EP / EDP groups are the TP / DP groups).
    ep: Optional[int] = None
    ep_group: Optional[dist.ProcessGroup] = None
    ep_group_name: Optional[str] = None
    edp_group: Optional[dist.ProcessGroup] = None  # the ranks holding my experts

    def __post_init__(self):
        if self.ep is None:
            self.ep = self.tp

    @property
    def ep_rank(self) -> int:
        """Rank in the EP group (the TP rank when EP is tied to TP)."""
        return (self.dp_rank * self.tp + self.tp_rank) % self.ep

    @property
    def edp_rank(self) -> int:
        """Rank in the expert-data-parallel group (the DP rank when EP is tied to TP)."""
        return (self.dp_rank * self.tp + self.tp_rank) // self.ep

    @property
    def edp(self) -> int:
        """Size of the expert-data-parallel group (DP's when EP is tied to TP)."""
        return self.dp * self.tp // self.ep

    @property
    def ep_all_to_all(self) -> bool:
        """EP spans data-parallel ranks: tokens travel to their experts by all-to-all."""
        return self.ep > self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[self.pp_rank + 1]

    def describe(self) -> str:
        ep = f"EP={self.ep} all-to-all over DP" if self.ep_all_to_all else f"EP={self.ep}"
        return (f"world={self.world_size} DP={self.dp} TP={self.tp} ({ep}) PP={self.pp} "
                f"backend={dist.get_backend() if dist.is_initialized() else 'none'}")


def check_layout(world_size: int, tp: int, pp: int, ep: Optional[int] = None) -> int:
    """Returns the DP size, or raises InputError naming the flag."""
    if tp < 1:
        raise InputError(f"--tensor-parallel-size must be >= 1, got {tp}")
    if pp < 1:
        raise InputError(f"--pipeline-parallel-size must be >= 1, got {pp}")
    if world_size % (tp * pp) != 0:
        raise InputError(f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {tp * pp} "
                          f"must divide the world size {world_size}")
    dp = world_size // (tp * pp)
    if ep is not None and (ep < 1 or ep % tp or (tp * dp) % ep):
        valid = ", ".join(str(e) for e in range(tp, tp * dp + 1, tp) if (tp * dp) % e == 0)
        raise InputError(f"--expert-parallel-size {ep} must be a multiple of --tensor-parallel-size {tp} that divides "
                          f"TP x DP = {tp * dp} (valid here: {valid})")
    return dp


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_topology(tp: int, pp: int, device_type: str, ep: Optional[int] = None) -> Topology:
    """Starts torch.distributed from torchrun's env:// variables (if any) and builds every group. ep: the
    expert-parallel size (None: TP's)."""
    world_size = env_world_size()
    dp = check_layout(world_size, tp, pp, ep)
    ep = tp if ep is None else ep
    if world_size == 1:
        return Topology(device=torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    topo = Topology(world_size=world_size, rank=rank, tp=tp, pp=pp, dp=dp, device=device,
                    tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp), ep=ep)

    def rank_of(pp: int, dp: int, tp: int) -> int:
        return pp * topo.dp * topo.tp + dp * topo.tp + tp

    # Every rank must create every group, in the same order: for each axis, one group per fixed value of
    # the other two coordinates, holding the ranks that differ only along that axis.
    sizes = {"pp": pp, "dp": dp, "tp": tp}
    for axis in ("tp", "dp", "pp"):
        others = [a for a in sizes if a != axis]
        for fixed in itertools.product(*(range(sizes[a]) for a in others)):
            ranks = [rank_of(**dict(zip(others, fixed)), **{axis: i}) for i in range(sizes[axis])]
            group = dist.new_group(ranks) if sizes[axis] > 1 else None
            if rank in ranks:
                setattr(topo, f"{axis}_group", group)
                if axis == "tp" and group is not None:
                    topo.tp_group_name = group.group_name
                if axis == "pp":
                    topo.pp_ranks = ranks
    if ep == tp:  # the tied layout: EP is TP, the ranks holding the same experts are the DP group
        topo.ep_group, topo.ep_group_name, topo.edp_group = topo.tp_group, topo.tp_group_name, topo.dp_group
    else:  # per stage: EP groups of ep consecutive ranks; EDP groups of the ranks at the same place in them
        block, edp = dp * tp, dp * tp // ep
        for stage in range(pp):
            for j in range(edp):
                ranks = [stage * block + j * ep + i for i in range(ep)]
                group = dist.new_group(ranks)
                if rank in ranks:
                    topo.ep_group, topo.ep_group_name = group, group.group_name
        for stage in range(pp):
            for i in range(ep):
                ranks = [stage * block + j * ep + i for j in range(edp)]
                group = dist.new_group(ranks) if edp > 1 else None
                if rank in ranks:
                    topo.edp_group = group
    # Host-side decisions (stop after this step?) go over gloo, never through the GPU stream.
    topo.control_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    # A first collective on each group, so later point-to-point calls find the communicators ready.
    # (With EP tied to TP the EP and EDP groups are the TP and DP groups: each group once.)
    groups = (topo.tp_group, topo.dp_group, topo.pp_group, topo.ep_group, topo.edp_group)
    for g in {id(g): g for g in groups if g is not None}.values():
        dist.all_reduce(torch.zeros(1, device=device), group=g)
    return topo


def destroy_topology(topo: Topology, finished: bool) -> None:
    """Tears every process group down. `finished`: the run ended normally on every rank; the ranks then meet at
    a barrier first, so none shuts its connections while a peer is still inside its last collective (after a
    failure a rank that failed would leave the others waiting there). Then the topology lets go of its groups and
    they end now, while the interpreter is whole: destroy_process_group leaves a group that something still
    references alive, gloo threads and all, and the interpreter's own teardown would end them in an order
    nothing controls (the likely cause of a gloo rank that aborted at exit: "terminate called without an
    active exception"). tests/helpers._dist_worker checks that no gloo thread outlives train()."""
    if not dist.is_initialized():
        return
    if finished and topo.world_size > 1:
        dist.barrier(group=topo.control_group)
    dist.destroy_process_group()
    topo.tp_group = topo.dp_group = topo.pp_group = topo.control_group = topo.ep_group = topo.edp_group = None


def all_reduce_(t: torch.Tensor, group: Optional[dist.ProcessGroup], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce, for eager code outside the model (statistics, norms, evaluation)."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduced(t: torch.Tensor, group_name: Optional[str], op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce (op "sum" or "max") over the group of that name: a new tensor, t is left as it
    was (with no group, t itself, so never write into the result). The model's autograd functions use this
    functional collective and no in-place op: torch.compile traces it as a plain op, while an in-place op
    inside an autograd.Function makes torch 2.11's compile route the gradient to the wrong output
    (pytorch/pytorch#180642: wrong TP gradients under --compile). They pass the group's name (topo.tp_group_name),
    never the group: a ProcessGroup that compiled code reads is kept by the compiled graphs and outlives
    destroy_topology, gloo threads and all, until the interpreter's own teardown."""
    if group_name is None:
        return t
    out = torch.ops._c10d_functional.all_reduce(t.contiguous(), op, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)  # orders the current stream after it; no host sync


def all_gathered(t: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    """Out-of-place all-gather along dim 0 over the group of that name (functional, as all_reduced):
    [n, ...] on each of the group_size ranks -> [group_size * n, ...] in rank order."""
    out = torch.ops._c10d_functional.all_gather_into_tensor(t.contiguous(), group_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def all_to_all(t: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group_name: str) -> torch.Tensor:
    """Out-of-place all-to-all along dim 0 (functional, as all_reduced): the first in_splits[0] rows go to rank 0 of
    the group, the next in_splits[1] to rank 1, ...; the result holds out_splits[j] rows from each rank j, in
    rank order. Split sizes are host numbers."""
    out = torch.ops._c10d_functional.all_to_all_single(t.contiguous(), list(out_splits), list(in_splits), group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's (bf16) where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# --------------------------------------------------------------------------------------------------
# Tensor parallel: the conjugate autograd operators (Megatron's f and g)
# --------------------------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x

    @staticmethod
    def backward(ctx, grad):
        with phase("tp/all_reduce_bwd"):
            return all_reduced(grad, ctx.group_name), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group_name):
        with phase("tp/all_reduce_fwd"):
            return all_reduced(x, group_name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    return _CopyToTP.apply(x, topo.tp_group_name) if topo.tp > 1 else x


def reduce_from_tp(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    return _ReduceFromTP.apply(x, topo.tp_group_name) if topo.tp > 1 else x


# The routing weights are replicated, but each EP rank only sees the gradient of its own experts'
# share of them: summing that gradient over the group makes the router's gradient whole.
all_reduce_grad_tp = copy_to_tp


class _SplitToTP(torch.autograd.Function):
    """Forward: this TP rank's contiguous share of the rows (dim 0) of a tensor replicated over TP. Backward: the
    shares' gradients all-gathered, so the replicated input gets its whole gradient on every rank (Megatron's
    scatter_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, tp_rank, tp, group_name):
        ctx.tp, ctx.group_name = tp, group_name
        n = x.shape[0] // tp
        return x[tp_rank * n:(tp_rank + 1) * n]

    @staticmethod
    def backward(ctx, grad):
        with phase("tp/all_gather_bwd"):
            return all_gathered(grad, ctx.group_name, ctx.tp), None, None, None


class _GatherFromTP(torch.autograd.Function):
    """Forward: every TP rank's rows all-gathered (dim 0), the result replicated over TP. Backward: this rank's
    share of the gradient, which is replicated over TP as the forward's result is (Megatron's
    gather_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, tp_rank, tp, group_name):
        ctx.tp_rank, ctx.n = tp_rank, x.shape[0]
        with phase("tp/all_gather_fwd"):
            return all_gathered(x, group_name, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.tp_rank * ctx.n:(ctx.tp_rank + 1) * ctx.n], None, None, None


def split_to_tp(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    return _SplitToTP.apply(x, topo.tp_rank, topo.tp, topo.tp_group_name) if topo.tp > 1 else x


def gather_from_tp(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    return _GatherFromTP.apply(x, topo.tp_rank, topo.tp, topo.tp_group_name) if topo.tp > 1 else x


# --------------------------------------------------------------------------------------------------
# Expert parallel over DP: the all-to-all of token rows
# --------------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Forward: all_to_all (in_splits[j] rows to rank j, out_splits[j] rows from it). Backward: the gradients
    travel back the same way, the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group_name):
        ctx.splits, ctx.group_name = (list(out_splits), list(in_splits)), group_name
        with phase("ep/all_to_all_fwd"):
            return all_to_all(x, out_splits, in_splits, group_name)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        with phase("ep/all_to_all_bwd"):
            return all_to_all(grad, in_splits, out_splits, ctx.group_name), None, None, None


def exchange_rows(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], topo: Topology) -> torch.Tensor:
    """x's rows to the ranks of the EP group (in_splits[j] rows to EP rank j); returns the rows received
    (out_splits[j] from EP rank j), differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, topo.ep_group_name)


# --------------------------------------------------------------------------------------------------
# Sharded parameters. Each sharded parameter carries `tp_split = (dim, segments)`: its full tensor is the
# concatenation of `segments` (full sizes) along `dim`, and rank r of its group keeps the r-th chunk of each.
# `shard_axis` names the group: "tp" (the TP layers) or "ep" (the experts, split over the EP group, which is
# the TP group unless --expert-parallel-size spans DP ranks). Replicated parameters carry neither.
# Initialisation builds the full tensor and keeps the shard, so a model is the same function of the seed
# under every layout.
# --------------------------------------------------------------------------------------------------
def mark_sharded(p: nn.Parameter, dim: int, segments: Sequence[int], axis: str = "tp") -> nn.Parameter:
    p.tp_split = (dim, list(segments))
    p.shard_axis = axis
    return p


def split_spec(p: torch.Tensor) -> Optional[tuple]:
    """(dim, full segment sizes) of a sharded tensor, None for a replicated one."""
    return getattr(p, "tp_split", None)


def shard_axis(p: torch.Tensor) -> Optional[str]:
    """"tp" or "ep" for a sharded parameter, None for a replicated one."""
    return getattr(p, "shard_axis", "tp") if split_spec(p) is not None else None


def shard_coords(p: torch.Tensor, topo: Topology) -> tuple[int, int]:
    """(this rank's index, the number of shards) of p's split (0, 1 for a replicated parameter)."""
    axis = shard_axis(p)
    if axis == "ep":
        return topo.ep_rank, topo.ep
    if axis == "tp":
        return topo.tp_rank, topo.tp
    return 0, 1


def shard_group(p: torch.Tensor, topo: Topology) -> Optional[dist.ProcessGroup]:
    """The group p is split over (None: replicated, or a group of one)."""
    return {"tp": topo.tp_group, "ep": topo.ep_group}.get(shard_axis(p))


def is_expert_param(p: torch.Tensor) -> bool:
    return shard_axis(p) == "ep"


def replica_group(p: torch.Tensor, topo: Topology) -> tuple[str, int, int]:
    """("dp" or "edp", its size, this rank's index in it): the ranks holding copies of p's tensor (of p's shard).
    An expert's copies are on the ranks holding the same experts, the DP group unless EP spans data-parallel
    ranks; every other tensor's are on the DP group."""
    if is_expert_param(p) and topo.ep_all_to_all:
        return "edp", topo.edp, topo.edp_rank
    return "dp", topo.dp, topo.dp_rank


def full_shape(p: torch.Tensor) -> list:
    shape = list(p.shape)
    spec = split_spec(p)
    if spec is not None:
        dim, segments = spec
        shape[dim] = sum(segments)
    return shape


def shard_of(full: torch.Tensor, p, rank: int, size: int) -> torch.Tensor:
    """Shard `rank` of `size` of `full`; p is the parameter (or its split spec, a tuple or None)."""
    spec = p if p is None or isinstance(p, tuple) else split_spec(p)
    if spec is None:
        return full
    dim, segments = spec
    chunks = [seg.chunk(size, dim=dim)[rank] for seg in full.split(list(segments), dim=dim)]
    return torch.cat(chunks, dim=dim)


def unshard(shards: Sequence[torch.Tensor], p) -> torch.Tensor:
    """Inverse of shard_of: shards[r] is shard r; p as in shard_of."""
    spec = p if p is None or isinstance(p, tuple) else split_spec(p)
    if spec is None:
        return shards[0]
    dim, segments = spec
    n = len(shards)
    local_segments = [s // n for s in segments]
    per_rank = [s.split(local_segments, dim=dim) for s in shards]
    return torch.cat([torch.cat([per_rank[r][i] for r in range(n)], dim=dim)
                      for i in range(len(segments))], dim=dim)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP (per segment); the output stays split."""

    def __init__(self, in_features: int, out_segments: Sequence[int], topo: Topology, init_std: float = 0.02):
        super().__init__()
        for s in out_segments:
            if s % topo.tp:
                raise InputError(f"output size {s} is not divisible by --tensor-parallel-size {topo.tp}")
        self.topo = topo
        local_out = sum(s // topo.tp for s in out_segments)
        self.weight = mark_sharded(nn.Parameter(torch.empty(local_out, in_features)), 0, out_segments)
        self.weight.init_std = init_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.topo.tp > 1:  # cast before the copy (as autocast would in F.linear): its backward
            x = x.to(compute_dtype(x))  # all-reduce then moves bf16, not the fp32 residual stream's dtype
        return F.linear(copy_to_tp(x, self.topo), self.weight)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP; the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, topo: Topology, init_std: float = 0.02):
        super().__init__()
        if in_features % topo.tp:
            raise InputError(f"input size {in_features} is not divisible by --tensor-parallel-size {topo.tp}")
        self.topo = topo
        self.weight = mark_sharded(nn.Parameter(torch.empty(out_features, in_features // topo.tp)), 1, [in_features])
        self.weight.init_std = init_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.topo)


class VocabParallelEmbedding(nn.Module):
    """Rows of the embedding table split over TP; out-of-shard tokens contribute zeros, then all-reduce."""

    def __init__(self, vocab_size: int, dim: int, topo: Topology, init_std: float = 0.02):
        super().__init__()
        if vocab_size % topo.tp:
            raise InputError(f"vocab size {vocab_size} is not divisible by --tensor-parallel-size {topo.tp}")
        self.topo = topo
        self.local_vocab = vocab_size // topo.tp
        self.vocab_start = topo.tp_rank * self.local_vocab
        self.weight = mark_sharded(nn.Parameter(torch.empty(self.local_vocab, dim)), 0, [vocab_size])
        self.weight.init_std = init_std

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.topo.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.topo)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over logits whose vocabulary is split across TP ranks."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group_name):
        # No in-place ops here or in backward (see all_reduced).
        logits = logits.float()
        logits_max = all_reduced(logits.max(dim=-1).values, group_name, "max")
        shifted = logits - logits_max.unsqueeze(-1)
        local_t = target - vocab_start
        inside = (local_t >= 0) & (local_t < logits.shape[-1])
        local_t = local_t.masked_fill(~inside, 0)
        target_logit = all_reduced(shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * inside, group_name)
        exp = shifted.exp()
        sum_exp = all_reduced(exp.sum(dim=-1), group_name)
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_t, inside)  # the softmax
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, inside = ctx.saved_tensors
        grad = softmax.scatter_add(-1, local_t.unsqueeze(-1), -inside.to(softmax.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Per-token loss; full logits are never gathered on one rank."""
    if topo.tp == 1:
        return F.cross_entropy(logits.float(), target, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits, target, topo.tp_rank * logits.shape[-1], topo.tp_group_name)


# --------------------------------------------------------------------------------------------------
# Whole-model utilities across TP and PP
# --------------------------------------------------------------------------------------------------
def full_state_dict(model: nn.Module, topo: Topology) -> Optional[dict]:
    """Unsharded parameters and persistent buffers (e.g. the routers' expert biases, replicated over TP)
    of the whole model on global rank 0 (None elsewhere). Names are global (layers are keyed by their
    global index), so stages merge by name."""
    local = {}
    saved = model.state_dict(keep_vars=True)  # parameters and persistent buffers
    for name, p in model.named_parameters():
        t = p.detach()
        _, size = shard_coords(p, topo)
        if size > 1:  # split over TP, or the experts over EP
            shards = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(shards, t.contiguous(), group=shard_group(p, topo))
            t = unshard(shards, p)
        local[name] = t.float().cpu().clone()
    for name, buf in model.named_buffers():
        if name in saved:
            local[name] = buf.detach().float().cpu().clone()
    if topo.pp == 1:
        return local if topo.rank == 0 else None
    gathered = [None] * topo.pp
    dist.all_gather_object(gathered, local, group=topo.pp_group)
    if topo.rank != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


# --------------------------------------------------------------------------------------------------
# Pipeline parallel
# --------------------------------------------------------------------------------------------------
def stage_layer_ids(num_layers: int, pp: int, pp_rank: int) -> list:
    """Balanced contiguous split; the first `num_layers % pp` stages take one extra layer."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return list(range(start, start + base + (1 if pp_rank < extra else 0)))


class PipeComm:
    """Point-to-point transfer of activations (forward) and their gradients (backward) between
    neighbouring stages. Paired send+recv go through one batch_isend_irecv so neither side blocks."""

    def __init__(self, topo: Topology, shape: Sequence[int], dtype: torch.dtype):
        self.topo, self.shape, self.dtype = topo, tuple(shape), dtype

    def _run(self, name: str, sends: list, recv_from: Optional[int]) -> Optional[torch.Tensor]:
        ops, buf = [], None
        for tensor, peer in sends:
            ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.topo.pp_group))
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.topo.device)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from, self.topo.pp_group))
        if ops:
            with phase(name):  # pp/<method name>
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
        return buf

    def _next(self):
        return None if self.topo.is_last_stage else self.topo.next_rank

    def _prev(self):
        return None if self.topo.is_first_stage else self.topo.prev_rank

    def recv_forward(self):
        return self._run("pp/recv_forward", [], self._prev())

    def send_forward(self, y):
        if self._next() is not None:
            self._run("pp/send_forward", [(y, self._next())], None)

    def recv_backward(self):
        return self._run("pp/recv_backward", [], self._next())

    def send_backward(self, g):
        if self._prev() is not None:
            self._run("pp/send_backward", [(g, self._prev())], None)

    def send_forward_recv_backward(self, y):
        if self._next() is None:
            return None
        return self._run("pp/send_forward_recv_backward", [(y, self._next())], self._next())

    def send_backward_recv_forward(self, g):
        if self._prev() is None:
            return None
        return self._run("pp/send_backward_recv_forward", [(g, self._prev())], self._prev())


@dataclass
class StepFunctions:
    """What a schedule needs from the trainer. forward(i, x) -> (output, loss_for_backward) where x is
    the received activation (None on the first stage) and loss_for_backward is this stage's own scalar
    loss terms (LM loss on the last stage, MoE aux terms everywhere), already scaled by 1 / (microbatches x DP). before_backward(i) is called right before microbatch i's backward."""
    forward: Callable
    before_backward: Callable


def _backward(x_in, y, own_loss, grad_y):
    tensors, grads = [], []
    if grad_y is not None:
        tensors.append(y)
        grads.append(grad_y)
    if own_loss is not None and own_loss.requires_grad:
        tensors.append(own_loss)
        grads.append(torch.ones_like(own_loss))
    if tensors:
        torch.autograd.backward(tensors, grads)
    return None if x_in is None else x_in.grad


def run_schedule(schedule: str, num_microbatches: int, fns: StepFunctions, comm: Optional[PipeComm],
                 topo: Topology) -> list:
    """Runs forward and backward for every microbatch of one step on this stage. Returns the order of
    ('F'|'B', microbatch) events actually executed (the MoE statistics use it)."""
    m = num_microbatches
    events = []
    saved = {}

    def fwd(i, x):
        if x is not None:
            x.requires_grad_(True)
        with phase(f"forward/mb{i}"):
            y, own = fns.forward(i, x)
        saved[i] = (x, y, own)
        events.append(("F", i))
        return y

    def bwd(i, grad_y):
        fns.before_backward(i)
        x, y, own = saved.pop(i)
        events.append(("B", i))
        with phase(f"backward/mb{i}"):
            return _backward(x, None if topo.is_last_stage else y, own, grad_y)

    if comm is None or topo.pp == 1:  # no pipeline: forward then backward, per microbatch
        for i in range(m):
            fwd(i, None)
            bwd(i, None)
        return events

    if schedule == "gpipe":
        for i in range(m):
            comm.send_forward(fwd(i, comm.recv_forward()))
        for i in range(m):
            comm.send_backward(bwd(i, comm.recv_backward()))
        return events

    # 1F1B (PipeDream-flush): warm-up forwards, steady one-forward-one-backward, cool-down backwards.
    warmup = min(topo.pp - topo.pp_rank - 1, m)
    steady = m - warmup
    for i in range(warmup):
        comm.send_forward(fwd(i, comm.recv_forward()))
    x = comm.recv_forward() if steady > 0 else None
    for j in range(steady):
        y = fwd(warmup + j, x)
        grad_y = comm.send_forward_recv_backward(y)
        grad_x = bwd(j, grad_y)
        if j == steady - 1:
            comm.send_backward(grad_x)
        else:
            x = comm.send_backward_recv_forward(grad_x)
    for j in range(steady, m):
        comm.send_backward(bwd(j, comm.recv_backward()))
    return events


def run_forward_only(num_microbatches: int, forward: Callable, comm: Optional[PipeComm], topo: Topology) -> None:
    """Evaluation: forward(i, x) -> output, passed down the pipeline without gradients."""
    for i in range(num_microbatches):
        x = comm.recv_forward() if comm is not None else None
        y = forward(i, x)
        if comm is not None:
            comm.send_forward(y)
