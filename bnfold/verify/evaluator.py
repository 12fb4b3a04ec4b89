"""A small numpy evaluator for the models onnxruntime's CPU provider cannot run.

onnxruntime has no CPU kernel for float64 or bfloat16 Conv (and none at all for
bfloat16 arithmetic), so verifying a fold of such a model needs another engine.
This one covers the ops around folds: Conv and ConvTranspose (1-D to 3-D, groups,
strides, pads, dilations, ``auto_pad``), BatchNormalization in inference mode,
Gemm, MatMul, elementwise arithmetic and activations, the reshaping ops
exporters put between them, and a few others (Where, Gather, ArgMax, Softmax).
It is a verifier's tool, not a runtime: slow, single-threaded, main graph only.

Precision: every op computes in float64 and rounds its result to the dtype of
its float inputs (float16, bfloat16, float32 or float64), as a runtime of that
dtype would.  ``onnx.reference`` is not used: in onnx 1.23 its BatchNormalization
for opsets 9 to 13 mixes batch statistics into inference mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import NotVerifiableError
from bnfold.fold import consteval as constants
from bnfold.onnxio.tensors import is_external, read_external

F64 = np.float64
Op = Callable[[onnx.NodeProto, list, int], list]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt == ml_dtypes.bfloat16


def _out_dtype(*arrays: np.ndarray | None) -> np.dtype:
    """dtype of the result: the first float input's (float64 if none)."""
    for a in arrays:
        if a is not None and _is_float(a.dtype):
            return a.dtype
    return np.dtype(F64)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F64)


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------


def conv_pads(
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
    auto_pad: str,
) -> tuple[list[int], list[int]]:
    """Begin and end padding of a Conv along each spatial axis (ONNX ``auto_pad`` rules)."""
    n = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            out = -(-in_sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i])
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    group: int = 1,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """ONNX Conv in float64: ``x[N, C, *in]``, ``w[M, C/group, *k]``, optional ``b[M]``."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    k = w.shape[2:]
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    begin, end = conv_pads(x.shape[2:], k, strides, dilations, pads, auto_pad)
    xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    out = [(xp.shape[2 + i] - ((k[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(nd)]
    if any(o <= 0 for o in out):
        raise ValueError(f"Conv output would be empty: {out}")
    n, c = x.shape[:2]
    m = w.shape[0]
    cols = []
    for offs in np.ndindex(*k):
        idx = tuple(
            slice(offs[i] * dilations[i], offs[i] * dilations[i] + (out[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        cols.append(xp[(slice(None), slice(None)) + tuple(idx)])  # noqa: RUF005 - mypy reads a starred index as 3.11-only
    patches = np.stack(cols, axis=2)  # [N, C, K, *out]
    kk = patches.shape[2]
    patches = patches.reshape(n, group, (c // group) * kk, -1)  # [N, g, C/g*K, P]
    wg = w.reshape(group, m // group, (c // group) * kk)  # [g, M/g, C/g*K]
    y = np.einsum("gok,ngkp->ngop", wg, patches).reshape(n, m, *out)
    if b is not None:
        y = y + _f64(b).reshape(1, m, *([1] * nd))
    return y


def conv_transpose(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    group: int = 1,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """ONNX ConvTranspose in float64: ``x[N, C, *in]``, ``w[C, M/group, *k]``, optional ``b[M]``."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    n, c = x.shape[:2]
    ins = x.shape[2:]
    k = w.shape[2:]
    mg = w.shape[1]
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    opad = list(output_padding or [0] * nd)
    full = [(ins[i] - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1 + opad[i] for i in range(nd)]
    if output_shape:
        shape = list(output_shape)[-nd:]
        total = [full[i] - shape[i] for i in range(nd)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [total[i] - begin[i] for i in range(nd)]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, full[i] - ins[i] * strides[i]) for i in range(nd)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [total[i] - begin[i] for i in range(nd)]
    elif auto_pad == "VALID" or not pads:
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = list(pads[:nd]), list(pads[nd:])
    y = np.zeros((n, mg * group, *full), dtype=F64)
    cg = c // group
    for g in range(group):
        xg = x[:, g * cg : (g + 1) * cg]
        wg = w[g * cg : (g + 1) * cg]
        for offs in np.ndindex(*k):
            contrib = np.einsum("nc...,cm->nm...", xg, wg[(slice(None), slice(None)) + tuple(offs)])  # noqa: RUF005
            idx = tuple(
                slice(offs[i] * dilations[i], offs[i] * dilations[i] + (ins[i] - 1) * strides[i] + 1, strides[i])
                for i in range(nd)
            )
            y[(slice(None), slice(g * mg, (g + 1) * mg)) + idx] += contrib  # noqa: RUF005
    crop = tuple(slice(begin[i], full[i] - end[i]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]  # noqa: RUF005
    if b is not None:
        y = y + _f64(b).reshape(1, -1, *([1] * nd))
    return y


def batch_norm(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float = 1e-5,
    spatial: bool = True,
) -> np.ndarray:
    """Inference-mode BatchNormalization in float64 (``epsilon`` rounded to float32, like the attribute)."""
    x = _f64(x)
    shape = (1, *x.shape[1:]) if not spatial else (1, -1) + (1,) * (x.ndim - 2)
    s, b, m, v = (_f64(p).reshape(shape) for p in (scale, bias, mean, var))
    return (x - m) / np.sqrt(v + F64(np.float32(epsilon))) * s + b


def gemm(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_a: bool = False,
    trans_b: bool = False,
) -> np.ndarray:
    """ONNX Gemm in float64."""
    a, b = _f64(a), _f64(b)
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    y = F64(np.float32(alpha)) * (a @ b)
    if c is not None:
        y = y + F64(np.float32(beta)) * _f64(c)
    return y


# ---------------------------------------------------------------------------
# Op table: each takes (node, inputs, opset) and returns the list of outputs
# ---------------------------------------------------------------------------


def _opt(ins: list, i: int) -> np.ndarray | None:
    return ins[i] if len(ins) > i else None


def _op_conv(node, ins, opset):
    x, w, b = ins[0], ins[1], _opt(ins, 2)
    y = conv(
        x,
        w,
        b,
        group=_attr(node, "group", 1),
        strides=_attr(node, "strides"),
        pads=_attr(node, "pads"),
        dilations=_attr(node, "dilations"),
        auto_pad=_attr(node, "auto_pad", "NOTSET"),
    )
    return [y.astype(_out_dtype(x, w))]


def _op_conv_transpose(node, ins, opset):
    x, w, b = ins[0], ins[1], _opt(ins, 2)
    y = conv_transpose(
        x,
        w,
        b,
        group=_attr(node, "group", 1),
        strides=_attr(node, "strides"),
        pads=_attr(node, "pads"),
        dilations=_attr(node, "dilations"),
        output_padding=_attr(node, "output_padding"),
        output_shape=_attr(node, "output_shape"),
        auto_pad=_attr(node, "auto_pad", "NOTSET"),
    )
    return [y.astype(_out_dtype(x, w))]


def _op_bn(node, ins, opset):
    if _attr(node, "training_mode", 0) or (opset < 7 and not _attr(node, "is_test", 0)):
        raise NotVerifiableError(f"node '{node.name or node.output[0]}': training-mode BatchNormalization")
    spatial = opset >= 9 or _attr(node, "spatial", 1) == 1
    y = batch_norm(*ins[:5], epsilon=_attr(node, "epsilon", 1e-5), spatial=spatial)
    return [y.astype(_out_dtype(ins[0]))]


def _op_gemm(node, ins, opset):
    y = gemm(
        ins[0],
        ins[1],
        _opt(ins, 2),
        _attr(node, "alpha", 1.0),
        _attr(node, "beta", 1.0),
        bool(_attr(node, "transA", 0)),
        bool(_attr(node, "transB", 0)),
    )
    return [y.astype(_out_dtype(ins[0], ins[1]))]


def _float_or_exact(fn: Callable[..., np.ndarray]) -> Op:
    """Elementwise op: float64 then rounded for floats; exact numpy for integers."""

    def op(node, ins, opset):
        if _is_float(ins[0].dtype):
            return [np.asarray(fn(node, *(_f64(a) for a in ins))).astype(ins[0].dtype)]
        return [np.asarray(fn(node, *ins)).astype(ins[0].dtype)]

    return op


def _div(node, a, b):
    if a.dtype.kind in "iu":
        return np.trunc(a / b)
    return a / b


def _clip(node, ins, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = _attr(node, "min", -np.inf), _attr(node, "max", np.inf)
    else:
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else -np.inf
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else np.inf
    return [np.clip(_f64(x), _f64(lo), _f64(hi)).astype(x.dtype)]


def _softmax(node, ins, opset):
    x = _f64(ins[0])
    axis = _attr(node, "axis", -1 if opset >= 13 else 1)
    if opset < 13:
        axis %= x.ndim
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        y = (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)
    else:
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
    return [y.astype(ins[0].dtype)]


def _flatten(node, ins, opset):
    x = ins[0]
    axis = _attr(node, "axis", 1) % (x.ndim + 1) if x.ndim else 0
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


def _pool(node, ins, opset, reduce: str):
    x = _f64(ins[0])
    axes = tuple(range(2, x.ndim))
    y = x.mean(axis=axes, keepdims=True) if reduce == "mean" else x.max(axis=axes, keepdims=True)
    return [y.astype(ins[0].dtype)]


def _argmax(node, ins, opset):
    x = _f64(ins[0])
    axis = _attr(node, "axis", 0)
    if _attr(node, "select_last_index", 0):
        y = x.shape[axis] - 1 - np.argmax(np.flip(x, axis=axis), axis=axis)
    else:
        y = np.argmax(x, axis=axis)
    if _attr(node, "keepdims", 1):
        y = np.expand_dims(y, axis)
    return [y.astype(np.int64)]


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Op:
    def op(node, ins, opset):
        return [np.asarray(fn(_f64(ins[0]))).astype(ins[0].dtype)]

    return op


def _unary_attr(fn: Callable[[onnx.NodeProto, np.ndarray], np.ndarray]) -> Op:
    def op(node, ins, opset):
        return [np.asarray(fn(node, _f64(ins[0]))).astype(ins[0].dtype)]

    return op


def _from_constants(name: str) -> Op:
    fn = constants.EVALUATORS[name]

    def op(node, ins, opset):
        return [np.asarray(fn(node, ins, opset))]

    return op


def _constant(node, ins, opset):
    v = constants.constant_node_value(node)
    if v is None:
        raise NotVerifiableError(f"node '{node.name or node.output[0]}': Constant of a kind bnfold cannot read")
    return [v]


OPS: dict[str, Op] = {
    "Conv": _op_conv,
    "ConvTranspose": _op_conv_transpose,
    "BatchNormalization": _op_bn,
    "Gemm": _op_gemm,
    "MatMul": lambda node, ins, opset: [(_f64(ins[0]) @ _f64(ins[1])).astype(_out_dtype(ins[0], ins[1]))],
    "Add": _float_or_exact(lambda node, a, b: a + b),
    "Sub": _float_or_exact(lambda node, a, b: a - b),
    "Mul": _float_or_exact(lambda node, a, b: a * b),
    "Div": _float_or_exact(_div),
    "Relu": _unary(lambda x: np.maximum(x, 0)),
    "LeakyRelu": _unary_attr(lambda n, x: np.where(x >= 0, x, F64(np.float32(_attr(n, "alpha", 0.01))) * x)),
    "Sigmoid": _unary(lambda x: 1 / (1 + np.exp(-x))),
    "HardSigmoid": _unary_attr(
        lambda n, x: np.clip(F64(np.float32(_attr(n, "alpha", 0.2))) * x + F64(np.float32(_attr(n, "beta", 0.5))), 0, 1)
    ),
    "HardSwish": _unary(lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    "Tanh": _unary(np.tanh),
    "Exp": _unary(np.exp),
    "Sqrt": _unary(np.sqrt),
    "Neg": _unary(np.negative),
    "Clip": _clip,
    "Softmax": _softmax,
    "GlobalAveragePool": lambda node, ins, opset: _pool(node, ins, opset, "mean"),
    "GlobalMaxPool": lambda node, ins, opset: _pool(node, ins, opset, "max"),
    "Flatten": _flatten,
    "Transpose": lambda node, ins, opset: [np.transpose(ins[0], _attr(node, "perm"))],
    "Concat": lambda node, ins, opset: [np.concatenate(ins, axis=_attr(node, "axis"))],
    "Constant": _constant,
    "Where": lambda node, ins, opset: [np.where(ins[0], ins[1], ins[2]).astype(_out_dtype(ins[1], ins[2]))],
    "Gather": lambda node, ins, opset: [np.take(ins[0], ins[1].astype(np.int64), axis=_attr(node, "axis", 0))],
    "ArgMax": _argmax,
    "Not": lambda node, ins, opset: [np.logical_not(ins[0])],
    **{name: _from_constants(name) for name in constants.EVALUATORS},
}


# ---------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """``'name' (OpType)`` of every node of the main graph this evaluator cannot run."""
    bad = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
            label = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            bad.append(f"'{n.name or n.output[0]}' ({label})")
    return bad


def tensor_array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    """A tensor's value; external data through the validated reader, relative to ``base_dir``."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    if base_dir is None:
        raise NotVerifiableError(f"tensor '{t.name}' is external data of an in-memory model whose folder is not known")
    embedded = onnx.TensorProto()
    embedded.CopyFrom(t)
    del embedded.external_data[:]
    embedded.ClearField("data_location")
    embedded.raw_data = read_external(t, base_dir)
    return numpy_helper.to_array(embedded)


class Evaluator:
    """Runs the main graph of a model in numpy, node by node.

    Args:
        model: the model (initializers with external data are read from ``base_dir``).
        base_dir: folder that external-data locations are relative to.

    Raises:
        NotVerifiableError: the model holds an op this evaluator does not know.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | None = None) -> None:
        bad = unsupported_nodes(model)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise NotVerifiableError(f"bnfold's numpy reference evaluator cannot run node {', '.join(bad[:3])}{more}")
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.initializers = {t.name: tensor_array(t, base_dir) for t in model.graph.initializer}
        self.output_names = [o.name for o in model.graph.output]
        self.input_names = [i.name for i in model.graph.input if i.name not in self.initializers]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of the graph, in graph output order.

        Raises:
            NotVerifiableError: a node fails (naming it and why).
        """
        env: dict[str, np.ndarray] = dict(self.initializers)
        env.update(feeds)
        for node in self.graph.node:
            ins = [env[i] if i else None for i in node.input]
            # Trailing optional inputs left empty are dropped.
            while ins and ins[-1] is None:
                ins.pop()
            try:
                outs = OPS[node.op_type](node, ins, self.opset)
            except NotVerifiableError:
                raise
            except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as e:
                label = node.name or node.output[0]
                raise NotVerifiableError(
                    f"bnfold's numpy reference evaluator failed on node '{label}' ({node.op_type}): {e}"
                ) from e
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    env[name] = value
        return [env[n] for n in self.output_names]
