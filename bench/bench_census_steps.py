"""CPU milliseconds per file of each census step, fastest of N passes, for one loratools tree.

For before/after tables on a shared box: CPU time (not wall) of one process, the fastest pass
of ``--rounds``, over the first ``--files`` good files of a corpus folder written by
``bench_census.py --keep DIR`` (its ``corpus/`` subfolder). Run it once per tree, alternately:

    python bench/bench_census.py --files 300 --steps floor --keep /tmp/census-corpus
    python bench/bench_census_steps.py /tmp/census-corpus/corpus --tree /work/main
    python bench/bench_census_steps.py /tmp/census-corpus/corpus

The census row is measured with the layout cache off and with it emptied before each pass (its
hits are then the repeats inside those files only), and the cache's hit rate is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a folder of LoRAs (bench_census.py --keep DIR writes DIR/corpus)")
    parser.add_argument("--tree", default=str(REPO), help="the loratools checkout to measure")
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.tree).resolve()))
    from loratools.census.run import one_file
    from loratools.census.sources import expand
    from loratools.formats import scan as scan_module
    from loratools.io.safetensors import read_header

    clear = getattr(scan_module, "clear_layout_caches", lambda: None)  # trees before the caches
    entries = [
        e
        for e in expand([args.corpus])
        if e.path.endswith(".safetensors") and "truncated" not in e.path and "pointer" not in e.path
    ][: args.files]
    paths = [Path(e.path) for e in entries]
    raws = []
    for path in paths:
        with open(path, "rb") as fh:
            raws.append(fh.read(int.from_bytes(fh.read(8), "little")))

    def best(work: Callable[[], object]) -> float:
        fastest = float("inf")
        for _ in range(args.rounds):
            start = time.process_time()
            work()
            fastest = min(fastest, time.process_time() - start)
        return round(1000 * fastest / len(paths), 2)

    def cold() -> None:
        for path in paths:
            clear()
            scan_module.scan_lora(path)

    result = {
        "tree": args.tree,
        "files": len(paths),
        "json.loads": best(lambda: [json.loads(r) for r in raws]),
        "read_header": best(lambda: [read_header(p) for p in paths]),
        "scan_lora": best(lambda: [scan_module.scan_lora(p) for p in paths]),
        "scan_lora cold": best(cold),
    }
    try:  # trees before the layout cache (--tree) have one census row only
        from loratools.census.layouts import CACHE
    except ImportError:
        result["census row (one_file)"] = best(lambda: [one_file(e, "", alphas=True) for e in entries])
    else:

        def cached() -> None:  # each pass starts with an empty cache: hits are the corpus's own repeats
            CACHE.clear()
            for e in entries:
                one_file(e, "", alphas=True)

        result["census row, layout cache off"] = best(
            lambda: [one_file(e, "", alphas=True, layout_cache=False) for e in entries]
        )
        result["census row, layout cache (emptied each pass)"] = best(cached)
        result["layout cache hit rate"] = round(CACHE.hits / max(1, CACHE.hits + CACHE.misses), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
