"""The README's code map ("How it is built") names every module of the package, under its package."""

from __future__ import annotations

import fnmatch
import re

import pytest
from helpers import REPO

PACKAGE = REPO / "loratools"


def code_map() -> dict[str, str]:
    """Package folder ("" for the top level) → the code map's text about it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## How it is built", 1)[1]
    block = section.split("```", 2)[1]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        top = re.match(r"^  (\w+)/", line)
        if line.startswith("loratools/"):
            current = ""
        elif top:
            current = top.group(1)
        elif re.match(r"^\S", line):
            current = None  # docs/, tests/, … are not the package
        elif re.match(r"^  \S", line) and current is not None:
            current = ""  # a top-level module of the package
        if current is not None:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def _modules() -> list[str]:
    found = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
    return [m for m in found if "__pycache__" not in m]


def _named(filename: str, text: str) -> bool:
    words = re.findall(r"[\w*]+\.py\b", text)
    return any(fnmatch.fnmatch(filename, word) for word in words)


@pytest.mark.parametrize("module", _modules())
def test_the_code_map_names_every_module(module: str) -> None:
    package, _, filename = module.rpartition("/")
    text = code_map().get(package, "")
    assert _named(filename, text), f"README.md 'How it is built' does not name {module} under {package or 'loratools'}/"
