"""Block-weight vectors in each tool's numbering (docs/FORMATS.md §13), te1/te2, FLUX.1 blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_flux import flux_lora_dialect, write_flux_fixtures
from safetensors.torch import load_file

from loratools.errors import InputError
from loratools.formats.adapters import LoraFile
from loratools.formats.io import load_lora, save_lora
from loratools.io.safetensors import save_tensors
from loratools.ops.blocks import block_keys, parse_block_weights
from loratools.ops.merge import LoraInput, merge, parse_lora_arg
from loratools.synthetic import TINY, TINY_FLUX, make_lora, write_checkpoint

# Copied from the tools' sources, as data:
# hako-mikan/sd-webui-lora-block-weight scripts/lora_block_weight.py (b403cb7): BLOCKID12, BLOCKID20, BLOCKIDFLUX
LBW_BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
LBW_BLOCKID20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
LBW_BLOCKIDFLUX = ["CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT"]
# ltdrdata/ComfyUI-Inspire-Pack resources/lbw-preset.txt (1aef2c5)
INSPIRE_PRESETS = {
    "SDXL-LyC-INALL": "1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-LyC-MIDALL": "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0",
    "SDXL-LyC-OUTALL": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "SD-LyC-MIDALL": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
}
# nihedon/sd-webui-weight-helper javascript/weight_helper.js (5e8bdd8): the SDXL lycoris mask over lbw's 26 ids
WEIGHT_HELPER_SDXL_LYCORIS = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
LBW_BLOCKID26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


def _one(n: int, i: int, value: float = 1.0) -> str:
    return ",".join(str(value) if j == i else "0" for j in range(n))


SD1, SDXL, FLUX = TINY["sd1"], TINY["sdxl"], TINY_FLUX["dev"]


@pytest.mark.parametrize(
    ("text", "spec", "expected"),
    [
        # lbw: each position one block, as BLOCKID12/20/FLUX list them
        *((_one(12, i, 0.5) + "@lbw", SDXL, {b: 0.5}) for i, b in enumerate(LBW_BLOCKID12)),
        *((_one(20, i, 0.5), SDXL, {b: 0.5}) for i, b in enumerate(LBW_BLOCKID20)),
        *((_one(61, i, 0.5), FLUX, {b: 0.5}) for i, b in enumerate(LBW_BLOCKIDFLUX)),
        # weight helper's "lycoris" SDXL vector is lbw's 20 over the blocks its mask keeps
        *(
            (_one(20, i, 0.5) + "@lycoris", SDXL, {b: 0.5})
            for i, b in enumerate(b for b, on in zip(LBW_BLOCKID26, WEIGHT_HELPER_SDXL_LYCORIS, strict=True) if on)
        ),
        # Inspire: BASE also covers the unblocked modules; the middle block's parts are numbered apart
        (INSPIRE_PRESETS["SDXL-LyC-MIDALL"] + "@inspire", SDXL, {"M00.0": 1, "M00.1": 1, "M00.2": 1, "IN08": 0}),
        (INSPIRE_PRESETS["SDXL-LyC-INALL"] + "@inspire", SDXL, {"IN01": 1, "IN08": 1, "M00.0": 0, "OUT00": 0}),
        (INSPIRE_PRESETS["SDXL-LyC-OUTALL"] + "@inspire", SDXL, {"OTHER": 1, "M00.2": 0, "OUT08": 1}),
        (INSPIRE_PRESETS["SD-LyC-MIDALL"] + "@inspire", SD1, {"BASE": 1, "IN11": 0, "M00.1": 1, "OUT00": 0}),
        (INSPIRE_PRESETS["SDXL-MIDALL"] + "@inspire", SDXL, {"M00.1": 1, "IN08": 0, "OUT00": 0}),
        (_one(58, 0, 0.5) + "@inspire", FLUX, {"CLIP": 0.5, "T5": 0.5, "IN": 0.5, "OUT": 0.5, "D00": 0}),
        (_one(58, 1, 0.5) + "@inspire", FLUX, {"D00": 0.5, "CLIP": 0}),
        (_one(58, 20, 0.5) + "@inspire", FLUX, {"S00": 0.5, "D18": 0}),
        # SDXL presets by meaning
        ("INALL", SDXL, {"IN04": 1, "IN08": 1, "M00": 0, "OUT00": 0}),
        ("MIDD", SDXL, {"IN05": 0, "IN07": 1, "M00": 1, "OUT02": 1, "OUT03": 0}),
        ("OUTS", SDXL, {"OUT02": 0, "OUT03": 1, "OUT05": 1, "BASE": 1}),
    ],
)
def test_each_tools_positions_set_the_right_blocks(text: str, spec: object, expected: dict[str, float]) -> None:
    weights = parse_block_weights(text, spec)  # type: ignore[arg-type]
    for block, value in expected.items():
        assert weights.ratio(block) == value, block
    if len(expected) == 1:  # a one-hot vector sets exactly that block
        assert {k for k, v in weights.weights.items() if v != 0} == set(expected)


@pytest.mark.parametrize(
    ("text", "spec", "message"),
    [
        ("1,1,1@inspire", SDXL, r"SDXL @inspire takes 12 or 21"),
        ("1,1,1@lycoris", SDXL, r"takes 12 or 20"),
        ("1,1,1", FLUX, r"FLUX.1 @lbw takes 61"),
        ("1,1,1@inspire", FLUX, r"takes 58"),
        ("1,1@nope", SD1, r"unknown tool @nope"),
    ],
)
def test_wrong_lengths_name_the_lengths_the_tool_takes(text: str, spec: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_block_weights(text, spec)  # type: ignore[arg-type]


def test_block_keys_of_flux_modules() -> None:
    assert block_keys("transformer.transformer_blocks.18.attn.to_q", FLUX) == ("D18",)
    assert block_keys("transformer.single_transformer_blocks.37.proj_out", FLUX) == ("S37",)
    assert block_keys("transformer.x_embedder", FLUX) == ("IN",)
    assert block_keys("transformer.norm_out.linear", FLUX) == ("OUT",)
    assert block_keys("te2.encoder.block.0.layer.0.SelfAttention.q", FLUX) == ("T5",)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(SDXL, tmp_path_factory.mktemp("bw") / "sdxl.safetensors", "single")


def test_inspire_vector_merges_byte_identical_to_the_equivalent_lbw_one(sdxl_base: Path, tmp_path: Path) -> None:
    path = save_lora(make_lora(SDXL, rank=2, conv=True), tmp_path / "l.safetensors", "kohya")
    # Inspire 21: BASE, IN01-IN08, M00.0-2, OUT00-08; lbw 20: BASE, IN00-IN08, M00, OUT00-08
    inspire = "1,0.5,0,0,0.25,0,0,0,1,0.75,0.75,0.75,0,0,0,0,0,0,0,0,2@inspire"
    lbw = "1,1,0.5,0,0,0.25,0,0,0,1,0.75,0,0,0,0,0,0,0,0,2@lbw"
    merge(sdxl_base, [LoraInput(path, blocks=inspire)], tmp_path / "a.safetensors")
    merge(sdxl_base, [LoraInput(path, blocks=lbw)], tmp_path / "b.safetensors")
    untagged = parse_lora_arg(f"{path}:lbw={inspire.removesuffix('@inspire')}", "inspire")  # --blocks-from inspire
    merge(sdxl_base, [untagged], tmp_path / "c.safetensors")
    a, b, c = (load_file(tmp_path / f"{x}.safetensors") for x in "abc")
    assert a.keys() == b.keys() == c.keys()  # the header differs only in the provenance naming the vector
    for key in a:
        assert a[key].numpy().tobytes() == b[key].numpy().tobytes() == c[key].numpy().tobytes(), key
    assert any(not torch.equal(a[k], v) for k, v in load_file(sdxl_base).items())


def test_te1_and_te2_apply_separately(tmp_path: Path) -> None:
    folder = write_checkpoint(SDXL, tmp_path / "sdxl", "diffusers")
    path = save_lora(make_lora(SDXL, rank=2), tmp_path / "l.safetensors", "kohya")
    report = merge(folder, [parse_lora_arg(f"{path}:te1=0.5,te2=0")], tmp_path / "out")
    full = merge(folder, [parse_lora_arg(f"{path}:te=0.5")], tmp_path / "half")
    assert report.loras[0].patched.get("te2", 0) == 0 and report.loras[0].patched["te1"] > 0
    assert full.loras[0].patched["te2"] > 0
    for name in ("text_encoder", "text_encoder_2"):
        base = load_file(folder / name / "model.safetensors")
        out = load_file(tmp_path / "out" / name / "model.safetensors")
        half = load_file(tmp_path / "half" / name / "model.safetensors")
        changed = {k for k in base if not torch.equal(base[k], out[k])}
        if name == "text_encoder":
            assert changed and all(torch.equal(out[k], half[k]) for k in base)
        else:
            assert not changed


def test_te2_is_refused_for_one_encoder_families(tmp_path: Path) -> None:
    base = write_checkpoint(SD1, tmp_path / "sd1.safetensors", "single")
    path = save_lora(make_lora(SD1, rank=2), tmp_path / "l.safetensors", "kohya")
    with pytest.raises(InputError, match=r"te2= is for a second text encoder; SD 1\.x has one") as caught:
        merge(base, [parse_lora_arg(f"{path}:te2=0.5")], tmp_path / "o.safetensors")
    assert "\n" not in caught.value.message


def test_not_applied_lists_what_the_merge_leaves_out(sdxl_base: Path, tmp_path: Path) -> None:
    lora = make_lora(SDXL, rank=2, text=False)
    path = save_lora(lora, tmp_path / "l.safetensors", "kohya")
    vector = "0.5,1,1,1,1,1,1,1,1,1,1,0"  # BASE 0.5 on a LoRA without text encoders
    report = merge(
        sdxl_base, [parse_lora_arg(f"{path}:te2=0.5,lbw={vector}")], tmp_path / "o.safetensors", dry_run=True
    )
    items = {i["item"]: i["reason"] for i in report.loras[0].not_applied}
    assert items["te2=0.5"] == "the LoRA has no te2 modules"
    assert items["block BASE=0.5"] == "the LoRA has no modules in this block"
    assert "block OUT05=0" not in items  # the LoRA has modules there
    assert report.to_dict()["loras"][0]["not_applied"]  # type: ignore[index]


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flux_fixtures(tmp_path_factory.mktemp("fluxbw"), dtype=torch.float32)["diffusers"]


def test_flux_block_vector_equals_per_module_weights(flux_base: Path, tmp_path: Path) -> None:
    lora_path = tmp_path / "l.safetensors"
    save_tensors(lora_path, flux_lora_dialect(FLUX, "ai-toolkit", seed=5), {})
    lora = load_lora(lora_path, family=FLUX)
    ratios = {"D01": 0.0, "D05": 0.5, "S00": 2.0, "S37": -1.0}
    vector = ",".join(str(ratios.get(b, 1.0)) for b in LBW_BLOCKIDFLUX)
    report = merge(flux_base, [LoraInput(lora_path, blocks=vector)], tmp_path / "a")
    groups: dict[float, dict[str, object]] = {}
    for module, adapter in lora.adapters.items():
        groups.setdefault(ratios.get(block_keys(module, FLUX)[0], 1.0), {})[module] = adapter
    parts = [
        LoraInput(LoraFile(adapters, lora.family, lora.source_format, {}, {}), weight=w)  # type: ignore[arg-type]
        for w, adapters in groups.items()
        if w != 0
    ]
    merge(flux_base, parts, tmp_path / "b")
    a = load_file(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(flux_base / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-6), key
    assert torch.equal(a["transformer_blocks.1.attn.to_q.weight"], base["transformer_blocks.1.attn.to_q.weight"])
    assert not torch.equal(a["transformer_blocks.5.attn.to_q.weight"], base["transformer_blocks.5.attn.to_q.weight"])
    assert report.loras[0].zero_weight > 0
