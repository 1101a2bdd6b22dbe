"""`inspect` shows provenance (issue 14, item 6): the record a merge wrote, read back from a single
file's ``__metadata__`` or a diffusers folder's ``loratools_provenance.json``, as a readable block and
in ``--json`` (valid against the published schema); the hashes equal ``hashlib`` of the inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from loratools import __version__
from loratools.cli.main import cli
from loratools.formats.io import save_lora
from loratools.ops.merge import merge
from loratools.report.checkpoint import inspect_checkpoint
from loratools.report.schema import INSPECT_CHECKPOINT
from loratools.synthetic import TINY, make_lora


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("layout", "out_name"), [("single", "out.safetensors"), ("diffusers", "out")])
def test_inspect_shows_merge_provenance(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, layout: str, out_name: str
) -> None:
    base = tiny_checkpoints[("sd1", layout)]
    lora = save_lora(make_lora(TINY["sd1"]), tmp_path / "style.safetensors", "kohya")
    out = tmp_path / out_name
    merge(base, [f"{lora}:unet=0.5,te=0.25"], out)

    record = inspect_checkpoint(out).provenance
    assert record is not None and record["operation"] == "merge" and record["version"] == __version__
    (entry,) = record["loras"]  # type: ignore[misc]
    assert entry["sha256"] == _sha(lora) and entry["autov2"] == _sha(lora)[:10]

    data = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(out)], catch_exceptions=False).output)
    jsonschema.validate(data, INSPECT_CHECKPOINT)
    assert data["provenance"]["loras"][0]["sha256"] == _sha(lora)

    text = CliRunner().invoke(cli, ["inspect", str(out)], env={"COLUMNS": "240"}, catch_exceptions=False).output
    assert f"provenance: merge by loratools {__version__}" in text
    assert "style.safetensors" in text and _sha(lora)[:10] in text and "unet=0.5" in text
    if layout == "single":
        assert f"AutoV2 {_sha(base)[:10]}" in text
    else:
        assert "weight files:" in text


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]"])
def test_unreadable_provenance_is_said(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, raw: str) -> None:
    from safetensors.torch import load_file, save_file

    base = tiny_checkpoints[("sd1", "single")]
    out = tmp_path / "odd.safetensors"
    save_file(load_file(str(base)), str(out), metadata={"loratools.provenance": raw})
    report = inspect_checkpoint(out)
    assert report.provenance is not None and "unreadable" in report.provenance
    jsonschema.validate(report.to_dict(), INSPECT_CHECKPOINT)
    text = CliRunner().invoke(cli, ["inspect", str(out)], env={"COLUMNS": "240"}, catch_exceptions=False).output
    assert "recorded but unreadable" in text
