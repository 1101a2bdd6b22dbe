"""``loratools census``: facts about every LoRA of folders and Hub repositories, headers only."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from .errors import user_errors


@click.command("census")
@click.argument("sources", nargs=-1, required=True, type=str)
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="facts.jsonl, or facts.parquet (pip install 'loratools[census]').")  # fmt: skip
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=None,
              help="Files read at once (default 16 for hf:// sources, 4 for local ones).")  # fmt: skip
@click.option("-P", "--processes", type=click.IntRange(1, 256), default=None,
              help="Worker processes for a census of many files (default: one per free core; 1: none).")  # fmt: skip
@click.option("--alphas", is_flag=True,
              help="Also fetch each remote module's alpha scalar (range requests, adjacent alphas coalesced).")  # fmt: skip
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many repositories per hf:// search.")
@click.option("--check", "with_check", is_flag=True,
              help="Also record which loaders load each file (loratools check; slower).")  # fmt: skip
@click.option("--restart", is_flag=True, help="Start anew instead of continuing the census in OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (schema loratools.census.summary/1).")
def census(sources: tuple[str, ...], output: str, jobs: int | None, processes: int | None, alphas: bool, limit: int | None, restart: bool,
           with_check: bool, as_json: bool) -> None:  # fmt: skip
    """Describe every LoRA-like file of SOURCES into OUTPUT, one row per file, from headers only.

    \b
    SOURCES: folders (recursively), files, list files (.txt: one source a line),
    hf://owner/repo[@rev][/path], hf://owner (an author's model repos), hf://?filter=lora&search=…
    Remote files are never downloaded: the header is read with HTTP range requests. Each row:
    repo@revision, path, size, format, family, module counts per component, kinds, ranks,
    alphas, dtypes, declared base model, trigger words, training summary, stored hashes, and
    the problems (truncated, lfs-pointer, pickle — flagged, never opened — not-a-lora, errors).
    An interrupted census continues where it stopped when run again (--restart to redo).

    \b
    Examples:
      loratools census ~/loras -o facts.jsonl
      loratools census hf://owner/repo hf://another-owner -o facts.parquet
      loratools census 'hf://?filter=lora&search=sdxl' --limit 500 -o sdxl.parquet
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..census import run_census

    console = Console(stderr=as_json)
    stderr = Console(stderr=True)
    with user_errors():
        columns = (TextColumn("census"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
            task = bar.add_task("census", total=None)
            summary = run_census(list(sources), output, jobs=jobs, processes=processes, alphas=alphas, limit=limit, restart=restart, check=with_check,
                                 progress=lambda row: bar.advance(task))  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return
    formats = sorted({f for c in summary.families_formats.values() for f in c})
    table = Table(title="families × formats", show_edge=False, header_style="bold")
    table.add_column("family")
    for fmt in formats:
        table.add_column(fmt, justify="right")
    for family, counts in summary.families_formats.items():
        table.add_row(family, *(str(counts.get(f, "")) for f in formats))
    console.print(table)
    ratio = f"{summary.bytes_read / summary.new_bytes:.3%}" if summary.new_bytes else "—"
    console.print(
        f"{summary.files} files in {output} ({summary.new} new, {summary.resumed} from before); "
        f"{summary.broken} with problems; read {summary.bytes_read:,} bytes of {summary.new_bytes:,} ({ratio}) "
        f"in {summary.seconds:.1f} s"
    )
    if summary.problems:
        console.print("top problems: " + ", ".join(f"{name} ×{n}" for name, n in summary.problems))
