"""Comparing arrays: the elementwise check that fills an :class:`~bnfold.verify.report.OutputRow`, and max errors.

float16 and bfloat16 are compared after widening (float64 arithmetic); NaN in the
same place in both is equal, NaN anywhere else is a mismatch, and so is an infinity
the other side does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bnfold.verify.report import OutputRow


def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def abs_error(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|a - b|`` elementwise in float64 (0 where both are the same NaN/infinity, inf where
    only one side is NaN or infinite) and ``|a|`` (0 where ``a`` is not finite)."""
    a64, b64 = _as_f64(reference), _as_f64(candidate)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a64 - b64)
        agree = (np.isnan(a64) & np.isnan(b64)) | (np.isinf(a64) & (a64 == b64))
        err[agree] = 0.0
        err[np.isnan(err)] = np.inf  # one side NaN, or inf - inf of opposite signs
        mag = np.where(np.isfinite(a64), np.abs(a64), 0.0)
    return err, mag


def max_error(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, float]:
    """Largest ``|a - b|`` and largest finite ``|a|`` of one output over every trial.

    The error is inf when shapes differ or NaN/infinity disagree.
    """
    worst, scale = 0.0, 0.0
    for a, b in zip(reference, candidate, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return math.inf, scale
        if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
            worst = max(worst, 0.0 if np.array_equal(a, b) else math.inf)
            continue
        if a.size == 0:
            continue
        err, mag = abs_error(a, b)
        worst, scale = max(worst, float(err.max())), max(scale, float(mag.max()))
    return worst, scale


def compare(row: OutputRow, reference: np.ndarray, candidate: np.ndarray, trial: int = 0) -> OutputRow:
    """Fold one trial's comparison of one output into ``row`` (which keeps its tolerances)."""
    a, b = np.asarray(reference), np.asarray(candidate)
    if a.shape != b.shape:
        row.note = f"shape {list(a.shape)} in the reference, {list(b.shape)} in the candidate"
        return row
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        same = np.array_equal(a, b)
        row.elements += a.size
        row.mismatches += 0 if same else int(np.sum(a != b))
        return row
    err, mag = abs_error(a, b)
    with np.errstate(invalid="ignore", over="ignore"):
        excess = err - (row.atol + row.rtol * mag)
        bad = excess > 0
        nz = mag > 0
        rel = err[nz] / mag[nz]
    n = a.size
    if n:
        finite_err = err[np.isfinite(err)]
        mean = float(finite_err.mean()) if finite_err.size == n else math.inf
        row.mean_abs = (row.mean_abs * row.elements + mean * n) / (row.elements + n) if row.elements else mean
        row.max_abs = max(row.max_abs, float(err.max()))
        row.max_rel = max(row.max_rel, float(rel.max()) if rel.size else 0.0)
        row.min_atol = max(row.min_atol, float(max(0.0, (err - row.rtol * mag).max())))
        row.mismatches += int(bad.sum())
        row.max_ref = max(row.max_ref, float(mag.max()))
        row.mean_ref = (row.mean_ref * row.elements + float(mag.mean()) * n) / (row.elements + n)
        k = int(np.argmax(excess))
        if bad.flat[k] and (row.worst is None or float(excess.flat[k]) > row.worst["excess"]):
            index = [int(i) for i in np.unravel_index(k, a.shape)]
            row.worst = {
                "trial": trial,
                "index": index,
                "reference": float(_as_f64(a).flat[k]),
                "candidate": float(_as_f64(b).flat[k]),
                "excess": float(excess.flat[k]),
            }
    row.elements += n
    return row
