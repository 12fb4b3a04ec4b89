"""The Python API: the fold core bound to the file layer."""

from __future__ import annotations

import os
from collections.abc import Collection

import onnx

from bnfold.fold import engine
from bnfold.fold.engine import FoldResult, Selector
from bnfold.fold.graph import ValueSink
from bnfold.onnxio.sink import DataSink
from bnfold.onnxio.tensors import ExternalReader


def fold_model(
    model: onnx.ModelProto,
    *,
    freeze_initializer_inputs: bool = False,
    base_dir: str | None = None,
    copy: bool = True,
    only: Selector | Collection[str] | None = None,
    sink: ValueSink | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization (and per-channel Mul/Add/Sub/Div) in ``model``.

    Args:
        model: the model; left untouched unless ``copy`` is False.
        freeze_initializer_inputs: treat initializers that are also graph inputs
            (overridable at run time in IR >= 4) as constants.
        base_dir: folder that external-data locations are relative to (default: the
            current folder); every location is validated before it is read.
        copy: work on a copy (default); False folds ``model`` in place.
        only: fold only these affine nodes: a predicate ``(name, graph_path) -> bool``
            or a collection of display names (``Fold.node``); the others are left,
            BNs with reason ``excluded``.  None folds everything.
        sink: where big folded values go at once instead of into the model
            (the writer's data sink, for outputs with external data).

    Returns:
        A :class:`FoldResult` with the new model and a :class:`FoldReport`.

    Raises:
        ModelLoadError: a tensor the fold reads does not match its dtype and shape, or
            its external data is unsafe or missing.
    """
    base = base_dir or os.getcwd()
    # Values the fold already handed to the writer's sink are read back from its file.
    reader = sink.reader(base) if isinstance(sink, DataSink) else ExternalReader(base)
    return engine.fold_model(
        model,
        freeze_initializer_inputs=freeze_initializer_inputs,
        read_external=reader,
        copy=copy,
        only=only,
        sink=sink,
    )
