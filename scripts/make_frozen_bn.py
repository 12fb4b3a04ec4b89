"""Build a seeded FrozenBatchNorm-style ResNet stage into ``models/frozen_bn_stage.onnx``.

torchvision's and detectron2's ``FrozenBatchNorm2d`` compute
``x * scale + bias`` with ``scale = weight * rsqrt(running_var + eps)`` and
``bias = bias - running_mean * scale`` reshaped to ``[1, C, 1, 1]``, so their
ONNX exports hold ``Conv -> Mul([1,C,1,1]) -> Add([1,C,1,1])`` where a plain
export would hold ``Conv -> BatchNormalization``.  This model is a stem
(Conv 7x7/2 + frozen BN + Relu + MaxPool) and one ResNet-50-style stage of three
bottleneck blocks (1x1, 3x3, 1x1 Convs each with a frozen BN, residual Add,
Relu), the first with stride 2 and a 1x1 downsample branch (Conv + frozen BN).

The scale/shift constants come in the three forms exporters produce: plain
initializers (stem, block 1), ``Constant`` nodes (block 2), and a ``Reshape`` of a
``[C]`` initializer to ``[1, -1, 1, 1]`` (block 3, as when the exporter keeps the
``reshape``).

python scripts/make_frozen_bn.py [--out models]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SEED = 2024
NAME = "frozen_bn_stage.onnx"
EPS = 1e-5


class _Builder:
    """Collects nodes and initializers of the stage."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        """A bias-free Conv (as before a BN), He-initialized."""
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        self.inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.weight"))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [f"{name}.out"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return f"{name}.out"

    def frozen_bn(self, name: str, x: str, c: int, form: str) -> str:
        """``x * scale + bias`` with FrozenBatchNorm2d's constants in the given ``form``."""
        gamma = self.rng.uniform(0.5, 1.5, c)
        beta = self.rng.normal(0.0, 0.2, c)
        mean = self.rng.normal(0.0, 0.5, c)
        var = self.rng.uniform(0.5, 2.0, c)
        scale = (gamma / np.sqrt(var + EPS)).astype(np.float32)
        bias = (beta - mean * scale).astype(np.float32)
        names = []
        for kind, v in (("scale", scale), ("bias", bias)):
            const = f"{name}.{kind}"
            if form == "initializer":
                self.inits.append(numpy_helper.from_array(v.reshape(1, c, 1, 1), const))
            elif form == "constant":
                tensor = numpy_helper.from_array(v.reshape(1, c, 1, 1), const)
                self.nodes.append(helper.make_node("Constant", [], [const], name=f"{const}.const", value=tensor))
            elif form == "reshape":
                self.inits.append(numpy_helper.from_array(v, f"{const}.vec"))
                self.nodes.append(
                    helper.make_node("Reshape", [f"{const}.vec", "frozen_bn.shape"], [const], name=f"{const}.reshape")
                )
            else:
                raise ValueError(form)
            names.append(const)
        self.nodes.append(helper.make_node("Mul", [x, names[0]], [f"{name}.mul"], name=f"{name}.mul"))
        self.nodes.append(helper.make_node("Add", [f"{name}.mul", names[1]], [f"{name}.out"], name=f"{name}.add"))
        return f"{name}.out"

    def relu(self, name: str, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    def bottleneck(self, name: str, x: str, cin: int, width: int, stride: int, form: str) -> str:
        """torchvision Bottleneck (stride on the 3x3 conv), downsample when the shape changes."""
        cout = 4 * width
        h = self.relu(
            f"{name}.relu1", self.frozen_bn(f"{name}.bn1", self.conv(f"{name}.conv1", x, cin, width, 1), width, form)
        )
        h = self.relu(
            f"{name}.relu2",
            self.frozen_bn(f"{name}.bn2", self.conv(f"{name}.conv2", h, width, width, 3, stride), width, form),
        )
        h = self.frozen_bn(f"{name}.bn3", self.conv(f"{name}.conv3", h, width, cout, 1), cout, form)
        identity = x
        if stride != 1 or cin != cout:
            ds = self.conv(f"{name}.downsample.0", x, cin, cout, 1, stride)
            identity = self.frozen_bn(f"{name}.downsample.1", ds, cout, form)
        self.nodes.append(helper.make_node("Add", [h, identity], [f"{name}.sum"], name=f"{name}.residual"))
        return self.relu(f"{name}.relu3", f"{name}.sum")


def frozen_bn_stage(rng: np.random.Generator) -> onnx.ModelProto:
    """Stem + three bottleneck blocks (first strided, with downsample), FrozenBN as Mul/Add."""
    b = _Builder(rng)
    b.inits.append(numpy_helper.from_array(np.array([1, -1, 1, 1], dtype=np.int64), "frozen_bn.shape"))
    x = b.relu("stem.relu", b.frozen_bn("stem.bn", b.conv("stem.conv", "input", 3, 16, 7, 2), 16, "initializer"))
    b.nodes.append(
        helper.make_node(
            "MaxPool", [x], ["stem.pool"], name="stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    x = b.bottleneck("layer1.0", "stem.pool", 16, 8, 2, "initializer")
    x = b.bottleneck("layer1.1", x, 32, 8, 1, "constant")
    b.bottleneck("layer1.2", x, 32, 8, 1, "reshape")
    b.nodes[-1].output[0] = "output"  # the last Relu makes the graph output
    g = helper.make_graph(
        b.nodes,
        "frozen_bn_stage",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 32, 8, 8])],
        b.inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-samples")
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def build(out: str) -> str:
    """Write the model into folder ``out``; return its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, NAME)
    onnx.save(frozen_bn_stage(np.random.default_rng(SEED)), path)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models"))
    p = build(ap.parse_args().out)
    print(p, os.path.getsize(p))
