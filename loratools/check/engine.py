"""The per-target load check: a :class:`~.view.FileView` read through a :class:`~.tables.Table`.

For every stored module group the engine asks what the table says the loader does with it —
maps it or not (and why not), refuses the whole file over it, applies it at which scale — and
collects the answers as findings (docs/CHECK.md §3). Nothing here knows a target by name.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .tables import Table, compiled
from .view import FileView, StoredModule

_QKV = re.compile(r"\.self_attn\.(q|k|v)_proj$")
_OUT = re.compile(r"\.self_attn\.out_proj$")
_TE_PREFIX = re.compile(r"^(lora_te\d*)_")


@dataclass
class Ignored:
    """Keys a target leaves out, grouped by one reason."""

    short: str  # for the verdict line: "attention modules ignored"
    reason: str
    names: list[str] = field(default_factory=list)  # stored module names (stems) or keys
    keys: int = 0


@dataclass
class Misapplied:
    """A module a target applies, but not as the file says (another scale, DoRA dropped)."""

    module: str
    why: str
    expected: float | None = None  # the file's own scale
    applied: float | None = None  # the scale the target uses


@dataclass
class TargetReport:
    """What one target does with one LoRA file."""

    target: str
    label: str
    source: str
    modules: int
    applied: list[str] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    misapplied: list[Misapplied] = field(default_factory=list)
    refused: str | None = None
    unsupported: str | None = None  # the family is not one the target loads
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # modules whose fate the target's source leaves open

    @property
    def clean(self) -> bool:
        """Loads every module at the file's own strength, with nothing left out."""
        return not (self.refused or self.unsupported or self.ignored or self.misapplied or self.unknown)

    @property
    def verdict(self) -> str:
        """One line: "ComfyUI: loads all 264 modules at the right strength"."""
        if self.unsupported:
            return f"{self.label}: {self.unsupported}"
        if self.refused:
            return f"{self.label}: refuses the file ({self.refused})"
        if self.clean:
            return f"{self.label}: loads all {self.modules} modules at the right strength"
        parts = []
        scaled = [m for m in self.misapplied if m.expected is not None]
        other = [m for m in self.misapplied if m.expected is None]
        for found, what in ((scaled, "at the wrong strength"), (other, "applied wrong")):
            if found:
                whys: Counter[str] = Counter(m.why.split(":")[0] for m in found)
                why = ", ".join(w for w, _ in whys.most_common(2))
                parts.append(f"{len(found)} of {self.modules} modules {what} ({why})")
        for group in self.ignored:
            parts.append(f"{len(group.names)} {group.short}")
        if self.unknown:
            parts.append(f"{len(self.unknown)} modules of unknown fate (see notes)")
        return f"{self.label}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "label": self.label,
            "source": self.source,
            "verdict": self.verdict,
            "clean": self.clean,
            "modules": self.modules,
            "applied": len(self.applied),
            "refused": self.refused,
            "unsupported": self.unsupported,
            "ignored": [
                {"short": g.short, "reason": g.reason, "count": len(g.names), "keys": g.keys, "names": g.names}
                for g in self.ignored
            ],
            "misapplied": [
                {"module": m.module, "why": m.why, "expected_scale": m.expected, "applied_scale": m.applied}
                for m in self.misapplied
            ],
            "notes": self.notes,
        }


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


_NOT_FACTORS = frozenset({"alpha", "dora_scale", "lora_B.bias"})


def _has_factors(g: StoredModule) -> bool:
    return not g.keys.keys() <= _NOT_FACTORS  # some parameter beyond an alpha, a magnitude, a bias


def _kind(g: StoredModule) -> str:
    if g.kind:
        return g.kind
    params = " ".join(g.keys)
    for probe, kind in (("hada_", "loha"), ("lokr_", "lokr"), ("diff", "full")):
        if probe in params:
            return kind
    return "dora" if "dora_scale" in g.keys else "lora"


@dataclass(frozen=True)
class _Facts:
    """What :func:`check_view` reads of one stored module whatever the target's table says."""

    g: StoredModule
    component: str | None  # g.component and g.path, split once
    path: str | None
    params: frozenset[str]
    factors: bool  # _has_factors(g)
    kind: str  # _kind(g)


class ViewFacts:
    """A view's per-module facts, read once and shared by every target checked against it
    (issue 18 item 4: ``inspect``'s "loads in" line checks one view against every table)."""

    def __init__(self, view: FileView) -> None:
        self.view = view
        self.modules: list[_Facts] = []
        for g in view.modules:
            component, path = g.module.split(".", 1) if g.module else (None, None)
            self.modules.append(_Facts(g, component, path, frozenset(g.keys), _has_factors(g), _kind(g)))
        self.counted = sum(f.factors for f in self.modules)
        self.groups = _PathsByGroup(view)


class _Collector:
    def __init__(self, report: TargetReport) -> None:
        self.report = report
        self.groups: dict[str, Ignored] = {}

    def ignore(self, short: str, reason: str, g: StoredModule) -> None:
        group = self.groups.get(reason)
        if group is None:
            group = self.groups[reason] = Ignored(short, reason)
            self.report.ignored.append(group)
        group.names.append(g.module or g.stem)
        group.keys += len(g.keys)

    def refuse(self, reason: str) -> None:
        if self.report.refused is None:
            self.report.refused = reason


def _not_mapped(
    table: Table, view: FileView, g: StoredModule, base: set[str] | None, component: str | None, path: str | None
) -> tuple[str, str] | None:
    """(short, reason) when the target's key map does not reach this group (``component`` and
    ``path``: ``g.component`` and ``g.path``, split once by the caller)."""
    label = table.label
    if g.module is None:
        return "unknown modules ignored", f"names no module of the {view.family.name if view.family else '?'} model"
    if base is not None and not all(m in base for m in (g.parts or (g.module,))):
        return "modules not in the base ignored", "the base checkpoint has no such module"
    if table.maps.get(g.spelling) is None:
        return f"{g.spelling}-spelled modules ignored", f"{label} does not read the {g.spelling} key spelling"
    if table.needs_prefix and g.spelling != "kohya" and not g.prefixed:
        return (
            "un-prefixed modules ignored",
            f"no 'unet.'/'text_encoder.' prefix: {label} keeps only keys starting with the component name",
        )
    regex = table.regex(g.spelling, component or "")
    if regex is None or not regex.match(path or ""):
        if (component or "") in table.unmapped_reasons:
            return f"{component} modules ignored", table.unmapped_reasons[component or ""]
        if g.spelling == "peft" and component == "unet":
            return (
                "attention modules ignored",
                f"{label} maps U-Net attention only in the old '….processor.to_q' spelling; "
                "'….attn1.to_q.lora_A.weight' is never loaded",
            )
        return f"{component} modules ignored", f"{label}'s key map has no {component} module {g.path}"
    family = view.family.name if view.family else "*"
    if g.spelling == "kohya" and component == "unet":
        naming = "diffusers" if g.stem == f"lora_unet_{(g.path or '').replace('.', '_')}" else "sgm"
        allowed = table.unet_names.get(family, table.unet_names.get("*", ("diffusers", "sgm")))
        if naming not in allowed:
            return (
                f"{naming}-named U-Net modules ignored",
                f"{label} names the {family} U-Net the {allowed[0]} way; {naming}-style names match nothing",
            )
        pattern = table.diffusers_name_unmapped.get(family)
        if naming == "diffusers" and pattern and compiled(pattern).match(path or ""):
            return "U-Net modules ignored", f"{label}'s diffusers→LDM name rules map this {family} module nowhere"
    if g.spelling == "kohya" and component not in ("unet", "transformer") and table.te_prefixes is not None:
        found = _TE_PREFIX.match(g.stem)
        prefix = found.group(1) if found else g.stem
        allowed_prefixes = table.te_prefixes.get(component or "", ())
        if prefix not in allowed_prefixes:
            return f"{prefix}_ modules ignored", f"{label} reads {component} only as {'/'.join(allowed_prefixes)}_…"
    return None


def _paths_by_group(view: FileView) -> dict[tuple[str | None, str], set[str | None]]:
    """(component, spelling) → the module paths stored under it: built once per check, so the
    q/k/v rule below looks its neighbours up instead of scanning every module for each one."""
    groups: dict[tuple[str | None, str], set[str | None]] = {}
    for m in view.modules:
        groups.setdefault((m.component, m.spelling), set()).add(m.path)
    return groups


class _PathsByGroup:
    """:func:`_paths_by_group` of a view, built on first use: most checks never need it."""

    def __init__(self, view: FileView) -> None:
        self.view = view
        self.groups: dict[tuple[str | None, str], set[str | None]] | None = None

    def get(self, key: tuple[str | None, str]) -> set[str | None]:
        if self.groups is None:
            self.groups = _paths_by_group(self.view)
        return self.groups.get(key, set())


def _qkv_dropped(
    table: Table, view: FileView, g: StoredModule, groups: _PathsByGroup, component: str | None, path: str | None
) -> bool:
    if g.spelling != table.qkv_needs_out_spelling or not _QKV.search(path or ""):
        return False
    family = view.family.name if view.family else "*"
    if f"{family}:{component}" not in table.qkv_needs_out and f"*:{component}" not in table.qkv_needs_out:
        return False
    present = groups.get((component, g.spelling))
    if table.target == "diffusers":  # the whole encoder's keys are renamed or not (state_dict_utils)
        return not any(_OUT.search(path or "") for path in present)
    layer = (path or "").rsplit(".self_attn.", 1)[0]  # A1111: one MultiheadAttention per layer
    return not all(f"{layer}.self_attn.{p}_proj" in present for p in ("q", "k", "v", "out"))


def _loader_rank(table: Table, g: StoredModule, shapes: dict[str, tuple[int, ...]]) -> int | None:
    if "lokr_w1_b" in g.keys or "lokr_w2_b" in g.keys:
        w1 = shapes.get(g.keys.get("lokr_w1_b", ""))
        w2 = shapes.get(g.keys.get("lokr_w2_b", ""))
        first, second = (w1, w2) if table.lokr_rank == "w1_b" else (w2, w1)
        chosen = first or second
        return int(chosen[0]) if chosen else g.rank
    return g.rank


def _diffusers_defaults(view: FileView) -> dict[str, float]:
    """Per component, the lora_alpha diffusers gives every module its alpha_pattern misses:
    the most common network alpha (first seen wins a tie: collections.Counter.most_common)."""
    alphas: dict[str, list[float]] = {}
    for g in view.modules:
        if g.spelling == "kohya" and g.component and g.alpha_tensor is not None:
            alphas.setdefault(g.component, []).append(g.alpha_tensor)
    return {c: Counter(v).most_common(1)[0][0] for c, v in alphas.items() if len(set(v)) > 1 or v}


def _applied_scale(
    table: Table,
    view: FileView,
    g: StoredModule,
    defaults: dict[str, float],
    shapes: dict[str, tuple[int, ...]],
    kind: str,
    path: str | None,
) -> tuple[float | None, str]:
    """(scale the target applies, why it differs if it does); ``kind``: ``_kind(g)``, ``path``: ``g.path``."""
    kind = kind.split("+")[0]
    if kind == "full":
        return 1.0, ""
    if table.alpha_source == "tensor" or g.spelling == "kohya":
        if table.default_alpha_misses is not None and g.spelling == "kohya":
            component = g.component or ""
            default = defaults.get(component)
            if default is None or g.rank is None:
                return (1.0 if g.alpha_tensor is None else g.alpha_tensor / g.rank) if g.rank else None, ""
            own = g.alpha_tensor
            miss = compiled(table.default_alpha_misses.get(component, r"(?!)")).match(path or "")
            if own is None:
                return default / g.rank, f"no alpha: {table.label} applies the most common alpha ({default:g})"
            if own != default and miss:
                return default / g.rank, f"per-module alphas: {table.label} applies the most common alpha ({default:g})"
            return own / g.rank, ""
        rank = _loader_rank(table, g, shapes)
        if g.alpha_tensor is None or not rank:
            if g.spelling != "kohya" and view.metadata:
                return 1.0, f"alpha only in metadata/config: {table.label} reads only '.alpha' tensors (scale 1)"
            return 1.0, f"no '.alpha' tensor: {table.label} applies scale 1"
        why = ""
        if rank != g.rank:
            why = (
                f"LoKr halves of different ranks: {table.label} divides alpha by {table.lokr_rank.replace('_b', '')}'s"
            )
        return g.alpha_tensor / rank, why
    # peft-family spellings in a loader that reads the file's alphas (diffusers)
    if view.alpha_in_config and not table.config_alphas:
        return 1.0, f"alpha only in adapter_config.json: {table.label}'s load_lora_weights does not read it"
    if table.no_alpha_mixed_rank == "first_rank" and g.rank and not view.metadata:
        ranks = [m.rank for m in view.modules if m.rank and m.component == g.component]
        if len(set(ranks)) > 1:
            return ranks[0] / g.rank, f"mixed ranks, no alphas: {table.label} applies alpha = the first rank"
    return g.scale, ""


def _file_rules(table: Table, view: FileView, out: _Collector) -> None:
    """Whole-file refusals: modules a format detector needs, modules converted only together."""
    for spelling, needed in table.required.items():
        present = {g.module for g in view.modules if g.spelling == spelling}
        missing = [m for m in needed if m not in present]
        if present and missing:
            out.refuse(f"{spelling} keys without {', '.join(missing)}: {table.required_reason}")
    for rule in table.siblings:
        paths = {(g.spelling, g.component, g.path) for g in view.modules}
        for g in view.modules:
            found = re.match(rule.pattern, g.path or "") if g.spelling in rule.spellings else None
            if found is None or found["member"] not in rule.members:
                continue
            lacking = [m for m in rule.members if (g.spelling, g.component, f"{found['base']}.{m}") not in paths]
            if lacking:
                out.refuse(f"{g.module} without {found['base']}.{lacking[0]}: {rule.reason}")
                return


def check_view(
    view: FileView, table: Table, base: set[str] | None = None, facts: ViewFacts | None = None
) -> TargetReport:
    """What ``table``'s loader does with ``view``; ``base``: canonical modules the base model has.
    ``facts``: ``ViewFacts(view)``, made once by a caller that checks the view against several tables."""
    if facts is None or facts.view is not view:
        facts = ViewFacts(view)
    shapes = view.shapes
    groups = facts.groups
    report = TargetReport(table.target, table.label, table.source, facts.counted)
    out = _Collector(report)
    if view.family is None:
        report.unsupported = (
            f"not a LoRA loratools can read ({view.loratools_error})"
            if view.loratools_error
            else "cannot tell the model family, so not what it maps"
        )
        return report
    if view.family.name not in table.families:
        report.unsupported = f"does not load {view.family.name} LoRAs"
        return report
    if table.unsupported is not None:
        report.unsupported = table.unsupported
        return report
    if view.container not in table.containers:
        out.refuse(f"{table.label} does not open a {view.container} ({view.format} LoRA)")
        return report
    defaults = _diffusers_defaults(view) if table.default_alpha_misses is not None else {}
    unmatched_keys = len(view.other_keys)
    for fact in facts.modules:
        g = fact.g
        if g.spelling in table.unknown_spellings:
            report.unknown.append(g.module or g.stem)
            note = f"unknown for {g.spelling}-spelled modules: {table.unknown_spellings[g.spelling]}"
            if note not in report.notes:
                report.notes.append(note)
            continue
        component, path = fact.component, fact.path
        missing = _not_mapped(table, view, g, base, component, path)
        if missing is not None:
            if g.spelling in table.refuse_spellings:
                out.refuse(f"{g.spelling} keys: {table.refuse_spellings[g.spelling]}")
            out.ignore(*missing, g)
            unmatched_keys += len(g.keys)
            continue
        params = fact.params
        if not fact.factors:
            if table.orphan_alpha == "loaded":
                out.ignore(
                    "orphan alphas counted as loaded",
                    "an '.alpha' with no factors: counted as loaded, nothing applied, no warning",
                    g,
                )
            elif table.orphan_alpha == "refuse":
                out.refuse(f"{g.stem}: an alpha with no factors")
            else:
                out.ignore("orphan alphas ignored", "an '.alpha' with no factors", g)
            continue
        if "lora_up.weight" in params and "lora_down.weight" not in params:
            if table.up_without_down in ("crash", "refuse"):
                how = "the load crashes (KeyError)" if table.up_without_down == "crash" else "the load fails"
                out.refuse(f"{g.stem}: lora_up without lora_down — {how}")
            else:
                out.ignore("lone lora_up modules ignored", "lora_up without lora_down", g)
                unmatched_keys += len(g.keys)
            continue
        if "lora_down.weight" in params and "lora_up.weight" not in params:
            if table.down_without_up in ("crash", "refuse"):
                how = "the load crashes (KeyError)" if table.down_without_up == "crash" else "the load fails"
                out.refuse(f"{g.stem}: lora_down without lora_up — {how}")
            else:
                out.ignore("lone lora_down modules ignored", "lora_down without lora_up", g)
                unmatched_keys += len(g.keys)
            continue
        kind = fact.kind
        base_kind, dora = kind.split("+")[0], "dora" in kind or "dora_scale" in params
        if base_kind not in table.kinds and not (base_kind == "dora" and "lora" in table.kinds):
            if table.other_kind == "refuse":
                out.refuse(f"{base_kind} modules are not read (e.g. {g.stem})")
            else:
                out.ignore(f"{base_kind} modules ignored", f"{table.label} does not read {base_kind} modules", g)
                unmatched_keys += len(g.keys)
            continue
        if _qkv_dropped(table, view, g, groups, component, path):
            out.ignore(
                "q/k/v modules dropped",
                f"{table.label} drops text-encoder q/k/v LoRAs when the attention's out_proj has none",
                g,
            )
            unmatched_keys += len(g.keys)
            continue
        report.applied.append(g.module or g.stem)
        for rule in table.dropped:
            if rule.param in params and g.spelling in rule.spellings and compiled(rule.path).match(path or ""):
                out.ignore(rule.short, rule.reason, g)
        if dora and table.dora != "applied" and table.target:
            report.misapplied.append(
                Misapplied(g.module or g.stem, f"DoRA dropped: {table.label} applies the module as plain LoRA")
            )
        if g.scale is None:
            continue
        applied, why = _applied_scale(table, view, g, defaults, shapes, kind, path)
        if applied is not None and not _close(applied, g.scale):
            report.misapplied.append(Misapplied(g.module or g.stem, why or "scale differs", g.scale, applied))
    _file_rules(table, view, out)
    if table.unmatched_limit is not None and unmatched_keys > table.unmatched_limit:
        out.refuse(f"{unmatched_keys} keys unmatched, more than {table.unmatched_limit}: 'LoRA version mismatch'")
    if view.loratools_error and not report.refused:
        report.notes.append(f"loratools itself cannot read the file: {view.loratools_error}")
    return report
