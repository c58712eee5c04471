"""One run per directory, nothing written before a start is accepted: the lock on the output and checkpoint
directories, and what a refused start leaves (nothing)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint as ckpt
import run_control
from errors import InputError

from helpers import (ROOT, _HYGIENE_SHAPE, _clean_env, _hygiene_argv, _main_in_process, _train_in_process,
                     _wait_for_line, rank_envs)


def _tree(root: Path) -> dict:
    """{relative path: bytes} of every file under root (directories as None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_refused_resume_writes_nothing(tmp_path, monkeypatch, capsys):
    """A --resume refused for a model flag that contradicts the checkpoint leaves the run's directory as it
    was (config.json included), and without --output-dir leaves no runs/<time> behind."""
    run = tmp_path / "run"
    _train_in_process([*_HYGIENE_SHAPE, *_hygiene_argv("--max-steps", "1", "--output-dir", str(run))], monkeypatch)
    before = _tree(run)
    rc, err = _main_in_process([*_hygiene_argv("--max-steps", "2", "--num-layers", "3", "--resume", "auto",
                                               "--output-dir", str(run))], monkeypatch, capsys)
    assert rc == 2 and len(err) == 1 and "num_layers (checkpoint 2, now 3)" in err[0], err
    assert _tree(run) == before
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, err = _main_in_process([*_hygiene_argv("--max-steps", "2", "--num-layers", "3", "--resume",
                                               str(run / "checkpoints"))], monkeypatch, capsys)
    assert rc == 2 and len(err) == 1 and "num_layers" in err[0], err
    assert list(cwd.iterdir()) == []


@pytest.mark.multiprocess
def test_second_run_into_a_busy_output_dir_exits_2_naming_the_holder(tmp_path, monkeypatch, capsys):
    """Two runs into one --output-dir: the second stops at once with one line naming the first (its pid),
    touching none of its files; the first then stops cleanly on SIGTERM with its own checkpoint and a log
    of its own steps only. A lock file left by a killed run (the OS dropped its lock) stops nobody."""
    import signal
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "minimal_pretrain.py"), *_HYGIENE_SHAPE,
                              *_hygiene_argv("--max-steps", "100000", "--seed", "1", "--output-dir", str(run))],
                             cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(first, "step     2 |")
        before = _tree(run)
        assert "config.json" in before
        rc, err = _main_in_process([*_HYGIENE_SHAPE, *_hygiene_argv("--max-steps", "1", "--seed", "2",
                                                                    "--output-dir", str(run))], monkeypatch, capsys)
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("error: --output-dir") and f"pid {first.pid}" in err[0], err
        after = _tree(run)
        assert after.keys() == before.keys() and after["config.json"] == before["config.json"]
        first.send_signal(signal.SIGTERM)
        out, stderr = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0 and "stopped by SIGTERM" in out, stderr[-2000:]
    path = ckpt.resolve_checkpoint(str(run / "checkpoints"))
    stop = ckpt.read_manifest(path)["step"]
    assert ckpt.read_manifest(path)["args"]["seed"] == 1
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, stop + 1)), steps  # one run's steps (step N: N steps done), once each
    assert not list(run.rglob(".lock"))  # a clean exit leaves no lock file
    for d in (run, run / "checkpoints"):  # what a killed run leaves: the file, without the OS lock
        (d / ".lock").write_text("pid 999999 on a-dead-host, started 2000-01-01 00:00:00\n")
    resumed = _train_in_process([*_HYGIENE_SHAPE, *_hygiene_argv("--max-steps", str(stop + 1), "--resume", "auto",
                                                                 "--output-dir", str(run))], monkeypatch)
    assert len(resumed.losses) == 1


@pytest.mark.multiprocess
def test_busy_output_dir_stops_every_rank_with_one_line(tmp_path):
    """The verdict of rank 0's lock reaches every rank: each prints the same line and exits 2."""
    run = tmp_path / "run"
    with run_control.dir_lock(str(run), "--output-dir"), rank_envs(2, _clean_env()) as env_of:
        procs = [subprocess.Popen([sys.executable, str(ROOT / "minimal_pretrain.py"), *_HYGIENE_SHAPE,
                                   *_hygiene_argv("--max-steps", "1", "--output-dir", str(run))], env=env_of(r),
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(2)]
        try:
            results = [p.communicate(timeout=240) for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    for p, (out, err) in zip(procs, results):
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("error: --output-dir") and f"pid {os.getpid()}" in lines[0], lines
    assert not run.exists()  # the lock's holder made the directory and removed it


def test_busy_checkpoint_dir_is_refused_even_from_another_output_dir(tmp_path, monkeypatch, capsys):
    """Two runs with their own --output-dir but one --checkpoint-dir would save into each other's checkpoints:
    the checkpoint directory is locked too, and the refused run leaves no output directory behind."""
    with run_control.dir_lock(str(tmp_path / "ckpts"), "--output-dir"):  # as a run whose output dir it is
        rc, err = _main_in_process([*_HYGIENE_SHAPE, *_hygiene_argv("--max-steps", "1", "--output-dir",
                                                                    str(tmp_path / "b"), "--checkpoint-dir",
                                                                    str(tmp_path / "ckpts"))], monkeypatch, capsys)
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("error: --checkpoint-dir") and f"pid {os.getpid()}" in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"]
        assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [".lock"]


def test_lock_on_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """Where flock fails (Lustre without -o flock, NFS without a lock manager) the run is not refused: one
    warning says it goes on unlocked, and the lock file is still removed at the end."""
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_control.fcntl, "flock", no_locks)
    with run_control.dir_lock(str(tmp_path / "run"), "--output-dir"):
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --output-dir") and "No locks available" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_sink_that_fails_to_start_leaves_config_json_as_it_was(tmp_path, monkeypatch):
    """An optional sink that cannot start (wandb.init without a login) is exit 2: the run directory's
    config.json must still describe the run that wrote it, and no metrics.jsonl is opened."""
    import types
    import run_log

    def refuse(**kwargs):
        raise RuntimeError("no login")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    (tmp_path / "config.json").write_text('{"seed": 1}')
    with pytest.raises(InputError, match="--wandb"):
        run_log.RunLog(str(tmp_path), {"seed": 2}, use_wandb=True)
    assert (tmp_path / "config.json").read_text() == '{"seed": 1}'
    assert not (tmp_path / "metrics.jsonl").exists()
