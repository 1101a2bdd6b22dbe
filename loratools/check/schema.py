"""JSON Schema (draft 2020-12) of ``loratools check --json`` (schema id ``loratools.check/1``)."""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_NSTR = {"type": ["string", "null"]}
_NNUM = {"type": ["number", "null"]}

TARGET: dict[str, Any] = {
    "type": "object",
    "required": [
        "target",
        "label",
        "source",
        "verdict",
        "clean",
        "modules",
        "applied",
        "refused",
        "unsupported",
        "ignored",
        "misapplied",
        "notes",
    ],
    "properties": {
        "target": {"enum": ["comfyui", "a1111", "forge", "diffusers", "invokeai", "kohya"]},
        "label": _STR,
        "source": _STR,
        "verdict": _STR,
        "clean": {"type": "boolean"},
        "modules": _INT,
        "applied": _INT,
        "refused": _NSTR,
        "unsupported": _NSTR,
        "ignored": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["short", "reason", "count", "keys", "names"],
                "properties": {
                    "short": _STR,
                    "reason": _STR,
                    "count": _INT,
                    "keys": _INT,
                    "names": {"type": "array", "items": _STR},
                },
            },
        },
        "misapplied": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["module", "why", "expected_scale", "applied_scale"],
                "properties": {"module": _STR, "why": _STR, "expected_scale": _NNUM, "applied_scale": _NNUM},
            },
        },
        "notes": {"type": "array", "items": _STR},
    },
}

CHECK_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "loratools check --json",
    "type": "object",
    "required": ["schema", "path", "format", "family", "modules", "base", "loratools_error", "clean", "targets"],
    "properties": {
        "schema": {"const": "loratools.check/1"},
        "path": _STR,
        "format": _STR,
        "family": _NSTR,
        "modules": _INT,
        "base": _NSTR,
        "loratools_error": _NSTR,
        "clean": {"type": "boolean"},
        "targets": {"type": "array", "items": TARGET, "minItems": 1},
    },
}
