"""Dependencies are declared the way a library declares them: lower bounds, never an exact torch.

The resolver check builds loratools' metadata from a copy of pyproject.toml and asks pip, offline,
to install it beside a torch other than the one CI uses (a stub wheel ``torch 2.5.1`` in a local
``--find-links`` folder); the same copy with an exact pin must be refused, so the check can fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_dependency_has_a_lower_bound_and_torch_no_exact_pin() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    assert {_name(d) for d in deps} >= {"torch", "safetensors", "numpy", "rich", "click", "huggingface-hub"}
    for dep in deps:
        assert ">=" in dep, f"{dep!r}: a library declares a lower bound"
        assert "==" not in dep and "<" not in dep, f"{dep!r}: an exact pin or a cap forces its version on the user"
    (torch,) = [d for d in deps if _name(d) == "torch"]
    assert torch.replace(" ", "") == "torch>=2.1"


def _stub_torch(folder: Path, version: str) -> None:
    """A wheel that only claims to be torch ``version`` (the resolver reads nothing else)."""
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr("torch_stub_for_resolver/__init__.py", "")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def _resolve(project: Path, wheels: Path, *requirements: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheels),
         "--no-build-isolation", "--quiet", "--disable-pip-version-check", "--report", "-", str(project),
         *requirements],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_pip_keeps_another_torch(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # --no-build-isolation builds the metadata with the installed setuptools
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _stub_torch(wheels, "2.5.1")
    project = tmp_path / "project"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in config["packages"]:  # empty packages where pyproject says they are
        folder = project / config.get("package-dir", {}).get(package, package.replace(".", "/"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    shutil.copy(REPO / "README.md", project)
    shutil.copy(REPO / "pyproject.toml", project)

    done = _resolve(project, wheels, "torch==2.5.1")
    assert done.returncode == 0, done.stderr
    chosen = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(done.stdout)["install"]}
    assert chosen.get("torch") == "2.5.1", chosen

    text = (project / "pyproject.toml").read_text()
    (project / "pyproject.toml").write_text(re.sub(r'"torch[^"]*"', '"torch==2.13.0"', text, count=1))
    pinned = _resolve(project, wheels, "torch==2.5.1")
    assert pinned.returncode != 0 and "conflicting dependencies" in pinned.stderr, (
        "the control (an exact pin) should be refused"
    )
