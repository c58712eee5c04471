"""Tokenisation throughput of prepare_data.py on ~100 MB of text, with bytes and with a trained BPE.

    python bench/bench_prepare_data.py [--mb 100] [--workdir DIR]

The input is the running interpreter's standard-library Python source (~30 MB), written out again with a
different random permutation of the lowercase letters per round until --mb is reached, so every round
brings new "words" for the BPE trainer rather than exact repeats. Each run prints prepare_data.py's own
summary, whose "tokenized ... MB/s" line times the tokenising pass (reading, splitting, encoding,
writing); BPE training is timed on its own line.
"""
from __future__ import annotations

import random
import string
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from errors import OneLineParser  # noqa: E402


def make_input(root: Path, megabytes: int) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    written, rnd = 0, 0
    while written < megabytes * 1_000_000:
        letters = list(string.ascii_lowercase)
        random.Random(rnd).shuffle(letters)
        table = str.maketrans(string.ascii_lowercase, "".join(letters)) if rnd else {}
        out = root / f"round{rnd}"
        for i, src in enumerate(sources):
            text = src.read_text(encoding="utf-8", errors="replace").translate(table)
            dst = out / f"{i:05d}.py"
            dst.parent.mkdir(parents=True, exist_ok=True)
            written += dst.write_bytes(text.encode("utf-8"))
            if written >= megabytes * 1_000_000:
                break
        rnd += 1
    return written


def main() -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=100, help="input size in MB")
    p.add_argument("--workdir", default=None, help="where to write the input and outputs (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        n = make_input(root / "input", args.mb)
        print(f"input: {n / 1e6:.1f} MB under {root / 'input'}", flush=True)
        for tok in ("bytes", "bpe"):
            print(f"--- --tokenizer {tok}", flush=True)
            subprocess.run([sys.executable, str(HERE / "prepare_data.py"), str(root / "input"), "--out",
                            str(root / f"out_{tok}"), "--tokenizer", tok], check=True)


if __name__ == "__main__":
    main()
