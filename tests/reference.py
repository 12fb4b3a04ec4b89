"""A small float64 numpy evaluator of Conv, ConvTranspose, Gemm, MatMul and BatchNormalization.

Written from the ONNX operator specs, independently of bnfold, so tests can
check folds for dtypes that onnxruntime's CPU provider cannot run (float64 and
bfloat16 Conv) and check the fold math directly.  :func:`evaluate` runs a whole
(flat) model of the supported ops; every value is computed in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

F64 = np.float64


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F64)


def same_pads(
    in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool
) -> list[int]:
    """Conv pads ``[begin..., end...]`` for ``auto_pad`` SAME_UPPER (``upper``) or SAME_LOWER."""
    begin, end = [], []
    for n, k, s, d in zip(in_shape, kernel, strides, dilations, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


def conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """ONNX Conv on ``x[N, Cin, d...]`` with ``w[Cout, Cin/group, k...]``, in float64."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    kernel = w.shape[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(x.shape[2:], kernel, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID" or pads is None:
        pads = [0] * (2 * nd)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out_sp = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    n, cin = x.shape[:2]
    cout, cin_g = w.shape[:2]
    assert cin == cin_g * group and cout % group == 0
    cout_g = cout // group
    xg = xp.reshape(n, group, cin_g, *xp.shape[2:])
    wg = w.reshape(group, cout_g, cin_g, *kernel)
    y = np.zeros((n, group, cout_g, *out_sp), dtype=F64)
    for k in itertools.product(*[range(kk) for kk in kernel]):
        window = tuple(
            slice(k[i] * dilations[i], k[i] * dilations[i] + (out_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        patch = xg[(slice(None), slice(None), slice(None), *window)]  # [n, g, cin_g, out...]
        wk = wg[(slice(None), slice(None), slice(None), *k)]  # [g, cout_g, cin_g]
        y += np.einsum("gci,ngi...->ngc...", wk, patch)
    y = y.reshape(n, cout, *out_sp)
    if b is not None:
        y += _f64(b).reshape((cout,) + (1,) * nd)
    return y


def conv_transpose(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int = 1,
    output_padding: Sequence[int] | None = None,
) -> np.ndarray:
    """ONNX ConvTranspose on ``x[N, Cin, d...]`` with ``w[Cin, Cout/group, k...]`` (explicit pads)."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    pads = list(pads or [0] * (2 * nd))
    output_padding = list(output_padding or [0] * nd)
    n, cin = x.shape[:2]
    cin_w, cout_g = w.shape[:2]
    kernel = w.shape[2:]
    assert cin == cin_w and cin % group == 0
    cin_g = cin // group
    in_sp = x.shape[2:]
    full = [(in_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i] for i in range(nd)]
    y = np.zeros((n, group, cout_g, *full), dtype=F64)
    xg = x.reshape(n, group, cin_g, *in_sp)
    wg = w.reshape(group, cin_g, cout_g, *kernel)
    for k in itertools.product(*[range(kk) for kk in kernel]):
        wk = wg[(slice(None), slice(None), slice(None), *k)]  # [g, cin_g, cout_g]
        contrib = np.einsum("gic,ngi...->ngc...", wk, xg)
        window = tuple(
            slice(k[i] * dilations[i], k[i] * dilations[i] + (in_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        y[(slice(None), slice(None), slice(None), *window)] += contrib
    y = y.reshape(n, group * cout_g, *full)
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None), *crop)]
    if b is not None:
        y = y + _f64(b).reshape((group * cout_g,) + (1,) * nd)
    return y


def gemm(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    trans_a: int = 0,
    trans_b: int = 0,
) -> np.ndarray:
    """ONNX Gemm ``alpha * op(A) @ op(B) + beta * C`` in float64."""
    a, b = _f64(a), _f64(b)
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    y = F64(np.float32(alpha)) * (a @ b)
    if c is not None:
        y = y + F64(np.float32(beta)) * _f64(c)
    return y


def batch_norm(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """Inference BatchNormalization on channel axis 1, straight from the formula, in float64."""
    x = _f64(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    g, b, m, v = (_f64(p).reshape(shape) for p in (gamma, beta, mean, var))
    return g * (x - m) / np.sqrt(v + F64(np.float32(eps))) + b


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _run_node(node: onnx.NodeProto, ins: list, opset: int) -> list[np.ndarray]:
    at = _attrs(node)
    op = node.op_type
    get = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
    if op in ("Conv", "ConvTranspose"):
        kw = {k: at[k] for k in ("strides", "pads", "dilations", "group") if k in at}
        if op == "Conv":
            return [conv(ins[0], ins[1], get(2), auto_pad=at.get("auto_pad", "NOTSET"), **kw)]
        assert at.get("auto_pad", "NOTSET") == "NOTSET" and "output_shape" not in at
        return [conv_transpose(ins[0], ins[1], get(2), output_padding=at.get("output_padding"), **kw)]
    if op == "Gemm":
        return [
            gemm(
                ins[0],
                ins[1],
                get(2),
                alpha=at.get("alpha", 1.0),
                beta=at.get("beta", 1.0),
                trans_a=at.get("transA", 0),
                trans_b=at.get("transB", 0),
            )
        ]
    if op == "MatMul":
        return [_f64(ins[0]) @ _f64(ins[1])]
    if op == "BatchNormalization":
        assert not at.get("training_mode", 0) and at.get("spatial", 1) == 1
        return [batch_norm(*ins[:5], eps=at.get("epsilon", 1e-5))]
    if op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return [fn(_f64(ins[0]), _f64(ins[1]))]
    if op == "Relu":
        return [np.maximum(_f64(ins[0]), 0.0)]
    if op == "Identity":
        return [ins[0]]
    if op == "Constant":
        return [numpy_helper.to_array(at["value"])]
    raise NotImplementedError(op)


def evaluate(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a flat model of the supported ops in float64; return its outputs in order."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    env: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    env.update(feeds)
    for node in model.graph.node:
        ins = [env[i] if i else None for i in node.input]
        while ins and ins[-1] is None:
            ins.pop()
        for name, value in zip(node.output, _run_node(node, ins, opset), strict=False):
            if name:
                env[name] = value
    return [env[o.name] for o in model.graph.output]
