"""The ``bnfold`` command line: a thin layer over :func:`bnfold.fold_model`."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from . import __version__
from .blame import FoldVerification, verify_fold
from .cli_options import fold_verify_options, verify_options, verify_options_from
from .engine import FoldResult, fold_model
from .errors import EXIT_CODE_TABLE, BnfoldError, ExitCode, NotVerifiableError
from .model_io import check_model, load_model, save_model
from .verify import VerifyOptions, verify_models

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(e: BaseException, debug: bool) -> None:
    """One line on stderr and the documented exit code (traceback only with --debug)."""
    if debug:
        traceback.print_exc()
    if isinstance(e, BnfoldError):
        click.echo(f"bnfold: error: {e}", err=True)
        sys.exit(int(e.exit_code))
    if isinstance(e, KeyboardInterrupt):
        click.echo("bnfold: interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    click.echo(
        f"bnfold: internal error: {type(e).__name__}: {e}. This is a bug; please report it "
        "with the output of the same command run with --debug.",
        err=True,
    )
    sys.exit(int(ExitCode.INTERNAL))


@click.group(context_settings=CONTEXT, epilog=EXIT_CODE_TABLE)
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """Fold frozen BatchNormalization layers of ONNX models into the weights around them."""


@main.command(
    epilog="Example:\n\n  bnfold fold model.onnx -o model.folded.onnx\n\n"
    "  bnfold fold det.onnx -o det.folded.onnx --input-shape x:1,3,640,640 --inputs page.npz\n\n" + EXIT_CODE_TABLE
)
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the folded model.")
@click.option(
    "--freeze-initializer-inputs",
    is_flag=True,
    help="Treat initializers that are also graph inputs (overridable in IR >= 4) as constants.",
)
@fold_verify_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fold(
    model: str,
    output: str,
    freeze_initializer_inputs: bool,
    no_verify: bool,
    keep_safe: bool,
    debug: bool,
    **verify_kw: Any,
) -> None:
    """Fold every foldable BatchNormalization in MODEL and write the result to OUTPUT.

    The folded model is verified first: MODEL and the result run in onnxruntime (graph
    optimizations off) on the same inputs, and nothing is written when an output differs.
    """
    options = verify_options_from(verify_kw)
    try:
        m = load_model(model)
        result = fold_model(
            m,
            freeze_initializer_inputs=freeze_initializer_inputs,
            base_dir=os.path.dirname(os.path.abspath(model)),
            copy=False,
        )
        check_model(result.model, output, full=True)
        checked = None
        if not no_verify:
            checked = _verify_fold(model, result, options, keep_safe, freeze_initializer_inputs)
            result = checked.result
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
        return
    for line in result.report.summary_lines():
        click.echo(line)
    if checked is not None:
        for line in checked.summary_lines():
            click.echo(line)
        if not checked.ok:
            bad = checked.report.failing
            what = checked.report.error or f"{len(bad)} of {len(checked.report.rows)} output(s) differ beyond tolerance"
            hint = "" if keep_safe else " (--keep-safe writes the model without the blamed folds)"
            click.echo(f"bnfold: error: verification failed: {what}; nothing written{hint}", err=True)
            sys.exit(int(ExitCode.VERIFY_FAILED))
    try:
        size = save_model(result.model, output)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
        return
    click.echo(f"size: {os.path.getsize(model)} -> {size} bytes")
    click.echo(f"wrote {output}")


def _verify_fold(
    model: str, result: FoldResult, options: VerifyOptions, keep_safe: bool, freeze: bool
) -> FoldVerification:
    """Verify a fold against the model file (run by path); blame on failure."""
    try:
        return verify_fold(model, result, options, keep_safe=keep_safe, freeze_initializer_inputs=freeze)
    except NotVerifiableError as e:
        raise type(e)(f"{model}: {e}; skip verification with --no-verify") from e


@main.command(
    epilog="\b\nExamples:\n  bnfold verify model.onnx model.folded.onnx\n"
    "  bnfold verify exported.onnx converted.onnx --input-shape tokens:1,128 --input-range 0,30000\n\n\b\n"
    + EXIT_CODE_TABLE
)
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@verify_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify(reference: str, candidate: str, debug: bool, **verify_kw: Any) -> None:
    """Compare the outputs of CANDIDATE with those of REFERENCE on the same inputs.

    Both models run in onnxruntime with graph optimizations off; every output must satisfy
    |a - b| <= atol + rtol * |a| (a from REFERENCE). Exits 0 when they agree, 3 when they differ.
    """
    options = verify_options_from(verify_kw)
    try:
        for path in (reference, candidate):
            load_model(path)
        report = verify_models(reference, candidate, options)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
        return
    for line in report.summary_lines():
        click.echo(line)
    if not report.passed:
        what = report.error or f"{len(report.failing)} of {len(report.rows)} output(s) differ beyond tolerance"
        click.echo(f"bnfold: error: {candidate} differs from {reference}: {what}", err=True)
        sys.exit(int(ExitCode.VERIFY_FAILED))
