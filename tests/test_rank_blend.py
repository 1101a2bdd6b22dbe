"""blend: ΔW = Σ wᵢ·ΔWᵢ — concat exact, svd equal to numpy's truncation of the dense sum."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_oracles import dense, rel_err, rule_rank, singular_values, truncation

from loratools.errors import InputError
from loratools.formats.adapters import LoHa, LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.ops.blend import blend, blend_loras, parse_weighted
from loratools.ops.lowrank import RankRule
from loratools.synthetic import TINY, make_lora

WEIGHTS = (0.8, -0.45)


def _pair(family: str) -> tuple[LoraFile, LoraFile]:
    """Two LoRAs with different ranks, alphas and module sets (the second has no text encoder)."""
    spec = TINY[family]
    a = make_lora(spec, rank=5, conv=True, alphas="varied", seed=1)
    b = make_lora(spec, rank=3, alpha=7.0, conv=True, text=False, seed=2)
    return a, b


def _expected(a: LoraFile, b: LoraFile, module: str, weights: tuple[float, float] = WEIGHTS) -> torch.Tensor:
    total = weights[0] * a.adapters[module].delta().double()
    if module in b.adapters:
        total = total + weights[1] * b.adapters[module].delta().double()
    return total


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_concat_is_exact(tmp_path: Path, family: str, fmt: str) -> None:
    spec = TINY[family]
    a, b = _pair(family)
    pa = save_lora(a, tmp_path / "a.safetensors", fmt)
    pb = save_lora(b, tmp_path / "b.safetensors", "kohya")
    report = blend([f"{pa}:{WEIGHTS[0]}", f"{pb}:{WEIGHTS[1]}"], tmp_path / "ab.safetensors", family=spec)
    assert report.output_format == fmt and report.mode == "concat"
    out = load_lora(tmp_path / "ab.safetensors", spec)
    assert set(out.adapters) == set(a.adapters)
    for module, got in out.adapters.items():
        expected = _expected(a, b, module)
        assert got.rank == 5 + (3 if module in b.adapters else 0)  # ranks add
        assert got.alpha == got.rank  # scale 1: each part carries its own
        assert rel_err(dense(got.delta()), dense(expected)) < 1e-6, module


@pytest.mark.parametrize(
    ("rule", "target"),
    [("rank", 4), ("rank", 1), ("rank", 20), ("sv_fro", 0.9), ("sv_cumulative", 0.6), ("sv_ratio", 3.0)],
)
def test_svd_equals_dense_truncation(family: str, rule: str, target: float) -> None:
    a, b = _pair(family)
    blended, report = blend_loras([(a, WEIGHTS[0]), (b, WEIGHTS[1])], mode="svd", rule=RankRule(**{rule: target}))
    rows = {m.module: m for m in report.modules}
    for module, got in blended.adapters.items():
        matrix = dense(_expected(a, b, module))
        available = min(8 if module in b.adapters else 5, *matrix.shape)
        s = singular_values(matrix)[:available]
        k = min(int(target), available) if rule == "rank" else rule_rank(s, rule, target)
        assert got.rank == k, module
        assert rel_err(dense(got.delta()), truncation(matrix, k)) < 1e-5, module
        assert got.delta_shape() == a.adapters[module].delta_shape()  # conv modules stay LoCon
        assert rows[module].fro_kept == pytest.approx(float(np.sqrt(np.sum(s[:k] ** 2) / np.sum(s**2))), rel=1e-6)


def test_negative_weight_subtracts_a_lora_from_itself() -> None:
    a, _ = _pair("sd1")
    blended, _ = blend_loras([(a, 1.0), (a, -1.0)], mode="concat")
    for got in blended.adapters.values():
        assert float(torch.linalg.vector_norm(got.delta())) < 1e-6
    half, _ = blend_loras([(a, 1.0), (a, -0.5)], mode="svd", rule=RankRule(rank=5))
    for module, got in half.adapters.items():
        assert rel_err(dense(got.delta()), dense(0.5 * a.adapters[module].delta())) < 1e-5


def test_other_kinds_blend_exactly() -> None:
    a, _ = _pair("sd1")
    g = torch.Generator().manual_seed(5)
    loha = {}
    for module, x in list(a.adapters.items())[:6]:
        out, flat = x.delta().shape[0], int(np.prod(x.delta_shape()[1:]))
        loha[module] = LoHa(
            torch.randn(out, 2, generator=g), torch.randn(2, flat, generator=g),
            torch.randn(out, 2, generator=g), torch.randn(2, flat, generator=g), 1.0, shape=x.delta_shape(),
        )  # fmt: skip
    other = a.with_adapters(loha)
    blended, _ = blend_loras([(a, 0.5), (other, 2.0)], mode="concat")
    for module, y in loha.items():
        expected = 0.5 * a.adapters[module].delta().double() + 2.0 * y.delta().double()
        assert rel_err(dense(blended.adapters[module].delta()), dense(expected)) < 1e-6


def test_metadata_policies_and_merged_from(tmp_path: Path) -> None:
    spec = TINY["sd1"]
    a, b = _pair("sd1")
    a.metadata = {"ss_output_name": "a", "ss_seed": "1", "sshs_model_hash": "stale"}
    b.metadata = {"ss_output_name": "b", "ss_lr_scheduler": "cosine"}
    pa = save_lora(a, tmp_path / "a.safetensors", "kohya")
    pb = save_lora(b, tmp_path / "b.safetensors", "kohya")
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (pa, pb)}  # merged_from names them
    expected_from = [
        {"name": n, "weight": w, "sha256": sha[n], "autov2": sha[n][:10]}
        for n, w in (("a.safetensors", 1.0), ("b.safetensors", -0.5))
    ]
    for policy, present, absent in (
        ("keep-first", {"ss_output_name": "a", "ss_seed": "1"}, ["ss_lr_scheduler"]),
        ("merge", {"ss_output_name": "a", "ss_seed": "1", "ss_lr_scheduler": "cosine"}, []),
        ("fresh", {}, ["ss_output_name", "ss_seed", "ss_lr_scheduler"]),
    ):
        out = tmp_path / f"{policy}.safetensors"
        report = blend([str(pa), f"{pb}:-0.5"], out, metadata=policy, family=spec)
        meta = load_lora(out, spec).metadata
        assert json.loads(meta["merged_from"]) == expected_from
        assert "sshs_model_hash" not in meta or meta["sshs_model_hash"] != "stale"
        for key, value in present.items():
            assert meta[key] == value, (policy, key)
        for key in absent:
            assert key not in meta, (policy, key)
        if policy == "merge":
            assert any("ss_output_name" in w for w in report.warnings)


def test_weight_zero_drops_modules_and_bad_inputs_are_one_line(tmp_path: Path) -> None:
    a, b = _pair("sd1")
    blended, report = blend_loras([(a, 0.0), (b, 1.0)])
    assert set(blended.adapters) == set(b.adapters) and len(report.dropped) == len(set(a.adapters) - set(b.adapters))
    xl = make_lora(TINY["sdxl"], rank=2)
    cases = [
        (lambda: blend_loras([(a, 1.0), (xl, 1.0)]), "cannot blend"),
        (lambda: blend_loras([(a, 1.0)], mode="concat", rule=RankRule(rank=2)), "needs --mode svd"),
        (lambda: blend_loras([(a, 1.0)], mode="svd"), "needs a rank rule"),
        (lambda: blend_loras([(a, 0.0)]), "every module has weight 0"),
        (lambda: blend_loras([(a, float("inf"))]), "finite"),
        (lambda: blend_loras([]), "at least one"),
        (lambda: blend_loras([(a, 1.0)], metadata="nope"), "metadata policy"),
    ]
    module, x = next(iter(a.adapters.items()))
    dora = a.with_adapters(
        {module: LowRank(x.up, x.down, x.alpha, dora_scale=torch.ones(x.up.shape[0]), dora_axis="out")}
    )
    cases.append((lambda: blend_loras([(dora, 1.0), (b, 1.0)]), "DoRA"))
    for call, message in cases:
        with pytest.raises(InputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_parse_weighted() -> None:
    assert parse_weighted("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_weighted("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_weighted("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_weighted("dir:with:colons/a.safetensors:2") == ("dir:with:colons/a.safetensors", 2.0)
