"""``loratools inspect``."""

from __future__ import annotations

import click
from rich.console import Console

from ..classify import classify
from ..report import inspect_checkpoint, inspect_lora
from .errors import user_errors
from .options import family_option
from .render import print_json, render_checkpoint, render_lora


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@family_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print the facts as JSON (schema loratools.inspect.checkpoint/1)."
)
def inspect_command(paths: tuple[str, ...], family: str | None, as_json: bool) -> None:
    """Show what is inside a checkpoint or a LoRA: family, layout/format, components, ranks, dtypes.

    PATHS are single files (.safetensors, or .ckpt/.pt/.bin read weights-only), diffusers
    folders or peft adapter folders. For checkpoints only headers are read.

    \b
    Examples:
      loratools inspect v1-5-pruned-emaonly.safetensors
      loratools inspect ./stable-diffusion-xl-base-1.0 --json
      loratools inspect my_lora.safetensors
    """
    console = Console()
    with user_errors():
        reports = [
            inspect_lora(p, family=family) if classify(p) == "lora" else inspect_checkpoint(p, family=family)
            for p in paths
        ]
        if as_json:
            print_json(console, reports[0].to_dict() if len(reports) == 1 else [r.to_dict() for r in reports])
            return
        for i, report in enumerate(reports):
            if i:
                console.print()
            if report.to_dict()["kind"] == "lora":
                render_lora(console, report)  # type: ignore[arg-type]
            else:
                render_checkpoint(console, report)  # type: ignore[arg-type]
