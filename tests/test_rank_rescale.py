"""rescale: ΔW' = S·ΔW exactly, negative strengths checked on ΔW (never on the factors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools.errors import InputError
from loratools.formats.adapters import Full, LoHa, LoKr, LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.ops.rescale import rescale, rescale_adapter, rescale_lora
from loratools.synthetic import TINY, make_lora

FORMATS = ("kohya", "diffusers", "peft", "cloneofsimo")
STRENGTHS = (0.37, -0.7, -1.0, 3.0)


CLONEOFSIMO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "q_proj", "k_proj", "v_proj", "out_proj")


def _lora_for(fmt: str, family: str) -> LoraFile:
    lora = make_lora(TINY[family], rank=4, conv=fmt != "cloneofsimo", alphas="varied")
    if fmt == "cloneofsimo":  # lora_diffusion covers attention and GEGLU only, with scale 1
        lora = lora.with_adapters(
            {m: a.baked() for m, a in lora.adapters.items() if m.endswith(CLONEOFSIMO_TARGETS)}  # type: ignore[union-attr]
        )
    return lora


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("by", STRENGTHS)
def test_rescale_multiplies_delta(tmp_path: Path, family: str, fmt: str, by: float) -> None:
    if fmt == "cloneofsimo" and family == "sdxl":
        pytest.skip("lora_diffusion predates SDXL")
    spec = TINY[family]
    lora = _lora_for(fmt, family)
    source = save_lora(lora, tmp_path / ("in" if fmt == "peft" else "in.safetensors"), fmt)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    report = rescale(source, out, by, family=spec)
    assert report.output_format == fmt and report.modules == len(lora.adapters)
    if fmt == "cloneofsimo":
        assert report.representation == {"factor": report.modules}  # no alpha in the format
    before, after = load_lora(source, spec), load_lora(out, spec)
    for module, a in before.adapters.items():
        expected = by * a.delta()
        err = torch.linalg.vector_norm(after.adapters[module].delta() - expected) / torch.linalg.vector_norm(expected)
        assert err < 1e-6, module  # exact up to float32 rounding (cloneofsimo: the scale folded into up)


def test_factors_bit_exact_and_sign_on_up(tmp_path: Path) -> None:
    """fp16 kohya file: down untouched, up exactly negated, |S| in alpha (rounded once, reported)."""
    spec = TINY["sd1"]
    lora = make_lora(spec, rank=4, conv=True, dtype=torch.float16)
    source = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    report = rescale(source, tmp_path / "out.safetensors", -0.7, family=spec)
    assert report.representation == {"alpha+sign": len(lora.adapters)}
    assert 0 < report.alpha_rounding <= 2.0**-11
    after = load_lora(tmp_path / "out.safetensors", spec)
    for module, a in lora.adapters.items():
        b = after.adapters[module]
        assert torch.equal(b.down, a.down) and torch.equal(b.up, -a.up)  # type: ignore[union-attr]
        expected = -0.7 * a.delta()
        err = torch.linalg.vector_norm(b.delta() - expected) / torch.linalg.vector_norm(expected)
        assert err <= report.alpha_rounding * 1.001 + 1e-7, module


def test_fp32_alpha_is_exact(tmp_path: Path) -> None:
    spec = TINY["sd2"]
    source = save_lora(make_lora(spec, rank=3), tmp_path / "in.safetensors", "kohya")
    report = rescale(source, tmp_path / "out.safetensors", -0.3, family=spec, dtype="fp32")
    assert report.alpha_rounding < 1e-7


def _kinds() -> dict[str, object]:
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "loha": LoHa(r(12, 2), r(2, 10), r(12, 2), r(2, 10), 1.5),
        "lokr-lowrank": LoKr(2.0, w1a=r(3, 2), w1b=r(2, 2), w2=r(4, 5)),
        "lokr-w1": LoKr(2.0, w1=r(3, 2), w2a=r(4, 2), w2b=r(2, 5)),
        "lokr-full": LoKr(1.0, w1=r(3, 2), w2=r(4, 5)),
        "full": Full(r(12, 10), r(12)),
        "tucker": LowRank(r(8, 3, 1, 1), r(3, 6, 1, 1), 1.0, mid=r(3, 3, 3, 3)),
    }


@pytest.mark.parametrize("name", list(_kinds()))
@pytest.mark.parametrize("by", [-0.5, 2.0])
def test_every_kind_scales_its_delta(name: str, by: float) -> None:
    adapter = _kinds()[name]
    scaled, how = rescale_adapter(adapter, by)  # type: ignore[arg-type]
    torch.testing.assert_close(scaled.delta(), by * adapter.delta(), rtol=1e-6, atol=1e-7)  # type: ignore[attr-defined]
    assert how == ("factor" if name in ("lokr-full", "full") else "alpha+sign" if by < 0 else "alpha")
    if isinstance(adapter, Full):
        torch.testing.assert_close(scaled.delta_bias(), by * adapter.delta_bias())  # type: ignore[union-attr]


def test_dora_zero_and_nonfinite_are_refused() -> None:
    lora = make_lora(TINY["sd1"], rank=2, text=False)
    module, a = next(iter(lora.adapters.items()))
    dora = lora.with_adapters(
        {module: LowRank(a.up, a.down, a.alpha, dora_scale=torch.ones(a.up.shape[0]), dora_axis="out")}
    )
    with pytest.raises(InputError, match="DoRA") as info:
        rescale_lora(dora, 0.5)
    assert module in str(info.value)
    with pytest.raises(InputError, match="full strength"):
        rescale_lora(lora, 0.0)  # alpha 0 means alpha = rank to sd-scripts/LyCORIS
    with pytest.raises(InputError, match="finite"):
        rescale_lora(lora, float("nan"))


def test_alpha_that_underflows_its_dtype_is_refused(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    source = save_lora(make_lora(spec, rank=2, dtype=torch.float16, text=False), tmp_path / "in.safetensors", "kohya")
    with pytest.raises(InputError, match="cannot be stored"):
        rescale(source, tmp_path / "out.safetensors", 1e-9, family=spec)
    rescale(source, tmp_path / "out.safetensors", 1e-9, family=spec, dtype="fp32")  # the way out works
