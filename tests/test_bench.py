"""The bench / sweep / plot commands, end to end at tiny sizes."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, count_parameters

from helpers import ROOT, TINY_BENCH, _base_argv, _clean_env


sys.path.insert(0, str(ROOT / "bench"))
BENCH_FIELDS = {"bench", "num_tokens", "hidden_dim", "num_experts", "top_k", "dtype", "device", "seed", "iters",
                "timer", "ms", "ms_p10", "ms_p90", "tokens_per_s", "load_cv"}


def test_bench_routing_commands(tmp_path, capsys):
    import bench_routing
    import moe_layers
    import profiling
    out = tmp_path / "bench.jsonl"
    for cmd in ("topk", "pack", "combine", "routing"):
        assert bench_routing.main([cmd, *TINY_BENCH, "--out", str(out)]) == 0
    assert moe_layers.phase is profiling.phase  # the timer put the real phase back
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["bench"] for r in recs] == ["topk", "pack", "combine", "routing"]
    d, k = 32, 2
    for r in recs:
        assert BENCH_FIELDS <= r.keys() and r["seed"] == 17 and r["timer"] == "wall_clock", r
        assert 0 < r["ms_p10"] <= r["ms"] <= r["ms_p90"] and r["tokens_per_s"] == pytest.approx(64 / (r["ms"] / 1e3))
    want_bytes = {"pack": (1 + k) * d * 4, "combine": (k + 1) * d * 4, "routing": (2 + 2 * k) * d * 4}
    for r in recs[1:]:
        assert r["bytes_per_token_strict"] == want_bytes[r["bench"]]
        assert r["bw_GiBps_strict"] == pytest.approx(want_bytes[r["bench"]] * 64 / (r["ms"] / 1e3) / 2 ** 30)
    # load_cv: std (Bessel) / mean of the top-k counts of the same logits.
    logits = bench_routing.make_logits(bench_routing.build_parser().parse_args(["topk", *TINY_BENCH]), False,
                                       torch.device("cpu"))
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.reshape(-1), minlength=4).double()
    assert recs[0]["load_cv"] == pytest.approx(float(counts.std() / counts.mean()), rel=1e-5)

    capsys.readouterr()
    assert bench_routing.main(["capacity", *TINY_BENCH, "--capacity-factors", "0,0.5,1.25", "--skew", "1.0"]) == 0
    cap = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # (random, skewed) x (0: one no-drop row; 0.5 and 1.25: both policies)
    assert [(r["logits"], r["capacity_factor"], r["drop_policy"]) for r in cap] == [
        (kind, cf, p) for kind in ("random", "skewed") for cf, ps in ((0.0, [None]), (0.5, ["position", "probs"]),
                                                                     (1.25, ["position", "probs"])) for p in ps]
    for r in cap:
        assert {"avg_drop_rate", "token_drop_rate", "capacity", "bw_GiBps_strict"} <= r.keys()
        assert 0.0 <= r["token_drop_rate"] <= r["avg_drop_rate"] * 2 + 1e-12 and r["avg_drop_rate"] < 1
        if r["capacity_factor"] == 0.5:  # capacity ceil(0.5 * 64 * 2 / 4) = 16 of 32 per expert on average
            assert r["capacity"] == 16 and r["avg_drop_rate"] >= 0.5 - 1e-9
    # probs drops the lowest-scored assignments first, so it empties fewer whole tokens than position.
    by = {(r["logits"], r["capacity_factor"], r["drop_policy"]): r for r in cap}
    assert by[("skewed", 0.5, "probs")]["token_drop_rate"] < by[("skewed", 0.5, "position")]["token_drop_rate"]
    assert by[("skewed", 0.5, "probs")]["avg_drop_rate"] == by[("skewed", 0.5, "position")]["avg_drop_rate"]
    assert by[("skewed", 0.0, None)]["load_cv"] > by[("random", 0.0, None)]["load_cv"]
    assert bench_routing.main(["capacity", *TINY_BENCH, "--capacity-factors", "1,nan"]) == 2
    assert "--capacity-factors" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_sweep_runs_resumes_and_summarises(tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--out", str(out), "--capacity-factors", "0,1.0",
            "--seeds", "17", "--max-steps", "3", "--parallel", "2", "--timing-steps", "2", "--", "--device", "cpu",
            "--hidden-size", "32",
            "--intermediate-size", "64", "--num-layers", "2", "--max-seq-length", "16", "--global-batch-size", "4",
            "--eval-iters", "1", "--num-key-value-heads", "2"]
    p = subprocess.run(argv, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader((out / "summary.csv").open()))
    runs = [r for r in rows if r["row"] == "run"]
    configs = [r for r in rows if r["row"] == "config"]
    assert [r["capacity_factor"] for r in runs] == ["0.0", "1.0"] and len(configs) == 2
    for r in rows:
        assert r["status"] == "ok" and r["num_experts"] == "8" and r["top_k"] == "2"
        assert r["tokens_per_s_source"] == "isolated"
        for key in ("val_loss", "tokens_per_s", "load_cv", "drop_rate", "active_params", "total_params"):
            assert r[key] != "", (key, r)
    for r in runs:
        recs = [json.loads(line) for line in (out / f"{r['config']}_s17" / "metrics.jsonl").read_text().splitlines()]
        assert float(r["val_loss"]) == pytest.approx(recs[-1]["val_loss"])
        assert float(r["load_cv"]) == pytest.approx([x for x in recs if "loss" in x][-1]["moe/cv_mean"])
        assert not (out / f"{r['config']}_s17" / "checkpoints").exists()  # sweeps save no checkpoints
    assert float(runs[0]["drop_rate"]) == 0.0 and float(runs[1]["drop_rate"]) > 0.0
    for r in runs:  # tokens/s from the config's timing run, trained alone: median of its logged steps
        recs = [json.loads(line) for line in (out / "timing" / r["config"] / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == [1, 2] and not any("val_loss" in x for x in recs)
        assert float(r["tokens_per_s"]) == pytest.approx(float(np.median([x["tokens_per_sec"] for x in recs])))
    total, active = count_parameters(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                                 max_seq_length=16))  # vocab 256, 8 experts, top-2
    assert (int(runs[0]["total_params"]), int(runs[0]["active_params"])) == (total, active)
    assert configs[0]["val_loss"] == runs[0]["val_loss"] and configs[0]["val_loss_std"] == ""  # one seed
    # Re-running resumes: every run is skipped, nothing is appended.
    before = (out / f"{runs[0]['config']}_s17" / "metrics.jsonl").read_text()
    p = subprocess.run(argv, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("2 finished before (skipped), 0 to run") == 2, p.stdout + p.stderr
    assert (out / f"{runs[0]['config']}_s17" / "metrics.jsonl").read_text() == before
    # Non-finite grid values: one error line, exit 2.
    p = subprocess.run(argv[:2] + ["--out", str(tmp_path / "bad"), "--bias-update", "inf"], cwd=tmp_path,
                       env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--bias-update" in p.stderr, p.stderr
    assert not (tmp_path / "bad").exists()


def test_pareto_front_by_hand(tmp_path):
    import plot_frontier
    pts = [{"label": n, "x": x, "y": y, "xerr": 0, "yerr": 0} for n, x, y in
           [("a", 100, 2.0), ("b", 200, 2.5), ("c", 150, 2.6), ("d", 300, 3.0), ("e", 300, 3.1), ("f", 50, 2.0)]]
    # c is beaten by b (faster, lower), e by d (as fast, lower), f by a (faster, as low).
    assert [p["label"] for p in plot_frontier.pareto_front(pts)] == ["a", "b", "d"]


def test_plot_frontier_and_overlay_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    import plot_frontier
    import plot_run
    summary = tmp_path / "summary.csv"
    with summary.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "config", "val_loss", "val_loss_std", "tokens_per_s",
                                          "tokens_per_s_std", "n"])
        w.writeheader()
        for i, (x, y) in enumerate([(100, 2.0), (200, 2.5), (150, 2.6)]):
            w.writerow({"row": "config", "config": f"c{i}", "val_loss": y, "val_loss_std": 0.05,
                        "tokens_per_s": x, "tokens_per_s_std": 5, "n": 2})
    assert plot_frontier.main([str(summary)]) == 0
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    runs = []
    for name, shift in (("r1", 0.0), ("r2", 0.5)):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 5 - s / 10 + shift, "moe/cv_mean": 0.3}) + "\n" for s in range(20))
            + json.dumps({"step": 19, "val_loss": 3.2 + shift}) + "\n")
        runs.append(str(d))
    assert plot_run.main(runs) == 0
    assert {p.name for p in (tmp_path / "overlay").iterdir()} == {"overlay_loss.png", "overlay_load_cv.png"}


def test_every_script_parser_answers_bad_flags_in_one_line():
    """Each command-line script builds its parser as errors.OneLineParser (one line and exit code 2 for an
    unknown flag or a bad value, no usage text), never a bare argparse.ArgumentParser."""
    import ast
    scripts = sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    bare = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "ArgumentParser"):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bare, f"argparse.ArgumentParser instead of errors.OneLineParser at {bare}"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_run.py"), "--no-such-flag", "x"],
                         capture_output=True, text=True, env=_clean_env())
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "unrecognized arguments" in out.stderr, out.stderr


@pytest.mark.multiprocess
def test_real_run_side_of_the_nanogpt_bench_times_the_whole_run(monkeypatch):
    """bench_throughput --real-run, our side: dropout 0.2 and evaluations of 400 batches (nanoGPT's 200 of each
    of its two splits), timed by the records' wall-clock elapsed_s from 10 steps after the first evaluation
    (which compiles the evaluation graph) to the end, so that the later evaluations count; the run goes 10
    steps past the requested ones. (Here every 20 steps; the bench uses nanoGPT's 250.)"""
    import bench_throughput
    monkeypatch.setattr(bench_throughput, "SMALL_TOKENS_PER_ITER", 2 * 8)  # the tiny model's global batch
    tiny = _base_argv("dense") + ["--num-layers", "1", "--max-seq-length", "8", "--global-batch-size", "2",
                                  "--micro-batch-size", "2"]
    r = bench_throughput.ours_real_run("ours test", tiny, 60, eval_interval=20)
    assert r["iterations"] == 40 and r["tokens_per_sec"] == pytest.approx(40 * 2 * 8 / r["seconds"])
    run = Path(r["run_dir"])
    config = json.loads((run / "config.json").read_text())
    assert config["dropout"] == 0.2 and config["eval_iters"] == 400 and config["eval_interval"] == 20
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "val_loss" in x] == [20, 40, 60, 70]
    elapsed = {x["step"]: x["elapsed_s"] for x in recs if "elapsed_s" in x}
    assert r["seconds"] == pytest.approx(elapsed[70] - elapsed[30])
    with pytest.raises(SystemExit, match="give more than 30"):
        bench_throughput.ours_real_run("too short", tiny, 30, eval_interval=20)


def test_grouped_gemm_bench_checks_every_variant_against_grouped(capsys):
    """bench_grouped_gemm's correctness check (on the CPU here): only the defined part is compared (rows below
    ends[-1], dW of non-empty groups), and a variant off by more than the tolerance stops the bench."""
    import bench_grouped_gemm
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([5, 5, 12], dtype=torch.int32)  # an empty group; rows 12..15 belong to none
    x, w, dy = torch.randn(16, 8, generator=g), torch.randn(3, 8, 4, generator=g), torch.randn(16, 4, generator=g)
    fwd = lambda: torch._grouped_mm(x, w, offs=offs)  # noqa: E731
    dw = lambda: torch._grouped_mm(x.t(), dy, offs=offs)  # noqa: E731

    def undefined_tail():
        y = fwd().clone()
        y[12:] = float("nan")
        return y

    def undefined_empty_group():
        d = dw().clone()
        d[1] = 1e9
        return d

    variants = {"grouped": {"fwd": [fwd], "dW": [dw]}, "same": {"fwd": [undefined_tail], "dW": [undefined_empty_group]}}
    assert bench_grouped_gemm.check_variants(variants, offs) == {("same", "fwd"): 0.0, ("same", "dW"): 0.0}
    variants["off by 5%"] = {"fwd": [lambda: fwd() * 1.05]}
    with pytest.raises(SystemExit, match=r"off by 5% fwd: 5.00e-02"):
        bench_grouped_gemm.check_variants(variants, offs)
    assert "check off by 5%" in capsys.readouterr().out


_MEMORY_MODEL = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-attention-heads", "4",
                 "--num-key-value-heads", "2", "--max-seq-length", "16", "--num-experts", "4"]


def test_bench_memory_states_by_hand(capsys):
    """bench_memory's model states: 4 + 4 + 8 bytes per parameter (+2 per expert weight for the bf16 copies), the
    moments 1/DP of it with the sharded optimizer, and the experts split over EP with EP over DP."""
    import bench_memory
    from model import GPT
    from parallel import Topology, is_expert_param
    cfg = ModelConfig.from_dict({"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_seq_length": 16,
                                 "num_experts": 4})
    model = GPT(cfg, Topology())
    experts = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    total = sum(p.numel() for p in model.parameters())
    plain = bench_memory.model_state_bytes(_MEMORY_MODEL, dp=2)
    assert plain == {"params": 4 * total, "grads": 4 * total, "moments": 8 * total, "bf16_expert_copies": 2 * experts,
                     "total": 16 * total + 2 * experts}
    sharded = bench_memory.model_state_bytes(_MEMORY_MODEL, dp=2, shard=True)
    assert sharded["moments"] == 8 * (-(-(total - experts) // 2) + -(-experts // 2))
    ep2 = bench_memory.model_state_bytes(_MEMORY_MODEL, dp=2, ep=2)
    assert ep2["params"] == 4 * (total - experts // 2) and ep2["bf16_expert_copies"] == experts


@pytest.mark.multiprocess
def test_bench_memory_check_agrees_with_what_the_ranks_hold(tmp_path):
    """Under torchrun on the CPU every rank counts the bytes it holds (parameters, gradient buckets, AdamW moments)
    and they equal the computed ones, with the sharded optimizer and EP over DP."""
    for extra in (["--shard-optimizer"], ["--expert-parallel-size", "2", "--shard-optimizer"]):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(ROOT / "bench" / "bench_memory.py"), "check", "--", *_MEMORY_MODEL, "--device", "cpu",
                            "--global-batch-size", "8", "--data", str(ROOT / "README.md"), *extra],
                           cwd=tmp_path, env={**_clean_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        reports = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"rank"')]
        assert len(reports) == 2 and all(rep["agree"] for rep in reports), reports
