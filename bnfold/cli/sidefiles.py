"""Side files (``--report``, ``--summary``, ``--save-io``) and ``-`` for stdin/stdout.

Side-file paths are checked before any model runs: a missing folder, a folder
that cannot be written, or a path that is one of the models (an input, an output,
or the data file an output will get) is exit 5 with one line.  Data files of the
inputs are only known once a model is read: the jobs refuse those
(:attr:`bnfold.jobs.FoldOptions.side_files`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator

from bnfold.cli.render import clean
from bnfold.errors import ModelLoadError, OutputError

STDIO = "-"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_side_files(sides: dict[str, str | None], models: Iterable[str]) -> list[str]:
    """Refuse unusable side-file paths (exit 5, one line); returns the paths given.

    Args:
        sides: option name -> path (None when not given).
        models: every input and output path, and the data files known before reading.
    """
    models = [m for m in models if m and m != STDIO]
    given = {opt: p for opt, p in sides.items() if p}
    for opt, path in given.items():
        where = f"{opt} {clean(path)}"
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise OutputError(f"{where}: is a folder; name a file")
        if not os.path.isdir(folder):
            raise OutputError(f"{where}: the folder {clean(folder)} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{where}: the folder {clean(folder)} is not writable")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise OutputError(f"{where}: the file is not writable")
        for m in models:
            if _same(path, m) or _same(path, m + ".data"):
                raise OutputError(f"{where}: is the model {clean(m)} (or its data file); choose another file")
    paths = list(given.values())
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if _same(a, b):
                raise OutputError(f"{clean(a)}: given for two side files; choose one file each")
    return paths


@contextlib.contextmanager
def stdin_model() -> Iterator[str]:
    """The model on stdin, as a file in a private temporary folder (removed afterwards)."""
    folder = tempfile.mkdtemp(prefix="bnfold-stdin-")
    try:
        path = os.path.join(folder, "stdin.onnx")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f)
        if os.path.getsize(path) == 0:
            raise ModelLoadError("-: nothing on stdin (pipe a model in, or name a file)")
        _refuse_external(path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _refuse_external(path: str) -> None:
    """External data cannot travel through a pipe: say so before folding."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - the job reports an unreadable model with its own message
        return
    if any(uses_external_data(t) for t in _get_all_tensors(model)):
        raise ModelLoadError(
            "-: the model on stdin uses external data files, which cannot travel through a pipe; "
            "name the model file instead"
        )


@contextlib.contextmanager
def stdout_output() -> Iterator[str]:
    """A temporary output path whose bytes are copied to stdout when the block succeeds."""
    folder = tempfile.mkdtemp(prefix="bnfold-stdout-")
    try:
        yield os.path.join(folder, "stdout.onnx")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def copy_to_stdout(path: str) -> None:
    with open(path, "rb") as f:
        shutil.copyfileobj(f, sys.stdout.buffer)
    sys.stdout.buffer.flush()
