"""The streaming writer's write of in-memory tensors (a merge's patched tensors) against ``cp`` +
``sync`` of the same bytes, with and without the O_DIRECT path (io/safetensors.py DirectWriter).

    python bench/bench_write.py                                   # the FLUX.1 cut's block weights
    python bench/bench_write.py --source /tmp/benchdata/sd15-fp16.safetensors --rounds 3
    python bench/bench_write.py --limit-mib 512 --min-kib 4096    # another DIRECT_MIN, in KiB

``--source`` defaults to the reduced FLUX.1 cut that ``bench_flux.py --only merge --blocks 2 2``
generates in $LORATOOLS_BENCH_DIR. From it the 2-D ``double_blocks``/``single_blocks`` weights
(what a Flux LoRA patches; every tensor for another file) are read into fresh tensors, up to
``--limit-mib``, in file order. Each row runs in its own child process; the tensors are loaded
before the clock starts, dirty pages are synced first, and the time ends after the fsync and
rename of the writer's commit (``save_tensors``), the durable end, as ``sync -d`` ends ``cp``.

Rows, interleaved per round (the box may be busy: compare within a round, medians over rounds):
  cp + sync (floor)      a file of exactly those tensors (header included) copied and made durable
  writer, buffered       DirectWriter switched off: every byte through the page cache
  writer, O_DIRECT       as loratools writes now
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LORATOOLS_BENCH_DIR", ROOT / "bench" / "data"))
FLUX_CUT = DATA / "flux1-dev-bf16-d2s2.safetensors"


def load(source: Path, limit: int) -> dict[str, object]:
    """The tensors the rows write, read into fresh tensors (as a merge's results are)."""
    import torch

    from loratools.io.safetensors import DTYPES

    with open(source, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    flux = any(k.startswith("double_blocks.") for k in header)
    tensors: dict[str, object] = {}
    total = 0
    fd = os.open(source, os.O_RDONLY)
    try:
        for name, info in header.items():
            if flux and not (name.startswith(("double_blocks.", "single_blocks.")) and len(info["shape"]) == 2):
                continue
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            os.preadv(fd, [tensor.reshape(-1).view(torch.uint8).numpy()], 8 + size + begin)
            tensors[name] = tensor
            total += end - begin
            if total >= limit:
                break
    finally:
        os.close(fd)
    return tensors


def child(mode: str, source: Path, limit: int, out: Path, min_kib: int | None) -> None:
    """One row: write the tensors to ``out`` (mode buffered / direct / make) and print the seconds."""
    import loratools.io.safetensors as st

    if min_kib is not None:
        st.DIRECT_MIN = min_kib << 10
    if mode in ("buffered", "make"):
        st.DirectWriter.open = classmethod(lambda cls, path, fd: None)  # type: ignore[assignment,method-assign]
    tensors = load(source, limit)
    os.sync()
    start = time.perf_counter()
    st.save_tensors(out, tensors, overwrite=mode == "make")  # type: ignore[arg-type]
    print(json.dumps({"s": time.perf_counter() - start, "bytes": out.stat().st_size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=FLUX_CUT)
    parser.add_argument("--limit-mib", type=int, default=1024, help="MiB of tensors written per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-kib", type=int, help="DIRECT_MIN for the O_DIRECT row (default: loratools')")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    limit = args.limit_mib << 20
    if args.child:
        child(args.child[0], args.source, limit, Path(args.child[1]), args.min_kib)
        return
    if not args.source.exists():
        raise SystemExit(f"missing {args.source}: run bench/bench_flux.py --only merge --blocks 2 2 first")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    extra = ["--min-kib", str(args.min_kib)] if args.min_kib is not None else []

    def run(mode: str, out: Path) -> float:
        argv = [sys.executable, __file__, "--source", str(args.source), "--limit-mib", str(args.limit_mib), *extra]
        done = subprocess.run([*argv, "--child", mode, str(out)], env=env, check=True, capture_output=True, text=True)
        return float(json.loads(done.stdout.strip().splitlines()[-1])["s"])

    rows: dict[str, list[float]] = {"cp + sync (floor)": [], "writer, buffered": [], "writer, O_DIRECT": []}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.source.parent, prefix="_bench_write_") as tmp:
        same = Path(tmp) / "same-bytes.safetensors"
        run("make", same)
        size = same.stat().st_size
        out = Path(tmp) / "out.safetensors"
        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            subprocess.run(["sh", "-c", f"cp '{same}' '{out}' && sync -d '{out}'"], check=True)
            rows["cp + sync (floor)"].append(time.perf_counter() - start)
            out.unlink()
            for name, mode in (("writer, buffered", "buffered"), ("writer, O_DIRECT", "direct")):
                rows[name].append(run(mode, out))
                out.unlink()
    floor = statistics.median(rows["cp + sync (floor)"])
    print(
        f"\n### write of {size / 1e9:.2f} GB of tensors from {args.source.name}; rounds {args.rounds}, "
        f"load average {min(loads):.2f}–{max(loads):.2f}; goal O_DIRECT ≤ 1.2× floor"
    )
    print("| row | wall s (median) | each round | ÷ floor |")
    print("|---|---:|---|---:|")
    for name, walls in rows.items():
        median = statistics.median(walls)
        print(f"| {name} | {median:.2f} | {' '.join(f'{w:.2f}' for w in walls)} | {median / floor:.2f}× |")


if __name__ == "__main__":
    main()
