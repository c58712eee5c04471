"""Cost of the MoE load statistics: step time with --moe-metrics detailed against off, on one GPU.

    python bench/bench_moe_metrics.py [--batches large small] [--interleaved-steps 200] [--repeats 2]
                                      [--steps 30] [--attribute-steps 15] [--gc-interval 0] [--out FILE.json]

A model with 16 MoE layers (16 experts, top-2, d_model 768), logging every step: the worst case, as
the statistics are then recorded, packed, reduced and read back at every step. Two batch sizes:

- large: 32 sequences of 2048 tokens per step (64k tokens). The GPU is the bottleneck, as in a real run.
- small: 16 sequences of 1024 tokens per step (16k tokens). The host's kernel launches are the
  bottleneck, so every microsecond of Python the statistics add is a microsecond of step time.

Three measurements per batch size, all in one process:

1. interleaved: one `--moe-metrics detailed` run in which the statistics are switched off at every other
   step, in the order on, off, off, on (which cancels linear drift). An off step does what
   `--moe-metrics off` does (it records nothing and computes no MoE metric), except that the packed
   tensor keeps its full size: a few KB of zeros. Each
   step is timed from the start of one step to the start of the next, so it includes its own logging.
   Drift between runs (about 2% on the large batch, 10% on the small one) cannot enter the comparison.
   The overhead is the median, and the mean, over on-off-off-on blocks of (on - off) / off, each with a
   95% bootstrap interval over blocks. Python garbage-collector pauses are counted per step too.
2. separate: whole runs with --moe-metrics off and detailed, alternating; median step per mode.
3. attribute: one more run per mode that times the host code of the statistics (StepStats.end_microbatch,
   pack_step_stats, moe_metrics, the log write), with a synchronize before each timed call so that the
   timer never counts a launch that waits for a full GPU queue. In a launch-bound step, host time added
   is step time added: detailed minus off, over the median step, bounds the overhead there.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import minimal_pretrain  # noqa: E402
import moe_stats  # noqa: E402
import run_log  # noqa: E402
from errors import OneLineParser  # noqa: E402

MODEL = ["--hidden-size", "768", "--intermediate-size", "3072", "--num-layers", "16", "--num-attention-heads", "12",
         "--num-key-value-heads", "4", "--num-experts", "16", "--num-experts-per-token", "2",
         "--moe-layer-interval", "1", "--expert-intermediate-size", "1024", "--eval-iters", "0", "--no-progress",
         "--log-interval", "1"]
BATCHES = {"large": ["--max-seq-length", "2048", "--global-batch-size", "32", "--micro-batch-size", "16"],
           "small": ["--max-seq-length", "1024", "--global-batch-size", "16", "--micro-batch-size", "8"]}
WARMUP = 5
ABBA = (True, False, False, True)

# --- instrumentation, installed once: the real functions keep running, these only observe or switch ---
state = {"sync": False, "interleave": False, "stats_on": [], "step_start": [], "host_s": {}, "gc": []}


def gc_callback(phase: str, info: dict) -> None:
    """Python garbage collections per step: (generation, seconds), to tell collector pauses from the rest."""
    if phase == "start":
        gc_callback.t0 = time.perf_counter()
    elif state["gc"]:
        state["gc"][-1].append((info["generation"], time.perf_counter() - gc_callback.t0))


def timed(name: str, fn):
    def wrapper(*a, **k):
        if state["sync"]:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            state["host_s"][name] = state["host_s"].get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def instrument() -> None:
    real_reset, real_metrics = moe_stats.StepStats.reset, minimal_pretrain.moe_metrics

    def reset(self, enabled=None):
        if not hasattr(self, "counts"):  # the first call comes from StepStats.__init__, not from a step
            return real_reset(self, enabled)
        state["step_start"].append(time.perf_counter())
        state["gc"].append([])
        if state["interleave"] and enabled:  # the trainer wants statistics at this step: maybe switch off
            enabled = ABBA[(len(state["step_start"]) - 1) % len(ABBA)]
        state["stats_on"].append(bool(enabled))
        return real_reset(self, enabled)

    def metrics(layout, flat, detailed=False, top_n=5):
        return real_metrics(layout, flat, detailed, top_n) if state["stats_on"][-1] else {}

    moe_stats.StepStats.reset = reset
    gc.callbacks.append(gc_callback)
    minimal_pretrain.moe_metrics = timed("moe_metrics", metrics)
    moe_stats.StepStats.end_microbatch = timed("end_microbatch", moe_stats.StepStats.end_microbatch)
    minimal_pretrain.pack_step_stats = timed("pack_step_stats", minimal_pretrain.pack_step_stats)
    run_log.RunLog.log = timed("log_write", run_log.RunLog.log)


def one_run(batch: str, mode: str, steps: int, interleave: bool = False, sync: bool = False) -> dict:
    args = minimal_pretrain.parse_args(MODEL + BATCHES[batch] + ["--moe-metrics", mode, "--max-steps", str(steps),
                                                                  "--no-save", "--output-dir", tempfile.mkdtemp(prefix="bench_moe_")])
    state.update(sync=sync, interleave=interleave, stats_on=[], step_start=[], host_s={}, gc=[])
    res = minimal_pretrain.train(args)
    tokens = args.global_batch_size * args.max_seq_length
    starts = state["step_start"]
    return {"logged_step_ms": [1000 * tokens / r["tokens_per_sec"] for r in res.records[WARMUP:]],
            "step_ms": [1000 * (b - a) for a, b in zip(starts, starts[1:])],  # start to start: step i with its logging
            "stats_on": state["stats_on"][:-1], "gc": state["gc"][:-1],
            "host_ms_per_step": {k: 1000 * v / steps for k, v in state["host_s"].items()}}


def bootstrap(values: np.ndarray, n: int = 4000, seed: int = 0, stat=np.median) -> tuple[float, float]:
    """95% interval of stat(values) (median by default), resampling values with replacement."""
    rng = np.random.default_rng(seed)
    meds = stat(rng.choice(values, (n, values.size)), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def interleaved(batch: str, steps: int) -> dict:
    run = one_run(batch, "detailed", steps, interleave=True)
    ms, on = np.array(run["step_ms"]), np.array(run["stats_on"])
    first = (WARMUP // len(ABBA) + 1) * len(ABBA)  # whole blocks after the warm-up
    blocks = [(ms[i:i + 4][on[i:i + 4]].mean(), ms[i:i + 4][~on[i:i + 4]].mean())
              for i in range(first, len(ms) - 3, len(ABBA))]
    rel = np.array([100 * (a / b - 1) for a, b in blocks])
    gc_ms = np.array([1000 * sum(t for _, t in g) for g in run["gc"]])
    return {"steps": steps, "blocks": len(blocks), "median_on_ms": float(np.median(ms[first:][on[first:]])),
            "median_off_ms": float(np.median(ms[first:][~on[first:]])), "overhead_pct": float(np.median(rel)),
            "overhead_ci95_pct": bootstrap(rel), "mean_overhead_pct": float(rel.mean()),
            "mean_overhead_ci95_pct": bootstrap(rel, stat=np.mean), "block_overhead_pct": rel.tolist(),
            "step_ms": ms.tolist(), "stats_on": on.tolist(), "gc": run["gc"],
            "gc_ms_per_step": {"on": float(gc_ms[first:][on[first:]].mean()), "off": float(gc_ms[first:][~on[first:]].mean())}}


def separate(batch: str, repeats: int, steps: int) -> dict:
    per_mode = {"off": [], "detailed": []}
    for _ in range(repeats):
        for mode in per_mode:
            per_mode[mode].append(one_run(batch, mode, steps)["logged_step_ms"])
    med = {m: statistics.median(x for run in runs for x in run) for m, runs in per_mode.items()}
    return {"repeats": repeats, "steps": steps, "median_step_ms": med,
            "overhead_pct": 100 * (med["detailed"] / med["off"] - 1),
            "run_medians_ms": {m: [statistics.median(r) for r in runs] for m, runs in per_mode.items()}}


def attribute(batch: str, steps: int) -> dict:
    host = {mode: one_run(batch, mode, steps, sync=True)["host_ms_per_step"] for mode in ("off", "detailed")}
    return {"steps": steps, "host_ms_per_step": host,
            "detailed_minus_off_ms": {k: v - host["off"].get(k, 0.0) for k, v in host["detailed"].items()}}


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    ap.add_argument("--interleaved-steps", type=int, default=200, help="steps of the interleaved run (0: skip)")
    ap.add_argument("--repeats", type=int, default=2, help="separate runs per mode (0: skip)")
    ap.add_argument("--steps", type=int, default=30, help="steps per separate run (the first 5 are dropped)")
    ap.add_argument("--attribute-steps", type=int, default=15, help="steps per host-time run (0: skip)")
    ap.add_argument("--gc-interval", type=int, default=0, help="passed to minimal_pretrain.py")
    ap.add_argument("--out", default="bench_moe_metrics.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_metrics.py measures GPU step time: it needs a CUDA device")
    for flag, value, least in (("--interleaved-steps", a.interleaved_steps, WARMUP + 4 * len(ABBA)),
                               ("--steps", a.steps, WARMUP + 2), ("--attribute-steps", a.attribute_steps, 2)):
        if value and value < least:
            raise SystemExit(f"{flag} must be 0 or at least {least}")
    instrument()
    MODEL.extend(["--gc-interval", str(a.gc_interval)])
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "model_flags": MODEL, "batches": {}}
    for batch in a.batches:
        entry = result["batches"][batch] = {"flags": BATCHES[batch]}
        if a.interleaved_steps:
            entry["interleaved"] = interleaved(batch, a.interleaved_steps)
        if a.repeats:
            entry["separate"] = separate(batch, a.repeats, a.steps)
        if a.attribute_steps:
            entry["attribute"] = attribute(batch, a.attribute_steps)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nGPU: {result['gpu']}, torch {result['torch']}; 16 MoE layers x 16 experts, logging every step")
    print(f"{'batch':<7}{'measurement':<36}{'off ms':>9}{'detailed ms':>13}{'overhead':>10}{'95% interval':>20}")
    for batch, e in result["batches"].items():
        if "interleaved" in e:
            i = e["interleaved"]
            lo, hi = i["overhead_ci95_pct"]
            print(f"{batch:<7}{'interleaved, median of ' + str(i['blocks']) + ' blocks':<36}{i['median_off_ms']:>9.1f}"
                  f"{i['median_on_ms']:>13.1f}{i['overhead_pct']:>+9.2f}%{f'[{lo:+.2f}%, {hi:+.2f}%]':>20}")
            lo, hi = i["mean_overhead_ci95_pct"]
            print(f"{batch:<7}{'interleaved, mean of ' + str(i['blocks']) + ' blocks':<36}{'':>9}{'':>13}"
                  f"{i['mean_overhead_pct']:>+9.2f}%{f'[{lo:+.2f}%, {hi:+.2f}%]':>20}"
                  f"   (Python GC ms/step: on {i['gc_ms_per_step']['on']:.2f}, off {i['gc_ms_per_step']['off']:.2f})")
        if "separate" in e:
            s = e["separate"]
            label = f"separate runs, {s['repeats']} per mode"
            print(f"{batch:<7}{label:<36}{s['median_step_ms']['off']:>9.1f}{s['median_step_ms']['detailed']:>13.1f}"
                  f"{s['overhead_pct']:>+9.2f}%")
        if "attribute" in e:
            d = e["attribute"]["detailed_minus_off_ms"]
            base = (e.get("interleaved", {}).get("median_off_ms") or e.get("separate", {}).get("median_step_ms", {}).get("off"))
            share = f" = {100 * sum(d.values()) / base:.2f}% of the step" if base else ""
            print(f"  {batch}: host time in the statistics code, detailed minus off, per step: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in d.items()) + f"; total {sum(d.values()):.3f} ms{share}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
