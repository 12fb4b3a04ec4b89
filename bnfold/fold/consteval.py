"""Evaluate the constant subgraphs that exporters use to make weights.

Any deterministic standard op whose inputs are all constants is a constant:
``Constant`` nodes; the structural ops (``ConstantOfShape``, ``Identity``,
``Cast``, ``CastLike``, ``Reshape``, ``Flatten``, ``Un/Squeeze``, ``Expand``,
``Tile``, ``Shape``, ``Size``, ``Slice``, ``Concat``, ``Gather``, ``Transpose``,
``Range``, ``Where``); arithmetic (``Add``, ``Sub``, ``Mul``, ``Div``, ``Pow``,
``Mod``, ``Neg``, ``Abs``, ``Sqrt``, ``Reciprocal``, ``Exp``, ``Log``, ``Max``,
``Min``, ``Sum``, ``Mean``, ``Clip``, ``MatMul``, ...); comparisons and logic
(``Equal``, ``Less``, ``Greater``, ``And``, ``Not``, ...) and the ``ReduceX`` ops.
That covers the onnx model-zoo architectures (weights made by ConstantOfShape),
raw PyTorch dynamo exports (``FrozenBatchNorm2d`` as ``m = w * rsqrt(var + eps)``,
``a = b - mean * m``; a zero bias made by ``Shape -> Slice -> Expand -> CastLike``)
and TorchScript exports without constant folding (``MatMul(x, Transpose(W))``).

Semantics follow the ONNX spec: numpy broadcasting (and the ``broadcast``/``axis``
attributes before opset 7), integer ``Div`` truncating toward zero, attributes that
became inputs (``Clip`` 11, ``ReduceSum`` 13, the other reductions 18, ...).

Precision: float ops compute in float64 and round the result to the op's dtype.
The unrounded float64 value is kept beside each computed float tensor and the
next op of a constant chain starts from it (:func:`exact`), so a chain such as
``w * (1 / sqrt(var + eps))`` is rounded once, at its end, like a BN's fold.
A ``Cast`` is a rounding the model asks for: the chain restarts from its result.
Inputs bigger than :data:`MAX_ELEMENTS` are computed in their own dtype (no
float64 copies of a big initializer).

Size bound: no evaluated tensor may hold more than :data:`MAX_ELEMENTS` elements
unless one of its inputs already holds as many (a Transpose or Cast of a big
initializer is fine; an Expand or ConstantOfShape of a huge shape is not).  The
element count is computed with Python integers before anything is allocated;
past the bound :func:`evaluate` raises :class:`ConstantTooLarge`, and the tensor
is not a constant.  Called directly (as the verifier's numpy evaluator calls
:data:`EVALUATORS` on real activations) the functions keep the looser
:data:`RUNTIME_MAX_ELEMENTS` and no MatMul cost bound.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

Evaluator = Callable[[onnx.NodeProto, list, int], np.ndarray]

# The most elements a computed tensor may hold when no input is as big
# (2**24 = 16.8 million: 128 MiB in float64).  An op may always make a tensor
# as big as its biggest input (that much is already in memory).
MAX_ELEMENTS = 1 << 24
# MatMul of constants: the most multiply-adds it may cost.
MAX_MATMUL_OPS = 1 << 30
# The bound when the functions of :data:`EVALUATORS` are called directly, as the
# verifier's numpy evaluator does on real activations (not through :func:`evaluate`).
RUNTIME_MAX_ELEMENTS = 1 << 31
_BOUNDED: ContextVar[bool] = ContextVar("bnfold_consteval_bounded", default=False)

F64 = np.float64


class ConstantTooLarge(ValueError):
    """A constant would hold more elements than :data:`MAX_ELEMENTS` (it is not evaluated)."""


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


def is_float(dt: np.dtype) -> bool:
    """float16/32/64 and the ml_dtypes floats (bfloat16, float8)."""
    return dt.kind == "f" or (dt.kind == "V" and dt.name.startswith(("bfloat", "float")))


# ---------------------------------------------------------------------------
# Size bound
# ---------------------------------------------------------------------------


def elements(shape: Sequence[int]) -> int:
    """Element count of ``shape`` as a Python int (no float overflow); ValueError on a negative dim."""
    n = 1
    for d in shape:
        d = int(d)
        if d < 0:
            raise ValueError(f"negative dimension {d}")
        n *= d
    return n


def check_size(shape: Sequence[int], *inputs: np.ndarray | None, what: str = "tensor") -> tuple[int, ...]:
    """``shape`` as a tuple of ints once its element count is within the bound.

    The bound is :data:`MAX_ELEMENTS`, or the size of the biggest of ``inputs``
    when that is larger.  Raises :class:`ConstantTooLarge` past it.
    """
    dims = tuple(int(d) for d in shape)
    n = elements(dims)
    bound = MAX_ELEMENTS if _BOUNDED.get() else RUNTIME_MAX_ELEMENTS
    allowed = max([bound, *(int(x.size) for x in inputs if x is not None)])
    if n > allowed:
        raise ConstantTooLarge(f"a {what} of shape {list(dims)} would hold {n} elements (the bound is {allowed})")
    return dims


def _broadcast(*arrays: np.ndarray) -> tuple[int, ...]:
    """The broadcast shape of ``arrays``, within the size bound (checked before any allocation)."""
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    return check_size(shape, *arrays, what="broadcast result")


# ---------------------------------------------------------------------------
# float64 shadows of computed float tensors
# ---------------------------------------------------------------------------

# id(rounded value) -> (weak reference to it, its unrounded float64 value)
_EXACT: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def exact(value: np.ndarray) -> np.ndarray:
    """The float64 value of a constant: unrounded when this module computed it, else ``value`` as float64."""
    hit = _EXACT.get(id(value))
    if hit is not None and hit[0]() is value:
        return hit[1]
    return np.asarray(value).astype(F64)


def _shadow(value: np.ndarray) -> np.ndarray | None:
    hit = _EXACT.get(id(value))
    return hit[1] if hit is not None and hit[0]() is value else None


def _remember(value: np.ndarray, value64: np.ndarray) -> None:
    if value.dtype == F64 or value64.dtype != F64 or value64.shape != value.shape:
        return
    key = id(value)

    def forget(_ref: weakref.ref) -> None:
        _EXACT.pop(key, None)

    try:
        ref = weakref.ref(value, forget)
    except TypeError:
        return
    _EXACT[key] = (ref, value64)


# ---------------------------------------------------------------------------
# Structural ops
# ---------------------------------------------------------------------------


def _constant_of_shape(node, ins, opset):
    shape = check_size(ins[0].reshape(-1), what="ConstantOfShape result")
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


def _flatten(node, ins, opset):
    x = ins[0]
    axis = _attr(node, "axis", 1)
    axis = axis % x.ndim if axis < 0 else axis
    if axis > x.ndim:
        raise ValueError("Flatten axis out of range")
    return x.reshape(elements(x.shape[:axis]), elements(x.shape[axis:]))


def _axes(node, ins, opset, since: int):
    if opset >= since:
        return None if len(ins) < 2 or ins[1] is None else [int(a) for a in ins[1]]
    axes = _attr(node, "axes")
    return None if axes is None else list(axes)


def _unsqueeze(node, ins, opset):
    axes = _axes(node, ins, opset, 13)
    if axes is None:
        raise ValueError("Unsqueeze needs axes")
    out_rank = ins[0].ndim + len(axes)
    norm = sorted(a % out_rank for a in axes)
    if len(set(norm)) != len(norm):
        raise ValueError("repeated Unsqueeze axis")
    out = ins[0]
    for a in norm:
        out = np.expand_dims(out, a)
    return out


def _squeeze(node, ins, opset):
    axes = _axes(node, ins, opset, 13)
    x = ins[0]
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _expand(node, ins, opset):
    target = [int(d) for d in ins[1].reshape(-1)]
    shape = np.broadcast_shapes(ins[0].shape, tuple(target))
    check_size(shape, ins[0], what="Expand result")
    return np.array(np.broadcast_to(ins[0], shape))


def _tile(node, ins, opset):
    if opset < 6:
        raise ValueError("Tile-1 (tiles and axis inputs) is not evaluated")
    x = ins[0]
    reps = [int(r) for r in ins[1].reshape(-1)]
    if len(reps) != x.ndim or any(r < 0 for r in reps):
        raise ValueError("Tile repeats do not match the rank")
    check_size([d * r for d, r in zip(x.shape, reps, strict=True)], x, what="Tile result")
    return np.tile(x, reps)


def _shape(node, ins, opset):
    dims = np.array(ins[0].shape, dtype=np.int64)
    start = _attr(node, "start", 0) if opset >= 15 else 0
    end = _attr(node, "end", None) if opset >= 15 else None
    return dims[start:end]


def _size(node, ins, opset):
    return np.array(elements(ins[0].shape), dtype=np.int64)


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
    if any(s == 0 for s in steps):
        raise ValueError("Slice step 0")
    index = [slice(None)] * x.ndim
    for a, s, e, st in zip(axes, starts, ends, steps, strict=False):
        index[a] = slice(int(s), int(e), st)
    return x[tuple(index)]


def _concat(node, ins, opset):
    axis = _attr(node, "axis")
    if any(x.ndim == 0 for x in ins):
        raise ValueError("Concat of scalars")
    ax = axis % ins[0].ndim
    shape = list(ins[0].shape)
    shape[ax] = sum(int(x.shape[ax]) for x in ins)
    # Only distinct inputs count: Concat(x, x, x, ...) must not grow past the bound.
    distinct = list({id(x): x for x in ins}.values())
    limit = max(MAX_ELEMENTS if _BOUNDED.get() else RUNTIME_MAX_ELEMENTS, sum(int(x.size) for x in distinct))
    if elements(shape) > limit:
        raise ConstantTooLarge(f"a Concat result of shape {shape} would exceed the bound")
    return np.concatenate(ins, axis=axis)


def _transpose(node, ins, opset):
    return np.transpose(ins[0], _attr(node, "perm"))


def _gather(node, ins, opset):
    x, idx = ins[0], ins[1]
    if idx.dtype.kind not in "iu":
        raise TypeError("Gather indices must be integers")
    axis = _attr(node, "axis", 0) % x.ndim
    n = x.shape[axis]
    idx = idx.astype(np.int64)
    if np.any(idx < -n) or np.any(idx >= n):
        raise IndexError("Gather index out of range")
    shape = x.shape[:axis] + idx.shape + x.shape[axis + 1 :]
    check_size(shape, x, what="Gather result")
    return np.take(x, np.where(idx < 0, idx + n, idx), axis=axis)


def _range(node, ins, opset):
    start, limit, delta = (np.asarray(v).reshape(()) for v in ins[:3])
    if len({start.dtype, limit.dtype, delta.dtype}) != 1:
        raise TypeError("Range inputs of different types")
    dtype = start.dtype
    if dtype.kind in "iu":
        s, lim, d = int(start), int(limit), int(delta)
        if d == 0:
            raise ValueError("Range delta 0")
        n = max(-((s - lim) // d), 0)  # ceil((lim - s) / d) in Python ints
        check_size([n], what="Range result")
        return (s + d * np.arange(n, dtype=np.int64)).astype(dtype)
    s64, lim64, d64 = float(start), float(limit), float(delta)
    if d64 == 0 or not all(map(math.isfinite, (s64, lim64, d64))):
        raise ValueError("Range delta 0 or a bound not finite")
    n = max(math.ceil((lim64 - s64) / d64), 0)
    check_size([n], what="Range result")
    return (s64 + d64 * np.arange(n, dtype=F64)).astype(dtype)


def _where(node, ins, opset):
    cond, a, b = ins
    if cond.dtype != np.bool_ or a.dtype != b.dtype:
        raise TypeError("Where needs a bool condition and two inputs of one type")
    _broadcast(cond, a, b)
    return np.where(cond, a, b)


# ---------------------------------------------------------------------------
# Arithmetic: each kernel gets float inputs as float64 (integers as they are)
# and returns the unrounded result; the wrapper rounds it to the op's dtype.
# ---------------------------------------------------------------------------

Kernel = Callable[[onnx.NodeProto, list, int], np.ndarray]


def _legacy_align(node: onnx.NodeProto, a: np.ndarray, b: np.ndarray, opset: int) -> np.ndarray:
    """``b`` laid out for numpy broadcasting under the ``broadcast``/``axis`` rules of opset < 7."""
    if opset >= 7:
        return b
    if not _attr(node, "broadcast", 0):
        if a.shape != b.shape:
            raise ValueError("shapes differ and broadcast=0")
        return b
    axis = _attr(node, "axis", None)
    if axis is None or b.ndim == 0:
        return b
    axis = axis % a.ndim if axis < 0 else axis
    if axis + b.ndim > a.ndim:
        raise ValueError("legacy broadcast axis out of range")
    return b.reshape((1,) * axis + b.shape + (1,) * (a.ndim - axis - b.ndim))


def _same_types(ins: list) -> None:
    if len({x.dtype for x in ins}) != 1:
        raise TypeError("inputs of different types")


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def kernel(node, ins, opset):
        a, b = ins
        b = _legacy_align(node, a, b, opset)
        _broadcast(a, b)
        with np.errstate(all="ignore"):
            return fn(a, b)

    return kernel


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":
        if np.any(b == 0):
            raise ValueError("integer division by zero")
        q = np.abs(a) // np.abs(b)  # truncation toward zero, as C does
        return np.where((a < 0) != (b < 0), -q, q)
    return a / b


def _mod(node, ins, opset):
    a, b = ins
    _broadcast(a, b)
    fmod = _attr(node, "fmod", 0)
    if a.dtype.kind == "f":
        if not fmod:
            raise ValueError("float Mod needs fmod=1")
        with np.errstate(all="ignore"):
            return np.fmod(a, b)
    if np.any(b == 0):
        raise ValueError("integer Mod by zero")
    return np.fmod(a, b) if fmod else np.mod(a, b)


def _pow(node, ins, opset):
    x, y = ins
    y = _legacy_align(node, x, y, opset)
    _broadcast(x, y)
    with np.errstate(all="ignore"):
        if x.dtype.kind == "f":
            return np.power(x, y.astype(F64))
        r = np.power(x.astype(F64), y.astype(F64))
    if y.dtype.kind in "iu" and np.any(y < 0):
        raise ValueError("integer Pow with a negative exponent")
    if not np.all(np.isfinite(r)) or np.any(np.abs(r) >= 2.0**53):
        raise ValueError("integer Pow out of range")
    return np.trunc(r)


def _variadic(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], mean: bool = False) -> Kernel:
    def kernel(node, ins, opset):
        if not ins:
            raise ValueError("no inputs")
        _same_types(ins)
        _broadcast(*ins)
        out = ins[0]
        with np.errstate(all="ignore"):
            for x in ins[1:]:
                out = fn(out, x)
            if mean:
                out = out / len(ins)
        return np.asarray(out)

    return kernel


def _clip(node, ins, opset):
    x = ins[0]
    if opset < 11:
        lo, hi = _attr(node, "min", None), _attr(node, "max", None)
        lo = None if lo is None else F64(np.float32(lo))
        hi = None if hi is None else F64(np.float32(hi))
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("Clip-6 with min > max")  # onnxruntime refuses such a node
    else:
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
        for v in (lo, hi):
            if v is not None and v.size != 1:
                raise ValueError("Clip bounds must be scalars")
        lo = None if lo is None else lo.reshape(())
        hi = None if hi is None else hi.reshape(())
    out = x
    if lo is not None:
        out = np.maximum(out, lo)
    if hi is not None:
        out = np.minimum(out, hi)
    return np.asarray(out)


def _matmul(node, ins, opset):
    a, b = ins
    _same_types(ins)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("MatMul of a scalar")
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    b2 = b.reshape(-1, 1) if b.ndim == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError("MatMul inner dims differ")
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    out = (*batch, a2.shape[-2], b2.shape[-1])
    check_size(out, a, b, what="MatMul result")
    if _BOUNDED.get() and elements(out) * int(a2.shape[-1]) > MAX_MATMUL_OPS:
        raise ConstantTooLarge(f"a MatMul of {list(a.shape)} by {list(b.shape)} costs too much to evaluate")
    return np.matmul(a, b)


def _reduce(fn: Callable[..., np.ndarray], axes_input_since: int) -> Kernel:
    def kernel(node, ins, opset):
        x = ins[0]
        if opset >= axes_input_since:
            axes = None if len(ins) < 2 or ins[1] is None else [int(a) for a in ins[1].reshape(-1)]
        else:
            a = _attr(node, "axes", None)
            axes = None if a is None else list(a)
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            # noop_with_empty_axes reduces over no axis: ReduceSumSquare still squares.
            noop = opset >= axes_input_since and _attr(node, "noop_with_empty_axes", 0)
            axes = [] if noop else list(range(x.ndim))
        norm = tuple(sorted({a % x.ndim for a in axes})) if x.ndim else ()
        with np.errstate(all="ignore"):
            return np.asarray(fn(x, axis=norm, keepdims=keep))

    return kernel


def _unary(fn: Callable[[np.ndarray], np.ndarray], floats_only: bool = True) -> Kernel:
    def kernel(node, ins, opset):
        x = ins[0]
        if floats_only and x.dtype.kind != "f":
            raise TypeError("a float op on a non-float tensor")
        with np.errstate(all="ignore"):
            return np.asarray(fn(x))

    return kernel


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.zeros((), dtype=x.dtype))


def _sum_square(x, axis, keepdims):
    return np.sum(x * x, axis=axis, keepdims=keepdims)


def _l1(x, axis, keepdims):
    return np.sum(np.abs(x), axis=axis, keepdims=keepdims)


def _l2(x, axis, keepdims):
    return np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))


def _log_sum_exp(x, axis, keepdims):
    return np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))


# op -> kernel; the result is rounded to the dtype of the first input.
KERNELS: dict[str, Kernel] = {
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_int_div),
    "Pow": _pow,
    "Mod": _mod,
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Sum": _variadic(np.add),
    "Mean": _variadic(np.add, mean=True),
    "Neg": _unary(np.negative, floats_only=False),
    "Abs": _unary(np.abs, floats_only=False),
    "Sign": _unary(np.sign, floats_only=False),
    "Relu": _unary(_relu, floats_only=False),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Exp": _unary(np.exp),
    "Log": _unary(np.log),
    "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil),
    "Round": _unary(np.round),  # half to even, as the spec says
    "Sigmoid": _unary(_sigmoid),
    "Tanh": _unary(np.tanh),
    "Clip": _clip,
    "MatMul": _matmul,
    "ReduceSum": _reduce(np.sum, 13),
    "ReduceMean": _reduce(np.mean, 18),
    "ReduceMax": _reduce(np.max, 18),
    "ReduceMin": _reduce(np.min, 18),
    "ReduceProd": _reduce(np.prod, 18),
    "ReduceSumSquare": _reduce(_sum_square, 18),
    "ReduceL1": _reduce(_l1, 18),
    "ReduceL2": _reduce(_l2, 18),
    "ReduceLogSumExp": _reduce(_log_sum_exp, 18),
}

# Ops whose inputs must share one type (the spec's single type variable T).
_ONE_TYPE = {"Add", "Sub", "Mul", "Div", "Mod", "Clip", "Max", "Min", "Sum", "Mean", "MatMul"}


def _as64(x: np.ndarray | None) -> np.ndarray | None:
    return x.astype(F64) if x is not None and is_float(x.dtype) else x


def _run_kernel(op: str, node: onnx.NodeProto, ins: list, opset: int, shadows: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(rounded, unrounded)`` result of a kernel op (float inputs through float64)."""
    present = [x for x in ins if x is not None]
    if not present:
        raise ValueError("no inputs")
    if op in _ONE_TYPE:
        _same_types(present)
    dtype = present[0].dtype
    if dtype == np.bool_ or dtype.kind not in "fiuV" or (dtype.kind == "V" and not is_float(dtype)):
        raise TypeError(f"{op} of {dtype}")
    if is_float(dtype) and all(x.size <= MAX_ELEMENTS for x in present):
        args = [None if x is None else (_shadow(x) if shadows and _shadow(x) is not None else _as64(x)) for x in ins]
        out64 = np.asarray(KERNELS[op](node, args, opset))
        return out64.astype(dtype), out64
    if is_float(dtype):
        # Past the bound (a big initializer) float64 copies would cost 2-4x its size:
        # compute in its own dtype, as a runtime does.
        out = np.asarray(KERNELS[op](node, list(ins), opset)).astype(dtype)
        return out, out
    out = np.asarray(KERNELS[op](node, list(ins), opset))
    if op == "Pow" or out.dtype != dtype:
        out = out.astype(dtype)
    return out, out


def _kernel_op(op: str) -> Evaluator:
    def run(node, ins, opset):
        return _run_kernel(op, node, ins, opset, shadows=False)[0]

    return run


def _compare(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], logic: bool = False) -> Evaluator:
    def run(node, ins, opset):
        a, b = ins
        _same_types(ins)
        if logic and a.dtype != np.bool_:
            raise TypeError("a logical op on a non-bool tensor")
        if not logic and a.dtype == np.bool_ and fn is not np.equal:
            raise TypeError("an order comparison of bools")
        b = _legacy_align(node, a, b, opset)
        _broadcast(a, b)
        if is_float(a.dtype) and a.dtype.kind == "V":
            a, b = a.astype(F64), b.astype(F64)
        return np.asarray(fn(a, b))

    return run


def _not(node, ins, opset):
    if ins[0].dtype != np.bool_:
        raise TypeError("Not of a non-bool tensor")
    return np.logical_not(ins[0])


EVALUATORS: dict[str, Evaluator] = {
    "ConstantOfShape": _constant_of_shape,
    "Identity": lambda node, ins, opset: ins[0],
    "Cast": _cast,
    "CastLike": lambda node, ins, opset: ins[0].astype(ins[1].dtype),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Expand": _expand,
    "Tile": _tile,
    "Shape": _shape,
    "Size": _size,
    "Slice": _slice,
    "Concat": _concat,
    "Transpose": _transpose,
    "Gather": _gather,
    "Range": _range,
    "Where": _where,
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "LessOrEqual": _compare(np.less_equal),
    "Greater": _compare(np.greater),
    "GreaterOrEqual": _compare(np.greater_equal),
    "And": _compare(np.logical_and, logic=True),
    "Or": _compare(np.logical_or, logic=True),
    "Xor": _compare(np.logical_xor, logic=True),
    "Not": _not,
    **{op: _kernel_op(op) for op in KERNELS},
}

# Inputs whose *value* an op does not need (Shape and Size read only the shape).
SHAPE_ONLY = {"Shape", "Size"}
# (op, input index) that an op reads only the dtype of: CastLike's target
# (a raw dynamo export casts its zero bias like the graph input).
TYPE_ONLY = {("CastLike", 1)}
# Ops that only move or copy values (no arithmetic): applied to the float64
# shadows of their inputs they give the shadow of their result.
_MOVES = {
    "Identity",
    "Reshape",
    "Flatten",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Tile",
    "Slice",
    "Concat",
    "Transpose",
    "Gather",
    "Where",
}


def _evaluate(node: onnx.NodeProto, inputs: list, opset: int) -> np.ndarray:
    op = node.op_type
    if op in KERNELS:
        out, out64 = _run_kernel(op, node, inputs, opset, shadows=True)
        if is_float(out.dtype):
            _remember(out, out64)
        return out
    out = np.asarray(EVALUATORS[op](node, inputs, opset))
    if not is_float(out.dtype):
        return out
    # A Cast is a rounding the model asks for: its result has no unrounded value.
    if op in _MOVES and any(x is not None and _shadow(x) is not None for x in inputs):
        args = [_shadow(x) if x is not None and _shadow(x) is not None else _as64(x) for x in inputs]
        _remember(out, np.asarray(EVALUATORS[op](node, args, opset)))
    return out


def evaluate(node: onnx.NodeProto, inputs: list, opset: int) -> np.ndarray | None:
    """Evaluate one node on numpy inputs (all constants); None when unsupported or invalid.

    Raises:
        ConstantTooLarge: the result would hold more elements than the bound
            (see :data:`MAX_ELEMENTS`); nothing that big was allocated.
    """
    if node.op_type == "Constant":
        return constant_node_value(node)
    if node.op_type not in EVALUATORS or node.domain not in ("", "ai.onnx"):
        return None
    token = _BOUNDED.set(True)
    try:
        return _evaluate(node, inputs, opset)
    except ConstantTooLarge:
        raise
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError, AttributeError):
        return None
    finally:
        _BOUNDED.reset(token)
