"""The one versioned JSON document every command prints with ``--json`` (or writes with ``--report``).

The schema is documented in ``docs/json-report.md`` and given as JSON Schema by
:data:`SCHEMA`; bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from bnfold import __version__
from bnfold.errors import ExitCode
from bnfold.jobs import STATUS, ModelOutcome

SCHEMA_VERSION = 2  # 2: verification outputs carry decision, noise_floor, factor; verification.calibration

_NUM_OR_NULL = {"type": ["integer", "null"]}
_FOLD = {
    "type": "object",
    "required": ["node", "op_type", "target", "target_op", "pattern", "graph"],
    "properties": {k: {"type": "string"} for k in ("node", "op_type", "target", "target_op", "pattern", "graph")},
}
_SKIP = {
    "type": "object",
    "required": ["node", "op_type", "reason", "message", "graph"],
    "properties": {k: {"type": "string"} for k in ("node", "op_type", "reason", "message", "graph")},
}
_NUM_OR_TEXT = {"type": ["number", "string"]}  # "inf"/"nan" where not finite
_VERIFY_OUTPUT = {
    "type": "object",
    "required": ["name", "dtype", "passed", "decision", "max_abs_error", "atol", "rtol", "noise_floor", "factor"],
    "properties": {
        "name": {"type": "string"},
        "dtype": {"type": "string"},
        "passed": {"type": "boolean"},
        "decision": {"type": "string", "enum": ["exact", "fast", "calibrated", "tolerance"]},
        "max_abs_error": _NUM_OR_TEXT,
        "atol": _NUM_OR_TEXT,
        "rtol": _NUM_OR_TEXT,
        "noise_floor": {"type": ["number", "string", "null"]},
        "factor": {"type": ["number", "string", "null"]},
    },
}
_VERIFICATION = {
    "type": ["object", "null"],
    "properties": {
        "passed": {"type": "boolean"},
        "calibration": {"type": ["object", "null"]},
        "outputs": {"type": "array", "items": _VERIFY_OUTPUT},
    },
}
_MODEL = {
    "type": "object",
    "required": [
        "input", "output", "status", "exit_code", "error", "size_before", "size_after",
        "bn_found", "bn_folded", "bn_left", "folds", "skips", "verification", "timings",
    ],
    "properties": {
        "input": {"type": "string"},
        "output": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": sorted(STATUS.values())},
        "exit_code": {"type": "integer"},
        "error": {"type": ["string", "null"]},
        "size_before": _NUM_OR_NULL,
        "size_after": _NUM_OR_NULL,
        "nodes_before": _NUM_OR_NULL,
        "nodes_after": _NUM_OR_NULL,
        "bn_found": _NUM_OR_NULL,
        "bn_folded": _NUM_OR_NULL,
        "bn_left": _NUM_OR_NULL,
        "folds": {"type": "array", "items": _FOLD},
        "skips": {"type": "array", "items": _SKIP},
        "affine_left": {"type": "array", "items": _SKIP},
        "verification": _VERIFICATION,
        "notes": {"type": "array", "items": {"type": "string"}},
        "timings": {"type": "object"},
    },
}  # fmt: skip
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "bnfold report",
    "type": "object",
    "required": ["schema_version", "tool", "version", "command", "exit_code", "status", "models", "summary"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "tool": {"type": "string", "enum": ["bnfold"]},
        "version": {"type": "string"},
        "command": {"type": "string", "enum": ["fold", "check", "verify"]},
        "exit_code": {"type": "integer"},
        "status": {"type": "string", "enum": sorted(STATUS.values())},
        "models": {"type": "array", "items": _MODEL},
        "summary": {
            "type": "object",
            "required": ["models", "by_status", "bn_found", "bn_folded", "bn_left", "seconds"],
        },
    },
}


def build(command: str, outcomes: list[ModelOutcome], exit_code: ExitCode, seconds: float) -> dict[str, Any]:
    """The report document for one command run."""
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1

    def total(key: str) -> int:
        return sum((o.report or {}).get(key) or 0 for o in outcomes)

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": __version__,
        "command": command,
        "exit_code": int(exit_code),
        "status": STATUS[exit_code],
        "models": [o.to_dict() for o in outcomes],
        "summary": {
            "models": len(outcomes),
            "by_status": by_status,
            "bn_found": total("bn_found"),
            "bn_folded": total("bn_folded"),
            "bn_left": total("bn_left"),
            "seconds": round(seconds, 4),
        },
    }


def dumps(doc: dict[str, Any]) -> str:
    """Stable, readable JSON text."""
    return json.dumps(doc, indent=2, sort_keys=False)


def write(doc: dict[str, Any], path: str) -> None:
    """Write the report atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(doc) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
