"""What a census covers: local folders and files, list files, and Hub repositories, authors, searches.

Every LoRA-like file becomes one :class:`Entry`, keyed ``repo@revision@path`` so an interrupted
census can tell what it has done. Local files use ``local`` as the repo and their size and mtime
as the revision (a changed file is a new entry). Hub listings go through huggingface_hub's API
(``model_info``, ``list_repo_tree``, ``list_models``) with the endpoint of ``HF_ENDPOINT`` read at
call time; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ..errors import InputError
from ..io.suffixes import WEIGHT_FILE_SUFFIXES

# files a LoRA may be stored in; pickles among them are listed and flagged, never opened
LORA_SUFFIXES = WEIGHT_FILE_SUFFIXES
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Entry:
    """One file to describe."""

    repo: str  # "owner/name" on the Hub, "local" for a local file
    revision: str  # the commit sha on the Hub; "<size>:<mtime_ns>" locally
    path: str  # inside the repo; the absolute path locally
    size: int | None = None  # as listed (None: unknown until read)
    lfs_sha256: str | None = None  # the Hub's stored sha256 of an LFS file
    error: str | None = None  # a listing that failed: the entry is a row with this error

    @property
    def key(self) -> str:
        return f"{self.repo}@{self.revision}@{self.path}"

    @property
    def is_local(self) -> bool:
        return self.repo == "local"


def endpoint() -> str:
    """The Hub endpoint, read now (``HF_ENDPOINT`` may be set after huggingface_hub was imported)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _local_entry(path: Path) -> Entry:
    st = path.stat()
    return Entry("local", f"{st.st_size}:{st.st_mtime_ns}", str(path.resolve()), st.st_size)


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(LORA_SUFFIXES):
                yield Path(root) / name


def _repo_entries(repo_id: str, revision: str | None, prefix: str = "") -> Iterator[Entry]:
    api = hub_api()
    try:
        info = api.model_info(repo_id, revision=revision)
        sha = info.sha or revision or "main"
        one_file = prefix.lower().endswith(LORA_SUFFIXES)  # list its folder, keep just it
        folder = prefix.rpartition("/")[0] if one_file else prefix
        for item in api.list_repo_tree(repo_id, folder or None, recursive=True, revision=sha):
            if getattr(item, "size", None) is None or not item.path.lower().endswith(LORA_SUFFIXES):
                continue  # folders and non-weight files
            if one_file and item.path != prefix:
                continue
            lfs = getattr(item, "lfs", None)
            sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
            yield Entry(repo_id, sha, item.path, int(item.size), sha256)
    except Exception as exc:  # one repository's failure is its row, never the census's end
        yield Entry(repo_id, revision or "main", prefix, error=f"listing failed: {_one_line(exc)}")


def _search(query: str, limit: int | None) -> Iterator[str]:
    params = dict(parse_qsl(query))
    allowed = {"filter", "search", "author", "library", "sort", "limit"}
    unknown = set(params) - allowed
    if unknown:
        raise InputError(f"hf://?{query}: unknown search fields {sorted(unknown)} (use {sorted(allowed)})")
    count = int(params.pop("limit", limit or 0)) or None
    for model in hub_api().list_models(limit=count, **params):
        yield model.id


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def expand(sources: list[str], *, limit: int | None = None) -> Iterator[Entry]:
    """Every file named by ``sources``, lazily (a Hub search may list 10⁵ repositories).

    A SOURCE is a folder (walked recursively), a LoRA-like file, a list file (``.txt``: one
    SOURCE a line, ``#`` comments), ``hf://owner/repo[@rev][/path]``, ``hf://owner`` (all of an
    author's model repositories) or ``hf://?filter=lora&search=…`` (a model search; ``limit``
    repositories at most).
    """
    for text in sources:
        if text.startswith("hf://"):
            body = text[len("hf://") :]
            if body.startswith("?"):
                for repo_id in _search(body[1:], limit):
                    yield from _repo_entries(repo_id, None)
                continue
            parts = [p for p in body.split("/") if p]
            if len(parts) == 1:
                owner = parts[0]
                for model in hub_api().list_models(author=owner, limit=limit):
                    yield from _repo_entries(model.id, None)
                continue
            from ..io.hub import parse

            ref = parse(text)
            yield from _repo_entries(ref.repo_id, ref.revision, ref.path)
            continue
        path = Path(text)
        if path.is_dir():
            for found in _walk(path):
                yield _local_entry(found)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            yield from expand([ln for ln in lines if ln and not ln.startswith("#")], limit=limit)
        elif path.is_file():
            yield _local_entry(path)
        else:
            raise InputError(f"{text}: no such file or folder (nor an hf:// reference)")
