"""Per-block LoRA strengths in the conventions of the A1111 "LoRA Block Weight" extension.

A vector gives one multiplier per block: ``BASE`` (the text encoders) and the U-Net's LDM blocks
``IN00…IN11``, ``M00``, ``OUT00…OUT11`` (SDXL: ``IN00…IN08``, ``M00``, ``OUT00…OUT08``). The short
vectors leave out blocks a plain LoRA never touches (down-samplers, the block-0 ``conv_in``); those
keep multiplier 1. Block ids and presets as in hako-mikan/sd-webui-lora-block-weight
(scripts/lora_block_weight.py: BLOCKID17/26/12/20 and DEF_WEIGHT_PRESET). U-Net modules outside
every block (``time_embed``, SDXL's ``label_emb``, the final ``out`` conv) are not weighted either.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.names import name_tables

_IN26 = [f"IN{i:02d}" for i in range(12)]
_OUT26 = [f"OUT{i:02d}" for i in range(12)]
BLOCK_IDS: dict[int, tuple[str, ...]] = {
    26: ("BASE", *_IN26, "M00", *_OUT26),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(3, 12)]),
    20: ("BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(6)]),
}
# Vector lengths per U-Net depth: SD1/SD2 have 12 input blocks, SDXL 9.
LENGTHS = {12: (17, 26), 9: (12, 20)}

# The extension's default presets, 17 values (SD 1.x/2.x).
PRESETS_17: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
UNIFORM_PRESETS = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}

_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)")


@dataclass(frozen=True)
class BlockWeights:
    """Multipliers by block id (``BASE``, ``IN04``, ``M00``, ``OUT07``…); blocks not named keep 1."""

    weights: dict[str, float]
    source: str  # the preset name or vector as given

    def ratio(self, block: str | None) -> float:
        return 1.0 if block is None else self.weights.get(block, 1.0)


def _input_blocks(spec: FamilySpec) -> int:
    if spec.unet is None:
        raise InputError(f"block weights for {spec.title} are not supported yet (U-Net families only)")
    return 1 + len(spec.unet.channel_mult) * (spec.unet.layers_per_block + 1) - 1


def parse_block_weights(text: str, spec: FamilySpec) -> BlockWeights:
    """A preset name (``OUTALL``) or a comma-separated vector of 17/26 (SD 1.x/2.x) or 12/20 (SDXL) values."""
    text = text.strip()
    depth = _input_blocks(spec)
    lengths = LENGTHS.get(depth)
    if lengths is None:
        raise InputError(f"block weights are not defined for a U-Net with {depth} input blocks")
    name = text.upper()
    if name in PRESETS_17:
        if depth == 12:
            text = PRESETS_17[name]
        elif name in UNIFORM_PRESETS:
            text = ",".join([str(UNIFORM_PRESETS[name])] * lengths[0])
        else:
            raise InputError(
                f"preset {name} is defined for SD 1.x/2.x only; give {spec.title} a vector of "
                f"{lengths[0]} or {lengths[1]} values ({', '.join(BLOCK_IDS[lengths[0]])})"
            )
    try:
        values = [float(v) for v in re.split(r"[,\s]+", text) if v]
    except ValueError:
        presets = ", ".join(PRESETS_17)
        raise InputError(f"block weights {text!r}: not a preset ({presets}) nor a list of numbers") from None
    if len(values) not in lengths:
        raise InputError(
            f"block weights: {len(values)} values; {spec.title} takes {lengths[0]} "
            f"({', '.join(BLOCK_IDS[lengths[0]])}) or {lengths[1]}"
        )
    return BlockWeights(dict(zip(BLOCK_IDS[len(values)], values, strict=True)), text)


def block_of(module: str, spec: FamilySpec) -> str | None:
    """The block id of a canonical module: ``BASE`` for text encoders, ``IN05``/``M00``/``OUT03`` for
    the U-Net, None for U-Net modules outside every block."""
    if not module.startswith("unet."):
        return "BASE"
    found = name_tables(spec).modules.get(module)
    path = found.ldm_path if found else None
    match = _LDM_BLOCK.match(path or "")
    if match is None:
        return None
    kind, index = match.groups()
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(index):02d}"


def blocks_touched(modules: Sequence[str], spec: FamilySpec) -> dict[str, int]:
    """How many of ``modules`` fall in each block (None → "other")."""
    counts: dict[str, int] = {}
    for module in modules:
        block = block_of(module, spec) or "other"
        counts[block] = counts.get(block, 0) + 1
    return counts
