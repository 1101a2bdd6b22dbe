"""docs/FORMATS.md: every `docs/FORMATS.md §N` cited in code, tests, messages and README exists."""

from __future__ import annotations

import re

from click.testing import CliRunner
from helpers import REPO

from loratools.cli.main import cli

CITE = re.compile(r"(?<![\w/])(?:docs/)?FORMATS\.md(?: §(?P<section>\d+(?:\.\d+)?))?")


def _sections() -> set[str]:
    text = (REPO / "docs" / "FORMATS.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def test_every_citation_names_a_section() -> None:
    sections = _sections()
    assert {"0", "1.3", "2.5", "4.7", "5.2", "6.1"} <= sections
    files = [*REPO.glob("loratools/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("bench/**/*.py")]
    files += [REPO / "README.md", *REPO.glob("bench/*.md")]
    bad = []
    for path in files:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for match in CITE.finditer(line):
                where = f"{path.relative_to(REPO)}:{line_no}"
                if match["section"] and not match[0].startswith("docs/"):
                    bad.append(f"{where}: bare {match[0]!r} (cite docs/FORMATS.md §N)")
                elif match["section"] and match["section"] not in sections:
                    bad.append(f"{where}: no section §{match['section']} in docs/FORMATS.md")
    assert not bad, "\n".join(bad)


def test_help_links_the_formats_document() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "docs/FORMATS.md" in result.output
