"""What a header-only ``inspect`` of a safetensors LoRA imports (issue 18 item 4): never the
pickle opcode reader, which only a pickle that is actually opened needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from loratools.families import FAMILIES
from loratools.formats.io import save_lora
from loratools.synthetic import make_lora

# Runs inspect in-process, then names the modules from NOT_IMPORTED that it imported.
_PROBE = """
import sys
from loratools.cli.main import cli
try:
    cli(["inspect", *sys.argv[2:], sys.argv[1]], prog_name="loratools", standalone_mode=False)
finally:
    sys.stdout.flush()
    print("IMPORTED:" + ",".join(m for m in {names} if m in sys.modules), file=sys.stderr)
"""
NOT_IMPORTED = ("loratools.io.pickle", "pickletools")


@pytest.mark.parametrize("flags", [[], ["--json"]], ids=["human", "json"])
def test_header_only_inspect_skips_pickle_reader(tmp_path: Path, flags: list[str]) -> None:
    path = save_lora(make_lora(FAMILIES["sd1"], rank=2), tmp_path / "x.safetensors", "kohya")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = _PROBE.format(names=NOT_IMPORTED)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path), *flags], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    imported = done.stderr.rsplit("IMPORTED:", 1)[1].strip()
    assert imported == "", f"header-only inspect imported {imported}"
