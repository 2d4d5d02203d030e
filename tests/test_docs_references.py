"""The docs name code as `path/to/file.py:Name` (a class, function or `Class.method`) in the
"What this stage changes" tables and elsewhere. This test finds every such reference in docs/
and checks that the file defines the name, so a rename in the code fails here instead of leaving
the docs pointing at nothing. (Code *included* by snippets is checked by `mkdocs build --strict`.)
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
