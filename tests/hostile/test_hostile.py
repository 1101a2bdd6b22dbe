"""Every hostile case × every command that accepts its input (see ``tests/hostile/__init__.py``).

Each pair must end as its case expects (``refused`` with exactly one ``error:`` line and the
right exit status, or ``warned``/``accepted`` with a sound result), and whatever the outcome: no
traceback, no payload run, the inputs' bytes unchanged, nothing left at the output, no
``*.partial`` anywhere. Pairs failing by a known bug in code owned elsewhere are strict xfails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import companions_unchanged, pair_id, pairs, run_pair, verdict
from .known import KNOWN_BUGS

PAIRS = pairs()


def _param(case, slot):  # type: ignore[no-untyped-def]
    ident = pair_id(case, slot)
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[ident])] if ident in KNOWN_BUGS else []
    if case.signal is not None:
        marks.append(pytest.mark.subprocess)
    return pytest.param(case, slot, id=ident, marks=marks)


@pytest.mark.parametrize(("case", "slot"), [_param(c, s) for c, s in PAIRS])
def test_hostile(case, slot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    obs = run_pair(case, slot, tmp_path)
    wrong = verdict(case, slot, obs)
    assert not wrong, "; ".join(wrong) + "\n" + obs.describe()


def test_the_corpus_is_large_and_varied() -> None:
    """≥ 200 (case × command) pairs from ≥ 60 distinct generated inputs, every family present."""
    cases = {c.id: c for c, _ in PAIRS}
    assert len(PAIRS) >= 200 and len(cases) >= 60
    assert {c.family for c in cases.values()} >= {"safetensors", "pickle", "content", "faults"}


def test_known_bugs_name_real_pairs() -> None:
    """A stale entry (renamed case, removed command) would silently stop guarding anything."""
    assert set(KNOWN_BUGS) <= {pair_id(c, s) for c, s in PAIRS}


def test_shared_companions_are_byte_identical() -> None:
    """The good inputs every pair shares still hash as built (per pair only their stat is checked)."""
    assert companions_unchanged() == []


def test_payloads_are_live(tmp_path: Path) -> None:
    """The corpus' payloads do create the sentinel when unpickled unsafely: the sentinel check that
    every pickle pair makes would otherwise prove nothing. (Runs them on purpose, in tmp_path.)"""
    import pickle
    import time

    from .cases import _nested_getattr, _payloads

    companion = tmp_path / "companion"
    companion.write_bytes(b"x")
    names = list(_payloads(tmp_path / "probe", companion))
    for name in names:
        sentinel = tmp_path / f"sentinel-{name}"
        payload = _payloads(sentinel, companion)[name]
        result = pickle.loads(pickle.dumps(payload))  # unsafe on purpose: the point of this test
        if hasattr(result, "wait"):  # subprocess.Popen
            result.wait()
        deadline = time.monotonic() + 10
        while not sentinel.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sentinel.exists(), f"payload {name} does not create its sentinel"
    sentinel = tmp_path / "sentinel-nested"
    pickle.loads(_nested_getattr(sentinel))
    assert sentinel.exists()


def test_report_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from .report import main

    assert main(["-k", "^st-empty-"]) == 0
    out = capsys.readouterr().out
    assert "| family |" in out and "| safetensors |" in out
