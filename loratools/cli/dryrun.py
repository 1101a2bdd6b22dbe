"""``--dry-run`` for every writing command, in one place.

A dry run runs the command's own code with its writers measuring instead of writing
(io/measure.py): each safetensors file's size comes from the header builder the real writer uses
(io/safetensors.py ``build_header``: names, dtypes, shapes, metadata, the ModelSpec hash
placeholder), each side file (configs, indexes, copied files) from the text or file it would be.
Nothing is created — not at OUTPUT, not beside it, not in a temporary folder — and the checks
OUTPUT would face (an existing file without --overwrite, OUTPUT being an input) are made first, so
a dry run fails where the real run would.

What is computed: checkpoint commands (convert, merge, unmerge) only plan, reading headers and no
tensor. LoRA commands (convert, rescale, resize, blend, extract) compute their factors, since the
output's shapes are the result (a dynamic rank rule, an SVD blend, --to-lora, extract's ranks);
the factors are checked against the plan and dropped, never serialized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from ..errors import InputError
from ..io.atomic import check_destination
from ..io.files import same_path
from ..io.measure import measuring, tree_bytes
from .render import human_bytes

__all__ = ["Destination", "destination", "dry_run_option", "json_fields", "print_dry_run", "say_written", "tree_bytes"]

dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Plan (and compute the factors of a LoRA) but write nothing: print the report and the exact size "
    "the output would have.",
)


@dataclass
class Destination:
    """Where a command writes (``path``) and, after a dry run, how many bytes it wrote there."""

    output: str
    path: str
    dry_run: bool
    bytes: int = 0


@contextmanager
def destination(
    output: str, dry_run: bool, *, inputs: Sequence[str] = (), overwrite: bool = False
) -> Iterator[Destination]:
    """OUTPUT itself; with ``dry_run`` still OUTPUT, but every writer inside measures (bytes set on exit)."""
    if not dry_run:
        yield Destination(output, output, False)
        return
    for source in inputs:
        if same_path(output, source):
            raise InputError(f"{output}: output is the input; write elsewhere")
    check_destination(Path(output), overwrite=overwrite)
    with measuring() as tally:
        dest = Destination(output, output, True)
        yield dest
    dest.bytes = tally.total  # sidecars (embeddings) included: they are part of the output


def say_written(console: Console, dest: Destination) -> str:
    """``wrote OUTPUT`` or ``dry run: would write OUTPUT``, for the command's summary line."""
    return f"dry run: would write {dest.output}" if dest.dry_run else f"wrote {dest.output}"


def print_dry_run(console: Console, dest: Destination) -> None:
    """The dry run's last line: the exact size, and that nothing was written."""
    if dest.dry_run:
        console.print(
            f"dry run: {dest.output} would be {human_bytes(dest.bytes)} ({dest.bytes} bytes); nothing written"
        )


def json_fields(dest: Destination) -> dict[str, object]:
    """Fields a dry run adds to ``--json`` output (none for a real run, so the schemas stay as they are)."""
    return {"dry_run": True, "output_bytes": dest.bytes} if dest.dry_run else {}
