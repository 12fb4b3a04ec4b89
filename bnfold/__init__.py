"""bnfold: fold frozen BatchNormalization layers of ONNX models into the weights around them."""

from bnfold.api import fold_model
from bnfold.fold.engine import FoldResult
from bnfold.fold.report import Fold, FoldReport, Reason, Skip

__version__ = "0.1.0"

__all__ = ["Fold", "FoldReport", "FoldResult", "Reason", "Skip", "__version__", "fold_model"]
