"""Batches: which models a command runs on, where each output goes, and running the jobs.

Jobs run in this process (``--jobs 1``) or each in its own worker process.  A
worker that dies (SIGKILL, the OOM killer) ends as that model's error and the
batch goes on; SIGTERM or Ctrl-C stops the batch at once: workers are told to
stop, their temporary files are removed, and the command exits 130.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob as globmod
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from bnfold.cli import render
from bnfold.errors import ExitCode

if TYPE_CHECKING:
    from bnfold.jobs import ModelOutcome

# How long stopped workers get to clean up before they are killed.
STOP_GRACE = 30.0


class Interrupted(Exception):
    """The batch was interrupted; outcomes so far are attached."""


# ---------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------


def collect_models(paths: tuple[str, ...], glob: str, exclude: str | None = None) -> list[tuple[str, str]]:
    """``(path, relative path)`` of every model: files as given, folders searched recursively.

    ``exclude`` (an output folder) is compared by real path, so a symlink alias of a
    folder inside the input tree is skipped too: a batch never folds its own outputs.
    """
    found: list[tuple[str, str]] = []
    skip = os.path.realpath(exclude) if exclude else None
    for p in paths:
        if not os.path.isdir(p):
            found.append((p, os.path.basename(p)))
            continue
        if skip is not None and os.path.realpath(p) == skip:
            continue
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if skip is None or os.path.realpath(os.path.join(root, d)) != skip)
            for f in sorted(files):
                if fnmatch.fnmatch(f, glob):
                    full = os.path.join(root, f)
                    found.append((full, os.path.relpath(full, p)))
    return found


def plan_outputs(inputs: tuple[str, ...], output: str | None, in_place: bool, glob: str) -> list[tuple[str, str]]:
    """Pair every input model with its output path (mirroring folders under ``-o DIR``).

    One input file with ``-o FILE`` is a plain copy; ``-o DIR`` (an existing folder, or
    a path ending in ``/``) puts it in ``DIR`` as a batch does.
    """
    if in_place:
        if output:
            raise click.UsageError("--in-place and -o/--output exclude each other")
        return [(p, p) for p, _ in collect_models(inputs, glob)]
    if not output:
        raise click.UsageError("missing -o/--output (or --in-place)")
    single = len(inputs) == 1 and not os.path.isdir(inputs[0])
    if single and not os.path.isdir(output) and not output.endswith(("/", os.sep)):
        return [(inputs[0], output)]
    if os.path.isfile(output) or (not os.path.exists(output) and fnmatch.fnmatch(os.path.basename(output), glob)):
        raise click.UsageError(
            f"{render.clean(output)}: with a folder or several inputs, -o must name a folder "
            "(it looks like a model file)"
        )
    models = collect_models(inputs, glob, exclude=output)
    pairs = [(p, os.path.join(output, rel)) for p, rel in models]
    outs = [os.path.realpath(o) for _, o in pairs]
    if len(set(outs)) != len(outs):
        raise click.UsageError("two inputs map to the same output path; fold them in separate runs")
    return pairs


def make_output_folders(pairs: list[tuple[str, str]]) -> None:
    """Create the (mirrored) folders of every output; one line and exit 5 when one cannot be made."""
    from bnfold.errors import OutputError

    for _, out in pairs:
        folder = os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{folder}: cannot create the output folder: {e.strerror or e}") from e


# ---------------------------------------------------------------------------
# running jobs
# ---------------------------------------------------------------------------


def run_jobs(
    fn: Callable[..., ModelOutcome],
    arglist: list[tuple],
    jobs: int,
    quiet: bool,
    outputs: list[str | None] | None = None,
) -> list[ModelOutcome]:
    """Run one job per argument tuple (each in a worker process when ``jobs > 1``); outcomes in input order.

    Raises:
        Interrupted: SIGINT/SIGTERM arrived (workers are stopped and cleaned up first).
    """
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
            click.echo(render.progress_line(done, n, outcome), err=True)

    progress = click.progressbar(length=n, label="models", file=sys.stderr) if show_bar else contextlib.nullcontext()
    try:
        with progress as bar:
            if jobs > 1 and n > 1:
                _run_pool(fn, arglist, min(jobs, n), lambda i, o: finished(i, o, bar), outputs or [None] * n)
            else:
                for i, args in enumerate(arglist):
                    finished(i, fn(*args), bar)
                    if results[i].exit_code == ExitCode.INTERRUPTED:  # type: ignore[union-attr]
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise Interrupted from None
    outcomes = [r for r in results if r is not None]
    if any(o.exit_code == ExitCode.INTERRUPTED for o in outcomes):
        raise Interrupted
    return outcomes


def _worker(conn: Any, tmpdir: str, fn: Callable[..., ModelOutcome], args: tuple) -> None:
    # Temporary folders of this job (verification's, onnxruntime's) go under tmpdir,
    # which the parent removes whatever happens to this process.
    os.environ["TMPDIR"] = tmpdir
    tempfile.tempdir = tmpdir
    outcome = fn(*args)
    outcome.exception = None  # exceptions need not pickle; the outcome says it all
    conn.send(outcome)
    conn.close()


def _context() -> Any:
    import multiprocessing  # only batches with --jobs > 1 need it

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_pool(
    fn: Callable[..., ModelOutcome],
    arglist: list[tuple],
    width: int,
    finished: Callable[[int, ModelOutcome], None],
    outputs: list[str | None],
) -> None:
    """One worker process per job, ``width`` at a time; a dead worker is its model's error."""
    import multiprocessing.connection

    from bnfold.jobs import ModelOutcome

    ctx = _context()
    queue = list(range(len(arglist)))
    running: dict[int, tuple[Any, Any, str]] = {}  # job -> (process, connection, tmpdir)
    got: dict[int, ModelOutcome] = {}

    def start(i: int) -> None:
        tmpdir = tempfile.mkdtemp(prefix="bnfold-job-")
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(child, tmpdir, fn, arglist[i]), daemon=True)
        p.start()
        child.close()
        running[i] = (p, parent, tmpdir)

    def reap(i: int, interrupted: bool = False) -> None:
        p, conn, tmpdir = running.pop(i)
        outcome = got.pop(i, None)
        if outcome is None and conn.poll():
            with contextlib.suppress(EOFError, OSError):
                outcome = conn.recv()
        p.join()
        conn.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
        if outcome is None:
            _remove_temp_files(outputs[i])
            outcome = ModelOutcome(input=str(arglist[i][0]), output=outputs[i])
            if interrupted:
                outcome.exit_code, outcome.error = ExitCode.INTERRUPTED, "interrupted"
            else:
                outcome.exit_code = ExitCode.INTERNAL
                outcome.error = f"{arglist[i][0]}: the worker process died ({_how(p.exitcode)}); nothing was written"
        finished(i, outcome)

    try:
        while queue or running:
            while queue and len(running) < width:
                start(queue.pop(0))
            ready = multiprocessing.connection.wait(
                [c for _, c, _ in running.values()] + [p.sentinel for p, _, _ in running.values()]
            )
            for i, (p, conn, _) in list(running.items()):
                if conn in ready:
                    with contextlib.suppress(EOFError, OSError):
                        got[i] = conn.recv()
                    reap(i)
                elif p.sentinel in ready:
                    reap(i)
    except KeyboardInterrupt:
        _stop(running, got)
        for i in list(running):
            reap(i, interrupted=True)
        raise
    finally:
        for i in list(running):  # an unexpected error: leave nothing running
            p, conn, tmpdir = running.pop(i)
            p.kill()
            p.join()
            shutil.rmtree(tmpdir, ignore_errors=True)


def _stop(running: dict[int, tuple[Any, Any, str]], got: dict[int, Any]) -> None:
    """Ask every worker to stop (SIGTERM: it unwinds and removes its temp files); kill the ones that linger."""
    import time

    for p, _, _ in running.values():
        if p.is_alive():
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for i, (p, conn, _) in running.items():
        while p.is_alive() and time.monotonic() < deadline:
            # Drain the result so a worker blocked on a full pipe can exit.
            if conn.poll(0.05):
                with contextlib.suppress(EOFError, OSError):
                    got[i] = conn.recv()
        if p.is_alive():
            p.kill()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ", as the out-of-memory killer does" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {exitcode}"


def _remove_temp_files(output: str | None) -> None:
    """Temporary files a killed worker left next to its output (``.NAME*.tmp``, as the writer names them)."""
    if not output:
        return
    folder = os.path.dirname(os.path.abspath(output))
    pattern = os.path.join(globmod.escape(folder), "." + globmod.escape(os.path.basename(output)) + "*.tmp")
    for tmp in globmod.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
