"""Embedded weights left in the model file: big initializers become references to their own bytes.

``onnx.load`` of a 100 MB model copies every weight twice (the file into one bytes
object, then into the message) before a fold reads the few it changes, and the
writer serializes them all again.  :func:`load_in_place` instead walks the file's
protobuf wire format (field headers only, with small reads) and parses the model
without the ``raw_data`` of every top-level initializer of at least
:data:`IN_PLACE_MIN` bytes.  Each such initializer becomes an ordinary external-data
reference to where its bytes lie in the model file itself (``location`` = the
file's name, ``offset``/``length`` = its ``raw_data``), so every validated reader
reads it unchanged.  The :class:`EmbeddedSource` remembers which references are
really embedded data: the writer embeds them again, copying the bytes from file
to file, and the input model is never counted as a data file of itself.

Anything unusual (a malformed file, a field the shortcut cannot carry over, a
model file that is not a plain file of its folder) falls back to ``onnx.load``,
so bad input gets the same error and the same model as before.
"""

from __future__ import annotations

import os

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bnfold.errors import ModelLoadError
from bnfold.onnxio.tensors import ExternalRef, external_entries, external_ref, is_external, set_external, tensor_nbytes
from bnfold.onnxio.wire import LEN, encode_varint

#: Smallest ``raw_data`` (bytes) left in the file: smaller ones are cheaper parsed.
IN_PLACE_MIN = 1024

_CHUNK = 1 << 20  # bytes read at once while walking field headers
_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INIT = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


class _Malformed(Exception):
    """The wire walk met something it does not carry over: load the usual way."""


class EmbeddedSource:
    """The initializers of one model file that :func:`load_in_place` left in the file.

    ``holds(t)`` is True for a tensor that is still such a reference (same location,
    offset and length); a fold that changes a weight replaces the reference, so only
    untouched tensors stay held.
    """

    def __init__(self, path: str, spans: dict[int, int]) -> None:
        self.path = os.path.abspath(path)
        self.base_dir = os.path.dirname(self.path)
        self.location = os.path.basename(self.path)
        self.spans = spans  # raw_data offset -> length
        self._stats: dict[str, os.stat_result] = {}

    def holds(self, t: TensorProto) -> bool:
        """True when ``t`` is one of the embedded tensors left in the model file."""
        if not is_external(t):
            return False
        e = external_entries(t)
        if e.get("location") != self.location:
            return False
        try:
            offset, length = int(e.get("offset", "")), int(e.get("length", ""))
        except ValueError:
            return False
        return self.spans.get(offset) == length

    def ref(self, t: TensorProto) -> ExternalRef:
        """Where a held tensor's bytes are (validated like any external reference)."""
        return external_ref(t, self.base_dir, self._stats)

    def length(self, t: TensorProto) -> int:
        """Bytes of a held tensor."""
        return self.ref(t).length


class _File:
    """Random access to a file through one cached chunk (no memory map: a file cut short raises, never SIGBUS)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.buf, self.base = b"", 0

    def take(self, off: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``off``."""
        i = off - self.base
        if 0 <= i and i + n <= len(self.buf):
            return self.buf[i : i + n]
        if n >= _CHUNK:
            data = os.pread(self.fd, n, off)
            parts = [data]
            got = len(data)
            while got < n:
                more = os.pread(self.fd, n - got, off + got)
                if not more:
                    raise _Malformed("file ended early")
                parts.append(more)
                got += len(more)
            return data if len(parts) == 1 else b"".join(parts)
        self.buf, self.base = os.pread(self.fd, _CHUNK, off), off
        if len(self.buf) < n:
            raise _Malformed("file ended early")
        return self.buf[:n]

    def varint(self, off: int, end: int) -> tuple[int, int]:
        """The varint at ``off`` (before ``end``) and the offset after it."""
        i = off - self.base
        if not (0 <= i and i + 10 <= len(self.buf)):
            self.buf, self.base = os.pread(self.fd, _CHUNK, off), off
            i = 0
        buf = self.buf
        result = shift = 0
        for k in range(i, min(i + 10, len(buf), i + end - off)):
            b = buf[k]
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, off + k - i + 1
            shift += 7
        raise _Malformed("bad varint")


def _fields(src: _File, start: int, end: int):  # type: ignore[no-untyped-def]
    """Yield ``(number, wire_type, field_start, value_start, value_end)`` of every field in ``[start, end)``."""
    pos = start
    while pos < end:
        tag, p = src.varint(pos, end)
        number, wt = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wt == 0:
            _, q = src.varint(p, end)
        elif wt == 1:
            q = p + 8
        elif wt == 5:
            q = p + 4
        elif wt == LEN:
            n, p = src.varint(p, end)
            q = p + n
        else:
            raise _Malformed("group fields")
        if q > end:
            raise _Malformed("field runs past its message")
        yield number, wt, pos, p, q
        pos = q


def _walk(src: _File, minimum: int) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The model's bytes without the big raw data, and the cuts made.

    A cut is ``(raw_data offset, length, index in graph.initializer)`` (no cuts: no bytes).
    """
    graphs = [f for f in _fields(src, 0, src.size) if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != LEN:
        raise _Malformed("not exactly one graph")  # protobuf would merge several
    _, _, g_field, g_start, g_end = graphs[0]
    body: list[bytes] = []
    cuts: list[tuple[int, int, int]] = []
    keep_from = g_start  # start of the run of graph bytes copied as they are
    n_init = 0
    for number, wt, f_start, v_start, v_end in _fields(src, g_start, g_end):
        if number != _GRAPH_INIT or wt != LEN:
            continue
        k, n_init = n_init, n_init + 1
        if v_end - v_start < minimum:
            continue
        raws = [f for f in _fields(src, v_start, v_end) if f[0] == _RAW_DATA]
        if len(raws) != 1 or raws[0][1] != LEN or raws[0][4] - raws[0][3] < minimum:
            continue
        _, _, r_field, r_start, r_end = raws[0]
        if f_start > keep_from:
            body.append(src.take(keep_from, f_start - keep_from))
        head, tail = src.take(v_start, r_field - v_start), src.take(r_end, v_end - r_end)
        body += [encode_varint(_GRAPH_INIT << 3 | LEN), encode_varint(len(head) + len(tail)), head, tail]
        keep_from = v_end
        cuts.append((r_start, r_end - r_start, k))
    if not cuts:
        return b"", []
    body.append(src.take(keep_from, g_end - keep_from))
    graph = b"".join(body)
    head = src.take(0, g_field)
    tail = src.take(g_end, src.size - g_end)
    return b"".join([head, encode_varint(_MODEL_GRAPH << 3 | LEN), encode_varint(len(graph)), graph, tail]), cuts


def count_initializers(path: str) -> int | None:
    """How many top-level initializers a model file has, from its wire format (None: cannot tell)."""
    try:
        with open(path, "rb", buffering=0) as f:
            src = _File(f.fileno(), os.fstat(f.fileno()).st_size)
            graphs = [x for x in _fields(src, 0, src.size) if x[0] == _MODEL_GRAPH]
            if len(graphs) != 1 or graphs[0][1] != LEN:
                return None
            _, _, _, start, end = graphs[0]
            return sum(1 for x in _fields(src, start, end) if x[0] == _GRAPH_INIT)
    except (_Malformed, OSError):
        return None


def load_in_place(path: str, minimum: int | None = None) -> tuple[onnx.ModelProto, EmbeddedSource] | None:
    """Parse ``path`` leaving top-level initializers of ``minimum`` bytes or more in the file.

    ``minimum`` defaults to :data:`IN_PLACE_MIN`; see the module docstring.

    None when nothing is left in the file or the shortcut does not apply: the caller
    loads the usual way (and reports any error the usual way).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:  # one descriptor for the walk and for the raw data read back
        src = _File(fd, os.fstat(fd).st_size)
        data, cuts = _walk(src, IN_PLACE_MIN if minimum is None else minimum)
        if not cuts:
            return None
        model = onnx.ModelProto.FromString(data)
        source = EmbeddedSource(path, {})
        inits = model.graph.initializer
        restore = []
        for offset, length, k in cuts:
            if k >= len(inits):
                return None
            t = inits[k]
            if _carries_over(t, length):
                set_external(t, source.location, offset, length)
                source.spans[offset] = length
            else:
                restore.append((t, offset, length))
        if not source.spans:
            return None
        # A model file that is a link, a hard link or unreadable is not read as its own data.
        source.ref(next(t for t in inits if source.holds(t)))
        for t, offset, length in restore:
            t.raw_data = src.take(offset, length)
        return model, source
    except (_Malformed, OSError, DecodeError, RuntimeError, ValueError, ModelLoadError):
        return None
    finally:
        os.close(fd)


def _carries_over(t: TensorProto, length: int) -> bool:
    """A tensor whose raw data can be left in the file: no other data fields, the exact byte count."""
    if t.HasField("data_location") or len(t.external_data) or t.HasField("segment"):
        return False
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED) or any(d < 0 for d in t.dims):
        return False
    return tensor_nbytes(t) == length
