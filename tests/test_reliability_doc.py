"""docs/reliability.md is a checked table: every row of every table names the test that proves it
(`tests/<file>.py::<test>`, or "same" for the row above's), and each named test exists. A fault written up without
a test fails here; so does a row whose test was renamed or deleted."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text`: (header cells, body rows' cells), lower-cased header."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            out.append(([c.lower() for c in block[0]], block[2:]))
            block = []
    return out


@cache
def defined_tests(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_row_of_docs_reliability_names_a_test_that_exists():
    rows = 0
    for header, body in tables(DOC.read_text()):
        assert "test" in header, f"docs/reliability.md: a table without a 'test' column: {header}"
        col, previous = header.index("test"), []
        for cells in body:
            assert len(cells) == len(header), f"docs/reliability.md: row {cells[0]!r} has {len(cells)} cells"
            refs = REF.findall(cells[col]) or (previous if cells[col].lower().startswith("same") else [])
            assert refs, f"docs/reliability.md: the row {cells[0]!r} names no test (tests/<file>.py::<test>)"
            for path, name in refs:
                assert (REPO / path).is_file() and name in defined_tests(path), \
                    f"docs/reliability.md: row {cells[0]!r} names {path}::{name}, which does not exist"
            previous, rows = refs, rows + 1
    assert rows >= 25, rows  # the tables are there (a parse that finds nothing passes nothing)


def test_the_table_parser_reads_rows_and_the_same_rule():
    text = "x\n| fault | test |\n|---|---|\n| a | `tests/t.py::test_a` |\n| b | same |\n\n| c | d |\n|-|-|\n"
    assert tables(text) == [(["fault", "test"], [["a", "`tests/t.py::test_a`"], ["b", "same"]]), (["c", "d"], [])]
    assert REF.findall("`tests/test_x.py::test_y`, `tests/a/b.py::test_z`") == [
        ("tests/test_x.py", "test_y"), ("tests/a/b.py", "test_z")]
