"""Readers of a tensor's shape only (Shape, Size) do not block a fold that keeps the tensor's shape.

torch exports of LeViT-style ``Linear + BatchNorm1d`` on tokens read ``Shape`` of the
MatMul output to reshape the tokens back after the BN.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, op_count
from onnx import TensorProto, helper, numpy_helper

import bnfold


def _tokens_model(reader: str, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b, n, k, c = 2, 5, 4, 3
    inits = [
        numpy_helper.from_array(rng.standard_normal((k, c)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "be"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Flatten", ["mm"], ["flat"], name="flat", axis=2),
        helper.make_node("BatchNormalization", ["flat", "g", "be", "m", "v"], ["bn"], name="bn"),
    ]
    if reader == "Shape":
        nodes += [helper.make_node("Shape", ["mm"], ["shape"], name="shape")]
    else:  # another reader of the values: the fold must be refused
        nodes += [
            helper.make_node("Relu", ["mm"], ["seen"], name="relu"),
            helper.make_node("Shape", ["seen"], ["shape"], name="shape"),
        ]
    nodes.append(helper.make_node("Reshape", ["bn", "shape"], ["y"], name="back"))
    g = helper.make_graph(
        nodes,
        "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, n, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, n, c])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_reader_does_not_block_the_fold() -> None:
    model = _tokens_model("Shape")
    result = bnfold.fold_model(model)
    assert result.report.bn_folded == 1
    assert op_count(result.model, "BatchNormalization") == 0
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("reader", ["Relu"])
def test_value_reader_still_blocks_the_fold(reader: str) -> None:
    model = _tokens_model(reader)
    result = bnfold.fold_model(model)
    assert result.report.bn_folded == 0
    assert [s.reason for s in result.report.skips] == ["producer_output_shared"]
