"""Runs a training script in this process and records this rank's peak GPU memory.

    torchrun ... bench/peak_memory.py SCRIPT <its flags, including --output-dir DIR>

After SCRIPT's main() returns, writes DIR/peak_memory_rank{RANK}.json with the peak allocated and reserved
memory (GiB) of this rank's GPU, as torch's caching allocator counts them.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

import torch


def main() -> None:
    script, argv = sys.argv[1], sys.argv[2:]
    out = argv[argv.index("--output-dir") + 1]
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # the trainer ends with sys.exit(main())
        code = e.code or 0
    if torch.cuda.is_available():
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(out, f"peak_memory_rank{rank}.json"), "w") as f:
            json.dump({"allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                       "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
