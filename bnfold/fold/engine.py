"""The fold engine: walk every graph, apply the patterns until nothing changes."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import onnx

from bnfold.fold import noops
from bnfold.fold.graph import (
    ExternalReader,
    GraphView,
    ModelContext,
    ValueSink,
    all_names,
    infer_value_types,
    subgraphs,
)
from bnfold.fold.report import Fold, FoldReport, Reason, Skip
from bnfold.fold.rules import (
    CONSUMER_FOLDS,
    PRODUCER_FOLDS,
    Affine,
    Rejected,
    arith_worth_reporting,
    consumer_blocked,
    display_name,
    read_affine,
    require_private_output,
)

MAX_PASSES = 50

# (affine node's display name, graph path) -> may it be folded?
Selector = Callable[[str, str], bool]


@dataclass
class FoldResult:
    """The folded model and the report of every decision."""

    model: onnx.ModelProto
    report: FoldReport


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def count_nodes(graph: onnx.GraphProto, op_type: str | None = None) -> int:
    """Nodes in a graph and its nested graphs (of one op type when given)."""
    total = 0
    for n in graph.node:
        total += op_type is None or n.op_type == op_type
        for g in subgraphs(n):
            total += count_nodes(g, op_type)
    return total


def fold_model(
    model: onnx.ModelProto,
    *,
    freeze_initializer_inputs: bool = False,
    read_external: ExternalReader | None = None,
    copy: bool = True,
    only: Selector | Collection[str] | None = None,
    sink: ValueSink | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization (and per-channel Mul/Add/Sub/Div) in ``model``.

    Args:
        model: the model; left untouched unless ``copy`` is False.
        freeze_initializer_inputs: treat initializers that are also graph inputs
            (overridable at run time in IR >= 4) as constants.
        read_external: reads one external tensor's bytes (the I/O layer validates the
            location); needed only when a fold reads an externally stored tensor.
        copy: work on a copy (default); False folds ``model`` in place.
        only: fold only these affine nodes: a predicate ``(name, graph_path) -> bool``
            or a collection of display names (``Fold.node``); the others are left,
            BNs with reason ``excluded``.  None folds everything.
        sink: a :class:`ValueSink` (the writer's data sink): big folded values are written to it
            at once instead of into the model (for outputs with external data).

    Returns:
        A :class:`FoldResult` with the new model and a :class:`FoldReport`.

    Raises:
        ModelLoadError: a tensor the fold reads does not match its dtype and shape
            (the command line checks every tensor, and more, when it loads a model).
    """
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    ctx = ModelContext(
        opset=default_opset(out),
        ir_version=out.ir_version,
        read_external=read_external,
        freeze_initializer_inputs=freeze_initializer_inputs,
        value_types=infer_value_types(out),
        used_names=all_names(out.graph),
        sink=sink,
    )
    report = FoldReport(bn_count=count_nodes(out.graph, "BatchNormalization"), nodes_before=count_nodes(out.graph))
    _fold_graph(out.graph, ctx, None, "main", report, _selector(only))
    report.nodes_after = count_nodes(out.graph)
    return FoldResult(out, report)


def _selector(only: Selector | Collection[str] | None) -> Selector | None:
    """A predicate from ``fold_model``'s ``only`` argument."""
    if only is None or callable(only):
        return only
    names = frozenset(only)
    return lambda name, _path: name in names


def _fold_graph(
    graph: onnx.GraphProto,
    ctx: ModelContext,
    outer: GraphView | None,
    path: str,
    report: FoldReport,
    only: Selector | None = None,
) -> set[str]:
    """Fold one graph (nested graphs first); return outer names it stopped reading."""
    report.folds.extend(noops.run(graph, ctx, outer, path, only))
    view = GraphView(graph, ctx, outer, path)
    from_inner: set[str] = set()
    for node in view.nodes:
        for a in node.attribute:
            inner = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for k, g in enumerate(inner):
                where = f"{path}/{display_name(node)}.{a.name}" + (f"[{k}]" if len(inner) > 1 else "")
                from_inner |= _fold_graph(g, ctx, view, where, report, only)
    skips: list[Skip] = []
    affine_skips: list[Skip] = []
    stopped: set[str] = set()  # every name some pass stopped reading (the last pass usually changes nothing)
    local: set[str] = set()  # every name this graph defined at some point
    for _ in range(MAX_PASSES):
        view = GraphView(graph, ctx, outer, path)
        local |= set(view.producer) | set(view.initializers) | view.inputs
        view.disconnected |= from_inner
        from_inner = set()
        changed, skips, affine_skips = _one_pass(view, report, only)
        view.commit()
        stopped |= view.disconnected
        if not changed:
            break
    report.skips.extend(skips)
    report.affine_skips.extend(affine_skips)
    local |= set(view.producer) | set(view.initializers) | view.inputs
    return {n for n in stopped if n not in local}


def _one_pass(view: GraphView, report: FoldReport, only: Selector | None = None) -> tuple[bool, list[Skip], list[Skip]]:
    changed = False
    skips: list[Skip] = []
    affine_skips: list[Skip] = []
    for node in view.nodes:
        if view.position[id(node)] in view.removed:
            continue
        is_bn = node.op_type == "BatchNormalization"
        name, op_type = display_name(node), node.op_type
        try:
            aff = read_affine(view, node)
            if aff is None:
                continue
            if only is not None and not only(name, view.path):
                raise Rejected(Reason.EXCLUDED, "left out on request (its fold was excluded)")
            pattern, target = _fold_one(view, aff)
        except Rejected as r:
            if is_bn:
                skips.append(Skip(name, r.reason, r.message, view.path))
            elif arith_worth_reporting(view, node, r):
                affine_skips.append(Skip(name, r.reason, r.message, view.path, op_type))
            continue
        report.folds.append(Fold(name, op_type, display_name(target), target.op_type, pattern, view.path))
        changed = True
    return changed, skips, affine_skips


def _fold_one(view: GraphView, aff: Affine) -> tuple[str, onnx.NodeProto]:
    """Fold ``aff`` into its producer, else into its consumer; Rejected with the best reason."""
    rejections: list[Rejected] = []
    producer = view.producer_of(aff.data)
    if producer is not None and producer.domain in ("", "ai.onnx"):
        fold = PRODUCER_FOLDS.get(producer.op_type)
        if fold is not None:
            try:
                require_private_output(view, aff, producer)
                return fold(view, aff, producer), producer
            except Rejected as r:
                rejections.append(r)
    out = aff.node.output[0]
    users = view.value_users(out)
    consumer = users[0] if len(users) == 1 and not view.is_graph_output(out) else None
    if consumer is not None and consumer.domain in ("", "ai.onnx"):
        fold = CONSUMER_FOLDS.get(consumer.op_type)
        if fold is not None:
            try:
                return fold(view, aff, consumer), consumer
            except Rejected as r:
                rejections.append(r)
    blocked = consumer_blocked(view, aff)
    if blocked is not None:
        rejections.append(blocked)
    if rejections:
        # "unsupported_producer" only says the neighbour is no fold target; a
        # specific reason (padded Conv after it, shared output, ...) says more.
        specific = [r for r in rejections if r.reason != Reason.UNSUPPORTED_PRODUCER]
        raise (specific or rejections)[0]
    before = producer.op_type if producer is not None else "a graph input"
    after = ", ".join(sorted({u.op_type for u in users})) or "nothing"
    raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {before} and its output goes to {after}")
