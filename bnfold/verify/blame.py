"""Per-fold blame: which folds break verification, and the model without them.

When a folded model fails verification, the folds are re-applied in subsets
(``fold_model(..., only=...)``) and each subset is compared with the original:
bisection over the fold list narrows a failing set down to single folds, each of
which is then known to fail on its own.  Folds that fail only together (no single
one fails; errors that add up) are reported as a group.  The model with every fold
except the culprits (``--keep-safe``) is folded and verified too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bnfold.api import fold_model
from bnfold.fold.engine import FoldResult
from bnfold.fold.report import Fold
from bnfold.onnxio.load import load_model
from bnfold.verify.report import VerifyReport
from bnfold.verify.runners import ModelSource
from bnfold.verify.verifier import Verifier

# Verification runs one blame may spend (a fold list of n with c culprits needs about 2*c*log2(n)).
MAX_CHECKS = 200

Key = tuple[str, str]  # (graph path, affine node display name)


def fold_key(f: Fold) -> Key:
    """Identity of a fold across re-folds of the same original."""
    return (f.graph, f.node)


@dataclass
class BlameResult:
    """The folds that break verification, and the model folded without them.

    ``culprits`` each fail verification on their own; ``groups`` are sets of folds
    that fail only together.  ``safe``/``safe_report`` are the model with every other
    fold and its verification (None when nothing was left to fold or the check
    budget ran out).
    """

    culprits: list[Fold] = field(default_factory=list)
    groups: list[list[Fold]] = field(default_factory=list)
    culprit_reports: dict[Key, VerifyReport] = field(default_factory=dict)
    checks: int = 0
    exhausted: bool = False
    safe: FoldResult | None = None
    safe_report: VerifyReport | None = None

    @property
    def excluded(self) -> list[Fold]:
        """Every fold left out of the safe model."""
        return self.culprits + [f for g in self.groups for f in g]

    @property
    def safe_passed(self) -> bool:
        """True when the model without the blamed folds passed verification."""
        return self.safe_report is not None and self.safe_report.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""

        def fold_dict(f: Fold) -> dict[str, Any]:
            d = asdict(f)
            rep = self.culprit_reports.get(fold_key(f))
            if rep is not None:
                d["failing_outputs"] = [r.to_dict() for r in rep.failing]
            return d

        return {
            "culprits": [fold_dict(f) for f in self.culprits],
            "groups": [[asdict(f) for f in g] for g in self.groups],
            "checks": self.checks,
            "exhausted": self.exhausted,
            "safe_passed": self.safe_passed if self.safe_report is not None else None,
            "safe_verification": None if self.safe_report is None else self.safe_report.to_dict(),
        }


def fold_subset(
    original: ModelSource,
    keys: set[Key] | frozenset[Key],
    *,
    base_dir: str | None = None,
    freeze_initializer_inputs: bool = False,
) -> FoldResult:
    """Fold only the affine nodes in ``keys`` (a path is loaded afresh; a ModelProto is copied)."""
    allowed = frozenset(keys)
    if isinstance(original, str):
        model = load_model(original, check=False)
        base_dir = os.path.dirname(os.path.abspath(original))
        copy = False
    else:
        model, copy = original, True
    return fold_model(
        model,
        freeze_initializer_inputs=freeze_initializer_inputs,
        base_dir=base_dir,
        copy=copy,
        only=lambda name, path: (path, name) in allowed,
    )


def find_culprits(
    original: ModelSource,
    folds: Sequence[Fold],
    verifier: Verifier,
    *,
    base_dir: str | None = None,
    freeze_initializer_inputs: bool = False,
    max_checks: int = MAX_CHECKS,
    failing_report: VerifyReport | None = None,
    progress: Callable[[int], None] | None = None,
) -> BlameResult:
    """Find which of ``folds`` break verification, then fold and verify the model without them.

    Args:
        original: the unfolded model (path or ModelProto), as ``verifier``'s reference.
        folds: the folds of the failing fold run (``FoldReport.folds``).
        verifier: holds the reference outputs and the tolerances.
        base_dir: folder of external data of an in-memory ``original``.
        freeze_initializer_inputs: as given to the failing fold run.
        max_checks: stop after this many verification runs.
        failing_report: the report of the full fold, when already known (saves a run).
        progress: called with the number of each verification run as it starts.

    Returns:
        A :class:`BlameResult`; ``safe`` holds the model folded without the culprits.
    """
    src_dir = os.path.dirname(os.path.abspath(original)) if isinstance(original, str) else base_dir
    by_key: dict[Key, Fold] = {}
    for f in folds:
        by_key.setdefault(fold_key(f), f)
    result = BlameResult()
    cache: dict[frozenset[Key], VerifyReport] = {}
    if failing_report is not None:
        cache[frozenset(by_key)] = failing_report

    def check(keys: Sequence[Key]) -> VerifyReport:
        k = frozenset(keys)
        if k not in cache:
            if result.checks >= max_checks:
                result.exhausted = True
                raise _Budget
            result.checks += 1
            if progress is not None:
                progress(result.checks)
            folded = fold_subset(original, k, base_dir=base_dir, freeze_initializer_inputs=freeze_initializer_inputs)
            # Tensors the subset left unfolded still point at the original's data files.
            cache[k] = verifier.check(folded.model, base_dir=src_dir)
        return cache[k]

    def search(keys: list[Key], report: VerifyReport) -> None:
        """``keys`` fail together (``report``): split until single folds are found."""
        if len(keys) == 1:
            result.culprits.append(by_key[keys[0]])
            result.culprit_reports[keys[0]] = report
            return
        half = len(keys) // 2
        left, right = keys[:half], keys[half:]
        rl, rr = check(left), check(right)
        if not rl.passed:
            search(left, rl)
        if not rr.passed:
            search(right, rr)
        if rl.passed and rr.passed:
            result.groups.append([by_key[k] for k in keys])

    remaining = list(by_key)
    try:
        report = check(remaining)
        for _ in range(3):  # a failure may need another round once the first culprits are out
            if report.passed or not remaining:
                break
            search(remaining, report)
            blamed = {fold_key(f) for f in result.excluded}
            remaining = [k for k in by_key if k not in blamed]
            report = check(remaining) if remaining else report
    except _Budget:
        pass
    if not result.exhausted and result.excluded and remaining:
        result.safe = fold_subset(
            original, set(remaining), base_dir=base_dir, freeze_initializer_inputs=freeze_initializer_inputs
        )
        result.safe_report = cache[frozenset(remaining)]
    return result


class _Budget(Exception):
    """The verification budget of one blame is spent."""


def __getattr__(name: str) -> Any:
    # verify_fold and FoldVerification lived here before they moved to bnfold.verify.foldcheck.
    if name in ("verify_fold", "FoldVerification"):
        from bnfold.verify import foldcheck

        return getattr(foldcheck, name)
    raise AttributeError(f"module 'bnfold.verify.blame' has no attribute {name!r}")
