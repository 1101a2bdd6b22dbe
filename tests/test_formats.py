"""LoRA dialects: every pair of formats round-trips exactly, ΔW is preserved, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_NAMES, REAL_LORAS, needs_real
from safetensors.torch import load_file, save_file

from loratools.errors import InputError
from loratools.formats.adapters import LoHa, LoKr, LoraFile, LowRank
from loratools.formats.io import load_lora, save_lora
from loratools.ops.convert import convert_lora, prepare
from loratools.synthetic import TINY, make_lora

FORMATS = ("kohya", "diffusers", "peft", "cloneofsimo")
CLONEOFSIMO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "q_proj", "k_proj", "v_proj", "out_proj")


def _lora_for(fmt: str, family: str, **kwargs: object) -> LoraFile:
    lora = make_lora(TINY[family], **kwargs)  # type: ignore[arg-type]
    if fmt == "cloneofsimo":  # lora_diffusion targets attention and GEGLU only, and has no alpha
        lora = lora.with_adapters(
            {
                m: LowRank(a.up, a.down, float(a.rank))
                for m, a in lora.adapters.items()
                if m.endswith(CLONEOFSIMO_TARGETS)
            }
        )
    return lora


def _path(tmp_path: Path, fmt: str, tag: str) -> Path:
    return tmp_path / (f"{tag}.peft" if fmt == "peft" else f"{tag}.{fmt}.safetensors")


def _assert_same_factors(a: LoraFile, b: LoraFile) -> None:
    assert a.adapters.keys() == b.adapters.keys()
    for module, x in a.adapters.items():
        y = b.adapters[module]
        assert isinstance(y, LowRank) and isinstance(x, LowRank)
        assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down), module
        assert x.up.dtype == y.up.dtype and x.alpha == y.alpha, module


def _assert_same_delta(a: LoraFile, b: LoraFile) -> None:
    assert a.adapters.keys() == b.adapters.keys()
    for module, x in a.adapters.items():
        expected = x.delta()
        got = b.adapters[module].delta()
        assert got.numel() == expected.numel(), module
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-6, atol=1e-7, msg=module)


PAIRS = [(a, b) for a in FORMATS for b in FORMATS if a != b]


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_every_pair_of_formats_round_trips_bit_exact(tmp_path: Path, family: str, first: str, second: str) -> None:
    if "cloneofsimo" in (first, second) and family == "sdxl":
        pytest.skip("lora_diffusion predates SDXL")
    original = _lora_for("cloneofsimo" if "cloneofsimo" in (first, second) else first, family, alphas="varied")
    a = _path(tmp_path, first, "a")
    save_lora(original, a, first)
    read_a = load_lora(a, TINY[family])
    _assert_same_factors(original, read_a)
    b = _path(tmp_path, second, "b")
    save_lora(read_a, b, second)
    read_b = load_lora(b, TINY[family])
    _assert_same_factors(original, read_b)
    _assert_same_delta(original, read_b)
    again = _path(tmp_path, first, "c")
    save_lora(read_b, again, first)
    _assert_same_factors(original, load_lora(again, TINY[family]))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_locon_conv_modules_and_dtypes_survive(tmp_path: Path, family: str, fmt: str, dtype: torch.dtype) -> None:
    lora = make_lora(TINY[family], conv=True, dtype=dtype, alphas="varied")
    assert any(a.down.dim() == 4 and a.down.shape[-1] == 3 for a in lora.adapters.values())
    path = _path(tmp_path, fmt, "x")
    save_lora(lora, path, fmt)
    _assert_same_factors(lora, load_lora(path, TINY[family]))


def test_kohya_writes_native_spelling_and_alpha(tmp_path: Path, family: str) -> None:
    lora = make_lora(TINY[family], alpha=3.0)
    save_lora(lora, tmp_path / "k.safetensors", "kohya")
    keys = list(load_file(tmp_path / "k.safetensors"))
    unet = [k for k in keys if k.startswith("lora_unet_")]
    native = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(native) for k in unet)
    assert sum(k.endswith(".alpha") for k in keys) == len(lora.adapters)
    text = {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")}
    assert text == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})


def test_both_unet_spellings_read_the_same(tmp_path: Path, family: str) -> None:
    """SDXL LoRAs come in SGM (kohya) and diffusers (other trainers) spellings; SD1/2 likewise."""
    lora = make_lora(TINY[family], text=False)
    save_lora(lora, tmp_path / "k.safetensors", "kohya")
    tensors = load_file(tmp_path / "k.safetensors")
    from loratools.formats.names import name_tables

    tables = name_tables(TINY[family])
    swapped = {}
    for key, tensor in tensors.items():
        name, param = key.split(".", 1)
        module = tables.modules[tables.kohya[name]]
        other = module.path if family == "sdxl" else module.ldm_path
        swapped[f"lora_unet_{other.replace('.', '_')}.{param}"] = tensor
    save_file(swapped, tmp_path / "swapped.safetensors")
    _assert_same_factors(lora, load_lora(tmp_path / "swapped.safetensors", TINY[family]))


def test_peft_configs_carry_per_module_alpha(tmp_path: Path) -> None:
    lora = make_lora(TINY["sd1"], alphas="varied")
    save_lora(lora, tmp_path / "p", "peft")
    config = json.loads((tmp_path / "p" / "unet" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["alpha_pattern"] and config["peft_type"] == "LORA"
    weights = load_file(tmp_path / "p" / "unet" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in weights)


def test_rslora_alpha_becomes_alpha_sqrt_r(tmp_path: Path) -> None:
    lora = make_lora(TINY["sd1"], alpha=4.0, text=False)
    save_lora(lora, tmp_path / "p", "peft")
    config_path = tmp_path / "p" / "unet" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(use_rslora=True, lora_alpha=4.0, alpha_pattern={})
    config_path.write_text(json.dumps(config))
    read = load_lora(tmp_path / "p", TINY["sd1"])
    for adapter in read.adapters.values():
        assert adapter.scale == pytest.approx(4.0 / 2.0)  # lora_alpha / sqrt(4)


def test_dora_round_trips_between_kohya_and_peft(tmp_path: Path) -> None:
    base = make_lora(TINY["sd1"], text=False)
    adapters = {}
    for module, a in base.adapters.items():
        shape = a.delta_shape()
        magnitude = torch.rand(shape[0], *[1] * (len(shape) - 1)) + 0.5
        adapters[module] = LowRank(a.up, a.down, a.alpha, dora_scale=magnitude, dora_axis="out")
    lora = base.with_adapters(adapters)
    save_lora(lora, tmp_path / "k.safetensors", "kohya")
    read = load_lora(tmp_path / "k.safetensors", TINY["sd1"])
    assert read.kinds == {"dora": len(adapters)}
    save_lora(read, tmp_path / "d.safetensors", "diffusers")
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(tmp_path / "d.safetensors"))
    back = load_lora(tmp_path / "d.safetensors", TINY["sd1"])
    save_lora(back, tmp_path / "k2.safetensors", "kohya")
    first, second = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "k2.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _lycoris_lora(family: str) -> LoraFile:
    g = torch.Generator().manual_seed(1)
    spec = TINY[family]
    plain = make_lora(spec, text=False)
    adapters = {}
    for i, (module, a) in enumerate(plain.adapters.items()):
        out, inp = a.delta_shape()[:2]
        if i % 2:
            adapters[module] = LoHa(
                torch.randn(out, 2, generator=g),
                torch.randn(2, inp, generator=g),
                torch.randn(out, 2, generator=g),
                torch.randn(2, inp, generator=g),
                1.0,
            )
        else:
            adapters[module] = LoKr(
                2.0,
                w1=torch.randn(2, 2, generator=g) if out % 2 == 0 and inp % 2 == 0 else torch.ones(1, 1),
                w2a=torch.randn(out // 2 if out % 2 == 0 and inp % 2 == 0 else out, 2, generator=g),
                w2b=torch.randn(2, inp // 2 if out % 2 == 0 and inp % 2 == 0 else inp, generator=g),
            )
    return plain.with_adapters(adapters)


def test_loha_lokr_are_exact_in_kohya_and_refused_elsewhere_with_the_way_out(tmp_path: Path, family: str) -> None:
    lora = _lycoris_lora(family)
    save_lora(lora, tmp_path / "ly.safetensors", "kohya")
    read = load_lora(tmp_path / "ly.safetensors", TINY[family])
    assert read.kinds == lora.kinds
    _assert_same_delta(lora, read)
    for fmt in ("diffusers", "peft", "cloneofsimo"):
        with pytest.raises(InputError, match="--to-lora"):
            prepare(read, fmt)
    # the way out: an SVD in factor space, exact at full rank
    converted = prepare(read, "diffusers", to_lora=True, rank=64)
    assert converted.only_plain_lora()
    _assert_same_delta_loose(read, converted)


def _assert_same_delta_loose(a: LoraFile, b: LoraFile) -> None:
    for module, x in a.adapters.items():
        expected = x.delta()
        got = b.adapters[module].delta().reshape(expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=module)


def test_to_lora_error_bound_is_met_and_optimal(tmp_path: Path) -> None:
    lora = _lycoris_lora("sd1")
    converted = prepare(lora, "kohya", to_lora=True, error=0.3)
    for module, adapter in lora.adapters.items():
        dense = adapter.delta().reshape(adapter.delta().shape[0], -1).double()
        approx = converted.adapters[module].delta().reshape(dense.shape).double()
        relative = float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense))
        assert relative <= 0.3 + 1e-5, module
        sv = torch.linalg.svdvals(dense)  # independent: numpy-grade dense SVD of the same ΔW
        k = converted.adapters[module].rank
        optimal = float(torch.sqrt((sv[k:] ** 2).sum() / (sv**2).sum()))
        assert relative == pytest.approx(optimal, abs=1e-5), module


def test_bake_preserves_delta_and_sets_alpha_to_rank() -> None:
    lora = make_lora(TINY["sd2"], alphas="varied")
    baked = prepare(lora, "kohya", bake_scale=True)
    assert all(a.alpha == a.rank for a in baked.adapters.values())
    _assert_same_delta(lora, baked)
    with pytest.raises(InputError, match="--bake"):
        prepare(lora, "cloneofsimo")


# --- real files -----------------------------------------------------------------------------------


@needs_real("catundchat_sd15")
@pytest.mark.parametrize("name", ["pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"])
def test_real_old_diffusers_attention_processor_files(name: str) -> None:
    lora = load_lora(REAL_LORAS / "catundchat_sd15" / name)
    assert lora.family.name == "sd1"
    assert lora.source_format == "diffusers-attn-processor"
    assert len(lora.adapters) == 128 and lora.components() == {"unet": 128}
    assert {a.rank for a in lora.adapters.values()} == {4}
    assert all(a.scale == 1.0 for a in lora.adapters.values())


@needs_real("catundchat_sd15")
def test_real_files_convert_to_every_format_and_back(tmp_path: Path) -> None:
    source = REAL_LORAS / "catundchat_sd15" / "pytorch_lora_weights.safetensors"
    original = load_lora(source)
    for fmt in FORMATS:
        out = _path(tmp_path, fmt, "real")
        convert_lora(source, out, fmt)
        _assert_same_factors(original, load_lora(out))


# --- bad input ------------------------------------------------------------------------------------


def _kohya_tensors(family: str = "sd1") -> dict[str, torch.Tensor]:
    from loratools.formats.kohya import kohya_state_dict

    return kohya_state_dict(make_lora(TINY[family], alpha=2.0))


def test_missing_alpha_states_the_assumed_scale(tmp_path: Path) -> None:
    tensors = {k: v for k, v in _kohya_tensors().items() if not k.endswith(".alpha")}
    save_file(tensors, tmp_path / "a.safetensors")
    lora = load_lora(tmp_path / "a.safetensors", TINY["sd1"])
    assert all(a.scale == 1.0 for a in lora.adapters.values())
    assert any("no alpha" in w and "scale 1" in w for w in lora.warnings)


def test_rank_mismatch_is_refused(tmp_path: Path) -> None:
    tensors = _kohya_tensors()
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="rank mismatch"):
        load_lora(tmp_path / "a.safetensors", TINY["sd1"])


def test_same_module_in_two_spellings_is_refused(tmp_path: Path) -> None:
    tensors = _kohya_tensors("sdxl")
    from loratools.formats.names import name_tables

    tables = name_tables(TINY["sdxl"])
    key = next(k for k in tensors if k.startswith("lora_unet_input_blocks"))
    name = key.split(".", 1)[0]
    dup = f"lora_unet_{tables.modules[tables.kohya[name]].path.replace('.', '_')}"
    tensors.update(
        {f"{dup}.{k.split('.', 1)[1]}": v.clone() for k, v in list(tensors.items()) if k.startswith(name + ".")}
    )
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="given twice"):
        load_lora(tmp_path / "a.safetensors", TINY["sdxl"])


def test_kohya_and_peft_keys_in_one_file_are_refused(tmp_path: Path) -> None:
    tensors = _kohya_tensors()
    tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.zeros(4, 8)
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="mixes kohya and diffusers"):
        load_lora(tmp_path / "a.safetensors")


@needs_real("cloneofsimo_lora")
def test_textual_inversion_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="textual-inversion embedding"):
        load_lora(REAL_LORAS / "cloneofsimo_lora" / "lora_kiriko2.ti.pt")
    save_file({"emb_params": torch.zeros(2, 768)}, tmp_path / "ti.safetensors")
    with pytest.raises(InputError, match="textual-inversion embedding"):
        load_lora(tmp_path / "ti.safetensors")


def test_unknown_layout_lists_first_keys(tmp_path: Path) -> None:
    save_file({"foo.bar": torch.zeros(1), "baz.qux": torch.zeros(1)}, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match=r"unknown LoRA key layout; first keys: baz\.qux, foo\.bar"):
        load_lora(tmp_path / "a.safetensors")


def test_metadata_claiming_sd15_with_sdxl_shapes_warns_and_shapes_win(tmp_path: Path) -> None:
    from loratools.formats.kohya import kohya_state_dict
    from loratools.synthetic import FAMILIES

    lora = make_lora(FAMILIES["sdxl"], rank=1, text=False)
    tensors = {k: v for k, v in kohya_state_dict(lora).items() if "input_blocks_4_1" in k}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    read = load_lora(tmp_path / "a.safetensors")
    assert read.family.name == "sdxl"
    assert any("claims SD 1.x" in w and "shapes say SDXL" in w for w in read.warnings)


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_full_size_family_is_told_from_shapes(tmp_path: Path, family_name: str) -> None:
    """SD1 and SD2 share every U-Net name: only the shapes (context 768 vs 1024) tell them apart."""
    from loratools.formats.kohya import kohya_state_dict
    from loratools.synthetic import FAMILIES

    lora = make_lora(FAMILIES[family_name], rank=1)
    keep = [m for m in lora.adapters if "attn2" in m or "self_attn" in m][:40]
    tensors = kohya_state_dict(lora.with_adapters({m: lora.adapters[m] for m in keep}))
    save_file(tensors, tmp_path / "a.safetensors")
    assert load_lora(tmp_path / "a.safetensors").family.name == family_name


@needs_real("cloneofsimo_lora")
def test_embeddings_are_never_dropped(tmp_path: Path) -> None:
    """Textual-inversion tokens ride along in kohya/cloneofsimo files and beside diffusers/peft ones."""
    source = REAL_LORAS / "cloneofsimo_lora" / "lora_disney.safetensors"
    report = convert_lora(source, tmp_path / "k.safetensors", "kohya")
    assert report.embeddings == 2
    assert set(load_lora(tmp_path / "k.safetensors").embeddings) == {"<s1>", "<s2>"}
    # issue 13: the kohya writer stores them in A1111's bundle form, the one loader reading them there
    bundled = {"bundle_emb.s1.string_to_param.*", "bundle_emb.s2.string_to_param.*"}
    assert bundled <= set(load_file(tmp_path / "k.safetensors"))
    report = convert_lora(source, tmp_path / "d.safetensors", "diffusers")
    sidecar = load_file(tmp_path / "d.embeddings.safetensors")
    assert set(sidecar) == {"<s1>", "<s2>"} and any("d.embeddings.safetensors" in w for w in report.warnings)
    assert not any(k.startswith("<") for k in load_file(tmp_path / "d.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_is_finite_confirms_a_sum_that_overflows(dtype: torch.dtype) -> None:
    """is_finite sums in float32; values near bf16/float32's maximum overflow that sum although
    each is finite, so an infinite sum is confirmed elementwise (and real inf/NaN still found)."""
    from loratools.formats.adapters import is_finite

    big = torch.full((4, 2), torch.finfo(dtype).max, dtype=dtype)
    if dtype == torch.float64:
        big = torch.full((4, 2), 1e300, dtype=dtype)
    small = torch.ones(2, 3, dtype=dtype)
    assert is_finite(LowRank(big, small, 2.0))
    for bad in (float("inf"), float("nan")):
        broken = big.clone()
        broken[1, 1] = bad
        assert not is_finite(LowRank(broken, small, 2.0))
        broken_down = small.clone()
        broken_down[0, 2] = bad
        assert not is_finite(LowRank(big, broken_down, 2.0))
