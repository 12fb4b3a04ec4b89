"""Exit codes and the errors that map to them (one table for every command)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every bnfold command."""

    OK = 0
    FOLDABLE_LEFT = 1  # `bnfold check` found BN that could still be folded
    USAGE = 2  # bad command line (click's own code)
    VERIFY_FAILED = 3  # outputs differ beyond tolerance; nothing written
    INVALID_MODEL = 4  # a model could not be read, or is not a valid ONNX model
    WRITE_FAILED = 5  # the output could not be written
    NOT_VERIFIED = 6  # onnxruntime could not run the model and verification was required
    INTERRUPTED = 130  # SIGINT/SIGTERM; temporary files removed
    INTERNAL = 70  # a bug in bnfold


EXIT_CODE_TABLE = """\
Exit codes:
  0    success
  1    check: something foldable left in a model (see --select/--ignore)
  2    usage error (bad option or argument, an --input-shape that does not fit)
  3    verification failed: outputs differ, nothing written
  4    a model could not be read or is invalid
  5    the output or a side file could not be written
  6    the model could not be verified; give --input-shape, or use --no-verify
  70   internal error (a bug in bnfold: please report it with --debug output),
       or a batch worker process was killed
  130  interrupted (SIGINT/SIGTERM); nothing half-written is left
"""


class BnfoldError(Exception):
    """An expected failure: one clear line for the user and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ModelLoadError(BnfoldError):
    """The input is missing, unreadable, not ONNX, or invalid."""

    exit_code = ExitCode.INVALID_MODEL


class OutputError(BnfoldError):
    """The output cannot be written."""

    exit_code = ExitCode.WRITE_FAILED


class VerificationError(BnfoldError):
    """Outputs differ beyond tolerance."""

    exit_code = ExitCode.VERIFY_FAILED


class NotVerifiableError(BnfoldError):
    """onnxruntime cannot run the model, so it cannot be verified."""

    exit_code = ExitCode.NOT_VERIFIED


class InputShapeError(NotVerifiableError):
    """A graph input has a dimension bnfold cannot choose; ``--input-shape`` must set it."""


class InputFileError(BnfoldError):
    """An ``--inputs`` file does not fit the model (names, dtypes, shapes) or cannot be read."""

    exit_code = ExitCode.USAGE


class UsageError(BnfoldError):
    """A bad option value found only once a model is read (an ``--input-shape`` typo): exit 2."""

    exit_code = ExitCode.USAGE
