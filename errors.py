"""The error every script reports as one line and exit code 2, and the argparse parser that reports its own
errors the same way. Shared by the library modules (which raise InputError) and the scripts (which catch it
in main, print `error: ...` and return 2)."""
from __future__ import annotations

import argparse


class InputError(ValueError):
    """Bad input: a flag, data, a path, a checkpoint, a layout. Raised before the work it would spoil; the
    scripts print its message as one line and exit with code 2 (README: exit codes)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice or type) as one line and exit code 2, without the
    usage text that would bury the line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
