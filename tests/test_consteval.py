"""Computed constants: every op bnfold evaluates agrees with onnxruntime, and sizes are bounded.

Each op/shape/dtype/opset combination is built as a one-node model whose inputs
are graph inputs, run in onnxruntime (``ORT_DISABLE_ALL``: onnxruntime does not
constant-fold it) and compared with :func:`bnfold.fold.consteval.evaluate` on the
same values.  Float results may differ from onnxruntime's by its own rounding
(bnfold computes in float64 and rounds once); integers and bools must be equal.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, session
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.fold import consteval
from bnfold.fold.graph import GraphView, ModelContext
from bnfold.fold.report import Reason

SETTINGS = settings(max_examples=40, deadline=None)
FLOATS = ["float16", "float32", "float64"]
INTS = ["int32", "int64"]
# Relative tolerance per dtype: onnxruntime computes float16 through float32 and
# uses vectorized approximations of exp/log/tanh in float32.
RTOL = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}


def ort_eval(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray:
    """Output 0 of ``node`` computed by onnxruntime on ``inputs`` (None: an absent optional input)."""
    names, vis, feeds = [], [], {}
    for k, v in enumerate(inputs):
        v = None if v is None else np.asarray(v)
        if v is None:
            names.append("")
            continue
        name = f"i{k}"
        names.append(name)
        vis.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        feeds[name] = v
    n = onnx.NodeProto()
    n.CopyFrom(node)
    del n.input[:]
    n.input.extend(names)
    del n.output[:]
    n.output.append("y")
    g = helper.make_graph([n], "g", vis, [helper.make_value_info("y", onnx.TypeProto())])
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    return session(model).run(None, feeds)[0]


def check(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray:
    """``evaluate`` gives onnxruntime's result (dtype, shape and values)."""
    inputs = [None if v is None else np.asarray(v) for v in inputs]
    want = np.asarray(ort_eval(node, inputs, opset))
    got = consteval.evaluate(node, list(inputs), opset)
    assert got is not None, f"{node.op_type} not evaluated"
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if consteval.is_float(got.dtype):
        g64, w64 = got.astype(np.float64), want.astype(np.float64)
        tol = RTOL[got.dtype.name]
        np.testing.assert_allclose(g64, w64, rtol=tol, atol=tol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)
    return got


def values(rng: np.random.Generator, shape, dtype: str, lo: float = -4, hi: float = 4) -> np.ndarray:
    if dtype in INTS:
        return rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
    return rng.uniform(lo, hi, size=shape).astype(dtype)


seeds = st.integers(0, 2**32 - 1)
pairs = hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)


@SETTINGS
@given(
    op=st.sampled_from(
        ["Add", "Sub", "Mul", "Max", "Min", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]
    ),
    dtype=st.sampled_from(FLOATS + INTS),
    shapes=pairs,
    seed=seeds,
    opset=st.sampled_from([7, 13, 17]),
)
def test_binary_broadcasting(op, dtype, shapes, seed, opset):
    rng = np.random.default_rng(seed)
    a, b = (values(rng, s, dtype) for s in shapes.input_shapes)
    if op in ("Max", "Min") and opset < 8:
        opset = 8  # Max/Min broadcast since opset 8
    if dtype not in ("float32", "float64") or op in ("Equal", "LessOrEqual", "GreaterOrEqual"):
        opset = max(opset, 13)  # integer Max/Min (12), float16 comparisons: newer opsets
    check(helper.make_node(op, ["a", "b"], ["y"]), [a, b], opset)


@SETTINGS
@given(dtype=st.sampled_from(FLOATS + INTS), shapes=pairs, seed=seeds)
def test_div_truncates_integers(dtype, shapes, seed):
    """Integer Div rounds toward zero (as C), not down (as numpy's //)."""
    rng = np.random.default_rng(seed)
    a = values(rng, shapes.input_shapes[0], dtype, -20, 20)
    b = values(rng, shapes.input_shapes[1], dtype, 1, 5) * np.where(rng.random(shapes.input_shapes[1]) < 0.5, -1, 1)
    check(helper.make_node("Div", ["a", "b"], ["y"]), [a, b.astype(dtype)], 13)


@SETTINGS
@given(dtype=st.sampled_from(FLOATS + INTS), shapes=pairs, seed=seeds, fmod=st.sampled_from([0, 1]))
def test_mod(dtype, shapes, seed, fmod):
    rng = np.random.default_rng(seed)
    if dtype in FLOATS:
        fmod = 1  # float Mod needs fmod=1
    a = values(rng, shapes.input_shapes[0], dtype, -20, 20)
    b = values(rng, shapes.input_shapes[1], dtype, 1, 5) * np.where(rng.random(shapes.input_shapes[1]) < 0.5, -1, 1)
    check(helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod), [a, b.astype(dtype)], 13)


@SETTINGS
@given(dtype=st.sampled_from(FLOATS + INTS), shapes=pairs, seed=seeds)
def test_pow(dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    if dtype in INTS:
        x = values(rng, shapes.input_shapes[0], dtype, -4, 4)
        y = values(rng, shapes.input_shapes[1], dtype, 0, 3)
    else:
        x = values(rng, shapes.input_shapes[0], dtype, 0.1, 3)
        y = values(rng, shapes.input_shapes[1], dtype, -2, 2)
    check(helper.make_node("Pow", ["x", "y"], ["z"]), [x, y], 15)


@SETTINGS
@given(
    op=st.sampled_from(["Sum", "Mean", "Max", "Min"]),
    n=st.integers(1, 4),
    dtype=st.sampled_from(["float16", "float32"]),
    seed=seeds,
    data=st.data(),
)
def test_variadic(op, n, dtype, seed, data):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=n, max_dims=3, max_side=3))
    rng = np.random.default_rng(seed)
    ins = [values(rng, s, dtype) for s in shapes.input_shapes]
    check(helper.make_node(op, [f"x{k}" for k in range(n)], ["y"]), ins, 13)


UNARY = {
    "Neg": (-4, 4, FLOATS + INTS),
    "Abs": (-4, 4, FLOATS + INTS),
    "Sign": (-4, 4, FLOATS + INTS),
    "Relu": (-4, 4, [*FLOATS, "int32"]),
    "Sqrt": (0, 9, FLOATS),
    "Reciprocal": (0.2, 5, FLOATS),
    "Exp": (-5, 5, FLOATS),
    "Log": (0.05, 9, FLOATS),
    "Floor": (-4, 4, FLOATS),
    "Ceil": (-4, 4, FLOATS),
    "Sigmoid": (-6, 6, FLOATS),
    "Tanh": (-3, 3, FLOATS),
}


@SETTINGS
@given(op=st.sampled_from(sorted(UNARY)), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), data=st.data())
def test_unary(op, shape, data):
    lo, hi, dtypes = UNARY[op]
    dtype = data.draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(data.draw(seeds))
    check(helper.make_node(op, ["x"], ["y"]), [values(rng, shape, dtype, lo, hi)], 14)  # int Relu: 14


@SETTINGS
@given(dtype=st.sampled_from(FLOATS), shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=5), seed=seeds)
def test_round_half_to_even(dtype, shape, seed):
    x = (np.random.default_rng(seed).integers(-9, 10, size=shape) / 2).astype(dtype)
    check(helper.make_node("Round", ["x"], ["y"]), [x], 13)


REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL1", "ReduceL2"]


@SETTINGS
@given(
    op=st.sampled_from([*REDUCE, "ReduceLogSumExp"]),
    dtype=st.sampled_from(["float32", "float64", "int64"]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    keepdims=st.sampled_from([0, 1]),
    opset=st.sampled_from([11, 13, 18]),
    noop=st.sampled_from([0, 1]),
    data=st.data(),
)
def test_reductions(op, dtype, shape, keepdims, opset, noop, data):
    """Axes as an attribute or (ReduceSum 13, the others 18) an input; empty axes; keepdims."""
    if op == "ReduceLogSumExp" and dtype == "int64":
        dtype = "float32"
    rng = np.random.default_rng(data.draw(seeds))
    x = values(rng, shape, dtype, -2, 2)
    axes = data.draw(
        st.lists(st.integers(-len(shape), len(shape) - 1), max_size=len(shape), unique_by=lambda a: a % len(shape))
    )
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    attrs: dict = {"keepdims": keepdims}
    if as_input:
        attrs["noop_with_empty_axes"] = noop
        node = helper.make_node(op, ["x", "axes"], ["y"], **attrs)
        ins = [x, np.array(axes, dtype=np.int64)]
    else:
        if axes:
            attrs["axes"] = axes
        node = helper.make_node(op, ["x"], ["y"], **attrs)
        ins = [x]
    check(node, ins, opset)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16", "int64"]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
    opset=st.sampled_from([6, 11, 13]),
    lo=st.one_of(st.none(), st.floats(-3, 1)),
    hi=st.one_of(st.none(), st.floats(-1, 3)),
    seed=seeds,
)
def test_clip(dtype, shape, opset, lo, hi, seed):
    """Clip-6 takes min/max attributes, Clip-11 optional inputs (ints from 12)."""
    if dtype == "int64" and opset < 12:
        opset = 13
    if dtype == "float16" and opset == 6:
        opset = 11
    x = values(np.random.default_rng(seed), shape, dtype)
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        if lo is not None and hi is not None and np.float32(lo) > np.float32(hi):
            assert consteval.evaluate(helper.make_node("Clip", ["x"], ["y"], **attrs), [x], opset) is None
            return
        check(helper.make_node("Clip", ["x"], ["y"], **attrs), [x], opset)
        return
    bound = [None if v is None else np.array(round(v) if dtype == "int64" else v, dtype=dtype) for v in (lo, hi)]
    ins = [x, *bound]
    while ins and ins[-1] is None:
        ins.pop()
    check(helper.make_node("Clip", ["x", "lo", "hi"][: len(ins)], ["y"]), ins, opset)


@SETTINGS
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    ishape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    dtype=st.sampled_from(["float32", "int64"]),
    data=st.data(),
)
def test_gather(shape, ishape, dtype, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    rng = np.random.default_rng(data.draw(seeds))
    idx = rng.integers(-n, n, size=ishape).astype(data.draw(st.sampled_from(["int32", "int64"])))
    check(helper.make_node("Gather", ["x", "i"], ["y"], axis=axis), [values(rng, shape, dtype), idx], 13)


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3), data=st.data())
def test_tile_where_flatten_expand(shape, data):
    rng = np.random.default_rng(data.draw(seeds))
    x = values(rng, shape, "float32")
    reps = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(shape), max_size=len(shape))), dtype=np.int64)
    check(helper.make_node("Tile", ["x", "r"], ["y"]), [x, reps], 13)
    axis = data.draw(st.integers(-len(shape), len(shape)))
    check(helper.make_node("Flatten", ["x"], ["y"], axis=axis), [x], 13)
    s = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, base_shape=shape, max_side=3))
    cond = rng.random(s.input_shapes[0]) < 0.5
    other = values(rng, s.input_shapes[1], "float32")
    check(helper.make_node("Where", ["c", "a", "b"], ["y"]), [cond, x, other], 13)
    target = np.array(s.input_shapes[1], dtype=np.int64)
    check(helper.make_node("Expand", ["x", "s"], ["y"]), [x, target], 13)


@SETTINGS
@given(
    dtype=st.sampled_from(["int64", "int32", "float32"]),
    start=st.integers(-10, 10),
    limit=st.integers(-10, 10),
    delta=st.integers(-4, 4).filter(bool),
    frac=st.sampled_from([0, 0.25, 0.5]),
)
def test_range(dtype, start, limit, delta, frac):
    f = frac if dtype == "float32" else 0
    ins = [np.array(v, dtype=dtype) for v in (start + f, limit, delta * (1 + f))]
    check(helper.make_node("Range", ["a", "b", "c"], ["y"]), ins, 11)


@SETTINGS
@given(
    dtype=st.sampled_from(FLOATS + INTS),
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    n=st.integers(1, 4),
    batch=st.sampled_from([(), (2,), (2, 1)]),
    vec=st.sampled_from([None, "a", "b"]),
    seed=seeds,
)
def test_matmul(dtype, m, k, n, batch, vec, seed):
    rng = np.random.default_rng(seed)
    a = values(rng, (k,) if vec == "a" else (*batch, m, k), dtype, -3, 3)
    b = values(rng, (k,) if vec == "b" else (k, n), dtype, -3, 3)
    check(helper.make_node("MatMul", ["a", "b"], ["y"]), [a, b], 13)


@SETTINGS
@given(
    src=st.sampled_from(["float32", "float64", "float16", "int64", "int32"]),
    to=st.sampled_from(
        [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4),
    seed=seeds,
)
def test_cast(src, to, shape, seed):
    x = values(np.random.default_rng(seed), shape, src, -100, 100)
    check(helper.make_node("Cast", ["x"], ["y"], to=to), [x], 13)


@SETTINGS
@given(op=st.sampled_from(["And", "Or", "Xor"]), shapes=pairs, seed=seeds)
def test_logic(op, shapes, seed):
    rng = np.random.default_rng(seed)
    a, b = (rng.random(s) < 0.5 for s in shapes.input_shapes)
    check(helper.make_node(op, ["a", "b"], ["y"]), [np.asarray(a), np.asarray(b)], 13)
    check(helper.make_node("Not", ["a"], ["y"]), [np.asarray(a)], 13)


def test_legacy_broadcast_axis():
    """Before opset 7, ``broadcast=1, axis=1`` aligns a [C] operand with axis 1, not the last axis."""
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.array([10, 20, 30], dtype=np.float32)
    got = consteval.evaluate(helper.make_node("Add", ["a", "b"], ["y"], broadcast=1, axis=1), [a, b], 6)
    assert got is not None
    np.testing.assert_array_equal(got, a + b[None, :, None])
    # Without broadcast=1 the shapes must be equal: not evaluated.
    assert consteval.evaluate(helper.make_node("Mul", ["a", "b"], ["y"]), [a, b], 6) is None


def test_invalid_inputs_are_not_constants():
    """Integer division by zero, out-of-range Gather, mixed types: None, never an exception."""
    i = np.array([4, 5], dtype=np.int64)
    assert consteval.evaluate(helper.make_node("Div", ["a", "b"], ["y"]), [i, np.array([1, 0])], 13) is None
    assert consteval.evaluate(helper.make_node("Gather", ["a", "b"], ["y"]), [i, np.array([2])], 13) is None
    f = np.ones(2, dtype=np.float32)
    assert consteval.evaluate(helper.make_node("Add", ["a", "b"], ["y"]), [f, i], 13) is None
    assert consteval.evaluate(helper.make_node("Range", ["a", "b", "c"], ["y"]), [i[0], i[1], i[0] * 0], 13) is None


# ---------------------------------------------------------------------------
# Size bound
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "inputs"),
    [
        ("ConstantOfShape", [np.array([1 << 20, 1 << 20], dtype=np.int64)]),
        ("ConstantOfShape", [np.array([1 << 62] * 8, dtype=np.int64)]),  # the product overflows a float
        ("Expand", [np.ones((1, 1), np.float32), np.array([1 << 16, 1 << 16], dtype=np.int64)]),
        ("Tile", [np.ones((4, 4), np.float32), np.array([1 << 12, 1 << 12], dtype=np.int64)]),
        ("Range", [np.array(0, np.int64), np.array(1 << 40, np.int64), np.array(1, np.int64)]),
        ("Add", [np.ones((1 << 13, 1), np.float32), np.ones((1, 1 << 13), np.float32)]),
        ("MatMul", [np.ones((1 << 13, 1), np.float32), np.ones((1, 1 << 13), np.float32)]),
    ],
)
def test_too_large_is_refused_before_allocating(op, inputs):
    node = helper.make_node(op, [f"i{k}" for k in range(len(inputs))], ["y"])
    tracemalloc.start()
    try:
        with pytest.raises(consteval.ConstantTooLarge):
            consteval.evaluate(node, inputs, 13)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # nothing of the refused size was allocated


def test_concat_of_one_input_repeated_cannot_grow_past_the_bound():
    x = np.zeros(consteval.MAX_ELEMENTS // 2 + 1, dtype=np.uint8)
    node = helper.make_node("Concat", ["x", "x", "x"], ["y"], axis=0)
    with pytest.raises(consteval.ConstantTooLarge):
        consteval.evaluate(node, [x, x, x], 13)


def test_big_input_may_be_rearranged():
    """A Transpose or Cast of a tensor as big as an initializer already in memory is fine."""
    x = np.zeros((consteval.MAX_ELEMENTS // 4 + 1, 8), dtype=np.uint8)
    out = consteval.evaluate(helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0]), [x], 13)
    assert out is not None and out.shape == (8, x.shape[0])


def hostile_model(huge: int = 1 << 31) -> onnx.ModelProto:
    """The issue-15 attack: a tiny model whose constants are made from a huge ConstantOfShape.

    ``Conv -> Mul(m)`` and ``Conv -> BN(scale=s)``, with ``m`` and ``s`` computed from
    ConstantOfShape, Cast, Concat, ReduceMax, Slice and Reshape of a ``[1, huge]`` tensor.
    """
    n = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, huge], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float16))),
        helper.make_node("Cast", ["big"], ["bigf"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["bigf", "bigf"], ["cat"], axis=0),
        helper.make_node("ReduceMax", ["cat"], ["m"], keepdims=0),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["c", "m"], ["y1"]),
        helper.make_node("Slice", ["bigf", "zero", "two", "one"], ["s2"]),
        helper.make_node("Reshape", ["s2", "flat"], ["s"]),
        helper.make_node("Conv", ["x", "w"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "s", "b", "mean", "var"], ["y2"]),
    ]
    inits = [
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        numpy_helper.from_array(np.zeros(2, np.float32), "mean"),
        numpy_helper.from_array(np.ones(2, np.float32), "var"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
    ]
    g = helper.make_graph(
        n,
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2")],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_hostile_constant_subgraph_is_left_with_a_reason():
    """A few hundred bytes asking for 8 GiB of constants: no allocation, folds left as constant_too_large."""
    model = hostile_model()
    assert len(model.SerializeToString()) < 1500
    tracemalloc.start()
    try:
        result = bnfold.fold_model(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    reasons = {s.op_type: s.reason for s in (*result.report.skips, *result.report.affine_skips)}
    assert reasons == {"BatchNormalization": Reason.CONSTANT_TOO_LARGE, "Mul": Reason.CONSTANT_TOO_LARGE}
    assert not result.report.folds
    messages = " ".join(s.message for s in (*result.report.skips, *result.report.affine_skips))
    assert "bound" in messages


def test_same_subgraph_under_the_bound_folds():
    """The hostile model's shape made small: the same constants evaluate and both folds happen."""
    model = hostile_model(huge=3)
    result = bnfold.fold_model(model)
    assert {f.op_type for f in result.report.folds} == {"Mul", "BatchNormalization"}
    assert_same_outputs(model, result.model)


# ---------------------------------------------------------------------------
# Through the graph: constant chains, float64 precision
# ---------------------------------------------------------------------------


def frozen_bn_chain(c: int, dtype: np.dtype, opset: int, seed: int, sub_form: bool) -> onnx.ModelProto:
    """Conv -> Mul(m) -> Add(a), ``m = Reshape(w) * Reciprocal(Sqrt(Reshape(var) + eps))``,
    ``a = Reshape(b) - Reshape(mean) * m`` (a raw dynamo export of FrozenBatchNorm2d);
    ``sub_form``: ``m = w / Sqrt(...)`` and ``a = b + Neg(mean * m)`` instead.
    """
    rng = np.random.default_rng(seed)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    p = {
        "w": rng.uniform(0.5, 1.5, c),
        "b": rng.normal(0, 0.5, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.2, 2.0, c),
    }
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in p.items()]
    inits += [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(dtype), "cw"),
        numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), "shape4"),
        numpy_helper.from_array(np.array(1e-5, dtype=dtype), "eps"),
    ]
    r = [helper.make_node("Reshape", [k, "shape4"], [f"{k}4"]) for k in p]
    if sub_form:
        m = [
            helper.make_node("Add", ["var4", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["w4", "sd"], ["m"]),
            helper.make_node("Mul", ["mean4", "m"], ["mm"]),
            helper.make_node("Neg", ["mm"], ["nmm"]),
            helper.make_node("Add", ["b4", "nmm"], ["a"]),
        ]
    else:
        m = [
            helper.make_node("Add", ["var4", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Reciprocal", ["sd"], ["rs"]),
            helper.make_node("Mul", ["w4", "rs"], ["m"]),
            helper.make_node("Mul", ["mean4", "m"], ["mm"]),
            helper.make_node("Sub", ["b4", "mm"], ["a"]),
        ]
    body = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "m"], ["cm"]),
        helper.make_node("Add", ["cm", "a"], ["y"]),
    ]
    g = helper.make_graph(
        [*r, *m, *body],
        "frozen",
        [helper.make_tensor_value_info("x", t, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", t, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@settings(max_examples=20, deadline=None)
@given(
    c=st.integers(1, 8),
    dtype=st.sampled_from([np.float32, np.float16]),
    opset=st.sampled_from([13, 17, 18]),
    seed=seeds,
    sub_form=st.booleans(),
)
def test_frozen_bn_chain_folds_completely(c, dtype, opset, seed, sub_form):
    model = frozen_bn_chain(c, dtype, opset, seed, sub_form)
    result = bnfold.fold_model(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv"], ops  # the whole constant chain is gone with the Mul and Add
    tol = 1e-2 if dtype == np.float16 else 1e-5
    assert_same_outputs(model, result.model, atol=tol, rtol=tol)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 16), seed=seeds)
def test_chain_is_rounded_once(c, seed):
    """The folded weight is the float64 product rounded once (within half an ulp, plus float64 noise).

    Evaluating the chain op by op in float32 (as a float32 runtime does) rounds
    four times before the fold rounds again.
    """
    model = frozen_bn_chain(c, np.float32, 17, seed, sub_form=False)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    eps = float(np.float32(1e-5))
    s = inits["w"] / np.sqrt(inits["var"] + eps)
    want = inits["cw"] * s[:, None, None, None]
    result = bnfold.fold_model(model)
    conv = result.model.graph.node[0]
    got = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == conv.input[1]))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got.astype(np.float64) - want) <= 0.5 * ulp * (1 + 1e-9))


def test_graph_view_constant_and_dead_chain_removed():
    """GraphView.constant evaluates the chain; folding leaves no node of it behind."""
    model = frozen_bn_chain(4, np.float32, 17, 0, sub_form=False)
    ctx = ModelContext(opset=17, ir_version=model.ir_version)
    view = GraphView(model.graph, ctx)
    m = view.constant("m")
    assert m is not None and m.dtype == np.float32 and m.shape == (1, 4, 1, 1)
    assert view.constant("c") is None  # the Conv output is data
    folded = bnfold.fold_model(model).model
    assert {t.name for t in folded.graph.initializer} <= {
        "cw",
        "cw_bnfold",
        *(i for n in folded.graph.node for i in n.input),
    }
    assert len(folded.graph.initializer) == 2  # the folded weight and bias only


def test_deep_constant_chains_do_not_recurse():
    """3,000 Identity ops feeding a BN scale and 3,000 Adds making a Mul's constant (issue 15): both fold."""
    depth = 3000
    n = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Conv", ["x", "w"], ["c2"])]
    prev = "gamma"
    for k in range(depth):
        n.append(helper.make_node("Identity", [prev], [f"id{k}"]))
        prev = f"id{k}"
    n.append(helper.make_node("BatchNormalization", ["c", prev, "b", "b", "v"], ["y1"]))
    prev = "step"
    for k in range(depth):
        n.append(helper.make_node("Add", [prev, "step"], [f"add{k}"]))
        prev = f"add{k}"
    n.append(helper.make_node("Mul", ["c2", prev], ["y2"]))
    inits = [
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
        numpy_helper.from_array(np.full(2, 1.5, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        numpy_helper.from_array(np.ones(2, np.float32), "v"),
        numpy_helper.from_array(np.full((2, 1, 1), 0.001, np.float32), "step"),
    ]
    g = helper.make_graph(
        n,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 2, 3, 3]) for y in ("y1", "y2")],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert {f.op_type for f in result.report.folds} == {"BatchNormalization", "Mul"}
    assert [x.op_type for x in result.model.graph.node] == ["Conv", "Conv"]
    assert_same_outputs(model, result.model)


def test_cycle_is_no_constant():
    """An (invalid) cycle among constant-looking ops ends the walk: no constant, no hang."""
    g = helper.make_graph(
        [helper.make_node("Add", ["a", "one"], ["b"]), helper.make_node("Add", ["b", "one"], ["a"])],
        "cycle",
        [],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    view = GraphView(g, ModelContext(opset=17, ir_version=8))
    assert view.constant("a") is None and view.constant("b") is None


def test_shadow_is_float64_and_cast_ends_it():
    """``exact`` gives the unrounded float64 value of a computed chain; an explicit Cast rounds for good."""
    x = np.array([3.0], dtype=np.float32)
    third = consteval.evaluate(helper.make_node("Reciprocal", ["x"], ["y"]), [x], 13)
    assert third is not None and third.dtype == np.float32
    assert consteval.exact(third).dtype == np.float64 and consteval.exact(third)[0] == 1 / 3
    tripled = consteval.evaluate(helper.make_node("Mul", ["a", "b"], ["y"]), [third, x], 13)
    assert tripled is not None and consteval.exact(tripled)[0] == 1.0  # float64 (1/3) * 3, rounded once
    half = consteval.evaluate(helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT16), [third], 13)
    assert half is not None and consteval.exact(half)[0] == float(np.float16(1 / 3))


CHAIN_UNARY = ["Sqrt", "Reciprocal", "Abs", "Neg", "Exp", "Tanh"]
CHAIN_BINARY = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"]


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(st.tuples(st.sampled_from(CHAIN_UNARY + CHAIN_BINARY), st.integers(0, 10)), min_size=1, max_size=6),
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=seeds,
)
def test_constant_subgraph_matches_onnxruntime(steps, shapes, dtype, seed):
    """A random chain of ops on initializers, through GraphView.constant, against onnxruntime running it.

    Values are kept in [0.5, 2]-ish ranges (each unary result passes through
    ``Abs`` then ``Add 0.5``) so every op stays well conditioned.
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(values(rng, s, dtype, 0.5, 2), f"c{k}") for k, s in enumerate(shapes.input_shapes)]
    inits.append(numpy_helper.from_array(np.array(0.5, dtype=dtype), "half"))
    nodes, prev = [], "c0"
    for k, (op, pick) in enumerate(steps):
        other = f"c{pick % 3}"
        if op in CHAIN_UNARY:
            nodes.append(helper.make_node(op, [prev], [f"u{k}"]))
            nodes.append(helper.make_node("Abs", [f"u{k}"], [f"a{k}"]))
            nodes.append(helper.make_node("Add", [f"a{k}", "half"], [f"s{k}"]))
        else:
            nodes.append(helper.make_node(op, [prev, other] if pick % 2 else [other, prev], [f"b{k}"]))
            nodes.append(helper.make_node("Abs", [f"b{k}"], [f"a{k}"]))
            nodes.append(helper.make_node("Add", [f"a{k}", "half"], [f"s{k}"]))
        prev = f"s{k}"
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph(nodes, "chain", [], [helper.make_value_info(prev, onnx.TypeProto())], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.graph.output[0].type.tensor_type.elem_type == t
    want = session(model).run(None, {})[0]
    got = GraphView(model.graph, ModelContext(opset=17, ir_version=model.ir_version)).constant(prev)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    w64 = want.astype(np.float64)
    tol = 1e-4 if dtype == "float32" else 1e-10  # a few float32 roundings, amplified by Exp and Pow
    np.testing.assert_allclose(got.astype(np.float64), w64, rtol=tol, atol=tol)
