"""Pairs that fail because of bugs in code this corpus may not change (owned elsewhere).

Each entry is ``pair id → reason``; the test marks them ``xfail(strict=True)``, so a fix there
turns the test red until the entry is removed here.
"""

from __future__ import annotations

KNOWN_BUGS: dict[str, str] = {}
