"""Shared helpers of the tests: the MoE layer builders and references used by several files, the tiny
training runs (flags, in-process runs, command-line runs) and the distributed launcher that every
multi-process test uses (real gloo processes on the CPU)."""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent  # the repository: the modules under test, the scripts
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import checkpoint as ckpt  # noqa: E402
import minimal_pretrain  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from moe_config import MoEConfig  # noqa: E402
from moe_layers import SparseMoE  # noqa: E402
from moe_stats import StepStats  # noqa: E402
from parallel import Topology  # noqa: E402


def make_moe(d=16, f=32, E=4, k=2, seed=0, std=0.5, **kw) -> SparseMoE:
    """A SparseMoE on the single-process topology with N(0, std) parameters."""
    torch.manual_seed(seed)
    moe = SparseMoE(MoEConfig(num_experts=E, num_experts_per_token=k, **kw), d, f, Topology())
    with torch.no_grad():
        moe.router.weight.normal_(0.0, std)
        moe.experts.w_gate_up.normal_(0.0, std)
        moe.experts.w_down.normal_(0.0, std)
    return moe


def dense_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU FFN, computed densely on every row of x."""
    h = x @ w_gate_up
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def skewed_router_case(E, k, favourite, seed=3, T=40, d=16, pull=6.0, offset=4.0, noise=0.3, std=0.1):
    """A router that sends most tokens to the experts in `favourite`: the input has a large component
    along a unit vector u and the favoured experts' router rows point along u."""
    moe = make_moe(d=d, f=24, E=E, k=k, seed=seed, std=std)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    with torch.no_grad():
        for rank, e in enumerate(favourite):
            moe.router.weight[e] += (pull - rank) * u
    x = offset * u + noise * torch.randn(T, d, generator=g)
    return moe, x


MILD = dict(pull=3.0, offset=2.0, noise=0.6, std=0.3)  # counts [21, 8, 0, 40, 1, 0, 0, 10]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=6, num_attention_heads=2,
                num_key_value_heads=1, max_seq_length=16, num_experts=4, num_experts_per_token=2)
    base.update(kw)
    return ModelConfig.from_dict(base)  # flat keys, as a checkpoint holds them


PREVIOUS_LINE = '{"step": 0, "loss": 5.5}\n'


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def _cuda_moe_for_sync_check(vocab_size: Optional[int] = None, **kw) -> tuple:
    """A small SparseMoE on CUDA (E8, top-2; kw: MoEConfig fields) with initialised weights, a bf16 input and
    its StepStats; skips where the grouped GEMM (the path without host reads) is not available."""
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(num_experts=8, num_experts_per_token=2, **kw), 128, 256,
                    Topology(device=torch.device("cuda")), vocab_size=vocab_size).cuda()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    if not moe.experts.use_grouped(x):
        pytest.skip("torch._grouped_mm is not available for bf16 on this GPU")
    return moe, x, StepStats({0: moe}, top_k=2)


def run_without_host_sync(step):
    """Runs step() once as a warm-up (lazy initialisation may sync), then again with CUDA's sync debug mode
    set to "error", so that any host-device sync inside the second run raises; returns its result."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return result


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


HAVE_TOKENIZERS, HAVE_PYARROW = _importable("tokenizers"), _importable("pyarrow")
needs_tokenizers = pytest.mark.skipif(not HAVE_TOKENIZERS, reason="tokenizers is not installed")


# --------------------------------------------------------------------------------------------------
# Tiny training runs: flags, in process and on the command line
# --------------------------------------------------------------------------------------------------
def _ckpt_argv(out: Path, *extra: str) -> list:
    """A tiny MoE run with dropout (so the saved RNG state matters) on the small fixed corpus."""
    return ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-attention-heads", "4",
            "--num-key-value-heads", "2", "--max-seq-length", "16", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--num-experts", "4", "--dropout", "0.1", "--warmup-steps", "2",
            "--eval-iters", "1", "--eval-interval", "0", "--log-interval", "1", "--device", "cpu", "--no-progress",
            "--data", _dist_data_file(), "--output-dir", str(out), *extra]


def _train_in_process(argv: list, monkeypatch) -> "minimal_pretrain.TrainResult":
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return minimal_pretrain.train(minimal_pretrain.parse_args(argv))


def _assert_checkpoints_equal(a: Path, b: Path) -> None:
    """Parameters, buffers and AdamW state (moments and step) bit for bit, and the same step."""
    ma, sa = ckpt.load_consolidated(a, with_optimizer=True)
    mb, sb = ckpt.load_consolidated(b, with_optimizer=True)
    assert ma["step"] == mb["step"]
    assert sa.keys() == sb.keys() and any(k.endswith("/exp_avg_sq") for k in sa)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def _run_cli(argv: list, env: Optional[dict] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "minimal_pretrain.py"), *argv], cwd=ROOT,
                          env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)


def _assert_one_error_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 240.0) -> list:
    """Reads the process's stdout until a line contains needle; returns the lines read."""
    import time
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}:\n" + "".join(lines[-20:]))


# --------------------------------------------------------------------------------------------------
# Distributed runs: real processes, gloo, CPU
# --------------------------------------------------------------------------------------------------
# Each layout must reproduce the single process on the same global batch: every step's loss and gradient norm
# and the final (gathered) parameters within 1e-5 relative in fp32.
#
# How the tolerance was chosen (measured): TP and DP change the order of fp32 sums, so gradients differ in their
# last bits (<= 2e-7 relative per weight matrix at the first step). Adam turns that into parameter differences
# proportional to the update size: even one process with a different micro-batch size (the same math, summed in
# another order) drifts by ~2e-6 per tensor and 2.5e-5 per element after 3 steps at lr 1e-2. A wrong gradient
# instead shows up at ~lr / |param|. So the runs use lr 1e-3 and the check is per tensor:
# ||a - b|| / ||b|| <= 1e-5, plus every step's loss and gradient norm to 1e-5 relative (the norm also guards
# clipping, which Adam would hide).
# AdamW's eps is 1e-5 here, not the default 1e-8: the update lr * m / (sqrt(v) + eps) of a gradient element near
# eps is as sensitive to its rounding as it gets (lr * dg / eps). Measured (issue 32, ATEN_CPU_CAPABILITY=default):
# one element of a 32 x 32 attention projection had g = -3.4e-8 at step 1 (the median |g| was 5e-3), 6.3e-10
# apart between one process and TP2; at eps 1e-8 that moved it by 3.2e-6, 1.4e-5 relative for the tensor. At
# eps 1e-5 the expert-choice runs (4 seeds, 3 kernels, TP2 and PP2) differ by at most 4.6e-7 per tensor and
# 1.5e-7 in gradient norm; gradients of the usual size (>> 1e-5) still step by about lr, so a wrong one shows.
REL_TOL = 1e-5
_DIST_DATA = None
MODULE = Path(__file__).stem  # the worker subprocesses import this file by name


def _dist_data_file() -> str:
    """A small fixed text corpus for the equivalence runs: code-like lines drawn from a seeded generator.
    It must not depend on the code under test (it once was the project's own source, so every edit of
    moe_layers.py changed the data of every equivalence test) nor on the Python version."""
    global _DIST_DATA
    if _DIST_DATA is None:
        import random
        rng = random.Random(20261123)
        words = ["def", "return", "self", "import", "for", "in", "if", "else", "while", "x", "y", "z", "i", "=",
                 "+", "-", "*", "(", ")", "[", "]", ":", ",", "0", "1", "2", "torch", "tensor", "expert", "token",
                 "layer", "weight", "grad", "shape", "None", "True"]
        lines = []
        for _ in range(1500):
            indent = "    " * rng.randrange(3)
            lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randrange(2, 10))))
        fd, path = tempfile.mkstemp(suffix=".txt", prefix="moe_dist_data_")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        _DIST_DATA = path
    return _DIST_DATA


def _base_argv(moe: str) -> list:
    """moe: 'mixed' (4 experts on layers 1 and 3), 'all8' (8 experts on every layer) or 'dense'."""
    argv = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "4", "--num-attention-heads", "4",
            "--num-key-value-heads", "2", "--max-seq-length", "16", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--max-steps", "3", "--warmup-steps", "1", "--learning-rate", "1e-3",
            "--eval-iters", "0", "--no-progress", "--moe-metrics", "off", "--data", _dist_data_file(),
            "--expert-intermediate-size", "32", "--min-lr", "1e-4", "--adam-eps", "1e-5", "--device", "cpu",
            "--log-interval", "1", "--no-save"]
    if moe == "dense":
        return argv + ["--num-experts", "0"]
    if moe == "mixed":
        return argv + ["--num-experts", "4", "--moe-layer-interval", "2"]
    return argv + ["--num-experts", "8", "--num-key-value-heads", "4", "--moe-layer-interval", "1"]


def _gloo_threads() -> list:
    """The names of this process's gloo threads (Linux: pt_gloo_runloop, gloo_tcp_loop, ...)."""
    names = (Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)


def _dist_worker(argv_json: str, out_path: str) -> None:
    """Entry point of one rank (run as a subprocess): train and let rank 0 save losses and parameters."""
    import minimal_pretrain
    args = minimal_pretrain.parse_args(json.loads(argv_json))
    result = minimal_pretrain.train(args, return_state=True)
    # The process groups' threads end inside train(), not in the interpreter's teardown (destroy_topology). Gloo
    # may join a group's TCP loop thread from the thread that drops its last reference, a moment after
    # destroy_process_group returns: a thread still ending is given up to 5 s; a group kept alive stays.
    deadline = time.monotonic() + 5.0
    while _gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _gloo_threads(), f"train() left the process groups' threads behind: {_gloo_threads()}"
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"losses": result.losses, "grad_norms": [r["grad_norm"] for r in result.records],
                    "state": result.state_dict, "records": result.records}, out_path)


@contextlib.contextmanager
def rank_envs(world_size: int, base: Optional[dict] = None):
    """For ranks started by hand: yields `env_of(rank)`, each rank's environment for an env:// rendezvous. As
    under torchrun, the rendezvous store lives here, in the launcher, for the whole block, not in rank 0: no
    rank's exit takes it from a rank still stopping. Start the ranks and wait for them inside the block."""
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the system picks one
    common = dict(os.environ if base is None else base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                  TORCHELASTIC_USE_AGENT_STORE="True", WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        yield lambda rank: dict(common, RANK=str(rank), LOCAL_RANK=str(rank))
    finally:
        del store


def run_ranks(world_size: int, module: str, worker: str, args: Sequence[str], timeout: int,
              cwd: Optional[Path] = None) -> None:
    """Starts `world_size` gloo ranks, each running `module.worker(*args)` (module: a file of tests/), waits for
    them (ranks still running after `timeout` s or a failure are killed) and raises AssertionError with every
    rank's exit code and the end of its output if one failed."""
    code = (f"import faulthandler, sys; faulthandler.enable(all_threads=True); "  # a fatal signal prints the Python stacks
            f"sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]; import {module} as t; t.{worker}(*sys.argv[1:])")
    logs = []
    with rank_envs(world_size) as env_of:
        procs = [subprocess.Popen([sys.executable, "-c", code, *args], env=env_of(rank), cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(world_size)]
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
        finally:
            for p in procs:
                p.kill()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("a rank failed:\n" + "\n".join(f"--- rank {r}, exit code {p.returncode}:\n{l[-3000:]}"
                                                             for r, (p, l) in enumerate(zip(procs, logs))))


def _launch(world_size: int, argv: list, tmp: Path, timeout: int = 240) -> dict:
    """Runs `world_size` ranks of minimal_pretrain.train and returns rank 0's result."""
    out = tmp / "result.pt"
    run_ranks(world_size, MODULE, "_dist_worker", [json.dumps(argv + ["--output-dir", str(tmp / "run")]), str(out)],
              timeout, cwd=tmp)
    return torch.load(out)


_REFERENCE = {}


def _reference(moe: str, tmp_path_factory) -> dict:
    """The single-process run on the same global batch, computed once per model."""
    if moe not in _REFERENCE:
        _REFERENCE[moe] = _launch(1, _base_argv(moe), tmp_path_factory.mktemp(f"ref_{moe}"))
    return _REFERENCE[moe]


def assert_same_run(got: dict, ref: dict) -> None:
    assert len(got["losses"]) == len(ref["losses"]) == 3
    for key in ("losses", "grad_norms"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= REL_TOL * abs(b), f"{key} differ: {got[key]} vs {ref[key]}"
    assert got["state"].keys() == ref["state"].keys()
    for name, b in ref["state"].items():
        a = got["state"][name]
        assert a.shape == b.shape, name
        err = ((a - b).norm() / b.norm()).item()
        assert err <= REL_TOL, f"{name}: relative difference {err:.3e}"


def _close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def _detailed_argv(extra: list) -> list:
    """The mixed D M D M model of _base_argv with --moe-metrics detailed, plus `extra` flags."""
    argv = _base_argv("mixed") + list(extra)
    argv[argv.index("--moe-metrics") + 1] = "detailed"
    return argv


def _run_against_one_process(cache: dict, case: str, argv: list, world_size: int, flags: list, tmp_path,
                             tmp_path_factory) -> tuple[dict, dict]:
    """(reference, layout run): argv on one process (launched once per case and kept in `cache`) and
    argv + flags on world_size processes."""
    if case not in cache:
        cache[case] = _launch(1, argv, tmp_path_factory.mktemp(f"ref_{case}"))
    return cache[case], _launch(world_size, argv + flags, tmp_path)


def _ckpt_dist_argv(ckpt_dir: Path, *extra: str) -> list:
    argv = _base_argv("all8") + ["--dropout", "0.1", "--checkpoint-dir", str(ckpt_dir), *extra]
    argv.remove("--no-save")
    return argv


def _load_trace(path: Path) -> list:
    import gzip
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


# A start that is refused writes nothing; --resume and --eval-only build the checkpoint's model; a run owns
# its output (and checkpoint) directory through a lock that the OS drops when the process dies.
_HYGIENE_SHAPE = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-key-value-heads", "1",
                  "--max-seq-length", "16", "--num-experts", "4", "--moe-layer-interval", "2",
                  "--no-router-normalize-topk", "--moe-router-score", "sigmoid"]  # every one off its default


def _hygiene_argv(*extra: str) -> list:
    """Training flags only (no model flags): the tiny model comes from _HYGIENE_SHAPE or a checkpoint."""
    return ["--global-batch-size", "8", "--micro-batch-size", "4", "--warmup-steps", "2", "--eval-iters", "1",
            "--eval-interval", "0", "--log-interval", "1", "--device", "cpu", "--no-progress",
            "--data", _dist_data_file(), *extra]


def _main_in_process(argv: list, monkeypatch, capsys) -> tuple:
    """(exit code, stderr lines) of minimal_pretrain.main in this process."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    rc = minimal_pretrain.main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------------------------------
# shared by the routing, sampling and bench files
# --------------------------------------------------------------------------------------------------
TINY_BENCH = ["--device", "cpu", "--num-tokens", "64", "--hidden-dim", "32", "--num-experts", "4", "--top-k", "2",
              "--iters", "3", "--warmup", "1", "--dtype", "float32"]


def _expected_kept(idx, scores, capacity, policy, seq_len):
    """Brute force: per expert, its assignments sorted by priority, the first `capacity` kept."""
    T, k = len(idx), len(idx[0])
    kept = [[False] * k for _ in range(T)]
    for e in {e for row in idx for e in row}:
        mine = [(t, j) for t in range(T) for j in range(k) if idx[t][j] == e]
        if policy == "position":
            mine.sort(key=lambda a: (a[0] % seq_len, a[0] // seq_len))
        else:
            mine.sort(key=lambda a: (-scores[a[0]][e], a[0]))
        for t, j in mine[:capacity]:
            kept[t][j] = True
    return kept


def _greedy_by_recompute(model: GPT, ids: torch.Tensor, new: int) -> torch.Tensor:
    """The documented context policy, brute force: every token recomputes its whole window, which holds at
    most T tokens; a prompt is cropped to its last T and a window that would exceed T restarts from the
    last T // 2 tokens."""
    T = model.cfg.max_seq_length
    out, start = ids, max(0, ids.shape[1] - T)
    with torch.no_grad():
        for _ in range(new):
            if out.shape[1] - start > T:
                start = out.shape[1] - T // 2
            logits, _ = model(out[:, start:])
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out
