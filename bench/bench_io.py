"""Checkpoint copy I/O: loratools' streaming copy against cp and the naive safetensors round trip.

    python bench/bench_io.py                 # SD1.5 fp16 (2.13 GB), 3 runs per method
    python bench/bench_io.py --sdxl          # also SDXL fp16 (6.94 GB)
    python bench/bench_io.py --runs 5 --methods cp loratools

Every measurement is one child process run through bench/measure.py (wall seconds from spawn to
exit, peak RSS of that child alone). Page cache: warm. Before every timed run the previous output
is deleted, ``sync`` flushes dirty pages, and the source is read once (untimed) so it sits in the
page cache; outputs are written next to the inputs (same file system, so copy_file_range applies).
One table is printed (markdown) and saved with the raw numbers under bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from make_data import data_dir
from measure import measure

BENCH = Path(__file__).resolve().parent
OUT_DIR = BENCH / "out"
TASKS = str(BENCH / "io_tasks.py")
STDLIB = str(BENCH / "stdlib_copy.py")
FILES = {"sd15": "sd15-fp16.safetensors", "sdxl": "sdxl-fp16.safetensors"}
GOAL_RATIO = 1.3
GOAL_RSS_MIB = 512.0
CHUNK = 64 << 20


@dataclass
class Method:
    key: str
    title: str
    argv: list[str]  # with {src} / {dst} placeholders
    writes: bool = True  # produces {dst}
    expect_identical: bool = True


METHODS = [
    Method("cp", "cp (floor)", ["cp", "{src}", "{dst}"]),
    Method(
        "cp+fsync",
        "cp + fsync of the output",
        ["sh", "-c", 'cp "$0" "$1" && sync "$1"', "{src}", "{dst}"],
    ),
    Method("startup", "python + imports only (no I/O)", [sys.executable, TASKS, "startup"], writes=False),
    Method(
        "naive",
        "safetensors load_file + save_file",
        [sys.executable, TASKS, "naive", "{src}", "{dst}"],
        expect_identical=False,
    ),
    Method("loratools", "loratools convert_checkpoint", [sys.executable, TASKS, "convert", "{src}", "{dst}"]),
    Method(
        "rawcopy",
        "loratools SafetensorsFile + copy_raw (local)",
        [sys.executable, TASKS, "rawcopy", "{src}", "{dst}"],
    ),
    Method("stdlib", "reference: stdlib-only raw copy + fsync (no torch)", [sys.executable, STDLIB, "{src}", "{dst}"]),
]


@dataclass
class Row:
    file: str
    method: str
    title: str
    command: str
    walls: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    impl: str = ""
    details: dict[str, object] = field(default_factory=dict)
    identical: bool | None = None
    output_bytes: int | None = None
    error: str | None = None

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def rss(self) -> float | None:
        return max(self.rss_mib) if self.rss_mib else None


def warm(path: Path) -> float:
    """Read a file once so it sits in the page cache; returns seconds taken."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while os.readv(fd, [view]) > 0:
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - start


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _dst(label: str, scratch: Path, method: Method) -> Path:
    return scratch / f"{label}-{method.key}.safetensors"


def new_row(label: str, src: Path, scratch: Path, method: Method) -> Row:
    argv = [a.format(src=src, dst=_dst(label, scratch, method)) for a in method.argv]
    return Row(label, method.key, method.title, shlex.join(argv))


def run_once(row: Row, src: Path, dst: Path, method: Method, settle: float, verify: bool) -> None:
    """One timed run: clean slate, warm source, measure, (optionally) verify, delete the output."""
    remove(dst)
    os.sync()
    time.sleep(settle)
    warm(src)
    try:
        m = measure(shlex.split(row.command))
    except RuntimeError as exc:
        row.error = " ".join(str(exc).split())[:300]
        print(f"    {method.key}: FAILED: {row.error}", flush=True)
        remove(dst)
        return
    row.walls.append(m.wall_s)
    row.rss_mib.append(m.maxrss_mib)
    last = m.stdout.strip().splitlines()[-1:]
    if last and last[0].startswith("{"):
        info = json.loads(last[0])
        row.inner.append(info.pop("inner_s"))
        row.impl = str(info.pop("impl", ""))
        row.details = info
    inner = f", in-process {row.inner[-1]:.2f} s" if last and row.inner else ""
    print(f"    {method.key}: {m.wall_s:.2f} s{inner}, {m.maxrss_mib:.0f} MiB", flush=True)
    if verify and method.writes and dst.exists():
        row.output_bytes = dst.stat().st_size
        row.identical = same_bytes(src, dst)
    remove(dst)


def bench_file(label: str, src: Path, scratch: Path, methods: list[Method], runs: int, settle: float) -> list[Row]:
    """All methods on one file, interleaved round-robin so slow drift hits every method alike.

    Round i starts at method i (mod the number of methods), so no method always runs right after
    the same neighbour (on the reference VM, what the previous run wrote and deleted matters).
    """
    rows = [new_row(label, src, scratch, m) for m in methods]
    for i in range(runs):
        print(f"  {label} round {i + 1}/{runs}", flush=True)
        shift = i % len(methods)
        for row, method in [*zip(rows, methods, strict=True)][shift:] + [*zip(rows, methods, strict=True)][:shift]:
            if row.error is None:
                run_once(row, src, _dst(label, scratch, method), method, settle, verify=i == runs - 1)
    return rows


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def table(rows: list[Row], runs: int) -> str:
    header = (
        f"| file | method | wall s (median of {runs}) | min–max s | wall / cp | wall / (cp+fsync) "
        "| in-process s | in-process / cp | peak RSS MiB | output = input bytes |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    floors = {(r.file, r.method): r.wall for r in rows if r.method in ("cp", "cp+fsync")}
    for r in rows:
        cp = floors.get((r.file, "cp"))
        cpf = floors.get((r.file, "cp+fsync"))
        ratio = r.wall / cp if r.wall and cp and r.method != "startup" else None
        ratio_f = r.wall / cpf if r.wall and cpf and r.method != "startup" else None
        spread = f"{min(r.walls):.2f}–{max(r.walls):.2f}" if r.walls else "–"
        inner = statistics.median(r.inner) if r.inner else None
        inner_ratio = inner / cp if inner is not None and cp and r.method != "startup" else None
        same = "–" if r.identical is None else ("yes" if r.identical else "no")
        title = r.title if not r.error else f"{r.title} **FAILED**"
        lines.append(
            f"| {r.file} | {title} | {fmt(r.wall)} | {spread} | {times(ratio)} | {times(ratio_f)} "
            f"| {fmt(inner)} | {times(inner_ratio)} | {fmt(r.rss, '.0f')} | {same} |"
        )
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    """The issue's goal per loratools row; wall is the verdict, the other ratios are context."""
    out = []
    for label in dict.fromkeys(r.file for r in rows):
        floors = {r.method: r.wall for r in rows if r.file == label and r.method in ("cp", "cp+fsync")}
        cp = floors.get("cp")
        for key in ("loratools", "rawcopy"):
            r = next((r for r in rows if r.file == label and r.method == key), None)
            if r is None or r.wall is None or cp is None:
                continue
            ratio, rss = r.wall / cp, r.rss or 0.0
            verdict = "MET" if ratio <= GOAL_RATIO and rss <= GOAL_RSS_MIB else "NOT MET"
            extra = []
            if r.inner:
                extra.append(f"in-process {statistics.median(r.inner) / cp:.2f}× cp")
            if floors.get("cp+fsync"):
                extra.append(f"wall {r.wall / floors['cp+fsync']:.2f}× cp+fsync")
            out.append(
                f"- {label} {r.title}: wall {ratio:.2f}× cp (goal ≤ {GOAL_RATIO}×), peak RSS {rss:.0f} MiB "
                f"(goal ≤ {GOAL_RSS_MIB:.0f} MiB) → **{verdict}**" + (f" ({'; '.join(extra)})" if extra else "")
            )
    return out


def machine() -> str:
    cpu = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cp = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    import safetensors
    import torch

    return (
        f"{platform.node()} — {cpu} CPUs, {mem:.1f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}; {cp}"
    )


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True).stdout.splitlines()
    if len(out) < 2:
        return "?"
    fields = out[1].split()
    return f"{fields[1]} on {fields[0]} ({int(fields[4]) / 2**20:.0f} GiB free)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="also benchmark the SDXL fp16 file")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to idle after sync, before each run")
    parser.add_argument("--data", help="data folder (default: as make_data.py)")
    parser.add_argument("--methods", nargs="+", choices=[m.key for m in METHODS], help="subset of methods")
    args = parser.parse_args(argv)

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    folder = data_dir(args.data)
    labels = ["sd15", *(["sdxl"] if args.sdxl else [])]
    missing = [folder / FILES[label] for label in labels if not (folder / FILES[label]).exists()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}: run python bench/make_data.py first", file=sys.stderr)
        return 1
    scratch = folder / "_bench_io_out"
    scratch.mkdir(exist_ok=True)
    methods = [m for m in METHODS if not args.methods or m.key in args.methods]

    rows: list[Row] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()
    for label in labels:
        src = folder / FILES[label]
        print(f"{label}: {src} ({src.stat().st_size:,} bytes); cold read {warm(src):.2f} s", flush=True)
        rows += bench_file(label, src, scratch, methods, args.runs, args.settle)
    shutil.rmtree(scratch, ignore_errors=True)

    load_end = os.getloadavg()
    load = (
        f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, "
        f"at end {'/'.join(f'{x:.2f}' for x in load_end)} — other work on the machine inflates and spreads wall times"
    )
    sizes = ", ".join(f"{label} {(folder / FILES[label]).stat().st_size:,} bytes" for label in labels)
    policy = (
        f"warm page cache — methods interleaved round-robin, each round starting one method later; before every timed run: previous output deleted, "
        f"`sync`, {args.settle:g} s idle, one untimed full read "
        "of the source; outputs written beside the source (same file system). Wall = child spawn to exit "
        "(includes interpreter start and imports for Python rows; `in-process s` excludes them). "
        "Peak RSS = ru_maxrss of that child alone (max over runs). cp and safetensors do not fsync; "
        "loratools fsyncs its output before the rename."
    )
    impls = [f"- {r.file} {r.method}: {r.impl}" + (f" {r.details}" if r.details else "") for r in rows if r.impl]
    commands = [f"- {r.file} {r.method}: `{r.command}`" for r in rows]
    errors = [f"- {r.file} {r.method}: {r.error}" for r in rows if r.error]
    text = "\n".join(
        [
            f"## bench_io — {started}",
            "",
            f"command: `{command}`",
            f"machine: {machine()}",
            f"data: {folder} ({filesystem(folder)}); {sizes}",
            f"page cache: {policy}",
            load,
            "",
            table(rows, args.runs),
            "",
            "goal (issue): loratools streaming copy of the SD1.5 file ≤ 1.3× cp wall and ≤ 0.5 GiB peak RSS",
            *goals(rows),
            "",
            "implementations:",
            *impls,
            *(["", "errors:", *errors] if errors else []),
            "",
            "per-run commands:",
            *commands,
        ]
    )
    print()
    print(text)
    OUT_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "command": command,
        "started": started,
        "machine": machine(),
        "data": str(folder),
        "filesystem": filesystem(folder),
        "page_cache": policy,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "runs": args.runs,
        "rows": [asdict(r) | {"wall_median_s": r.wall, "rss_max_mib": r.rss} for r in rows],
    }
    (OUT_DIR / f"bench_io-{stamp}.json").write_text(json.dumps(record, indent=2))
    (OUT_DIR / f"bench_io-{stamp}.md").write_text(text + "\n")
    print(f"\nsaved {OUT_DIR / f'bench_io-{stamp}.json'} and .md")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
