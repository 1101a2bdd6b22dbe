"""``merge`` / ``unmerge`` on the tiny SD1/SD2/SDXL checkpoints: every family × layout.

Expected weights are computed here from the raw file tensors (safetensors reads, ``alpha/r·up@down``
in float64, diffusers folder paths = canonical paths), not by the code under test. The diffusers +
peft oracle is in test_merge_oracle.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILY_NAMES
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.cli.main import cli
from loratools.errors import InputError, OutputError
from loratools.families import keymap
from loratools.families.spec import DIFFUSERS_FOLDERS
from loratools.formats.adapters import Full, LoHa, LoKr, LoraFile, LowRank, apply_dora
from loratools.formats.io import save_lora
from loratools.ops import delta as delta_module
from loratools.ops.blocks import parse_block_weights
from loratools.ops.delta import DeltaEngine, Job, Term
from loratools.ops.merge import LoraInput, _windows, merge, parse_lora_arg, unmerge
from loratools.synthetic import TINY, make_lora, write_checkpoint

RANK = 4


# -- helpers ------------------------------------------------------------------------------------------
def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """canonical name → tensor of a diffusers folder, read with safetensors (``unet.<path>`` …)."""
    out = {}
    for component, sub in DIFFUSERS_FOLDERS.items():
        for file in sorted((folder / sub).glob("*.safetensors")):
            for key, tensor in load_file(str(file)).items():
                out[f"{component}.{key}"] = tensor
    return out


def raw_deltas(path: Path, family: str) -> dict[str, torch.Tensor]:
    """canonical module → ΔW in float64 from a kohya file's raw tensors."""
    from loratools.formats.names import name_tables

    raw = load_file(str(path))
    names = name_tables(TINY[family]).kohya
    out = {}
    for name in sorted({k.split(".", 1)[0] for k in raw}):
        down = raw[f"{name}.lora_down.weight"].double()
        up = raw[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = float(raw[f"{name}.alpha"]) if f"{name}.alpha" in raw else rank
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        out[names[name]] = product.reshape(up.shape[0], *down.shape[1:]) * (alpha / rank)
    return out


def untouched_outside(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], patched: set[str]) -> None:
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= patched, sorted(changed - patched)[:5]


@pytest.fixture(scope="module")
def fp16_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("fp16")
    out = {}
    for family, spec in TINY.items():
        out[(family, "single")] = write_checkpoint(spec, root / f"{family}.safetensors", "single", dtype=torch.float16)
        out[(family, "diffusers")] = write_checkpoint(spec, root / f"{family}-d", "diffusers", dtype=torch.float16)
    return out


# -- the math -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_several_loras_with_negative_weights_equal_float64_sum(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    a = save_lora(make_lora(TINY[family], rank=RANK, alphas="varied", seed=1), tmp_path / "a.safetensors", "kohya")
    b = save_lora(make_lora(TINY[family], rank=8, alpha=3.0, conv=True, seed=2), tmp_path / "b.safetensors", "kohya")
    weights = {a: 0.7, b: -1.3}
    report = merge(folder, [LoraInput(p, w) for p, w in weights.items()], tmp_path / "out", strict=True)
    assert report.unmatched == 0

    base, merged = folder_weights(folder), folder_weights(tmp_path / "out")
    expected = {k: v.double() for k, v in base.items()}
    for path, weight in weights.items():
        for module, delta in raw_deltas(path, family).items():
            expected[f"{module}.weight"] = expected[f"{module}.weight"] + weight * delta
    patched = {k for k in base if not torch.equal(expected[k], base[k].double())}
    assert sum(report.patched.values()) == len(patched)
    for key in patched:
        assert torch.allclose(merged[key].double(), expected[key], rtol=1e-6, atol=1e-6), key
    untouched_outside(base, merged, patched)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unet_and_text_weights_apply_separately(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    path = save_lora(make_lora(TINY[family], rank=RANK), tmp_path / "l.safetensors", "kohya")
    merge(folder, [parse_lora_arg(f"{path}:unet=0.25,te=0")], tmp_path / "out")
    base, merged = folder_weights(folder), folder_weights(tmp_path / "out")
    deltas = raw_deltas(path, family)
    for module, delta in deltas.items():
        key = f"{module}.weight"
        if module.startswith("unet."):
            assert torch.allclose(merged[key].double(), base[key].double() + 0.25 * delta, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(merged[key], base[key])


def _single_keys_changed(base: Path, out: Path) -> set[str]:
    a, b = load_file(str(base)), load_file(str(out))
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize(
    ("family", "vector", "pattern"),
    [
        ("sd1", "0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0,0", r"^model\.diffusion_model\.output_blocks\.3\."),
        ("sd2", "0,0,0,0,0,1,0,0,0,0,0,0,0,0,0,0,0", r"^model\.diffusion_model\.input_blocks\.7\."),
        ("sdxl", "0,0,0,0,0,1,0,0,0,0,0,0", r"^model\.diffusion_model\.middle_block\."),
        ("sdxl", "1,0,0,0,0,0,0,0,0,0,0,0", r"^conditioner\.embedders\."),
        ("sd1", "INALL", r"^(model\.diffusion_model\.input_blocks\.|cond_stage_model\.)"),
        ("sd1", ",".join("1" if i == 11 else "0" for i in range(26)), r"^model\.diffusion_model\.input_blocks\.10\."),
        ("sdxl", ",".join("1" if i == 19 else "0" for i in range(20)), r"^model\.diffusion_model\.output_blocks\.8\."),
    ],
    ids=["sd1-OUT03", "sd2-IN07", "sdxl-M00", "sdxl-BASE", "sd1-INALL", "sd1-26-IN10", "sdxl-20-OUT08"],
)
def test_block_weights_touch_exactly_the_named_blocks(
    family: str, vector: str, pattern: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """Short vectors (17/12) leave blocks a plain LoRA never touches at 1, so LoCon (resnets,
    samplers) is tested with the full 26/20-value vectors."""
    base = tiny_checkpoints[(family, "single")]
    conv = len(vector.split(",")) in (20, 26)
    path = save_lora(make_lora(TINY[family], rank=RANK, conv=conv), tmp_path / "l.safetensors", "kohya")
    merge(base, [path], tmp_path / "all.safetensors")
    all_changed = _single_keys_changed(base, tmp_path / "all.safetensors")
    merge(base, [LoraInput(path, blocks=vector)], tmp_path / "blocks.safetensors")
    changed = _single_keys_changed(base, tmp_path / "blocks.safetensors")
    expected = {k for k in all_changed if re.match(pattern, k)}
    assert expected and changed == expected


def test_block_weight_vectors_are_checked() -> None:
    with pytest.raises(InputError, match="17"):
        parse_block_weights("1,1,1", TINY["sd1"])
    with pytest.raises(InputError, match=r"no preset ROUT"):
        parse_block_weights("ROUT", TINY["sdxl"])
    assert parse_block_weights("ALL0.5", TINY["sdxl"]).weights["OUT05"] == 0.5
    assert parse_block_weights("OUTD", TINY["sd1"]).weights == dict(
        zip(
            ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
            [1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            strict=True,
        )
    )


# -- unmerge ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unmerge_of_merge_is_the_base_to_fp16_rounding(
    family: str, layout: str, fp16_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    base = fp16_checkpoints[(family, layout)]
    suffix = ".safetensors" if layout == "single" else ""
    a = save_lora(make_lora(TINY[family], rank=RANK, conv=True, seed=3), tmp_path / "a.safetensors", "kohya")
    b = save_lora(make_lora(TINY[family], rank=2, seed=4), tmp_path / "b.safetensors", "diffusers")
    loras = [LoraInput(a, 0.8), LoraInput(b, -0.6)]
    merged = tmp_path / f"merged{suffix}"
    merge(base, loras, merged)
    report = unmerge(merged, loras, tmp_path / f"restored{suffix}", base=base)

    if layout == "single":
        before, mid, after = (load_file(str(p)) for p in (base, merged, tmp_path / f"restored{suffix}"))
    else:
        before, mid, after = (folder_weights(p) for p in (base, merged, tmp_path / "restored"))
    assert set(before) == set(after)
    worst = {}
    for key in before:
        w, m, r = before[key], mid[key], after[key]
        if torch.equal(w, m):
            assert torch.equal(r, w), key
            continue
        # Two roundings to fp16 (merged, restored): at most one step at the larger magnitude.
        bound = torch.maximum(w.float().abs(), m.float().abs()) * 2.0**-10 + 2.0**-24
        assert ((r.float() - w.float()).abs() <= bound).all(), key
        worst[key] = float((r.float() - w.float()).abs().max())
    assert set(report.residual) == {k.split(".", 1)[0] for k in report.patched}
    assert max(s["max_abs"] for s in report.residual.values()) == pytest.approx(max(worst.values()))


def test_dora_cannot_be_unmerged(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    lora = make_lora(TINY["sd1"], rank=RANK, text=False)
    module, adapter = next(iter(lora.adapters.items()))
    dora = LowRank(
        adapter.up, adapter.down, adapter.alpha, dora_scale=torch.rand(adapter.up.shape[0]) + 0.5, dora_axis="out"
    )
    path = save_lora(lora.with_adapters({module: dora}), tmp_path / "dora.safetensors", "kohya")
    with pytest.raises(InputError, match="cannot be undone"):
        unmerge(tiny_checkpoints[("sd1", "single")], [path], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# -- layouts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_file_and_folder_outputs_agree_through_the_key_map(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    path = save_lora(make_lora(TINY[family], rank=RANK, conv=True), tmp_path / "l.safetensors", "kohya")
    single, folder = tiny_checkpoints[(family, "single")], tiny_checkpoints[(family, "diffusers")]
    merge(single, [LoraInput(path, 0.6)], tmp_path / "s.safetensors")
    merge(folder, [LoraInput(path, 0.6)], tmp_path / "d")
    merge(single, [LoraInput(path, 0.6)], tmp_path / "s2d", layout="diffusers")
    merge(folder, [LoraInput(path, 0.6)], tmp_path / "d2s.safetensors", layout="single")

    km = keymap(TINY[family])
    layout = TINY[family].single_layout
    from_single = km.to_canonical(layout, load_file(str(tmp_path / "s.safetensors"))).tensors
    from_d2s = km.to_canonical(layout, load_file(str(tmp_path / "d2s.safetensors"))).tensors
    from_folder, from_s2d = folder_weights(tmp_path / "d"), folder_weights(tmp_path / "s2d")
    # SD2's OpenCLIP single file has no position_ids buffer, so a folder made from it lacks one.
    assert all(k.endswith("position_ids") for k in set(from_folder) ^ set(from_s2d))
    for name, tensor in from_folder.items():
        if name in from_s2d:
            assert torch.equal(tensor, from_s2d[name]), name
        if name in from_single:
            assert torch.equal(tensor, from_single[name]), name
            assert torch.equal(tensor, from_d2s[name]), name


def test_pickle_base_is_merged_into_safetensors(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    single = tiny_checkpoints[("sd1", "single")]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single)), "global_step": 7}, ckpt)
    path = save_lora(make_lora(TINY["sd1"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    merge(single, [path], tmp_path / "a.safetensors")
    merge(ckpt, [path], tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- LyCORIS kinds, DoRA, full diffs: the batched engine vs the per-module formulas ---------------------
def _lycoris_lora(family: str) -> LoraFile:
    spec = TINY[family]
    base = make_lora(spec, rank=RANK, conv=True, text=True, seed=5)
    g = torch.Generator().manual_seed(9)
    adapters = {}
    for i, (module, a) in enumerate(base.adapters.items()):
        shape = a.delta_shape()
        out, inp = shape[0], math.prod(shape[1:])
        kind = i % 5
        if kind == 0 or (len(shape) == 4 and kind in (2, 3)):
            adapters[module] = a
        elif kind == 1:
            adapters[module] = LoHa(
                torch.randn(out, 2, generator=g) * 0.1,
                torch.randn(2, inp, generator=g) * 0.1,
                torch.randn(out, 2, generator=g) * 0.1,
                torch.randn(2, inp, generator=g) * 0.1,
                alpha=1.0,
                shape=shape,
            )
        elif kind == 2 and out % 2 == 0 and inp % 2 == 0:
            adapters[module] = LoKr(
                alpha=1.0,
                w1=torch.randn(2, 2, generator=g) * 0.1,
                w2=torch.randn(out // 2, inp // 2, generator=g) * 0.1,
            )
        elif kind == 3:
            bias = torch.randn(out, generator=g) * 0.01 if f"{module}.bias" in keymap(spec).by_canonical else None
            adapters[module] = Full(torch.randn(*shape, generator=g) * 0.01, bias)
        else:
            magnitude = torch.rand(out, generator=g) + 0.5
            adapters[module] = LowRank(a.up, a.down, a.alpha, dora_scale=magnitude, dora_axis="out")
    return base.with_adapters(adapters)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lycoris_dora_and_full_diffs_merge_like_their_formulas(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    lora = _lycoris_lora(family)
    kinds = {
        type(a).__name__ + ("+dora" if getattr(a, "dora_scale", None) is not None else "")
        for a in lora.adapters.values()
    }
    assert kinds == {"LowRank", "LoHa", "LoKr", "Full", "LowRank+dora"}
    path = save_lora(lora, tmp_path / "lycoris.safetensors", "kohya")
    folder = tiny_checkpoints[(family, "diffusers")]
    report = merge(folder, [path], tmp_path / "out", strict=True, budget=64 * 1024)  # many small batches
    assert report.unmatched == 0
    base, merged = folder_weights(folder), folder_weights(tmp_path / "out")
    for module, adapter in lora.adapters.items():
        w = base[f"{module}.weight"]
        if getattr(adapter, "dora_scale", None) is not None:
            expected = apply_dora(w, adapter)
        else:
            expected = w + adapter.delta().reshape(w.shape)
        assert torch.allclose(merged[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6), module
        if isinstance(adapter, Full) and adapter.diff_b is not None:
            bias = base[f"{module}.bias"]
            assert torch.allclose(merged[f"{module}.bias"], bias + adapter.diff_b, rtol=1e-6, atol=1e-7)


def test_engine_batches_equal_one_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    jobs, expected = {}, {}
    for i in range(12):
        out, inp = (16, 8) if i % 2 else (8, 24)
        w = torch.randn(out, inp, generator=g).half()
        terms = [
            Term(LowRank(torch.randn(out, 3, generator=g), torch.randn(3, inp, generator=g), 1.5), 0.7),
            Term(LowRank(torch.randn(out, 5, generator=g), torch.randn(5, inp, generator=g), 5.0), -1.1),
        ]
        if i % 3 == 0:
            terms.append(
                Term(LoHa(*(torch.randn(s, generator=g) for s in ((out, 2), (2, inp), (out, 2), (2, inp))), 1.0), 0.5)
            )
        jobs[f"m{i}"] = Job(w, terms)
        exact = w.double() + sum(t.strength * t.adapter.delta().double() for t in terms)
        expected[f"m{i}"] = exact
    for budget in (64, 1 << 20):  # one module per matmul, and all of a shape at once
        got = DeltaEngine("cpu", budget).patch(jobs)
        for name, value in got.items():
            assert value.dtype == torch.float16
            assert torch.allclose(value.double(), expected[name], rtol=2e-3, atol=1e-3), name
    deltas = DeltaEngine("cpu").deltas({n: ((j.weight.shape), j.terms) for n, j in jobs.items()})
    for name, value in deltas.items():
        assert torch.allclose(value.double(), expected[name] - jobs[name].weight.double(), rtol=1e-5, atol=1e-5)


def test_windows_hold_at_most_the_budget() -> None:
    from loratools.io.safetensors import TensorInfo
    from loratools.ops.merge_plan import Entry as _Entry

    entries = [
        _Entry(f"k{i}", f"k{i}", [f"c{i}"], f"k{i}", TensorInfo("F16", (100, 100)), patched=i % 3 != 0)
        for i in range(30)
    ]
    windows = _windows(entries, budget=100 * 100 * 4 * 3)
    assert [e for w in windows for e in w] == entries
    for window in windows:
        assert sum(e.info.numel * 4 for e in window if e.patched) <= 100 * 100 * 4 * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    jobs = {}
    for i in range(6):
        w = torch.randn(64, 32, generator=g).half()
        jobs[f"m{i}"] = Job(
            w, [Term(LowRank(torch.randn(64, 4, generator=g), torch.randn(4, 32, generator=g), 2.0), 0.8)]
        )
    cpu = DeltaEngine("cpu").patch(jobs)
    gpu = DeltaEngine("cuda").patch(jobs)
    for name in jobs:
        assert gpu[name].device.type == "cpu"
        assert torch.allclose(cpu[name].float(), gpu[name].float(), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merge_on_gpu_equals_cpu(family: str, fp16_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY[family], rank=RANK, conv=True), tmp_path / "l.safetensors", "kohya")
    base = fp16_checkpoints[(family, "single")]
    merge(base, [LoraInput(path, 0.7)], tmp_path / "cpu.safetensors", device="cpu")
    report = merge(base, [LoraInput(path, 0.7)], tmp_path / "gpu.safetensors", device="cuda", verify=32)
    assert report.device.startswith("cuda") and all(v["ok"] for v in report.verified)
    cpu, gpu = load_file(str(tmp_path / "cpu.safetensors")), load_file(str(tmp_path / "gpu.safetensors"))
    for key, value in cpu.items():
        # fp32 GEMMs on the two devices sum in different orders: at most one fp16 rounding step apart.
        step = value.float().abs() * 2.0**-10 + 2.0**-24
        assert ((gpu[key].float() - value.float()).abs() <= step).all(), key


def test_cuda_without_a_gpu_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        DeltaEngine("cuda")
    assert DeltaEngine("auto").device.type == "cpu"


# -- refusals: nothing written ---------------------------------------------------------------------------
def _no_output(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(("out", ".out"))]
    assert leftovers == []


def test_lora_of_another_family_is_refused(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sdxl"], rank=RANK), tmp_path / "xl.safetensors", "kohya")
    with pytest.raises(InputError, match=r"do not fit SD 1\.x"):
        merge(tiny_checkpoints[("sd1", "single")], [path], tmp_path / "out.safetensors")
    _no_output(tmp_path)


def test_fp16_overflow_is_refused_and_fp32_output_works(
    fp16_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    lora = make_lora(TINY["sd1"], rank=RANK, text=False)
    module, adapter = next(iter(lora.adapters.items()))
    huge = LowRank(adapter.up * 3000, adapter.down * 3000, adapter.alpha)
    path = save_lora(lora.with_adapters({module: huge}), tmp_path / "huge.safetensors", "kohya")
    base = fp16_checkpoints[("sd1", "single")]
    with pytest.raises(InputError, match="overflows float16"):
        merge(base, [path], tmp_path / "out.safetensors")
    _no_output(tmp_path)
    merge(base, [path], tmp_path / "wide.safetensors", dtype="fp32")
    with safe_open(str(tmp_path / "wide.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in keys if f.get_tensor(k).is_floating_point())


def test_nonfinite_factors_refused_or_skipped(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    lora = make_lora(TINY["sd1"], rank=RANK)
    module, adapter = next(iter(lora.adapters.items()))
    bad_up = adapter.up.clone()
    bad_up[0, 0] = float("nan")
    path = save_lora(
        lora.with_adapters({**lora.adapters, module: LowRank(bad_up, adapter.down, adapter.alpha)}),
        tmp_path / "nan.safetensors",
        "kohya",
    )
    base = tiny_checkpoints[("sd1", "single")]
    with pytest.raises(InputError, match="NaN or inf"):
        merge(base, [path], tmp_path / "out.safetensors")
    _no_output(tmp_path)
    report = merge(base, [path], tmp_path / "skipped.safetensors", skip_nonfinite=True)
    assert report.loras[0].unmatched == {module: "NaN or inf in its factors (skipped)"}


def test_strict_refuses_unmatched_modules(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sd1"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    tensors = load_file(str(path))
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(RANK, 8)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, RANK)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    base = tiny_checkpoints[("sd1", "single")]
    report = merge(base, [tmp_path / "extra.safetensors"], tmp_path / "ok.safetensors")
    assert list(report.loras[0].unmatched) == ["lora_unet_not_a_module"]
    with pytest.raises(InputError, match="--strict: 1 LoRA modules patch nothing"):
        merge(base, [tmp_path / "extra.safetensors"], tmp_path / "out.safetensors", strict=True)
    _no_output(tmp_path)


def test_dry_run_plans_without_writing(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sdxl"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    base = tiny_checkpoints[("sdxl", "single")]
    plan = merge(base, [path], tmp_path / "out.safetensors", dry_run=True, dtype="bf16")
    assert not (tmp_path / "out.safetensors").exists()
    done = merge(base, [path], tmp_path / "real.safetensors", dtype="bf16")
    assert plan.patched == done.patched and plan.dtype_plan == done.dtype_plan
    assert plan.output_bytes == done.output_bytes
    assert os.path.getsize(tmp_path / "real.safetensors") == plan.output_bytes


def test_verify_catches_a_wrong_result(
    tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_lora(make_lora(TINY["sd1"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    base = tiny_checkpoints[("sd1", "single")]
    report = merge(base, [path], tmp_path / "good.safetensors", verify=1000)
    assert report.verified and all(v["ok"] for v in report.verified)
    assert len(report.verified) == sum(report.patched.values())

    original = delta_module.DeltaEngine.patch

    def off_by_a_little(self: DeltaEngine, jobs: dict[str, Job]) -> dict[str, torch.Tensor]:
        return {k: v + 1e-3 for k, v in original(self, jobs).items()}

    monkeypatch.setattr(delta_module.DeltaEngine, "patch", off_by_a_little)
    with pytest.raises(OutputError, match="verification failed"):
        merge(base, [path], tmp_path / "out.safetensors", verify=1000)
    _no_output(tmp_path)


def test_output_that_is_an_input_is_refused(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sd1"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    with pytest.raises(InputError, match="output is one of the inputs"):
        merge(tiny_checkpoints[("sd1", "single")], [path], path, overwrite=True)


# -- the LORA[:WEIGHT] syntax and the CLI ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.safetensors", ("a.safetensors", 1.0, None, None, None)),
        ("a.safetensors:-0.5", ("a.safetensors", -0.5, None, None, None)),
        ("a.safetensors:unet=1,te=0.5", ("a.safetensors", 1.0, 1.0, 0.5, None)),
        ("a.safetensors:w=0.8,lbw=OUTALL", ("a.safetensors", 0.8, None, None, "OUTALL")),
        ("a.safetensors:lbw=1,0,0.5,te=2", ("a.safetensors", 1.0, None, 2.0, "1,0,0.5")),
        ("hf://me/repo/a.safetensors", ("hf://me/repo/a.safetensors", 1.0, None, None, None)),
        ("hf://me/repo/a.safetensors:0.3", ("hf://me/repo/a.safetensors", 0.3, None, None, None)),
    ],
)
def test_lora_argument_syntax(text: str, expected: tuple) -> None:
    got = parse_lora_arg(text)
    assert (got.source, got.weight, got.unet, got.text, got.blocks) == expected


def test_lora_argument_errors_are_one_line() -> None:
    with pytest.raises(InputError, match="unknown LoRA option"):
        parse_lora_arg("a.safetensors:strength=2")
    with pytest.raises(InputError, match="not a number"):
        parse_lora_arg("a.safetensors:unet=big")


def test_cli_merge_and_unmerge_json(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sd2"], rank=RANK), tmp_path / "l.safetensors", "kohya")
    base = str(tiny_checkpoints[("sd2", "single")])
    runner = CliRunner()
    result = runner.invoke(
        cli, ["merge", base, f"{path}:0.5", "-o", str(tmp_path / "m.safetensors"), "--json", "--verify"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "loratools.merge/1" and data["family"] == "sd2"
    assert data["loras"][0]["weight"] == 0.5 and len(data["verified"]) == 16
    result = runner.invoke(
        cli,
        [
            "unmerge",
            str(tmp_path / "m.safetensors"),
            f"{path}:0.5",
            "-o",
            str(tmp_path / "u.safetensors"),
            "--base",
            base,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "residual vs base" in result.output


def test_cli_errors_are_one_line(tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    path = save_lora(make_lora(TINY["sdxl"], rank=RANK), tmp_path / "xl.safetensors", "kohya")
    result = CliRunner().invoke(
        cli, ["merge", str(tiny_checkpoints[("sd1", "single")]), str(path), "-o", str(tmp_path / "out.safetensors")]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    _no_output(tmp_path)
