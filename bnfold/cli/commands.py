"""The ``bnfold`` commands: parse options, plan the batch, run the jobs, hand the outcomes to the renderer.

Results go to stdout (or one JSON document with ``--json``); progress, logs and
errors go to stderr (and everything human goes to stderr when the model itself goes
to stdout with ``-o -``).  Every command exits with a code from one table
(:data:`bnfold.errors.EXIT_CODE_TABLE`).  Building the commands imports no onnx or
numpy: ``--help`` and ``--version`` start at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from bnfold import __version__
from bnfold.cli import render
from bnfold.cli.batch import Interrupted, collect_models, make_output_folders, plan_outputs, run_jobs
from bnfold.cli.options import (
    Group,
    fold_verify_options,
    gate_options,
    model_options,
    report_options,
    verify_options,
    verify_options_from,
)
from bnfold.cli.sidefiles import STDIO, check_side_files
from bnfold.errors import EXIT_CODE_TABLE, BnfoldError, ExitCode, OutputError

if TYPE_CHECKING:
    from bnfold.jobs import ModelOutcome

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_GLOB = "*.onnx"
DEFAULT_SIZE_THRESHOLD = 1024  # bnfold.onnxio.writer.DEFAULT_SIZE_THRESHOLD (kept here: --help imports no onnx)


def _epilog(examples: str) -> str:
    # \b keeps click from rewrapping the example and table paragraphs.
    table = "\b\n" + EXIT_CODE_TABLE
    return f"\b\nExamples:\n{examples}\n\n{table}"


@click.group(cls=Group, context_settings=CONTEXT, epilog=_epilog(
    "  bnfold fold model.onnx -o model.folded.onnx\n"
    "  bnfold check exported/ --json\n"
    "  bnfold verify model.onnx model.folded.onnx\n"
    "  cat model.onnx | bnfold fold - -o - > folded.onnx"
))  # fmt: skip
@click.version_option(__version__, "-V", "--version", prog_name="bnfold")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Fold frozen BatchNormalization layers of ONNX models into the weights around them.

    Settings in [tool.bnfold] of the closest pyproject.toml (from the current folder up)
    are the defaults of the options; the command line overrides them.
    """
    # SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, _on_sigterm)
    from bnfold.cli import config

    cfg = config.load()
    ctx.obj = cfg
    if cfg.defaults:
        assert isinstance(ctx.command, click.Group)
        ctx.default_map = config.default_map(cfg, dict(ctx.command.commands))


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted() -> None:
    click.echo("bnfold: interrupted; no partial output was left", err=True)
    sys.exit(int(ExitCode.INTERRUPTED))


def _fail(e: BnfoldError) -> None:
    """An error found before any model ran: one line, its exit code."""
    click.echo(f"bnfold: error: {render.clean(e)}", err=True)
    sys.exit(int(e.exit_code))


def _glob(glob: str | None, pattern: str | None) -> str:
    if pattern is not None:
        click.echo("bnfold: warning: --pattern is deprecated; use --glob", err=True)
        return glob or pattern
    return glob or DEFAULT_GLOB


def _shape_globs(ctx: click.Context) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    cfg = ctx.find_root().obj
    return list(getattr(cfg, "shape_globs", []) or [])


@dataclass
class Out:
    """How a command reports: where human text goes and in what form."""

    as_json: bool = False
    report_path: str | None = None
    summary_path: str | None = None
    quiet: bool = False
    verbose: bool = False
    debug: bool = False
    color: str = "auto"
    output_format: str = "text"
    human_to_stderr: bool = False  # the model goes to stdout (-o -)

    def echo(self, line: str = "", **style: Any) -> None:
        stream = sys.stderr if self.human_to_stderr else sys.stdout
        st = render.Style.choose(self.color, stream)
        click.echo(st(line, **style) if style else line, err=self.human_to_stderr, color=st.color)

    def err(self, line: str, **style: Any) -> None:
        st = render.Style.choose(self.color, sys.stderr)
        click.echo(st(line, **style) if style else line, err=True, color=st.color)


class _PhaseLine:
    """On a terminal, a single long model shows its phase and the seconds spent in it (one line, rewritten).

    A ticker thread refreshes the line every second, so blame's many verification runs
    and the write of a large model never look like a hang.
    """

    def __init__(self) -> None:
        import threading

        self.text = ""
        self.since = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()

    def _draw(self) -> None:
        elapsed = int(time.monotonic() - self.since)
        tail = f" {elapsed} s" if elapsed else ""
        click.echo("\r" + self.text + tail + "\x1b[K", nl=False, err=True)

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                if self.text:
                    self._draw()

    def __call__(self, path: str, phase: str) -> None:
        with self.lock:
            self.text, self.since = render.phase_line(path, phase), time.monotonic()
            self._draw()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        click.echo("\r\x1b[K", nl=False, err=True)


@contextmanager
def _phases(out: Out, count: int) -> Iterator[Callable[[str, str], None] | None]:
    if count != 1 or out.quiet or out.as_json or not sys.stderr.isatty():
        yield None
        return
    line = _PhaseLine()
    try:
        yield line
    finally:
        line.close()


class _Progress:
    """A picklable progress callback for one model (the phase printer is bound in this process only)."""

    def __init__(self, path: str, show: Callable[[str, str], None]) -> None:
        self.path, self.show = path, show

    def __call__(self, phase: str) -> None:
        self.show(self.path, phase)


def finish(command: str, outcomes: list[ModelOutcome], started: float, out: Out) -> None:
    """Print results, write the side files, exit with the worst code; the verdict is the last line."""
    from bnfold import report_json
    from bnfold.jobs import worst

    code = worst([o.exit_code for o in outcomes])
    for o in outcomes:
        if o.error:
            out.err(render.error_line(o), fg="red")
            if o.traceback and out.debug:
                click.echo(o.traceback.rstrip(), err=True)
    doc = report_json.build(command, outcomes, code, time.perf_counter() - started)
    try:
        data_files = {f for o in outcomes for f in o.data_files}
        for side in (out.report_path, out.summary_path):
            if side and os.path.realpath(side) in data_files:
                raise OutputError(f"{render.clean(side)}: is a data file of a model; not written")
        if out.report_path:
            report_json.write(doc, out.report_path)
        if out.summary_path:
            report_json.write_text(out.summary_path, render.markdown_summary(outcomes, command, code), "the summary")
    except BnfoldError as e:
        out.err(f"bnfold: error: {render.clean(e)}", fg="red")
        code = worst([code, e.exit_code])
    if out.as_json:
        click.echo(report_json.dumps(doc))
    elif out.output_format == "github":
        for line in render.github_annotations(outcomes, command):
            click.echo(line)
        if not out.quiet:
            out.echo(render.verdict(command, outcomes, code))
    elif out.quiet:
        for o in outcomes:
            if o.exit_code == ExitCode.FOLDABLE_LEFT:
                out.err(f"bnfold: {render.clean(o.input)}: {render.STATUS_WORDS[o.exit_code]}")
    else:
        for o in outcomes:
            for line in render.describe(o, command, out.verbose):
                out.echo(line)
        if len(outcomes) > 1:
            out.echo("")
            for line in render.summary_table(outcomes, command):
                out.echo(line)
        good = code in (ExitCode.OK,)
        out.echo(render.verdict(command, outcomes, code), fg="green" if good else "red", bold=True)
    sys.exit(int(code))


def _run(fn: Callable[..., ModelOutcome], arglist: list[tuple], jobs: int, out: Out, outputs: list | None = None):
    try:
        with _phases(out, len(arglist)) as show:
            if show is not None:
                arglist = [(*args, _Progress(str(args[0]), show)) for args in arglist]
            return run_jobs(fn, arglist, jobs, out.quiet, outputs)
    except Interrupted:
        _interrupted()
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


@main.command(
    epilog=_epilog(
        "  bnfold fold model.onnx -o model.folded.onnx\n"
        "  bnfold fold model.onnx --in-place\n"
        "  bnfold fold exported/ -o folded/ --jobs 2 --json\n"
        "  bnfold fold - -o - < model.onnx > folded.onnx"
    )
)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(), help="Output file, folder (several inputs, or ending in /), or - for stdout."
)
@click.option("--in-place", is_flag=True, help="Replace each input (atomically, after verification passed).")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@click.option(
    "--external-data/--no-external-data",
    "external_data",
    default=None,
    help="Write tensors to one data file named after the output (OUTPUT.data), or embed them all. "
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
@fold_verify_options
@model_options
@report_options
@click.pass_context
def fold(
    ctx: click.Context,
    models: tuple[str, ...],
    output: str | None,
    in_place: bool,
    force: bool,
    external_data: bool | None,
    size_threshold: int,
    no_verify: bool,
    keep_safe: bool,
    jobs: int,
    glob: str | None,
    pattern: str | None,
    freeze_initializer_inputs: bool | None,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    verbose: bool,
    color: str,
    debug: bool,
    **verify_kw: Any,
) -> None:
    """Fold every foldable BatchNormalization in each model and write the result.

    MODELS are model files, folders (searched recursively for --glob), or - for stdin.
    Each folded model is verified first: the original and the result run in onnxruntime
    (graph optimizations off) on the same inputs, and nothing is written when an output
    differs.
    """
    started = time.perf_counter()
    glob_ = _glob(glob, pattern)
    to_stdout = output == STDIO
    out = Out(as_json, report_path, None, quiet, verbose, debug, color, human_to_stderr=to_stdout)
    if STDIO in models and (len(models) > 1 or in_place):
        raise click.UsageError("- (stdin) must be the only model, and cannot be folded --in-place")
    if to_stdout:
        if len(models) != 1 or os.path.isdir(models[0]):
            raise click.UsageError("-o - (stdout) takes one model")
        if external_data:
            raise click.UsageError("-o - (stdout): external data cannot travel through a pipe; name an output file")
        if as_json:
            raise click.UsageError("-o - (stdout) carries the model: write the JSON report with --report FILE")
    save_io = verify_kw.get("save_io")
    from bnfold.jobs import FoldOptions, fold_job

    with ExitStack() as stack:
        try:
            src_models = models
            if models == (STDIO,):
                from bnfold.cli.sidefiles import stdin_model

                src_models = (stack.enter_context(stdin_model()),)
            real_output = output
            if to_stdout:
                from bnfold.cli.sidefiles import stdout_output

                real_output = stack.enter_context(stdout_output())
            pairs = plan_outputs(src_models, real_output, in_place, glob_)
            if not pairs:
                raise click.UsageError(f"no models matching {glob_!r} in {', '.join(models)}")
            sides = check_side_files(
                {"--report": report_path, "--save-io": save_io},
                [p for pair in pairs for p in pair],
            )
            single = len(src_models) == 1 and not os.path.isdir(src_models[0]) and not _folder_mode(output)
            if not in_place and not to_stdout and not single:
                make_output_folders(pairs)  # the mirrored tree under -o DIR
        except BnfoldError as e:
            _fail(e)
        opts = FoldOptions(
            freeze_initializer_inputs=bool(freeze_initializer_inputs),
            verify=not no_verify,
            verify_options=None if no_verify else verify_options_from(verify_kw),
            keep_safe=keep_safe,
            external_data=False if to_stdout else external_data,
            size_threshold=size_threshold,
            force=force or to_stdout,
            in_place=in_place,
            debug=debug,
            shape_globs=_shape_globs(ctx),
            side_files=tuple(sides),
        )
        outcomes = _run(fold_job, [(p, o, opts) for p, o in pairs], jobs, out, [o for _, o in pairs])
        if models == (STDIO,):
            for o in outcomes:
                o.input = STDIO
        if to_stdout:
            for o in outcomes:
                o.output = STDIO
                if o.exit_code == ExitCode.OK and real_output is not None:
                    from bnfold.cli.sidefiles import copy_to_stdout

                    copy_to_stdout(real_output)
        finish("fold", outcomes, started, out)


def _folder_mode(output: str | None) -> bool:
    return bool(output) and (os.path.isdir(output or "") or (output or "").endswith(("/", os.sep)))


@main.command(
    epilog=_epilog(
        "  bnfold check model.onnx\n"
        "  bnfold check exported/ --glob '*.onnx' --json\n"
        '  bnfold check exported/ --ignore Conv+Mul --format github --summary "$GITHUB_STEP_SUMMARY"\n'
        "  # in CI: fails (exit 1) when an exported model still has foldable BatchNormalization"
    )
)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@gate_options
@model_options
@report_options
@click.pass_context
def check(
    ctx: click.Context,
    models: tuple[str, ...],
    select: tuple[str, ...],
    ignore: tuple[str, ...],
    output_format: str,
    summary_path: str | None,
    jobs: int,
    glob: str | None,
    pattern: str | None,
    freeze_initializer_inputs: bool | None,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    verbose: bool,
    color: str,
    debug: bool,
) -> None:
    """Read-only lint: list what could still be folded, and what cannot and why.

    Exits 0 when nothing foldable is left, 1 when something is, 4 when a model cannot be read.
    MODELS may be - for stdin.
    """
    started = time.perf_counter()
    glob_ = _glob(glob, pattern)
    from bnfold.cli.gate import Gate
    from bnfold.jobs import FoldOptions, check_job

    gate = Gate.from_options(select, ignore)
    out = Out(as_json, report_path, summary_path, quiet, verbose, debug, color, output_format)
    with ExitStack() as stack:
        try:
            src = models
            if models == (STDIO,):
                from bnfold.cli.sidefiles import stdin_model

                src = (stack.enter_context(stdin_model()),)
            elif STDIO in models:
                raise click.UsageError("- (stdin) must be the only model")
            found = collect_models(src, glob_)
            if not found:
                raise click.UsageError(f"no models matching {glob_!r} in {', '.join(models)}")
            sides = check_side_files({"--report": report_path, "--summary": summary_path}, [p for p, _ in found])
        except BnfoldError as e:
            _fail(e)
        opts = FoldOptions(
            freeze_initializer_inputs=bool(freeze_initializer_inputs), debug=debug, side_files=tuple(sides)
        )
        outcomes = [gate.apply(o) for o in _run(check_job, [(p, opts) for p, _ in found], jobs, out)]
        if models == (STDIO,):
            for o in outcomes:
                o.input = STDIO
        finish("check", outcomes, started, out)


@main.command(
    epilog=_epilog(
        "  bnfold verify model.onnx model.folded.onnx\n"
        "  bnfold verify exported.onnx converted.onnx --input-shape tokens:1,128 --input-range 0,30000 --json"
    )
)
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@verify_options
@report_options
def verify(
    reference: str,
    candidate: str,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    verbose: bool,
    color: str,
    debug: bool,
    **verify_kw: Any,
) -> None:
    """Compare the outputs of CANDIDATE with those of REFERENCE on the same inputs.

    Both models run in onnxruntime with graph optimizations off; every output must satisfy
    |a - b| <= atol + rtol * |a| (a from REFERENCE). Exits 0 when they agree, 3 when they differ.
    """
    started = time.perf_counter()
    out = Out(as_json, report_path, None, quiet, verbose, debug, color)
    try:
        sides = check_side_files(
            {"--report": report_path, "--save-io": verify_kw.get("save_io")}, [reference, candidate]
        )
    except BnfoldError as e:
        _fail(e)
    from bnfold.jobs import verify_job

    options = verify_options_from(verify_kw)
    outcomes = _run(verify_job, [(reference, candidate, options, debug, tuple(sides))], 1, out)
    finish("verify", outcomes, started, out)


@main.command(epilog=_epilog("  bnfold patterns\n  bnfold patterns --json"))
@click.option("--json", "as_json", is_flag=True, help="Print the registry as one JSON document.")
def patterns(as_json: bool) -> None:
    """List the fold patterns bnfold knows: name, side, the ops it folds, the layout ops it looks through."""
    import json

    from bnfold.fold.rules import REGISTRY

    if as_json:
        click.echo(json.dumps({"patterns": [r.to_dict() for r in REGISTRY]}, indent=2))
        return
    for r in REGISTRY:
        through = f"; through {', '.join(r.through)}" if r.through else ""
        click.echo(f"{r.name}  (into the {r.side.value}; folds {', '.join(r.affine)}{through})")
        click.echo(f"    {r.summary}")
