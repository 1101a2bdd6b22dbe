"""Nothing lost (issue 14): a same-layout merge / unmerge / dtype convert gives the base back whole.

Every family × layout variant (single file; diffusers folder with and without the ``text_model.``
text-encoder spelling; sharded U-Net) × {merge, unmerge, convert --dtype}: the same files, every
tensor under its own name in its own order, unknown tensors (one in the VAE, a ``model_ema.*``)
carried, untouched tensors and every non-weight file byte-identical. Compared with the
``safetensors`` library and raw bytes, not with loratools.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAMILY_NAMES
from helpers_preserve import EMA_EXTRA, LAYOUT_VARIANTS, VAE_EXTRA, compare, make_variant

from loratools.formats.io import save_lora
from loratools.ops.checkpoint import convert_checkpoint
from loratools.ops.merge import merge, unmerge
from loratools.synthetic import TINY, make_lora


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("variants")
    return {(f, v): make_variant(TINY[f], root, v) for f in FAMILY_NAMES for v in LAYOUT_VARIANTS}


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {f: save_lora(make_lora(TINY[f], conv=True), root / f"{f}.safetensors", "kohya") for f in FAMILY_NAMES}


def _out(tmp_path: Path, base: Path) -> Path:
    return tmp_path / ("out.safetensors" if base.is_file() else "out")


@pytest.mark.parametrize("variant", LAYOUT_VARIANTS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("operation", ["merge", "unmerge"])
def test_same_layout_merge_keeps_the_base_whole(
    variants: dict[tuple[str, str], Path],
    loras: dict[str, Path],
    tmp_path: Path,
    family: str,
    variant: str,
    operation: str,
) -> None:
    base = variants[(family, variant)]
    out = _out(tmp_path, base)
    run = merge if operation == "merge" else unmerge
    report = run(base, [f"{loras[family]}:0.5"], out)
    assert not report.dropped and not report.missing and not report.not_carried
    changed = compare(base, out)
    assert changed, "nothing was patched"
    # only tensors the LoRA targets change; unknown ones are copied byte for byte
    assert not any(VAE_EXTRA in c or EMA_EXTRA in c or "nin_shortcut" in c for c in changed)
    assert any("text" in c or "cond_stage" in c or "conditioner" in c for c in changed)
    assert all(c.endswith("weight") for c in changed)  # ".weight", or OpenCLIP's fused "in_proj_weight"
    assert sum(report.patched.values()) >= len(changed)  # a fused q/k/v tensor counts its three parts


@pytest.mark.parametrize("variant", LAYOUT_VARIANTS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dtype_convert_keeps_names_order_and_files(
    variants: dict[tuple[str, str], Path], tmp_path: Path, family: str, variant: str
) -> None:
    base = variants[(family, variant)]
    out = _out(tmp_path, base)
    report = convert_checkpoint(base, out, dtype="fp16")
    assert not report.dropped and not report.missing
    assert compare(base, out, dtype="float16") == set()  # values are the casts of the base's


def test_repro_from_the_issue(variants: dict[tuple[str, str], Path], loras: dict[str, Path], tmp_path: Path) -> None:
    """A text encoder without ``text_model.`` and a VAE conv_shortcut: neither renamed nor dropped."""
    from safetensors import safe_open

    base = variants[("sd1", "diffusers-no-text-model")]
    merge(base, [loras["sd1"]], tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("text_model.") for k in keys)
    with safe_open(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        vae_keys = set(f.keys())
    assert {f"{VAE_EXTRA}.weight", f"{VAE_EXTRA}.bias"} <= vae_keys


def test_merge_leaves_out_unread_variants_and_says_why(
    variants: dict[tuple[str, str], Path], loras: dict[str, Path], tmp_path: Path
) -> None:
    """An fp16 variant beside the weights read would keep the unpatched values: listed, not copied."""
    import shutil

    base = shutil.copytree(variants[("sd1", "diffusers")], tmp_path / "base")
    shutil.copy2(
        base / "vae" / "diffusion_pytorch_model.safetensors", base / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    )
    report = merge(base, [loras["sd1"]], tmp_path / "out")
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in report.not_carried
    assert not (tmp_path / "out" / "vae" / "diffusion_pytorch_model.fp16.safetensors").exists()
    convert_checkpoint(base, tmp_path / "copy")  # a plain copy has nothing to leave out
    assert (tmp_path / "copy" / "vae" / "diffusion_pytorch_model.fp16.safetensors").exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merged_folder_loads_as_a_pipeline(
    variants: dict[tuple[str, str], Path], loras: dict[str, Path], tmp_path: Path, family: str
) -> None:
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    base = variants[(family, "diffusers")]
    merge(base, [loras[family]], tmp_path / "out")
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert pipe.tokenizer("a a").input_ids == [0, 2, 2, 1]  # <start> a a <end> (no merges: one-letter words)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
