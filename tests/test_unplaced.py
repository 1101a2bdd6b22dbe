"""Modules a family cannot place are carried by surgery, never refused nor lost (issue 13).

A full-size SD 1.x LoRA (kohya or diffusers) gets one stray module: a name no SD 1.x table knows,
a known name with widths of its own, or a module whose up/down are swapped (its factors make no
adapter). rescale/resize/blend/convert used to refuse the whole file ("not placed in SD 1.x");
now a readable stray is acted on under its own name and a malformed one is copied verbatim. Each
output key is checked against the input's bytes (verbatim) or a dense reference computed here
from the raw tensors (acted on); the scales are read here from alpha tensors or the file's
LoraConfig JSON (peft's rule: lora_alpha / r, per-module patterns first).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats import kohya, peft
from loratools.ops.blend import blend
from loratools.ops.convert import convert_lora
from loratools.ops.rescale import rescale
from loratools.ops.resize import resize
from loratools.report.diff import diff_loras
from loratools.synthetic import TINY, make_lora

FORMATS = ("kohya", "diffusers")
STRAYS = ("unknown", "width", "swapped")
COMMANDS = ("rescale", "resize", "blend", "convert", "convert-fp16")
BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0."
SUFFIX = {"kohya": ("lora_down.weight", "lora_up.weight"), "diffusers": ("lora_A.weight", "lora_B.weight")}


@cache
def _base(fmt: str, tiny: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A few SD 1.x modules (real widths unless ``tiny``) as ``fmt`` writes them."""
    lora = make_lora(TINY["sd1"] if tiny else FAMILIES["sd1"], rank=2)
    unet = [n for n in lora.adapters if n.startswith("unet." + BLOCK) and n.endswith(("attn1.to_q", "attn2.to_v"))]
    text = [n for n in lora.adapters if n.startswith("te1.") and ".layers.0." in n][:2]
    lora = lora.with_adapters({n: lora.adapters[n] for n in unet + text})
    if fmt == "kohya":
        return kohya.kohya_state_dict(lora), kohya.kohya_metadata(lora)
    return peft.peft_state_dict(lora), peft.diffusers_metadata(lora)


def _module_of(key: str, fmt: str) -> tuple[str, str]:
    """(module, parameter) of a raw key: kohya lora_names hold no dot; diffusers end in .lora_X.weight."""
    if fmt == "kohya":
        module, param = key.split(".", 1)
        return module, param
    module, side, weight = key.rsplit(".", 2)
    return module, f"{side}.{weight}"


def _groups(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, param = _module_of(key, fmt)
        out.setdefault(module, {})[param] = tensor
    return out


def _with_stray(fmt: str, stray: str, tiny: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The base LoRA's raw tensors with one stray module added (or damaged), and that module's name."""
    tensors, metadata = _base(fmt, tiny)
    tensors = {k: v.clone() for k, v in tensors.items()}
    down, up = SUFFIX[fmt]
    g = torch.Generator().manual_seed(7)
    if stray == "swapped":  # up@down is no matrix: the first U-Net module's up transposed
        key = next(k for k in tensors if k.endswith(up) and "attn1" in k)
        tensors[key] = tensors[key].T.contiguous()
        return tensors, metadata, _module_of(key, fmt)[0]
    path = "not_a_module" if stray == "unknown" else BLOCK + "attn1.to_k"  # to_k: a module of SD 1.x
    name = "lora_unet_" + path.replace(".", "_") if fmt == "kohya" else "unet." + path
    out, inp = (5, 7) if stray == "unknown" else (7, 9)
    tensors[f"{name}.{down}"] = torch.randn(2, inp, generator=g)
    tensors[f"{name}.{up}"] = torch.randn(out, 2, generator=g)
    if fmt == "kohya":
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors, metadata, name


def _scale(fmt: str, module: str, params: dict[str, torch.Tensor], metadata: dict[str, str]) -> float:
    """alpha / r: kohya's alpha tensor, or peft's lora_alpha (alpha_pattern first) from the LoraConfig."""
    rank = int(params[SUFFIX[fmt][0]].shape[0])
    if fmt == "kohya":
        return float(params["alpha"]) / rank if "alpha" in params else 1.0
    config = json.loads(metadata["lora_adapter_metadata"])
    folder, path = module.split(".", 1)
    patterns = config.get(f"{folder}.alpha_pattern") or {}
    alpha = patterns.get(path, patterns.get(path.removeprefix("text_model."), config[f"{folder}.lora_alpha"]))
    return float(alpha) / rank


def _delta(fmt: str, module: str, params: dict[str, torch.Tensor], metadata: dict[str, str]) -> torch.Tensor:
    down, up = (params[s].double().flatten(1) for s in SUFFIX[fmt])
    return _scale(fmt, module, params, metadata) * (up @ down)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def _truncate(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


RUNS: dict[str, Callable[[Path, Path, str], object]] = {
    "rescale": lambda src, out, fmt: rescale(src, out, -0.5),
    "resize": lambda src, out, fmt: resize(src, out, rank=1),
    "blend": lambda src, out, fmt: blend([(src, 1.0), (src, 0.5)], out),
    "convert": lambda src, out, fmt: convert_lora(src, out, fmt),
    "convert-fp16": lambda src, out, fmt: convert_lora(src, out, fmt, dtype="fp16"),
}
FACTOR = {"rescale": -0.5, "blend": 1.5}


@pytest.mark.parametrize("stray", STRAYS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("command", COMMANDS)
def test_surgery_carries_a_module_the_family_cannot_place(command: str, fmt: str, stray: str, tmp_path: Path) -> None:
    """Refused before ("not placed in SD 1.x … would leave them out"); now every module is in the
    output under its own name: readable ones acted on, a malformed one byte for byte."""
    tensors, metadata, name = _with_stray(fmt, stray)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata)
    report = RUNS[command](src, out, fmt)
    assert name in " ".join(report.warnings)  # type: ignore[attr-defined]
    written, meta = _read(out)
    before, after = _groups(_read(src)[0], fmt), _groups(written, fmt)  # in file order
    assert list(after) == (sorted(after) if fmt == "kohya" else list(before))  # kohya's writer sorts
    assert set(after) == set(before)
    for module, params in before.items():
        new = after[module]
        assert set(new) == set(params), module
        if (stray == "swapped" and module == name) or command == "convert":  # verbatim
            for param, tensor in params.items():
                assert new[param].dtype == tensor.dtype and new[param].numpy().tobytes() == tensor.numpy().tobytes()
            continue
        if command == "convert-fp16":
            for param, tensor in params.items():
                assert torch.equal(new[param], tensor.to(torch.float16)), (module, param)
            continue
        want = _delta(fmt, module, params, metadata)
        want = _truncate(want, 1) if command == "resize" else FACTOR[command] * want
        torch.testing.assert_close(_delta(fmt, module, new, meta), want, rtol=1e-5, atol=1e-7)


CROSS = {"kohya": "diffusers", "diffusers": "kohya"}


def _renamed(name: str, fmt: str) -> str:
    """sd-scripts' rule, diffusers path → kohya lora_name (``unet.a.b`` → ``lora_unet_a_b``), and
    the SD 1.x U-Net path a kohya lora_name of BLOCK's to_k stands for."""
    if fmt == "diffusers":
        return "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
    return "unet." + BLOCK + "attn1.to_k"


@pytest.mark.parametrize("stray", STRAYS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cross_dialect_convert_maps_what_it_can_name_and_refuses_the_rest(fmt: str, stray: str, tmp_path: Path) -> None:
    """Across dialects a stray module is written under the name its source name maps to (the
    family's table, or sd-scripts' string rule from a diffusers path); one with no such name — a
    kohya name no table knows, malformed factors — refuses the convert in one line naming it."""
    tensors, metadata, name = _with_stray(fmt, stray)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata)
    to = CROSS[fmt]
    mapped = stray == "width" or (stray == "unknown" and fmt == "diffusers")
    if not mapped:
        with pytest.raises(
            InputError,
            match=f"not placed in SD 1.x and have no {'peft' if to == 'diffusers' else to} form \\(e.g. {name}:",
        ):
            convert_lora(src, out, to)
        assert not out.exists()
        return
    convert_lora(src, out, to)
    written, meta = _read(out)
    params = _groups(tensors, fmt)[name]
    new = _groups(written, to)[_renamed(name, fmt)]
    for side in range(2):
        assert torch.equal(new[SUFFIX[to][side]], params[SUFFIX[fmt][side]])
    torch.testing.assert_close(_delta(to, "unet.x", new, meta), _delta(fmt, name, params, metadata))


@pytest.mark.parametrize("stray", STRAYS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_diff_compares_a_module_the_family_cannot_place(fmt: str, stray: str, tmp_path: Path) -> None:
    """diff left a stray module out of its comparison; a readable one is compared now
    (‖ΔW − (−0.5·ΔW)‖ = 1.5‖ΔW‖ against the dense reference), a malformed one is not an error."""
    tensors, metadata, name = _with_stray(fmt, stray)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata)
    rescale(src, out, -0.5)
    report = diff_loras(src, out)
    entries = {e.name: e for e in report.entries}
    if stray == "swapped":
        assert name not in entries
        return
    want = 1.5 * float(torch.linalg.matrix_norm(_delta(fmt, name, _groups(tensors, fmt)[name], metadata)))
    assert entries[name].diff_norm == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_module_no_table_of_the_given_family_names_is_rescaled_not_refused(fmt: str, tmp_path: Path) -> None:
    """With the (tiny) family given, a module its tables do not name was refused by name; it is
    rescaled under its own name now, the others as ever."""
    tensors, metadata, name = _with_stray(fmt, "unknown", tiny=True)
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src), metadata)
    rescale(src, out, 0.5, family=TINY["sd1"])
    written, meta = _read(out)
    before, after = _groups(tensors, fmt), _groups(written, fmt)
    assert name in after and set(after) == set(before)
    for module, params in before.items():
        torch.testing.assert_close(
            _delta(fmt, module, after[module], meta), 0.5 * _delta(fmt, module, params, metadata), rtol=1e-5, atol=1e-7
        )
