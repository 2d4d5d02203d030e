"""The docs name code as `path/to/file.py:Name` (a class, function or `Class.method`) in the
"What this stage changes" tables and elsewhere. This test finds every such reference in docs/
and checks that the file defines the name, so a rename in the code fails here instead of leaving
the docs pointing at nothing. (Code *included* by snippets is checked by `mkdocs build --strict`.)

It also checks docs/interview/numbers.md: every number in its "number" column must appear in the
`benchmarks/results/*.md` file that its row cites, so the page cannot drift from the results;
that every `benchmarks/results/...` file a page or the README names exists; and that every
markdown table has as many cells in each row as in its header (`mkdocs build --strict` does not
catch it: a header one cell short of its separator renders as raw `| a | b |` text).
"""

from __future__ import annotations

import ast
import glob
import itertools
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


# -- every cited results file exists --------------------------------------------------------------

PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
CITED_RESULT = re.compile(r"benchmarks/results/([\w.*{},-]+\.(?:md|json))")


def _expand_braces(pattern: str) -> list[str]:
    """`a_{x,y}.json` -> [`a_x.json`, `a_y.json`] (the shell's brace expansion, as pages write it)."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _cited_results() -> list[tuple[str, str]]:
    found = set()
    for page in PAGES:
        for name in CITED_RESULT.findall(page.read_text(encoding="utf-8")):
            found.add((str(page.relative_to(ROOT)), name))
    return sorted(found)


def test_the_pages_cite_results_files() -> None:
    assert len(_cited_results()) > 20


@pytest.mark.parametrize("page,name", _cited_results())
def test_every_cited_results_file_exists(page: str, name: str) -> None:
    for pattern in _expand_braces(name):
        matches = glob.glob(str(ROOT / "benchmarks" / "results" / pattern))
        assert matches, f"{page} cites benchmarks/results/{pattern}, which does not exist"


# -- every markdown table is whole -----------------------------------------------------------------

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
SNIPPET = re.compile(r'^\s*--8<--\s+"([^":]+\.md)"\s*$')
SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def _prose_lines(path: Path, seen: frozenset[Path] = frozenset()) -> list[tuple[str, int, str]]:
    """(file, line number, line) of every line outside code fences, with the markdown files that
    `--8<-- "file.md"` includes (result tables) spliced in where the page includes them."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
        elif (include := SNIPPET.match(line)) and (ROOT / include.group(1)).is_file() and path not in seen:
            lines += _prose_lines(ROOT / include.group(1), seen | {path})  # (no include loops)
        else:
            lines.append((str(path.relative_to(ROOT)), number, line))
    return lines


def _cells(row: str) -> int:
    """Cells of a table row as Python-Markdown splits it: not at `\\|`, not inside `code`."""
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    cells, code, i = 1, 0, 0
    while i < len(row):
        if row[i] == "\\":
            i += 2
            continue
        if row[i] == "`":
            run = len(row[i:]) - len(row[i:].lstrip("`"))
            code = 0 if code == run else (run if not code else code)
            i += run
            continue
        if row[i] == "|" and not code:
            cells += 1
        i += 1
    return cells


def _tables() -> list[tuple[str, int, list[tuple[int, int]]]]:
    """(file, header line, [(line, cells)] for header, separator and body rows) of every table."""
    tables = {}  # a results file included by several pages is one table
    for page in PAGES:
        lines = _prose_lines(page)
        for i in range(len(lines) - 1):
            (file, number, header), (_, _, separator) = lines[i], lines[i + 1]
            if "|" not in header or not SEPARATOR.match(separator.strip()) or "|" not in separator:
                continue
            rows = [(number, _cells(header)), (lines[i + 1][1], _cells(separator))]
            for _, n, row in itertools.takewhile(lambda x: x[2].strip().startswith("|"), lines[i + 2:]):
                rows.append((n, _cells(row)))
            tables[file, number] = rows
    return [(file, number, rows) for (file, number), rows in sorted(tables.items())]


def test_the_table_check_finds_the_tables_and_counts_cells() -> None:
    assert len(_tables()) > 100
    assert _cells("| a | `x | y` | b\\|c |") == 3 and _cells("|---|--:|") == 2


@pytest.mark.parametrize("file,line,rows", _tables(), ids=lambda x: x if isinstance(x, (str, int)) else "")
def test_every_table_row_has_the_header_s_cell_count(file: str, line: int, rows: list[tuple[int, int]]) -> None:
    header = rows[0][1]
    wrong = [(n, c) for n, c in rows[1:] if c != header]
    assert not wrong, f"{file}:{line}: the header has {header} cells, but " + ", ".join(
        f"line {n} has {c}" for n, c in wrong)


# -- pictures readable on a page ------------------------------------------------------------------

# The site's content column is about 1,000 px wide at a 1280 px window: a picture much wider than
# that is shrunk until its labels cannot be read (the trace page's hero was once 3,419 px: six
# stages in one row). `folovllm trace` wraps several stages two to a row for that reason.
MAX_PICTURE_WIDTH = 1300


def _png_width(path: Path) -> int:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big")


@pytest.mark.parametrize("picture", sorted((ROOT / "docs" / "assets").glob("*.png")), ids=lambda p: p.name)
def test_every_picture_fits_the_page(picture: Path) -> None:
    width = _png_width(picture)
    assert width <= MAX_PICTURE_WIDTH, (
        f"{picture.name} is {width} px wide: shown at ~1,000 px its labels are unreadable; "
        f"draw it at most {MAX_PICTURE_WIDTH} px wide (wrap columns into rows)")


# -- the stage page convention (stated in mkdocs.yml) -------------------------------------------

STAGE_PAGES = sorted(p for p in (ROOT / "docs" / "stages").glob("[0-9][0-9]-*.md") if "## Interview" in p.read_text())
# Pages another branch is rewriting right now; drop a name here when its rewrite has landed.
BEING_REWRITTEN: set[str] = set()


@pytest.mark.parametrize("page", STAGE_PAGES, ids=lambda p: p.name)
def test_stage_pages_keep_the_convention_and_every_exercise_has_a_hint_and_a_solution(page: Path) -> None:
    if page.name in BEING_REWRITTEN:
        pytest.skip(f"{page.name} is being rewritten on another branch")
    headings = [line for _, _, line in _prose_lines(page) if line.startswith("## ")]
    assert headings[0] == "## What this stage changes { #what-this-stage-changes }", headings[0]
    assert headings[-2:] == ["## Exercises { #exercises }", "## Interview"], headings[-2:]
    text = page.read_text(encoding="utf-8")
    exercises = re.split(r"\n\*\*\d+\. ", text[text.index("## Exercises"):text.index("## Interview")])[1:]
    assert exercises, f"{page.name}: no '**1. Title.**' exercises"
    for number, exercise in enumerate(exercises, 1):
        assert '??? tip "Hint"' in exercise, f"{page.name}: exercise {number} has no hint"
        assert '??? success "Solution"' in exercise, f"{page.name}: exercise {number} has no solution"
