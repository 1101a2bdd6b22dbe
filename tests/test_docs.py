"""docs/FORMATS.md: every `docs/FORMATS.md §N` cited in code, tests, messages and README exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["docs", *args])
    return result.exit_code, result.output


def test_docs_prints_the_cited_section() -> None:
    """`loratools docs 5.6` is §5.6 of docs/FORMATS.md, heading to the next heading at its level."""
    text = (REPO / "docs" / "FORMATS.md").read_text()
    start = text.index("### 5.6 ")
    end = text.index("\n## ", start)  # §5.6 is the last subsection of §5
    code, out = _run("5.6")
    assert code == 0 and out == text[start:end].rstrip() + "\n"
    code, out = _run("§1.3")
    assert code == 0 and out.startswith("### 1.3 Scale") and "### 1.4" not in out


def test_docs_whole_document_list_and_json() -> None:
    code, out = _run()
    assert code == 0 and out == (REPO / "docs" / "FORMATS.md").read_text()
    code, out = _run("--list")
    assert code == 0 and "§5.6" in out and "FORMATS" in out.splitlines()[0]
    code, out = _run("--list", "--json")
    listed = json.loads(out)
    assert {s["number"] for s in listed["sections"]} == _sections()
    assert set(listed["docs"]) == {p.stem for p in (REPO / "docs").glob("*.md")}
    code, out = _run("--doc", "check", "--json")
    assert code == 0 and json.loads(out)["text"] == (REPO / "docs" / "CHECK.md").read_text()


@pytest.mark.parametrize(("args", "message"), [(["9.9"], "no section §9.9"), (["--doc", "NOPE"], "no document 'NOPE'")])
def test_docs_unknown_is_one_line(args: list[str], message: str) -> None:
    code, out = _run(*args)
    assert code != 0 and message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_packages_listed_in_pyproject_are_the_package_folders() -> None:
    """The explicit list (needed to map loratools.docs onto docs/) misses no package folder."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(d.relative_to(REPO).parts)
        for d in [REPO / "loratools", *(REPO / "loratools").rglob("*")]
        if d.is_dir() and any(d.glob("*.py"))
    }
    assert set(config["packages"]) == on_disk | {"loratools.docs"}
    assert config["package-dir"] == {"loratools.docs": "docs"}
    assert config["package-data"] == {"loratools.docs": ["*.md"]}


def test_wheel_carries_the_documents(tmp_path: Path) -> None:
    """What `pip install loratools` gets: every docs/*.md inside the package, found by `loratools docs`."""
    pytest.importorskip("setuptools")
    import shutil
    import subprocess
    import sys
    import zipfile

    tree = tmp_path / "src"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".*cache"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(tree),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("loratools-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"loratools/docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shown = subprocess.run(
        [sys.executable, "-c", "from loratools.report.docs import docs_folder; print(docs_folder())"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": ""},
        cwd=tmp_path,  # not the checkout: python -c puts the working folder first on sys.path
        timeout=120,
    )
    assert shown.stdout.strip() == str(site / "loratools" / "docs"), shown.stderr
