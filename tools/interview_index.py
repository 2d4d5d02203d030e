"""mkdocs hook: builds the interview index (docs/interview/index.md) from the interview pages.

The convention an interview page follows, so that its questions show up in the index by
themselves (no list to keep in step by hand):

- a question is a `## ` heading followed, as its first paragraph, by one that starts with
  `**In one line.**`: that line is the short answer the index shows;
- a `## ` heading without such a line (an "Other questions ..." section, say) is not indexed
  itself, but every bullet in it of the form `- **"Question?"** answer...` is, with the first
  sentence of its answer.

Every page under docs/interview/ except the index is read, in file-name order (01-, 02-, ...
first), and the list replaces the `<!-- interview-index -->` marker. The links carry the
heading's anchor, computed with the same slugify as the toc extension; `mkdocs build --strict`
checks every one of them, so a renamed heading fails the build instead of breaking a link.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from markdown.extensions.toc import slugify as default_slugify

MARKER = "<!-- interview-index -->"
INDEX = "interview/index.md"
ONE_LINE = re.compile(r"^\*\*In one line\.\*\*\s*(.*)$")
BULLET_QUESTION = re.compile(r'^- \*\*"(?P<q>[^"]+)"\*\*\s*(?P<a>.*)$')
HEADING_ID = re.compile(r"\s*\{\s*#([\w-]+)[^}]*\}\s*$")


def _first_sentence(text: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\[])", text.strip(), maxsplit=1)
    return parts[0]


def _anchor(heading: str, slugify: Any) -> str:
    explicit = HEADING_ID.search(heading)
    if explicit:
        return explicit.group(1)
    plain = re.sub(r"[`*]", "", heading)
    plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", plain)  # a link's text only
    return slugify(plain, "-")


def _paragraphs_after(lines: list[str], start: int) -> tuple[str, int]:
    """The paragraph that starts at or after line `start` (joined), and the line after it."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    para = []
    while i < len(lines) and lines[i].strip():
        para.append(lines[i].strip())
        i += 1
    return " ".join(para), i


def questions(source: str, slugify: Any) -> list[tuple[str, str, str]]:
    """(question, short answer, anchor) for every indexed question of one page, in order."""
    lines = source.splitlines()
    found: list[tuple[str, str, str]] = []
    section_anchor = None
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            heading = line[3:].strip()
            section_anchor = _anchor(heading, slugify)
            para, _ = _paragraphs_after(lines, i + 1)
            match = ONE_LINE.match(para)
            if match:
                found.append((HEADING_ID.sub("", heading), match.group(1), section_anchor))
        elif not in_fence and section_anchor and BULLET_QUESTION.match(line):
            # a bullet runs on over its indented continuation lines
            text = [line.strip()]
            j = i + 1
            while j < len(lines) and lines[j].startswith("  ") and lines[j].strip():
                text.append(lines[j].strip())
                j += 1
            match = BULLET_QUESTION.match(" ".join(text))
            assert match
            found.append((match.group("q"), _first_sentence(match.group("a")), section_anchor))
        i += 1
    return found


def build_index(docs_dir: Path, slugify: Any) -> str:
    pages = sorted(p for p in (docs_dir / "interview").glob("*.md") if p.name != "index.md")
    out: list[str] = []
    for page in pages:
        source = page.read_text(encoding="utf-8")
        title = next((l[2:].strip() for l in source.splitlines() if l.startswith("# ")), page.stem)
        items = questions(source, slugify)
        if not items:
            continue
        out.append(f"### [{title}]({page.name})\n")
        for question, answer, anchor in items:
            question = question.replace("[", "\\[").replace("]", "\\]")
            out.append(f"- **[{question}]({page.name}#{anchor})** {answer}")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != INDEX or MARKER not in markdown:
        return markdown
    toc = config["mdx_configs"].get("toc", {})
    slugify = toc.get("slugify", default_slugify)
    return markdown.replace(MARKER, build_index(Path(config["docs_dir"]), slugify))
