"""Protobuf wire-format streaming: a model serialized one top-level initializer at a time.

The bytes equal ``model.SerializeToString()``, but no more than one initializer's
serialization is held in memory, and initializers whose bytes lie in a file (staged
in a :class:`~bnfold.onnxio.sink.DataSink`, or left in the input model file by
:mod:`bnfold.onnxio.embedded`) are copied from that file into the model file
without passing through a message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, Protocol

import onnx
from onnx import TensorProto

from bnfold.errors import OutputError
from bnfold.onnxio.fsutil import copy_range, start_writeback
from bnfold.onnxio.load import MAX_PROTOBUF, copy_field, is_repeated
from bnfold.onnxio.tensors import ExternalRef, tensor_nbytes
from bnfold.onnxio.wire import encode_varint


class Held(Protocol):
    """Tensors whose bytes lie in a file the model file is streamed from (a sink, the input model)."""

    def holds(self, t: TensorProto) -> bool: ...

    def length(self, t: TensorProto) -> int: ...

    def ref(self, t: TensorProto) -> ExternalRef: ...


_MODEL_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"]
_RAW_TAG = encode_varint(_RAW_DATA.number << 3 | 2)
_EXTERNAL_FIELDS = {"external_data", "data_location"}


def _split(msg: Any, number: int, cls: Any) -> tuple[Any, Any]:
    """Two copies of ``msg`` without field ``number``: fields below it, fields above it."""
    lo, hi = cls(), cls()
    for fd, value in msg.ListFields():
        if fd.number != number:
            copy_field(lo if fd.number < number else hi, fd, value)
    return lo, hi


def streamable(t: TensorProto, store: Held) -> bool:
    """An initializer ``store`` holds whose other fields all precede raw_data."""
    if not store.holds(t):
        return False
    return all(fd.number < _RAW_DATA.number or fd.name in _EXTERNAL_FIELDS for fd, _ in t.ListFields())


def _bare(t: TensorProto) -> TensorProto:
    """``t`` without its external-data fields (what the embedded tensor holds but raw_data)."""
    bare = TensorProto()
    for fd, value in t.ListFields():
        if fd.name not in _EXTERNAL_FIELDS:
            copy_field(bare, fd, value)
    return bare


def _fields_but_raw(t: TensorProto) -> Iterator[tuple[Any, Any]]:
    for fd in TensorProto.DESCRIPTOR.fields:
        if fd is _RAW_DATA or fd.name == "raw_data":
            continue
        value = getattr(t, fd.name)
        if is_repeated(fd):
            if len(value):
                yield fd, value
        elif t.HasField(fd.name):
            yield fd, value


def _holder(t: TensorProto, stores: Sequence[Held]) -> Held | None:
    return next((s for s in stores if s.holds(t)), None)


def _tensor_size(t: TensorProto, store: Held | None) -> int:
    """Serialized size of an initializer (computed without copying its raw data)."""
    if store is not None:  # embedded from the store's file by _write_streamed
        n = store.length(t)
        return len(_bare(t).SerializeToString()) + len(_RAW_TAG) + len(encode_varint(n)) + n
    bare = TensorProto()
    for fd, value in t.ListFields() if not t.HasField("raw_data") else _fields_but_raw(t):
        copy_field(bare, fd, value)
    if not t.HasField("raw_data"):
        return len(bare.SerializeToString())
    nbytes = tensor_nbytes(t)
    n = len(t.raw_data) if nbytes is None else nbytes
    return len(bare.SerializeToString()) + 1 + len(encode_varint(n)) + n


class _SizeMismatch(Exception):
    pass


def write_proto(model: onnx.ModelProto, f: BinaryIO, stores: Sequence[Held] = ()) -> int:
    """Serialize ``model`` into ``f`` one top-level initializer at a time; return the bytes written.

    Initializers one of ``stores`` holds are embedded from its file (see :func:`streamable`).
    """
    start = f.tell()
    try:
        return _write_streamed(model, f, stores)
    except _SizeMismatch:
        if any(_holder(t, stores) is not None for t in model.graph.initializer):
            raise OutputError("cannot serialize the model: a staged tensor's size does not match") from None
        f.seek(start)
        f.truncate()
        data = model.SerializeToString()
        f.write(data)
        return len(data)


def _write_streamed(model: onnx.ModelProto, f: BinaryIO, stores: Sequence[Held]) -> int:
    if not model.HasField("graph"):
        data = model.SerializeToString()
        f.write(data)
        return len(data)
    head, tail = _split(model, _MODEL_GRAPH_FIELD, onnx.ModelProto)
    g_head, g_tail = _split(model.graph, _GRAPH_INIT_FIELD, onnx.GraphProto)
    g_head_b, g_tail_b = g_head.SerializeToString(), g_tail.SerializeToString()
    init_tag = encode_varint(_GRAPH_INIT_FIELD << 3 | 2)
    holders = [_holder(t, stores) for t in model.graph.initializer]
    sizes = [_tensor_size(t, h) for t, h in zip(model.graph.initializer, holders, strict=True)]
    graph_len = len(g_head_b) + len(g_tail_b) + sum(len(init_tag) + len(encode_varint(s)) + s for s in sizes)
    if graph_len > MAX_PROTOBUF:
        raise OutputError("the model is over 2 GB, protobuf's limit: write it with external data")
    total = 0
    for piece in (
        head.SerializeToString(),
        encode_varint(_MODEL_GRAPH_FIELD << 3 | 2),
        encode_varint(graph_len),
        g_head_b,
    ):
        f.write(piece)
        total += len(piece)
    buf: bytearray | None = None
    sources: dict[str, BinaryIO] = {}
    try:
        for t, h, s in zip(model.graph.initializer, holders, sizes, strict=True):
            f.write(init_tag)
            f.write(encode_varint(s))
            if h is not None:
                n = h.length(t)
                lead = _bare(t).SerializeToString() + _RAW_TAG + encode_varint(n)
                f.write(lead)
                ref = h.ref(t)
                if buf is None:
                    buf = bytearray(8 << 20)
                src = sources.get(ref.path)
                if src is None:
                    src = sources[ref.path] = open(ref.path, "rb")
                start = f.tell()
                copy_range(src, f, ref.offset, n, buf)
                start_writeback(f.fileno(), start, n)  # the final fsync has little left
                if len(lead) + n != s:
                    raise OutputError(f"{t.name}: staged tensor size changed while writing")
            else:
                b = t.SerializeToString()
                if len(b) != s:
                    raise _SizeMismatch
                f.write(b)
                del b
            total += len(init_tag) + len(encode_varint(s)) + s
    finally:
        for src in sources.values():
            src.close()
    for piece in (g_tail_b, tail.SerializeToString()):
        f.write(piece)
        total += len(piece)
    return total
