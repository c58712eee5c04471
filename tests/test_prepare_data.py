"""prepare_data.py (text, directories, .jsonl, .parquet -> train/val.bin + meta.json) and `--data DIR`
reading it back (load_corpus, text_codec, uint32 tokens, a short training run); bad inputs are one line,
exit code 2, nothing written."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minimal_pretrain
import prepare_data
from data import DataError, get_batch, load_corpus, text_codec

from helpers import HAVE_PYARROW, ROOT, _clean_env, needs_tokenizers


# Documents with what breaks naive code: multi-byte characters, emoji, \r\n, tabs, indentation, a NUL,
# no final newline, a line starting with a space after a newline.
TEXT_FILES = {
    "a.txt": "def f(x):\n    return x * 2  # ünïcode\n\n\tclass Ä:\n        pass\n" * 6,
    "b.txt": "日本語のテキスト 🎉 and emoji\r\nsecond line\r\n no final newline",
    "sub/c.md": "# heading\n\n  indented line\nNUL\x00byte and tabs\t\there\n",
}
RECORDS = [f"record {i}: {'héllo wörld ' * (i % 5 + 1)}\n{' ' * (i % 3)}line two 🙂 {i * i}" for i in range(30)]


def _make_inputs(root: Path) -> list:
    """Writes root/texts/... and root/records.jsonl (with a blank line and an empty record, which are no
    documents); returns the documents in the order prepare_data.py reads them."""
    for name, text in TEXT_FILES.items():
        f = root / "texts" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(text.encode("utf-8"))
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(RECORDS)]
    lines[10:10] = ["", json.dumps({"id": -1, "text": ""})]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [TEXT_FILES[k] for k in sorted(TEXT_FILES)] + RECORDS  # a.txt, b.txt, sub/c.md: sorted paths


def _goes_to_val(doc: str, fraction: float) -> bool:
    """The documented split rule, computed here on its own: blake2b-64 of the text below fraction * 2^64."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "big") < fraction * 2 ** 64


def _prepare_cli(args: list, env: dict = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *map(str, args)], cwd=ROOT,
                          env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)


def _read_prepared(out: Path) -> tuple:
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return meta, np.fromfile(out / "train.bin", dtype=dtype), np.fromfile(out / "val.bin", dtype=dtype)


def _split_docs(ids: np.ndarray, sep: int) -> list:
    """The token ids of each document: the stream cut after every separator (which must end it)."""
    ends = np.flatnonzero(ids == sep)
    assert len(ends) and ends[-1] == len(ids) - 1, "the stream must end with a separator"
    return [ids[s:e] for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


def _train_three_steps(data_dir: Path, tmp_path: Path, monkeypatch) -> tuple:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = minimal_pretrain.parse_args([
        "--data", str(data_dir), "--max-steps", "3", "--hidden-size", "32", "--intermediate-size", "64",
        "--num-layers", "2", "--num-attention-heads", "4", "--num-key-value-heads", "2", "--max-seq-length", "16",
        "--global-batch-size", "4", "--num-experts", "4", "--warmup-steps", "1", "--eval-iters", "1",
        "--no-progress", "--device", "cpu", "--log-interval", "1", "--no-save", "--output-dir", str(tmp_path / "run")])
    result = minimal_pretrain.train(args)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    return result, json.loads((tmp_path / "run" / "config.json").read_text())["model"]["vocab_size"]


@pytest.mark.multiprocess
def test_prepare_bytes_round_trip_and_train(tmp_path, monkeypatch):
    docs = _make_inputs(tmp_path)
    out = tmp_path / "prepared"
    r = _prepare_cli([tmp_path / "texts", tmp_path / "records.jsonl", "--out", out, "--val-fraction", "0.3"])
    assert r.returncode == 0, r.stderr
    meta, train, val = _read_prepared(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"], meta["doc_separator_id"], meta["split"]) == \
        ("bytes", 257, "uint16", 256, "hash")
    # Independent expectation: each document's UTF-8 bytes then 256, in input order, on the side the hash says.
    expect = {False: [], True: []}
    for d in docs:
        expect[_goes_to_val(d, 0.3)] += list(d.encode("utf-8")) + [256]
    assert expect[False] and expect[True], "pick inputs that put documents on both sides"
    np.testing.assert_array_equal(train, expect[False])
    np.testing.assert_array_equal(val, expect[True])
    assert (meta["train_tokens"], meta["val_tokens"], meta["documents"]) == (len(train), len(val), len(docs))
    # Round trip through the codec a sampling script gets: ids -> text -> ids.
    codec = text_codec(str(out))
    decoded = [codec.decode(ids) for ids in _split_docs(train, 256) + _split_docs(val, 256)]
    assert sorted(decoded) == sorted(docs)
    assert all(codec.encode(d) == list(d.encode("utf-8")) for d in docs)
    assert codec.decode([104, 105, 256, 300]) == "hi<|endoftext|>\ufffd"  # separator and padding ids
    # load_corpus: meta's vocabulary, padded to 64 like token files; memmaps of the written ids.
    corpus = load_corpus(str(out))
    assert corpus.vocab_size == 320 and corpus.train.dtype == np.uint16
    np.testing.assert_array_equal(corpus.train, train)
    assert load_corpus(str(out), vocab_size=257).vocab_size == 257
    with pytest.raises(DataError, match="--vocab-size"):
        load_corpus(str(out), vocab_size=256)
    result, model_vocab = _train_three_steps(out, tmp_path, monkeypatch)
    assert model_vocab == 320
    assert abs(result.losses[0] - math.log(320)) < 0.3, f"initial loss {result.losses[0]} should be about ln 320"


@pytest.mark.multiprocess
def test_prepare_single_file_falls_back_to_tail_split(tmp_path):
    text = "".join(f"line {i}: ö\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    r = _prepare_cli([tmp_path / "one.txt", "--out", tmp_path / "out", "--val-fraction", "0.05", "--workers", "1"])
    assert r.returncode == 0, r.stderr
    meta, train, val = _read_prepared(tmp_path / "out")
    n = len(text.encode()) + 1
    assert meta["split"] == "tail" and len(val) == round(n * 0.05) and len(train) == n - len(val)
    np.testing.assert_array_equal(np.concatenate([train, val]), list(text.encode()) + [256])


@pytest.mark.multiprocess
def test_prepare_out_equal_to_input_skips_its_own_files(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("first note\n" * 30)
    (d / "more.txt").write_text("second note\n" * 30)
    for _ in range(2):  # the second run must not read the first run's train.bin, val.bin or meta.json
        r = _prepare_cli([d, "--out", d, "--workers", "1", "--val-fraction", "0.5"])
        assert r.returncode == 0, r.stderr
        meta, train, val = _read_prepared(d)
        assert meta["documents"] == 2 and len(train) + len(val) == 11 * 30 + 12 * 30 + 2


@pytest.mark.multiprocess
@needs_tokenizers
def test_prepare_bpe_round_trip_pieces_and_given_tokenizer(tmp_path, monkeypatch):
    docs = _make_inputs(tmp_path)
    big = "".join(f"def g{i}(a, b):\n    return a * {i} + b  # façade\n\n" for i in range(60))
    (tmp_path / "texts" / "z_big.py").write_text(big, encoding="utf-8")  # many pieces at CHUNK_BYTES 256
    docs = docs[:3] + [big] + docs[3:]
    out = tmp_path / "bpe"
    # In-process with one worker and a tiny piece size: the pieces of z_big.py are encoded apart.
    monkeypatch.setattr(prepare_data, "CHUNK_BYTES", 256)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert prepare_data.main([str(tmp_path / "texts"), str(tmp_path / "records.jsonl"), "--out", str(out),
                              "--tokenizer", "bpe", "--vocab-size", "400", "--val-fraction", "0.3", "--workers", "1"]) == 0
    meta, train, val = _read_prepared(out)
    sep = meta["doc_separator_id"]
    assert meta["tokenizer"] == "bpe" and (out / "tokenizer.json").is_file() and meta["dtype"] == "uint16"
    assert 257 < meta["vocab_size"] <= 400 and sep is not None
    assert max(train.max(), val.max()) < meta["vocab_size"]
    assert len(train) + len(val) < sum(len(d.encode()) for d in docs) / 2, "BPE should merge bytes"
    codec = text_codec(str(out))
    split = _split_docs(train, sep) + _split_docs(val, sep)
    assert sorted(codec.decode(ids) for ids in split) == sorted(docs)  # ids -> text
    by_text = {codec.decode(ids): ids.tolist() for ids in split}
    for d in docs:  # text -> ids: the codec's whole-text encoding equals what the pieces gave
        assert codec.encode(d) == by_text[d]
        assert codec.decode(codec.encode(d)) == d
    # The trained tokenizer.json given back is used as is: the same ids, through the process pool this time.
    again = tmp_path / "given"
    r = _prepare_cli([tmp_path / "texts", tmp_path / "records.jsonl", "--out", again, "--tokenizer",
                      out / "tokenizer.json", "--val-fraction", "0.3", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    meta2, train2, val2 = _read_prepared(again)
    assert meta2["tokenizer"] == "tokenizer.json" and meta2["doc_separator_id"] == sep
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    # (z_big.py may change sides: its split hash covers its first piece, whose size differs between the runs)
    assert {codec.decode(ids): ids.tolist() for ids in _split_docs(train2, sep) + _split_docs(val2, sep)} == by_text


@pytest.mark.multiprocess
@needs_tokenizers
def test_prepare_uint32_vocabulary_round_trip_and_train(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: 70_000 + i for i, c in enumerate(alphabet)}, merges=[]))  # ids > 65535
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = _make_inputs(tmp_path)
    out = tmp_path / "u32"
    r = _prepare_cli([tmp_path / "texts", tmp_path / "records.jsonl", "--out", out, "--tokenizer",
                      tmp_path / "tokenizer.json", "--val-fraction", "0.3"])
    assert r.returncode == 0, r.stderr
    meta, train, val = _read_prepared(out)
    # No separator token in this tokenizer: documents are concatenated, in input order on each side.
    assert (meta["dtype"], meta["vocab_size"], meta["doc_separator_id"]) == ("uint32", 70_256, None)
    assert train.min() >= 70_000 and (out / "train.bin").stat().st_size == 4 * len(train)
    codec = text_codec(str(out))
    assert codec.decode(train) == "".join(d for d in docs if not _goes_to_val(d, 0.3))
    assert codec.decode(val) == "".join(d for d in docs if _goes_to_val(d, 0.3))
    corpus = load_corpus(str(out))
    assert corpus.train.dtype == np.uint32 and corpus.vocab_size == 70_272  # 70,256 rounded up to 64
    x, y = get_batch(corpus.train, torch.tensor([0, 5]), 16, torch.device("cpu"))
    assert x.dtype == torch.int64 and int(x.min()) >= 70_000
    np.testing.assert_array_equal(x[1].numpy(), train[5:21])
    result, model_vocab = _train_three_steps(out, tmp_path, monkeypatch)
    assert model_vocab == 70_272 and abs(result.losses[0] - math.log(70_272)) < 0.3


@pytest.mark.multiprocess
@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed")
def test_prepare_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = RECORDS[:12] + [""] + RECORDS[12:]  # the empty row is no document
    pq.write_table(pa.table({"id": list(range(len(rows))), "content": rows}), tmp_path / "d.parquet", row_group_size=7)
    r = _prepare_cli([tmp_path / "d.parquet", "--out", tmp_path / "out", "--text-field", "content", "--val-fraction", "0.3"])
    assert r.returncode == 0, r.stderr
    meta, train, val = _read_prepared(tmp_path / "out")
    assert meta["documents"] == len(RECORDS)
    codec = text_codec(str(tmp_path / "out"))
    assert [codec.decode(ids) for ids in _split_docs(train, 256)] == [d for d in RECORDS if not _goes_to_val(d, 0.3)]
    assert [codec.decode(ids) for ids in _split_docs(val, 256)] == [d for d in RECORDS if _goes_to_val(d, 0.3)]
    r = _prepare_cli([tmp_path / "d.parquet", "--out", tmp_path / "out2", "--workers", "1"])  # no column "text"
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no column 'text'" in r.stderr, r.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.multiprocess
def test_prepare_data_loads_no_torch():
    """prepare_data.py takes its format and text check from data.py, which imports torch only where batches are
    built: the script and its worker processes (which import it) start without torch (2 s and 0.2 GB each)."""
    r = subprocess.run([sys.executable, "-c", "import sys, prepare_data; print(sorted({'torch', 'data'} & set(sys.modules)))"],
                       cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "['data']", (r.stdout, r.stderr)


def _hide_module(root: Path, name: str) -> str:
    """A PYTHONPATH folder on which `import name` fails as if the package were not installed."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
    return str(root)


def _bad_prepare_cases(root: Path) -> dict:
    """name -> (argv, extra env, text the error line must hold, whether --out existed before)."""
    good = "".join(f"good line {i}\n" for i in range(50))
    (root / "ok").mkdir()
    (root / "ok" / "a.txt").write_text(good)
    (root / "ok" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")  # read after a.txt was tokenised
    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n\n")
    records = [json.dumps({"text": good}) for _ in range(40)] + [json.dumps({"body": "x", "id": 1})]
    (root / "missing.jsonl").write_text("\n".join(records) + "\n")
    (root / "broken.jsonl").write_text(json.dumps({"text": "a"}) + "\n{\"text\": \n")
    (root / "d.parquet").write_bytes(b"PAR1 not really")
    kept = root / "kept"  # an earlier result that a failing run must leave as it was
    kept.mkdir()
    (kept / "train.bin").write_bytes(b"old")
    (kept / "meta.json").write_text("{}")
    return {
        "missing_input": ([root / "nope.txt"], {}, "nope.txt", False),
        "not_utf8": ([root / "ok"], {}, "b.png", False),
        "empty_result": ([root / "empty.txt", root / "empty.jsonl"], {}, "no text", False),
        "missing_text_field": ([root / "missing.jsonl"], {}, "missing.jsonl:41: no field 'text'", False),
        "bad_json": ([root / "broken.jsonl"], {}, "broken.jsonl:2", False),
        "vocab_above_2_32": ([root / "ok" / "a.txt", "--tokenizer", "bpe", "--vocab-size", str(2 ** 32 + 1)], {},
                             "--vocab-size", False),
        "no_pyarrow": ([root / "d.parquet"], {"PYTHONPATH": _hide_module(root / "hide_pa", "pyarrow")}, "pyarrow", False),
        "no_tokenizers": ([root / "ok" / "a.txt", "--tokenizer", "bpe"],
                          {"PYTHONPATH": _hide_module(root / "hide_tk", "tokenizers")}, "pip install tokenizers", False),
        "existing_out_kept": ([root / "missing.jsonl"], {}, "--text-field", True),
    }


@pytest.fixture(scope="module")
def bad_prepare_runs(tmp_path_factory):
    """Every bad-input run at once (each is mostly interpreter start-up); --out is a nested new folder,
    or the folder of an earlier result."""
    root = tmp_path_factory.mktemp("bad_prepare")
    cases, procs = _bad_prepare_cases(root), {}
    for name, (argv, env, _, existed) in cases.items():
        out = root / "kept" if existed else root / f"out_{name}" / "nested"
        procs[name] = (subprocess.Popen([sys.executable, str(ROOT / "prepare_data.py"), *map(str, argv), "--out", str(out)],
                                        cwd=ROOT, env={**_clean_env(), **env}, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), out)
    return {name: (p.communicate(timeout=180), p.returncode, out) for name, (p, out) in procs.items()}, cases, root


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["missing_input", "not_utf8", "empty_result", "missing_text_field", "bad_json",
                                  "vocab_above_2_32", "no_pyarrow", "no_tokenizers", "existing_out_kept"])
def test_prepare_bad_input_one_line_exit_2_nothing_written(name, bad_prepare_runs):
    runs, cases, root = bad_prepare_runs
    (stdout, stderr), rc, out = runs[name]
    assert rc == 2, f"{name}: exit {rc}, stderr {stderr!r}"
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {stderr!r}"
    assert cases[name][2] in lines[0], f"{name}: {lines[0]!r} does not say {cases[name][2]!r}"
    if cases[name][3]:  # the earlier result is untouched and nothing was added
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin"]
        assert (out / "train.bin").read_bytes() == b"old" and (out / "meta.json").read_text() == "{}"
    else:  # the folders this run created are gone again
        assert not out.parent.exists(), f"{name}: left {list(out.parent.rglob('*'))}"
