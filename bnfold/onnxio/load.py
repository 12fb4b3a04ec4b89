"""Loading and checking models: one clear error for every bad input, no weights copied.

Loading never reads external tensor data: tensors stay references to the
input's data files (validated once, by :class:`bnfold.onnxio.tensors.TensorIndex`),
and :func:`bnfold.fold.graph.tensor_value` reads the few that a fold needs.  The
checker runs on a *skeleton* of the model, so it never serializes the weights.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from bnfold.errors import ModelLoadError
from bnfold.onnxio.embedded import load_in_place
from bnfold.onnxio.tensors import TensorIndex, human_size, is_external, tensor_nbytes

#: Largest message protobuf can serialize or parse (``onnx.checker.MAXIMUM_PROTOBUF``):
#: no model file can be bigger (its weights beyond that belong in external data).
MAX_PROTOBUF = 2**31 - 1

# Location of the data-less stand-ins used to check a model's structure in memory:
# onnx's checker does not look for files whose location starts with '#'.
_STUB_LOCATION = "#bnfold-stub"


def load_model(path: str, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model without reading its external data; raise :class:`ModelLoadError` on bad input.

    External tensors stay references (``data_location == EXTERNAL``) relative to the
    model's folder; their locations and bounds are validated here, their bytes are
    read only when a fold needs them.
    """
    return load_indexed(path, check=check)[0]


def load_indexed(path: str, *, check: bool = True, in_place: bool = False) -> tuple[onnx.ModelProto, TensorIndex]:
    """:func:`load_model`, with the :class:`TensorIndex` its checks built (one walk over the tensors).

    ``in_place`` leaves big embedded initializers in the model file as references to
    their own bytes (:mod:`bnfold.onnxio.embedded`; ``index.source`` says which): for
    callers that read a few weights and write the model back through
    :func:`bnfold.onnxio.writer.write_model` with that source.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder, not a model file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ModelLoadError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"{path}: empty file")
    if size > MAX_PROTOBUF:  # protobuf could not parse it, and reading it would take all that memory
        raise ModelLoadError(
            f"{path}: not an ONNX model: {human_size(size)} is over protobuf's 2 GiB limit for a model file"
        )
    lazy = load_in_place(path) if in_place else None
    source = lazy[1] if lazy is not None else None
    try:
        model = lazy[0] if lazy is not None else onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model ({_first_line(e)})") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from e
    if not model.HasField("graph") or not model.ir_version:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph or IR version)")
    check_opsets(model, path)
    # Every tensor checked and every external reference validated, before a byte is read.
    index = TensorIndex.build(model, os.path.dirname(os.path.abspath(path)), path, source)
    if check:
        check_model(model, path)
    return model, index


def check_opsets(model: onnx.ModelProto, label: str) -> None:
    """Refuse opsets newer than the installed onnx knows (its checker would not catch them)."""
    known = onnx.defs.onnx_opset_version()
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > known:
            raise ModelLoadError(
                f"{label}: opset {o.version} is newer than the installed onnx {onnx.__version__} knows "
                f"(up to {known}); upgrade onnx"
            )


def _stub(t: TensorProto) -> TensorProto:
    """A data-less stand-in with the tensor's name, type and shape (external at a '#' location)."""
    s = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, data_location=TensorProto.EXTERNAL)
    e = s.external_data.add()
    e.key, e.value = "location", _STUB_LOCATION
    return s


def _is_big(t: TensorProto, threshold: int = 4096) -> bool:
    if is_external(t):
        return True
    if not t.HasField("raw_data"):
        return False
    n = tensor_nbytes(t)
    return n is None or n >= threshold


def _skeleton_graph(g: onnx.GraphProto) -> onnx.GraphProto:
    out = onnx.GraphProto()
    for fd, value in g.ListFields():
        if fd.name == "initializer":
            for t in value:
                if _is_big(t):
                    out.initializer.append(_stub(t))
                else:
                    out.initializer.append(t)
        elif fd.name == "node":
            out.node.extend(_skeleton_nodes(value))
        else:
            copy_field(out, fd, value)
    return out


def _skeleton_nodes(nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
    res = []
    for n in nodes:
        heavy = any(a.HasField("g") or a.graphs or (a.HasField("t") and _is_big(a.t)) for a in n.attribute)
        if not heavy:
            res.append(n)
            continue
        m = onnx.NodeProto()
        for fd, value in n.ListFields():
            if fd.name != "attribute":
                copy_field(m, fd, value)
        for a in n.attribute:
            b = m.attribute.add()
            for fd, value in a.ListFields():
                if fd.name == "g":
                    b.g.CopyFrom(_skeleton_graph(value))
                elif fd.name == "graphs":
                    b.graphs.extend(_skeleton_graph(x) for x in value)
                elif fd.name == "t" and _is_big(value):
                    b.t.CopyFrom(_stub(value))
                else:
                    copy_field(b, fd, value)
        res.append(m)
    return res


def is_repeated(fd) -> bool:
    """Whether a protobuf field descriptor is repeated (any protobuf version)."""
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 6; older ones only have ``label``
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def copy_field(dst, fd, value) -> None:
    """Copy one field (as listed by ``ListFields``) of a protobuf message to ``dst``."""
    if is_repeated(fd):
        getattr(dst, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large tensors are data-less stand-ins of the same name, type and shape.

    The onnx checker (and shape inference) on the skeleton sees every node, graph,
    type and shape of the model without a copy of its weights.  (Whether embedded
    tensors hold enough bytes is :func:`bnfold.onnxio.tensors.check_tensor`'s job.)
    """
    sk = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name == "graph":
            sk.graph.CopyFrom(_skeleton_graph(value))
        elif fd.name == "functions":
            for f in value:
                nf = sk.functions.add()
                for ffd, fv in f.ListFields():
                    if ffd.name == "node":
                        nf.node.extend(_skeleton_nodes(fv))
                    else:
                        copy_field(nf, ffd, fv)
        else:
            copy_field(sk, fd, value)
    return sk


def check_model(model: onnx.ModelProto, label: str, full: bool = False) -> None:
    """Run the onnx checker on the model's skeleton (no weights are copied or serialized).

    Raises :class:`ModelLoadError` with the checker's first line.
    """
    sk = skeleton(model)
    try:
        onnx.checker.check_model(sk, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise ModelLoadError(f"{label}: invalid model: {_first_line(e)}") from e


def check_model_path(path: str, label: str | None = None, full: bool = False) -> None:
    """Run the onnx checker on a model file by path (works for models over 2 GB)."""
    try:
        onnx.checker.check_model(path, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as e:
        raise ModelLoadError(f"{label or path}: invalid model: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
