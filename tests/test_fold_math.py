"""Unit tests of bnfold.fold.math against a direct float64 evaluation (tests/reference.py)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import reference as ref
from builders import Net
from helpers import run

from bnfold.fold import math as fm

RNG = np.random.default_rng(1234)
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def bn_params(c: int, rng=RNG) -> tuple[np.ndarray, ...]:
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)
    return gamma, rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.1, 2.0, c)


def bn_st(c: int, eps: float = 1e-5):
    p = bn_params(c)
    s, t = fm.bn_affine(*p, eps)
    return p, s, t


def test_bn_affine_matches_formula() -> None:
    p = bn_params(5)
    x = RNG.standard_normal((3, 5, 4))
    s, t = fm.bn_affine(*p, 1e-3)
    np.testing.assert_allclose(s[None, :, None] * x + t[None, :, None], ref.batch_norm(x, *p, eps=1e-3), **TIGHT)
    assert s.dtype == t.dtype == np.float64


def test_bn_affine_computes_in_float64_from_float16_params() -> None:
    p = [a.astype(np.float16) for a in bn_params(4)]
    s, t = fm.bn_affine(*p, 1e-5)
    gamma, beta, mean, var = (a.astype(np.float64) for a in p)
    exact_s = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    np.testing.assert_allclose(s, exact_s, rtol=1e-14)
    np.testing.assert_allclose(t, beta - mean * exact_s, rtol=1e-13, atol=1e-15)


CONV_CASES = [
    # rank, cin, cout, group
    (1, 3, 5, 1),
    (2, 4, 6, 2),  # grouped, Cin != Cout
    (2, 6, 6, 6),  # depthwise
    (2, 4, 8, 4),  # depthwise with multiplier 2
    (3, 6, 3, 3),
    (3, 2, 4, 1),
]


@pytest.mark.parametrize("rank,cin,cout,group", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv(rank: int, cin: int, cout: int, group: int, bias: bool) -> None:
    k = (3, 2, 2)[:rank]
    w = RNG.standard_normal((cout, cin // group, *k))
    b = RNG.standard_normal(cout) if bias else None
    x = RNG.standard_normal((2, cin, *([5] * rank)))
    p, s, t = bn_st(cout)
    conv_kw = {"strides": [2] * rank, "pads": [1] * (2 * rank), "dilations": [1] + [2] * (rank - 1), "group": group}
    expected = ref.batch_norm(ref.conv(x, w, b, **conv_kw), *p)
    w2, b2 = fm.fold_conv(w, b, s, t)
    assert w2.shape == w.shape and b2.shape == (cout,)
    np.testing.assert_allclose(ref.conv(x, w2, b2, **conv_kw), expected, **TIGHT)


CT_CASES = [
    # cin, cout, group: non-square and grouped layouts (cin == cout can hide a wrong axis)
    (4, 4, 1),
    (3, 5, 1),
    (5, 2, 1),
    (4, 6, 2),
    (6, 4, 2),
    (6, 9, 3),
    (3, 3, 3),
]


@pytest.mark.parametrize("cin,cout,group", CT_CASES)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_transpose(cin: int, cout: int, group: int, rank: int, bias: bool) -> None:
    k = (2, 3, 2)[:rank]
    w = RNG.standard_normal((cin, cout // group, *k))
    b = RNG.standard_normal(cout) if bias else None
    x = RNG.standard_normal((2, cin, *([3] * rank)))
    p, s, t = bn_st(cout)
    kw = {"strides": [2] * rank, "pads": [1] + [0] * (2 * rank - 1), "group": group, "output_padding": [1] * rank}
    expected = ref.batch_norm(ref.conv_transpose(x, w, b, **kw), *p)
    w2, b2 = fm.fold_conv_transpose(w, b, s, t, group)
    assert w2.shape == w.shape and b2.shape == (cout,)
    np.testing.assert_allclose(ref.conv_transpose(x, w2, b2, **kw), expected, **TIGHT)


def test_conv_transpose_channels_layout() -> None:
    # W[Cin=4, Cout/g=3], g=2: input rows 0-1 feed outputs 0-2, rows 2-3 feed outputs 3-5.
    expected = np.array([[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    np.testing.assert_array_equal(fm.conv_transpose_channels(4, 3, 2), expected)
    np.testing.assert_array_equal(fm.conv_transpose_channels(3, 2, 1), [[0, 1], [0, 1], [0, 1]])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (1, 5), (3, 5), (3, 1)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
def test_fold_gemm(trans_a: int, trans_b: int, c_shape, alpha: float, beta: float) -> None:
    m, k, n = 3, 4, 5
    a = RNG.standard_normal((k, m) if trans_a else (m, k))
    b = RNG.standard_normal((n, k) if trans_b else (k, n))
    c = None if c_shape is None else RNG.standard_normal(c_shape)
    p, s, t = bn_st(n)
    expected = ref.batch_norm(ref.gemm(a, b, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b), *p)
    b2, c2 = fm.fold_gemm(b, c, s, t, bool(trans_b), beta)
    assert b2.shape == b.shape
    got = ref.gemm(a, b2, c2, alpha=alpha, beta=1.0, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(got, expected, **TIGHT)


@pytest.mark.parametrize("bias", [None, (6,), (1, 6)])
def test_fold_matmul(bias) -> None:
    x = RNG.standard_normal((4, 3))
    w = RNG.standard_normal((3, 6))
    bvec = None if bias is None else RNG.standard_normal(bias)
    p, s, t = bn_st(6)
    y = x @ w if bvec is None else x @ w + bvec
    expected = ref.batch_norm(y, *p)
    w2, b2 = fm.fold_matmul(w, None if bvec is None else bvec.reshape(-1), s, t)
    np.testing.assert_allclose(x @ w2 + b2, expected, **TIGHT)


@pytest.mark.parametrize("rank,cin,cout,group", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_next_conv(rank: int, cin: int, cout: int, group: int, bias: bool) -> None:
    k = (3, 2, 2)[:rank]
    w = RNG.standard_normal((cout, cin // group, *k))
    b = RNG.standard_normal(cout) if bias else None
    x = RNG.standard_normal((2, cin, *([6] * rank)))
    p, s, t = bn_st(cin)
    kw = {"strides": [2] * rank, "dilations": [2] * rank, "group": group}
    expected = ref.conv(ref.batch_norm(x, *p), w, b, **kw)
    w2, b2 = fm.fold_into_next_conv(w, b, s, t, group)
    np.testing.assert_allclose(ref.conv(x, w2, b2, **kw), expected, **TIGHT)


def test_conv_input_channels_layout() -> None:
    # W[Cout=4, Cin/g=2], g=2: outputs 0-1 read inputs 0-1, outputs 2-3 read inputs 2-3.
    np.testing.assert_array_equal(fm.conv_input_channels(4, 2, 2), [[0, 1], [0, 1], [2, 3], [2, 3]])


def test_fold_into_bn() -> None:
    s2, t2 = (RNG.standard_normal(7) for _ in range(2))
    p = bn_params(7)
    g2, b2 = fm.fold_into_bn(p[0], p[1], s2, t2)
    xx = RNG.standard_normal((2, 7))
    np.testing.assert_allclose(ref.batch_norm(xx, g2, b2, p[2], p[3]), s2 * ref.batch_norm(xx, *p) + t2, **TIGHT)


# ---- rounding -----------------------------------------------------------


def _ulp(x: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Spacing of the floats with ``mantissa_bits`` explicit bits around ``|x|`` (normal range)."""
    e = np.floor(np.log2(np.abs(x)))
    return np.exp2(e - mantissa_bits)


@pytest.mark.parametrize("dtype,bits", [(np.float16, 10), (ml_dtypes.bfloat16, 7), (np.float32, 23)])
def test_round_to_is_within_half_an_ulp(dtype, bits: int) -> None:
    x = RNG.uniform(0.01, 100.0, 2000) * RNG.choice([-1, 1], 2000)
    out = fm.round_to(x, np.dtype(dtype), "w")
    assert out.dtype == np.dtype(dtype)
    err = np.abs(out.astype(np.float64) - x)
    assert np.all(err <= _ulp(x, bits) / 2)


def test_round_to_float64_is_exact() -> None:
    x = RNG.standard_normal(10)
    np.testing.assert_array_equal(fm.round_to(x, np.dtype(np.float64)), x)


@pytest.mark.parametrize("dtype,big", [(np.float16, 70000.0), (ml_dtypes.bfloat16, 3.5e38), (np.float32, 3.5e38)])
def test_round_to_refuses_overflow(dtype, big: float) -> None:
    with pytest.raises(fm.FoldValueError) as e:
        fm.round_to(np.array([1.0, big]), np.dtype(dtype), "weight")
    assert e.value.code == "dtype_overflow"


def test_round_to_refuses_values_that_round_up_to_inf() -> None:
    # 65520 is above float16's max 65504 and rounds to inf.
    with pytest.raises(fm.FoldValueError) as e:
        fm.round_to(np.array([65520.0]), np.dtype(np.float16))
    assert e.value.code == "dtype_overflow"
    assert fm.round_to(np.array([65504.0]), np.dtype(np.float16))[0] == np.float16(65504)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_round_to_refuses_non_finite(bad: float) -> None:
    with pytest.raises(fm.FoldValueError) as e:
        fm.round_to(np.array([0.0, bad]), np.dtype(np.float32))
    assert e.value.code == "non_finite"


def test_dtype_max() -> None:
    assert fm.dtype_max(np.dtype(np.float16)) == 65504.0
    assert fm.dtype_max(np.dtype(np.float32)) == float(np.finfo(np.float32).max)
    assert fm.dtype_max(np.dtype(ml_dtypes.bfloat16)) == pytest.approx(3.3895e38, rel=1e-4)


# ---- the reference itself agrees with onnxruntime -----------------------


@pytest.mark.parametrize(
    "op,rank,cin,cout,group,attrs",
    [
        ("Conv", 1, 3, 4, 1, {"strides": [2], "pads": [1, 2], "dilations": [2]}),
        ("Conv", 2, 4, 6, 2, {"strides": [1, 2], "pads": [0, 1, 2, 1], "dilations": [2, 1]}),
        ("Conv", 2, 4, 4, 4, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("Conv", 2, 3, 2, 1, {"auto_pad": "SAME_LOWER", "strides": [2, 1]}),
        ("Conv", 3, 2, 4, 2, {"pads": [1, 0, 1, 0, 1, 1]}),
        ("ConvTranspose", 1, 3, 5, 1, {"strides": [2], "pads": [1, 0], "output_padding": [1]}),
        ("ConvTranspose", 2, 4, 6, 2, {"strides": [2, 1], "pads": [0, 1, 1, 0], "dilations": [1, 2]}),
        ("ConvTranspose", 3, 6, 3, 3, {"strides": [1, 2, 1], "pads": [0, 0, 1, 0, 0, 1]}),
    ],
)
def test_reference_matches_onnxruntime(op: str, rank: int, cin: int, cout: int, group: int, attrs: dict) -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [2, cin, *([5] * rank)])
    wshape = (cout, cin // group, *([3] * rank)) if op == "Conv" else (cin, cout // group, *([3] * rank))
    y = net.node(op, [x, net.weight(wshape), net.weight((cout,), fan_in=1)], group=group, **attrs)
    net.output(y, np.float32)
    bn_out = net.bn(y, cout)
    net.output(bn_out, np.float32)
    model = net.build()
    xv = RNG.standard_normal((2, cin, *([5] * rank))).astype(np.float32)
    ort_out = run(model, {"x": xv})
    ref_out = ref.evaluate(model, {"x": xv})
    for a, b in zip(ort_out, ref_out, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_weight_dtype_rounds_once_like_float64_then_cast(dtype) -> None:
    """The fused product (float64 in chunks, rounded into ``dtype``) equals rounding the float64 result."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 3, 3, 3)).astype(dtype)
    s, t = rng.uniform(0.1, 9.0, 8), rng.normal(0, 1, 8)
    w64, b64 = fm.fold_conv(w, None, s, t)
    w_fused, b_fused = fm.fold_conv(w, None, s, t, weight_dtype=w.dtype)
    assert w_fused.dtype == dtype and w64.dtype == np.float64
    np.testing.assert_array_equal(w_fused, w64.astype(dtype))
    np.testing.assert_array_equal(b_fused, b64)
    np.testing.assert_array_equal(fm.round_to(w_fused, dtype), w_fused)
    big = fm.fold_matmul(np.full((2, 3), 60000, np.float16), None, np.full(3, 2.0), np.zeros(3), np.float16)[0]
    with pytest.raises(fm.FoldValueError, match="overflow"):
        fm.round_to(big, np.float16)
