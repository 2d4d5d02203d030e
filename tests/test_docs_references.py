"""The docs name code as `path/to/file.py:Name` (a class, function or `Class.method`) in the
"What this stage changes" tables and elsewhere. This test finds every such reference in docs/
and checks that the file defines the name, so a rename in the code fails here instead of leaving
the docs pointing at nothing. (Code *included* by snippets is checked by `mkdocs build --strict`.)

It also checks docs/interview/numbers.md: every number in its "number" column must appear in the
`benchmarks/results/*.md` file that its row cites, so the page cannot drift from the results.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:folovllm|benchmarks|tests|stages)/[\w/]+\.py):(\w+(?:\.\w+)?)`")


def _references() -> list[tuple[str, str, str]]:
    found = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for path, name in REFERENCE.findall(page.read_text(encoding="utf-8")):
            found.append((str(page.relative_to(ROOT)), path, name))
    return sorted(set(found))


def _defined_names(path: Path) -> set[str]:
    """Top-level classes, functions and assignments, plus `Class.method` for every method."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(
                    f"{node.name}.{item.name}"
                    for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                )
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_the_docs_reference_some_code() -> None:
    assert len(_references()) > 20


@pytest.mark.parametrize("page,path,name", _references())
def test_docs_reference_names_code_that_exists(page: str, path: str, name: str) -> None:
    file = ROOT / path
    assert file.is_file(), f"{page} names {path}, which does not exist"
    assert name in _defined_names(file), f"{page} names {path}:{name}, which {path} does not define"


# -- the headline numbers page ------------------------------------------------------------------

NUMBERS_PAGE = ROOT / "docs" / "interview" / "numbers.md"
RESULT_FILE = re.compile(r"`(benchmarks/results/[\w.-]+\.md)`")
BOLD_NUMBER = re.compile(r"\*\*([\d][\d,.]*%?)×?\*\*")


def _number_rows() -> list[tuple[str, str, list[str]]]:
    rows = []
    for line in NUMBERS_PAGE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        source = RESULT_FILE.search(line)
        if len(cells) >= 4 and source:
            rows.append((cells[0], source.group(1), BOLD_NUMBER.findall(cells[1])))
    return rows


def test_the_numbers_page_cites_results() -> None:
    rows = _number_rows()
    assert len(rows) > 10 and all(numbers for _, _, numbers in rows)


@pytest.mark.parametrize("what,source,numbers", _number_rows())
def test_every_headline_number_is_in_the_file_it_cites(what: str, source: str, numbers: list[str]) -> None:
    text = (ROOT / source).read_text(encoding="utf-8")
    for number in numbers:
        # the whole number, not a piece of a longer one ("2.13" must not match "torch 2.13.0")
        whole = re.compile(rf"(?<![\d.,]){re.escape(number)}(?![\d,]|\.\d)")
        assert whole.search(text), f"numbers.md: {what!r} quotes {number}, which {source} does not contain"
