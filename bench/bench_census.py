"""Census through a loopback fake Hub: files/s and bytes read ÷ total file bytes.

10⁴ LoRA files (default; ``--files N``) in repositories of 10, each served as a full-size kohya
SD1.5 or SDXL LoRA (real module sets and shapes, fp16, rank 32 by default): its real header
followed by a data section of zeros that is never stored, only counted. The hub
(tests/helpers_scale.FakeHub: ``/api/models``, ``model_info``, ``tree``, ``resolve`` with Range)
runs in a separate process so it does not share the census's GIL. The census is the library
call behind ``loratools census 'hf://?filter=lora' -o facts.jsonl``.

    python bench/bench_census.py                  # 10⁴ files, headers only
    python bench/bench_census.py --files 300 --alphas
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def templates(folder: Path, rank: int) -> dict[str, tuple[bytes, int]]:
    """family → (header bytes, full file size) of a full-size kohya LoRA written once."""
    import torch

    from loratools.families import FAMILIES
    from loratools.formats.io import save_lora
    from loratools.synthetic import make_lora

    out = {}
    for family in ("sd1", "sdxl"):
        path = folder / f"census-{family}-r{rank}.safetensors"
        if not path.exists():
            save_lora(make_lora(FAMILIES[family], rank=rank, dtype=torch.float16), path, "kohya")
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            fh.seek(0)
            out[family] = (fh.read(8 + length), path.stat().st_size)
    return out


def serve(heads: dict[str, tuple[bytes, int]], files: int, port_queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from helpers_scale import FakeHub, VirtualFile

    hub = FakeHub()
    for i in range(files):
        family = "sd1" if i % 2 else "sdxl"
        head, size = heads[family]
        hub.add(f"user{i // 10:05d}/lora-{i // 10:05d}", f"{family}-{i % 10}.safetensors", VirtualFile(head, size))
    with hub:
        port_queue.put(hub.url)
        hub.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--alphas", action="store_true", help="also fetch every alpha scalar")
    parser.add_argument("--data", default=os.environ.get("LORATOOLS_BENCH_DIR", str(REPO / "bench" / "data")))
    args = parser.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    heads = templates(data, args.rank)
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(heads, args.files, queue), daemon=True)
    server.start()
    url = queue.get(timeout=300)
    os.environ["HF_ENDPOINT"] = url
    os.environ.pop("HF_HUB_OFFLINE", None)
    from loratools.census import run_census

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "facts.jsonl"
        start = time.perf_counter()
        summary = run_census(["hf://?filter=lora"], str(out), jobs=args.jobs, alphas=args.alphas)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads(urllib.request.urlopen(f"{url}/_stats").read())
    server.terminate()
    total = sum(r["size"] for r in rows)
    ok = sum(not r["problems"] and not r["error"] for r in rows)
    load = os.getloadavg()
    print("| files | ok | header bytes SD1.5 / SDXL | total file bytes | bytes served | served ÷ total | "
          "requests | seconds | files/s | load avg (1/5/15 min) |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {len(rows):,} | {ok:,} | {len(heads['sd1'][0]):,} / {len(heads['sdxl'][0]):,} | {total:,} | "
          f"{stats['bytes_served']:,} | {stats['bytes_served'] / total:.3%} | {stats['resolve_requests']:,} | "
          f"{seconds:.1f} | {len(rows) / seconds:.0f} | {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} |")  # fmt: skip
    assert summary.files == len(rows) == args.files


if __name__ == "__main__":
    main()
