"""The ``bnfold`` command line: a thin layer over :func:`bnfold.fold_model`."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import click

from . import __version__
from .engine import fold_model
from .errors import EXIT_CODE_TABLE, BnfoldError, ExitCode
from .model_io import (
    DEFAULT_SIZE_THRESHOLD,
    DataSink,
    external_data_files,
    load_model,
    plan_layout,
    write_model,
)

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
@click.option(
    "--external-data/--no-external-data",
    "external_data",
    default=None,
    help="Write tensors to one data file named after OUTPUT (OUTPUT.data), or embed them all. "
    "Default: the input's layout; external data when the model is over 2 GB.",
)
@click.option(
    "--size-threshold",
    type=click.IntRange(min=0),
    default=DEFAULT_SIZE_THRESHOLD,
    show_default=True,
    metavar="BYTES",
    help="With external data: smallest tensor that goes to the data file.",
)
@click.option("--no-verify", is_flag=True, help="Do not run the models in onnxruntime to compare outputs.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def fold(
    model: str,
    output: str,
    freeze_initializer_inputs: bool,
    external_data: bool | None,
    size_threshold: int,
    no_verify: bool,
    debug: bool,
) -> None:
    """Fold every foldable BatchNormalization in MODEL and write the result to OUTPUT."""
    try:
        base_dir = os.path.dirname(os.path.abspath(model))
        m = load_model(model)
        in_files = external_data_files(m, base_dir)
        in_size = os.path.getsize(model) + sum(os.path.getsize(p) for p in in_files)
        external_data, auto_external = plan_layout(m, base_dir, external_data)
        # With external data, folded weights go straight to the output's data file.
        sink = DataSink(output, size_threshold=size_threshold, protect=in_files) if external_data else None
        with sink or contextlib.nullcontext():
            result = fold_model(
                m, freeze_initializer_inputs=freeze_initializer_inputs, base_dir=base_dir, copy=False, sink=sink
            )
            written = write_model(
                result.model,
                output,
                base_dir=base_dir,
                external=external_data,
                size_threshold=size_threshold,
                protect=in_files,
                check=True,
                sink=sink,
            )
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
        return
    for line in result.report.summary_lines():
        click.echo(line)
    if auto_external or written.auto_external:
        click.echo("the model is over 2 GB (protobuf's limit): writing it with external data")
    click.echo(f"size: {in_size} -> {written.size} bytes")
    if written.data_path:
        click.echo(f"wrote {output} (data: {os.path.basename(written.data_path)})")
    else:
        click.echo(f"wrote {output}")
