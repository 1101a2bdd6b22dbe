"""Where census rows go, and how an interrupted census continues.

Rows are appended to a JSONL journal as each file is done (one line each, flushed), so an
interrupted run loses at most the files in flight. For ``facts.jsonl`` the journal *is* the
output; for ``facts.parquet`` it is a hidden ``.facts.parquet.journal.jsonl`` beside it, turned
into the Parquet file (written atomically) when the census finishes. A new run over the same
output first reads what is there — the journal, a torn last line dropped, and a finished
Parquet file — and skips every key (``repo@revision@path``) it already has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from .facts import LIST_FIELDS, MAP_FIELDS

JSON_COLUMNS = (*MAP_FIELDS, "loads_in")


class Store:
    """Append-only rows with resume, to ``output`` (``.jsonl`` or ``.parquet``)."""

    def __init__(self, output: str | os.PathLike[str], *, restart: bool = False) -> None:
        self.output = Path(output)
        suffix = self.output.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise InputError(f"{self.output}: census output must end in .jsonl or .parquet")
        self.parquet = suffix == ".parquet"
        if self.parquet:
            _pyarrow()
        if not self.output.parent.is_dir():
            raise InputError(f"{self.output.parent}: output folder does not exist")
        self.journal = self.output.with_name(f".{self.output.name}.journal.jsonl") if self.parquet else self.output
        if restart:
            for path in {self.journal, self.output}:
                path.unlink(missing_ok=True)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.parquet and self.output.exists():
            for row in read_parquet(self.output):
                self.rows[row["key"]] = row
        self._load_journal()
        self.fh = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _load_journal(self) -> None:
        if not self.journal.exists():
            return
        good = 0
        with open(self.journal, "rb") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a torn last line from an interrupted run: dropped, its file redone
                if not line.endswith(b"\n"):
                    break
                self.rows[row["key"]] = row
                good += len(line)
        if good != self.journal.stat().st_size:
            os.truncate(self.journal, good)

    @property
    def done(self) -> set[str]:
        return set(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        self.fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()

    def finish(self) -> None:
        """Close the journal; for Parquet, write the file atomically and drop the journal."""
        self.close()
        if not self.parquet:
            return
        import pyarrow.parquet as pq

        from ..io.atomic import AtomicFile

        table = to_arrow(list(self.rows.values()))
        atomic = AtomicFile(self.output, overwrite=True)
        fd = atomic.open()
        try:
            with os.fdopen(os.dup(fd), "wb") as fh:
                pq.write_table(table, fh)
            atomic.commit()
        except BaseException:
            atomic.abort()
            raise
        self.journal.unlink(missing_ok=True)


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise InputError(
            "Parquet output needs pyarrow", hint="pip install 'loratools[census]', or write facts.jsonl"
        ) from None
    return pyarrow


def to_arrow(rows: list[dict[str, Any]]) -> Any:
    """Rows as an Arrow table: maps as JSON strings, lists as list<string>, the rest as is."""
    pa = _pyarrow()
    strings = ("schema", "key", "repo", "revision", "path", "kind", "format", "family", "metadata_claims",
               "dtype", "read", "base_model", "ss_sd_model_name", "lfs_sha256", "error")  # fmt: skip
    ints = ("size", "modules", "parameters", "bytes_read", "requests")
    fields = (
        [pa.field(n, pa.string()) for n in strings]
        + [pa.field(n, pa.int64()) for n in ints]
        + [pa.field(n, pa.bool_()) for n in ("family_mismatch", "alphas_read")]
        + [pa.field("seconds", pa.float64())]
        + [pa.field(n, pa.string()) for n in JSON_COLUMNS]
        + [pa.field(n, pa.list_(pa.string())) for n in LIST_FIELDS]
    )
    schema = pa.schema(fields)
    columns = {f.name: [_cell(r.get(f.name), f.name) for r in rows] for f in fields}
    return pa.table(columns, schema=schema)


def _cell(value: Any, name: str) -> Any:
    if name in JSON_COLUMNS:
        return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def read_parquet(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A census Parquet file back as rows (JSON columns decoded)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        for name in JSON_COLUMNS:
            if row.get(name) is not None:
                row[name] = json.loads(row[name])
    return rows


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """A census output (``.jsonl`` or ``.parquet``) as rows."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return read_parquet(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
