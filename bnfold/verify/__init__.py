"""Verification: run the original and a candidate on the same inputs and decide every output.

Modules, one job each: ``inputs`` (what to feed), ``iofile`` (``--inputs`` / ``--save-io``
files), ``runners`` (onnxruntime or the numpy ``evaluator``), ``segments`` (big graphs run in
slices), ``compare`` (array errors),
``tolerances`` (the rules' constants), ``calibrate`` (the model's own rounding-noise floor),
``report`` (rows as data), ``verifier`` (the Verifier), ``blame`` (which folds break it) and
``foldcheck`` (verifying a fold run: check, blame, ``--keep-safe``).

The main entry points are importable from here (lazily: importing ``bnfold.verify.inputs``
does not load the rest).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Verifier": "bnfold.verify.verifier",
    "VerifyOptions": "bnfold.verify.verifier",
    "verify_models": "bnfold.verify.verifier",
    "VerifyReport": "bnfold.verify.report",
    "OutputRow": "bnfold.verify.report",
    "verify_fold": "bnfold.verify.foldcheck",
    "FoldVerification": "bnfold.verify.foldcheck",
    "InputOptions": "bnfold.verify.inputs",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bnfold.verify' has no attribute {name!r}")
