"""Checks on a GPU that the MoE forward pass never synchronises with the host during real training.

    python bench/check_no_sync.py [minimal_pretrain flags]

Wraps every SparseMoE.forward in torch.cuda.set_sync_debug_mode("error"), so any .item(), .tolist(),
.cpu() or data-dependent shape inside it raises, then trains a few steps with the given flags.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimal_pretrain  # noqa: E402
from moe_layers import SparseMoE  # noqa: E402

calls = 0
_forward = SparseMoE.forward


def guarded_forward(self, x):
    global calls
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls += 1
        return _forward(self, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("check_no_sync.py needs a CUDA device")
    SparseMoE.forward = guarded_forward
    argv = ["--max-steps", "5", "--eval-iters", "0", "--no-progress", "--output-dir", "/tmp/check_no_sync"] + sys.argv[1:]
    minimal_pretrain.train(minimal_pretrain.parse_args(argv))
    print(f"OK: {calls} MoE forward passes ran under set_sync_debug_mode('error') without a host sync")


if __name__ == "__main__":
    main()
