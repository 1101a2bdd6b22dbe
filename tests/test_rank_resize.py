"""resize: every module equals numpy's truncated SVD of its dense ΔW, over families × formats,
conv (LoCon) modules, every dynamic rule and the other adapter kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_oracles import dense, rel_err, rule_rank, singular_values, truncation

from loratools.errors import InputError
from loratools.formats.adapters import LoHa, LoKr, LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.ops.lowrank import RankRule
from loratools.ops.resize import resize, resize_lora, resize_module
from loratools.synthetic import TINY, make_lora

FORMATS = ("kohya", "diffusers", "peft")


def _is_kxk(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def _check_module(source, result, k: int, tol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    matrix = dense(source.delta())
    assert result.rank == k
    assert rel_err(dense(result.delta()), truncation(matrix, k)) < tol


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_rank_equals_dense_truncation(tmp_path: Path, family: str, fmt: str) -> None:
    spec = TINY[family]
    lora = make_lora(spec, rank=6, conv=True, alphas="varied")
    path = save_lora(lora, tmp_path / ("in" if fmt == "peft" else "in.safetensors"), fmt)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    report = resize(path, out, rank=3, conv_rank=2, family=spec)
    assert report.output_format == fmt and len(report.modules) == len(lora.adapters)
    resized = load_lora(out, spec)
    for module, source in lora.adapters.items():
        shape = source.delta_shape()
        k = min(2 if _is_kxk(shape) else 3, shape[0], int(np.prod(shape[1:])))
        got = resized.adapters[module]
        _check_module(source, got, k)
        assert got.alpha == pytest.approx(source.scale * k)  # the module's scale is kept (alpha/r · k)
        assert got.delta_shape() == shape  # LoCon keeps its conv shapes


@pytest.mark.parametrize(
    ("rule", "target", "bounds"),
    [
        ("sv_fro", 0.9, {}),
        ("sv_fro", 0.999, {"max_rank": 4}),
        ("sv_cumulative", 0.7, {}),
        ("sv_cumulative", 0.2, {"min_rank": 2}),
        ("sv_ratio", 2.5, {}),
        ("sv_ratio", 1.0, {}),
    ],
)
def test_dynamic_rules_equal_dense_truncation(rule: str, target: float, bounds: dict) -> None:
    lora = make_lora(TINY["sd1"], rank=8, conv=True, seed=7, alphas="varied")
    resized, report = resize_lora(lora, RankRule(**{rule: target}, **bounds))
    rows = {r.module: r for r in report.modules}
    for module, source in lora.adapters.items():
        s = singular_values(dense(source.delta()))
        s = s[: min(8, len(s))]  # the LoRA's own rank bounds the spectrum
        k = rule_rank(s, rule, target)
        k = min(max(k, bounds.get("min_rank", 1)), bounds.get("max_rank", len(s)), len(s))
        _check_module(source, resized.adapters[module], k)
        assert rows[module].fro_kept == pytest.approx(float(np.sqrt(np.sum(s[:k] ** 2) / np.sum(s**2))), rel=1e-6)


def test_fp16_lora_resizes_within_fp16_rounding(tmp_path: Path) -> None:
    spec = TINY["sdxl"]
    lora = make_lora(spec, rank=6, conv=True, dtype=torch.float16)
    path = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    resize(path, tmp_path / "out.safetensors", rank=4, family=spec)
    resized = load_lora(tmp_path / "out.safetensors", spec)
    for module, source in lora.adapters.items():
        assert resized.adapters[module].up.dtype == torch.float16
        shape = source.delta_shape()
        _check_module(source, resized.adapters[module], min(4, shape[0], int(np.prod(shape[1:]))), tol=2e-3)


def _other_kinds() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "loha": LoHa(r(24, 3), r(3, 20), r(24, 3), r(3, 20), 2.0),
        "loha-conv": LoHa(r(16, 2), r(2, 8 * 9), r(16, 2), r(2, 8 * 9), 1.0, shape=(16, 8, 3, 3)),
        "lokr": LoKr(4.0, w1=r(4, 2), w2a=r(6, 2), w2b=r(2, 10)),
        "lokr-full": LoKr(1.0, w1=r(2, 4), w2=r(12, 5)),
        "tucker": LowRank(r(16, 4, 1, 1), r(4, 8, 1, 1), 2.0, mid=r(4, 4, 3, 3)),
        # a full diff is kept as it is, not made a LoRA: tests/test_full_modules.py
        "locon": LowRank(r(16, 5, 1, 1), r(5, 8, 3, 3), 2.5),
    }


@pytest.mark.parametrize("name", list(_other_kinds()))
@pytest.mark.parametrize("k", [1, 3])
def test_other_kinds_go_through_their_delta(name: str, k: int) -> None:
    adapter = _other_kinds()[name]
    resized, row = resize_module(name, adapter, RankRule(rank=k))  # type: ignore[arg-type]
    assert isinstance(resized, LowRank) and resized.mid is None
    _check_module(adapter, resized, k)
    assert resized.delta_shape() == adapter.delta_shape()  # type: ignore[attr-defined]
    assert row.new_rank == k and 0 < row.fro_kept <= 1


def test_kept_rank_is_bit_exact_and_reported_unchanged() -> None:
    lora = make_lora(TINY["sd1"], rank=4, text=False)
    resized, report = resize_lora(lora, RankRule(rank=4))
    assert all(r.unchanged for r in report.modules)
    assert all(resized.adapters[m] is a for m, a in lora.adapters.items())
    resized, report = resize_lora(lora, RankRule(rank=9))  # above the LoRA's rank: nothing to cut
    assert all(r.unchanged and r.limited_by == "available" for r in report.modules)


def test_dora_is_refused_naming_the_module() -> None:
    lora = make_lora(TINY["sd1"], rank=4, text=False)
    module, a = next(iter(lora.adapters.items()))
    adapters = dict(lora.adapters)
    adapters[module] = LowRank(a.up, a.down, a.alpha, dora_scale=torch.ones(a.up.shape[0]), dora_axis="out")
    with pytest.raises(InputError, match="DoRA") as info:
        resize_lora(lora.with_adapters(adapters), RankRule(rank=2))
    assert module in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("factor", ["up", "down"])
@pytest.mark.parametrize("route", ["factor space", "dense"])
def test_nonfinite_factors_are_refused(value: float, factor: str, route: str) -> None:
    """Factor space tests the Gram diagonals (each entry is squared into one), the dense route
    (rank above a dimension) the product: both must see one bad entry anywhere."""
    lora = make_lora(TINY["sd1"], rank=4, text=False)
    module, a = next(iter(lora.adapters.items()))
    up, down = a.up.clone(), a.down.clone()
    if route == "dense":  # inner width above min(out, in): the dense product is the small matrix
        width = min(up.shape[0], down.reshape(down.shape[0], -1).shape[1]) + 1
        up = torch.randn(up.shape[0], width, *up.shape[2:])
        down = torch.randn(width, *down.shape[1:])
    target = up if factor == "up" else down
    target.view(-1)[target.numel() // 2] = value
    with pytest.raises(InputError, match="NaN or inf") as info:
        resize_lora(lora.with_adapters({module: LowRank(up, down, a.alpha)}), RankRule(rank=2))
    assert module in str(info.value)


def test_zero_module_keeps_rank_one_and_nothing_lost() -> None:
    lora = make_lora(TINY["sd1"], rank=4, text=False)
    module, a = next(iter(lora.adapters.items()))
    zero = LoraFile({module: LowRank(torch.zeros_like(a.up), a.down, a.alpha)}, lora.family, "synthetic")
    resized, report = resize_lora(zero, RankRule(sv_fro=0.9))
    assert resized.adapters[module].rank == 1 and torch.count_nonzero(resized.adapters[module].delta()) == 0
    assert report.modules[0].limited_by == "zero" and report.modules[0].fro_kept == 1.0


def test_report_json(tmp_path: Path) -> None:
    spec = TINY["sd2"]
    path = save_lora(make_lora(spec, rank=5, conv=True), tmp_path / "in.safetensors", "kohya")
    report = resize(path, tmp_path / "out.safetensors", sv_fro=0.9, max_rank=4, family=spec, to="diffusers")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == "loratools.resize/1" and data["output_format"] == "diffusers"
    assert data["module_count"] == len(data["modules"]) and 0 < data["fro_kept_min"] <= data["fro_kept_mean"] <= 1
    assert set(data["modules"][0]) >= {"module", "kind", "old_rank", "new_rank", "fro_kept", "limited_by"}
    assert data["rule"] == "sv-fro 0.9 (max 4)"
    assert load_lora(tmp_path / "out.safetensors", spec).source_format == "diffusers"


def test_output_is_never_an_input(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    path = save_lora(make_lora(spec, rank=4), tmp_path / "in.safetensors", "kohya")
    with pytest.raises(InputError, match="output is an input"):
        resize(path, path, rank=2, family=spec, overwrite=True)
