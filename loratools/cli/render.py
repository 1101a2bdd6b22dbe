"""Human renderings (rich) and JSON of report data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from rich.console import Console

if TYPE_CHECKING:  # annotations only: print_json/human_bytes users never load the report models or rich.table
    from ..report import CheckpointReport, LoraReport


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}B"


def print_json(console: Console, data: Any) -> None:
    console.print_json(json.dumps(data), highlight=False)


LAYOUT_TITLES = {"ldm": "single file (LDM)", "sgm": "single file (SGM)", "diffusers": "diffusers folder"}


def render_checkpoint(console: Console, report: CheckpointReport) -> None:
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(report.path, style="bold")
    head.append(f"  ·  {report.family_title}", style="bold cyan")
    head.append(f"  ·  {LAYOUT_TITLES.get(report.layout, report.layout)}")
    head.append(f"  ·  {report.file_format}  ·  {human_bytes(report.file_bytes)}")
    console.print(head)

    table = Table(show_edge=False, header_style="bold")
    table.add_column("component")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("size", justify="right")
    table.add_column("dtypes")
    for part in report.components:
        dtypes = ", ".join(f"{d}×{n}" if len(part.dtypes) > 1 else d for d, n in sorted(part.dtypes.items()))
        table.add_row(part.title, str(part.tensors), human_count(part.parameters), human_bytes(part.bytes), dtypes)
    table.add_row(
        "total",
        str(report.tensors),
        human_count(report.parameters),
        human_bytes(sum(p.bytes for p in report.components)),
        "",
        style="bold",
    )
    console.print(table)

    arch = report.architecture
    encoders = cast("list[dict[str, Any]]", arch.get("text_encoders", []))
    texts = ", ".join(f"{t['component']} {t['hidden']}×{t['layers']}" for t in encoders)
    if "transformer_hidden" in arch:
        denoiser = (
            f"transformer: {arch['transformer_double_blocks']} double + {arch['transformer_single_blocks']} single "
            f"blocks, hidden {arch['transformer_hidden']} ({arch['transformer_heads']} heads), "
            f"{arch['transformer_in_channels']} in-channels ({report.variant}), context {arch['cross_attention_dim']}"
        )
    else:
        denoiser = (
            f"U-Net: {arch['unet_model_channels']} channels × {arch['unet_channel_mult']}, "
            f"{arch['unet_in_channels']} in-channels ({report.variant}), context {arch['cross_attention_dim']}"
        )
    console.print(denoiser + (f"; text encoders: {texts}" if texts else ""))
    for note in report.notes:
        console.print(f"[dim]note:[/dim] {note}")
    if report.missing_count:
        console.print(
            f"[yellow]warning:[/yellow] {report.missing_count} expected tensors missing, e.g. {', '.join(report.missing[:3])}"
        )
    if report.unknown_count:
        console.print(
            f"[yellow]warning:[/yellow] {report.unknown_count} tensors of no known module, e.g. {', '.join(report.unknown[:3])}"
        )
    for mismatch in report.shape_mismatches[:5]:
        console.print(f"[yellow]warning:[/yellow] shape mismatch {mismatch}")
    if report.dropped_non_tensors:
        console.print(f"[dim]note:[/dim] non-tensor entries ignored: {', '.join(report.dropped_non_tensors[:5])}")
    if report.metadata:
        console.print(
            f"metadata: {len(report.metadata)} entries ({', '.join(sorted(report.metadata)[:6])}{', …' if len(report.metadata) > 6 else ''})"
        )
    if report.provenance is not None:
        from .render_inspect import render_provenance  # render_inspect imports this module

        render_provenance(console, report.provenance)


FORMAT_TITLES = {
    "kohya": "kohya (sd-scripts / LyCORIS)",
    "diffusers": "diffusers (peft keys)",
    "peft": "peft adapter folder",
    "diffusers-attn-processor": "old diffusers (attention processors)",
    "diffusers-old": "old diffusers",
    "cloneofsimo": "cloneofsimo lora_diffusion",
}


def render_lora(console: Console, report: LoraReport) -> None:
    from rich.table import Table
    from rich.text import Text

    head = Text()
    head.append(report.path, style="bold")
    head.append(f"  ·  LoRA for {report.family_title}", style="bold cyan")
    head.append(f"  ·  {FORMAT_TITLES.get(report.format, report.format)}  ·  {human_bytes(report.file_bytes)}")
    console.print(head)
    if report.metadata_claims:
        mismatch = getattr(report, "family_mismatch", False)
        verdict = "[yellow]disagrees: the shapes win[/yellow]" if mismatch else "[green]agrees[/green]"
        console.print(
            f"family from shapes: {report.family_title} · metadata claims: {report.metadata_claims} · {verdict}"
        )
    table = Table(show_edge=False, header_style="bold")
    for column in ("component", "modules", "kinds", "ranks", "alphas"):
        table.add_column(column)
    for component, count in report.components.items():
        facts = [f for f in report.module_facts if f.module.startswith(component + ".")]
        kinds = sorted({f.kind for f in facts})
        ranks = sorted({f.rank for f in facts if f.rank is not None})
        alphas = sorted({f.alpha for f in facts if f.alpha is not None})
        table.add_row(component, str(count), ", ".join(kinds), _span(ranks), _span(alphas))
    console.print(table)
    console.print(
        f"{report.modules} modules, {human_count(report.parameters)} parameters, dtypes "
        + ", ".join(f"{d}×{n}" for d, n in report.dtypes.items())
    )
    if report.embeddings:
        console.print(f"textual-inversion embeddings: {', '.join(report.embeddings)}")
    for warning in report.warnings[:10]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _span(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:g}"
    return f"{values[0]:g}…{values[-1]:g} ({len(values)} values)"
