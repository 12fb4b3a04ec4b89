"""Small builders of ONNX test models (Conv/Gemm/MatMul + BatchNormalization and friends)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import TensorProto, helper, numpy_helper

Shape = Sequence[int | str] | None

NEWEST_OPSET = onnx.defs.onnx_opset_version()
BF16 = np.dtype(ml_dtypes.bfloat16)
LIGHT_ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def elem_type(dtype: DTypeLike) -> int:
    """ONNX element type of a numpy dtype (bfloat16 included)."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(dtype)


def to_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """A TensorProto of ``value`` (bfloat16 stored as its raw bits)."""
    value = np.asarray(value)
    if value.dtype == BF16:
        t = onnx.TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=value.shape)
        t.raw_data = value.view(np.uint16).tobytes()
        return t
    return numpy_helper.from_array(value, name)


def ir_for(opset: int) -> int:
    """The IR version onnx pairs with an opset (3 for opsets 7 and 8)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


class Net:
    """Accumulates nodes, initializers, inputs and outputs; :meth:`build` makes the model."""

    def __init__(self, opset: int = 17, seed: int = 0) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._k = 0

    def fresh(self, base: str) -> str:
        """A new unique tensor name."""
        self._k += 1
        return f"{base}{self._k}"

    def input(self, name: str, dtype: DTypeLike, shape: Shape) -> str:
        """Add a graph input."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type(dtype), shape))
        return name

    def output(self, name: str, dtype: DTypeLike, shape: Shape = None) -> str:
        """Mark ``name`` as a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type(dtype), shape))
        return name

    def init(self, name: str, value: np.ndarray) -> str:
        """Add an initializer."""
        self.inits.append(to_tensor(value, name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs) -> str:
        """Add a node; return its first output name (all outputs are named ``<name>_o<k>``)."""
        name = name or self.fresh(op.lower())
        outs = [f"{name}_out"] + [f"{name}_o{k}" for k in range(1, n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def weight(
        self, shape: Sequence[int], dtype: DTypeLike = np.float32, name: str | None = None, fan_in: int | None = None
    ) -> str:
        """A random normal initializer scaled by ``1/sqrt(fan_in)``."""
        fan_in = fan_in or int(np.prod(shape[1:])) or 1
        v = (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
        return self.init(name or self.fresh("w"), v)

    def bn_params(
        self, c: int, dtype: DTypeLike = np.float32, stats_dtype: DTypeLike | None = None
    ) -> list[np.ndarray]:
        """Random gamma, beta, mean, var (var > 0.5) of ``c`` channels."""
        stats_dtype = stats_dtype or dtype
        gamma = (self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1, 1], c)).astype(dtype)
        beta = self.rng.standard_normal(c).astype(dtype)
        mean = self.rng.standard_normal(c).astype(stats_dtype)
        var = self.rng.uniform(0.5, 2.0, c).astype(stats_dtype)
        return [gamma, beta, mean, var]

    def bn(
        self,
        x: str,
        c: int,
        dtype: DTypeLike = np.float32,
        *,
        params: list[np.ndarray] | None = None,
        param_dtype: DTypeLike | None = None,
        stats_dtype: DTypeLike | None = None,
        name: str | None = None,
        n_out: int = 1,
        **attrs,
    ) -> str:
        """A BatchNormalization of ``x`` with ``c`` channels and random (or given) parameters."""
        name = name or self.fresh("bn")
        p = params or self.bn_params(c, param_dtype or dtype, stats_dtype or param_dtype)
        names = [self.init(f"{name}_{k}", v) for k, v in zip(("scale", "bias", "mean", "var"), p, strict=True)]
        return self.node("BatchNormalization", [x, *names], n_out=n_out, name=name, **attrs)

    def build(self, ir_version: int | None = None, list_initializers: bool | None = None) -> onnx.ModelProto:
        """The model; IR < 4 lists every initializer among the graph inputs."""
        ir = ir_version or ir_for(self.opset)
        inputs = list(self.inputs)
        if list_initializers or (list_initializers is None and ir < 4):
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        g = helper.make_graph(self.nodes, "g", inputs, self.outputs, list(self.inits), value_info=self.value_info)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir)
        fill_output_shapes(model)
        return model


def fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the shape onnx infers (the checker wants one)."""
    todo = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not todo:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output)}
    for o in todo:
        v = known.get(o.name)
        if v is not None and v.type.tensor_type.HasField("shape"):
            o.type.tensor_type.shape.CopyFrom(v.type.tensor_type.shape)


def count_ops(graph: onnx.GraphProto, op_type: str) -> int:
    """Nodes of ``op_type`` in a graph and all its nested graphs."""
    total = 0
    for n in graph.node:
        total += n.op_type == op_type
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                total += count_ops(g, op_type)
    return total


def corrupt_rule(monkeypatch, rule_name: str, spoil) -> None:
    """Make the registered rule ``rule_name`` fold wrongly: ``spoil(site)`` edits its site before it matches.

    The registry is a tuple, so the test swaps in a copy with one rule replaced.
    """
    import dataclasses

    from bnfold.fold import rules

    original = next(r for r in rules.REGISTRY if r.name == rule_name)

    def wrong(view, site, slots):
        spoil(site)
        return original.match(view, site, slots)

    bad = dataclasses.replace(original, match=wrong)
    monkeypatch.setattr(rules, "REGISTRY", tuple(bad if r is original else r for r in rules.REGISTRY))
