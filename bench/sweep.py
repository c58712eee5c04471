"""A grid of short training runs (subprocesses of minimal_pretrain.py) and their summary.csv.

    python bench/sweep.py --out runs/sweep --num-experts 8,32 --top-k 1,2,4 --capacity-factors 0,1.0,1.25 \\
        --router softmax,sigmoid --bias-update 0,1e-3 --strategies soft-topk,hard-topk,expert-choice,hash \\
        --seeds 17,18,19 --max-steps 1000 [--parallel 4] [--timing-steps 60] -- <any other minimal_pretrain.py flags>

Strategies (--strategies), each a pair of minimal_pretrain.py flags: soft-topk (--moe-routing token-choice
--moe-gate soft, the default), hard-topk (token-choice, hard), expert-choice (expert-choice, soft; its
capacity factor 0 means 1.0), hash (hash, soft). A grid value that a strategy refuses (bias balancing with
expert choice or hash, sigmoid scores with hash) stops the sweep before anything runs, naming the run.

Every combination of the grid flags is a config; every config runs once per seed, each run in its own
directory OUT/<config>_s<seed> (train.log holds its console output; no checkpoints are saved unless
`--save-interval N` follows --). A run that finished is skipped, so re-running the same command resumes
an interrupted sweep (an interrupted run starts over). Runs go --parallel at a time (several short
runs share one GPU well, as small models leave it mostly idle).

Sharing a GPU slows every run by an amount that depends on its neighbours, so tokens/s of concurrent
runs is not a fair speed. With --timing-steps S each config is also trained once more, alone, for S
steps without evaluation (OUT/timing/<config>), one after the other inside the sweep's own process (so
they do not pay Python and CUDA start-up each), and that run's tokens/s is the one reported; the column
tokens_per_s_source says which kind it is.

summary.csv (rewritten at the end of every invocation) has one row per run (row = run) and one per
config (row = config, with n = finished seeds):
  config columns  num_experts, top_k, capacity_factor, router, bias_update, strategy, and seed for runs
  val_loss        the final validation loss (last evaluation; expert choice: routed by top-k, causal)
  tokens_per_s    median of the logged tokens_per_sec over the last 3/4 of the logged steps
  drop_rate, token_drop_rate, used_capacity   means of moe/drop_rate, moe/token_drop_rate and
                  moe/used_capacity over the last 1/4 of the logged steps (the drop rates are 0 and
                  used_capacity empty without a capacity)
  load_cv, gate_entropy, mean_topk_prob   moe/cv_mean, moe/gate_entropy_mean, moe/mean_topk_prob of the
                  last logged step
  val_loss_expert_choice   expert choice only: the final validation loss routed by expert choice over
                  each validation microbatch, as in training (not causal)
  active_params, total_params   of the config's model (model.count_parameters)
  for config rows, <metric>_std is the sample standard deviation over seeds (empty for one seed)
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from errors import InputError, OneLineParser  # noqa: E402
from moe_config import ROUTER_SCORES  # noqa: E402

GRID_FLAGS = {  # sweep flag -> minimal_pretrain flag
    "num_experts": "--num-experts", "top_k": "--num-experts-per-token", "capacity_factor": "--moe-capacity-factor",
    "router": "--moe-router-score", "bias_update": "--moe-bias-update-rate"}
STRATEGIES = {  # sweep strategy -> minimal_pretrain flags
    "soft-topk": ["--moe-routing", "token-choice", "--moe-gate", "soft"],
    "hard-topk": ["--moe-routing", "token-choice", "--moe-gate", "hard"],
    "expert-choice": ["--moe-routing", "expert-choice", "--moe-gate", "soft"],
    "hash": ["--moe-routing", "hash", "--moe-gate", "soft"]}
CONFIG_COLUMNS = [*GRID_FLAGS, "strategy"]
OWNED = set(GRID_FLAGS.values()) | {"--seed", "--max-steps", "--output-dir", "--moe-routing", "--moe-gate"}  # per run
NO_CHECKPOINTS = ["--no-save", "--save-interval", "0"]  # a sweep compares configs; `-- --save-interval N` overrides
METRICS = ("val_loss", "tokens_per_s", "drop_rate", "load_cv", "token_drop_rate", "used_capacity", "gate_entropy",
           "mean_topk_prob", "val_loss_expert_choice")
COLUMNS = (["row", "config", *CONFIG_COLUMNS, "seed", "n", "status"]
           + [c for m in METRICS for c in (m, m + "_std")] + ["active_params", "total_params", "tokens_per_s_source"])
DONE = "sweep_run.json"  # written into a run directory when its process exits


@dataclass(frozen=True)
class Config:
    num_experts: int
    top_k: int
    capacity_factor: float
    router: str
    bias_update: float
    strategy: str = "soft-topk"

    @property
    def label(self) -> str:  # the default strategy adds no suffix, so sweeps from before the axis resume
        suffix = "" if self.strategy == "soft-topk" else f"_{self.strategy}"
        return f"E{self.num_experts}_k{self.top_k}_cf{self.capacity_factor:g}_{self.router}_bias{self.bias_update:g}{suffix}"

    def flags(self) -> list:
        return [flag for name, opt in GRID_FLAGS.items() for flag in (opt, str(getattr(self, name)))] + \
            STRATEGIES[self.strategy]


@dataclass
class Run:
    config: Config
    seed: Optional[int]  # None: the timing run of the config
    out_dir: str
    argv: list  # minimal_pretrain.py flags


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------
def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    p.add_argument("--out", default="runs/sweep", help="sweep directory (run directories and summary.csv)")
    p.add_argument("--num-experts", type=_list(int), default=[8], help="comma-separated expert counts")
    p.add_argument("--top-k", type=_list(int), default=[2], help="comma-separated top-k values")
    p.add_argument("--capacity-factors", type=_list(float), default=[0.0], help="comma-separated, 0 = no-drop")
    p.add_argument("--router", type=_list(str), default=["softmax"], help="comma-separated: softmax, sigmoid")
    p.add_argument("--bias-update", type=_list(float), default=[0.0],
                   help="comma-separated --moe-bias-update-rate values, 0 = off")
    p.add_argument("--strategies", type=_list(str), default=["soft-topk"],
                   help=f"comma-separated routing strategies: {', '.join(STRATEGIES)}")
    p.add_argument("--seeds", type=_list(int), default=[17], help="comma-separated seeds")
    p.add_argument("--max-steps", type=int, default=300, help="steps of every run")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--timing-steps", type=int, default=0,
                   help="also time each config alone for this many steps (0 = report the runs' own tokens/s)")
    return p


def parse(argv: list) -> tuple:
    """(sweep args, passthrough minimal_pretrain flags), validated; raises InputError."""
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    else:
        passthrough = []
    args = build_parser().parse_args(argv)
    for name in ("max_steps", "parallel"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.timing_steps < 0:
        raise InputError(f"--timing-steps must be >= 0, got {args.timing_steps}")
    for flag, values in (("--capacity-factors", args.capacity_factors), ("--bias-update", args.bias_update)):
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise InputError(f"{flag} must hold finite numbers >= 0, got {values}")
    if any(r not in ROUTER_SCORES for r in args.router):
        raise InputError(f"--router must be a comma-separated subset of {','.join(ROUTER_SCORES)}, got "
                         f"{','.join(args.router)}")
    if any(st not in STRATEGIES for st in args.strategies):
        raise InputError(f"--strategies must be a comma-separated subset of {','.join(STRATEGIES)}, "
                         f"got {','.join(args.strategies)}")
    clash = sorted({a.split("=")[0] for a in passthrough} & OWNED)
    if clash:
        raise InputError(f"{', '.join(clash)} after -- : the sweep sets it per run (use its own flag)")
    return args, passthrough


def make_runs(args, passthrough: list) -> tuple:
    """(quality runs, timing runs) of the grid."""
    configs = [Config(*values) for values in itertools.product(
        args.num_experts, args.top_k, args.capacity_factors, args.router, args.bias_update, args.strategies)]
    runs, timing = [], []
    for cfg in configs:
        common = [*NO_CHECKPOINTS, *passthrough, *cfg.flags(), "--no-progress"]
        for seed in args.seeds:
            out = os.path.join(args.out, f"{cfg.label}_s{seed}")
            runs.append(Run(cfg, seed, out, [*common, "--seed", str(seed), "--max-steps", str(args.max_steps),
                                             "--output-dir", out]))
        if args.timing_steps:
            out = os.path.join(args.out, "timing", cfg.label)
            # Log every few steps (each log step records statistics), no evaluation.
            timing.append(Run(cfg, None, out, [*common, "--seed", str(args.seeds[0]), "--max-steps",
                                               str(args.timing_steps), "--output-dir", out, "--eval-iters", "0",
                                               "--log-interval", str(max(1, args.timing_steps // 12))]))
    return runs, timing


def check_run_flags(runs: list) -> None:
    """Every run's flags through the trainer's own parser and validation (config.py), before anything starts."""
    import config
    for run in runs:
        parser = config.build_parser()
        parser.prog = f"minimal_pretrain.py (run {os.path.basename(run.out_dir)})"
        try:
            config.validate(parser.parse_args(run.argv), 1)
        except InputError as e:
            raise InputError(f"run {os.path.basename(run.out_dir)}: {e}")


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
def finished(run: Run) -> bool:
    """True if the run exited 0 with these flags before; an earlier run with other flags is an error."""
    path = os.path.join(run.out_dir, DONE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        done = json.load(f)
    if done.get("argv") != run.argv:
        raise InputError(f"{run.out_dir} was run with other flags ({' '.join(done.get('argv', []))}); "
                         f"use another --out")
    return done.get("returncode") == 0


def launch(run: Run, env: dict) -> tuple:
    os.makedirs(run.out_dir, exist_ok=True)
    log = open(os.path.join(run.out_dir, "train.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "minimal_pretrain.py"), *run.argv],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
    return proc, log, time.perf_counter()


def run_in_process(runs: list, what: str) -> int:
    """The timing runs: one after the other in this process, each alone on the device; returns how many
    failed. Console output goes to the run's train.log as for the subprocess runs."""
    import contextlib
    import traceback

    import minimal_pretrain
    todo = [r for r in runs if not finished(r)]
    print(f"{what}: {len(runs)} runs, {len(runs) - len(todo)} finished before (skipped), {len(todo)} to run, "
          f"one at a time in this process", flush=True)
    failed = 0
    for i, run in enumerate(todo):
        os.makedirs(run.out_dir, exist_ok=True)
        t0 = time.perf_counter()
        with open(os.path.join(run.out_dir, "train.log"), "w") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    minimal_pretrain.train(minimal_pretrain.parse_args(run.argv))
                    rc = 0
                except Exception:  # noqa: BLE001 - recorded, the sweep goes on with the next config
                    traceback.print_exc()
                    rc = 1
        wall = time.perf_counter() - t0
        with open(os.path.join(run.out_dir, DONE), "w") as f:
            json.dump({"argv": run.argv, "returncode": rc, "wall_s": wall}, f)
        failed += rc
        status = "ok" if rc == 0 else f"FAILED (see {run.out_dir}/train.log)"
        print(f"[{i + 1}/{len(todo)}] timing {os.path.basename(run.out_dir)}: {status}, {wall:.1f} s", flush=True)
    return failed


def run_all(runs: list, parallel: int, what: str) -> int:
    """Runs the unfinished ones, `parallel` at a time; returns how many failed."""
    todo = [r for r in runs if not finished(r)]
    skipped = len(runs) - len(todo)
    print(f"{what}: {len(runs)} runs, {skipped} finished before (skipped), {len(todo)} to run, {parallel} at a time",
          flush=True)
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))  # CPU runs: share the cores
    running, failed, done = [], 0, 0
    while todo or running:
        while todo and len(running) < parallel:
            run = todo.pop(0)
            running.append((run, *launch(run, env)))
        time.sleep(0.2)
        for item in list(running):
            run, proc, log, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            wall = time.perf_counter() - t0
            with open(os.path.join(run.out_dir, DONE), "w") as f:
                json.dump({"argv": run.argv, "returncode": proc.returncode, "wall_s": wall}, f)
            done += 1
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {run.out_dir}/train.log)"
            failed += proc.returncode != 0
            print(f"[{done}/{len(runs) - skipped}] {os.path.basename(run.out_dir)}: {status}, {wall:.1f} s", flush=True)
    return failed


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def run_metrics(run: Run) -> dict:
    """The summary numbers of one finished run, from its metrics.jsonl (last run in the file)."""
    from plot_run import read_last_run
    recs, _ = read_last_run(os.path.join(run.out_dir, "metrics.jsonl"))
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if r.get("val_loss") is not None]
    tps = [r["tokens_per_sec"] for r in train[len(train) // 4:] if r.get("tokens_per_sec")]

    def tail_mean(key):  # over the last quarter of the logged steps; None if never logged
        values = [r[key] for r in train[len(train) * 3 // 4:] if r.get(key) is not None]
        return statistics.mean(values) if values else None

    def last(key):
        return train[-1].get(key) if train else None
    no_capacity = run.config.capacity_factor == 0 and run.config.strategy != "expert-choice"
    out = {"val_loss": evals[-1]["val_loss"] if evals else None,
           "tokens_per_s": statistics.median(tps) if tps else None,
           "load_cv": last("moe/cv_mean"), "used_capacity": tail_mean("moe/used_capacity"),
           "gate_entropy": last("moe/gate_entropy_mean"), "mean_topk_prob": last("moe/mean_topk_prob"),
           "val_loss_expert_choice": evals[-1].get("val_loss_expert_choice") if evals else None}
    for key in ("drop_rate", "token_drop_rate"):
        value = tail_mean(f"moe/{key}")
        out[key] = value if value is not None else (0.0 if no_capacity else None)
    return out


def param_counts(run: Run) -> tuple:
    from model import ModelConfig, count_parameters
    with open(os.path.join(run.out_dir, "config.json")) as f:
        model = json.load(f)["model"]
    return count_parameters(ModelConfig.from_dict(model))


def summarize(runs: list, timing: list, out: str, parallel: int) -> str:
    timing_tps = {}
    for t in timing:
        if finished(t):
            timing_tps[t.config] = run_metrics(t)["tokens_per_s"]
    source = "isolated" if timing else ("concurrent x%d" % parallel if parallel > 1 else "sequential")
    rows, by_config = [], {}
    for run in runs:
        row = {"row": "run", "config": run.config.label, **{k: getattr(run.config, k) for k in CONFIG_COLUMNS},
               "seed": run.seed, "n": 1}
        if finished(run):
            m = run_metrics(run)
            m["tokens_per_s"] = timing_tps.get(run.config, m["tokens_per_s"]) if timing else m["tokens_per_s"]
            total, active = param_counts(run)
            row.update(status="ok", active_params=active, total_params=total, tokens_per_s_source=source, **m)
            by_config.setdefault(run.config, []).append(row)
        else:
            row["status"] = "failed" if os.path.isfile(os.path.join(run.out_dir, DONE)) else "missing"
        rows.append(row)
    for cfg, members in by_config.items():
        row = {"row": "config", "config": cfg.label, **{k: getattr(cfg, k) for k in CONFIG_COLUMNS}, "seed": "",
               "n": len(members), "status": "ok", "active_params": members[0]["active_params"],
               "total_params": members[0]["total_params"], "tokens_per_s_source": source}
        for m in METRICS:
            values = [r[m] for r in members if r.get(m) is not None]
            row[m] = statistics.mean(values) if values else None
            row[m + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    path = os.path.join(out, "summary.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS})
    return path


def main(argv: Optional[list] = None) -> int:
    try:
        args, passthrough = parse(sys.argv[1:] if argv is None else argv)
        runs, timing = make_runs(args, passthrough)
        check_run_flags(runs + timing)
        for r in runs + timing:
            finished(r)  # a directory made with other flags: stop before running anything
    except InputError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    failed = run_all(runs, args.parallel, "sweep")
    if timing:
        failed += run_in_process(timing, "timing")
    path = summarize(runs, timing, args.out, args.parallel)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
