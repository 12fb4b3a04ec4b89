"""Fold decisions as data: what was folded, what was left and why.

The text summary, the JSON report and the tests all read these records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class Reason(str, Enum):
    """Why an affine node was left alone (stable codes, used in JSON and tests).

    Every member's name is its value in capitals.
    """

    TRAINING_MODE = "training_mode"
    SPATIAL_0 = "spatial_0"
    NON_CONSTANT_PARAMETERS = "non_constant_parameters"
    INVALID_PARAMETERS = "invalid_parameters"
    NON_CONSTANT_WEIGHT = "non_constant_weight"
    PRODUCER_OUTPUT_SHARED = "producer_output_shared"
    PRODUCER_OUTPUT_IS_GRAPH_OUTPUT = "producer_output_is_graph_output"
    SHAPE_MISMATCH = "shape_mismatch"
    UNKNOWN_RANK = "unknown_rank"
    UNKNOWN_SHAPE = "unknown_shape"
    NON_FINITE = "non_finite"
    DTYPE_OVERFLOW = "dtype_overflow"
    UNSUPPORTED_PRODUCER = "unsupported_producer"
    PADDED_CONSUMER = "padded_consumer"
    NOT_PER_CHANNEL = "not_per_channel"
    OUTPUT_SHARED = "output_shared"
    INTERMEDIATE_SHARED = "intermediate_shared"
    CHANNEL_AXIS_MOVED = "channel_axis_moved"
    CHANNEL_AXIS_LOST = "channel_axis_lost"
    CHANNEL_IS_BATCH_AXIS = "channel_is_batch_axis"
    SHIFT_BEFORE_CONV_TRANSPOSE = "shift_before_conv_transpose"
    EXCLUDED = "excluded"
    CONSTANT_TOO_LARGE = "constant_too_large"


class Rejected(Exception):
    """A fold does not apply: a reason code and a sentence.

    Rules return it from ``match``; the readers of affine nodes raise it.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"Rejected({self.reason.value!r}, {self.message!r})"


@dataclass(frozen=True)
class Fold:
    """One affine node (BN, or Mul/Add/Sub/Div by a constant) folded into ``target``."""

    node: str
    op_type: str
    target: str
    target_op: str
    pattern: str
    graph: str = "main"


@dataclass(frozen=True)
class Skip:
    """One affine node left in the model, with a reason code and a sentence.

    ``FoldReport.skips`` holds the BatchNormalization nodes; ``FoldReport.affine_skips``
    the Mul/Add/Sub/Div-by-a-constant nodes next to a foldable op that were left.
    """

    node: str
    reason: Reason
    message: str
    graph: str = "main"
    op_type: str = "BatchNormalization"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = self.reason.value
        return d


@dataclass
class FoldReport:
    """Every decision of one :func:`bnfold.fold_model` run."""

    bn_count: int = 0
    folds: list[Fold] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    affine_skips: list[Skip] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    @property
    def bn_folded(self) -> int:
        """Number of BatchNormalization nodes folded away."""
        return sum(1 for f in self.folds if f.op_type == "BatchNormalization")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "bn_found": self.bn_count,
            "bn_folded": self.bn_folded,
            "bn_left": len(self.skips),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "folds": [asdict(f) for f in self.folds],
            "skips": [s.to_dict() for s in self.skips],
            "affine_left": [s.to_dict() for s in self.affine_skips],
        }
