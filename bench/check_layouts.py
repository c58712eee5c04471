"""Layout check: every parallel layout that fits on this machine against one device, in eager and compiled
mode, fp32 and bf16. The run to do on GPUs before submitting a change to the model, the MoE layer, the
parallel code or the training step (CPU tests in eager mode cannot see what breaks under torch.compile,
bf16 or NCCL).

    python bench/check_layouts.py                          # all GPUs of this machine (2: TP2, DP2, PP2 x2)
    python bench/check_layouts.py --modes compile --dtypes bf16 --json check.json
    python bench/check_layouts.py --device cpu --nproc 2 --dtypes fp32 --modes eager   # gloo, for a try

Every run trains the same model on the same global batches for --steps steps (minimal_pretrain.py under
torchrun, metrics.jsonl read back). Each layout's per-step loss and gradient norm are compared with the
one-device run in the same mode and dtype; the compiled one-device run is also compared with the eager
one (a compiler that gets the gradient wrong on one device would otherwise go unseen). Tolerances:

    fp32: loss and gradient norm within 1e-4 relative at every step (the layouts only reorder fp32 sums)
    bf16: loss within 2^-7 relative (bf16's rounding step) at every step; gradient norm within 1% at
          step 1 (the first) and 5% after (Adam turns bf16 rounding into slightly different updates)

Prints one table and exits 1 if any row is off (2 on bad flags). Layouts for N devices: every
TP x PP x DP = N with TP, PP in {1, 2, 4, 8}, each PP > 1 under both schedules (GPipe, 1F1B), each EP size
beyond TP that divides TP x DP (all-to-all over DP ranks), and each layout with DP > 1 also with
--shard-optimizer. With
--nproc 1 (a machine with one GPU) only the compiled one-device run is checked against the eager one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from errors import InputError, OneLineParser  # noqa: E402

TOLERANCES = {  # dtype -> (loss, grad norm at the first step, grad norm after it), relative
    "fp32": (1e-4, 1e-4, 1e-4),
    "bf16": (2 ** -7, 0.01, 0.05),
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    schedule: str = "1f1b"
    ep: Optional[int] = None  # None: tied to TP; larger: all-to-all over DP ranks
    shard_optimizer: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        if self.world == 1:
            return "1 device"
        parts = [f"{a}{n}" for a, n in (("DP", self.dp), ("TP", self.tp), ("PP", self.pp)) if n > 1]
        if self.ep is not None:
            parts.append(f"EP{self.ep}")
        return " ".join(parts) + (f" {self.schedule}" if self.pp > 1 else "") + (" ZeRO" if self.shard_optimizer else "")

    def flags(self) -> list:
        return (["--tensor-parallel-size", str(self.tp), "--pipeline-parallel-size", str(self.pp),
                 "--pipeline-schedule", self.schedule]
                + (["--expert-parallel-size", str(self.ep)] if self.ep is not None else [])
                + (["--shard-optimizer"] if self.shard_optimizer else []))


def layouts_for(n: int) -> list:
    """Every multi-device layout of exactly n ranks (TP and PP powers of two up to 8), each EP size beyond TP
    that the layout allows (all-to-all over DP ranks), and each layout with data parallelism also with the
    sharded optimizer."""
    found = []
    for tp, pp in itertools.product((1, 2, 4, 8), repeat=2):
        if n % (tp * pp):
            continue
        dp = n // (tp * pp)
        for schedule in (("gpipe", "1f1b") if pp > 1 else ("1f1b",)):
            for ep in [None] + [e for e in range(2 * tp, tp * dp + 1, tp) if (tp * dp) % e == 0]:
                found.append(Layout(tp, pp, dp, schedule, ep))
                if dp > 1:
                    found.append(Layout(tp, pp, dp, schedule, ep, shard_optimizer=True))
    return [l for l in found if l.world > 1]


def model_flags(n: int, steps: int) -> list:
    """A model every layout of n ranks can split: dense and MoE layers alternating (D M ...), one per
    pipeline stage of the deepest layout (at least two), heads, KV heads and experts divisible by the largest
    TP, the global batch by every DP times the micro-batch (2 x n x ceil(8 / n): 16 for 2, 4 and 8 ranks, 18 for
    3). Small, so that compiling it is quick."""
    layouts = layouts_for(n)
    tp_max = max([l.tp for l in layouts] + [1])
    pp_max = max([l.pp for l in layouts] + [1])
    ep_max = max([l.ep or l.tp for l in layouts] + [1])
    return ["--num-layers", str(max(2, pp_max)), "--moe-layer-interval", "2", "--hidden-size", "256",
            "--intermediate-size", "512", "--expert-intermediate-size", "256", "--num-attention-heads", "8",
            "--num-key-value-heads", str(max(4, tp_max)), "--num-experts", str(max(8, ep_max)),
            "--num-experts-per-token", "2", "--max-seq-length", "128", "--micro-batch-size", "2",
            "--global-batch-size", str(2 * n * -(-8 // n)), "--max-steps", str(steps), "--warmup-steps", "1",
            "--learning-rate", "1e-3", "--min-lr", "1e-4", "--dropout", "0", "--seed", "5", "--eval-iters", "0",
            "--log-interval", "1", "--moe-metrics", "off", "--no-save", "--no-progress"]


@dataclass
class Run:
    layout: Layout
    mode: str   # eager | compile
    dtype: str  # fp32 | bf16
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    error: Optional[str] = None


def command(run: Run, args, out_dir: str) -> list:
    flags = model_flags(args.nproc, args.steps) + run.layout.flags() + [
        "--device", args.device, "--precision", run.dtype, "--output-dir", out_dir] + args.extra
    if run.mode == "compile":
        flags.append("--compile")
    script = os.path.join(ROOT, "minimal_pretrain.py")
    if run.layout.world == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.layout.world}",
            script, *flags]


def start(run: Run, args, workdir: str, device_index: Optional[int]) -> tuple:
    """Starts one run in the current directory (relative paths among the extra flags keep their meaning),
    its output directory under workdir."""
    out_dir = tempfile.mkdtemp(prefix="run_", dir=workdir)
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    elif device_index is not None:  # a one-device run pinned to one GPU (of those visible), several side by side
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[device_index] if visible else str(device_index)
    proc = subprocess.Popen(command(run, args, out_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return proc, out_dir


def finish(run: Run, proc: subprocess.Popen, out_dir: str, log_dir: Optional[str]) -> None:
    log = proc.communicate()[0]
    if proc.returncode != 0:
        lines = log.strip().splitlines()
        errors = [l.strip() for l in lines if "Error" in l or "error:" in l]  # the first is usually the cause
        run.error = f"exit {proc.returncode}: " + (errors[0] if errors else " | ".join(lines[-3:]))
        if log_dir:
            name = f"{run.layout.name}_{run.mode}_{run.dtype}".replace(" ", "_")
            with open(os.path.join(log_dir, f"failed_{name}.log"), "w") as f:
                f.write(log)
        return
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"grad_norm"' in line]
    run.losses = [r["loss"] for r in recs]
    run.grad_norms = [r["grad_norm"] for r in recs]


def compare(run: Run, ref: Run) -> tuple[dict, list]:
    """(the worst relative differences, the reasons this run disagrees with ref; empty if it agrees)."""
    if run.error or ref.error:
        return {}, [run.error or f"reference failed: {ref.error}"]
    if len(run.losses) != len(ref.losses) or not run.losses:
        return {}, [f"{len(run.losses)} logged steps against {len(ref.losses)}"]
    tol_loss, tol_gn0, tol_gn = TOLERANCES[run.dtype]

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-12)

    def worst_of(values):  # NaN counts as the worst
        return max(values, key=lambda v: (math.isnan(v), v))

    d_loss = [rel(a, b) for a, b in zip(run.losses, ref.losses)]
    d_gn = [rel(a, b) for a, b in zip(run.grad_norms, ref.grad_norms)]
    worst = {"loss": worst_of(d_loss), "gnorm0": d_gn[0], "gnorm": worst_of(d_gn)}
    bad = []
    for step, (dl, dg) in enumerate(zip(d_loss, d_gn)):
        if not dl <= tol_loss:  # `not <=` also catches NaN
            bad.append(f"step {step + 1} loss {run.losses[step]:.6g} vs {ref.losses[step]:.6g}")
        if not dg <= (tol_gn0 if step == 0 else tol_gn):
            bad.append(f"step {step + 1} grad norm {run.grad_norms[step]:.6g} vs {ref.grad_norms[step]:.6g}")
    return worst, bad


def run_all(args, workdir: str) -> tuple[list, list]:
    """(one-device runs, layout runs): the one-device runs first (side by side, one per GPU), then every
    layout in turn. Raises InputError if a one-device run refuses its flags (exit 2): every run would."""
    combos = [(m, d) for m in args.modes for d in args.dtypes]
    refs = {c: Run(Layout(), *c) for c in combos}
    slots = args.nproc if args.device == "cuda" else 1
    pending = list(refs.values())
    while pending:
        batch, pending = pending[:slots], pending[slots:]
        started = [(r, *start(r, args, workdir, i)) for i, r in enumerate(batch)]
        for r, proc, out in started:
            finish(r, proc, out, args.log_dir)
            if r.error and r.error.startswith("exit 2:"):
                raise InputError(r.error.removeprefix("exit 2: "))
    runs = []
    for (mode, dtype), layout in itertools.product(combos, layouts_for(args.nproc)):
        r = Run(layout, mode, dtype)
        finish(r, *start(r, args, workdir, None), args.log_dir)
        runs.append(r)
        print(f"  ran {layout.name} {mode} {dtype}: {'ok' if not r.error else r.error}", flush=True)
    return list(refs.values()), runs


def table(refs: dict, runs: list) -> tuple[list, bool]:
    """Rows: each layout against the one-device run of its mode and dtype, and the compiled one-device run
    against the eager one. Returns (rows as dicts, all agree)."""
    rows, ok = [], True
    pairs = [(r, refs[(r.mode, r.dtype)], "1 device, same mode") for r in runs]
    pairs += [(refs[("compile", d)], refs[("eager", d)], "1 device, eager")
              for (m, d) in refs if m == "compile" and ("eager", d) in refs]
    for run, ref, against in pairs:
        worst, bad = compare(run, ref)
        ok &= not bad
        rows.append({"layout": run.layout.name, "mode": run.mode, "dtype": run.dtype, "against": against,
                     "steps": len(run.losses), "loss": worst.get("loss"), "gnorm0": worst.get("gnorm0"),
                     "gnorm": worst.get("gnorm"), "grad_norm_step0": run.grad_norms[0] if run.grad_norms else None,
                     "ref_grad_norm_step0": ref.grad_norms[0] if ref.grad_norms else None,
                     "agrees": not bad, "why": bad[:3]})
    return rows, ok


def print_table(rows: list) -> None:
    def rel(v):
        return "-" if v is None else f"{v:.1e}"

    print(f"{'layout':<16}{'mode':<9}{'dtype':<6}{'against':<21}{'gnorm step 1':>14}{'ref':>10}"
          f"{'max dloss':>11}{'dgnorm0':>10}{'max dgnorm':>11}  verdict   (d: relative difference)")
    for r in rows:
        g0 = "-" if r["grad_norm_step0"] is None else f"{r['grad_norm_step0']:.4f}"
        g0r = "-" if r["ref_grad_norm_step0"] is None else f"{r['ref_grad_norm_step0']:.4f}"
        verdict = "agrees" if r["agrees"] else "MISMATCH: " + "; ".join(r["why"])
        print(f"{r['layout']:<16}{r['mode']:<9}{r['dtype']:<6}{r['against']:<21}{g0:>14}{g0r:>10}"
              f"{rel(r['loss']):>11}{rel(r['gnorm0']):>10}{rel(r['gnorm']):>11}  {verdict}")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if there is a GPU")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks of the layouts (default: every GPU; CPU: 2); 1: only compiled against eager")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--log-dir", default=None, help="keep the whole console output of every failed run here")
    p.add_argument("extra", nargs="*", help="after --: more minimal_pretrain.py flags for every run")
    a = p.parse_args(argv)
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible")
    if a.nproc is None:
        a.nproc = torch.cuda.device_count() if a.device == "cuda" else 2
    if a.device == "cuda" and a.nproc > torch.cuda.device_count():
        p.error(f"--nproc {a.nproc}: only {torch.cuda.device_count()} GPUs are visible")
    if a.nproc < 1:
        p.error(f"--nproc must be positive, got {a.nproc}")
    a.modes, a.dtypes = a.modes.split(","), a.dtypes.split(",")
    for flag, values, valid in (("--modes", a.modes, ("eager", "compile")), ("--dtypes", a.dtypes, ("fp32", "bf16"))):
        if not values or any(v not in valid for v in values):
            p.error(f"{flag} takes a comma-separated list of {', '.join(valid)}")
    if a.nproc == 1 and set(a.modes) != {"eager", "compile"}:
        p.error("--nproc 1 has no layout to run: it compares compiled against eager, so --modes needs both")
    if a.steps < 1:
        p.error(f"--steps must be positive, got {a.steps}")
    if a.log_dir:
        try:
            os.makedirs(a.log_dir, exist_ok=True)
        except OSError as e:
            p.error(f"--log-dir {a.log_dir}: cannot create it ({e.strerror})")
    if a.json and not os.access(os.path.dirname(os.path.abspath(a.json)), os.W_OK):
        p.error(f"--json {a.json}: its directory does not exist or is not writable")
    if a.device == "cpu" and "bf16" in a.dtypes:
        p.error("--dtypes bf16 needs --device cuda (bf16 autocast on the CPU is not what training runs)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    where = (f"{torch.cuda.get_device_name(0)} x {args.nproc}" if args.device == "cuda" else f"CPU, {args.nproc} ranks")
    print(f"layout check: {where}, torch {torch.__version__}, {args.steps} steps, modes {args.modes}, "
          f"dtypes {args.dtypes}", flush=True)
    with tempfile.TemporaryDirectory(prefix="check_layouts_") as workdir:
        try:
            refs, runs = run_all(args, workdir)
        except InputError as e:
            print(f"error: the one-device run refuses these flags ({str(e).removeprefix('error: ')})", file=sys.stderr)
            return 2
    rows, ok = table({(r.mode, r.dtype): r for r in refs}, runs)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "steps": args.steps, "tolerances": TOLERANCES,
                       "model_flags": model_flags(args.nproc, args.steps) + args.extra, "rows": rows}, f, indent=2)
    print("every layout agrees" if ok else "MISMATCH: some layouts disagree with one device (rows above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
