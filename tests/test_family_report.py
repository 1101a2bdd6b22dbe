"""The family is a report, never a gate (issue 13): every readable LoRA works with every LoRA-only
command, checked against dense references computed here from the raw tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import (
    FLUX_DIFFUSERS,
    FLUX_DIFFUSERS_WIDE,
    FLUX_KOHYA,
    FLUX_KOHYA_WIDE,
    ROBERTA_PEFT,
    SD3_DIFFUSERS,
    best_rank,
    raw_deltas,
    write_kohya,
    write_peft_file,
    write_peft_folder,
)
from safetensors import safe_open

from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats.adapters import LoraFile
from loratools.formats.io import load_lora, save_lora
from loratools.ops.blend import blend
from loratools.ops.convert import convert_lora
from loratools.ops.rescale import rescale
from loratools.ops.resize import resize
from loratools.report import inspect_lora
from loratools.synthetic import TINY, make_lora


def _subset(lora: LoraFile, n: int) -> LoraFile:
    """A few modules of each component: a table of families × widths stays fast."""
    picked = {}
    for component in ("unet", "te1", "te2"):
        names = [m for m in lora.adapters if m.startswith(component + ".")]
        picked.update({m: lora.adapters[m] for m in names[:n]})
    return lora.with_adapters(picked)  # type: ignore[arg-type]


def _sd(spec_name: str, tiny: bool, fmt: str) -> Callable[[Path, int], Path]:
    def make(folder: Path, seed: int) -> Path:
        spec = TINY[spec_name] if tiny else FAMILIES[spec_name]
        lora = _subset(make_lora(spec, rank=3, alphas="varied", conv=tiny, seed=seed), 4 if tiny else 2)
        suffix = "" if fmt == "peft" else ".safetensors"
        return save_lora(lora, folder / f"{spec_name}-{seed}{suffix}", fmt)

    return make


def _named(write: Callable[..., Path], shapes: dict[str, tuple[int, int]]) -> Callable[[Path, int], Path]:
    return lambda folder, seed: write(folder / f"m{seed}.safetensors", shapes, seed=seed)


# (case id, maker, expected verdict kind, family, fit)
CASES = [
    ("sd1-full-kohya", _sd("sd1", False, "kohya"), "sd", "sd1", "shapes"),
    ("sdxl-tiny-kohya", _sd("sdxl", True, "kohya"), "sd", "sdxl", "names"),
    ("sd2-tiny-diffusers", _sd("sd2", True, "diffusers"), "sd", "sd2", "names"),
    ("flux-kohya", _named(write_kohya, FLUX_KOHYA), "model", "flux1", "none"),
    ("flux-diffusers", _named(write_peft_file, FLUX_DIFFUSERS), "model", "flux1", "none"),
    ("sd3-diffusers", _named(write_peft_file, SD3_DIFFUSERS), "model", "sd3", "none"),
    ("unknown-kohya", _named(write_kohya, {"lora_unet_mystery_block_0_proj": (40, 24)}), "unknown", "unknown", "none"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, tuple[str, str, str]]:
    _, make, kind, family, fit = request.param
    return make(tmp_path, 0), make(tmp_path, 1), (kind, family, fit)


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        scale = max(np.linalg.norm(ref), 1e-12)
        assert np.linalg.norm(got[name].reshape(ref.shape) - ref) / scale < rtol, name


def _out(tmp_path: Path, source: Path, name: str) -> Path:
    return tmp_path / (name if source.is_dir() else f"{name}.safetensors")


def test_inspect_reports_the_model(case: tuple[Path, Path, tuple[str, str, str]]) -> None:
    a, _, (kind, family, fit) = case
    report = inspect_lora(a)
    assert (report.model["kind"], report.model["family"], report.model["fit"]) == (kind, family, fit)
    assert report.family == family and report.modules == len(raw_deltas(a))
    assert report.to_dict()["model"]["note"]
    assert report.tree and sum(n.modules for n in report.tree) == report.modules


def test_rescale_is_s_times_delta(case: tuple[Path, Path, tuple[str, str, str]], tmp_path: Path) -> None:
    a, _, _ = case
    out = _out(tmp_path, a, "scaled")
    rescale(a, out, -0.5)
    _close(raw_deltas(out), {m: -0.5 * d for m, d in raw_deltas(a).items()})


def test_resize_is_the_optimal_truncation(case: tuple[Path, Path, tuple[str, str, str]], tmp_path: Path) -> None:
    a, _, _ = case
    out = _out(tmp_path, a, "r1")
    resize(a, out, rank=1, conv_rank=1)
    _close(raw_deltas(out), {m: best_rank(d.reshape(d.shape[0], -1), 1) for m, d in raw_deltas(a).items()}, 1e-4)


def test_blend_is_the_weighted_sum(case: tuple[Path, Path, tuple[str, str, str]], tmp_path: Path) -> None:
    a, b, _ = case
    out = _out(tmp_path, a, "blend")
    blend([(a, 0.7), (b, -0.2)], out)
    da, db = raw_deltas(a), raw_deltas(b)
    _close(raw_deltas(out), {m: 0.7 * da[m] - 0.2 * db[m] for m in da})


def _tensors(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def test_convert_round_trip_is_byte_exact(case: tuple[Path, Path, tuple[str, str, str]], tmp_path: Path) -> None:
    a, _, (kind, _, _) = case
    source = load_lora(a)
    other = "diffusers" if source.source_format == "kohya" else "kohya"
    if kind != "sd":  # another model's names: converting dialects needs a family map; say which
        with pytest.raises(InputError, match=r"needs a (FLUX\.1|SD3/SD3\.5|unknown model) family map"):
            convert_lora(a, tmp_path / "x.safetensors", other)
        assert not (tmp_path / "x.safetensors").exists()
        other = source.source_format  # the same dialect: module names kept verbatim
    mid = tmp_path / "mid.safetensors"
    convert_lora(a, mid, other)
    back = tmp_path / "back.safetensors"
    convert_lora(mid, back, source.source_format)
    assert _tensors(back) == _tensors(a)


def test_flux_and_sd3_at_real_widths_inspected_and_resized(tmp_path: Path) -> None:
    for write, shapes, title in (
        (write_peft_file, FLUX_DIFFUSERS_WIDE, "FLUX.1"),
        (write_kohya, FLUX_KOHYA_WIDE, "FLUX.1"),
        (write_peft_file, SD3_DIFFUSERS, "SD3/SD3.5"),
    ):
        path = write(tmp_path / f"{len(shapes)}{write.__name__}.safetensors", shapes, rank=4)
        report = inspect_lora(path)
        assert report.family_title == title and report.modules == len(shapes)
        assert {f.module for f in report.module_facts} == set(shapes)
        out = tmp_path / f"r2-{path.name}"
        resize(path, out, rank=2)
        assert {f.rank for f in inspect_lora(out).module_facts} == {2}
        assert inspect_lora(out).family_title == title


def test_language_model_adapter_is_not_a_diffusion_model(tmp_path: Path) -> None:
    folder = write_peft_folder(
        tmp_path / "roberta", ROBERTA_PEFT, {"r": 3, "lora_alpha": 6, "task_type": "SEQ_CLS", "peft_type": "LORA"}
    )
    report = inspect_lora(folder)
    assert report.model["kind"] == "not-diffusion" and "not a diffusion model" in report.model["note"]
    out = tmp_path / "roberta-r1"
    resize(folder, out, rank=1)
    assert (out / "adapter_model.safetensors").exists()  # written back at the adapter's root
    want = {m.removeprefix("base_model.model."): best_rank(d, 1) for m, d in raw_deltas(folder).items()}
    _close(raw_deltas(out), want, 1e-4)


def test_merge_keeps_its_rule(tmp_path: Path) -> None:
    """merge still needs the base's widths: a tiny LoRA is refused by a full-size family."""
    tiny = save_lora(make_lora(TINY["sd1"], rank=2), tmp_path / "t.safetensors", "kohya")
    with pytest.raises(InputError, match=r"no module of this file fits SD 1\.x"):
        load_lora(tiny, FAMILIES["sd1"], require_fit=True)
    assert load_lora(tiny, TINY["sd1"], require_fit=True).verdict.fit == "shapes"


def test_peft_config_rank_drift_one_answer(tmp_path: Path) -> None:
    """A peft file whose config says r=64 over rank-2 tensors: inspect (the header scan) and
    convert (the reader) give the same refusal (before: inspect exit 0, convert exit 2)."""
    lora = make_lora(FAMILIES["sd1"], rank=2, text=False)
    lora = lora.with_adapters(dict(list(lora.adapters.items())[:3]))
    path = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    flat = json.loads(meta["lora_adapter_metadata"])
    flat["unet.r"] = 64
    save_file(load_file(str(path)), str(path), {**meta, "lora_adapter_metadata": json.dumps(flat)})
    messages = []
    for run in (lambda: inspect_lora(path), lambda: convert_lora(path, tmp_path / "k.safetensors", "kohya")):
        with pytest.raises(InputError, match="says r=64") as info:
            run()
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_tucker_factors_go_through_the_shape_check(tmp_path: Path) -> None:
    """A Tucker LoHa / LoKr made for a tiny model used to 'fit' full-size SD 1.x (no dims were
    read from Tucker factors): it is read by its names now, and its ΔW has the tiny conv's shape."""
    from safetensors.torch import save_file

    from loratools.formats.names import name_tables

    tables = name_tables(TINY["sd1"])
    module = next(m for m in tables.modules.values() if len(m.shape) == 4 and m.shape[2] == 3 and m.component == "unet")
    out, inp = module.shape[:2]
    name = tables.kohya_name(module.name, sgm_unet=False, text_prefixes={"te1": "lora_te"})
    r = 2
    for params in (
        {"hada_w1_a": (r, out), "hada_w1_b": (r, inp), "hada_w2_a": (r, out), "hada_w2_b": (r, inp),
         "hada_t1": (r, r, 3, 3), "hada_t2": (r, r, 3, 3)},
        {"lokr_w1": (1, 1), "lokr_w2_a": (r, out), "lokr_w2_b": (r, inp), "lokr_t2": (r, r, 3, 3)},
    ):  # fmt: skip
        tensors = {f"{name}.{k}": torch.randn(*shape) for k, shape in params.items()}
        tensors[f"{name}.alpha"] = torch.tensor(float(r))
        path = tmp_path / "tucker.safetensors"
        save_file(tensors, str(path))
        lora = load_lora(path)
        assert lora.verdict.fit == "names"
        assert tuple(lora.adapters[module.name].delta().shape) == module.shape
