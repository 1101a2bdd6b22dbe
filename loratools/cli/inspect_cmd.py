"""``loratools inspect``."""

from __future__ import annotations

import click
from rich.console import Console

from ..report import inspect_checkpoint
from .errors import user_errors
from .options import family_option
from .render import print_json, render_checkpoint


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@family_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the facts as JSON (schema loratools.inspect.checkpoint/1)."
)
def inspect_command(paths: tuple[str, ...], family: str | None, as_json: bool) -> None:
    """Show what is inside a checkpoint: family, layout, components, dtypes, size.

    PATHS are single files (.safetensors, or .ckpt/.pt/.bin read weights-only) or diffusers
    folders. Only headers are read, so this is instant even for SDXL.

    \b
    Examples:
      loratools inspect v1-5-pruned-emaonly.safetensors
      loratools inspect ./stable-diffusion-xl-base-1.0 --json
    """
    console = Console()
    with user_errors():
        reports = [inspect_checkpoint(p, family=family) for p in paths]
        if as_json:
            print_json(console, reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
            return
        for i, report in enumerate(reports):
            if i:
                console.print()
            render_checkpoint(console, report)
