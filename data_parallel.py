"""Data parallelism: gradients summed over the data-parallel ranks in buckets during the backward pass, optionally
with the optimizer state sharded over those ranks (ZeRO-1, Megatron's distributed optimizer: --shard-optimizer),
and the global gradient norm and clip over whatever each rank holds.

Which ranks sum a gradient: a replicated or TP-sharded parameter's over the DP group; an expert's over the
expert-data-parallel (EDP) group, the ranks holding the same experts (the DP group when EP is tied to TP; fewer
ranks when EP spans DP ranks, parallel.Topology). Each bucket belongs to one of the two groups.

Sharded optimizer: every bucket (padded to a multiple of its group's size) is cut into one contiguous slice per
rank of its group. The backward reduce-scatters each bucket in place, so a rank's own slice of the bucket
receives the summed gradient (the rest keeps its local, unreduced values, which nothing reads); AdamW holds
moments for that slice only (1/N of them per rank) and steps it; the parameters, which live in a flat buffer per
bucket (the model's parameters are views into it), are then all-gathered in place. The model's parameters are
fp32, so they are their own master copy, kept whole on every rank (what ZeRO-1 would shard as the fp32 master
slice is here the parameter itself): sharding saves the two fp32 moments, 8 bytes per parameter times
(N - 1) / N, and allocates nothing else for as long as the run lasts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import Topology, all_reduce_, replica_group, shard_axis
from profiling import phase

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --grad-reduce-dtype


@dataclass
class Bucket:
    """Parameters whose gradients are summed together over the group `axis` names ("dp" or "edp": the topology's
    dp_group or edp_group, looked up when used, so that nothing here keeps a group alive past destroy_topology),
    of `size` ranks; this rank is `rank` in it."""
    params: list
    axis: str
    size: int
    rank: int
    flat: torch.Tensor = None  # [numel padded] fp32 gradients; each parameter's .grad is a view into it
    offsets: list = field(default_factory=list)  # each parameter's first element in flat
    # Sharded optimizer only: [numel padded] fp32 parameters; the parameters are views into it.
    flat_param: Optional[torch.Tensor] = None

    @property
    def sharded(self) -> bool:
        return self.flat_param is not None

    @property
    def slice(self) -> tuple[int, int]:
        n = self.flat.numel() // self.size
        return self.rank * n, (self.rank + 1) * n


class DataParallelGrads:
    """Sums gradients over the data-parallel ranks once per optimizer step (the trainer scales each rank's loss by
    1/DP, so the sum is the global batch's mean gradient with no extra pass over it).

    Gradients live in flat fp32 buckets (each param's .grad is a view into one), filled in reverse parameter order
    so buckets complete roughly in backward order. During the last microbatch's backward (`sync = True`) a
    post-accumulate hook counts ready parameters and launches an async all-reduce (reduce-scatter when sharded)
    as soon as a bucket is complete; buckets are launched strictly in index order so every rank issues the same
    sequence of collectives. `finish()` waits for them.

    reduce_dtype bfloat16 (Megatron's --grad-reduce-in-bf16) sends each bucket as a bf16 copy, half the bytes, and
    writes the sum back into fp32: the accumulation over microbatches stays fp32; each rank's share is rounded to
    bf16 (8 significant bits) and the reduction adds in bf16.

    shard_optimizer (ZeRO-1, module docstring): `optimizer_params` are then the slices this rank steps (views into
    the parameters' flat buffers, each carrying `zero_of = (parameter, first, end)`: zero_source), and `gather_params()` after the optimizer step brings every rank's parameters up to
    date.
    """

    def __init__(self, params: Sequence[nn.Parameter], topo: Topology, bucket_size_mb: float = 25.0,
                 reduce_dtype: torch.dtype = torch.float32, shard_optimizer: bool = False):
        self.topo = topo
        self.reduce_dtype = reduce_dtype
        self.params = [p for p in params if p.requires_grad]
        self.sync = False
        cap = max(1, int(bucket_size_mb * 1024 * 1024 / 4))
        self.buckets: list[Bucket] = []
        open_buckets: dict = {}  # reduction group -> (the bucket being filled, its elements so far)
        for p in reversed(self.params):
            axis, size, rank = replica_group(p, topo)  # the experts' over the ranks holding them
            current, filled = open_buckets.get(axis, (None, 0))
            if current is not None and filled + p.numel() > cap:
                self.buckets.append(current)
                current = None
            if current is None:
                current, filled = Bucket([], axis, size, rank), 0
            current.params.append(p)
            open_buckets[axis] = (current, filled + p.numel())
        self.buckets += [b for b, _ in open_buckets.values()]
        self.enabled = any(b.size > 1 for b in self.buckets)
        self.bucket_of = {}
        for i, b in enumerate(self.buckets):
            numel = sum(p.numel() for p in b.params)
            padded = -(-numel // b.size) * b.size if shard_optimizer else numel
            dev = b.params[0].device
            b.flat = torch.zeros(padded, device=dev, dtype=torch.float32)
            offset = 0
            for p in b.params:
                b.offsets.append(offset)
                offset += p.numel()
                self.bucket_of[p] = i
            if shard_optimizer and b.size > 1:
                self._shard(b)
        self._attach_views()
        self._reset_counters()
        self.optimizer_params = self._optimizer_params()  # what the optimizer steps (the slices, when sharded)
        # The groups ("dp", "edp") some bucket's optimizer state is sharded over, for grad_norm.
        self.zero_axes = tuple(sorted({b.axis for b in self.buckets if b.sharded}))
        if self.enabled:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self.grad_ready)

    def _group(self, b: Bucket) -> Optional[dist.ProcessGroup]:
        return getattr(self.topo, f"{b.axis}_group")

    @torch.no_grad()
    def _shard(self, b: Bucket) -> None:
        """Moves the bucket's parameters into one flat buffer (they become views into it); _slices then cuts this
        rank's optimizer slices from it."""
        b.flat_param = torch.zeros_like(b.flat)
        for p, off in zip(b.params, b.offsets):
            b.flat_param[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = b.flat_param[off:off + p.numel()].view_as(p)

    def _slices(self, b: Bucket) -> list:
        """This rank's optimizer slices of a sharded bucket: one per parameter that overlaps its part."""
        lo, hi = b.slice
        out = []
        for p, off in zip(b.params, b.offsets):
            start, end = max(lo, off), min(hi, off + p.numel())
            if start >= end:
                continue
            q = nn.Parameter(b.flat_param[start:end])  # shares the bucket's storage: the step updates the model
            q.grad = b.flat[start:end]  # the reduced part of the gradient bucket
            q.zero_of = (p, start - off, end - off)
            out.append(q)
        return out

    def _optimizer_params(self) -> list:
        """What the optimizer steps: the model's parameters, or with a sharded optimizer this rank's slices of
        the sharded buckets (and the whole parameters of buckets over a group of one)."""
        if not any(b.sharded for b in self.buckets):
            return self.params
        whole = {p for b in self.buckets if not b.sharded for p in b.params}
        sliced = [q for b in self.buckets if b.sharded for q in self._slices(b)]
        return sliced + [p for p in self.params if p in whole]

    def _attach_views(self) -> None:
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                n = p.numel()
                if p.grad is None or p.grad.data_ptr() != b.flat[off:].data_ptr():
                    p.grad = b.flat[off:off + n].view_as(p)

    def _reset_counters(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.next_to_launch = 0
        self.in_flight = []  # (bucket, the tensor sent, the work handle)

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.flat.zero_()
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
            b = self.buckets[self.next_to_launch]
            if not force and self.ready[self.next_to_launch] < len(b.params):
                return
            self.next_to_launch += 1
            if b.size == 1:
                continue
            with phase("dp/all_reduce_launch"):
                sent = b.flat.to(self.reduce_dtype)  # the bucket itself when the dtypes agree
                if b.sharded:  # in place: this rank's slice of what is sent receives the sum
                    lo, hi = b.slice
                    handle = dist.reduce_scatter_tensor(sent[lo:hi], sent, group=self._group(b), async_op=True)
                else:
                    handle = dist.all_reduce(sent, group=self._group(b), async_op=True)
                self.in_flight.append((b, sent, handle))

    def finish(self) -> None:
        """Completes the gradient reduction of this step (launching buckets no hook completed)."""
        if not self.enabled:
            return
        self._launch_ready(force=True)
        with phase("dp/all_reduce_wait"):
            for b, sent, handle in self.in_flight:
                handle.wait()
                if sent is not b.flat:  # the bf16 copy: the sum back into fp32 (this rank's slice when sharded)
                    part = slice(*b.slice) if b.sharded else slice(None)
                    b.flat[part].copy_(sent[part])
        self._reset_counters()
        self.sync = False

    @torch.no_grad()
    def gather_params(self) -> None:
        """After the optimizer stepped its slices: every rank's slices all-gathered into the flat parameter buffers
        (a no-op without a sharded optimizer)."""
        handles = []
        with phase("dp/all_gather_params"):
            for b in self.buckets:
                if b.sharded:
                    lo, hi = b.slice  # in place: this rank's slice is already where it goes
                    handles.append(dist.all_gather_into_tensor(b.flat_param, b.flat_param[lo:hi],
                                                               group=self._group(b), async_op=True))
            for h in handles:
                h.wait()


def grad_norm(params: Sequence[nn.Parameter], topo: Topology, zero_axes: Sequence[str] = ()) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (the optimizer's: whole parameters, or sharded-optimizer slices).
    Squares are summed per kind of parameter (replicated, TP-sharded, experts) and then over the ranks that hold
    other parts of it: a sharded optimizer's slices over the group their bucket is sharded over (`zero_axes` names
    those groups, "dp" and "edp": DataParallelGrads.zero_axes), a TP-sharded parameter over TP, an expert over the
    EP group, and the pipeline stages over PP. Replicated parameters count once (their data-parallel copies agree
    after the reduction). Every rank issues the same collectives whatever parameters it holds."""
    kinds = ("replicated", "tp", "ep")
    whole = {k: [] for k in kinds}   # gradients of whole parameters, in parameter order
    sliced = {k: [] for k in kinds}  # of sharded-optimizer slices
    for p in params:
        if p.grad is None:
            continue
        kind = shard_axis(zero_source(p)[0]) or "replicated"
        if kind == "ep" and not topo.ep_all_to_all:  # the EP group is the TP group: one kind, as TP-sharded
            kind = "tp"
        (sliced if hasattr(p, "zero_of") else whole)[kind].append(p.grad)

    def sq(grads):
        if not grads:
            return torch.zeros((), device=topo.device, dtype=torch.float32)
        # One multi-tensor kernel for all the norms instead of two kernels per parameter: this runs every
        # step, and a small model's step is bound by kernel launches.
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()

    part = {k: sq(whole[k]) for k in kinds}
    if "dp" in zero_axes:  # the slices of replicated and TP-sharded parameters (and of experts, with EP = TP)
        dense = all_reduce_(torch.stack([sq(sliced["replicated"]), sq(sliced["tp"])]), topo.dp_group)
        part["replicated"], part["tp"] = part["replicated"] + dense[0], part["tp"] + dense[1]
    if "edp" in zero_axes:  # the experts' slices, over the ranks holding the same experts
        part["ep"] = part["ep"] + all_reduce_(sq(sliced["ep"]), topo.edp_group)
    total = part["replicated"] + all_reduce_(part["tp"], topo.tp_group)
    if topo.ep_all_to_all:
        total = total + all_reduce_(part["ep"], topo.ep_group)
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


def adamw_param_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list:
    """AdamW's two groups: matrices decay, vectors (norms, biases) do not. A sharded-optimizer slice is judged by
    the parameter it is cut from."""
    return [{"params": [p for p in params if zero_source(p)[0].dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if zero_source(p)[0].dim() < 2], "weight_decay": 0.0}]


def zero_source(q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the parameter, first, end): the elements of the flattened parameter that optimizer parameter q is (a
    sharded optimizer's slice carries them as `zero_of`; any other parameter is the whole of itself)."""
    return getattr(q, "zero_of", (q, 0, q.numel()))
