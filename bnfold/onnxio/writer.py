"""Writing a model atomically: the one write path of every output, checked and verified as written.

The model file (and its data file, with external data) is written under fresh
names in the output folder, synced, checked and handed to ``before_commit``
(verification runs it by path); only then does the model take its name, by one
rename.  Until that rename the old output, model and data file alike, is untouched:

* the data file gets a name no file has (``<output>.data``, else ``<output>.1.data``,
  ...), claimed under a lock on the folder, so it never replaces the old output's
  data, an input, or a concurrent run's data file;
* after the rename, the data files of the replaced output (files named
  ``<output>.data`` / ``<output>.N.data`` that no running bnfold holds and no input
  uses) are removed, under the same lock;
* a replaced file's mode and owner (where allowed) pass to the new file; a symlink
  is written through (its target is replaced, the link stays); a folder, device,
  FIFO or socket is refused.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import onnx

from bnfold.errors import OutputError
from bnfold.onnxio.copy import embed_external, fill_data_file, sink_is_packed
from bnfold.onnxio.embedded import EmbeddedSource
from bnfold.onnxio.fsutil import (
    Temps,
    folder_lock,
    fsync_dir,
    fsync_path,
    give_identity,
    is_locked,
    lock_file,
    resolve_target,
)
from bnfold.onnxio.layout import DEFAULT_SIZE_THRESHOLD, MAX_PROTOBUF
from bnfold.onnxio.load import check_model, check_model_path
from bnfold.onnxio.protowire import write_proto
from bnfold.onnxio.sink import DataSink
from bnfold.onnxio.tensors import external_ref, is_external, model_tensors, set_external, tensor_nbytes

__all__ = ["DEFAULT_SIZE_THRESHOLD", "MAX_PROTOBUF", "WriteResult", "write_model"]


@dataclass
class WriteResult:
    """What :func:`write_model` wrote."""

    path: str  # the file written (symlinks resolved)
    data_path: str | None  # the external data file, when there is one
    size: int  # bytes of the model file plus its data file
    external: bool  # written with external data
    auto_external: bool  # switched to external data because the model is over 2 GB
    other_links: int = 0  # other hard links of the replaced file (they keep the old model)
    removed: tuple[str, ...] = ()  # data files of the replaced output that were removed


def write_model(
    model: onnx.ModelProto,
    path: str,
    *,
    base_dir: str | None = None,
    external: bool | None = None,
    size_threshold: int = DEFAULT_SIZE_THRESHOLD,
    protect: Iterable[str] = (),
    check: bool = False,
    full_check: bool = True,
    sink: DataSink | None = None,
    source: EmbeddedSource | None = None,
    before_commit: Callable[[str], None] | None = None,
    temps: Temps | None = None,
) -> WriteResult:
    """Write ``model`` to ``path`` atomically, with its data embedded or in one external data file.

    Args:
        model: the model; external tensors are relative to ``base_dir``.  It is updated in
            place: after the call, its external tensors point at the written data file
            (relative to the output folder).  Discard it if the call raised.
        path: the output model file (a symlink is written through to its target).
        base_dir: folder the model's current external locations are relative to (default: cwd).
        external: True writes tensors of at least ``size_threshold`` bytes to a data file
            next to the output; False embeds everything (refused over 2 GB); None keeps the
            model's layout (external when any tensor is external) and switches to external
            data when the model is over 2 GB.
        size_threshold: smallest tensor (in bytes) that goes to the data file.
        protect: files never written nor removed (the input model; the data files the
            model reads are always protected).
        check: run the onnx checker before the output takes its final name (by path when
            the output has external data, on the skeleton in memory otherwise).
        full_check: with ``check``, also run the checker's shape inference.
        sink: the :class:`DataSink` the fold wrote tensors to; with external data its file
            becomes the output's data file (other tensors are appended to it).
        source: the embedded tensors :func:`bnfold.onnxio.load.load_indexed` left in the
            input model file (``in_place``): they count as embedded, and an embedded
            output gets their bytes copied from that file.
        before_commit: called with the path of the complete model, written under a temporary
            name in the output folder (its data file already complete), before it takes its
            final name: e.g. to run it in onnxruntime.  If it raises, nothing is left and the
            old output is untouched.
        temps: where the temporary files are recorded (the caller's cleanup removes them too).

    Returns:
        A :class:`WriteResult`.

    Raises:
        OutputError: the output cannot be written (nothing is left behind).
        ModelLoadError: ``check`` found the model invalid (nothing is left behind).
    """
    src_dir = os.path.abspath(base_dir or os.getcwd())
    target = resolve_target(path)
    folder, name = os.path.split(target.path)
    reads, any_external, embedded = _survey(model, src_dir, sink, source)
    protected = {os.path.realpath(p) for p in protect} | reads
    if target.path in protected:
        raise OutputError(f"{path}: is a data file of the input model; choose another output name")
    auto = False
    if external is None:
        external = any_external
        if not external and embedded > MAX_PROTOBUF:
            external = auto = True
    elif not external and embedded > MAX_PROTOBUF:
        raise OutputError(
            f"{path}: the model is over 2 GB, protobuf's limit for one file: it needs external data "
            "(drop --no-external-data)"
        )
    temps = temps if temps is not None else Temps()
    if sink is not None:
        sink.close()  # every folded value is in its file
    mine: list[str] = []  # what this call created, removed if it fails
    held: int | None = None  # the lock that tells other runs our data file is in use
    syncing: _Background | None = None
    try:
        data_path = None
        if external:
            data_path, held, syncing = _write_data(
                model, src_dir, target.path, size_threshold, sink, protected, temps, mine
            )
        else:
            # Initializers the fold staged in the sink are streamed from its file into the
            # model file by write_proto (no copy through Python).
            embed_external(model, src_dir, stream=sink, source=source)
        if sink is not None and external:
            sink.discard()  # its file is the data file now, or was copied into it
        if check and data_path is None:
            check_model(model, path, full=full_check)
        model_tmp = temps.create(folder, name, path)
        mine.append(model_tmp)
        with open(model_tmp, "r+b") as f:
            stores = () if external else tuple(x for x in (sink, source) if x is not None)
            size = write_proto(model, f, stores)
            f.flush()
            os.fsync(f.fileno())
        give_identity(model_tmp, target.existing)
        if data_path is not None:
            give_identity(data_path, target.existing)
            size += os.path.getsize(data_path)
            if check:
                check_model_path(model_tmp, path, full=full_check)
            if syncing is not None:
                syncing.result()  # the data is on disk before the model can name it
        if before_commit is not None:
            before_commit(model_tmp)
        with folder_lock(folder):
            os.replace(model_tmp, target.path)
            for p in mine:
                temps.keep(p)
            mine.clear()
            if held is not None:
                # Committed: from now on the data file is the output's, or a later run's
                # to retire.  Released inside the folder lock, so no other run can find it
                # committed yet still marked "in use" (it would outlive both runs).
                os.close(held)
                held = None
            removed = _remove_old_data(folder, name, data_path, protected)
        fsync_dir(folder)
    except BaseException as e:
        if syncing is not None:
            syncing.join()
        for p in mine:
            temps.remove(p)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e
        raise
    finally:
        if held is not None:
            os.close(held)
    links = target.existing.st_nlink - 1 if target.existing is not None else 0
    return WriteResult(target.path, data_path, size, data_path is not None, auto, links, removed)


def _survey(
    model: onnx.ModelProto, src_dir: str, sink: DataSink | None, source: EmbeddedSource | None
) -> tuple[set[str], bool, int]:
    """One walk: the input data files the model reads, whether any tensor is external, embedded size."""
    files: set[str] = set()
    stats: dict[str, os.stat_result] = {}
    size, external = 4096 + 256 * len(model.graph.node), False
    for t, _ in model_tensors(model):
        if sink is not None and sink.holds(t):
            size += sink.length(t) + 64
        elif source is not None and source.holds(t):
            size += source.ref(t).length + 64
        elif is_external(t):
            ref = external_ref(t, src_dir, stats)
            files.add(os.path.realpath(ref.path))
            size += ref.length + 64
            external = True
        else:
            size += (tensor_nbytes(t) or 0) + 64
    return files, external, size


def _write_data(
    model: onnx.ModelProto,
    src_dir: str,
    target: str,
    threshold: int,
    sink: DataSink | None,
    protected: set[str],
    temps: Temps,
    mine: list[str],
) -> tuple[str | None, int | None, _Background | None]:
    """Write the data file and give it a fresh name: ``(its path, the fd holding its lock, its sync)``."""
    folder, name = os.path.split(target)
    adopt = sink is not None and sink.tmp is not None and sink.folder == folder and sink_is_packed(model, sink)
    if adopt:
        assert sink is not None and sink.tmp is not None
        temps.adopt(sink.tmp)  # recorded here before the sink lets go of it
        mine.append(sink.tmp)
        data_tmp, start = sink.take_file()
    else:
        data_tmp, start = temps.create(folder, name + ".data", target), 0
        mine.append(data_tmp)
    filled = fill_data_file(model, src_dir, data_tmp, threshold, start=start, sink=sink, adopted=adopt)
    if not filled.placements:
        temps.remove(data_tmp)
        mine.remove(data_tmp)
        return None, None, None
    protected = protected | filled.sources
    with folder_lock(folder):  # no other bnfold claims a name meanwhile
        data_name = _free_data_name(folder, name, protected)
        data_path = os.path.join(folder, data_name)
        temps.adopt(data_path)
        mine.append(data_path)
        os.rename(data_tmp, data_path)  # a name no file has: nothing is replaced
        temps.keep(data_tmp)
        mine.remove(data_tmp)
        held = lock_file(data_path)
    syncing = _Background(fsync_path, data_path)  # while the model file is written
    for p in filled.placements:
        set_external(p.tensor, data_name, p.offset, p.length)
    return data_path, held, syncing


def _free_data_name(folder: str, model_name: str, protected: set[str]) -> str:
    """``<model>.data``, or ``<model>.1.data``...: the first name no file has."""
    k = 0
    while True:
        data_name = f"{model_name}.data" if k == 0 else f"{model_name}.{k}.data"
        path = os.path.join(folder, data_name)
        if not os.path.lexists(path) and os.path.realpath(path) not in protected:
            return data_name
        k += 1


def _remove_old_data(folder: str, model_name: str, keep: str | None, protected: set[str]) -> tuple[str, ...]:
    """Remove the data files of a replaced output: named like this output's, unused (call under the lock)."""
    pattern = re.compile(re.escape(model_name) + r"(\.[0-9]+)?\.data")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return ()
    for n in names:
        path = os.path.join(folder, n)
        if not pattern.fullmatch(n) or path == keep or os.path.realpath(path) in protected:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        # A link or a hard-linked file may be another model's: left alone.  A file a
        # running bnfold holds is its new data file, not yet committed.
        if not os.path.isfile(path) or os.path.islink(path) or st.st_nlink > 1 or is_locked(path):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return tuple(removed)


class _Background:
    """Run ``fn(path)`` in a thread; :meth:`result` joins and re-raises its error."""

    def __init__(self, fn: Callable[[str], Any], path: str) -> None:
        self._error: BaseException | None = None
        self._path = path
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[str], Any]) -> None:
        try:
            fn(self._path)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
