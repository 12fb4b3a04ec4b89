"""Small seeded models for the verification tests (built here, independent of bnfold)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def bn_params(rng: np.random.Generator, prefix: str, c: int, dtype=np.float32) -> list[onnx.TensorProto]:
    vals = {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0, 0.3, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.5, 2.0, c),
    }
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}.{k}") for k, v in vals.items()]


def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    ins = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=1e-5)


def weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype), name)


def model(graph: onnx.GraphProto, opset: int = 17, ir: int = 8, extra_opsets=()) -> onnx.ModelProto:
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], producer_name="bnfold-tests"
    )
    m.ir_version = ir
    return m


def conv_chain(
    channels: tuple[int, ...] = (3, 8, 8, 4),
    seed: int = 0,
    dtype=np.float32,
    dims: list | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """Conv(3x3, pad 1)+BN+Relu blocks: conv{i} -> bn{i} -> relu{i}; last block has no Relu.

    ``channels`` lists the channel counts: block i maps channels[i] -> channels[i+1].
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    x = "input"
    n = len(channels) - 1
    for i in range(n):
        cin, cout = channels[i], channels[i + 1]
        inits.append(weight(rng, f"conv{i}.weight", (cout, cin, 3, 3), dtype))
        inits += bn_params(rng, f"bn{i}", cout, dtype)
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        last = i == n - 1
        nodes.append(bn(f"bn{i}", f"c{i}", "output" if last else f"b{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    dims = dims or ["N", channels[0], 8, 8]
    g = helper.make_graph(
        nodes,
        "conv_chain",
        [helper.make_tensor_value_info("input", elem, dims)],
        [helper.make_tensor_value_info("output", elem, [dims[0], channels[-1], dims[2], dims[3]])],
        inits,
    )
    return model(g, opset=opset, ir=10 if opset >= 21 else 8)


def two_outputs(seed: int = 0) -> onnx.ModelProto:
    """Two graph outputs: ``image`` (Conv+BN) and ``vector`` (Gemm+BN on a second input)."""
    rng = np.random.default_rng(seed)
    inits = [weight(rng, "conv.weight", (4, 3, 3, 3)), weight(rng, "fc.weight", (6, 5))]
    inits += bn_params(rng, "bn_img", 4) + bn_params(rng, "bn_vec", 6)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn("bn_img", "c", "image"),
        helper.make_node("Gemm", ["v", "fc.weight"], ["f"], name="fc", transB=1),
        bn("bn_vec", "f", "vector"),
    ]
    g = helper.make_graph(
        nodes,
        "two_outputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 5]),
        ],
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 6, 6]),
            helper.make_tensor_value_info("vector", TensorProto.FLOAT, ["N", 6]),
        ],
        inits,
    )
    return model(g)


def int_bool_model(seed: int = 0, vocab: int = 10) -> onnx.ModelProto:
    """Float, int64 and bool inputs; float, int64 and bool outputs.

    ``x[N,4,5,5]`` -> Conv+BN -> Where(mask, y, 0) -> ``masked``;
    ``ids[N,3]`` (int64, < vocab) -> Gather(table) -> ``embedded``;
    ``masked`` -> ArgMax(axis 1) -> ``argmax`` (int64); Not(mask) -> ``inverse`` (bool).
    """
    rng = np.random.default_rng(seed)
    inits = [
        weight(rng, "conv.weight", (4, 4, 3, 3)),
        numpy_helper.from_array(rng.standard_normal((vocab, 2)).astype(np.float32), "table"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    inits += bn_params(rng, "bn", 4)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn("bn", "c", "y"),
        helper.make_node("Where", ["mask", "y", "zero"], ["masked"], name="where"),
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="gather", axis=0),
        helper.make_node("ArgMax", ["masked"], ["argmax"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Not", ["mask"], ["inverse"], name="not"),
    ]
    g = helper.make_graph(
        nodes,
        "int_bool",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 4, 5, 5]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["N", 4, 5, 5]),
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["N", 3, 2]),
            helper.make_tensor_value_info("argmax", TensorProto.INT64, ["N", 5, 5]),
            helper.make_tensor_value_info("inverse", TensorProto.BOOL, ["N", 4, 5, 5]),
        ],
        inits,
    )
    return model(g)


def custom_op_model() -> onnx.ModelProto:
    """Conv+BN followed by an op of a domain onnxruntime does not know."""
    rng = np.random.default_rng(0)
    inits = [weight(rng, "conv.weight", (4, 3, 1, 1)), *bn_params(rng, "bn", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv"),
        bn("bn", "c", "b"),
        helper.make_node("Frobnicate", ["b"], ["y"], name="frob", domain="com.example"),
    ]
    g = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        inits,
    )
    return model(g, extra_opsets=[helper.make_opsetid("com.example", 1)])


def steep_head(offset: float = 2e4, k: float = 5.0, seed: int = 1) -> onnx.ModelProto:
    """The rounding-amplifying model of ``scripts/measure_tolerances.py`` (one builder for both), 1x8x16x16.

    A correct fold moves the outputs by a few 1e-3 here: float32 rounding of values near
    ``offset`` moves from the BN's subtraction into the folded bias, then the steep
    sigmoid amplifies it (how a text detector's binarization head behaves).
    """
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "measure_tolerances.py")
    spec = importlib.util.spec_from_file_location("measure_tolerances", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.steep_head(offset, k, seed, batch=1, size=16)


def scale_channel(m: onnx.ModelProto, init_name: str, channel: int, factor: float) -> onnx.ModelProto:
    """Copy of ``m`` with output channel ``channel`` of initializer ``init_name`` scaled (a hand-made wrong fold)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name == init_name:
            a = numpy_helper.to_array(t).copy()
            a[channel] *= factor
            t.CopyFrom(numpy_helper.from_array(a, init_name))
            return out
    raise KeyError(init_name)
