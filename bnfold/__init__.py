"""bnfold: fold frozen BatchNormalization layers of ONNX models into the weights around them.

The API is imported lazily (module ``__getattr__``), so ``import bnfold`` and the
command line's ``--help`` load no onnx or numpy.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library logs, it does not print: applications choose the handlers.
logging.getLogger("bnfold").addHandler(logging.NullHandler())

_EXPORTS = {
    "fold_file": "bnfold.api",
    "check_file": "bnfold.api",
    "fold_model": "bnfold.api",
    "ModelOutcome": "bnfold.jobs",
    "Verification": "bnfold.jobs",
    "FoldResult": "bnfold.fold.engine",
    "Fold": "bnfold.fold.report",
    "FoldReport": "bnfold.fold.report",
    "Reason": "bnfold.fold.report",
    "Skip": "bnfold.fold.report",
    "verify_models": "bnfold.verify.verifier",
    "VerifyOptions": "bnfold.verify.verifier",
    "VerifyReport": "bnfold.verify.verifier",
    "verify_fold": "bnfold.verify.blame",
    "FoldVerification": "bnfold.verify.blame",
    "InputOptions": "bnfold.verify.inputs",
    "ExitCode": "bnfold.errors",
    "BnfoldError": "bnfold.errors",
    "ModelLoadError": "bnfold.errors",
    "OutputError": "bnfold.errors",
    "VerificationError": "bnfold.errors",
    "NotVerifiableError": "bnfold.errors",
    "InputShapeError": "bnfold.errors",
    "InputFileError": "bnfold.errors",
    "UsageError": "bnfold.errors",
}

__all__ = [
    "BnfoldError",
    "ExitCode",
    "Fold",
    "FoldReport",
    "FoldResult",
    "FoldVerification",
    "InputFileError",
    "InputOptions",
    "InputShapeError",
    "ModelLoadError",
    "ModelOutcome",
    "NotVerifiableError",
    "OutputError",
    "Reason",
    "Skip",
    "UsageError",
    "Verification",
    "VerificationError",
    "VerifyOptions",
    "VerifyReport",
    "__version__",
    "check_file",
    "fold_file",
    "fold_model",
    "verify_fold",
    "verify_models",
]

if TYPE_CHECKING:
    from bnfold.api import check_file, fold_file, fold_model
    from bnfold.errors import (
        BnfoldError,
        ExitCode,
        InputFileError,
        InputShapeError,
        ModelLoadError,
        NotVerifiableError,
        OutputError,
        UsageError,
        VerificationError,
    )
    from bnfold.fold.engine import FoldResult
    from bnfold.fold.report import Fold, FoldReport, Reason, Skip
    from bnfold.jobs import ModelOutcome, Verification
    from bnfold.verify.blame import FoldVerification, verify_fold
    from bnfold.verify.inputs import InputOptions
    from bnfold.verify.verifier import VerifyOptions, VerifyReport, verify_models


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
