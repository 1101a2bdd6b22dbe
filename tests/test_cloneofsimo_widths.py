"""``convert --to cloneofsimo`` of a LoRA at any width (issue 13 item 2).

A kohya LoRA made for the tiny fixture models (``loratools.synthetic.TINY``) reads as "SD 1.x
names; widths fit no full-size SD 1.x": writing it as cloneofsimo must take its shapes from its
own modules, never from the full-size tables. The oracle is the dense ΔW = (alpha / r)·up @ down
computed here from the raw factors of the input and of what is read back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli.main import cli
from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.families.spec import FamilySpec
from loratools.formats import cloneofsimo as c
from loratools.formats.adapters import LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.synthetic import TINY, make_lora

SPECS: dict[str, FamilySpec] = {"tiny-sd1": TINY["sd1"], "tiny-sd2": TINY["sd2"], "full-sd1": FAMILIES["sd1"]}
# lora_diffusion's targets (docs/FORMATS.md §3.2): attention q/k/v/out, GEGLU, CLIP self-attention
TARGET = re.compile(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.0\.proj|self_attn\.(q|k|v|out)_proj)$")


def _kohya_input(spec: FamilySpec, coverage: str, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A kohya file over lora_diffusion's targets (``partial``: every third module left out, so the
    writer pads) with per-module alphas, and its dense ΔW per module."""
    lora = make_lora(spec, rank=2, alphas="varied")
    kept = [m for m in lora.adapters if TARGET.search(m)]
    if coverage == "partial":
        kept = kept[::3]
    lora = lora.with_adapters({m: lora.adapters[m] for m in kept})
    path = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    return path, {m: _dense(a) for m, a in lora.adapters.items()}


def _dense(adapter: object) -> torch.Tensor:
    assert isinstance(adapter, LowRank)
    up, down = adapter.up.double(), adapter.down.double()
    return (adapter.alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


def _check(back: LoraFile, dense: dict[str, torch.Tensor], name: str) -> None:
    assert back.family is not None and back.family.name == SPECS[name].name
    # placed by full-size shapes, or by the family's structure at the LoRA's own widths
    assert back.verdict.fit == ("names" if name.startswith("tiny") else "shapes")
    assert set(back.adapters) == set(dense)
    for module, reference in dense.items():
        # baking rounds scale·up to float32 once: equal to within float32 resolution of the largest entry
        scale = float(reference.abs().max())
        torch.testing.assert_close(_dense(back.adapters[module]), reference, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("coverage", ["all", "partial"])
@pytest.mark.parametrize("name", list(SPECS))
def test_cli_convert_to_safeloras(name: str, coverage: str, tmp_path: Path) -> None:
    source, dense = _kohya_input(SPECS[name], coverage, tmp_path)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(source), str(out), "--to", "cloneofsimo", "--bake"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    back = load_lora(out)
    assert back.source_format == "cloneofsimo"
    _check(back, dense, name)


@pytest.mark.parametrize("coverage", ["all", "partial"])
@pytest.mark.parametrize("name", list(SPECS))
def test_pt_lists(name: str, coverage: str, tmp_path: Path) -> None:
    source, dense = _kohya_input(SPECS[name], coverage, tmp_path)
    lora = load_lora(source)
    unet = tmp_path / "out.pt"
    torch.save(c.pt_list(lora, "unet", bake=True), unet)
    torch.save(c.pt_list(lora, "te1", bake=True), c.companion_paths(unet)[0])
    _check(load_lora(unet, SPECS[name].name), dense, name)
    _check(load_lora(unet), dense, name)  # at tiny widths the companion tells SD 1.x from SD 2.x


def test_sdxl_is_refused_in_one_line(tmp_path: Path) -> None:
    """lora_diffusion predates SDXL: a tiny SDXL LoRA gets the same one-line refusal as a full one."""
    source, _ = _kohya_input(TINY["sdxl"], "all", tmp_path)
    with pytest.raises(InputError, match=r"SD 1\.x and SD 2\.x only"):
        c.safeloras_state_dict(load_lora(source), bake=True)
    result = CliRunner().invoke(
        cli, ["convert", str(source), str(tmp_path / "o.safetensors"), "--to", "cloneofsimo", "--bake"]
    )
    assert result.exit_code != 0 and "SD 1.x and SD 2.x only" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


@pytest.mark.parametrize("container", ["pt", "safeloras"])
def test_tiny_unet_alone_needs_family_to_be_named(container: str, tmp_path: Path) -> None:
    """SD 1.x and 2.x U-Nets share a structure: at tiny widths, U-Net pairs alone stay unplaced
    (read, not refused) unless --family names one; with it they read back by name."""
    source, dense = _kohya_input(TINY["sd1"], "all", tmp_path)
    lora = load_lora(source)
    unet_only = lora.with_adapters({m: a for m, a in lora.adapters.items() if m.startswith("unet.")})
    path = tmp_path / f"unet.{'pt' if container == 'pt' else 'safetensors'}"
    if container == "pt":
        torch.save(c.pt_list(unet_only, bake=True), path)
    else:
        save_lora(c.bake_scale(unet_only), path, "cloneofsimo")
    auto = load_lora(path)
    assert auto.family is None and len(auto.adapters) == len(unet_only.adapters)
    assert "unknown model" in auto.verdict.note
    named = load_lora(path, "sd1")
    _check(named, {m: d for m, d in dense.items() if m.startswith("unet.")}, "tiny-sd1")


def test_padding_width_nobody_shows_is_refused_in_one_line(tmp_path: Path) -> None:
    """A tiny LoRA of the first down block only: the padded deeper blocks' widths are unknown."""
    source, _ = _kohya_input(TINY["sd1"], "all", tmp_path)
    lora = load_lora(source)
    first = lora.with_adapters({m: a for m, a in lora.adapters.items() if m.startswith("unet.down_blocks.0.")})
    with pytest.raises(InputError, match="none of its modules shows that module's width"):
        c.pt_list(first, bake=True)
    path = save_lora(first, tmp_path / "first.safetensors", "kohya")
    result = CliRunner().invoke(
        cli, ["convert", str(path), str(tmp_path / "o.safetensors"), "--to", "cloneofsimo", "--bake"]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
