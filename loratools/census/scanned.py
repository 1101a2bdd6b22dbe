"""The census's fast path: a row's LoRA facts from one header scan, without building an inspect report.

:func:`loratools.report.inspect_lora` on a header-scannable file (kohya/LyCORIS, diffusers/peft
``.safetensors``) is :func:`loratools.formats.scan.scan_lora` followed by work a census row does
not use: the layout tree, embedding facts, the metadata summary's tag counts and, above all, the
loader-compat check tables (``report.loads_in``, ~80 % of a census's time before this module). A
census needs only the counts, so :func:`scan_facts` takes the same scan and counts its modules the
way ``inspect_lora`` does (format, family verdict, metadata claim, components, kinds, ranks,
alphas, parameters, dtypes, warnings). ``tests/test_census_fast.py`` holds the two equal on the
real LoRAs and on generated files of every header-scannable dialect.

Files the scan does not describe (embeddings only, cloneofsimo safeloras, FLUX.1 spellings,
names-only families, pickles) return ``None`` here and go through ``inspect_lora`` as before.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..formats.resolve import claimed_family
from ..formats.scan import LoraScan, scan_lora
from ..io.safetensors import TensorInfo


def _rank_counts(ranks: list[int | None]) -> dict[str, int]:
    """rank → module count, in rank order with ``None`` last (as ``inspect``'s ``ranks``)."""
    ordered = sorted(Counter(ranks).items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    return {str(k): v for k, v in ordered}


def _dtype_counts(scan: LoraScan) -> dict[str, int]:
    """Torch dtype name → count of stored non-alpha module tensors (``inspect``'s ``dtypes``).

    The torch names come from the scan itself (each module's ``dtype`` is its first factor's);
    a dtype no module's first factor has (mixed-dtype modules) is named through torch.
    """
    stored: Counter[str] = Counter()
    names: dict[str, str] = {}
    for module in scan.modules.values():
        kinds = {ref.info.dtype for key, ref in module.params.items() if key != "alpha"}
        if len(kinds) == 1:
            names.setdefault(next(iter(kinds)), module.dtype)
        stored.update(ref.info.dtype for key, ref in module.params.items() if key != "alpha")
    out: dict[str, int] = {}
    for dtype, count in stored.items():
        name = names.get(dtype) or str(TensorInfo(dtype, ()).torch_dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + count
    return out


def scan_facts(scan: LoraScan) -> dict[str, Any]:
    """The census facts of a header scan: the same values ``inspect_lora(path).to_dict()`` gives
    for ``format``, ``family``, ``metadata_claims``, ``family_mismatch``, ``modules``,
    ``components``, ``kinds``, ``ranks``, ``alphas``, ``parameters``, ``dtypes``, ``warnings``
    and ``metadata``; ``read`` is ``"header"``."""
    assert scan.verdict is not None and scan.family is not None  # a scan resolves a family or is None
    modules = list(scan.modules.values())
    claim, key = claimed_family(scan.metadata)
    return {
        "format": scan.format,
        "family": scan.verdict.family,
        "metadata_claims": f"{claim} ({key}={scan.metadata.get(key or '', 'True')})" if claim else None,
        "family_mismatch": claim is not None and claim != scan.verdict.family,
        "modules": len(modules),
        "components": dict(Counter(m.module.split(".", 1)[0] for m in modules)),
        "kinds": dict(Counter(m.kind for m in modules)),
        "ranks": _rank_counts([m.rank for m in modules]),
        "alphas": {f"{k:g}" if k is not None else "none": v for k, v in Counter(m.alpha for m in modules).items()},
        "parameters": sum(m.parameters for m in modules),
        "dtypes": _dtype_counts(scan),
        "warnings": list(scan.warnings),
        "metadata": dict(scan.metadata),
        "read": "header",
    }


def fast_facts(path: str | Path) -> dict[str, Any] | None:
    """:func:`scan_facts` of ``path``'s header scan, or ``None`` where the scan needs the tensors
    (the caller then uses ``inspect_lora``). Raises the scan's errors (those of ``load_lora``)."""
    scan = scan_lora(path)
    return None if scan is None or scan.family is None or scan.verdict is None else scan_facts(scan)
