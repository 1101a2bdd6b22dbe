"""``loratools`` — the click group; one module per command."""

from __future__ import annotations

import click

from .. import __version__
from .batch import batch_group
from .census_cmd import census
from .check_cmd import check_command
from .convert_cmd import convert
from .demo_cmd import demo
from .diff_cmd import diff_command
from .inspect_cmd import inspect_command
from .merge_cmd import merge, unmerge
from .rank_cmds import blend, extract, rescale, resize

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(
    context_settings=CONTEXT,
    epilog="Formats reference (cited as docs/FORMATS.md §N): docs/FORMATS.md in the source tree.",
)
@click.version_option(__version__, prog_name="loratools")
def cli() -> None:
    """LoRA weight surgery for Stable Diffusion (SD 1.x, 2.x, SDXL), directly on state dicts.

    \b
    Every command reads headers first and tensors one at a time; outputs are written to a
    temporary file and renamed into place only when complete.

    \b
    Try:  loratools demo
          loratools inspect model.safetensors
          loratools convert model.safetensors model-diffusers --to diffusers
          loratools merge model.safetensors style.safetensors:0.8 -o merged.safetensors
    """


cli.add_command(inspect_command)
cli.add_command(check_command)
cli.add_command(diff_command)
cli.add_command(convert)
cli.add_command(merge)
cli.add_command(unmerge)
cli.add_command(rescale)
cli.add_command(resize)
cli.add_command(blend)
cli.add_command(extract)
cli.add_command(demo)
cli.add_command(batch_group)
cli.add_command(census)


def main() -> None:
    cli(prog_name="loratools")


if __name__ == "__main__":
    main()
