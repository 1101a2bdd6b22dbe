"""``convert --for TARGET`` says what reading, re-factorizing and writing said: embeddings moved
beside the LoRA, a full module's ``diff_b`` dropped by ``--to-lora``. They reach the FixReport
(``--json``) and the terminal; they were swallowed (check/fix.py kept no warnings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers_flux import flux_lora_dialect

from loratools.check.fix import convert_for
from loratools.cli.main import cli
from loratools.formats.adapters import Full, LowRank
from loratools.formats.io import save_lora
from loratools.io.safetensors import save_tensors
from loratools.synthetic import TINY, TINY_FLUX, make_lora

FULL_MODULES = 7  # more than a warning names (5), so "and 2 more"
# OneTrainer's FLUX.1 bundle keys (modules/modelSaver/flux/FluxLoRASaver.py, _get_state_dict)
EMBEDDINGS = {"bundle_emb.tok.clip_l": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}


def _full_lora(path: Path) -> list[str]:
    """An SD 1.x kohya-named LyCORIS file whose first FULL_MODULES linear modules are full diffs
    with a diff_b; returns those modules."""
    lora = make_lora(TINY["sd1"], rank=2, seed=4)
    adapters = dict(lora.adapters)
    g = torch.Generator().manual_seed(5)
    full = []
    for module, adapter in lora.adapters.items():
        if len(full) == FULL_MODULES:
            break
        assert isinstance(adapter, LowRank)
        if len(adapter.delta_shape()) != 2:  # linear modules only
            continue
        out, inp = adapter.delta_shape()
        adapters[module] = Full(torch.randn(out, inp, generator=g), torch.randn(out, generator=g))
        full.append(module)
    save_lora(lora.with_adapters(adapters), path, "kohya")
    return full


def _flux_with_embeddings(path: Path) -> None:
    save_tensors(path, {**flux_lora_dialect(TINY_FLUX["dev"], "kohya"), **EMBEDDINGS}, {})


def test_fix_report_names_the_dropped_diff_b(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    full = _full_lora(src)
    report = convert_for(src, tmp_path / "out.safetensors", "diffusers", family=TINY["sd1"], to_lora=True, rank=2)
    dropped = [w for w in report.warnings if "diff_b" in w]
    assert len(dropped) == 1 and dropped[0].startswith(f"{FULL_MODULES} full modules")
    named = [m for m in full if m + "," in dropped[0] or m + " and" in dropped[0]]
    assert len(named) == 5 and "and 2 more" in dropped[0]


def test_fix_report_says_where_the_embeddings_went(tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _flux_with_embeddings(src)
    report = convert_for(src, out, "comfyui")
    assert (tmp_path / "out.embeddings.safetensors").exists()
    assert any("out.embeddings.safetensors" in w for w in report.warnings)


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("case", ["diff_b", "embeddings"])
def test_convert_for_prints_the_writer_s_warnings(case: str, as_json: bool, tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    if case == "diff_b":
        _full_lora(src)
        args = ["--for", "diffusers", "--to-lora", "--rank", "2"]
        said = f"{FULL_MODULES} full modules' diff_b (bias difference) dropped by --to-lora"
    else:
        _flux_with_embeddings(src)
        args = ["--for", "comfyui"]
        said = "written to out.embeddings.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(src), str(out), *args, *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    if as_json:
        assert any(said in w for w in json.loads(result.stdout)["warnings"])
    else:
        assert said in " ".join(result.output.split())
