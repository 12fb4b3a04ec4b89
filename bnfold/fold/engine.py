"""The fold engine: walk every graph, apply the rules until nothing changes.

For each affine node it finds the op before it (through layout ops) and the op
after it, tries the registered rules for them (:mod:`bnfold.fold.rules`), and
for the first that matches: checks that every tensor the fold changes is
private, rounds the plan's slot writes once (:mod:`bnfold.fold.slots`), stores
them, and lets the rule edit the graph.  Otherwise it reports the most specific
reason.  Edits are committed once per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import onnx

from bnfold.fold import noops
from bnfold.fold.affine import AFFINE_OPS, ARITH_OPS, Affine, read_affine
from bnfold.fold.channels import path_down, path_up
from bnfold.fold.graph import (
    ExternalReader,
    GraphView,
    ModelContext,
    ValueSink,
    all_names,
    graph_and_nested,
    infer_value_types,
)
from bnfold.fold.nodes import display_name, is_standard
from bnfold.fold.report import Fold, FoldReport, Reason, Rejected, Skip
from bnfold.fold.rules import Plan, Rule, Side, Site, consumer_targets, rules_for
from bnfold.fold.slots import SlotReader, round_all, store

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
    return sum(op_type is None or n.op_type == op_type for g in graph_and_nested(graph) for n in g.node)


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
        rewritten = graph_pre_pass(view)
        changed, skips, affine_skips = _one_pass(view, report, only)
        changed = changed or rewritten
        view.commit()
        stopped |= view.disconnected
        if not changed:
            break
    report.skips.extend(skips)
    report.affine_skips.extend(affine_skips)
    local |= set(view.producer) | set(view.initializers) | view.inputs
    return {n for n in stopped if n not in local}


def graph_pre_pass(view: GraphView) -> bool:
    """Graph-level rewrites run at the start of every pass, before the folds; True when one changed the graph.

    The place for rewrites that are no fold of an affine op into a neighbour
    (removal of no-op arithmetic, ...); their edits are queued on ``view`` and
    committed with the folds'.
    """
    return False


def _one_pass(view: GraphView, report: FoldReport, only: Selector | None = None) -> tuple[bool, list[Skip], list[Skip]]:
    changed = False
    skips: dict[int, Skip] = {}
    affine_skips: dict[int, Skip] = {}
    first = view.nodes[: len(view.graph.node)]  # not the nodes this pass inserts
    for start in first:
        todo = [start]
        while todo:
            node = todo.pop()
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
                pattern, target, side = _fold_one(view, aff)
            except Rejected as r:
                if is_bn:
                    skips[id(node)] = Skip(name, r.reason, r.message, view.path)
                elif arith_worth_reporting(view, node, r):
                    affine_skips[id(node)] = Skip(name, r.reason, r.message, view.path, op_type)
                continue
            skips.pop(id(node), None)
            affine_skips.pop(id(node), None)
            report.folds.append(Fold(name, op_type, display_name(target), target.op_type, pattern, view.path))
            changed = True
            if side is Side.CONSUMER:
                # The affine op before this one (seen earlier in this pass) now feeds the
                # consumer: try it again at once, so a chain folds in one pass, not one per op.
                before = view.producer_of(aff.data)
                if is_standard(before, *AFFINE_OPS) and before is not None and before.output[0] == aff.data:
                    todo.append(before)
    return changed, list(skips.values()), list(affine_skips.values())


def _fold_one(view: GraphView, aff: Affine) -> tuple[str, onnx.NodeProto, Side]:
    """Fold ``aff`` into its producer, else into its consumer; Rejected with the best reason."""
    rejections: list[Rejected] = []
    target, path = path_up(view, aff.data)
    if target is not None:
        for rule in rules_for(Side.PRODUCER, target, aff.node.op_type):
            site = Site(aff, target, tuple(path))
            done = _try(view, rule, site, _private_above(view, site), rejections)
            if done is not None:
                return done
    out = aff.node.output[0]
    users = view.value_users(out)
    if len(users) == 1 and not view.is_graph_output(out):
        target, path, shared = path_down(view, out, users[0])
        if shared is not None:
            if any(is_standard(u, *consumer_targets()) for u in view.users(shared)) or view.is_graph_output(shared):
                why = "is a graph output" if view.is_graph_output(shared) else "has other readers"
                rejections.append(Rejected(Reason.INTERMEDIATE_SHARED, f"'{shared}' on the way to the next op {why}"))
        elif target is not None:
            for rule in rules_for(Side.CONSUMER, target, aff.node.op_type):
                done = _try(view, rule, Site(aff, target, tuple(path)), None, rejections)
                if done is not None:
                    return done
    blocked = consumer_blocked(view, aff)
    if blocked is not None:
        rejections.append(blocked)
    if rejections:
        # "unsupported_producer" only says the neighbour is no fold target; a
        # specific reason (padded Conv after it, shared output, ...) says more.
        specific = [r for r in rejections if r.reason != Reason.UNSUPPORTED_PRODUCER]
        raise (specific or rejections)[0]
    producer = view.producer_of(aff.data)
    before = producer.op_type if producer is not None else "a graph input"
    after = ", ".join(sorted({u.op_type for u in users})) or "nothing"
    raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {before} and its output goes to {after}")


def _try(
    view: GraphView, rule: Rule, site: Site, blocked: Rejected | None, rejections: list[Rejected]
) -> tuple[str, onnx.NodeProto, Side] | None:
    """Match, check, round, store and apply one rule; None (and the reason noted) when it does not apply."""
    claimed = rule.claims(view, site)
    if claimed is not None:
        rejections.append(claimed)
        return None
    if blocked is not None:
        rejections.append(blocked)
        return None
    slots = SlotReader(view, _chain_goes_on(view, site.aff, rule.side))
    plan = rule.check(view, site, slots)
    if isinstance(plan, Plan):
        plan = _private_extra(view, site, plan)
    if isinstance(plan, Rejected):
        rejections.append(plan)
        return None
    try:
        ready = round_all(plan.writes)  # before anything changes: an overflow leaves the graph as it was
    except Rejected as r:
        rejections.append(r)
        return None
    pattern = rule.pattern(site)  # before apply: a rule may turn the affine node into a bias Add
    store(view, ready, slots.keep_exact)
    rule.apply(view, site, plan)
    return pattern, site.target, rule.side


def _private_above(view: GraphView, site: Site) -> Rejected | None:
    """Every tensor from the producer's output to the affine op must feed only the next op, and be no graph output.

    Folding changes what the producer (and the layout ops after it) compute.
    """
    chain = [site.target, *site.path]
    readers = [*site.path, site.aff.node]
    for k, (node, reader) in enumerate(zip(chain, readers, strict=True)):
        out = node.output[0] if node.output else ""
        wanted = reader.input[0] if reader is not site.aff.node else site.aff.data
        if out != wanted:
            return Rejected(Reason.UNSUPPORTED_PRODUCER, f"it reads output '{wanted}' of {node.op_type}, not the first")
        if k == 0:
            if view.is_graph_output(out):
                return Rejected(
                    Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT, f"'{out}' from {display_name(node)} is a graph output"
                )
            if not view.only_consumer(out, reader, shape_readers=True):
                return Rejected(Reason.PRODUCER_OUTPUT_SHARED, f"'{out}' from {display_name(node)} has other consumers")
        elif view.is_graph_output(out) or not view.only_consumer(out, reader, shape_readers=True):
            why = "is a graph output" if view.is_graph_output(out) else "has other readers"
            return Rejected(Reason.INTERMEDIATE_SHARED, f"'{out}' from {display_name(node)} {why}")
    return None


def _private_extra(view: GraphView, site: Site, plan: Plan) -> Plan | Rejected:
    """The further tensors a plan needs private (a MatMul output before its bias Add)."""
    for name in plan.private:
        if not view.only_consumer(name, site.target, shape_readers=True):
            return Rejected(Reason.PRODUCER_OUTPUT_SHARED, f"the output '{name}' has other consumers")
    return plan


def _chain_goes_on(view: GraphView, aff: Affine, side: Side) -> bool:
    """Whether another affine op may fold into the same weights next (keep them unrounded).

    After a producer fold, that is an affine op reading the folded output (through
    layout ops); after a consumer fold, an affine op making the data the consumer
    now reads.
    """
    if side is Side.PRODUCER:
        out = aff.node.output[0]
        first = view.sole_user(out)
        nxt = None if first is None or view.is_graph_output(out) else path_down(view, out, first)[0]
    else:
        nxt = path_up(view, aff.data)[0]
    if nxt is None or not is_standard(nxt, *AFFINE_OPS):
        return False
    # A Mul/Add of two computed tensors (a residual Add) folds nothing: round now.
    return nxt.op_type == "BatchNormalization" or any(view.constant(i) is not None for i in nxt.input)


def consumer_blocked(view: GraphView, aff: Affine) -> Rejected | None:
    """Why no consumer fold was tried although a consumer could absorb ``aff``.

    The engine tries a consumer fold only when the affine node's output has a
    single reader and is no graph output; when a Conv (or another consumer-fold
    op) reads it among others, that sharing is the reason it stays.
    """
    out = aff.node.output[0]
    users = view.value_users(out)
    targets = consumer_targets()
    if not any(is_standard(u, *targets) for u in users):
        return None
    if len(users) == 1 and not view.is_graph_output(out):
        return None
    why = "is a graph output" if view.is_graph_output(out) else f"feeds {len(users)} nodes"
    return Rejected(Reason.OUTPUT_SHARED, f"its output '{out}' {why}, so the op after it cannot absorb it")


# producers next to which a Mul/Add/Sub/Div by a constant looks like a frozen BN
_REPORT_NEXT_TO = ("Conv", "ConvTranspose", "Gemm", "BatchNormalization")
# consumers before which one does
_REPORT_BEFORE = ("Conv", "ConvTranspose")

# Reasons that are routine for arithmetic by a scalar: activations such as
# hard-swish (``x * relu6(x + 3) / 6``) read a Conv output twice and feed padded Convs.
_ROUTINE_FOR_ARITH = {
    Reason.PRODUCER_OUTPUT_SHARED,
    Reason.OUTPUT_SHARED,
    Reason.INTERMEDIATE_SHARED,
    Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
    Reason.PADDED_CONSUMER,
    Reason.SHIFT_BEFORE_CONV_TRANSPOSE,
}


def arith_worth_reporting(view: GraphView, node: onnx.NodeProto, rejected: Rejected) -> bool:
    """Whether a Mul/Add/Sub/Div by a float constant that stays deserves a report line.

    Only nodes next to an op that could absorb them (a Conv, ConvTranspose, Gemm or
    BN before, possibly through layout ops; a Conv or ConvTranspose after) and only
    real reasons: "nothing to fold into" is the normal case for arithmetic, and so
    are a shared output or a padded Conv after an op by a scalar (activations),
    while a per-channel constant looks like a frozen BN.  Bias Adds after a MatMul
    are not reported either (they are already minimal).
    """
    if not is_standard(node, *ARITH_OPS) or len(node.input) != 2:
        return False
    if rejected.reason == Reason.UNSUPPORTED_PRODUCER:
        return False
    if rejected.reason == Reason.CONSTANT_TOO_LARGE:
        return True
    consts = [view.constant(i) for i in node.input]
    if (consts[0] is None) == (consts[1] is None):
        return False
    const = consts[0] if consts[0] is not None else consts[1]
    assert const is not None
    if rejected.reason in _ROUTINE_FOR_ARITH and const.size == 1:
        return False
    data = node.input[1] if consts[0] is not None else node.input[0]
    if is_standard(path_up(view, data)[0], *_REPORT_NEXT_TO):
        return True
    return any(is_standard(u, *_REPORT_BEFORE) for u in view.users(node.output[0]))
