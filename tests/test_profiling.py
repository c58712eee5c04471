"""Profiler traces (profiling.py, --profile): without --profile the named ranges are a shared no-op and
nothing is written; bad --profile flags are one line and exit code 2; every rank of a gloo run writes a
trace holding the named ranges, and rank 0's table matches it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import minimal_pretrain

from helpers import ROOT, _base_argv, _clean_env, _load_trace, rank_envs


def _our_ranges(names) -> set:
    """The names of our phase() ranges among profiler event names (torch's own ops are not ours)."""
    return {n for n in names if n == "optimizer" or n.startswith(("moe/", "tp/", "dp/", "pp/", "forward/mb", "backward/mb"))}


def test_profile_off_enters_no_range_and_writes_nothing(tmp_path, monkeypatch):
    import profiling
    from torch.profiler import ProfilerActivity, profile
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = _base_argv("mixed") + ["--moe-metrics", "brief"]
    argv[argv.index("--max-steps") + 1] = "2"

    def names_seen(out_dir):  # event names an external profiler records around a whole training run
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            minimal_pretrain.train(minimal_pretrain.parse_args(argv + ["--output-dir", str(out_dir)]))
        return _our_ranges(e.name for e in prof.events())

    assert not profiling._enabled and profiling.phase("moe/router") is profiling.phase("optimizer")
    assert names_seen(tmp_path / "off") == set()
    assert sorted(str(p.relative_to(tmp_path / "off")) for p in (tmp_path / "off").rglob("*") if p.is_file()) == \
        ["config.json", "metrics.jsonl"]
    # Control: the same run with the ranges switched on shows them to the same external profiler.
    monkeypatch.setattr(profiling, "_enabled", True)
    on = names_seen(tmp_path / "on")
    assert {"forward/mb0", "forward/mb3", "backward/mb3", "moe/router", "moe/experts", "optimizer", "moe/stats"} <= on, on


PROFILE_BAD_FLAGS = [
    (["--profile", "--profile-steps", "0"], "--profile-steps"),
    (["--profile", "--profile-wait", "-1"], "--profile-wait"),
    (["--profile-warmup", "-2"], "--profile-warmup"),
    (["--profile", "--max-steps", "8"], "--max-steps 8"),  # window 5 + 3 + 5 = 13 steps
    (["--trace-dir", "somewhere"], "--trace-dir"),
    (["--profile-gzip"], "--profile-gzip"),
    (["--profile", "--eval-only", "--resume", "auto"], "--eval-only"),
]


@pytest.mark.parametrize("flags,expect", PROFILE_BAD_FLAGS, ids=[f[1] for f in PROFILE_BAD_FLAGS])
def test_bad_profile_flags_exit_2_with_one_line(flags, expect, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert minimal_pretrain.main(flags + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, err


def test_trace_dir_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "f").write_text("x")
    for trace_dir, expect in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "cannot create")):
        argv = _base_argv("dense") + ["--profile", "--profile-wait", "0", "--profile-warmup", "0", "--profile-steps", "1",
                                      "--trace-dir", str(trace_dir), "--output-dir", str(tmp_path / "run")]
        assert minimal_pretrain.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--trace-dir" in err and expect in err, err


def _launch_cli(world_size: int, argv: list, tmp: Path, timeout: int = 240) -> list:
    """Runs minimal_pretrain.py as `world_size` ranks; returns each rank's output."""
    with rank_envs(world_size, _clean_env()) as env_of:
        procs = [subprocess.Popen([sys.executable, str(ROOT / "minimal_pretrain.py"), *argv], env=env_of(r), cwd=tmp,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world_size)]
        try:
            logs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    return logs


PROFILED_LAYOUTS = {  # layout flags, ranges only that layout has, --profile-gzip, microbatches (8 / (2 x DP))
    "tp2": (["--tensor-parallel-size", "2"], {"tp/all_reduce_fwd", "tp/all_reduce_bwd"}, False, 4),
    "dp2": ([], {"dp/all_reduce_launch", "dp/all_reduce_wait"}, True, 2),
    "pp2": (["--pipeline-parallel-size", "2"], set(), False, 4),  # per stage, in the test
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(PROFILED_LAYOUTS))
def test_profile_writes_a_trace_per_rank_with_the_named_ranges(layout, tmp_path):
    flags, own, gz, m = PROFILED_LAYOUTS[layout]
    wait, warmup, active = 1, 1, 2
    argv = _base_argv("mixed") + flags + ["--moe-metrics", "brief", "--profile", "--profile-wait", str(wait),
                                          "--profile-warmup", str(warmup), "--profile-steps", str(active),
                                          "--output-dir", str(tmp_path / "run")] + (["--profile-gzip"] if gz else [])
    argv[argv.index("--max-steps") + 1] = str(wait + warmup + active)
    logs = _launch_cli(2, argv, tmp_path)
    first = wait + warmup + 1  # steps count from 1: the first recorded one
    names = [f"trace_rank{r}_step{first}.json" + (".gz" if gz else "") for r in range(2)]
    assert sorted(p.name for p in (tmp_path / "run" / "traces").iterdir()) == names  # no partial file left
    common = {"optimizer", "moe/stats", "moe/router", "moe/permute", "moe/experts", "moe/unpermute_combine"}
    for rank, name in enumerate(names):
        path = tmp_path / "run" / "traces" / name
        assert f"profile: rank {rank} wrote {path} (steps {first}-{first + active - 1})" in logs[rank], logs[rank]
        events = [e for e in _load_trace(path) if e.get("ph") == "X"]
        seen = {e["name"] for e in events}
        # Only the recorded steps are in the trace, each marked by the profiler's own step range (torch
        # numbers those from 0 at the run's first step: step N is ProfilerStep#N-1).
        assert {n for n in seen if n.startswith("ProfilerStep#")} == {f"ProfilerStep#{s - 1}" for s in range(first, first + active)}
        mb = {f"{d}/mb{i}" for d in ("forward", "backward") for i in range(m)}
        # The mixed model has MoE layers 1 and 3: under PP2 each stage (layers 0-1, 2-3) holds one. 1F1B with
        # 4 microbatches: stage 0 sends activations and receives gradients, stage 1 the other way round.
        if layout == "pp2":
            own = ({"pp/send_forward", "pp/send_forward_recv_backward", "pp/recv_backward"} if rank == 0 else
                   {"pp/recv_forward", "pp/send_backward_recv_forward", "pp/send_backward"})
        assert mb | common | own <= seen, sorted(_our_ranges(seen))
        assert sum(e["name"] == "forward/mb0" for e in events) == active  # one per recorded step

    # Rank 0's summary table against its own trace: the forward share is the forward ranges' time over
    # the profiler's step ranges, computed here from the trace events.
    events = [e for e in _load_trace(tmp_path / "run" / "traces" / names[0]) if e.get("ph") == "X"]
    step_us = sum(e["dur"] for e in events if e["name"].startswith("ProfilerStep#"))
    fwd_us = sum(e["dur"] for e in events if e["name"].startswith("forward/mb"))
    row = next(line.split() for line in logs[0].splitlines() if line.strip().startswith("forward/mb*"))
    calls, ms, share = float(row[1]), float(row[2]), float(row[3].rstrip("%"))
    assert calls == m
    assert ms == pytest.approx(fwd_us / 1e3 / active, rel=0.02, abs=0.002)
    assert share == pytest.approx(100 * fwd_us / step_us, abs=0.15)
    assert "profile: rank 1" not in logs[0] and "ms/step" not in logs[1]  # each rank prints its own line, the table only rank 0


def test_compilation_ms_counts_nested_ranges_once():
    import profiling
    from types import SimpleNamespace as Ev

    def ev(name, start, end):
        return Ev(name=name, time_range=Ev(start=start, end=end))
    events = [ev("_compile.compile_inner (dynamo_timed)", 0, 1000), ev("compile_fx_inner (dynamo_timed)", 100, 900),
              ev("aten::mm", 1000, 5000), ev("backward._backward_impl (dynamo_timed)", 6000, 6500),
              ev("bw_compiler (dynamo_timed)", 6400, 7000)]
    assert profiling.compilation_ms(events) == pytest.approx(2.0)  # 1000 us + 6000..7000 us
    assert profiling.compilation_ms(events[2:3]) == 0
