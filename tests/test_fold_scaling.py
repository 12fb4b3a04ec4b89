"""Hostile graph shapes for the fold core: deep chains, wide fan-out, value_info that lies.

No timing here (speed is measured by scripts only); these assert that deep graphs
fold without recursion limits and that declared shapes are never trusted over
what the fold can derive.
"""

from __future__ import annotations

import numpy as np
import onnx
from affine_builders import F32, bn_node, bn_params, fold_checked, he_weight, init, make_model
from onnx import helper

import bnfold
from bnfold import Reason


def test_bn_scale_made_by_3000_identity_nodes_folds() -> None:
    rng = np.random.default_rng(0)
    inits = [init("w", he_weight(rng, (4, 3, 3, 3), 27)), *bn_params(rng, "bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["p"], name="conv")]
    src = "bn.scale"
    for k in range(3000):
        nodes.append(helper.make_node("Identity", [src], [f"id{k}"], name=f"id{k}"))
        src = f"id{k}"
    bn = bn_node("bn", "p", "y")
    bn.input[1] = src
    nodes.append(bn)
    model = make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"])
    result = fold_checked(model)
    assert result.report.bn_folded == 1
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]  # the dead Identity chain goes too


def test_long_mul_chain_of_unknown_rank_is_left_with_its_reason() -> None:
    n = 5000
    inits = [init("k", np.array([2.0, 0.5], np.float32))]
    nodes = [helper.make_node("Relu", ["x"], ["m0"], name="relu")]
    for k in range(n):
        nodes.append(helper.make_node("Mul", [f"m{k}", "k"], [f"m{k + 1}"], name=f"mul{k}"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, None)],
                          [helper.make_tensor_value_info(f"m{n}", F32, None)], inits)  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert result.report.folds == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_conv_output_read_by_many_muls() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    inits = [init("w", he_weight(rng, (4, 3, 3, 3), 27)), init("k", rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["p"], name="conv")]
    nodes += [helper.make_node("Mul", ["p", "k"], [f"y{i}"], name=f"mul{i}") for i in range(n)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(n)], ["y"], name="sum"))
    model = make_model(nodes, inits, [("x", F32, [1, 3, 6, 6])], ["y"])
    result = bnfold.fold_model(model)
    assert result.report.folds == []
    assert {s.reason for s in result.report.affine_skips} == {Reason.PRODUCER_OUTPUT_SHARED}
    assert len(result.report.affine_skips) == n


def _lying_model() -> onnx.ModelProto:
    """Conv [1,4,4,4] -> Mul by a [4] constant (it runs along W), with value_info claiming the Conv output is [1, 4].

    Trusting the claim, the constant would look per-channel and fold into the Conv: wrong outputs.
    """
    rng = np.random.default_rng(2)
    inits = [init("w", he_weight(rng, (4, 3, 3, 3), 27)), init("k", rng.uniform(0.5, 2, 4).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["p"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["p", "k"], ["y"], name="mul"),
    ]
    model = make_model(nodes, inits, [("x", F32, [1, 3, 4, 4])], ["y"])
    model.graph.value_info.append(helper.make_tensor_value_info("p", F32, [1, 4]))  # a lie: [1, 4, 4, 4]
    return model


def test_value_info_that_lies_about_a_rank_is_not_trusted() -> None:
    model = _lying_model()
    result = bnfold.fold_model(model)
    assert result.report.folds == []
    assert [s.reason for s in result.report.affine_skips] == [Reason.NOT_PER_CHANNEL]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_declared_output_shape_that_lies_is_not_trusted() -> None:
    """Relu output r is a graph output declared [1, 4] (really [1, 4, 4, 4]); Mul(r, [4]) runs along W."""
    rng = np.random.default_rng(3)
    inits = [init("k", rng.uniform(0.5, 2, 4).astype(np.float32)), init("w", he_weight(rng, (2, 4, 1, 1), 4))]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
        helper.make_node("Conv", ["m", "w"], ["y"], name="conv"),
    ]
    model = make_model(nodes, inits, [("x", F32, [1, 4, 4, 4])], ["y", "r"])
    model.graph.output[1].CopyFrom(helper.make_tensor_value_info("r", F32, [1, 4]))  # a lie
    result = bnfold.fold_model(model)
    assert result.report.folds == []
    assert result.model.SerializeToString() == model.SerializeToString()


def test_long_affine_chain_before_an_unpadded_conv_folds_completely() -> None:
    """Each consumer fold retries the op before it in the same pass: 200 ops, far more than the pass limit."""
    rng = np.random.default_rng(4)
    n = 200
    inits = [init("w", he_weight(rng, (2, 3, 1, 1), 3))]
    nodes = [helper.make_node("Relu", ["x"], ["a0"], name="relu")]
    for k in range(n):
        op = "Mul" if k % 2 else "Add"
        v = rng.uniform(0.9, 1.1, (3, 1, 1)) if op == "Mul" else rng.normal(0, 0.1, (3, 1, 1))
        inits.append(init(f"k{k}", v.astype(np.float32)))
        nodes.append(helper.make_node(op, [f"a{k}", f"k{k}"], [f"a{k + 1}"], name=f"op{k}"))
    nodes.append(helper.make_node("Conv", [f"a{n}", "w"], ["y"], name="conv"))
    result = fold_checked(make_model(nodes, inits, [("x", F32, [1, 3, 4, 4])], ["y"]))
    assert len(result.report.folds) == n
    assert [node.op_type for node in result.model.graph.node] == ["Relu", "Conv"]
