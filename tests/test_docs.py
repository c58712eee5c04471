"""The documents agree with the code: README's exit-code table, and MOE_GUIDE.md's flag table, which is generated
from the trainer's parser:

    python tests/test_docs.py        # rewrites the flag table in MOE_GUIDE.md section 9 from the parser
"""
from __future__ import annotations

import argparse
import re

from helpers import ROOT  # first: it puts the repository root on sys.path when this file runs as a script

import config  # noqa: E402
import minimal_pretrain  # noqa: E402

FLAGS_BEGIN = ("<!-- generated from the trainer's parser (config.py) by `python tests/test_docs.py`: "
               "edit the options' help texts (their dataclass fields), not this table -->")
FLAGS_END = "<!-- end of the generated flag table -->"


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


def _markdown(text: str) -> str:
    """A help text as a table cell: flags and <placeholders> as code (a bare <time> would be read as HTML)."""
    text = " ".join(text.split()).replace("|", "\\|")
    return re.sub(r"(?<![\w`])(--[a-z0-9][a-z0-9-]*|[\w./{}-]*<[^>\s]+>[\w./{}-]*)", r"`\1`", text)


def flag_table(parser: argparse.ArgumentParser) -> str:
    """Markdown table of every flag: a bold row per argument group, then flag, default, what --resume does with
    it (fixed: a model flag the checkpoint fixes, config.SHAPE_FLAGS; every other flag may change) and help."""
    rows = ["| flag | default | on `--resume` | meaning |", "|---|---|---|---|"]
    for group in parser._action_groups:  # argparse has no public way to list the groups
        actions = [a for a in group._group_actions if a.option_strings and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]  # an old spelling is hidden (its flag's help names it)
        if not actions:
            continue
        rows.append(f"| **{group.title}** | | | |")
        for a in actions:
            if isinstance(a.default, bool):  # a --x / --no-x switch
                default = "on" if a.default else "off"
            else:
                default = "-" if a.default is None else _markdown(str(a.default))
            flag = ", ".join(f"`{s}`" for s in a.option_strings)
            choices = f" (one of {', '.join(f'`{c}`' for c in a.choices)})" if a.choices else ""
            resume = "fixed" if a.dest in config.SHAPE_FLAGS else ""
            rows.append(f"| {flag} | {default} | {resume} | {_markdown(a.help)}{choices} |")
    return "\n".join(rows)


def _guide_table(guide: str) -> tuple[int, int]:
    start = guide.index(FLAGS_BEGIN) + len(FLAGS_BEGIN)
    return start, guide.index(FLAGS_END, start)


def test_moe_guide_flag_table_is_the_parsers():
    """MOE_GUIDE.md section 9 lists exactly the trainer's flags, defaults and help texts."""
    guide = (ROOT / "MOE_GUIDE.md").read_text()
    start, end = _guide_table(guide)
    assert guide[start:end].strip() == flag_table(config.build_parser()), \
        "MOE_GUIDE.md's flag table differs from the trainer's parser (config.py): run python tests/test_docs.py"


if __name__ == "__main__":
    path = ROOT / "MOE_GUIDE.md"
    guide = path.read_text()
    start, end = _guide_table(guide)
    path.write_text(guide[:start] + "\n" + flag_table(config.build_parser()) + "\n" + guide[end:])
    print(f"rewrote the flag table in {path}")
