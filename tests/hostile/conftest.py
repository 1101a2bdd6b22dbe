"""Markers of the hostile corpus."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "subprocess: runs loratools in a child process (signals)")
