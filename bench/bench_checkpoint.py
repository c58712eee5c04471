"""Checkpoint save and load time and size for one model on one device.

    python bench/bench_checkpoint.py                       # ~400M-parameter MoE (the issue 9 figure)
    python bench/bench_checkpoint.py --json out.json -- --hidden-size 512 ...   # any minimal_pretrain flags

It trains one step (so AdamW has its moments), then times `save_checkpoint` (every tensor copied to the
host, written, fsynced, renamed) and `load_checkpoint` into a freshly built model and optimizer, checks
that the loaded parameters and optimizer state equal the saved ones bit for bit, and prints the size on
disk. The page cache is not dropped: the load reads files the save has just written (say so when quoting).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minimal_pretrain  # noqa: E402
from checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from parallel import destroy_topology, init_topology  # noqa: E402
from errors import OneLineParser  # noqa: E402

# d_model 1024, 8 layers, all MoE with 16 experts of FFN 960, top-2: about 400M parameters.
MODEL_400M = ["--hidden-size", "1024", "--num-layers", "8", "--num-attention-heads", "16", "--num-key-value-heads", "4",
              "--num-experts", "16", "--num-experts-per-token", "2", "--expert-intermediate-size", "960",
              "--intermediate-size", "2816", "--max-seq-length", "512", "--global-batch-size", "8",
              "--micro-batch-size", "8", "--eval-iters", "0", "--no-progress", "--moe-metrics", "off"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("flags", nargs="*", help="minimal_pretrain flags after --, replacing the 400M model")
    a = p.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    args = minimal_pretrain.parse_args((a.flags or MODEL_400M) + ["--output-dir", str(root / "run")])
    device_type = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    precision = "bf16" if device_type == "cuda" else "fp32"
    topo = init_topology(1, 1, device_type)
    try:
        with contextlib.ExitStack() as cleanup:
            t = minimal_pretrain.setup(args, topo, precision, cleanup)
            t.model.train()
            minimal_pretrain.train_step(t, 0, record_stats=False)
            _sync(topo.device)
            n_params = sum(p.numel() for p in t.model.parameters())
            meta = minimal_pretrain.checkpoint_meta(t)

            start = time.perf_counter()
            path = save_checkpoint(root / "checkpoints", 1, t.model, t.optimizer, topo, meta)
            save_s = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.iterdir())

            fresh = minimal_pretrain.setup(args, topo, precision, cleanup)
            _sync(topo.device)
            start = time.perf_counter()
            load_checkpoint(path, fresh.model, fresh.optimizer, topo)
            _sync(topo.device)
            load_s = time.perf_counter() - start

            same = all(torch.equal(x, y) for x, y in zip(t.model.state_dict().values(), fresh.model.state_dict().values()))
            for p_old, p_new in zip(t.model.parameters(), fresh.model.parameters()):
                s_old, s_new = t.optimizer.state[p_old], fresh.optimizer.state[p_new]
                same = same and all(torch.equal(s_old[k].to(s_new[k].device), s_new[k]) for k in s_old)
    finally:
        destroy_topology(topo, finished=False)
    gpu = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    res = {"parameters": n_params, "checkpoint_bytes": size, "bytes_per_parameter": size / n_params,
           "save_s": save_s, "load_s": load_s, "save_GBps": size / save_s / 1e9, "load_GBps": size / load_s / 1e9,
           "bit_exact": same, "device": gpu, "torch": torch.__version__, "dir": str(path)}
    print("| parameters | checkpoint size | save | load | bit-exact |")
    print("|---|---|---|---|---|")
    print(f"| {n_params / 1e6:.1f}M | {size / 2**30:.2f} GiB ({size / n_params:.1f} B/param) | {save_s:.2f} s "
          f"({res['save_GBps']:.2f} GB/s) | {load_s:.2f} s ({res['load_GBps']:.2f} GB/s) | {same} |")
    print(f"device {gpu}, torch {torch.__version__}, checkpoint {path}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
