"""A clone with nothing beside it: collection succeeds and real-file tests skip with a reason.

The repository is copied into a temporary folder (no ``../shared`` next to it, ``CI`` and
``LORATOOLS_REAL_LORAS`` unset) and pytest runs there in a subprocess: first ``--collect-only`` of
the whole suite, then two small files that mix real-file and synthetic tests. Running the whole
suite there would take as long as the suite itself; collection proves every module imports and
every parametrization is built without the files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REAL_SKIP, REPO

CACHES = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache")


def _ignored(folder: str, names: list[str]) -> set[str]:
    """Caches, and the benchmark's generated data (gitignored, possibly GBs)."""
    skip = set(CACHES(folder, names))
    if Path(folder).resolve() == REPO / "bench":
        skip |= {"data", "out"} & set(names)
    return skip


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "loratools"
    shutil.copytree(REPO, root, ignore=_ignored)
    assert not (root.parent / "shared").exists()
    return root


def _pytest(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "LORATOOLS_REAL_LORAS", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(clone)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_collection_needs_nothing_beside_the_clone(clone: Path) -> None:
    done = _pytest(clone, "--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("\n")[-2], done.stdout[-2000:]


def test_real_file_tests_skip_with_the_reason(clone: Path) -> None:
    done = _pytest(clone, "tests/test_hashes.py", "tests/test_lycoris.py", "-rs")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(REAL_SKIP in line and "LORATOOLS_REAL_LORAS" in line for line in skips), skips
    assert " passed" in done.stdout


def test_ci_refuses_the_same_skips(clone: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_hashes.py", "-k", "real_lokr"],
        cwd=clone, capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "LORATOOLS_REAL_LORAS"}, "CI": "true", "PYTHONPATH": str(clone)},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:]
    assert "CI=true but a real-file test skipped" in done.stdout
