"""The layout decision: whether an output stores its tensors embedded or in one external data file."""

from __future__ import annotations

from bnfold.errors import OutputError
from bnfold.onnxio.load import MAX_PROTOBUF
from bnfold.onnxio.tensors import TensorIndex

#: Tensors of at least this many bytes go to the data file when writing external data (onnx's default).
DEFAULT_SIZE_THRESHOLD = 1024

__all__ = ["DEFAULT_SIZE_THRESHOLD", "MAX_PROTOBUF", "plan_layout"]


def plan_layout(index: TensorIndex, external: bool | None = None) -> tuple[bool, bool]:
    """Decide how the output stores its tensors, before folding: ``(external, automatic)``.

    ``external`` None keeps the model's layout (external when any tensor is) and picks
    external data when the model is over protobuf's 2 GB limit (``automatic`` True).

    Raises:
        OutputError: ``external`` is False but the model cannot be embedded (over 2 GB).
    """
    if external is None:
        if index.external:
            return True, False
        if index.embedded_size > MAX_PROTOBUF:
            return True, True
        return False, False
    if not external and index.embedded_size > MAX_PROTOBUF:
        raise OutputError(
            "the model is over 2 GB, protobuf's limit for one file: it needs external data (drop --no-external-data)"
        )
    return external, False
