"""diffusers (with peft and transformers under it) as the oracle for LoRA conversion.

Nobody here wrote these loaders, so they are an independent check of what loratools writes:

1. A kohya LoRA (plain and LoCon, one alpha for every module) and loratools' conversion of it to the
   diffusers format, each loaded by diffusers' own pipeline loader (``load_lora_weights``) into the
   tiny diffusers models: both patch exactly the LoRA's modules with no missing/unexpected-key
   report, give the same U-Net and text-encoder outputs with the adapter active, and, after
   ``fuse_lora``, every fused weight minus the base weight (read from the checkpoint files) is
   loratools' ``delta()``.
2. Per-module alphas (``alphas="varied"``): diffusers mis-scales *kohya* files with varied alphas
   (docs/FORMATS.md §2.5), so diffusers is not the judge there; the math is. loratools' value is checked
   against ``alpha/r · up @ down`` computed here from the raw file tensors. Our diffusers-format file
   (alphas in ``lora_adapter_metadata`` ``alpha_pattern``) is loaded by diffusers with every module at
   the right scale. The diffusers mis-scaling of the kohya file is pinned down exactly: mis-scaled
   modules got their component's single default ``lora_alpha`` (the patterns diffusers builds never
   match: U-Net attention keys keep the legacy ``…processor.to_k_lora.down.weight`` spelling, text
   keys are cut to ``…self_attn`` and keep ``text_model.``, which transformers 5's flattened
   ``CLIPTextModel`` no longer has — so there even ``mlp.fc1/fc2`` are missed).
3. The real old attention-processor file (catundchat SD1.5, no ``unet.`` prefix) in .safetensors and
   .bin: loratools reads family sd1, 128 modules, dialect ``diffusers-attn-processor``; diffusers'
   own ``lora_state_dict`` + ``convert_unet_state_dict_to_peft`` + ``LoraConfig`` inference give the
   same ΔW for every module (state dicts only, no full-size model), and so does diffusers' reading of
   what loratools writes from it.

HF_HUB_OFFLINE is set and sockets refuse to connect.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_NAMES, needs_real

pytest.importorskip("diffusers")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: E402
from diffusers.utils.peft_utils import _create_lora_config  # noqa: E402
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft  # noqa: E402
from helpers_diffusers_oracle import (  # noqa: E402
    ATOL,
    CATUNDCHAT,
    RANK,
    RTOL,
    UNIFORM_ALPHA,
    _component_model,
    assert_close,
    base_weights,
    build_pipeline,
    components,
    direct_deltas,
    fuse,
    fused_deltas,
    load_problems,
    load_with_diffusers,
    outputs,
    patched_modules,
)
from peft.utils.other import get_pattern_key  # noqa: E402

from loratools.families.spec import DIFFUSERS_FOLDERS  # noqa: E402
from loratools.formats.adapters import LoraFile, LowRank  # noqa: E402
from loratools.formats.io import load_lora, save_lora  # noqa: E402
from loratools.synthetic import TINY, make_lora  # noqa: E402

pytestmark = [pytest.mark.oracle]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast, and with other processes on a 2-core machine
    about twice as fast as OpenMP threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 1. kohya original vs our diffusers conversion, uniform alpha ---------------------------------
@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kohya_and_converted_load_identically_in_diffusers(
    family: str, conv: bool, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    # LoCon: U-Net only (sd-scripts --network_train_unet_only); the text encoders are covered by "lora".
    lora = make_lora(TINY[family], rank=RANK, alpha=UNIFORM_ALPHA, conv=conv, text=not conv)
    expected = set(lora.adapters)
    kohya_path = save_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    converted = load_lora(kohya_path, family=TINY[family])
    assert converted.source_format == "kohya"
    assert set(converted.adapters) == expected
    ours_path = save_lora(converted, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    base = base_weights(folder, sorted(expected))

    # Both files go into one pipeline as two adapters; each is checked alone (set_adapters / fuse).
    pipe = build_pipeline(folder, family)
    reference = outputs(pipe, family)
    adapters = {"kohya_file": kohya_path, "ours_file": ours_path}
    for i, (adapter, path) in enumerate(adapters.items()):
        problems = load_with_diffusers(pipe, family, path, adapter, expected, others=tuple(adapters)[:i])
        assert problems == [], f"{adapter}: diffusers reported {problems}"
        patched = patched_modules(pipe, family, adapter)
        assert patched == expected, (
            f"{adapter}: not patched {sorted(expected - patched)[:5]}, unexpected {sorted(patched - expected)[:5]}"
        )
    active = {}
    for adapter in adapters:
        pipe.set_adapters([adapter])
        active[adapter] = outputs(pipe, family)
    touched = {m.split(".", 1)[0] for m in expected}
    for key, value in active["kohya_file"].items():
        if key.split(".", 1)[0] in touched:
            assert not torch.allclose(value, reference[key], rtol=RTOL, atol=ATOL), f"{key}: the LoRA changed nothing"
        else:
            assert torch.equal(value, reference[key]), f"{key}: changed by a LoRA that has no such modules"
        assert_close(active["ours_file"][key], value, f"{key} output, ours vs kohya file")

    for adapter in adapters:
        fuse(pipe, family, adapter)
        fused = fused_deltas(pipe, base)
        for module, lowrank in converted.adapters.items():
            assert_close(fused[module], lowrank.delta(), f"{module}: diffusers-fused {adapter} vs our delta()")
        pipe.unfuse_lora(components=[DIFFUSERS_FOLDERS[c] for c in components(family)])


# -- 2. per-module alphas -------------------------------------------------------------------------
def varied_lora(family: str) -> LoraFile:
    """Alphas 1…8 across modules. SDXL: every third U-Net module (still all eight alphas and every
    module kind) and every text-encoder module, because peft matches every module against every
    alpha_pattern key (≈30 s for all 986 modules). Every text encoder keeps its out_proj modules:
    without them diffusers drops q/k/v (see test_kohya_text_encoder_without_out_proj)."""
    lora = make_lora(TINY[family], rank=RANK, alphas="varied")
    if family != "sdxl":
        return lora
    unet = [m for m in lora.adapters if m.startswith("unet.")]
    keep = set(unet[::3]) | {m for m in lora.adapters if not m.startswith("unet.")}
    return lora.with_adapters({m: a for m, a in lora.adapters.items() if m in keep})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_varied_alphas_our_diffusers_file_is_scaled_right_by_diffusers(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoints[(family, "diffusers")]
    lora = varied_lora(family)
    assert len({a.alpha for a in lora.adapters.values()}) == 8
    kohya_path = save_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    direct = direct_deltas(kohya_path, family)
    ours = load_lora(kohya_path, family=TINY[family])
    assert set(ours.adapters) == set(direct) == set(lora.adapters)
    for module, (_, delta) in direct.items():
        assert_close(ours.adapters[module].delta(), delta, f"{module}: loratools delta() vs alpha/r·up@down")

    ours_path = save_lora(ours, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    reread = load_lora(ours_path, family=TINY[family])
    for module, (alpha, delta) in direct.items():
        assert reread.adapters[module].alpha == pytest.approx(alpha)
        assert_close(reread.adapters[module].delta(), delta, f"{module}: loratools re-read of its diffusers file")

    pipe = build_pipeline(folder, family)
    problems = load_with_diffusers(pipe, family, ours_path, "ours_file", set(direct))
    assert problems == [], f"diffusers/peft reported {problems}"  # includes "alpha_pattern keys did not match"
    assert patched_modules(pipe, family, "ours_file") == set(direct)
    fuse(pipe, family, "ours_file")
    fused = fused_deltas(pipe, base_weights(folder, sorted(direct)))
    wrong = [m for m, (_, d) in direct.items() if not torch.allclose(fused[m], d, rtol=RTOL, atol=ATOL)]
    assert wrong == [], f"diffusers applied our alpha_pattern wrongly to {len(wrong)} modules, e.g. {wrong[:5]}"


def _mis_scaled_alpha(fused: torch.Tensor, alpha: float, delta: torch.Tensor) -> float:
    """The alpha diffusers actually used: fused = (used/alpha) · delta, solved by least squares."""
    return float((fused.flatten() @ delta.flatten()) / (delta.flatten() @ delta.flatten())) * alpha


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_varied_alphas_kohya_file_diffusers_misscales_math_sides_with_us(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """Documents docs/FORMATS.md §2.5 with diffusers 0.42.1 / peft 0.21.2 / transformers 5.23.0.

    The kohya file says ΔW = alpha/r · up @ down per module (sd-scripts networks/lora.py); loratools
    gives exactly that. diffusers gives it only for the modules whose alpha_pattern key happens to
    match; every other module gets its component's default lora_alpha (the most common one).
    Measured: sd1 112 of 192 U-Net and 63 of 72 text-encoder modules wrong (the rest happen to have
    the default alpha): every U-Net attention projection, TE1's self_attn *and* mlp (transformers 5
    builds CLIPTextModel without ``text_model``, diffusers strips that prefix from the keys but not
    from the alpha patterns), TE2's (CLIPTextModelWithProjection) self_attn only.
    """
    folder = tiny_checkpoints[(family, "diffusers")]
    lora = varied_lora(family)
    kohya_path = save_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    direct = direct_deltas(kohya_path, family)
    ours = load_lora(kohya_path, family=TINY[family])
    for module, (alpha, delta) in direct.items():
        assert ours.adapters[module].alpha == pytest.approx(alpha)
        assert_close(ours.adapters[module].delta(), delta, f"{module}: loratools delta() vs alpha/r·up@down")

    pipe = build_pipeline(folder, family)
    with load_problems() as problems:
        pipe.load_lora_weights(str(kohya_path), adapter_name="kohya_file")
    assert patched_modules(pipe, family, "kohya_file") == set(direct)  # names are right; scales are not
    fuse(pipe, family, "kohya_file")
    fused = fused_deltas(pipe, base_weights(folder, sorted(direct)))

    used: dict[str, float] = {}
    for module, (alpha, delta) in direct.items():
        used[module] = round(_mis_scaled_alpha(fused[module], alpha, delta), 3)
        assert_close(fused[module], delta * (used[module] / alpha), f"{module}: diffusers ΔW is not a rescaled ΔW")
    wrong = {m for m, (alpha, _) in direct.items() if used[m] != pytest.approx(alpha)}
    assert wrong, "diffusers now applies kohya per-module alphas: update docs/FORMATS.md §2.5 and this test"
    assert any("alpha_pattern keys did not match" in p for p in problems), problems[:3]
    # Each component's wrong modules all got one alpha: the default lora_alpha they fell back to.
    default = {}
    for component in components(family):
        fallback = {used[m] for m in wrong if m.startswith(f"{component}.")}
        assert len(fallback) <= 1, (component, fallback)
        default[component] = fallback.pop() if fallback else None

    # Exactly the modules whose alpha_pattern key cannot match, unless their alpha is the default:
    # U-Net attention projections (legacy processor spelling), text self_attn (key cut to
    # "…self_attn"), and every module of a CLIPTextModel built without "text_model" (transformers 5).
    def unmatched(module: str) -> bool:
        component, path = module.split(".", 1)
        if component == "unet":
            return re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", path) is not None
        return ".self_attn." in path or not hasattr(_component_model(pipe, component), "text_model")

    predicted = {m for m, (alpha, _) in direct.items() if unmatched(m) and alpha != default[m.split(".", 1)[0]]}
    assert wrong == predicted, (sorted(wrong - predicted)[:5], sorted(predicted - wrong)[:5])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kohya_text_encoder_without_out_proj(
    family: str, tiny_checkpoints: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """A diffusers limitation our conversion works around.

    diffusers' kohya converter spells text-encoder attention keys the oldest way
    (``…self_attn.to_k_lora.down.weight``) and mlp keys the ``lora_linear_layer`` way; then
    ``convert_state_dict_to_diffusers`` takes the old spelling only when *some* key has
    ``to_out_lora``. A kohya file whose text-encoder LoRA has q/k/v but no out_proj is therefore
    never renamed: transformers reports the ``to_*_lora`` keys as UNEXPECTED (a log line, no error)
    and q/k/v stay unpatched. loratools' diffusers file of the same LoRA loads in full.
    """
    folder = tiny_checkpoints[(family, "diffusers")]
    full = make_lora(TINY[family], rank=RANK, alpha=UNIFORM_ALPHA)
    targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")
    lora = full.with_adapters({m: a for m, a in full.adapters.items() if m.endswith(targets)})
    text = set(lora.adapters)
    qkv = {m for m in text if ".self_attn." in m}
    assert {m.split(".", 1)[0] for m in text} == set(components(family)) - {"unet"} and qkv
    kohya_path = save_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    ours_path = save_lora(load_lora(kohya_path, family=TINY[family]), tmp_path / "ours.safetensors", "diffusers")

    pipe = build_pipeline(folder, family)
    with load_problems() as problems:
        pipe.load_lora_weights(str(kohya_path), adapter_name="kohya_file")
    assert patched_modules(pipe, family, "kohya_file") == text - qkv
    assert any("UNEXPECTED" in p and re.search(r"to_[qkv]_lora", p) for p in problems), problems

    pipe = build_pipeline(folder, family)
    assert load_with_diffusers(pipe, family, ours_path, "ours_file", text) == []
    assert patched_modules(pipe, family, "ours_file") == text
    fuse(pipe, family, "ours_file")
    fused = fused_deltas(pipe, base_weights(folder, sorted(text)))
    for module, adapter in lora.adapters.items():
        assert_close(fused[module], adapter.delta(), f"{module}: diffusers-fused diffusers file vs our delta()")


# -- 3. old diffusers attention-processor files ---------------------------------------------------
def _read_raw(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors_torch.load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def diffusers_adapters(
    state_dict: dict[str, torch.Tensor], metadata: dict | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``unet.<module>`` → (lora_B, lora_A, scaling) as diffusers' load_lora_adapter sets a U-Net up:
    its key conversion, its LoraConfig (r/lora_alpha/rank_pattern/alpha_pattern inferred from the
    state dict, or taken from the metadata), peft's pattern lookup and ``scaling = lora_alpha / r``."""
    if "lora_A" not in next(iter(state_dict)):  # as load_lora_adapter decides
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k}
    config = _create_lora_config(state_dict, None, metadata, ranks)
    out = {}
    for key in state_dict:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        down, up = state_dict[key], state_dict[f"{module}.lora_B.weight"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        assert r == down.shape[0] == up.shape[1]
        out[f"unet.{module}"] = (up, down, alpha / r)
    return out


@needs_real("catundchat_sd15", "pytorch_lora_weights.safetensors")
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_old_attn_processor_file_matches_diffusers_conversion(suffix: str, tmp_path: Path) -> None:
    path = CATUNDCHAT.with_suffix(suffix)
    raw = _read_raw(path)
    assert len(raw) == 256
    assert not any(k.startswith("unet.") for k in raw)  # the very old layout, no component prefix
    assert all(".processor.to_" in k and "_lora." in k for k in raw)

    lora = load_lora(path)
    assert lora.family.name == "sd1"
    assert lora.source_format == "diffusers-attn-processor"
    assert len(lora.adapters) == 128
    assert lora.components() == {"unet": 128}
    assert all(isinstance(a, LowRank) and a.rank == 4 and a.alpha == 4 for a in lora.adapters.values())

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert alphas is None  # not a kohya file: no network_alphas, so diffusers' scale is 1
    theirs = diffusers_adapters(state_dict)
    assert set(theirs) == set(lora.adapters)
    for module, (up, down, scaling) in theirs.items():
        delta = (up.float() @ down.float()) * scaling
        assert_close(lora.adapters[module].delta(), delta, f"{module}: ours vs diffusers")

    # What loratools writes from it, read back the way diffusers does (unet. prefix + metadata):
    # the same factors and scales as diffusers' own reading of the original.
    written = save_lora(lora, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    state_dict, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(written), return_lora_metadata=True)
    assert all(k.startswith("unet.") for k in state_dict)
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items()}
    unet_meta = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")}
    again = diffusers_adapters(unet_state, unet_meta)
    assert set(again) == set(theirs)
    for module, (up, down, scaling) in again.items():
        assert torch.equal(up, theirs[module][0]) and torch.equal(down, theirs[module][1]), module
        assert scaling == theirs[module][2], module
