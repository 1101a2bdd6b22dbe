"""Will it load, at the right strength? Each target's LoRA loader as data, and a check against it.

``check_lora(path, "comfyui")`` reads a LoRA's header (tensors only where the format needs them),
and reports per target which modules it applies, which keys it ignores and why, which modules it
applies at another scale than the file's own, and whether it refuses the file (docs/CHECK.md).
Nothing here writes anything; :mod:`.fix` writes the file a target loads completely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..families.spec import FamilySpec
from .engine import Ignored, Misapplied, TargetReport, ViewFacts, check_view
from .tables import FAMILY_TABLES, GROUPS, TABLES, TARGET_NAMES, VERSIONS, Table, for_family, tables_for
from .view import FileView, build_view

if TYPE_CHECKING:
    from ..formats.scan import LoraScan

SCHEMA_ID = "loratools.check/1"

__all__ = [
    "FAMILY_TABLES",
    "GROUPS",
    "SCHEMA_ID",
    "TABLES",
    "TARGET_NAMES",
    "VERSIONS",
    "CheckResult",
    "FileView",
    "Ignored",
    "Misapplied",
    "Table",
    "TargetReport",
    "base_modules",
    "build_view",
    "check_lora",
    "check_view",
    "for_family",
    "loads_in",
    "tables_for",
]


@dataclass
class CheckResult:
    """A LoRA checked against one or more targets."""

    path: str
    format: str
    family: str | None
    modules: int
    reports: list[TargetReport] = field(default_factory=list)
    base: str | None = None
    loratools_error: str | None = None

    @property
    def clean(self) -> bool:
        return all(r.clean for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "path": self.path,
            "format": self.format,
            "family": self.family,
            "modules": self.modules,
            "base": self.base,
            "loratools_error": self.loratools_error,
            "clean": self.clean,
            "targets": [r.to_dict() for r in self.reports],
        }


def base_modules(path: str | os.PathLike[str]) -> tuple[FamilySpec, set[str]]:
    """The family and canonical module names a base checkpoint really has (headers only)."""
    from ..families import keymap
    from ..families.detect import detect
    from ..io.checkpoint import open_checkpoint

    with open_checkpoint(path) as ckpt:
        shapes = ckpt.shapes()
        metadata = dict(ckpt.metadata)
    found = detect(shapes, metadata)
    km = keymap(found.family)
    modules = {w.module for key in shapes for w in km.lookup(found.layout, key)}
    return found.family, modules


def check_lora(
    path: str | os.PathLike[str],
    target: str = "all",
    *,
    base: str | os.PathLike[str] | None = None,
    family: str | FamilySpec | None = None,
) -> CheckResult:
    """Check a LoRA against ``target`` (a name from :data:`TARGET_NAMES` or :data:`VERSIONS`).

    ``base``: a checkpoint whose real module set (and family) replaces the full-size default —
    a LoRA for SDXL base checked against a refiner or a pruned model. Never writes anything.
    """
    tables = tables_for(target)
    present: set[str] | None = None
    if base is not None:
        base_family, present = base_modules(base)
        family = family or base_family
    view = build_view(path, family)
    name = view.family.name if view.family else None
    facts = ViewFacts(view)
    reports = [check_view(view, for_family(table, name), present, facts) for table in tables]
    counted = reports[0].modules if reports else len(view.modules)
    return CheckResult(
        str(path),
        view.format,
        view.family.name if view.family else None,
        counted,
        reports,
        str(base) if base is not None else None,
        view.loratools_error,
    )


def loads_in(
    path: str | os.PathLike[str], family: str | FamilySpec | None = None, *, scan: LoraScan | None = None
) -> list[str]:
    """One short entry per target for ``inspect``'s "loads in" line, from the tables only
    ("ComfyUI ✓", "diffusers 0.42: 175 wrong strength", "Forge: refuses"); ``[]`` when the file
    cannot be viewed. ``scan``: the caller's header scan of ``path``, reused (see :func:`build_view`)."""
    from ..errors import LoratoolsError

    try:
        view = build_view(path, family, scan=scan)
    except LoratoolsError:
        return []
    out = []
    facts = ViewFacts(view)
    for table in tables_for("all"):
        table = for_family(table, view.family.name if view.family else None)
        report = check_view(view, table, facts=facts)
        if report.clean:
            out.append(f"{table.label} ✓")
        elif report.refused or report.unsupported:
            out.append(f"{table.label}: refuses" if report.refused else f"{table.label}: unsupported")
        else:
            ignored = sum(len(g.names) for g in report.ignored)
            parts = [f"{len(report.misapplied)} wrong"] if report.misapplied else []
            parts += [f"{ignored} ignored"] if ignored else []
            out.append(f"{table.label}: {', '.join(parts)}")
    return out
