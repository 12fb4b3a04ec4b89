"""Build the small, seeded sample models in ``models/`` (committed; the README uses them).

python scripts/make_models.py [--out models]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _bn_params(rng: np.random.Generator, prefix: str, c: int) -> list[onnx.TensorProto]:
    """Trained-looking BN parameters: gamma ~ 1, beta ~ 0, running stats off zero."""
    vals = {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0, 0.1, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.5, 2.0, c),
    }
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in vals.items()]


def _bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"],
        [y],
        name=prefix,
        epsilon=1e-5,
    )


def _w(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-samples")
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def resnet_block(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv+BN+ReLU, Conv+BN, residual Add, ReLU (a ResNet basic block), then a 1x1 Conv+BN head."""
    c = 16
    inits = [
        _w(rng, "conv1.weight", (c, c, 3, 3)),
        _w(rng, "conv2.weight", (c, c, 3, 3)),
        _w(rng, "head.weight", (8, c, 1, 1)),
    ]
    inits += _bn_params(rng, "bn1", c) + _bn_params(rng, "bn2", c) + _bn_params(rng, "head_bn", 8)
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        _bn("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        _bn("bn2", "c2", "b2"),
        helper.make_node("Add", ["b2", "input"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "head.weight"], ["c3"], name="head"),
        _bn("head_bn", "c3", "output"),
    ]
    g = helper.make_graph(
        nodes,
        "resnet_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 8, 32, 32])],
        inits,
    )
    return _model(g)


def convtranspose_decoder(rng: np.random.Generator) -> onnx.ModelProto:
    """Upsampling decoder: ConvTranspose (Cin != Cout) + BN + ReLU, grouped ConvTranspose + BN."""
    cin, cmid, cout, g2 = 24, 12, 8, 4
    inits = [
        _w(rng, "up1.weight", (cin, cmid, 4, 4)),
        numpy_helper.from_array(rng.normal(0, 0.1, cmid).astype(np.float32), "up1.bias"),
        _w(rng, "up2.weight", (cmid, cout // g2, 3, 3)),
    ]
    inits += _bn_params(rng, "bn1", cmid) + _bn_params(rng, "bn2", cout)
    nodes = [
        helper.make_node(
            "ConvTranspose", ["input", "up1.weight", "up1.bias"], ["u1"], name="up1", strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        _bn("bn1", "u1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node(
            "ConvTranspose",
            ["r1", "up2.weight"],
            ["u2"],
            name="up2",
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            output_padding=[1, 1],
            group=g2,
        ),
        _bn("bn2", "u2", "output"),
    ]
    g = helper.make_graph(
        nodes,
        "convtranspose_decoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", cin, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", cout, 32, 32])],
        inits,
    )
    return _model(g)


def mlp_bn(rng: np.random.Generator) -> onnx.ModelProto:
    """Linear+BatchNorm1d as Gemm (transB=1, as PyTorch exports) and as MatMul+Add, and a bias-free MatMul."""
    k, h1, h2, n = 32, 64, 48, 10
    inits = [
        _w(rng, "fc1.weight", (h1, k)),
        numpy_helper.from_array(rng.normal(0, 0.1, h1).astype(np.float32), "fc1.bias"),
        _w(rng, "fc2.weight_t", (h1, h2)),
        numpy_helper.from_array(rng.normal(0, 0.1, h2).astype(np.float32), "fc2.bias"),
        _w(rng, "fc3.weight_t", (h2, n)),
    ]
    inits += _bn_params(rng, "bn1", h1) + _bn_params(rng, "bn2", h2) + _bn_params(rng, "bn3", n)
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["f1"], name="fc1", transB=1),
        _bn("bn1", "f1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "fc2.weight_t"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "fc2.bias"], ["f2"], name="fc2_bias"),
        _bn("bn2", "f2", "b2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "fc3.weight_t"], ["f3"], name="fc3"),
        _bn("bn3", "f3", "output"),
    ]
    g = helper.make_graph(
        nodes,
        "mlp_bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", n])],
        inits,
    )
    return _model(g)


MODELS = {
    "resnet_block.onnx": resnet_block,
    "convtranspose_decoder.onnx": convtranspose_decoder,
    "mlp_bn.onnx": mlp_bn,
}


def build_all(out: str) -> list[str]:
    """Write every sample model into ``out``; return their paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, (name, make) in enumerate(MODELS.items()):
        path = os.path.join(out, name)
        onnx.save(make(np.random.default_rng(1000 + i)), path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models"))
    for p in build_all(ap.parse_args().out):
        print(p, os.path.getsize(p))
