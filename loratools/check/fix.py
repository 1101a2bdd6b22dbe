"""``convert --for TARGET``: write the file a target loads completely, at the file's own strength.

Per target the dialect and representation its loader reads right (docs/CHECK.md §4):

* ComfyUI, Forge, A1111, InvokeAI, kohya sd-scripts: kohya names with one ``.alpha`` tensor per
  module (the only scale source those loaders read); SDXL U-Net keys in SGM spelling.
* diffusers: the peft-spelled diffusers file with ``lora_adapter_metadata`` (``lora_alpha`` and
  an ``alpha_pattern`` with each module's alpha), which diffusers applies per module
  (tests/test_diffusers_lora_oracle.py); kohya files with per-module alphas it does not.
* A1111 patches an OpenCLIP attention (SD2's text encoder, SDXL's second) only when q, k, v and
  out_proj all carry a LoRA: a missing out_proj is added as a zero LoRA (ΔW = 0, exact).

What a target cannot read (LoHa/LoKr in sd-scripts or diffusers, DoRA where it is dropped) is
refused with the reason, never dropped; the written file is checked with the same tables and
anything still found is listed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InputError
from ..families.spec import FamilySpec
from ..formats.adapters import Adapter, LoraFile, LowRank
from .tables import Table, for_family, tables_for

DIALECT = {"comfyui": "kohya", "forge": "kohya", "a1111": "kohya", "invokeai": "kohya", "kohya": "kohya"}
_QKV = re.compile(r"^(?P<layer>.*\.self_attn)\.[qkv]_proj$")


@dataclass
class FixReport:
    """What ``convert --for`` wrote, and what the target will still not do with it."""

    source: str
    output: str
    targets: list[str]
    dialect: str
    modules: int
    added: list[str] = field(default_factory=list)  # zero modules added so the target applies others
    remaining: list[str] = field(default_factory=list)  # verdicts of targets that are still not clean
    verdicts: list[str] = field(default_factory=list)
    # what reading, re-factorizing and writing said (embeddings beside the file, a dropped diff_b…)
    warnings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "clean": self.clean}


def dialect_for(tables: list[Table]) -> str:
    """The one LoRA dialect every one of ``tables`` reads completely."""
    dialects = {("diffusers" if t.target == "diffusers" else DIALECT[t.target]) for t in tables}
    if len(dialects) != 1:
        raise InputError("convert --for needs targets that read one dialect; name one target, not 'all'")
    return dialects.pop()


def _refusals(lora: LoraFile, table: Table, dialect: str, to_lora: bool) -> None:
    """An InputError when ``table``'s loader cannot apply some module of ``lora`` as it is."""
    for module, adapter in lora.adapters.items():
        kind = adapter.kind
        if isinstance(adapter, LowRank):
            kind = "tucker" if adapter.mid is not None else ("locon" if adapter.down.dim() == 4 else "lora")
        dora = getattr(adapter, "dora_scale", None) is not None
        readable = kind in table.kinds or (kind == "tucker" and "lora" in table.kinds and dialect == "diffusers")
        if not readable and not to_lora:
            raise InputError(
                f"{table.label} does not read {kind} modules (e.g. {module})",
                hint="--to-lora --rank N (or --error E) re-factorizes them into plain LoRA by SVD",
            )
        if dora and table.dora != "applied" and dialect != "diffusers":
            raise InputError(
                f"{table.label} applies DoRA modules as plain LoRA (e.g. {module}): the magnitude would be lost",
                hint="target a loader that applies DoRA (comfyui, a1111, invokeai), or merge it into a checkpoint",
            )


# The spelling flux_view.py gives what the FLUX.1 writers write for each convert --for dialect.
_FLUX_SPELLING = {"kohya": "kohya", "diffusers": "peft"}


def _flux_refusals(lora: LoraFile, table: Table, dialect: str) -> None:
    """An InputError when ``table``'s FLUX.1 loader loads no file of ``lora`` completely: a target
    that loads no FLUX.1 model (A1111), or a component it never patches (T5 in diffusers)."""
    if table.unsupported:
        raise InputError(f"{table.label} {table.unsupported}")
    spelling = _FLUX_SPELLING[dialect]
    for module in lora.adapters:
        component = module.split(".", 1)[0]
        if table.regex(spelling, component) is None:
            reason = table.unmapped_reasons.get(component, f"it reads no {component} modules")
            raise InputError(
                f"{table.label} does not load {module} ({reason})",
                hint="merge the LoRA into the checkpoint instead, or target a loader that reads them",
            )


def _flux_t5_prefix(tables: list[Table]) -> str | None:
    """The T5 kohya prefix every target reads: lora_te2 (the writer's own) where all read it,
    else the first one they all share (sd-scripts: lora_te3 only)."""
    accepted = [set(t.te_prefixes["te2"]) for t in tables if t.te_prefixes and "te2" in t.te_prefixes]
    if not accepted:
        return None
    common = set.intersection(*accepted)
    for prefix in ("lora_te2", "lora_te3"):
        if prefix in common:
            return prefix
    return None


def _complete_attention(lora: LoraFile, table: Table) -> tuple[LoraFile, list[str]]:
    """Add zero out_proj LoRAs where ``table`` applies q/k/v only beside an out_proj."""
    family = lora.family
    if family is None:  # no family map: nothing known about its attention layout
        return lora, []
    needs = {e.split(":", 1)[1] for e in table.qkv_needs_out if e.split(":", 1)[0] in ("*", family.name)}
    if not needs or table.target == "diffusers":  # the diffusers file is peft-spelled: no such rule
        return lora, []
    import torch

    from ..formats.names import name_tables

    modules = name_tables(family).modules
    adapters: dict[str, Adapter] = dict(lora.adapters)
    added = []
    for module in list(lora.adapters):
        component = module.split(".", 1)[0]
        m = _QKV.match(module)
        if component not in needs or m is None:
            continue
        out = f"{m.group('layer')}.out_proj"
        if out in adapters or out not in modules:
            continue
        shape = modules[out].shape
        like = lora.adapters[module]
        dtype = like.up.dtype if isinstance(like, LowRank) else torch.float32
        adapters[out] = LowRank(torch.zeros(shape[0], 1, dtype=dtype), torch.zeros(1, shape[1], dtype=dtype), 1.0)
        added.append(out)
    return lora.with_adapters(adapters), added


def convert_for(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    target: str,
    *,
    family: str | FamilySpec | None = None,
    dtype: str | None = None,
    to_lora: bool = False,
    rank: int | None = None,
    error: float | None = None,
    overwrite: bool = False,
) -> FixReport:
    """Write ``source`` as the file ``target`` loads completely at its true strength."""
    from ..formats.io import load_lora, save_lora
    from ..io.files import same_path
    from ..io.measure import active
    from ..ops.checkpoint import parse_dtype
    from ..ops.convert import prepare
    from . import check_lora

    tables = tables_for(target)
    if same_path(output, source):
        raise InputError(f"{output}: output is the input; write elsewhere")
    lora = load_lora(source, family)
    flux = lora.family is not None and lora.family.transformer is not None
    if flux:  # FLUX.1 rules of each target (docs/FORMATS.md §14)
        tables = [for_family(t, lora.family_name) for t in tables]
    dialect = dialect_for(tables)
    for table in tables:
        _refusals(lora, table, dialect, to_lora)
        if flux:
            _flux_refusals(lora, table, dialect)
    added: list[str] = []
    for table in tables:
        lora, more = _complete_attention(lora, table)
        added += more
    warnings = list(lora.warnings)
    prepared = prepare(lora, dialect, to_lora=to_lora, rank=rank, error=error, notes=warnings)
    t5_prefix = None
    if flux:
        # the dialect's own spelling, never the source's (an OneTrainer file stays OneTrainer-named
        # written back in its own format: what kohya/InvokeAI read is lora_unet_ + BFL names)
        prepared = replace(prepared, source_keys=())
        t5_prefix = _flux_t5_prefix(tables)
    save_lora(prepared, output, dialect, dtype=parse_dtype(dtype), overwrite=overwrite, t5_prefix=t5_prefix,
              notes=warnings)  # fmt: skip
    report = FixReport(str(source), str(output), [t.target for t in tables], dialect, len(prepared.adapters), added,
                       warnings=warnings)  # fmt: skip
    if active() is not None:  # a dry run (io/measure.py) wrote no file whose loading could be checked
        return report
    result = check_lora(output, target, family=lora.family)
    report.verdicts = [r.verdict for r in result.reports]
    report.remaining = [r.verdict for r in result.reports if not r.clean]
    return report
