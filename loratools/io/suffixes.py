"""File-name suffixes that mark a torch pickle, apart from the pickle reader itself so that
deciding a file's kind never imports the opcode scanner (issue 18 item 4)."""

from __future__ import annotations

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
