"""Turning failures into one line on stderr and an exit status — never a traceback."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from ..errors import LoratoolsError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every cleanup handler runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def fail(message: str, code: int) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Run a command body, mapping every failure to ``error: …`` and a non-zero exit."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except LoratoolsError as exc:
        fail(exc.one_line(), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except Terminated:
        fail("terminated; nothing was written", 128 + signal.SIGTERM)
    except MemoryError:
        fail("out of memory", EXIT_INTERNAL)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as exc:  # a bug: still one line, the traceback only when asked
        if os.environ.get("LORATOOLS_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (set LORATOOLS_DEBUG=1 for the traceback)", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, previous)
