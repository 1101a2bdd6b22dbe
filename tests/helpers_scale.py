"""Helpers for the many-files tests (batch, census, Ray): local sockets only, and a fake Hub.

tests/conftest.py's autouse ``_no_network`` makes every ``socket.connect`` fail. Worker pools
(a forkserver's Unix socket), Ray (127.0.0.1) and the loopback fake Hub need local sockets:
:func:`local_sockets` allows exactly those — AF_UNIX and the loopback addresses — and still
fails any other connection loudly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

# taken at import (collection), before any test's monkeypatching replaces them
_CONNECT = socket.socket.connect
_CREATE_CONNECTION = socket.create_connection
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _allowed(sock: socket.socket, address: object) -> bool:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return True
    host = address[0] if isinstance(address, tuple) and address else None
    return host in LOOPBACK


def _connect(self: socket.socket, address: object) -> None:
    if not _allowed(self, address):
        raise AssertionError(f"a test tried to open a non-loopback connection: {address!r}")
    _CONNECT(self, address)  # type: ignore[arg-type]


def _create_connection(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
    if address[0] not in LOOPBACK:
        raise AssertionError(f"a test tried to open a non-loopback connection: {address!r}")
    return _CREATE_CONNECTION(address, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture()
def local_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Opt in to Unix and loopback sockets (after conftest's ``_no_network`` refused them all)."""
    monkeypatch.setattr(socket.socket, "connect", _connect)
    monkeypatch.setattr(socket, "create_connection", _create_connection)
    yield


# --- a loopback fake of the Hub's listing and resolve endpoints -----------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from urllib.parse import parse_qs, unquote, urlparse  # noqa: E402


@dataclass
class VirtualFile:
    """A served file: ``prefix`` then zeros up to ``size`` (a full-size LoRA costs its header)."""

    prefix: bytes
    size: int

    @classmethod
    def of(cls, data: bytes) -> VirtualFile:
        return cls(data, len(data))

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        head = self.prefix[start:end] if start < len(self.prefix) else b""
        return head + bytes(max(0, end - max(start, len(self.prefix))))


@dataclass
class FakeRepo:
    sha: str
    files: dict[str, VirtualFile] = field(default_factory=dict)
    tags: list[str] = field(default_factory=lambda: ["lora"])


class FakeHub:
    """``/api/models`` (search, author), ``/api/models/{repo}[/revision/{rev}]``,
    ``/api/models/{repo}/tree/{rev}[/path]`` and ``/{repo}/resolve/{rev}/{path}`` with Range,
    on 127.0.0.1; counts requests and body bytes served for resolve."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.bytes_served = 0
        self.resolve_requests = 0
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # one write per response and no Nagle: otherwise headers and body leave in two
            # packets and the client's delayed ACK stalls every keep-alive request by ~40 ms
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, path: str, data: bytes | VirtualFile) -> None:
        repo = self.repos.setdefault(repo_id, FakeRepo(hashlib.sha1(repo_id.encode()).hexdigest()))
        repo.files[path] = data if isinstance(data, VirtualFile) else VirtualFile.of(data)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the endpoints ---
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, data: object, head: bool, status: int = 200) -> None:
        self._send(h, status, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

    def _missing(self, h: BaseHTTPRequestHandler, head: bool, what: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": what, "X-Error-Message": what}
        self._send(h, 404, json.dumps({"error": what}).encode(), headers, head)

    def _repo(self, name: str) -> FakeRepo | None:
        return self.repos.get(name)

    def handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = unquote(url.path)
        if path == "/_stats":  # for benchmarks that run the hub in another process
            return self._json(h, {"bytes_served": self.bytes_served, "resolve_requests": self.resolve_requests}, head)
        if path == "/api/models":
            found = [
                {"id": rid, "modelId": rid, "sha": r.sha, "tags": r.tags}
                for rid, r in sorted(self.repos.items())
                if (not query.get("author") or rid.split("/")[0] == query["author"])
                and (not query.get("filter") or query["filter"] in r.tags)
                and (not query.get("search") or query["search"] in rid)
            ]
            return self._json(h, found[: int(query["limit"])] if query.get("limit") else found, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return self._missing(h, head, "RepoNotFound")
            prefix = (m.group(3) or "").strip("/")
            items = [
                {"type": "file", "path": p, "size": f.size, "oid": hashlib.sha1(p.encode()).hexdigest(),
                 "lfs": {"oid": hashlib.sha256(p.encode()).hexdigest(), "size": f.size, "pointerSize": 134}}
                for p, f in sorted(repo.files.items())
                if not prefix or p.startswith(prefix + "/") or p == prefix
            ]  # fmt: skip
            return self._json(h, items, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self._repo(m.group(1))
            if repo is None:
                return self._missing(h, head, "RepoNotFound")
            siblings = [{"rfilename": p} for p in sorted(repo.files)]
            return self._json(h, {"id": m.group(1), "modelId": m.group(1), "sha": repo.sha, "siblings": siblings,
                                  "tags": repo.tags, "private": False}, head)  # fmt: skip
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo = self._repo(m.group(1))
            file = repo.files.get(m.group(3)) if repo else None
            if file is None:
                return self._missing(h, head, "EntryNotFound")
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                end = int(rng.group(2)) + 1 if rng.group(2) else file.size
                body = file.read(start, end)
                status = 206
                headers = {"Content-Range": f"bytes {start}-{start + len(body) - 1}/{file.size}"}
            else:
                body, status, headers = file.read(0, file.size), 200, {}
            headers.update({"Accept-Ranges": "bytes", "ETag": f'"{repo.sha}"', "X-Repo-Commit": repo.sha})  # type: ignore[union-attr]
            with self.lock:
                self.resolve_requests += 1
                self.bytes_served += 0 if head else len(body)
            return self._send(h, status, body, headers, head)
        return self._missing(h, head, "NotFound")


@pytest.fixture()
def fake_hub(local_sockets: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running :class:`FakeHub`; ``HF_ENDPOINT`` points at it and the hub is not offline."""
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        try:
            import huggingface_hub.constants as constants

            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        except ImportError:
            pass
        yield hub
