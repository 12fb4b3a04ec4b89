"""Evaluate the small constant subgraphs that exporters use to make weights.

Covers ``Constant`` nodes and ``ConstantOfShape``, ``Identity``, ``Cast``,
``CastLike``, ``Reshape``, ``Unsqueeze``, ``Squeeze``, ``Expand``, ``Shape``,
``Slice``, ``Concat`` and ``Transpose`` of constants: enough for the onnx model-zoo
architectures (weights made by ConstantOfShape), raw PyTorch dynamo exports
(a zero bias made by ``Shape -> Slice -> Expand -> CastLike -> Expand``) and
TorchScript exports without constant folding (a bias-free ``nn.Linear`` is
``MatMul(x, Transpose(W))``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

Evaluator = Callable[[onnx.NodeProto, list, int], "np.ndarray | None"]

# Refuse to materialize absurd constants (an Expand or ConstantOfShape to 2**40 elements).
MAX_ELEMENTS = 1 << 31


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """Value of a ``Constant`` node, or None for sparse or string values."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def empty_of_type(onnx_type: int) -> np.ndarray | None:
    """An empty array of an ONNX element type (an input read only for its dtype); None when unknown."""
    try:
        return np.empty(0, dtype=_np_dtype(onnx_type))
    except (KeyError, TypeError, ValueError):
        return None


def _check_size(shape) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise ValueError("constant too large or negative shape")
    return shape


def _constant_of_shape(node, ins, opset):
    shape = _check_size(ins[0])
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    return np.full(shape, fill, dtype=np.asarray(fill).dtype)


def _cast(node, ins, opset):
    return ins[0].astype(_np_dtype(_attr(node, "to")))


def _reshape(node, ins, opset):
    data = ins[0]
    if opset < 5:
        shape = list(_attr(node, "shape"))
    else:
        shape = [int(d) for d in ins[1]]
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _axes(node, ins, opset, since: int):
    if opset >= since:
        return None if len(ins) < 2 or ins[1] is None else [int(a) for a in ins[1]]
    axes = _attr(node, "axes")
    return None if axes is None else list(axes)


def _unsqueeze(node, ins, opset):
    axes = _axes(node, ins, opset, 13)
    out_rank = ins[0].ndim + len(axes)
    out = ins[0]
    for a in sorted(a % out_rank for a in axes):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node, ins, opset):
    axes = _axes(node, ins, opset, 13)
    x = ins[0]
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _expand(node, ins, opset):
    shape = np.broadcast_shapes(ins[0].shape, _check_size(np.maximum(ins[1], 1)))
    _check_size(shape)
    return np.array(np.broadcast_to(ins[0], shape))


def _shape(node, ins, opset):
    dims = np.array(ins[0].shape, dtype=np.int64)
    start = _attr(node, "start", 0)
    end = _attr(node, "end", None)
    return dims[start:end]


def _slice(node, ins, opset):
    x = ins[0]
    if opset < 10:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes"), None
    else:
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else None
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps, strict=False):
        index[a] = slice(int(s), int(e), st)
    return x[tuple(index)]


def _concat(node, ins, opset):
    return np.concatenate(ins, axis=_attr(node, "axis"))


def _transpose(node, ins, opset):
    return np.transpose(ins[0], _attr(node, "perm"))


EVALUATORS: dict[str, Evaluator] = {
    "ConstantOfShape": _constant_of_shape,
    "Identity": lambda node, ins, opset: ins[0],
    "Cast": _cast,
    "CastLike": lambda node, ins, opset: ins[0].astype(ins[1].dtype),
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Expand": _expand,
    "Shape": _shape,
    "Slice": _slice,
    "Concat": _concat,
    "Transpose": _transpose,
}

# Inputs whose *value* an op does not need (Shape reads only the shape).
SHAPE_ONLY = {"Shape"}
# (op, input index) that an op reads only the dtype of: CastLike's target
# (a raw dynamo export casts its zero bias like the graph input).
TYPE_ONLY = {("CastLike", 1)}


def evaluate(node: onnx.NodeProto, inputs: list, opset: int) -> np.ndarray | None:
    """Evaluate one constant-foldable node on numpy inputs; None when unsupported."""
    if node.op_type == "Constant":
        return constant_node_value(node)
    fn = EVALUATORS.get(node.op_type)
    if fn is None or node.domain not in ("", "ai.onnx"):
        return None
    try:
        return np.asarray(fn(node, inputs, opset))
    except (ValueError, TypeError, IndexError, KeyError):
        return None
