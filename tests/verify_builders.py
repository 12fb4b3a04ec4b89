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


# ---------------------------------------------------------------------------
# Ill-conditioned nets and softmax classifiers (verification calibrated to rounding noise)
# ---------------------------------------------------------------------------


class _Net:
    """A tiny graph builder: Conv/BN/activations with seeded weights and unique names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0

    def _name(self, kind: str) -> str:
        self.k += 1
        return f"{kind}{self.k}"

    def conv(
        self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = False, offset=0.0
    ) -> str:
        """Conv (pad k//2); ``offset`` is added to its bias (values the next BN subtracts again)."""
        name = self._name("conv")
        self.inits.append(weight(self.rng, f"{name}.weight", (cout, cin // group, k, k)))
        ins = [x, f"{name}.weight"]
        if bias or offset:
            b = self.rng.normal(0, 0.1, cout) + offset
            self.inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.bias"))
            ins.append(f"{name}.bias")
        p = k // 2
        self.nodes.append(
            helper.make_node("Conv", ins, [name], name=name, pads=[p] * 4, strides=[stride] * 2, group=group)
        )
        return name

    def bn(self, x: str, c: int) -> str:
        name = self._name("bn")
        self.inits += bn_params(self.rng, name, c)
        self.nodes.append(bn(name, x, name))
        return name

    def op(self, op_type: str, *ins: str, **attrs) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(ins), [name], name=name, **attrs))
        return name

    def const(self, value: np.ndarray) -> str:
        name = self._name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def gemm(self, x: str, k: int, n: int, scale: float = 1.0) -> str:
        name = self._name("fc")
        self.inits.append(
            numpy_helper.from_array(
                (self.rng.standard_normal((n, k)) * scale / np.sqrt(k)).astype(np.float32), f"{name}.weight"
            )
        )
        self.inits.append(
            numpy_helper.from_array(self.rng.normal(0, 0.01 * scale, n).astype(np.float32), f"{name}.bias")
        )
        self.nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [name], name=name, transB=1))
        return name

    def build(self, title: str, x_dims: list, y: str, y_dims: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        for n in self.nodes:  # the last node now writes "y"
            for i, v in enumerate(n.input):
                if v == y:
                    n.input[i] = "y"
        g = helper.make_graph(
            self.nodes,
            title,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)],
            self.inits,
        )
        return model(g)


def small_batch_stats(m: onnx.ModelProto, shape: tuple[int, ...], batch: int = 4, seed: int = 7) -> onnx.ModelProto:
    """Copy of ``m`` whose BN statistics are the mean and variance of each BN's input over one
    small batch of N(0, 1) inputs (BN after BN, in graph order): how a net trained or calibrated
    on a few images ends up with near-zero variances on ``[N, C, 1, 1]`` and 2x2 tensors."""
    import onnxruntime as ort

    out = onnx.ModelProto()
    out.CopyFrom(m)
    x = np.random.default_rng(seed).standard_normal((batch, *shape[1:])).astype(np.float32)
    inits = {t.name: t for t in out.graph.initializer}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for node in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(out)
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        a = sess.run([node.input[0]], {"x": x})[0].astype(np.float64)
        axes = (0, *range(2, a.ndim))
        for key, v in ((node.input[3], a.mean(axis=axes)), (node.input[4], a.var(axis=axes))):
            inits[key].CopyFrom(numpy_helper.from_array(v.astype(np.float32), key))
    return out


def se_tiny_var(seed: int = 0, c: int = 16, size: int = 32) -> onnx.ModelProto:
    """rexnet-like: Conv+BN+Relu trunk with a squeeze-excite branch whose BNs sit on ``[N,C,1,1]``;
    statistics from a batch of 4, so the squeeze-excite BN variances are tiny."""
    net = _Net(seed)
    t = net.op("Relu", net.bn(net.conv("x", 3, c), c))
    for _ in range(2):
        s = net.op("GlobalAveragePool", t)
        s = net.op("Relu", net.bn(net.conv(s, c, c // 4, k=1, offset=10.0), c // 4))
        s = net.op("Sigmoid", net.bn(net.conv(s, c // 4, c, k=1, offset=10.0), c))
        t = net.op("Relu", net.bn(net.conv(net.op("Mul", t, s), c, c), c))
    y = net.conv(t, c, 4, k=1)
    m = net.build("se_tiny_var", ["N", 3, size, size], y, ["N", 4, size, size])
    return small_batch_stats(m, (1, 3, size, size))


def steep_sigmoid_head(seed: int = 0, size: int = 16) -> onnx.ModelProto:
    """A detector-like head: Conv+BN+Relu, then Conv+BN with small-batch statistics scaled by 4
    before a Sigmoid; the head Conv's outputs sit near 1000, which its BN subtracts again
    (a differentiable-binarization head: float32 holds 1000 to ~6e-5, then BN divides by a small std)."""
    net = _Net(seed)
    t = net.op("Relu", net.bn(net.conv("x", 3, 8), 8))
    t = net.op("Relu", net.bn(net.conv(t, 8, 8), 8))
    h = net.bn(net.conv(t, 8, 1, offset=1000.0), 1)
    y = net.op("Sigmoid", net.op("Mul", h, net.const(np.float32(4.0))))
    m = net.build("steep_sigmoid_head", ["N", 3, size, size], y, ["N", 1, size, size])
    return small_batch_stats(m, (1, 3, size, size))


def deep_chain(seed: int = 0, depth: int = 32, c: int = 8) -> onnx.ModelProto:
    """``depth`` Conv+BN+Relu blocks with small-batch statistics (rounding compounds over depth)."""
    net = _Net(seed)
    t, cin = "x", 3
    for _ in range(depth):
        t = net.op("Relu", net.bn(net.conv(t, cin, c), c))
        cin = c
    y = net.bn(net.conv(t, c, 4), 4)
    m = net.build("deep_chain", ["N", 3, 8, 8], y, ["N", 4, 8, 8])
    return small_batch_stats(m, (1, 3, 8, 8))


def bn_on_2x2(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """inception-like branches on 2x2 maps (stride-2 Convs down from 16x16), BN statistics from a
    batch of 2: each BN sees 8 values per channel, so variances are small and uneven."""
    net = _Net(seed)
    t = net.op("Relu", net.bn(net.conv("x", 3, c, stride=2), c))
    t = net.op("Relu", net.bn(net.conv(t, c, c, stride=2), c))
    t = net.op("Relu", net.bn(net.conv(t, c, c, stride=2), c))  # 2x2
    a = net.op("Relu", net.bn(net.conv(t, c, c, k=1, offset=300.0), c))
    b = net.op("Relu", net.bn(net.conv(net.op("Relu", net.bn(net.conv(t, c, c, k=1, offset=300.0), c)), c, c), c))
    t = net.op("Concat", a, b, axis=1)
    t = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", net.bn(net.conv(t, 2 * c, c, k=1), c))))
    y = net.gemm(t, c, 10)
    m = net.build("bn_on_2x2", ["N", 3, 16, 16], y, ["N", 10])
    return small_batch_stats(m, (1, 3, 16, 16), batch=2)


def se_depthwise(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """Depthwise-separable blocks with residuals and squeeze-excite, small-batch statistics and
    a Sigmoid output (several ill-conditioned paths at once)."""
    net = _Net(seed)
    t = net.op("Relu", net.bn(net.conv("x", 3, c), c))
    for _ in range(3):
        d = net.op("Relu", net.bn(net.conv(t, c, c, group=c), c))
        s = net.op("GlobalAveragePool", d)
        s = net.op(
            "Sigmoid", net.bn(net.conv(net.op("Relu", net.conv(s, c, 4, k=1, bias=True)), 4, c, k=1, bias=True), c)
        )
        t = net.op("Add", t, net.bn(net.conv(net.op("Mul", d, s), c, c, k=1), c))
    y = net.op("Sigmoid", net.bn(net.conv(t, c, 2, k=1), 2))
    m = net.build("se_depthwise", ["N", 3, 32, 32], y, ["N", 2, 32, 32])
    return small_batch_stats(m, (1, 3, 32, 32))


ILL_CONDITIONED = {
    "se_tiny_var": se_tiny_var,
    "steep_sigmoid_head": steep_sigmoid_head,
    "deep_chain": deep_chain,
    "bn_on_2x2": bn_on_2x2,
    "se_depthwise": se_depthwise,
}


def softmax_classifier(seed: int = 0, classes: int = 200, c: int = 16, depthwise: bool = False) -> onnx.ModelProto:
    """Conv+BN+Relu stages, global pooling, Gemm and Softmax over ``classes`` with near-uniform
    logits: the outputs peak near 1/classes (~0.005), as a Keras MobileNetV2 fed noise does.
    ``depthwise`` builds MobileNetV2-like depthwise-separable stages with Clip(0, 6)."""
    net = _Net(seed)
    t = net.op("Relu", net.bn(net.conv("x", 3, c, stride=2), c))
    for _ in range(3):
        if depthwise:
            d = net.op(
                "Clip", net.bn(net.conv(t, c, c, group=c), c), net.const(np.float32(0)), net.const(np.float32(6))
            )
            t = net.op("Add", t, net.bn(net.conv(d, c, c, k=1), c))
        else:
            t = net.op("Relu", net.bn(net.conv(t, c, c), c))
    t = net.op("Flatten", net.op("GlobalAveragePool", t))
    y = net.op("Softmax", net.gemm(t, c, classes, scale=0.5), axis=1)
    return net.build("softmax_classifier", ["N", 3, 32, 32], y, ["N", classes])
