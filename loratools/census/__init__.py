"""``loratools census``: facts about a whole corpus of LoRAs, from headers only.

:func:`run_census` lists the files of folders, list files and Hub repositories/authors/searches
(:mod:`.sources`), reads each file's header — locally, or with HTTP range requests into a sparse
stand-in (:mod:`.remote`) — describes it with the project's header-only inspect
(:mod:`.facts`), and appends one row per file to a resumable JSONL/Parquet output
(:mod:`.store`). See docs/SCALE.md.
"""

from __future__ import annotations

from .facts import ROW_SCHEMA
from .run import SUMMARY_SCHEMA, CensusSummary, run_census
from .store import read_rows

__all__ = ["ROW_SCHEMA", "SUMMARY_SCHEMA", "CensusSummary", "read_rows", "run_census"]
