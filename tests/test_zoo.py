"""The onnx light model zoo (shipped in the onnx wheel) folds and still computes the same.

The shipped models make every weight with ConstantOfShape (all 0.02), so their
Softmax output is uniform and every BN channel is alike.  Each model is checked
twice: as shipped, with mid-network tensors (BN outputs and the Softmax input)
exposed as extra graph outputs, and with every constant replaced by seeded
random values (in ``Constant`` nodes), so that a fold on a wrong axis shows.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from builders import LIGHT_ZOO, count_ops
from foldcheck import fold_and_check
from onnx import helper, numpy_helper

ZOO = ["resnet50", "densenet121", "inception_v2", "shufflenet"]


def load(name: str) -> onnx.ModelProto:
    path = os.path.join(LIGHT_ZOO, f"light_{name}.onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in this onnx wheel")
    return onnx.load(path)


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Copy of ``model`` with tensors ``names`` added as graph outputs (shapes from inference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(out)
    known = {v.name: v for v in inferred.graph.value_info}
    for n in names:
        out.graph.output.append(known[n])
    return out


def mid_tensors(model: onnx.ModelProto) -> list[str]:
    """Outputs of the first, a middle and the last BN, and the Softmax input when there is one."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    names = [bns[0].output[0], bns[len(bns) // 2].output[0], bns[-1].output[0]]
    names += [n.input[0] for n in model.graph.node if n.op_type == "Softmax"]
    return names


def randomize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace every ConstantOfShape weight by a Constant node of seeded random values fit for its use."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n, k))

    def role(name: str) -> tuple[str, int]:
        node, k = readers[name][0]
        if node.op_type == "Unsqueeze":  # a per-channel scale or shift vector on its way to Mul/Add
            return readers[node.output[0]][0][0].op_type, 1
        return node.op_type, k

    def draw(shape: tuple[int, ...], what: tuple[str, int]) -> np.ndarray:
        op, k = what
        if op in ("Conv", "Gemm") and k == 1:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[0] if len(shape) == 2 else 1
            v = rng.standard_normal(shape) * np.sqrt(1.0 / max(fan_in, 1))
        elif (op, k) in (("BatchNormalization", 1), ("Mul", 1)):
            v = rng.uniform(0.5, 1.5, shape)
        elif (op, k) == ("BatchNormalization", 4):
            v = rng.uniform(0.5, 2.0, shape)
        else:
            v = rng.standard_normal(shape) * 0.2
        return v.astype(np.float32)

    for i, n in enumerate(g.node):
        if n.op_type == "ConstantOfShape":
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
            value = numpy_helper.from_array(draw(shape, role(n.output[0])), n.output[0])
            g.node[i].CopyFrom(helper.make_node("Constant", [], [n.output[0]], name=n.name, value=value))
    for n in g.node:
        if n.op_type == "BatchNormalization":
            for k in range(1, 5):
                t = inits.get(n.input[k])
                if t is not None:
                    t.CopyFrom(numpy_helper.from_array(draw(tuple(t.dims), ("BatchNormalization", k)), t.name))
    # drop the shape initializers nothing reads any more (IR 3: with their input entries)
    read = {i for n in g.node for i in n.input}
    dead = {t.name for t in g.initializer if t.name not in read}
    keep_inits = [t for t in g.initializer if t.name not in dead]
    keep_inputs = [v for v in g.input if v.name not in dead]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    del g.input[:]
    g.input.extend(keep_inputs)
    return out


@pytest.mark.parametrize("name", ZOO)
def test_light_zoo_as_shipped(name: str) -> None:
    model = load(name)
    exposed = expose(model, mid_tensors(model))
    n_bn = count_ops(model.graph, "BatchNormalization")
    # As shipped, mid-network tensors reach 1e2 to 1e18 (all weights 0.02): atol scales with them.
    result = fold_and_check(exposed, left=expected_left(exposed), scale_atol=True)
    assert result.report.bn_folded + len(result.report.skips) == n_bn
    assert result.report.bn_folded >= 1
    assert count_ops(result.model.graph, "ConstantOfShape") < count_ops(model.graph, "ConstantOfShape")
    assert result.model.ir_version == model.ir_version == 3
    listed = {i.name for i in result.model.graph.input}
    assert {t.name for t in result.model.graph.initializer} <= listed


@pytest.mark.parametrize("name", ZOO)
def test_light_zoo_with_random_weights(name: str) -> None:
    model = randomize(load(name))
    onnx.checker.check_model(model, full_check=True)
    exposed = expose(model, mid_tensors(model))
    result = fold_and_check(exposed, left=expected_left(exposed))
    assert result.report.bn_folded >= 1


def expected_left(model: onnx.ModelProto) -> int:
    """BNs that must stay: those whose input does not come from a Conv/Gemm (densenet's
    pre-activation BNs sit after Concat or MaxPool and feed a Relu)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    return sum(1 for b in bns if b.input[0] not in producers or producers[b.input[0]].op_type not in weighted)
