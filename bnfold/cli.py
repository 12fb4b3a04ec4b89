"""The ``bnfold`` command line: a thin layer over :func:`bnfold.fold_model`."""

from __future__ import annotations

import os
import sys
import traceback

import click

from . import __version__
from .engine import fold_model
from .errors import EXIT_CODE_TABLE, BnfoldError, ExitCode
from .model_io import check_model, load_model, save_model

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


@main.command(epilog="Example:\n\n  bnfold fold model.onnx -o model.folded.onnx\n\n" + EXIT_CODE_TABLE)
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(), required=True, help="Where to write the folded model.")
@click.option(
    "--freeze-initializer-inputs",
    is_flag=True,
    help="Treat initializers that are also graph inputs (overridable in IR >= 4) as constants.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fold(model: str, output: str, freeze_initializer_inputs: bool, debug: bool) -> None:
    """Fold every foldable BatchNormalization in MODEL and write the result to OUTPUT."""
    try:
        m = load_model(model)
        result = fold_model(
            m,
            freeze_initializer_inputs=freeze_initializer_inputs,
            base_dir=os.path.dirname(os.path.abspath(model)),
            copy=False,
        )
        check_model(result.model, output, full=True)
        size = save_model(result.model, output)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
        return
    for line in result.report.summary_lines():
        click.echo(line)
    click.echo(f"size: {os.path.getsize(model)} -> {size} bytes")
    click.echo(f"wrote {output}")
