"""The documents agree with the code."""
from __future__ import annotations


import minimal_pretrain

from helpers import ROOT


def test_readme_exit_code_table_covers_every_code_main_returns():
    """README's exit-code table (what a scheduler sees and should do) has a row for each code main() returns,
    for Python's own 1 (a traceback) and for a kill by a signal."""
    import inspect
    import re
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### stopping, signals and exit codes"):readme.index("\n## sample")]
    rows = {m.split()[0] for m in re.findall(r"^\| (\d[^|]*) \|", section, re.M)}
    returned = set(re.findall(r"return (\d+)", inspect.getsource(minimal_pretrain.main)))
    assert returned == {"0", "2", "3"} and returned | {"1", "128"} <= rows, (rows, returned)
