"""Small model builders and checks shared by the affine-chain and BN-before-Conv tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from helpers import assert_same_outputs
from onnx import TensorProto, helper, numpy_helper

import bnfold

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    """An initializer from a numpy array (dtype kept)."""
    return numpy_helper.from_array(np.asarray(value), name)


def bn_params(rng: np.random.Generator, prefix: str, c: int, dtype=np.float32) -> list[onnx.TensorProto]:
    """Trained-looking BatchNormalization parameters ``prefix.{scale,bias,mean,var}``."""
    vals = {
        "scale": rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c),
        "bias": rng.normal(0.0, 0.3, c),
        "mean": rng.normal(0.0, 0.5, c),
        "var": rng.uniform(0.2, 2.0, c),
    }
    return [init(f"{prefix}.{k}", v.astype(dtype)) for k, v in vals.items()]


def bn_node(prefix: str, x: str, y: str, eps: float = 1e-5, **attrs) -> onnx.NodeProto:
    """A BatchNormalization reading the ``bn_params`` of ``prefix``."""
    ins = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=eps, **attrs)


def he_weight(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype=np.float32) -> np.ndarray:
    """Normal weights scaled by ``1/sqrt(fan_in)`` (keeps activations O(1))."""
    return (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(dtype)


def make_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[tuple[str, int, list]],
    outputs: list[str],
    opset: int = 17,
    out_type: int = F32,
) -> onnx.ModelProto:
    """A checked model; output shapes come from onnx shape inference."""
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, out_type, None) for n in outputs],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-tests")
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    types = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    for k, n in enumerate(outputs):
        m.graph.output[k].CopyFrom(types[n])
    onnx.checker.check_model(m, full_check=True)
    return m


def fold_checked(
    model: onnx.ModelProto, atol: float = 1e-5, rtol: float = 1e-4, compare: bool = True
) -> bnfold.FoldResult:
    """Fold, check the result with the full checker, and compare outputs in onnxruntime."""
    before = model.SerializeToString()
    result = bnfold.fold_model(model)
    assert model.SerializeToString() == before, "fold_model must not modify its input"
    onnx.checker.check_model(result.model, full_check=True)
    if compare:
        assert_same_outputs(model, result.model, atol=atol, rtol=rtol)
    return result


def ops(model: onnx.ModelProto) -> Counter:
    """Op type counts of the main graph."""
    return Counter(n.op_type for n in model.graph.node)


def patterns(result: bnfold.FoldResult) -> Counter:
    """Pattern names of the folds in a result."""
    return Counter(f.pattern for f in result.report.folds)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Value of one initializer by name."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def consumer_of(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    """The single node of ``op_type`` in the main graph."""
    found = [n for n in model.graph.node if n.op_type == op_type]
    assert len(found) == 1, f"{len(found)} {op_type} nodes"
    return found[0]
