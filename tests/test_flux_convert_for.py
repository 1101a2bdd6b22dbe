"""``convert --for TARGET`` on FLUX.1 LoRAs: the dialect each target loads, at the file's strength.

Every FLUX.1 dialect helpers_flux generates × every target with FLUX.1 rules (docs/FORMATS.md
§14): the written file is checked with ``check --for`` (clean), and its ΔW per canonical module
equals the input's, both computed in float64 from the raw tensors of each file
(helpers_flux.raw_canonical_deltas), never through loratools' readers. Pairs no file can serve
(a target that reads no full diff or no T5 module, A1111 loading no FLUX.1 model) are refused in
one line naming the reason, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect, raw_canonical_deltas

from loratools.check import check_lora
from loratools.check.fix import convert_for
from loratools.errors import InputError
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.synthetic import TINY_FLUX

SPEC = TINY_FLUX["dev"]
DIALECTS = (
    "kohya",
    "kohya-split-qkv",
    "ai-toolkit",
    "ai-toolkit-bfl",
    "xlabs",
    "onetrainer",
    "lycoris-full",
    "kohya-te",
    "kohya-te3",
)
TARGETS = ("comfyui", "forge", "diffusers", "invokeai", "kohya")
# (dialect, target) → what the refusal names: the loader reads no such module at all
REFUSED = {
    ("lycoris-full", "diffusers"): "does not read full modules",
    ("lycoris-full", "kohya"): "does not read full modules",
    ("kohya-te", "diffusers"): "T5 is not a LoRA-loadable module",
    ("kohya-te3", "diffusers"): "T5 is not a LoRA-loadable module",
}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f}, dict(f.metadata)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dialect", DIALECTS)
def test_convert_for_writes_what_the_target_loads_at_the_same_delta(dialect: str, target: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {"ss_output_name": "flux-test"})
    if (dialect, target) in REFUSED:
        with pytest.raises(InputError, match=REFUSED[dialect, target]):
            convert_for(src, out, target, family=SPEC)
        assert not out.exists()
        return
    report = convert_for(src, out, target, family=SPEC)
    assert report.clean, report.remaining
    result = check_lora(out, target, family=SPEC)
    assert all(r.clean for r in result.reports), [r.verdict for r in result.reports]
    want_w, want_b = raw_canonical_deltas(SPEC, *_read(src))
    got_w, got_b = raw_canonical_deltas(SPEC, *_read(out))
    # parts a fused writer pads with zero rows (a LoRA on to_q only) are ΔW = 0, not new modules
    padded = {m for m in got_w.keys() - want_w.keys() if not got_w[m].any()}
    assert got_w.keys() - padded == want_w.keys()
    for module, delta in want_w.items():
        torch.testing.assert_close(got_w[module], delta, rtol=1e-5, atol=1e-7)
    assert {m for m in got_b if m not in padded} == want_b.keys()
    for module, bias in want_b.items():
        torch.testing.assert_close(got_b[module], bias, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dialect", ["kohya", "ai-toolkit"])
def test_convert_for_a1111_refuses_a_flux_lora(dialect: str, tmp_path: Path) -> None:
    """A1111 loads no FLUX.1 model: no file would apply, so none is written."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    with pytest.raises(InputError, match=r"A1111.*refuses FLUX\.1"):
        convert_for(src, out, "a1111", family=SPEC)
    assert not out.exists()


@pytest.mark.parametrize(("target", "prefix"), [("kohya", "lora_te3_"), ("invokeai", "lora_te2_")])
@pytest.mark.parametrize("dialect", ["kohya-te", "kohya-te3"])
def test_convert_for_spells_t5_as_the_target_reads_it(dialect: str, target: str, prefix: str, tmp_path: Path) -> None:
    """sd-scripts' merge reads T5 as lora_te3_ only, InvokeAI as lora_te2_ only."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), {})
    convert_for(src, out, target, family=SPEC)
    keys = list(_read(out)[0])
    assert any(k.startswith(prefix) for k in keys)
    assert not any(k.startswith(("lora_te2_", "lora_te3_")) and not k.startswith(prefix) for k in keys)
