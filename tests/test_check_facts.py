"""check's per-view reuse (issue 18 item 4) changes no answer: facts shared across tables give
each table's report as fresh ones do, and the alphas the header scan read are the stored values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_check import write_kohya
from safetensors.torch import load_file

from loratools.check.engine import ViewFacts, check_view
from loratools.check.tables import for_family, tables_for
from loratools.check.view import build_view
from loratools.families import FAMILIES
from loratools.synthetic import make_lora


def _orphan_and_odd(tensors: dict[str, torch.Tensor]) -> None:
    """A module the scan matches nothing to (its alpha read by the view itself) and a NaN alpha."""
    tensors["lora_unet_no_such_module.alpha"] = torch.tensor(3.0)
    tensors["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(4, 2)
    first = next(k for k in tensors if k.endswith(".alpha"))
    tensors[first] = torch.tensor(float("nan"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_shared_facts_and_scanned_alphas_unchanged(tmp_path: Path, family: str) -> None:
    lora = make_lora(FAMILIES[family], rank=2, alphas="varied", text=family == "sd1")
    path = write_kohya(lora, tmp_path / "x.safetensors", _orphan_and_odd)
    view = build_view(path)
    stored = {k: float(v) for k, v in load_file(path).items() if k.endswith(".alpha")}
    for g in view.modules:
        if "alpha" in g.keys:
            value = stored[g.keys["alpha"]]
            assert g.alpha_tensor == (None if value != value else value), g.stem
    facts = ViewFacts(view)
    for table in tables_for("all"):
        table = for_family(table, view.family.name if view.family else None)
        assert check_view(view, table, facts=facts).to_dict() == check_view(view, table).to_dict(), table.label
