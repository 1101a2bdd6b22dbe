"""The project's reference documents (docs/*.md), as installed with the package.

Code and messages cite ``docs/FORMATS.md §N``; ``loratools docs N`` prints that section. A wheel
carries the documents as ``loratools/docs/`` (pyproject ``package-dir``); a source checkout (and
an editable install) reads them from the repository's ``docs/`` beside the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

DEFAULT_DOC = "FORMATS"
# "## 5. Checkpoint layouts", "### 5.6 Single file → …": the number, then the title
HEADING = re.compile(r"^(?P<hashes>#{2,3}) (?P<number>\d+(?:\.\d+)?)\.? (?P<title>.+)$", re.M)


@dataclass(frozen=True)
class Section:
    """One numbered section of a document: ``number`` as cited (``5.6``), its title and text."""

    number: str
    title: str
    text: str


def docs_folder() -> Path:
    """Where the documents are: the installed ``loratools/docs/``, else the checkout's ``docs/``."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "docs", package.parent / "docs"):
        if (folder / f"{DEFAULT_DOC}.md").is_file():
            return folder
    raise InputError("the reference documents are not installed with this copy of loratools")


def doc_names() -> list[str]:
    """The documents there are, by name (``FORMATS``, ``CHECK``, …)."""
    return sorted(p.stem for p in docs_folder().glob("*.md"))


def doc_text(name: str = DEFAULT_DOC) -> str:
    """A whole document by name (case-insensitive, ``.md`` optional)."""
    wanted = name.upper().removesuffix(".MD")
    for known in doc_names():
        if known.upper() == wanted:
            return (docs_folder() / f"{known}.md").read_text(encoding="utf-8")
    raise InputError(f"no document {name!r} (there are: {', '.join(doc_names())})")


def sections(text: str) -> list[Section]:
    """Every numbered section, each running to the next heading of its level or above."""
    found = list(HEADING.finditer(text))
    out = []
    for i, match in enumerate(found):
        level = len(match["hashes"])
        end = next((m.start() for m in found[i + 1 :] if len(m["hashes"]) <= level), len(text))
        out.append(Section(match["number"], match["title"].strip(), text[match.start() : end].rstrip() + "\n"))
    return out


def section(text: str, number: str, doc: str = DEFAULT_DOC) -> Section:
    """The section cited as ``§number`` (a trailing dot or ``§`` is accepted)."""
    wanted = number.lstrip("§").rstrip(".")
    for s in sections(text):
        if s.number == wanted:
            return s
    raise InputError(f"no section §{wanted} in docs/{doc}.md", hint=f"loratools docs --doc {doc} --list")
