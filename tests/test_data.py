"""--data loading (data.py): text files, directories, uint16 token files, empty and non-UTF-8 inputs, and the
deterministic batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import minimal_pretrain
from data import DataError, batch_offsets, get_batch, load_corpus, text_pieces

from helpers import PREVIOUS_LINE, _ckpt_argv, _dist_data_file


def test_load_text_file(tmp_path):
    text = ("def f(x):\n    return x * 2  # ünïcode\n" * 50).encode()
    p = tmp_path / "corpus.txt"
    p.write_bytes(text)
    c = load_corpus(str(p))
    assert c.vocab_size == 256
    assert len(c.train) > 0 and len(c.val) > 0
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), np.frombuffer(text, dtype=np.uint8))


def test_load_directory_of_text_files(tmp_path):
    sizes = 0
    for i in range(5):
        data = "".join(map(chr, range(i * 40 + 32, i * 40 + 82))).encode() * 20  # UTF-8 text, some non-ASCII
        (tmp_path / f"f{i}.txt").write_bytes(data)
        sizes += len(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.py").write_bytes(b"print('hi')\n" * 30)
    sizes += 12 * 30
    c = load_corpus(str(tmp_path))
    assert c.vocab_size == 256
    assert len(c.train) > 0 and len(c.val) > 0
    n = len(c.train) + len(c.val)
    assert sizes <= n <= sizes + 6  # every byte is kept (plus at most one separator per file)
    allc = np.concatenate([c.train, c.val]).astype(np.int64)
    assert allc.max() < 256
    assert np.bincount(allc, minlength=256)[ord("h")] >= 30  # the nested file was read


@pytest.mark.parametrize("max_token", [1000, 40000, 65535])
def test_load_uint16_bin(tmp_path, max_token):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, max_token, size=3000).astype(np.uint16)
    tokens[1234] = max_token
    p = tmp_path / "tokens.bin"
    tokens.tofile(p)
    c = load_corpus(str(p))
    assert c.vocab_size >= max_token + 1
    np.testing.assert_array_equal(np.concatenate([c.train, c.val]), tokens)
    # An explicit vocabulary is honoured if large enough and rejected if too small.
    assert load_corpus(str(p), vocab_size=max_token + 1).vocab_size == max_token + 1
    with pytest.raises(DataError):
        load_corpus(str(p), vocab_size=max_token)


def test_empty_inputs_raise_data_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError):
        load_corpus(str(empty))
    empty_bin = tmp_path / "empty.bin"
    empty_bin.write_bytes(b"")
    with pytest.raises(DataError):
        load_corpus(str(empty_bin))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError):
        load_corpus(str(tmp_path / "emptydir"))
    with pytest.raises(DataError):
        load_corpus(str(tmp_path / "does_not_exist"))


def test_batch_offsets_pure_function():
    args = dict(n_tokens=10_000, seq_len=32, global_batch=16, seed=3)
    a = batch_offsets(**args, step=5, split="train")
    b = batch_offsets(**args, step=5, split="train")
    assert a.shape == (16,)
    assert torch.equal(a, b)
    torch.manual_seed(123)  # the global RNG state must not matter
    assert torch.equal(a, batch_offsets(**args, step=5, split="train"))
    assert not torch.equal(a, batch_offsets(**args, step=6, split="train"))
    assert not torch.equal(a, batch_offsets(**args, step=5, split="val"))
    assert not torch.equal(a, batch_offsets(n_tokens=10_000, seq_len=32, global_batch=16, seed=4, step=5,
                                            split="train"))
    many = torch.cat([batch_offsets(**args, step=s, split="train") for s in range(50)])
    assert many.min() >= 0 and many.max() + 32 + 1 <= 10_000  # every sequence (+ its target) fits


def test_get_batch_targets_shifted():
    tokens = (np.arange(5000) * 7 % 65521).astype(np.uint16)  # every position distinct
    offsets = batch_offsets(len(tokens), 24, 6, seed=0, step=0, split="train")
    x, y = get_batch(tokens, offsets, 24, torch.device("cpu"))
    assert x.shape == y.shape == (6, 24)
    assert x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    for i, off in enumerate(offsets.tolist()):
        np.testing.assert_array_equal(x[i].numpy(), tokens[off:off + 24])
        np.testing.assert_array_equal(y[i].numpy(), tokens[off + 1:off + 25])


def test_text_pieces_cut_at_line_starts(tmp_path, monkeypatch):
    code = "".join(f"def f{i}(x):\n    y = x + {i}  # ü\n\n    return y\n" for i in range(40))
    long_line = "é" * 700 + "\n"  # no newline for 4 x chunk bytes: a forced cut, never inside a character
    data = (code + long_line + code).encode("utf-8")
    (tmp_path / "t.txt").write_bytes(data)
    pieces = list(text_pieces(tmp_path / "t.txt", chunk=64))
    assert len(pieces) > 10 and b"".join(pieces) == data
    assert max(map(len, pieces)) <= 5 * 64
    for p in pieces:
        p.decode("utf-8")  # each piece is whole characters
    forced = 0
    for p, nxt in zip(pieces, pieces[1:]):
        if p.endswith("é".encode()) and nxt.startswith("é".encode()):
            forced += 1  # inside the long line
        else:  # everywhere else: just before a newline that a non-space character follows
            assert nxt[:1] == b"\n" and not nxt.decode("utf-8")[1].isspace(), (p[-20:], nxt[:20])
    assert forced >= 1


def test_data_that_is_not_utf8_text_is_refused_like_prepare_data(tmp_path, monkeypatch, capsys):
    """A binary file (or a directory holding one) given as --data: one line naming --data and the file, exit
    2, the output directory untouched; prepare_data.py refuses the same file by the same check."""
    import prepare_data
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    blob = tmp_path / "weights.dat"
    blob.write_bytes(bytes(range(256)) * 64)  # not UTF-8 from byte 0x80 on
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(Path(_dist_data_file()).read_text())
    (texts / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(PREVIOUS_LINE)
    for data, named in ((blob, str(blob)), (texts, str(texts / "b.png"))):
        argv = _ckpt_argv(out, "--max-steps", "1", "--data", str(data))
        assert minimal_pretrain.main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --data {data}") and named in lines[0], captured.err
        assert "not UTF-8 text" in lines[0] and "Traceback" not in captured.out + captured.err
        assert sorted(q.name for q in out.iterdir()) == ["metrics.jsonl"]
        assert (out / "metrics.jsonl").read_text() == PREVIOUS_LINE
    assert prepare_data.main([str(blob), "--out", str(tmp_path / "prepared"), "--workers", "1"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
