"""Block-weight vectors in each tool's numbering (docs/FORMATS.md §13), translated to loratools ids.

The expected orderings are copied as data from each tool's source:
- lbw: hako-mikan/sd-webui-lora-block-weight scripts/lora_block_weight.py, ``BLOCKID17``,
  ``BLOCKID26``, ``BLOCKID12``, ``BLOCKID20``, ``BLOCKIDFLUX``.
- inspire: ltdrdata/ComfyUI-Inspire-Pack inspire/lora_block_weight.py
  (``LoraLoaderBlockWeight.load_lbw``: BASE, then the populated input, middle, output blocks in
  order; double/single blocks for FLUX) and resources/lbw-preset.txt (SDXL 12 / SDXL-LyC 21,
  FLUX 58 values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools.errors import InputError
from loratools.formats.io import save_lora
from loratools.ops.blocks import block_keys, parse_block_weights
from loratools.ops.merge import parse_lora_arg
from loratools.synthetic import TINY, TINY_FLUX, make_lora

IN = [f"IN{i:02d}" for i in range(12)]
OUT = [f"OUT{i:02d}" for i in range(12)]
D = [f"D{i:02d}" for i in range(19)]
S = [f"S{i:02d}" for i in range(38)]

# tool, family, the tool's own labels position by position → the loratools ids each sets
TABLES: list[tuple[str, str, list[tuple[str, ...]]]] = [
    # lbw BLOCKID17
    (
        "lbw",
        "sd1",
        [
            ("BASE",),
            *[(b,) for b in ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08")],
            ("M00",),
            *[(b,) for b in OUT[3:]],
        ],
    ),
    # lbw BLOCKID26
    ("lbw", "sd1", [("BASE",), *[(b,) for b in IN], ("M00",), *[(b,) for b in OUT]]),
    # lbw BLOCKID12
    ("lbw", "sdxl", [("BASE",), *[(b,) for b in ("IN04", "IN05", "IN07", "IN08")], ("M00",), *[(b,) for b in OUT[:6]]]),
    # lbw BLOCKID20
    ("lbw", "sdxl", [("BASE",), *[(b,) for b in IN[:9]], ("M00",), *[(b,) for b in OUT[:9]]]),
    # inspire SDXL (12): BASE covers every module outside a block
    (
        "inspire",
        "sdxl",
        [("BASE", "OTHER"), *[(b,) for b in ("IN04", "IN05", "IN07", "IN08")], ("M00.1",), *[(b,) for b in OUT[:6]]],
    ),
    # inspire SDXL-LyC (21): input blocks 1-8, the middle block's three parts, output 0-8
    (
        "inspire",
        "sdxl",
        [("BASE", "OTHER"), *[(b,) for b in IN[1:9]], ("M00.0",), ("M00.1",), ("M00.2",), *[(b,) for b in OUT[:9]]],
    ),
    # inspire SD-LyC (27)
    (
        "inspire",
        "sd1",
        [("BASE", "OTHER"), *[(b,) for b in IN[1:]], ("M00.0",), ("M00.1",), ("M00.2",), *[(b,) for b in OUT]],
    ),
    # lbw BLOCKIDFLUX (61)
    ("lbw", "flux", [("CLIP",), ("T5",), ("IN",), *[(b,) for b in D], *[(b,) for b in S], ("OUT",)]),
    # inspire FLUX (58): BASE, double, single
    ("inspire", "flux", [("CLIP", "T5", "IN", "OUT"), *[(b,) for b in D], *[(b,) for b in S]]),
    # weight helper's vectors are lbw's (read by lbw)
    ("lycoris", "sdxl", [("BASE",), *[(b,) for b in IN[:9]], ("M00",), *[(b,) for b in OUT[:9]]]),
    ("lycoris", "flux", [("CLIP",), ("T5",), ("IN",), *[(b,) for b in D], *[(b,) for b in S], ("OUT",)]),
]


def _spec(family: str):  # type: ignore[no-untyped-def]
    return TINY_FLUX["dev"] if family == "flux" else TINY[family]


@pytest.mark.parametrize(("tool", "family", "positions"), TABLES, ids=[f"{t}-{f}-{len(p)}" for t, f, p in TABLES])
def test_each_position_sets_the_tools_blocks(tool: str, family: str, positions: list[tuple[str, ...]]) -> None:
    values = [round(0.01 * (i + 1), 2) for i in range(len(positions))]
    vector = ",".join(f"{v:g}" for v in values) + f"@{tool}"
    expected = {block: value for position, value in zip(positions, values, strict=True) for block in position}
    assert parse_block_weights(vector, _spec(family)).weights == expected


@pytest.mark.parametrize(
    ("tool", "family", "lengths"),
    [("lbw", "sdxl", "12 or 20"), ("inspire", "sdxl", "12 or 21"), ("inspire", "flux", "58"), ("lbw", "flux", "61")],
)
def test_a_wrong_length_names_the_tools_lengths(tool: str, family: str, lengths: str) -> None:
    with pytest.raises(InputError, match=f"@{tool} takes {lengths}"):
        parse_block_weights("1,1,1@" + tool, _spec(family))


def test_blocks_from_sets_the_default_tool() -> None:
    vector = ",".join(["1"] * 21)
    assert parse_lora_arg(f"a.safetensors:lbw={vector}", "inspire").blocks_from == "inspire"
    assert parse_block_weights(vector, TINY["sdxl"], "inspire").tool == "inspire"
    with pytest.raises(InputError, match="12 or 20"):
        parse_block_weights(vector, TINY["sdxl"])


@pytest.mark.parametrize(
    ("preset", "on"),
    [
        ("INALL", {"BASE", "IN04", "IN05", "IN07", "IN08"}),
        ("INS", {"BASE", "IN04", "IN05"}),
        ("IND", {"BASE", "IN07", "IN08"}),
        ("MIDD", {"BASE", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02"}),
        ("OUTD", {"BASE", "OUT00", "OUT01", "OUT02"}),
        ("OUTS", {"BASE", "OUT03", "OUT04", "OUT05"}),
        ("OUTALL", {"BASE", *OUT[:6]}),
    ],
)
def test_sdxl_presets_by_meaning(preset: str, on: set[str]) -> None:
    """SD's shallow input blocks (64×64 latents' IN01/IN02, IN04/IN05 …) map to SDXL's by depth."""
    weights = parse_block_weights(preset, TINY["sdxl"]).weights
    assert {b for b, v in weights.items() if v == 1.0} == on


def test_blend_takes_block_vectors_in_any_tools_numbering(tmp_path: Path) -> None:
    """blend a:lbw=…@inspire equals blend a:lbw=… (lbw numbering) and scales exactly the named blocks."""
    from click.testing import CliRunner

    from loratools.cli.main import cli
    from loratools.formats.io import load_lora

    lora = save_lora(make_lora(TINY["sdxl"], rank=2), tmp_path / "l.safetensors", "kohya")
    inspire = ",".join(["1"] * 9 + ["0.5"] * 3 + ["1"] * 9)  # the middle block at 0.5
    runs = {
        "inspire": [f"{lora}:lbw={inspire}", "--blocks-from", "inspire"],
        "lbw": [f"{lora}:lbw=1,1,1,1,1,0.5,1,1,1,1,1,1"],
    }
    for name, args in runs.items():
        result = CliRunner().invoke(cli, ["blend", *args, "-o", str(tmp_path / f"{name}.safetensors")])
        assert result.exit_code == 0, result.output
    a, b, plain = (load_lora(tmp_path / f"{n}.safetensors") for n in ("inspire", "lbw", "l"))
    for module, adapter in plain.adapters.items():
        ratio = 0.5 if block_keys(module, TINY["sdxl"])[-1] == "M00" else 1.0
        for got in (a, b):
            assert torch.allclose(got.adapters[module].delta(), ratio * adapter.delta(), rtol=1e-5, atol=1e-7), module
