"""Routing plots: drop rate against capacity factor per top-k, and gate balance.

    python bench/plot_routing.py drops FILE [--out drops.png]
    python bench/plot_routing.py gate-balance SUMMARY.csv [--out gate_balance.png]

drops: FILE is either bench/bench_routing.py's `capacity` output (JSON lines; run it once per k with
--out appending to one file: `for k in 1 2 4; do python bench/bench_routing.py capacity --top-k $k
--out cap.jsonl; done`), or a bench/sweep.py summary.csv (its config rows: the drop rates measured in
training). Left panel: dropped assignments / (tokens x k); right panel: tokens with every assignment
dropped / tokens; one line per top-k (colour) and per other setting (line style: logits kind and drop
policy for the bench; strategy, experts and router for a sweep). Rows without capacity (factor 0) are
left out, except expert choice, whose factor 0 means its default 1.0, where it is drawn.

gate-balance: from a sweep summary.csv (config rows), load balance against the gates: the load CV
(moe/cv_mean: how unevenly the experts are used) against the gate entropy (moe/gate_entropy_mean: how
evenly a token's kept gates weigh its experts: ln k at most under token choice and hash routing, up to
ln E under expert choice, where a token may have more than k experts) and against the mean top-k probability
(moe/mean_topk_prob), one marker per config, coloured by strategy.

Needs matplotlib (pip install matplotlib). Bad input: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import InputError, OneLineParser  # noqa: E402
from moe_config import EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR  # noqa: E402  (moe_config needs no torch)


def _num(text) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _summary_rows(path: str, need: set) -> list:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("row") == "config"]
    if not rows or not need <= set(rows[0]):
        raise InputError(f"{path}: not a sweep summary.csv with config rows and the columns {sorted(need)}")
    return rows


def drop_series(path: str) -> dict:
    """{(top_k, name): [(capacity factor, drop rate, token drop rate)] sorted by factor} from a bench_routing
    capacity JSONL or a sweep summary.csv."""
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    series: dict = {}
    if path.endswith(".csv"):
        rows = _summary_rows(path, {"top_k", "capacity_factor", "drop_rate"})  # token_drop_rate: newer sweeps
        for r in rows:
            strategy = r.get("strategy") or "soft-topk"
            cf = _num(r["capacity_factor"])
            if cf == 0 and strategy == "expert-choice":
                cf = EXPERT_CHOICE_DEFAULT_CAPACITY_FACTOR
            drop, token_drop = _num(r["drop_rate"]), _num(r.get("token_drop_rate"))
            if not cf or drop is None:
                continue
            token_drop = math.nan if token_drop is None else token_drop  # (not drawn)
            name = f"{strategy} E{r.get('num_experts', '?')} {r.get('router', '')}".strip()
            series.setdefault((int(r["top_k"]), name), []).append((cf, drop, token_drop))
    else:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{path}:{n}: not a JSON line") from None
                if rec.get("bench") != "capacity" or not rec.get("capacity_factor"):
                    continue
                name = f"{rec['logits']} logits, {rec['drop_policy']}, E{rec['num_experts']}"
                series.setdefault((int(rec["top_k"]), name), []).append(
                    (rec["capacity_factor"], rec["avg_drop_rate"], rec["token_drop_rate"]))
    if not series:
        raise InputError(f"{path}: no rows with a capacity factor")
    return {key: sorted(points) for key, points in sorted(series.items())}


def plot_drops(plt, series: dict, path: str, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    ks = sorted({k for k, _ in series})
    names = sorted({name for _, name in series})
    colors, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    for (k, name), points in series.items():
        cf = [p[0] for p in points]
        kw = dict(color=colors(ks.index(k) % 10), ls=styles[names.index(name) % len(styles)], marker="o", ms=4)
        axes[0].plot(cf, [p[1] for p in points], label=f"k={k}, {name}", **kw)
        axes[1].plot(cf, [p[2] for p in points], **kw)
    axes[0].set_ylabel("dropped assignments / (tokens x k)")
    axes[1].set_ylabel("tokens with every assignment dropped / tokens")
    for ax in axes:
        ax.set_xlabel("capacity factor")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def gate_points(path: str) -> list:
    """[{label, strategy, load_cv, gate_entropy, mean_topk_prob}] of a sweep summary's config rows."""
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    rows = _summary_rows(path, {"load_cv", "gate_entropy", "mean_topk_prob"})
    points = []
    for r in rows:
        values = {key: _num(r[key]) for key in ("load_cv", "gate_entropy", "mean_topk_prob")}
        if None not in values.values():
            points.append({"label": r["config"], "strategy": r.get("strategy") or "soft-topk", **values})
    if not points:
        raise InputError(f"{path}: no config row has load_cv, gate_entropy and mean_topk_prob")
    return points


def plot_gate_balance(plt, points: list, path: str, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True)
    strategies = sorted({p["strategy"] for p in points})
    markers, colors = "osD^vP*X", plt.get_cmap("tab10")
    for p in points:
        i = strategies.index(p["strategy"])
        for ax, key in zip(axes, ("gate_entropy", "mean_topk_prob")):
            ax.plot(p["load_cv"], p[key], markers[i % len(markers)], color=colors(i % 10), ms=7)
            ax.annotate(p["label"], (p["load_cv"], p[key]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color="gray")
    for i, st in enumerate(strategies):
        axes[0].plot([], [], markers[i % len(markers)], color=colors(i % 10), label=st)
    axes[0].set_ylabel("gate entropy over a token's kept gates (nats)")
    axes[1].set_ylabel("mean router probability of a kept assignment")
    for ax in axes:
        ax.set_xlabel("load CV over experts (0 = even)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[list] = None) -> int:
    p = OneLineParser(prog="plot_routing.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="plot", required=True, parser_class=OneLineParser)
    d = sub.add_parser("drops", help="drop rate against capacity factor, one line per k")
    d.add_argument("file", metavar="FILE", help="bench_routing.py capacity JSON lines, or a sweep summary.csv")
    d.add_argument("--out", default=None, help="PNG path (default: drops.png beside FILE)")
    g = sub.add_parser("gate-balance", help="load CV against gate entropy and mean top-k probability")
    g.add_argument("file", metavar="SUMMARY.csv", help="a sweep summary.csv")
    g.add_argument("--out", default=None, help="PNG path (default: gate_balance.png beside the summary)")
    args = p.parse_args(argv)
    try:
        data = drop_series(args.file) if args.plot == "drops" else gate_points(args.file)
    except (InputError, OSError) as e:
        print(f"plot_routing.py: error: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_routing.py: error: the PNG needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    default = "drops.png" if args.plot == "drops" else "gate_balance.png"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.file)), default)
    title = os.path.basename(args.file)
    if args.plot == "drops":
        plot_drops(plt, data, out, f"{title}: drop rate against capacity factor")
    else:
        plot_gate_balance(plt, data, out, f"{title}: load balance against gate balance")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
