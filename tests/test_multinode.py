"""Several machines, simulated by torchrun agents on one host: the README's recipe trains as one process,
paths the nodes do not share stop every rank with one line, and a SIGTERM to torchrun saves and stops every
rank cleanly."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt

from helpers import (MODULE, ROOT, TESTS, _base_argv, _ckpt_dist_argv, _clean_env, _dist_data_file,
                     _reference, _train_in_process, _wait_for_line, assert_same_run)


def _torchrun_agents(nproc: int, tail: list, cwds: list, timeout: int = 300) -> list:
    """One torchrun agent per working directory in `cwds`, on this host as on that many machines: a c10d
    rendezvous on localhost, `nproc` ranks each running `tail` (a program and its arguments). Returns
    (exit code, output) per agent. Output goes to files (no agent blocks on a full pipe); on a time-out each
    agent gets SIGTERM first, which it forwards to its ranks (they run in a session of their own).

    The rendezvous store lives in this process, not in an agent (`is_host=0` for both): when the agent that
    hosted it exited first, the other agent lost the store while its rank was still stopping, and torchrun
    then killed that rank mid-exit (a traceback from the rank, a RendezvousConnectionError from the agent)."""
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the system picks one
    port = store.port
    outs = [tempfile.TemporaryFile(mode="w+") for _ in cwds]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(cwds)), "--nproc-per-node", str(nproc),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes-test", "--rdzv-conf",
         "is_host=0", *tail],
        cwd=cwd, env=dict(_clean_env(), OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT, text=True)
        for cwd, out in zip(cwds, outs)]
    try:
        for a in agents:
            a.wait(timeout=timeout)
    finally:
        for a in agents:
            if a.poll() is None:
                a.terminate()
                try:
                    a.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    a.kill()
    del store  # every agent has exited: the rendezvous store can go
    logs = []
    for out in outs:
        out.seek(0)
        logs.append(out.read())
        out.close()
    return [(a.returncode, log) for a, log in zip(agents, logs)]


@pytest.mark.multiprocess
def test_two_nodes_train_as_one_process_and_save_one_checkpoint(tmp_path, tmp_path_factory):
    """The README's several-machines recipe, as two torchrun agents of two ranks on one host: TP2 inside
    each node, PP2 across the nodes. The same run as one process, and the checkpoint on the shared
    filesystem holds the shards written by both nodes."""
    argv = [a for a in _base_argv("mixed") if a != "--no-save"] + [
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--output-dir", str(tmp_path / "run")]
    code = f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]; import {MODULE} as t; t._dist_worker(sys.argv[1], sys.argv[2])"
    agents = _torchrun_agents(2, ["--no-python", sys.executable, "-c", code, json.dumps(argv),
                                  str(tmp_path / "result.pt")], [tmp_path, tmp_path])
    assert [rc for rc, _ in agents] == [0, 0], "\n".join(log[-3000:] for _, log in agents)
    assert_same_run(torch.load(tmp_path / "result.pt"), _reference("mixed", tmp_path_factory))
    path = ckpt.resolve_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.read_manifest(path)["step"] == 3
    assert sorted(p.name for p in path.glob("shard_*")) == [f"shard_pp{p}_tp{t}.pt" for p in (0, 1) for t in (0, 1)]


UNSHARED_CASES = {  # what the two 'machines' do not share -> (extra flags, what every error line says)
    "checkpoint-dir": ([], "ranks cannot see what rank 0 sees in --checkpoint-dir run/checkpoints (1 of 2 ranks)"),
    "resume": (["--resume", "old/checkpoints", "--no-save"], "ranks cannot see what rank 0 sees in --resume old/"),
    "data-missing": (["--data", "data.txt", "--no-save"], "--data data.txt"),
    "data-differs": (["--data", "data.txt", "--no-save"], "rank 1 loaded other tokens than rank 0"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(UNSHARED_CASES))
def test_paths_that_the_nodes_do_not_share_stop_every_rank_with_one_line(case, tmp_path, monkeypatch):
    """Two 'machines' that do not share a path: each agent runs in its own directory and the paths are
    relative, so rank 0 and rank 1 mean two different files. Every rank stops before training with the
    same error line (exit 2; torchrun then exits 1), rather than one rank failing and the other waiting,
    and no output directory is left behind."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    flags, says = UNSHARED_CASES[case]
    if case == "resume":  # a checkpoint that only node 0 has
        monkeypatch.chdir(nodes[0])
        _train_in_process([a for a in _base_argv("dense") if a != "--no-save"] + ["--output-dir", "old", "--max-steps", "2"],
                          monkeypatch)
    if case.startswith("data"):
        (nodes[0] / "data.txt").write_text(Path(_dist_data_file()).read_text())
        if case == "data-differs":
            (nodes[1] / "data.txt").write_text(Path(_dist_data_file()).read_text()[::-1])
    before = [sorted(p.name for p in d.iterdir()) for d in nodes]
    argv = [a for a in _base_argv("dense") if a != "--no-save"]
    argv = argv[:argv.index("--data")] + argv[argv.index("--data") + 2:]
    agents = _torchrun_agents(1, [str(ROOT / "minimal_pretrain.py"), *argv, "--output-dir", "run", *flags], nodes)
    for rc, log in agents:
        assert rc == 1, log[-3000:]  # torchrun's exit code when a rank fails
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and says in errors[0], log[-3000:]
        # No traceback from a rank (a rank's would run through minimal_pretrain.py); torchrun reports the
        # failure with its own.
        assert 'minimal_pretrain.py", line' not in log and "ChildFailedError" in log, log[-3000:]
        assert "exitcode  : 2" in log, log[-3000:]
    assert [sorted(p.name for p in d.iterdir()) for d in nodes] == before


@pytest.mark.multiprocess
def test_sigterm_to_torchrun_saves_and_every_rank_stops_cleanly(tmp_path):
    """A scheduler signals torchrun, not the ranks: torchrun forwards SIGTERM to every rank, each finishes its
    step, they save one complete checkpoint and exit 0 within torchrun's grace period. torchrun itself then
    exits 1 (its own SignalException), which README says; the test pins that down."""
    import signal
    argv = _ckpt_dist_argv(tmp_path / "ckpts", "--max-steps", "400", "--warmup-steps", "400",
                           "--output-dir", str(tmp_path / "run"), "--pipeline-parallel-size", "2")
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(ROOT / "minimal_pretrain.py"), *argv], cwd=tmp_path,
                             env=dict(_clean_env(), OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        seen = _wait_for_line(agent, "step     2 |")
        agent.send_signal(signal.SIGTERM)
        out = "".join(seen) + agent.communicate(timeout=240)[0]
    finally:
        agent.kill()
    assert agent.returncode == 1, out[-3000:]
    assert "SignalException" in out and "got signal: 15" in out, out[-3000:]
    assert "stopped by SIGTERM" in out, out[-3000:]
    assert "forcefully" not in out, out[-3000:]  # no rank outlived the grace period (torchrun's SIGKILL line)
    assert out.count("Traceback") == 1, out[-3000:]  # torchrun's own; none from a rank
    path = ckpt.resolve_checkpoint(str(tmp_path / "ckpts"))
    assert sorted(p.name for p in path.glob("shard_*")) == ["shard_pp0_tp0.pt", "shard_pp1_tp0.pt"]
    assert 3 <= ckpt.read_manifest(path)["step"] < 400
