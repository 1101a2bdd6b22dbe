"""``inspect`` prints today what it printed before its speed work (issue 18 item 4), byte for byte.

The expected outputs were written by the main branch at 5770702, before the header-only path was
trimmed, on the real third-party LoRAs: the human screen in ``tests/data/inspect_golden/*.human.txt``
and the sha256 of ``--json`` in ``json.sha256`` (hashlib, not a hand-made number). Paths print as
``{REAL_LORAS}``; ``COLUMNS=1000`` keeps rich from wrapping at a path-dependent place. When an
output changes on purpose, regenerate both with the command in ``regenerate`` below and say why in
the commit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REAL_LORAS, REPO, needs_real

GOLDEN = Path(__file__).parent / "data" / "inspect_golden"
FILES = [
    "catundchat_sd15/pytorch_lora_weights.safetensors",
    "cloneofsimo_lora/analog_svd_rank4.safetensors",
    "cloneofsimo_lora/lora_disney_inpainting.safetensors",
    "lycoris_lokr/smart_falcon_8_lokr.safetensors",
    "catundchat_sd15/pytorch_lora_weights.bin",
    "cloneofsimo_lora/lora_kiriko2.ti.pt",
]


def regenerate(rel: str, as_json: bool) -> str:
    """The output of ``python -m loratools inspect [--json] REAL_LORAS/rel``, root written as {REAL_LORAS}."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(COLUMNS="1000", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "loratools", "inspect", *(["--json"] if as_json else []), str(REAL_LORAS / rel)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=True)
    return done.stdout.replace(str(REAL_LORAS), "{REAL_LORAS}")


def digests() -> dict[str, str]:
    lines = (GOLDEN / "json.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


@pytest.mark.parametrize("rel", [pytest.param(rel, marks=needs_real(rel)) for rel in FILES])
def test_inspect_human_unchanged(rel: str) -> None:
    expected = (GOLDEN / f"{rel.replace('/', '_')}.human.txt").read_text()
    assert regenerate(rel, as_json=False) == expected


@pytest.mark.parametrize("rel", [pytest.param(rel, marks=needs_real(rel)) for rel in FILES])
def test_inspect_json_unchanged(rel: str) -> None:
    out = regenerate(rel, as_json=True)
    assert hashlib.sha256(out.encode()).hexdigest() == digests()[rel.replace("/", "_")]
