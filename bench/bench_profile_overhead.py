"""Cost of the named profiler ranges (profiling.phase) when --profile is off: step time as shipped against
a build without them, interleaved step by step in one training run.

    python bench/bench_profile_overhead.py [--configs launch gpu] [--budget-s 60] [--aa-control] [--out FILE.json]

How: the modules holding `with phase(...)` blocks (parallel, moe_layers, minimal_pretrain) are loaded from
their source with each such block rewritten as

    if _BENCH.strip:
        <body>                      # stripped: the range is gone, not even a no-op context is entered
    else:
        with phase(...):            # as shipped
            <body>

so one switch, flipped at the start of every step, moves the whole run between the shipped code and a
range-free build; both arms pay the same `if`. Steps go in blocks shipped, stripped, stripped, shipped
(which cancels linear drift), each timed from the start of one step to the start of the next (every step
logs, so every step ends with the device-to-host read of its statistics and the timing includes the
device). The overhead is the median over blocks of (shipped - stripped) / stripped with a 95% bootstrap
interval over blocks, and the mean likewise. Independently, the number of `phase` calls per step (counted
in one warm-up step) times the cost of one `with phase(name): pass` against `pass` (timeit) estimates it.

With --aa-control each configuration also runs with both arms shipped, which shows the noise of the
method itself (its interval should straddle 0).

Configurations: `launch` (8 MoE layers, 4 microbatches of 2 x 256 tokens: the host's kernel launches are
the bottleneck on a GPU, the worst case for host-side overhead), `gpu` (16 MoE layers, 2 microbatches of
8 x 2048 tokens: the GPU is the bottleneck), `tiny` (a CPU check that the script works). Each gets an
equal share of --budget-s (model set-up and 5 warm-up steps included); it stops at the first whole block
after its share, with at least 8 blocks.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
import timeit
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import profiling  # noqa: E402
from errors import OneLineParser  # noqa: E402

SWITCH = types.SimpleNamespace(strip=False)
INSTRUMENTED = ("parallel", "moe_layers", "minimal_pretrain")  # every module with a `with phase(...)` block


class _Switchable(ast.NodeTransformer):
    """with phase(...): body  ->  if _BENCH.strip: body  else: with phase(...): body"""

    def __init__(self):
        self.count = 0

    def visit_With(self, node: ast.With):
        self.generic_visit(node)  # nested ranges first
        call = node.items[0].context_expr
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "phase"):
            return node
        assert len(node.items) == 1, "a phase() range shares its with statement"
        self.count += 1
        test = ast.Attribute(value=ast.Name(id="_BENCH", ctx=ast.Load()), attr="strip", ctx=ast.Load())
        return ast.If(test=test, body=copy.deepcopy(node.body), orelse=[node])


def load_switchable(name: str) -> types.ModuleType:
    """Imports module `name` from its source with every phase() range made switchable (see above)."""
    path = os.path.join(ROOT, name + ".py")
    with open(path) as f:
        source = f.read()
    rewriter = _Switchable()
    tree = ast.fix_missing_locations(rewriter.visit(ast.parse(source, path)))
    if rewriter.count != source.count("with phase(") or rewriter.count == 0:
        raise SystemExit(f"{name}.py: rewrote {rewriter.count} phase ranges, the source has "
                         f"{source.count('with phase(')}")
    module = types.ModuleType(name)
    module.__file__, module._BENCH = path, SWITCH
    sys.modules[name] = module  # before running it: dataclasses and later imports look it up
    exec(compile(tree, path, "exec"), module.__dict__)
    module.phase_ranges = rewriter.count
    return module


# Loaded in dependency order, so every later `from parallel import ...` gets the switchable module.
MODULES = {name: load_switchable(name) for name in INSTRUMENTED}
minimal_pretrain = MODULES["minimal_pretrain"]

COMMON = ["--eval-iters", "0", "--no-progress", "--log-interval", "1", "--max-steps", "1000000", "--no-save",
          "--save-interval", "0",
          "--num-experts-per-token", "2", "--moe-layer-interval", "1"]
CONFIGS = {
    "launch": ["--hidden-size", "512", "--intermediate-size", "2048", "--num-layers", "8", "--num-attention-heads", "8",
               "--num-key-value-heads", "4", "--num-experts", "16", "--expert-intermediate-size", "1024",
               "--max-seq-length", "256", "--global-batch-size", "8", "--micro-batch-size", "2"],
    "gpu": ["--hidden-size", "768", "--intermediate-size", "3072", "--num-layers", "16", "--num-attention-heads", "12",
            "--num-key-value-heads", "4", "--num-experts", "16", "--expert-intermediate-size", "1024",
            "--max-seq-length", "2048", "--global-batch-size", "16", "--micro-batch-size", "8"],
    "tiny": ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-attention-heads", "4",
             "--num-key-value-heads", "2", "--num-experts", "4", "--expert-intermediate-size", "32",
             "--max-seq-length", "16", "--global-batch-size", "8", "--micro-batch-size", "2", "--device", "cpu"],
}
WARMUP = 5  # steps dropped; step COUNT_STEP among them counts the phase calls
COUNT_STEP = 2
ABBA = (False, True, True, False)  # stripped? per step of a block
MIN_BLOCKS = 8


class _Stop(Exception):
    """Raised from the step hook when the configuration's time is spent."""


def run_config(name: str, deadline: float, control: bool = False) -> dict:
    starts, stripped, calls = [], [], {}
    real_lr_at = minimal_pretrain.lr_at
    real_phase = profiling.phase

    def counting_phase(range_name):
        calls[range_name] = calls.get(range_name, 0) + 1
        return real_phase(range_name)

    def step_hook(step, args):  # called once at the start of every step, by the trainer
        starts.append(time.perf_counter())
        for m in MODULES.values():
            m.phase = counting_phase if step == COUNT_STEP else real_phase
        k = step - WARMUP
        if k >= MIN_BLOCKS * len(ABBA) and k % len(ABBA) == 0 and starts[-1] > deadline:
            raise _Stop
        stripped.append(k >= 0 and ABBA[k % len(ABBA)])
        SWITCH.strip = stripped[-1] and not control  # control: both arms run the shipped code
        return real_lr_at(step, args)

    minimal_pretrain.lr_at = step_hook
    try:
        with tempfile.TemporaryDirectory(prefix="bench_prof_") as out, contextlib.redirect_stdout(io.StringIO()):
            minimal_pretrain.train(minimal_pretrain.parse_args(COMMON + CONFIGS[name] + ["--output-dir", out]))
        raise SystemExit("the run ended before its time was spent")
    except _Stop:
        pass
    finally:
        minimal_pretrain.lr_at = real_lr_at
        for m in MODULES.values():
            m.phase = real_phase
        SWITCH.strip = False
    ms = 1000 * np.diff(starts)[WARMUP:]  # step i: start of i to start of i + 1
    off = np.array(stripped[WARMUP:len(starts) - 1])
    blocks = ms.reshape(-1, len(ABBA)), off.reshape(-1, len(ABBA))
    shipped_ms = np.array([b[~o].mean() for b, o in zip(*blocks)])
    stripped_ms = np.array([b[o].mean() for b, o in zip(*blocks)])
    rel = 100 * (shipped_ms / stripped_ms - 1)
    return {"flags": CONFIGS[name], "steps": int(ms.size), "blocks": int(rel.size),
            "median_shipped_ms": float(np.median(ms[~off])), "median_stripped_ms": float(np.median(ms[off])),
            "overhead_pct": float(np.median(rel)), "overhead_ci95_pct": bootstrap(rel, np.median),
            "mean_overhead_pct": float(rel.mean()), "mean_overhead_ci95_pct": bootstrap(rel, np.mean),
            "block_diff_us_median": float(np.median(1000 * (shipped_ms - stripped_ms))),
            "phase_calls_per_step": calls, "step_ms": ms.tolist(), "stripped": off.tolist()}


def bootstrap(values: np.ndarray, stat, n: int = 4000, seed: int = 0) -> list:
    """95% interval of stat(values), resampling values with replacement."""
    rng = np.random.default_rng(seed)
    stats = stat(rng.choice(values, (n, values.size)), axis=1)
    return [float(v) for v in np.percentile(stats, [2.5, 97.5])]


def per_call_ns(repeats: int = 7, number: int = 200_000) -> float:
    """Host cost of one `with phase(name): pass` beyond `pass`, with profiling off (best of `repeats`)."""
    assert not profiling._enabled
    env = {"phase": profiling.phase}
    ranged = min(timeit.repeat("with phase('moe/router'): pass", globals=env, repeat=repeats, number=number))
    bare = min(timeit.repeat("pass", repeat=repeats, number=number))
    return 1e9 * (ranged - bare) / number


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                    default=["launch", "gpu"] if torch.cuda.is_available() else ["tiny"])
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="seconds for all configurations together (start-up of the process not included)")
    ap.add_argument("--out", default="bench_profile_overhead.json")
    ap.add_argument("--aa-control", action="store_true",
                    help="also run each configuration with both arms shipped: the noise of the method")
    a = ap.parse_args()
    t0 = time.perf_counter()
    ns = per_call_ns()
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "common_flags": COMMON,
              "phase_ranges_in_source": {n: m.phase_ranges for n, m in MODULES.items()},
              "per_call_ns": ns, "configs": {}}
    runs = [(name + suffix, name, control) for name in a.configs
            for suffix, control in ((("", False), ("/A-A", True)) if a.aa_control else (("", False),))]
    for i, (label, name, control) in enumerate(runs):  # an equal share of the time left to each run
        share = (a.budget_s - (time.perf_counter() - t0)) / (len(runs) - i)
        result["configs"][label] = run_config(name, time.perf_counter() + share, control)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{result['device']}, torch {result['torch']}: named ranges with --profile off, as shipped vs stripped")
    print(f"one `with phase(name): pass` beyond `pass`: {ns:.1f} ns")
    print(f"{'config':<12}{'steps':>6}{'blocks':>7}{'shipped ms':>12}{'stripped ms':>13}{'overhead':>10}"
          f"{'95% interval':>22}{'ranges/step':>13}{'estimate':>22}")
    for name, r in result["configs"].items():
        lo, hi = r["overhead_ci95_pct"]
        n = sum(r["phase_calls_per_step"].values())
        est_us = n * ns / 1e3
        estimate = f"{est_us:.1f} us = {100 * est_us / 1e3 / r['median_stripped_ms']:.4f}%"
        print(f"{name:<12}{r['steps']:>6}{r['blocks']:>7}{r['median_shipped_ms']:>12.3f}{r['median_stripped_ms']:>13.3f}"
              f"{r['overhead_pct']:>+9.3f}%{f'[{lo:+.3f}%, {hi:+.3f}%]':>22}{n:>13}{estimate:>22}")
        lo, hi = r["mean_overhead_ci95_pct"]
        print(f"{'':<12}mean over blocks {r['mean_overhead_pct']:+.3f}% [{lo:+.3f}%, {hi:+.3f}%]; median block "
              f"difference {r['block_diff_us_median']:+.1f} us; ranges: "
              + ", ".join(f"{k} {v}" for k, v in sorted(r["phase_calls_per_step"].items(), key=lambda kv: -kv[1])))
    print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
