"""One graph per leave-alone rule: the BN stays, the report says why, the model is untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import NEWEST_OPSET, Net
from foldcheck import fold_and_check, reference_compare
from helpers import random_feeds, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bnfold
from bnfold import Reason


def left_alone(model: onnx.ModelProto, reason: Reason, *, check: bool = True, **kwargs) -> bnfold.FoldResult:
    """Fold; the single BN must be left with ``reason`` and the model must come back byte-identical."""
    result = bnfold.fold_model(model, **kwargs)
    rep = result.report
    assert rep.bn_folded == 0 and rep.folds == [], rep.to_dict()
    assert [s.reason for s in rep.skips] == [reason], rep.to_dict()
    assert rep.skips[0].message, "every skip carries a sentence"
    assert result.model.SerializeToString() == model.SerializeToString()
    if check:
        onnx.checker.check_model(result.model, full_check=True)
    return result


def conv_net(opset: int = 17, cout: int = 4, dtype=np.float32, seed: int = 0) -> tuple[Net, str]:
    """A net with input x[1, 3, 5, 5] and a 3x3 Conv of ``cout`` channels; returns (net, conv output)."""
    net = Net(opset=opset, seed=seed)
    x = net.input("x", dtype, [1, 3, 5, 5])
    return net, net.node("Conv", [x, net.weight((cout, 3, 3, 3), dtype), net.weight((cout,), dtype, fan_in=1)])


# ---- training mode --------------------------------------------------------


def test_training_mode_1() -> None:
    net, y = conv_net(opset=15)
    z = net.bn(y, 4, n_out=3, training_mode=1)
    net.output(z, np.float32)
    left_alone(net.build(), Reason.TRAINING_MODE)


def test_is_test_0_in_opset_6() -> None:
    net, y = conv_net(opset=6)
    net.output(net.bn(y, 4, is_test=0), np.float32)
    left_alone(net.build(), Reason.TRAINING_MODE)


def test_is_test_1_in_opset_6_folds() -> None:
    net, y = conv_net(opset=6)
    net.output(net.bn(y, 4, is_test=1), np.float32)
    result = bnfold.fold_model(net.build())
    assert result.report.bn_folded == 1
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("opset", [9, 13])
def test_extra_outputs_consumed(opset: int) -> None:
    net, y = conv_net(opset=opset)
    z = net.bn(y, 4, n_out=5, name="bn")
    net.output(z, np.float32)
    net.output("bn_o1", np.float32, [4])  # the running-mean output is read
    left_alone(net.build(), Reason.TRAINING_MODE, check=False)


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_declared_extra_outputs_mean_training_mode_before_opset_14(opset: int) -> None:
    """BN-7/9 with its mean/var outputs declared runs in training mode, even when nobody reads them."""
    net, y = conv_net(opset=opset)
    z = net.bn(y, 4, n_out=5, name="bn")
    net.output(z, np.float32)
    model = net.build()
    left_alone(model, Reason.TRAINING_MODE)
    # onnxruntime agrees: with the outputs declared the BN uses batch statistics.
    inference = onnx.ModelProto()
    inference.CopyFrom(model)
    del inference.graph.node[-1].output[1:]
    feeds = random_feeds(model)
    assert not np.allclose(run(model, feeds)[0], run(inference, feeds)[0], atol=1e-3)


def test_empty_extra_output_names_do_not_mean_training() -> None:
    net, y = conv_net(opset=9)
    z = net.bn(y, 4, name="bn")
    net.nodes[-1].output.extend(["", "", "", ""])
    net.output(z, np.float32)
    model = net.build()
    result = bnfold.fold_model(model)
    assert result.report.bn_folded == 1
    onnx.checker.check_model(result.model, full_check=True)
    # onnxruntime 1.32 crashes on this BN (it counts the empty outputs): compare in numpy.
    reference_compare(model, result.model, unit_roundoff=2.0**-23)


# ---- spatial=0 --------------------------------------------------------------


@pytest.mark.parametrize("opset", [7, 8])
@pytest.mark.parametrize("param_shape", [(4, 3, 3), (4,)])
def test_spatial_0_is_left_and_never_crashes(opset: int, param_shape: tuple) -> None:
    net, y = conv_net(opset=opset)
    rng = np.random.default_rng(0)
    params = [rng.uniform(0.5, 1.5, param_shape).astype(np.float32) for _ in range(4)]
    net.output(net.bn(y, 4, params=params, spatial=0), np.float32)
    left_alone(net.build(), Reason.SPATIAL_0)


# ---- non-constant parameters and weights --------------------------------------


@pytest.mark.parametrize("which", [1, 2, 3, 4])
def test_bn_parameter_from_graph_input(which: int) -> None:
    net, y = conv_net()
    z = net.bn(y, 4, name="bn")
    bn = net.nodes[-1]
    bn.input[which] = net.input("p_in", np.float32, [4])
    net.inits = [t for t in net.inits if t.name != f"bn_{('', 'scale', 'bias', 'mean', 'var')[which]}"]
    net.output(z, np.float32)
    left_alone(net.build(), Reason.NON_CONSTANT_PARAMETERS)


@pytest.mark.parametrize("index", [1, 2])
def test_conv_weight_or_bias_from_graph_input(index: int) -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    ins = [x, net.weight((4, 3, 3, 3)), net.weight((4,), fan_in=1)]
    ins[index] = net.input("w_in", np.float32, [4, 3, 3, 3] if index == 1 else [4])
    net.inits = net.inits[1:] if index == 1 else net.inits[:1]
    net.output(net.bn(net.node("Conv", ins), 4), np.float32)
    left_alone(net.build(), Reason.NON_CONSTANT_WEIGHT)


def _listed_initializer_model(which: str) -> onnx.ModelProto:
    """IR >= 4 model where the BN scale (``which='param'``) or Conv weight is also a graph input."""
    net, y = conv_net(opset=13)
    net.output(net.bn(y, 4, name="bn"), np.float32)
    model = net.build()
    name = "bn_scale" if which == "param" else model.graph.node[0].input[1]
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    assert model.ir_version >= 4
    return model


@pytest.mark.parametrize(
    "which,reason", [("param", Reason.NON_CONSTANT_PARAMETERS), ("weight", Reason.NON_CONSTANT_WEIGHT)]
)
def test_ir4_initializer_listed_as_input_is_not_constant(which: str, reason: Reason) -> None:
    left_alone(_listed_initializer_model(which), reason)


@pytest.mark.parametrize("which", ["param", "weight"])
def test_freeze_initializer_inputs_option_folds_them(which: str) -> None:
    model = _listed_initializer_model(which)
    fold_and_check(model, folded=1, freeze_initializer_inputs=True)


# ---- producer output used elsewhere --------------------------------------------


def test_producer_output_has_another_consumer() -> None:
    net, y = conv_net()
    net.output(net.bn(y, 4), np.float32)
    net.output(net.node("Relu", [y]), np.float32)
    left_alone(net.build(), Reason.PRODUCER_OUTPUT_SHARED)


def test_producer_output_is_graph_output() -> None:
    net, y = conv_net()
    net.output(net.bn(y, 4), np.float32)
    net.output(y, np.float32)
    left_alone(net.build(), Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)


# ---- shapes -------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm"])
def test_channel_count_mismatch(op: str) -> None:
    net = Net(opset=17)
    if op == "Gemm":
        x = net.input("x", np.float32, [2, 3])
        y = net.node("Gemm", [x, net.weight((3, 4))])
    else:
        x = net.input("x", np.float32, [1, 3, 5, 5])
        y = net.node(op, [x, net.weight((4, 3, 3, 3) if op == "Conv" else (3, 4, 3, 3))])
    net.output(net.bn(y, 5), np.float32)  # 5 BN channels, 4 produced
    left_alone(net.build(), Reason.SHAPE_MISMATCH, check=False)


def test_conv_group_that_does_not_divide() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 4, 5, 5])
    y = net.node("Conv", [x, net.weight((5, 2, 3, 3))], group=2)
    net.output(net.bn(y, 5), np.float32)
    left_alone(net.build(), Reason.SHAPE_MISMATCH, check=False)


def test_matmul_with_3d_output() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [2, 4, 3])
    y = net.node("MatMul", [x, net.weight((3, 4))])
    net.output(net.bn(y, 4), np.float32)  # BN's channel axis is 1 (T=4), not N=4
    left_alone(net.build(), Reason.SHAPE_MISMATCH)


def test_matmul_with_unknown_rank() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, None)
    y = net.node("MatMul", [x, net.weight((3, 4))])
    z = net.bn(y, 4)
    net.output(z, np.float32)
    model = net.build()
    assert not model.graph.output[0].type.tensor_type.HasField("shape")
    left_alone(model, Reason.UNKNOWN_RANK, check=False)


# ---- values the weight dtype cannot hold -----------------------------------------


def test_float16_tiny_running_var_overflows() -> None:
    net, y = conv_net(dtype=np.float16, seed=1)
    params = [np.ones(4), np.zeros(4), np.zeros(4), np.full(4, 1e-12)]
    z = net.bn(y, 4, params=[p.astype(np.float32) for p in params], epsilon=1e-12)
    net.output(z, np.float16)
    model = net.build()
    # s = 1/sqrt(2e-12) ~ 7e5 times weights up to ~0.5: past float16's 65504 somewhere
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    assert np.abs(w).max() / np.sqrt(2e-12) > 65504
    result = left_alone(model, Reason.DTYPE_OVERFLOW)
    for t in result.model.graph.initializer:
        assert np.all(np.isfinite(numpy_helper.to_array(t).astype(np.float64)))


def test_zero_variance_and_zero_epsilon_is_not_finite() -> None:
    net, y = conv_net()
    params = [np.ones(4), np.zeros(4), np.zeros(4), np.array([1.0, 0.0, 1.0, 1.0])]
    net.output(net.bn(y, 4, params=[p.astype(np.float32) for p in params], epsilon=0.0), np.float32)
    left_alone(net.build(), Reason.NON_FINITE)


# ---- nothing to fold into --------------------------------------------------------


def test_producer_not_supported() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    net.output(net.bn(net.node("Relu", [x]), 3), np.float32)
    left_alone(net.build(), Reason.UNSUPPORTED_PRODUCER)


def test_bn_on_graph_input() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    net.output(net.bn(x, 3), np.float32)
    left_alone(net.build(), Reason.UNSUPPORTED_PRODUCER)


# ---- shared weights ----------------------------------------------------------------


def test_weight_shared_by_two_convs_folds_into_private_copy() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    w = net.weight((4, 3, 3, 3), name="shared_w")
    a = net.bn(net.node("Conv", [x, w], name="conv_a"), 4)
    b = net.node("Conv", [x, w], name="conv_b")
    net.output(a, np.float32)
    net.output(b, np.float32)
    model = net.build()
    result = fold_and_check(model, folded=1)
    g = result.model.graph
    conv_a = next(n for n in g.node if n.name == "conv_a")
    conv_b = next(n for n in g.node if n.name == "conv_b")
    assert list(conv_b.input) == [x, "shared_w"]
    assert conv_a.input[1] != "shared_w"
    before = next(t for t in model.graph.initializer if t.name == "shared_w")
    after = next(t for t in g.initializer if t.name == "shared_w")
    assert after.SerializeToString() == before.SerializeToString()
    # the second output (conv_b) is untouched bit for bit
    feeds = random_feeds(model)
    np.testing.assert_array_equal(run(model, feeds)[1], run(result.model, feeds)[1])


def test_weight_from_constant_node_shared_by_two_convs() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    w = numpy_helper.from_array(net.rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "v")
    net.nodes.append(onnx.helper.make_node("Constant", [], ["cw"], name="cw_node", value=w))
    a = net.bn(net.node("Conv", [x, "cw"], name="conv_a"), 4)
    b = net.node("Conv", [x, "cw"], name="conv_b")
    net.output(a, np.float32)
    net.output(b, np.float32)
    result = fold_and_check(net.build(), folded=1)
    g = result.model.graph
    assert next(n for n in g.node if n.name == "cw_node").attribute[0].t.SerializeToString() == w.SerializeToString()
    assert list(next(n for n in g.node if n.name == "conv_b").input) == [x, "cw"]
    assert next(n for n in g.node if n.name == "conv_a").input[1] != "cw"


def test_chain_stops_where_an_intermediate_bn_output_is_a_graph_output() -> None:
    net, y = conv_net()
    first = net.bn(y, 4, name="bn_a")
    net.output(net.bn(first, 4, name="bn_b"), np.float32)
    net.output(first, np.float32)
    result = fold_and_check(net.build(), folded=1, left=1)
    assert [(s.node, s.reason) for s in result.report.skips] == [("bn_b", Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT)]
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "BatchNormalization"]


@pytest.mark.parametrize("second_folds", [True, False])
def test_bn_parameters_shared_by_two_bns(second_folds: bool) -> None:
    """Exporters reuse one zeros/ones initializer for several BNs: it goes only when no BN reads it."""
    net = Net(opset=17, seed=6)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    params = net.bn_params(3)
    shared = [net.init(f"p{k}", v) for k, v in enumerate(params)]
    a = net.node("Conv", [x, net.weight((3, 3, 3, 3))], name="conv_a")
    a = net.node("BatchNormalization", [a, *shared], name="bn_a")
    b = net.node("Conv", [x, net.weight((3, 3, 3, 3))], name="conv_b") if second_folds else net.node("Relu", [x])
    b = net.node("BatchNormalization", [b, *shared], name="bn_b")
    net.output(a, np.float32)
    net.output(b, np.float32)
    result = fold_and_check(net.build(), folded=2 if second_folds else 1, left=0 if second_folds else 1)
    left = {t.name for t in result.model.graph.initializer} & set(shared)
    assert left == (set() if second_folds else set(shared))


# ---- odd models never crash the tool -------------------------------------------------

ODDITIES = [
    "none",
    "param_length",
    "param_2d",
    "param_int",
    "param_nan",
    "var_negative",
    "four_inputs",
    "weight_int",
    "weight_2d",
    "weight_scalar",
    "empty_bias_name",
    "no_shapes",
]


@settings(max_examples=60, deadline=None)
@given(
    producer=st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Add"]),
    oddity=st.sampled_from(ODDITIES),
    opset=st.sampled_from([7, 9, 14, 15, NEWEST_OPSET]),
)
def test_odd_models_never_crash(producer: str, oddity: str, opset: int) -> None:
    net = Net(opset=opset, seed=1)
    conv = producer.startswith("Conv")
    shape = [1, 3, 4, 4] if conv else [2, 3]
    x = net.input("x", np.float32, None if oddity == "no_shapes" else shape)
    c = 4
    if conv:
        wshape = (4, 3, 3, 3) if producer == "Conv" else (3, 4, 3, 3)
    else:
        wshape = (3, 4)
    w = np.ones(wshape, np.float32) * 0.1
    if oddity == "weight_int":
        w = w.astype(np.int64)
    elif oddity == "weight_2d":
        w = w.reshape(w.shape[0], -1)
    elif oddity == "weight_scalar":
        w = np.array(0.5, np.float32)
    ins = [x, net.init("w", w)]
    if oddity == "empty_bias_name":
        ins.append("")
    y = net.node(producer, ins if producer != "Relu" else [x])
    params = net.bn_params(c)
    if oddity == "param_length":
        params[2] = params[2][:3]
    elif oddity == "param_2d":
        params[0] = params[0].reshape(2, 2)
    elif oddity == "param_int":
        params[3] = params[3].astype(np.int32)
    elif oddity == "param_nan":
        params[1][0] = np.nan
    elif oddity == "var_negative":
        params[3][1] = -1.0
    z = net.bn(y, c, params=params)
    if oddity == "four_inputs":
        del net.nodes[-1].input[4]
    net.output(z, np.float32)
    model = net.build()
    result = bnfold.fold_model(model)  # must not raise
    rep = result.report
    assert rep.bn_count == 1 and rep.bn_folded + len(rep.skips) == 1
    if rep.bn_folded == 0:
        assert result.model.SerializeToString() == model.SerializeToString()
