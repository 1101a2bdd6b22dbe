"""What a checkpoint write left out or could not fill, said in words (merge, unmerge, convert)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console

SHOWN = 6  # names shown per list; --json has them all


def _names(items: Mapping[str, str]) -> list[str]:
    rows = [f"    {name} — {why}" for name, why in list(items.items())[:SHOWN]]
    if len(items) > SHOWN:
        rows.append(f"    … {len(items) - SHOWN} more (--json lists them all)")
    return rows


def render_accounting(console: Console, report: Any) -> None:
    """Base tensors with no place in the output, output tensors not filled, folder files not carried."""
    target = "diffusers" if report.output_layout == "diffusers" else "single-file"
    if report.dropped:
        n = len(report.dropped)
        console.print(
            f"[yellow]note:[/yellow] {n} tensor{'s' if n != 1 else ''} of the base "
            f"{'have' if n != 1 else 'has'} no place in the {target} layout and {'are' if n != 1 else 'is'} not written:"
        )
        for row in _names(report.dropped):
            console.print(row, markup=False, highlight=False)
    if report.missing:
        n = len(report.missing)
        console.print(
            f"[yellow]warning:[/yellow] {n} tensor{'s' if n != 1 else ''} of the {target} layout could not be filled "
            "from the base:"
        )
        for row in _names(report.missing):
            console.print(row, markup=False, highlight=False)
    for item in getattr(report, "not_carried", {}).items():
        console.print(f"[yellow]note:[/yellow] {item[0]} — {item[1]}", highlight=False)
    for line in getattr(report, "notes", []):
        console.print(f"[dim]note:[/dim] {line}", highlight=False)
