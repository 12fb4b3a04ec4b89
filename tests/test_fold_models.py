"""Property tests: build Conv/ConvTranspose/Gemm/MatMul + BN models, fold, run both, compare.

The original runs in onnxruntime with ORT_DISABLE_ALL (so onnxruntime does not
fold BN itself).  float64 and bfloat16 (no onnxruntime CPU Conv) are checked
with the float64 numpy reference in tests/reference.py.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from builders import BF16, NEWEST_OPSET, Net, count_ops, elem_type
from foldcheck import fold_and_check, reference_compare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bnfold

OPSETS = list(range(7, NEWEST_OPSET + 1))
# BNFOLD_EXAMPLES=500 explores more (the default keeps the suite fast).
EXAMPLES = int(os.environ.get("BNFOLD_EXAMPLES", "40"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = st.sampled_from([1e-5, 1e-3, 0.1])


def _bn_attrs(draw, opset: int, eps: float) -> dict:
    attrs = {"epsilon": eps}
    if opset < 9 and draw(st.booleans()):
        attrs["spatial"] = 1
    if opset >= 14 and draw(st.booleans()):
        attrs["training_mode"] = 0
    if draw(st.booleans()):
        attrs["momentum"] = 0.9
    return attrs


def _param_dtypes(draw, opset: int, dtype) -> tuple:
    """BN-15 allows float32 scale/bias and mean/var with a float16 X; BN-14 only mean/var."""
    if np.dtype(dtype) != np.float16:
        return dtype, dtype
    if opset >= 15:
        return draw(st.sampled_from([np.float16, np.float32])), draw(st.sampled_from([np.float16, np.float32]))
    if opset == 14:
        return dtype, draw(st.sampled_from([np.float16, np.float32]))
    return dtype, dtype


@st.composite
def conv_geometry(draw, op: str, max_rank: int = 3):
    """rank, cin, cout, group, kernel, strides, dilations, pads/auto_pad/output_padding, spatial size."""
    rank = draw(st.integers(1, max_rank))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "plain":
        group, cin, cout = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "grouped":
        group = draw(st.integers(2, 3))
        cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    else:
        group = cin = draw(st.integers(2, 4))
        cout = cin * draw(st.integers(1, 2))
    kmax = 2 if rank == 3 else 3
    kernel = [draw(st.integers(1, kmax)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    pad_modes = ["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"] if op == "Conv" else ["NOTSET", "VALID"]
    auto_pad = draw(st.sampled_from(pad_modes))
    # onnxruntime supports no dilation with SAME_UPPER/SAME_LOWER.
    same = auto_pad.startswith("SAME")
    dilations = [1 if same else draw(st.integers(1, 2)) for _ in range(rank)]
    attrs: dict = {"group": group} if group > 1 or draw(st.booleans()) else {}
    if any(s > 1 for s in strides) or draw(st.booleans()):
        attrs["strides"] = strides
    if any(d > 1 for d in dilations) or draw(st.booleans()):
        attrs["dilations"] = dilations
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    elif draw(st.booleans()):
        attrs["pads"] = [draw(st.integers(0, (k - 1) * d)) for k, d in zip(kernel * 2, dilations * 2, strict=True)]
    if op == "ConvTranspose" and auto_pad == "NOTSET" and draw(st.booleans()):
        # The spec allows output_padding < max(stride, dilation); onnxruntime wants < stride.
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]
    size_max = 4 if rank == 3 else 6
    sizes = [(k - 1) * d + 1 + draw(st.integers(0, size_max)) for k, d in zip(kernel, dilations, strict=True)]
    return rank, cin, cout, group, kernel, attrs, sizes


@st.composite
def conv_bn_case(draw, dtypes=(np.float32, np.float16), opsets=OPSETS):
    """A Conv or ConvTranspose followed by a BN, as (model, dtype)."""
    op = draw(st.sampled_from(["Conv", "ConvTranspose"]))
    _, cin, cout, group, kernel, attrs, sizes = draw(conv_geometry(op))
    dtype = draw(st.sampled_from(dtypes))
    opset = draw(st.sampled_from(opsets))
    net = Net(opset=opset, seed=draw(st.integers(0, 2**16)))
    x = net.input("x", dtype, [2, cin, *sizes])
    wshape = (cout, cin // group, *kernel) if op == "Conv" else (cin, cout // group, *kernel)
    ins = [x, net.weight(wshape, dtype)]
    if draw(st.booleans()):
        ins.append(net.weight((cout,), dtype, fan_in=1))
    y = net.node(op, ins, **attrs)
    scale_dt, stats_dt = _param_dtypes(draw, opset, dtype)
    z = net.bn(y, cout, param_dtype=scale_dt, stats_dtype=stats_dt, **_bn_attrs(draw, opset, draw(EPS)))
    if draw(st.booleans()):
        z = net.node("Relu", [z])
    net.output(z, dtype)
    return net.build(), dtype


@PROPS
@given(conv_bn_case())
def test_conv_bn_folds_and_matches(case) -> None:
    model, dtype = case
    result = fold_and_check(model, folded=1, dtype=dtype)
    conv = next(n for n in result.model.graph.node if n.op_type in ("Conv", "ConvTranspose"))
    assert len(conv.input) == 3, "the folded Conv has a bias"
    inits = {t.name: t for t in result.model.graph.initializer}
    for name in conv.input[1:]:
        assert inits[name].data_type == model.graph.input[0].type.tensor_type.elem_type


@st.composite
def gemm_bn_case(draw, dtypes=(np.float32, np.float16, np.float64), opsets=OPSETS):
    dtype = draw(st.sampled_from(dtypes))
    opset = draw(st.sampled_from(opsets))
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    net = Net(opset=opset, seed=draw(st.integers(0, 2**16)))
    a = net.input("a", dtype, [k, m] if trans_a else [m, k])
    ins = [a, net.weight([n, k] if trans_b else [k, n], dtype, fan_in=k)]
    c_shape = draw(st.sampled_from([None, [n], [1, n], [m, n], [1], [m, 1]]))
    if c_shape is None and opset < 11:
        c_shape = [n]  # Gemm's C is optional from opset 11 on
    if c_shape is not None:
        ins.append(net.weight(c_shape, dtype, fan_in=1))
    attrs = {"transA": trans_a, "transB": trans_b}
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.5, -1.5, 2.0]))
    if draw(st.booleans()):
        attrs["beta"] = draw(st.sampled_from([0.0, 0.5, -2.0]))
    y = net.node("Gemm", ins, **attrs)
    scale_dt, stats_dt = _param_dtypes(draw, opset, dtype)
    z = net.bn(y, n, param_dtype=scale_dt, stats_dtype=stats_dt, **_bn_attrs(draw, opset, draw(EPS)))
    net.output(z, dtype)
    return net.build(), dtype


@PROPS
@given(gemm_bn_case())
def test_gemm_bn_folds_and_matches(case) -> None:
    model, dtype = case
    result = fold_and_check(model, folded=1, dtype=dtype)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]


@st.composite
def matmul_bn_case(draw, dtypes=(np.float32, np.float16, np.float64), opsets=OPSETS):
    dtype = draw(st.sampled_from(dtypes))
    opset = draw(st.sampled_from(opsets))
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    net = Net(opset=opset, seed=draw(st.integers(0, 2**16)))
    x = net.input("x", dtype, [m, k])
    y = net.node("MatMul", [x, net.weight([k, n], dtype)])
    bias = draw(st.sampled_from([None, [n], [1, n]]))
    if bias is not None:
        b = net.weight(bias, dtype, fan_in=1)
        y = net.node("Add", [y, b] if draw(st.booleans()) else [b, y])
    scale_dt, stats_dt = _param_dtypes(draw, opset, dtype)
    z = net.bn(y, n, param_dtype=scale_dt, stats_dtype=stats_dt, **_bn_attrs(draw, opset, draw(EPS)))
    net.output(z, dtype)
    return net.build(), dtype, bias is not None


@PROPS
@given(matmul_bn_case())
def test_matmul_bn_folds_and_matches(case) -> None:
    model, dtype, _ = case
    result = fold_and_check(model, folded=1, dtype=dtype)
    assert [n.op_type for n in result.model.graph.node] in (["MatMul", "Add"], ["MatMul"])


# ---- dtypes onnxruntime cannot run: float64 and bfloat16 via the numpy reference ----

REF_OPSETS_BF16 = list(range(22, NEWEST_OPSET + 1))  # Conv takes bfloat16 from opset 22


@PROPS
@given(conv_bn_case(dtypes=(np.float64,)))
def test_float64_conv_bn_folds_exactly(case) -> None:
    model, _ = case
    # reference.py has no auto_pad for ConvTranspose; conv_geometry only draws NOTSET/VALID there.
    result = bnfold.fold_model(model)
    assert count_ops(result.model.graph, "BatchNormalization") == 0
    onnx.checker.check_model(result.model, full_check=True)
    _check_dtype(result.model, onnx.TensorProto.DOUBLE)
    reference_compare(_valid_as_explicit(model), _valid_as_explicit(result.model), unit_roundoff=1e-14)


@PROPS
@given(conv_bn_case(dtypes=(BF16,), opsets=REF_OPSETS_BF16))
def test_bfloat16_conv_bn_rounds_once(case) -> None:
    model, _ = case
    result = bnfold.fold_model(model)
    assert count_ops(result.model.graph, "BatchNormalization") == 0
    onnx.checker.check_model(result.model, full_check=True)
    _check_dtype(result.model, onnx.TensorProto.BFLOAT16)
    # bfloat16 has 8 significant bits: one rounding is within 2**-8 relative.
    reference_compare(_valid_as_explicit(model), _valid_as_explicit(result.model), unit_roundoff=2.0**-8)


REF_OPSETS_BF16_GEMM = list(range(15, NEWEST_OPSET + 1))  # BN takes bfloat16 from opset 15


@PROPS
@given(
    st.one_of(
        gemm_bn_case(dtypes=(BF16,), opsets=REF_OPSETS_BF16_GEMM),
        matmul_bn_case(dtypes=(BF16,), opsets=REF_OPSETS_BF16_GEMM),
    )
)
def test_bfloat16_gemm_and_matmul_bn_round_once(case) -> None:
    model = case[0]
    result = bnfold.fold_model(model)
    assert count_ops(result.model.graph, "BatchNormalization") == 0
    onnx.checker.check_model(result.model, full_check=True)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    reference_compare(model, result.model, unit_roundoff=2.0**-8)


def _check_dtype(model: onnx.ModelProto, elem: int) -> None:
    conv = next(n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose"))
    inits = {t.name: t for t in model.graph.initializer}
    assert [inits[i].data_type for i in conv.input[1:]] == [elem, elem]


def _valid_as_explicit(model: onnx.ModelProto) -> onnx.ModelProto:
    """ConvTranspose with auto_pad=VALID is the same as no padding (what reference.py knows)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.op_type == "ConvTranspose":
            keep = [a for a in n.attribute if not (a.name == "auto_pad" and a.s == b"VALID")]
            del n.attribute[:]
            n.attribute.extend(keep)
    return out


def test_bfloat16_folded_weight_is_the_rounded_exact_product() -> None:
    """Round once: each folded bf16 weight is the bf16 nearest to the float64 product."""
    net = Net(opset=22, seed=3)
    x = net.input("x", BF16, [1, 2, 4, 4])
    w = net.weight((3, 2, 3, 3), BF16, name="w")
    params = [p.astype(BF16) for p in net.bn_params(3)]
    y = net.bn(net.node("Conv", [x, w]), 3, params=params, epsilon=1e-3)
    net.output(y, BF16)
    model = net.build()
    result = bnfold.fold_model(model)
    conv = result.model.graph.node[0]
    inits = {t.name: t for t in result.model.graph.initializer}
    w_new = _bf16_array(inits[conv.input[1]])
    gamma, _, _, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + np.float64(np.float32(1e-3)))
    exact = (
        _bf16_array(next(t for t in model.graph.initializer if t.name == "w")).astype(np.float64)
        * s[:, None, None, None]
    )
    np.testing.assert_array_equal(w_new, exact.astype(BF16))


def _bf16_array(t: onnx.TensorProto) -> np.ndarray:
    return np.frombuffer(t.raw_data, dtype=np.uint16).view(BF16).reshape(tuple(t.dims))


# ---- chains ---------------------------------------------------------------


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
def test_chain_of_bns_ends_as_one_op(op: str) -> None:
    net = Net(opset=17, seed=5)
    if op in ("Conv", "ConvTranspose"):
        x = net.input("x", np.float32, [2, 4, 5, 5])
        w = net.weight((3, 4, 3, 3) if op == "Conv" else (4, 3, 3, 3))
        y = net.node(op, [x, w])
    else:
        x = net.input("x", np.float32, [2, 4])
        y = net.node(op, [x, net.weight((4, 3))])
    y = net.bn(net.bn(net.bn(y, 3), 3), 3)
    net.output(y, np.float32)
    result = fold_and_check(net.build(), folded=3)
    assert [n.op_type for n in result.model.graph.node] == [op] + (["Add"] if op == "MatMul" else [])


# ---- constants that are not initializers -----------------------------------


def _as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node at the front (PaddlePaddle style)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [
        onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in out.graph.initializer
    ]
    del out.graph.initializer[:]
    for k, n in enumerate(nodes):
        out.graph.node.insert(k, n)
    return out


def test_weights_from_constant_nodes_fold_and_dead_constants_go() -> None:
    net = Net(opset=13, seed=7)
    x = net.input("x", np.float32, [1, 3, 6, 6])
    y = net.node("Conv", [x, net.weight((4, 3, 3, 3)), net.weight((4,), fan_in=1)], pads=[1, 1, 1, 1])
    y = net.bn(net.node("Relu", [net.bn(y, 4)]), 4)
    y = net.bn(net.node("Conv", [y, net.weight((2, 4, 3, 3))], pads=[1, 1, 1, 1]), 2)
    net.output(y, np.float32)
    model = _as_constant_nodes(net.build())
    assert not model.graph.initializer
    result = fold_and_check(model, folded=2, left=1)
    ops = [n.op_type for n in result.model.graph.node]
    # The BN between Relu and a padded Conv stays; the two after a Conv fold.
    assert ops.count("Conv") == 2 and ops.count("Relu") == 1 and ops.count("BatchNormalization") == 1
    live = {i for n in result.model.graph.node for i in n.input}
    for n in result.model.graph.node:
        if n.op_type == "Constant":
            assert n.output[0] in live, f"dead Constant {n.name} left"
    assert not any(n.name == "const_bn1_scale" for n in result.model.graph.node)


def test_constant_of_shape_weights_fold() -> None:
    """Weights made by ConstantOfShape (as in the onnx light model zoo)."""
    net = Net(opset=11, seed=8)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    shape = net.init("wshape", np.array([4, 3, 3, 3], dtype=np.int64))
    fill = numpy_helper.from_array(np.array([0.25], dtype=np.float32), "value")
    w = net.node("ConstantOfShape", [shape], name="make_w", value=fill)
    bshape = net.init("bshape", np.array([4], dtype=np.int64))
    b = net.node("ConstantOfShape", [bshape], name="make_b", value=fill)
    y = net.bn(net.node("Conv", [x, w, b]), 4)
    net.output(y, np.float32)
    model = net.build()
    result = fold_and_check(model, folded=1)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv"], ops
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"wshape", "bshape"})


def test_pytorch_dynamo_zero_bias_subgraph_folds() -> None:
    """Raw dynamo export: ``Shape(weight) -> Slice -> Expand -> CastLike -> Expand`` makes a zero bias."""
    net = Net(opset=18, seed=9)
    x = net.input("x", np.float32, [1, 3, 6, 6])
    w = net.weight((5, 3, 3, 3), name="conv.weight")
    shp = net.node("Shape", [w], name="n_shape")
    sl = net.node(
        "Slice",
        [shp, net.init("st", np.array([0], np.int64)), net.init("en", np.array([1], np.int64))],
        name="n_slice",
    )
    zero = net.init("zero", np.array(0, dtype=np.int64))
    ex = net.node("Expand", [zero, sl], name="n_expand")
    cl = net.node("CastLike", [ex, w], name="n_castlike")
    bias = net.node("Expand", [cl, sl], name="n_expand2")
    y = net.bn(net.node("Conv", [x, w, bias], pads=[1, 1, 1, 1]), 5)
    net.output(y, np.float32)
    result = fold_and_check(net.build(), folded=1)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"st", "en", "zero"})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pytorch_dynamo_zero_bias_cast_like_graph_input_folds(dtype) -> None:
    """torch 2.13's raw dynamo export casts the zero bias like the *graph input*.

    ``Shape(weight, end=1) -> Expand -> CastLike(0, x) -> Expand``: CastLike reads
    only the dtype of ``x``, so the bias is a constant although ``x`` is not
    (regression: the bias counted as non-constant and the BN was left).
    """
    net = Net(opset=20, seed=9)
    x = net.input("x", dtype, [1, 3, 6, 6])
    w = net.weight((5, 3, 3, 3), dtype, name="conv.weight")
    shp = net.node("Shape", [w], name="n_shape", start=0, end=1)
    one = net.node("Constant", [], name="n_one", value_ints=[1])
    sl = net.node("Expand", [shp, one], name="n_expand")
    zero = net.node("Constant", [], name="n_zero", value=numpy_helper.from_array(np.array(0.0, np.float32)))
    cl = net.node("CastLike", [zero, x], name="n_castlike")
    bias = net.node("Expand", [cl, sl], name="n_expand2")
    y = net.bn(net.node("Conv", [x, w, bias], pads=[1, 1, 1, 1]), 5, param_dtype=np.float32)
    net.output(y, dtype)
    result = fold_and_check(net.build(), folded=1, dtype=dtype)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.model.graph.node[0].input[0] == "x"
    assert {t.data_type for t in result.model.graph.initializer} == {elem_type(dtype)}


def test_cast_like_target_of_unknown_dtype_is_no_constant() -> None:
    """A CastLike target whose elem_type onnx does not know: the bias is not a constant, no crash."""
    net = Net(opset=20, seed=9)
    x = net.input("x", np.float32, [1, 3, 6, 6])
    zero = net.node("Constant", [], value=numpy_helper.from_array(np.zeros(5, np.float32)))
    bias = net.node("CastLike", [zero, x])
    y = net.bn(net.node("Conv", [x, net.weight((5, 3, 3, 3)), bias], pads=[1, 1, 1, 1]), 5)
    net.output(y, np.float32)
    model = net.build()
    model.graph.input[0].type.tensor_type.elem_type = 999
    result = bnfold.fold_model(model)
    assert [s.reason.value for s in result.report.skips] == ["non_constant_weight"]


@pytest.mark.parametrize("expose_bias", [False, True])
def test_bn_before_conv_whose_zero_bias_is_cast_like_the_bn_output_folds(expose_bias: bool) -> None:
    """Raw dynamo export of ``conv(bn(x))``: the Conv's zero bias is ``CastLike(0, bn_out)``.

    The CastLike reads only the BN output's dtype, which the BN's input has too: it
    must not count as a second reader (regression: the BN was left as
    ``output_shared``).  When the CastLike stays (its result is a graph output here)
    it is pointed at the BN's input.
    """
    net = Net(opset=20, seed=13)
    x = net.input("x", np.float32, [1, 4, 6, 6])
    b = net.bn(net.node("Relu", [x]), 4, name="bn")
    w = net.weight((6, 4, 1, 1), name="conv.weight")
    shp = net.node("Shape", [w], name="n_shape", start=0, end=1)
    sl = net.node("Expand", [shp, net.node("Constant", [], name="n_one", value_ints=[1])], name="n_expand")
    zero = net.node("Constant", [], name="n_zero", value=numpy_helper.from_array(np.array(0.0, np.float32)))
    cl = net.node("CastLike", [zero, b], name="n_castlike")
    bias = net.node("Expand", [cl, sl], name="n_expand2")
    y = net.node("Conv", [b, w, bias], name="conv", kernel_shape=[1, 1])
    net.output(y, np.float32)
    if expose_bias:
        net.output(bias, np.float32)
    result = fold_and_check(net.build(), folded=1)
    assert result.report.folds[0].pattern == "BatchNormalization+Conv"
    g = result.model.graph
    if expose_bias:
        assert [n.input[1] for n in g.node if n.op_type == "CastLike"] == ["relu1_out"]
    else:
        assert [n.op_type for n in g.node] == ["Relu", "Conv"]


@pytest.mark.parametrize("opset", [11, 17])
def test_matmul_by_transposed_constant_folds(opset: int) -> None:
    """TorchScript export of a bias-free ``nn.Linear`` without constant folding: ``MatMul(x, Transpose(W))``.

    Regression: Transpose of a constant did not count as a constant, so the BN was left.
    """
    net = Net(opset=opset, seed=14)
    x = net.input("x", np.float32, [2, 6])
    wt = net.node("Transpose", [net.weight((5, 6), name="fc.weight")], name="n_transpose", perm=[1, 0])
    y = net.bn(net.node("MatMul", [x, wt], name="fc"), 5)
    net.output(y, np.float32)
    result = fold_and_check(net.build(), folded=1)
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    assert "fc.weight" not in {t.name for t in result.model.graph.initializer}


@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_initializers_listed_as_inputs_fold(opset: int) -> None:
    net = Net(opset=opset, seed=10)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    y = net.bn(net.node("Conv", [x, net.weight((4, 3, 3, 3))]), 4)  # no bias: one is added
    y = net.bn(net.node("Gemm", [net.node("Flatten", [y]), net.weight((36, 2)), net.weight((2,), fan_in=1)]), 2)
    net.output(y, np.float32)
    model = net.build()
    assert model.ir_version == 3 and len(model.graph.input) == 1 + len(model.graph.initializer)
    result = fold_and_check(model, folded=2)
    g = result.model.graph
    listed = {i.name for i in g.input}
    assert {t.name for t in g.initializer} <= listed, "IR 3: every initializer is a graph input"
    assert len(g.input) == 1 + len(g.initializer), "no input left without its initializer"
    # weights are overwritten in place: same names, same place among the inputs
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.input[1] for n in g.node if n.op_type in ("Conv", "Gemm")] == weights
    old_order = [i.name for i in model.graph.input if i.name in listed]
    assert [i.name for i in g.input][: len(old_order)] == old_order


def test_float16_conv_with_float32_bn_stays_float16() -> None:
    net = Net(opset=15, seed=11)
    x = net.input("x", np.float16, [1, 3, 5, 5])
    y = net.bn(net.node("Conv", [x, net.weight((4, 3, 3, 3), np.float16)]), 4, param_dtype=np.float32)
    net.output(y, np.float16)
    result = fold_and_check(net.build(), folded=1, dtype=np.float16)
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_small_constant_subgraphs_fold_and_go(opset: int) -> None:
    """Weight by Cast+Reshape+Identity, bias by Concat, BN params by Unsqueeze/Squeeze/Slice/Expand."""
    net = Net(opset=opset, seed=12)
    rng = net.rng

    def const(name: str, value: np.ndarray) -> str:
        net.nodes.append(
            onnx.helper.make_node(
                "Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(value, name)
            )
        )
        return name

    def axes_node(op: str, x: str, axes: list[int]) -> str:
        if opset >= 13:
            return net.node(op, [x, const(net.fresh("axes"), np.array(axes, np.int64))])
        return net.node(op, [x], axes=axes)

    x = net.input("x", np.float32, [1, 3, 6, 6])
    flat = const("w_flat", (rng.standard_normal(4 * 3 * 9) * 0.3).astype(np.float64))
    w = net.node("Cast", [flat], to=onnx.TensorProto.FLOAT)
    w = net.node("Reshape", [w, const("w_shape", np.array([4, 3, 3, 3], np.int64))])
    w = net.node("Identity", [w])
    b = net.node(
        "Concat",
        [
            const("b0", rng.standard_normal(2).astype(np.float32)),
            const("b1", rng.standard_normal(2).astype(np.float32)),
        ],
        axis=0,
    )
    gamma = axes_node(
        "Squeeze", axes_node("Unsqueeze", const("g", rng.uniform(0.5, 1.5, 4).astype(np.float32)), [0]), [0]
    )
    beta = const("beta", rng.standard_normal(4).astype(np.float32))
    long_mean = const("m_long", rng.standard_normal(6).astype(np.float32))
    mean = net.node("Slice", [long_mean, const("s0", np.array([1], np.int64)), const("s1", np.array([5], np.int64))])
    var = net.node("Expand", [const("v1", np.array([0.7], np.float32)), const("v_shape", np.array([4], np.int64))])
    y = net.node("Conv", [x, w, b], pads=[1, 1, 1, 1])
    y = net.node("BatchNormalization", [y, gamma, beta, mean, var])
    net.output(y, np.float32)
    model = net.build()
    result = fold_and_check(model, folded=1)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
