"""The training loop: the loss falls on the default corpus, scheduled garbage collection, a non-finite
gradient stops the run (exit code 3), the console line, and what `step N` means everywhere."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import minimal_pretrain

from helpers import _base_argv, _ckpt_argv, _train_in_process


def test_training_loss_falls(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out_dir = tmp_path / "run"
    steps = 40
    args = minimal_pretrain.parse_args([
        "--max-steps", str(steps), "--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "2",
        "--num-attention-heads", "4", "--num-key-value-heads", "2", "--max-seq-length", "64",
        "--global-batch-size", "16", "--micro-batch-size", "8", "--num-experts", "4", "--learning-rate", "3e-3",
        "--warmup-steps", "5", "--eval-iters", "2", "--eval-interval", "0", "--no-progress", "--device", "cpu",
        "--log-interval", "1", "--output-dir", str(out_dir)])
    # Observed: first loss ~5.55 (ln 256 = 5.545), last-5 mean ~2.9-3.0 for seeds 0-2 and the default seed,
    # validation ~2.8-3.0. The margins below (1.5 nat) leave ~1 nat of slack and still require the model to
    # learn far more than a constant output.
    assert args.data is None and args.num_microbatches == 2
    result = minimal_pretrain.train(args)

    losses = result.losses
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(256)) < 0.3, f"initial loss {losses[0]} should be about ln 256"
    tail = float(np.mean(losses[-5:]))
    assert tail < losses[0] - 1.5, f"loss did not fall enough: first {losses[0]:.3f}, last-5 mean {tail:.3f}"
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    assert result.val_loss < math.log(256) - 1.5, f"val loss {result.val_loss}"

    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, steps + 1))  # step N: N optimizer steps done
    for r in train_recs:
        for key in ("step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"):
            assert key in r and r[key] is not None, f"step {r.get('step')}: missing {key}"
            assert math.isfinite(r[key])
    elapsed = [r["elapsed_s"] for r in train_recs]  # wall-clock since the loop started, evaluation included
    assert 0 < elapsed[0] and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert [r["loss"] for r in train_recs] == pytest.approx(losses)
    assert any("val_loss" in r for r in recs)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["max_steps"] == steps and config["model"]["num_experts"] == 4


def test_gc_interval_schedules_collection_and_restores_the_collector(tmp_path, monkeypatch):
    """--gc-interval N: automatic collection off during training, young generations collected every N
    steps; the collector is back to its previous state afterwards, even for an in-process caller."""
    import gc
    collects = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collects.append((generation, gc.isenabled())) or real_collect(generation))
    argv = _base_argv("mixed") + ["--gc-interval", "2", "--output-dir", str(tmp_path)]
    argv[argv.index("--max-steps") + 1] = "5"
    assert gc.isenabled()
    gc.unfreeze()  # the first run is that of a caller who froze nothing (an earlier test may have frozen objects)
    minimal_pretrain.train(minimal_pretrain.parse_args(argv))
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # one full collection before freezing, then generation 1 at steps 0, 2, 4 with automatic collection off
    assert collects == [(2, True), (1, False), (1, False), (1, False)], collects
    # Objects the caller froze stay frozen.
    gc.freeze()
    try:
        minimal_pretrain.train(minimal_pretrain.parse_args(argv))
        assert gc.isenabled() and gc.get_freeze_count() > 0  # (freed frozen objects may lower the count)
    finally:
        gc.unfreeze()


def test_non_finite_gradient_exits_3_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_grad_norm = minimal_pretrain.grad_norm
    calls = []

    def poisoned(params, topo, *args):  # step 4's gradient goes NaN, as a numerical blow-up would
        calls.append(1)
        if len(calls) == 4:
            params[0].grad.fill_(float("nan"))
        return real_grad_norm(params, topo, *args)

    monkeypatch.setattr(minimal_pretrain, "grad_norm", poisoned)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = tmp_path / "checkpoints"
    rc = minimal_pretrain.main(_ckpt_argv(tmp_path, "--max-steps", "8", "--save-interval", "2", "--log-interval", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "non-finite" in err[0] and "step 4" in err[0], err
    assert [p.name for _, p in ckpt.complete_checkpoints(d)] == ["step_00000002"]
    assert (d / "latest").read_text().strip() == "step_00000002"
    _, state = ckpt.load_consolidated(d / "step_00000002", with_optimizer=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_console_line_shows_the_drop_rate_whenever_capacity_is_on(tmp_path, monkeypatch, capsys):
    """With a capacity factor every console line ends with the step's drop rate (moe/drop_rate of the same
    record), `n/a` under --moe-metrics off, which records nothing; without capacity there is no drop field."""
    for metrics in ("brief", "off"):
        result = _train_in_process(_ckpt_argv(tmp_path / metrics, "--max-steps", "2", "--no-save", "--eval-iters", "0",
                                              "--moe-capacity-factor", "0.5", "--moe-metrics", metrics), monkeypatch)
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
        assert len(lines) == len(result.records) == 2, lines
        for line, rec in zip(lines, result.records):
            shown = line.rsplit(" | ", 1)[-1]
            if metrics == "off":
                assert shown == "drop n/a", line
            else:
                assert rec["moe/drop_rate"] > 0.1 and shown == f"drop {100 * rec['moe/drop_rate']:.1f}%", line
    _train_in_process(_ckpt_argv(tmp_path / "none", "--max-steps", "1", "--no-save", "--eval-iters", "0"), monkeypatch)
    assert not any("drop" in l for l in capsys.readouterr().out.splitlines() if l.startswith("step "))


def test_step_n_means_n_steps_done_on_the_console_in_the_log_and_in_checkpoint_names(tmp_path, monkeypatch, capsys):
    """One convention: `step N` (console, metrics.jsonl, evaluation, the stop line) is the state after N
    optimizer steps, the state step_0000000N holds; a run resumed from it goes on with step N+1, and
    evaluating that checkpoint reports step N with the validation loss the training run logged there."""
    import signal
    real_step, calls = minimal_pretrain.train_step, []

    def signalled(t, step, record_stats):  # SIGTERM during the third step, as a scheduler would send it
        calls.append(step)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(t, step, record_stats)
    monkeypatch.setattr(minimal_pretrain, "train_step", signalled)
    _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "6", "--log-interval", "2", "--eval-interval", "2"), monkeypatch)
    monkeypatch.setattr(minimal_pretrain, "train_step", real_step)
    out = capsys.readouterr().out.splitlines()
    d = tmp_path / "checkpoints"
    assert [l.split("|")[0].split() for l in out if l.startswith("step ")] == [["step", "1"], ["step", "2"], ["step", "2"]]
    assert f"stopped by SIGTERM after step 3: checkpoint {d / 'step_00000003'};" in "\n".join(out), out[-3:]
    result = _train_in_process(_ckpt_argv(tmp_path, "--max-steps", "4", "--resume", "auto"), monkeypatch)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = recs[[i for i, r in enumerate(recs) if "resumed_from" in r][0]:]
    assert [(r["step"], sorted(set(r) & {"resumed_from", "loss", "val_loss"})) for r in after] == \
        [(3, ["resumed_from"]), (4, ["loss"]), (4, ["val_loss"])]
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"saved checkpoint {d / 'step_00000004'}")
    _train_in_process(_ckpt_argv(tmp_path / "eval", "--resume", str(d / "step_00000004"), "--eval-only"), monkeypatch)
    assert capsys.readouterr().out.splitlines()[-1] == f"step     4 | val loss {result.val_loss:.4f}"
