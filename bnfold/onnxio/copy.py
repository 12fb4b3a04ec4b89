"""Moving tensor bytes: into the output's data file, or back into the model (embedding).

External tensors are copied range by range (:func:`bnfold.onnxio.fsutil.copy_range`:
the kernel copies, or one reused buffer does); they are never loaded whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import BinaryIO

import onnx
from onnx import TensorProto

from bnfold.onnxio.fsutil import CHUNK, copy_range
from bnfold.onnxio.protowire import Held, streamable
from bnfold.onnxio.sink import DataSink
from bnfold.onnxio.tensors import external_ref, is_external, model_tensors, read_external, tensor_nbytes


@dataclass
class Placement:
    """Where one tensor's bytes were put in the data file being written."""

    tensor: TensorProto
    offset: int
    length: int


@dataclass
class Filled:
    """What :func:`fill_data_file` wrote: the tensors placed, and the input files they came from."""

    placements: list[Placement] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)  # real paths of the data files read
    size: int = 0


def sink_is_packed(model: onnx.ModelProto, sink: DataSink) -> bool:
    """True when every byte of the sink's file belongs to a tensor of the model (no dead values)."""
    live = 0
    for t, _ in model_tensors(model):
        if sink.holds(t):
            live += sink.length(t)
    return live == sink.size


def fill_data_file(
    model: onnx.ModelProto,
    src_dir: str,
    data_tmp: str,
    threshold: int,
    *,
    start: int = 0,
    sink: DataSink | None = None,
    adopted: bool = False,
) -> Filled:
    """Put every external tensor and every embedded initializer of at least ``threshold`` bytes
    into ``data_tmp`` after its first ``start`` bytes.

    Tensors the ``sink`` holds stay where they are when its file is ``data_tmp``
    (``adopted``), else they are copied from it.  The tensors' locations are not
    changed here (the caller points them at the data file's final name); embedded
    initializers lose their raw data.
    """
    filled = Filled(size=start)
    sources: dict[str, BinaryIO] = {}
    stats: dict[str, os.stat_result] = {}
    buf: bytearray | None = None
    try:
        with open(data_tmp, "r+b") as out:
            out.seek(start)
            out.truncate()
            for t, is_init in model_tensors(model):
                if sink is not None and sink.holds(t):
                    ref = sink.ref(t)
                    if adopted:
                        filled.placements.append(Placement(t, ref.offset, ref.length))
                        continue
                elif is_external(t):
                    ref = external_ref(t, src_dir, stats)
                    filled.sources.add(os.path.realpath(ref.path))
                elif is_init and t.HasField("raw_data") and (tensor_nbytes(t) or threshold) >= threshold:
                    raw = t.raw_data
                    if len(raw) < threshold:
                        continue
                    filled.placements.append(Placement(t, out.tell(), len(raw)))
                    out.write(raw)
                    t.ClearField("raw_data")
                    del raw
                    continue
                else:
                    continue
                src = sources.get(ref.path)
                if src is None:
                    src = sources[ref.path] = open(ref.path, "rb")
                if buf is None:
                    buf = bytearray(CHUNK)
                offset = out.tell()
                copy_range(src, out, ref.offset, ref.length, buf)
                filled.placements.append(Placement(t, offset, ref.length))
            out.flush()
            filled.size = out.tell()
    finally:
        for f in sources.values():
            f.close()
    return filled


def embed_external(
    model: onnx.ModelProto, src_dir: str, stream: DataSink | None = None, source: Held | None = None
) -> None:
    """Read every external tensor into the model (the output is one self-contained file).

    Top-level initializers in ``stream``'s file, or left in the input model file
    (``source``), stay references: the wire-format writer copies their bytes from
    that file straight into the model file.
    """
    stores = [s for s in (stream, source) if s is not None]
    top = {id(t) for t in model.graph.initializer} if stores else set()
    for t, _ in model_tensors(model):
        if id(t) in top and any(streamable(t, s) for s in stores):
            continue
        if stream is not None and stream.holds(t):
            data = stream.read(t)
        elif is_external(t):
            data = read_external(t, src_dir)
        else:
            continue
        del t.external_data[:]
        t.ClearField("data_location")
        t.raw_data = data
