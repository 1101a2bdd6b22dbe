"""Merged outputs are byte-for-byte what they were before the merge engine was sped up.

The oracle is hashlib over the files loratools wrote at commit 5770702 (before the rounding-loss
measurement was fused into the rounding pass and torch's import moved off the critical path), for
the same seeded tiny fixtures: fp16, bf16 and fp8 bases, the coarse ones measured for rounding
loss. Only the tensor header and data are hashed — the metadata carries temporary paths.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect

from loratools.io.safetensors import save_tensors
from loratools.ops.merge import merge
from loratools.synthetic import TINY, TINY_FLUX, make_lora, write_checkpoint, write_single_file

# fixture → sha256 of (tensor header without __metadata__, data section), from commit 5770702
EXPECTED = {
    "flux bf16": "6e7de6480387ac707ebe2ebfabe524b825a56a4715ce32403c1f38686ff4a60c",
    "flux fp16": "b07b984831b8c0e57ba14bf2cd450b7d8a7690e8932a923bc21797160c651732",
    "flux fp8": "9d7dbd55741c35ca783ff2366b71ce6915f4db0ba976326afbb73c91b0baf4cc",
    "flux fp8 weak": "42f173fb6b17c93b65523af5448deba277efd968824290fb03b3acd3d839a7ef",
    "sd1 fp16": "cdcb81c744375c68d652db699504510d9f7d651514df087c793ca7f54337c7ab",
    "sd1 bf16 out": "7f2d097f0facf275ac039cd24945049c8be695603442e9c1408820bb6fa62861",
}


def tensor_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensor entries (sorted JSON, metadata dropped) and its data."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    header.pop("__metadata__", None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(blob[8 + size :])
    return digest.hexdigest()


def _merged(case: str, root: Path) -> Path:
    out = root / "m.safetensors"
    if case.startswith("flux"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[case.split()[1]]
        base = write_single_file(
            TINY_FLUX["dev"], root / "b.safetensors", dtype=dtype, components=("transformer",), bare=True
        )
        lora = root / "l.safetensors"
        save_tensors(lora, flux_lora_dialect(TINY_FLUX["dev"], "kohya", seed=5), {})
        merge(base, [f"{lora}:0.05" if case.endswith("weak") else lora], out)
        return out
    base = write_checkpoint(TINY["sd1"], root / "b.safetensors", "single", dtype=torch.float16)
    merge(
        base, [make_lora(TINY["sd1"], rank=4, conv=True, seed=2)], out, dtype="bf16" if case.endswith("out") else None
    )
    return out


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_merged_bytes_are_unchanged(case: str, tmp_path: Path) -> None:
    assert tensor_digest(_merged(case, tmp_path)) == EXPECTED[case]


@pytest.mark.parametrize("case", ["flux bf16", "flux fp8"])
def test_cli_merge_writes_the_same_bytes(case: str, tmp_path: Path) -> None:
    """The command line (torch imported in a thread while the base header is read) writes the same file."""
    from click.testing import CliRunner

    from loratools.cli.main import cli

    api = _merged(case, tmp_path)
    out = tmp_path / "cli.safetensors"
    done = CliRunner().invoke(
        cli, ["merge", str(tmp_path / "b.safetensors"), str(tmp_path / "l.safetensors"), "-o", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert tensor_digest(out) == tensor_digest(api) == EXPECTED[case]


@pytest.mark.parametrize("modelspec", [False, True], ids=["plain", "modelspec"])
def test_base_hash_filled_in_after_streaming(modelspec: bool, tmp_path: Path) -> None:
    """The base's SHA-256, hashed beside the write, lands in the header and in the report (hashlib)."""
    from safetensors import safe_open

    from loratools.ops.provenance import KEY

    metadata = {"modelspec.title": "t"} if modelspec else None
    base = write_checkpoint(TINY["sd1"], tmp_path / "b.safetensors", "single", dtype=torch.float16, metadata=metadata)
    out = tmp_path / "m.safetensors"
    report = merge(base, [make_lora(TINY["sd1"], rank=4, seed=2)], out)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta[KEY])
    assert record["base"] == {"name": base.name, "sha256": digest, "autov2": digest[:10]}
    assert report.provenance == record
    if modelspec:
        blob = out.read_bytes()
        (size,) = struct.unpack("<Q", blob[:8])
        assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(blob[8 + size :]).hexdigest()
