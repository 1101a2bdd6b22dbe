"""``loratools convert`` (checkpoints; LoRA formats join later)."""

from __future__ import annotations

import click
from rich.console import Console

from ..ops.checkpoint import convert_checkpoint
from .errors import user_errors
from .options import dtype_option, family_option, overwrite_option
from .progress import byte_progress
from .render import human_bytes, print_json


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@click.argument("output", type=click.Path(path_type=str))
@click.option(
    "--to",
    "layout",
    type=click.Choice(["single", "diffusers"]),
    default=None,
    help="Output layout: one LDM/SGM .safetensors file, or a diffusers folder (default: same as SOURCE).",
)
@dtype_option
@family_option
@overwrite_option
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert(
    source: str, output: str, layout: str | None, dtype: str | None, family: str | None, overwrite: bool, as_json: bool
) -> None:
    """Convert a checkpoint between single-file and diffusers layouts and/or dtypes.

    Tensors are streamed one at a time: fused OpenCLIP q/k/v are split or joined exactly,
    text_projection is transposed as diffusers does, and tensors that need no change are copied
    as raw bytes.

    \b
    Examples:
      loratools convert sd15.safetensors sd15-diffusers --to diffusers
      loratools convert ./sdxl-diffusers sdxl.safetensors --to single --dtype fp16
    """
    console = Console(stderr=as_json)
    with user_errors():
        with byte_progress(console, "converting", enabled=not as_json) as advance:
            report = convert_checkpoint(
                source, output, layout=layout, dtype=dtype, family=family, overwrite=overwrite, progress=advance
            )
        if as_json:
            print_json(Console(), report.__dict__)
            return
        console.print(
            f"wrote {output}: {report.tensors_written} tensors, {human_bytes(report.bytes_written)} "
            f"({report.raw_copied} copied as raw bytes), {report.source_layout} → {report.output_layout}"
        )
        if report.dropped:
            console.print(
                f"[dim]note:[/dim] {len(report.dropped)} tensors have no place in the output layout "
                f"and were left out: {', '.join(report.dropped[:4])}{' …' if len(report.dropped) > 4 else ''}"
            )
        if report.missing:
            console.print(
                f"[yellow]warning:[/yellow] {len(report.missing)} output tensors could not be filled from "
                f"the source: {', '.join(report.missing[:4])}{' …' if len(report.missing) > 4 else ''}"
            )
