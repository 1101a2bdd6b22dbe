"""A LoRA made by rescale, resize or extract records what it was made from (issue 14 item 6):
each input with its SHA-256 (checked against hashlib), the options, and the record the input
itself carried; inspect shows it. A lossless convert adds nothing and keeps what was there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.formats.io import load_lora, save_lora
from loratools.ops.convert import convert_lora
from loratools.ops.extract import extract
from loratools.ops.provenance import KEY
from loratools.ops.rescale import rescale
from loratools.ops.resize import resize
from loratools.report.lora import inspect_lora
from loratools.synthetic import TINY, make_lora, write_checkpoint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(path: Path) -> dict[str, object]:
    return json.loads(load_lora(path, TINY["sd1"]).metadata[KEY])


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return save_lora(make_lora(TINY["sd1"], rank=4), tmp_path / "in.safetensors", "kohya")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_rescale_records_its_input_and_the_chain(lora: Path, tmp_path: Path, fmt: str) -> None:
    once = tmp_path / "once.safetensors"
    rescale(lora, once, 0.5, to=fmt)
    record = _record(once)
    assert record["operation"] == "rescale" and record["options"] == {"by": 0.5}
    assert record["inputs"] == [
        {"role": "input", "name": lora.name, "sha256": _sha256(lora), "autov2": _sha256(lora)[:10]}
    ]
    twice = tmp_path / "twice.safetensors"
    rescale(once, twice, 2.0)
    chained = _record(twice)
    assert chained["inputs"][0]["sha256"] == _sha256(once)  # type: ignore[index]
    assert chained["previous"] == record
    assert inspect_lora(twice).provenance == chained


def test_extract_records_base_and_tuned(tmp_path: Path) -> None:
    base = write_checkpoint(TINY["sd1"], tmp_path / "base.safetensors", "single", seed=0)
    tuned = write_checkpoint(TINY["sd1"], tmp_path / "tuned.safetensors", "single", seed=1)
    out = tmp_path / "x.safetensors"
    extract(base, tuned, out, rank=2)
    record = _record(out)
    assert record["operation"] == "extract" and record["options"] == {"rule": "rank 2"}
    assert [(i["role"], i["sha256"]) for i in record["inputs"]] == [  # type: ignore[union-attr]
        ("base", _sha256(base)),
        ("tuned", _sha256(tuned)),
    ]


def test_convert_adds_no_record_and_keeps_the_one_there(lora: Path, tmp_path: Path) -> None:
    rescaled = tmp_path / "r.safetensors"
    rescale(lora, rescaled, 0.5)
    converted = tmp_path / "c.safetensors"
    convert_lora(rescaled, converted, "diffusers")
    assert _record(converted) == _record(rescaled)
    plain = tmp_path / "p.safetensors"
    convert_lora(lora, plain, "diffusers")
    assert KEY not in load_lora(plain, TINY["sd1"]).metadata


def test_inspect_shows_the_record(lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    rescale(lora, out, 0.5)
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "provenance: rescale by loratools" in text and f"input {lora.name} AutoV2 {_sha256(lora)[:10]}" in text
    assert "options by=0.5" in text


@pytest.mark.parametrize("to", [None, "diffusers"], ids=["numpy-path", "torch-path"])
def test_resize_records_on_both_paths(lora: Path, tmp_path: Path, to: str | None) -> None:
    """kohya → kohya resizes on numpy, → diffusers on torch: the record is the same on both."""
    out = tmp_path / "r.safetensors"
    resize(lora, out, rank=2, to=to)
    record = _record(out)
    assert record["operation"] == "resize" and record["options"] == {"rule": "rank 2"}
    assert record["inputs"][0]["sha256"] == _sha256(lora)  # type: ignore[index]


def test_resize_keeps_torch_out_and_still_records(lora: Path, tmp_path: Path) -> None:
    """The provenance record costs the numpy path no torch import."""
    import subprocess
    import sys

    out = tmp_path / "r.safetensors"
    code = (
        "import sys; from loratools.ops.resize import resize\n"
        f"resize({str(lora)!r}, {str(out)!r}, rank=2)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "NO-TORCH"
    assert _record(out)["operation"] == "resize"
