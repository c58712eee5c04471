"""Training data: the embedded default corpus, text/directory/.bin inputs, directories written by
prepare_data.py (their format and the UTF-8 text check, which prepare_data.py imports from here), and
deterministic batches.

Default corpus: the running interpreter's standard-library Python source, byte-level tokenized
(vocab 256), split into train/validation by file (a stable hash of the relative path), cached as
uint16 token files. Every batch is a pure function of (seed, step, split): the global batch is drawn
from one generator and each rank slices its rows, so a run is reproducible step by step and DP
sharding reproduces the single-process global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from errors import InputError

if TYPE_CHECKING:  # torch is imported inside the two batch functions only: prepare_data.py imports the format
    import torch   # and the text check from here, and it and its worker processes should not load torch (2 s, 0.2 GB)

# The format of a prepare_data.py directory: prepare_data.py writes it, load_corpus and text_codec read it.
TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"  # token ids of a prepared directory (and of the corpus cache)
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
BYTES_SEPARATOR_ID = 256  # bytes use ids 0..255; the document separator is one id past them
SEPARATOR_TEXT = "<|endoftext|>"  # the BPE separator token, and how a decoder shows the bytes one
TEXT_PIECE_BYTES = 1 << 20  # text files are read (and prepare_data.py tokenises them) in pieces of about this size

BYTE_VOCAB = 256
VAL_EVERY = 50  # one file in ~50 goes to validation


class DataError(InputError):
    """Bad --data input (one line, exit code 2); its own type because the tests and sample.py tell it apart."""


@dataclass
class Corpus:
    train: np.ndarray  # token ids (uint16, or uint32 from prepare_data.py for vocabularies above 65536)
    val: np.ndarray
    vocab_size: int
    description: str


def _is_val_file(rel_path: str) -> bool:
    return zlib.crc32(rel_path.encode()) % VAL_EVERY == 0


def _cache_dir() -> Path:
    return Path(os.environ.get("MINIMAL_MOE_CACHE", Path.home() / ".cache" / "minimal_moe"))


def _atomic_save(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokens.astype(np.uint16).tofile(tmp)
    os.replace(tmp, path)  # several ranks may build the cache at once; the last rename wins, intact


def _tokenize_files(root: Path, files: list) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        (val if _is_val_file(f.relative_to(root).as_posix()) else train).append(data + b"\n")
    to_tokens = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8).astype(np.uint16)
    return to_tokens(train), to_tokens(val)


def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    tag = hashlib.sha1((str(root) + sys.version + str(len(files))).encode()).hexdigest()[:12]
    cache = _cache_dir() / f"stdlib-{tag}"
    train_bin, val_bin = cache / TRAIN_FILE, cache / VAL_FILE
    if not (train_bin.exists() and val_bin.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        train, val = _tokenize_files(root, files)
        _atomic_save(val_bin, val)
        _atomic_save(train_bin, train)
    train = np.memmap(train_bin, dtype=np.uint16, mode="r")
    val = np.memmap(val_bin, dtype=np.uint16, mode="r")
    return Corpus(train, val, BYTE_VOCAB, f"Python {sys.version.split()[0]} standard library source "
                  f"({len(files)} files, {len(train):,} train / {len(val):,} val byte tokens, cache {cache})")


def _cut_point(buf: bytes, force: bool) -> int:
    """Where to end the next piece of a text file: just before the last newline that is followed by a
    non-space character. Byte-level BPE's pre-tokenizer (the GPT-2 pattern) always splits there, also when
    the newline ends a longer whitespace run, so tokenising the pieces apart gives the tokens of the whole
    file. Without such a newline: 0 (read more), or when forced (no such newline in 4 x chunk bytes) before
    the last character, never inside a UTF-8 sequence (there the tokens may differ from the whole file's)."""
    i = len(buf) - 1
    while (i := buf.rfind(b"\n", 1, i)) > 0:
        nxt = buf[i + 1]
        if 0x21 <= nxt <= 0x7E or (nxt >= 0xC0 and not buf[i + 1:i + 5].decode("utf-8", "ignore")[:1].isspace()):
            return i
    if not force:
        return 0
    cut = len(buf) - 1
    while cut > 0 and buf[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: step back to its lead byte
        cut -= 1
    return cut or len(buf)


def text_pieces(path: Path, chunk: Optional[int] = None) -> Iterator[bytes]:
    """The bytes of a text file in pieces of about `chunk` bytes (at most 5 x chunk), cut by _cut_point."""
    chunk = chunk or TEXT_PIECE_BYTES
    buf = b""
    with open(path, "rb") as f:
        while data := f.read(chunk):
            buf += data
            if len(buf) > chunk:
                cut = _cut_point(buf, force=len(buf) >= 4 * chunk)
                if cut:
                    yield buf[:cut]
                    buf = buf[cut:]
    if buf:
        yield buf


class NotUTF8(ValueError):
    """A file that is not UTF-8 text; `offset` is its first bad byte."""

    def __init__(self, path: Path, offset: int):
        super().__init__(f"{path}: not UTF-8 text (bad byte at offset {offset})")
        self.path, self.offset = path, offset


def utf8_pieces(path: Path, chunk: Optional[int] = None) -> Iterator[tuple]:
    """(text, bytes read) of a text file in the pieces of `text_pieces`; raises NotUTF8 at the first piece that
    is not UTF-8. The one text check: prepare_data.py applies it to every text input, and --data to its text
    files (_check_text), so both refuse the same files."""
    offset = 0
    for piece in text_pieces(path, chunk):
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotUTF8(path, offset + e.start) from None
        offset += len(piece)
        yield text, len(piece)


def _check_text(files: list, path: str) -> None:
    """--data trains on the bytes of text files. A file prepare_data.py refuses as not UTF-8 (a binary file,
    another encoding) is refused here too, by the same check, instead of being trained on silently."""
    for f in files:
        try:
            for _ in utf8_pieces(f):
                pass
        except NotUTF8 as e:
            what = "" if f == Path(path) else f"{f} "
            raise DataError(f"--data {path}: {what}is not UTF-8 text (bad byte at offset {e.offset}); --data reads "
                            f"UTF-8 text files, a prepare_data.py directory or uint16 .bin tokens") from None
        except OSError as e:
            raise DataError(f"--data {path}: cannot read {f} ({e.strerror or e})") from None


def _split_tail(tokens: np.ndarray, frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    n_val = max(1, int(len(tokens) * frac))
    return tokens[:-n_val], tokens[-n_val:]


def _padded_vocab(needed: int, vocab_size: Optional[int], path: str, what: str) -> int:
    """The flag if it covers the tokens, else the tokens' need rounded up to a multiple of 64 (the padding
    rows are never targets; they keep the embedding and head divisible by TP and the GEMMs aligned)."""
    if vocab_size is not None and vocab_size < needed:
        raise DataError(f"--vocab-size {vocab_size} is smaller than {what} ({needed}) in --data {path}")
    return vocab_size or ((needed + 63) // 64) * 64


def read_meta(p: Path, path: str) -> dict:
    """The meta.json of a prepare_data.py directory, checked against its token files."""
    try:
        meta = json.loads((p / META_FILE).read_text())
        vocab, dtype = int(meta["vocab_size"]), np.dtype(meta["dtype"])
        counts = {name: int(meta[f"{name}_tokens"]) for name in ("train", "val")}
        kind = meta["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--data {path}: unreadable {META_FILE} ({type(e).__name__}: {e}); re-run prepare_data.py") from None
    if dtype not in (np.uint16, np.uint32) or vocab < 1 or vocab > 2 ** (8 * dtype.itemsize):
        raise DataError(f"--data {path}: {META_FILE} gives vocabulary {vocab} in {dtype}; re-run prepare_data.py")
    if kind != "bytes" and not (p / TOKENIZER_FILE).is_file():
        raise DataError(f"--data {path}: {META_FILE} names a {kind} tokenizer but {TOKENIZER_FILE} is missing")
    for name, n in counts.items():
        f = p / f"{name}.bin"
        size = f.stat().st_size if f.is_file() else None
        if size != n * dtype.itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"--data {path}: {name}.bin is {found}, {META_FILE} says {n} {dtype} tokens; "
                            f"re-run prepare_data.py")
    return meta


def load_corpus(path: Optional[str], vocab_size: Optional[int] = None) -> Corpus:
    """path None: the standard-library corpus. A directory with meta.json (made by prepare_data.py): its
    tokens, vocabulary and dtype. A directory holding train.bin (and val.bin) or a single .bin file:
    nanoGPT's uint16 tokens. Any other file, or a directory of text files: bytes, if UTF-8 text (the check
    prepare_data.py applies; anything else is a DataError naming the file)."""
    if path is None:
        return stdlib_corpus()
    p = Path(path)
    if not p.exists():
        raise DataError(f"--data {path}: no such file or directory (give a text file, a directory of text "
                        f"files, a prepare_data.py directory, or a uint16 .bin token file)")
    if p.is_dir() and (p / META_FILE).is_file():
        meta = read_meta(p, path)
        dtype = np.dtype(meta["dtype"])
        train = np.memmap(p / TRAIN_FILE, dtype=dtype, mode="r")
        val = np.memmap(p / VAL_FILE, dtype=dtype, mode="r")
        vocab = _padded_vocab(meta["vocab_size"], vocab_size, path, f"the vocabulary of its {meta['tokenizer']} tokenizer")
        return Corpus(train, val, vocab, f"{meta['tokenizer']} tokens ({dtype}) from {p}: {len(train):,} train / "
                      f"{len(val):,} val, tokenizer vocabulary {meta['vocab_size']:,} (model {vocab:,})")
    if p.is_dir() and (p / TRAIN_FILE).is_file():
        train = np.memmap(p / TRAIN_FILE, dtype=np.uint16, mode="r")
        val = np.memmap(p / VAL_FILE, dtype=np.uint16, mode="r") if (p / VAL_FILE).is_file() else None
        if val is None:
            train, val = _split_tail(train)
        corpus = Corpus(train, val, 0, f"uint16 tokens from {p}")
    elif p.is_file() and p.suffix == ".bin":
        if p.stat().st_size < 2 or p.stat().st_size % 2:
            raise DataError(f"--data {path}: a .bin file must hold uint16 tokens (even, non-zero size)")
        train, val = _split_tail(np.memmap(p, dtype=np.uint16, mode="r"))
        corpus = Corpus(train, val, 0, f"uint16 tokens from {p}")
    elif p.is_file():
        _check_text([p], path)
        data = np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.uint16)
        train, val = _split_tail(data)
        corpus = Corpus(train, val, BYTE_VOCAB, f"bytes of {p}")
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
        _check_text(files, path)
        train, val = _tokenize_files(p, files)
        if len(val) == 0 or len(train) == 0:  # too few files to split by file: split the bytes
            train, val = _split_tail(np.concatenate([train, val]))
        corpus = Corpus(train, val, BYTE_VOCAB, f"bytes of {len(files)} files under {p}")
    if len(corpus.train) == 0:
        raise DataError(f"--data {path}: no data found (empty file or directory)")
    if corpus.vocab_size == 0:  # token file: the vocabulary is the flag, or what the tokens need
        needed = int(max(corpus.train.max(), corpus.val.max())) + 1
        corpus.vocab_size = _padded_vocab(needed, vocab_size, path, "the largest token id + 1")
    return corpus


class ByteCodec:
    """Text <-> token ids of the byte-level corpora (vocabulary 256). Decoding uses UTF-8 with
    replacement, since a sampled byte sequence need not be valid UTF-8. prepare_data.py's byte directories
    add a document separator (id 256), decoded as <|endoftext|>; other ids past 255 (the model's padding
    rows) decode as U+FFFD."""
    vocab_size = BYTE_VOCAB

    def __init__(self, separator_id: Optional[int] = None):
        self.separator_id = separator_id
        self.vocab_size = BYTE_VOCAB if separator_id is None else max(BYTE_VOCAB, separator_id + 1)

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        parts, run = [], bytearray()
        for i in map(int, ids):
            if i < BYTE_VOCAB:
                run.append(i)
                continue
            parts += [run.decode("utf-8", errors="replace"), SEPARATOR_TEXT if i == self.separator_id else "\ufffd"]
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")


class TokenizerCodec:
    """Text <-> token ids through a Hugging Face tokenizer.json (needs the tokenizers package). No special
    tokens are added on encoding, as in prepare_data.py; decoding shows them (the document separator).
    `where` starts its error messages (`--data DIR`, or the checkpoint that carries the file)."""

    def __init__(self, path: Path, where: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{where}: decoding its {TOKENIZER_FILE} needs the tokenizers package "
                            f"(pip install tokenizers)") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for any unreadable file
            raise DataError(f"{where}: unreadable {TOKENIZER_FILE} ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def codec_description(data_path: Optional[str]) -> dict:
    """How the tokens of `load_corpus(data_path)` are decoded, as JSON that a checkpoint carries (so that
    sampling needs neither --data nor its path): {"kind": "bytes"} for the byte-level corpora (default,
    text files, directories); {"kind": "bytes", "separator_id": 256} or {"kind": "tokenizer", "file":
    "tokenizer.json"} for a prepare_data.py directory (the file sits next to the description: in the data
    directory, or copied into the checkpoint); {"kind": "none", "why": ...} for raw token files."""
    p = Path(data_path) if data_path is not None else None
    if p is not None and p.is_dir() and (p / META_FILE).is_file():
        meta = read_meta(p, data_path)
        if meta["tokenizer"] == "bytes":
            return {"kind": "bytes", "separator_id": meta.get("doc_separator_id", BYTES_SEPARATOR_ID)}
        return {"kind": "tokenizer", "file": TOKENIZER_FILE}
    if p is not None and ((p.is_dir() and (p / TRAIN_FILE).is_file()) or (p.is_file() and p.suffix == ".bin")):
        return {"kind": "none", "why": f"raw uint16 token files (--data {data_path}) carry no tokenizer to encode "
                                       f"or decode text"}
    return {"kind": "bytes"}


def codec_from_description(desc: dict, directory: Optional[Path], where: str):
    """The codec a `codec_description` describes; a tokenizer file is read from `directory`. Raises DataError
    (starting with `where`) when it cannot decode."""
    kind = desc.get("kind")
    if kind == "bytes":
        return ByteCodec(separator_id=desc.get("separator_id"))
    if kind == "tokenizer":
        return TokenizerCodec(directory / desc["file"], where)
    if kind == "none":
        raise DataError(f"{where}: {desc.get('why', 'no tokenizer')}")
    raise DataError(f"{where}: unknown tokenizer kind {kind!r} (written by a newer version of this code?)")


def text_codec(data_path: Optional[str]):
    """The encoder/decoder (`.encode(str) -> list[int]`, `.decode(ids) -> str`) of the tokens that
    `load_corpus(data_path)` yields. The byte-level corpora (default, text files, directories) use bytes;
    a prepare_data.py directory uses its meta.json's tokenizer (bytes with a separator, or tokenizer.json)."""
    return codec_from_description(codec_description(data_path), Path(data_path) if data_path else None,
                                  f"--data {data_path}")


def check_lengths(corpus: Corpus, seq_len: int, data_flag: Optional[str]) -> None:
    for name, split in (("train", corpus.train), ("validation", corpus.val)):
        if len(split) < seq_len + 2:
            raise DataError(f"--data {data_flag or '(default corpus)'}: the {name} split has {len(split)} tokens, "
                            f"fewer than --max-seq-length {seq_len} + 2")


def corpus_fingerprint(corpus: Corpus, sample: int = 1 << 16) -> str:
    """A short description that differs between corpora: split lengths, vocabulary and a crc32 of the first
    and last `sample` tokens of each split (cheap for any size; ranks compare theirs at start-up)."""
    crc = 0
    for split in (corpus.train, corpus.val):
        for piece in (split[:sample], split[-sample:]):
            crc = zlib.crc32(np.ascontiguousarray(piece).tobytes(), crc)
    return f"{len(corpus.train)} + {len(corpus.val)} tokens, vocabulary {corpus.vocab_size}, crc32 {crc:08x}"


def batch_offsets(n_tokens: int, seq_len: int, global_batch: int, seed: int, step: int, split: str) -> torch.Tensor:
    """Start offsets of the `global_batch` sequences of one step: a pure function of its arguments."""
    import torch
    split_id = 0 if split == "train" else 1
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step * 2 + split_id) % (2 ** 63))
    return torch.randint(0, n_tokens - seq_len - 1, (global_batch,), generator=gen)


def get_batch(tokens: np.ndarray, offsets: torch.Tensor, seq_len: int, device: torch.device):
    """(inputs, targets) int64 [len(offsets), seq_len] on `device`."""
    import torch
    idx = offsets.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
    rows = torch.from_numpy(tokens[idx].astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous(), y.contiguous()
