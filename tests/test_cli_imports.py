"""What a single-file command loads: no batch machinery, no progress bars or rich tables when piped.

Checked in a fresh interpreter (``sys.modules`` after the command ran through the real entry
point), since these modules cost start-up time on every run (issue 18 items 3–4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
