"""Measured pipeline bubble: per stage, the fraction of each step's schedule time the GPU spends outside
microbatch forward/backward work, against the theory (p-1)/(m+p-1).

    torchrun --nproc_per_node=2 bench/bench_pipeline_bubble.py --pipeline-parallel-size 2 \
        --pipeline-schedule 1f1b [other minimal_pretrain flags]

Wraps the trainer's schedule from outside (no change to the training code): CUDA events around every
microbatch forward and backward give the busy time; events around the whole schedule give the step
time. Steps before --bubble-skip are warm-up. Rank 0 prints one line per stage and writes JSON to
--bubble-out.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minimal_pretrain  # noqa: E402
import parallel  # noqa: E402

SKIP = 5
samples = []  # per step: (busy ms, schedule ms)


def timed_schedule(schedule, m, fns, comm, topo):
    spans = []

    def timed(fn):
        def run(*a):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*a)
            end.record()
            spans.append((start, end))
            return out
        return run

    original_backward = parallel._backward
    parallel._backward = timed(original_backward)
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        begin.record()
        events = _schedule(schedule, m, parallel.StepFunctions(timed(fns.forward), fns.before_backward), comm, topo)
        finish.record()
    finally:
        parallel._backward = original_backward
    torch.cuda.synchronize()
    samples.append((sum(s.elapsed_time(e) for s, e in spans), begin.elapsed_time(finish)))
    return events


_schedule = parallel.run_schedule


def main() -> None:
    global SKIP
    argv = sys.argv[1:]
    out_path = "bench_pipeline_bubble.json"
    if "--bubble-out" in argv:
        i = argv.index("--bubble-out")
        out_path = argv[i + 1]
        del argv[i:i + 2]
    if "--bubble-skip" in argv:
        i = argv.index("--bubble-skip")
        SKIP = int(argv[i + 1])
        del argv[i:i + 2]
    args = minimal_pretrain.parse_args(argv)
    minimal_pretrain.run_schedule = timed_schedule
    # Gather every stage's samples before the trainer tears the process group down.
    original_destroy = minimal_pretrain.destroy_topology

    def report_then_destroy(topo, finished):
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = samples[SKIP:]
        busy = sum(b for b, _ in mine) / max(len(mine), 1)
        total = sum(t for _, t in mine) / max(len(mine), 1)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "busy_ms": busy, "step_ms": total})
        if rank == 0:
            p, m = args.pipeline_parallel_size, args.num_microbatches
            theory = (p - 1) / (m + p - 1)
            rows = []
            for g in gathered:
                idle = 1 - g["busy_ms"] / g["step_ms"]
                rows.append({**g, "idle_fraction": idle})
                print(f"rank {g['rank']}: schedule {g['step_ms']:.1f} ms, busy {g['busy_ms']:.1f} ms, "
                      f"idle {idle:.3f}  (theory (p-1)/(m+p-1) = {theory:.3f}, p={p}, m={m}, {args.pipeline_schedule})")
            json.dump({"schedule": args.pipeline_schedule, "p": p, "m": m, "theory": theory, "ranks": rows,
                       "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}, open(out_path, "w"), indent=2)
        original_destroy(topo, finished)

    minimal_pretrain.destroy_topology = report_then_destroy
    minimal_pretrain.train(args)


if __name__ == "__main__":
    main()
