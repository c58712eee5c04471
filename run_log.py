"""Where metrics go: the console line, the JSONL log, and (only when asked for) wandb and TensorBoard."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from errors import InputError


def check_sinks(use_wandb: bool, use_tensorboard: bool) -> None:
    """Fails early (before any work) when an asked-for optional package is missing."""
    if use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError("--wandb needs the wandb package: pip install wandb") from None
    if use_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def console_line(rec: dict, capacity: bool = False) -> str:
    """The compact per-step summary; every metric is in the JSONL log. `capacity` (a capacity factor is on):
    the share of dropped assignments is shown, `n/a` when no statistics were recorded (--moe-metrics off)."""
    parts = [f"step {rec['step']:>5d}", f"loss {rec['loss']:.4f}",
             f"aux {_fmt(rec.get('aux_loss'), '.4f')}", f"z {_fmt(rec.get('z_loss'), '.3f')}",
             f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"tok/s {rec['tokens_per_sec']:,.0f}"]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if "moe/cv_mean" in rec:
        parts.append(f"load cv {rec['moe/cv_mean']:.3f} util {rec['moe/expert_utilization_min']:.2f}"
                     f"/{rec['moe/expert_utilization_max']:.2f} overload {rec['moe/max_overload_factor']:.2f}")
    if capacity or "moe/drop_rate" in rec:
        parts.append(f"drop {_fmt(rec.get('moe/drop_rate'), '.1%')}")
    return " | ".join(parts)


class RunLog:
    """Rank 0's metric sinks. The JSONL file is opened in append mode: nothing written before is lost."""

    def __init__(self, output_dir: str, config: dict, use_wandb: bool = False, wandb_project: str = "minimal-moe",
                 use_tensorboard: bool = False, histogram_every: int = 0):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.histogram_every = histogram_every
        self.wandb = self.tb = None
        if use_wandb:
            import wandb
            self.wandb = wandb
            try:
                wandb.init(project=wandb_project, config=config, dir=output_dir)
            except Exception as e:  # e.g. no login and no WANDB_MODE=offline
                raise InputError(f"--wandb: wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"run `wandb login` or set WANDB_MODE=offline") from None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
        # The optional sinks start first: one that fails (exit 2) leaves an earlier run's config.json as it was.
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)

    def wants_histogram(self, step: int) -> bool:
        return (self.wandb is not None or self.tb is not None) and self.histogram_every > 0 \
            and step % self.histogram_every == 0

    def log(self, rec: dict, expert_counts: Optional[np.ndarray] = None) -> None:
        """rec goes to every sink; expert_counts ([MoE layers, E] token counts) becomes a histogram of
        expert load in wandb / TensorBoard."""
        self.jsonl.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step" and v is not None}
        step = rec["step"]
        if self.wandb is not None:
            payload = dict(scalars)
            if expert_counts is not None:
                payload["moe/expert_load_hist"] = self.wandb.Histogram(expert_counts.reshape(-1))
            self.wandb.log(payload, step=step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if expert_counts is not None:
                self.tb.add_histogram("moe/expert_load", expert_counts.reshape(-1), step)

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
