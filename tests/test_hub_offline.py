"""hf:// inputs with no network: one line within 2 s, no retries; a cached file works at once.

"No network" is played two ways, never touching the real Hub: an endpoint on 127.0.0.1 whose port
refuses connections, and an unroutable endpoint (192.0.2.1, TEST-NET-1; under the ``loopback``
marker conftest makes every non-loopback connect block until its timeout, as such an address does).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO

from loratools.errors import InputError
from loratools.families import FAMILIES
from loratools.formats.io import save_lora
from loratools.io.hub import reachable, resolve
from loratools.synthetic import make_lora

MESSAGE = "not in the local Hugging Face cache and the Hub cannot be reached (offline?)"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A huggingface_hub cache holding ``alice/loras/mine.safetensors`` at main; hub calls online."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    snapshot = root / "models--alice--loras" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    save_lora(make_lora(FAMILIES["sd1"], rank=1, text=False), snapshot / "mine.safetensors", "kohya")
    (root / "models--alice--loras" / "refs").mkdir()
    (root / "models--alice--loras" / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return root


@pytest.fixture(params=["refused", "unroutable"])
def endpoint(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import huggingface_hub.constants

    url = f"http://127.0.0.1:{_refused_port()}" if request.param == "refused" else "http://192.0.2.1"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    yield url


@pytest.mark.loopback
def test_unreachable_and_not_cached_is_one_line_fast(cache: Path, endpoint: str, capfd: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    with pytest.raises(InputError) as raised:
        resolve("hf://alice/loras/other.safetensors")
    with pytest.raises(InputError, match="Hub cannot be reached"):
        resolve("hf://alice/other-repo")  # a folder: snapshot_download
    assert time.perf_counter() - start < 4.0  # two references, 2 s each at most
    assert (
        str(raised.value) == f"hf://alice/loras/other.safetensors: {MESSAGE}; download it first or set HF_HUB_OFFLINE=1"
    )
    assert "Retrying" not in capfd.readouterr().err


@pytest.mark.loopback
def test_cached_file_works_offline_at_once(cache: Path, endpoint: str) -> None:
    start = time.perf_counter()
    path = resolve("hf://alice/loras/mine.safetensors")
    assert time.perf_counter() - start < 2.0
    assert path == cache / "models--alice--loras" / "snapshots" / SHA / "mine.safetensors"


@pytest.mark.loopback
def test_probe() -> None:
    assert not reachable(f"http://127.0.0.1:{_refused_port()}")
    start = time.perf_counter()
    assert not reachable("https://192.0.2.1", seconds=0.3)
    assert time.perf_counter() - start < 1.0
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert reachable(f"http://127.0.0.1:{server.getsockname()[1]}")


def test_cli_process_refused_loopback(tmp_path: Path) -> None:
    """The real command line: no HF_HUB_OFFLINE, the endpoint refuses; one line, no retry spam."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {
        "HF_ENDPOINT": f"http://127.0.0.1:{_refused_port()}",
        "HF_HUB_CACHE": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "loratools.cli.main", "inspect", "hf://owner/repo/file.safetensors"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    took = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: hf://owner/repo/file.safetensors: {MESSAGE}; download it first or set HF_HUB_OFFLINE=1"
    )
    assert took < 15, took  # interpreter start and imports included; the hub call itself is bounded at 1.5 s
