"""Files that look like LoRAs but are not get a one-line verdict; A1111 bundles read as LoRA +
embeddings; a plain folder is inspected row by row (issue 13, items 3–5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from safetensors import safe_open
from safetensors.torch import save_file

from loratools.errors import InputError
from loratools.formats.io import load_lora, save_lora
from loratools.report import inspect_lora
from loratools.synthetic import TINY, make_lora

LFS = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 185968776\n"
)


def run(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "COLUMNS": "1000", "PATH": "/usr/bin:/bin"},
    )
    return done.returncode, done.stdout, done.stderr


def test_git_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    path.write_text(LFS)
    want = "a Git LFS pointer to a 185,968,776-byte file, not the weights: fetch it with `git lfs pull`"
    for call in (lambda: load_lora(path), lambda: inspect_lora(path)):
        with pytest.raises(InputError, match="Git LFS pointer") as info:
            call()
        assert want in str(info.value)
    code, _, err = run("inspect", str(path))
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "tensors", "family", "vectors", "width"),
    [
        ("a1111.pt", {"string_to_param": {"*": torch.randn(4, 768)}, "name": "cat", "step": 9}, "sd1", 4, 768),
        ("diffusers.safetensors", {"<cat-toy>": torch.randn(768)}, "sd1", 1, 768),
        ("sdxl.safetensors", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, "sdxl", 2, 768),
        (
            "pivotal.pti",
            {"text_encoders_0": torch.randn(2, 768), "text_encoders_1": torch.randn(2, 1280)},
            "sdxl",
            2,
            768,
        ),
    ],
)
def test_textual_inversion_layouts(
    tmp_path: Path, name: str, tensors: dict[str, object], family: str, vectors: int, width: int
) -> None:
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))  # type: ignore[arg-type]
    report = inspect_lora(path)
    assert report.format == "textual-inversion" and report.family == family and report.modules == 0
    first = min(report.embedding_facts, key=lambda e: e.width)  # CLIP-L's, where there are two
    assert (first.vectors, first.width) == (vectors, width)
    code, out, _ = run("inspect", str(tmp_path))
    assert code == 0 and f"{vectors}×{width}" in out


def test_checkpoint_vae_and_swapped_arguments(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 4, 3, 3)}, str(ckpt))
    with pytest.raises(InputError, match=r"a full Stable Diffusion checkpoint.*not a LoRA") as info:
        load_lora(ckpt)
    assert "swap the arguments" in (info.value.hint or "")
    vae = tmp_path / "vae.safetensors"
    save_file(
        {"encoder.conv_in.weight": torch.ones(8, 3, 3, 3), "decoder.conv_out.weight": torch.ones(3, 8, 3, 3)}, str(vae)
    )
    for call in (lambda: load_lora(vae), lambda: inspect_lora(vae)):
        with pytest.raises(InputError, match="a VAE only"):
            call()
    lora = save_lora(make_lora(TINY["sd1"], rank=1, text=False), tmp_path / "l.safetensors", "kohya")
    code, _, err = run("merge", str(lora), str(ckpt), "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and "this is a LoRA, not a checkpoint; did you swap the arguments?" in err


def test_a1111_bundled_embeddings(tmp_path: Path) -> None:
    """kohya keys + bundle_emb.<token>.string_to_param.*: read as LoRA + embeddings, written back so."""
    lora = make_lora(TINY["sd1"], rank=2, text=False)
    path = save_lora(lora, tmp_path / "k.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    tensors["bundle_emb.mytoken.string_to_param.*"] = torch.randn(3, 12)
    bundled = tmp_path / "bundle.safetensors"
    save_file(tensors, str(bundled), meta)
    read = load_lora(bundled)
    assert len(read.adapters) == len(lora.adapters) and list(read.embeddings) == [
        "bundle_emb.mytoken.string_to_param.*"
    ]
    assert inspect_lora(bundled).embeddings == ["bundle_emb.mytoken.string_to_param.*"]
    # the kohya writer writes embeddings in the bundle form, whatever layout they came in
    read.embeddings["<other>"] = torch.randn(12)
    out = save_lora(read, tmp_path / "out.safetensors", "kohya")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {"bundle_emb.mytoken.string_to_param.*", "bundle_emb.other.string_to_param.*"} <= keys


def test_folder_row_by_row(tmp_path: Path) -> None:
    """kohya files, a peft adapter folder and an LFS pointer in one plain folder: a row each."""
    for i in range(2):
        save_lora(make_lora(TINY["sd1"], rank=1, text=False, seed=i), tmp_path / f"k{i}.safetensors", "kohya")
    save_lora(make_lora(TINY["sd2"], rank=1, text=False), tmp_path / "adapter", "peft")
    (tmp_path / "pointer.safetensors").write_text(LFS)
    (tmp_path / "notes.txt").write_text("hello")
    code, out, _ = run("inspect", str(tmp_path))
    rows = [line for line in out.splitlines() if line and not line.startswith(" ")]
    names = [row.split()[0].rstrip(":") for row in rows]
    assert names == ["adapter", "k0.safetensors", "k1.safetensors", "notes.txt", "pointer.safetensors"], out
    assert code == 2 and "Git LFS pointer" in rows[4] and "skipped" in rows[3]
    assert "SD 2.x LoRA" in rows[0] and "SD 1.x LoRA" in rows[1]
    code, out, _ = run("inspect", "--json", str(tmp_path))
    assert [Path(r["path"]).name for r in json.loads(out)] == ["adapter", "k0.safetensors", "k1.safetensors"]
