"""Quality against speed of a sweep: validation loss against tokens/s, one marker per config.

    python bench/plot_frontier.py SUMMARY.csv [--out frontier.png]

Reads the config rows of bench/sweep.py's summary.csv (mean over seeds, error bars = the standard
deviation over seeds), draws every config and the Pareto frontier: the configs that no other config
beats on both axes (at least as fast and at least as low a loss, better on one). The frontier configs
are labelled on the plot and printed. With a strategy column (sweeps with --strategies) each routing
strategy has its own marker and colour, named in the legend. Needs matplotlib (pip install matplotlib)
for the PNG only.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from errors import InputError, OneLineParser  # noqa: E402


def _num(text: str) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_configs(path: str) -> list:
    """[{label, x, y, xerr, yerr}] of the summary's config rows that have both numbers."""
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"row", "config", "val_loss", "val_loss_std", "tokens_per_s", "tokens_per_s_std"}
    if not rows or not need <= set(rows[0]):
        raise InputError(f"{path} is not a sweep summary.csv (columns {sorted(need)} needed)")
    points = []
    for r in rows:
        x, y = _num(r["tokens_per_s"]), _num(r["val_loss"])
        if r["row"] == "config" and x is not None and y is not None:
            points.append({"label": r["config"], "x": x, "y": y, "n": r.get("n", ""),
                           "strategy": r.get("strategy") or "",  # empty in summaries written before the column
                           "xerr": _num(r["tokens_per_s_std"]) or 0.0, "yerr": _num(r["val_loss_std"]) or 0.0})
    if not points:
        raise InputError(f"{path} has no config row with both a validation loss and tokens/s")
    return points


def pareto_front(points: list) -> list:
    """The points no other point dominates (x higher is better, y lower is better), by increasing x."""
    def dominated(p):
        return any(q["x"] >= p["x"] and q["y"] <= p["y"] and (q["x"] > p["x"] or q["y"] < p["y"]) for q in points)
    return sorted((p for p in points if not dominated(p)), key=lambda p: p["x"])


def plot(points: list, front: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    on = {p["label"] for p in front}
    strategies = sorted({p.get("strategy", "") for p in points} - {""})
    markers, colors = "osD^vP*X", plt.get_cmap("tab10")
    style = {st: (markers[i % len(markers)], colors(i % 10)) for i, st in enumerate(strategies)}
    for p in points:
        st = p.get("strategy", "")
        marker, color = style.get(st, ("o", "tab:red" if p["label"] in on else "tab:gray"))
        ax.errorbar(p["x"], p["y"], xerr=p["xerr"], yerr=p["yerr"], fmt=marker, ms=7 if p["label"] in on else 6,
                    capsize=3, color=color, alpha=1.0 if p["label"] in on or st else 0.6,
                    mec="black" if p["label"] in on and st else color)
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8 if p["label"] in on else 6, color="black" if p["label"] in on else "gray")
    for st in strategies:  # one legend entry per strategy
        ax.plot([], [], style[st][0], color=style[st][1], label=st)
    ax.plot([p["x"] for p in front], [p["y"] for p in front], "-", color="tab:red", lw=1.2, label="Pareto frontier")
    ax.set_xlabel("tokens / s (higher is better)")
    ax.set_ylabel("final validation loss (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[list] = None) -> int:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary", metavar="SUMMARY.csv", help="bench/sweep.py's summary.csv")
    p.add_argument("--out", default=None, help="PNG path (default: frontier.png next to the summary)")
    args = p.parse_args(argv)
    try:
        points = read_configs(args.summary)
    except (InputError, OSError) as e:
        print(f"plot_frontier.py: error: {e}", file=sys.stderr)
        return 2
    front = pareto_front(points)
    print(f"{len(points)} configs, {len(front)} on the Pareto frontier (fastest last):")
    for q in front:
        print(f"  {q['label']}{' (' + q['strategy'] + ')' if q.get('strategy') else ''}: val loss {q['y']:.4f} +- "
              f"{q['yerr']:.4f}, {q['x']:,.0f} +- {q['xerr']:,.0f} tokens/s")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_frontier.py: the PNG needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.summary)), "frontier.png")
    plot(points, front, out, f"{os.path.basename(os.path.dirname(os.path.abspath(args.summary)))}: "
                             f"mean over seeds, bars = std over seeds")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
