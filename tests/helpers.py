"""Shared test helpers (import these; fixtures stay in conftest.py).

Key sets are project data (``tests/data/keysets``, gzipped copies of the real SD/FLUX.1 key sets;
see the README there). Third-party real LoRA files are not: they are looked up at
``$LORATOOLS_REAL_LORAS`` or ``../shared/real_loras`` beside the checkout, and tests that need them
skip with a reason when neither exists (under CI they must not skip: see ``.ci/run``).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path

import pytest

from loratools.synthetic import TINY

FAMILY_NAMES = tuple(TINY)
LAYOUTS = ("single", "diffusers")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
KEYSETS = DATA / "keysets"
REAL_LORAS = Path(os.environ.get("LORATOOLS_REAL_LORAS") or REPO.parent / "shared" / "real_loras")
# Every real-file skip reason starts with this; under CI=true conftest turns such skips into failures.
REAL_SKIP = "real third-party LoRA files not found"
REAL_LORAS_REASON = f"{REAL_SKIP} at {REAL_LORAS} (set LORATOOLS_REAL_LORAS to their folder)"
KEYSET_FILES = {
    "sd1": ("sd15-ldm", "sd15-diffusers"),
    "sd2": ("sd21-ldm", "sd21-diffusers"),
    "sdxl": ("sdxl-sgm", "sdxl-diffusers"),
}


def real_lora(*parts: str) -> Path:
    """A path under the real-LoRA folder (may not exist: pair with ``needs_real``)."""
    return REAL_LORAS.joinpath(*parts)


def needs_real(*parts: str) -> pytest.MarkDecorator:
    """Skip marker for tests that read ``REAL_LORAS/parts…``; the reason says where it was looked for."""
    path = real_lora(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{REAL_LORAS_REASON}: {'/'.join(parts) or '.'} missing")


def require_real(*parts: str) -> Path:
    """``REAL_LORAS/parts…``, or skip the running test (for fixtures) with the same reason as ``needs_real``."""
    path = real_lora(*parts)
    if not path.exists():
        pytest.skip(f"{REAL_LORAS_REASON}: {'/'.join(parts) or '.'} missing")
    return path


def under_ci() -> bool:
    """CI sets ``CI=true``: there the real files must be present and no real-file test may skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@cache
def _keyset_text(name: str) -> str:
    return gzip.decompress((KEYSETS / f"{name}.json.gz").read_bytes()).decode()


def load_keyset(name: str) -> dict:
    """A key-set file (``tests/data/keysets/<name>.json.gz``) as a dict (schema ``sd-keyset/1``)."""
    return json.loads(_keyset_text(name))


def keyset_shapes(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flat key → (shape, dtype) of a real key set, diffusers keys prefixed with their subfolder."""
    data = load_keyset(name)
    folder = data["container"] == "diffusers"
    out = {}
    for component, keys in data["components"].items():
        for key, (shape, dtype) in keys.items():
            out[f"{component}.{key}" if folder else key] = (tuple(shape), dtype)
    return out


class ProgressRecorder:
    """A fake progress callable for ops' ``progress=``: every total announced (``set_total``),
    with the sum of the advances made after it, as ``[total, advanced]`` per phase."""

    def __init__(self) -> None:
        self.phases: list[list[int]] = []

    def set_total(self, total: int) -> None:
        self.phases.append([total, 0])

    def __call__(self, n: int) -> None:
        assert self.phases, "advanced before any total was announced"
        self.phases[-1][1] += n
