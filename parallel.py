"""Hand-rolled parallelism on raw torch.distributed: topology, TP (+ EP tied to it), DP and PP.

Rank layout: TP is fastest, then DP, then PP, i.e.
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so a TP group is a run of consecutive ranks (inside one node). The expert-parallel group *is* the TP
group. With world size 1 every group is None and every collective below is a no-op.
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

    @property
    def ep(self) -> int:  # expert parallelism is tied to tensor parallelism
        return self.tp

    @property
    def ep_rank(self) -> int:
        return self.tp_rank

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
        return (f"world={self.world_size} DP={self.dp} TP={self.tp} (EP={self.ep}) PP={self.pp} "
                f"backend={dist.get_backend() if dist.is_initialized() else 'none'}")


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Returns the DP size, or raises InputError naming the flag."""
    if tp < 1:
        raise InputError(f"--tensor-parallel-size must be >= 1, got {tp}")
    if pp < 1:
        raise InputError(f"--pipeline-parallel-size must be >= 1, got {pp}")
    if world_size % (tp * pp) != 0:
        raise InputError(f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {tp * pp} "
                          f"must divide the world size {world_size}")
    return world_size // (tp * pp)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_topology(tp: int, pp: int, device_type: str) -> Topology:
    """Starts torch.distributed from torchrun's env:// variables (if any) and builds every group."""
    world_size = env_world_size()
    dp = check_layout(world_size, tp, pp)
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
                    tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp))

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
    # Host-side decisions (stop after this step?) go over gloo, never through the GPU stream.
    topo.control_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    # A first collective on each group, so later point-to-point calls find the communicators ready.
    for g in (topo.tp_group, topo.dp_group, topo.pp_group):
        if g is not None:
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
    topo.tp_group = topo.dp_group = topo.pp_group = topo.control_group = None


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


# --------------------------------------------------------------------------------------------------
# Sharded parameters. Each sharded parameter carries `tp_split = (dim, segments)`: its full tensor is
# the concatenation of `segments` (full sizes) along `dim`, and TP rank r keeps the r-th chunk of each.
# Replicated parameters carry no tp_split. Initialisation builds the full tensor and keeps the shard,
# so a model is the same function of the seed under every layout.
# --------------------------------------------------------------------------------------------------
def mark_sharded(p: nn.Parameter, dim: int, segments: Sequence[int]) -> nn.Parameter:
    p.tp_split = (dim, list(segments))
    return p


def split_spec(p: torch.Tensor) -> Optional[tuple]:
    """(dim, full segment sizes) of a TP-sharded tensor, None for a replicated one."""
    return getattr(p, "tp_split", None)


def full_shape(p: torch.Tensor) -> list:
    shape = list(p.shape)
    spec = split_spec(p)
    if spec is not None:
        dim, segments = spec
        shape[dim] = sum(segments)
    return shape


def shard_of(full: torch.Tensor, p, tp_rank: int, tp: int) -> torch.Tensor:
    """TP rank tp_rank's shard of `full`; p is the parameter (or its split spec, a tuple or None)."""
    spec = p if p is None or isinstance(p, tuple) else split_spec(p)
    if spec is None:
        return full
    dim, segments = spec
    chunks = [seg.chunk(tp, dim=dim)[tp_rank] for seg in full.split(list(segments), dim=dim)]
    return torch.cat(chunks, dim=dim)


def unshard(shards: Sequence[torch.Tensor], p) -> torch.Tensor:
    """Inverse of shard_of: shards[r] is TP rank r's shard; p as in shard_of."""
    spec = p if p is None or isinstance(p, tuple) else split_spec(p)
    if spec is None:
        return shards[0]
    dim, segments = spec
    tp = len(shards)
    local_segments = [s // tp for s in segments]
    per_rank = [s.split(local_segments, dim=dim) for s in shards]
    return torch.cat([torch.cat([per_rank[r][i] for r in range(tp)], dim=dim)
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
def grad_norm(params: Sequence[nn.Parameter], topo: Topology) -> torch.Tensor:
    """Global L2 norm of the gradients: sharded parameters summed over TP, stages summed over PP.
    Replicated parameters are counted once. DP ranks hold identical (averaged) gradients."""
    dev = topo.device
    sharded = [p.grad for p in params if p.grad is not None and hasattr(p, "tp_split")]
    replicated = [p.grad for p in params if p.grad is not None and not hasattr(p, "tp_split")]

    def sq(grads):
        if not grads:
            return torch.zeros((), device=dev, dtype=torch.float32)
        # One multi-tensor kernel for all the norms instead of two kernels per parameter: this runs every
        # step, and a small model's step is bound by kernel launches.
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()

    total = all_reduce_(sq(sharded), topo.tp_group) + sq(replicated)
    return all_reduce_(total, topo.pp_group).sqrt()


def clip_grads_(params: Sequence[nn.Parameter], norm: torch.Tensor, max_norm: float,
                optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Scales gradients on the device (no host sync) so their global norm is at most max_norm. A fused torch
    optimizer (`fused=True`) given as `optimizer` is told the scale instead, as its `grad_scale` (the attribute
    AMP's GradScaler sets): its kernel divides each gradient by it on the way in, so the clip costs no pass
    over the gradients of its own (it writes the clipped gradients back, as the plain clip leaves them)."""
    if max_norm <= 0:
        return
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if optimizer is not None and optimizer.defaults.get("fused"):
        optimizer.grad_scale = coef.float().reciprocal()  # 1 when not clipped: the step is then unchanged
        return
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)


def full_state_dict(model: nn.Module, topo: Topology) -> Optional[dict]:
    """Unsharded parameters and persistent buffers (e.g. the routers' expert biases, replicated over TP)
    of the whole model on global rank 0 (None elsewhere). Names are global (layers are keyed by their
    global index), so stages merge by name."""
    local = {}
    saved = model.state_dict(keep_vars=True)  # parameters and persistent buffers
    for name, p in model.named_parameters():
        t = p.detach()
        if topo.tp > 1 and hasattr(p, "tp_split"):
            shards = [torch.empty_like(t) for _ in range(topo.tp)]
            dist.all_gather(shards, t.contiguous(), group=topo.tp_group)
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
# Data parallel: bucketed gradient all-reduce overlapped with the backward pass
# --------------------------------------------------------------------------------------------------
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --grad-reduce-dtype


class DataParallelGrads:
    """Sums gradients over the DP group once per optimizer step (the trainer scales each rank's loss by 1/DP,
    so the sum is the global batch's mean gradient with no extra pass over it).

    Gradients live in flat fp32 buckets (each param's .grad is a view into one), filled in reverse
    parameter order so buckets complete roughly in backward order. During the last microbatch's
    backward (`sync = True`) a post-accumulate hook counts ready parameters and launches an async
    all-reduce as soon as a bucket is complete; buckets are launched strictly in index order so every
    rank issues the same sequence of collectives. `finish()` waits for them.

    reduce_dtype bfloat16 (Megatron's --grad-reduce-in-bf16) sends each bucket as a bf16 copy, half the
    bytes, and writes the sum back into the fp32 bucket: the accumulation over microbatches stays fp32; each
    rank's share is rounded to bf16 (8 significant bits) and the all-reduce adds in bf16.
    """

    def __init__(self, params: Sequence[nn.Parameter], topo: Topology, bucket_size_mb: float = 25.0,
                 reduce_dtype: torch.dtype = torch.float32):
        self.topo = topo
        self.reduce_dtype = reduce_dtype
        self.params = [p for p in params if p.requires_grad]
        self.sync = False
        self.enabled = topo.dp > 1
        cap = max(1, int(bucket_size_mb * 1024 * 1024 / 4))
        self.buckets: list[list[nn.Parameter]] = []
        current, size = [], 0
        for p in reversed(self.params):
            if current and size + p.numel() > cap:
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += p.numel()
        if current:
            self.buckets.append(current)
        self.flat = [torch.zeros(sum(p.numel() for p in b), device=p.device, dtype=torch.float32)
                     for b in self.buckets]
        self.bucket_of = {}
        for i, b in enumerate(self.buckets):
            for p in b:
                self.bucket_of[p] = i
        self._attach_views()
        self._reset_counters()
        if self.enabled:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self.grad_ready)

    def _attach_views(self) -> None:
        for flat, b in zip(self.flat, self.buckets):
            offset = 0
            for p in b:
                n = p.numel()
                if p.grad is None or p.grad.data_ptr() != flat[offset:].data_ptr():
                    p.grad = flat[offset:offset + n].view_as(p)
                offset += n

    def _reset_counters(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.next_to_launch = 0
        self.in_flight = []  # (bucket index, the tensor being reduced: the bucket or its copy, the work handle)

    def zero_grad(self) -> None:
        for flat in self.flat:
            flat.zero_()
        self._attach_views()

    def grad_ready(self, p: nn.Parameter) -> None:
        """p's gradient of this microbatch is complete (a post-accumulate hook; ExpertWeightCopies calls it
        for the masters it accumulates into by hand)."""
        if not (self.sync and self.enabled):
            return
        self.ready[self.bucket_of[p]] += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self.next_to_launch < len(self.buckets):
            i = self.next_to_launch
            if not force and self.ready[i] < len(self.buckets[i]):
                return
            with phase("dp/all_reduce_launch"):
                sent = self.flat[i].to(self.reduce_dtype)  # the bucket itself when the dtypes agree
                self.in_flight.append((i, sent, dist.all_reduce(sent, group=self.topo.dp_group, async_op=True)))
            self.next_to_launch += 1

    def finish(self) -> None:
        """Completes the gradient all-reduce of this step (launching buckets no hook completed)."""
        if not self.enabled:
            return
        self._launch_ready(force=True)
        with phase("dp/all_reduce_wait"):
            for i, sent, handle in self.in_flight:
                handle.wait()
                if sent is not self.flat[i]:
                    self.flat[i].copy_(sent)
        self._reset_counters()
        self.sync = False


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
