"""The Python API: the fold core bound to the file layer, and the file-level calls the command line makes."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import onnx

from bnfold.fold import engine
from bnfold.fold.engine import FoldResult, Selector
from bnfold.fold.graph import ValueSink
from bnfold.onnxio.sink import DataSink
from bnfold.onnxio.tensors import ExternalReader

if TYPE_CHECKING:
    from bnfold.jobs import ModelOutcome
    from bnfold.verify.verifier import VerifyOptions


def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    verify: bool = True,
    verify_options: VerifyOptions | None = None,
    keep_safe: bool = False,
    force: bool = False,
    external_data: bool | None = None,
    freeze_initializer_inputs: bool = False,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ModelOutcome:
    """Do what ``bnfold fold SRC -o DST`` does: validated load, fold, verify the written bytes, atomic write.

    Args:
        src: the model file (never modified, unless ``dst`` is the same file: then it is
            replaced in place, and left untouched when there is nothing to fold).
        dst: where to write the folded model.
        verify: run the original and the written model in onnxruntime on the same inputs
            and write nothing when they differ.
        verify_options: tolerances and inputs (default: per-dtype tolerances, 3 generated trials).
        keep_safe: when verification fails, write the model without the folds that break it.
        force: replace an existing ``dst``.
        external_data: True/False to force the output layout; None keeps the input's.
        freeze_initializer_inputs: treat initializers that are also graph inputs as constants.
        input_shapes: shapes of inputs with dynamic dimensions (as ``--input-shape``).
        progress: called with each phase's name as it starts (``load``, ``fold``, ``check``,
            ``verify``, ``blame N`` for blame's verification run N, ``write``).

    Returns:
        The typed outcome: the :class:`~bnfold.fold.report.FoldReport`, the verification,
        sizes and timings.

    Raises:
        ModelLoadError: the input cannot be read or is invalid.
        OutputError: the output cannot be written (or exists and ``force`` is False).
        VerificationError: the outputs differ; nothing was written.
        NotVerifiableError: onnxruntime cannot run the model (pass ``verify=False``).
        UsageError: ``input_shapes`` does not fit the model.
    """
    from bnfold.jobs import FoldOptions, fold_job
    from bnfold.onnxio.writer import DEFAULT_SIZE_THRESHOLD

    src, dst = os.fspath(src), os.fspath(dst)
    vopts = verify_options
    if verify and input_shapes:
        from dataclasses import replace

        from bnfold.verify.verifier import VerifyOptions

        vopts = vopts or VerifyOptions()
        vopts = replace(vopts, inputs=replace(vopts.inputs, shapes={**vopts.inputs.shapes, **input_shapes}))
    in_place = os.path.exists(dst) and os.path.samefile(src, dst)
    opts = FoldOptions(
        freeze_initializer_inputs=freeze_initializer_inputs,
        verify=verify,
        verify_options=vopts,
        keep_safe=keep_safe,
        external_data=external_data,
        size_threshold=DEFAULT_SIZE_THRESHOLD,
        force=force,
        in_place=in_place,
    )
    return _raise_on_error(fold_job(src, dst, opts, progress))


def check_file(
    src: str | os.PathLike[str],
    *,
    freeze_initializer_inputs: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ModelOutcome:
    """Do what ``bnfold check SRC`` does: read-only; ``outcome.report.folds`` lists what could be folded.

    ``outcome.exit_code`` is ``ExitCode.FOLDABLE_LEFT`` when something could still be folded.

    Raises:
        ModelLoadError: the model cannot be read or is invalid.
    """
    from bnfold.jobs import FoldOptions, check_job

    opts = FoldOptions(freeze_initializer_inputs=freeze_initializer_inputs)
    return _raise_on_error(check_job(os.fspath(src), opts, progress))


def _raise_on_error(outcome: ModelOutcome) -> ModelOutcome:
    from bnfold.errors import BnfoldError, ExitCode

    if outcome.exit_code in (ExitCode.OK, ExitCode.FOLDABLE_LEFT):
        return outcome
    e = outcome.exception
    if isinstance(e, BnfoldError | KeyboardInterrupt):
        raise e
    raise BnfoldError(outcome.error or "failed", outcome.exit_code) from e


def fold_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    freeze_initializer_inputs: bool = False,
    base_dir: str | None = None,
    copy: bool = True,
    only: Selector | Collection[str] | None = None,
    sink: ValueSink | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization (and per-channel Mul/Add/Sub/Div) in ``model``.

    Args:
        model: the model, or the path of a model file (loaded and validated; its folder
            is then the default ``base_dir``); a ModelProto is left untouched unless
            ``copy`` is False.
        freeze_initializer_inputs: treat initializers that are also graph inputs
            (overridable at run time in IR >= 4) as constants.
        base_dir: folder that external-data locations are relative to (default: the
            model file's folder, or the current folder); every location is validated
            before it is read.
        copy: work on a copy (default); False folds ``model`` in place.
        only: fold only these affine nodes: a predicate ``(name, graph_path) -> bool``
            or a collection of display names (``Fold.node``); the others are left,
            BNs with reason ``excluded``.  None folds everything.
        sink: where big folded values go at once instead of into the model
            (the writer's data sink, for outputs with external data).

    Returns:
        A :class:`FoldResult` with the new model and a :class:`FoldReport`.

    Raises:
        ModelLoadError: the file cannot be read, or a tensor the fold reads does not match
            its dtype and shape, or its external data is unsafe or missing.
    """
    if isinstance(model, str | os.PathLike):
        from bnfold.onnxio.load import load_model

        path = os.fspath(model)
        model = load_model(path)
        base_dir = base_dir or os.path.dirname(os.path.abspath(path))
        copy = False  # a fresh model nobody else holds
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
