"""Reading affine nodes: a BN in inference mode, or Mul/Add/Sub/Div by a constant, as ``y = s * x + t``.

:func:`read_affine` turns a node into an :class:`Affine` (or says why it cannot be
one); which axis the constant runs along is recorded, and the rules decide whether
that is the axis their weights' channels are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold import consteval
from bnfold.fold import math as fm
from bnfold.fold.graph import GraphView
from bnfold.fold.nodes import attr, is_standard
from bnfold.fold.report import Reason, Rejected

AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")
ARITH_OPS = AFFINE_OPS[1:]


@dataclass
class Affine:
    """``y = s * x + t`` along one axis of ``data``; ``s``/``t`` are ``[C]`` vectors or scalars.

    ``axis`` is the axis of ``data`` the vectors run along (1 for a BN; None when
    both are scalars); ``rank`` is the rank of ``data`` when known.
    """

    node: onnx.NodeProto
    data: str
    s: np.ndarray
    t: np.ndarray
    axis: int | None = 1
    rank: int | None = None

    @property
    def channels(self) -> int | None:
        """Length of the per-channel vectors (None for scalars)."""
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

    @property
    def shifts(self) -> bool:
        """Whether ``t`` is not all zero."""
        return bool(np.any(self.t != 0))

    def broadcast_shape(self) -> tuple[int, ...]:
        """Shape of ``t`` (``[C]`` at ``axis``) that broadcasts along ``axis`` of ``data`` (numpy rules)."""
        if self.axis is None or self.rank is None or self.channels is None:
            return ()
        return (self.channels,) + (1,) * (self.rank - 1 - self.axis)


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
        raise Rejected(Reason.SPATIAL_0, "spatial=0: statistics are per activation, not per channel")
    if len(node.input) < 5:
        raise Rejected(Reason.INVALID_PARAMETERS, "it has fewer than five inputs")
    names = ("scale", "bias", "mean", "var")
    params: list[np.ndarray] = []
    for nm, src in zip(names, node.input[1:5], strict=True):
        p = view.constant(src)
        if p is None:
            view.reject_if_oversized(src)
            raise Rejected(Reason.NON_CONSTANT_PARAMETERS, f"its {nm} '{src}' is not a constant")
        if p.dtype.kind not in "fV" and not str(p.dtype) == "bfloat16":
            raise Rejected(Reason.INVALID_PARAMETERS, f"its {nm} has dtype {p.dtype}")
        params.append(p)
    if any(p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        shapes = ", ".join(f"{nm}{list(p.shape)}" for nm, p in zip(names, params, strict=True))
        raise Rejected(Reason.INVALID_PARAMETERS, f"parameters must be 1-D of one length: {shapes}")
    with np.errstate(invalid="ignore", over="ignore"):
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    if not np.all(np.isfinite(np.concatenate([gamma, beta, mean, var]))):
        raise Rejected(Reason.INVALID_PARAMETERS, "a parameter is NaN or infinite")
    if np.any(var < 0):
        raise Rejected(Reason.INVALID_PARAMETERS, "the running variance is negative")
    s, t = fm.bn_affine(gamma, beta, mean, var, attr(node, "epsilon", 1e-5))
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise Rejected(Reason.NON_FINITE, "scale / sqrt(var + epsilon) is not finite (var + epsilon is 0)")
    return Affine(node, node.input[0], s, t, axis=1, rank=view.rank(node.input[0]))


def _const_operand(view: GraphView, node: onnx.NodeProto) -> tuple[int, np.ndarray] | None:
    """``(index, value)`` of the one constant operand of a two-input node, else None."""
    if len(node.input) != 2:
        return None
    a, b = view.constant(node.input[0]), view.constant(node.input[1])
    if a is None and b is None:
        for i in node.input:
            view.reject_if_oversized(i)
    if (a is None) == (b is None):
        return None
    return (0, a) if a is not None else (1, b)  # type: ignore[return-value]


def data_rank(view: GraphView, name: str) -> int | None:
    """Rank of ``name`` from shape inference, else from the op that makes it.

    Without shape information, follows the data input back through BNs and
    Mul/Add/Sub/Div by a constant (a constant of higher rank raises the rank)
    to an op whose output rank its weights or attributes prove: Conv,
    ConvTranspose, Gemm, Flatten, Reshape to a constant shape, Transpose with
    perm.  Iterative, and memoized per view, so a chain of n such ops costs O(n)
    in all, not O(n) per op.
    """
    memo = view.memo.setdefault("data_rank", {})
    chain: list[tuple[str, int]] = []  # (name, rank of the constant met on the way)
    result: int | None = None
    seen: set[str] = set()
    while True:
        if name in memo:
            result = memo[name]
            break
        if name in seen:
            break  # a cycle: not a valid graph
        seen.add(name)
        r = view.rank(name)
        if r is not None:
            result = r
            break
        p = view.producer_of(name)
        if p is None:
            break
        if p.op_type in ("Conv", "ConvTranspose"):
            w = view.static_shape(p.input[1]) if len(p.input) > 1 else None
            result = None if w is None else len(w)
            break
        if p.op_type in ("Gemm", "Flatten"):
            result = 2
            break
        if p.op_type == "Reshape" and view.ctx.opset >= 5 and len(p.input) > 1:
            shape = view.constant(p.input[1])  # the output rank is the length of the target shape
            result = None if shape is None or shape.ndim != 1 else int(shape.shape[0])
            break
        if p.op_type == "Transpose" and attr(p, "perm") is not None:
            result = len(attr(p, "perm"))
            break
        if p.op_type == "BatchNormalization" and p.input:
            chain.append((name, 0))
            name = p.input[0]
            continue
        op = _const_operand(view, p) if p.op_type in ARITH_OPS else None
        if op is None:
            break
        chain.append((name, op[1].ndim))
        name = p.input[1 - op[0]]
    memo[name] = result
    for n, extra in reversed(chain):
        result = None if result is None else max(result, extra)
        memo[n] = result
    return result


def channel_dim(view: GraphView, name: str) -> int | None:
    """Size of axis 1 of ``name`` when shape inference (or the Conv making it) tells it."""
    dims = view.dims(name)
    if dims is not None and len(dims) > 1 and dims[1] is not None:
        return dims[1]
    p = view.producer_of(name)
    if p is not None and p.op_type == "Conv" and list(p.output).index(name) == 0 and len(p.input) > 1:
        w = view.static_shape(p.input[1])
        return None if w is None else w[0]
    return None


def read_arith(view: GraphView, node: onnx.NodeProto) -> Affine | None:
    """A Mul/Add/Sub/Div by one float constant as an affine map along one axis.

    Returns None when the node is no candidate at all (no constant operand, two
    constants, a non-float constant, ``c / x``); raises :class:`Rejected` when the
    constant varies along more than one axis, when broadcasting it would change
    the output shape, or when a divisor is zero.  Broadcasting follows numpy
    rules: the constant's dims align with the data's *last* dims, so a ``[C]``
    constant runs along axis 1 of ``[N, C]`` but along W of NCHW.
    """
    found = _const_operand(view, node)
    if found is None:
        return None
    k, c = found
    data = node.input[1 - k]
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
    varying = [i for i, d in enumerate(shape) if d != 1]
    if len(varying) > 1:
        raise Rejected(Reason.NOT_PER_CHANNEL, f"{where} against {rank}-D data varies over axes {varying}")
    axis = varying[0] if varying else None
    if axis is not None:
        dims = view.dims(data)
        have = dims[axis] if dims is not None and len(dims) == rank else None
        if axis == 1 and have is None:
            have = channel_dim(view, data)
        if have is not None and have != shape[axis]:
            raise Rejected(
                Reason.SHAPE_MISMATCH, f"{where} against {have} element(s) of '{data}' would change the output shape"
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
    return Affine(node, data, s, t, axis=axis, rank=rank)


def read_affine(view: GraphView, node: onnx.NodeProto) -> Affine | None:
    """The affine map of a candidate node; None when it is not one (Rejected for BN and bad constants)."""
    if is_standard(node, "BatchNormalization"):
        return read_bn(view, node)
    if is_standard(node, *ARITH_OPS):
        return read_arith(view, node)
    return None
