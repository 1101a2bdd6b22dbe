"""JSON Schemas (draft 2020-12) of the ``--json`` outputs of ``inspect`` and ``diff``.

The schemas are the contract for scripts: a field, once published, keeps its name and meaning
within a schema version; new fields may be added (``additionalProperties`` stays open). The tests
validate every report against them; ``loratools inspect --schema`` prints them.
"""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_COUNTS = {"type": "object", "additionalProperties": _INT}
_SHAPE = {"type": "array", "items": _INT}
_STRMAP = {"type": "object", "additionalProperties": _STR}
_NULLABLE_NUM = {"type": ["number", "null"]}

HASHES: dict[str, Any] = {
    "type": "object",
    "required": ["path", "bytes", "sha256", "autov2", "legacy", "addnet", "addnet_short", "checks"],
    "properties": {
        "path": _STR,
        "bytes": _INT,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "autov2": {"type": "string", "pattern": "^[0-9a-f]{10}$"},
        "legacy": {"type": "string", "pattern": "^[0-9a-f]{8}$"},
        "addnet": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "addnet_short": {"type": ["string", "null"]},
        "checks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "stored", "computed", "ok", "note"],
                "properties": {
                    "key": {"enum": ["sshs_model_hash", "sshs_legacy_hash"]},
                    "stored": _STR,
                    "computed": {"type": ["string", "null"]},
                    "ok": {"type": ["boolean", "null"]},
                    "note": _STR,
                },
            },
        },
    },
}

_HASHED = {
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "autov2": {"type": "string", "pattern": "^[0-9a-f]{10}$"},
}
_INPUT: dict[str, Any] = {  # one input of a merge: a file (sha256/autov2) or a folder (one entry per weight file)
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _STR,
        **_HASHED,
        "files": {"type": "object", "additionalProperties": {"type": "object", "properties": _HASHED}},
    },
}
PROVENANCE: dict[str, Any] = {  # ops/provenance.py; {"unreadable": why} when the record is not JSON
    "oneOf": [
        {"type": "null"},
        {"type": "object", "required": ["unreadable"], "properties": {"unreadable": _STR}},
        {
            "type": "object",
            "required": ["schema", "tool", "version", "operation", "base", "loras"],
            "properties": {
                "schema": _STR,
                "tool": _STR,
                "version": _STR,
                "operation": _STR,
                "base": _INPUT,
                "loras": {
                    "type": "array",
                    "items": {**_INPUT, "properties": {**_INPUT["properties"], "weight": _NUM}},
                },
            },
        },
    ]
}

KEYS: dict[str, Any] = {
    "type": ["array", "null"],
    "items": {
        "type": "object",
        "required": ["key", "shape", "dtype"],
        "properties": {"key": _STR, "shape": _SHAPE, "dtype": _STR},
    },
}

_NODE: dict[str, Any] = {
    "type": "object",
    "required": ["key", "label", "path", "modules", "kinds", "ranks", "alphas", "norm", "repeat"],
    "properties": {
        "key": _STR,
        "label": _STR,
        "path": _STR,
        "modules": _INT,
        "kinds": _COUNTS,
        "ranks": _COUNTS,
        "alphas": _COUNTS,
        "norm": _NULLABLE_NUM,
        "repeat": {"type": "integer", "minimum": 1},
        "parameters": _INT,
        "module": _STR,
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
    },
}

# formats.verdict.ModelVerdict: what model a LoRA is for, and how that was told (added in issue 13)
MODEL_VERDICT: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "family", "title", "fit", "note"],
    "properties": {
        "kind": {"enum": ["sd", "model", "not-diffusion", "unknown"]},
        "family": _STR,
        "title": _STR,
        "fit": {"enum": ["shapes", "names", "none"]},
        "note": _STR,
    },
}

INSPECT_LORA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "loratools.inspect.lora/1",
    "title": "loratools inspect --json (LoRA)",
    "type": "object",
    "$defs": {"node": _NODE},
    "required": [
        "schema",
        "kind",
        "path",
        "format",
        "family",
        "family_title",
        "metadata_claims",
        "file_bytes",
        "modules",
        "components",
        "kinds",
        "ranks",
        "alphas",
        "parameters",
        "dtypes",
        "embeddings",
        "metadata",
        "warnings",
        "unmatched",
        "module_facts",
        "read",
        "family_mismatch",
        "tensors",
        "file_dtypes",
        "embedding_facts",
        "metadata_summary",
        "tree",
        "norms",
        "hashes",
        "keys",
    ],
    "properties": {
        "schema": {"const": "loratools.inspect.lora/1"},
        "kind": {"const": "lora"},
        "path": _STR,
        "format": {
            "enum": [
                "kohya",
                "diffusers",
                "peft",
                "diffusers-attn-processor",
                "diffusers-old",
                "cloneofsimo",
                "textual-inversion",
            ]
        },
        "family": {"enum": ["sd1", "sd2", "sdxl", "flux1", "sd3", "language-model", "unknown"]},
        "family_title": _STR,
        "model": MODEL_VERDICT,
        "metadata_claims": {"type": ["string", "null"]},
        "file_bytes": _INT,
        "modules": _INT,
        "components": _COUNTS,
        "kinds": _COUNTS,
        "ranks": _COUNTS,
        "alphas": _COUNTS,
        "parameters": _INT,
        "dtypes": _COUNTS,
        "embeddings": {"type": "array", "items": _STR},
        "metadata": _STRMAP,
        "warnings": {"type": "array", "items": _STR},
        "unmatched": _STRMAP,
        "module_facts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["module", "kind", "rank", "alpha", "scale", "shape", "dtype", "norm"],
                "properties": {
                    "module": _STR,
                    "kind": _STR,
                    "rank": {"type": ["integer", "null"]},
                    "alpha": _NULLABLE_NUM,
                    "scale": _NUM,
                    "shape": _SHAPE,
                    "dtype": _STR,
                    "norm": _NULLABLE_NUM,
                },
            },
        },
        "read": {"enum": ["header", "tensors"]},
        "family_mismatch": {"type": "boolean"},
        "tensors": _INT,
        "file_dtypes": _COUNTS,
        "embedding_facts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "dtype", "vectors", "width"],
                "properties": {"name": _STR, "shape": _SHAPE, "dtype": _STR, "vectors": _INT, "width": _INT},
            },
        },
        "metadata_summary": {
            "type": "object",
            "required": ["training", "tags", "modelspec", "merged_from", "stored_hashes", "other_keys"],
            "properties": {
                "training": _STRMAP,
                "tags": {
                    "type": "object",
                    "required": ["total", "distinct", "top"],
                    "properties": {
                        "total": _INT,
                        "distinct": _INT,
                        "top": {
                            "type": "array",
                            "items": {"type": "array", "prefixItems": [_STR, _INT], "minItems": 2, "maxItems": 2},
                        },
                    },
                },
                "modelspec": _STRMAP,
                "merged_from": {"type": ["string", "null"]},
                "stored_hashes": _STRMAP,
                "other_keys": _INT,
            },
        },
        "tree": {"type": "array", "items": {"$ref": "#/$defs/node"}},
        "norms": {
            "type": ["object", "null"],
            "required": ["method", "total", "components"],
            "properties": {
                "method": _STR,
                "total": _NUM,
                "components": {"type": "object", "additionalProperties": _NULLABLE_NUM},
                "dora_note": {"type": ["string", "null"]},
            },
        },
        "hashes": {"oneOf": [{"type": "null"}, HASHES]},
        "keys": KEYS,
        "provenance": PROVENANCE,
    },
}

INSPECT_CHECKPOINT: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "loratools.inspect.checkpoint/1",
    "title": "loratools inspect --json (checkpoint)",
    "type": "object",
    "$defs": {"node": _NODE},
    "required": [
        "schema",
        "kind",
        "path",
        "container",
        "file_format",
        "file_bytes",
        "files",
        "family",
        "family_title",
        "layout",
        "variant",
        "prediction",
        "architecture",
        "components",
        "tensors",
        "parameters",
        "dtypes",
        "metadata",
        "missing",
        "missing_count",
        "unknown",
        "unknown_count",
        "shape_mismatches",
        "notes",
        "dropped_non_tensors",
        "read",
        "hashes",
        "keys",
        "tree",
    ],
    "properties": {
        "schema": {"const": "loratools.inspect.checkpoint/1"},
        "kind": {"const": "checkpoint"},
        "container": {"enum": ["single_file", "diffusers"]},
        "file_format": {"enum": ["safetensors", "pickle", "mixed"]},
        "file_bytes": _INT,
        "files": {"type": "array", "items": _STR},
        "family": {"enum": ["sd1", "sd2", "sdxl"]},
        "layout": {"enum": ["ldm", "sgm", "diffusers"]},
        "components": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "title", "tensors", "parameters", "bytes", "dtypes"],
                "properties": {
                    "name": _STR,
                    "title": _STR,
                    "tensors": _INT,
                    "parameters": _INT,
                    "bytes": _INT,
                    "dtypes": _COUNTS,
                },
            },
        },
        "tensors": _INT,
        "parameters": _INT,
        "dtypes": _COUNTS,
        "metadata": _STRMAP,
        "missing_count": _INT,
        "unknown_count": _INT,
        "read": {"const": "header"},
        "hashes": {"oneOf": [{"type": "null"}, {"type": "array", "items": HASHES}]},
        "keys": KEYS,
        "tree": {"type": "array", "items": {"$ref": "#/$defs/node"}},
        "provenance": PROVENANCE,
    },
}

_DIFF_MODULE = {
    "type": "object",
    "required": ["name", "status", "a", "b", "diff_norm", "relative"],
    "properties": {
        "name": _STR,
        "status": {"enum": ["same", "changed", "only_a", "only_b"]},
        "a": {"type": ["object", "null"]},
        "b": {"type": ["object", "null"]},
        "diff_norm": _NULLABLE_NUM,
        "relative": _NULLABLE_NUM,
    },
}

DIFF: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "loratools.diff/1",
    "title": "loratools diff --json",
    "type": "object",
    "required": [
        "schema",
        "kind",
        "a",
        "b",
        "only_a",
        "only_b",
        "changed_facts",
        "entries",
        "identical",
        "differing",
        "total_diff_norm",
        "metadata_changes",
        "notes",
    ],
    "properties": {
        "schema": {"const": "loratools.diff/1"},
        "kind": {"enum": ["lora", "checkpoint"]},
        "a": {"type": "object"},
        "b": {"type": "object"},
        "only_a": {"type": "array", "items": _STR},
        "only_b": {"type": "array", "items": _STR},
        "changed_facts": {"type": "array", "items": {"type": "object"}},
        "entries": {"type": "array", "items": _DIFF_MODULE},
        "identical": _INT,
        "differing": _INT,
        "total_diff_norm": _NULLABLE_NUM,
        "metadata_changes": {"type": "object"},
        "notes": {"type": "array", "items": _STR},
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "loratools.inspect.lora/1": INSPECT_LORA,
    "loratools.inspect.checkpoint/1": INSPECT_CHECKPOINT,
    "loratools.diff/1": DIFF,
}
