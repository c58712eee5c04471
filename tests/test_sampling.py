"""Sampling: the KV cache against full recomputation, generate's context policy, top-k / temperature, and
sample.py end to end on checkpoints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minimal_pretrain
from model import GPT, ModelConfig
from parallel import Topology

from helpers import ROOT, _base_argv, _ckpt_argv, _clean_env, _greedy_by_recompute, _train_in_process


def _sampling_model(num_experts: int, seed: int = 0, **cfg_kw) -> GPT:
    """A tiny whole model in eval mode whose matrices are scaled up from the init (std 0.02 -> 0.1), so
    attention is far from uniform and the logits spread: a wrong position or mask changes them visibly."""
    cfg = ModelConfig.from_dict(dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_seq_length=16,
                                     num_experts=num_experts, num_experts_per_token=2, **cfg_kw))
    model = GPT(cfg, Topology())
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model.eval()


@pytest.mark.parametrize("num_experts", [4, 0], ids=["moe", "dense"])
def test_kv_cache_logits_match_full_recompute(num_experts, one_thread):
    from model import KVCache
    model = _sampling_model(num_experts)
    T = model.cfg.max_seq_length
    ids = torch.randint(0, 64, (2, 3 * T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids[:, :T])  # [2, T, V], no cache
        cache = KVCache(T)
        # a 5-token prefill, 4 single tokens, a 3-token chunk (queries after cached keys), single tokens to T
        feeds = [(0, 5)] + [(i, i + 1) for i in range(5, 9)] + [(9, 12)] + [(i, i + 1) for i in range(12, T)]
        got = torch.cat([model(ids[:, a:b], kv_cache=cache)[0] for a, b in feeds], dim=1)
        assert cache.pos == T
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
        assert full.std() > 0.3  # the scaled weights give logits far from zero (init: ~0.02)
        with pytest.raises(ValueError, match="max_seq_length"):
            model(ids[:, T:T + 1], kv_cache=cache)
        # Past the window: the cache is reset and rebuilt from a later window (generate's crop), then stepped.
        cache.reset()
        window = ids[:, 2 * T - 3:3 * T - 3]  # T tokens starting at an arbitrary offset
        full, _ = model(window)
        got = torch.cat([model(window[:, :T // 2], kv_cache=cache)[0]] +
                        [model(window[:, i:i + 1], kv_cache=cache)[0] for i in range(T // 2, T)], dim=1)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts", [4, 0], ids=["moe", "dense"])
def test_generate_greedy_matches_recompute_past_max_seq_length(num_experts, one_thread):
    from generate import generate
    model = _sampling_model(num_experts, seed=2)
    T = model.cfg.max_seq_length
    for prompt_len in (3, T + 4):  # a short prompt, and one longer than the window (cropped)
        ids = torch.randint(0, 64, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        new = 3 * T  # crosses the window several times
        got = generate(model, ids, new, temperature=0.0)
        ref = _greedy_by_recompute(model, ids, new)
        assert got.shape == (2, prompt_len + new)
        assert torch.equal(got, ref)
        assert len(set(got[:, prompt_len:].flatten().tolist())) > 5  # not a constant continuation


def test_sample_next_temperature_and_top_k():
    from generate import sample_next
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert sample_next(logits, 0.0, None, None).tolist() == [[0]]  # greedy
    assert sample_next(logits, 1.0, 1, None).tolist() == [[0]]     # top-1 is greedy too
    n = 20000
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, -1), 0.5, 3, gen).flatten()
    freq = torch.bincount(draws, minlength=5).double() / n
    expect = torch.softmax(logits[0, :3].double() / 0.5, dim=0)  # only the 3 largest survive top-k
    assert freq[3:].sum() == 0
    assert (freq[:3] - expect).abs().max() < 0.015, (freq, expect)


def test_generate_is_deterministic_per_seed_and_records_no_routing(one_thread):
    from generate import generate
    model = _sampling_model(4, seed=3)
    model.train()
    for moe in model.moe_layers().values():
        moe.record_routing = True  # as StepStats leaves it at a logging step
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    run = lambda seed: generate(model, ids, 20, 0.8, 20, torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], ids)
    assert model.training  # mode restored
    assert all(moe.last_routing is None for moe in model.moe_layers().values())


# --------------------------------------------------------------------------------------------------
# sample.py, the command
# --------------------------------------------------------------------------------------------------
SAMPLE_BAD_FLAGS = {
    "zero_new_tokens": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "negative_temperature": (["--temperature", "-0.5"], "--temperature"),
    "nan_temperature": (["--temperature", "nan"], "--temperature"),
    "negative_top_k": (["--top-k", "-1"], "--top-k"),
    "zero_samples": (["--num-samples", "0"], "--num-samples"),
    "bad_device": (["--device", "tpu"], "--device"),
    "missing_checkpoint": ([], "--checkpoint /nonexistent/ckpt"),
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny MoE trained for a few steps by the real trainer, which writes its checkpoints."""
    out = tmp_path_factory.mktemp("sample_run")
    flags = [f for f in _base_argv("mixed") if f != "--no-save"]  # the final checkpoint is what we want
    argv = [sys.executable, "minimal_pretrain.py", *flags, "--max-steps", "4", "--output-dir", str(out)]
    p = subprocess.run(argv, cwd=ROOT, env=dict(_clean_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out / "checkpoints"


def _sample(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "sample.py", *flags], cwd=ROOT, env=dict(_clean_env(), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multiprocess
def test_sample_py_end_to_end_on_a_trained_checkpoint(tiny_checkpoint, capsys, one_thread):
    import sample
    common = ["--checkpoint", str(tiny_checkpoint), "--prompt", "def f(", "--max-new-tokens", "40",
              "--num-samples", "2", "--device", "cpu"]
    proc = _sample(*common, "--seed", "1")  # the real command line, once
    out1, err1 = proc.communicate(timeout=120)
    assert proc.returncode == 0, err1
    runs = []
    for seed in ("1", "2"):  # the same main() in this process: seed 1 must repeat the command line's text
        assert sample.main([*common, "--seed", seed]) == 0
        cap = capsys.readouterr()
        runs.append((cap.out, cap.err))
    (out2, err2), (out3, err3) = runs

    def parse(out: str, err: str) -> tuple[list, str]:
        """stdout: only the samples, each followed by a dashed line; stderr: a header line, a timing line."""
        assert out.endswith("\n---------------\n"), out
        header, timing = err.splitlines()  # exactly two lines
        assert header.startswith("checkpoint ") and "step 4" in header, header
        return out[:-len("\n---------------\n")].split("\n---------------\n"), timing

    (s1, timing), (s2, _), (s3, _) = parse(out1, err1), parse(out2, err2), parse(out3, err3)
    assert "tokens/s" in timing and "ms per step" in timing, timing
    assert len(s1) == 2 and all(s.startswith("def f(") and len(s) > len("def f(") for s in s1), s1
    assert s1 == s2 and s1 != s3


@pytest.mark.multiprocess
def test_sample_py_bad_flags_exit_2_with_one_line(tiny_checkpoint, capsys):
    import sample  # in process: the same main() the command line runs, without a torch import per case
    for name, (flags, named) in SAMPLE_BAD_FLAGS.items():
        ckpt = "/nonexistent/ckpt" if name == "missing_checkpoint" else str(tiny_checkpoint)
        try:
            rc = sample.main(["--checkpoint", ckpt, "--device", "cpu", *flags])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert rc == 2, f"{name}: exit {rc}, {err!r}"
        assert out == "" and len(lines) == 1 and "error" in lines[0], f"{name}: {err!r}"
        assert named in lines[0], f"{name}: {lines[0]!r}"


def test_sample_py_refuses_a_run_on_token_files(tmp_path, monkeypatch, capsys):
    """A run on uint16 .bin tokens has no text codec: one line naming the checkpoint and the run's --data."""
    import sample
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 100, 4000).astype(np.uint16).tofile(tokens)
    flags = [f for f in _base_argv("dense") if f != "--no-save"]
    argv = flags + ["--data", str(tokens), "--max-steps", "1", "--output-dir", str(tmp_path / "run")]
    assert minimal_pretrain.main(argv) == 0  # the later --data wins over _base_argv's
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --checkpoint ") and str(tokens) in err, err


@pytest.mark.multiprocess
def test_sample_a_run_on_prepared_bytes_from_another_directory(tmp_path, monkeypatch, capsys):
    """prepare_data's bytes tokenizer has 257 ids and the model a padded 320; --data was relative."""
    import prepare_data
    import sample
    (tmp_path / "text.txt").write_text("def add(x, y):\n    return x + y\n\n" * 300)
    monkeypatch.chdir(tmp_path)
    assert prepare_data.main(["text.txt", "--out", "prepared", "--val-fraction", "0.1"]) == 0
    _train_in_process(_ckpt_argv(tmp_path / "run", "--max-steps", "2", "--data", "prepared"), monkeypatch)
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--device", "cpu",
                        "--max-new-tokens", "5", "--prompt", "def"]) == 0, capsys.readouterr().err
    cap = capsys.readouterr()  # the sample on stdout, the speed on stderr
    assert cap.out.startswith("def") and "tokens/s" in cap.err and "tokens/s" not in cap.out


# --------------------------------------------------------------------------------------------------
# fast decoding: static KV cache, a decode step of fixed shapes (CUDA graphs on a GPU),
# the same tokens as the plain path; sample.py's stdout holds only the samples
# --------------------------------------------------------------------------------------------------
def _decoding_model(kind: str, seed: int = 2) -> GPT:
    """_sampling_model's tiny model (T = 16): 'moe', 'dense', or 'capacity' (MoE with capacity factor 1, so
    a prefill drops assignments)."""
    if kind == "capacity":
        return _sampling_model(4, seed, moe_capacity_factor=1.0)
    return _sampling_model(4 if kind == "moe" else 0, seed)


@pytest.mark.parametrize("kind", ["moe", "dense", "capacity"])
def test_static_kv_cache_logits_match_full_recompute_and_hide_stale_slots(kind, one_thread):
    from model import StaticKVCache
    model = _decoding_model(kind)
    T = model.cfg.max_seq_length
    ids = torch.randint(0, 64, (2, 2 * T), generator=torch.Generator().manual_seed(1))
    cache = StaticKVCache(list(model.layers.keys()), 2, 2, T, model.cfg.head_dim, torch.float32, torch.device("cpu"))
    step = lambda x, start: model(x, kv_cache=cache, input_pos=torch.arange(start, start + x.shape[1]))[0]
    with torch.no_grad():
        for seq in (ids[:, :T], ids[:, T:]):  # the second sequence over the first one's slots, no reset
            full, _ = model(seq) if kind != "capacity" else model(seq[:, :5])  # capacity: the prefill alone
            if kind == "capacity":  # drops depend on the tokens of each forward: compare the prefill only
                torch.testing.assert_close(step(seq[:, :5], 0), full, rtol=1e-5, atol=1e-5)
                continue
            # a 5-token prefill, single tokens, a 3-token chunk (queries after cached keys), single tokens to T
            feeds = [(0, 5)] + [(i, i + 1) for i in range(5, 9)] + [(9, 12)] + [(i, i + 1) for i in range(12, T)]
            got = torch.cat([step(seq[:, a:b], a) for a, b in feeds], dim=1)
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
        # A short prefill over the slots of a whole earlier sequence: the stale slots after it are not seen.
        torch.testing.assert_close(step(ids[:, :3], 0), model(ids[:, :3])[0], rtol=1e-5, atol=1e-5)
    assert full.std() > 0.3


@pytest.mark.parametrize("kind", ["moe", "dense", "capacity"])
def test_fast_decode_greedy_identical_to_plain_across_windows(kind, one_thread):
    """One decoder reused for prompts of several lengths (below, at and past T), each generating 3T tokens
    so the window is rebuilt several times: the same tokens as the plain path, and (without capacity,
    where a rebuild's drops differ from a recompute's) as the brute-force recompute of the policy."""
    from generate import StaticDecoder, generate
    model = _decoding_model(kind)
    T = model.cfg.max_seq_length
    new = 3 * T
    lengths = (1, 3, T - 1, T, T + 4)
    decoder = StaticDecoder(model, 2, max(lengths) + new, temperature=0.0)
    for n in lengths:
        ids = torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(n))
        got = decoder.generate(ids, new)
        plain = generate(model, ids, new, temperature=0.0)
        assert got.shape == (2, n + new) and torch.equal(got[:, :n], ids)
        assert torch.equal(got, plain), (n, (got != plain).nonzero()[:3])
        if kind != "capacity":
            assert torch.equal(got, _greedy_by_recompute(model, ids, new)), n
        assert len(set(got[:, n:].flatten().tolist())) > 5  # not a constant continuation


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_fast_decode_sampling_identical_to_plain_for_the_same_seed(kind, one_thread):
    from generate import StaticDecoder, generate
    model = _decoding_model(kind, seed=3)
    T = model.cfg.max_seq_length
    ids = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(0))
    for temperature, top_k in ((0.8, 20), (1.0, None), (0.5, 1)):
        decoder = StaticDecoder(model, 3, 4 + 2 * T, temperature, top_k)
        fast = lambda seed: decoder.generate(ids, 2 * T, torch.Generator().manual_seed(seed))
        plain = generate(model, ids, 2 * T, temperature, top_k, torch.Generator().manual_seed(7))
        a, b, c = fast(7), fast(7), fast(8)
        assert torch.equal(a, plain) and torch.equal(a, b), (temperature, top_k)
        if top_k == 1:  # top-1 is greedy whatever the noise
            assert torch.equal(a, c) and torch.equal(a, generate(model, ids, 2 * T, temperature=0.0))
        else:
            assert not torch.equal(a, c)


def test_sample_with_noise_zero_noise_never_picks_a_filtered_token():
    """Exp(1) noise can be exactly 0: without care p / 0 = NaN for a token top-k removed (p = 0), and
    argmax would pick the NaN."""
    from generate import sample_with_noise
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    noise = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the filtered token 3 draws a 0
    assert sample_with_noise(logits, 1.0, 2, noise).tolist() == [[0]]
    noise = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # a kept token drawing 0 wins the race
    assert sample_with_noise(logits, 1.0, 2, noise).tolist() == [[1]]


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_decode_step_and_rebuild_compile_to_one_graph_each_and_decode_the_same(kind, one_thread):
    """What CUDA graph capture needs, checked on the CPU: torch.compile traces the whole decode step (MoE
    routing, sort and grouped GEMM at T = batch tokens, cache writes, sampling) and the window rebuild as
    one graph each (fullgraph), with no op that reads a device value back to the host (.item(), .tolist()
    and data-dependent shapes become _local_scalar_dense or nonzero in the aten graph; torch 2.13 captures
    them rather than breaking the graph), once for every later call and run (warm_up included), and the
    compiled steps give the eager steps' tokens, also after warm_up left its state in the buffers.
    The MoE model runs under bf16 autocast, as on a GPU, so its experts take the grouped GEMM."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from generate import StaticDecoder
    host_reads = []

    def inspect(gm, example_inputs):  # the aten graph, then run as it is (as backend="aot_eager" does)
        host_reads.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                          and any(op in str(n.target) for op in ("_local_scalar_dense", "nonzero")))
        return gm

    model = _decoding_model(kind)
    T = model.cfg.max_seq_length
    ids = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "moe"):
        for temperature in (0.0, 0.8):
            decoder = StaticDecoder(model, 2, 3 + 2 * T, temperature, 20)
            assert decoder.dtype == (torch.bfloat16 if kind == "moe" else torch.float32)
            eager = decoder.generate(ids, 2 * T, torch.Generator().manual_seed(1))
            before = counters["stats"]["unique_graphs"]
            decoder.compile_steps(backend=aot_autograd(fw_compiler=inspect), fullgraph=True, dynamic=False)
            decoder.warm_up()
            got = [decoder.generate(ids, 2 * T, torch.Generator().manual_seed(1)) for _ in range(2)]
            assert counters["stats"]["unique_graphs"] - before == 2  # step and rebuild, no recompilation
            assert host_reads == [], host_reads
            assert torch.equal(got[0], eager) and torch.equal(got[1], eager), temperature


def test_static_decoder_refuses_a_run_it_cannot_hold():
    from generate import StaticDecoder
    decoder = StaticDecoder(_decoding_model("dense"), 2, 10, temperature=0.0)
    with pytest.raises(ValueError, match="2 rows of at most 10 tokens"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="2 rows"):
        decoder.generate(torch.zeros(3, 4, dtype=torch.long), 2)


@pytest.mark.multiprocess
def test_sample_py_fast_decode_same_text_and_stdout_holds_only_samples(tiny_checkpoint, capsys, one_thread):
    """The command line with --fast-decode on and off (CPU, 40 tokens past a window of 16): stdout is the
    samples and their dashed lines, nothing else, and the same text both ways, greedy and sampled;
    stderr names the path and gives the speed. A bad --fast-decode is one error line, exit 2."""
    import sample
    common = ["--checkpoint", str(tiny_checkpoint), "--prompt", "def f(", "--max-new-tokens", "40",
              "--num-samples", "2", "--device", "cpu"]
    procs = {mode: _sample(*common, "--temperature", "0", "--fast-decode", mode) for mode in ("on", "off")}
    texts = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        samples = out.split("\n---------------\n")
        assert samples[-1] == "" and len(samples) == 3, out  # two samples, each followed by the dashes
        assert all(x.startswith("def f(") and len(x.encode()) > len("def f(") for x in samples[:2]), samples
        header, timing = err.splitlines()
        assert header.startswith("checkpoint ") and ("static KV cache" in header) == (mode == "on"), header
        assert "tokens/s" in timing and "tokens/s" not in out
        texts[mode] = out
    assert texts["on"] == texts["off"]
    sampled = {}
    for mode in ("on", "off"):  # in process, sampling with a seed
        assert sample.main([*common, "--temperature", "0.9", "--top-k", "50", "--seed", "5", "--fast-decode", mode]) == 0
        sampled[mode] = capsys.readouterr().out
    assert sampled["on"] == sampled["off"] != texts["on"]
    with pytest.raises(SystemExit) as e:
        sample.main([*common, "--fast-decode", "maybe"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--fast-decode" in err, err


