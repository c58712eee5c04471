"""Whole-model training throughput on one GPU, side by side in one run (issue 10, targets 4 and 5).

    python bench/bench_throughput.py moe [--micro-batch-size 8] [--steps 30] [--moe-variant="--no-moe-bf16-weights"]
    python bench/bench_throughput.py small --nanogpt DIR [--steps 100] [--compile-scopes blocks model] [--real-run]

moe:   the 8-layer d_model 1024 MoE model (32 experts, top-4, expert FFN 512, 72M active parameters)
       against its dense twin with the same active parameters (FFN 2048), both with --compile.
small: nanoGPT's shakespeare-char shape (6 layers, d_model 384, 6 heads, context 256, batch 64, bf16,
       compile, dropout 0 in both) trained by nanoGPT's own train.py (a checkout of karpathy/nanoGPT at
       DIR; it is not part of this project) and by ours (--num-experts 0 --intermediate-size 1024, so the
       parameter counts match), both on the same random tokens (vocabulary 65).
tokens/s: ours, the median of the logged windows after the first two (compilation); nanoGPT, the
median per-iteration time after the first 10 iterations. Writes JSON with every figure.
--real-run (small suite): a training run as nanoGPT's config does it: dropout 0.2 in both and nanoGPT's
evaluation cadence, every 250 iterations (default 1000 of them). nanoGPT's evaluation runs 200 batches of
each of its two splits, so ours runs 400 validation batches: the same forward work. tokens/s is then over
the run from 10 iterations after the first evaluation to the end, the later evaluations included: each
trainer compiles its evaluation graph at its first evaluation (nanoGPT's is at iteration 0, ours after
step 250), so the window starts past both. nanoGPT: the summed iteration times (an evaluating iteration's
includes the evaluation); ours: the records' wall-clock `elapsed_s`. Ours runs 10 steps more, so that its
evaluation at the last multiple of 250 falls inside the window as nanoGPT's does: both windows hold the same
evaluations.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import OneLineParser  # noqa: E402

MOE_COMMON = ["--hidden-size", "1024", "--num-layers", "8", "--num-attention-heads", "16", "--num-key-value-heads", "4",
              "--max-seq-length", "1024", "--global-batch-size", "32", "--compile", "--moe-metrics", "off",
              "--eval-iters", "0", "--no-progress", "--warmup-steps", "5", "--learning-rate", "3e-4", "--min-lr", "3e-5"]
MOE = ["--num-experts", "32", "--num-experts-per-token", "4", "--expert-intermediate-size", "512"]
DENSE = ["--num-experts", "0", "--intermediate-size", "2048"]
SMALL = ["--num-experts", "0", "--intermediate-size", "1024", "--hidden-size", "384", "--num-layers", "6",
         "--num-attention-heads", "6", "--num-key-value-heads", "6", "--max-seq-length", "256",
         "--global-batch-size", "64", "--micro-batch-size", "64", "--compile", "--eval-iters", "0", "--no-progress",
         "--vocab-size", "65", "--dropout", "0.0"]


def ours(name: str, flags: list, steps: int, log_every: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_{name}_")
    cmd = [sys.executable, os.path.join(ROOT, "minimal_pretrain.py"), *flags, "--max-steps", str(steps),
           "--log-interval", str(log_every), "--no-save", "--output-dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in l]
    windows = [r["tokens_per_sec"] for r in recs if r["step"] >= 2 * log_every]
    print(f"{name}: windows {[round(w) for w in windows]}", flush=True)
    return {"name": name, "flags": flags, "tokens_per_sec": statistics.median(windows), "windows": windows,
            "final_loss": recs[-1]["loss"]}


def random_tokens(data_dir: str, vocab: int = 65, n: int = 2_000_000) -> None:
    """nanoGPT's data layout: train.bin / val.bin (uint16) and meta.pkl with the vocabulary size."""
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", n // 10)):
        rng.integers(0, vocab, size, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
    chars = [chr(ord("!") + i) for i in range(vocab)]
    with open(os.path.join(data_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)


REAL_RUN_EVAL_INTERVAL, REAL_RUN_EVAL_ITERS = 250, 200  # nanoGPT's shakespeare-char config
SMALL_TOKENS_PER_ITER = 64 * 256  # batch_size * block_size * gradient_accumulation_steps of that config


def nanogpt(repo: str, dataset: str, iters: int, real_run: bool = False) -> dict:
    cadence = ([f"--eval_interval={REAL_RUN_EVAL_INTERVAL}", f"--eval_iters={REAL_RUN_EVAL_ITERS}", "--dropout=0.2"]
               if real_run else ["--eval_interval=1000000", "--eval_iters=1", "--dropout=0.0"])
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--dataset={dataset}", "--compile=True",
           "--dtype=bfloat16", f"--max_iters={iters}", *cadence, "--log_interval=1",
           "--always_save_checkpoint=False", "--wandb_log=False", f"--out_dir={tempfile.mkdtemp(prefix='nanogpt_')}"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    times = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)]
    # A real run is timed past the first evaluation (and its compilation); an evaluating iteration's time
    # includes the evaluation.
    first = REAL_RUN_EVAL_INTERVAL + 10 if real_run else 10
    timed = [t for i, t in times if i >= first]
    if real_run:
        seconds = sum(timed) / 1e3
        print(f"nanoGPT: {len(timed)} iterations in {seconds:.1f} s, evaluations included", flush=True)
        return {"name": "nanoGPT train.py", "tokens_per_sec": len(timed) * SMALL_TOKENS_PER_ITER / seconds,
                "seconds": seconds, "iterations": len(timed)}
    ms = statistics.median(timed)
    print(f"nanoGPT: median {ms:.2f} ms/iter over {len(timed)} iterations", flush=True)
    return {"name": "nanoGPT train.py", "tokens_per_sec": SMALL_TOKENS_PER_ITER / (ms * 1e-3), "ms_per_iter": ms}


def ours_real_run(name: str, flags: list, iters: int, eval_interval: int = REAL_RUN_EVAL_INTERVAL) -> dict:
    """Our trainer with nanoGPT's dropout and evaluation cadence; tokens/s by the records' wall-clock elapsed_s
    from 10 steps after the first evaluation to the end, the later evaluations included."""
    out = tempfile.mkdtemp(prefix=f"bench_{name.replace(' ', '_')}_")
    steps = iters + 10  # the evaluation at the last multiple of the interval lands inside the window
    start = eval_interval + 10
    if iters <= start:
        raise SystemExit(f"error: --steps {iters}: a real run is timed from step {start} (10 after the first "
                         f"evaluation) to the end; give more than {start}")
    cmd = [sys.executable, os.path.join(ROOT, "minimal_pretrain.py"), *flags, "--dropout", "0.2",
           "--eval-interval", str(eval_interval), "--eval-iters", str(2 * REAL_RUN_EVAL_ITERS),
           "--max-steps", str(steps), "--log-interval", "10", "--no-save", "--output-dir", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "elapsed_s" in r}
    seconds = recs[steps]["elapsed_s"] - recs[start]["elapsed_s"]
    print(f"{name}: {steps - start} steps in {seconds:.1f} s, evaluations included", flush=True)
    return {"name": name, "flags": flags, "tokens_per_sec": (steps - start) * SMALL_TOKENS_PER_ITER / seconds,
            "seconds": seconds, "iterations": steps - start, "final_loss": recs[steps]["loss"], "run_dir": out}


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", choices=["moe", "small"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, nargs="+", default=[8], help="moe suite: one pair of runs each")
    ap.add_argument("--compile-scopes", nargs="+", default=["blocks", "model"], choices=["blocks", "model"])
    ap.add_argument("--moe-variant", action="append", default=[], metavar="FLAGS",
                    help="moe suite: also run the MoE model with these extra flags (quoted; repeatable), "
                         "e.g. '--no-moe-bf16-weights'")
    ap.add_argument("--nanogpt", default=None, help="small suite: path of a nanoGPT checkout")
    ap.add_argument("--real-run", action="store_true",
                    help="small suite: dropout 0.2 and nanoGPT's evaluation cadence in both, timed over the whole run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    rows = []
    if a.suite == "moe":
        steps = a.steps or 30
        for mbs in a.micro_batch_size:
            for scope in a.compile_scopes:
                extra = ["--micro-batch-size", str(mbs), "--compile-scope", scope]
                moe = [ours(f"MoE mbs{mbs} {scope}", MOE_COMMON + MOE + extra, steps, 5)]
                for variant in a.moe_variant:
                    moe.append(ours(f"MoE mbs{mbs} {scope} {variant}", MOE_COMMON + MOE + extra + variant.split(),
                                    steps, 5))
                dense = ours(f"dense mbs{mbs} {scope}", MOE_COMMON + DENSE + extra, steps, 5)
                for r in moe:
                    r["moe_over_dense"] = r["tokens_per_sec"] / dense["tokens_per_sec"]
                rows += [*moe, dense]
    else:
        if not a.nanogpt:
            raise SystemExit("error: the small suite needs --nanogpt DIR (a checkout of karpathy/nanoGPT)")
        steps = a.steps or (1000 if a.real_run else 100)
        dataset = "random65"
        data_dir = os.path.join(a.nanogpt, "data", dataset)
        random_tokens(data_dir)
        base = nanogpt(a.nanogpt, dataset, steps, a.real_run)
        rows.append(base)
        for scope in a.compile_scopes:
            flags = SMALL + ["--data", data_dir, "--compile-scope", scope]
            r = ours_real_run(f"ours {scope}", flags, steps) if a.real_run else ours(f"ours {scope}", flags, steps, 10)
            r["ours_over_nanogpt"] = r["tokens_per_sec"] / base["tokens_per_sec"]
            rows.append(r)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for r in rows:
        ratio = r.get("moe_over_dense", r.get("ours_over_nanogpt"))
        print(f"{r['name']:<48} {r['tokens_per_sec']:>12,.0f} tokens/s" + (f"   ratio {ratio:.3f}" if ratio else ""))
    out = a.out or f"bench_throughput_{a.suite}.json"
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, open(out, "w"), indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
