"""Folds through layout ops: Identity, Dropout, Transpose, Squeeze, Unsqueeze, Reshape, Flatten.

The expected outcome of each random layout path is derived here, independently of
bnfold: numpy applies the same ops to a tensor holding each element's channel
index, and the channel "survives" when that tensor varies along exactly one axis
and reads 0..C-1 along it.  The folded model is run in onnxruntime with graph
optimizations off against the original.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from affine_builders import F32, bn_node, bn_params, fold_checked, he_weight, init, make_model, ops, patterns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import bnfold
from bnfold import Reason

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUT = ("Identity", "Dropout", "Transpose", "Unsqueeze", "Squeeze", "Reshape", "Flatten")


# ---------------------------------------------------------------------------
# The oracle: where does the channel go?
# ---------------------------------------------------------------------------


def channel_axis(ids: np.ndarray, c: int) -> int | None:
    """The axis along which the channel index tensor ``ids`` reads 0..c-1 and which it alone varies on."""
    varying = [a for a in range(ids.ndim) if ids.shape[a] > 1 and np.any(np.diff(ids, axis=a) != 0)]
    if len(varying) != 1:
        return None
    a = varying[0]
    line = np.moveaxis(ids, a, 0).reshape(ids.shape[a], -1)[:, 0]
    return a if ids.shape[a] == c and np.array_equal(line, np.arange(c)) else None


@st.composite
def layout_path(draw, shape: tuple[int, ...]):
    """A random list of layout steps valid on ``shape``: ``(op, arg)``; also the shape after each."""
    steps = []
    cur = list(shape)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(LAYOUT))
        if op in ("Identity", "Dropout"):
            steps.append((op, None))
        elif op == "Transpose":
            perm = draw(st.permutations(range(len(cur))))
            steps.append((op, list(perm)))
            cur = [cur[p] for p in perm]
        elif op == "Unsqueeze" and len(cur) < 6:
            axis = draw(st.integers(-len(cur) - 1, len(cur)))
            steps.append((op, axis))
            cur.insert(axis % (len(cur) + 1), 1)
        elif op == "Squeeze" and 1 in cur and len(cur) > 2:
            axis = draw(st.sampled_from([i for i, d in enumerate(cur) if d == 1]))
            steps.append((op, axis))
            del cur[axis]
        elif op == "Reshape" and len(cur) >= 2:
            i = draw(st.integers(0, len(cur) - 2))
            target = [*cur[:i], cur[i] * cur[i + 1], *cur[i + 2 :]]  # merge two neighbours
            if draw(st.booleans()):
                target[draw(st.integers(0, len(target) - 1))] = -1
            steps.append((op, target))
            cur = [int(np.prod(cur)) // int(np.prod([d for d in target if d != -1])) if d == -1 else d for d in target]
        elif op == "Flatten":
            axis = draw(st.integers(0, len(cur)))
            steps.append((op, axis))
            cur = [int(np.prod(cur[:axis])), int(np.prod(cur[axis:]))]
    return steps


def apply_numpy(x: np.ndarray, steps) -> np.ndarray:
    for op, arg in steps:
        if op == "Transpose":
            x = np.transpose(x, arg)
        elif op == "Unsqueeze":
            x = np.expand_dims(x, arg % (x.ndim + 1))
        elif op == "Squeeze":
            x = np.squeeze(x, axis=arg)
        elif op == "Reshape":
            x = x.reshape(arg)
        elif op == "Flatten":
            x = x.reshape(int(np.prod(x.shape[:arg])), -1)
    return x


def layout_nodes(steps, x: str, opset: int, inits: list) -> tuple[list[onnx.NodeProto], str]:
    """ONNX nodes of ``steps`` reading ``x``; returns (nodes, last output)."""
    nodes = []
    for k, (op, arg) in enumerate(steps):
        y = f"l{k}"
        if op == "Identity":
            nodes.append(helper.make_node("Identity", [x], [y], name=y))
        elif op == "Dropout":
            nodes.append(helper.make_node("Dropout", [x], [y], name=y))
        elif op == "Transpose":
            nodes.append(helper.make_node("Transpose", [x], [y], name=y, perm=arg))
        elif op in ("Unsqueeze", "Squeeze"):
            if opset >= 13:
                inits.append(init(f"{y}_axes", np.array([arg], np.int64)))
                nodes.append(helper.make_node(op, [x, f"{y}_axes"], [y], name=y))
            else:
                nodes.append(helper.make_node(op, [x], [y], name=y, axes=[arg]))
        elif op == "Reshape":
            inits.append(init(f"{y}_shape", np.array(arg, np.int64)))
            nodes.append(helper.make_node("Reshape", [x, f"{y}_shape"], [y], name=y))
        elif op == "Flatten":
            nodes.append(helper.make_node("Flatten", [x], [y], name=y, axis=arg))
        x = y
    return nodes, x


def along(value: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A ``[C]`` vector shaped to vary along ``axis`` of rank-``rank`` data (numpy broadcasting)."""
    return value.reshape((-1,) + (1,) * (rank - 1 - axis))


# ---------------------------------------------------------------------------
# Conv -> random layout path -> affine op
# ---------------------------------------------------------------------------


@SETTINGS
@given(
    c=st.integers(2, 5),
    group=st.sampled_from([1, 2]),
    hw=st.tuples(st.integers(1, 3), st.integers(2, 4)),
    data=st.data(),
    affine=st.sampled_from(["BatchNormalization", "Mul", "Add", "Sub", "Div"]),
    wrong_axis=st.booleans(),
    opset=st.sampled_from([11, 13, 17]),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv_through_random_layout_path(c, group, hw, data, affine, wrong_axis, opset, seed) -> None:
    rng = np.random.default_rng(seed)
    cout = c * group
    h, w = hw
    conv_out = (2, cout, h, w)  # a 3x3 Conv without pads on (h+2) x (w+2)
    steps = data.draw(layout_path(conv_out))
    ids = np.broadcast_to(np.arange(cout).reshape(1, cout, 1, 1), conv_out)
    after = apply_numpy(ids, steps)
    axis = channel_axis(after, cout)
    inits = [init("w", he_weight(rng, (cout, 2, 3, 3), 18)), init("b", rng.normal(0, 0.3, cout).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["p"], name="conv", group=group)]
    lnodes, last = layout_nodes(steps, "p", opset, inits)
    nodes += lnodes
    rank = after.ndim
    transposed = any(op == "Transpose" for op, _ in steps)
    other = [a for a in range(rank) if after.shape[a] > 1 and a != axis]
    if affine == "BatchNormalization":
        if rank < 2 or after.shape[1] == 1:
            return  # BN needs a channel axis of its own
        inits += bn_params(rng, "bn", after.shape[1])
        nodes.append(bn_node("bn", last, "y"))
        if axis == 1:
            expect = None
        elif axis is None:
            expect = Reason.CHANNEL_AXIS_LOST
        else:
            expect = Reason.CHANNEL_AXIS_MOVED if transposed else Reason.SHAPE_MISMATCH
    else:
        if axis is not None and not (wrong_axis and other):
            k_axis, expect = axis, None
        elif axis is not None:
            k_axis = other[0]
            expect = Reason.CHANNEL_AXIS_MOVED if transposed else Reason.NOT_PER_CHANNEL
        else:
            varying = [a for a in range(rank) if after.shape[a] > 1]
            # 1-D data has no channel axis for any constant
            k_axis, expect = varying[-1], Reason.CHANNEL_AXIS_LOST if rank > 1 else Reason.SHAPE_MISMATCH
        n = after.shape[k_axis]
        v = rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n)
        inits.append(init("k", along(v.astype(np.float32), k_axis, rank)))
        nodes.append(helper.make_node(affine, [last, "k"], ["y"], name="aff"))
    model = make_model(nodes, inits, [("x", F32, [2, 2 * group, h + 2, w + 2])], ["y"], opset=opset)
    result = fold_checked(model)
    rep = result.report
    if expect is None:
        assert [f.pattern for f in rep.folds] == ["+".join(["Conv", *[op for op, _ in steps], affine])]
        assert ops(result.model)[affine] == 0
        assert Counter(n.op_type for n in result.model.graph.node if n.op_type in LAYOUT) == Counter(
            op for op, _ in steps
        ), "the layout ops stay"
    else:
        assert rep.folds == []
        left = rep.skips if affine == "BatchNormalization" else rep.affine_skips
        assert [s.reason for s in left] == [expect], rep.to_dict()
        assert result.model.SerializeToString() == model.SerializeToString()


@SETTINGS
@given(
    kind=st.sampled_from(["MatMul", "MatMul+Add", "Gemm", "ConvTranspose"]),
    c=st.integers(2, 5),
    data=st.data(),
    affine=st.sampled_from(["BatchNormalization", "Mul", "Add", "Sub", "Div"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_producers_through_random_layout_path(kind, c, data, affine, dtype, seed) -> None:
    """MatMul (channels on the last axis of a 3-D output), MatMul + bias, Gemm, ConvTranspose, then a random path."""
    rng = np.random.default_rng(seed)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if kind == "ConvTranspose" and dtype == np.float64:
        dtype, et = np.float32, F32  # no float64 ConvTranspose kernel on onnxruntime's CPU provider
    inits: list = []
    if kind.startswith("MatMul"):
        out, axis0, x_shape = (2, 3, c), 2, [2, 3, 4]
        inits.append(init("w", he_weight(rng, (4, c), 4, dtype)))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["p0" if kind == "MatMul+Add" else "p"], name="mm")]
        if kind == "MatMul+Add":
            inits.append(init("bias", rng.normal(0, 1, c).astype(dtype)))
            nodes.append(helper.make_node("Add", ["p0", "bias"], ["p"], name="bias"))
    elif kind == "Gemm":
        out, axis0, x_shape = (3, c), 1, [3, 4]
        inits.append(init("w", he_weight(rng, (4, c), 4, dtype)))
        nodes = [helper.make_node("Gemm", ["x", "w"], ["p"], name="fc")]
    else:
        out, axis0, x_shape = (1, c, 4, 4), 1, [1, 2, 2, 2]
        inits.append(init("w", he_weight(rng, (2, c, 2, 2), 8, dtype)))
        nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["p"], name="up", strides=[2, 2])]
    steps = data.draw(layout_path(out))
    ids = np.broadcast_to(np.arange(c).reshape([-1 if a == axis0 else 1 for a in range(len(out))]), out)
    after = apply_numpy(ids, steps)
    axis = channel_axis(after, c)
    lnodes, last = layout_nodes(steps, "p", 17, inits)
    nodes += lnodes
    rank = after.ndim
    if rank < 2:
        return
    if affine == "BatchNormalization":
        inits += bn_params(rng, "bn", after.shape[1], dtype)
        nodes.append(bn_node("bn", last, "y"))
        folds = axis == 1
    else:
        k_axis = axis if axis is not None else [a for a in range(rank) if after.shape[a] > 1][-1]
        n = after.shape[k_axis]
        v = rng.uniform(0.5, 2.0, n) * rng.choice([-1, 1], n)
        inits.append(init("k", along(v.astype(dtype), k_axis, rank)))
        nodes.append(helper.make_node(affine, [last, "k"], ["y"], name="aff"))
        # a pure shift right after a MatMul with no bias is already minimal: it stays
        folds = axis is not None and not (kind == "MatMul" and affine in ("Add", "Sub"))
    model = make_model(nodes, inits, [("x", et, x_shape)], ["y"], out_type=et)
    tol = (1e-5, 1e-4) if dtype == np.float32 else (1e-12, 1e-10)
    result = fold_checked(model, *tol)
    if folds:
        head = ["MatMul", "Add"] if kind == "MatMul+Add" else [kind]
        assert [f.pattern for f in result.report.folds] == ["+".join([*head, *[op for op, _ in steps], affine])]
        left = ops(result.model)
        bias_node = kind == "MatMul" and affine == "BatchNormalization"  # its shift: the BN becomes an Add
        assert left[affine] == 0 or (affine == "Add" and kind == "MatMul+Add" and left["Add"] == 1)
        assert left["Add"] == (1 if kind == "MatMul+Add" or bias_node else 0)
    else:
        assert result.report.folds == []


def test_channel_oracle_sees_merges_and_splits() -> None:
    ids = np.broadcast_to(np.arange(4).reshape(1, 4, 1, 1), (2, 4, 3, 3))
    assert channel_axis(ids, 4) == 1
    assert channel_axis(np.transpose(ids, (0, 2, 3, 1)), 4) == 3
    assert channel_axis(ids.reshape(2, 36), 4) is None  # merged with H, W
    assert channel_axis(ids.reshape(2, 2, 2, 9), 4) is None  # split
    assert channel_axis(ids.reshape(8, 9), 4) is None  # merged with N


# ---------------------------------------------------------------------------
# The exporter forms named in the issue
# ---------------------------------------------------------------------------


def _conv1d_keras(opset: int, seed: int = 0) -> onnx.ModelProto:
    """tf2onnx's Keras Conv1D + BN: Unsqueeze -> Conv -> Squeeze(axis 2) -> Mul([1,C,1]) -> Add([1,C,1])."""
    rng = np.random.default_rng(seed)
    c = 6
    inits = [
        init("w", he_weight(rng, (c, 3, 1, 3), 9)),
        init("m", rng.uniform(0.5, 2, (1, c, 1)).astype(np.float32)),
        init("a", rng.normal(0, 1, (1, c, 1)).astype(np.float32)),
    ]
    if opset >= 13:
        inits.append(init("ax", np.array([2], np.int64)))
        nodes = [
            helper.make_node("Unsqueeze", ["x", "ax"], ["u"], name="unsq"),
            helper.make_node("Conv", ["u", "w"], ["p"], name="conv"),
            helper.make_node("Squeeze", ["p", "ax"], ["q"], name="sq"),
        ]
    else:
        nodes = [
            helper.make_node("Unsqueeze", ["x"], ["u"], name="unsq", axes=[2]),
            helper.make_node("Conv", ["u", "w"], ["p"], name="conv"),
            helper.make_node("Squeeze", ["p"], ["q"], name="sq", axes=[2]),
        ]
    nodes += [
        helper.make_node("Mul", ["q", "m"], ["r"], name="mul"),
        helper.make_node("Add", ["r", "a"], ["y"], name="add"),
    ]
    return make_model(nodes, inits, [("x", F32, [2, 3, 10])], ["y"], opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_keras_conv1d_squeeze_mul_add(opset: int) -> None:
    result = fold_checked(_conv1d_keras(opset))
    assert patterns(result) == Counter({"Conv+Squeeze+Mul": 1, "Conv+Squeeze+Add": 1})
    assert ops(result.model) == Counter({"Unsqueeze": 1, "Conv": 1, "Squeeze": 1})


def test_nhwc_transpose_then_mul_add_on_last_axis() -> None:
    rng = np.random.default_rng(1)
    c = 5
    inits = [
        init("w", he_weight(rng, (c, 3, 3, 3), 27)),
        init("m", rng.uniform(0.5, 2, c).astype(np.float32)),
        init("a", rng.normal(0, 1, c).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["p"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["p"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["t", "m"], ["r"], name="mul"),
        helper.make_node("Add", ["r", "a"], ["y"], name="add"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 6, 7])], ["y"]))
    assert patterns(result) == Counter({"Conv+Transpose+Mul": 1, "Conv+Transpose+Add": 1})
    assert ops(result.model) == Counter({"Conv": 1, "Transpose": 1})


def test_transposes_that_cancel_then_bn() -> None:
    rng = np.random.default_rng(2)
    c = 4
    inits = [init("w", he_weight(rng, (c, 3, 3, 3), 27)), *bn_params(rng, "bn", c)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["p"], name="conv"),
        helper.make_node("Transpose", ["p"], ["t1"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], name="to_nchw", perm=[0, 3, 1, 2]),
        bn_node("bn", "t2", "y"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]))
    assert patterns(result) == Counter({"Conv+Transpose+Transpose+BatchNormalization": 1})
    assert result.report.bn_folded == 1


def test_conv_transpose_identity_add() -> None:
    """PP-OCR's detector: ConvTranspose -> Identity -> Add([1,C,1,1])."""
    rng = np.random.default_rng(3)
    c = 4
    inits = [init("w", he_weight(rng, (3, c, 2, 2), 12)), init("a", rng.normal(0, 1, (1, c, 1, 1)).astype(np.float32))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["p"], name="up", strides=[2, 2]),
        helper.make_node("Identity", ["p"], ["i"], name="id"),
        helper.make_node("Add", ["i", "a"], ["y"], name="add"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 4, 4])], ["y"]))
    assert patterns(result) == Counter({"ConvTranspose+Identity+Add": 1})


@SETTINGS
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 5),
    k=st.integers(1, 6),
    c=st.integers(2, 6),
    bias=st.booleans(),
    flatten=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_levit_matmul_reshape_bn_reshape(b, n, k, c, bias, flatten, dtype, seed) -> None:
    """LeViT's Linear + BatchNorm1d on tokens: MatMul [B,N,K]x[K,C] (+Add) -> Reshape [B*N,C] -> BN -> Reshape."""
    rng = np.random.default_rng(seed)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [init("w", he_weight(rng, (k, c), k, dtype)), *bn_params(rng, "bn", c, dtype)]
    inits += [init("flat", np.array([-1, c], np.int64)), init("back", np.array([b, n, c], np.int64))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"], name="mm")]
    x = "p"
    if bias:
        inits.append(init("bias", rng.normal(0, 1, c).astype(dtype)))
        nodes.append(helper.make_node("Add", ["p", "bias"], ["pb"], name="bias_add"))
        x = "pb"
    if flatten:
        nodes.append(helper.make_node("Reshape", [x, "flat"], ["f"], name="flat"))
    else:
        nodes.append(helper.make_node("Flatten", [x], ["f0"], name="flat0", axis=2))  # [B*N, C] via Flatten
        nodes.append(helper.make_node("Identity", ["f0"], ["f"], name="id"))
    nodes += [bn_node("bn", "f", "q"), helper.make_node("Reshape", ["q", "back"], ["y"], name="back")]
    model = make_model(nodes, inits, [("x", et, [b, n, k])], ["y"], out_type=et)
    tol = (1e-5, 1e-4) if dtype == np.float32 else (1e-12, 1e-10)
    result = fold_checked(model, *tol)
    path = "Reshape" if flatten else "Flatten+Identity"
    name = f"MatMul+{'Add+' if bias else ''}{path}+BatchNormalization"
    assert patterns(result) == Counter({name: 1})
    assert ops(result.model)["BatchNormalization"] == 0
    assert ops(result.model)["Add"] == 1  # the bias Add, or the BN turned into one


def test_matmul_3d_output_folds_a_mul_on_its_last_axis() -> None:
    rng = np.random.default_rng(4)
    inits = [init("w", he_weight(rng, (3, 4), 3)), init("m", rng.uniform(0.5, 2, 4).astype(np.float32))]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["p"], name="mm"),
        helper.make_node("Mul", ["p", "m"], ["y"], name="mul"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [2, 5, 3])], ["y"]))
    assert patterns(result) == Counter({"MatMul+Mul": 1})
    assert ops(result.model) == Counter({"MatMul": 1})


# ---------------------------------------------------------------------------
# Traps: each left with its reason, the model untouched
# ---------------------------------------------------------------------------


def _left(model: onnx.ModelProto, reason: Reason, bn: bool = True) -> bnfold.FoldResult:
    result = bnfold.fold_model(model)
    rep = result.report
    left = rep.skips if bn else rep.affine_skips
    assert rep.folds == [] and [s.reason for s in left] == [reason], rep.to_dict()
    assert result.model.SerializeToString() == model.SerializeToString()
    return result


def _conv(rng, c: int = 4) -> tuple[list, list]:
    return [init("w", he_weight(rng, (c, 3, 3, 3), 27))], [helper.make_node("Conv", ["x", "w"], ["p"], name="conv")]


def test_trap_transpose_moves_channels_off_the_bn_axis() -> None:
    rng = np.random.default_rng(5)
    inits, nodes = _conv(rng)
    inits += bn_params(rng, "bn", 4)
    nodes += [helper.make_node("Transpose", ["p"], ["t"], name="t", perm=[0, 2, 1, 3]), bn_node("bn", "t", "y")]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.CHANNEL_AXIS_MOVED)


def test_trap_transpose_moves_channels_off_the_constant_axis() -> None:
    rng = np.random.default_rng(6)
    inits, nodes = _conv(rng)
    inits.append(init("m", rng.uniform(0.5, 2, (4, 1)).astype(np.float32)))  # runs along axis 2 of NHWC
    nodes += [
        helper.make_node("Transpose", ["p"], ["t"], name="t", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["t", "m"], ["y"], name="mul"),
    ]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.CHANNEL_AXIS_MOVED, bn=False)


def test_trap_reshape_merges_the_channel_axis() -> None:
    rng = np.random.default_rng(7)
    inits, nodes = _conv(rng)
    inits += [init("shape", np.array([1, -1], np.int64)), init("m", rng.uniform(0.5, 2, 64).astype(np.float32))]
    nodes += [
        helper.make_node("Reshape", ["p", "shape"], ["r"], name="flat"),
        helper.make_node("Mul", ["r", "m"], ["y"], name="mul"),
    ]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.CHANNEL_AXIS_LOST, bn=False)


def test_trap_reshape_splits_the_channel_axis() -> None:
    rng = np.random.default_rng(8)
    inits, nodes = _conv(rng)
    inits += [init("shape", np.array([1, 2, 2, 16], np.int64)), *bn_params(rng, "bn", 2)]
    nodes += [helper.make_node("Reshape", ["p", "shape"], ["r"], name="split"), bn_node("bn", "r", "y")]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.CHANNEL_AXIS_LOST)


def test_trap_squeeze_drops_the_channel_axis() -> None:
    rng = np.random.default_rng(9)
    inits, nodes = _conv(rng, c=1)
    inits += [init("ax", np.array([1], np.int64)), init("m", rng.uniform(0.5, 2, 4).astype(np.float32))]
    nodes += [
        helper.make_node("Squeeze", ["p", "ax"], ["s"], name="sq"),
        helper.make_node("Mul", ["s", "m"], ["y"], name="mul"),
    ]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.CHANNEL_AXIS_LOST, bn=False)


@pytest.mark.parametrize("how", ["second_reader", "graph_output"])
def test_trap_shared_intermediate(how: str) -> None:
    rng = np.random.default_rng(10)
    inits, nodes = _conv(rng)
    inits += bn_params(rng, "bn", 4)
    nodes += [helper.make_node("Identity", ["p"], ["i"], name="id"), bn_node("bn", "i", "y")]
    outputs = ["y"]
    if how == "second_reader":
        nodes.append(helper.make_node("Relu", ["i"], ["z"], name="relu"))
        outputs.append("z")
    else:
        outputs.append("i")
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], outputs), Reason.INTERMEDIATE_SHARED)


def test_dropout_in_training_mode_is_no_layout_op() -> None:
    rng = np.random.default_rng(11)
    inits, nodes = _conv(rng)
    inits += [*bn_params(rng, "bn", 4), init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))]
    nodes += [helper.make_node("Dropout", ["p", "ratio", "train"], ["d"], name="drop"), bn_node("bn", "d", "y")]
    _left(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]), Reason.UNSUPPORTED_PRODUCER)


def test_dropout_in_inference_folds() -> None:
    rng = np.random.default_rng(12)
    inits, nodes = _conv(rng)
    inits += [*bn_params(rng, "bn", 4), init("ratio", np.array(0.5, np.float32)), init("train", np.array(False))]
    nodes += [helper.make_node("Dropout", ["p", "ratio", "train"], ["d"], name="drop"), bn_node("bn", "d", "y")]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"]))
    assert patterns(result) == Counter({"Conv+Dropout+BatchNormalization": 1})


# ---------------------------------------------------------------------------
# BN after Concat(axis=1) of Convs (YOLOv5 BottleneckCSP)
# ---------------------------------------------------------------------------


@SETTINGS
@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    groups=st.lists(st.sampled_from([1, 2]), min_size=3, max_size=3),
    affine=st.sampled_from(["BatchNormalization", "Mul", "Add"]),
    negative_axis=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bn_after_concat_of_convs(counts, groups, affine, negative_axis, seed) -> None:
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = []
    outs = []
    for i, c in enumerate(counts):
        g = groups[i] if c % groups[i] == 0 else 1
        inits.append(init(f"w{i}", he_weight(rng, (c, 4 // g, 3, 3), 36 // g)))
        if i % 2:
            inits.append(init(f"b{i}", rng.normal(0, 0.3, c).astype(np.float32)))
        ins = ["x", f"w{i}"] + ([f"b{i}"] if i % 2 else [])
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", group=g, pads=[1, 1, 1, 1]))
        outs.append(f"c{i}")
    total = sum(counts)
    nodes.append(helper.make_node("Concat", outs, ["cat"], name="cat", axis=-3 if negative_axis else 1))
    if affine == "BatchNormalization":
        inits += bn_params(rng, "bn", total)
        nodes.append(bn_node("bn", "cat", "y"))
    else:
        v = rng.uniform(0.5, 2, (total, 1, 1)) if affine == "Mul" else rng.normal(0, 1, (total, 1, 1))
        inits.append(init("k", v.astype(np.float32)))
        nodes.append(helper.make_node(affine, ["cat", "k"], ["y"], name="aff"))
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 4, 5, 5])], ["y"]))
    assert patterns(result) == Counter({f"Conv+Concat+{affine}": 1})
    assert ops(result.model) == Counter({"Conv": len(counts), "Concat": 1})


@pytest.mark.parametrize("why", ["relu_input", "shared_conv_output", "axis_2"])
def test_bn_after_concat_left_alone(why: str) -> None:
    rng = np.random.default_rng(13)
    inits = [init("w0", he_weight(rng, (2, 3, 3, 3), 27)), init("w1", he_weight(rng, (2, 3, 3, 3), 27))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
    ]
    second, outputs, c, axis = "c1", ["y"], 4, 1
    if why == "relu_input":
        nodes.append(helper.make_node("Relu", ["c1"], ["r"], name="relu"))
        second = "r"
    elif why == "shared_conv_output":
        outputs.append("c1")
    else:
        axis, c = 2, 2
    nodes.append(helper.make_node("Concat", ["c0", second], ["cat"], name="cat", axis=axis))
    inits += bn_params(rng, "bn", c)
    nodes.append(bn_node("bn", "cat", "y"))
    model = make_model(nodes, inits, [("x", F32, [1, 3, 4, 4])], outputs)
    _left(model, Reason.UNSUPPORTED_PRODUCER)  # the Concat is no fold target: the BN stays, as before
