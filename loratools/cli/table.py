"""Per-module tables: rich's layout, written directly when the output is plain text.

A 264-row resize table costs rich ~0.2–0.3 s of markup parsing, measuring and cropping on a busy
box — a sixth of the whole command. Piped or redirected (no terminal, no colour) rich's output of a
table that fits its width is fully determined: each column as wide as its widest cell plus one
space either side, ``┃``/``│`` between columns, a ``━╇━`` rule under the header, no edges.
:func:`print_table` writes exactly those bytes itself in that case (tests/test_cli_table.py checks
them against rich's) and hands everything else to rich: a terminal, colour, a table wider than the
line, or a cell that rich would read as markup or an emoji code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

Justify = Literal["left", "right"]

MIN_PIPED_WIDTH = 200  # piped or redirected, one line per row: module names are long (see print_table)
_RICH_SYNTAX = ("[", ":", "\n", "\r", "\t", "\x1b")  # markup, emoji codes, line breaks, escapes


@dataclass
class ModuleTable:
    """Columns and rows of a per-module table (``show_edge=False``, bold header, as rich's ``Table``)."""

    columns: list[tuple[str, Justify, bool]] = field(default_factory=list)  # header, justify, fold
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def add_column(self, header: str, justify: Justify = "left", *, fold: bool = False) -> None:
        """A column; ``fold`` breaks its over-long cells across lines (a terminal narrower than them)."""
        self.columns.append((header, justify, fold))

    def add_row(self, *cells: str) -> None:
        """One row, a string per column."""
        self.rows.append(cells)


def print_table(console: Console, table: ModuleTable) -> None:
    """Print ``table``; piped or redirected, one line per row (rich would wrap non-terminal output at
    80 columns, splitting module names for grep and diff), at least :data:`MIN_PIPED_WIDTH` wide."""
    if console.is_terminal:
        console.print(_rich_table(table))
        return
    width = console.width
    console.width = max(width, MIN_PIPED_WIDTH)
    try:
        text = plain_text(console, table)
        if text is None:
            console.print(_rich_table(table))
        else:
            console.file.write(text)
            console.file.flush()
    finally:
        console.width = width


def plain_text(console: Console, table: ModuleTable) -> str | None:
    """The bytes rich prints for ``table`` on this non-terminal console, or None where rich's own
    rendering could differ (colour, recording, markup-like cells, no rows, wider than the line)."""
    if console.color_system is not None or console.record or not table.rows or not table.columns:
        return None
    from rich.cells import cell_len  # rich's own cell widths (wide and zero-width characters)

    headers = [header for header, _, _ in table.columns]
    grid = [headers, *table.rows]
    if any(len(row) != len(headers) for row in table.rows):
        return None
    if any(mark in cell for row in grid for cell in row for mark in _RICH_SYNTAX):
        return None
    if any(not cell.isprintable() for row in grid for cell in row):
        return None
    widths = [max(cell_len(row[i]) for row in grid) for i in range(len(headers))]
    if sum(widths) + 3 * len(widths) - 1 > console.width:  # 2 of padding per column, 1 between columns
        return None

    def line(cells: Sequence[str], separator: str) -> str:
        parts = []
        for cell, size, (_, justify, _) in zip(cells, widths, table.columns, strict=True):
            gap = " " * (size - cell_len(cell))
            parts.append(f" {gap}{cell} " if justify == "right" else f" {cell}{gap} ")
        return separator.join(parts) + "\n"

    rule = "╇".join("━" * (size + 2) for size in widths) + "\n"
    return line(headers, "┃") + rule + "".join(line(row, "│") for row in table.rows)


def _rich_table(table: ModuleTable) -> Table:  # rich.table loads only here, when rich renders
    from rich.table import Table

    rich_table = Table(show_edge=False, header_style="bold")
    for header, justify, fold in table.columns:
        if fold:
            rich_table.add_column(header, justify=justify, overflow="fold")
        else:
            rich_table.add_column(header, justify=justify)
    for row in table.rows:
        rich_table.add_row(*row)
    return rich_table
