"""Remove arithmetic that does nothing: ``x * 1``, ``x + 0``, ``x - 0``, ``x / 1``.

Keras' EfficientNet normalization layer built without weights exports
``Sub(x, 0)`` and ``Div(x, 1)``; ``x * 1`` and ``x + 0`` show up elsewhere.
A node goes only when it is exactly the identity on its data input:

- the other operand is a float constant whose every element is exactly the
  identity element (``1`` for Mul and Div, ``0`` for Add and Sub; the constant
  is the divisor of a Div and the subtrahend of a Sub);
- broadcasting keeps the data's shape: the constant is a scalar, or has no more
  dims than the data and every dim of it that is not 1 equals the data's dim
  (known from shape inference); before opset 7 the constant must be the second
  input (legacy broadcasting never grows the first);
- the data is a float tensor of the constant's dtype (when its dtype is known).

The node's readers are pointed at its data input.  When its output is a graph
output, the op making the data takes over that name if the data has no other
reader and is no graph output or input; otherwise the node stays (an Identity
would be no smaller).  A node read from inside a nested graph stays too.
Each removal is a :class:`~bnfold.fold.report.Fold` with pattern ``Sub(0)``,
``Div(1)``, ``Mul(1)`` or ``Add(0)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from bnfold.fold import consteval
from bnfold.fold.graph import GraphView, ModelContext, graph_reads, subgraphs
from bnfold.fold.report import Fold

# op -> (identity element, may the constant be the first input)
IDENTITY: dict[str, tuple[float, bool]] = {
    "Mul": (1.0, True),
    "Add": (0.0, True),
    "Sub": (0.0, False),
    "Div": (1.0, False),
}

Selector = Callable[[str, str], bool]


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _dims(view: GraphView, name: str) -> list[int | None] | None:
    """Dims of ``name`` from shape inference (None for an unknown dim); None when the rank is unknown."""
    tp = view.ctx.value_types.get(name)
    if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape"):
        return [d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]
    shape = view.static_shape(name)
    return None if shape is None else list(shape)


def _keeps_shape(view: GraphView, data: str, c: np.ndarray) -> bool:
    """Whether broadcasting ``c`` against ``data`` gives ``data``'s shape."""
    if c.ndim == 0:
        return True
    dims = _dims(view, data)
    if dims is None or c.ndim > len(dims):
        return False
    aligned = dims[len(dims) - c.ndim :]
    return all(k == 1 or k == d for k, d in zip(c.shape, aligned, strict=True))


def noop_data(view: GraphView, node: onnx.NodeProto) -> str | None:
    """The data input of ``node`` when ``node`` is an exact no-op on it, else None."""
    rule = IDENTITY.get(node.op_type)
    if rule is None or node.domain not in ("", "ai.onnx") or len(node.input) != 2 or len(node.output) != 1:
        return None
    ident, either_side = rule
    consts = [view.constant(i) for i in node.input]
    if (consts[0] is None) == (consts[1] is None):
        return None  # no constant operand, or a constant result (evaluated, not removed)
    k = 0 if consts[0] is not None else 1
    if k == 0 and (not either_side or view.ctx.opset < 7):
        return None
    c, data = consts[k], node.input[1 - k]
    assert c is not None
    if not consteval.is_float(c.dtype) or c.size == 0:
        return None
    dtype = view.tensor_dtype(data)
    if dtype is not None:
        like = consteval.empty_of_type(dtype)
        if like is None or like.dtype != c.dtype:
            return None
    with np.errstate(invalid="ignore"):
        if not np.all(c.astype(np.float64) == ident):
            return None
    if view.ctx.opset < 7:
        return data  # legacy broadcasting: the output has the first input's shape
    return data if _keeps_shape(view, data, c) else None


def _read_from_nested(view: GraphView, name: str) -> bool:
    return any(any(name in graph_reads(g) for g in subgraphs(u)) for u in view.users(name))


def remove_noops(view: GraphView, only: Selector | None = None) -> list[Fold]:
    """Queue the removal of every exact no-op Mul/Add/Sub/Div in ``view``; return one Fold each.

    A pure pass over the view: edits are queued (apply them with
    :meth:`GraphView.commit`).  ``only`` (``(node name, graph path) -> bool``)
    limits the removals as it limits folds.
    """
    folds: list[Fold] = []
    for node in view.nodes:
        if view.position[id(node)] in view.removed:
            continue
        data = noop_data(view, node)
        if data is None:
            continue
        name = _name(node)
        if only is not None and not only(name, view.path):
            continue
        out = node.output[0]
        if _read_from_nested(view, out):
            continue
        producer = view.producer_of(data)
        if view.is_graph_output(out):
            if (
                producer is None
                or not view.only_consumer(data, node)
                or data in view.inputs
                or data in view.initializers
                or _read_from_nested(view, data)
            ):
                continue
            view.remove(node)
            view.vanish(data)
            view.rename_output(producer, list(producer.output).index(data), out)
        else:
            for u in view.users(out):
                for i, src in enumerate(u.input):
                    if src == out:
                        view.set_input(u, i, data)
            view.remove(node)
            view.vanish(out)
        ident = IDENTITY[node.op_type][0]
        folds.append(
            Fold(
                name,
                node.op_type,
                _name(producer) if producer is not None else data,
                producer.op_type if producer is not None else "input",
                f"{node.op_type}({ident:g})",
                view.path,
            )
        )
    return folds


def run(
    graph: onnx.GraphProto,
    ctx: ModelContext,
    outer: GraphView | None,
    path: str,
    only: Selector | None = None,
) -> list[Fold]:
    """Remove the no-ops of one graph (not its nested graphs) and commit; the removals as Folds."""
    view = GraphView(graph, ctx, outer, path)
    folds = remove_noops(view, only)
    if folds:
        view.commit()
    return folds
