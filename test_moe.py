"""Runs the whole test suite, as CI does: the tests live in tests/, one file per subject (README: tests).

    python test_moe.py                          # everything
    python test_moe.py -m "not multiprocess"    # the unit tests alone: no process started
    python test_moe.py -k checkpoint            # any other pytest arguments pass through

`python -m pytest tests [ARGS]` is the same.
"""
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__).resolve().parent / "tests"), "-q"] + sys.argv[1:]))
