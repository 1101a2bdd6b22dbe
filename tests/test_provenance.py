"""Provenance (issue 14, item 6): a merged checkpoint records its base and LoRAs with their options,
SHA-256 / AutoV2 and the loratools version; the hashes equal ``hashlib`` of the inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools import __version__
from loratools.formats.io import save_lora
from loratools.io.safetensors import read_header, tensor_bytes
from loratools.ops.hashes import file_hashes
from loratools.ops.merge import merge
from loratools.ops.provenance import FOLDER_FILE, KEY
from loratools.synthetic import TINY, make_lora


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_single_file_merge_records_inputs(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    base = tiny_checkpoints[("sd1", "single")]
    lora = save_lora(make_lora(TINY["sd1"]), tmp_path / "style.safetensors", "kohya")
    merge(base, [f"{lora}:unet=0.5,te=0.25"], tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta[KEY])
    assert record["version"] == __version__ and record["operation"] == "merge"
    assert record["base"]["sha256"] == _sha(base) and record["base"]["autov2"] == _sha(base)[:10]
    (entry,) = record["loras"]
    assert entry["sha256"] == _sha(lora) and entry["autov2"] == _sha(lora)[:10]
    assert (entry["unet"], entry["text"]) == (0.5, 0.25)


def test_folder_merge_records_every_weight_file(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    base = tiny_checkpoints[("sd1", "diffusers")]
    lora = save_lora(make_lora(TINY["sd1"]), tmp_path / "style.safetensors", "kohya")
    merge(base, [lora], tmp_path / "out")
    record = json.loads((tmp_path / "out" / FOLDER_FILE).read_text())
    files = record["base"]["files"]
    assert files["unet/diffusion_pytorch_model.safetensors"]["sha256"] == _sha(
        base / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert set(files) == {p.relative_to(base).as_posix() for p in base.rglob("*.safetensors")}
    assert record["loras"][0]["sha256"] == _sha(lora)


def _data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


@pytest.mark.parametrize(
    ("metadata", "dtype"),
    [
        ({"modelspec.title": "My Model", "modelspec.hash_sha256": "0xstale"}, None),
        ({"modelspec.title": "My Model"}, "fp16"),
        ({"other": "x"}, None),
    ],
)
def test_modelspec_hash_is_of_the_new_weights(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, metadata: dict[str, str], dtype: str | None
) -> None:
    base = tmp_path / "base.safetensors"
    save_file(load_file(str(tiny_checkpoints[("sd1", "single")])), str(base), metadata=metadata)
    lora = save_lora(make_lora(TINY["sd1"]), tmp_path / "style.safetensors", "kohya")
    out = tmp_path / "out.safetensors"
    merge(base, [lora], out, dtype=dtype)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        stored = b"".join(tensor_bytes(f.get_tensor(k)) for k in read_header(out).tensors)  # file order
    if "modelspec.title" not in metadata:
        assert "modelspec.hash_sha256" not in meta
        return
    assert meta["modelspec.title"] == "My Model"
    expected = "0x" + hashlib.sha256(_data_section(out)).hexdigest()
    assert meta["modelspec.hash_sha256"] == expected == "0x" + hashlib.sha256(stored).hexdigest()
    assert file_hashes(out).addnet == expected[2:]  # the data-section hash kohya calls sshs_model_hash
