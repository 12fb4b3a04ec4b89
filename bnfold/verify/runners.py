"""Running a model: an onnxruntime CPU session with ``ORT_DISABLE_ALL``, or bnfold's numpy evaluator.

Models with external data or over :data:`BY_PATH_BYTES` are never serialized to
bytes: a path is handed to onnxruntime as is, and an in-memory model is written to
a temporary folder with its big tensors as external data first
(:func:`write_for_runtime`; external tensors are read through the validated
:func:`bnfold.onnxio.tensors.read_external`, relative to the model's own folder).

onnxruntime's telemetry (a device id and ``onnxruntime.db`` under ``~/.cache``) is
turned off with ``ORT_DISABLE_TELEMETRY=1`` before onnxruntime is first imported,
unless the caller set that variable already.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import numpy as np
import onnx

from bnfold.errors import NotVerifiableError
from bnfold.onnxio.embedded import count_initializers
from bnfold.onnxio.tensors import external_entries, is_external, model_tensors, read_external
from bnfold.verify.evaluator import Evaluator
from bnfold.verify.segments import SPLIT_MIN_INITIALIZERS, SlicedSession, plan_slices

Feed = dict[str, np.ndarray]
ModelSource = onnx.ModelProto | str

# In-memory models bigger than this are written to disk and run by path (protobuf caps at 2 GiB).
BY_PATH_BYTES = 1 << 30
# Tensors at least this big go to the external data file of a model written for onnxruntime.
EXTERNAL_MIN_BYTES = 1024


class NoKernel(Exception):
    """onnxruntime has no kernel for a node of the model."""


class CandidateError(Exception):
    """The candidate model cannot be run where the reference could (a verification failure)."""


def ort_message(e: BaseException) -> str:
    """First line of an onnxruntime error, without its ``[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED :`` prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text[:400]


def unsupported(message: str) -> bool:
    """True when onnxruntime refused a model for an op it does not know (custom op, unknown domain)."""
    return any(k in message for k in ("is not a registered function/op", "No Op registered", "opset import for domain"))


def needs_path(model: onnx.ModelProto) -> bool:
    """True when ``model`` must reach onnxruntime as a file (external data, or too big for bytes)."""
    return any(is_external(t) for t, _ in model_tensors(model)) or model.ByteSize() > BY_PATH_BYTES


def write_for_runtime(model: onnx.ModelProto, folder: str, base_dir: str | None = None) -> str:
    """Write ``model`` to ``folder/model.onnx`` with big tensors in ``folder/model.data``.

    ``model`` is left as it was (tensors are moved out one at a time and put back
    afterwards), so no second in-memory copy of the weights is made.  Tensors that
    are already external are read from ``base_dir``, the model's own folder, through
    the validated reader (locations that leave it are refused).

    Raises:
        NotVerifiableError: the model has external data and no ``base_dir``.
        ModelLoadError: an external reference is invalid.
    """
    path = os.path.join(folder, "model.onnx")
    data_name = "model.data"
    data_path = os.path.join(folder, data_name)
    # (tensor, its external_data entries before or None when it was embedded, offset, length)
    moved: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None, int, int]] = []
    try:
        with open(data_path, "wb") as f:
            for t, is_init in model_tensors(model):
                if is_external(t):
                    if base_dir is None:
                        raise NotVerifiableError(
                            f"tensor '{t.name}' is external data of an in-memory model whose folder is not known"
                        )
                    old: list[tuple[str, str]] | None = list(external_entries(t).items())
                    blob = read_external(t, base_dir)
                elif is_init and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                    old, blob = None, t.raw_data
                else:
                    continue
                offset, length = f.tell(), len(blob)
                f.write(blob)
                f.write(b"\0" * (-f.tell() % 4096))
                del blob
                # Only now, with the bytes safely in the file, does the tensor change.
                moved.append((t, old, offset, length))
                t.ClearField("raw_data")
                _point(t, [("location", data_name), ("offset", str(offset)), ("length", str(length))])
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    finally:
        _put_back(moved, data_path)
    return path


def _point(t: onnx.TensorProto, entries: list[tuple[str, str]]) -> None:
    """Make ``t`` an external tensor with these ``external_data`` entries."""
    del t.external_data[:]
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def _put_back(moved: list, data_path: str) -> None:
    """Undo :func:`write_for_runtime`'s changes: old references back, embedded bytes re-read."""
    if not moved:
        return
    with open(data_path, "rb") as f:
        for t, old, offset, length in moved:
            if old is not None:
                _point(t, old)
                continue
            del t.external_data[:]
            t.ClearField("data_location")
            f.seek(offset)
            t.raw_data = f.read(length)


class Runner:
    """A model ready to run: an onnxruntime session or the numpy evaluator."""

    def __init__(
        self,
        engine: str,
        impl: Any,
        input_names: list[str],
        output_names: list[str],
        required: list[str] | None = None,
    ) -> None:
        self.engine = engine
        self.impl = impl
        self.input_names = input_names
        self._inputs = set(input_names)  # a set: models with thousands of inputs stay linear
        self._required = input_names if required is None else required
        self.output_names = output_names

    def run(self, feed: Feed) -> list[np.ndarray]:
        """Outputs in :attr:`output_names` order (inputs the model does not take are dropped)."""
        use = {k: v for k, v in feed.items() if k in self._inputs}
        if self.engine != "onnxruntime":
            return self.impl.run(use)
        core = self.impl if isinstance(self.impl, SlicedSession) else getattr(self.impl, "_sess", None)
        if core is None:
            return self.impl.run(None, use)
        # InferenceSession.run checks the feed with `name in list(feed)` per input: quadratic in
        # the number of inputs.  The same check with a set, then the C++ session(s) directly.
        missing = [n for n in self._required if n not in use]
        if missing:
            raise ValueError(f"Required inputs ({missing}) are missing from input feed")
        if isinstance(core, SlicedSession):
            return core.run(use)
        return core.run(self.output_names, use, None)


def import_ort() -> Any:
    """onnxruntime, imported with its telemetry off (unless ``ORT_DISABLE_TELEMETRY`` is set already)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read once, when onnxruntime is first imported
    import onnxruntime  # type: ignore[import-untyped]

    return onnxruntime


def session_options() -> Any:
    """``ORT_DISABLE_ALL`` (onnxruntime would fuse Conv+BN itself otherwise), errors only, no memory pattern.

    A memory pattern is planned on a session's first run and pays off over many runs;
    verification runs each session a few times, and the planning is quadratic in the
    number of values live at once (7.9 s of a 24,000-input model's first run, against
    0.06 s without it).  It changes where buffers lie, not what is computed.
    """
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.enable_mem_pattern = False
    return so


def open_ort(src: ModelSource, base_dir: str | None, stack: contextlib.ExitStack) -> Runner:
    """An onnxruntime session of ``src`` (a temporary copy lives as long as ``stack``).

    Raises:
        NoKernel: onnxruntime has no kernel for one of its nodes.
        NotVerifiableError: onnxruntime cannot load it.
    """
    sliced = _open_sliced(src, stack)
    if sliced is not None:
        return sliced
    if isinstance(src, onnx.ModelProto):
        if needs_path(src):
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
            arg: str | bytes = write_for_runtime(src, folder, base_dir)
        else:
            arg = src.SerializeToString()
    else:
        arg = src
    sess = _session(arg)
    inputs = sess.get_inputs()
    required = [i.name for i in inputs if not i.type.startswith("optional")]
    return Runner("onnxruntime", sess, [i.name for i in inputs], [o.name for o in sess.get_outputs()], required)


def _session(arg: str | bytes) -> Any:
    """An onnxruntime session of a model file or serialized model (NoKernel / NotVerifiableError)."""
    ort = import_ort()
    try:
        return ort.InferenceSession(arg, session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if type(e).__name__ == "NotImplemented" or "NOT_IMPLEMENTED" in str(e):
            raise NoKernel(ort_message(e)) from e
        raise NotVerifiableError(f"onnxruntime cannot load it: {ort_message(e)}") from e


def _open_sliced(src: ModelSource, stack: contextlib.ExitStack) -> Runner | None:
    """A runner of ``src`` cut into slices (:mod:`bnfold.verify.segments`), or None to run it whole."""
    if isinstance(src, str):
        count = count_initializers(src)
        if count is None or count < SPLIT_MIN_INITIALIZERS:
            return None
        model = onnx.load(src, load_external_data=False)
    else:
        model = src
    slices = plan_slices(model)
    if slices is None:
        return None
    sessions = [_session(sl.model.SerializeToString()) for sl in slices]
    names = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    required = [i.name for i in model.graph.input if not i.type.HasField("optional_type")]
    return Runner("onnxruntime", SlicedSession(slices, sessions, outputs), names, outputs, required)


def open_numpy(src: ModelSource, base_dir: str | None) -> Runner:
    """The numpy evaluator of ``src`` (a path's external data is read from its folder)."""
    if isinstance(src, str):
        model = onnx.load(src, load_external_data=False)
        base_dir = os.path.dirname(os.path.abspath(src))
    else:
        model = src
    ev = Evaluator(model, base_dir)
    return Runner("reference", ev, ev.input_names, ev.output_names)


def open_runner(engine: str, src: ModelSource, base_dir: str | None, stack: contextlib.ExitStack) -> Runner:
    """A runner of ``src`` on ``engine`` (``onnxruntime`` or ``reference``)."""
    return open_ort(src, base_dir, stack) if engine == "onnxruntime" else open_numpy(src, base_dir)


def graph_of(src: ModelSource) -> onnx.ModelProto:
    """The model's graph without loading external weights (enough for inputs and outputs)."""
    return src if isinstance(src, onnx.ModelProto) else onnx.load(src, load_external_data=False)
