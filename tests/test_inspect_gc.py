"""inspect pauses the cyclic garbage collector for header-only work and gives it back after.

The pause is a start-up saving for the one-shot CLI (issue 18 item 4); a Python caller that runs
the command in-process (CliRunner, a notebook) must find the collector as it left it.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from loratools.cli import inspect_cmd
from loratools.cli.inspect_cmd import collector_paused
from loratools.cli.main import cli
from loratools.formats.io import save_lora
from loratools.synthetic import TINY, make_lora


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gc") / "r4.safetensors"
    return Path(save_lora(make_lora(TINY["sd1"], rank=4), path, "kohya"))


@pytest.mark.parametrize(("active", "inside"), [(True, False), (False, True)])
def test_collector_paused_inside_and_restored(active: bool, inside: bool) -> None:
    assert gc.isenabled()
    with collector_paused(active):
        assert gc.isenabled() is inside
    assert gc.isenabled()


def test_collector_left_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused(True):
            assert not gc.isenabled()
        assert not gc.isenabled()  # the caller's choice, not ours to undo
    finally:
        gc.enable()


@pytest.mark.parametrize(("extra", "paused"), [([], True), (["--json"], True), (["--norms"], False)])
def test_inspect_command_restores_collector(
    lora: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], paused: bool
) -> None:
    seen: list[bool] = []
    report_of = inspect_cmd.inspect_one

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return report_of(*args, **kwargs)

    monkeypatch.setattr(inspect_cmd, "inspect_one", recording)
    result = CliRunner().invoke(cli, ["inspect", str(lora), *extra])
    assert result.exit_code == 0, result.output
    assert seen == [not paused]
    assert gc.isenabled()
