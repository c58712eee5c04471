"""bf16 compute copies of the fp32 expert weights, refreshed once per optimizer step (Megatron's scheme:
fp32 master weights in the optimizer, low-precision weights in the GEMMs, fp32 gradient accumulation).

The expert weights are most of an MoE model's parameters. Under bf16 autocast each microbatch would
otherwise cast every fp32 expert weight to bf16 (and torch.compile recomputes that cast in the
backward), and autograd would cast the bf16 weight gradient back to fp32 before adding it to `.grad`:
about 18 bytes of casts plus a 12-byte add per weight per microbatch. Here each weight is cast once per
optimizer step into a bf16 leaf tensor that GroupedExperts uses in its place, and the leaf's gradient
is added straight into the fp32 master's `.grad` (fp32 += bf16, 10 bytes) and freed.

The sum is computed in fp32 either way, so the result is bit-identical to the cast-then-add path. The
optimizer, the gradient norm, the DP all-reduce and checkpoints see only the fp32 masters.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
import torch.nn as nn


class ExpertWeightCopies:
    """Keeps `experts.compute_copies` (w_gate_up, w_down in `dtype`) for every given GroupedExperts.

    refresh() after every change of the masters (optimizer step, checkpoint load): the layers read the
    copies, not the masters, while the copies exist. `on_grad_ready(master)` is called once a master's
    gradient of this microbatch is complete (the DP all-reduce's readiness count, as a post-accumulate
    hook on the master would be).
    """

    def __init__(self, experts: Iterable[nn.Module], dtype: torch.dtype,
                 on_grad_ready: Callable[[nn.Parameter], None] = lambda p: None):
        self.on_grad_ready = on_grad_ready
        self.masters: list[nn.Parameter] = []
        self.copies: list[torch.Tensor] = []
        for module in experts:
            pair = []
            for master in (module.w_gate_up, module.w_down):
                copy = master.detach().to(dtype).requires_grad_(True)
                copy.register_post_accumulate_grad_hook(partial(self._accumulate, master))
                self.masters.append(master)
                self.copies.append(copy)
                pair.append(copy)
            module.compute_copies = tuple(pair)

    @torch.no_grad()
    def refresh(self) -> None:
        """Casts the masters into the copies (one fused pass over every expert weight)."""
        if self.copies:
            torch._foreach_copy_(self.copies, self.masters)

    def _accumulate(self, master: nn.Parameter, copy: torch.Tensor) -> None:
        if master.grad is None:  # no gradient buffers (a layer used on its own); the trainer's always exist
            master.grad = copy.grad.to(master.dtype)
        else:
            master.grad.add_(copy.grad)  # fp32 += bf16, summed in fp32
        copy.grad = None
        self.on_grad_ready(master)
