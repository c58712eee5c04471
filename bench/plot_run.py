"""Plot a training run from its metrics.jsonl: losses, MoE load balance, per-layer expert utilization;
or overlay several runs.

    python bench/plot_run.py RUN_DIR [--out DIR]
    python bench/plot_run.py RUN1 RUN2 ... [--out DIR]

Needs matplotlib (pip install matplotlib); the training script itself does not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from types import ModuleType
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import InputError, OneLineParser  # noqa: E402

DESCRIPTION = """Writes loss.png, load_cv.png and utilization_heatmap.png for RUN_DIR/metrics.jsonl.
With several run directories, writes overlay_loss.png (training loss, smoothed, and validation loss of
every run) and overlay_load_cv.png (moe/cv_mean), by default into overlay/ beside the first run.
metrics.jsonl is appended to by every run in RUN_DIR, so it may hold several runs one after another:
only the LAST run is plotted (a new run starts where the step number goes back down, or a training
step repeats). The heatmap needs the expert count matrix, logged with --moe-metrics detailed or
--moe-detailed-every N."""


def read_last_run(path: str) -> tuple[list[dict], int]:
    """The records of the last run in the file, and how many runs the file holds."""
    runs: list[list[dict]] = []
    prev_step = None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # e.g. a half-written last line of a killed run
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            step = rec["step"]
            # Within a run steps never decrease, and the eval record of step s follows its training
            # record; so a lower step, or a training record repeating the step, starts a new run.
            if prev_step is None or step < prev_step or (step == prev_step and "loss" in rec):
                runs.append([])
            runs[-1].append(rec)
            prev_step = step
    if not runs:
        raise InputError(f"{path} holds no records")
    return runs[-1], len(runs)


def run_title(run_dir: str) -> tuple[str, Optional[int]]:
    """The run's name with a short model summary from config.json, and its expert-parallel size."""
    name = os.path.basename(os.path.abspath(run_dir))
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        m = cfg["model"]
        ep = cfg["tensor_parallel_size"]  # expert parallelism is tied to TP
        return (f"{name}: {m['num_layers']} layers, {m['num_experts']} experts top-{m['num_experts_per_token']}, "
                f"EP {ep}, {cfg['world_size']} rank(s)"), ep
    except (OSError, ValueError, KeyError, TypeError):
        return name, None  # the plots do not need it


def series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a finite number under key."""
    pts = [(r["step"], r[key]) for r in recs
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average, seeded with the first value so it does not start at 0."""
    out, acc, alpha = [], values[0], 2 / (span + 1)
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_loss(plt: ModuleType, recs: list[dict], title: str, path: str) -> str:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
    steps, loss = series(recs, "loss")
    if len(loss) > 100:  # long runs: the raw per-step loss is noise around a trend, so show both
        ax1.plot(steps, loss, lw=0.6, color="tab:blue", alpha=0.3)
        ax1.plot(steps, ema(loss, len(loss) // 50), lw=1.2, color="tab:blue", label="train LM loss (EMA)")
    else:
        ax1.plot(steps, loss, lw=1, color="tab:blue", label="train LM loss")
    vs, vv = series(recs, "val_loss")
    if vs:
        ax1.plot(vs, vv, "o-", color="tab:orange", ms=5, label="validation loss")
    ax1.set_ylabel("cross-entropy (nats)")
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(*series(recs, "aux_loss"), lw=1, color="tab:green", label="aux loss (1.0 = balanced)")
    ax2.plot(*series(recs, "z_loss"), lw=1, color="tab:red", label="z loss")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set_ylabel("router loss (unscaled)")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    return save(plt, fig, path)


def plot_load(plt: ModuleType, recs: list[dict], title: str, path: str, ep: Optional[int]) -> str:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    steps, mean = series(recs, "moe/cv_mean")
    _, lo = series(recs, "moe/cv_min")
    _, hi = series(recs, "moe/cv_max")
    if len(lo) == len(hi) == len(steps):
        ax1.fill_between(steps, lo, hi, color="tab:blue", alpha=0.2, lw=0, label="min..max over layers")
    ax1.plot(steps, mean, color="tab:blue", lw=1.2, label="mean over layers")
    ax1.set_ylabel("CV of tokens per expert")
    ax1.set_ylim(bottom=0)
    ax1.set_title(title)
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(*series(recs, "moe/max_overload_factor"), color="tab:red", lw=1.2, label="max overload factor")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":", label="balanced")
    ax2.set_ylabel("busiest EP rank / balanced")
    ax2.set_ylim(bottom=0.9, top=max(ax2.get_ylim()[1], 1.5))
    if ep == 1:  # so that a flat line at 1 is not mistaken for perfect balance
        ax2.text(0.5, 0.5, "expert-parallel size 1: one rank holds every expert, so this is always 1",
                 transform=ax2.transAxes, ha="center", color="gray")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.grid(alpha=0.3)
    return save(plt, fig, path)


def plot_heatmap(plt: ModuleType, recs: list[dict], title: str, path: str) -> Optional[str]:
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FixedLocator, MaxNLocator

    rows = [r for r in recs if isinstance(r.get("moe/counts"), dict)]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows], dtype=float)
    # Cell edges halfway between logged steps, so sparse logging (--moe-detailed-every) leaves no gaps.
    d = np.diff(steps) if len(steps) > 1 else np.ones(1)  # one logged step: a cell 1 step wide
    x = np.concatenate([[steps[0] - d[0] / 2], steps[:-1] + d / 2, [steps[-1] + d[-1] / 2]])
    layers = sorted(rows[0]["moe/counts"], key=int)
    util = {}  # layer -> [E, steps]; u = count / (the count of a perfectly even split)
    for layer in layers:
        c = np.array([r["moe/counts"][layer] for r in rows], dtype=float).T
        util[layer] = c / np.maximum(c.mean(axis=0, keepdims=True), 1e-12)
    # Log scale centred at 1 so that 2x overloaded and half-loaded are equally strong red / blue;
    # one scale for all panels. Zero tokens is masked by the log norm and drawn black.
    n = math.ceil(math.log2(max(2.0, max(u.max() for u in util.values()))))
    norm = LogNorm(vmin=2.0 ** -n, vmax=2.0 ** n)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="black")
    ncols = math.ceil(len(layers) / 8)  # keep the figure from growing too tall
    nrows = math.ceil(len(layers) / ncols)
    num_experts = util[layers[0]].shape[0]
    fig, axes = plt.subplots(nrows, ncols, figsize=(9 * ncols, min(4.0, 0.8 + 0.2 * num_experts) * nrows + 0.8),
                             sharex=True, squeeze=False, layout="constrained")
    for ax, layer in zip(axes.flat, layers):
        mesh = ax.pcolormesh(x, np.arange(num_experts + 1) - 0.5, util[layer], cmap=cmap, norm=norm)
        ax.set_ylabel(f"layer {layer}\nexpert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 9)))
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
        if len(steps) <= 12:  # few logged steps: tick exactly those
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: expert utilization (tokens / even share)")
    cbar = fig.colorbar(mesh, ax=axes, extend="min", extendfrac=0.03, shrink=min(1.0, 0.5 + 0.1 * nrows),
                        label="utilization, log scale (1 = even share; black = no tokens)")
    ticks = [2.0 ** k for k in range(-n, n + 1)]
    cbar.ax.yaxis.set_major_locator(FixedLocator(ticks))
    cbar.ax.yaxis.set_minor_locator(FixedLocator([]))
    cbar.ax.set_yticklabels([f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    return save(plt, fig, path)


def plot_overlay(plt: ModuleType, runs: list, out: str) -> list:
    """runs: [(name, records)]. One colour per run: smoothed training loss (line) and validation loss
    (markers); and the mean load CV over layers when the runs logged it."""
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, (name, recs) in enumerate(runs):
        c = colors(i % colors.N)
        steps, loss = series(recs, "loss")
        if loss:
            ax.plot(steps, ema(loss, max(1, len(loss) // 50)), lw=1.1, color=c, label=f"{name} train (EMA)")
        vs, vv = series(recs, "val_loss")
        if vs:
            ax.plot(vs, vv, "o--", ms=4, lw=0.8, color=c, label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{len(runs)} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 6 else 1)
    written = [save(plt, fig, os.path.join(out, "overlay_loss.png"))]
    if any(series(recs, "moe/cv_mean")[0] for _, recs in runs):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for i, (name, recs) in enumerate(runs):
            ax.plot(*series(recs, "moe/cv_mean"), lw=1, color=colors(i % colors.N), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("CV of tokens per expert (mean over layers)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(runs) > 6 else 1)
        written.append(save(plt, fig, os.path.join(out, "overlay_load_cv.png")))
    return written


def save(plt: ModuleType, fig: Any, path: str) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)  # free it: pyplot keeps every open figure alive
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = OneLineParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="a training run's --output-dir (several: overlay)")
    p.add_argument("--out", default=None,
                   help="where to write the PNGs (default RUN_DIR/plots; for an overlay, overlay/ beside the first run)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_run.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    if len(args.run_dirs) > 1:
        return main_overlay(plt, args.run_dirs, args.out)
    args.run_dir = args.run_dirs[0]
    try:
        metrics = os.path.join(args.run_dir, "metrics.jsonl")
        if not os.path.isdir(args.run_dir):
            raise InputError(f"no such run directory: {args.run_dir}")
        if not os.path.isfile(metrics):
            raise InputError(f"no metrics.jsonl in {args.run_dir}")
        recs, num_runs = read_last_run(metrics)
        out = args.out or os.path.join(args.run_dir, "plots")
        os.makedirs(out, exist_ok=True)
    except (InputError, OSError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    title, ep = run_title(args.run_dir)
    if num_runs > 1:
        title += f"\n(last of {num_runs} runs in metrics.jsonl)"
        print(f"metrics.jsonl holds {num_runs} runs; plotting the last one ({len(recs)} records)")

    written = [plot_loss(plt, recs, title, os.path.join(out, "loss.png"))]
    if series(recs, "moe/cv_mean")[0]:
        written.append(plot_load(plt, recs, title, os.path.join(out, "load_cv.png"), ep))
    else:
        print("note: no MoE load metrics in this run (--moe-metrics off, or a dense model); skipped load_cv.png")
    heatmap = plot_heatmap(plt, recs, title, os.path.join(out, "utilization_heatmap.png"))
    if heatmap:
        written.append(heatmap)
    else:
        print("note: no moe/counts records; the utilization heatmap needs --moe-metrics detailed "
              "(or --moe-detailed-every N); skipped utilization_heatmap.png")
    for path in written:
        print(f"wrote {path}")
    return 0


def main_overlay(plt: ModuleType, run_dirs: list, out: Optional[str]) -> int:
    try:
        runs = []
        for d in run_dirs:
            metrics = os.path.join(d, "metrics.jsonl")
            if not os.path.isfile(metrics):
                raise InputError(f"no metrics.jsonl in {d}")
            runs.append((os.path.basename(os.path.abspath(d)), read_last_run(metrics)[0]))
        out = out or os.path.join(os.path.dirname(os.path.abspath(run_dirs[0])), "overlay")
        os.makedirs(out, exist_ok=True)
    except (InputError, OSError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    for path in plot_overlay(plt, runs, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
