"""Per-block LoRA strengths, in the block numbering of the tool a vector comes from.

loratools' own block ids (docs/FORMATS.md §13):
- SD 1.x/2.x, SDXL: ``BASE`` (the text encoders), the U-Net's LDM blocks ``IN00…``, ``M00`` (its
  three parts ``M00.0``/``M00.1``/``M00.2`` where a tool tells them apart), ``OUT00…``, and
  ``OTHER`` for U-Net modules outside every block (``time_embed``, ``label_emb``, the final conv).
- FLUX.1: ``CLIP`` (te1), ``T5`` (te2), ``IN`` (the input embedders), ``D00…`` (double blocks),
  ``S00…`` (single blocks), ``OUT`` (the final layer); the counts come from the family spec.

Each tool's numbering is a table: vector position → the loratools ids it sets.
- ``lbw``: hako-mikan/sd-webui-lora-block-weight scripts/lora_block_weight.py (BLOCKID17/26/12/20,
  BLOCKIDFLUX, DEF_WEIGHT_PRESET; ``get_flux_blocks`` for what CLIP/T5/IN/OUT cover).
- ``inspire``: ltdrdata/ComfyUI-Inspire-Pack inspire/lora_block_weight.py
  (``LoraLoaderBlockWeight.load_lbw``): after BASE, one value per block *the LoRA populates*,
  input blocks by number, then the middle block's parts, then output, double, single blocks; BASE
  covers everything else (text encoders and unblocked modules). The tables are those of a LoRA that
  populates every block of its kind, as in resources/lbw-preset.txt (SD 17 / SD-LyC 27, SDXL 12 /
  SDXL-LyC 21, FLUX 58).
- ``lycoris``: nihedon/sd-webui-weight-helper (javascript/weight_helper.js: per model type, a
  ``lora``/``lycoris`` mask over lbw's block ids) — the vectors it writes for LoRA and LyCORIS
  files, read by lbw: SD 17/26, SDXL 12/20, FLUX 61 (KohakuBlueleaf/a1111-sd-webui-lycoris itself
  has no block weights).
Blocks a vector does not name keep multiplier 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.names import name_tables

TOOLS = ("lbw", "inspire", "lycoris")
DEFAULT_TOOL = "lbw"

Position = tuple[str, ...]  # the loratools block ids one vector value sets


def _ids(prefix: str, indices: Sequence[int]) -> list[Position]:
    return [(f"{prefix}{i:02d}",) for i in indices]


def _unet_table(ins: Sequence[int], mid: Sequence[str], outs: Sequence[int], base: Position) -> tuple[Position, ...]:
    return (base, *_ids("IN", ins), *((m,) for m in mid), *_ids("OUT", outs))


def _flux_lbw(double: int, single: int) -> tuple[Position, ...]:
    # BLOCKIDFLUX = ["CLIP", "T5", "IN"] + D00… + S00… + ["OUT"]
    return (("CLIP",), ("T5",), ("IN",), *_ids("D", range(double)), *_ids("S", range(single)), ("OUT",))


def _flux_inspire(double: int, single: int) -> tuple[Position, ...]:
    # BASE (``others``: CLIP, T5 and every unblocked module), then double, then single blocks
    return (("CLIP", "T5", "IN", "OUT"), *_ids("D", range(double)), *_ids("S", range(single)))


_BASE: Position = ("BASE",)
_INSPIRE_BASE: Position = ("BASE", "OTHER")
_MID_PARTS = ("M00.0", "M00.1", "M00.2")


def tables(tool: str, spec: FamilySpec) -> dict[int, tuple[Position, ...]]:
    """Vector length → positions, for one tool and family (the data docs/FORMATS.md §13 shows)."""
    if tool not in TOOLS:
        raise InputError(f"unknown block-weight tool {tool!r} (choose from {', '.join(TOOLS)})")
    if spec.transformer is not None:
        d, s = spec.transformer.double_blocks, spec.transformer.single_blocks
        if tool == "inspire":
            return {1 + d + s: _flux_inspire(d, s)}
        return {3 + d + s + 1: _flux_lbw(d, s)}
    depth = _input_blocks(spec)
    if depth == 12:  # SD 1.x/2.x
        lora17 = _unet_table([1, 2, 4, 5, 7, 8], ["M00"], range(3, 12), _BASE)
        full26 = _unet_table(range(12), ["M00"], range(12), _BASE)
        if tool == "inspire":
            return {
                17: _unet_table([1, 2, 4, 5, 7, 8], ["M00.1"], range(3, 12), _INSPIRE_BASE),
                27: _unet_table(range(1, 12), _MID_PARTS, range(12), _INSPIRE_BASE),
            }
        return {17: lora17, 26: full26}
    if depth == 9:  # SDXL
        if tool == "inspire":
            return {
                12: _unet_table([4, 5, 7, 8], ["M00.1"], range(6), _INSPIRE_BASE),
                21: _unet_table(range(1, 9), _MID_PARTS, range(9), _INSPIRE_BASE),
            }
        return {
            12: _unet_table([4, 5, 7, 8], ["M00"], range(6), _BASE),
            20: _unet_table(range(9), ["M00"], range(9), _BASE),
        }
    raise InputError(f"block weights are not defined for a U-Net with {depth} input blocks")


# The extension's default presets, 17 values (SD 1.x/2.x): DEF_WEIGHT_PRESET.
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

# SDXL presets by meaning. lbw ships none for SDXL (DEF_WEIGHT_PRESET is 17-value only);
# Inspire-Pack's resources/lbw-preset.txt has SDXL-INALL/MIDALL/OUTALL over the 12 blocks. Each
# SD preset turns on "shallow"/"deep" input or output blocks; SDXL's 12-value blocks split the same
# way by resolution: IN04/IN05 (64×64) shallow, IN07/IN08 (32×32) deep; OUT00-02 deep,
# OUT03-05 shallow. BASE stays on as in every SD preset.
PRESETS_SDXL_12: dict[str, str] = {
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",  # = Inspire SDXL-INALL
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",  # = Inspire SDXL-MIDALL
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",  # = Inspire SDXL-OUTALL
}

_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)")
_FLUX_BLOCK = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_FLUX_OUT = ("transformer.norm_out.", "transformer.proj_out")


@dataclass(frozen=True)
class BlockWeights:
    """Multipliers by loratools block id; ids not named keep 1."""

    weights: dict[str, float]
    source: str  # the preset name or vector as given
    tool: str = DEFAULT_TOOL

    def ratio(self, block: str | Sequence[str] | None) -> float:
        """The multiplier of a block (or the first of several ids, most specific first, that is set)."""
        if block is None:
            return 1.0
        for key in (block,) if isinstance(block, str) else block:
            if key in self.weights:
                return self.weights[key]
        return 1.0

    def named(self) -> set[str]:
        """The block ids this vector sets to something other than 1."""
        return {k for k, v in self.weights.items() if v != 1.0}


def _input_blocks(spec: FamilySpec) -> int:
    if spec.unet is None:
        raise InputError(f"block weights for {spec.title} are not supported yet")
    return 1 + len(spec.unet.channel_mult) * (spec.unet.layers_per_block + 1) - 1


def split_tool(text: str, default: str = DEFAULT_TOOL) -> tuple[str, str]:
    """``"1,0,1@inspire"`` → (``"1,0,1"``, ``"inspire"``); no tag: ``default``."""
    body, sep, tag = text.rpartition("@")
    if not sep:
        return text, default
    tool = tag.strip().lower()
    if tool not in TOOLS:
        raise InputError(f"block weights {text!r}: unknown tool @{tag} (choose from {', '.join(TOOLS)})")
    return body, tool


def _preset(name: str, spec: FamilySpec, table: dict[int, tuple[Position, ...]]) -> str | None:
    shortest = min(table)
    if name in UNIFORM_PRESETS:
        return ",".join([str(UNIFORM_PRESETS[name])] * shortest)
    if spec.unet is None:
        return None
    if _input_blocks(spec) == 12:
        return PRESETS_17.get(name)
    return PRESETS_SDXL_12.get(name)


def parse_block_weights(text: str, spec: FamilySpec, tool: str | None = None) -> BlockWeights:
    """A preset name (``OUTALL``) or a comma-separated vector, tagged ``@lbw``/``@inspire``/``@lycoris``
    (or ``tool``; default lbw), translated to loratools block ids through that tool's table."""
    body, chosen = split_tool(text.strip(), tool or DEFAULT_TOOL)
    body = body.strip()
    table = tables(chosen, spec)
    lengths = " or ".join(str(n) for n in sorted(table))
    name = body.upper()
    if re.fullmatch(r"[A-Z][A-Z0-9.]*", name):
        vector = _preset(name, spec, table)
        if vector is None:
            known = sorted(
                {
                    *UNIFORM_PRESETS,
                    *(
                        PRESETS_17
                        if spec.unet is not None and _input_blocks(spec) == 12
                        else PRESETS_SDXL_12
                        if spec.unet is not None
                        else ()
                    ),
                }
            )
            raise InputError(f"block weights: no preset {name} for {spec.title} (presets: {', '.join(known)})")
        if chosen == "inspire" and spec.unet is not None:
            chosen, table = DEFAULT_TOOL, tables(DEFAULT_TOOL, spec)  # presets are lbw vectors
        body = vector
    try:
        values = [float(v) for v in re.split(r"[,\s]+", body) if v]
    except ValueError:
        raise InputError(f"block weights {text!r}: not a preset nor a list of numbers") from None
    positions = table.get(len(values))
    if positions is None:
        first = table[min(table)]
        raise InputError(
            f"block weights: {len(values)} values; {spec.title} @{chosen} takes {lengths} "
            f"({', '.join('/'.join(p) for p in first)})"
        )
    weights: dict[str, float] = {}
    for position, value in zip(positions, values, strict=True):
        for block in position:
            weights[block] = value
    return BlockWeights(weights, text.strip(), chosen)


def block_keys(module: str, spec: FamilySpec) -> tuple[str, ...]:
    """The block ids of a canonical module, most specific first (``("M00.1", "M00")``, ``("OUT03",)``)."""
    component = module.split(".", 1)[0]
    if spec.transformer is not None:
        if component == "te1":
            return ("CLIP",)
        if component != "transformer":
            return ("T5",)
        match = _FLUX_BLOCK.match(module)
        if match:
            kind, index = match.groups()
            return (f"{'D' if kind == 'transformer_blocks' else 'S'}{int(index):02d}",)
        return ("OUT",) if module.startswith(_FLUX_OUT) else ("IN",)
    if component != "unet":
        return ("BASE",)
    found = name_tables(spec).modules.get(module)
    path = found.ldm_path if found else None
    match = _LDM_BLOCK.match(path or "")
    if match is None:
        return ("OTHER",)
    kind, index = match.groups()
    if kind == "middle_block":
        return (f"M00.{int(index)}", "M00")
    return (f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(index):02d}",)


def block_of(module: str, spec: FamilySpec) -> str | None:
    """The coarse block id of a canonical module (``BASE``, ``IN05``, ``M00``, ``D03``); None for
    U-Net modules outside every block."""
    block = block_keys(module, spec)[-1]
    return None if block == "OTHER" else block


def blocks_touched(modules: Sequence[str], spec: FamilySpec) -> dict[str, int]:
    """How many of ``modules`` fall in each block (None → "other")."""
    counts: dict[str, int] = {}
    for module in modules:
        block = block_of(module, spec) or "other"
        counts[block] = counts.get(block, 0) + 1
    return counts


def unused_blocks(weights: BlockWeights, modules: Sequence[str], spec: FamilySpec) -> list[str]:
    """Block ids the vector sets (≠ 1) in which the LoRA has no module: the vector does nothing there."""
    present = {key for module in modules for key in block_keys(module, spec)}
    return sorted(b for b in weights.named() if b not in present)
