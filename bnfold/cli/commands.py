"""The ``bnfold`` command line: a thin layer over :mod:`bnfold.jobs`.

Results go to stdout (or one JSON document with ``--json``); progress, logs and
errors go to stderr.  Every command exits with a code from one table
(:data:`bnfold.errors.EXIT_CODE_TABLE`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import click

from bnfold import __version__
from bnfold import report_json as json_report
from bnfold.cli.options import fold_verify_options, verify_options, verify_options_from
from bnfold.errors import EXIT_CODE_TABLE, ExitCode
from bnfold.jobs import FoldOptions, ModelOutcome, check_job, fold_job, verify_job, worst
from bnfold.onnxio.writer import DEFAULT_SIZE_THRESHOLD

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _epilog(examples: str) -> str:
    # \b keeps click from rewrapping the example and table paragraphs.
    table = "\b\n" + EXIT_CODE_TABLE
    return f"\b\nExamples:\n{examples}\n\n{table}"


def report_options(fn: Callable) -> Callable:
    """--json, --report, --quiet, --debug: shared by every command."""
    fn = click.option("--debug", is_flag=True, help="Show tracebacks (for bug reports).")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print only errors.")(fn)
    fn = click.option(
        "--report", "report_path", type=click.Path(dir_okay=False), help="Also write the JSON report to FILE."
    )(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout, nothing else.")(fn)
    return fn


def model_options(fn: Callable) -> Callable:
    """Options of how models are read and folded."""
    fn = click.option(
        "--freeze-initializer-inputs",
        is_flag=True,
        help="Treat initializers that are also graph inputs (overridable in IR >= 4) as constants.",
    )(fn)
    fn = click.option(
        "--pattern", default="*.onnx", show_default=True, help="File name glob for models inside folders."
    )(fn)
    fn = click.option(
        "-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Models in parallel."
    )(fn)
    return fn


@click.group(context_settings=CONTEXT, epilog=_epilog(
    "  bnfold fold model.onnx -o model.folded.onnx\n"
    "  bnfold check exported/ --json\n"
    "  bnfold verify model.onnx model.folded.onnx"
))  # fmt: skip
@click.version_option(__version__, "-V", "--version", prog_name="bnfold")
def main() -> None:
    """Fold frozen BatchNormalization layers of ONNX models into the weights around them."""
    # SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out.
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted() -> None:
    click.echo("bnfold: interrupted; no partial output was left", err=True)
    sys.exit(int(ExitCode.INTERRUPTED))


# ---------------------------------------------------------------------------
# inputs and outputs of a batch
# ---------------------------------------------------------------------------


def collect_models(paths: tuple[str, ...], pattern: str, exclude: str | None = None) -> list[tuple[str, str]]:
    """``(path, relative path)`` of every model: files as given, folders searched recursively."""
    found: list[tuple[str, str]] = []
    skip = os.path.abspath(exclude) if exclude else None
    for p in paths:
        if not os.path.isdir(p):
            found.append((p, os.path.basename(p)))
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if skip is None or os.path.abspath(os.path.join(root, d)) != skip)
            for f in sorted(files):
                if fnmatch.fnmatch(f, pattern):
                    full = os.path.join(root, f)
                    found.append((full, os.path.relpath(full, p)))
    return found


def plan_outputs(inputs: tuple[str, ...], output: str | None, in_place: bool, pattern: str) -> list[tuple[str, str]]:
    """Pair every input model with its output path (mirroring folders under ``-o DIR``)."""
    if in_place:
        if output:
            raise click.UsageError("--in-place and -o/--output exclude each other")
        return [(p, p) for p, _ in collect_models(inputs, pattern)]
    if not output:
        raise click.UsageError("missing -o/--output (or --in-place)")
    single = len(inputs) == 1 and not os.path.isdir(inputs[0])
    if single and not os.path.isdir(output) and not output.endswith(os.sep):
        return [(inputs[0], output)]
    if os.path.isfile(output) or (not os.path.exists(output) and fnmatch.fnmatch(os.path.basename(output), pattern)):
        raise click.UsageError(
            f"{output}: with a folder or several inputs, -o must name a folder (it looks like a model file)"
        )
    models = collect_models(inputs, pattern, exclude=output)
    pairs = [(p, os.path.join(output, rel)) for p, rel in models]
    outs = [o for _, o in pairs]
    if len(set(outs)) != len(outs):
        raise click.UsageError("two inputs map to the same output path; fold them in separate runs")
    return pairs


# ---------------------------------------------------------------------------
# running jobs with progress
# ---------------------------------------------------------------------------


def run_jobs(fn: Callable[..., ModelOutcome], arglist: list[tuple], jobs: int, quiet: bool) -> list[ModelOutcome]:
    """Run one job per argument tuple (in processes when ``jobs > 1``); outcomes in input order."""
    n = len(arglist)
    results: list[ModelOutcome | None] = [None] * n
    show_bar = n > 1 and not quiet and sys.stderr.isatty()
    plain = n > 1 and not quiet and not show_bar
    done = 0

    def finished(i: int, outcome: ModelOutcome, bar: Any) -> None:
        nonlocal done
        done += 1
        results[i] = outcome
        if bar is not None:
            bar.update(1)
        elif plain:
            click.echo(f"[{done}/{n}] {outcome.input}: {outcome.status}", err=True)

    progress = click.progressbar(length=n, label="models", file=sys.stderr) if show_bar else contextlib.nullcontext()
    try:
        with progress as bar:
            if jobs > 1 and n > 1:
                with ProcessPoolExecutor(max_workers=min(jobs, n)) as pool:
                    futures = {pool.submit(fn, *args): i for i, args in enumerate(arglist)}
                    for fut in as_completed(futures):
                        finished(futures[fut], fut.result(), bar)
            else:
                for i, args in enumerate(arglist):
                    finished(i, fn(*args), bar)
                    if results[i].exit_code == ExitCode.INTERRUPTED:
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        _interrupted()
    done_outcomes = [r for r in results if r is not None]
    if any(o.exit_code == ExitCode.INTERRUPTED for o in done_outcomes):
        _interrupted()
    return done_outcomes


# ---------------------------------------------------------------------------
# human output
# ---------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(o: ModelOutcome, command: str) -> list[str]:
    """Human lines for one model: counts, the BNs left and why."""
    r = o.report or {}
    if command == "verify" or (o.error and not o.verification_lines):
        return list(o.verification_lines)
    lines = []
    if command == "check":
        lines.append(
            f"{o.input}: {len(r['folds'])} foldable, {r['bn_left']} of {r['bn_found']} BatchNormalization "
            "cannot be folded"
        )
        for f in r["folds"]:
            lines.append(f"  foldable {f['node']} into {f['target']} ({f['pattern']})")
    else:
        other = len(r["folds"]) - r["bn_folded"]
        extra = f"; {other} other affine op(s) folded" if other else ""
        lines.append(
            f"{o.input} -> {o.output}: BatchNormalization {r['bn_found']} found, {r['bn_folded']} folded, "
            f"{r['bn_left']} left{extra}"
        )
        lines.append(
            f"  nodes {r['nodes_before']} -> {r['nodes_after']}, size {_size(o.size_before)} -> {_size(o.size_after)}"
        )
    lines += [f"  {n}" for n in o.notes]
    lines += o.verification_lines
    for s in [*r["skips"], *r.get("affine_left", [])]:
        where = "" if s["graph"] == "main" else f" (in {s['graph']})"
        op = "" if s.get("op_type", "BatchNormalization") == "BatchNormalization" else f"{s['op_type']} "
        lines.append(f"  left {op}{s['node']}{where}: {s['reason']}: {s['message']}")
    return lines


def summary_table(outcomes: list[ModelOutcome], command: str) -> list[str]:
    """One row per model, for batches."""
    rows = [("model", "status", "BN", "foldable" if command == "check" else "folds", "BN left", "size")]
    for o in outcomes:
        r = o.report or {}
        rows.append(
            (
                o.input,
                o.status,
                str(r.get("bn_found", "-")),
                str(len(r["folds"])) if r else "-",
                str(r.get("bn_left", "-")),
                f"{_size(o.size_before)} -> {_size(o.size_after)}" if o.size_after else _size(o.size_before),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def finish(
    command: str,
    outcomes: list[ModelOutcome],
    started: float,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Print results, write the report, exit with the worst code."""
    code = worst([o.exit_code for o in outcomes])
    for o in outcomes:
        if o.error:
            click.secho(f"bnfold: error: {o.error}", err=True, fg="red")
            if o.traceback and debug:
                click.echo(o.traceback.rstrip(), err=True)
    doc = json_report.build(command, outcomes, code, time.perf_counter() - started)
    if report_path:
        json_report.write(doc, report_path)
    if as_json:
        click.echo(json_report.dumps(doc))
    elif not quiet:
        for o in outcomes:
            for line in describe(o, command):
                click.echo(line)
        if len(outcomes) > 1:
            click.echo("")
            for line in summary_table(outcomes, command):
                click.echo(line)
    sys.exit(int(code))


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


@main.command(
    epilog=_epilog(
        "  bnfold fold model.onnx -o model.folded.onnx\n"
        "  bnfold fold model.onnx --in-place\n"
        "  bnfold fold exported/ -o folded/ --jobs 2 --json"
    )
)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output file, or folder for several inputs.")
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
def fold(
    models: tuple[str, ...],
    output: str | None,
    in_place: bool,
    force: bool,
    external_data: bool | None,
    size_threshold: int,
    no_verify: bool,
    keep_safe: bool,
    jobs: int,
    pattern: str,
    freeze_initializer_inputs: bool,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    debug: bool,
    **verify_kw: Any,
) -> None:
    """Fold every foldable BatchNormalization in each model and write the result.

    MODELS are model files or folders (searched recursively for --pattern). Each folded
    model is verified first: the original and the result run in onnxruntime (graph
    optimizations off) on the same inputs, and nothing is written when an output differs.
    """
    started = time.perf_counter()
    pairs = plan_outputs(models, output, in_place, pattern)
    if not pairs:
        raise click.UsageError(f"no models matching {pattern!r} in {', '.join(models)}")
    for _, out in pairs:
        folder = os.path.dirname(os.path.abspath(out))
        if len(pairs) > 1 and not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
    opts = FoldOptions(
        freeze_initializer_inputs=freeze_initializer_inputs,
        verify=not no_verify,
        verify_options=None if no_verify else verify_options_from(verify_kw),
        keep_safe=keep_safe,
        external_data=external_data,
        size_threshold=size_threshold,
        force=force,
        in_place=in_place,
        debug=debug,
    )
    outcomes = run_jobs(fold_job, [(p, o, opts) for p, o in pairs], jobs, quiet)
    finish("fold", outcomes, started, as_json, report_path, quiet, debug)


@main.command(
    epilog=_epilog(
        "  bnfold check model.onnx\n"
        "  bnfold check exported/ --pattern '*.onnx' --json\n"
        "  # in CI: fails (exit 1) when an exported model still has foldable BatchNormalization"
    )
)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@model_options
@report_options
def check(
    models: tuple[str, ...],
    jobs: int,
    pattern: str,
    freeze_initializer_inputs: bool,
    as_json: bool,
    report_path: str | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Read-only lint: list BatchNormalization that could still be folded, and what cannot.

    Exits 0 when nothing foldable is left, 1 when something is, 4 when a model cannot be read.
    """
    started = time.perf_counter()
    found = collect_models(models, pattern)
    if not found:
        raise click.UsageError(f"no models matching {pattern!r} in {', '.join(models)}")
    opts = FoldOptions(freeze_initializer_inputs=freeze_initializer_inputs, debug=debug)
    outcomes = run_jobs(check_job, [(p, opts) for p, _ in found], jobs, quiet)
    finish("check", outcomes, started, as_json, report_path, quiet, debug)


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
    debug: bool,
    **verify_kw: Any,
) -> None:
    """Compare the outputs of CANDIDATE with those of REFERENCE on the same inputs.

    Both models run in onnxruntime with graph optimizations off; every output must satisfy
    |a - b| <= atol + rtol * |a| (a from REFERENCE). Exits 0 when they agree, 3 when they differ.
    """
    started = time.perf_counter()
    outcome = verify_job(reference, candidate, verify_options_from(verify_kw), debug)
    finish("verify", [outcome], started, as_json, report_path, quiet, debug)


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
