"""Run the whole matrix outside pytest and print the outcome table (markdown).

    python -m tests.hostile.report            # family × outcome counts
    python -m tests.hostile.report --details  # plus one line per pair that is not as expected
    python -m tests.hostile.report -k pickle  # only pairs whose id matches the regex "pickle"

Rows are case families, columns the observed outcomes; a pair that breaks an invariant (payload
ran, input changed, file left behind) is counted under "broken" whatever its outcome.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="pattern", default="", help="only pairs whose id matches this regex")
    parser.add_argument("--details", action="store_true", help="list every pair not as expected")
    parser.add_argument("--all", action="store_true", help="list every pair with its outcome")
    args = parser.parse_args(argv)

    from .harness import OUTCOMES, companions_unchanged, pair_id, pairs, run_pair, verdict
    from .known import KNOWN_BUGS

    selected = [(c, s) for c, s in pairs() if re.search(args.pattern, pair_id(c, s))]
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    expected: Counter[str] = Counter()  # family → pairs exactly as their case expects
    known: Counter[str] = Counter()  # family → pairs failing by a known bug owned elsewhere (xfail)
    surprises = []
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="loratools-hostile-report-"))
    try:
        for i, (case, slot) in enumerate(selected):
            ident = pair_id(case, slot)
            t0 = time.perf_counter()
            obs = run_pair(case, slot, root / f"p{i}")
            seconds = time.perf_counter() - t0
            shutil.rmtree(root / f"p{i}", ignore_errors=True)
            wrong = verdict(case, slot, obs)
            counts[case.family]["broken" if obs.problems else obs.outcome] += 1
            if not wrong:
                expected[case.family] += 1
            elif ident in KNOWN_BUGS:
                known[case.family] += 1
            if args.all:
                first = (obs.stderr.strip() or obs.stdout.strip()).splitlines()[-1:] or [""]
                surprises.append(f"- `{ident}` ({seconds:.2f} s): {obs.outcome} {'; '.join(wrong)}: {first[0][:200]}")
            elif wrong and args.details:
                surprises.append(f"- `{ident}`: {'; '.join(wrong)}: {obs.describe()}")
        for path in companions_unchanged():
            surprises.append(f"- shared input changed: {path}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    columns = [o for o in (*OUTCOMES, "broken") if any(c[o] for c in counts.values())]
    print(f"{len(selected)} pairs (case × command), {len({c.id for c, _ in selected})} distinct cases, "
          f"{time.perf_counter() - started:.0f} s\n")  # fmt: skip
    print("| family | " + " | ".join(columns) + " | total | as expected | known bug (xfail) |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " | ---: | ---: | ---: |")
    total: Counter[str] = Counter()
    for family in sorted(counts):
        total.update(counts[family])
        cells = " | ".join(str(counts[family][o]) for o in columns)
        print(f"| {family} | {cells} | {sum(counts[family].values())} | {expected[family]} | {known[family]} |")
    cells = " | ".join(f"**{total[o]}**" for o in columns)
    print(
        f"| **all** | {cells} | **{sum(total.values())}** | **{sum(expected.values())}** | **{sum(known.values())}** |"
    )
    if surprises:
        print("\n" + "\n".join(surprises))
    return 1 if sum(total.values()) - sum(expected.values()) - sum(known.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
