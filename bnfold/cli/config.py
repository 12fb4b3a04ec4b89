"""``[tool.bnfold]`` in ``pyproject.toml``: project defaults, found from the current folder upward as ruff does.

The first ``pyproject.toml`` that has a ``[tool.bnfold]`` table wins.  Its values
become the defaults of the command-line options, so an option given on the
command line always overrides them::

    [tool.bnfold]
    atol = 1e-4
    rtol = 1e-3
    ignore = ["Conv+Mul"]            # check: codes that do not fail the check
    glob = "*.onnx"

    [tool.bnfold.input-shapes]       # per file glob, matched against each model's path or name
    "detector*.onnx" = ["images:1,3,640,640"]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import click

# key in the file -> (click parameter name, type check)
KEYS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "atol": ("atol", (int, float)),
    "rtol": ("rtol", (int, float)),
    "seed": ("seed", int),
    "trials": ("trials", int),
    "select": ("select", list),
    "ignore": ("ignore", list),
    "glob": ("glob", str),
    "jobs": ("jobs", int),
    "freeze-initializer-inputs": ("freeze_initializer_inputs", bool),
}
SHAPES_KEY = "input-shapes"


@dataclass
class Config:
    """What was read: the file, option defaults by parameter name, and input shapes per glob."""

    path: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    shape_globs: list[tuple[str, dict[str, tuple[int, ...]]]] = field(default_factory=list)


def find(start: str | None = None) -> str | None:
    """The closest ``pyproject.toml`` with a ``[tool.bnfold]`` table, from ``start`` upward."""
    folder = os.path.abspath(start or os.getcwd())
    while True:
        candidate = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(candidate) and _has_table(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _has_table(path: str) -> bool:
    # A cheap text test first: most pyproject.toml files have no [tool.bnfold].
    try:
        with open(path, encoding="utf-8") as f:
            return "bnfold" in f.read()
    except (OSError, UnicodeDecodeError):
        return False


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 (tomli is a dependency there)
        import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
    return tomllib


def load(start: str | None = None) -> Config:
    """Read the configuration (an empty one when there is none).

    Raises:
        click.UsageError: the file cannot be parsed or holds an unknown key or a wrong type (exit 2).
    """
    path = find(start)
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            table = _toml().load(f).get("tool", {}).get("bnfold")
    except (OSError, ValueError) as e:
        raise click.UsageError(f"{path}: cannot read [tool.bnfold]: {e}") from None
    if table is None:
        return Config()
    if not isinstance(table, dict):
        raise click.UsageError(f"{path}: [tool.bnfold] must be a table")
    cfg = Config(path=path)
    for key, value in table.items():
        norm = key.replace("_", "-")
        if norm == SHAPES_KEY:
            cfg.shape_globs = _shapes(path, value)
            continue
        if norm not in KEYS:
            known = ", ".join([*KEYS, SHAPES_KEY])
            raise click.UsageError(f"{path}: [tool.bnfold] has no setting '{key}' (settings: {known})")
        param, kind = KEYS[norm]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise click.UsageError(f"{path}: [tool.bnfold] {key} = {value!r} has the wrong type")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise click.UsageError(f"{path}: [tool.bnfold] {key} must be a list of strings")
        cfg.defaults[param] = value
    return cfg


def _shapes(path: str, value: Any) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    from bnfold.cli.options import parse_shape

    if not isinstance(value, dict):
        raise click.UsageError(f"{path}: [tool.bnfold.{SHAPES_KEY}] must map file globs to lists of NAME:D0,D1,...")
    out = []
    for glob, specs in value.items():
        if isinstance(specs, str):
            specs = [specs]
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise click.UsageError(f"{path}: [tool.bnfold.{SHAPES_KEY}] {glob!r} must be a list of NAME:D0,D1,...")
        shapes: dict[str, tuple[int, ...]] = {}
        for s in specs:
            try:
                name, shape = parse_shape(s)
            except ValueError as e:
                raise click.UsageError(f"{path}: [tool.bnfold.{SHAPES_KEY}] {glob!r}: {e}") from None
            shapes[name] = shape
        out.append((glob, shapes))
    return out


def default_map(cfg: Config, commands: dict[str, click.Command]) -> dict[str, dict[str, Any]]:
    """Click's ``default_map``: each command gets the settings it has options for."""
    out: dict[str, dict[str, Any]] = {}
    for name, cmd in commands.items():
        params = {p.name for p in cmd.params}
        out[name] = {k: v for k, v in cfg.defaults.items() if k in params}
    return out
