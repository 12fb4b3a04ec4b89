"""Forward folds: a BN or affine op *before* a Gemm, MatMul or ConvTranspose.

``(s*x + t) @ W == x @ (diag(s) W) + t @ W``: the rows of the weight that read
channel ``c`` are scaled by ``s[c]`` and ``t @ W`` goes into the bias.  Through
Flatten of NCHW, row ``k`` reads channel ``k // (H*W)``.  Every case runs the
original and the folded model in onnxruntime (optimizations off).
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

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AFFINE = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


def affine_node(rng, kind: str, x: str, y: str, c: int, rank: int, inits: list, scalar: bool = False):
    """``kind`` over axis 1 of rank-``rank`` data (a BN, or arithmetic by a ``[1, C, 1...]`` constant)."""
    if kind == "BatchNormalization":
        inits += bn_params(rng, "bn", c)
        return bn_node("bn", x, y)
    shape = () if scalar else (c,) + (1,) * (rank - 2)
    v = rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape) if kind in ("Mul", "Div") else rng.normal(0, 1, shape)
    inits.append(init("k", np.asarray(v, np.float32)))
    return helper.make_node(kind, [x, "k"], [y], name="aff")


@SETTINGS
@given(
    kind=st.sampled_from(AFFINE),
    m=st.integers(1, 4),
    k=st.integers(1, 6),
    n=st.integers(1, 5),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, -1.5]),
    c_shape=st.sampled_from(["none", "n", "1n", "mn", "m1", "scalar"]),
    scalar=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_affine_before_gemm(kind, m, k, n, trans_a, trans_b, alpha, beta, c_shape, scalar, seed) -> None:
    """Gemm sums over axis 1 of A (axis 0 with transA): an affine op along that axis folds."""
    rng = np.random.default_rng(seed)
    inits: list = []
    if trans_a:  # A is [K, M]: the constant runs along axis 0, [K, 1]
        if kind == "BatchNormalization":
            return  # BN runs along axis 1 = M there: the trap test below
        shape = () if scalar else (k, 1)
        v = (
            rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)
            if kind in ("Mul", "Div")
            else rng.normal(0, 1, shape)
        )
        inits.append(init("k", np.asarray(v, np.float32)))
        nodes = [helper.make_node(kind, ["x", "k"], ["a"], name="aff")]
    else:
        nodes = [affine_node(rng, kind, "x", "a", k, 2, inits, scalar)]
    inits.append(init("B", he_weight(rng, (n, k) if trans_b else (k, n), k)))
    ins = ["a", "B"]
    shapes = {"n": (n,), "1n": (1, n), "mn": (m, n), "m1": (m, 1), "scalar": ()}
    if c_shape != "none":
        inits.append(init("C", rng.normal(0, 0.5, shapes[c_shape]).astype(np.float32)))
        ins.append("C")
    attrs = {"transA": int(trans_a), "transB": int(trans_b), "alpha": alpha, "beta": beta}
    nodes.append(helper.make_node("Gemm", ins, ["y"], name="fc", **attrs))
    result = fold_checked(make_model(nodes, inits, [("x", F32, [k, m] if trans_a else [m, k])], ["y"]))
    assert patterns(result) == Counter({f"{kind}+Gemm": 1})
    assert ops(result.model) == Counter({"Gemm": 1})


@SETTINGS
@given(
    c=st.integers(1, 5),
    hw=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    n=st.integers(1, 4),
    via=st.sampled_from(["Flatten", "Dropout+Flatten", "Reshape"]),
    trans_b=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_arcface_bn_flatten_fc(c, hw, n, via, trans_b, seed) -> None:
    """iresnet's ``bn2 -> (Dropout) -> Flatten -> fc``: row k of the weight reads channel k // (H*W)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    k = c * h * w
    inits = [*bn_params(rng, "bn", c), init("B", he_weight(rng, (n, k) if trans_b else (k, n), k))]
    inits.append(init("fcb", rng.normal(0, 0.5, n).astype(np.float32)))
    nodes = [bn_node("bn", "x", "b")]
    x = "b"
    for op in via.split("+"):
        if op == "Reshape":
            inits.append(init("shape", np.array([2, -1], np.int64)))
            nodes.append(helper.make_node("Reshape", [x, "shape"], [x + "r"], name="reshape"))
        else:
            nodes.append(helper.make_node(op, [x], [x + op], name=op.lower()))
        x = nodes[-1].output[0]
    nodes.append(helper.make_node("Gemm", [x, "B", "fcb"], ["y"], name="fc", transB=int(trans_b)))
    result = fold_checked(make_model(nodes, inits, [("x", F32, [2, c, h, w])], ["y"]))
    assert patterns(result) == Counter({f"BatchNormalization+{via}+Gemm": 1})
    assert ops(result.model)["BatchNormalization"] == 0


@SETTINGS
@given(
    kind=st.sampled_from(AFFINE),
    lead=st.sampled_from([(3,), (2, 3), (2, 1, 3)]),
    k=st.integers(1, 5),
    n=st.integers(1, 4),
    bias=st.sampled_from(["none", "add", "add_first", "sub"]),
    scalar=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_affine_before_matmul(kind, lead, k, n, bias, scalar, dtype, seed) -> None:
    rng = np.random.default_rng(seed)
    rank = len(lead) + 1
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits: list = []
    if kind == "BatchNormalization":
        if rank != 2:
            return  # BN's channel axis 1 is the contracted one only on 2-D data
        inits += bn_params(rng, "bn", k, dtype)
        nodes = [bn_node("bn", "x", "a")]
    else:
        shape = () if scalar else (k,)  # the last axis
        if kind in ("Mul", "Div"):
            v = rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape)
        else:
            v = rng.normal(0, 1, shape)
        inits.append(init("k", np.asarray(v, dtype)))
        nodes = [helper.make_node(kind, ["x", "k"], ["a"], name="aff")]
    inits.append(init("W", he_weight(rng, (k, n), k, dtype)))
    nodes.append(helper.make_node("MatMul", ["a", "W"], ["p"], name="mm"))
    if bias != "none":
        inits.append(init("bias", rng.normal(0, 0.5, n).astype(dtype)))
        ins = ["bias", "p"] if bias == "add_first" else ["p", "bias"]
        nodes.append(helper.make_node("Sub" if bias == "sub" else "Add", ins, ["y"], name="bias"))
    else:
        nodes.append(helper.make_node("Identity", ["p"], ["y"], name="out"))
    model = make_model(nodes, inits, [("x", et, [*lead, k])], ["y"], out_type=et)
    tol = (1e-5, 1e-4) if dtype == np.float32 else (1e-12, 1e-10)
    pure_shift = kind in ("Add", "Sub")
    if pure_shift and bias == "none":
        result = bnfold.fold_model(model)  # a shift before a MatMul without a bias is already minimal
        assert result.report.folds == []
        return
    result = fold_checked(model, *tol)
    assert patterns(result) == Counter({f"{kind}+MatMul": 1})
    expected = Counter({"MatMul": 1})
    if bias != "none":
        expected["Sub" if bias == "sub" else "Add"] += 1  # the shift went into it
    else:
        expected["Identity"] += 1
        if kind == "BatchNormalization":
            expected["Add"] += 1  # its shift t @ W, as a new Add after the MatMul
    assert ops(result.model) == expected


def test_bn_before_matmul_without_bias_becomes_a_new_add() -> None:
    rng = np.random.default_rng(0)
    inits = [*bn_params(rng, "bn", 4), init("W", he_weight(rng, (4, 3), 4))]
    nodes = [bn_node("bn", "x", "a"), helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")]
    model = make_model(nodes, inits, [("x", F32, [5, 4])], ["y"])
    result = fold_checked(model)
    assert ops(result.model) == Counter({"MatMul": 1, "Add": 1})
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert result.model.graph.node[-1].output[0] == "y"


def test_matmul_output_read_twice_keeps_both_readers_right() -> None:
    """The shift t @ W must not leak into another reader of the MatMul output."""
    rng = np.random.default_rng(1)
    inits = [*bn_params(rng, "bn", 4), init("W", he_weight(rng, (4, 3), 4)), init("bias", np.ones(3, np.float32))]
    nodes = [
        bn_node("bn", "x", "a"),
        helper.make_node("MatMul", ["a", "W"], ["p"], name="mm"),
        helper.make_node("Add", ["p", "bias"], ["y"], name="bias_add"),
        helper.make_node("Relu", ["p"], ["z"], name="relu"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [5, 4])], ["y", "z"]))
    assert result.report.bn_folded == 1


@pytest.mark.parametrize("group,pads,strides", [(1, 0, 1), (2, 1, 2), (4, 2, 3)])
def test_scale_before_conv_transpose_folds(group: int, pads: int, strides: int) -> None:
    rng = np.random.default_rng(2)
    cin = 4
    inits = [init("m", rng.uniform(0.5, 2, (cin, 1, 1)).astype(np.float32))]
    inits.append(init("w", he_weight(rng, (cin, 2, 3, 3), 9)))
    nodes = [
        helper.make_node("Mul", ["x", "m"], ["a"], name="scale"),
        helper.make_node(
            "ConvTranspose", ["a", "w"], ["y"], name="up", group=group, pads=[pads] * 4, strides=[strides] * 2
        ),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, cin, 5, 5])], ["y"]))
    assert patterns(result) == Counter({"Mul+ConvTranspose": 1})


# ---------------------------------------------------------------------------
# Traps
# ---------------------------------------------------------------------------


def _left(model: onnx.ModelProto, reason: Reason, bn: bool = True) -> None:
    result = bnfold.fold_model(model)
    rep = result.report
    left = rep.skips if bn else rep.affine_skips
    assert rep.folds == [] and [s.reason for s in left] == [reason], rep.to_dict()
    assert result.model.SerializeToString() == model.SerializeToString()


def test_trap_bn_over_ncl_before_matmul_on_l() -> None:
    rng = np.random.default_rng(3)
    inits = [*bn_params(rng, "bn", 4), init("W", he_weight(rng, (6, 3), 6))]
    nodes = [bn_node("bn", "x", "a"), helper.make_node("MatMul", ["a", "W"], ["y"], name="mm")]
    _left(make_model(nodes, inits, [("x", F32, [2, 4, 6])], ["y"]), Reason.CHANNEL_IS_BATCH_AXIS)


def test_trap_bn_before_gemm_with_trans_a() -> None:
    rng = np.random.default_rng(4)
    inits = [*bn_params(rng, "bn", 5), init("B", he_weight(rng, (3, 2), 3))]
    nodes = [bn_node("bn", "x", "a"), helper.make_node("Gemm", ["a", "B"], ["y"], name="fc", transA=1)]
    _left(make_model(nodes, inits, [("x", F32, [3, 5])], ["y"]), Reason.CHANNEL_IS_BATCH_AXIS)


def test_trap_reshape_moves_channels_into_rows() -> None:
    """[N, C, L] -> Reshape [N*C, L] -> MatMul: the channel is merged into the batch rows."""
    rng = np.random.default_rng(5)
    inits = [*bn_params(rng, "bn", 4), init("W", he_weight(rng, (6, 3), 6)), init("s", np.array([-1, 6], np.int64))]
    nodes = [
        bn_node("bn", "x", "a"),
        helper.make_node("Reshape", ["a", "s"], ["r"], name="rows"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="mm"),
    ]
    _left(make_model(nodes, inits, [("x", F32, [2, 4, 6])], ["y"]), Reason.CHANNEL_IS_BATCH_AXIS)


@pytest.mark.parametrize("kind", ["BatchNormalization", "Add"])
def test_trap_shift_before_conv_transpose(kind: str) -> None:
    rng = np.random.default_rng(6)
    inits: list = []
    nodes = [affine_node(rng, kind, "x", "a", 4, 4, inits)]
    inits.append(init("w", he_weight(rng, (4, 2, 3, 3), 9)))
    nodes.append(helper.make_node("ConvTranspose", ["a", "w"], ["y"], name="up"))
    _left(
        make_model(nodes, inits, [("x", F32, [1, 4, 5, 5])], ["y"]), Reason.SHIFT_BEFORE_CONV_TRANSPOSE, kind != "Add"
    )


def test_trap_flatten_output_shared_before_gemm() -> None:
    rng = np.random.default_rng(7)
    inits = [*bn_params(rng, "bn", 3), init("B", he_weight(rng, (12, 2), 12))]
    nodes = [
        bn_node("bn", "x", "a"),
        helper.make_node("Flatten", ["a"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "B"], ["y"], name="fc"),
        helper.make_node("Relu", ["f"], ["z"], name="relu"),
    ]
    _left(make_model(nodes, inits, [("x", F32, [2, 3, 2, 2])], ["y", "z"]), Reason.INTERMEDIATE_SHARED)


def test_bn_identity_unpadded_conv() -> None:
    rng = np.random.default_rng(8)
    inits = [*bn_params(rng, "bn", 3), init("w", he_weight(rng, (4, 3, 1, 1), 3))]
    nodes = [
        bn_node("bn", "x", "a"),
        helper.make_node("Identity", ["a"], ["i"], name="id"),
        helper.make_node("Conv", ["i", "w"], ["y"], name="conv"),
    ]
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 4, 4])], ["y"]))
    assert patterns(result) == Counter({"BatchNormalization+Identity+Conv": 1})


def test_blame_finds_a_wrong_forward_fold(monkeypatch) -> None:
    """Verification and per-fold blame cover the new folds: a corrupted BN+Flatten+Gemm is named."""
    from builders import corrupt_rule

    from bnfold.verify.blame import verify_fold

    rng = np.random.default_rng(9)
    inits = [*bn_params(rng, "bn", 3), init("B", he_weight(rng, (12, 2), 12))]
    inits += [init("w", he_weight(rng, (3, 3, 3, 3), 27)), *bn_params(rng, "bn0", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn0", "c", "c0"),
        helper.make_node("Relu", ["c0"], ["r"], name="relu"),
        bn_node("bn", "r", "a"),
        helper.make_node("Flatten", ["a"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "B"], ["y"], name="fc"),
    ]
    model = make_model(nodes, inits, [("x", F32, [2, 3, 2, 2])], ["y"])

    def spoil(site):
        site.aff.t = np.asarray(site.aff.t, dtype=np.float64) + 1.0

    corrupt_rule(monkeypatch, "BatchNormalization+Gemm", spoil)
    fv = verify_fold(model, bnfold.fold_model(model), keep_safe=True)
    assert [(f.node, f.pattern) for f in fv.blame.culprits] == [("bn", "BatchNormalization+Flatten+Gemm")]
    assert fv.kept_safe and {f.node for f in fv.result.report.folds} == {"bn0"}
