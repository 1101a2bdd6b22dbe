"""Surgery on FLUX.1 LoRAs keeps the file's own dialect: same keys, same order, same metadata.

Issue 13's rule (rescale/resize/blend need no family and keep module names verbatim in the
input's own dialect), checked for every dialect helpers_flux generates. ΔW is checked per file
module against a float64 torch oracle computed from the raw input and output tensors
(``alpha/r · up @ down`` or ``diff``), never through loratools' readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_flux import (
    flux_lora_dialect,
    flux_lycoris_fused,
    raw_delta,
    raw_groups,
    raw_lycoris_delta,
    stem_part_rows,
    take_rows,
)

from loratools.formats.io import load_lora
from loratools.io.safetensors import SafetensorsFile, save_tensors
from loratools.ops.blend import blend
from loratools.ops.convert import convert_lora
from loratools.ops.rescale import rescale
from loratools.ops.resize import resize
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
OPS = ("rescale", "resize-fixed", "resize-dynamic", "blend-self")
METADATA = {"ss_output_name": "flux-test", "modelspec.title": "a FLUX.1 LoRA", "note": "kept"}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f}, dict(f.metadata)


def _run(op: str, src: Path, out: Path) -> object:
    runs: dict[str, Callable[[], object]] = {
        "rescale": lambda: rescale(src, out, 0.5, family=SPEC),
        "resize-fixed": lambda: resize(src, out, rank=1, family=SPEC),
        "resize-dynamic": lambda: resize(src, out, sv_fro=0.8, family=SPEC),
        "blend-self": lambda: blend([(src, 1.0), (src, 1.0)], out, family=SPEC),
    }
    return runs[op]()


def _truncate(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dialect", DIALECTS)
def test_surgery_keeps_the_dialect_and_the_exact_delta(dialect: str, op: str, tmp_path: Path) -> None:
    """A full diff (lycoris-full) stays one: resize keeps it bit for bit (it has no rank to cut)
    and says so; blend sums it as a full diff, ``diff_b`` with the same weights."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), METADATA)
    report = _run(op, src, out)
    before, _ = _read(src)
    after, meta = _read(out)
    assert list(after) == list(before)  # the same keys in the same order
    assert {k: t.dtype for k, t in after.items()} == {k: t.dtype for k, t in before.items()}
    if op == "rescale" or dialect == "lycoris-full":
        assert {k: t.shape for k, t in after.items()} == {k: t.shape for k, t in before.items()}
    for key, value in METADATA.items():
        assert meta.get(key) == value, key
    kept_full = op.startswith("resize") and dialect == "lycoris-full"
    if kept_full:
        assert all(torch.equal(after[k], t) for k, t in before.items())
        assert any("full modules kept as they are" in w for w in report.warnings)  # type: ignore[attr-defined]
    old, new = raw_groups(before), raw_groups(after)
    for stem, group in old.items():
        d_in, d_out = raw_delta(group), raw_delta(new[stem])
        if kept_full:
            continue  # bit for bit, checked above
        if "bias" in group:
            factor = 0.5 if op == "rescale" else 2.0 if op == "blend-self" else 1.0
            torch.testing.assert_close(new[stem]["bias"].double(), factor * group["bias"].double())
        if op == "rescale":
            torch.testing.assert_close(d_out, 0.5 * d_in, rtol=1e-5, atol=1e-7)
        elif op == "blend-self":
            torch.testing.assert_close(d_out, 2.0 * d_in, rtol=1e-5, atol=1e-7)
        else:  # each canonical part truncated optimally (Eckart–Young) at the rank it came out with
            for rows in stem_part_rows(SPEC, stem):
                part_in, part_out = take_rows(d_in, rows), take_rows(d_out, rows)
                k = int(torch.linalg.matrix_rank(part_out, rtol=1e-5))
                rank_in = int(torch.linalg.matrix_rank(part_in, rtol=1e-5))
                if op == "resize-fixed":
                    assert k == min(1, rank_in), stem
                else:
                    assert 1 <= k <= rank_in, stem
                torch.testing.assert_close(part_out, _truncate(part_in, k), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("dialect", "to", "prefix"),
    [
        ("xlabs", "diffusers", "transformer."),
        ("ai-toolkit-bfl", "diffusers", "transformer."),
        ("onetrainer", "kohya", "lora_unet_"),
    ],
)
def test_convert_writes_the_named_format_not_the_source_dialect(
    dialect: str, to: str, prefix: str, tmp_path: Path
) -> None:
    """Only surgery keeps the file's dialect; ``convert --to F`` writes F's own spelling, ΔW unchanged."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), METADATA)
    convert_lora(src, out, to, family=SPEC)
    after, _ = _read(out)
    assert all(k.startswith(prefix) for k in after)
    before = load_lora(src, family=SPEC)
    again = load_lora(out, family=SPEC)
    assert again.adapters.keys() == before.adapters.keys()
    for module, adapter in before.adapters.items():
        torch.testing.assert_close(again.adapters[module].delta(), adapter.delta(), rtol=1e-6, atol=1e-7)


def _lycoris_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, param = key.split(".", 1)
        groups.setdefault(stem, {})[param] = t
    return groups


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_lokr_on_fused_weights_split_by_rows_in_their_own_kind(kind: str, tmp_path: Path) -> None:
    """LoHa/LoKr on fused qkv / linear1 read as per-part LoHa/LoKr (not densified diffs), ΔW exact,
    and rescaled back into the very same keys."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = flux_lycoris_fused(SPEC, kind)
    save_tensors(src, tensors, METADATA)
    lora = load_lora(src, family=SPEC)
    assert not any("full ΔW parts" in w for w in lora.warnings)
    assert {a.kind for a in lora.adapters.values()} == {kind}
    for stem, group in _lycoris_groups(tensors).items():
        oracle = raw_lycoris_delta(group)
        for (rows,), module in zip(stem_part_rows(SPEC, stem), _part_modules(stem), strict=True):
            part = lora.adapters[module].delta().double()
            torch.testing.assert_close(part, oracle[rows[0] : rows[1]], rtol=1e-5, atol=1e-7)
    rescale(src, out, 0.5, family=SPEC)
    after, meta = _read(out)
    assert list(after) == list(tensors) and all(after[k].shape == t.shape for k, t in tensors.items())
    assert all(meta.get(k) == v for k, v in METADATA.items())
    for stem, group in _lycoris_groups(after).items():
        expected = 0.5 * raw_lycoris_delta(_lycoris_groups(tensors)[stem])
        torch.testing.assert_close(raw_lycoris_delta(group), expected, rtol=1e-5, atol=1e-7)


def _part_modules(stem: str) -> list[str]:
    from loratools.formats.flux import flux_names

    names = flux_names(SPEC)
    return [p.module for p in names.bfl[names.bfl_underscore[stem.removeprefix("lora_unet_")]]]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_rescale_without_a_family_keeps_the_dialect(dialect: str, tmp_path: Path) -> None:
    """Issue 13: rescale needs no family; XLabs and lycoris_ files were "unknown LoRA key layout"."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), METADATA)
    rescale(src, out, 0.5)
    before, _ = _read(src)
    after, meta = _read(out)
    assert list(after) == list(before)
    assert all(meta.get(k) == v for k, v in METADATA.items())
    old, new = raw_groups(before), raw_groups(after)
    for stem, group in old.items():
        torch.testing.assert_close(raw_delta(new[stem]), 0.5 * raw_delta(group), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["resize-fixed", "resize-dynamic", "blend-self"])
@pytest.mark.parametrize("dialect", ["kohya", "kohya-te3", "onetrainer", "ai-toolkit", "ai-toolkit-bfl", "xlabs"])
def test_resize_and_blend_without_a_family_keep_the_dialect(dialect: str, op: str, tmp_path: Path) -> None:
    """Issue 13 without --family: every file module kept under its own key, in file order, ΔW
    truncated optimally per file module (Eckart–Young, a fused qkv is one module here) or summed."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), METADATA)
    runs: dict[str, Callable[[], object]] = {
        "resize-fixed": lambda: resize(src, out, rank=1),
        "resize-dynamic": lambda: resize(src, out, sv_fro=0.8),
        "blend-self": lambda: blend([(src, 1.0), (src, 1.0)], out),
    }
    runs[op]()
    before, _ = _read(src)
    after, meta = _read(out)
    assert list(after) == list(before)
    assert all(meta.get(k) == v for k, v in METADATA.items())
    new = raw_groups(after)
    for stem, group in raw_groups(before).items():
        d_in, d_out = raw_delta(group), raw_delta(new[stem])
        if op == "blend-self":
            torch.testing.assert_close(d_out, 2.0 * d_in, rtol=1e-5, atol=1e-7)
            continue
        k = int(torch.linalg.matrix_rank(d_out, rtol=1e-5))
        assert k == 1 if op == "resize-fixed" else 1 <= k <= int(torch.linalg.matrix_rank(d_in, rtol=1e-5))
        torch.testing.assert_close(d_out, _truncate(d_in, k), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dialect", ["kohya-te", "kohya-te3"])
def test_t5_modules_of_a_tiny_flux_lora_are_read_not_dropped(dialect: str, tmp_path: Path) -> None:
    """Read without a family, the T5 lora_te2_/lora_te3_ modules were matched against SD 1.x and
    dropped (720 → 216 keys): every file module is an adapter now, kept by its own name."""
    src = tmp_path / "in.safetensors"
    tensors = flux_lora_dialect(SPEC, dialect)
    save_tensors(src, tensors, {})
    lora = load_lora(src)
    assert not lora.unmatched
    assert set(lora.adapters) == set(raw_groups(tensors))
    assert lora.verdict.family == "flux1"


def test_rescale_of_a_peft_file_with_a_lora_config_keeps_keys_and_reads_back_scaled(tmp_path: Path) -> None:
    """Alphas given by diffusers' ``lora_adapter_metadata`` (no alpha keys): the LoraConfig is
    rewritten to the new alphas, the keys stay, and the file reads back at half strength."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    config = '{"transformer.r": 2, "transformer.lora_alpha": 8.0, "transformer.alpha_pattern": {}}'
    save_tensors(src, flux_lora_dialect(SPEC, "ai-toolkit"), {"lora_adapter_metadata": config, **METADATA})
    rescale(src, out, 0.5, family=SPEC)
    before, _ = _read(src)
    after, meta = _read(out)
    assert list(after) == list(before)
    written = json.loads(meta["lora_adapter_metadata"])  # diffusers' flat "<folder>.<field>" config
    for stem, group in raw_groups(before).items():
        alpha = written["transformer.alpha_pattern"].get(stem.removeprefix("transformer."))
        alpha = written["transformer.lora_alpha"] if alpha is None else alpha
        d_in = 4.0 * raw_delta(group)  # raw_delta: scale 1 without alpha keys; the config says 8/2
        d_out = alpha / 2 * raw_delta(raw_groups(after)[stem])
        torch.testing.assert_close(d_out, 0.5 * d_in, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("first", "second"), [("onetrainer", "kohya"), ("xlabs", "ai-toolkit-bfl")])
def test_blend_of_two_dialects_keeps_the_first_ones_keys_and_sums_exactly(
    first: str, second: str, tmp_path: Path
) -> None:
    """The first input's keys come first, in its order; modules only the second has follow in the
    format's own spelling. ΔW per canonical module = the sum (the reader is checked against raw
    tensors per dialect in test_flux_loras.py)."""
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    save_tensors(a, flux_lora_dialect(SPEC, first, seed=1), METADATA)
    save_tensors(b, flux_lora_dialect(SPEC, second, seed=2), {})
    blend([(a, 1.0), (b, 1.0)], out, family=SPEC)
    keys_a, keys_out = list(_read(a)[0]), list(_read(out)[0])
    assert keys_out[: len(keys_a)] == keys_a
    la, lb, lo = (load_lora(p, family=SPEC) for p in (a, b, out))
    assert lo.adapters.keys() == la.adapters.keys() | lb.adapters.keys()
    for module, adapter in lo.adapters.items():
        want = sum(x.adapters[module].delta().double() for x in (la, lb) if module in x.adapters)
        torch.testing.assert_close(adapter.delta().double(), want, rtol=1e-5, atol=1e-7)  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", ["xlabs", "lycoris-full"])
@pytest.mark.parametrize("to", ["diffusers"])  # --to kohya is a pure rename: tests/test_flux_loose.py
def test_convert_of_an_own_spelled_flux_lora_without_a_family_is_refused_by_name(
    dialect: str, to: str, tmp_path: Path
) -> None:
    """Kept by their own XLabs/lycoris_ stems, such modules have no kohya or peft name without a
    family map: refused in one line (not written under made-up keys), no file left behind."""
    from loratools.errors import InputError

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, flux_lora_dialect(SPEC, dialect), METADATA)
    assert load_lora(src).verdict.family == "flux1"
    with pytest.raises(InputError, match=r"cannot hold|needs a FLUX\.1 family map"):
        convert_lora(src, out, to)
    assert not out.exists()


@pytest.mark.parametrize(
    ("dialect", "extra"),
    [
        ("kohya", "lora_unet_not_a_module.lora_down.weight"),
        ("kohya", "extra_tensor"),
        ("ai-toolkit", "transformer.not_a_module.lora_A.weight"),
        ("ai-toolkit-bfl", "diffusion_model.double_blocks.0.img_attn.norm.scale"),
    ],
)
@pytest.mark.parametrize("op", [*OPS, "convert"])
def test_flux_writers_refuse_to_drop_a_key_the_reader_could_not_place(
    dialect: str, extra: str, op: str, tmp_path: Path
) -> None:
    """A key beside the modules that no FLUX.1 dialect names was listed as unmatched on reading
    and then silently missing from every written file; the command now refuses, naming it."""
    from loratools.errors import InputError

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tensors = flux_lora_dialect(SPEC, dialect) | {extra: torch.ones(2, 4)}
    save_tensors(src, tensors, METADATA)
    runs: dict[str, Callable[[], object]] = {
        "rescale": lambda: rescale(src, out, 0.5, family=SPEC),
        "resize-fixed": lambda: resize(src, out, rank=1, family=SPEC),
        "resize-dynamic": lambda: resize(src, out, sv_fro=0.8, family=SPEC),
        "blend-self": lambda: blend([(src, 1.0), (src, 1.0)], out, family=SPEC),
        "convert": lambda: convert_lora(src, out, "kohya" if dialect == "ai-toolkit" else "diffusers", family=SPEC),
    }
    with pytest.raises(InputError, match=rf"not placed in FLUX\.1 \(e\.g\. {re.escape(extra)}: "):
        runs[op]()
    assert not out.exists()
