"""How ops report progress: a plain ``progress(n)`` callable, passed in explicitly, and its total.

An op takes ``progress: Progress | None`` and calls ``progress(n)`` as work is done (n bytes, or
n modules). A callable that also has ``set_total(total)`` (the CLI's bars,
``loratools/cli/progress.py``) learns the total from :func:`announce_total` before the first
advance, so a bar has a total without a second pass over the work. The callback travels as an
argument (CLI → report → op), never through ambient state: what reports progress is visible in
every signature on the way. Ops never import rich.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int], None]


def announce_total(progress: Progress | None, total: int) -> None:
    """Tell ``progress`` its total when it can take one (a ``set_total`` method); else nothing."""
    set_total = getattr(progress, "set_total", None)
    if callable(set_total):
        set_total(total)
