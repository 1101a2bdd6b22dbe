"""``loratools diff A B``: what differs between two LoRAs or two checkpoints."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import user_errors
from .options import family_option, threads_option
from .render_inspect import echo_json


@click.command("diff")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@family_option
@threads_option
@click.option("--top", type=click.IntRange(0), default=15, show_default=True, help="Largest differences listed.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON (schema loratools.diff/1).")
def diff_command(a: str, b: str, family: str | None, top: int, as_json: bool) -> None:
    """Compare two LoRAs (any dialects) or two checkpoints (any layouts).

    LoRAs: modules only in one, modules whose kind/rank/alpha differ, and ‖ΔW_A − ΔW_B‖_F per
    module, computed in factor space. Checkpoints: keys only in one, shape/dtype changes and
    ‖A − B‖_F per tensor, streamed. A and B may be hf://owner/repo/path[@revision] references.

    \b
    Examples:
      loratools diff lora-v1.safetensors lora-v2.safetensors
      loratools diff kohya.safetensors diffusers.safetensors --json
    """
    console = Console()
    with user_errors():
        from ..report.diff import diff

        report = diff(a, b, family=family)
        if as_json:
            echo_json(report.to_dict())
            return
        render_diff(console, report, top=top)


def render_diff(console: Console, report: object, *, top: int = 15) -> None:
    """Both sides, what is only in one, changed facts, the largest differences as bars."""
    from .render_inspect import bar

    r = report  # a DiffReport
    for side in ("a", "b"):
        facts = getattr(r, side)
        details = " · ".join(f"{k} {v}" for k, v in facts.items() if k != "path")
        console.print(f"[bold]{side.upper()}[/bold] {facts['path']}  [dim]{details}[/dim]", highlight=False)
    for note in r.notes:  # type: ignore[attr-defined]
        console.print(f"[dim]note:[/dim] {note}")
    for side, names in (("A", r.only_a), ("B", r.only_b)):  # type: ignore[attr-defined]
        if names:
            shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
            console.print(f"only in {side}: {len(names)} — {shown}", highlight=False)
    if r.changed_facts:  # type: ignore[attr-defined]
        table = Table(show_edge=False, header_style="bold", title="changed", title_justify="left")
        for column in ("name", "field", "A", "B"):
            table.add_column(column)
        for c in r.changed_facts[:top]:  # type: ignore[attr-defined]
            table.add_row(c["name"], c["field"], str(c["a"]), str(c["b"]))
        if len(r.changed_facts) > top:  # type: ignore[attr-defined]
            table.add_row(f"… {len(r.changed_facts) - top} more", "", "", "")  # type: ignore[attr-defined]
        console.print(table)
    what = "‖ΔW_A − ΔW_B‖" if r.kind == "lora" else "‖A − B‖"  # type: ignore[attr-defined]
    differing = sorted(
        (e for e in r.entries if e.status != "same" and e.diff_norm is not None),  # type: ignore[attr-defined]
        key=lambda e: -(e.diff_norm or 0.0),
    )
    if differing and top:
        table = Table(show_edge=False, header_style="bold", title=f"largest {what}", title_justify="left")
        for column in ("name", "status", what, "relative", ""):
            table.add_column(column, justify="right" if column in (what, "relative") else "left", overflow="fold")
        biggest = differing[0].diff_norm or 0.0
        for e in differing[:top]:
            table.add_row(
                e.name,
                e.status,
                f"{e.diff_norm:.4g}",
                f"{e.relative:.3g}" if e.relative is not None else "-",
                Text(bar(e.diff_norm or 0.0, biggest, 30), style="magenta"),
            )
        console.print(table)
    unit = "modules" if r.kind == "lora" else "tensors"  # type: ignore[attr-defined]
    total = r.total_diff_norm  # type: ignore[attr-defined]
    console.print(
        f"{r.identical} {unit} identical, {r.differing} differ"  # type: ignore[attr-defined]
        + (f"; total {what} {total:.4g}" if total is not None else "")
    )
    meta = r.metadata_changes  # type: ignore[attr-defined]
    if any(meta.values()):
        console.print(
            f"metadata: {len(meta['only_a'])} keys only in A, {len(meta['only_b'])} only in B, "
            f"{len(meta['changed'])} changed" + (f" ({', '.join(meta['changed'][:6])})" if meta["changed"] else "")
        )
