"""Every line of human text bnfold prints: per-model reports, tables, verdicts, progress, annotations.

The renderer reads typed outcomes (:class:`bnfold.jobs.ModelOutcome`) and the fold
report's records; nothing else in the package builds text for people.  Every name
that comes from a file (paths, node names, messages quoting them) goes through
:func:`clean` so a crafted name cannot forge an output line.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from bnfold.errors import ExitCode

if TYPE_CHECKING:
    from bnfold.fold.report import Fold, FoldReport, Skip
    from bnfold.jobs import ModelOutcome, Verification

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: Verification shows one line per output up to this many outputs (more: failing ones and a summary).
ROWS_SHOWN = 4
#: How many names a grouped line shows before "and N more" (``--verbose`` shows them all).
SHOWN = 3

STATUS_WORDS = {
    ExitCode.OK: "ok",
    ExitCode.FOLDABLE_LEFT: "foldable nodes left",
    ExitCode.VERIFY_FAILED: "verification failed",
    ExitCode.INVALID_MODEL: "invalid model",
    ExitCode.WRITE_FAILED: "cannot write",
    ExitCode.NOT_VERIFIED: "cannot verify",
    ExitCode.INTERRUPTED: "interrupted",
    ExitCode.INTERNAL: "internal error",
    ExitCode.USAGE: "usage error",
}

REASON_WORDS = {
    "training_mode": "runs in training mode",
    "spatial_0": "spatial=0: statistics are per activation, not per channel",
    "non_constant_parameters": "a parameter is not a constant",
    "invalid_parameters": "the parameters are invalid",
    "non_constant_weight": "the weight or bias it would fold into is not a constant",
    "producer_output_shared": "the producer's output has another consumer",
    "producer_output_is_graph_output": "the producer's output is a graph output",
    "shape_mismatch": "shapes do not line up",
    "unknown_rank": "the rank of the tensor is unknown",
    "non_finite": "the folded values would not be finite",
    "dtype_overflow": "the folded values would overflow the weight dtype",
    "unsupported_producer": "nothing next to it can absorb it",
    "padded_consumer": "the following Conv pads its input",
    "not_per_channel": "the constant is not per-channel",
    "output_shared": "its output has another consumer or is a graph output",
    "excluded": "left out on request",
    "constant_too_large": "a constant it needs is too large to evaluate (over 2**24 elements)",
    "unknown_shape": "a shape on the way is unknown",
    "intermediate_shared": "a tensor between it and the op to fold into has another reader",
    "channel_axis_moved": "a layout op moves the channels to another axis than the constant's",
    "channel_axis_lost": "a layout op drops or merges the channel axis",
    "channel_is_batch_axis": "its channel is a batch axis of the op that reads it",
    "shift_before_conv_transpose": "a shift before a ConvTranspose is not exact at the borders",
}

PHASE_WORDS = {
    "load": "reading",
    "fold": "folding",
    "check": "checking the result",
    "verify": "verifying (running both models)",
    "write": "writing",
}


def clean(text: object) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``): one printed line stays one line."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), str(text))


def size(n: int | float | None) -> str:
    """Bytes for people: ``512 B``, ``19.2 KB``, ``89.6 MB``."""
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return str(n)


def distinct(a: float, b: float, digits: int = 3) -> tuple[str, str]:
    """Two numbers with the fewest significant digits (at least ``digits``) that tell them apart."""
    for d in range(digits, 18):
        sa, sb = f"{a:.{d}g}", f"{b:.{d}g}"
        if sa != sb or a == b or (math.isnan(a) and math.isnan(b)):
            return sa, sb
    return repr(a), repr(b)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------
# Styling
# ---------------------------------------------------------------------------


@dataclass
class Style:
    """Whether to colour: ``--color auto|always|never``; ``auto`` honours NO_COLOR and the terminal."""

    color: bool = False

    @classmethod
    def choose(cls, mode: str, stream: Any) -> Style:
        if mode == "always":
            return cls(True)
        if mode == "never" or os.environ.get("NO_COLOR"):
            return cls(False)
        return cls(bool(getattr(stream, "isatty", lambda: False)()))

    def __call__(self, text: str, **kw: Any) -> str:
        return click.style(text, **kw) if self.color else text


# ---------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------


def _names(items: Sequence[str], verbose: bool) -> str:
    names = [clean(n) for n in items]
    if verbose or len(names) <= SHOWN:
        return ", ".join(names)
    return ", ".join(names[:SHOWN]) + f" and {len(names) - SHOWN} more"


def _where(graph: str) -> str:
    return "" if graph == "main" else f" (in {clean(graph)})"


def fold_counts(report: FoldReport, verb: str) -> str:
    """What the model holds: BatchNormalization counts (when it has any) and the other affine ops ``verb``."""
    other = Counter(f.op_type for f in report.folds if f.op_type != "BatchNormalization")
    parts = []
    if report.bn_count or not other:
        if verb == "folded":
            parts.append(
                f"BatchNormalization {report.bn_count} found, {report.bn_folded} folded, {len(report.skips)} left"
            )
        else:
            parts.append(f"{report.bn_folded} of {report.bn_count} BatchNormalization {verb}")
    if other:
        parts.append(f"{sum(other.values())} {verb} {'/'.join(sorted(other))}")
    return "; ".join(parts)


def fold_groups(folds: Sequence[Fold], verb: str, verbose: bool) -> list[str]:
    """Folds grouped by pattern: one line per pattern with a count (``--verbose``: one line per fold)."""
    by: dict[str, list[Fold]] = {}
    for f in folds:
        by.setdefault(f.pattern, []).append(f)
    lines = []
    for pattern, group in by.items():
        lines.append(f"  {verb} {len(group)} x {clean(pattern)}: {_names([f.node for f in group], verbose)}")
        if verbose:
            lines += [f"    {clean(f.node)} into {clean(f.target)}{_where(f.graph)}" for f in group]
    return lines


def skip_groups(skips: Iterable[Skip], verbose: bool) -> list[str]:
    """Nodes left, grouped by op type and reason with counts; ``--verbose`` adds every node's own sentence."""
    by: dict[tuple[str, str], list[Skip]] = {}
    for s in skips:
        by.setdefault((s.op_type, s.reason.value), []).append(s)
    lines = []
    for (op, reason), group in by.items():
        if len(group) == 1:
            s = group[0]
            kind = "" if op == "BatchNormalization" else f"{op} "
            lines.append(f"  left {kind}{clean(s.node)}{_where(s.graph)}: {reason}: {clean(s.message)}")
            continue
        words = REASON_WORDS.get(reason, reason)
        lines.append(f"  left {len(group)} {op}: {words} [{reason}]: {_names([s.node for s in group], verbose)}")
        if verbose:
            lines += [f"    {clean(s.node)}{_where(s.graph)}: {clean(s.message)}" for s in group]
        elif len({s.message for s in group}) == 1:
            lines.append(f"    {clean(group[0].message)}")
    return lines


def notes(o: ModelOutcome) -> list[str]:
    """Sentences about the output worth knowing (also the JSON report's ``notes``)."""
    out = []
    if o.auto_external:
        out.append("the model is over 2 GB (protobuf's limit): writing it with external data")
    if o.data_file:
        out.append(f"external data: {o.data_file}")
    if o.unchanged:
        out.append("nothing to fold: the file was left unchanged")
    if o.other_links:
        out.append(f"{clean(o.output)} had {o.other_links} other hard link(s): they keep the old file (as with sed -i)")
    if o.grew:
        out.append(
            f"the output is {o.size_growth:.1f}x the input ({size(o.size_before)} -> {size(o.size_after)}): "
            "folding stored weights that the input computes at run time (ConstantOfShape, Expand, ...)"
        )
    return out


def verification_lines(v: Verification, reference: str, candidate: str, verbose: bool = False) -> list[str]:
    """The comparison (naming both models), blame, and what --keep-safe did."""
    names = f"{clean(reference)} vs {clean(candidate)}"
    lines = [_verify_head(v.report, names)]
    lines += _rows(v.report, verbose or not v.report.passed or len(v.report.rows) <= ROWS_SHOWN)
    if v.blame is not None:
        lines += blame_lines(v.blame)
        if v.kept_safe and v.blame.safe_report is not None:
            excluded = ", ".join(clean(f.node) for f in v.blame.excluded)
            lines.append(_verify_head(v.blame.safe_report, f"{names}, without {excluded}"))
            lines += _rows(v.blame.safe_report, verbose or len(v.blame.safe_report.rows) <= ROWS_SHOWN)
            lines.append(f"keep-safe: left {excluded} unfolded; writing the model with the other folds")
    return lines


def blame_lines(blame: Any) -> list[str]:
    """Each culprit fold with the output it breaks worst; folds that fail only together."""
    n = len(blame.culprits)
    lines = [f"blame: {n} fold(s) break verification on their own ({blame.checks} verification runs)"]
    for f in blame.culprits:
        where = "" if f.graph == "main" else f" in {clean(f.graph)}"
        what = f"{clean(f.node)} ({f.op_type}{where}) folded into {clean(f.target)} as {f.pattern}"
        lines.append(f"  {what}{_worst(blame.culprit_reports.get((f.graph, f.node)))}")
    for group in blame.groups:
        lines.append(f"  {len(group)} folds fail only together: " + ", ".join(clean(f.node) for f in group))
    if blame.exhausted:
        lines.append(f"  (stopped after {blame.checks} runs: the list may be incomplete)")
    if blame.safe_report is not None:
        verdict = "passes" if blame.safe_report.passed else "still FAILS"
        lines.append(f"  the model without these folds {verdict} verification")
    return lines


def _worst(rep: Any) -> str:
    if rep is None:
        return ""
    if rep.error:
        return f": {clean(rep.error)}"
    bad = rep.failing
    if not bad:
        return ""
    r = max(bad, key=lambda r: r.max_abs / r.atol if r.atol > 0 else r.max_abs)
    return f": output '{clean(r.name)}' max abs error {r.max_abs:.3g} ({_rule(r)})"


def report_lines(rep: Any) -> list[str]:
    """Every line of one comparison (a :class:`~bnfold.verify.report.VerifyReport`), every output shown."""
    return [_verify_head(rep, ""), *_rows(rep, True)]


def _verify_head(rep: Any, names: str) -> str:
    engine = "onnxruntime, ORT_DISABLE_ALL" if rep.engine == "onnxruntime" else "bnfold numpy reference"
    verdict = "passed" if rep.passed else "FAILED"
    return f"verify: {verdict} ({len(rep.sources)} trial(s), {engine})" + (f": {names}" if names else "")


def _rows(rep: Any, detailed: bool) -> list[str]:
    lines = [f"  note: {clean(n)}" for n in rep.notes]
    if rep.error:
        return [*lines, f"  error: {clean(rep.error)}"]
    if rep.calibration:
        c = rep.calibration
        lines.append(
            f"  noise floor: {c['runs']} run(s) of the original with its float weights perturbed within "
            f"their rounding (seed {c['seed']})"
        )
    for r in rep.rows:
        if detailed or not r.passed:
            lines.append("  " + _row(r))
    if not detailed and rep.rows:
        worst = max(rep.rows, key=lambda r: r.max_abs if math.isfinite(r.max_abs) else math.inf)
        lines.append(f"  {plural(len(rep.rows), 'output')} within tolerance; largest abs error {worst.max_abs:.3g}")
    for r in rep.rows:
        if r.weak:
            lines.append(
                f"  warning: output {clean(r.name)} peaks at {r.max_ref:.3g} on these inputs, close to atol "
                f"{r.atol:.3g}: a wrong fold can hide under atol; verify with real data (--inputs FILE.npz) "
                "or a lower --atol"
            )
    return lines


def _rule(r: Any) -> str:
    """How an output was decided, in words (``calibrated: bound 2.4e-6 = 3 x noise floor 8e-7``)."""
    if r.decision == "fast":
        return f"fast path: bound {r.atol:.3g} = {r.factor:.3g} x max|a| {r.max_ref:.3g}"
    if r.decision == "calibrated":
        return f"calibrated: bound {r.atol:.3g} = {r.factor:.3g} x noise floor {r.noise_floor:.3g}"
    return f"atol {r.atol:.3g}, rtol {r.rtol:.3g}; passes with atol >= {r.min_atol:.3g}"


def _row(r: Any) -> str:
    flag = "ok  " if r.passed else "FAIL"
    head = f"{flag} {clean(r.name)} {r.dtype}[{','.join(map(str, r.shape))}]"
    if r.note:
        return f"{head}: {clean(r.note)}"
    if r.decision == "exact":
        return f"{head}: {r.mismatches} of {r.elements} elements differ" if r.mismatches else f"{head}: equal"
    text = f"{head}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, mean abs {r.mean_abs:.3g} ({_rule(r)})"
    if r.mismatches and r.worst:
        w = r.worst
        ref, cand = w["reference"], w["candidate"]
        if isinstance(ref, float) and isinstance(cand, float):
            ref, cand = distinct(ref, cand)
        text += (
            f"; {r.mismatches} of {r.elements} elements differ, worst at {w['index']} "
            f"(trial {w['trial']}): {ref} vs {cand}"
        )
    return text


def describe(o: ModelOutcome, command: str, verbose: bool = False) -> list[str]:
    """Human lines for one model: what was done, what was left and why, verification."""
    r = o.report
    lines: list[str] = []
    if command == "verify":
        if o.verification is not None:
            lines += verification_lines(o.verification, o.input, o.output or "", verbose)
        return lines
    if o.error:
        # The error line says what went wrong; verification (and blame) say why.
        if o.verification is not None:
            lines += verification_lines(o.verification, o.input, o.output or "", verbose)
        return lines
    if r is None:
        return lines
    if command == "check":
        lines.append(f"{clean(o.input)}: {fold_counts(r, 'foldable')}")
        lines += fold_groups(r.folds, "foldable", verbose)
    else:
        target = "left unchanged" if o.unchanged else f"-> {clean(o.output)}"
        lines.append(f"{clean(o.input)} {target}: {fold_counts(r, 'folded')}")
        lines += fold_groups(r.folds, "folded", verbose)
        lines.append(f"  nodes {r.nodes_before} -> {r.nodes_after}, size {size(o.size_before)} -> {size(o.size_after)}")
    lines += skip_groups([*r.skips, *r.affine_skips], verbose)
    lines += [f"  note: {clean(n)}" for n in notes(o)]
    if o.verification is not None:
        lines += ["  " + line for line in verification_lines(o.verification, o.input, o.output or "", verbose)]
    return lines


def error_line(o: ModelOutcome) -> str:
    return f"bnfold: error: {clean(o.error)}"


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def summary_table(outcomes: Sequence[ModelOutcome], command: str) -> list[str]:
    """One row per model, for batches."""
    rows = [("model", "status", "BN", "foldable" if command == "check" else "folds", "BN left", "size")]
    for o in outcomes:
        r = o.report
        rows.append(
            (
                clean(o.input),
                STATUS_WORDS[o.exit_code],
                str(r.bn_count) if r else "-",
                str(len(r.folds)) if r else "-",
                str(len(r.skips)) if r else "-",
                f"{size(o.size_before)} -> {size(o.size_after)}" if o.size_after else size(o.size_before),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def progress_line(done: int, total: int, o: ModelOutcome) -> str:
    return f"[{done}/{total}] {clean(o.input)}: {STATUS_WORDS[o.exit_code]}"


def phase_line(path: str, phase: str) -> str:
    if phase.startswith("blame "):  # "blame N": blame's verification run N
        return f"{clean(path)}: finding the folds that break verification (run {phase.split()[1]})..."
    return f"{clean(path)}: {PHASE_WORDS.get(phase, phase)}..."


def verdict(command: str, outcomes: Sequence[ModelOutcome], code: ExitCode) -> str:
    """The last line: what the run comes to, in words."""
    n = len(outcomes)
    failed = [o for o in outcomes if o.exit_code not in (ExitCode.OK, ExitCode.FOLDABLE_LEFT)]
    if command == "check":
        left = sum(1 for o in outcomes if o.exit_code == ExitCode.FOLDABLE_LEFT)
        text = (
            f"check: {left} of {plural(n, 'model')} can still be folded"
            if left
            else f"check: nothing left to fold in {plural(n, 'model')}"
        )
    elif command == "fold":
        ok = sum(1 for o in outcomes if o.exit_code == ExitCode.OK)
        unchanged = sum(1 for o in outcomes if o.unchanged)
        text = f"fold: {ok} of {plural(n, 'model')} done" + (f" ({unchanged} left unchanged)" if unchanged else "")
    else:
        text = "verify: the models agree" if code == ExitCode.OK else "verify: the models differ"
    if failed:
        text += f"; {len(failed)} failed"
    return f"{text} (exit {int(code)})"


def failing_names(outcomes: Sequence[ModelOutcome]) -> list[str]:
    """For ``-q``: one line per model that makes the run fail."""
    return [f"{clean(o.input)}: {STATUS_WORDS[o.exit_code]}" for o in outcomes if o.exit_code != ExitCode.OK]


# ---------------------------------------------------------------------------
# CI formats
# ---------------------------------------------------------------------------


def _gh_data(text: str) -> str:
    return str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(text: str) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(outcomes: Sequence[ModelOutcome], command: str) -> list[str]:
    """GitHub Actions workflow commands: one ``::error``/``::warning`` per finding (escaped per GitHub's rules)."""
    lines = []
    for o in outcomes:
        file = _gh_prop(o.input)
        if o.error:
            lines.append(
                f"::error file={file},title={_gh_prop('bnfold: ' + STATUS_WORDS[o.exit_code])}::{_gh_data(o.error)}"
            )
            continue
        if o.report is None or o.exit_code == ExitCode.OK:
            continue
        for f in o.report.folds:
            title = _gh_prop(f"bnfold: foldable {f.pattern}")
            msg = _gh_data(f"{f.node} can be folded into {f.target}{_where(f.graph)}; run bnfold fold")
            lines.append(f"::error file={file},title={title}::{msg}")
    return lines


def _md(text: object) -> str:
    return clean(text).replace("|", "\\|")


def markdown_summary(outcomes: Sequence[ModelOutcome], command: str, code: ExitCode) -> str:
    """A Markdown table for ``$GITHUB_STEP_SUMMARY``."""
    lines = [
        f"### bnfold {command}",
        "",
        "| model | status | BatchNormalization | foldable | left | size |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        r = o.report
        lines.append(
            f"| `{_md(o.input)}` | {STATUS_WORDS[o.exit_code]} | {r.bn_count if r else '-'} | "
            f"{len(r.folds) if r else '-'} | {len(r.skips) if r else '-'} | {size(o.size_after or o.size_before)} |"
        )
    lines += ["", _md(verdict(command, outcomes, code)), ""]
    return "\n".join(lines)
