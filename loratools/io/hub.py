"""``hf://owner/repo/path/in/repo[@revision]`` → a local path, through huggingface_hub.

Downloads, the cache (``HF_HUB_CACHE``/``HF_HOME``), tokens and offline mode (``HF_HUB_OFFLINE=1``)
are huggingface_hub's own; we only parse the reference and turn its failures into one-line
:class:`InputError`s. A path that names a weight or config file (``.safetensors``, ``.ckpt``,
``.pt``, ``.bin``, ``.json``) is fetched with ``hf_hub_download``; any other path — or none, the
repository root — is a folder (a diffusers model, a peft adapter) fetched with ``snapshot_download``
restricted to that folder. Local paths pass through :func:`resolve` unchanged, and
huggingface_hub is imported only when a reference is given.

Also accepted: the revision after the repository (``hf://owner/repo@rev/path``) and
``hf://datasets/…`` / ``hf://spaces/…`` for other repository types.

Offline without ``HF_HUB_OFFLINE``: huggingface_hub retries a refused or silent connection with
backoff (23.6 s and six "Retrying in …" lines for one file, huggingface_hub 2.4). So before a
download, one TCP connection to the endpoint (or the proxy in the way) is tried for at most
:data:`PROBE_SECONDS`; when it fails, the cache alone answers (``local_files_only=True``, at once)
and a reference not in it is one line saying the Hub cannot be reached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

# urllib.request (with http.client and email), socket and threading are imported in reachable()
# only: every command imports this module for local paths too, and those imports were a large part
# of a header-only inspect's start-up (issue 18 item 4).

SCHEME = "hf://"
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json", ".sft")
_REPO_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
PROBE_SECONDS = 1.5  # a reachable Hub answers a TCP connect in well under this


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference."""

    repo_id: str
    path: str  # inside the repository, "" for its root
    revision: str | None
    repo_type: str = "model"

    @property
    def is_file(self) -> bool:
        return self.path.lower().endswith(FILE_SUFFIXES)


def is_hub(path: object) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse(ref: str) -> HubRef:
    """Split ``hf://[datasets/]owner/repo[@rev]/path[@rev]``; InputError when it is not one."""
    body = ref[len(SCHEME) :].strip("/")
    parts = body.split("/")
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPES and len(parts) >= 3:
        repo_type = _REPO_TYPES[parts.pop(0)]
    if len(parts) < 2 or not all(parts[:2]):
        raise InputError(f"{ref}: expected hf://owner/repo/path/in/repo[@revision]")
    owner, repo, rest = parts[0], parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    if not repo or revision == "":
        raise InputError(f"{ref}: expected hf://owner/repo/path/in/repo[@revision]")
    return HubRef(f"{owner}/{repo}", rest.strip("/"), revision, repo_type)


def resolve(path: str | os.PathLike[str]) -> Path:
    """A local path for ``path``: itself, or the cached/downloaded file or folder of an ``hf://`` reference."""
    if not is_hub(path):
        return Path(path)
    ref_text = str(path)
    ref = parse(ref_text)
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - a declared dependency
        raise InputError(f"{ref_text}: hf:// needs huggingface_hub (pip install huggingface_hub)") from None
    offline = _offline()
    cache_only = not offline and not reachable(_endpoint())
    try:
        if ref.is_file:
            downloaded = hub.hf_hub_download(
                ref.repo_id, ref.path, revision=ref.revision, repo_type=ref.repo_type, local_files_only=cache_only
            )
            return Path(str(downloaded))
        patterns = [f"{ref.path}/**"] if ref.path else None
        root = Path(
            str(
                hub.snapshot_download(
                    ref.repo_id,
                    revision=ref.revision,
                    repo_type=ref.repo_type,
                    allow_patterns=patterns,
                    local_files_only=cache_only,
                )
            )
        )
    except errors.RepositoryNotFoundError:
        raise InputError(
            f"{ref_text}: repository {ref.repo_id} not found (or private: log in with `hf auth login`)"
        ) from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{ref_text}: revision {ref.revision!r} not found in {ref.repo_id}") from None
    except errors.LocalEntryNotFoundError:
        if cache_only:
            raise InputError(
                f"{ref_text}: not in the local Hugging Face cache and the Hub cannot be reached (offline?); "
                "download it first or set HF_HUB_OFFLINE=1"
            ) from None
        raise InputError(
            f"{ref_text}: not in the local Hugging Face cache, and downloading is off or failed"
            + (" (HF_HUB_OFFLINE is set)" if _offline() else "")
        ) from None
    except errors.EntryNotFoundError:
        raise InputError(f"{ref_text}: no file {ref.path!r} in {ref.repo_id}") from None
    except errors.GatedRepoError:
        raise InputError(f"{ref_text}: {ref.repo_id} is gated: accept its terms on the hub and log in") from None
    except errors.HfHubHTTPError as exc:
        raise InputError(f"{ref_text}: the hub refused the request ({' '.join(str(exc).split())[:200]})") from None
    except (errors.HFValidationError, ValueError) as exc:
        raise InputError(f"{ref_text}: {' '.join(str(exc).split())[:200]}") from None
    except OSError as exc:
        raise InputError(f"{ref_text}: {exc.strerror or exc}") from None
    local = root / ref.path if ref.path else root
    if not local.exists():
        raise InputError(f"{ref_text}: no folder {ref.path!r} in {ref.repo_id}")
    return local


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def reachable(url: str, seconds: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``url``'s host (or the proxy configured for it) opens within ``seconds``.

    Name resolution is bounded too: the attempt runs on a daemon thread that is abandoned after
    ``seconds`` (a resolver with no network can hang far longer than any socket timeout).
    """
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 8080
    done: dict[str, Any] = {}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            done["ok"] = True
        except (OSError, ValueError):
            done["ok"] = False

    worker = threading.Thread(target=attempt, name="loratools-hub-probe", daemon=True)
    worker.start()
    worker.join(seconds + 0.1)
    return bool(done.get("ok"))


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False
