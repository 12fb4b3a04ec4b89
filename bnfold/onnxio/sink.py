"""The staging sink: folded weights go from numpy straight to a file next to the output.

A fold hands every big new value to :meth:`DataSink.put`; a background thread
writes its bytes to the sink's file while the fold goes on, and the tensor becomes
a reference to that file under a marker location that only this sink knows
(:meth:`DataSink.holds`).  The writer then makes the file the output's data file
(external data) or streams the values from it into the model file (embedded).
Readers that must see those values are given the sink (:meth:`DataSink.reader`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from bnfold.errors import OutputError
from bnfold.onnxio.buffers import MIN_POOLED, BufferPool
from bnfold.onnxio.fsutil import Temps, pwrite_all, start_writeback
from bnfold.onnxio.layout import DEFAULT_SIZE_THRESHOLD
from bnfold.onnxio.tensors import (
    PACKED_BITS,
    ExternalReader,
    ExternalRef,
    external_entries,
    is_external,
    read_range,
    refuse_big,
    set_external,
)

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class DataSink:
    """A fresh file in the output folder that folded tensors are written to as they are made.

    Values of at least ``size_threshold`` bytes are taken by :meth:`put`: their bytes
    are written from the numpy buffer by a background thread (no copy; at most
    ``max_pending`` bytes wait), and the tensor becomes a reference to the file.
    Use it as a context manager: leaving the block removes the file unless the
    writer took it (:meth:`take_file`).
    """

    def __init__(
        self,
        output: str,
        *,
        size_threshold: int = DEFAULT_SIZE_THRESHOLD,
        max_pending: int = 256 << 20,
        durable: bool = True,
        temps: Temps | None = None,
    ) -> None:
        folder = os.path.dirname(os.path.realpath(output))
        if not os.path.isdir(folder):
            raise OutputError(f"{output}: output folder {folder} does not exist")
        self.label = output
        self.folder = folder
        self.threshold = size_threshold
        self.size = 0
        self._temps = temps if temps is not None else Temps()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self.tmp: str | None = None
        try:
            # Recorded in ``temps`` before it exists: a signal at any moment of this
            # constructor leaves nothing the caller's cleanup does not remove.
            self.tmp = self._temps.create(folder, os.path.basename(output) + ".data", output)
            self.path = self.tmp  # where the values are (tmp is None once the writer took the file)
            self.marker = f"#bnfold-staged-{os.path.basename(self.tmp)}"
            self._max_pending = max_pending
            self._pool = BufferPool()
            self._external: ExternalReader | None = None  # the reader handed to the fold
            self._queue: queue.SimpleQueue[tuple[np.ndarray, int] | None] = queue.SimpleQueue()
            self._cv = threading.Condition()
            self._pending = 0
            self._error: OSError | None = None
            # A sink whose file becomes the output's data file is flushed to disk as it goes;
            # one that only stages values for an embedded output (durable=False) is not.
            self._unsynced, self._sync_every = 0, (64 << 20) if durable else None
            self._fd = os.open(self.tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            self._thread = threading.Thread(target=self._run, name="bnfold-sink", daemon=True)
            self._thread.start()
        except BaseException:
            self.discard()
            raise

    # -- the ValueSink protocol of the fold core --------------------------------------

    def lend(self, shape: tuple[int, ...], dtype: np.dtype, source: np.ndarray | None = None) -> np.ndarray | None:
        """Memory for a value that will be :meth:`put` here, from buffers already written out.

        With ``source``: ``source`` itself when its memory is a buffer this sink's
        :meth:`reader` read a weight into (the product overwrites the weight, which
        stays unchanged in its file), else None.

        It waits, as :meth:`put` does, until the value fits in ``max_pending`` beside the
        values still being written: a fold holds at most one output buffer more than
        the writer, and big models fold in the memory of a few weights.  None for
        small values (fresh memory is cheap there).
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        if self._fd is None or nbytes < max(self.threshold, MIN_POOLED):
            return None
        if source is not None:
            return source if self._external is not None and self._external.owns(source) else None
        self._wait_for_room(nbytes)
        return self._pool.array(shape, dtype)

    def _wait_for_room(self, nbytes: int) -> None:
        """Block while ``nbytes`` more would pass ``max_pending`` beside the values still being written."""
        with self._cv:
            while self._pending and self._pending + nbytes > self._max_pending:
                self._cv.wait()

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
        e = external_entries(t) if self.holds(t) else {}
        if e and int(e["length"]) == buf.nbytes:
            offset = int(e["offset"])  # a second fold into the same tensor: overwrite in place
        else:
            offset = self.size
            self.size += buf.nbytes
        self._wait_for_room(buf.nbytes)
        with self._cv:
            self._pending += buf.nbytes
        self._queue.put((buf, offset))
        self._raise()
        t.Clear()
        t.name, t.data_type = name, data_type
        t.dims.extend(value.shape)
        set_external(t, self.marker, offset, buf.nbytes)
        return True

    # -- what the writer and readers ask ------------------------------------------------

    def holds(self, t: TensorProto) -> bool:
        """True when ``t``'s bytes are in this sink's file."""
        return is_external(t) and any(e.key == "location" and e.value == self.marker for e in t.external_data)

    def length(self, t: TensorProto) -> int:
        """Bytes of a tensor this sink :meth:`holds`."""
        return int(external_entries(t)["length"])

    def ref(self, t: TensorProto) -> ExternalRef:
        """Where a tensor this sink :meth:`holds` lies in its file (every value handed in is written)."""
        self.wait()
        e = external_entries(t)
        return ExternalRef(self.path, self.marker, int(e["offset"]), int(e["length"]))

    def read(self, t: TensorProto) -> bytes:
        """The bytes of a tensor this sink :meth:`holds`."""
        ref = self.ref(t)
        refuse_big(t, ref.length)
        return read_range(ref.path, ref.offset, ref.length)

    def reader(self, base_dir: str) -> Callable[[TensorProto], bytes]:
        """A reader for the fold core: this sink's tensors from its file, others validated from ``base_dir``."""

        external = self._external = ExternalReader(base_dir)

        def read(t: TensorProto) -> bytes:
            return self.read(t) if self.holds(t) else external(t)

        return read

    def take_file(self) -> tuple[str, int]:
        """Hand the file over to the writer (it renames or removes it): ``(path, bytes used)``."""
        self.close()
        if self.tmp is None:
            raise OutputError(f"{self.label}: the staged data file is gone")
        tmp, self.tmp = self.tmp, None
        self._temps.keep(tmp)
        return tmp, self.size

    # -- the background writer -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            buf, offset = item
            n = buf.nbytes
            try:
                if self._error is None and self._fd is not None:
                    pwrite_all(self._fd, buf, offset)
                    if self._sync_every is not None and not start_writeback(self._fd, offset, n):
                        # No way to start writeback alone: flush to disk as we go (this thread
                        # only), so the final fsync has little left.
                        self._unsynced += buf.nbytes
                        if self._unsynced >= self._sync_every:
                            _datasync(self._fd)
                            self._unsynced = 0
            except OSError as e:
                self._error = e
            del buf, item  # the array is released as soon as it is written
            with self._cv:
                self._pending -= n
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise OutputError(f"{self.label}: cannot write ({self._error.strerror or self._error})")

    def wait(self) -> None:
        """Block until every value handed to :meth:`put` is in the file."""
        if self._thread is None:
            return
        with self._cv:
            while self._pending:
                self._cv.wait()
        self._raise()

    def close(self) -> None:
        """Finish writing (the file stays until :meth:`discard`, or the writer takes it)."""
        if self._fd is None:
            return
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                with contextlib.suppress(RuntimeError):  # a signal stopped start(): never started
                    self._thread.join()
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the file (unless the writer took it)."""
        try:
            self.close()
        finally:
            tmp, self.tmp = self.tmp, None
            if tmp is not None:
                self._temps.remove(tmp)

    def __enter__(self) -> DataSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@contextlib.contextmanager
def staging(output: str, temps: Temps, **kw: object) -> Iterator[DataSink]:
    """A :class:`DataSink` for ``output`` whose file is recorded in ``temps`` and removed on leaving."""
    sink = DataSink(output, temps=temps, **kw)  # type: ignore[arg-type]
    try:
        yield sink
    finally:
        sink.discard()
