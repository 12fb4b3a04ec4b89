"""Verifying a fold run: compare it with the original, blame the folds on failure, keep the safe ones.

:func:`verify_fold` is what ``bnfold fold`` runs before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnfold.fold.engine import FoldResult
from bnfold.verify.blame import BlameResult, find_culprits
from bnfold.verify.report import VerifyReport
from bnfold.verify.runners import ModelSource
from bnfold.verify.verifier import Verifier, VerifyOptions


@dataclass
class FoldVerification:
    """Verification of one fold run, with blame when it failed.

    ``result`` is what may be written: the full fold when it passed, the fold
    without the culprits when ``keep_safe`` was asked and that passed; ``ok`` says
    whether anything may be written at all.
    """

    report: VerifyReport
    result: FoldResult
    blame: BlameResult | None = None
    kept_safe: bool = False

    @property
    def ok(self) -> bool:
        return self.report.passed or self.kept_safe

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``verification`` of the JSON report)."""
        d = self.report.to_dict()
        d["blame"] = None if self.blame is None else self.blame.to_dict()
        d["kept_safe"] = self.kept_safe
        return d


def verify_fold(
    original: ModelSource,
    result: FoldResult,
    options: VerifyOptions | None = None,
    *,
    keep_safe: bool = False,
    base_dir: str | None = None,
    freeze_initializer_inputs: bool = False,
    progress: Callable[[int], None] | None = None,
) -> FoldVerification:
    """Verify a fold run against the original; on failure, blame and optionally keep the safe folds.

    Args:
        original: the unfolded model; pass the path for large models (it is run by path
            and re-read for blame, never serialized).
        result: the fold run to verify.
        options: tolerances, inputs, ``save_io``.
        keep_safe: when verification fails, fold again without the blamed folds and, if
            that passes, return it as ``result``.
        base_dir: folder of external data of an in-memory ``original``.
        freeze_initializer_inputs: as given to the fold run (blame re-folds the same way).
        progress: called with the number of each blame verification run as it starts.

    Raises:
        NotVerifiableError: the original cannot be run (exit code 6).
        InputShapeError: an input dimension must be given with ``--input-shape``.
    """
    options = options or VerifyOptions()
    verifier = Verifier(original, options, base_dir=base_dir)
    report = verifier.check(result.model, save_io=options.save_io)
    if report.passed or not result.report.folds:
        return FoldVerification(report, result)
    blame = find_culprits(
        original,
        result.report.folds,
        verifier,
        base_dir=base_dir,
        freeze_initializer_inputs=freeze_initializer_inputs,
        failing_report=report,
        progress=progress,
    )
    if keep_safe and blame.safe is not None and blame.safe_passed:
        return FoldVerification(report, blame.safe, blame, kept_safe=True)
    return FoldVerification(report, result, blame)
