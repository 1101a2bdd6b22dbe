"""``loratools check``: will a LoRA load in each target, at the right strength? Writes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape

from .batch import batchable
from .dryrun import Destination, json_fields, say_written
from .errors import user_errors
from .options import family_option
from .render import print_json

if TYPE_CHECKING:
    from ..check.fix import FixReport

SHOWN = 5


@batchable("check")
@click.command("check")
@click.argument("lora", type=click.Path(path_type=str))
@click.option(
    "--for",
    "target",
    default="all",
    show_default=True,
    help="comfyui | a1111 (A1111 and Forge) | forge | diffusers | invokeai | kohya | all; "
    "versions: diffusers@0.42, diffusers@0.42+transformers4, diffusers@0.39.",
)
@click.option("--base", type=click.Path(path_type=str), default=None, help="Check against this checkpoint's modules.")
@family_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON (schema: loratools check --schema).")
@click.option("--schema", "show_schema", is_flag=True, help="Print the JSON Schema of --json and exit.")
def check_command(
    lora: str, target: str, base: str | None, family: str | None, as_json: bool, show_schema: bool
) -> None:
    """Say what each target's LoRA loader does with LORA: modules applied, keys ignored (and why),
    modules applied at another strength than the file's own, or the file refused outright.

    \b
    The rules are each loader's own, read in its source (docs/CHECK.md). Header-only for
    .safetensors files. Fix what it finds with: loratools convert LORA OUT --for TARGET.

    \b
    Examples:
      loratools check my_lora.safetensors
      loratools check my_lora.safetensors --for diffusers --json
      loratools check sdxl_lora.safetensors --for comfyui --base refiner.safetensors
    """
    with user_errors():
        from ..check import check_lora
        from ..check.schema import CHECK_SCHEMA

        if show_schema:
            print_json(Console(), CHECK_SCHEMA)
            return
        result = check_lora(lora, target, base=base, family=family)
        if as_json:
            print_json(Console(), result.to_dict())
            return
        console = Console(highlight=False)
        console.print(
            f"[bold]{escape(result.path)}[/bold]  ·  {result.format}, {result.family or 'unknown family'}, "
            f"{result.modules} modules" + (f"  ·  base {escape(result.base)}" if result.base else "")
        )
        if result.loratools_error:
            console.print(f"[yellow]note:[/yellow] loratools cannot read it either: {escape(result.loratools_error)}")
        for report in result.reports:
            style = "green" if report.clean else ("red" if report.refused else "yellow")
            console.print(f"[{style}]{escape(report.verdict)}[/{style}]")
            for group in report.ignored:
                names = ", ".join(group.names[:SHOWN]) + (" …" if len(group.names) > SHOWN else "")
                console.print(f"  ignored {len(group.names)}: {escape(group.reason)}")
                console.print(f"    [dim]{escape(names)}[/dim]")
            for m in report.misapplied[:SHOWN]:
                scales = (
                    f" (expected ×{m.expected:.4g}, applied ×{m.applied:.4g})"
                    if m.expected is not None and m.applied is not None
                    else ""
                )
                console.print(f"  wrong: {escape(m.module)}{scales}: {escape(m.why)}")
            if len(report.misapplied) > SHOWN:
                console.print(f"  [dim]… and {len(report.misapplied) - SHOWN} more at the wrong strength[/dim]")
            for note in report.notes:
                console.print(f"  [dim]{escape(note)}[/dim]")


def convert_for_target(
    source: str,
    output: str,
    target: str,
    to: str | None,
    family: str | None,
    dtype: str | None,
    to_lora: bool,
    rank: int | None,
    error: float | None,
    overwrite: bool,
) -> FixReport:
    """``convert SOURCE OUTPUT --for TARGET`` (called by cli/convert_cmd.py inside its error handler)."""
    from ..check.fix import convert_for
    from ..errors import InputError

    if to is not None:
        raise InputError("--for TARGET chooses the output format itself; drop --to")
    return convert_for(
        source, output, target, family=family, dtype=dtype, to_lora=to_lora, rank=rank, error=error, overwrite=overwrite
    )


def render_for_target(report: FixReport, dest: Destination, as_json: bool) -> None:
    """The ``convert --for`` summary (or JSON, with a dry run's fields), once the output is written or measured."""
    if as_json:
        print_json(Console(), {**report.to_dict(), **json_fields(dest)})
        return
    console = Console(highlight=False)
    console.print(
        f"{escape(say_written(console, dest))}: {report.modules} modules as {report.dialect} for "
        f"{', '.join(report.targets)}"
    )
    if report.added:
        console.print(f"  added {len(report.added)} zero out_proj modules so q/k/v are applied (ΔW unchanged)")
    if dest.dry_run:
        console.print("  [dim]loader verdicts are checked on the written file: run without --dry-run[/dim]")
    for verdict in report.verdicts:
        console.print(f"  [{'green' if verdict not in report.remaining else 'yellow'}]{escape(verdict)}[/]")
    for warning in report.warnings[:SHOWN]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if len(report.warnings) > SHOWN:
        console.print(f"[dim]… and {len(report.warnings) - SHOWN} more warnings (--json lists them)[/dim]")
