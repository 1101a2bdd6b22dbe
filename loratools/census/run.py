"""The census loop: list, read headers in a thread pool (and worker processes), append rows, summarize.

Header reads are I/O (local ``pread``, remote HTTP range requests), so threads hide the waiting:
``jobs`` files in flight (``threads.io_workers``: 16 for Hub sources, 4 locally), the listing
consumed lazily so a 10⁵-repository search never sits in memory as futures. Describing a header
is Python work under one GIL (~30 ms for a full-size SDXL kohya header, most of it the
``scan_lora`` scan), so a census of many files also spreads batches over worker processes, one
per free core. Each file's failure — a bad header, a file deleted from the Hub between listing
and reading, an HTTP error — is that file's row.
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Any

from ..io.suffixes import PICKLE_SUFFIXES
from .facts import describe, empty_row
from .sources import Entry, expand
from .store import Store

SUMMARY_SCHEMA = "loratools.census.summary/1"
PROCESS_MIN = 256  # entries a census must have before worker processes (~0.3 s each to start) pay
BATCH = 32  # entries per task sent to a worker process


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
    layout_hits: int = 0  # this run's rows served from the layout cache (census/layouts.py)
    layout_misses: int = 0  # this run's rows whose layout was described through the readers

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SUMMARY_SCHEMA, **self.__dict__, "problems": [list(p) for p in self.problems]}


def one_file(
    entry: Entry, scratch: str, *, alphas: bool, check: bool = False, layout_cache: bool = True
) -> dict[str, Any]:
    """The row of one entry; never raises for the file's own failures."""
    from .remote import RangeReader, fetch_header

    row = empty_row(entry)
    reader: RangeReader | None = None
    start = time.perf_counter()
    if entry.error is not None:
        return row
    try:
        if entry.is_local:
            describe(entry, Path(entry.path), row, alphas_read=True, check=check, layout_cache=layout_cache)
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
                    describe(entry, fetched.path, row, alphas_read=fetched.alphas_read, stand_in=True, check=check,
                             layout_cache=layout_cache)  # fmt: skip
                finally:
                    fetched.path.unlink(missing_ok=True)
    except Exception as exc:  # HTTP errors, a vanished file, a bug: this row only
        name = type(exc).__name__
        row["error"] = f"{name}: {' '.join(str(exc).split())[:300]}"
        if reader is not None:
            row.update(bytes_read=reader.bytes_read, requests=reader.requests)
    row["seconds"] = time.perf_counter() - start
    return row


def _bounded(pool: Executor, items: Iterable[Any], work: Callable[[Any], Any], limit: int) -> Iterator[Any]:
    running: set[Future[Any]] = set()
    for item in items:
        running.add(pool.submit(work, item))
        if len(running) >= limit:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    for future in list(running):
        yield future.result()


def one_batch(
    entries: list[Entry], scratch: str, threads: int, alphas: bool, check: bool, layout_cache: bool = True
) -> tuple[list[dict[str, Any]], int, int]:
    """The rows of a batch, in a worker process: its entries over ``threads`` threads; and the
    layout cache's hits and misses over the batch (the process runs one batch at a time)."""
    from .layouts import CACHE

    hits, misses = CACHE.hits, CACHE.misses

    def work(entry: Entry) -> dict[str, Any]:
        return one_file(entry, scratch, alphas=alphas, check=check, layout_cache=layout_cache)

    if threads <= 1:
        rows = [work(e) for e in entries]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="census") as pool:
            rows = list(pool.map(work, entries))
    return rows, CACHE.hits - hits, CACHE.misses - misses


def _batches(entries: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    it = iter(entries)
    while batch := list(islice(it, size)):
        yield batch


def _rows(
    todo: Iterator[Entry],
    scratch: str,
    *,
    workers: int,
    processes: int | None,
    alphas: bool,
    check: bool,
    layout_cache: bool,
    summary: CensusSummary,
) -> Iterator[dict[str, Any]]:
    """Every row of ``todo``. Header scans are Python work under one GIL, so threads overlap
    only the waiting (disk, HTTP); with more than :data:`PROCESS_MIN` entries the work is spread
    over ``processes`` worker processes (default: a core free now each, ``threads.file_workers``)
    of ``workers // processes`` threads, in batches of :data:`BATCH` entries. The layout
    cache's hits and misses are added to ``summary``."""
    from ..threads import file_workers
    from .layouts import CACHE

    head = list(islice(todo, PROCESS_MIN))
    count = file_workers(PROCESS_MIN) if processes is None else processes
    if len(head) < PROCESS_MIN or count <= 1:
        hits, misses = CACHE.hits, CACHE.misses

        def work(entry: Entry) -> dict[str, Any]:
            return one_file(entry, scratch, alphas=alphas, check=check, layout_cache=layout_cache)

        with ThreadPoolExecutor(workers, thread_name_prefix="census") as pool:
            for row in _bounded(pool, chain(head, todo), work, workers * 4):
                summary.layout_hits, summary.layout_misses = CACHE.hits - hits, CACHE.misses - misses
                yield row
        return
    threads = max(1, workers // count)
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn")) as procs:
        batches = _batches(chain(head, todo), BATCH)
        batch = partial(one_batch, scratch=scratch, threads=threads, alphas=alphas, check=check,
                        layout_cache=layout_cache)  # fmt: skip
        for rows, hits, misses in _bounded(procs, batches, batch, count * 2):
            summary.layout_hits += hits
            summary.layout_misses += misses
            yield from rows


def run_census(
    sources: list[str],
    output: str,
    *,
    jobs: int | None = None,
    processes: int | None = None,
    alphas: bool = False,
    limit: int | None = None,
    restart: bool = False,
    check: bool = False,
    layout_cache: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> CensusSummary:
    """Describe every LoRA-like file of ``sources`` into ``output`` (``.jsonl``/``.parquet``).

    Resumes by default: keys already in ``output`` are skipped (``restart`` starts anew).
    ``jobs``: files in flight (threads, ``threads.io_workers``: 16 for Hub sources, 4 locally).
    ``processes``: worker processes for a census of many files (default one per free core; 1:
    all in this process). ``alphas``: also fetch remote alpha scalars (coalesced range requests;
    local files always have theirs read). ``check``: fill ``loads_in`` with loratools.check's
    verdicts. ``limit``: at most this many repositories per Hub search/author. ``layout_cache``:
    describe each key layout once and serve its other files' layout facts from the cache
    (:mod:`.layouts`; the rows are the same either way, the summary counts the hits).
    """
    from ..threads import io_workers

    store = Store(output, restart=restart)
    done = store.done
    summary = CensusSummary(output=str(output), resumed=len(done))
    remote = any(s.startswith("hf://") for s in sources)
    workers = io_workers(remote, jobs)
    scratch = tempfile.mkdtemp(prefix="loratools-census-")
    start = time.perf_counter()
    try:
        todo = (e for e in expand(sources, limit=limit) if e.key not in done)
        rows = _rows(todo, scratch, workers=workers, processes=processes, alphas=alphas, check=check,
                     layout_cache=layout_cache, summary=summary)  # fmt: skip
        for row in rows:
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
