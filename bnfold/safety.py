"""Checks on untrusted models before anything is read from disk on their behalf.

External-data ``location`` fields are paths chosen by whoever made the file.
onnx has had several CVEs where they escaped the model's folder; bnfold refuses
absolute paths, ``..`` escapes, symlinks resolving outside the folder and hard
links before reading a byte, whatever the installed onnx does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper

from .errors import ModelLoadError


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: initializers, sparse ones, Constant values, nested graphs, functions."""

    def from_attrs(attrs) -> Iterator[onnx.TensorProto]:
        for a in attrs:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            if a.HasField("g"):
                yield from from_graph(a.g)
            for g in a.graphs:
                yield from from_graph(g)

    def from_graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        for n in g.node:
            yield from from_attrs(n.attribute)

    yield from from_graph(model.graph)
    for f in model.functions:
        for n in f.node:
            yield from from_attrs(n.attribute)


def external_info(t: onnx.TensorProto) -> dict[str, str]:
    """The ``external_data`` key/value pairs of a tensor."""
    return {e.key: e.value for e in t.external_data}


def data_files(model: onnx.ModelProto) -> set[str]:
    """The external data locations a model names (as written in the model)."""
    return {
        external_info(t).get("location", "")
        for t in iter_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
    }


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if t.data_type in (onnx.TensorProto.STRING,):
        return None
    bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    return (n + 1) // 2 if t.data_type in bits else n * dtype.itemsize


def check_external_data(model: onnx.ModelProto, base_dir: str, label: str) -> None:
    """Refuse unsafe or broken external data references; raise :class:`ModelLoadError`.

    Checked without reading tensor data: the location is relative, stays inside
    ``base_dir`` after resolving ``..`` and symlinks, names a regular readable file
    that is not a hard link, and the file holds ``offset + length`` bytes.
    """
    root = os.path.realpath(base_dir)
    sizes: dict[str, int] = {}
    for t in iter_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_info(t)
        loc = info.get("location", "")
        what = f"{label}: tensor '{t.name}'"
        if not loc:
            raise ModelLoadError(f"{what}: external data without a location")
        if "\x00" in loc or os.path.isabs(loc) or loc.startswith(("\\", "/")) or (len(loc) > 1 and loc[1] == ":"):
            raise ModelLoadError(f"{what}: refusing absolute external data path {loc!r}")
        parts = loc.replace("\\", "/").split("/")
        if ".." in parts:
            raise ModelLoadError(f"{what}: refusing external data path {loc!r} that leaves the model's folder")
        path = os.path.join(root, loc)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ModelLoadError(f"{what}: refusing external data {loc!r}: a link resolving outside the model's folder")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ModelLoadError(f"{what}: external data file {loc!r} is missing") from None
        except OSError as e:
            raise ModelLoadError(f"{what}: cannot read external data file {loc!r} ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{what}: external data {loc!r} is not a regular file")
        if st.st_nlink > 1:
            raise ModelLoadError(
                f"{what}: refusing external data file {loc!r}: it is a hard link (could point outside the folder)"
            )
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"{what}: external data file {loc!r} is not readable")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelLoadError(f"{what}: external data offset/length are not integers") from None
        if offset < 0 or (length is not None and length < 0):
            raise ModelLoadError(f"{what}: negative external data offset or length")
        size = sizes.setdefault(real, st.st_size)
        need = length if length is not None else _expected_bytes(t)
        if need is not None and offset + need > size:
            raise ModelLoadError(
                f"{what}: external data file {loc!r} is too short ({size} bytes, needs {offset + need})"
            )


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def check_tensors(model: onnx.ModelProto, label: str) -> None:
    """Refuse embedded tensors whose data does not match their dtype and dims (no data is converted)."""
    for t in iter_tensors(model):
        what = f"{label}: invalid model: tensor '{t.name}'"
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{what} has a negative dimension {list(t.dims)}")
        if t.data_type == onnx.TensorProto.UNDEFINED:
            raise ModelLoadError(f"{what} has no data type")
        try:
            helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{what} has an unknown data type {t.data_type}") from None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        n = int(np.prod(t.dims, dtype=np.float64)) if t.dims else 1
        if t.HasField("raw_data"):
            if t.data_type == onnx.TensorProto.STRING:
                raise ModelLoadError(f"{what} is a string tensor with raw data")
            need = _expected_bytes(t)
            if need is not None and len(t.raw_data) != need:
                raise ModelLoadError(
                    f"{what} holds {len(t.raw_data)} bytes of data for shape {list(t.dims)} (needs {need})"
                )
            continue
        held = max(len(getattr(t, f)) for f in _TYPED_FIELDS)
        if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
            held //= 2
        if held != n and t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            raise ModelLoadError(f"{what} holds {held} values for shape {list(t.dims)} ({n} needed)")
