"""FLUX.1 LoRA dialects: every key spelling → canonical (diffusers) modules, fused slices included.

Pure name and row facts plus one reader and three writers; the family rules (families/flux.py) say
which rows of a BFL fused Linear each diffusers module is, so nothing here types a module list.
Dialects read (docs/FLUX.md §2 cites where each spelling was checked):

- kohya sd-scripts ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (BFL module names,
  underscores; kohya-ss/sd-scripts networks/lora_flux.py LoRANetwork, ``LORA_PREFIX_FLUX``), its
  ``split_qkv`` form (down [3r, in], block-diagonal up; same file, LoRANetwork.state_dict), CLIP-L
  ``lora_te1_…`` and T5 ``lora_te2_…`` / ``lora_te3_…`` (told apart by module name and shape);
- ai-toolkit / diffusers / peft ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, the
  ``diffusion_model.`` + BFL-name form, ``lora_down``/``lora_up`` spellings of both;
- XLabs ``double_blocks.0.processor.qkv_lora1.down.weight`` (img) / ``…lora2…`` (txt);
- OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q`` and SimpleTuner/LyCORIS
  ``lycoris_transformer_blocks_0_attn_to_q`` (diffusers module names, underscores; LoRA, LoHa,
  LoKr, full ``diff``/``diff_b``);
- fal Kontext ``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``, DiffSynth-Studio
  ``blocks.0.attn.a_to_qkv.lora_A.default.weight`` and OMI
  ``transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight`` (one module per fused part).

A LoRA on a fused BFL Linear becomes one adapter per canonical part (the up rows of that part and
the shared down: exact); a LoRA on a diffusers-split module patches its rows of a fused base
through the key map. Writers re-join parts: identical downs share one down, others become
kohya's block-diagonal split-qkv form (exact ΔW); LoHa/LoKr on a fused Linear split by the rows
of the factor that owns them and re-join the same way.

The reader keeps the file's keys (``LoraFile.source_keys``) and module names; written in its own
format (rescale/resize/blend), a LoRA comes back in that very dialect, keys and order
(:func:`flux_source_state_dict`, through the same key parser); ``convert --to`` writes the
format's own spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from itertools import pairwise
from typing import TYPE_CHECKING

from ..errors import InputError
from ..families import FLUX1, keymap
from ..families.spec import DIFFUSERS_FOLDERS, FamilySpec
from .adapters import Adapter, Full, LoHa, LoKr, LoraFile, LowRank, factor_dtype
from .keys import FLUX_XLABS_KEY, PEFT_METADATA_KEY, configs_from_metadata, flux_own_spelling, pattern_value
from .lycoris import adapter_from_params, adapter_params
from .verdict import model_by_names

if TYPE_CHECKING:  # torch is imported where tensors are touched: the header-only paths
    import torch  # (inspect, check) read name facts from here without loading it

FORMAT_KOHYA = "kohya"  # the project's format names: operations write a LoRA back in its own
FORMAT_PEFT = "diffusers"  # format, and save_lora picks the FLUX.1 spelling by the family
FORMAT_COMFYUI = "comfyui"  # written only (read back as FORMAT_PEFT: its keys are dotted)
KOHYA_TE = {"te1": "lora_te1", "te2": "lora_te2"}  # writer prefixes (sd-scripts @0087a46)
_UNDERSCORE = re.compile(r"^(lora_unet|lora_transformer|lycoris|lora_te\d?)_([^.]+)\.(.+)$")
_PARAMS = {  # dotted-dialect parameter suffix → kohya parameter name
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",  # peft's adapter name left in (DiffSynth-Studio)
    "lora_B.default.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight",
    "up.weight": "lora_up.weight",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "dora_scale": "dora_scale",
}
_XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv"}
_XLABS |= {"proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}
# DiffSynth-Studio's FluxDiT names of the BFL Linears (diffsynth/models/lora.py, FluxLoRAConverter:
# a plain rename, rows in BFL order); its double blocks are "blocks.N", its single ones "single_blocks.N"
_DIFFSYNTH_DOUBLE = {"norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin", "attn.a_to_qkv": "img_attn.qkv"}
_DIFFSYNTH_DOUBLE |= {
    "attn.b_to_qkv": "txt_attn.qkv",
    "attn.a_to_out": "img_attn.proj",
    "attn.b_to_out": "txt_attn.proj",
}
_DIFFSYNTH_DOUBLE |= {"ff_a.0": "img_mlp.0", "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2"}
_DIFFSYNTH_SINGLE = {"norm.linear": "modulation.lin", "to_qkv_mlp": "linear1", "proj_out": "linear2"}
_DIFFSYNTH = re.compile(r"^(blocks|single_blocks)\.(\d+)\.(.+)$")
# OMI (OneTrainer's "omi" output; InvokeAI omi/vendor/convert/lora/convert_flux_lora.py): BFL names
# under "transformer.", a fused Linear's parts as modules of their own ("img_attn.qkv.0" = to_q),
# "img_in.proj" for img_in, text encoders under "clip_l." and "t5."
_OMI_PART = re.compile(r"^(.+)\.(\d)$")
_OMI_TEXT = {"clip_l.": "te1", "t5.": "te2"}
_BFL_ROOTS: tuple[str, ...] = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.")
_BFL_ROOTS += ("guidance_in.", "final_layer.")


@dataclass(frozen=True)
class Part:
    """A canonical module fed by rows of a BFL module's ΔW (in canonical row order)."""

    module: str  # canonical, e.g. "transformer.transformer_blocks.0.attn.to_q"
    rows: tuple[tuple[int, int], ...]  # row ranges of the BFL ΔW, concatenated


@dataclass(frozen=True)
class FluxNames:
    """Name facts of one FLUX.1 spec (widths matter: rows of fused parts)."""

    shapes: dict[str, tuple[int, ...]]  # canonical module → weight shape
    bfl: dict[str, list[Part]]  # BFL module path ("double_blocks.0.img_attn.qkv") → parts
    bfl_shapes: dict[str, tuple[int, ...]]
    underscore: dict[str, str]  # "transformer_blocks_0_attn_to_q" / "encoder_block_0_…" → canonical
    bfl_underscore: dict[str, str]  # "double_blocks_0_img_attn_qkv" → BFL path
    home: dict[str, tuple[str, Part]]  # canonical transformer module → (BFL path, its part)

    def bfl_of(self, module: str) -> tuple[str, Part] | None:
        """The BFL module (and this module's part of it) holding a canonical transformer module."""
        return self.home.get(module)


@cache
def flux_names(spec: FamilySpec) -> FluxNames:
    """Every LoRA-patchable Linear of a FLUX.1 spec and its names, derived from the key map."""
    km = keymap(spec)
    prefix = spec.transformer.single_prefix if spec.transformer else ""
    shapes: dict[str, tuple[int, ...]] = {}
    bfl: dict[str, list[Part]] = {}
    bfl_shapes: dict[str, tuple[int, ...]] = {}
    underscore: dict[str, str] = {}
    for w in km.weights:
        if not w.canonical.endswith(".weight") or len(w.shape) != 2 or "embed_tokens" in w.canonical:
            continue
        if w.component not in ("transformer", "te1", "te2") or "embeddings." in w.canonical:
            continue
        if w.canonical.endswith(("shared.weight", "relative_attention_bias.weight")):
            continue
        shapes[w.module] = w.shape
        underscore[w.module.split(".", 1)[1].replace(".", "_")] = w.module
        if w.component != "transformer" or w.single is None:
            continue
        path = w.single.removeprefix(prefix).removesuffix(".weight")
        total = w.single_shape[0] if w.single_shape else w.shape[0]
        bfl_shapes[path] = (total, w.shape[1])
        if w.single_swapped:
            half = total // 2
            rows: tuple[tuple[int, int], ...] = ((half, total), (0, half))
        else:
            rows = (w.single_rows or (0, total),)
        bfl.setdefault(path, []).append(Part(w.module, rows))
    for parts in bfl.values():
        parts.sort(key=lambda p: p.rows[0][0])
    bfl_underscore = {p.replace(".", "_"): p for p in bfl}
    home = {p.module: (b, p) for b, parts in bfl.items() for p in parts}
    return FluxNames(shapes, bfl, bfl_shapes, underscore, bfl_underscore, home)


def _parse(key: str, names: FluxNames) -> tuple[str, str, str] | None:
    """(space, module, kohya param) of a key: space "bfl" (BFL path) or "canonical"; None if unknown."""
    if (m := _UNDERSCORE.match(key)) is not None:
        prefix, body, param = m.groups()
        if prefix == "lora_unet" and body in names.bfl_underscore:
            return "bfl", names.bfl_underscore[body], param
        if prefix in ("lora_transformer", "lycoris", "lora_unet"):
            module = names.underscore.get(body)
            return ("canonical", module, param) if module and module.startswith("transformer.") else None
        module = names.underscore.get(body)  # text encoders: the module name tells CLIP from T5
        return ("canonical", module, param) if module and not module.startswith("transformer.") else None
    stem, param = next(((key[: -len(s) - 1], s) for s in _PARAMS if key.endswith("." + s)), (key, ""))
    if not param:
        return None
    for strip in ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "lora_unet."):
        stem = stem.removeprefix(strip)
    xlabs = re.match(r"^((?:double|single)_blocks\.\d+)\.processor\.(\w+)$", stem)
    if xlabs is not None and xlabs.group(2) in _XLABS:
        stem = f"{xlabs.group(1)}.{_XLABS[xlabs.group(2)]}"
    if (diffsynth := _diffsynth_path(stem)) in names.bfl:
        stem = diffsynth
    if stem.startswith(_BFL_ROOTS) and stem in names.bfl:
        return "bfl", stem, _PARAMS[param]
    if (omi := _omi_module(stem, names)) is not None:
        return omi[0], omi[1], _PARAMS[param]
    for folder, component in (("transformer", "transformer"), ("text_encoder", "te1"), ("text_encoder_2", "te2")):
        if stem.startswith(folder + "."):
            module = f"{component}.{stem[len(folder) + 1 :]}"
            return ("canonical", module, _PARAMS[param]) if module in names.shapes else None
    module = f"transformer.{stem}"
    return ("canonical", module, _PARAMS[param]) if module in names.shapes else None


def is_control_lora(lora: LoraFile) -> bool:
    """BFL's FLUX.1 control LoRAs (Canny/Depth-dev): besides LoRA factors they replace the attention
    norms' scales and widen ``img_in``'s input, which no LoRA module carries. ComfyUI tells them by
    ``img_in.lora_A.weight`` beside ``single_blocks.0.norm.key_norm.scale`` (comfy/lora_convert.py,
    ``convert_lora``); the reader lists both among the unmatched (a norm scale is no LoRA key, and
    the widened ``img_in`` fits no FLUX.1 weight)."""
    return any(k.endswith("norm.key_norm.scale") for k in lora.unmatched) and "img_in" in lora.unmatched


def _diffsynth_path(stem: str) -> str | None:
    """The BFL path of a DiffSynth-Studio FluxDiT module name, None if it is not one."""
    if (m := _DIFFSYNTH.match(stem)) is None:
        return None
    kind, index, child = m.groups()
    table, bfl_kind = (_DIFFSYNTH_DOUBLE, "double_blocks") if kind == "blocks" else (_DIFFSYNTH_SINGLE, kind)
    return f"{bfl_kind}.{index}.{table[child]}" if child in table else None


def _omi_module(stem: str, names: FluxNames) -> tuple[str, str] | None:
    """(space, module) of an OMI module name: a BFL path, one part of a fused one, or a text encoder's."""
    for prefix, component in _OMI_TEXT.items():
        if stem.startswith(prefix):
            module = f"{component}.{stem.removeprefix(prefix)}"
            return ("canonical", module) if module in names.shapes else None
    if not stem.startswith("transformer."):
        return None
    path = stem.removeprefix("transformer.").replace("img_in.proj", "img_in")
    if path in names.bfl:
        return "bfl", path
    if (m := _OMI_PART.match(path)) is not None and m.group(1) in names.bfl:
        parts = names.bfl[m.group(1)]
        index = int(m.group(2))
        return ("canonical", parts[index].module) if len(parts) > 1 and index < len(parts) else None
    return None


def _split_key(key: str) -> tuple[str, str]:
    """(module stem, parameter suffix) of a key as the file spells them."""
    if (m := _UNDERSCORE.match(key)) is not None:
        return f"{m.group(1)}_{m.group(2)}", m.group(3)
    suffix = next((s for s in _PARAMS if key.endswith("." + s)), "")
    return (key[: -len(suffix) - 1], suffix) if suffix else (key, "")


def _take_rows(t: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    import torch

    pieces = [t[a:b] for a, b in rows]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _blocks(up: torch.Tensor, parts: list[Part]) -> list[tuple[int, int]] | None:
    """Each part's column span if ``up`` is block-diagonal over the parts (kohya's split-qkv form,
    and the writer's form for parts of different ranks); None when the parts share columns."""
    if len(parts) < 2:
        return None
    spans: list[tuple[int, int]] = []
    for part in parts:
        cols = _take_rows(up, part.rows).any(dim=0).nonzero().flatten()
        spans.append((int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0))
    live = sorted(span for span in spans if span[1] > span[0])
    if not live or live == [(0, up.shape[1])] or any(b0 > a1 for (_, b0), (a1, _) in pairwise(live)):
        return None
    return spans


def split_fused(name: str, adapter: Adapter, parts: list[Part], warnings: list[str]) -> dict[str, Adapter]:
    """One adapter per canonical part of a LoRA on a fused BFL Linear; ΔW of each part exact."""
    if len(parts) == 1 and len(parts[0].rows) == 1 and isinstance(adapter, LowRank | Full):
        a, b = parts[0].rows[0]
        if a == 0 and b == adapter.delta_shape()[0]:
            return {parts[0].module: adapter}
    out: dict[str, Adapter] = {}
    if isinstance(adapter, LowRank) and adapter.mid is None and adapter.dora_scale is None:
        up = adapter.up.reshape(adapter.up.shape[0], -1)
        spans = _blocks(up, parts)
        live = [bool(_take_rows(up, p.rows).any()) for p in parts]
        for i, part in enumerate(parts):
            if any(live) and not live[i]:
                continue  # all-zero rows: the writer's padding for a part the LoRA does not train
            rows = _take_rows(up, part.rows)
            if spans is None:  # one down shared by every part: the up rows split, alpha/r unchanged
                out[part.module] = LowRank(rows, adapter.down, adapter.alpha)
            else:  # split-qkv: each part its own block of columns; keep the file's scale alpha/R
                a, b = spans[i]
                alpha = adapter.alpha * (b - a) / adapter.rank
                out[part.module] = LowRank(rows[:, a:b], adapter.down[a:b], alpha)
        return out
    if isinstance(adapter, Full):
        for part in parts:
            bias = _take_rows(adapter.diff_b, part.rows) if adapter.diff_b is not None else None
            out[part.module] = Full(_take_rows(adapter.diff, part.rows), bias)
        return out
    if (sliced := _row_sliced(adapter, parts)) is not None:
        return sliced
    warnings.append(f"{name}: a {adapter.kind} module on a fused weight, split into full ΔW parts (float32)")
    delta = adapter.delta()  # float32, scale included
    return {part.module: Full(_take_rows(delta, part.rows)) for part in parts}


def _row_sliced(adapter: Adapter, parts: list[Part]) -> dict[str, Adapter] | None:
    """LoHa / LoKr parts of a fused Linear in their own kind, by slicing the factors that own the rows.

    LoHa ``ΔW = (w1a@w1b) ⊙ (w2a@w2b)·s``: row i of ΔW is row i of ``w1a`` and of ``w2a``. LoKr
    ``ΔW = kron(w1, w2)·s``: rows ``[j·b, (j+1)·b)`` are row j of ``w1`` (``b`` = rows of ``w2``),
    so a part whose boundaries are multiples of ``b`` is rows of ``w1`` (or of ``w1a``). Scale kept.
    None where the factors do not split so (Tucker, DoRA, conv, boundaries inside a ``w2`` block).
    """
    if getattr(adapter, "dora_scale", None) is not None or len(adapter.delta_shape()) != 2:
        return None
    if isinstance(adapter, LoHa) and adapter.t1 is None and adapter.w1a.dim() == 2 and adapter.w2a.dim() == 2:
        return {
            p.module: replace(
                adapter, w1a=_take_rows(adapter.w1a, p.rows), w2a=_take_rows(adapter.w2a, p.rows), shape=None
            )
            for p in parts
        }
    if isinstance(adapter, LoKr) and adapter.t2 is None and (adapter.w2 is None or adapter.w2.dim() == 2):
        b = int(adapter.w2.shape[0]) if adapter.w2 is not None else int(adapter.w2a.shape[0])  # type: ignore[union-attr]
        if (
            any(x % b for p in parts for pair in p.rows for x in pair)
            or adapter.natural_shape() != adapter.delta_shape()
        ):
            return None
        out: dict[str, Adapter] = {}
        for p in parts:
            rows = tuple((x // b, y // b) for x, y in p.rows)
            if adapter.w1 is not None:
                out[p.module] = replace(adapter, w1=_take_rows(adapter.w1, rows), shape=None)
            else:
                out[p.module] = replace(adapter, w1a=_take_rows(adapter.w1a, rows), shape=None)  # type: ignore[arg-type]
        return out
    return None


def _row_joined(parts: list[Part], present: dict[str, Adapter], total: int) -> Adapter | None:
    """The inverse of :func:`_row_sliced`: one LoHa / LoKr whose shared factors every part has."""
    import torch

    first = next(iter(present.values()))
    same = all(type(a) is type(first) and a.alpha == first.alpha for a in present.values())
    if same and isinstance(first, LoHa) and first.t1 is None and first.dora_scale is None:
        halves = [(a.w1b, a.w2b) for a in present.values() if isinstance(a, LoHa)]
        if all(torch.equal(w1b, first.w1b) and torch.equal(w2b, first.w2b) for w1b, w2b in halves):
            w1a = torch.zeros(total, first.w1a.shape[1], dtype=first.w1a.dtype)
            w2a = torch.zeros(total, first.w2a.shape[1], dtype=first.w2a.dtype)
            for p in parts:
                if isinstance(part := present.get(p.module), LoHa):
                    _put_rows(w1a, p.rows, part.w1a)
                    _put_rows(w2a, p.rows, part.w2a)
            return replace(first, w1a=w1a, w2a=w2a)
    if same and isinstance(first, LoKr) and first.t2 is None:
        shared = ("w2", "w2a", "w2b", "w1b")
        if all(_same_tensor(getattr(a, f), getattr(first, f)) for a in present.values() for f in shared):
            w2 = first.w2 if first.w2 is not None else first.w2a
            b = int(w2.shape[0])  # type: ignore[union-attr]
            key = "w1" if first.w1 is not None else "w1a"
            ref: torch.Tensor = getattr(first, key)
            if total % b == 0 and not any(x % b for p in parts for pair in p.rows for x in pair):
                w1 = torch.zeros(total // b, ref.shape[1], dtype=ref.dtype)
                for p in parts:
                    if (part := present.get(p.module)) is not None:
                        _put_rows(w1, tuple((x // b, y // b) for x, y in p.rows), getattr(part, key))
                return replace(first, w1=w1) if key == "w1" else replace(first, w1a=w1)
    return None


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    import torch

    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def read_flux_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], family: str | FamilySpec | None = None
) -> LoraFile | None:
    """A FLUX.1 LoRA of any dialect above, as canonical adapters (unknown keys listed, not dropped silently).

    None when no module fits this FLUX.1 spec (full size unless one is given; an SD3 file with the
    same double-stream names, a tiny or unusual model): the caller then reads it by its names.
    """
    import torch

    spec = family if isinstance(family, FamilySpec) else FLUX1
    if spec.transformer is None:  # read against an SD family (merge into an SD base): refused by name
        raise InputError(f"a FLUX.1 LoRA (BFL/FLUX.1 module names); it does not apply to {spec.title}")
    names = flux_names(spec)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    dialects: set[str] = set()
    stems: dict[tuple[str, str], str] = {}  # (space, module) → the file's module name
    source_keys: list[str] = []
    for key, tensor in tensors.items():
        parsed = _parse(key, names)
        if parsed is None:
            unknown.append(key)
            continue
        space, module, param = parsed
        groups.setdefault((space, module), {})[param] = tensor
        stems.setdefault((space, module), _split_key(key)[0])
        source_keys.append(key)
        dialects.add("kohya" if _UNDERSCORE.match(key) else "peft")
    warnings: list[str] = []
    adapters: dict[str, Adapter] = {}
    source_names: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    configs = configs_from_metadata(metadata)  # diffusers' lora_adapter_metadata (peft LoraConfig)
    for (space, module), params in groups.items():
        shape = names.bfl_shapes[module] if space == "bfl" else names.shapes[module]
        component, _, path = module.partition(".")  # a BFL path may have no dot: "img_in", "txt_in"
        config = configs.get(DIFFUSERS_FOLDERS.get(component, ""), {}) if space == "canonical" else {}
        if "alpha" not in params and "lora_alpha" in config:
            alpha = pattern_value(config.get("alpha_pattern") or {}, path)
            params["alpha"] = torch.tensor(float(config["lora_alpha"] if alpha is None else alpha))
        try:
            adapter = adapter_from_params(module, dict(params), shape, warnings)
        except InputError as error:
            unmatched[module] = str(error)
            continue
        pieces = split_fused(module, adapter, names.bfl[module], warnings) if space == "bfl" else {module: adapter}
        for canonical, piece in pieces.items():
            if canonical in adapters:
                raise InputError(f"{canonical} is given twice (as {module} and under another spelling)")
            adapters[canonical] = piece
            source_names[canonical] = stems[(space, module)]
    for key in unknown:
        unmatched[key] = "not a FLUX.1 module in any known dialect"
    if not adapters:
        return None  # nothing fits FLUX.1 at these widths: read by names like any unfitted LoRA
    if unmatched:
        warnings.append(f"{len(unmatched)} keys/modules not matched, e.g. {next(iter(unmatched))}")
    fmt = FORMAT_KOHYA if dialects == {"kohya"} else FORMAT_PEFT
    # the file's own keys and module names: surgery writes them back in this dialect (issue 13)
    lora = LoraFile(
        adapters,
        spec,
        fmt,
        dict(metadata),
        warnings=warnings,
        unmatched=unmatched,
        source_names=source_names,
        source_keys=tuple(source_keys),
    )
    if is_control_lora(lora):
        warnings.append(
            "a FLUX.1 control LoRA (BFL Canny/Depth): its LoRA modules are read; its norm scales, bias "
            "deltas and widened img_in are listed as not matched (they are not LoRA modules)"
        )
    return lora


def _join(parts: list[Part], present: dict[str, LowRank], total: int) -> LowRank:
    """One LowRank on a fused BFL Linear from its parts' LowRanks (exact ΔW)."""
    import torch

    first = next(iter(present.values()))
    same_down = all(torch.equal(a.down, first.down) and a.alpha == first.alpha for a in present.values())
    if same_down:
        up = torch.zeros(total, first.rank, dtype=first.up.dtype)
        for p in parts:
            if p.module in present:
                _put_rows(up, p.rows, present[p.module].up.reshape(-1, first.rank))
        return LowRank(up, first.down, first.alpha)
    ranks = {a.rank for a in present.values()}
    scales = {a.scale for a in present.values()}
    if len(ranks) == 1 and len(scales) == 1:  # kohya's split-qkv: a rank-r block per part, absent ones zero
        r, scale = ranks.pop(), scales.pop()
        blocks = [(p, i * r, r) for i, p in enumerate(parts)]
    else:  # parts of different ranks (a dynamic resize): a block per present part, scales folded if unequal
        scale = scales.pop() if len(scales) == 1 else 1.0
        blocks, start = [], 0
        for p in parts:
            if p.module in present:
                blocks.append((p, start, present[p.module].rank))
                start += present[p.module].rank
    width = max(begin + r for _, begin, r in blocks)
    down = torch.zeros(width, first.down.shape[1], dtype=first.down.dtype)
    up = torch.zeros(total, width, dtype=first.up.dtype)
    for p, begin, r in blocks:
        if p.module in present:
            part = present[p.module]
            values = part.up.reshape(-1, r)
            if part.scale != scale:  # one alpha per kohya module: the part's own scale goes into its up
                values = (values.to(torch.float32) * (part.scale / scale)).to(up.dtype)
            down[begin : begin + r] = part.down
            _put_rows(up[:, begin : begin + r], p.rows, values)
    return LowRank(up, down, scale * width)


def _fused(path: str, parts: list[Part], present: dict[str, Adapter], total: int, writer: str) -> Adapter:
    """The one adapter a fused BFL Linear holds, re-joined from its canonical parts (exact ΔW)."""
    import torch

    if len(parts) == 1 and len(parts[0].rows) == 1:
        return next(iter(present.values()))
    if all(isinstance(a, LowRank) and a.mid is None and a.dora_scale is None for a in present.values()):
        return _join(parts, present, total)  # type: ignore[arg-type]
    if all(isinstance(a, Full) for a in present.values()):
        first = next(iter(present.values()))
        assert isinstance(first, Full)
        diff = torch.zeros(total, *first.diff.shape[1:], dtype=first.diff.dtype)
        biased = any(a.diff_b is not None for a in present.values())  # type: ignore[union-attr]
        diff_b = torch.zeros(total, dtype=first.diff.dtype) if biased else None
        for p in parts:
            part = present.get(p.module)
            if isinstance(part, Full):
                _put_rows(diff, p.rows, part.diff)
                if diff_b is not None and part.diff_b is not None:
                    _put_rows(diff_b, p.rows, part.diff_b.to(diff_b.dtype))
        return Full(diff, diff_b)
    if (joined := _row_joined(parts, present, total)) is not None:
        return joined
    kinds = sorted({a.kind for a in present.values()})
    raise InputError(
        f"{path}: {'/'.join(kinds)} modules on the parts of one fused weight cannot be written as {writer}"
    )


def _put_rows(target: torch.Tensor, rows: tuple[tuple[int, int], ...], values: torch.Tensor) -> None:
    start = 0
    for a, b in rows:
        target[a:b] = values[start : start + b - a]
        start += b - a


def flux_kohya_state_dict(
    lora: LoraFile, *, dtype: torch.dtype | None = None, t5_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """sd-scripts' FLUX.1 keys: BFL module names under ``lora_unet_``, fused parts re-joined.

    ``t5_prefix``: the T5 modules' kohya prefix, ``lora_te2`` (OneTrainer, ComfyUI, InvokeAI) by
    default; sd-scripts' own merge reads ``lora_te3`` only (docs/FORMATS.md §14).
    """
    bfl = lambda path: f"lora_unet_{path.replace('.', '_')}"  # noqa: E731
    return _bfl_state_dict(lora, dtype, bfl, "kohya", t5_prefix)


def flux_comfyui_state_dict(lora: LoraFile, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI-native FLUX.1 keys: ``diffusion_model.`` + BFL module names, ``lora_up``/``lora_down``/``alpha``.

    The names ComfyUI's own LoRA save node writes (comfy_extras/nodes_lora_extract.py
    calc_lora_model: ``"diffusion_model." + <model key> + ".lora_up.weight"``) and its loader maps
    for every model key (comfy/lora.py model_lora_keys_unet, the generic ``diffusion_model.``
    entry). Split diffusers parts (to_q/to_k/to_v, single-block q/k/v/mlp) are fused into the one
    BFL Linear exactly as for kohya: a shared down stays shared, otherwise stacked downs and a
    block-diagonal up (rank adds up, ΔW equal). Text-encoder modules keep kohya's ``lora_te``
    prefixes, which ComfyUI's CLIP key map reads (comfy/lora.py model_lora_keys_clip).
    """
    return _bfl_state_dict(lora, dtype, lambda path: f"diffusion_model.{path}", "ComfyUI")


def _bfl_state_dict(
    lora: LoraFile,
    dtype: torch.dtype | None,
    bfl_name: Callable[[str], str],
    writer: str,
    t5_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Keys of a BFL-named writer: fused parts re-joined under ``bfl_name(path)``, text encoders as kohya."""
    names = flux_names(lora.family)
    prefixes = KOHYA_TE | ({"te2": t5_prefix} if t5_prefix else {})
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def emit(name: str, adapter: Adapter) -> None:
        stored = dtype or factor_dtype(adapter)
        for param, tensor in adapter_params(adapter, stored).items():
            out[f"{name}.{param}"] = tensor.to(stored) if dtype is not None and tensor.is_floating_point() else tensor

    for module, adapter in lora.adapters.items():
        if module in done:
            continue
        home = names.bfl_of(module)
        if home is None:
            emit(f"{prefixes[module.split('.', 1)[0]]}_{module.split('.', 1)[1].replace('.', '_')}", adapter)
            continue
        path, _ = home
        parts = names.bfl[path]
        present = {p.module: lora.adapters[p.module] for p in parts if p.module in lora.adapters}
        done.update(present)
        emit(bfl_name(path), _fused(path, parts, present, names.bfl_shapes[path][0], writer))
    return dict(sorted(out.items()))


def flux_peft_state_dict(lora: LoraFile, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (``transformer.…lora_A.weight``), as ai-toolkit writes them.

    Alphas go where the SD peft writer puts them (``lora_adapter_metadata``,
    formats/peft.py diffusers_metadata), which this module's reader reads back: exact.
    """
    out: dict[str, torch.Tensor] = {}
    for module, adapter in lora.adapters.items():
        if not isinstance(adapter, LowRank) or adapter.mid is not None or adapter.dora_scale is not None:
            raise InputError(f"{module}: only plain LoRA modules have a diffusers/peft form (bake it first)")
        component, path = module.split(".", 1)
        key = f"{DIFFUSERS_FOLDERS[component]}.{path}"
        stored = dtype or adapter.up.dtype
        out[f"{key}.lora_A.weight"] = adapter.down.to(stored)
        out[f"{key}.lora_B.weight"] = adapter.up.to(stored)
    return dict(sorted(out.items()))


_DOTTED_STYLES = (  # a dotted dialect's spelling of the factor names, told by one suffix the file uses
    ({"lora_A.weight", "lora_B.weight"}, {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}),
    ({"down.weight", "up.weight"}, {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}),
)


def _spelling(stem: str, suffixes: set[str]) -> Callable[[str], str]:
    """How the file would spell a parameter of this module it does not hold yet (a diff_b, new factors)."""
    style: dict[str, str] = {}
    if not _UNDERSCORE.match(f"{stem}.x"):
        style = next((s for used, s in _DOTTED_STYLES if used & suffixes), {})
    return lambda param: f"{stem}.{style.get(param, param)}"


def _unit_scale(adapter: Adapter) -> Adapter:
    """A plain LoRA with its scale folded into ``up`` (scale 1): for a file module that has no alpha."""
    import torch

    if not isinstance(adapter, LowRank) or adapter.scale == 1.0:
        return adapter
    up = (adapter.up.to(torch.float32) * adapter.scale).to(adapter.up.dtype)
    return LowRank(up, adapter.down, float(adapter.rank), adapter.mid, adapter.dora_scale, adapter.dora_axis)


def _source_groups(lora: LoraFile, names: FluxNames) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The source keys by the module they name: (space, module) → [(key, kohya param)]."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key in lora.source_keys:
        if (parsed := _parse(key, names)) is not None:
            groups.setdefault(parsed[:2], []).append((key, parsed[2]))
    return groups


def _folds(held: set[str], space: str, config: bool) -> bool:
    """Whether a file module written back in its own keys gets its scale folded into ``up``: it
    has no alpha key, and no written LoraConfig carries one (canonical modules of a peft file)."""
    return "alpha" not in held and not (config and space == "canonical")


def _verbatim_keys(lora: LoraFile) -> dict[str, list[tuple[str, str]]]:
    """A verbatim LoRA's source keys by file module stem: stem → [(key, kohya param)]."""
    keys_of: dict[str, list[tuple[str, str]]] = {}
    for key in lora.source_keys:
        if (split := _verbatim_split(key)) is not None:
            keys_of.setdefault(split[0], []).append((key, split[1]))
    return keys_of


def scale_in_factors(lora: LoraFile, fmt: str) -> set[str]:
    """Modules of ``lora`` whose scale the FLUX.1 writers fold into ``up`` written as ``fmt``:
    written back in their own keys, the file module has no alpha (XLabs files never do, nor
    ai-toolkit files without a LoraConfig). Reports say so instead of "via alpha"."""
    if writes_verbatim(lora):
        if fmt != lora.source_format or not lora.source_keys:
            return set()
        keys_of = _verbatim_keys(lora)
        return {m for m in lora.adapters if "alpha" not in {p for _, p in keys_of.get(m, [])}}
    same = bool(lora.source_keys) and fmt == lora.source_format
    if lora.family is None or lora.family.transformer is None or not same:
        return set()
    names = flux_names(lora.family)
    config = fmt == FORMAT_PEFT and PEFT_METADATA_KEY in lora.metadata  # as flux_state_dict decides
    folded: set[str] = set()
    for (space, module), keys in _source_groups(lora, names).items():
        if _folds({p for _, p in keys}, space, config):
            modules = [module] if space == "canonical" else [p.module for p in names.bfl[module]]
            folded.update(m for m in modules if m in lora.adapters)
    return folded


def flux_source_state_dict(
    lora: LoraFile, fmt: str, *, dtype: torch.dtype | None = None, config: bool = False
) -> dict[str, torch.Tensor]:
    """The LoRA in the very keys it was read from (``lora.source_keys``, file order), any dialect.

    The reader's key parser is the one mapping both ways: each source key names its module (a
    canonical module, or a fused BFL Linear re-joined from its parts) and parameter, filled from
    the adapter. A module without an alpha in the file gets its scale folded into ``up`` (unless
    ``config``: a written peft LoraConfig carries canonical modules' alphas); parameters the file
    lacks (a new kind after resize) are spelled as its own; modules it never had follow after, in
    ``fmt``'s own writer.
    """
    names = flux_names(lora.family)
    groups = _source_groups(lora, names)
    done: set[str] = set()
    filled: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for (space, module), keys in groups.items():
        if space == "canonical":
            if module not in lora.adapters:
                continue  # left out by the operation (a blend weight 0)
            adapter, used = lora.adapters[module], [module]
        else:
            parts = names.bfl[module]
            present = {p.module: lora.adapters[p.module] for p in parts if p.module in lora.adapters}
            if not present:
                continue
            adapter = _fused(module, parts, present, names.bfl_shapes[module][0], "its source dialect")
            used = list(present)
        done.update(used)
        held = {param for _, param in keys}
        if _folds(held, space, config):
            adapter = _unit_scale(adapter)
        stored = dtype or factor_dtype(adapter)
        params = {
            p: t.to(stored) if dtype is not None and t.is_floating_point() else t
            for p, t in adapter_params(adapter, stored).items()
        }
        if "alpha" not in held:
            params.pop("alpha", None)
        for key, param in keys:
            if param in params:
                filled[key] = params[param]
        stem, _ = _split_key(keys[0][0])
        spell = _spelling(stem, {_split_key(k)[1] for k, _ in keys})
        extras |= {spell(p): t for p, t in params.items() if p not in held}
    out = {key: filled[key] for key in lora.source_keys if key in filled} | extras
    rest = {m: a for m, a in lora.adapters.items() if m not in done}
    if rest:
        others = LoraFile(rest, lora.family, lora.source_format, lora.metadata)
        writer = {"kohya": flux_kohya_state_dict, "comfyui": flux_comfyui_state_dict}.get(fmt, flux_peft_state_dict)
        out |= writer(others, dtype=dtype)
    return out


def flux_state_dict(
    lora: LoraFile, fmt: str, *, dtype: torch.dtype | None = None, t5_prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a FLUX.1 LoRA written as ``fmt`` (kohya, diffusers or comfyui).

    Written in its source's own format, a LoRA read from a file keeps that file's dialect: its
    keys, their order and its metadata (issue 13's rule for surgery); otherwise each format's
    canonical spelling.
    """
    from .kohya import kohya_metadata
    from .metadata import carried_metadata, describe_network
    from .peft import diffusers_metadata
    from .resolve import refuse_unplaced

    # a key the reader could not place (an extra tensor, a module of no FLUX.1 table) has no key
    # in the written file: refused by name, as the SD writers do, never dropped silently
    refuse_unplaced(lora.unmatched, lora.family_title, f"it as {fmt}")
    same = bool(lora.source_keys) and fmt == lora.source_format
    if fmt == "diffusers":
        config = not same or PEFT_METADATA_KEY in lora.metadata  # a LoraConfig only where there was one
        if config:
            meta = diffusers_metadata(lora)
        else:
            meta = carried_metadata(lora)
            if any(k.startswith("ss_") for k in meta):
                describe_network(meta, lora)
            if lora.metadata.get("format") == "pt":
                meta = {"format": "pt", **meta}
        if same:
            return flux_source_state_dict(lora, fmt, dtype=dtype, config=config), meta
        return flux_peft_state_dict(lora, dtype=dtype), meta
    meta = kohya_metadata(lora)
    if same:
        return flux_source_state_dict(lora, fmt, dtype=dtype), meta
    if fmt == "comfyui":
        return flux_comfyui_state_dict(lora, dtype=dtype), meta
    return flux_kohya_state_dict(lora, dtype=dtype, t5_prefix=t5_prefix), meta


# --- kept by their own names: FLUX.1 spellings of a LoRA no FLUX.1 spec fits ------------------------


def _verbatim_split(key: str) -> tuple[str, str] | None:
    """(module stem as the file spells it, kohya parameter name) of a key, or None if unknown."""
    if (x := FLUX_XLABS_KEY.match(key)) is not None:
        return x.group(1), f"lora_{x.group(2)}.weight"
    stem, suffix = _split_key(key)
    return (stem, _PARAMS.get(suffix, suffix)) if suffix else None


def needs_verbatim(keys: list[str]) -> bool:
    """FLUX.1 keys only :func:`read_flux_verbatim` reads when no FLUX.1 spec fits them (XLabs,
    ``lycoris_``, and dotted module names with kohya's factor names — ComfyUI's own
    ``diffusion_model.…lora_down.weight``, OMI's ``transformer.…qkv.0.lora_down.weight``): the SD
    verbatim readers (formats/kohya.py, formats/peft.py) do not parse them."""
    return any(flux_own_spelling(k) or _verbatim_only(k) for k in keys)


def _verbatim_only(key: str) -> bool:
    """A key the peft reader would re-spell: a dotted module name with kohya's ``lora_down``/
    ``lora_up`` factor names, peft's ``base_model.model.`` root (fal's Kontext trainer), or peft's
    adapter name left in (DiffSynth-Studio's ``lora_A.default.weight``)."""
    if _UNDERSCORE.match(key):
        return False
    dotted_kohya = key.endswith((".lora_down.weight", ".lora_up.weight")) and "." in key.rsplit(".lora_", 1)[0]
    return (
        dotted_kohya
        or key.startswith("base_model.model.")
        or key.endswith((".lora_A.default.weight", ".lora_B.default.weight"))
    )


def read_flux_verbatim(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> LoraFile:
    """A FLUX.1 LoRA whose widths fit no FLUX.1 spec, each file module an adapter under its own
    stem (``double_blocks.0.processor.qkv_lora1``, ``lycoris_transformer_blocks_0_attn_to_q``),
    the file's keys kept: written back in its own format (:func:`flux_verbatim_state_dict`), a
    LoRA comes back with the same keys, order and metadata (issue 13: surgery needs no family).
    A key of no known spelling is refused by name (the readers of SD files do the same)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _verbatim_split(key)
        if split is None:
            raise InputError(f"unknown keys beside FLUX.1 LoRA modules: {key}")
        groups.setdefault(split[0], {})[split[1]] = tensor
    warnings: list[str] = []
    adapters = {stem: adapter_from_params(stem, params, None, warnings) for stem, params in groups.items()}
    kohya = all(_UNDERSCORE.match(f"{stem}.x") for stem in groups)
    widths = (int(d) for a in adapters.values() for d in a.delta_shape()[:2])
    return LoraFile(
        adapters,
        None,
        FORMAT_KOHYA if kohya else FORMAT_PEFT,
        dict(metadata),
        warnings=warnings,
        model=model_by_names(groups, widths),
        source_keys=tuple(tensors),
    )


def writes_verbatim(lora: LoraFile) -> bool:
    """Whether ``lora`` is keyed by FLUX.1 stems only :func:`flux_verbatim_state_dict` spells."""
    if lora.family is not None:
        return False
    return any(flux_own_spelling(m) for m in lora.adapters) or any(_verbatim_only(k) for k in lora.source_keys)


def flux_verbatim_state_dict(lora: LoraFile, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A LoRA read by :func:`read_flux_verbatim` in the very keys it was read from (file order).

    The rule of :func:`flux_source_state_dict` without a family: a module without an alpha in the
    file gets its scale folded into its up factor; parameters it lacks are spelled as its own
    (XLabs ``down``/``up``); modules the file never had (a blend) follow, spelled the same way.
    """
    keys_of = _verbatim_keys(lora)
    filled: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for stem, adapter in lora.adapters.items():
        keys = keys_of.get(stem, [])
        held = {param for _, param in keys}
        if "alpha" not in held:
            adapter = _unit_scale(adapter)
        stored = dtype or factor_dtype(adapter)
        params = {
            p: t.to(stored) if dtype is not None and t.is_floating_point() else t
            for p, t in adapter_params(adapter, stored).items()
        }
        if "alpha" not in held and (keys or not _UNDERSCORE.match(f"{stem}.x")):
            params.pop("alpha", None)
        for key, param in keys:
            if param in params:
                filled[key] = params[param]
        suffixes = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k, _ in keys} if keys else set()
        xlabs = any(FLUX_XLABS_KEY.match(k) for k, _ in keys) or FLUX_XLABS_KEY.match(f"{stem}.down.weight")
        spell = _xlabs_spelling(stem) if xlabs else _spelling(stem, suffixes)
        extras |= {spell(p): t for p, t in params.items() if p not in held}
    return {key: filled[key] for key in lora.source_keys if key in filled} | extras


def _xlabs_spelling(stem: str) -> Callable[[str], str]:
    names = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}
    return lambda param: f"{stem}.{names.get(param, param)}"


def verbatim_kohya_name(stem: str) -> str | None:
    """The kohya name of a verbatim FLUX.1 file module, where a pure rename gives one (exact:
    same module, same factors): XLabs ``double_blocks.0.processor.qkv_lora1`` → sd-scripts'
    ``lora_unet_double_blocks_0_img_attn_qkv`` (the BFL Linear it patches, ``_XLABS``);
    ``lycoris_transformer_blocks_0_attn_to_q`` → OneTrainer's
    ``lora_transformer_transformer_blocks_0_attn_to_q`` (both underscore the diffusers path inside
    the transformer, docs/FORMATS.md §14). None for a stem of neither form."""
    if stem.startswith("lycoris_"):
        return f"lora_transformer_{stem.removeprefix('lycoris_')}"
    xlabs = re.match(r"^(?:diffusion_model\.)?((?:double|single)_blocks\.\d+)\.processor\.(\w+)$", stem)
    if xlabs is None or xlabs.group(2) not in _XLABS:
        return None
    return f"lora_unet_{xlabs.group(1).replace('.', '_')}_{_XLABS[xlabs.group(2)].replace('.', '_')}"


def verbatim_as_kohya(lora: LoraFile) -> LoraFile:
    """A verbatim FLUX.1 LoRA (XLabs / ``lycoris_``) keyed by kohya names (:func:`verbatim_kohya_name`),
    to be written by the kohya writer in its own spelling. A stem with no kohya name is refused
    naming it and why."""
    adapters: dict[str, Adapter] = {}
    for stem, adapter in lora.adapters.items():
        name = verbatim_kohya_name(stem)
        if name is None:
            raise InputError(
                f"{stem}: a FLUX.1 file module with no kohya name by rule (not an XLabs processor "
                "LoRA nor a lycoris_ module)",
                hint="--family with the FLUX.1 model's widths maps it through the FLUX.1 name tables",
            )
        if name in adapters:
            raise InputError(f"{stem}: its kohya name {name} is given twice")
        adapters[name] = adapter
    return replace(lora, adapters=adapters, source_format=FORMAT_KOHYA, source_keys=())
