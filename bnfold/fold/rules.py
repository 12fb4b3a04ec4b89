"""Fold patterns: each reads an affine node and its neighbour, then rewrites the graph.

An *affine node* is a BatchNormalization in inference mode, or a Mul, Add, Sub
or Div by a per-channel constant (frozen BN exported as arithmetic).  Each
pattern is one function ``(view, affine, neighbour) -> pattern name`` that
either rewrites the graph or raises :class:`Rejected` with a reason code, and
one line in :data:`PRODUCER_FOLDS` or :data:`CONSUMER_FOLDS`.  The weight math
lives in :mod:`bnfold.fold.math`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnfold.fold import consteval
from bnfold.fold import math as fm
from bnfold.fold.graph import GraphView
from bnfold.fold.report import Reason

AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


class Rejected(Exception):
    """A pattern does not apply; carries the reason code and a sentence."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Affine:
    """``y = s * x + t`` per channel on axis 1 of ``data``; ``s``/``t`` are ``[C]`` or scalars."""

    node: onnx.NodeProto
    data: str
    s: np.ndarray
    t: np.ndarray

    @property
    def channels(self) -> int | None:
        return self.s.shape[0] if self.s.ndim else (self.t.shape[0] if self.t.ndim else None)

    def per_channel(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` as float64 ``[c]`` vectors, or Rejected when the channel counts differ."""
        n = self.channels
        if n is not None and n != c:
            raise Rejected(Reason.SHAPE_MISMATCH, f"{n} channels against {c} in the target")
        return np.broadcast_to(self.s, (c,)).astype(np.float64), np.broadcast_to(self.t, (c,)).astype(np.float64)

    @property
    def is_bn(self) -> bool:
        return self.node.op_type == "BatchNormalization"


def attr(node: onnx.NodeProto, name: str, default=None):
    """Attribute value of ``node`` or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (or add) an attribute, keeping the others in place."""
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


def display_name(node: onnx.NodeProto) -> str:
    """A node's name, or ``op(output)`` for unnamed nodes."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


# ---------------------------------------------------------------------------
# Reading affine nodes
# ---------------------------------------------------------------------------


def read_bn(view: GraphView, node: onnx.NodeProto) -> Affine:
    """The ``(s, t)`` of an inference-mode BatchNormalization, or Rejected."""
    opset = view.ctx.opset
    if attr(node, "training_mode", 0) or (opset < 7 and not attr(node, "is_test", 0)):
        raise Rejected(Reason.TRAINING_MODE, "training mode is set")
    if 7 <= opset < 14 and any(node.output[1:]):
        # BatchNormalization-7/9 run in training mode (batch statistics) whenever
        # they have the mean/var outputs, whether or not anything reads them.
        raise Rejected(Reason.TRAINING_MODE, "it has statistics outputs, which means training mode before opset 14")
    if any(o and (view.users(o) or view.is_graph_output(o)) for o in node.output[1:]):
        raise Rejected(Reason.TRAINING_MODE, "its running or saved statistics outputs are used")
    if opset < 9 and attr(node, "spatial", 1) == 0:
        raise Rejected(Reason.SPATIAL, "spatial=0: statistics are per activation, not per channel")
    if len(node.input) < 5:
        raise Rejected(Reason.INVALID_PARAMS, "it has fewer than five inputs")
    params = [view.constant(n) for n in node.input[1:5]]
    names = ("scale", "bias", "mean", "var")
    for nm, p, src in zip(names, params, node.input[1:5], strict=True):
        if p is None:
            too_large(view, src)
            raise Rejected(Reason.NON_CONSTANT_PARAMS, f"its {nm} '{src}' is not a constant")
        if p.dtype.kind not in "fV" and not str(p.dtype) == "bfloat16":
            raise Rejected(Reason.INVALID_PARAMS, f"its {nm} has dtype {p.dtype}")
    if any(p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        shapes = ", ".join(f"{nm}{list(p.shape)}" for nm, p in zip(names, params, strict=True))
        raise Rejected(Reason.INVALID_PARAMS, f"parameters must be 1-D of one length: {shapes}")
    with np.errstate(invalid="ignore", over="ignore"):
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if not np.all(np.isfinite(np.concatenate([gamma, beta, mean, var]))):
        raise Rejected(Reason.INVALID_PARAMS, "a parameter is NaN or infinite")
    if np.any(var < 0):
        raise Rejected(Reason.INVALID_PARAMS, "the running variance is negative")
    s, t = fm.bn_affine(gamma, beta, mean, var, attr(node, "epsilon", 1e-5))
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise Rejected(Reason.NON_FINITE, "scale / sqrt(var + epsilon) is not finite (var + epsilon is 0)")
    return Affine(node, node.input[0], s, t)


def data_rank(view: GraphView, name: str) -> int | None:
    """Rank of ``name`` from shape inference, else from the op that makes it.

    Without shape information, follows the data input back through BNs and
    Mul/Add/Sub/Div by a constant (a constant of higher rank raises the rank)
    to a Conv, ConvTranspose or Gemm, iteratively (deep chains, no recursion).
    """
    extra = 0
    for _ in range(len(view.nodes) + 1):
        r = view.rank(name)
        if r is not None:
            return max(r, extra)
        p = view.producer_of(name)
        if p is None:
            return None
        if p.op_type in ("Conv", "ConvTranspose"):
            w = view.static_shape(p.input[1])
            return None if w is None else max(len(w), extra)
        if p.op_type == "Gemm":
            return max(2, extra)
        if p.op_type == "BatchNormalization" and p.input:
            name = p.input[0]
            continue
        if p.op_type in AFFINE_OPS and len(p.input) == 2:
            consts = [view.constant(i) for i in p.input]
            if (consts[0] is None) == (consts[1] is None):
                return None
            k = 0 if consts[0] is not None else 1
            extra = max(extra, consts[k].ndim)
            name = p.input[1 - k]
            continue
        return None
    return None


def channel_dim(view: GraphView, name: str) -> int | None:
    """Size of axis 1 of ``name`` when shape inference (or the Conv making it) tells it."""
    tp = view.ctx.value_types.get(name)
    if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape"):
        dims = tp.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            return dims[1].dim_value
    p = view.producer_of(name)
    if p is not None and p.op_type == "Conv" and list(p.output).index(name) == 0:
        w = view.static_shape(p.input[1])
        return None if w is None else w[0]
    return None


def too_large(view: GraphView, name: str) -> None:
    """Rejected with ``constant_too_large`` when ``name`` is no constant only because of the size bound."""
    why = view.oversized.get(name)
    if why is not None:
        raise Rejected(Reason.CONSTANT_TOO_LARGE, f"'{name}' is not evaluated as a constant: {why}")


def read_arith(view: GraphView, node: onnx.NodeProto) -> Affine | None:
    """A Mul/Add/Sub/Div by one float constant as a per-channel affine map.

    Returns None when the node is no candidate at all (no constant operand, two
    constants, a non-float constant, ``c / x``); raises :class:`Rejected` when the
    constant is not a scalar or per-channel on axis 1, when broadcasting it would
    change the output shape, or when a divisor is zero.  Broadcasting follows
    numpy rules: the constant's dims align with the data's *last* dims, so a
    ``[C]`` constant is per-channel on ``[N, C]`` but runs along W on NCHW.
    """
    if len(node.input) != 2:
        return None
    consts = [view.constant(i) for i in node.input]
    if consts[0] is None and consts[1] is None:
        for i in node.input:
            too_large(view, i)
    if (consts[0] is None) == (consts[1] is None):
        return None
    k = 0 if consts[0] is not None else 1
    c, data = consts[k], node.input[1 - k]
    if c.dtype.kind != "f" and str(c.dtype) != "bfloat16":
        return None
    if node.op_type == "Div" and k == 0:
        return None  # c / x is not affine
    op, where = node.op_type, f"the {node.op_type} constant {list(c.shape)}"
    rank = data_rank(view, data)
    if rank is None:
        raise Rejected(Reason.UNKNOWN_RANK, f"the rank of '{data}' is unknown")
    if rank < 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"'{data}' is {rank}-D: it has no channel axis")
    if c.ndim > rank:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{where} has more dims than the {rank}-D data: it would change the rank")
    if c.size == 0:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{where} is empty")
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        raise Rejected(
            Reason.NOT_PER_CHANNEL, f"{where} against {rank}-D data varies over axes other than the channel axis 1"
        )
    if shape[1] > 1:
        have = channel_dim(view, data)
        if have is not None and have != shape[1]:
            raise Rejected(
                Reason.SHAPE_MISMATCH, f"{where} against {have} channel(s) of '{data}' would change the output shape"
            )
        v = consteval.exact(c).reshape(-1)
    else:
        v = np.asarray(consteval.exact(c).reshape(-1)[0], dtype=np.float64)
    one, zero = np.ones_like(v), np.zeros_like(v)
    if op == "Mul":
        s, t = v, zero
    elif op == "Add":
        s, t = one, v
    elif op == "Sub":
        s, t = (one, -v) if k == 1 else (-one, v)
    else:
        if np.any(v == 0):
            raise Rejected(Reason.NON_FINITE, f"{where} has a zero divisor")
        s, t = 1.0 / v, zero
    return Affine(node, data, s, t)


def read_affine(view: GraphView, node: onnx.NodeProto) -> Affine | None:
    """The affine map of a candidate node; None when it is not one (Rejected for BN)."""
    if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
        return read_bn(view, node)
    if node.op_type in AFFINE_OPS[1:] and node.domain in ("", "ai.onnx"):
        return read_arith(view, node)
    return None


# ---------------------------------------------------------------------------
# Helpers shared by the rewrites
# ---------------------------------------------------------------------------


def const_input(view: GraphView, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    """Constant value of an optional input; Rejected when present but not constant."""
    if len(node.input) <= index or not node.input[index]:
        return None
    v = view.constant(node.input[index])
    if v is None:
        too_large(view, node.input[index])
        raise Rejected(
            Reason.NON_CONSTANT_WEIGHT, f"the {what} '{node.input[index]}' of {node.op_type} is not a constant"
        )
    if v.dtype.kind != "f" and str(v.dtype) != "bfloat16":
        raise Rejected(Reason.NON_CONSTANT_WEIGHT, f"the {what} of {node.op_type} has dtype {v.dtype}")
    return v


def rounded(x: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round once to ``dtype``; turn overflow into Rejected."""
    try:
        return fm.round_to(x, dtype, what)
    except fm.FoldValueError as e:
        reason = Reason.DTYPE_OVERFLOW if e.code == "dtype_overflow" else Reason.NON_FINITE
        raise Rejected(reason, str(e)) from None


def write_input(
    view: GraphView, node: onnx.NodeProto, index: int, value: np.ndarray, base: str, exact: np.ndarray | None = None
) -> None:
    """Give ``node`` a new constant at ``index`` (private copy when shared).

    ``exact`` is the float64 value before rounding, kept while a chain of folds goes
    on (see :func:`exact_input`), so a chain rounds each weight once, at its end.
    """
    old = node.input[index] if len(node.input) > index else ""
    name = view.replace_constant(old, value, base, node) if old else view.add_constant(base, value)
    if name != old:
        view.set_input(node, index, name)
    if exact is None:
        view.ctx.exact.pop(name, None)
    else:
        view.ctx.exact[name] = exact


def exact_input(view: GraphView, node: onnx.NodeProto, index: int, value: np.ndarray | None) -> np.ndarray | None:
    """The unrounded float64 value of input ``index`` when a previous fold of a chain made it, else ``value``."""
    if value is None or len(node.input) <= index:
        return value
    return view.ctx.exact.get(node.input[index], value)


def store(
    view: GraphView,
    aff: Affine,
    node: onnx.NodeProto,
    values: list[tuple[int, np.ndarray, np.dtype, str, str]],
    *,
    after: bool = True,
) -> None:
    """Round every folded value once, then write them all: ``(input index, float64 value, dtype, what, name)``.

    Rounding comes first so an overflow rejects the fold before anything changed.
    While a chain of folds goes on the float64 values are kept (:func:`exact_input`).
    """
    ready = [(i, v64, rounded(v64, dtype, what), base) for i, v64, dtype, what, base in values]
    keep = chain_goes_on(view, aff, after)
    for i, v64, v, base in ready:
        write_input(view, node, i, v, base, v64 if keep else None)


def _weight_and_bias(
    node: onnx.NodeProto, w64: np.ndarray, b64: np.ndarray, dtype: np.dtype, bias: str = "bias"
) -> list[tuple[int, np.ndarray, np.dtype, str, str]]:
    """:func:`store` entries of a folded weight (input 1) and bias (input 2)."""
    return [
        (1, w64, dtype, "weight", f"{node.input[1]}_bnfold"),
        (2, b64, dtype, "bias", f"{display_name(node)}_{bias}_bnfold"),
    ]


def conv_weight(view: GraphView, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None, int]:
    """A Conv's or ConvTranspose's constant weight, optional bias and group; Rejected when they do not fit."""
    w = weight(view, conv)
    b = const_input(view, conv, 2, "bias")
    group = attr(conv, "group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{conv.op_type} weight {list(w.shape)} does not fit group={group}")
    return w, b, group


def final(view: GraphView, aff: Affine, w: np.ndarray) -> np.dtype | None:
    """The dtype to round a folded weight into at once, or None while a chain goes on (keep float64)."""
    return None if chain_goes_on(view, aff) else w.dtype


def chain_goes_on(view: GraphView, aff: Affine, after: bool = True) -> bool:
    """Whether another affine op may fold into the same weights next (keep them unrounded).

    After a producer fold, that is an affine op reading the folded output; after a
    consumer fold, an affine op making the data the Conv now reads.
    """
    if after:
        users = view.users(aff.node.output[0])
        nxt = users[0] if len(users) == 1 else None
    else:
        nxt = view.producer_of(aff.data)
    return nxt is not None and nxt.op_type in AFFINE_OPS and nxt.domain in ("", "ai.onnx")


def splice_out(view: GraphView, aff: Affine, target: onnx.NodeProto) -> None:
    """Remove the affine node; ``target`` takes over its output name."""
    view.remove(aff.node)
    view.vanish(target.output[0])
    view.rename_output(target, 0, aff.node.output[0])


def require_private_output(view: GraphView, aff: Affine, producer: onnx.NodeProto) -> None:
    """The producer's output must feed only the affine node."""
    out = producer.output[0]
    if out != aff.data:
        raise Rejected(
            Reason.UNSUPPORTED_PRODUCER, f"it reads output '{aff.data}' of {producer.op_type}, not the first"
        )
    if view.is_graph_output(out):
        raise Rejected(Reason.GRAPH_OUTPUT, f"'{out}' from {display_name(producer)} is a graph output")
    if not view.only_consumer(out, aff.node):
        raise Rejected(Reason.OUTPUT_SHARED, f"'{out}' from {display_name(producer)} has other consumers")


def weight(view: GraphView, node: onnx.NodeProto, index: int = 1) -> np.ndarray:
    """A node's constant weight input; Rejected when missing or not constant."""
    w = const_input(view, node, index, "weight")
    if w is None:
        raise Rejected(Reason.NON_CONSTANT_WEIGHT, f"{node.op_type} has no weight input")
    return w


# ---------------------------------------------------------------------------
# Folds into the producer (affine after the op)
# ---------------------------------------------------------------------------


def into_conv(view: GraphView, aff: Affine, conv: onnx.NodeProto) -> str:
    """Affine after Conv: scale output channels, fold the shift into the bias."""
    w, b, _ = conv_weight(view, conv)
    s, t = aff.per_channel(w.shape[0])
    w64, b64 = fm.fold_conv(exact_input(view, conv, 1, w), exact_input(view, conv, 2, b), s, t, final(view, aff, w))
    store(view, aff, conv, _weight_and_bias(conv, w64, b64, w.dtype))
    splice_out(view, aff, conv)
    return "Conv+" + aff.node.op_type


def into_conv_transpose(view: GraphView, aff: Affine, conv: onnx.NodeProto) -> str:
    """Affine after ConvTranspose: weight ``[Cin, Cout/g, k...]``."""
    w, b, group = conv_weight(view, conv)
    s, t = aff.per_channel(w.shape[1] * group)
    w64, b64 = fm.fold_conv_transpose(
        exact_input(view, conv, 1, w), exact_input(view, conv, 2, b), s, t, group, final(view, aff, w)
    )
    store(view, aff, conv, _weight_and_bias(conv, w64, b64, w.dtype))
    splice_out(view, aff, conv)
    return "ConvTranspose+" + aff.node.op_type


def into_gemm(view: GraphView, aff: Affine, gemm: onnx.NodeProto) -> str:
    """Affine after Gemm: scale the output columns of ``op(B)``; new ``C``, ``beta = 1``."""
    b = weight(view, gemm)
    c = const_input(view, gemm, 2, "C")
    trans_b = bool(attr(gemm, "transB", 0))
    if b.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"Gemm B has shape {list(b.shape)}")
    s, t = aff.per_channel(b.shape[0] if trans_b else b.shape[1])
    b64, c64 = fm.fold_gemm(
        exact_input(view, gemm, 1, b),
        exact_input(view, gemm, 2, c),
        s,
        t,
        trans_b,
        attr(gemm, "beta", 1.0),
        final(view, aff, b),
    )
    store(view, aff, gemm, _weight_and_bias(gemm, b64, c64, b.dtype, "C"))
    set_attr(gemm, "beta", 1.0)
    splice_out(view, aff, gemm)
    return "Gemm+" + aff.node.op_type


def _matmul_weight(view: GraphView, mm: onnx.NodeProto) -> np.ndarray:
    w = weight(view, mm)
    if w.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"MatMul weight has shape {list(w.shape)}, not [K, N]")
    rank = data_rank(view, mm.input[0])
    if rank is None:
        raise Rejected(Reason.UNKNOWN_RANK, "the rank of the MatMul input is unknown")
    if rank != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"MatMul output is {rank}-D: BN's channel axis is not N")
    return w


def into_matmul(view: GraphView, aff: Affine, mm: onnx.NodeProto) -> str:
    """Affine after ``MatMul(x, W)`` with a 2-D output: scale W's columns, then add the shift."""
    kind = aff.node.op_type
    w = _matmul_weight(view, mm)
    s, t = aff.per_channel(w.shape[1])
    if not aff.is_bn and np.all(s == 1):
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, "a bias Add after MatMul is already minimal")
    w64, t64 = fm.fold_matmul(exact_input(view, mm, 1, w), None, s, t, final(view, aff, w))
    w2 = rounded(w64, w.dtype, "weight")
    t2 = rounded(t64, w.dtype, "bias")
    write_input(view, mm, 1, w2, f"{mm.input[1]}_bnfold", w64 if chain_goes_on(view, aff) else None)
    if np.any(t2 != 0):
        # The affine node becomes the bias Add, in its own place in the graph.
        node = aff.node
        out = node.output[0]
        tname = view.add_constant(f"{display_name(mm)}_bias_bnfold", t2)
        view.replace_inputs(node, [aff.data, tname])
        for extra in node.output[1:]:
            view.vanish(extra)
        del node.output[:]
        node.output.append(out)
        del node.attribute[:]
        node.op_type, node.domain = "Add", ""
    else:
        splice_out(view, aff, mm)
    return "MatMul+" + kind


def into_matmul_add(view: GraphView, aff: Affine, add: onnx.NodeProto) -> str:
    """Affine after ``MatMul(x, W) + bias`` (or ``- bias``): scale W's columns, fold into the bias.

    A ``Sub(MatMul(x, W), c)`` is a bias too (``-c``); it stays a Sub and its
    constant becomes the negated folded bias.
    """
    op = add.op_type
    if len(add.input) != 2:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"{op} with other than two inputs")
    k = 1 if view.constant(add.input[1]) is not None else 0
    bias, x = view.constant(add.input[k]), add.input[1 - k]
    mm = view.producer_of(x)
    if bias is None or mm is None or mm.op_type != "MatMul" or (op == "Sub" and k != 1):
        raise Rejected(
            Reason.UNSUPPORTED_PRODUCER, f"its input comes from {op} '{display_name(add)}', not a MatMul bias"
        )
    if not view.only_consumer(x, add):
        raise Rejected(Reason.OUTPUT_SHARED, f"the MatMul output '{x}' has other consumers")
    w = _matmul_weight(view, mm)
    n = w.shape[1]
    if bias.size not in (1, n) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
        raise Rejected(Reason.NOT_PER_CHANNEL, f"the MatMul bias has shape {list(bias.shape)}")
    sign = -1.0 if op == "Sub" else 1.0
    s, t = aff.per_channel(n)
    bias64 = np.broadcast_to(np.asarray(exact_input(view, add, k, bias), np.float64).reshape(-1), (n,))
    w64, b64 = fm.fold_matmul(exact_input(view, mm, 1, w), sign * bias64, s, t, final(view, aff, w))
    b64 = sign * b64
    b2 = rounded(b64, bias.dtype, "bias")  # before the weight is written: Rejected changes nothing
    store(view, aff, mm, [(1, w64, w.dtype, "weight", f"{mm.input[1]}_bnfold")])
    keep = chain_goes_on(view, aff)
    write_input(view, add, k, b2, f"{display_name(add)}_bias_bnfold", b64 if keep else None)
    splice_out(view, aff, add)
    return f"MatMul+{op}+{aff.node.op_type}"


def into_bn(view: GraphView, aff: Affine, bn: onnx.NodeProto) -> str:
    """Affine after an inference BN that stays: fold into its scale and bias."""
    if aff.is_bn:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, "BN after BN is folded only into a weighted op")
    read_bn(view, bn)  # the BN itself must be a valid inference BN
    gamma, beta = view.constant(bn.input[1]), view.constant(bn.input[2])
    s, t = aff.per_channel(gamma.shape[0])
    g64, b64 = fm.fold_into_bn(exact_input(view, bn, 1, gamma), exact_input(view, bn, 2, beta), s, t)
    store(
        view,
        aff,
        bn,
        [
            (1, g64, gamma.dtype, "scale", f"{bn.input[1]}_bnfold"),
            (2, b64, beta.dtype, "bias", f"{bn.input[2]}_bnfold"),
        ],
    )
    splice_out(view, aff, bn)
    return "BatchNormalization+" + aff.node.op_type


# ---------------------------------------------------------------------------
# Folds into the consumer (affine before an unpadded Conv)
# ---------------------------------------------------------------------------


def conv_pads_nothing(conv: onnx.NodeProto) -> bool:
    """True when the Conv reads no padded zeros."""
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    return auto_pad == "VALID" or not any(attr(conv, "pads", []) or [])


def into_next_conv(view: GraphView, aff: Affine, conv: onnx.NodeProto) -> str:
    """Affine before an unpadded Conv: ``W' = W * s[c]``, ``b' = b + sum W * t[c]``.

    Exact only when the Conv reads no padded zeros (padding happens after the
    affine map, so padded positions would see ``0`` instead of ``t``).
    """
    out = aff.node.output[0]
    if list(conv.input).count(out) != 1 or conv.input[0] != out:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"it feeds {display_name(conv)} other than as its data input")
    if view.is_graph_output(out) or [id(u) for u in view.value_users(out)] != [id(conv)]:
        raise Rejected(Reason.OUTPUT_SHARED_AFTER, f"its output '{out}' has other consumers or is a graph output")
    if not conv_pads_nothing(conv):
        raise Rejected(Reason.PADDED_CONSUMER, f"the following Conv {display_name(conv)} pads its input")
    w, b, group = conv_weight(view, conv)
    cin = w.shape[1] * group
    if not aff.is_bn and aff.channels is not None and channel_dim(view, aff.data) != cin:
        # A [1, C, 1, 1] constant on a 1-channel tensor broadcasts it to C channels:
        # the Conv could not read the un-broadcast data.
        raise Rejected(Reason.SHAPE_MISMATCH, f"'{aff.data}' does not have the {cin} channels the Conv reads")
    s, t = aff.per_channel(cin)
    w64, b64 = fm.fold_into_next_conv(exact_input(view, conv, 1, w), exact_input(view, conv, 2, b), s, t, group)
    store(view, aff, conv, _weight_and_bias(conv, w64, b64, w.dtype), after=False)
    for reader in view.type_only_readers(out):  # same dtype before and after the affine op
        for k, i in enumerate(list(reader.input)):
            if i == out:
                view.set_input(reader, k, aff.data)
    view.remove(aff.node)
    view.vanish(out)
    view.set_input(conv, 0, aff.data)
    return aff.node.op_type + "+Conv"


def consumer_blocked(view: GraphView, aff: Affine) -> Rejected | None:
    """Why no consumer fold was tried although a consumer could absorb ``aff``.

    The engine tries a consumer fold only when the affine node's output has a
    single reader and is no graph output; when a Conv (or another consumer-fold
    op) reads it among others, that sharing is the reason it stays.
    """
    out = aff.node.output[0]
    users = view.value_users(out)
    if not any(u.op_type in CONSUMER_FOLDS and u.domain in ("", "ai.onnx") for u in users):
        return None
    if len(users) == 1 and not view.is_graph_output(out):
        return None
    why = "is a graph output" if view.is_graph_output(out) else f"feeds {len(users)} nodes"
    return Rejected(Reason.OUTPUT_SHARED_AFTER, f"its output '{out}' {why}, so the Conv after it cannot absorb it")


Fold = Callable[[GraphView, Affine, onnx.NodeProto], str]

# op type of the node that makes the affine node's input -> fold
PRODUCER_FOLDS: dict[str, Fold] = {
    "Conv": into_conv,
    "ConvTranspose": into_conv_transpose,
    "Gemm": into_gemm,
    "MatMul": into_matmul,
    "Add": into_matmul_add,
    "Sub": into_matmul_add,
    "BatchNormalization": into_bn,
}

# op type of the single node that reads the affine node's output -> fold
CONSUMER_FOLDS: dict[str, Fold] = {
    "Conv": into_next_conv,
}

# producers next to which a Mul/Add/Sub/Div by a constant looks like a frozen BN
_REPORT_NEXT_TO = ("Conv", "ConvTranspose", "Gemm", "BatchNormalization")


# Reasons that are routine for arithmetic by a scalar: activations such as
# hard-swish (``x * relu6(x + 3) / 6``) read a Conv output twice and feed padded Convs.
_ROUTINE_FOR_ARITH = {
    Reason.OUTPUT_SHARED,
    Reason.OUTPUT_SHARED_AFTER,
    Reason.GRAPH_OUTPUT,
    Reason.PADDED_CONSUMER,
}


def arith_worth_reporting(view: GraphView, node: onnx.NodeProto, rejected: Rejected) -> bool:
    """Whether a Mul/Add/Sub/Div by a float constant that stays deserves a report line.

    Only nodes next to an op that could absorb them (a Conv, ConvTranspose, Gemm or
    BN before, a Conv after) and only real reasons: "nothing to fold into" is the
    normal case for arithmetic, and so are a shared output or a padded Conv after an
    op by a scalar (activations), while a per-channel constant looks like a frozen BN.
    Bias Adds after a MatMul are not reported either (they are already minimal).
    """
    if node.op_type not in AFFINE_OPS[1:] or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    if rejected.reason == Reason.UNSUPPORTED_PRODUCER:
        return False
    if rejected.reason == Reason.CONSTANT_TOO_LARGE:
        return True
    consts = [view.constant(i) for i in node.input]
    if (consts[0] is None) == (consts[1] is None):
        return False
    if rejected.reason in _ROUTINE_FOR_ARITH and (consts[0] if consts[0] is not None else consts[1]).size == 1:
        return False
    data = node.input[1] if consts[0] is not None else node.input[0]
    producer = view.producer_of(data)
    if producer is not None and producer.op_type in _REPORT_NEXT_TO and producer.domain in ("", "ai.onnx"):
        return True
    users = view.users(node.output[0])
    return any(u.op_type in CONSUMER_FOLDS and u.domain in ("", "ai.onnx") for u in users)
