"""Inspection and reporting: facts about files as plain data (the ``--json`` schemas), above ``ops``.

``checkpoint`` and ``lora`` describe one file each, ``diff`` compares two, ``tree`` groups modules
into the block tree, ``facts`` holds what both reports share and ``schema`` the JSON Schemas. The CLI
renders these; nothing below this package imports it.
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_SCHEMA, CheckpointReport, ComponentFacts, inspect_checkpoint
from .lora import LORA_SCHEMA, LoraReport, ModuleFacts, inspect_lora

__all__ = [
    "CHECKPOINT_SCHEMA",
    "LORA_SCHEMA",
    "CheckpointReport",
    "ComponentFacts",
    "LoraReport",
    "ModuleFacts",
    "inspect_checkpoint",
    "inspect_lora",
]
