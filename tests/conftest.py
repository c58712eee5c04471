"""pytest set-up of the tests: the modules under test live at the repository root, and the tests that start
other processes (gloo ranks, torchrun agents, the command-line scripts, prepare_data.py's worker pool) carry
the `multiprocess` marker, so that the unit tests can run alone:

    python -m pytest tests -m "not multiprocess"

The tests that check a parallel layout's training run against one process's (to helpers.REL_TOL) also carry
`layout_equivalence`: test_moe.py runs them a second time with ATEN_CPU_CAPABILITY=default (other kernels,
other fp32 rounding), as CI does. test_compile's and test_multinode's runs against one process are not marked:
they test compilation and torchrun agents, on layouts (TP2; TP2 x PP2) that marked tests cover.

Shared helpers are in helpers.py; a fixture used by several files is here, one used by one file stays there.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts other processes (distributed gloo runs, torchrun, "
                                       "command-line runs); deselect with -m 'not multiprocess'")
    config.addinivalue_line("markers", "layout_equivalence: a parallel layout's training run against one "
                                       "process's (helpers.REL_TOL); test_moe.py reruns them with "
                                       "ATEN_CPU_CAPABILITY=default")
    # Inductor (torch 2.13) takes from its on-disk cache C++ it generated for this CPU's own vector ISA even when
    # ATEN_CPU_CAPABILITY asks for another, and under "default" that code does not compile ("'at::vec' has not
    # been declared": the TP2 --compile test, run after a run without the variable). One cache per capability.
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"  # the ranks inherit it


@pytest.fixture
def one_thread():
    """Decoding runs hundreds of tiny ops; on a shared, oversubscribed CPU intra-op threads make each one
    wait for the others (measured 20x slower with 2 threads here), so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
