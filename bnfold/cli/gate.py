"""``check --select/--ignore``: which findings fail the check, by pattern name or reason code (as ruff's rules).

A finding is a possible fold (its code is the pattern name, ``Conv+BatchNormalization``)
or a node left (its code is the reason, ``shape_mismatch``).  By default every possible
fold fails the check and nodes left do not; ``--select`` replaces that set and
``--ignore`` takes codes out of it.  Codes may be globs (``*+BatchNormalization``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import click

from bnfold.errors import ExitCode
from bnfold.jobs import ModelOutcome


def split_codes(values: Iterable[str]) -> list[str]:
    """Codes from repeated and comma-separated option values."""
    return [c.strip() for v in values for c in str(v).split(",") if c.strip()]


def reason_codes() -> list[str]:
    """Every reason code a node can be left with."""
    from bnfold.fold.report import Reason

    return sorted({r.value for r in Reason})


def _is_known(code: str) -> bool:
    # Pattern names are "Producer+Consumer"; reason codes are the Reason values.
    return code == "ALL" or code in reason_codes() or "+" in code or any(ch in code for ch in "*?[")


@dataclass(frozen=True)
class Gate:
    """The codes that fail a check."""

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, select: Sequence[str], ignore: Sequence[str]) -> Gate:
        sel, ign = split_codes(select), split_codes(ignore)
        for code in [*sel, *ign]:
            if not _is_known(code):
                raise click.UsageError(
                    f"unknown code '{code}': use a pattern name such as Conv+BatchNormalization, "
                    f"or a reason code ({', '.join(reason_codes())})"
                )
        return cls(tuple(sel), tuple(ign))

    def _match(self, code: str, codes: Sequence[str]) -> bool:
        return any(c == "ALL" or fnmatch.fnmatchcase(code, c) for c in codes)

    def fold_fails(self, pattern: str) -> bool:
        selected = not self.select or self._match(pattern, self.select)
        return selected and not self._match(pattern, self.ignore)

    def skip_fails(self, reason: str) -> bool:
        return bool(self.select) and self._match(reason, self.select) and not self._match(reason, self.ignore)

    def apply(self, outcome: ModelOutcome) -> ModelOutcome:
        """Set a checked model's exit code from its findings (errors are left as they are)."""
        r = outcome.report
        if r is None or outcome.exit_code not in (ExitCode.OK, ExitCode.FOLDABLE_LEFT):
            return outcome
        fails = any(self.fold_fails(f.pattern) for f in r.folds) or any(
            self.skip_fails(s.reason.value) for s in [*r.skips, *r.affine_skips]
        )
        outcome.exit_code = ExitCode.FOLDABLE_LEFT if fails else ExitCode.OK
        return outcome
