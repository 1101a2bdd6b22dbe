"""--hashes: every value recomputed here with hashlib over the byte ranges of docs/FORMATS.md §6."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from helpers import REAL_LORAS, needs_real

from loratools.cli.main import cli
from loratools.ops.hashes import file_hashes
from loratools.report import inspect_checkpoint, inspect_lora


def independent(path: Path) -> dict[str, str]:
    """AutoV2, legacy and addnet from the raw bytes, the way A1111 and kohya compute them."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    n = struct.unpack("<Q", data[:8])[0]
    return {
        "sha256": sha,
        "autov2": sha[:10],
        "legacy": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
        "addnet": hashlib.sha256(data[8 + n :]).hexdigest(),
    }


@needs_real("lycoris_lokr")
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_real_lokr_hashes_and_stored_sshs(rank: int) -> None:
    path = REAL_LORAS / "lycoris_lokr" / f"smart_falcon_{rank}_lokr.safetensors"
    h = file_hashes(path)
    expected = independent(path)
    assert (h.sha256, h.autov2, h.legacy, h.addnet) == (
        expected["sha256"],
        expected["autov2"],
        expected["legacy"],
        expected["addnet"],
    )
    assert h.addnet_short == expected["addnet"][:12]
    checks = {c.key: c for c in h.checks}
    assert checks["sshs_model_hash"].ok is True  # LyCORIS stored the addnet hash of these very tensors
    assert checks["sshs_legacy_hash"].ok is True
    if rank == 4:  # 648 KB: the 1 MiB window is empty (docs/FORMATS.md §6.1)
        assert h.legacy == "e3b0c442" and checks["sshs_legacy_hash"].computed == "e3b0c442"
    elif rank == 8:  # written by a safetensors that did not pad headers to 8 bytes
        assert "unpadded" in checks["sshs_legacy_hash"].note


def test_sshs_of_a_kohya_style_save(tmp_path: Path) -> None:
    """sd-scripts hashes an in-memory save with only ss_* metadata, then saves with more keys."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"lora_unet_x{i}.lora_down.weight": torch.randn(64, 320, generator=g).half() for i in range(40)}
    ss = {"ss_network_module": "networks.lora", "ss_network_dim": "64", "ss_tag_frequency": json.dumps({"a": {"é": 1}})}
    in_memory = safetensors.torch.save(tensors, metadata=ss)
    n = struct.unpack("<Q", in_memory[:8])[0]
    model_hash = hashlib.sha256(in_memory[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(in_memory[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    metadata = {**ss, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, "modelspec.title": "x" * 300}
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    h = file_hashes(path)
    assert h.legacy != legacy_hash  # the file's own header is longer: its legacy hash differs
    assert [(c.key, c.ok) for c in h.checks] == [("sshs_model_hash", True), ("sshs_legacy_hash", True)]
    assert h.checks[1].note.startswith("matches")
    # tensors changed after the hash was stored: both checks say so
    for tensor in tensors.values():
        tensor += 1
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    assert [c.ok for c in file_hashes(path).checks] == [False, False]


def test_small_and_pickled_files(tmp_path: Path) -> None:
    small = tmp_path / "s.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(3)}, str(small))
    h = file_hashes(small)
    assert h.legacy == "e3b0c442" and h.addnet == independent(small)["addnet"] and h.checks == []
    pickled = tmp_path / "p.pt"
    torch.save({"a": torch.arange(300000.0)}, pickled)
    h = file_hashes(pickled)
    data = pickled.read_bytes()
    assert h.addnet is None and h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@needs_real("lycoris_lokr")
def test_hashes_in_reports_and_cli(tmp_path: Path, tiny_checkpoints: dict) -> None:
    path = REAL_LORAS / "lycoris_lokr" / "smart_falcon_16_lokr.safetensors"
    report = inspect_lora(path, hashes=True)
    assert report.hashes is not None and report.hashes["addnet"] == independent(path)["addnet"]
    ckpt = tiny_checkpoints[("sd1", "diffusers")]
    report = inspect_checkpoint(ckpt, hashes=True)
    assert report.hashes is not None and len(report.hashes) == len(report.files)
    for entry, file in zip(report.hashes, report.files, strict=True):
        assert entry["sha256"] == independent(Path(file))["sha256"]
    result = CliRunner().invoke(cli, ["inspect", "--hashes", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    expected = independent(path)
    assert expected["autov2"] in result.stdout and expected["addnet"][:12] in result.stdout
    assert "stored sshs_model_hash" in result.stdout and "ok" in result.stdout
