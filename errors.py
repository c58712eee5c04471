"""The error every script reports as one line and exit code 2, and the argparse parser that reports its own
errors the same way. Shared by the library modules (which raise InputError) and the scripts (which catch it
in main, print `error: ...` and return 2)."""
from __future__ import annotations

import argparse
import sys


class InputError(ValueError):
    """Bad input: a flag, data, a path, a checkpoint, a layout. Raised before the work it would spoil; the
    scripts print its message as one line and exit with code 2 (README: exit codes)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice or type) as one line and exit code 2, without the
    usage text that would bury the line. A value given to a flag that takes none (`--compile yes`) is named
    with its flag, where argparse would only call the value an unrecognized argument."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed, extra = self.parse_known_args(argv, namespace)
        if extra:
            at = argv.index(extra[0]) if extra[0] in argv else 0
            flag = self._option_string_actions.get(argv[at - 1]) if at > 0 else None
            if flag is not None and flag.nargs == 0:
                self.error(f"argument {argv[at - 1]}: takes no value, got {extra[0]!r}")
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed
