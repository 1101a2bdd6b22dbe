"""Census files/s on a generated corpus, beside the floor measured in the same run.

The corpus (tests/helpers_census.py): ``--files N`` LoRAs of eight templates — kohya SD1.5 /
SDXL / SD2, LoCon, LoHa and LoKr (SD1.5), diffusers SD1.5 / SDXL — at full-size shapes with their
real key counts, each with its own metadata, written *sparse* (header and alpha scalars on disk,
the factors a hole), one in 50 broken (truncated, LFS pointer, ``.pt`` pickle). One table:

- the floor: the bytes of the headers ÷ the corpus's bytes (what a header-only census must
  read at least), interpreter start, bare header bytes (open + read), ``json.loads`` of the
  headers, ``safetensors.safe_open`` (keys + metadata), loratools' validated ``read_header``, the
  ``scan_lora`` header scan the census is built on (warm, and with the per-layout caches cleared
  before every file: the cost of a key layout never seen before);
- the census of the folder (``run_census``, ``-j 1`` and the default pool), with the layout
  cache (census/layouts.py: its hit rate in the notes) and, last, without it;
- the census through a loopback fake Hub (tests/helpers_scale.FakeHub in another process, one
  repository per 10 files, each served as its header and alphas followed by zeros): files/s,
  requests, bytes served ÷ total file bytes; with ``--alphas`` the alpha scalars too.

    nice -n 10 python bench/bench_census.py --files 1000
    nice -n 10 python bench/bench_census.py --files 10000 --defaults-only
    nice -n 10 python bench/bench_census.py --files 300 --steps hub --alphas --interleaved
    nice -n 10 python bench/bench_census.py --files 1000 --hub-like   # ranks 16–128: the ≤ 1 % goal

``--hub-like`` gives each file its own variant of its template (tests/helpers_census.hub_variant:
a rank of 16–128 as hub LoRAs have, alpha = rank, rank/2 or 1, a third U-Net only), so file sizes
are a hub's and key layouts repeat as a hub's do rather than once per template.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
STEPS = ("floor", "local", "hub")
COLD_NOTE = "every file a key layout never seen (the corpus has 8)"


def _row(step: str, files: int, seconds: float, note: str = "") -> str:
    rate = f"{files / seconds:,.0f}" if seconds > 0 else "—"
    per = f"{1000 * seconds / files:.2f}" if files else "—"
    return f"| {step} | {files:,} | {seconds:.2f} | {rate} | {per} | {note} |"


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def interpreter_start(runs: int = 5) -> tuple[float, float]:
    """Median seconds of ``python -c pass`` and of ``python -c 'import loratools.census'``."""

    def median(code: str) -> float:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return statistics.median(
            _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True, env=env)) for _ in range(runs)
        )

    return median("pass"), median("import loratools.census")


def bytes_floor_row(paths: list[Path]) -> str:
    """What a header-only census must read at least: every good file's 8-byte length and header
    JSON, over the bytes of the whole corpus (broken files included) — the floor the "bytes
    served ÷ total" of the Hub rows is judged against (the issue's goal is ≤ 1 %)."""
    total = sum(p.stat().st_size for p in paths)
    header_bytes = 0
    good = 0
    for path in paths:
        if path.suffix != ".safetensors" or "truncated" in path.name or "pointer" in path.name:
            continue
        with open(path, "rb") as fh:
            header_bytes += 8 + int.from_bytes(fh.read(8), "little")
        good += 1
    note = f"{header_bytes:,} B of headers in {total:,} B of files: {header_bytes / total:.3%} (the bytes floor)"
    return f"| headers only (bytes of headers ÷ corpus bytes) | {good:,} | — | — | — | {note} |"


def floor_rows(paths: list[Path], rounds: int = 1) -> list[str]:
    """The floor on the corpus's good files, each step over every file: the fastest of ``rounds``
    passes (on a shared box the minimum is the least disturbed by other processes)."""
    from safetensors import safe_open

    from loratools.formats import scan as scan_module
    from loratools.formats.scan import scan_lora
    from loratools.io.safetensors import read_header

    # a tree from before the layout caches (--tree) has none to clear
    clear_layout_caches = getattr(scan_module, "clear_layout_caches", lambda: None)

    def best(work: Callable[[], object]) -> float:
        return min(_timed(work) for _ in range(rounds))

    good = [p for p in paths if p.suffix == ".safetensors" and "truncated" not in p.name and "pointer" not in p.name]
    raws: list[bytes] = []

    def bare() -> None:
        for p in good:
            with open(p, "rb") as fh:
                raws.append(fh.read(int.from_bytes(fh.read(8), "little")))

    def parse() -> None:
        for raw in raws:
            json.loads(raw)

    def library() -> None:
        for p in good:
            with safe_open(p, framework="np") as f:
                f.keys()
                f.metadata()

    def validated() -> None:
        for p in good:
            read_header(p)

    def scan() -> None:
        for p in good:
            scan_lora(p)

    def scan_cold() -> None:
        for p in good:
            clear_layout_caches()
            scan_lora(p)

    bare_s = _timed(bare)
    mean_header = sum(map(len, raws)) // max(1, len(raws))
    plain, census_import = interpreter_start()
    return [
        _row("interpreter start (`python -c pass`, median of 5)", 1, plain),
        _row("interpreter + `import loratools.census` (median of 5)", 1, census_import),
        _row("bare header bytes: open + read", len(good), bare_s, f"mean header {mean_header:,} B"),
        _row("`json.loads` of the headers (in memory)", len(good), best(parse)),
        _row("`safetensors.safe_open` + keys + metadata", len(good), best(library)),
        _row("loratools `read_header` (validated)", len(good), best(validated)),
        _row("`scan_lora` (header scan + alpha reads)", len(good), best(scan), "what the census row is built on"),
        _row("`scan_lora`, layout caches cleared before each file", len(good), best(scan_cold), COLD_NOTE),
    ]


def _cache_note(summary: object, cache: bool) -> str:
    """The layout cache's hit rate over a census (census/layouts.py), or that it was off."""
    if not cache:
        return "layout cache off"
    hits, misses = getattr(summary, "layout_hits", 0), getattr(summary, "layout_misses", 0)
    return f"layout cache {hits:,} hits / {hits + misses:,} ({hits / max(1, hits + misses):.0%})"


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the census's worker processes are
    reaped when its pool closes): robust to the box's load, unlike the wall seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _census_kwargs(cache: bool) -> dict[str, bool]:
    # a tree from before the layout cache (--tree) takes no layout_cache argument
    from loratools.census import run_census

    return {"layout_cache": cache} if "layout_cache" in run_census.__code__.co_varnames else {}


def warm_up(paths: list[Path]) -> None:
    """Describe one file first, so that no timed census pays the modules' first import."""
    from helpers_census import census_row

    good = [p for p in paths if p.suffix == ".safetensors" and "truncated" not in p.name and "pointer" not in p.name]
    census_row(good[0])
    try:
        from loratools.census.layouts import CACHE
    except ImportError:  # a tree before the layout cache (--tree)
        return
    CACHE.clear()


def local_rows(folder: Path, files: int, configs: list[tuple[int | None, int | None, bool]]) -> list[str]:
    """The census of the folder for each (threads, processes, layout cache); None: the default."""
    from loratools.census import run_census

    warm_up(sorted(folder.iterdir()))
    out = []
    for jobs, processes, cache in configs:
        cpu = _cpu()
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_census([str(folder)], str(Path(tmp) / "facts.jsonl"), jobs=jobs, processes=processes,
                                 **_census_kwargs(cache))  # fmt: skip
        cpu = _cpu() - cpu
        assert summary.files == files, summary
        families = ", ".join(f"{f} {sum(c.values())}" for f, c in summary.families_formats.items())
        note = f"CPU {1000 * cpu / files:.1f} ms/file; {_cache_note(summary, cache)}; {summary.broken} broken rows; {families}"
        out.append(_row(f"census local folder, `{_flags(jobs, processes)}`", files, summary.seconds, note))
    return out


def _flags(jobs: int | None, processes: int | None) -> str:
    from loratools.threads import file_workers

    shown = processes if processes is not None else f"auto ({file_workers(256)} now)"
    return f"-j {jobs if jobs is not None else 'default'} -P {shown}"


def serve(corpus: list[tuple[str, str, bytes, int]], port_queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from helpers_scale import FakeHub, VirtualFile

    hub = FakeHub()
    for repo, name, prefix, size in corpus:
        hub.add(repo, name, VirtualFile(prefix, size))
    with hub:
        port_queue.put(hub.url)
        hub.thread.join()


def hub_rows(paths: list[Path], jobs: int, alphas: bool, configs: list[tuple[int | None, bool]]) -> list[str]:
    """The corpus served by a fake Hub: each file's header + scalars (what is on disk), then zeros."""
    from loratools.io.safetensors import read_header

    corpus = []
    alpha_count = 0
    for i, path in enumerate(paths):
        size = path.stat().st_size
        try:
            header = read_header(path)
            ends = [i.end for i in header.tensors.values() if i.end - i.start <= 8]
            alpha_count += sum(k.endswith(".alpha") for k in header.tensors)
            keep = header.data_start + (max(ends) if ends else 0)
        except Exception:
            keep = size
        with open(path, "rb") as fh:
            prefix = fh.read(keep)
        corpus.append((f"user{i // 10:05d}/lora-{i // 10:05d}", path.name, prefix, size))
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    server = ctx.Process(target=serve, args=(corpus, queue), daemon=True)
    server.start()
    url = queue.get(timeout=600)
    os.environ["HF_ENDPOINT"] = url
    os.environ.pop("HF_HUB_OFFLINE", None)
    from loratools.census import read_rows, run_census

    rows = []
    try:
        for count, cache in configs:
            before = json.loads(urllib.request.urlopen(f"{url}/_stats").read())
            cpu = _cpu()
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "facts.jsonl"
                summary = run_census(["hf://?filter=lora"], str(out), jobs=jobs, processes=count, alphas=alphas,
                                     **_census_kwargs(cache))  # fmt: skip
                found = read_rows(out)
            cpu = _cpu() - cpu
            after = json.loads(urllib.request.urlopen(f"{url}/_stats").read())
            assert summary.files == len(found) == len(paths), summary
            total = sum(r["size"] or 0 for r in found)
            served = after["bytes_served"] - before["bytes_served"]
            note = (
                f"CPU {1000 * cpu / len(found):.1f} ms/file (the census side); "
                f"{'headers + alphas' if alphas else 'headers only'}; "
                f"{after['resolve_requests'] - before['resolve_requests']:,} range requests"
                f"{f' ({alpha_count:,} alpha tensors)' if alphas else ''}; "
                f"{served:,} B served of {total:,} ({served / total:.3%}); {summary.broken} broken rows; "
                f"{_cache_note(summary, cache)}"
            )
            rows.append(
                _row(f"census via loopback fake Hub, `{_flags(jobs, count)}`", len(found), summary.seconds, note)
            )
    finally:
        server.terminate()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="corpus size (10000 for the 10⁴ run)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    parser.add_argument("--jobs", type=int, default=16, help="census pool through the fake Hub")
    parser.add_argument("--alphas", action="store_true", help="the Hub census also fetches the alpha scalars")
    parser.add_argument("--data", default=os.environ.get("LORATOOLS_BENCH_DIR", str(REPO / "bench" / "data")))
    parser.add_argument("--keep", help="write the corpus here and keep it (default: a temp folder)")
    parser.add_argument("--floor-files", type=int, default=1000, help="the floor is measured on this many files")
    parser.add_argument("--defaults-only", action="store_true", help="census with the default -j/-P only")
    parser.add_argument("--rounds", type=int, default=1, help="floor steps: the fastest of this many passes")
    parser.add_argument("--tree", help="measure the loratools of this checkout instead (before/after tables)")
    parser.add_argument("--hub-like", action="store_true",
                        help="ranks 16–128, varied alphas and targets per file (hub-sized files; many layouts)")  # fmt: skip
    parser.add_argument("--interleaved", action="store_true",
                        help="store alphas between the factors as kohya does (disk: ~4 KiB per alpha)")  # fmt: skip
    args = parser.parse_args()
    if args.tree:  # before anything imports loratools
        sys.path.insert(0, str(Path(args.tree).resolve()))
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    from helpers_census import write_corpus, write_templates

    templates = write_templates(Path(args.data) / "census-templates")
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loratools-census-bench-"))
    try:
        start = time.perf_counter()
        paths = write_corpus(folder / "corpus", templates, args.files, alphas_first=not args.interleaved,
                             hub_like=args.hub_like)  # fmt: skip
        made = time.perf_counter() - start
        disk = sum(p.stat().st_blocks * 512 for p in paths)
        size = sum(p.stat().st_size for p in paths)
        rows: list[str] = []
        if "floor" in steps:
            rows += [bytes_floor_row(paths), *floor_rows(paths[: args.floor_files], args.rounds)]
        if "local" in steps:
            configs: list[tuple[int | None, int | None, bool]] = [(1, 1, True), (None, 1, True), (None, None, True)]
            configs = configs[-1:] if args.defaults_only else configs
            rows += local_rows(folder / "corpus", len(paths), [*configs, (None, None, False)])
        if "hub" in steps:
            hub: list[tuple[int | None, bool]] = [(None, True)] if args.defaults_only else [(1, True), (None, True)]
            rows += hub_rows(paths, args.jobs, args.alphas, [*hub, (None, False)])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    import loratools

    print(f"loratools from {Path(loratools.__file__).parent.parent}; floor: fastest of {args.rounds} pass(es)")
    print(f"corpus: {len(paths):,} files in {made:.1f} s, {size / 2**30:.2f} GiB apparent, {disk / 2**20:.0f} MiB on disk; "
          f"cores {len(os.sched_getaffinity(0))}; load avg {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")  # fmt: skip
    print("| step | files | seconds | files/s | ms/file | notes |")
    print("|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
