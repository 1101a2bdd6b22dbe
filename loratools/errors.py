"""One exception tree for everything loratools refuses to do.

Every error carries a one-line, user-facing message; the CLI prints it as ``error: …`` and exits
non-zero. Library users catch :class:`LoratoolsError` (or a subclass) instead of parsing text.
"""

from __future__ import annotations


class LoratoolsError(Exception):
    """Base class: a clear one-line reason, optionally with a hint on what to do instead."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return text


class InputError(LoratoolsError):
    """A file or folder given by the user cannot be read as asked."""

    exit_code = 2


class CorruptFileError(InputError):
    """The bytes of a file contradict its own format (truncated, bad header, bad offsets)."""


class UnsafePickleError(InputError):
    """A pickle needs more than plain tensors to load; it was refused and nothing in it ran."""


class UnknownModelError(InputError):
    """The tensors do not match any supported model family or layout."""


class OutputError(LoratoolsError):
    """The output cannot be written (exists, unwritable, disk full)."""

    exit_code = 3
