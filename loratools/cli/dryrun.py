"""``--dry-run`` for every writing command, in one place.

A dry run does all the work of the command (the plan, the SVDs, the serialization) into a private
temporary folder, measures what landed there and removes it: the size it reports is the exact size
of the real output because it *is* the real output, written elsewhere. Nothing appears at OUTPUT,
and the checks OUTPUT would face (an existing file without --overwrite, OUTPUT being an input) are
made first, so a dry run fails where the real run would.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console

from ..errors import InputError
from ..io.atomic import check_destination
from ..io.files import same_path
from .render import human_bytes

dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Do everything but write OUTPUT: print the report and the exact size the output would have.",
)


@dataclass
class Destination:
    """Where a command writes (``path``) and, after a dry run, how many bytes it wrote there."""

    output: str
    path: str
    dry_run: bool
    bytes: int = 0


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@contextmanager
def destination(
    output: str, dry_run: bool, *, inputs: Sequence[str] = (), overwrite: bool = False
) -> Iterator[Destination]:
    """OUTPUT itself, or with ``dry_run`` the same name in a temporary folder (size measured on exit)."""
    if not dry_run:
        yield Destination(output, output, False)
        return
    for source in inputs:
        if same_path(output, source):
            raise InputError(f"{output}: output is the input; write elsewhere")
    check_destination(Path(output), overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="loratools-dry-run-") as tmp:
        dest = Destination(output, str(Path(tmp) / Path(output).name), True)
        yield dest
        dest.bytes = tree_bytes(Path(tmp))  # sidecars (embeddings) included: they are part of the output


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
