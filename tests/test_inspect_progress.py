"""inspect --hashes/--norms report progress with a total (issue 15 §6): the total is announced
before the first advance and the advances sum to it (bytes for hashes, modules for norms)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ProgressRecorder

from loratools.formats.io import load_lora, save_lora
from loratools.report import inspect_lora
from loratools.synthetic import TINY, make_lora


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("what", ["hashes", "norms"])
def test_progress_total_equals_the_work(tmp_path: Path, fmt: str, what: str) -> None:
    path = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "a.safetensors", fmt)
    meter = ProgressRecorder()
    inspect_lora(path, hashes=what == "hashes", norms=what == "norms", progress=meter)
    # oracle: the file size from the OS, the module count from the full reader
    expected = path.stat().st_size if what == "hashes" else len(load_lora(path).adapters)
    assert meter.phases == [[expected, expected]]
