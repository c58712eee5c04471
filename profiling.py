"""Named ranges for torch.profiler traces that cost nothing when no trace is being taken.

    with phase("moe/router"):
        ...

While a trace window is open (`set_enabled(True)`), `phase` is a torch.profiler.record_function range;
otherwise it returns one shared no-op context, so the hot path pays a function call and a global read.
"""
from __future__ import annotations

import contextlib

import torch

_enabled = False
_NULL = contextlib.nullcontext()


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def phase(name: str):
    """A named profiler range while profiling is on, a shared no-op context otherwise."""
    return torch.profiler.record_function(name) if _enabled else _NULL
