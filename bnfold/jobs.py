"""One model, one job: load, fold or check, verify, write; every outcome is data.

Jobs never raise: a :class:`ModelOutcome` carries the status, the exit code, the
error line and the reports, so a batch goes on past a broken model and the CLI,
the JSON report and the tests all read the same record.  Job functions are
top-level and their arguments picklable, for ``--jobs N`` process pools.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnfold.api import fold_model
from bnfold.errors import BnfoldError, ExitCode, ModelLoadError, NotVerifiableError, OutputError, VerificationError
from bnfold.fold.engine import FoldResult
from bnfold.onnxio.fsutil import Temps, resolve_target
from bnfold.onnxio.layout import DEFAULT_SIZE_THRESHOLD, plan_layout
from bnfold.onnxio.load import check_model, load_indexed, load_model
from bnfold.onnxio.sink import staging
from bnfold.onnxio.tensors import external_data_files
from bnfold.onnxio.writer import WriteResult, write_model

if TYPE_CHECKING:  # the verification stack is imported when a job verifies (--no-verify skips it)
    from bnfold.verify.verifier import VerifyOptions

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


@dataclass
class ModelOutcome:
    """What happened to one model."""

    input: str
    output: str | None = None
    exit_code: ExitCode = ExitCode.OK
    error: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    report: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    traceback: str | None = None
    verification_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return STATUS[self.exit_code]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see docs/json-report.md)."""
        d: dict[str, Any] = {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "exit_code": int(self.exit_code),
            "error": self.error,
            "size_before": self.size_before,
            "size_after": self.size_after,
        }
        d.update(self.report or {"bn_found": None, "bn_folded": None, "bn_left": None, "folds": [], "skips": []})
        d["verification"] = self.verification
        d["notes"] = list(self.notes)
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return d


def disk_size(path: str, model: Any, data_files: set[str] | None = None) -> int:
    """Bytes of a model file plus the external data files it names (pass them when known)."""
    if data_files is None:
        data_files = external_data_files(model, os.path.dirname(os.path.abspath(path)))
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in data_files)


def reject_invalid_bn(path: str, report: dict[str, Any]) -> None:
    """A BN with invalid parameters makes the model invalid: say which one and why."""
    for s in report["skips"]:
        if s["reason"] == "invalid_parameters":
            raise ModelLoadError(f"{path}: invalid BatchNormalization '{s['node']}': {s['message']}")


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
    if isinstance(e, BnfoldError):
        outcome.exit_code, outcome.error = e.exit_code, str(e)
    elif isinstance(e, KeyboardInterrupt):
        outcome.exit_code, outcome.error = ExitCode.INTERRUPTED, "interrupted"
    else:
        outcome.exit_code = ExitCode.INTERNAL
        outcome.error = f"internal error: {type(e).__name__}: {e}; {BUG_HINT}"
    if debug:
        outcome.traceback = traceback.format_exc()


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file (or the same not-yet-existing path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def fold_job(path: str, output: str, opts: FoldOptions) -> ModelOutcome:
    """Fold one model into ``output``, verify it, write it atomically; never raises."""
    outcome = ModelOutcome(input=path, output=output)
    clock = _Clock(outcome)
    try:
        if same_file(path, output) and not opts.in_place:
            raise OutputError(f"{output}: output is the input file; use --in-place to replace it")
        base_dir = os.path.dirname(os.path.abspath(path))
        model, index = load_indexed(path)
        in_files = set(index.data_files)
        if os.path.realpath(output) in in_files:
            raise OutputError(f"{output}: is a data file of the input model; choose another output name")
        if os.path.lexists(output) and not opts.force and not opts.in_place:
            raise OutputError(f"{output}: already exists; use --force to overwrite it")
        resolve_target(output)  # a folder, device or FIFO is refused before any work
        outcome.size_before = disk_size(path, model, in_files)
        external, auto = plan_layout(index, opts.external_data)
        if auto:
            outcome.notes.append("the model is over 2 GB (protobuf's limit): writing it with external data")
        clock.lap("load")
        written = _fold_and_write(path, output, model, base_dir, in_files, external, opts, outcome, clock)
        outcome.size_after = written.size
        if written.data_path:
            outcome.notes.append(f"external data: {os.path.basename(written.data_path)}")
        if written.other_links:
            outcome.notes.append(
                f"{output} had {written.other_links} other hard link(s): they keep the old file (as with sed -i)"
            )
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
    base_dir: str,
    in_files: set[str],
    external: bool,
    opts: FoldOptions,
    outcome: ModelOutcome,
    clock: _Clock,
) -> WriteResult:
    """Fold into a sink next to the output, then write through the one verified write path.

    Every output, the ``--keep-safe`` one included, is checked, written under a
    temporary name, verified as written (by path) and only then renamed into place.
    """
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
            outcome.report = result.report.to_dict()
            reject_invalid_bn(path, outcome.report)
            clock.lap("fold")
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
            hook = _verify_hook(path, result, opts, outcome) if opts.verify else None
            try:
                return write(result.model, sink=sink, before_commit=hook)
            except _WriteSafeInstead as safe:
                # Verification failed, but the model without the blamed folds passed: it is
                # checked and verified again as written, like every output.
                check_output(safe.result.model, path, output)
                return write(safe.result.model, before_commit=_reverify_hook(path, safe.result, opts, outcome))
    finally:
        temps.sweep()


def _reverify_hook(path: str, result: FoldResult, opts: FoldOptions, outcome: ModelOutcome):
    """A ``before_commit`` hook for the ``--keep-safe`` model: it must pass as written."""

    def hook(candidate: str) -> None:
        started = time.perf_counter()
        try:
            from bnfold.verify.blame import verify_fold
            from bnfold.verify.verifier import VerifyOptions

            options = dataclasses.replace(opts.verify_options or VerifyOptions(), save_io=None)
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


def _verify_hook(path: str, result: FoldResult, opts: FoldOptions, outcome: ModelOutcome):
    """A ``before_commit`` hook: verify the written temp model (by path) against ``path``."""

    def hook(candidate: str) -> None:
        started = time.perf_counter()
        try:
            from bnfold.verify.blame import verify_fold

            checked = verify_fold(
                path,
                FoldResult(candidate, result.report),  # type: ignore[arg-type]  # a path is a model source
                opts.verify_options,
                keep_safe=opts.keep_safe,
                base_dir=os.path.dirname(os.path.abspath(path)),
                freeze_initializer_inputs=opts.freeze_initializer_inputs,
            )
        except NotVerifiableError as e:
            raise type(e)(f"{path}: {e}; skip verification with --no-verify") from e
        finally:
            outcome.timings["verify"] = time.perf_counter() - started
        outcome.verification = checked.to_dict()
        outcome.verification_lines = checked.summary_lines()
        if checked.kept_safe:
            outcome.report = checked.result.report.to_dict()
            raise _WriteSafeInstead(checked.result)
        if not checked.ok:
            rep = checked.report
            what = rep.error or f"{len(rep.failing)} of {len(rep.rows)} output(s) differ beyond tolerance"
            hint = "" if opts.keep_safe else " (--keep-safe writes the model without the blamed folds)"
            raise VerificationError(f"{path}: verification failed: {what}; nothing written{hint}")

    return hook


def verify_job(reference: str, candidate: str, options: VerifyOptions, debug: bool = False) -> ModelOutcome:
    """Compare two models' outputs on the same inputs; never raises."""
    outcome = ModelOutcome(input=reference, output=candidate)
    clock = _Clock(outcome)
    try:
        ref, cand = load_model(reference), load_model(candidate)
        outcome.size_before, outcome.size_after = disk_size(reference, ref), disk_size(candidate, cand)
        clock.lap("load")
        from bnfold.verify.verifier import verify_models

        rep = verify_models(reference, candidate, options)
        clock.lap("verify")
        outcome.verification = rep.to_dict()
        outcome.verification_lines = rep.summary_lines()
        if not rep.passed:
            what = rep.error or f"{len(rep.failing)} of {len(rep.rows)} output(s) differ beyond tolerance"
            raise VerificationError(f"{candidate} differs from {reference}: {what}")
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes data
        _guard(outcome, debug, e)
    clock.done()
    return outcome


def check_job(path: str, opts: FoldOptions) -> ModelOutcome:
    """Read-only lint of one model: exit 1 when something could still be folded."""
    outcome = ModelOutcome(input=path)
    clock = _Clock(outcome)
    try:
        model = load_model(path)
        outcome.size_before = disk_size(path, model)
        clock.lap("load")
        result = fold_model(
            model,
            freeze_initializer_inputs=opts.freeze_initializer_inputs,
            base_dir=os.path.dirname(os.path.abspath(path)),
            copy=False,
        )
        outcome.report = result.report.to_dict()
        reject_invalid_bn(path, outcome.report)
        clock.lap("fold")
        if result.report.folds:
            outcome.exit_code = ExitCode.FOLDABLE_LEFT
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure becomes data
        _guard(outcome, opts.debug, e)
    clock.done()
    return outcome
