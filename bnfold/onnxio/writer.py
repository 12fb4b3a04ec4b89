"""Writing models: atomically, embedded or with one external data file, streamed.

Writing streams: untouched external tensors are copied chunk by chunk from the
input's data files into one fresh data file named after the output, and an
embedded model is serialized one initializer at a time, so neither the model nor
its data is ever held twice in memory and nothing is serialized as one message
over protobuf's 2 GB limit.  Folded weights can go straight to the output's data
file while the fold runs (:class:`DataSink`).

Every file is written under a temporary name in the output folder, fsynced and
renamed into place, so a stale data file next to the output is replaced, never
appended to, and a data file that the input still uses is never touched.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import OutputError
from bnfold.onnxio.fsutil import signals_deferred
from bnfold.onnxio.load import check_model, check_model_path, copy_field, is_repeated
from bnfold.onnxio.tensors import (
    PACKED_BITS,
    PENDING,
    external_data_files,
    external_entries,
    external_ref,
    has_external_data,
    is_external,
    model_tensors,
    read_external,
    tensor_nbytes,
)

#: Largest message protobuf can serialize or parse (``onnx.checker.MAXIMUM_PROTOBUF``).
MAX_PROTOBUF = 2**31 - 1
#: Tensors of at least this many bytes go to the data file when writing external data (onnx's default).
DEFAULT_SIZE_THRESHOLD = 1024
_CHUNK = 16 << 20


# ---------------------------------------------------------------------------
# The data sink: folded tensors go straight to the output's data file
# ---------------------------------------------------------------------------


class DataSink:
    """A fresh data file in the output folder that folded tensors are written to as they are made.

    When the output will have external data, a fold hands every new value of at least
    ``size_threshold`` bytes to :meth:`put`: a background thread writes its bytes to
    the file (from the numpy buffer, no copy; at most ``max_pending`` bytes wait) while
    the fold goes on, and the tensor becomes an external reference to it, so folded
    weights are never held in memory or copied again.  :func:`write_model` appends the
    other tensors and renames the file to ``<output>.data``.  Use it as a context
    manager: leaving the block removes the file unless it was written.
    """

    def __init__(
        self,
        output: str,
        *,
        size_threshold: int = DEFAULT_SIZE_THRESHOLD,
        protect: Iterable[str] = (),
        max_pending: int = 256 << 20,
        durable: bool = True,
    ) -> None:
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise OutputError(f"{output}: output folder {folder} does not exist")
        self.label = output
        self.name = _data_file_name(folder, os.path.basename(output), {os.path.realpath(p) for p in protect})
        self.threshold = size_threshold
        self.tmp: str | None = _mkstemp(folder, self.name, output)
        self.marker = f"#bnfold-pending-{os.path.basename(self.tmp)}"
        self.size = 0
        self._max_pending = max_pending
        self._fd: int | None = os.open(self.tmp, os.O_RDWR)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._pending = 0
        self._error: OSError | None = None
        # A sink whose file becomes the output's data file is flushed to disk as it goes;
        # one that only stages values for an embedded output (durable=False) is not.
        self._unsynced, self._sync_every = 0, (32 << 20) if durable else float("inf")
        self._thread = threading.Thread(target=self._run, name="bnfold-sink", daemon=True)
        self._thread.start()
        PENDING[self.marker] = self

    def put(self, t: TensorProto, value: np.ndarray, name: str) -> bool:
        """Write ``value`` for tensor ``t`` (renamed ``name``) when it is big enough; True if taken."""
        value = np.asarray(value)
        if self._fd is None or value.nbytes < self.threshold or value.dtype.byteorder == ">":
            return False
        try:
            data_type = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        except (KeyError, TypeError, ValueError):
            return False
        if data_type in PACKED_BITS or data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            return False
        buf = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        e = external_entries(t) if is_external(t) else {}
        if e.get("location") == self.marker and int(e["length"]) == buf.nbytes:
            offset = int(e["offset"])  # a second fold into the same tensor: overwrite in place
        else:
            offset = self.size
            self.size += buf.nbytes
        with self._cv:
            while self._pending and self._pending + buf.nbytes > self._max_pending:
                self._cv.wait()
            self._pending += buf.nbytes
        self._queue.put((buf, offset))
        self._raise()
        t.Clear()
        t.name, t.data_type = name, data_type
        t.dims.extend(value.shape)
        _set_external(t, self.marker, offset, buf.nbytes)
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            buf, offset = item
            try:
                if self._error is None and self._fd is not None:
                    _pwrite_all(self._fd, buf, offset)
                    # Flush to disk as we go (this thread only), so the final fsync has little left.
                    self._unsynced += buf.nbytes
                    if self._unsynced >= self._sync_every:
                        os.fdatasync(self._fd)
                        self._unsynced = 0
            except OSError as e:
                self._error = e
            with self._cv:
                self._pending -= buf.nbytes
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise OutputError(f"{self.label}: cannot write ({self._error.strerror or self._error})")

    def wait(self) -> None:
        """Block until every value handed to :meth:`put` is in the file."""
        with self._cv:
            while self._pending:
                self._cv.wait()
        self._raise()

    def close(self) -> None:
        """Finish writing (the file stays until :meth:`discard` or :func:`write_model` takes it)."""
        if self._fd is None:
            return
        try:
            self.wait()
        finally:
            self._queue.put(None)
            self._thread.join()
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the file (unless :func:`write_model` already renamed it into place)."""
        try:
            self.close()
        finally:
            PENDING.pop(self.marker, None)
            if self.tmp is not None:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
                self.tmp = None

    def __enter__(self) -> DataSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


@dataclass
class WriteResult:
    """What :func:`write_model` wrote."""

    path: str
    data_path: str | None  # the external data file, when there is one
    size: int  # bytes of the model file plus its data file
    external: bool  # written with external data
    auto_external: bool  # switched to external data because the model is over 2 GB


def embedded_size(model: onnx.ModelProto, base_dir: str) -> int:
    """Upper estimate of the model's size with every tensor embedded (nothing is serialized)."""
    size, stats = 4096 + 256 * len(model.graph.node), {}
    for t, _ in model_tensors(model):
        if is_external(t):
            size += external_ref(t, base_dir, stats).length + 64
        else:
            size += (tensor_nbytes(t) or 0) + 64
    return size


def plan_layout(model: onnx.ModelProto, base_dir: str, external: bool | None = None) -> tuple[bool, bool]:
    """Decide how the output stores its tensors, before folding: ``(external, automatic)``.

    ``external`` None keeps the model's layout (external when any tensor is) and picks
    external data when the model is over protobuf's 2 GB limit (``automatic`` True).

    Raises:
        OutputError: ``external`` is False but the model cannot be embedded (over 2 GB).
    """
    if external is None:
        if has_external_data(model):
            return True, False
        if embedded_size(model, base_dir) > MAX_PROTOBUF:
            return True, True
        return False, False
    if not external and embedded_size(model, base_dir) > MAX_PROTOBUF:
        raise OutputError(
            "the model is over 2 GB, protobuf's limit for one file: it needs external data (drop --no-external-data)"
        )
    return external, False


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
    before_commit: Callable[[str], None] | None = None,
) -> WriteResult:
    """Write ``model`` to ``path`` atomically, with its data embedded or in one external data file.

    Args:
        model: the model; external tensors are relative to ``base_dir``.  It is updated in
            place: after the call, its external tensors point at the written data file
            (relative to the output folder).  Discard it if the call raised.
        path: the output model file.
        base_dir: folder the model's current external locations are relative to (default: cwd).
        external: True writes tensors of at least ``size_threshold`` bytes to
            ``<output>.data``; False embeds everything (refused over 2 GB); None keeps the
            model's layout (external when any tensor is external) and switches to external
            data when the model is over 2 GB.
        size_threshold: smallest tensor (in bytes) that goes to the data file.
        protect: files that must not be written (the input's data files are always protected);
            when the default data file name is one of them, ``<output>.1.data`` (and so on) is used.
        check: run the onnx checker before the output takes its final name (by path when
            the output has external data, on the skeleton in memory otherwise).
        before_commit: called with the path of the complete model, written under a temporary
            name in the output folder (its data file already in place), before it takes its
            final name: e.g. to run it in onnxruntime by path.  If it raises, nothing is left.
        full_check: with ``check``, also run the checker's shape inference.
        sink: the :class:`DataSink` the fold wrote tensors to; with external data its file
            becomes the output's data file (other tensors are appended to it).

    Returns:
        A :class:`WriteResult`.

    Raises:
        OutputError: the output cannot be written (nothing is left behind).
        ModelLoadError: ``check`` found the model invalid (nothing is left behind).
    """
    src_dir = os.path.abspath(base_dir or os.getcwd())
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: output folder {folder} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder")
    protected = {os.path.realpath(p) for p in protect} | external_data_files(model, src_dir)
    if os.path.realpath(path) in protected:
        raise OutputError(f"{path}: is a data file of the input model; choose another output name")
    auto = False
    if external is None:
        external = has_external_data(model)
        if not external and embedded_size(model, src_dir) > MAX_PROTOBUF:
            external = auto = True
    elif not external and embedded_size(model, src_dir) > MAX_PROTOBUF:
        raise OutputError(
            f"{path}: the model is over 2 GB, protobuf's limit for one file: it needs external data "
            "(drop --no-external-data)"
        )

    if sink is not None:
        sink.close()  # every folded value is in its file
    tmps: list[str] = []
    committed: list[str] = []
    syncing: _Background | None = None
    try:
        data_path = None
        if external:
            with signals_deferred():  # a signal must not land between creating and recording it
                data_name, data_tmp, start = _take_data_file(model, sink, folder, path, protected, src_dir)
                tmps.append(data_tmp)
            if _write_external(model, src_dir, data_tmp, data_name, size_threshold, start):
                data_path = os.path.join(folder, data_name)
                # The data must be on disk before the model takes its name; sync it meanwhile.
                syncing = _Background(_fsync_path, data_tmp)
            else:
                os.unlink(data_tmp)
                tmps.remove(data_tmp)
        else:
            # Top-level initializers the fold staged in the sink are streamed from its
            # file into the model file by write_proto (no copy through Python).
            _embed_external(model, src_dir, stream=sink)
        if sink is not None and external:
            sink.discard()
        if check and data_path is None:
            check_model(model, path, full=full_check)
        with signals_deferred():
            model_tmp = _mkstemp(folder, os.path.basename(path), path)
            tmps.append(model_tmp)
        with open(model_tmp, "wb") as f:
            size = write_proto(model, f)
            f.flush()
            os.fsync(f.fileno())
        if data_path is not None:
            os.replace(data_tmp, data_path)
            tmps.remove(data_tmp)
            committed.append(data_path)
            size += os.path.getsize(data_path)
            if check:
                check_model_path(model_tmp, path, full=full_check)
            if syncing is not None:
                syncing.result()
        if before_commit is not None:
            before_commit(model_tmp)
        os.replace(model_tmp, path)
        tmps.remove(model_tmp)
        committed.clear()
        _fsync_dir(folder)
    except BaseException as e:
        if syncing is not None:
            syncing.join()
        for t in [*tmps, *committed]:
            try:
                os.unlink(t)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({e.strerror or e})") from e
        raise
    return WriteResult(os.path.abspath(path), data_path, size, data_path is not None, auto)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _mkstemp(folder: str, name: str, label: str) -> str:
    """A new empty file in ``folder`` (hidden temp name) with the mode a new file gets."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(f"{label}: cannot write ({e.strerror or e})") from e
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files
    except OSError:
        pass
    os.close(fd)
    return tmp


def _take_data_file(
    model: onnx.ModelProto, sink: DataSink | None, folder: str, path: str, protected: set[str], src_dir: str
) -> tuple[str, str, int]:
    """The data file to write: the sink's (kept bytes up to ``start``) when every byte of it
    is still used, else a fresh one.  Returns ``(name, temp path, start)``."""
    if (
        sink is not None
        and sink.tmp is not None
        and os.path.dirname(sink.tmp) == folder
        and _sink_is_packed(model, sink, src_dir)
    ):
        name, tmp, start = sink.name, sink.tmp, sink.size
        sink.tmp = None  # the file is write_model's now: renamed or removed by it
        PENDING[sink.marker] = _Moved(tmp)
        return name, tmp, start
    name = _data_file_name(folder, os.path.basename(path), protected)
    return name, _mkstemp(folder, name, path), 0


class _Background:
    """Run ``fn(*args)`` in a thread; :meth:`result` joins and re-raises its error."""

    def __init__(self, fn, *args: object) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done : done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError("short write")
        done += n


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _data_file_name(folder: str, model_name: str, protected: set[str]) -> str:
    """``<model>.data``, or ``<model>.1.data``... when that name is a file the input uses."""
    name, k = f"{model_name}.data", 0
    while os.path.realpath(os.path.join(folder, name)) in protected:
        k += 1
        name = f"{model_name}.{k}.data"
    return name


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    keep = [(e.key, e.value) for e in t.external_data if e.key == "checksum"]
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length)), *keep):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to the end of ``dst``, in chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        dst.flush()
        out_off = dst.tell()
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(length - done, 1 << 30), offset + done)
                if n <= 0:
                    break
                done += n
        except OSError:
            pass
        dst.seek(out_off + done)
    src.seek(offset + done)
    while done < length:
        chunk = src.read(min(_CHUNK, length - done))
        if not chunk:
            raise OutputError(f"{src.name}: external data ended early")
        dst.write(chunk)
        done += len(chunk)


class _Moved:
    """A sink whose file :func:`write_model` has taken over (its tensors are still read from it)."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp


def _sink_is_packed(model: onnx.ModelProto, sink: DataSink, src_dir: str) -> bool:
    """True when every byte of the sink's file belongs to a tensor of the model (no dead values)."""
    live = 0
    for t, _ in model_tensors(model):
        if is_external(t) and external_entries(t).get("location") == sink.marker:
            live += int(external_entries(t)["length"])
    return live == sink.size


def _write_external(
    model: onnx.ModelProto, src_dir: str, data_tmp: str, data_name: str, threshold: int, start: int = 0
) -> bool:
    """Move every external tensor and every embedded initializer of at least ``threshold`` bytes
    into ``data_tmp`` after its first ``start`` bytes (external tensors are copied in chunks,
    never loaded); point them at ``data_name``.  Tensors already in ``data_tmp`` (a sink's
    file taken over) only change location.  Returns True when the data file holds any tensor."""
    sources: dict[str, BinaryIO] = {}
    stats: dict[str, os.stat_result] = {}
    any_external = start > 0
    try:
        with open(data_tmp, "r+b") as out:
            out.seek(start)
            out.truncate()
            for t, is_init in model_tensors(model):
                if is_external(t) and external_entries(t).get("location") in PENDING and _in_file(t, data_tmp):
                    e = external_entries(t)
                    _set_external(t, data_name, int(e["offset"]), int(e["length"]))
                elif is_external(t):
                    ref = external_ref(t, src_dir, stats)
                    src = sources.get(ref.path)
                    if src is None:
                        src = sources[ref.path] = open(ref.path, "rb")
                    offset = out.tell()
                    _copy_range(src, out, ref.offset, ref.length)
                    _set_external(t, data_name, offset, ref.length)
                    any_external = True
                elif is_init and t.HasField("raw_data") and (tensor_nbytes(t) or threshold) >= threshold:
                    raw = t.raw_data
                    if len(raw) < threshold:
                        continue
                    offset = out.tell()
                    out.write(raw)
                    t.ClearField("raw_data")
                    _set_external(t, data_name, offset, len(raw))
                    del raw
                    any_external = True
            out.flush()
    finally:
        for f in sources.values():
            f.close()
        for k in [k for k, v in PENDING.items() if isinstance(v, _Moved) and v.tmp == data_tmp]:
            del PENDING[k]  # its tensors now point at the data file's final name
    return any_external


def _in_file(t: TensorProto, path: str) -> bool:
    sink = PENDING.get(external_entries(t).get("location", ""))
    return sink is not None and sink.tmp == path


def _embed_external(model: onnx.ModelProto, src_dir: str, stream: DataSink | None = None) -> None:
    """Read every external tensor into the model (the output is one self-contained file).

    Top-level initializers in ``stream``'s file stay references: :func:`write_proto`
    copies their bytes from that file straight into the model file.
    """
    top = {t.name for t in model.graph.initializer} if stream is not None else set()
    for t, is_init in model_tensors(model):
        if is_init and t.name in top and _streamable(t, stream):
            continue
        if is_external(t):
            data = read_external(t, src_dir)
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = data


# ---------------------------------------------------------------------------
# Streaming serialization
# ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_MODEL_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"]


def _split(msg, number: int, cls):
    """Two copies of ``msg`` without field ``number``: fields below it, fields above it."""
    lo, hi = cls(), cls()
    for fd, value in msg.ListFields():
        if fd.number != number:
            copy_field(lo if fd.number < number else hi, fd, value)
    return lo, hi


_RAW_TAG = _varint(_RAW_DATA.number << 3 | 2)
_EXTERNAL_FIELDS = {"external_data", "data_location"}


def _staged(t: TensorProto) -> bool:
    """A tensor whose bytes are still in a sink's file (written by the fold, not yet placed)."""
    return is_external(t) and external_entries(t).get("location") in PENDING


def _streamable(t: TensorProto, sink: DataSink) -> bool:
    """An initializer held in the sink's file, whose other fields all precede raw_data."""
    if not is_external(t) or external_entries(t).get("location") != sink.marker:
        return False
    return all(fd.number < _RAW_DATA.number or fd.name in _EXTERNAL_FIELDS for fd, _ in t.ListFields())


def _bare(t: TensorProto) -> TensorProto:
    """``t`` without its external-data fields (what the embedded tensor holds but raw_data)."""
    bare = TensorProto()
    for fd, value in t.ListFields():
        if fd.name not in _EXTERNAL_FIELDS:
            copy_field(bare, fd, value)
    return bare


def _tensor_size(t: TensorProto) -> tuple[int, int]:
    """Serialized size of an initializer (computed without copying its raw data), and its raw length."""
    if _staged(t):  # in a sink's file: embedded from it by _write_streamed
        n = int(external_entries(t)["length"])
        return len(_bare(t).SerializeToString()) + len(_RAW_TAG) + len(_varint(n)) + n, n
    bare = TensorProto()
    for fd, value in t.ListFields() if not t.HasField("raw_data") else _fields_but_raw(t):
        copy_field(bare, fd, value)
    if not t.HasField("raw_data"):
        return len(bare.SerializeToString()), 0
    n = tensor_nbytes(t)
    if n is None:
        n = len(t.raw_data)
    return len(bare.SerializeToString()) + 1 + len(_varint(n)) + n, n


def _fields_but_raw(t: TensorProto):
    for fd in TensorProto.DESCRIPTOR.fields:
        if fd is _RAW_DATA or fd.name == "raw_data":
            continue
        value = getattr(t, fd.name)
        if is_repeated(fd):
            if len(value):
                yield fd, value
        elif t.HasField(fd.name):
            yield fd, value


class _SizeMismatch(Exception):
    pass


def write_proto(model: onnx.ModelProto, f: BinaryIO) -> int:
    """Serialize ``model`` into ``f`` one top-level initializer at a time; return the bytes written.

    The bytes equal ``model.SerializeToString()`` while never holding more than one
    initializer's serialization in memory.
    """
    start = f.tell()
    try:
        return _write_streamed(model, f)
    except _SizeMismatch:
        if any(_staged(t) for t in model.graph.initializer):
            raise OutputError("cannot serialize the model: a staged tensor's size does not match") from None
        f.seek(start)
        f.truncate()
        data = model.SerializeToString()
        f.write(data)
        return len(data)


def _write_streamed(model: onnx.ModelProto, f: BinaryIO) -> int:
    if not model.HasField("graph"):
        data = model.SerializeToString()
        f.write(data)
        return len(data)
    head, tail = _split(model, _MODEL_GRAPH_FIELD, onnx.ModelProto)
    g_head, g_tail = _split(model.graph, _GRAPH_INIT_FIELD, onnx.GraphProto)
    g_head_b, g_tail_b = g_head.SerializeToString(), g_tail.SerializeToString()
    init_tag = _varint(_GRAPH_INIT_FIELD << 3 | 2)
    sizes = [_tensor_size(t)[0] for t in model.graph.initializer]
    graph_len = len(g_head_b) + len(g_tail_b) + sum(len(init_tag) + len(_varint(s)) + s for s in sizes)
    if graph_len > MAX_PROTOBUF:
        raise OutputError("the model is over 2 GB, protobuf's limit: write it with external data")
    total = 0
    for piece in (head.SerializeToString(), _varint(_MODEL_GRAPH_FIELD << 3 | 2), _varint(graph_len), g_head_b):
        f.write(piece)
        total += len(piece)
    for t, s in zip(model.graph.initializer, sizes, strict=True):
        f.write(init_tag)
        f.write(_varint(s))
        if _staged(t):
            ref = external_ref(t, "")  # the sink's file
            head = _bare(t).SerializeToString() + _RAW_TAG + _varint(ref.length)
            f.write(head)
            with open(ref.path, "rb") as src:
                _copy_range(src, f, ref.offset, ref.length)
            if len(head) + ref.length != s:
                raise OutputError(f"{t.name}: staged tensor size changed while writing")
        else:
            b = t.SerializeToString()
            if len(b) != s:
                raise _SizeMismatch
            f.write(b)
            del b
        total += len(init_tag) + len(_varint(s)) + s
    for piece in (g_tail_b, tail.SerializeToString()):
        f.write(piece)
        total += len(piece)
    return total
