"""Baseline for the DP benchmark: the same model, data and step as minimal_pretrain.py with DP=N, but
with gradients averaged by torch's DistributedDataParallel instead of our DataParallelGrads.

    torchrun --nproc_per_node=2 bench/ddp_baseline.py <minimal_pretrain flags> --output-dir DIR

Writes DIR/metrics.jsonl records {step, loss, tokens_per_sec} every --log-interval steps, like the
trainer. Only DP is supported (TP = PP = 1). This file exists to be measured against, nothing else.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import batch_offsets, get_batch, load_corpus  # noqa: E402
from minimal_pretrain import lr_at, model_config, parse_args  # noqa: E402
from model import GPT  # noqa: E402
from data_parallel import clip_grads_, grad_norm  # noqa: E402
from parallel import Topology  # noqa: E402


def main() -> None:
    args = parse_args(sys.argv[1:])
    assert args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1, "DP only"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    corpus = load_corpus(args.data, args.vocab_size)
    cfg = model_config(args, corpus.vocab_size)
    topo = Topology(device=device)  # world-1 view: DDP, not our groups, does the communication
    model = GPT(cfg, topo)
    model.init_weights(args.seed)
    model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], bucket_cap_mb=args.ddp_bucket_size_mb,
                                                    gradient_as_bucket_view=True)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True)
    m, mbs, T = args.num_microbatches, args.micro_batch_size, args.max_seq_length
    per_dp = args.global_batch_size // world
    out = None
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        out = open(os.path.join(args.output_dir, "metrics.jsonl"), "a", buffering=1)
    t0, last = time.perf_counter(), 0  # steps done at t0
    for step in range(args.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        offsets = batch_offsets(len(corpus.train), T, args.global_batch_size, args.seed, step, "train")
        x, y = get_batch(corpus.train, offsets[rank * per_dp:(rank + 1) * per_dp], T, device)
        xs, ys = x.split(mbs), y.split(mbs)
        opt.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=device)
        for i in range(m):
            sync = i == m - 1
            ctx = ddp.no_sync() if not sync else torch.enable_grad()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
                loss, moe_loss = ddp(xs[i], ys[i])
                ((loss + moe_loss) / m).backward()
            loss_sum += loss.detach()
        # Same global-norm clip as the trainer (DP ranks hold identical averaged gradients).
        clip_grads_(params, grad_norm(params, topo), args.grad_clip)
        opt.step()
        done = step + 1  # the trainer's convention: step N is the state after N optimizer steps
        if done % args.log_interval == 0 or step == 0 or done == args.max_steps:
            dist.all_reduce(loss_sum)
            if rank == 0:
                now = time.perf_counter()
                tps = args.global_batch_size * T * (done - last) / (now - t0)
                t0, last = now, done
                out.write(json.dumps({"step": done, "loss": loss_sum.item() / (m * world), "tokens_per_sec": tps}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
