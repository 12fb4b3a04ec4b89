"""Run two models on the same inputs and compare every output.

The reference model runs once per trial; each candidate (a folded model, a
subset fold during blame, any second model) is compared against those outputs.
Models run in onnxruntime's CPU provider with ``ORT_DISABLE_ALL``: at any higher
level onnxruntime fuses Conv+BN itself, and the comparison would check its fold
against ours instead of the original graph.  When onnxruntime has no kernel for
an op (float64 or bfloat16 Conv on CPU) both models run in
:mod:`bnfold.verify.evaluator` instead.

An element passes when ``|a - b| <= atol + rtol * |a|`` (``a`` the reference).
float16 and bfloat16 are compared after widening (float64 arithmetic); NaN in
the same place in both is equal, NaN anywhere else is a mismatch, and so is an
infinity the other side does not have.  Default tolerances depend on the output
dtype: :data:`DEFAULT_TOLERANCES`, with the measurements behind them in the
README ("Verification") and ``scripts/measure_tolerances.py``.

Models with external data or over :data:`BY_PATH_BYTES` are never serialized to
bytes: a path is handed to onnxruntime as is, and an in-memory model is written
to a temporary folder with its tensors as external data first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx

from bnfold.errors import NotVerifiableError, OutputError
from bnfold.verify.evaluator import Evaluator
from bnfold.verify.inputs import SAVE_IO_MARKER, Feed, InputOptions, InputPlan, graph_inputs, make_inputs

# In-memory models bigger than this are written to disk and run by path (protobuf caps at 2 GiB).
BY_PATH_BYTES = 1 << 30
# Tensors at least this big go to the external data file of a model written for onnxruntime.
EXTERNAL_MIN_BYTES = 1024

ModelSource = onnx.ModelProto | str


@dataclass(frozen=True)
class Tolerance:
    """``|a - b| <= atol + rtol * |a|``."""

    atol: float
    rtol: float


# Default tolerance per output dtype (numpy name), from scripts/measure_tolerances.py (README
# "Verification"): at rtol 1e-2, correct float32 folds need atol <= 2e-7 on real CNNs and
# ~3.4e-4 on a rounding-amplifying sigmoid head whose outputs move by ~3.5e-3; the least
# visible wrong fold of a real model (one channel's scale doubled) needs atol >= 2.4e-2.
# float16/bfloat16 carry 11/8 significant bits, so correct folds move them by ~1e-2/5e-2.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-7, 1e-5),
    "float32": Tolerance(1e-3, 1e-2),
    "float16": Tolerance(1e-2, 5e-2),
    "bfloat16": Tolerance(5e-2, 1e-1),
}
EXACT = Tolerance(0.0, 0.0)  # integers and bool
# An output whose largest reference magnitude is below WEAK_FACTOR * atol is flagged: there atol,
# not rtol, decides, and a wrong fold can hide (a text detector fed noise peaks at ~2e-2).
WEAK_FACTOR = 100.0


def default_tolerance(dtype: np.dtype) -> Tolerance:
    """Default tolerance for outputs of ``dtype`` (exact for integers and bool)."""
    name = "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).name
    return DEFAULT_TOLERANCES.get(name, EXACT)


@dataclass
class VerifyOptions:
    """Tolerances, inputs and the optional ``--save-io`` file (all picklable).

    ``atol``/``rtol`` left None take the per-dtype default of each output.
    """

    atol: float | None = None
    rtol: float | None = None
    inputs: InputOptions = field(default_factory=InputOptions)
    save_io: str | None = None

    def tolerance(self, dtype: np.dtype) -> Tolerance:
        """Tolerance of one output: the dtype default with the explicit overrides applied."""
        d = default_tolerance(dtype)
        return Tolerance(d.atol if self.atol is None else self.atol, d.rtol if self.rtol is None else self.rtol)


# ---------------------------------------------------------------------------
# Comparing arrays
# ---------------------------------------------------------------------------


@dataclass
class OutputRow:
    """Comparison of one output over every trial.

    ``max_rel`` is ``|a - b| / |a|`` over elements where ``a != 0``; ``min_atol`` is
    the smallest ``atol`` that would have passed at this ``rtol`` (as polygraphy
    reports); errors are ``inf`` when NaN or infinity disagree.
    """

    name: str
    dtype: str
    shape: list[int]
    atol: float
    rtol: float
    elements: int = 0
    mismatches: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    min_atol: float = 0.0
    max_ref: float = 0.0
    mean_ref: float = 0.0
    worst: dict[str, Any] | None = None
    note: str | None = None

    @property
    def passed(self) -> bool:
        return self.note is None and self.mismatches == 0

    @property
    def weak(self) -> bool:
        """True when the reference peaks within :data:`WEAK_FACTOR` x ``atol``: ``atol`` dominates the check."""
        return self.elements > 0 and self.atol > 0 and self.max_ref < WEAK_FACTOR * self.atol

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite numbers as the strings ``"inf"``/``"nan"``)."""
        d = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": self.shape,
            "passed": self.passed,
            "elements": self.elements,
            "mismatches": self.mismatches,
            "max_abs_error": _num(self.max_abs),
            "max_rel_error": _num(self.max_rel),
            "mean_abs_error": _num(self.mean_abs),
            "atol": _num(self.atol),
            "rtol": _num(self.rtol),
            "min_atol_to_pass": _num(self.min_atol),
            "max_abs_reference": _num(self.max_ref),
            "mean_abs_reference": _num(self.mean_ref),
            "weak": self.weak,
            "worst": self.worst,
            "note": self.note,
        }
        return d

    def line(self) -> str:
        """One human line."""
        flag = "ok  " if self.passed else "FAIL"
        head = f"{flag} {self.name} {self.dtype}[{','.join(map(str, self.shape))}]"
        if self.note:
            return f"{head}: {self.note}"
        text = (
            f"{head}: max abs {_g(self.max_abs)}, max rel {_g(self.max_rel)}, mean abs {_g(self.mean_abs)} "
            f"(atol {_g(self.atol)}, rtol {_g(self.rtol)}; passes with atol >= {_g(self.min_atol)})"
        )
        if self.mismatches and self.worst:
            w = self.worst
            text += (
                f"; {self.mismatches} of {self.elements} elements differ, worst at {w['index']} "
                f"(trial {w['trial']}): {_g(w['reference'])} vs {_g(w['candidate'])}"
            )
        return text


def _num(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


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
    a64, b64 = _as_f64(a), _as_f64(b)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a64 - b64)
        agree = (np.isnan(a64) & np.isnan(b64)) | (np.isinf(a64) & (a64 == b64))
        err[agree] = 0.0
        err[np.isnan(err)] = np.inf  # one side NaN, or inf - inf of opposite signs
        mag = np.where(np.isfinite(a64), np.abs(a64), 0.0)
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
                "reference": float(a64.flat[k]),
                "candidate": float(b64.flat[k]),
                "excess": float(excess.flat[k]),
            }
    row.elements += n
    return row


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Outcome of comparing a candidate model with the reference on every trial."""

    rows: list[OutputRow]
    engine: str
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seed: int = 0

    @property
    def passed(self) -> bool:
        """True when the candidate ran and every output is within tolerance."""
        return self.error is None and all(r.passed for r in self.rows)

    @property
    def failing(self) -> list[OutputRow]:
        """Rows of the outputs that differ."""
        return [r for r in self.rows if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "engine": self.engine,
            "trials": len(self.sources),
            "seed": self.seed,
            "sources": list(self.sources),
            "notes": list(self.notes),
            "error": self.error,
            "outputs": [r.to_dict() for r in self.rows],
        }

    def summary_lines(self, label: str = "") -> list[str]:
        """Human summary: one line for the run (``verify LABEL: ...``), then one per output."""
        engine = "onnxruntime, ORT_DISABLE_ALL" if self.engine == "onnxruntime" else "bnfold numpy reference"
        verdict = "passed" if self.passed else "FAILED"
        head = f"verify {label}" if label else "verify"
        lines = [f"{head}: {verdict} ({len(self.sources)} trial(s), {engine})"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.error:
            lines.append(f"  error: {self.error}")
            return lines
        lines += ["  " + r.line() for r in self.rows]
        for r in self.rows:
            if r.weak:
                lines.append(
                    f"  warning: output {r.name} peaks at {_g(r.max_ref)} on these inputs, within {WEAK_FACTOR:g}x "
                    f"atol {_g(r.atol)}: a wrong fold can hide under atol; verify with real data (--inputs FILE.npz) "
                    "or a lower --atol"
                )
        return lines


# ---------------------------------------------------------------------------
# Running models
# ---------------------------------------------------------------------------


class _NoKernel(Exception):
    """onnxruntime has no kernel for a node of the model."""


class CandidateError(Exception):
    """The candidate model cannot be run where the reference could (a verification failure)."""


def _ort_message(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find ..." -> "Could not find ..."
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text[:400]


def _unsupported(message: str) -> bool:
    """True when onnxruntime refused a model for an op it does not know (custom op, unknown domain)."""
    return any(k in message for k in ("is not a registered function/op", "No Op registered", "opset import for domain"))


def needs_path(model: onnx.ModelProto) -> bool:
    """True when ``model`` must reach onnxruntime as a file (external data, or too big for bytes)."""
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return True
    return model.ByteSize() > BY_PATH_BYTES


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _tensors(g)


def write_for_runtime(model: onnx.ModelProto, folder: str, base_dir: str | None = None) -> str:
    """Write ``model`` to ``folder/model.onnx`` with big tensors in ``folder/model.data``.

    ``model`` is left as it was (tensors are moved out one at a time and read back),
    so no second in-memory copy of the weights is made.  Tensors that are already
    external are copied from ``base_dir``.
    """
    path = os.path.join(folder, "model.onnx")
    data_name = "model.data"
    # (tensor, its external_data entries or data_location before, offset, length)
    moved: list[tuple[onnx.TensorProto, list[tuple[str, str]] | int | None, int, int]] = []
    try:
        with open(os.path.join(folder, data_name), "wb") as f:
            for t in _tensors(model.graph):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    old = [(e.key, e.value) for e in t.external_data]
                    blob = _read_external(t, base_dir)
                elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
                    old, blob = (t.data_location if t.HasField("data_location") else None), t.raw_data
                else:
                    continue
                offset, length = f.tell(), len(blob)
                f.write(blob)
                f.write(b"\0" * (-f.tell() % 4096))
                del blob
                # Only now, with the bytes safely in the file, does the tensor change.
                moved.append((t, old, offset, length))
                t.ClearField("raw_data")
                _set_external(t, [("location", data_name), ("offset", str(offset)), ("length", str(length))])
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    finally:
        _restore(moved, os.path.join(folder, data_name))
    return path


def _set_external(t: onnx.TensorProto, entries: list[tuple[str, str]]) -> None:
    del t.external_data[:]
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def _read_external(t: onnx.TensorProto, base_dir: str | None) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    p = os.path.join(base_dir or os.getcwd(), info["location"])
    with open(p, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def _restore(moved: list, data_path: str) -> None:
    if not moved:
        return
    with open(data_path, "rb") as f:
        for t, old, offset, length in moved:
            if isinstance(old, list):
                _set_external(t, old)
                continue
            del t.external_data[:]
            if old is None:
                t.ClearField("data_location")
            else:
                t.data_location = old
            f.seek(offset)
            t.raw_data = f.read(length)


class _Runner:
    """A model ready to run: onnxruntime session or numpy evaluator."""

    def __init__(self, engine: str, impl: Any, input_names: list[str], output_names: list[str]) -> None:
        self.engine = engine
        self.impl = impl
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feed: Feed) -> list[np.ndarray]:
        use = {k: v for k, v in feed.items() if k in self.input_names}
        if self.engine == "onnxruntime":
            return self.impl.run(None, use)
        return self.impl.run(use)


def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def _open_ort(src: ModelSource, base_dir: str | None, stack: contextlib.ExitStack) -> _Runner:
    import onnxruntime as ort

    if isinstance(src, onnx.ModelProto):
        if needs_path(src):
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
            arg: str | bytes = write_for_runtime(src, folder, base_dir)
        else:
            arg = src.SerializeToString()
    else:
        arg = src
    try:
        sess = ort.InferenceSession(arg, _session_options(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if type(e).__name__ == "NotImplemented" or "NOT_IMPLEMENTED" in str(e):
            raise _NoKernel(_ort_message(e)) from e
        raise NotVerifiableError(f"onnxruntime cannot load it: {_ort_message(e)}") from e
    return _Runner("onnxruntime", sess, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])


def _open_reference(src: ModelSource, base_dir: str | None) -> _Runner:
    if isinstance(src, str):
        model = onnx.load(src, load_external_data=False)
        base_dir = os.path.dirname(os.path.abspath(src))
    else:
        model = src
    ev = Evaluator(model, base_dir)
    return _Runner("reference", ev, ev.input_names, ev.output_names)


def _graph_of(src: ModelSource) -> onnx.ModelProto:
    """The model's graph without loading external weights (enough for inputs and outputs)."""
    return src if isinstance(src, onnx.ModelProto) else onnx.load(src, load_external_data=False)


# ---------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------


class Verifier:
    """Reference outputs on every trial, and comparisons of candidates against them.

    Args:
        reference: the reference model (the original), as a ModelProto or a path.
            A path is handed to onnxruntime as is (external data next to it).
        options: tolerances and inputs.
        base_dir: folder of external data of an in-memory ``reference``.

    Raises:
        NotVerifiableError: the reference cannot run (custom op, no kernel and an op
            the numpy evaluator lacks) or an input cannot be made.
        InputShapeError: an input dimension must be given with ``--input-shape``.
    """

    def __init__(
        self, reference: ModelSource, options: VerifyOptions | None = None, *, base_dir: str | None = None
    ) -> None:
        self.options = options or VerifyOptions()
        self.reference = reference
        self.base_dir = base_dir
        self.checks = 0
        graph_model = _graph_of(reference)
        self.plan: InputPlan = make_inputs(graph_model, self.options.inputs)
        self.output_names = [o.name for o in graph_model.graph.output]
        self.engine = "onnxruntime"
        self.engine_note: str | None = None
        self.ref_outputs: list[list[np.ndarray]] = []
        try:
            self.ref_outputs = self._run_reference()
        except _NoKernel as e:
            self._switch_to_numpy(str(e))

    # -- reference ---------------------------------------------------------
    def _open(self, src: ModelSource, base_dir: str | None, stack: contextlib.ExitStack) -> _Runner:
        if self.engine == "onnxruntime":
            return _open_ort(src, base_dir, stack)
        return _open_reference(src, base_dir)

    def _run_reference(self) -> list[list[np.ndarray]]:
        with contextlib.ExitStack() as stack:
            try:
                runner = self._open(self.reference, self.base_dir, stack)
            except NotVerifiableError as e:
                raise NotVerifiableError(f"the reference model cannot be verified: {e}") from e
            outs = []
            for feed, src in zip(self.plan.feeds, self.plan.sources, strict=True):
                try:
                    outs.append(runner.run(feed))
                except NotVerifiableError:
                    raise
                except Exception as e:  # onnxruntime run-time failure
                    raise NotVerifiableError(
                        f"the reference model fails on inputs {src}: {_ort_message(e)} "
                        "(set shapes with --input-shape, values with --input-range or --inputs)"
                    ) from e
            return outs

    def _switch_to_numpy(self, why: str) -> None:
        self.engine = "reference"
        self.engine_note = f"onnxruntime: {why}; both models run in bnfold's numpy reference evaluator"
        try:
            self.ref_outputs = self._run_reference()
        except NotVerifiableError as e:
            raise NotVerifiableError(f"onnxruntime: {why}, and {e}") from e

    # -- candidates --------------------------------------------------------
    def tolerances(self) -> dict[str, Tolerance]:
        """Tolerance of each output, by name."""
        first = self.ref_outputs[0]
        return {n: self.options.tolerance(np.asarray(a).dtype) for n, a in zip(self.output_names, first, strict=True)}

    def run(self, candidate: ModelSource, *, base_dir: str | None = None) -> list[list[np.ndarray]]:
        """Outputs of ``candidate`` on every trial, in the reference's output order.

        Raises:
            CandidateError: the candidate cannot be loaded, has other outputs or
                inputs than the reference, or fails on an input.
        """
        with contextlib.ExitStack() as stack:
            try:
                runner = self._open(candidate, base_dir, stack)
            except _NoKernel as e:
                self._switch_to_numpy(str(e))
                return self.run(candidate, base_dir=base_dir)
            except NotVerifiableError as e:
                if _unsupported(str(e)):  # nothing says the candidate is wrong: it cannot be compared
                    raise NotVerifiableError(f"the candidate model cannot be verified: {e}") from e
                raise CandidateError(f"the candidate model cannot be loaded: {e}") from e
            if sorted(runner.output_names) != sorted(self.output_names):
                raise CandidateError(
                    f"the models have different outputs: {self.output_names} in the reference, "
                    f"{runner.output_names} in the candidate"
                )
            missing = [n for n in runner.input_names if n not in self.plan.feeds[0]]
            if missing:
                raise CandidateError(f"the candidate needs inputs the reference does not have: {missing}")
            outputs = []
            for feed, src in zip(self.plan.feeds, self.plan.sources, strict=True):
                try:
                    got = dict(zip(runner.output_names, runner.run(feed), strict=True))
                except Exception as e:  # onnxruntime or evaluator failure on this input
                    raise CandidateError(f"the candidate model fails on inputs {src}: {_ort_message(e)}") from e
                outputs.append([got[n] for n in self.output_names])
            return outputs

    def check(self, candidate: ModelSource, *, base_dir: str | None = None, save_io: str | None = None) -> VerifyReport:
        """Compare ``candidate`` with the reference on every trial.

        A candidate that cannot be loaded or fails to run gives a failed report
        (with ``error``), not an exception: the reference ran on the same inputs.
        ``save_io`` names an ``.npz`` to write inputs and both sides' outputs to.
        """
        self.checks += 1
        try:
            outputs = self.run(candidate, base_dir=base_dir)
        except CandidateError as e:
            report = self._new_report()
            report.error = str(e)
            outputs = []
        else:
            report = self._new_report()
            rows = {r.name: r for r in report.rows}
            for trial, (ref, cand) in enumerate(zip(self.ref_outputs, outputs, strict=True)):
                for name, a, b in zip(self.output_names, ref, cand, strict=True):
                    compare(rows[name], a, b, trial)
        if save_io:
            save_io_file(save_io, self.plan, self.output_names, self.ref_outputs, outputs, report)
        return report

    def _new_report(self) -> VerifyReport:
        tol = self.tolerances()
        rows = [
            OutputRow(n, _dtype_name(a), [int(d) for d in np.shape(a)], tol[n].atol, tol[n].rtol)
            for n, a in zip(self.output_names, self.ref_outputs[0], strict=True)
        ]
        notes = list(self.plan.notes) + ([self.engine_note] if self.engine_note else [])
        return VerifyReport(rows, self.engine, list(self.plan.sources), notes, seed=self.options.inputs.seed)


def _dtype_name(a: np.ndarray) -> str:
    dt = np.asarray(a).dtype
    return "bfloat16" if dt == ml_dtypes.bfloat16 else dt.name


def verify_models(
    reference: ModelSource,
    candidate: ModelSource,
    options: VerifyOptions | None = None,
    *,
    base_dir: str | None = None,
) -> VerifyReport:
    """Compare two models on the same inputs; writes ``options.save_io`` when set.

    Args:
        reference: the model whose outputs count as right (ModelProto or path).
        candidate: the model checked against it.
        options: tolerances, inputs, ``save_io``.
        base_dir: folder of external data of in-memory models.

    Raises:
        NotVerifiableError: the reference cannot be run (exit code 6).
    """
    options = options or VerifyOptions()
    v = Verifier(reference, options, base_dir=base_dir)
    return v.check(candidate, base_dir=base_dir, save_io=options.save_io)


def input_names(model: ModelSource) -> list[str]:
    """Names of the inputs a caller must feed."""
    return [s.name for s in graph_inputs(_graph_of(model))]


# ---------------------------------------------------------------------------
# --save-io
# ---------------------------------------------------------------------------


def save_io_file(
    path: str,
    plan: InputPlan,
    output_names: Sequence[str],
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    report: VerifyReport | None = None,
) -> None:
    """Write the inputs of every trial and both models' outputs to one ``.npz``.

    Keys: ``trial{k}/input/{name}``, ``trial{k}/reference/{output}``,
    ``trial{k}/candidate/{output}``, and :data:`~bnfold.verify.inputs.SAVE_IO_MARKER`
    (JSON: trial count, sources, dtypes of bfloat16 arrays, stored as float32).
    ``--inputs`` reads such a file back as its trials' inputs.
    """
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def put(key: str, a: np.ndarray) -> None:
        a = np.asarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            dtypes[key] = "bfloat16"
            a = a.astype(np.float32)
        arrays[key] = a

    for k, feed in enumerate(plan.feeds):
        for name, a in feed.items():
            put(f"trial{k}/input/{name}", a)
    for side, outs in (("reference", reference), ("candidate", candidate)):
        for k, trial in enumerate(outs):
            for name, a in zip(output_names, trial, strict=True):
                put(f"trial{k}/{side}/{name}", a)
    meta = {
        "trials": len(plan.feeds),
        "sources": list(plan.sources),
        "inputs": list(plan.feeds[0]) if plan.feeds else [],
        "outputs": list(output_names),
        "dtypes": dtypes,
        "passed": None if report is None else report.passed,
    }
    arrays[SAVE_IO_MARKER] = np.array(json.dumps(meta))
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e


def load_io_file(path: str) -> dict[str, Any]:
    """Read a ``--save-io`` file back.

    Returns ``{"meta": {...}, "trials": [{"input": {...}, "reference": {...}, "candidate": {...}}, ...]}``.
    """
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z[SAVE_IO_MARKER]))
        trials: list[dict[str, dict[str, np.ndarray]]] = [
            {"input": {}, "reference": {}, "candidate": {}} for _ in range(meta["trials"])
        ]
        for key in z.files:
            if key == SAVE_IO_MARKER:
                continue
            head, side, name = key.split("/", 2)
            a = z[key]
            if meta["dtypes"].get(key) == "bfloat16":
                a = a.astype(ml_dtypes.bfloat16)
            trials[int(head[len("trial") :])][side][name] = a
    return {"meta": meta, "trials": trials}
