"""Tokenize your own text into a directory that `minimal_pretrain.py --data DIR` trains on.

    python prepare_data.py notes.txt books/ --out data/mine                          # bytes
    python prepare_data.py stories.jsonl --out data/bpe --tokenizer bpe --vocab-size 8192
    python prepare_data.py shard-*.parquet --out data/fw --tokenizer data/bpe/tokenizer.json

Inputs: text files (UTF-8), directories (every non-hidden file below, recursively), `.jsonl` (one JSON
object per line, the text in --text-field) and `.parquet` (that column; needs pyarrow). A document is a
text file or one record. DIR receives train.bin and val.bin (token ids, uint16, or uint32 when the
vocabulary exceeds 65536), meta.json and, unless bytes, tokenizer.json. Each document is followed by a
separator token: id 256 for bytes, `<|endoftext|>` for BPE (a literal `<|endoftext|>` in the text becomes
that token too), and for a given tokenizer.json the first of KNOWN_SEPARATORS it has, else none.

Train/validation split: a document goes to validation when a stable hash of its text (blake2b; for a
text file over 1 MiB, of its first piece) falls below --val-fraction of the hash range: deterministic,
independent of input order and worker count, decided as the document streams by, and exact duplicates
land on the same side. If that leaves a split empty (few documents), the last --val-fraction of the
tokens become validation instead.

Memory stays bounded: text files are read in pieces of about 1 MiB, cut where byte-level BPE would split
anyway; pieces stream through a fixed window of tokenising tasks and the ids are appended to the files as
they come. BPE training streams the input through the trainer's iterator (its memory grows with the
number of distinct words, not with the input). Everything is written into a hidden folder inside DIR and
renamed into place at the end, so a failed run leaves DIR as it was.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

# The directory format and the text check are data.py's, the module that reads what this script writes.
from data import (BYTES_SEPARATOR_ID, META_FILE, SEPARATOR_TEXT, TEXT_PIECE_BYTES, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE,
                  NotUTF8, utf8_pieces)
from errors import InputError, OneLineParser

OUTPUT_FILES = (TRAIN_FILE, VAL_FILE, META_FILE, TOKENIZER_FILE)
BYTE_VOCAB_WITH_SEPARATOR = BYTES_SEPARATOR_ID + 1
KNOWN_SEPARATORS = (SEPARATOR_TEXT, "<|end_of_text|>", "</s>", "<eos>")  # looked for in a given tokenizer.json
CHUNK_BYTES = TEXT_PIECE_BYTES  # text files are read and tokenised in pieces of about this size
MAX_VOCAB = 2 ** 32


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Tokenize text files, directories, .jsonl and .parquet into train.bin / val.bin / "
                                  "meta.json for minimal_pretrain.py --data DIR.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, directory, .jsonl or .parquet")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|bpe|PATH",
                   help="bytes (vocabulary 256 + separator), bpe (train a byte-level BPE here, needs the tokenizers "
                        "package) or the path of a Hugging Face tokenizer.json to use as is (default: bytes)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of the trained BPE, separator included (default 8192; --tokenizer bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents for validation, chosen by a hash of their text (default 0.01)")
    p.add_argument("--text-field", default="text", help=".jsonl key / .parquet column holding the text (default text)")
    p.add_argument("--workers", type=int, default=_usable_cores(),
                   help="tokenising processes (default: the usable CPU cores)")
    return p


# --------------------------------------------------------------------------------------------------
# reading: files -> documents -> pieces of text
# --------------------------------------------------------------------------------------------------
def input_files(inputs: list, out: Path) -> list:
    """(path, kind, size) of every file to read, in a fixed order; kind is text, jsonl or parquet."""
    out = out.resolve()
    files = []
    for given in inputs:
        p = Path(given)
        if not p.exists():
            raise InputError(f"{given}: no such file or directory")
        if p.is_dir():  # every non-hidden file below, but not our own output when --out lies inside
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(s.startswith(".") for s in f.relative_to(p).parts)
                           and not (f.name in OUTPUT_FILES and f.parent.resolve() == out))
        else:
            found = [p]
        for f in found:
            kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(f.suffix.lower(), "text")
            try:
                files.append((f, kind, f.stat().st_size))
            except OSError as e:
                raise InputError(f"{f}: cannot read ({e.strerror})") from None
    if not files:
        raise InputError(f"no input files in {' '.join(inputs)}")
    if any(kind == "parquet" for _, kind, _ in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            first = next(f for f, kind, _ in files if kind == "parquet")
            raise InputError(f"{first}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    return files


def _text_docs(path: Path) -> Iterator[tuple]:
    size = 0
    try:
        for i, (text, n) in enumerate(utf8_pieces(path, CHUNK_BYTES)):  # read now: tests shrink it
            size += n
            yield text, i == 0, False, n
    except NotUTF8 as e:
        raise InputError(f"{e}; give UTF-8 text, .jsonl or .parquet files") from None
    if size:
        yield "", False, True, 0  # the file's end: close the document


def _record_text(record: dict, where: str, field: str) -> str:
    if field not in record:
        shown = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise InputError(f"{where}: no field '{field}' in the record (its fields: {shown}); choose one with --text-field")
    value = record[field]
    if not isinstance(value, str):
        held = "null" if value is None else type(value).__name__
        raise InputError(f"{where}: --text-field '{field}' holds {held}, not a string")
    return value


def _jsonl_docs(path: Path, field: str) -> Iterator[tuple]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", False, False, len(line)
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{path}:{lineno}: not a JSON object ({e}); .jsonl needs one object per line") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: not a JSON object; .jsonl needs one object per line")
            text = _record_text(record, f"{path}:{lineno}", field)
            yield text, bool(text), bool(text), len(line)  # an empty record is no document


def _parquet_docs(path: Path, field: str, size: int) -> Iterator[tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read as parquet ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise InputError(f"{path}: no column '{field}' (its columns: {', '.join(names[:10])}); choose one with --text-field")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise InputError(f"{path}: column '{field}' holds {col_type}, not strings; choose another with --text-field")
    rows, done = max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for j, text in enumerate(batch.column(0).to_pylist()):
            if text is None:
                raise InputError(f"{path}: row {done + j} of column '{field}' is null, not a string")
            yield text, bool(text), bool(text), 0
        consumed = size * (done + batch.num_rows) // rows - size * done // rows  # progress in file bytes
        done += batch.num_rows
        yield "", False, False, consumed


def documents(files: list, field: str, val_fraction: float) -> Iterator[tuple]:
    """(text, ends_document, goes_to_validation, input_bytes_consumed) pieces of every document, in order.
    The split is decided at a document's first piece (see the module docstring)."""
    threshold = int(val_fraction * 2 ** 64)
    to_val = False
    for path, kind, size in files:
        try:
            if kind == "text":
                pieces = _text_docs(path)
            elif kind == "jsonl":
                pieces = _jsonl_docs(path, field)
            else:
                pieces = _parquet_docs(path, field, size)
            for text, first, last, consumed in pieces:
                if first:
                    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
                    to_val = int.from_bytes(digest, "big") < threshold
                yield text, last, to_val, consumed
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------
def _import_tokenizers(why: str):
    try:
        import tokenizers
    except ImportError:
        raise InputError(f"{why} needs the tokenizers package (pip install tokenizers)") from None
    return tokenizers


def load_tokenizer_file(path: Path):
    """A Hugging Face tokenizer.json, its vocabulary size (largest id + 1) and its separator id (or None)."""
    tokenizers = _import_tokenizers(f"--tokenizer {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclass for any unreadable file
        raise InputError(f"--tokenizer {path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    vocab = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    sep = next((specials[s] for s in KNOWN_SEPARATORS if s in specials), None)
    return tok, vocab, sep


def train_bpe(files: list, field: str, val_fraction: float, vocab_size: int, save_to: Path, bar) -> None:
    """Byte-level BPE (GPT-2 style pre-tokenizer, 256 byte symbols, the separator as special token 0) trained
    on the training documents, streamed through the trainer's iterator."""
    tokenizers = _import_tokenizers("--tokenizer bpe")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEPARATOR_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def train_texts():
        for text, _, to_val, consumed in documents(files, field, val_fraction):
            bar.update(consumed)
            if text and not to_val:
                yield text
    tok.train_from_iterator(train_texts(), trainer)
    tok.save(str(save_to))


_WORKER: dict = {}


def _init_worker(tokenizer_path: Optional[str], dtype: str, sep: Optional[int]) -> None:
    if tokenizer_path is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
        from tokenizers import Tokenizer
        _WORKER["tok"] = Tokenizer.from_file(tokenizer_path)
    else:
        _WORKER["tok"] = None
    _WORKER["dtype"] = np.dtype(dtype)
    _WORKER["sep"] = None if sep is None else np.array([sep], dtype=dtype)


def _encode_batch(batch: list) -> tuple:
    """Token ids (train, val) of a list of (text, ends_document, to_val) pieces, separators inserted."""
    tok, dtype, sep = _WORKER["tok"], _WORKER["dtype"], _WORKER["sep"]
    texts = [t for t, _, _ in batch]
    if tok is None:
        ids = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]
    else:
        ids = [np.array(e.ids, dtype=dtype) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    out = ([], [])
    for (_, last, to_val), piece_ids in zip(batch, ids):
        out[to_val].append(piece_ids)
        if last and sep is not None:
            out[to_val].append(sep)
    empty = np.zeros(0, dtype=dtype)
    return tuple(np.concatenate(parts) if parts else empty for parts in out)


def _batches(pieces: Iterator[tuple]) -> Iterator[tuple]:
    """Group pieces into tasks of about CHUNK_BYTES of text: (pieces, input bytes consumed, documents)."""
    batch_bytes = CHUNK_BYTES
    batch, size, consumed, docs = [], 0, 0, [0, 0]
    for text, last, to_val, used in pieces:
        consumed += used
        if text or last:
            batch.append((text, last, to_val))
            size += len(text)
            docs[to_val] += last
        if size >= batch_bytes:
            yield batch, consumed, docs
            batch, size, consumed, docs = [], 0, 0, [0, 0]
    if batch or consumed:
        yield batch, consumed, docs


def tokenize(pieces: Iterator[tuple], files_out: tuple, workers: int, init_args: tuple, bar) -> tuple:
    """Encode the pieces on `workers` processes, appending the ids to the (train, val) files in input order.
    At most 2 x workers tasks are in flight, so memory does not grow with the input. Returns the token and
    document counts of both splits."""
    tokens, docs = [0, 0], [0, 0]

    def write(result: tuple, consumed: int, batch_docs: list) -> None:
        for split in (0, 1):
            files_out[split].write(memoryview(result[split]))
            tokens[split] += len(result[split])
            docs[split] += batch_docs[split]
        bar.update(consumed)

    if workers == 1:
        _init_worker(*init_args)
        for batch, consumed, batch_docs in _batches(pieces):
            write(_encode_batch(batch), consumed, batch_docs)
        return tokens, docs
    # spawn: clean workers that import only this module (no inherited tokenizer threads)
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
        window = collections.deque()
        for batch, consumed, batch_docs in _batches(pieces):
            window.append((pool.apply_async(_encode_batch, (batch,)), consumed, batch_docs))
            if len(window) >= 2 * workers:
                job, c, d = window.popleft()
                write(job.get(), c, d)
        while window:
            job, c, d = window.popleft()
            write(job.get(), c, d)
    return tokens, docs


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> str:
    if vocab_size > MAX_VOCAB:
        raise InputError(f"vocabulary of {vocab_size:,} tokens exceeds 2^32, the most a uint32 token file holds")
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def _move_tail(src: Path, dst: Path, n_tokens: int, n_tail: int, itemsize: int) -> None:
    """Move the last n_tail tokens of src to the (empty) file dst, in bounded memory."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        f.seek((n_tokens - n_tail) * itemsize)
        shutil.copyfileobj(f, g, 16 << 20)
    os.truncate(src, (n_tokens - n_tail) * itemsize)


def prepare(args: argparse.Namespace, tmp: Path) -> dict:
    """Write train.bin, val.bin, meta.json (and tokenizer.json) into the empty folder tmp; returns the meta."""
    from tqdm import tqdm
    files = input_files(args.inputs, Path(args.out))
    total = sum(size for _, _, size in files)
    print(f"inputs: {len(files)} file{'s' * (len(files) > 1)}, {total:,} bytes")
    bar_args = dict(total=total, unit="B", unit_scale=True, dynamic_ncols=True, leave=False, disable=None)

    tokenizer_path, kind = None, args.tokenizer
    if kind == "bytes":
        vocab, sep = BYTE_VOCAB_WITH_SEPARATOR, BYTES_SEPARATOR_ID
    elif kind == "bpe":
        _import_tokenizers("--tokenizer bpe")
        t0 = time.perf_counter()
        with tqdm(desc="train bpe", **bar_args) as bar:
            train_bpe(files, args.text_field, args.val_fraction, args.vocab_size, tmp / TOKENIZER_FILE, bar)
        tokenizer_path = tmp / TOKENIZER_FILE
        _, vocab, sep = load_tokenizer_file(tokenizer_path)
        print(f"tokenizer: byte-level BPE trained in {time.perf_counter() - t0:.1f} s, vocabulary {vocab:,}"
              + (f" (asked for {args.vocab_size:,}: the input has fewer merges)" if vocab < args.vocab_size else ""))
    else:
        _, vocab, sep = load_tokenizer_file(Path(args.tokenizer))
        tokenizer_path = tmp / TOKENIZER_FILE
        shutil.copyfile(args.tokenizer, tokenizer_path)  # used as is
        kind = TOKENIZER_FILE
        print(f"tokenizer: {args.tokenizer}, vocabulary {vocab:,}, separator "
              + (f"id {sep}" if sep is not None else f"none (no {' / '.join(KNOWN_SEPARATORS)} token): documents "
                                                       f"are concatenated"))
    dtype = token_dtype(vocab)

    t0 = time.perf_counter()
    paths = (tmp / TRAIN_FILE, tmp / VAL_FILE)
    init_args = (None if tokenizer_path is None else str(tokenizer_path), dtype, sep)
    with open(paths[0], "wb") as ftrain, open(paths[1], "wb") as fval, tqdm(desc="tokenize", **bar_args) as bar:
        pieces = documents(files, args.text_field, args.val_fraction)
        tokens, docs = tokenize(pieces, (ftrain, fval), args.workers, init_args, bar)
    seconds = time.perf_counter() - t0
    n = tokens[0] + tokens[1]
    if n == 0:
        raise InputError(f"no text in {' '.join(args.inputs)} (every file or record is empty)")
    if n < 2:
        raise InputError(f"only {n} token in {' '.join(args.inputs)}: too little text for a train and a validation split")
    split = "hash"
    if tokens[0] == 0 or tokens[1] == 0:  # too few documents for the hash split: take the tail
        if tokens[0] == 0:
            os.replace(paths[1], paths[0])
            paths[1].touch()
        n_val = min(n - 1, max(1, round(n * args.val_fraction)))
        _move_tail(paths[0], paths[1], n, n_val, np.dtype(dtype).itemsize)
        tokens, split = [n - n_val, n_val], "tail"
    meta = {"tokenizer": kind, "vocab_size": vocab, "dtype": dtype, "train_tokens": tokens[0], "val_tokens": tokens[1],
            "documents": docs[0] + docs[1], "doc_separator_id": sep, "val_fraction": args.val_fraction, "split": split,
            "text_field": args.text_field, "inputs": list(args.inputs)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"tokens: {tokens[0]:,} train / {tokens[1]:,} val ({dtype}), {meta['documents']:,} documents, split by "
          + ("document hash" if split == "hash" else f"the last {args.val_fraction:g} of the tokens (too few documents)"))
    print(f"tokenized {total / 1e6:.3g} MB in {seconds:.1f} s: {total / 1e6 / max(seconds, 1e-9):.3g} MB/s "
          f"with {args.workers} worker{'s' * (args.workers > 1)}")
    return meta


def validate(args: argparse.Namespace) -> None:
    if not 0.0 < args.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.tokenizer == "bpe":
        args.vocab_size = 8192 if args.vocab_size is None else args.vocab_size
        if args.vocab_size > MAX_VOCAB:
            raise InputError(f"--vocab-size {args.vocab_size:,} exceeds 2^32, the most a uint32 token file holds")
        if args.vocab_size <= BYTES_SEPARATOR_ID:
            raise InputError(f"--vocab-size must be at least {BYTE_VOCAB_WITH_SEPARATOR} for bpe (256 bytes and the "
                               f"separator), got {args.vocab_size}")
    else:
        if args.vocab_size is not None:
            raise InputError("--vocab-size applies to --tokenizer bpe only (bytes have 256 + 1, a tokenizer.json "
                             "its own)")
        if args.tokenizer != "bytes" and not Path(args.tokenizer).is_file():
            raise InputError(f"--tokenizer {args.tokenizer}: not bytes, bpe or an existing tokenizer.json file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a directory")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished files into out; meta.json, which marks the directory as prepared, goes last."""
    (out / META_FILE).unlink(missing_ok=True)
    for name in OUTPUT_FILES[:2] + (TOKENIZER_FILE,):
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)  # a stale tokenizer from an earlier run would mislead
    os.replace(tmp / META_FILE, out / META_FILE)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    created = []  # folders this run made, removed again if it fails
    tmp = None
    try:
        validate(args)
        for d in reversed([out, *out.parents]):
            if not d.exists():
                d.mkdir()
                created.append(d)
        tmp = out / f".prepare_data.tmp{os.getpid()}"
        tmp.mkdir()
        prepare(args, tmp)
        _publish(tmp, out)
        print(f"wrote {out}/: {TRAIN_FILE}, {VAL_FILE}, {META_FILE}" + (f", {TOKENIZER_FILE}" if (out / TOKENIZER_FILE).exists() else ""))
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that cannot be created or written, a full disk
        print(f"error: --out {args.out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 2
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            if d.exists() and not any(d.iterdir()):
                d.rmdir()


if __name__ == "__main__":
    sys.exit(main())
