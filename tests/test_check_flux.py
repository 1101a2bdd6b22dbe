"""loratools check on FLUX.1 LoRAs: one row per dialect × target (generated tiny LoRA → expected
finding, docs/FORMATS.md §14), and the diffusers row checked against diffusers' own Flux LoRA
loading (FluxPipeline.lora_state_dict + load_lora_into_transformer) — which modules it keeps."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_comfyui_native, flux_lora_dialect

from loratools.check import build_view, check_lora
from loratools.families import FLUX1
from loratools.families.spec import FamilySpec
from loratools.formats.flux import flux_names
from loratools.io.safetensors import save_tensors
from loratools.synthetic import TINY_FLUX, write_checkpoint

SPEC = TINY_FLUX["dev"]
TARGETS = ("comfyui", "a1111", "forge", "diffusers", "invokeai", "kohya")


def _with_all_qkv(spec: FamilySpec) -> dict[str, torch.Tensor]:
    """ai-toolkit on every double block's add_q/k/v_proj (the generator trains add_q_proj only)."""
    out = flux_lora_dialect(spec, "ai-toolkit")
    for key in [k for k in out if ".add_q_proj." in k]:
        for other in ("add_k_proj", "add_v_proj"):
            out[key.replace("add_q_proj", other)] = out[key].clone()
    return out


def _mutated(drop: str = "", add_norm_out: bool = False) -> Callable[[FamilySpec], dict[str, torch.Tensor]]:
    def build(spec: FamilySpec) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in _with_all_qkv(spec).items() if not (drop and k.startswith(drop + "."))}
        if add_norm_out:
            o, i = flux_names(spec).shapes["transformer.norm_out.linear"]
            out["transformer.norm_out.linear.lora_A.weight"] = torch.zeros(2, i)
            out["transformer.norm_out.linear.lora_B.weight"] = torch.zeros(o, 2)
        return out

    return build


BUILDERS: dict[str, Callable[[FamilySpec], dict[str, torch.Tensor]]] = {
    "comfyui-native": lambda spec: flux_lora_comfyui_native(spec),
    "ai-toolkit-qkv": _with_all_qkv,
    "ai-toolkit-no-k": _mutated(drop="transformer.transformer_blocks.3.attn.to_k"),
    "ai-toolkit-no-single-0": _mutated(drop="transformer.single_transformer_blocks.0.attn.to_q"),
    "ai-toolkit-norm-out": _mutated(add_norm_out=True),
}


def _dialect(name: str) -> Callable[[FamilySpec], dict[str, torch.Tensor]]:
    return BUILDERS.get(name, lambda spec: flux_lora_dialect(spec, name))


DIALECTS = (
    "kohya",
    "kohya-split-qkv",
    "ai-toolkit",
    "ai-toolkit-qkv",
    "ai-toolkit-no-k",
    "ai-toolkit-no-single-0",
    "ai-toolkit-norm-out",
    "ai-toolkit-bfl",
    "comfyui-native",
    "xlabs",
    "onetrainer",
    "lycoris-full",
    "kohya-te",
    "kohya-te3",
)
A1111 = ("unsupported", "A1111 loads no FLUX.1 model")
# dialect → target → "clean", ("refused", substring), ("ignored", short, count), ("unsupported", substring),
# ("unknown", count). Every dialect gets an A1111 refusal.
EXPECTED: dict[str, dict[str, object]] = {
    "kohya": {t: "clean" for t in ("comfyui", "forge", "diffusers", "invokeai", "kohya")},
    "kohya-split-qkv": {t: "clean" for t in ("comfyui", "forge", "diffusers", "invokeai", "kohya")},
    "ai-toolkit": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers")},
        "invokeai": ("refused", "Missing LoRA layer"),  # add_q_proj without add_k_proj/add_v_proj
        "kohya": ("ignored", "peft-spelled modules ignored", 305),
    },
    "ai-toolkit-qkv": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers", "invokeai")},
        "kohya": ("ignored", "peft-spelled modules ignored", 343),
    },
    "ai-toolkit-no-k": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers")},
        "invokeai": ("refused", "transformer_blocks.3.attn.to_k: lora_layers_from_flux_diffusers"),
        "kohya": ("ignored", "peft-spelled modules ignored", 342),
    },
    "ai-toolkit-no-single-0": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers")},
        "invokeai": ("refused", "is_state_dict_likely_in_flux_diffusers_format"),
        "kohya": ("ignored", "peft-spelled modules ignored", 342),
    },
    "ai-toolkit-norm-out": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers")},
        "invokeai": ("refused", "assert len(grouped_state_dict) == 0"),
        "kohya": ("ignored", "peft-spelled modules ignored", 344),
    },
    "ai-toolkit-bfl": {
        **{t: "clean" for t in ("comfyui", "forge", "invokeai")},
        "diffusers": ("ignored", "bfl-peft-spelled modules ignored", 228),
        "kohya": ("ignored", "bfl-peft-spelled modules ignored", 228),
    },
    "comfyui-native": {
        **{t: "clean" for t in ("comfyui", "forge", "diffusers")},
        "invokeai": ("unknown", 228),
        "kohya": ("ignored", "bfl-kohya-spelled modules ignored", 228),
    },
    "xlabs": {
        "comfyui": ("ignored", "xlabs-spelled modules ignored", 76),
        "forge": ("refused", "more than 12"),
        "diffusers": "clean",
        "invokeai": "clean",
        "kohya": ("ignored", "xlabs-spelled modules ignored", 76),
    },
    "onetrainer": {
        "comfyui": "clean",
        "forge": "clean",
        "diffusers": ("refused", "is not supported"),
        "invokeai": ("refused", "flux_format_from_state_dict finds none"),
        "kohya": ("ignored", "onetrainer-spelled modules ignored", 305),
    },
    "lycoris-full": {
        "comfyui": ("ignored", "diff_b keys ignored", 228),  # to_q/k/v, add_q_proj, proj_mlp: fused slices
        "forge": ("ignored", "diff_b keys ignored", 228),
        "diffusers": ("ignored", "lycoris-spelled modules ignored", 305),
        "invokeai": ("refused", "flux_format_from_state_dict finds none"),
        "kohya": ("ignored", "lycoris-spelled modules ignored", 305),
    },
    "kohya-te": {
        **{t: "clean" for t in ("comfyui", "forge", "invokeai")},
        "diffusers": ("ignored", "te2 modules ignored", 168),  # T5: 24 blocks × 7 Linear layers
        "kohya": ("ignored", "lora_te2_ modules ignored", 168),
    },
    "kohya-te3": {
        **{t: "clean" for t in ("comfyui", "forge", "kohya")},
        "diffusers": ("ignored", "te2 modules ignored", 168),
        "invokeai": ("refused", "flux_format_from_state_dict finds none"),
    },
}
RULES = [(d, t, EXPECTED[d].get(t, A1111)) for d in DIALECTS for t in TARGETS]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("check-flux")
    out = {}
    for d in DIALECTS:
        out[d] = folder / f"{d}.safetensors"
        save_tensors(out[d], _dialect(d)(SPEC), {})
    return out


@pytest.mark.parametrize(("dialect", "target", "expected"), RULES, ids=[f"{d}-{t}" for d, t, _ in RULES])
def test_rule(files: dict[str, Path], dialect: str, target: str, expected: object) -> None:
    result = check_lora(files[dialect], target, family=SPEC)
    assert result.family == "flux1"
    report = next(r for r in result.reports if r.target == target)  # --for a1111 checks Forge too
    if expected == "clean":
        assert report.clean, report.verdict
        assert report.verdict.endswith("at the right strength")
        return
    assert isinstance(expected, tuple)
    what = expected[0]
    assert not report.clean, report.verdict
    if what == "refused":
        assert report.refused and expected[1] in report.refused, report.verdict
    elif what == "unsupported":
        assert report.unsupported and expected[1] in report.unsupported, report.verdict
    elif what == "unknown":
        assert len(report.unknown) == expected[1] and report.notes, report.verdict
    else:
        group = next((g for g in report.ignored if g.short == expected[1]), None)
        assert group is not None and len(group.names) == expected[2], report.verdict


@pytest.mark.parametrize("dialect", ["kohya", "ai-toolkit", "xlabs", "kohya-te3"])
def test_family_detected_without_being_told(files: dict[str, Path], dialect: str) -> None:
    """No family given: the key names alone say FLUX.1 (the full-size names are the tiny ones)."""
    result = check_lora(files[dialect], "comfyui" if dialect != "xlabs" else "diffusers")
    assert result.family == "flux1" and result.reports[0].clean, result.reports[0].verdict


def test_alphas_only_in_metadata(tmp_path: Path) -> None:
    """An ai-toolkit file whose alphas live in lora_adapter_metadata: ComfyUI reads only '.alpha'
    tensors (scale 1), diffusers reads the metadata (right strength)."""
    import json

    path = tmp_path / "meta.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1})}
    save_tensors(path, flux_lora_dialect(SPEC, "ai-toolkit"), meta)
    (comfy,) = check_lora(path, "comfyui", family=SPEC).reports
    assert len(comfy.misapplied) == 305 and all("alpha only in metadata" in m.why for m in comfy.misapplied)
    assert all(m.expected == 0.5 and m.applied == 1.0 for m in comfy.misapplied)
    (diffusers,) = check_lora(path, "diffusers", family=SPEC).reports
    assert diffusers.clean, diffusers.verdict


# --- the diffusers row against diffusers itself ------------------------------------------------------

# diffusers' sd-scripts converter hard-codes FLUX.1's full widths (3072, 12288): kohya-spelled files
# are generated at full size (LoRA factors only, no model); the rest at tiny size, where a tiny
# FluxTransformer2DModel can take them.
FULL_SIZE = ("kohya", "kohya-split-qkv", "comfyui-native", "kohya-te", "kohya-te3", "xlabs", "ai-toolkit")
ORACLE = (*FULL_SIZE, "ai-toolkit-norm-out", "ai-toolkit-no-k", "ai-toolkit-bfl", "onetrainer", "lycoris-full")
_OLD_TEXT = re.compile(r"\.self_attn\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_LORA_SUFFIX = re.compile(r"\.(lora_[AB]|lora_linear_layer\.(down|up)|lora\.(down|up))\.weight$")


@pytest.fixture(scope="module")
def tiny_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux-base") / "base"
    write_checkpoint(SPEC, folder, "diffusers", dtype=torch.float32)
    return folder / "transformer"


def _diffusers_outcome(path: Path, spec: FamilySpec, transformer: Path | None) -> tuple[bool, set[str]]:
    """(refused, canonical modules with a LoRA) as diffusers 0.42 loads the file into FluxPipeline."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    try:
        sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    except (AssertionError, ValueError, KeyError, NotImplementedError):
        return True, set()
    names = flux_names(spec)
    kept: set[str] = set()
    for key in sd:
        # the text encoder comes back in diffusers' old "self_attn.to_q_lora.down" spelling
        key = _OLD_TEXT.sub(lambda m: f".self_attn.{m[1]}_proj.lora_A.weight", key)
        folder, _, rest = _LORA_SUFFIX.sub("", key).partition(".")
        component = {"transformer": "transformer", "text_encoder": "te1"}.get(folder)
        if component is not None:
            kept.add(f"{component}.{rest}")
    if transformer is not None:
        model = FluxTransformer2DModel.from_pretrained(transformer, torch_dtype=torch.float32)
        try:
            FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=model, adapter_name="x")
        except ValueError:
            return True, set()
        loaded = {f"transformer.{n}" for n, m in model.named_modules() if "x" in getattr(m, "lora_A", {})}
        assert loaded == {k for k in kept if k.startswith("transformer.")}
    elif any(k not in names.shapes for k in kept):
        return True, set()  # peft targets only Linear modules by their full name
    return False, kept


@pytest.mark.parametrize("dialect", ORACLE)
def test_diffusers_row_matches_diffusers(dialect: str, tmp_path: Path, tiny_transformer: Path) -> None:
    spec = FLUX1 if dialect in FULL_SIZE else SPEC
    path = tmp_path / f"{dialect}.safetensors"
    save_tensors(path, _dialect(dialect)(spec), {})
    refused, kept = _diffusers_outcome(path, spec, None if dialect in FULL_SIZE else tiny_transformer)
    (report,) = check_lora(path, "diffusers", family=spec).reports
    assert bool(report.refused) == refused, report.verdict
    if refused:
        return
    view = build_view(path, spec)
    parts = {g.module: g.parts for g in view.modules}
    applied = {p for m in report.applied for p in parts[m]}
    assert applied == kept, (sorted(applied - kept)[:5], sorted(kept - applied)[:5])


@pytest.mark.parametrize("dialect", ["kohya", "kohya-split-qkv", "xlabs"])
def test_diffusers_right_strength_is_diffusers_strength(dialect: str, tmp_path: Path) -> None:
    """'at the right strength' for diffusers: its converted factors (alpha baked in, peft scale 1
    without network alphas) give the ΔW loratools reads from the file, per canonical module."""
    from diffusers import FluxPipeline

    from loratools.formats.io import load_lora

    path = tmp_path / f"{dialect}.safetensors"
    sampled_blocks = re.compile(r"(blocks[._](0|18|37)[._])")  # full size is slow on shared CPUs
    lora = {k: v for k, v in flux_lora_dialect(FLUX1, dialect, seed=5).items() if sampled_blocks.search(k)}
    save_tensors(path, lora, {})
    (report,) = check_lora(path, "diffusers", family=FLUX1).reports
    assert report.clean, report.verdict
    sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    assert not alphas
    ours = load_lora(path, family=FLUX1).adapters
    assert ours
    g = torch.Generator().manual_seed(0)
    for module in ours:
        key = "transformer." + module.split(".", 1)[1]
        down = sd[f"{key}.lora_A.weight"].float()
        probe = torch.randn(down.shape[1], 4, generator=g)  # ΔW·x for 4 x: cheaper than full ΔW compares
        theirs = sd[f"{key}.lora_B.weight"].float() @ (down @ probe)
        torch.testing.assert_close(theirs, ours[module].delta() @ probe, rtol=1e-4, atol=1e-4)


def test_version_target_says_whose_flux_rules(files: dict[str, Path]) -> None:
    """diffusers@0.39 on a FLUX.1 file: checked by the 0.42 FLUX.1 rules, and the label says so."""
    (report,) = check_lora(files["kohya"], "diffusers@0.39", family=SPEC).reports
    assert report.verdict.startswith("diffusers ≤ 0.39 (FLUX.1 rules of diffusers 0.42): loads all 228")
