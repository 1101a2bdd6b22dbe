"""What a single-file command loads: no batch machinery, no progress bars or rich tables when piped.

Checked in a fresh interpreter (``sys.modules`` after the command ran through the real entry
point), since these modules cost start-up time on every run (issue 18 items 3–4).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loratools
from loratools.formats.io import save_lora
from loratools.synthetic import TINY, make_lora

NOT_LOADED = ("loratools.batch", "multiprocessing", "rich.progress", "rich.table")
# What a local header-only inspect never needs: the Hub probe's network stack (io/hub.py imports it
# in reachable() only), the batch machinery, progress bars and rich tables (no table is printed).
INSPECT_NOT_LOADED = (
    "loratools.batch",
    "multiprocessing",
    "rich.progress",
    "rich.table",
    "urllib.request",
    "http.client",
)
SCRIPT = """
import json, sys
from loratools.cli.main import cli
try:
    cli(sys.argv[1:], prog_name="loratools")
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imports") / "r8.safetensors"
    return Path(save_lora(make_lora(TINY["sd1"], rank=8), path, "kohya"))


@pytest.mark.parametrize(
    ("command", "unused"),
    [
        (["resize", "{lora}", "--rank", "4", "-o", "{out}"], NOT_LOADED),
        (["resize", "{lora}", "--rank", "4", "-o", "{out}", "--json"], NOT_LOADED),
        (["inspect", "{lora}"], INSPECT_NOT_LOADED),
        (["inspect", "{lora}", "--json"], INSPECT_NOT_LOADED),
    ],
)
def test_single_file_command_skips(lora: Path, tmp_path: Path, command: list[str], unused: tuple[str, ...]) -> None:
    argv = [part.format(lora=lora, out=tmp_path / "out.safetensors") for part in command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stderr.strip().splitlines()[-1]))
    assert [m for m in unused if m in modules] == []


# What `import loratools.cli.main` (every command's first step) must not load: the package's public
# names are imported on first use (loratools/__init__.py, PEP 562), not by the package itself.
MAIN_NOT_LOADED = ("loratools.families", "loratools.io.checkpoint", "loratools.io", "loratools.formats", "torch")


@pytest.mark.parametrize("statement", ["import loratools.cli.main", "import loratools"])
def test_package_import_is_lazy(statement: str) -> None:
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [m for m in MAIN_NOT_LOADED if m in modules] == []


def init_tree() -> ast.Module:
    return ast.parse(Path(loratools.__file__).read_text())


def type_checking_imports() -> dict[str, str]:
    """Name → module of the ``if TYPE_CHECKING:`` imports in loratools/__init__.py (what mypy sees)."""
    block = next(n for n in init_tree().body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    found = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        found.update({alias.name: f"loratools.{node.module}" for alias in node.names})
    return found


def lazy_table() -> dict[str, str]:
    """The run-time name → module table of loratools/__init__.py, read from its source."""
    node = next(n for n in init_tree().body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "_LAZY")
    table = ast.literal_eval(node.value)
    assert isinstance(table, dict)
    return table


def test_lazy_names_match_what_mypy_sees() -> None:
    # The run-time table and the TYPE_CHECKING imports are two lists of the same names: a name in
    # one only would be invisible to mypy or missing at run time; every one of them is public.
    assert type_checking_imports() == lazy_table()
    assert set(lazy_table()) <= set(loratools.__all__)


@pytest.mark.parametrize("name", sorted(loratools.__all__))
def test_public_name_resolves(name: str) -> None:
    lazy = lazy_table()
    source = importlib.import_module(lazy[name]) if name in lazy else loratools
    assert getattr(loratools, name) is getattr(source, name)
    assert name in dir(loratools)


@pytest.mark.parametrize("name", ["families", "io", "ops", "report"])
def test_subpackage_attribute_still_reachable(name: str) -> None:
    # The package used to import these eagerly, so `loratools.families.…` worked after `import loratools`.
    assert getattr(loratools, name) is importlib.import_module(f"loratools.{name}")


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        loratools.no_such_name  # noqa: B018
