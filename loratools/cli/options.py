"""Options shared by several commands."""

from __future__ import annotations

import click

from ..families import FAMILIES
from ..ops.blocks import DEFAULT_TOOL, TOOLS

family_option = click.option(
    "--family",
    type=click.Choice(sorted(FAMILIES)),
    default=None,
    help="Model family, when it cannot be told from the tensors (normally detected).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never an input).")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default=None,
    help="Float dtype of the output (default: keep each tensor's own).",
)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    from .. import threads

    threads.set_threads(value)


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_threads,
    help="Use at most N threads (default: every free core; OMP_NUM_THREADS/MKL_NUM_THREADS are respected).",
)


blocks_from_option = click.option(
    "--blocks-from",
    type=click.Choice(TOOLS),
    default=DEFAULT_TOOL,
    show_default=True,
    help="Whose block numbering an untagged lbw= vector uses (docs/FORMATS.md §13).",
)


tokenizers_from_option = click.option(
    "--tokenizers-from",
    "tokenizers_from",
    type=click.Path(path_type=str),
    default=None,
    help="A single file written as a diffusers folder: copy tokenizer/ [tokenizer_2/] from FOLDER (a diffusers "
    "folder or one holding them); weights cannot make them (docs/FORMATS.md §5.6).",
)
