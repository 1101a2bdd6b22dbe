"""The census loop: list, read headers in a thread pool, append rows, summarize.

Header reads are I/O (local ``pread``, remote HTTP range requests), so a thread pool is enough:
``jobs`` files in flight (default 16 for Hub sources, 4 locally), the listing consumed lazily so a
10⁵-repository search never sits in memory as futures. Each file's failure — a bad header, a
file deleted from the Hub between listing and reading, an HTTP error — is that file's row.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .facts import PICKLE_SUFFIXES, describe, empty_row
from .sources import Entry, expand
from .store import Store

SUMMARY_SCHEMA = "loratools.census.summary/1"


@dataclass
class CensusSummary:
    """What a census found, over every row of the output (resumed rows included)."""

    output: str
    files: int = 0
    new: int = 0  # rows added by this run
    resumed: int = 0  # rows already in the output
    total_bytes: int = 0  # sum of the files' sizes
    bytes_read: int = 0  # by this run
    new_bytes: int = 0  # sizes of this run's files
    seconds: float = 0.0
    families_formats: dict[str, dict[str, int]] = field(default_factory=dict)
    broken: int = 0
    problems: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SUMMARY_SCHEMA, **self.__dict__, "problems": [list(p) for p in self.problems]}


def one_file(entry: Entry, scratch: str, *, alphas: bool, check: bool = False) -> dict[str, Any]:
    """The row of one entry; never raises for the file's own failures."""
    from .remote import RangeReader, fetch_header

    row = empty_row(entry)
    reader: RangeReader | None = None
    start = time.perf_counter()
    if entry.error is not None:
        return row
    try:
        if entry.is_local:
            describe(entry, Path(entry.path), row, alphas_read=True, check=check)
        elif entry.path.lower().endswith(PICKLE_SUFFIXES):
            row["kind"] = "pickle"
            row["problems"].append("pickle: not opened (a pickle can run code; convert it to safetensors)")
        else:
            reader = RangeReader(entry)
            fetched = fetch_header(entry, scratch, alphas=alphas, reader=reader)
            row.update(size=fetched.size, bytes_read=fetched.bytes_read, requests=fetched.requests)
            if fetched.problem is not None:
                row["problems"].append(fetched.problem)
            if fetched.path is not None:
                try:
                    describe(entry, fetched.path, row, alphas_read=fetched.alphas_read, stand_in=True, check=check)
                finally:
                    fetched.path.unlink(missing_ok=True)
    except Exception as exc:  # HTTP errors, a vanished file, a bug: this row only
        name = type(exc).__name__
        row["error"] = f"{name}: {' '.join(str(exc).split())[:300]}"
        if reader is not None:
            row.update(bytes_read=reader.bytes_read, requests=reader.requests)
    row["seconds"] = time.perf_counter() - start
    return row


def _bounded(
    pool: ThreadPoolExecutor, entries: Iterable[Entry], work: Callable[[Entry], dict[str, Any]], limit: int
) -> Iterator[dict[str, Any]]:
    running: set[Future[dict[str, Any]]] = set()
    for entry in entries:
        running.add(pool.submit(work, entry))
        if len(running) >= limit:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    for future in list(running):
        yield future.result()


def run_census(
    sources: list[str],
    output: str,
    *,
    jobs: int | None = None,
    alphas: bool = False,
    limit: int | None = None,
    restart: bool = False,
    check: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> CensusSummary:
    """Describe every LoRA-like file of ``sources`` into ``output`` (``.jsonl``/``.parquet``).

    Resumes by default: keys already in ``output`` are skipped (``restart`` starts anew).
    ``alphas``: also fetch remote alpha scalars (one range request per module; local files
    always have theirs read). ``check``: fill ``loads_in`` with loratools.check's verdicts. ``limit``: at most this many repositories per Hub search/author.
    """
    store = Store(output, restart=restart)
    done = store.done
    summary = CensusSummary(output=str(output), resumed=len(done))
    remote = any(s.startswith("hf://") for s in sources)
    workers = jobs or (16 if remote else 4)
    scratch = tempfile.mkdtemp(prefix="loratools-census-")
    start = time.perf_counter()
    try:
        todo = (e for e in expand(sources, limit=limit) if e.key not in done)
        with ThreadPoolExecutor(workers, thread_name_prefix="census") as pool:
            for row in _bounded(pool, todo, lambda e: one_file(e, scratch, alphas=alphas, check=check), workers * 4):
                store.append(row)
                summary.new += 1
                summary.bytes_read += row["bytes_read"] or 0
                summary.new_bytes += row["size"] or 0
                if progress:
                    progress(row)
        store.finish()
    finally:
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    summarize(summary, list(store.rows.values()))
    return summary


def summarize(summary: CensusSummary, rows: list[dict[str, Any]]) -> None:
    """Families × formats, broken files and the commonest problems, over ``rows``."""
    table: dict[str, Counter[str]] = {}
    problems: Counter[str] = Counter()
    for row in rows:
        family = row.get("family") or "—"
        fmt = row.get("format") or row.get("kind") or "unreadable"
        table.setdefault(family, Counter())[fmt] += 1
        for problem in row.get("problems") or []:
            problems[problem.split(":", 1)[0]] += 1
        if row.get("error"):
            problems["error: " + str(row["error"]).split(":", 1)[0]] += 1
    summary.files = len(rows)
    summary.total_bytes = sum(r.get("size") or 0 for r in rows)
    summary.families_formats = {f: dict(c) for f, c in sorted(table.items())}
    summary.broken = sum(bool(r.get("problems") or r.get("error")) for r in rows)
    summary.problems = problems.most_common(10)
