"""The one versioned JSON document every command prints with ``--json`` (or writes with ``--report``).

The schema is documented in ``docs/json-report.md`` and given as JSON Schema by
:data:`SCHEMA`; bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from typing import Any

from bnfold import __version__
from bnfold.errors import ExitCode, OutputError
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
        "size_growth": {"type": ["number", "null"]},
        "unchanged": {"type": "boolean"},
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


def model_dict(o: ModelOutcome) -> dict[str, Any]:
    """One model's entry: the same keys for every model, whatever happened to it."""
    from bnfold.cli import render  # the notes are sentences: rendered in one place

    r = o.report
    growth = o.size_growth
    return {
        "input": o.input,
        "output": o.output,
        "status": o.status,
        "exit_code": int(o.exit_code),
        "error": o.error,
        "size_before": o.size_before,
        "size_after": o.size_after,
        "size_growth": None if growth is None else round(growth, 4),
        "unchanged": o.unchanged,
        "bn_found": r.bn_count if r else None,
        "bn_folded": r.bn_folded if r else None,
        "bn_left": len(r.skips) if r else None,
        "nodes_before": r.nodes_before if r else None,
        "nodes_after": r.nodes_after if r else None,
        "folds": [asdict(f) for f in r.folds] if r else [],
        "skips": [s.to_dict() for s in r.skips] if r else [],
        "affine_left": [s.to_dict() for s in r.affine_skips] if r else [],
        "verification": None if o.verification is None else o.verification.data,
        "notes": render.notes(o),
        "timings": {k: round(v, 4) for k, v in o.timings.items()},
    }


def build(command: str, outcomes: list[ModelOutcome], exit_code: ExitCode, seconds: float) -> dict[str, Any]:
    """The report document for one command run."""
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1

    def total(key: str) -> int:
        return sum(m.get(key) or 0 for m in models)

    models = [model_dict(o) for o in outcomes]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "bnfold",
        "version": __version__,
        "command": command,
        "exit_code": int(exit_code),
        "status": STATUS[exit_code],
        "models": models,
        "summary": {
            "models": len(outcomes),
            "by_status": by_status,
            "bn_found": total("bn_found"),
            "bn_folded": total("bn_folded"),
            "bn_left": total("bn_left"),
            "size_before": total("size_before"),
            "size_after": total("size_after"),
            "seconds": round(seconds, 4),
        },
    }


def finite(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(doc: dict[str, Any]) -> str:
    """Stable, readable JSON text (strict JSON: no NaN or Infinity)."""
    return json.dumps(finite(doc), indent=2, sort_keys=False, allow_nan=False)


def write(doc: dict[str, Any], path: str) -> None:
    """Write the report atomically."""
    write_text(path, dumps(doc) + "\n", "the report")


def write_text(path: str, text: str, what: str = "the file") -> None:
    """Write a side file atomically, with the mode of any new file (0666 less the umask, not mkstemp's 0600).

    Raises:
        OutputError: the folder is missing or not writable (exit 5).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputError(f"{path}: cannot write {what}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write {what}: {e.strerror or e}") from e
        raise
