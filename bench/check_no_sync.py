"""Checks on a GPU that the MoE forward pass and the per-microbatch statistics never synchronise with
the host during real training.

    python bench/check_no_sync.py [minimal_pretrain flags]

Wraps every SparseMoE.forward and StepStats.end_microbatch in torch.cuda.set_sync_debug_mode("error"),
so any .item(), .tolist(), .cpu() or data-dependent shape inside them raises, then trains a few steps
with the given flags.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimal_pretrain  # noqa: E402
from moe_layers import SparseMoE  # noqa: E402
from moe_stats import StepStats  # noqa: E402

calls = {"SparseMoE.forward": 0, "StepStats.end_microbatch": 0}


def guarded(name: str, fn):
    def wrapper(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls[name] += 1
            return fn(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return wrapper


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("check_no_sync.py needs a CUDA device")
    SparseMoE.forward = guarded("SparseMoE.forward", SparseMoE.forward)
    StepStats.end_microbatch = guarded("StepStats.end_microbatch", StepStats.end_microbatch)
    argv = ["--max-steps", "5", "--eval-iters", "0", "--no-progress", "--no-save", "--output-dir", "/tmp/check_no_sync"] + sys.argv[1:]
    minimal_pretrain.train(minimal_pretrain.parse_args(argv))
    assert all(calls.values()), calls
    print("OK, no host sync under set_sync_debug_mode('error') in " + ", ".join(f"{n} {k} calls" for k, n in calls.items()))


if __name__ == "__main__":
    main()
