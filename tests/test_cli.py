"""The trainer's command line: a bad flag is one line naming it and exit code 2, with no traceback and no
file touched."""
from __future__ import annotations

import subprocess
import sys

import pytest


from helpers import PREVIOUS_LINE, ROOT, _assert_one_error_line, _ckpt_argv, _clean_env, _run_cli


BAD_FLAGS = {
    "top_k_exceeds_experts": (["--num-experts", "4", "--num-experts-per-token", "5"], "--num-experts-per-token"),
    "heads_not_divisible_by_kv": (["--num-attention-heads", "4", "--num-key-value-heads", "3"],
                                  "--num-key-value-heads"),
    "zero_hidden": (["--hidden-size", "0"], "--hidden-size"),
    "batch_not_divisible": (["--global-batch-size", "30", "--micro-batch-size", "8"], "--micro-batch-size"),
    "missing_data": (["--data", "/nonexistent/path"], "--data"),
    "dropout_out_of_range": (["--dropout", "1.5"], "--dropout"),
    "tp_exceeds_world": (["--tensor-parallel-size", "3"], "--tensor-parallel-size"),
    "argparse_bad_choice": (["--moe-expert-impl", "fast"], "--moe-expert-impl"),  # argparse's own error path
    "recompute_bad_choice": (["--recompute", "foo"], "--recompute"),
    "ep_not_tp": (["--expert-parallel-size", "2"], "--expert-parallel-size"),
    "switch_given_a_value": (["--compile", "yes"], "--compile"),  # argparse alone: "unrecognized arguments: yes"
    "grad_reduce_without_dp": (["--grad-reduce-dtype", "bf16"], "--grad-reduce-dtype"),  # one process: DP 1
}
UNTOUCHED_CASES = ("missing_data", "dropout_out_of_range")  # these also get an existing --output-dir


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """Launch every bad-flag run at once (each is dominated by importing torch), then collect them.
    Every run gets its own --output-dir in a temporary folder, so a wrongly accepted flag writes nothing
    into the repository."""
    root = tmp_path_factory.mktemp("bad_flags")
    procs, dirs = {}, {}
    for name, (flags, _) in BAD_FLAGS.items():
        d = root / name
        d.mkdir()
        if name in UNTOUCHED_CASES:
            (d / "metrics.jsonl").write_text(PREVIOUS_LINE)
        dirs[name] = d
        argv = [sys.executable, "minimal_pretrain.py", *flags, "--max-steps", "1", "--eval-iters", "0",
                "--no-progress", "--output-dir", str(d)]
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return results, dirs


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_flag_exits_2_with_one_line(name, bad_flag_runs):
    results, _ = bad_flag_runs
    rc, out, err = results[name]
    flag = BAD_FLAGS[name][1]
    assert rc == 2, f"{name}: exit code {rc}, stderr {err!r}"
    assert "Traceback" not in err and "Traceback" not in out, f"{name}: {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"{name}: stderr should be one non-empty line, got {err!r}"
    assert flag in lines[0], f"{name}: {lines[0]!r} does not name {flag}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", UNTOUCHED_CASES)
def test_bad_flag_leaves_output_dir_untouched(name, bad_flag_runs):
    results, dirs = bad_flag_runs
    assert results[name][0] == 2
    d = dirs[name]
    assert (d / "metrics.jsonl").read_text() == PREVIOUS_LINE
    assert sorted(p.name for p in d.iterdir()) == ["metrics.jsonl"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags,needle", [
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--router-aux-loss-coef", "nan"], "--router-aux-loss-coef"),
    (["--output-dir", "/proc/minimal_moe_x"], "--output-dir"),
    (["FILE_AS_DIR"], "--output-dir"),
    (["--checkpoint-dir", "/proc/minimal_moe_x"], "--checkpoint-dir"),
    (["--resume", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--eval-only"], "--eval-only"),
    (["--hf-repo", "not a repo"], "--hf-repo"),
])
def test_fault_flags_exit_2(flags, needle, tmp_path):
    if flags == ["FILE_AS_DIR"]:
        (tmp_path / "afile").write_text("keep me")
        flags = ["--output-dir", str(tmp_path / "afile")]
    r = _run_cli(_ckpt_argv(tmp_path / "out", "--max-steps", "1")[:-2] + flags
                 + ([] if "--output-dir" in flags else ["--output-dir", str(tmp_path / "out")]))
    _assert_one_error_line(r, 2, needle)
    if (tmp_path / "afile").exists():
        assert (tmp_path / "afile").read_text() == "keep me"


# Old spellings (before the MoE flags took one prefix and the booleans one style) and their new ones.
OLD_SPELLINGS = [
    (["--router-aux-loss-coef", "0.5"], ["--moe-aux-loss-coef", "0.5"]),
    (["--router-z-loss-coef", "0"], ["--moe-z-loss-coef", "0"]),
    (["--no-router-normalize-topk"], ["--no-moe-normalize-topk"]),
    (["--moe-bf16-weights", "off"], ["--no-moe-bf16-weights"]),
    (["--moe-bf16-weights", "off", "--moe-bf16-weights", "on"], ["--no-moe-bf16-weights", "--moe-bf16-weights"]),
    (["--moe-bf16-weights=off"], ["--no-moe-bf16-weights"]),
    (["--moe-renorm-after-drop", "--moe-capacity-factor", "1"],
     ["--moe-capacity-factor", "1", "--moe-renorm-after-drop"]),
    (["--no-progress", "--no-save", "--compile", "--wandb"], ["--no-progress", "--no-save", "--compile", "--wandb"]),
]


@pytest.mark.parametrize("old,new", OLD_SPELLINGS, ids=[" ".join(o) for o, _ in OLD_SPELLINGS])
def test_old_spellings_parse_to_the_same_config(old, new):
    """Every old spelling of a renamed flag still parses, to what its new spelling gives."""
    import config
    parser = config.build_parser()
    got, want = (vars(parser.parse_args(argv)) for argv in (old, new))
    assert got == want and (got != vars(parser.parse_args([])) or "on" in old)  # the flag did something
    assert config.model_config(parser.parse_args(old), 256) == config.model_config(parser.parse_args(new), 256)


def test_old_spelling_of_a_fixed_model_flag_counts_as_given_on_resume(monkeypatch):
    """With --resume, model flags left out become None (the checkpoint's values come later); a fixed model flag
    given by its old spelling was given: it keeps its value, to be compared with the checkpoint's."""
    import config
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = config.parse_args(["--resume", "auto", "--no-router-normalize-topk", "--device", "cpu"])
    assert args.moe_normalize_topk is False and args.hidden_size is None


def test_boolean_flags_are_switches_and_errors_name_the_old_spelling(capsys):
    """Every boolean is --x / --no-x; a bad value of the old on|off form is argparse's one-line error; an
    error about a renamed flag names its old spelling too (what an old command typed)."""
    import config
    from errors import InputError
    parser = config.build_parser()
    assert vars(parser.parse_args(["--no-compile", "--save", "--progress", "--no-moe-renorm-after-drop"])) == \
        vars(parser.parse_args([]))
    for argv in (["--moe-bf16-weights", "maybe"], ["--no-moe-bf16-weights", "off"], ["--compile", "yes"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2 and argv[-1] in capsys.readouterr().err
    with pytest.raises(InputError, match=r"^--moe-z-loss-coef \(old spelling --router-z-loss-coef\) must be >= 0"):
        config.validate(parser.parse_args(["--router-z-loss-coef", "-1"]), 1)
