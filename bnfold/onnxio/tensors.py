"""The tensors of a model: where their data lives, checks that read no data, and the one
validated way to read external data.

Every model bnfold is given is untrusted: embedded tensors must hold as many bytes
as their dtype and shape need, and external-data locations are refused when they
could read outside the model's folder (see :func:`external_ref`).  Loading walks the
tensors once into a :class:`TensorIndex`, which the layout plan, the writer and the
size report read instead of walking again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
from onnx import TensorProto, helper

from bnfold.errors import ModelLoadError
from bnfold.onnxio.buffers import MIN_POOLED, BufferPool

if TYPE_CHECKING:
    from bnfold.onnxio.embedded import EmbeddedSource

# Sub-byte element types: bits per element (packed in raw data).
PACKED_BITS = {
    getattr(TensorProto, n): bits
    for n, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, n)
}

#: Most bytes one tensor may be read into memory with (the fold reads whole weights):
#: half the machine's memory, at most 64 GiB.  A bigger declared tensor is refused up front.
MAX_READ = min(64 << 30, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[TensorProto, bool]]:
    for t in graph.initializer:
        yield t, True
    for st in graph.sparse_initializer:
        yield st.values, False
        yield st.indices, False
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[tuple[TensorProto, bool]]:
    for n in nodes:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t, False
            for t in a.tensors:
                yield t, False
            sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
            for st in (*sparse, *a.sparse_tensors):
                yield st.values, False
                yield st.indices, False
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    """Every tensor of a model (all graphs, node attributes, functions) with ``is_initializer``."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        yield from _node_tensors(f.node)


def is_external(t: TensorProto) -> bool:
    """True when the tensor's data lives in an external file."""
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def element_count(t: TensorProto) -> int:
    """Number of elements the tensor's dims declare (exact: Python ints never overflow)."""
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def tensor_nbytes(t: TensorProto) -> int | None:
    """Bytes the tensor's data takes in raw form (None for strings and unknown types)."""
    n = element_count(t)
    bits = PACKED_BITS.get(t.data_type)
    if bits:
        return -(-n * bits // 8)
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: ``length`` bytes of ``path`` from ``offset``."""

    path: str
    location: str
    offset: int
    length: int


def external_entries(t: TensorProto) -> dict[str, str]:
    """The ``external_data`` key/value pairs of a tensor."""
    return {e.key: e.value for e in t.external_data}


def set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` a reference to ``length`` bytes of ``location`` from ``offset`` (a checksum is kept)."""
    keep = [(e.key, e.value) for e in t.external_data if e.key == "checksum"]
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length)), *keep):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def external_ref(t: TensorProto, base_dir: str, stats: dict[str, os.stat_result] | None = None) -> ExternalRef:
    """Resolve and validate an external tensor's location, without reading its data.

    The location must be relative, stay inside ``base_dir`` once ``..`` and symlinks
    are resolved, and name a regular, readable file that is not a hard link (a hard
    link could point anywhere); ``offset + length`` must fit in the file and the
    tensor's shape.  onnx has had several CVEs here: these checks run whatever the
    installed onnx does.  ``stats`` caches the files' ``os.stat`` across one pass.

    Raises:
        ModelLoadError: naming the tensor and what is wrong.
    """
    e = external_entries(t)
    loc = e.get("location", "")
    what = f"tensor '{t.name}'"
    if not loc:
        raise ModelLoadError(f"{what} is stored externally but has no location")
    parts = loc.replace("\\", "/").split("/")
    if "\x00" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise ModelLoadError(f"{what}: refusing absolute external data path {loc!r}")
    if ".." in parts:
        raise ModelLoadError(f"{what}: refusing external data path {loc!r} that leaves the model's folder")
    path = os.path.join(base_dir, *[p for p in parts if p not in ("", ".")])
    st = stats.get(path) if stats is not None else None
    if st is None:
        root = os.path.realpath(base_dir)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ModelLoadError(f"{what}: refusing external data {loc!r}: a link resolving outside the model's folder")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ModelLoadError(f"{what}: external data file {loc!r} is missing") from None
        except OSError as err:
            raise ModelLoadError(f"{what}: cannot read external data file {loc!r} ({err.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{what}: external data {loc!r} is not a regular file")
        if st.st_nlink > 1:
            raise ModelLoadError(
                f"{what}: refusing external data file {loc!r}: it is a hard link (could point outside the folder)"
            )
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"{what}: external data file {loc!r} is not readable")
        if stats is not None:
            stats[path] = st
    try:
        offset = int(e.get("offset", 0) or 0)
        length = int(e["length"]) if e.get("length") not in (None, "") else None
    except ValueError:
        raise ModelLoadError(f"{what}: external data offset/length are not integers") from None
    size = st.st_size
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{what}: negative external data offset or length")
    if length is None:
        length = max(size - offset, 0)
    if offset + length > size:
        raise ModelLoadError(f"{what}: external data file {loc!r} is too short ({size} bytes, needs {offset + length})")
    need = tensor_nbytes(t)
    if need is not None and length < need:
        raise ModelLoadError(f"{what}: external data length {length} is too short for its shape ({need} bytes)")
    return ExternalRef(path, loc, offset, length)


def external_data_files(model: onnx.ModelProto, base_dir: str) -> set[str]:
    """Real paths of the data files a model's external tensors point at (relative to ``base_dir``)."""
    files: set[str] = set()
    stats: dict[str, os.stat_result] = {}
    for t, _ in model_tensors(model):
        if is_external(t):
            files.add(external_ref(t, base_dir, stats).path)
    return {os.path.realpath(f) for f in files}


def read_external(t: TensorProto, base_dir: str, ref: ExternalRef | None = None) -> bytes:
    """The bytes of one external tensor: the one validated way to read external data.

    The location and bounds are validated by :func:`external_ref` (or ``ref``, already
    validated by it); a tensor over :data:`MAX_READ` bytes is refused before any memory
    is taken.

    Raises:
        ModelLoadError: the reference is unsafe or broken, or the tensor too big to read.
    """
    ref = ref or external_ref(t, base_dir)
    refuse_big(t, ref.length)
    return read_range(ref.path, ref.offset, ref.length)


def refuse_big(t: TensorProto, nbytes: int) -> None:
    """Refuse reading a tensor of ``nbytes`` into memory when it is over :data:`MAX_READ`."""
    if nbytes > MAX_READ:
        raise ModelLoadError(
            f"tensor '{t.name}' is {human_size(nbytes)}: too big to read into memory "
            f"(at most {human_size(MAX_READ)} here)"
        )


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``offset`` (unbuffered: read straight into the result)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        data = f.read(length)
        if len(data) < length:  # a read stops at 2 GiB on Linux: gather the rest
            parts = [data]
            got = len(data)
            while got < length:
                more = f.read(length - got)
                if not more:
                    raise ModelLoadError(f"{path}: external data ended early")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data


def read_range_into(path: str, offset: int, buf: bytearray | memoryview) -> None:
    """Fill ``buf`` with ``len(buf)`` bytes of ``path`` from ``offset`` (unbuffered, large reads)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(buf), 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ModelLoadError(f"{path}: external data ended early")
            done += n


# Element types whose raw bytes every reader views with ``np.frombuffer`` (so a pooled
# buffer serves them as well as bytes do); others get bytes.
_POOLED_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


class ExternalReader:
    """Reads a model's external tensors for one fold run, each validated by :func:`read_external`'s rules.

    Big float weights are read into pooled buffers (:class:`~bnfold.onnxio.buffers.BufferPool`),
    reused once nothing refers to them any more (a weight is read, folded into a new
    array and dropped, layer after layer), so reading a model does not fault in and
    zero fresh memory for every weight.
    """

    def __init__(self, base_dir: str) -> None:
        self.base_dir = base_dir
        self._pool = BufferPool()
        self._stats: dict[str, os.stat_result] = {}  # each file validated once per run, as at load

    def owns(self, value: object) -> bool:
        """Whether ``value``'s memory lies in one of this reader's buffers (its caller's copy of a weight)."""
        return self._pool.owns(value)

    def __call__(self, t: TensorProto) -> bytes:
        ref = external_ref(t, self.base_dir, self._stats)
        refuse_big(t, ref.length)
        if t.data_type not in _POOLED_TYPES or ref.length < MIN_POOLED:
            return read_range(ref.path, ref.offset, ref.length)
        buf = self._pool.take(ref.length)
        read_range_into(ref.path, ref.offset, buf)
        return buf  # type: ignore[return-value]  # a bytes-like object that np.frombuffer views alike


def human_size(n: int) -> str:
    """``n`` bytes as a short human number (``4.0 TiB``)."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def check_tensor(t: TensorProto, label: str) -> None:
    """Refuse an embedded tensor whose data does not match its dtype and dims (no data is converted)."""
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
        return
    n = element_count(t)
    if t.HasField("raw_data"):
        if t.data_type == onnx.TensorProto.STRING:
            raise ModelLoadError(f"{what} is a string tensor with raw data")
        need = tensor_nbytes(t)
        if need is not None and len(t.raw_data) != need:
            raise ModelLoadError(
                f"{what} holds {len(t.raw_data)} bytes of data for shape {list(t.dims)} (needs {need})"
            )
        return
    held = max(len(getattr(t, f)) for f in _TYPED_FIELDS)
    if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        held //= 2
    if held != n and t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        raise ModelLoadError(f"{what} holds {held} values for shape {list(t.dims)} ({n} needed)")


def check_tensors(model: onnx.ModelProto, label: str) -> None:
    """Refuse embedded tensors whose data does not match their dtype and dims (see :func:`check_tensor`)."""
    for t, _ in model_tensors(model):
        check_tensor(t, label)


@dataclass(frozen=True)
class IndexEntry:
    """One tensor of a model: the message, whether it is an initializer, its size, its external data."""

    tensor: TensorProto
    is_initializer: bool
    nbytes: int | None  # raw bytes (None: strings, unknown types)
    ref: ExternalRef | None  # validated external reference (None: embedded)


@dataclass(frozen=True)
class TensorIndex:
    """Every tensor of a model, walked and validated once at load.

    It serves the size report (``data_files``), the layout plan (``external``,
    ``embedded_size``) and the writer (the input's files it must never write).
    It describes the model as loaded: the fold adds and replaces tensors after it.
    """

    base_dir: str
    entries: tuple[IndexEntry, ...]
    data_files: frozenset[str]  # real paths of the external data files
    external: bool  # any tensor is external
    embedded_size: int  # upper estimate of the model's size with every tensor embedded
    source: EmbeddedSource | None = None  # embedded tensors left in the model file (they are not external)

    @classmethod
    def build(
        cls, model: onnx.ModelProto, base_dir: str, label: str, source: EmbeddedSource | None = None
    ) -> TensorIndex:
        """Walk ``model`` once: check every embedded tensor, validate every external reference.

        Tensors ``source`` holds are embedded data left in the model file: validated
        like references, counted as embedded.

        Raises:
            ModelLoadError: a tensor does not match its dtype and shape, or an external
                reference is unsafe or broken (the message names ``label``).
        """
        stats: dict[str, os.stat_result] = {}
        entries = []
        files: set[str] = set()
        size = 4096 + 256 * len(model.graph.node)
        for t, is_init in model_tensors(model):
            check_tensor(t, label)
            ref = None
            if is_external(t):
                try:
                    ref = external_ref(t, base_dir, stats)
                except ModelLoadError as e:
                    raise ModelLoadError(f"{label}: cannot read external data: {e}") from e
                if source is None or not source.holds(t):
                    files.add(ref.path)
            nbytes = tensor_nbytes(t)
            size += (ref.length if ref is not None else (nbytes or 0)) + 64
            entries.append(IndexEntry(t, is_init, nbytes, ref))
        real = frozenset(os.path.realpath(f) for f in files)
        return cls(base_dir, tuple(entries), real, bool(files), size, source)
