"""Pure numpy math of every fold: no ONNX, no graph.

Every function takes float arrays of any dtype, computes in float64 and returns
float64 results; :func:`round_to` rounds once to the target dtype and refuses
values that are not finite or overflow it.  The big weight products take an
optional ``weight_dtype``: the product is then computed in float64 chunk by chunk
and rounded once straight into that dtype, so no float64 copy of a large weight is
ever made (same values as rounding the float64 result).  See ``docs/folding.md`` for
the derivations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

F64 = np.float64


@dataclass(frozen=True)
class RoundInto:
    """Round a weight product once into ``dtype``, in memory from ``alloc`` (``np.empty`` when it gives None).

    Accepted wherever a ``weight_dtype`` is: the caller can lend buffers that are
    reused (the writer's sink), so big products do not fault in fresh memory.
    ``alloc(shape, dtype, source)`` may return ``source`` itself (the weight being
    scaled), when the caller gives its values up: the product is then computed in
    place, block by block, and no function here reads a weight after its product.
    """

    dtype: np.dtype
    alloc: Callable[[tuple[int, ...], np.dtype, np.ndarray], np.ndarray | None]


Into = np.dtype | RoundInto | None


class FoldValueError(ValueError):
    """A folded value is not finite or does not fit the target dtype."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def bn_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` with ``BN(x) == s * x + t`` per channel, in float64."""
    gamma, beta, mean, var = (np.asarray(a, dtype=F64) for a in (gamma, beta, mean, var))
    # eps is a float32 attribute; onnxruntime adds it in float32 too.
    # var + eps == 0 gives inf/nan here; callers reject non-finite results.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = gamma / np.sqrt(var + F64(np.float32(eps)))
        t = beta - mean * s
    return s, t


def _bias(b: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, dtype=F64) if b is None else np.asarray(b, dtype=F64).reshape(n)


_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# float64 elements per block of a weight product: 512 KiB, so the float64 temporary stays
# in cache and is reused, never a full-size float64 copy of a large weight.
_BLOCK = 1 << 16


def _multiply(a: np.ndarray, b: np.ndarray, into: Into) -> np.ndarray:
    """``a * b`` computed in float64; the result in ``into``'s dtype (rounded once) or float64.

    With a native float dtype the product runs block by block along the first axis
    through one reused float64 buffer: each block is widened, multiplied in place and
    rounded straight into the output (the same values as rounding the full float64
    product, at memory speed).
    """
    alloc = into.alloc if isinstance(into, RoundInto) else None
    out_dtype = into.dtype if isinstance(into, RoundInto) else into
    if out_dtype is None or np.dtype(out_dtype) not in _NATIVE_FLOATS:
        return np.multiply(a, b, dtype=F64)
    shape = np.broadcast_shapes(a.shape, b.shape)
    lent = alloc(shape, np.dtype(out_dtype), a) if alloc is not None else None
    out = lent if lent is not None else np.empty(shape, dtype=out_dtype)
    if not shape or out.size <= _BLOCK:
        with np.errstate(over="ignore"):  # overflow shows as inf; round_to reports it
            return np.multiply(a, b, dtype=F64, out=out, casting="same_kind")
    a, b = np.broadcast_to(a, shape), np.broadcast_to(b, shape)
    rows = max(1, _BLOCK // max(1, out[0].size))
    buf = np.empty((min(rows, shape[0]), *shape[1:]), dtype=F64)
    with np.errstate(over="ignore"):
        for i in range(0, shape[0], rows):
            j = min(i + rows, shape[0])
            block = buf[: j - i]
            block[...] = a[i:j]
            block *= b[i:j]
            out[i:j] = block
    return out


def _scaled(w: np.ndarray, factor: np.ndarray, out_dtype: Into = None) -> np.ndarray:
    """``float64(w) * factor`` in one pass (no float64 copy of ``w`` first: the ufunc casts in chunks)."""
    w = np.asarray(w)
    if w.dtype in _NATIVE_FLOATS:
        return _multiply(w, factor, out_dtype)
    return np.asarray(w, dtype=F64) * factor


def _scaled_rows(w: np.ndarray, v: np.ndarray, out_dtype: Into = None) -> np.ndarray:
    """``float64(w) * v`` where ``v`` has the leading shape of ``w`` (``[n]`` or ``[n, m]``).

    Flattening the trailing axes first keeps numpy's casting loop on long contiguous rows.
    """
    w = np.asarray(w)
    v = np.asarray(v, dtype=F64)
    if w.dtype not in _NATIVE_FLOATS or w.size == 0:
        return np.asarray(w, dtype=F64) * _expand(v, w.ndim)
    rows = w.reshape((*v.shape, -1))
    return _multiply(rows, v[..., None], out_dtype).reshape(w.shape)


def _expand(v: np.ndarray, ndim: int) -> np.ndarray:
    """Shape a per-slice vector ``[n]`` (or ``[n, m]``) to broadcast over trailing axes."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def fold_conv(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray, weight_dtype: Into = None
) -> tuple[np.ndarray, np.ndarray]:
    """Affine after Conv: ``W[Cout, Cin/g, k...]``, scale output channel ``o`` by ``s[o]``.

    The group does not matter: axis 0 of a Conv weight is always the output channel.
    """
    w = np.asarray(w)
    cout = w.shape[0]
    return _scaled_rows(w, s, weight_dtype), s * _bias(b, cout) + t


def conv_transpose_channels(cin: int, cout_per_group: int, group: int) -> np.ndarray:
    """Output channel of each ``(i, j)`` slot of a ConvTranspose weight ``[Cin, Cout/g, ...]``."""
    i = np.arange(cin)[:, None]
    j = np.arange(cout_per_group)[None, :]
    return (i // (cin // group)) * cout_per_group + j


def fold_conv_transpose(
    w: np.ndarray,
    b: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    group: int,
    weight_dtype: Into = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Affine after ConvTranspose: ``W[Cin, Cout/g, k...]``, channel ``(i//(Cin/g))*(Cout/g)+j``."""
    w = np.asarray(w)
    cin, cpg = w.shape[0], w.shape[1]
    scale = np.asarray(s, dtype=F64)[conv_transpose_channels(cin, cpg, group)]
    return _scaled_rows(w, scale, weight_dtype), s * _bias(b, cpg * group) + t


def fold_gemm(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    trans_b: bool,
    beta: float,
    weight_dtype: Into = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Affine after Gemm: scale column ``n`` of ``op(B)`` by ``s[n]``; new ``C = s*(beta*C) + t``.

    The returned ``C`` goes with ``beta = 1``; ``alpha`` is unchanged.  ``C`` keeps
    its broadcast shape when that already covers ``[N]`` (``[M, N]`` stays ``[M, N]``).
    """
    s = np.asarray(s, dtype=F64)
    b_new = _scaled_rows(b_mat, s, weight_dtype) if trans_b else _scaled(b_mat, s[None, :], weight_dtype)
    if c is None:
        return b_new, t.copy()
    c64 = F64(beta) * np.asarray(c, dtype=F64)
    return b_new, s * c64 + t


def fold_matmul(
    w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, weight_dtype: Into = None
) -> tuple[np.ndarray, np.ndarray]:
    """Affine after ``MatMul(x, W[K, N])`` (and optional ``Add(bias)``) on a 2-D output."""
    s = np.asarray(s, dtype=F64)
    w_new = _scaled(w, s[None, :], weight_dtype)
    if bias is None:
        return w_new, t.copy()
    return w_new, s * np.asarray(bias, dtype=F64) + t


def conv_input_channels(cout: int, cin_per_group: int, group: int) -> np.ndarray:
    """Input channel read by each ``(o, i)`` slot of a Conv weight ``[Cout, Cin/g, ...]``."""
    o = np.arange(cout)[:, None]
    i = np.arange(cin_per_group)[None, :]
    return (o // (cout // group)) * cin_per_group + i


def fold_into_next_conv(
    w: np.ndarray, b: np.ndarray | None, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """Affine *before* an unpadded Conv: ``W'[o,i,k] = W[o,i,k]*s[c]``, ``b'[o] = b[o] + sum W*t[c]``."""
    w = np.asarray(w, dtype=F64)
    cout, cpg = w.shape[0], w.shape[1]
    ch = conv_input_channels(cout, cpg, group)
    w_new = w * _expand(s[ch], w.ndim)
    shift = (w * _expand(t[ch], w.ndim)).reshape(cout, -1).sum(axis=1)
    return w_new, _bias(b, cout) + shift


def fold_into_bn(gamma: np.ndarray, beta: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine after a BN: the BN keeps its statistics; ``gamma' = s*gamma``, ``beta' = s*beta + t``."""
    return s * np.asarray(gamma, dtype=F64), s * np.asarray(beta, dtype=F64) + t


def dtype_max(dtype: np.dtype) -> float:
    """Largest finite value of a float dtype (float16, bfloat16, float32, float64)."""
    # ml_dtypes (an onnx dependency) knows bfloat16 and the numpy floats alike.
    return float(ml_dtypes.finfo(dtype).max)


def round_to(x: np.ndarray, dtype: np.dtype, what: str = "value") -> np.ndarray:
    """Round float64 ``x`` once to ``dtype``; raise :class:`FoldValueError` when it cannot hold it.

    An ``x`` already in ``dtype`` (rounded by a ``weight_dtype`` product) is only checked.
    """
    dtype = np.dtype(dtype)
    if isinstance(x, np.ndarray) and x.dtype == dtype and dtype in _NATIVE_FLOATS and dtype != F64:
        hi, lo = (float(x.max()), float(x.min())) if x.size else (0.0, 0.0)
        limit = dtype_max(dtype)
        if -limit <= lo and hi <= limit:
            return x
        if np.isnan(hi) or np.isnan(lo):
            raise FoldValueError("non_finite", f"folded {what} is not finite")
        raise FoldValueError("dtype_overflow", f"folded {what} overflows the {dtype.name} maximum {limit:.3g}")
    x = np.asarray(x, dtype=F64)
    if dtype in _NATIVE_FLOATS and x.size:
        # Fast path: round first, then look only at the rounded extremes.  Every value is
        # finite and within the limit exactly when the rounded ones lie strictly inside
        # (-max, max) (NaN and inf propagate, anything beyond max rounds to max or inf);
        # otherwise the exact checks below decide.
        limit = dtype_max(dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            out = x.astype(dtype)
            hi, lo = float(out.max()), float(out.min())
        if -limit < lo and hi < limit:
            return out
    if not np.all(np.isfinite(x)):
        raise FoldValueError("non_finite", f"folded {what} is not finite")
    limit = dtype_max(np.dtype(dtype))
    biggest = float(np.max(np.abs(x))) if x.size else 0.0
    with np.errstate(over="ignore"):  # overflow is reported below, not warned about
        out = x.astype(dtype)
    if biggest > limit or not np.all(np.isfinite(out.astype(F64))):
        raise FoldValueError(
            "dtype_overflow",
            f"folded {what} reaches {biggest:.3g}, beyond the {np.dtype(dtype).name} maximum {limit:.3g}",
        )
    return out


# ---------------------------------------------------------------------------
# Folds forward into the consumer, and channel bookkeeping for them
# ---------------------------------------------------------------------------


def expand_channels(v: np.ndarray, inner: int) -> np.ndarray:
    """Per-channel ``v[C]`` as one value per contracted index: index ``k`` reads channel ``k // inner``.

    Flatten of NCHW before a Linear layer makes ``inner = H*W`` (row ``k`` of the
    weight reads channel ``k // (H*W)``).
    """
    return np.repeat(np.asarray(v, dtype=F64), inner)


def fold_scale_into_next_conv_transpose(w: np.ndarray, s: np.ndarray, weight_dtype: Into = None) -> np.ndarray:
    """A pure scale *before* a ConvTranspose ``W[Cin, Cout/g, k...]``: ``W'[i] = s[i] * W[i]``.

    Exact with any padding, stride or group (each weight slot reads one input
    channel ``i``); a shift is not, since border outputs sum fewer taps.
    """
    return _scaled_rows(w, np.asarray(s, dtype=F64), weight_dtype)


def fold_into_next_matmul(
    w: np.ndarray, s: np.ndarray, t: np.ndarray, weight_dtype: Into = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(s*x + t) @ W[K, N] == x @ (diag(s) W) + t @ W``: the new weight and the shift ``t @ W`` ``[N]``.

    ``s`` and ``t`` are ``[K]`` (see :func:`expand_channels`).
    """
    s, t = np.asarray(s, dtype=F64), np.asarray(t, dtype=F64)
    shift = t @ np.asarray(w, dtype=F64) if np.any(t != 0) else np.zeros(np.shape(w)[1], dtype=F64)
    return _scaled_rows(w, s, weight_dtype), shift


def fold_into_next_gemm(
    b_mat: np.ndarray,
    c: np.ndarray | None,
    s: np.ndarray,
    t: np.ndarray,
    trans_b: bool,
    alpha: float,
    beta: float,
    weight_dtype: Into = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Affine ``s*A + t`` along K before ``Gemm(A, B, C)``: scale row ``k`` of ``op(B)`` by ``s[k]``.

    The shift moves into ``C' = beta*C + alpha * t @ op(B)``.

    The returned ``C`` goes with ``beta = 1`` (None: no ``C`` and no shift).
    """
    s, t = np.asarray(s, dtype=F64), np.asarray(t, dtype=F64)
    shift = None
    if np.any(t != 0):  # before the product: it may be computed in place of b_mat
        op_b = np.asarray(b_mat, dtype=F64)
        shift = F64(alpha) * (t @ (op_b.T if trans_b else op_b))
        del op_b
    b_new = _scaled(b_mat, s[None, :], weight_dtype) if trans_b else _scaled_rows(b_mat, s, weight_dtype)
    if c is None:
        return b_new, shift
    c64 = F64(beta) * np.asarray(c, dtype=F64)
    return b_new, c64 if shift is None else c64 + shift
