"""Checkpoints: resume is bit-exact under the same layout, any layout loads any other, a killed save never
leaves a half checkpoint that --resume auto picks, a damaged one is refused naming a whole one, faults and
signals end the run cleanly, and the optional Hub upload."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import minimal_pretrain
from model import ModelConfig

from helpers import (REL_TOL, ROOT, _HYGIENE_SHAPE, _assert_checkpoints_equal, _assert_one_error_line, _ckpt_argv,
                     _ckpt_dist_argv, _clean_env, _dist_data_file, _hygiene_argv, _launch,
                     _main_in_process, _run_cli, _train_in_process, _wait_for_line, needs_tokenizers, rank_envs)


def test_resume_is_bit_exact_single_process(tmp_path, monkeypatch):
    straight = _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "6", "--save-interval", "3"), monkeypatch)
    half = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert ckpt.is_checkpoint(half)
    resumed = _train_in_process(_ckpt_argv(tmp_path / "b", "--max-steps", "6", "--resume", str(half)), monkeypatch)
    assert resumed.losses == straight.losses[3:]  # exact: same floats, not approximately
    assert resumed.val_loss == straight.val_loss
    _assert_checkpoints_equal(tmp_path / "a" / "checkpoints" / "step_00000006",
                              tmp_path / "b" / "checkpoints" / "step_00000006")
    # The resume is recorded in the log, and the run after it logs steps 3..5.
    recs = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0] == {"step": 3, "resumed_from": str(half)}
    assert [r["step"] for r in recs if "loss" in r] == [4, 5, 6]


def test_save_format_is_sharded_with_manifest(tmp_path, monkeypatch):
    _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "2"), monkeypatch)
    path = ckpt.resolve_checkpoint(str(tmp_path / "checkpoints"))
    assert path.name == "step_00000002" and (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 2 and manifest["model"]["num_experts"] == 4 and manifest["args"]["max_steps"] == 2
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rng_rank0.pt", "shard_pp0_tp0.pt"]
    experts = manifest["tensors"]["model/layers.0.ffn.experts.w_gate_up"]
    assert experts["shape"] == [4, 32, 128] and experts["tp_split"] == [0, [4]]
    assert manifest["tensors"]["optim/layers.0.ffn.experts.w_gate_up/exp_avg"]["tp_split"] == [0, [4]]
    assert manifest["tensors"]["optim/layers.0.ffn.experts.w_gate_up/step"]["shape"] == []


def test_keep_last_deletes_only_the_oldest(tmp_path, monkeypatch):
    _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "5", "--save-interval", "1", "--keep-last", "2"), monkeypatch)
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000004", "step_00000005"]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, monkeypatch, capsys):
    result = _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "1", "--resume", "auto", "--no-save"), monkeypatch)
    assert len(result.losses) == 1
    assert "no checkpoint in" in capsys.readouterr().out


def test_resume_reports_changed_flags_and_eval_only_matches(tmp_path, monkeypatch, capsys):
    first = _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "3"), monkeypatch)
    path = tmp_path / "a" / "checkpoints" / "step_00000003"
    capsys.readouterr()
    more = _train_in_process(_ckpt_argv(tmp_path / "b", "--max-steps", "4", "--learning-rate", "1e-3",
                                        "--moe-capacity-factor", "2.0", "--resume", str(path)), monkeypatch)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("resuming from")]
    assert len(line) == 1 and "--max-steps 3 -> 4" in line[0] and "--learning-rate 0.003 -> 0.001" in line[0], line
    assert "--moe-capacity-factor 0.0 -> 2.0" in line[0], line  # capacity changes routing, not the parameters
    assert len(more.losses) == 1
    evaluated = _train_in_process(_ckpt_argv(tmp_path / "c", "--max-steps", "3", "--resume", str(path), "--eval-only"),
                                  monkeypatch)
    assert evaluated.val_loss == first.val_loss and evaluated.losses == []
    assert not (tmp_path / "c" / "checkpoints").exists()


@pytest.mark.multiprocess
def test_fresh_run_over_old_checkpoints_and_eval_only_without_one_exit_2(tmp_path, monkeypatch):
    _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "1"), monkeypatch)
    d = tmp_path / "a" / "checkpoints"
    before = sorted(p.name for p in d.iterdir())
    r = _run_cli(_ckpt_argv(tmp_path / "a", "--max-steps", "2"))  # would save next to the old run's checkpoints
    _assert_one_error_line(r, 2, "--checkpoint-dir", "--resume auto")
    assert sorted(p.name for p in d.iterdir()) == before
    r = _run_cli(_ckpt_argv(tmp_path / "a", "--max-steps", "1", "--no-save"))  # saves nothing: allowed
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run_cli(_ckpt_argv(tmp_path / "empty", "--max-steps", "1", "--resume", "auto", "--eval-only"))
    _assert_one_error_line(r, 2, "--eval-only", "no checkpoint")


@pytest.mark.multiprocess
def test_resume_with_other_model_exits_2_naming_fields(tmp_path, monkeypatch):
    _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "1"), monkeypatch)
    before = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    r = _run_cli(_ckpt_argv(tmp_path / "b", "--max-steps", "2", "--hidden-size", "64", "--num-experts", "8",
                            "--resume", str(tmp_path / "a" / "checkpoints")))
    _assert_one_error_line(r, 2, "hidden_size", "num_experts")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == before


@pytest.mark.multiprocess
def test_hf_repo_needs_the_package_and_a_token(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ckpt.CheckpointError, match="pip install huggingface_hub"):
        ckpt.check_hub("me/model")
    monkeypatch.delitem(sys.modules, "huggingface_hub")
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in _clean_env().items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no stored login there
    r = _run_cli(_ckpt_argv(tmp_path / "out", "--max-steps", "1", "--hf-repo", "me/model"), env=env)
    _assert_one_error_line(r, 2, "--hf-repo", "token")
    assert not (tmp_path / "out").exists()


def test_hf_upload_is_called_per_save_and_failures_do_not_stop_training(tmp_path, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_used_for_network")
    calls = []

    def fake_upload_folder(self, **kw):  # the network call itself; everything before it is real
        calls.append(kw)
        if len(calls) == 1:
            raise ConnectionError("no network in this test")

    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(hub.HfApi, "upload_folder", fake_upload_folder)
    result = _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "4", "--save-interval", "2",
                                          "--hf-repo", "me/model"), monkeypatch)
    assert len(result.losses) == 4
    assert [c["path_in_repo"] for c in calls] == ["step_00000002", "step_00000004"]
    assert all(c["repo_id"] == "me/model" and Path(c["folder_path"]).name == c["path_in_repo"] for c in calls)
    out = capsys.readouterr().out
    assert "upload of step_00000002 to me/model failed" in out and "uploaded step_00000004" in out


def test_hf_uploader_protects_a_checkpoint_until_its_upload_ends(tmp_path, monkeypatch):
    """--keep-last may not delete a checkpoint that is queued or uploading: protected() names it from upload()
    until the worker thread has finished its job, and never again after."""
    import threading
    hub = pytest.importorskip("huggingface_hub")
    release = threading.Event()
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(hub.HfApi, "upload_folder", lambda self, **kw: release.wait(30))
    uploader = ckpt.HubUploader("me/model", say=lambda *a: None)
    uploader.upload(tmp_path / "step_00000002")
    uploader.upload(tmp_path / "step_00000004")
    assert uploader.protected() == {"step_00000002", "step_00000004"}
    release.set()
    uploader.close()
    assert uploader.protected() == frozenset()


# --------------------------------------------------------------------------------------------------
# A killed save never leaves a half checkpoint that --resume auto picks
# --------------------------------------------------------------------------------------------------
_KILL_SNIPPET = """
import os, sys, torch
sys.path.insert(0, {here!r})
import checkpoint, minimal_pretrain
point, nth = sys.argv[1], int(sys.argv[2])
count = {{"save": 0, "replace": 0}}
real_save, real_replace = torch.save, os.replace
def dying_save(obj, f, *a, **k):
    count["save"] += 1
    if point == "save" and count["save"] == nth:
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # a torn write: the file is cut short, then the process dies
            fh.truncate(max(1, os.path.getsize(f) // 2))
        os._exit(9)
    return real_save(obj, f, *a, **k)
def dying_replace(a, b):
    count["replace"] += 1
    if point == "replace" and count["replace"] == nth:
        os._exit(9)
    return real_replace(a, b)
torch.save = dying_save
checkpoint.os.replace = dying_replace
sys.exit(minimal_pretrain.main(sys.argv[3:]))
"""


# Saves at steps 1 and 2 (keep-last 1). Per save: torch.save shard, torch.save rng; os.replace of the
# directory, of the `latest` marker, then (second save) of the old checkpoint to its .del- name.
KILL_POINTS = {  # (point, nth call): the checkpoint --resume auto must find afterwards
    "shard_write_of_2nd_save": ("save", 3, 1),
    "rng_write_of_2nd_save": ("save", 4, 1),
    "before_rename_of_2nd_save": ("replace", 3, 1),
    "before_latest_marker_of_2nd_save": ("replace", 4, 2),
    "while_deleting_the_1st": ("replace", 5, 2),
}


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed_saves")
    procs = {}
    for name, (point, nth, _) in KILL_POINTS.items():
        argv = _ckpt_argv(root / name, "--max-steps", "2", "--save-interval", "1", "--keep-last", "1")
        procs[name] = subprocess.Popen([sys.executable, "-c", _KILL_SNIPPET.format(here=str(ROOT)), point, str(nth), *argv],
                                       cwd=root, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for p in procs.values():
        p.communicate(timeout=300)
    return root, {n: p.returncode for n, p in procs.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_killed_save_leaves_a_complete_checkpoint(name, killed_saves):
    root, codes = killed_saves
    assert codes[name] == 9, f"{name}: the save was not killed (exit {codes[name]})"
    d = root / name / "checkpoints"
    newest = ckpt.resolve_checkpoint(str(d))
    assert newest.name == f"step_{KILL_POINTS[name][2]:08d}"
    manifest, state = ckpt.load_consolidated(newest, with_optimizer=True)  # every file it names is whole
    assert manifest["step"] == KILL_POINTS[name][2] and len(state) > 10


@pytest.mark.multiprocess
def test_resume_after_killed_save_continues(killed_saves, tmp_path):
    root, _ = killed_saves
    run = root / "shard_write_of_2nd_save"
    r = _run_cli(_ckpt_argv(run, "--max-steps", "3", "--save-interval", "1", "--keep-last", "1", "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and "step_00000001" in r.stdout
    assert [p.name for _, p in ckpt.complete_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert not list((run / "checkpoints").glob(".tmp-*")) and not list((run / "checkpoints").glob(".del-*"))


# With warm-up as long as the run, the learning rate of step s does not depend on --max-steps, so a run
# stopped by a signal and resumed for a few steps can be compared with a short straight run.
_LONG = ["--warmup-steps", "400"]


@pytest.mark.multiprocess
def test_sigterm_saves_and_resumed_run_matches_straight(tmp_path, monkeypatch):
    import signal
    argv = _ckpt_argv(tmp_path / "a", "--max-steps", "400", *_LONG)
    proc = subprocess.Popen([sys.executable, str(ROOT / "minimal_pretrain.py"), *argv], cwd=ROOT, env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_line(proc, "step     2 |")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out, out[-2000:]
    path = ckpt.resolve_checkpoint(str(tmp_path / "a" / "checkpoints"))
    stop = ckpt.read_manifest(path)["step"]
    # The signal lands after step 2's log line: before step 2's own stop check (stop 2) or later.
    assert 2 <= stop < 400
    resumed = _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", str(stop + 2), *_LONG, "--resume", "auto"),
                                monkeypatch)
    straight = _train_in_process(_ckpt_argv(tmp_path / "b", "--max-steps", str(stop + 2), *_LONG), monkeypatch)
    assert resumed.losses == straight.losses[stop:]
    _assert_checkpoints_equal(tmp_path / "a" / "checkpoints" / f"step_{stop + 2:08d}",
                              tmp_path / "b" / "checkpoints" / f"step_{stop + 2:08d}")


# --------------------------------------------------------------------------------------------------
# Distributed: bit-exact resume under DP2 x TP2 x PP2, resharding to one process and to TP4/EP4,
# and a signal reaching one rank of two stops both after the same step with one checkpoint.
# --------------------------------------------------------------------------------------------------
DP2_TP2_PP2 = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"]


@pytest.fixture(scope="module")
def dp2_tp2_pp2_checkpoints(tmp_path_factory):
    """A straight 4-step DP2xTP2xPP2 run saving at step 2 and at the end."""
    root = tmp_path_factory.mktemp("ckpt_8ranks")
    (root / "a").mkdir()
    straight = _launch(8, _ckpt_dist_argv(root / "ckpts", "--max-steps", "4", "--save-interval", "2", *DP2_TP2_PP2),
                       root / "a")
    return root, straight


@pytest.mark.multiprocess
def test_resume_is_bit_exact_dp2_tp2_pp2(dp2_tp2_pp2_checkpoints, tmp_path):
    root, straight = dp2_tp2_pp2_checkpoints
    resumed = _launch(8, _ckpt_dist_argv(tmp_path / "ckpts", "--max-steps", "4", *DP2_TP2_PP2,
                                         "--resume", str(root / "ckpts" / "step_00000002")), tmp_path)
    assert resumed["losses"] == straight["losses"][2:]
    _assert_checkpoints_equal(root / "ckpts" / "step_00000004", tmp_path / "ckpts" / "step_00000004")
    assert sorted(p.name for p in (tmp_path / "ckpts" / "step_00000004").glob("shard_*")) == [
        f"shard_pp{p}_tp{t}.pt" for p in range(2) for t in range(2)]


RESHARD_LAYOUTS = {"one-process": (1, []), "tp4-ep4": (4, ["--tensor-parallel-size", "4"]),
                   "dp4-ep4-over-dp": (4, ["--expert-parallel-size", "4"])}  # the experts split over DP ranks


@pytest.mark.multiprocess
def test_reshard_dp2_tp2_pp2_checkpoint(dp2_tp2_pp2_checkpoints, tmp_path):
    """The DP2xTP2xPP2 checkpoint loads into one process, into TP4/EP4 and into DP4 with EP4 over the DP ranks
    with the saved parameters bit for bit, and the other layouts continue training with the losses one process
    produces from it. Dropout is switched off
    for the continuation: its random streams depend on the layout (they restart from the seed)."""
    root, _ = dp2_tp2_pp2_checkpoints
    half = root / "ckpts" / "step_00000002"
    _, saved = ckpt.load_consolidated(half)
    losses = {}
    for name, (world_size, flags) in RESHARD_LAYOUTS.items():
        run = tmp_path / name
        run.mkdir()
        loaded = _launch(world_size, _ckpt_dist_argv(run / "e", "--max-steps", "2", "--resume", str(half),
                                                     "--eval-only", "--eval-iters", "1") + flags, run)
        assert loaded["state"].keys() == saved.keys()
        for key, t in saved.items():  # the gathered parameters are the saved ones, bit for bit
            assert torch.equal(loaded["state"][key], t), f"{name}: {key}"
        cont = _launch(world_size, _ckpt_dist_argv(run / "c", "--max-steps", "4", "--resume", str(half),
                                                   "--dropout", "0") + flags, run)
        losses[name] = cont["losses"]
    ref = losses["one-process"]
    assert len(ref) == 2
    for name in RESHARD_LAYOUTS.keys() - {"one-process"}:
        for a, b in zip(losses[name], ref):  # another layout: fp32 sums in another order
            assert abs(a - b) <= REL_TOL * abs(b), (name, losses)


@pytest.mark.multiprocess
def test_sigterm_to_one_rank_stops_all_ranks(tmp_path):
    import signal
    argv = _ckpt_dist_argv(tmp_path / "ckpts", "--max-steps", "400", "--warmup-steps", "400",
                           "--output-dir", str(tmp_path / "run"))
    with rank_envs(2, _clean_env()) as env_of:
        procs = [subprocess.Popen([sys.executable, str(ROOT / "minimal_pretrain.py"), *argv, "--pipeline-parallel-size",
                                   "2"], cwd=ROOT, env=env_of(rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for rank in range(2)]
        try:
            _wait_for_line(procs[0], "step     2 |")
            procs[1].send_signal(signal.SIGTERM)  # only the last stage hears it
            outs = [p.communicate(timeout=240)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "stopped by" in outs[0]
    path = ckpt.resolve_checkpoint(str(tmp_path / "ckpts"))
    assert sorted(p.name for p in path.glob("shard_*")) == ["shard_pp0_tp0.pt", "shard_pp1_tp0.pt"]
    assert 3 <= ckpt.read_manifest(path)["step"] < 400


def test_resume_and_eval_only_take_the_model_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    """Model flags left out of --resume / --eval-only come from the checkpoint (the resumed run is
    bit-exact), given ones that agree are accepted, and --eval-only writes nothing anywhere."""
    straight = _train_in_process([*_HYGIENE_SHAPE, *_hygiene_argv("--max-steps", "4", "--save-interval", "2",
                                                                  "--output-dir", str(tmp_path / "a"))], monkeypatch)
    half = tmp_path / "a" / "checkpoints" / "step_00000002"
    resumed = _train_in_process(_hygiene_argv("--max-steps", "4", "--hidden-size", "32", "--resume", str(half),
                                              "--output-dir", str(tmp_path / "b")), monkeypatch)
    assert resumed.losses == straight.losses[2:] and resumed.val_loss == straight.val_loss
    _assert_checkpoints_equal(tmp_path / "a" / "checkpoints" / "step_00000004",
                              tmp_path / "b" / "checkpoints" / "step_00000004")
    assert ckpt.read_manifest(tmp_path / "b" / "checkpoints" / "step_00000004")["model"] == \
        ckpt.read_manifest(half)["model"]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_layers"] == 2
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    evaluated = _train_in_process(_hygiene_argv("--resume", str(tmp_path / "a" / "checkpoints"), "--eval-only",
                                                "--output-dir", str(tmp_path / "e")), monkeypatch)
    assert evaluated.val_loss == straight.val_loss
    assert list(cwd.iterdir()) == [] and not (tmp_path / "e").exists()
    rc, err = _main_in_process(_hygiene_argv("--resume", str(half), "--eval-only", "--tensorboard"), monkeypatch, capsys)
    assert rc == 2 and len(err) == 1 and "--eval-only" in err[0] and "--tensorboard" in err[0], err


def test_damaged_newest_checkpoint_stops_resume_naming_the_older_whole_one(tmp_path, monkeypatch, capsys):
    """A truncated shard in the newest checkpoint (also in a manifest written before manifests listed file
    sizes): --resume auto, --resume PATH and sample.py stop with one line naming it and the newest whole
    checkpoint to pass, exit 2, nothing changed. Resuming from that one with --keep-last 1 keeps what it saves."""
    import sample
    d = tmp_path / "checkpoints"
    _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "4", "--save-interval", "2", "--eval-iters", "0"), monkeypatch)
    good, bad = d / "step_00000002", d / "step_00000004"
    shard = bad / "shard_pp0_tp0.pt"
    with open(shard, "r+b") as f:  # a torn copy: the file is cut short
        f.truncate(shard.stat().st_size // 2)
    manifest = json.loads((bad / "manifest.json").read_text())
    before = sorted(str(q.relative_to(d)) for q in d.rglob("*"))
    for old_format in (False, True):
        if old_format:
            manifest.pop("files")
            (bad / "manifest.json").write_text(json.dumps(manifest))
        capsys.readouterr()
        for flags, said in ((["--resume", "auto"], "--resume auto"), (["--resume", str(bad)], str(bad))):
            assert minimal_pretrain.main(_ckpt_argv(tmp_path, "--max-steps", "6", *flags)) == 2
            err = capsys.readouterr().err.splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {said}") and str(bad) in err[0], err
            assert "shard_pp0_tp0.pt" in err[0] and f"pass --resume {good}" in err[0], err
        assert sample.main(["--checkpoint", str(d), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "damaged" in err[0] and f"pass --checkpoint {good}" in err[0], err
        assert sorted(str(q.relative_to(d)) for q in d.rglob("*")) == before
    _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "3", "--keep-last", "1", "--eval-iters", "0",
                                 "--resume", str(good)), monkeypatch)
    assert [p.name for _, p in ckpt.complete_checkpoints(d)] == ["step_00000003", "step_00000004"]
    assert ckpt.checkpoint_damage(d / "step_00000003") is None


@needs_tokenizers
def test_checkpoint_carries_its_tokenizer_so_sample_needs_no_data(tmp_path, monkeypatch, capsys):
    """A BPE run's checkpoint holds its codec and tokenizer.json: sample.py prints the same text after the
    data directory moved. A checkpoint written before (no codec, no tokenizer file) with its data gone is
    one line saying it cannot decode, exit 2; with its data back it decodes as before."""
    import prepare_data
    import sample
    (tmp_path / "text.txt").write_text(Path(_dist_data_file()).read_text())
    data, moved = tmp_path / "bpe", tmp_path / "moved"
    assert prepare_data.main([str(tmp_path / "text.txt"), "--out", str(data), "--tokenizer", "bpe", "--vocab-size", "300",
                              "--workers", "1"]) == 0
    _train_in_process(_ckpt_argv(tmp_path / "run", "--max-steps", "1", "--eval-iters", "0", "--data", str(data)),
                      monkeypatch)
    path = tmp_path / "run" / "checkpoints" / "step_00000001"
    flags = ["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "8", "--prompt", "def self(",
             "--temperature", "0"]

    def sample_text() -> str:
        capsys.readouterr()
        assert sample.main(flags) == 0, capsys.readouterr().err
        return capsys.readouterr().out.split("\n---------------\n")[0]  # the sample (stdout holds only samples)
    with_data = sample_text()
    data.rename(moved)
    assert sample_text() == with_data
    manifest = json.loads((path / "manifest.json").read_text())  # as written before checkpoints carried a codec
    del manifest["codec"], manifest["files"]["tokenizer.json"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "tokenizer.json").unlink()
    assert sample.main(flags) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --checkpoint {path}: cannot decode") and str(data) in err[0], err
    moved.rename(data)
    assert sample_text() == with_data


# A model dict as checkpoints held it before the MoE flags were renamed (--router-aux-loss-coef, ...): the
# manifest of the run test_checkpoint_of_the_old_format_loads_resumes_and_samples trains, written by that code.
OLD_FORMAT_MODEL = {
    "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_seq_length": 16, "dropout": 0.1, "num_experts": 4, "num_experts_per_token": 2,
    "moe_layer_interval": 1, "expert_intermediate_size": None, "router_aux_loss_coef": 0.02,
    "router_z_loss_coef": 0.001, "router_normalize_topk": False, "moe_expert_impl": "auto",
    "moe_capacity_factor": 0.0, "moe_drop_policy": "position", "moe_renorm_after_drop": False,
    "moe_router_score": "sigmoid", "moe_bias_update_rate": 0.0, "moe_routing": "token-choice", "moe_gate": "soft",
    "rope_theta": 10000.0}
OLD_ARG_NAMES = {"moe_aux_loss_coef": "router_aux_loss_coef", "moe_z_loss_coef": "router_z_loss_coef",
                 "moe_normalize_topk": "router_normalize_topk"}


def test_old_format_model_dict_reads_as_the_new_config():
    cfg = ModelConfig.from_dict(OLD_FORMAT_MODEL)
    assert (cfg.moe.aux_loss_coef, cfg.moe.normalize_topk, cfg.moe.router_score, cfg.dropout) == \
        (0.02, False, "sigmoid", 0.1)
    flat = cfg.to_dict()
    assert flat["moe_aux_loss_coef"] == 0.02 and flat["moe_normalize_topk"] is False
    assert not set(OLD_ARG_NAMES.values()) & set(flat)
    assert ModelConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match="unknown fields no_such_field"):
        ModelConfig.from_dict({**OLD_FORMAT_MODEL, "no_such_field": 1})


def test_checkpoint_of_the_old_format_loads_resumes_and_samples(tmp_path, monkeypatch, capsys):
    """A checkpoint written before the rename (its manifest's model dict OLD_FORMAT_MODEL, its flags under
    their old names and forms) resumes bit-exact taking its model from the checkpoint (a renamed model flag
    is compared under its new name), reports a changed renamed flag, and samples the same text."""
    import sample
    flags = ["--no-moe-normalize-topk", "--moe-router-score", "sigmoid", "--moe-aux-loss-coef", "0.02"]
    straight = _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "4", "--save-interval", "2", *flags),
                                 monkeypatch)
    half = tmp_path / "a" / "checkpoints" / "step_00000002"
    sample_argv = ["--checkpoint", str(half), "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"]
    capsys.readouterr()
    assert sample.main(sample_argv) == 0
    text = capsys.readouterr().out
    manifest = json.loads((half / ckpt.MANIFEST).read_text())
    assert ModelConfig.from_dict(manifest["model"]) == ModelConfig.from_dict(OLD_FORMAT_MODEL)
    args = {OLD_ARG_NAMES.get(k, k): v for k, v in manifest["args"].items()}
    args.update(moe_bf16_weights="on", no_progress=not args.pop("progress"), no_save=not args.pop("save"))
    for newer in ("moe_input_jitter_eps", "grad_reduce_dtype"):  # options an old checkpoint's flags lack
        del args[newer]
    (half / ckpt.MANIFEST).write_text(json.dumps({**manifest, "model": OLD_FORMAT_MODEL, "args": args}))
    resumed = _train_in_process(_ckpt_argv(tmp_path / "b", "--max-steps", "4", "--router-aux-loss-coef", "0.02",
                                           "--resume", str(half)), monkeypatch)
    assert resumed.losses == straight.losses[2:]
    _assert_checkpoints_equal(tmp_path / "a" / "checkpoints" / "step_00000004",
                              tmp_path / "b" / "checkpoints" / "step_00000004")
    capsys.readouterr()
    _train_in_process(_ckpt_argv(tmp_path / "c", "--max-steps", "4", "--moe-aux-loss-coef", "0.03", "--eval-only",
                                 "--moe-input-jitter-eps", "0.1", "--resume", str(half)), monkeypatch)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("resuming from")]
    # An option the checkpoint's flags lack was trained at its default: a new value is reported as a change.
    assert line == [f"resuming from {half} at step 2; changed: --moe-aux-loss-coef 0.02 -> 0.03, "
                    f"--moe-input-jitter-eps 0.0 -> 0.1"], line
    assert sample.main(sample_argv) == 0
    assert capsys.readouterr().out == text


def test_checkpoint_with_a_model_field_this_code_does_not_know_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A checkpoint of a newer version (a model field unknown here) is refused by sample.py and by --resume with
    one error line naming the field, exit code 2, rather than a traceback."""
    import sample
    _train_in_process(_ckpt_argv(tmp_path / "a", "--max-steps", "1"), monkeypatch)
    step = tmp_path / "a" / "checkpoints" / "step_00000001"
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    manifest["model"]["moe_shared_experts"] = 1
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(step), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "moe_shared_experts" in err and str(step) in err, err
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert minimal_pretrain.main(_ckpt_argv(tmp_path / "b", "--max-steps", "2", "--resume", str(step))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "moe_shared_experts" in err, err
