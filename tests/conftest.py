"""pytest set-up of the tests: the modules under test live at the repository root, and the tests that start
other processes (gloo ranks, torchrun agents, the command-line scripts, prepare_data.py's worker pool) carry
the `multiprocess` marker, so that the unit tests can run alone:

    python -m pytest tests -m "not multiprocess"

Shared helpers are in helpers.py; a fixture used by several files is here, one used by one file stays there.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts other processes (distributed gloo runs, torchrun, "
                                       "command-line runs); deselect with -m 'not multiprocess'")


@pytest.fixture
def one_thread():
    """Decoding runs hundreds of tiny ops; on a shared, oversubscribed CPU intra-op threads make each one
    wait for the others (measured 20x slower with 2 threads here), so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
