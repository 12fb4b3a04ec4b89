"""The Verifier: the reference's outputs on every trial, and each candidate decided against them.

The reference model runs once per trial; each candidate (a folded model, a subset
fold during blame, any second model) is compared against those outputs.  Models run
in onnxruntime's CPU provider with ``ORT_DISABLE_ALL`` (:mod:`bnfold.verify.runners`),
or in bnfold's numpy evaluator when onnxruntime has no kernel.

Each float output is decided by one of the rules of :mod:`bnfold.verify.tolerances`:
the fast path when it agrees within a tight bound of its own scale, else by the
model's own rounding-noise floor (:mod:`bnfold.verify.calibrate`, measured once per
Verifier and only when an output needs it), or by fixed tolerances when
``--atol``/``--rtol`` are given or calibration is off.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.errors import NotVerifiableError
from bnfold.verify.calibrate import Perturber
from bnfold.verify.compare import compare, max_error
from bnfold.verify.inputs import InputOptions, InputPlan, graph_inputs, make_inputs
from bnfold.verify.iofile import load_io_file, save_io_file
from bnfold.verify.report import OutputRow, VerifyReport
from bnfold.verify.runners import (
    CandidateError,
    ModelSource,
    NoKernel,
    Runner,
    graph_of,
    open_runner,
    ort_message,
    unsupported,
)
from bnfold.verify.tolerances import (
    CALIBRATION_FACTOR,
    CALIBRATION_RUNS,
    DEFAULT_TOLERANCES,
    FAST_REL,
    Tolerance,
    calibrated_bound,
    default_tolerance,
    dtype_name,
    is_float,
)

# Re-exported: where these lived before the split.
__all__ = [
    "DEFAULT_TOLERANCES",
    "CandidateError",
    "ModelSource",
    "OutputRow",
    "Tolerance",
    "Verifier",
    "VerifyOptions",
    "VerifyReport",
    "compare",
    "input_names",
    "load_io_file",
    "save_io_file",
    "verify_models",
]


@dataclass
class VerifyOptions:
    """How outputs are decided, the inputs, and the optional ``--save-io`` file (all picklable).

    ``atol``/``rtol``: when either is given, every float output is decided by the fixed
    elementwise rule with these (the other taking its per-dtype default), without
    calibration.  ``calibrate`` False decides by the per-dtype default tolerances.
    ``factor`` and ``calibration_runs`` set the calibrated rule (README "Verification").
    """

    atol: float | None = None
    rtol: float | None = None
    inputs: InputOptions = field(default_factory=InputOptions)
    save_io: str | None = None
    calibrate: bool = True
    factor: float = CALIBRATION_FACTOR
    calibration_runs: int = CALIBRATION_RUNS

    def tolerance(self, dtype: np.dtype) -> Tolerance:
        """Fixed tolerance of one output: the dtype default with the explicit overrides applied."""
        d = default_tolerance(dtype)
        return Tolerance(d.atol if self.atol is None else self.atol, d.rtol if self.rtol is None else self.rtol)

    @property
    def fixed(self) -> bool:
        """True when outputs are decided by fixed tolerances (overrides given, or calibration off)."""
        return self.atol is not None or self.rtol is not None or not self.calibrate


class Verifier:
    """Reference outputs on every trial, and comparisons of candidates against them.

    Args:
        reference: the reference model (the original), as a ModelProto or a path.
            A path is handed to onnxruntime as is (external data next to it).
        options: rules and inputs.
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
        self.base_dir = os.path.dirname(os.path.abspath(reference)) if isinstance(reference, str) else base_dir
        self.checks = 0
        self.calibration_runs = 0  # perturbed runs of the reference made so far (each over every trial)
        graph_model = graph_of(reference)
        self.plan: InputPlan = make_inputs(graph_model, self.options.inputs)
        self.output_names = [o.name for o in graph_model.graph.output]
        self.engine = "onnxruntime"
        self.engine_note: str | None = None
        self.ref_outputs: list[list[np.ndarray]] = []
        self._floors: dict[str, float] | None = None
        self._floor_note: str | None = None
        try:
            self.ref_outputs = self._run_reference()
        except NoKernel as e:
            self._switch_to_numpy(str(e))

    # -- reference ---------------------------------------------------------
    def _open(self, src: ModelSource, base_dir: str | None, stack: contextlib.ExitStack) -> Runner:
        return open_runner(self.engine, src, base_dir, stack)

    def _run_reference(self) -> list[list[np.ndarray]]:
        with contextlib.ExitStack() as stack:
            try:
                runner = self._open(self.reference, self.base_dir, stack)
            except NotVerifiableError as e:
                raise NotVerifiableError(f"the reference model cannot be verified: {e}") from e
            outs = []
            for feed, src in zip(self.plan.feeds, self.plan.sources, strict=True):
                try:
                    got = dict(zip(runner.output_names, runner.run(feed), strict=True))
                except NotVerifiableError:
                    raise
                except Exception as e:  # onnxruntime run-time failure
                    raise NotVerifiableError(
                        f"the reference model fails on inputs {src}: {ort_message(e)} "
                        "(set shapes with --input-shape, values with --input-range, --val-range or --inputs)"
                    ) from e
                outs.append([got[n] for n in self.output_names])
            return outs

    def _switch_to_numpy(self, why: str) -> None:
        self.engine = "reference"
        self.engine_note = f"onnxruntime: {why}; both models run in bnfold's numpy reference evaluator"
        self._floors = None
        try:
            self.ref_outputs = self._run_reference()
        except NotVerifiableError as e:
            raise NotVerifiableError(f"onnxruntime: {why}, and {e}") from e

    # -- noise floor -------------------------------------------------------
    def noise_floors(self) -> dict[str, float] | None:
        """Per output, the largest deviation of the reference over the perturbed runs (measured once).

        None when the perturbed reference cannot run (the outputs are then decided
        by the fixed tolerances, with a note).
        """
        if self._floors is None and self._floor_note is None:
            source = self.reference if isinstance(self.reference, onnx.ModelProto) else graph_of(self.reference)
            perturber = Perturber(source, self.base_dir)
            floors = dict.fromkeys(self.output_names, 0.0)
            seed = self.options.inputs.seed
            for run in range(self.options.calibration_runs):
                try:
                    outs = self.run(perturber.model(seed, run), base_dir=self.base_dir)
                except CandidateError as e:
                    self._floor_note = f"noise floor not measured ({e}); float outputs decided by fixed tolerances"
                    return None
                self.calibration_runs += 1
                for i, name in enumerate(self.output_names):
                    err, _ = max_error([t[i] for t in self.ref_outputs], [t[i] for t in outs])
                    floors[name] = max(floors[name], err)
            self._floors = floors
        return self._floors

    # -- candidates --------------------------------------------------------
    def tolerances(self) -> dict[str, Tolerance]:
        """Fixed tolerance of each output, by name (what ``--no-calibrate`` and ``--atol``/``--rtol`` use)."""
        first = self.ref_outputs[0]
        return {n: self.options.tolerance(np.asarray(a).dtype) for n, a in zip(self.output_names, first, strict=True)}

    def run(self, candidate: ModelSource, *, base_dir: str | None = None) -> list[list[np.ndarray]]:
        """Outputs of ``candidate`` on every trial, in the reference's output order.

        ``base_dir`` is the folder of an in-memory candidate's external data (a
        path's own folder is used for a path).

        Raises:
            CandidateError: the candidate cannot be loaded, has other outputs or
                inputs than the reference, or fails on an input.
        """
        with contextlib.ExitStack() as stack:
            try:
                runner = self._open(candidate, base_dir, stack)
            except NoKernel as e:
                self._switch_to_numpy(str(e))
                return self.run(candidate, base_dir=base_dir)
            except NotVerifiableError as e:
                if unsupported(str(e)):  # nothing says the candidate is wrong: it cannot be compared
                    raise NotVerifiableError(f"the candidate model cannot be verified: {e}") from e
                raise CandidateError(f"the candidate model cannot be loaded: {e}") from e
            if sorted(runner.output_names) != sorted(self.output_names):
                raise CandidateError(
                    f"the models have different outputs: {self.output_names} in the reference, "
                    f"{runner.output_names} in the candidate"
                )
            first = self.plan.feeds[0]
            missing = [n for n in runner.input_names if n not in first]
            if missing:
                raise CandidateError(f"the candidate needs inputs the reference does not have: {missing}")
            outputs = []
            for feed, src in zip(self.plan.feeds, self.plan.sources, strict=True):
                try:
                    got = dict(zip(runner.output_names, runner.run(feed), strict=True))
                except Exception as e:  # onnxruntime or evaluator failure on this input
                    raise CandidateError(f"the candidate model fails on inputs {src}: {ort_message(e)}") from e
                outputs.append([got[n] for n in self.output_names])
            return outputs

    def check(self, candidate: ModelSource, *, base_dir: str | None = None, save_io: str | None = None) -> VerifyReport:
        """Compare ``candidate`` with the reference on every trial and decide each output.

        A candidate that cannot be loaded or fails to run gives a failed report
        (with ``error``), not an exception: the reference ran on the same inputs.
        ``base_dir`` is the folder of an in-memory candidate's external data
        (default: the reference's folder, as for a re-fold of it).
        ``save_io`` names an ``.npz`` to write inputs and both sides' outputs to.
        """
        self.checks += 1
        base_dir = self.base_dir if base_dir is None else base_dir
        try:
            outputs = self.run(candidate, base_dir=base_dir)
        except CandidateError as e:
            report = self._new_report([])
            report.error = str(e)
            outputs = []
        else:
            report = self.decide(outputs)
        if save_io:
            save_io_file(save_io, self.plan, self.output_names, self.ref_outputs, outputs, report)
        return report

    def decide(self, outputs: list[list[np.ndarray]]) -> VerifyReport:
        """The report of a candidate's outputs (as :meth:`run` returns them): every output decided."""
        report = self._new_report(outputs)
        rows = {r.name: r for r in report.rows}
        for trial, (ref, cand) in enumerate(zip(self.ref_outputs, outputs, strict=True)):
            for name, a, b in zip(self.output_names, ref, cand, strict=True):
                compare(rows[name], a, b, trial)
        return report

    def _row(self, i: int, name: str, outputs: list[list[np.ndarray]]) -> OutputRow:
        """The row of output ``i`` with its rule decided (calibrating when it needs it)."""
        a0 = np.asarray(self.ref_outputs[0][i])
        dt = a0.dtype
        row = OutputRow(name, dtype_name(dt), [int(d) for d in a0.shape], 0.0, 0.0, decision="exact")
        if not is_float(dt):
            return row  # integers, bool, strings: equal
        if self.options.fixed or not outputs:
            t = self.options.tolerance(dt)
            row.atol, row.rtol, row.decision = t.atol, t.rtol, "tolerance"
            return row
        err, scale = max_error([t[i] for t in self.ref_outputs], [t[i] for t in outputs])
        fast = FAST_REL[dtype_name(dt)] * scale
        if err <= fast or not math.isfinite(err):  # NaN/inf disagreement or a shape change: no floor helps
            row.atol, row.decision, row.factor = fast, "fast", FAST_REL[dtype_name(dt)]
            return row
        floors = self.noise_floors()
        floor = None if floors is None else floors.get(name)
        if floor is None or not math.isfinite(floor):
            t = self.options.tolerance(dt)
            row.atol, row.rtol, row.decision = t.atol, t.rtol, "tolerance"
            if floor is not None and self._floor_note is None:
                self._floor_note = "the perturbed original gave NaN or infinity: decided by fixed tolerances"
            return row
        row.atol = calibrated_bound(floor, scale, dt, self.options.factor)
        row.decision, row.noise_floor, row.factor = "calibrated", floor, self.options.factor
        return row

    def _new_report(self, outputs: list[list[np.ndarray]]) -> VerifyReport:
        rows = [self._row(i, n, outputs) for i, n in enumerate(self.output_names)]
        notes = list(self.plan.notes) + [n for n in (self.engine_note, self._floor_note) if n]
        report = VerifyReport(rows, self.engine, list(self.plan.sources), notes, seed=self.options.inputs.seed)
        if any(r.decision == "calibrated" for r in rows):
            report.calibration = {
                "runs": self.options.calibration_runs,
                "seed": self.options.inputs.seed,
                "factor": self.options.factor,
            }
        return report


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
        options: rules, inputs, ``save_io``.
        base_dir: folder of external data of in-memory models.

    Raises:
        NotVerifiableError: the reference cannot be run (exit code 6).
    """
    options = options or VerifyOptions()
    v = Verifier(reference, options, base_dir=base_dir)
    return v.check(candidate, base_dir=base_dir, save_io=options.save_io)


def input_names(model: ModelSource) -> list[str]:
    """Names of the inputs a caller must feed."""
    return [s.name for s in graph_inputs(graph_of(model))]
