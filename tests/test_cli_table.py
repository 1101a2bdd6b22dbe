"""cli/table.py writes piped tables itself: byte for byte what rich prints (rich is the oracle)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from loratools.cli.table import MIN_PIPED_WIDTH, ModuleTable, plain_text, print_table

RESIZE_COLUMNS = [("module", "left", True), ("kind", "left", False), ("rank", "right", False),
                  ("‖ΔW‖_F kept", "right", False), ("note", "left", False)]  # fmt: skip
BLEND_COLUMNS = [("module", "left", True), ("ranks in", "right", True), ("rank", "right", True),
                 ("‖ΔW‖_F kept", "right", True), ("note", "left", True)]  # fmt: skip
RESIZE_ROWS = [
    ("te1.text_model.encoder.layers.0.mlp.fc1", "lora", "128 → 32", "64.51%", ""),
    ("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj", "locon", "— → 4", "100.00%", "unchanged"),
    ("unet.mid_block.resnets.0.conv1", "loha", "8 → 8", "99.99%", "unchanged, capped by --max-rank"),
]
CASES = {
    "resize": (RESIZE_COLUMNS, RESIZE_ROWS),
    "blend": (BLEND_COLUMNS, [("a.b", "128+32", "64", "91.20%", "fewer σ than asked"), ("c", "4+4", "8", "100%", "")]),
    "wide characters": (RESIZE_COLUMNS, [("模块.注意力", "lora", "8 → 4", "50.00%", "ΔW is zero")]),
    "markup in a cell (rich renders)": (RESIZE_COLUMNS, [("[bold]x[/bold]", "lora", "8 → 4", "1%", "")]),
    "emoji code (rich renders)": (RESIZE_COLUMNS, [("a:smile:b", "lora", "8 → 4", "1%", "")]),
    "wider than the line (rich folds)": (RESIZE_COLUMNS, [("m" * (MIN_PIPED_WIDTH + 30), "lora", "8 → 4", "1%", "")]),
    "no rows (rich renders)": (RESIZE_COLUMNS, []),
    "one column": ([("module", "left", False)], [("x",), ("yy",)]),
}


def _rich_reference(columns, rows, width: int) -> str:  # type: ignore[no-untyped-def]
    """The table as the CLI printed it before cli/table.py: rich's Table at max(width, 200) columns."""
    table = Table(show_edge=False, header_style="bold")
    for header, justify, fold in columns:
        table.add_column(header, justify=justify, overflow="fold" if fold else "ellipsis")
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=max(width, MIN_PIPED_WIDTH)).print(table)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [80, 250])
@pytest.mark.parametrize("case", list(CASES))
def test_piped_table_is_riches_bytes(case: str, width: int) -> None:
    columns, rows = CASES[case]
    table = ModuleTable()
    for header, justify, fold in columns:
        table.add_column(header, justify, fold=fold)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width)
    # the cases rich must render itself are named so; every other one takes the direct path
    direct = plain_text(Console(file=io.StringIO(), width=max(width, MIN_PIPED_WIDTH)), table)
    assert (direct is None) == ("(rich" in case)
    print_table(console, table)
    assert buffer.getvalue() == _rich_reference(columns, rows, width)
    assert console.width == width  # restored
