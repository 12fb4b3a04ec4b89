"""The verification report as data: one :class:`OutputRow` per output, one :class:`VerifyReport` per comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bnfold.verify.tolerances import WEAK_FACTOR


@dataclass
class OutputRow:
    """Comparison of one output over every trial, and how it was decided.

    ``decision`` is ``exact`` (integers, bool: must be equal), ``fast`` (max abs error
    within the fast-path bound of the output's scale), ``calibrated`` (max abs error
    within ``factor`` x ``noise_floor``) or ``tolerance`` (elementwise
    ``|a - b| <= atol + rtol * |a|``: ``--atol``/``--rtol`` given, or calibration off).
    For ``fast`` and ``calibrated`` the bound is ``atol`` (with ``rtol`` 0).

    ``max_rel`` is ``|a - b| / |a|`` over elements where ``a != 0``; ``min_atol`` is
    the smallest ``atol`` that would have passed at this ``rtol`` (as polygraphy
    reports); errors are ``inf`` when NaN or infinity disagree.
    """

    name: str
    dtype: str
    shape: list[int]
    atol: float
    rtol: float
    decision: str = "tolerance"
    noise_floor: float | None = None
    factor: float | None = None
    elements: int = 0
    mismatches: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    min_atol: float = 0.0
    max_ref: float = 0.0
    mean_ref: float = 0.0
    worst: dict[str, Any] | None = None
    note: str | None = None

    @property
    def passed(self) -> bool:
        return self.note is None and self.mismatches == 0

    @property
    def weak(self) -> bool:
        """True when a fixed ``atol`` dominates the check: the reference peaks within :data:`WEAK_FACTOR` x ``atol``."""
        return (
            self.decision == "tolerance"
            and self.elements > 0
            and self.atol > 0
            and self.max_ref < WEAK_FACTOR * self.atol
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite numbers as the strings ``"inf"``/``"nan"``)."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "passed": self.passed,
            "decision": self.decision,
            "elements": self.elements,
            "mismatches": self.mismatches,
            "max_abs_error": num(self.max_abs),
            "max_rel_error": num(self.max_rel),
            "mean_abs_error": num(self.mean_abs),
            "atol": num(self.atol),
            "rtol": num(self.rtol),
            "noise_floor": None if self.noise_floor is None else num(self.noise_floor),
            "factor": None if self.factor is None else num(self.factor),
            "min_atol_to_pass": num(self.min_atol),
            "max_abs_reference": num(self.max_ref),
            "mean_abs_reference": num(self.mean_ref),
            "weak": self.weak,
            "worst": self.worst,
            "note": self.note,
        }


def num(x: float) -> float | str:
    """A JSON number, or ``"inf"``/``"-inf"``/``"nan"``."""
    x = float(x)
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


@dataclass
class VerifyReport:
    """Outcome of comparing a candidate model with the reference on every trial.

    ``calibration`` describes the noise-floor runs when any output needed them
    (``runs``, ``seed``, ``factor``), else None.
    """

    rows: list[OutputRow]
    engine: str
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seed: int = 0
    calibration: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        """True when the candidate ran and every output passed its rule."""
        return self.error is None and all(r.passed for r in self.rows)

    @property
    def failing(self) -> list[OutputRow]:
        """Rows of the outputs that differ."""
        return [r for r in self.rows if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "engine": self.engine,
            "trials": len(self.sources),
            "seed": self.seed,
            "sources": list(self.sources),
            "notes": list(self.notes),
            "error": self.error,
            "calibration": self.calibration,
            "outputs": [r.to_dict() for r in self.rows],
        }
