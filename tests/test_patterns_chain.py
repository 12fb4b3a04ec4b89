"""Affine chains: runs of Mul/Add/Sub/Div by a per-channel constant fold into the op before them.

Each case builds a model, folds it with ``bnfold.fold_model``, runs original and
folded model in onnxruntime (graph optimizations off) and compares every output.
Expected node counts and pattern names are derived here from the rules in
docs/folding.md ("Affine chains"), never read back from the code under test.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from affine_builders import (
    F16,
    F32,
    bn_node,
    bn_params,
    fold_checked,
    he_weight,
    init,
    initializer,
    make_model,
    ops,
    patterns,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import bnfold

SETTINGS = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# "RSub" is Sub with the constant first: c - x.
ARITH = ("Mul", "Add", "Sub", "RSub", "Div")
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def per_channel_shapes(rank: int, c: int) -> list[tuple[int, ...]]:
    """Every constant shape that is a scalar or varies along axis 1 only of a rank-``rank`` tensor.

    numpy broadcasting aligns the constant with the data's *last* dims, so the
    channel dim sits at index ``m - (rank - 1)`` of an ``m``-D constant.
    """
    shapes: list[tuple[int, ...]] = [()]
    shapes += [(1,) * m for m in range(1, rank + 1)]
    for m in (rank - 1, rank):
        shp = [1] * m
        shp[m - (rank - 1)] = c
        shapes.append(tuple(shp))
    return shapes


def test_per_channel_shapes_cover_the_documented_forms() -> None:
    assert {(4,), (1, 4)} <= set(per_channel_shapes(2, 4))
    assert {(4, 1, 1), (1, 4, 1, 1), (), (1,)} <= set(per_channel_shapes(4, 4))
    assert (4,) not in per_channel_shapes(4, 4)


def arith_value(rng: np.random.Generator, op: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Multipliers and divisors away from 0 (either sign), shifts around 0."""
    if op in ("Mul", "Div"):
        v = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    else:
        v = rng.normal(0.0, 1.0, shape)
    return np.asarray(v, dtype=dtype)


def arith_node(op: str, x: str, const: str, y: str, const_first: bool) -> onnx.NodeProto:
    """``op(x, const)``; ``RSub`` is ``const - x``; Mul/Add may take the constant first."""
    if op == "RSub":
        return helper.make_node("Sub", [const, x], [y], name=y)
    ins = [const, x] if const_first and op in ("Mul", "Add") else [x, const]
    return helper.make_node(op, ins, [y], name=y)


def op_type(op: str) -> str:
    return "Sub" if op == "RSub" else op


@st.composite
def producer_case(draw):
    """(nodes, inits, inputs, producer output, rank, channels, producer kind) of a random producer."""
    kind = draw(st.sampled_from(PRODUCERS))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    nodes, inits = [], []
    if kind in ("Conv", "ConvTranspose"):
        dims = draw(st.integers(1, 3))
        g = draw(st.integers(1, 3))
        cin_g = draw(st.integers(1, 2))
        cout_g = draw(st.integers(2, 3) if g == 1 else st.integers(1, 3))
        k = draw(st.integers(1, 3))
        size = 4 if dims == 3 else 6
        cin, cout = g * cin_g, g * cout_g
        inputs = [("x", F32, [2, cin] + [size] * dims)]
        pads = [draw(st.integers(0, 1))] * (2 * dims)
        has_bias = draw(st.booleans())
        if kind == "Conv":
            inits.append(init("w", he_weight(rng, (cout, cin_g) + (k,) * dims, cin_g * k**dims)))
            attrs = {"group": g, "pads": pads}
        else:
            inits.append(init("w", he_weight(rng, (cin, cout_g) + (k,) * dims, cin_g * k**dims)))
            attrs = {"group": g, "pads": [0] * (2 * dims), "strides": [draw(st.integers(1, 2))] * dims}
        ins = ["x", "w"]
        if has_bias:
            inits.append(init("b", rng.normal(0, 0.5, cout).astype(np.float32)))
            ins.append("b")
        nodes.append(helper.make_node(kind, ins, ["p"], name="producer", **attrs))
        return nodes, inits, inputs, "p", dims + 2, cout, kind
    if kind == "Gemm":
        m, kk, n = 3, draw(st.integers(1, 5)), draw(st.integers(2, 5))
        trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
        inputs = [("x", F32, [kk, m] if trans_a else [m, kk])]
        inits.append(init("w", he_weight(rng, (n, kk) if trans_b else (kk, n), kk)))
        ins = ["x", "w"]
        c_shape = draw(st.sampled_from([None, (n,), (1, n), (m, n), (m, 1), ()]))
        if c_shape is not None:
            inits.append(init("c", rng.normal(0, 0.5, c_shape).astype(np.float32)))
            ins.append("c")
        alpha = draw(st.sampled_from([1.0, 0.5, -2.0]))
        beta = draw(st.sampled_from([1.0, 0.25, -1.5]))
        nodes.append(
            helper.make_node(
                "Gemm", ins, ["p"], name="producer", transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta
            )
        )
        return nodes, inits, inputs, "p", 2, n, kind
    if kind == "MatMul":
        kk, n = draw(st.integers(1, 5)), draw(st.integers(2, 5))
        inputs = [("x", F32, [3, kk])]
        inits.append(init("w", he_weight(rng, (kk, n), kk)))
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["p"], name="producer"))
        return nodes, inits, inputs, "p", 2, n, kind
    # A BN after a Relu: it has nothing to fold into and stays, absorbing the chain.
    rank = draw(st.integers(2, 4))
    c = draw(st.integers(2, 5))
    inputs = [("x", F32, [2, c] + [3] * (rank - 2))]
    inits += bn_params(rng, "bn", c)
    nodes += [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "p")]
    return nodes, inits, inputs, "p", rank, c, kind


def expected_chain(kind: str, chain: list[str]) -> tuple[Counter, Counter]:
    """(pattern names, op counts after folding) for a chain of per-channel ops after ``kind``.

    Conv, ConvTranspose, Gemm and a BN that stays absorb every op.  MatMul has no
    bias slot: a pure shift (Add, ``x - c``) after it is already a minimal bias
    and stays; a scale folds into the weight (``c - x`` leaves its shift in an Add
    that takes the node's place); once a bias Add/Sub exists, later ops fold into
    MatMul and that bias ("MatMul+Add+op", "MatMul+Sub+op").
    """
    if kind != "MatMul":
        names = Counter(f"{kind}+{op_type(op)}" for op in chain)
        after = Counter({kind: 1}) if kind != "BatchNormalization" else Counter({"Relu": 1, kind: 1})
        return names, after
    names: Counter = Counter()
    bias = None  # op type of the bias node after the MatMul, once there is one
    for op in chain:
        if bias is not None:
            names[f"MatMul+{bias}+{op_type(op)}"] += 1
        elif op in ("Add", "Sub"):
            bias = op
        else:
            names[f"MatMul+{op_type(op)}"] += 1
            bias = "Add" if op == "RSub" else None
    after = Counter({"MatMul": 1, **({bias: 1} if bias else {})})
    return names, after


@SETTINGS
@given(
    case=producer_case(),
    chain=st.lists(st.tuples(st.sampled_from(ARITH), st.integers(0, 100), st.booleans()), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_chain_folds_into_producer(case, chain, seed) -> None:
    check_chain(case, chain, seed)


def check_chain(case, chain: list[tuple[str, int, bool]], seed: int) -> None:
    """Append ``chain`` (op, constant-shape pick, constant first) to the producer, fold, check."""
    nodes, inits, inputs, x, rank, c, kind = case
    rng = np.random.default_rng(seed)
    shapes = per_channel_shapes(rank, c)
    ops_in_chain = []
    for k, (op, pick, const_first) in enumerate(chain):
        y = "y" if k == len(chain) - 1 else f"a{k}"
        inits.append(init(f"k{k}", arith_value(rng, op, shapes[pick % len(shapes)])))
        nodes.append(arith_node(op, x, f"k{k}", y, const_first))
        ops_in_chain.append(op)
        x = y
    model = make_model(nodes, inits, inputs, ["y"])
    result = fold_checked(model)
    names, after = expected_chain(kind, ops_in_chain)
    assert patterns(result) == names
    assert ops(result.model) == after
    assert [f.target_op for f in result.report.folds] == [kind] * len(result.report.folds) or kind == "MatMul"
    if kind == "BatchNormalization":
        assert [s.reason for s in result.report.skips] == [bnfold.Reason.UNSUPPORTED_PRODUCER]
    else:
        assert result.report.skips == []
    assert result.report.affine_skips == []
    # Folding again changes nothing.
    assert bnfold.fold_model(result.model).report.folds == []


@pytest.mark.parametrize(
    "chain",
    [
        ["Sub", "Mul"],
        ["Sub", "Div", "RSub"],
        ["Add", "Mul", "Sub"],
        ["RSub", "Mul"],
        ["Mul", "Add", "Div"],
        ["Div", "RSub", "Add"],
    ],
)
def test_matmul_chains(chain: list[str]) -> None:
    """Every way a chain after a MatMul meets (or makes) its bias Add/Sub, per-column constants."""
    rng = np.random.default_rng(5)
    kk, n = 3, 4
    case = (
        [helper.make_node("MatMul", ["x", "w"], ["p"], name="producer")],
        [init("w", he_weight(rng, (kk, n), kk))],
        [("x", F32, [3, kk])],
        "p",
        2,
        n,
        "MatMul",
    )
    # pick 3 of per_channel_shapes(2, n) is [n]; 4 is [1, n]
    check_chain(case, [(op, 3 + k % 2, False) for k, op in enumerate(chain)], seed=6)


def test_frozen_bn_conv_mul_add_ends_as_one_conv() -> None:
    """torchvision/detectron2 FrozenBatchNorm2d: Conv -> Mul([1,C,1,1]) -> Add([1,C,1,1])."""
    rng = np.random.default_rng(3)
    c = 6
    w = he_weight(rng, (c, 4, 3, 3), 36)
    scale = rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)
    shift = rng.normal(0, 1, (1, c, 1, 1)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["c", "scale"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "shift"], ["y"], name="add"),
        ],
        [init("w", w), init("scale", scale), init("shift", shift)],
        [("x", F32, ["N", 4, 8, 8])],
        ["y"],
    )
    result = fold_checked(model)
    assert ops(result.model) == Counter({"Conv": 1})
    assert [(f.node, f.target, f.pattern) for f in result.report.folds] == [
        ("mul", "conv", "Conv+Mul"),
        ("add", "conv", "Conv+Add"),
    ]
    conv = result.model.graph.node[0]
    assert list(conv.output) == ["y"]
    # Expected weights straight from the definition, in float64.
    w64 = w.astype(np.float64) * scale.astype(np.float64).reshape(c, 1, 1, 1)
    np.testing.assert_allclose(initializer(result.model, conv.input[1]), w64, rtol=1e-6)
    np.testing.assert_allclose(initializer(result.model, conv.input[2]), shift.reshape(c), rtol=1e-6)
    assert {t.name for t in result.model.graph.initializer} == {conv.input[1], conv.input[2]}


def test_bn_absorbs_chain_then_folds_into_next_conv() -> None:
    """Relu -> BN -> Mul -> Add -> unpadded Conv: the chain goes into the BN, the BN into the Conv."""
    rng = np.random.default_rng(4)
    c = 5
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "b"),
            helper.make_node("Mul", ["b", "s"], ["m"], name="mul"),
            helper.make_node("Add", ["t", "m"], ["a"], name="add"),
            helper.make_node("Conv", ["a", "w"], ["y"], name="conv", strides=[2, 2]),
        ],
        [
            *bn_params(rng, "bn", c),
            init("s", arith_value(rng, "Mul", (c, 1, 1))),
            init("t", arith_value(rng, "Add", (1, c, 1, 1))),
            init("w", he_weight(rng, (3, c, 2, 2), 4 * c)),
        ],
        [("x", F32, [2, c, 7, 7])],
        ["y"],
    )
    result = fold_checked(model)
    assert ops(result.model) == Counter({"Relu": 1, "Conv": 1})
    assert patterns(result) == Counter(
        {"BatchNormalization+Mul": 1, "BatchNormalization+Add": 1, "BatchNormalization+Conv": 1}
    )
    assert result.report.skips == [] and result.report.bn_folded == 1


# ---------------------------------------------------------------------------
# Constants that are not per-channel, or whose broadcast changes the shape
# ---------------------------------------------------------------------------

# kind -> (constant shape for NCHW data [2, C, H, W], expected reason); C, H, W filled in.
BAD = {
    "along_w": (lambda c, h, w: (c,), "not_per_channel"),  # [C] on NCHW runs along W (needs W == C)
    "spatial": (lambda c, h, w: (1, 1, h, w), "not_per_channel"),
    "channel_spatial": (lambda c, h, w: (1, c, h, 1), "not_per_channel"),
    "hw": (lambda c, h, w: (h, w), "not_per_channel"),
    "batch": (lambda c, h, w: (2, 1, 1, 1), "not_per_channel"),
    "batch_channel": (lambda c, h, w: (2, c, 1, 1), "not_per_channel"),
    "rank5": (lambda c, h, w: (1, 1, c, 1, 1), "shape_mismatch"),
    "rank5_scalar": (lambda c, h, w: (1, 1, 1, 1, 1), "shape_mismatch"),
    "one_channel_data": (lambda c, h, w: (1, c, 1, 1), "shape_mismatch"),  # data has 1 channel
}


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(BAD)),
    op=st.sampled_from(["Mul", "Add", "Sub", "RSub", "Div"]),
    c=st.integers(2, 4),
    h=st.integers(2, 4),
    const_first=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_constant_not_per_channel_is_left_with_reason(kind, op, c, h, const_first, seed) -> None:
    rng = np.random.default_rng(seed)
    shape_of, reason = BAD[kind]
    w_size = c if kind == "along_w" else h + 1
    cout = 1 if kind == "one_channel_data" else c
    const = arith_value(rng, op, shape_of(c, h, w_size))
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            arith_node(op, "p", "k", "y", const_first),
        ],
        [init("w", he_weight(rng, (cout, 3, 1, 1), 3)), init("k", const)],
        [("x", F32, [2, 3, h, w_size])],
        ["y"],
    )
    result = fold_checked(model)
    assert result.model.graph == model.graph, "the model must be left untouched"
    assert result.report.folds == [] and result.report.skips == []
    left = [(s.node, s.op_type, s.reason.value) for s in result.report.affine_skips]
    assert left == [("y", op_type(op), reason)]


@pytest.mark.parametrize(
    ("where", "kind"),
    [
        *[("after_bn", k) for k in ("along_w", "spatial", "batch_channel", "rank5", "one_channel_data")],
        *[("before_conv", k) for k in ("along_w", "spatial", "channel_spatial", "batch_channel", "one_channel_data")],
    ],
)
def test_bad_constant_next_to_bn_or_before_conv_is_left(where: str, kind: str) -> None:
    """The same constants after a BN that stays, and before an unpadded Conv."""
    rng = np.random.default_rng(7)
    c, h = 3, 4
    shape_of, reason = BAD[kind]
    data_c = 1 if kind == "one_channel_data" else c
    const = arith_value(rng, "Mul", shape_of(c, h, c))
    out_c = c  # the Mul output has C channels in every case
    if where == "after_bn":
        nodes = [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "b"),
            helper.make_node("Mul", ["b", "k"], ["y"], name="mul"),
        ]
        inits = [*bn_params(rng, "bn", data_c), init("k", const)]
    else:
        nodes = [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
            helper.make_node("Conv", ["m", "w"], ["y"], name="conv"),
        ]
        inits = [init("k", const), init("w", he_weight(rng, (2, out_c, 1, 1), out_c))]
    model = make_model(nodes, inits, [("x", F32, [2, data_c, h, c])], ["y"])
    result = fold_checked(model)
    assert ops(result.model) == ops(model)
    assert [(s.node, s.reason.value) for s in result.report.affine_skips] == [("mul", reason)]
    if where == "after_bn":
        assert [s.reason.value for s in result.report.skips] == ["unsupported_producer"]


def test_one_channel_broadcast_before_conv_with_unknown_channels_is_left() -> None:
    """``[1,C,1,1]`` on a tensor whose channel count is symbolic might broadcast 1 -> C: leave it."""
    rng = np.random.default_rng(8)
    c = 3
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
            helper.make_node("Conv", ["m", "w"], ["y"], name="conv"),
        ],
        [init("k", arith_value(rng, "Mul", (1, c, 1, 1))), init("w", he_weight(rng, (2, c, 1, 1), c))],
        [("x", F32, ["N", "C", 4, 4])],
        ["y"],
    )
    result = bnfold.fold_model(model)
    assert ops(result.model) == ops(model)
    assert [(s.node, s.reason.value) for s in result.report.affine_skips] == [("mul", "shape_mismatch")]
    # Both a 1-channel and a 3-channel input run on the unfolded model; a fold would break the first.
    from helpers import run

    for ch in (1, c):
        x = rng.standard_normal((2, ch, 4, 4)).astype(np.float32)
        np.testing.assert_array_equal(run(model, {"x": x})[0], run(result.model, {"x": x})[0])


@pytest.mark.parametrize("const_first", [False, True])
def test_constant_first_div_is_not_affine(const_first: bool) -> None:
    """``c / x`` is not affine: untouched and not reported; ``x / c`` folds."""
    rng = np.random.default_rng(9)
    ins = ["k", "p"] if const_first else ["p", "k"]
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["p"], name="conv"), helper.make_node("Div", ins, ["y"], name="div")],
        [init("w", he_weight(rng, (3, 2, 1, 1), 2)), init("k", arith_value(rng, "Div", (1, 3, 1, 1)))],
        [("x", F32, [2, 2, 3, 3])],
        ["y"],
    )
    result = fold_checked(model)
    if const_first:
        assert result.model.graph == model.graph
        assert result.report.folds == [] and result.report.affine_skips == []
    else:
        assert ops(result.model) == Counter({"Conv": 1}) and patterns(result) == Counter({"Conv+Div": 1})


def test_zero_divisor_is_left_with_reason() -> None:
    rng = np.random.default_rng(10)
    k = arith_value(rng, "Div", (1, 3, 1, 1))
    k[0, 1] = 0.0
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Div", ["p", "k"], ["y"], name="div"),
        ],
        [init("w", he_weight(rng, (3, 2, 1, 1), 2)), init("k", k)],
        [("x", F32, [2, 2, 3, 3])],
        ["y"],
    )
    result = fold_checked(model, compare=False)  # the output holds inf / nan by design
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.affine_skips] == [("div", "non_finite")]


def test_producer_output_shared_leaves_chain_with_reason() -> None:
    """Conv output read by the Mul and by another node: the Mul stays, reported."""
    rng = np.random.default_rng(11)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Mul", ["p", "k"], ["m"], name="mul"),
            helper.make_node("Relu", ["p"], ["r"], name="relu"),
            helper.make_node("Add", ["m", "r"], ["y"], name="sum"),
        ],
        [init("w", he_weight(rng, (3, 2, 1, 1), 2)), init("k", arith_value(rng, "Mul", (1, 3, 1, 1)))],
        [("x", F32, [2, 2, 3, 3])],
        ["y"],
    )
    result = fold_checked(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.affine_skips] == [("mul", "producer_output_shared")]
    assert result.report.to_dict()["affine_left"][0]["reason"] == "producer_output_shared"


def test_plain_arithmetic_is_not_reported() -> None:
    """Residual Adds, bias Adds after MatMul and Muls after a Relu are no frozen BN: no report lines."""
    rng = np.random.default_rng(12)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("Add", ["mm", "b"], ["a"], name="bias"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "r"], ["y"], name="residual"),
        ],
        [
            init("w", he_weight(rng, (4, 4), 4)),
            init("b", arith_value(rng, "Add", (4,))),
            init("k", arith_value(rng, "Mul", (1, 4))),
        ],
        [("x", F32, [2, 4])],
        ["y"],
    )
    result = fold_checked(model)
    assert result.model.graph == model.graph
    assert result.report.folds == [] and result.report.affine_skips == [] and result.report.skips == []


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


def test_float16_chain_folds_in_float16() -> None:
    """float16 Conv -> Mul -> Add -> Div: folded weight and bias stay float16, close to the exact values."""
    rng = np.random.default_rng(13)
    c = 4
    w = he_weight(rng, (c, 3, 3, 3), 27, np.float16)
    b = rng.normal(0, 0.5, c).astype(np.float16)
    m = arith_value(rng, "Mul", (1, c, 1, 1), np.float16)
    a = arith_value(rng, "Add", (c, 1, 1), np.float16)
    d = arith_value(rng, "Div", (), np.float16)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["p"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Mul", ["p", "m"], ["q"], name="mul"),
            helper.make_node("Add", ["a", "q"], ["r"], name="add"),
            helper.make_node("Div", ["r", "d"], ["y"], name="div"),
        ],
        [init("w", w), init("b", b), init("m", m), init("a", a), init("d", d)],
        [("x", F16, [1, 3, 6, 6])],
        ["y"],
        out_type=F16,
    )
    result = fold_checked(model, atol=2e-2, rtol=1e-2)
    assert ops(result.model) == Counter({"Conv": 1})
    conv = result.model.graph.node[0]
    w2, b2 = initializer(result.model, conv.input[1]), initializer(result.model, conv.input[2])
    assert w2.dtype == np.float16 and b2.dtype == np.float16
    f64 = np.float64
    s = m.astype(f64).reshape(c) / f64(d)
    w_exact = w.astype(f64) * s.reshape(c, 1, 1, 1)
    b_exact = (b.astype(f64) * m.astype(f64).reshape(c) + a.astype(f64).reshape(c)) / f64(d)
    # The chain is composed in float64 and each weight rounded once, at its end.
    np.testing.assert_array_equal(w2, w_exact.astype(np.float16))
    np.testing.assert_array_equal(b2, b_exact.astype(np.float16))


def test_float16_single_fold_rounds_once() -> None:
    """One Mul into a float16 Conv: the folded weight is exactly the float16 rounding of the product."""
    rng = np.random.default_rng(14)
    c = 5
    w = he_weight(rng, (c, 2, 1, 1), 2, np.float16)
    m = arith_value(rng, "Mul", (c, 1, 1), np.float16)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Mul", ["m", "p"], ["y"], name="mul"),
        ],
        [init("w", w), init("m", m)],
        [("x", F16, [1, 2, 3, 3])],
        ["y"],
        out_type=F16,
    )
    result = fold_checked(model, atol=1e-2, rtol=1e-2)
    conv = result.model.graph.node[0]
    expected = (w.astype(np.float64) * m.astype(np.float64).reshape(c, 1, 1, 1)).astype(np.float16)
    np.testing.assert_array_equal(initializer(result.model, conv.input[1]), expected)


def test_float16_overflow_is_left_with_reason() -> None:
    """A float16 fold whose weights would pass 65504 is refused before anything is edited."""
    rng = np.random.default_rng(15)
    w = np.full((2, 2, 1, 1), 300.0, dtype=np.float16)
    m = np.array([1.0, 400.0], dtype=np.float16).reshape(1, 2, 1, 1)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Mul", ["p", "m"], ["y"], name="mul"),
        ],
        [init("w", w), init("m", m)],
        [("x", F16, [1, 2, 3, 3])],
        ["y"],
        out_type=F16,
    )
    del rng
    result = bnfold.fold_model(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.affine_skips] == [("mul", "dtype_overflow")]


def test_chain_in_if_branch_with_outer_constants() -> None:
    """Conv -> Mul -> Add inside an If branch, weight and constants from the outer graph.

    The branch gets private folded constants; the outer ones nothing reads any more are removed.
    """
    from helpers import run
    from onnx import TensorProto

    rng = np.random.default_rng(16)
    c = 3
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Mul", ["p", "k"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "t"], ["yt"], name="add"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("yt", F32, [2, c, 4, 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["ye"], name="relu")],
        "else",
        [],
        [helper.make_tensor_value_info("ye", F32, [2, c, 4, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "g",
        [
            helper.make_tensor_value_info("x", F32, [2, c, 4, 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F32, [2, c, 4, 4])],
        [
            init("w", he_weight(rng, (c, c, 1, 1), c)),
            init("k", arith_value(rng, "Mul", (1, c, 1, 1))),
            init("t", arith_value(rng, "Add", (c, 1, 1))),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    result = fold_checked(model, compare=False)
    assert [(f.pattern, f.graph) for f in result.report.folds] == [
        ("Conv+Mul", "main/if.then_branch"),
        ("Conv+Add", "main/if.then_branch"),
    ]
    then_nodes = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch").node
    assert [n.op_type for n in then_nodes] == ["Conv"]
    assert list(result.model.graph.initializer) == [], "outer constants nothing reads must go"
    x = rng.standard_normal((2, c, 4, 4)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(model, feeds)[0], run(result.model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_hard_swish_after_conv_is_not_reported() -> None:
    """``x * relu6(x + 3) / 6`` (PaddlePaddle's hard-swish) reads the Conv output twice: no frozen BN, no noise."""
    rng = np.random.default_rng(21)
    scalar = np.array(3.0, np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
            helper.make_node("Add", ["p", "three"], ["a"], name="add3"),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="relu6"),
            helper.make_node("Mul", ["p", "c"], ["m"], name="mul"),
            helper.make_node("Div", ["m", "six"], ["y"], name="div6"),
        ],
        [
            init("w", he_weight(rng, (3, 2, 1, 1), 2)),
            init("three", scalar),
            init("zero", np.array(0.0, np.float32)),
            init("six", np.array(6.0, np.float32)),
        ],
        [("x", F32, [2, 2, 3, 3])],
        ["y"],
    )
    result = fold_checked(model)
    assert result.report.affine_skips == []
    assert result.report.folds == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_chain_rounds_each_weight_once(dtype) -> None:
    """Conv -> BN -> Mul -> Add: the final weight and bias are the float64 composition, rounded once."""
    from onnx import numpy_helper

    rng = np.random.default_rng(31)
    c = 6
    w = (rng.standard_normal((c, 3, 3, 3)) * 0.5).astype(dtype)
    b = (rng.standard_normal(c) * 0.1).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c)
    mean, var = rng.normal(0, 0.3, c), rng.uniform(0.3, 2.0, c)
    k, a = rng.uniform(0.3, 3.0, (1, c, 1, 1)), rng.normal(0, 0.5, (1, c, 1, 1))
    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        *(
            numpy_helper.from_array(v.astype(dtype), n)
            for v, n in [(gamma, "g"), (beta, "be"), (mean, "m"), (var, "v")]
        ),
        numpy_helper.from_array(k.astype(dtype), "k"),
        numpy_helper.from_array(a.astype(dtype), "a"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
        helper.make_node("Mul", ["n", "k"], ["p"], name="mul"),
        helper.make_node("Add", ["p", "a"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", t, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", t, [1, c, 5, 5])], inits,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    # The exact composition, from the stored (already rounded) parameters, in float64.
    p64 = {n: numpy_helper.to_array(i).astype(np.float64) for i in inits for n in [i.name]}
    s_bn = p64["g"] / np.sqrt(p64["v"] + np.float64(np.float32(1e-5)))
    t_bn = p64["be"] - p64["m"] * s_bn
    s = s_bn * p64["k"].reshape(c)
    shift = (t_bn * p64["k"].reshape(c)) + p64["a"].reshape(c)
    want_w = (p64["w"] * s[:, None, None, None]).astype(dtype)
    want_b = (p64["b"] * s + shift).astype(dtype)
    conv = result.model.graph.node[0]
    got = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    np.testing.assert_array_equal(got[conv.input[1]], want_w)
    np.testing.assert_array_equal(got[conv.input[2]], want_b)
