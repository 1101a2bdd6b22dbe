"""FLUX.1 LoRAs no spec fits, kept by their XLabs / ``lycoris_`` stems: convert to kohya by a pure
rename, refusals that name the module, and rescale reports that say how the scale was carried.

ΔW is checked per file module against a float64 oracle from the raw tensors (helpers_flux).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_flux import flux_lora_dialect, raw_delta, raw_groups

from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.formats.io import load_lora
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.ops.convert import convert_lora
from loratools.ops.rescale import rescale
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]
XLABS_CHILD = {"qkv_lora1": "img_attn_qkv", "proj_lora1": "img_attn_proj"}
XLABS_CHILD |= {"qkv_lora2": "txt_attn_qkv", "proj_lora2": "txt_attn_proj"}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f}


def _kohya_stem(stem: str) -> str:
    """The expected kohya name, typed out from the two dialects' documented spellings."""
    if stem.startswith("lycoris_"):
        return "lora_transformer_" + stem.removeprefix("lycoris_")
    block, child = stem.split(".processor.")
    return f"lora_unet_{block.replace('.', '_')}_{XLABS_CHILD[child]}"


@pytest.mark.parametrize("dialect", ["lycoris-full", "xlabs"])
def test_convert_to_kohya_without_a_family_renames_exactly(dialect: str, tmp_path: Path) -> None:
    """convert_lora cleared ``source_keys`` and the verbatim writer then refused every format:
    a pure rename gives each file module its kohya name (sd-scripts' BFL name for XLabs,
    OneTrainer's ``lora_transformer_`` for lycoris_), ΔW bit-equal per module, read back."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = flux_lora_dialect(SPEC, dialect)
    save_tensors(src, tensors, {})
    report = convert_lora(src, out, "kohya")
    assert report.exact
    written = raw_groups(_read(out))
    source = raw_groups(tensors)
    assert set(written) == {_kohya_stem(s) for s in source}
    for stem, group in source.items():
        assert torch.equal(raw_delta(written[_kohya_stem(stem)]), raw_delta(group))
    back = load_lora(out)
    assert back.source_format == "kohya" and len(back.adapters) == len(source)


@pytest.mark.parametrize("dialect", ["lycoris-full", "xlabs"])
def test_convert_to_a_dotted_format_is_refused_naming_a_module(dialect: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    with pytest.raises(InputError, match=r"e\.g\. (double_blocks|lycoris_)|cannot hold .* \(e\.g\. lycoris_"):
        convert_lora(src, out, "diffusers")
    assert not out.exists()


def test_rescale_of_an_xlabs_file_says_the_factors_carry_the_scale(tmp_path: Path) -> None:
    """XLabs files have no alpha: the writer folds the scale into ``up``, and the report said
    "via alpha"."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = flux_lora_dialect(SPEC, "xlabs")
    save_tensors(src, tensors, {})
    report = rescale(src, out, -0.5)
    modules = len(raw_groups(tensors))
    assert report.representation == {"factor": modules}
    after = _read(out)
    assert not any(k.endswith(".alpha") for k in after)
    for stem, group in raw_groups(tensors).items():
        torch.testing.assert_close(raw_delta(raw_groups(after)[stem]), -0.5 * raw_delta(group), rtol=1e-6, atol=1e-7)
    result = CliRunner().invoke(cli, ["rescale", str(src), "--by", "2", "-o", str(tmp_path / "cli.safetensors")])
    assert result.exit_code == 0, result.output
    assert f"{modules} via factor" in result.output and "via alpha" not in result.output


@pytest.mark.parametrize("dialect", ["kohya", "lycoris-full"])
def test_rescale_of_files_with_alphas_still_says_alpha(dialect: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    report = rescale(src, out, 0.5)
    held = raw_groups(flux_lora_dialect(SPEC, dialect))
    if dialect == "kohya":
        assert report.representation == {"alpha": len(held)}
    else:  # full diffs have no alpha to carry a scale: "factor" by kind (formats/adapters.py)
        assert set(report.representation) == {"factor"}


def test_rescale_of_an_ai_toolkit_file_without_a_lora_config_says_factor(tmp_path: Path) -> None:
    """No alpha keys and no ``lora_adapter_metadata``: written back in its own keys the scale
    goes into ``up`` (formats/flux.py), and the report said "via alpha"."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = flux_lora_dialect(SPEC, "ai-toolkit")
    save_tensors(src, tensors, {})
    report = rescale(src, out, 0.5, family=SPEC)
    assert set(report.representation) == {"factor"}
    after = raw_groups(_read(out))
    assert list(_read(out)) == list(tensors)
    for stem, group in raw_groups(tensors).items():
        torch.testing.assert_close(raw_delta(after[stem]), 0.5 * raw_delta(group), rtol=1e-6, atol=1e-7)
