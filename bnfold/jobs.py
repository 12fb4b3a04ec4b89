"""One model, one job: load, fold or check, verify, write; every outcome is data.

Jobs never raise: a :class:`ModelOutcome` carries the status, the exit code, the
error line and the reports, so a batch goes on past a broken model and the CLI,
the JSON report and the tests all read the same record.  Job functions are
top-level and their arguments picklable, for ``--jobs N`` process pools.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfold.api import fold_model
from bnfold.errors import (
    BnfoldError,
    ExitCode,
    InputShapeError,
    ModelLoadError,
    NotVerifiableError,
    OutputError,
    UsageError,
    VerificationError,
)
from bnfold.fold.engine import FoldResult
from bnfold.fold.report import FoldReport
from bnfold.onnxio.fsutil import Temps, resolve_target
from bnfold.onnxio.layout import DEFAULT_SIZE_THRESHOLD, plan_layout
from bnfold.onnxio.load import check_model, load_indexed, load_model
from bnfold.onnxio.sink import staging
from bnfold.onnxio.tensors import TensorIndex, external_data_files
from bnfold.onnxio.writer import WriteResult, write_model

if TYPE_CHECKING:  # the verification stack is imported when a job verifies (--no-verify skips it)
    from bnfold.verify.blame import BlameResult
    from bnfold.verify.foldcheck import FoldVerification
    from bnfold.verify.verifier import VerifyOptions, VerifyReport

log = logging.getLogger("bnfold")

#: ``progress(phase)`` is called as each phase of a job starts: ``load``, ``fold``,
#: ``check``, ``verify``, ``blame N`` (blame's verification run N), ``write``.
Progress = Callable[[str], None]

STATUS = {
    ExitCode.OK: "ok",
    ExitCode.FOLDABLE_LEFT: "foldable_left",
    ExitCode.VERIFY_FAILED: "verify_failed",
    ExitCode.INVALID_MODEL: "invalid_model",
    ExitCode.WRITE_FAILED: "write_failed",
    ExitCode.NOT_VERIFIED: "not_verified",
    ExitCode.INTERRUPTED: "interrupted",
    ExitCode.INTERNAL: "internal_error",
    ExitCode.USAGE: "usage_error",
}

BUG_HINT = "this is a bug in bnfold: please report it with the output of the same command run with --debug"

# Worst first: a batch exits with the worst code of its models.
SEVERITY = [
    ExitCode.INTERNAL,
    ExitCode.INTERRUPTED,
    ExitCode.INVALID_MODEL,
    ExitCode.WRITE_FAILED,
    ExitCode.NOT_VERIFIED,
    ExitCode.VERIFY_FAILED,
    ExitCode.USAGE,
    ExitCode.FOLDABLE_LEFT,
    ExitCode.OK,
]


def worst(codes: list[ExitCode]) -> ExitCode:
    """The most severe exit code of a batch (OK when empty)."""
    return min(codes, key=SEVERITY.index, default=ExitCode.OK)


@dataclass
class FoldOptions:
    """Options of one ``fold`` or ``check`` job (picklable)."""

    freeze_initializer_inputs: bool = False
    verify: bool = True
    verify_options: VerifyOptions | None = None  # None: the defaults
    keep_safe: bool = False
    external_data: bool | None = None  # None keeps the input's layout
    size_threshold: int = DEFAULT_SIZE_THRESHOLD
    force: bool = False
    in_place: bool = False
    debug: bool = False
    # Input shapes per file glob (from [tool.bnfold] input-shapes); --input-shape overrides them.
    shape_globs: Sequence[tuple[str, dict[str, tuple[int, ...]]]] = ()
    # Side files of the run (--report, --save-io, ...): refused when one is a data file of the model.
    side_files: Sequence[str] = ()


@dataclass
class Verification:
    """What verification found for one model, typed for rendering and JSON.

    ``report`` compares the candidate with the reference (for ``fold``, the model with
    every fold); ``blame`` names the folds that break it; ``kept_safe`` says whether
    ``--keep-safe`` wrote the model without them.  ``data`` is the verification's own
    JSON form, put into the report unchanged.
    """

    report: VerifyReport
    data: dict[str, Any]
    blame: BlameResult | None = None
    kept_safe: bool = False

    @property
    def passed(self) -> bool:
        return self.report.passed

    @classmethod
    def of_fold(cls, checked: FoldVerification) -> Verification:
        """From a fold run's verification (the folded models are dropped: outcomes cross processes)."""
        blame = checked.blame
        if blame is not None:
            blame = dataclasses.replace(blame, safe=None)
        return cls(report=checked.report, data=checked.to_dict(), blame=blame, kept_safe=checked.kept_safe)

    @classmethod
    def of_models(cls, rep: VerifyReport) -> Verification:
        """From a comparison of two models (``bnfold verify``)."""
        return cls(report=rep, data=rep.to_dict())


@dataclass
class ModelOutcome:
    """What happened to one model: typed fields only, read by the renderer and the JSON report."""

    input: str
    output: str | None = None
    exit_code: ExitCode = ExitCode.OK
    error: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    report: FoldReport | None = None
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    traceback: str | None = None
    auto_external: bool = False  # the output is over 2 GB, so it was written with external data
    data_file: str | None = None  # name of the output's external data file
    unchanged: bool = False  # --in-place with nothing to fold: the file was not touched
    data_files: list[str] = field(default_factory=list)  # real paths of the input's external data files
    other_links: int = 0  # other hard links of the replaced output (they keep the old file)
    # The exception behind ``error`` (in-process callers such as bnfold.fold_file re-raise it).
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        return STATUS[self.exit_code]

    @property
    def size_growth(self) -> float | None:
        """``size_after / size_before`` when both are known."""
        if not self.size_before or self.size_after is None:
            return None
        return self.size_after / self.size_before

    @property
    def grew(self) -> bool:
        """True when the output is much larger than the input (folding materialized computed weights)."""
        g = self.size_growth
        return g is not None and g >= GROWTH_FACTOR and (self.size_after or 0) - (self.size_before or 0) >= GROWTH_BYTES


# "The output grew" is reported from this ratio and this many bytes up.
GROWTH_FACTOR = 1.5
GROWTH_BYTES = 1 << 20


def disk_size(path: str, model: Any, data_files: set[str] | None = None) -> int:
    """Bytes of a model file plus the external data files it names (pass them when known)."""
    if data_files is None:
        data_files = external_data_files(model, os.path.dirname(os.path.abspath(path)))
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in data_files)


def reject_invalid_bn(path: str, report: FoldReport) -> None:
    """A BN with invalid parameters makes the model invalid: say which one and why."""
    for s in report.skips:
        if s.reason.value == "invalid_parameters":
            raise ModelLoadError(f"{path}: invalid BatchNormalization '{s.node}': {s.message}")


def check_output(model: Any, path: str, output: str) -> None:
    """Full checker on the folded model; blame the input when it was invalid already."""
    try:
        check_model(model, output, full=True)
    except ModelLoadError as e:
        check_model(load_model(path, check=False), path, full=True)  # raises when the input is at fault
        raise BnfoldError(f"{e}: {BUG_HINT}", ExitCode.INTERNAL) from e


class _Clock:
    def __init__(self, outcome: ModelOutcome) -> None:
        self.outcome = outcome
        self.start = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.outcome.timings[name] = now - self.last
        self.last = now

    def done(self) -> None:
        self.outcome.timings["total"] = time.perf_counter() - self.start


def _guard(outcome: ModelOutcome, debug: bool, e: BaseException) -> None:
    """Turn any exception into the outcome's status and one-line error."""
    outcome.exception = e
    if isinstance(e, BnfoldError):
        outcome.exit_code, outcome.error = e.exit_code, str(e)
    elif isinstance(e, KeyboardInterrupt):
        outcome.exit_code, outcome.error = ExitCode.INTERRUPTED, "interrupted"
    else:
        outcome.exit_code = ExitCode.INTERNAL
        outcome.error = f"internal error: {type(e).__name__}: {e}; {BUG_HINT}"
    log.debug("%s: %s", outcome.input, outcome.error, exc_info=e)
    if debug:
        outcome.traceback = traceback.format_exc()


def refuse_side_files(path: str, data_files: set[str], side_files: Sequence[str]) -> None:
    """A side file must never replace one of the model's data files."""
    for side in side_files:
        if os.path.realpath(side) in data_files:
            raise OutputError(f"{side}: is a data file of {path}; a side file must not replace it")


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file (or the same not-yet-existing path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _phase(progress: Progress | None, name: str, path: str) -> None:
    log.info("%s: %s", path, name)
    if progress is not None:
        progress(name)


def fold_job(path: str, output: str, opts: FoldOptions, progress: Progress | None = None) -> ModelOutcome:
    """Fold one model into ``output``, verify it, write it atomically; never raises."""
    outcome = ModelOutcome(input=path, output=output)
    clock = _Clock(outcome)
    try:
        if same_file(path, output) and not opts.in_place:
            raise OutputError(f"{output}: output is the input file; use --in-place to replace it")
        _phase(progress, "load", path)
        # Big embedded weights stay in the input file until the writer copies them over.
        model, index = load_indexed(path, in_place=True)
        in_files = set(index.data_files)
        if os.path.realpath(output) in in_files:
            raise OutputError(f"{output}: is a data file of the input model; choose another output name")
        outcome.data_files = sorted(in_files)
        refuse_side_files(path, in_files, opts.side_files)
        if os.path.lexists(output) and not opts.force and not opts.in_place:
            raise OutputError(f"{output}: already exists; use --force to overwrite it")
        resolve_target(output)  # a folder, device or FIFO is refused before any work
        outcome.size_before = disk_size(path, model, in_files)
        external, auto = plan_layout(index, opts.external_data)
        outcome.auto_external = auto
        clock.lap("load")
        _phase(progress, "fold", path)
        written = _fold_and_write(path, output, model, index, in_files, external, opts, outcome, clock, progress)
        if written is None:  # --in-place with nothing to fold: the file is left alone
            clock.done()
            return outcome
        outcome.size_after = written.size
        if written.data_path:
            outcome.data_file = os.path.basename(written.data_path)
        outcome.other_links = written.other_links
        clock.lap("write")
        # Verification ran inside the write (on the temp file): count it once.
        outcome.timings["write"] -= outcome.timings.get("verify", 0.0)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes data
        _guard(outcome, opts.debug, e)
    clock.done()
    return outcome


def _fold_and_write(
    path: str,
    output: str,
    model: Any,
    index: TensorIndex,
    in_files: set[str],
    external: bool,
    opts: FoldOptions,
    outcome: ModelOutcome,
    clock: _Clock,
    progress: Progress | None,
) -> WriteResult | None:
    """Fold into a sink next to the output, then write through the one verified write path.

    Every output, the ``--keep-safe`` one included, is checked, written under a
    temporary name, verified as written (by path) and only then renamed into place.
    None: ``--in-place`` found nothing to fold and wrote nothing.
    """
    base_dir = index.base_dir
    temps = Temps()  # every temporary file of this job: removed whatever interrupts it
    try:
        # Folded weights go straight from numpy to a file next to the output: its data
        # file (external data), or a staging file the model file is streamed from.
        with staging(output, temps, size_threshold=opts.size_threshold, durable=external) as sink:
            result = fold_model(
                model,
                freeze_initializer_inputs=opts.freeze_initializer_inputs,
                base_dir=base_dir,
                copy=False,
                sink=sink,
            )
            outcome.report = result.report
            reject_invalid_bn(path, result.report)
            clock.lap("fold")
            if opts.in_place and not result.report.folds:
                # Nothing to fold: leave the file alone (same inode, same mtime), as black does.
                outcome.unchanged = True
                outcome.size_after = outcome.size_before
                return None
            _phase(progress, "check", path)
            check_output(result.model, path, output)
            clock.lap("check")
            write = functools.partial(
                write_model,
                path=output,
                base_dir=base_dir,
                external=external,
                size_threshold=opts.size_threshold,
                protect=in_files if opts.in_place else in_files | {os.path.realpath(path)},
                temps=temps,
            )
            # Shapes are checked once the model passed the full checker (its inputs are the input's).
            verify_options = resolve_input_shapes(path, result.model, opts) if opts.verify else None
            hook = _verify_hook(path, result, opts, verify_options, outcome, progress) if opts.verify else None
            _phase(progress, "write", path)
            try:
                return write(result.model, sink=sink, source=index.source, before_commit=hook)
            except _WriteSafeInstead as safe:
                # Verification failed, but the model without the blamed folds passed: it is
                # checked and verified again as written, like every output.
                check_output(safe.result.model, path, output)
                return write(
                    safe.result.model, before_commit=_reverify_hook(path, safe.result, opts, verify_options, outcome)
                )
    finally:
        temps.sweep()


def _reverify_hook(
    path: str, result: FoldResult, opts: FoldOptions, verify_options: VerifyOptions | None, outcome: ModelOutcome
) -> Callable[[str], None]:
    """A ``before_commit`` hook for the ``--keep-safe`` model: it must pass as written."""

    def hook(candidate: str) -> None:
        started = time.perf_counter()
        try:
            from bnfold.verify.foldcheck import verify_fold
            from bnfold.verify.verifier import VerifyOptions

            options = dataclasses.replace(verify_options or VerifyOptions(), save_io=None)
            checked = verify_fold(
                path,
                FoldResult(candidate, result.report),  # type: ignore[arg-type]  # a path is a model source
                options,
                base_dir=os.path.dirname(os.path.abspath(path)),
                freeze_initializer_inputs=opts.freeze_initializer_inputs,
            )
        finally:
            outcome.timings["verify"] = outcome.timings.get("verify", 0.0) + time.perf_counter() - started
        if not checked.report.passed:
            raise VerificationError(f"{path}: verification of the --keep-safe model as written failed; nothing written")

    return hook


class _WriteSafeInstead(Exception):
    """Raised from the verification hook: write this (verified) result instead."""

    def __init__(self, result: Any) -> None:
        super().__init__("write the model without the blamed folds")
        self.result = result


def _verify_hook(
    path: str,
    result: FoldResult,
    opts: FoldOptions,
    verify_options: VerifyOptions | None,
    outcome: ModelOutcome,
    progress: Progress | None,
) -> Callable[[str], None]:
    """A ``before_commit`` hook: verify the written temp model (by path) against ``path``."""

    def hook(candidate: str) -> None:
        _phase(progress, "verify", path)
        started = time.perf_counter()
        try:
            from bnfold.verify.foldcheck import verify_fold

            checked = verify_fold(
                path,
                FoldResult(candidate, result.report),  # type: ignore[arg-type]  # a path is a model source
                verify_options,
                keep_safe=opts.keep_safe,
                base_dir=os.path.dirname(os.path.abspath(path)),
                freeze_initializer_inputs=opts.freeze_initializer_inputs,
                progress=lambda run: _phase(progress, f"blame {run}", path),
            )
        except InputShapeError as e:
            raise type(e)(f"{path}: {e}") from e
        except NotVerifiableError as e:
            raise type(e)(f"{path}: {e}; skip verification with --no-verify") from e
        finally:
            outcome.timings["verify"] = time.perf_counter() - started
        outcome.verification = Verification.of_fold(checked)
        if checked.kept_safe:
            outcome.report = checked.result.report
            raise _WriteSafeInstead(checked.result)
        if not checked.ok:
            rep = checked.report
            what = rep.error or f"{len(rep.failing)} of {len(rep.rows)} output(s) differ beyond tolerance"
            hint = "" if opts.keep_safe else " (--keep-safe writes the model without the blamed folds)"
            raise VerificationError(f"{path}: verification failed: {what}; nothing written{hint}")
        _phase(progress, "write", path)

    return hook


def resolve_input_shapes(path: str, model: Any, opts: FoldOptions) -> VerifyOptions:
    """The verification options for this model: shapes from config globs and ``--input-shape``, checked.

    A bare shape (name ``""``) names the model's only input.  A name that is not an
    input, a wrong rank or a dimension that contradicts the model is a usage error
    (exit 2): it is a typo, not a reason to skip verification.
    """
    from bnfold.verify.inputs import graph_inputs
    from bnfold.verify.verifier import VerifyOptions

    vopts = opts.verify_options or VerifyOptions()
    given: dict[str, tuple[int, ...]] = {}
    for glob, shapes in opts.shape_globs:
        if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(os.path.basename(path), glob):
            given.update(shapes)
    given.update(vopts.inputs.shapes)
    try:
        specs = graph_inputs(model)
    except (ValueError, KeyError) as e:  # an input of an unknown element type
        raise ModelLoadError(f"{path}: cannot read the graph inputs: {e}") from e
    if "" in given:
        bare = given.pop("")
        dims = ",".join(map(str, bare))
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs) or "none"
            example = specs[0].name if specs else "NAME"
            raise UsageError(
                f"--input-shape {dims}: a shape without a name needs a model with one input; "
                f"{path} has {len(specs)} ({names}): use --input-shape {example}:{dims}"
            )
        given[specs[0].name] = bare
    by_name = {s.name: s for s in specs}
    for name, shape in given.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "none"
            raise UsageError(f"--input-shape {name}: {path} has no input '{name}' (inputs: {known})")
        if spec.dims is None:
            continue
        fix = ",".join(str(d) if isinstance(d, int) else str(v) for d, v in zip(spec.dims, shape, strict=False))
        if len(shape) != len(spec.dims):
            fix = ",".join(
                str(d) if isinstance(d, int) else _example_dim(i, spec.dims) for i, d in enumerate(spec.dims)
            )
            raise UsageError(
                f"--input-shape {name}: {len(shape)} dimension(s) given, {path} declares {len(spec.dims)} "
                f"({_fmt_dims(spec.dims)}): for example --input-shape {name}:{fix}"
            )
        for axis, (d, v) in enumerate(zip(spec.dims, shape, strict=True)):
            if isinstance(d, int) and d != v:
                raise UsageError(
                    f"--input-shape {name}: dimension {axis} is {v}, {path} fixes it to {d} "
                    f"({_fmt_dims(spec.dims)}): use --input-shape {name}:{fix}"
                )
    _require_known_dims(path, specs, given)
    return dataclasses.replace(vopts, inputs=dataclasses.replace(vopts.inputs, shapes=given))


def _fmt_dims(dims: Sequence[Any]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _example_dim(axis: int, dims: Sequence[Any]) -> str:
    """A plausible value for an unknown dimension in a suggested command (it must parse)."""
    if axis == 0:
        return "1"
    return "224" if len(dims) == 4 and axis >= 2 else "3" if len(dims) == 4 else "128"


def _require_known_dims(path: str, specs: Sequence[Any], given: dict[str, tuple[int, ...]]) -> None:
    """An input with an unknown dimension past the first must be given: say how, with a command that parses."""
    symbols = {}
    for s in specs:
        if s.name in given and s.dims is not None:
            symbols.update({d: v for d, v in zip(s.dims, given[s.name], strict=False) if isinstance(d, str)})
    for s in specs:
        if s.name in given or s.dims is None:
            continue
        unknown = [
            i
            for i, d in enumerate(s.dims)
            if i > 0 and not isinstance(d, int) and not (isinstance(d, str) and d in symbols)
        ]
        if not unknown:
            continue
        example = ",".join(
            str(d) if isinstance(d, int) else str(symbols[d]) if d in symbols else _example_dim(i, s.dims)
            for i, d in enumerate(s.dims)
        )
        which = ", ".join(f"{a} ({s.dims[a] or '?'})" for a in unknown)
        raise InputShapeError(
            f"{path}: input '{s.name}' {_fmt_dims(s.dims)} has unknown dimension(s) {which}: set them, "
            f"for example --input-shape {s.name}:{example} (the sizes the model is used with), "
            "or skip verification with --no-verify"
        )


def verify_job(
    reference: str,
    candidate: str,
    options: VerifyOptions,
    debug: bool = False,
    side_files: Sequence[str] = (),
    progress: Progress | None = None,
) -> ModelOutcome:
    """Compare two models' outputs on the same inputs; never raises."""
    outcome = ModelOutcome(input=reference, output=candidate)
    clock = _Clock(outcome)
    try:
        _phase(progress, "load", reference)
        ref, cand = load_model(reference), load_model(candidate)
        for p, m in ((reference, ref), (candidate, cand)):
            files = external_data_files(m, os.path.dirname(os.path.abspath(p)))
            outcome.data_files += sorted(files)
            refuse_side_files(p, files, side_files)
        outcome.size_before, outcome.size_after = disk_size(reference, ref), disk_size(candidate, cand)
        options = resolve_input_shapes(reference, ref, FoldOptions(verify_options=options))
        clock.lap("load")
        from bnfold.verify.verifier import verify_models

        _phase(progress, "verify", reference)
        try:
            rep = verify_models(reference, candidate, options)
        except InputShapeError as e:
            raise type(e)(f"{reference}: {e}") from e
        clock.lap("verify")
        outcome.verification = Verification.of_models(rep)
        if not rep.passed:
            what = rep.error or f"{len(rep.failing)} of {len(rep.rows)} output(s) differ beyond tolerance"
            raise VerificationError(f"{candidate} differs from {reference}: {what}")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes data
        _guard(outcome, debug, e)
    clock.done()
    return outcome


def check_job(path: str, opts: FoldOptions, progress: Progress | None = None) -> ModelOutcome:
    """Read-only lint of one model: exit 1 when something could still be folded.

    The exit code here counts every possible fold; ``bnfold check --select/--ignore``
    narrows it afterwards (:func:`bnfold.cli.gate.apply`).
    """
    outcome = ModelOutcome(input=path)
    clock = _Clock(outcome)
    try:
        _phase(progress, "load", path)
        model, index = load_indexed(path, in_place=True)
        in_files = set(index.data_files)
        outcome.data_files = sorted(in_files)
        refuse_side_files(path, in_files, opts.side_files)
        outcome.size_before = disk_size(path, model, in_files)
        clock.lap("load")
        _phase(progress, "fold", path)
        result = fold_model(
            model,
            freeze_initializer_inputs=opts.freeze_initializer_inputs,
            base_dir=os.path.dirname(os.path.abspath(path)),
            copy=False,
        )
        outcome.report = result.report
        reject_invalid_bn(path, result.report)
        clock.lap("fold")
        if result.report.folds:
            outcome.exit_code = ExitCode.FOLDABLE_LEFT
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes data
        _guard(outcome, opts.debug, e)
    clock.done()
    return outcome
