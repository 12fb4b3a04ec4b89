"""How far an output may move: fixed per-dtype tolerances, the fast-path bound, and the calibration factor.

Three rules decide an output (README "Verification"):

- **fast path**: ``max|a - b| <= FAST_REL[dtype] * max|a|`` passes without calibration
  (a correct fold of a well-conditioned model moves outputs by a few ulps of their scale);
- **calibrated**: otherwise the output passes when ``max|a - b| <= factor * noise_floor``,
  the noise floor being how far the original moves when its weights are perturbed
  within their rounding (:mod:`bnfold.verify.calibrate`);
- **tolerance**: with ``--atol``/``--rtol`` given, or calibration turned off, each element
  must satisfy ``|a - b| <= atol + rtol * |a|`` with the per-dtype defaults below.

Integer, bool and string outputs must be equal in every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """``|a - b| <= atol + rtol * |a|``."""

    atol: float
    rtol: float


# Fixed tolerance per output dtype (numpy name), used with --no-calibrate and as the base of
# --atol/--rtol overrides: at rtol 1e-2, correct float32 folds need atol <= 2e-7 on real CNNs
# and ~3.4e-4 on a rounding-amplifying sigmoid head; float16/bfloat16 carry 11/8 significant bits.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-7, 1e-5),
    "float32": Tolerance(1e-3, 1e-2),
    "float16": Tolerance(1e-2, 5e-2),
    "bfloat16": Tolerance(5e-2, 1e-1),
}
EXACT = Tolerance(0.0, 0.0)  # integers and bool
# An output whose largest reference magnitude is below WEAK_FACTOR * atol is flagged (fixed
# tolerances only): there atol, not rtol, decides, and a wrong fold can hide.
WEAK_FACTOR = 100.0

# Fast path: max|a - b| within this fraction of max|a| passes without calibration.  float32:
# 1e-5 (~84 ulps of the output's scale), measured correct folds of ordinary CNNs stay below
# 2e-6.  float16/bfloat16/float64: about 1 ulp, 1 ulp and ~4500 ulps (the same 1e-12 margin
# over float64's 1e-15 noise) of the scale; anything beyond is calibrated.
FAST_REL: dict[str, float] = {
    "float64": 1e-12,
    "float32": 1e-5,
    "float16": 1e-3,
    "bfloat16": 8e-3,
}
# Calibrated rule: pass when max|a - b| <= CALIBRATION_FACTOR * noise floor.  Measured by
# scripts/measure_tolerances.py over 57 models (README "Verification"): correct folds reach at
# most 2x the floor (1.3x where the floor decided), one-channel-wrong folds at least 50x in
# float32 and 3.2x in bfloat16 (but 1.5x where a wrong channel barely shows: that one passes).
CALIBRATION_FACTOR = 3.0
# Seeded perturbed runs of the original per verification (the floor is their largest deviation).
CALIBRATION_RUNS = 3

DECISIONS = ("exact", "fast", "calibrated", "tolerance")


def dtype_name(dtype: np.dtype) -> str:
    """numpy name of ``dtype``, ``bfloat16`` for ml_dtypes' bfloat16."""
    dt = np.dtype(dtype)
    return "bfloat16" if dt == ml_dtypes.bfloat16 else dt.name


def is_float(dtype: np.dtype) -> bool:
    """True for the float dtypes verification calibrates (float16/32/64, bfloat16)."""
    return dtype_name(dtype) in FAST_REL


def default_tolerance(dtype: np.dtype) -> Tolerance:
    """Default fixed tolerance for outputs of ``dtype`` (exact for integers and bool)."""
    return DEFAULT_TOLERANCES.get(dtype_name(dtype), EXACT)


def eps(dtype: np.dtype) -> float:
    """Machine epsilon of a float dtype (bfloat16 included)."""
    dt = np.dtype(dtype)
    return float(ml_dtypes.finfo(dt).eps) if dt == ml_dtypes.bfloat16 else float(np.finfo(dt).eps)


def calibrated_bound(noise_floor: float, scale: float, dtype: np.dtype, factor: float) -> float:
    """Largest max-abs error a calibrated output may show: ``factor`` x the noise floor.

    The floor is at least one ulp of the output's scale (rounding the output itself
    costs that much, even where the perturbed runs happened not to move it).
    """
    return factor * max(noise_floor, eps(dtype) * scale)
