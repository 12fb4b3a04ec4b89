"""Running a graph with tens of thousands of initializers as consecutive slices, one session each.

onnxruntime's session creation grows faster than linearly with the number of
initializers: a bare ``InferenceSession`` (``ORT_DISABLE_ALL``) of a Mul chain with one
scalar initializer per node takes 0.35 s, 0.76 s and 3.10 s at 8,000, 16,000 and
32,000 nodes.  Verification of such a graph cuts its (topologically ordered) nodes
into slices of :data:`SLICE_NODES` and runs them one after the other, each in its
own session, handing the values that cross a cut from slice to slice.  At
``ORT_DISABLE_ALL`` every node runs the same kernel on the same values either way,
so the outputs are the same, and the cost grows linearly.

Only plain graphs are cut: no subgraphs or local functions (outer-scope names), no
external data, no initializer that is also a graph input (it could be fed), and a
tensor type known for every value that crosses a cut; otherwise the graph runs
whole, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bnfold.fold.graph import subgraphs
from bnfold.onnxio.load import skeleton
from bnfold.onnxio.tensors import is_external, model_tensors

#: Graphs with fewer initializers run whole (one session is fast enough there).
SPLIT_MIN_INITIALIZERS = 4096
#: Nodes per slice.
SLICE_NODES = 2048


@dataclass(frozen=True)
class Slice:
    """One slice: a model of consecutive nodes, the values it reads and the values it hands on."""

    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    drop: tuple[str, ...]  # values read here for the last time


def plan_slices(model: onnx.ModelProto, slice_nodes: int = SLICE_NODES) -> list[Slice] | None:
    """The slices of ``model``, or None when it is small or not a plain graph (see the module docstring)."""
    g = model.graph
    if len(g.initializer) < SPLIT_MIN_INITIALIZERS or len(g.node) <= slice_nodes:
        return None
    if model.functions or g.sparse_initializer or any(True for n in g.node for _ in subgraphs(n)):
        return None
    if any(is_external(t) for t, _ in model_tensors(model)):
        return None
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name: i for i in g.input}
    if any(name in inits for name in graph_inputs):
        return None
    types = _tensor_types(model)
    if types is None:
        return None
    nodes = list(g.node)
    chunks = [nodes[i : i + slice_nodes] for i in range(0, len(nodes), slice_nodes)]
    last_read: dict[str, int] = {}
    for k, chunk in enumerate(chunks):
        for n in chunk:
            for i in n.input:
                if i:
                    last_read[i] = k
    outputs = [o.name for o in g.output]
    wanted = set(outputs)
    slices = []
    for k, chunk in enumerate(chunks):
        made = {o for n in chunk for o in n.output if o}
        reads: dict[str, None] = {}
        for n in chunk:
            for i in n.input:
                if i and i not in made:
                    reads[i] = None
        ins = [r for r in reads if r not in inits]
        hand_on = [o for n in chunk for o in n.output if o and (last_read.get(o, -1) > k or o in wanted)]
        sub = onnx.GraphProto(name=f"{g.name or 'graph'}_slice{k}")
        sub.node.extend(chunk)
        sub.initializer.extend(inits[r] for r in reads if r in inits)
        for name in ins:
            if name in graph_inputs:
                sub.input.append(graph_inputs[name])
            else:
                vi = _value_info(name, types)
                if vi is None:
                    return None
                sub.input.append(vi)
        for name in hand_on:
            vi = _value_info(name, types)
            if vi is None:
                return None
            sub.output.append(vi)
        m = onnx.ModelProto(ir_version=model.ir_version, graph=sub)
        m.opset_import.extend(model.opset_import)
        drop = tuple(r for r in ins if last_read.get(r) == k and r not in wanted)
        slices.append(Slice(m, tuple(ins), tuple(hand_on), drop))
    # Every graph output must come out of some slice (one that is a graph input comes from the feed).
    made_all = {o for s in slices for o in s.outputs} | set(graph_inputs)
    if not all(o in made_all for o in outputs):
        return None
    return slices


def _tensor_types(model: onnx.ModelProto) -> dict[str, int] | None:
    """Element type of every tensor value, from onnx's shape inference on a weight-less copy."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:  # noqa: BLE001 - no inference, no cut: the graph runs whole
        return None
    types: dict[str, int] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _value_info(name: str, types: dict[str, int]) -> onnx.ValueInfoProto | None:
    elem = types.get(name)
    return onnx.helper.make_tensor_value_info(name, elem, None) if elem else None


class SlicedSession:
    """The sessions of a graph's slices, run one after the other (the ``impl`` of a Runner)."""

    def __init__(self, slices: Sequence[Slice], sessions: Sequence[Any], outputs: Sequence[str]) -> None:
        self.slices = list(slices)
        self.cores = [getattr(s, "_sess", s) for s in sessions]
        self.outputs = list(outputs)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for ``feed`` (graph inputs by name)."""
        values: dict[str, Any] = dict(feed)
        for sl, core in zip(self.slices, self.cores, strict=True):
            got = core.run(list(sl.outputs), {n: values[n] for n in sl.inputs}, None)
            values.update(zip(sl.outputs, got, strict=True))
            for n in sl.drop:
                values.pop(n, None)
        return [values[o] for o in self.outputs]
