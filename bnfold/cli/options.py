"""Command-line options of verification, shared by every command that runs models.

Decorate a click command with :func:`verify_options` (tolerances and inputs) or
:func:`fold_verify_options` (those plus ``--no-verify``/``--keep-safe``), take the
values as ``**verify_kw`` and turn them into a :class:`~bnfold.verify.verifier.VerifyOptions`
with :func:`verify_options_from`.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from bnfold.verify.verifier import VerifyOptions

# Copies of bnfold.verify.inputs' defaults, so that building the command line (and
# --help) imports no numpy or onnx; tests/test_cli_startup.py checks they agree.
DEFAULT_INT_RANGE: tuple[int, int] = (0, 9)
DEFAULT_TRIALS = 3

# Keyword names the decorators add (popped by verify_options_from).
VERIFY_PARAMS = (
    "atol",
    "rtol",
    "no_calibrate",
    "seed",
    "trials",
    "input_shape",
    "input_range",
    "val_range",
    "inputs",
    "save_io",
)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:1,3,224,224``, or a bare ``1,3,224,224`` (name ``""``: the model's only input)."""
    from bnfold.verify.inputs import parse_input_shape

    if ":" not in text:
        _, shape = parse_input_shape(f"_:{text}")
        return "", shape
    return parse_input_shape(text)


def parse_val_range(text: str) -> tuple[str, tuple[float, float]]:
    """``NAME:LO,HI``, or ``LO,HI`` for every float input (name ``""``)."""
    from bnfold.verify.inputs import parse_val_range as parse

    return parse(text)


def _by_name(parse: Callable[[str], tuple[str, Any]]) -> Callable:
    """A click callback: repeated ``NAME:VALUE`` options parsed by ``parse`` into ``{name: value}``."""

    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for v in values:
            try:
                name, value = parse(v)
            except ValueError as e:
                raise click.BadParameter(str(e)) from None
            if name in out:
                raise click.BadParameter(f"input '{name}' given twice" if name else "LO,HI for every input given twice")
            out[name] = value
        return out

    return callback


def _range(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int]:
    if value is None:
        return DEFAULT_INT_RANGE
    from bnfold.verify.inputs import parse_int_range

    try:
        return parse_int_range(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number (a NaN or infinite tolerance passes anything)")
    return value


def _regular_files(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        try:
            mode = os.stat(v).st_mode
        except OSError as e:
            raise click.BadParameter(f"{v}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise click.BadParameter(f"{v}: not a regular file (an input file must be an .npz file)")
    return values


def tolerance_options(fn: Callable) -> Callable:
    """``--atol``, ``--rtol``, ``--no-calibrate``."""
    fn = click.option(
        "--no-calibrate",
        is_flag=True,
        help="Decide float outputs by the fixed per-dtype tolerances (float32: atol 1e-3, rtol 1e-2) "
        "instead of the model's own rounding-noise floor.",
    )(fn)
    fn = click.option(
        "--rtol",
        type=click.FloatRange(min=0),
        callback=_finite,
        help="Relative tolerance for every output: decide elementwise by atol + rtol*|a| instead of the "
        "noise floor (default per dtype: float32 1e-2, float16 5e-2).",
    )(fn)
    fn = click.option(
        "--atol",
        type=click.FloatRange(min=0),
        callback=_finite,
        help="Absolute tolerance for every output: decide elementwise by atol + rtol*|a| instead of the "
        "noise floor (default per dtype: float32 1e-3, float16 1e-2).",
    )(fn)
    return fn


def input_options(fn: Callable) -> Callable:
    """``--seed``, ``--trials``, ``--input-shape``, ``--input-range``, ``--inputs``, ``--save-io``."""
    fn = click.option(
        "--save-io",
        type=click.Path(dir_okay=False),
        metavar="FILE.npz",
        help="Write the inputs and both models' outputs to FILE.npz (readable again with --inputs).",
    )(fn)
    fn = click.option(
        "--inputs",
        type=click.Path(exists=True, dir_okay=False),
        multiple=True,
        callback=_regular_files,
        metavar="FILE.npz",
        help="Real inputs: arrays named after the model inputs (repeatable; replaces generated "
        "inputs unless --trials is given).",
    )(fn)
    fn = click.option(
        "--input-range",
        callback=_range,
        metavar="LO,HI",
        help=f"Range of generated integer inputs, inclusive (default {DEFAULT_INT_RANGE[0]},{DEFAULT_INT_RANGE[1]}).",
    )(fn)
    fn = click.option(
        "--val-range",
        multiple=True,
        callback=_by_name(parse_val_range),
        metavar="[NAME:]LO,HI",
        help="Generate float input NAME uniformly in [LO, HI] instead of N(0, 1) (repeatable; "
        "LO,HI alone for every float input), e.g. x:0,1.",
    )(fn)
    fn = click.option(
        "--input-shape",
        multiple=True,
        callback=_by_name(parse_shape),
        metavar="[NAME:]D0,D1,...",
        help="Shape of an input with dynamic dimensions (repeatable), e.g. x:1,3,224,224 "
        "(a bare shape for a single-input model).",
    )(fn)
    fn = click.option(
        "--trials",
        type=click.IntRange(min=0),
        help=f"Generated input sets (default {DEFAULT_TRIALS}; 0 with --inputs).",
    )(fn)
    fn = click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Seed of generated inputs and of the noise-floor runs (0 or more).",
    )(fn)
    return fn


def verify_options(fn: Callable) -> Callable:
    """Tolerance and input options."""
    return tolerance_options(input_options(fn))


def fold_verify_options(fn: Callable) -> Callable:
    """:func:`verify_options` plus ``--no-verify`` and ``--keep-safe``, for commands that write models."""
    fn = verify_options(fn)
    fn = click.option(
        "--keep-safe",
        is_flag=True,
        help="When verification fails, write the model without the folds that break it (verified too).",
    )(fn)
    fn = click.option("--no-verify", is_flag=True, help="Do not compare outputs before writing (not recommended).")(fn)
    return fn


def verify_options_from(params: dict[str, Any]) -> VerifyOptions:
    """Pop the :data:`VERIFY_PARAMS` from a command's keyword arguments into a VerifyOptions."""
    from bnfold.verify.inputs import InputOptions

    p = {k: params.pop(k, None) for k in VERIFY_PARAMS}
    inputs = InputOptions(
        seed=p["seed"] or 0,
        trials=p["trials"],
        shapes=dict(p["input_shape"] or {}),
        int_range=p["input_range"] or DEFAULT_INT_RANGE,
        files=list(p["inputs"] or ()),
        val_ranges=dict(p["val_range"] or {}),
    )
    from bnfold.verify.verifier import VerifyOptions  # imported only when a command verifies

    return VerifyOptions(
        atol=p["atol"], rtol=p["rtol"], calibrate=not p["no_calibrate"], inputs=inputs, save_io=p["save_io"]
    )


# ---------------------------------------------------------------------------
# Options of every command, and --help in sections
# ---------------------------------------------------------------------------

SECTIONS: dict[str, str] = {
    **dict.fromkeys(("output", "in_place", "force", "external_data", "size_threshold"), "Output"),
    **dict.fromkeys(("no_verify", "keep_safe", *VERIFY_PARAMS), "Verification"),
    **dict.fromkeys(("jobs", "glob", "pattern", "freeze_initializer_inputs"), "Models"),
    **dict.fromkeys(("select", "ignore", "output_format", "summary_path"), "CI gate"),
}
SECTION_ORDER = ("Output", "Verification", "Models", "CI gate", "Reports and messages")


class SectionedCommand(click.Command):
    """A command whose ``--help`` groups options into sections (:data:`SECTIONS`)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            rec = param.get_help_record(ctx)
            if rec is not None:
                groups.setdefault(SECTIONS.get(param.name or "", "Reports and messages"), []).append(rec)
        for title in SECTION_ORDER:
            if title in groups:
                with formatter.section(f"{title} options"):
                    formatter.write_dl(groups[title])


class Group(click.Group):
    """The ``bnfold`` group: command summaries in full (click cuts them at 45 characters)."""

    command_class = SectionedCommand

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def report_options(fn: Callable) -> Callable:
    """--json, --report, --quiet, --verbose, --color, --debug: shared by every command."""
    fn = click.option("--debug", is_flag=True, help="Show tracebacks (for bug reports).")(fn)
    fn = click.option(
        "--color",
        type=click.Choice(["auto", "always", "never"]),
        default="auto",
        show_default=True,
        help="Colour the output (auto: on a terminal, unless NO_COLOR is set).",
    )(fn)
    fn = click.option("-v", "--verbose", is_flag=True, help="List every node folded or left, and every output.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print only errors and the models that fail.")(fn)
    fn = click.option(
        "--report", "report_path", type=click.Path(dir_okay=False), help="Also write the JSON report to FILE."
    )(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout, nothing else.")(fn)
    return fn


def model_options(fn: Callable) -> Callable:
    """Options of how models are found, read and folded."""
    fn = click.option(
        "--freeze-initializer-inputs",
        is_flag=True,
        default=None,
        help="Treat initializers that are also graph inputs (overridable in IR >= 4) as constants.",
    )(fn)
    fn = click.option("--pattern", hidden=True, help="Deprecated name of --glob.")(fn)
    fn = click.option("--glob", metavar="GLOB", help="File name glob for models inside folders.  [default: *.onnx]")(fn)
    fn = click.option(
        "-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Models in parallel."
    )(fn)
    return fn


def gate_options(fn: Callable) -> Callable:
    """``check`` as a CI gate: which findings fail it, and CI output formats."""
    fn = click.option(
        "--summary",
        "summary_path",
        type=click.Path(dir_okay=False),
        metavar="FILE.md",
        help="Also write a Markdown table (for $GITHUB_STEP_SUMMARY).",
    )(fn)
    fn = click.option(
        "--format",
        "output_format",
        type=click.Choice(["text", "github"]),
        default="text",
        show_default=True,
        help="github: one ::error annotation per finding, for GitHub Actions.",
    )(fn)
    fn = click.option(
        "--ignore",
        multiple=True,
        metavar="CODE",
        help="A pattern name (Conv+BatchNormalization, globs allowed) or reason code that does not fail the check "
        "(repeatable, or comma-separated).",
    )(fn)
    fn = click.option(
        "--select",
        multiple=True,
        metavar="CODE",
        help="Only these pattern names or reason codes fail the check (default: every foldable pattern; "
        "a reason code fails on BatchNormalization left for that reason).",
    )(fn)
    return fn
