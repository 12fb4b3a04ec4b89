"""The fold rules, as data, and their one registry.

A :class:`Rule` says what it folds into (its ``target`` op and ``side``), which
affine ops it absorbs, which layout ops may sit in between, a pure ``match``
that reads the graph and returns a :class:`Plan` (or raises
:class:`~bnfold.fold.report.Rejected`), and an ``apply`` that edits the graph.
The engine (:mod:`bnfold.fold.engine`) owns everything else: that the tensors
on the way are private, the rounding of every weight slot (once per chain, see
:mod:`bnfold.fold.slots`), and the commit.  A new pattern is one rule, one math
function in :mod:`bnfold.fold.math` and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.fold import math as fm
from bnfold.fold.affine import AFFINE_OPS, ARITH_OPS, Affine, channel_dim, data_rank, read_bn
from bnfold.fold.channels import LAYOUT_OPS, Pos, follow_path
from bnfold.fold.graph import GraphView
from bnfold.fold.nodes import attr, display_name, is_standard, set_attr
from bnfold.fold.report import Reason, Rejected
from bnfold.fold.slots import SlotReader, Write, rounded


class Side(str, Enum):
    """Where the affine op goes: into the op that makes its input, or into the op that reads its output."""

    PRODUCER = "producer"
    CONSUMER = "consumer"


@dataclass(frozen=True)
class Site:
    """Where a rule may apply: the affine op, the op to fold into, and the layout ops between them."""

    aff: Affine
    target: onnx.NodeProto
    path: tuple[onnx.NodeProto, ...] = ()


@dataclass
class Plan:
    """What a matched rule will do: slot writes (rounded and stored by the engine), and data for ``apply``.

    ``private`` names further tensors that must be read by the next node only
    (the engine checks them, as it checks the tensors on the path).
    """

    writes: list[Write]
    private: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


Match = Callable[[GraphView, Site, SlotReader], Plan]
Apply = Callable[[GraphView, Site, Plan], None]
Claim = Callable[[GraphView, Site], None]


@dataclass(frozen=True)
class Rule:
    """One fold pattern.

    ``name`` is the pattern with a BN (the one documented); the name of each
    fold done shows its actual path (:meth:`pattern`), e.g. ``Conv+Squeeze+Mul``.
    ``claim`` (optional) checks, before anything else, that the neighbour is a
    fold target of this rule at all (raises Rejected when it is not).
    """

    name: str
    side: Side
    target: str
    affine: tuple[str, ...]
    through: tuple[str, ...]
    summary: str
    match: Match
    apply: Apply
    head: tuple[str, ...] = ()
    claim: Claim | None = None

    def claims(self, view: GraphView, site: Site) -> Rejected | None:
        """None when the neighbour at ``site`` is this rule's kind of target (cheap, structural)."""
        if any(p.op_type not in self.through for p in site.path):
            ops = "+".join(p.op_type for p in site.path)
            return Rejected(Reason.UNSUPPORTED_PRODUCER, f"{self.target} is not folded through {ops}")
        if self.claim is not None:
            try:
                self.claim(view, site)
            except Rejected as r:
                return r
        return None

    def check(self, view: GraphView, site: Site, slots: SlotReader) -> Plan | Rejected:
        """The plan, or why the rule does not apply (``match`` changes nothing)."""
        claimed = self.claims(view, site)
        if claimed is not None:
            return claimed
        try:
            return self.match(view, site, slots)
        except Rejected as r:
            return r

    def pattern(self, site: Site) -> str:
        """The name of this fold at ``site``: the ops in data-flow order."""
        middle = [p.op_type for p in site.path]
        if self.side is Side.PRODUCER:
            return "+".join([*self.head, site.target.op_type, *middle, site.aff.node.op_type])
        return "+".join([site.aff.node.op_type, *middle, site.target.op_type])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (``bnfold patterns --json``)."""
        return {
            "name": self.name,
            "side": self.side.value,
            "target": self.target,
            "affine": list(self.affine),
            "through": list(self.through),
            "summary": self.summary,
        }


# ---------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------


def _group(node: onnx.NodeProto, w: np.ndarray) -> int:
    group = attr(node, "group", 1)
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{node.op_type} weight {list(w.shape)} does not fit group={group}")
    return int(group)


def _value(slot_value: np.ndarray | None) -> np.ndarray:
    assert slot_value is not None  # a weight slot always has a value
    return slot_value


def _moved_by_transpose(site: Site) -> bool:
    return any(p.op_type == "Transpose" for p in site.path)


def channels_at_affine(view: GraphView, site: Site, start: Pos, channels: int) -> Pos:
    """Check that ``site.aff`` runs along the axis the target's channels reach; the position there.

    The channel axis must survive the layout path as an axis of its own, and the
    affine constant must vary along that axis only (a BN along axis 1).
    """
    aff = site.aff
    if aff.axis is None and site.path:
        return start  # a scalar commutes with any layout op: where the channels went does not matter
    pos = follow_path(view, start, list(site.path), channels)
    if not pos.alone:
        raise Rejected(
            Reason.CHANNEL_AXIS_LOST, f"the {channels} channels are merged with other dims before {aff.node.op_type}"
        )
    rank = pos.rank if pos.rank is not None else aff.rank
    if pos.rank is not None and aff.rank is not None and pos.rank != aff.rank:
        raise Rejected(Reason.SHAPE_MISMATCH, f"the data is {aff.rank}-D, not {pos.rank}-D")
    if aff.axis is None:
        return pos
    index = pos.index() if pos.rank is not None else (pos.axis % rank if rank is not None else None)
    if index is None:
        raise Rejected(Reason.UNKNOWN_RANK, f"the rank of '{aff.data}' is unknown")
    if index != aff.axis:
        what = "BN's channel axis is 1" if aff.is_bn else f"the constant runs along axis {aff.axis}"
        if _moved_by_transpose(site):
            ops = "+".join(p.op_type for p in site.path)
            raise Rejected(Reason.CHANNEL_AXIS_MOVED, f"{ops} moves the channels to axis {index}, but {what}")
        if aff.is_bn:
            raise Rejected(Reason.SHAPE_MISMATCH, f"{site.target.op_type} output channels are on axis {index}: {what}")
        raise Rejected(Reason.NOT_PER_CHANNEL, f"{what}, the channels of {site.target.op_type} are on axis {index}")
    return Pos(index, rank, 1, 1)


def splice_out(view: GraphView, site: Site) -> None:
    """Remove the affine node; the node before it takes over its output name."""
    aff = site.aff
    last = site.path[-1] if site.path else site.target
    view.remove(aff.node)
    view.vanish(aff.data)
    view.rename_output(last, 0, aff.node.output[0])


# ---------------------------------------------------------------------------
# Folds into the producer (affine after the op, possibly through layout ops)
# ---------------------------------------------------------------------------


def match_conv(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after Conv: scale output channels, fold the shift into the bias."""
    conv = site.target
    w = slots.weight(conv)
    wv = _value(w.value)
    _group(conv, wv)
    b = slots.optional(conv, 2, "bias", w.dtype, "bias")
    channels_at_affine(view, site, Pos(1, wv.ndim), wv.shape[0])
    s, t = site.aff.per_channel(wv.shape[0])
    w64, b64 = fm.fold_conv(wv, b.value, s, t, w.round_into)
    return Plan([w.put(w64), b.put(b64)])


def match_conv_transpose(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after ConvTranspose: weight ``[Cin, Cout/g, k...]``."""
    conv = site.target
    w = slots.weight(conv)
    wv = _value(w.value)
    group = _group(conv, wv)
    b = slots.optional(conv, 2, "bias", w.dtype, "bias")
    cout = wv.shape[1] * group
    channels_at_affine(view, site, Pos(1, wv.ndim), cout)
    s, t = site.aff.per_channel(cout)
    w64, b64 = fm.fold_conv_transpose(wv, b.value, s, t, group, w.round_into)
    return Plan([w.put(w64), b.put(b64)])


def match_gemm(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after Gemm: scale the output columns of ``op(B)``; new ``C``, ``beta = 1``."""
    gemm = site.target
    b = slots.weight(gemm)
    bv = _value(b.value)
    if bv.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"Gemm B has shape {list(bv.shape)}")
    c = slots.optional(gemm, 2, "C", b.dtype, "C")
    trans_b = bool(attr(gemm, "transB", 0))
    n = bv.shape[0] if trans_b else bv.shape[1]
    channels_at_affine(view, site, Pos(1, 2), n)
    s, t = site.aff.per_channel(n)
    b64, c64 = fm.fold_gemm(bv, c.value, s, t, trans_b, attr(gemm, "beta", 1.0), b.round_into)
    return Plan([b.put(b64), c.put(c64)])


def apply_gemm(view: GraphView, site: Site, plan: Plan) -> None:
    set_attr(site.target, "beta", 1.0)
    splice_out(view, site)


def _matmul_start(view: GraphView, mm: onnx.NodeProto, slots: SlotReader):
    """The constant ``W[K, N]`` slot of a MatMul and the position of its output channels (the last axis)."""
    w = slots.weight(mm)
    wv = _value(w.value)
    if wv.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"MatMul weight has shape {list(wv.shape)}, not [K, N]")
    rank = data_rank(view, mm.input[0])
    if rank is not None and rank < 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"MatMul input is {rank}-D: its output has no channel axis")
    return w, Pos(-1 if rank is None else rank - 1, rank)


def match_matmul(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after ``MatMul(x, W)``: scale W's columns; the shift becomes a bias Add in the affine op's place.

    Any output rank: the channels are the last axis (LeViT's ``MatMul [B,N,K]x[K,C]
    -> Reshape [B*N, C] -> BatchNormalization``).
    """
    aff, mm = site.aff, site.target
    w, start = _matmul_start(view, mm, slots)
    wv = _value(w.value)
    n = wv.shape[1]
    pos = channels_at_affine(view, site, start, n)
    s, t = aff.per_channel(n)
    if not aff.is_bn and np.all(s == 1):
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, "a bias Add after MatMul is already minimal")
    w64, t64 = fm.fold_matmul(wv, None, s, t, w.round_into)
    extra: dict[str, Any] = {}
    if np.any(t64 != 0):
        rank = pos.rank if pos.rank is not None else aff.rank
        if rank is None:
            raise Rejected(Reason.UNKNOWN_RANK, f"the rank of '{aff.data}' is unknown")
        shape = (n,) + (1,) * (rank - 1 - pos.axis)
        extra["bias"] = rounded(t64, w.dtype, "bias").reshape(shape)
    return Plan([w.put(w64)], extra=extra)


def apply_matmul(view: GraphView, site: Site, plan: Plan) -> None:
    bias = plan.extra.get("bias")
    if bias is None:
        splice_out(view, site)
        return
    # The affine node becomes the bias Add, in its own place in the graph.
    node = site.aff.node
    out = node.output[0]
    tname = view.add_constant(f"{display_name(site.target)}_bias_bnfold", bias)
    view.replace_inputs(node, [site.aff.data, tname])
    for extra in node.output[1:]:
        view.vanish(extra)
    del node.output[:]
    node.output.append(out)
    del node.attribute[:]
    node.op_type, node.domain = "Add", ""


def match_matmul_bias(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after ``MatMul(x, W) + bias`` (or ``- bias``): scale W's columns, fold into the bias.

    A ``Sub(MatMul(x, W), c)`` is a bias too (``-c``); it stays a Sub and its
    constant becomes the negated folded bias.
    """
    add, aff = site.target, site.aff
    op = add.op_type
    if len(add.input) != 2:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"{op} with other than two inputs")
    k = 1 if view.constant(add.input[1]) is not None else 0
    x = add.input[1 - k]
    mm = view.producer_of(x)
    if view.constant(add.input[k]) is None or not is_standard(mm, "MatMul") or (op == "Sub" and k != 1):
        raise Rejected(
            Reason.UNSUPPORTED_PRODUCER, f"its input comes from {op} '{display_name(add)}', not a MatMul bias"
        )
    assert mm is not None
    if mm.output[0] != x:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"{op} reads output '{x}' of MatMul, not the first")
    w, start = _matmul_start(view, mm, slots)
    wv = _value(w.value)
    n = wv.shape[1]
    bias = slots.optional(add, k, "bias", w.dtype, "bias")
    bv = _value(bias.value)
    if bv.size not in (1, n) or bv.ndim > 2 or (bv.ndim == 2 and bv.shape[0] != 1):
        raise Rejected(Reason.NOT_PER_CHANNEL, f"the MatMul bias has shape {list(bv.shape)}")
    channels_at_affine(view, site, start, n)
    sign = -1.0 if op == "Sub" else 1.0
    s, t = aff.per_channel(n)
    bias64 = np.broadcast_to(np.asarray(bv, np.float64).reshape(-1), (n,))
    w64, b64 = fm.fold_matmul(wv, sign * bias64, s, t, w.round_into)
    # The MatMul output changes: it must feed nothing but this bias.
    return Plan([w.put(w64), bias.put(sign * b64)], private=(x,))


def _concat_convs(view: GraphView, site: Site) -> list[onnx.NodeProto]:
    """The Convs whose private outputs a Concat joins; Rejected (no fold target) otherwise."""
    cat = site.target
    convs: list[onnx.NodeProto] = []
    for x in cat.input:
        p = view.producer_of(x)
        if not is_standard(p, "Conv") or p is None or p.output[0] != x:
            raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"Concat input '{x}' is not the output of a Conv")
        if not view.only_consumer(x, cat):
            # No fold target then (densenet's Concats of shared features): the BN just stays.
            raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"Concat input '{x}' has other readers")
        convs.append(p)
    if len(set(cat.input)) != len(cat.input):
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, "the Concat reads one Conv output twice")
    return convs


def claim_concat(view: GraphView, site: Site) -> None:
    _concat_convs(view, site)


def match_concat(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after ``Concat(axis=1)`` of private Conv outputs: split ``s``, ``t`` by the slices, fold each part.

    YOLOv5's BottleneckCSP: ``bn(cat(cv3(...), cv2(x)))``.
    """
    cat, aff = site.target, site.aff
    convs = _concat_convs(view, site)
    weights = [slots.weight(conv) for conv in convs]
    ranks = {_value(w.value).ndim for w in weights}
    rank = ranks.pop() if len(ranks) == 1 else None
    if rank is None or attr(cat, "axis", 1) % rank != 1:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, "the Concat does not join the Convs' channel axis 1")
    counts = [_value(w.value).shape[0] for w in weights]
    total = sum(counts)
    channels_at_affine(view, site, Pos(1, rank), total)
    s, t = aff.per_channel(total)
    writes: list[Write] = []
    start = 0
    for conv, w, n in zip(convs, weights, counts, strict=True):
        wv = _value(w.value)
        _group(conv, wv)
        b = slots.optional(conv, 2, "bias", w.dtype, "bias")
        w64, b64 = fm.fold_conv(wv, b.value, s[start : start + n], t[start : start + n], w.round_into)
        writes += [w.put(w64), b.put(b64)]
        start += n
    return Plan(writes, private=tuple(cat.input))


def match_bn(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine after an inference BN that stays: fold into its scale and bias."""
    bn = site.target
    read_bn(view, bn)  # the BN itself must be a valid inference BN
    gamma = slots.weight(bn, 1, "scale")
    beta = slots.weight(bn, 2, "bias")
    c = _value(gamma.value).shape[0]
    channels_at_affine(view, site, Pos(1, data_rank(view, bn.input[0])), c)
    s, t = site.aff.per_channel(c)
    g64, b64 = fm.fold_into_bn(_value(gamma.value), _value(beta.value), s, t)
    return Plan([gamma.put(g64), beta.put(b64)])


def apply_splice(view: GraphView, site: Site, plan: Plan) -> None:
    splice_out(view, site)


# ---------------------------------------------------------------------------
# Folds into the consumer (affine before the op)
# ---------------------------------------------------------------------------


def conv_pads_nothing(conv: onnx.NodeProto) -> bool:
    """True when the Conv reads no padded zeros."""
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    return auto_pad == "VALID" or not any(attr(conv, "pads", []) or [])


def _data_input(site: Site) -> str:
    """The tensor the consumer reads: the affine output, or the last layout op's."""
    return site.path[-1].output[0] if site.path else site.aff.node.output[0]


def _reads_once_as_data(site: Site) -> None:
    node, x = site.target, _data_input(site)
    if list(node.input).count(x) != 1 or node.input[0] != x:
        raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"it feeds {display_name(node)} other than as its data input")


def _channel_input_axis(view: GraphView, site: Site, channels: int) -> Pos:
    """Position of the affine op's channels in the consumer's data input (through the layout path)."""
    aff = site.aff
    assert aff.axis is not None
    rank = aff.rank if aff.rank is not None else data_rank(view, aff.data)
    return follow_path(view, Pos(aff.axis, rank), list(site.path), channels)


def _check_conv_input_channels(view: GraphView, aff: Affine, cin: int) -> None:
    if aff.axis not in (None, 1):
        raise Rejected(Reason.NOT_PER_CHANNEL, f"the constant runs along axis {aff.axis}, not the channel axis 1")
    if not aff.is_bn and aff.channels is not None and channel_dim(view, aff.data) != cin:
        # A [1, C, 1, 1] constant on a 1-channel tensor broadcasts it to C channels:
        # the Conv could not read the un-broadcast data.
        raise Rejected(Reason.SHAPE_MISMATCH, f"'{aff.data}' does not have the {cin} channels the Conv reads")


def match_next_conv(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine before an unpadded Conv: ``W' = W * s[c]``, ``b' = b + sum W * t[c]``.

    Exact only when the Conv reads no padded zeros (padding happens after the
    affine map, so padded positions would see ``0`` instead of ``t``).
    """
    conv, aff = site.target, site.aff
    _reads_once_as_data(site)
    if not conv_pads_nothing(conv):
        raise Rejected(Reason.PADDED_CONSUMER, f"the following Conv {display_name(conv)} pads its input")
    w = slots.weight(conv)
    wv = _value(w.value)
    group = _group(conv, wv)
    b = slots.optional(conv, 2, "bias", w.dtype, "bias")
    cin = wv.shape[1] * group
    _check_conv_input_channels(view, aff, cin)
    s, t = aff.per_channel(cin)
    w64, b64 = fm.fold_into_next_conv(wv, b.value, s, t, group)
    return Plan([w.put(w64), b.put(b64)])


def match_next_conv_transpose(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """A pure scale before a ConvTranspose: ``W'[i] = s[i] * W[i]`` (a shift is not exact at the borders)."""
    conv, aff = site.target, site.aff
    _reads_once_as_data(site)
    if aff.shifts:
        raise Rejected(
            Reason.SHIFT_BEFORE_CONV_TRANSPOSE,
            f"a shift before ConvTranspose {display_name(conv)} is not exact: border outputs sum fewer inputs",
        )
    w = slots.weight(conv)
    wv = _value(w.value)
    _group(conv, wv)
    cin = wv.shape[0]
    _check_conv_input_channels(view, aff, cin)
    s, _ = aff.per_channel(cin)
    return Plan([w.put(fm.fold_scale_into_next_conv_transpose(wv, s, w.round_into))])


def _contracted(view: GraphView, site: Site, axis: int, rank: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` per contracted index ``[k]`` of the consumer's data input (its axis ``axis`` of ``rank``)."""
    aff = site.aff
    if aff.axis is None:
        return aff.per_channel(k)
    c = aff.channels
    assert c is not None
    pos = _channel_input_axis(view, site, c)
    if pos.rank is not None and pos.rank != rank:
        raise Rejected(Reason.SHAPE_MISMATCH, f"the data input of {site.target.op_type} is {pos.rank}-D, not {rank}-D")
    index = pos.axis % rank
    if index != axis or pos.outer != 1:
        raise Rejected(
            Reason.CHANNEL_IS_BATCH_AXIS,
            f"the {c} channels reach {site.target.op_type} on axis {index}, which it does not sum over (axis {axis})",
        )
    if c * pos.inner != k:
        raise Rejected(Reason.SHAPE_MISMATCH, f"{c} channels x {pos.inner} against {k} rows of the weight")
    s, t = aff.per_channel(c)
    return fm.expand_channels(s, pos.inner), fm.expand_channels(t, pos.inner)


def match_next_gemm(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine before ``Gemm(A, B, C)`` on A's contracted axis: rows of ``op(B)`` scaled, the shift into ``C``."""
    gemm = site.target
    _reads_once_as_data(site)
    b = slots.weight(gemm)
    bv = _value(b.value)
    if bv.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"Gemm B has shape {list(bv.shape)}")
    trans_a, trans_b = bool(attr(gemm, "transA", 0)), bool(attr(gemm, "transB", 0))
    k = bv.shape[1] if trans_b else bv.shape[0]
    s, t = _contracted(view, site, 0 if trans_a else 1, 2, k)
    c = slots.optional(gemm, 2, "C", b.dtype, "C")
    alpha, beta = attr(gemm, "alpha", 1.0), attr(gemm, "beta", 1.0)
    b64, c64 = fm.fold_into_next_gemm(bv, c.value, s, t, trans_b, alpha, beta, b.round_into)
    writes = [b.put(b64)]
    if c64 is not None:
        writes.append(c.put(c64))
    return Plan(writes, extra={"beta": c64 is not None})


def apply_next_gemm(view: GraphView, site: Site, plan: Plan) -> None:
    if plan.extra["beta"]:
        set_attr(site.target, "beta", 1.0)
    bypass(view, site)


def _bias_after(view: GraphView, mm: onnx.NodeProto, n: int) -> tuple[onnx.NodeProto, int] | None:
    """``(Add or Sub, index of its constant)`` when the MatMul output feeds only a bias of ``[N]``."""
    y = mm.output[0]
    add = view.sole_user(y)
    if view.is_graph_output(y) or not is_standard(add, "Add", "Sub") or add is None or len(add.input) != 2:
        return None
    k = 1 if add.input[0] == y else 0
    if add.input[1 - k] != y or (add.op_type == "Sub" and k != 1):
        return None
    c = view.constant(add.input[k])
    if c is None or c.dtype.kind != "f" or c.size not in (1, n) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
        return None
    return add, k


def match_next_matmul(view: GraphView, site: Site, slots: SlotReader) -> Plan:
    """Affine before ``MatMul(x, W[K, N])`` on x's last axis: rows of W scaled; ``t @ W`` into the bias after it.

    The bias goes into the Add (or Sub) that follows the MatMul, else into a new Add.
    """
    mm, aff = site.target, site.aff
    _reads_once_as_data(site)
    w = slots.weight(mm)
    wv = _value(w.value)
    if wv.ndim != 2:
        raise Rejected(Reason.SHAPE_MISMATCH, f"MatMul weight has shape {list(wv.shape)}, not [K, N]")
    x = _data_input(site)
    rank = data_rank(view, x) if site.path else (aff.rank if aff.rank is not None else data_rank(view, x))
    if rank is None:
        raise Rejected(Reason.UNKNOWN_RANK, f"the rank of the MatMul input '{x}' is unknown")
    k, n = wv.shape
    s, t = _contracted(view, site, rank - 1, rank, k)
    w64, shift = fm.fold_into_next_matmul(wv, s, t, w.round_into)
    writes = [w.put(w64)]
    extra: dict[str, Any] = {}
    if np.any(shift != 0):
        found = _bias_after(view, mm, n)
        if found is not None:
            add, kk = found
            bias = slots.optional(add, kk, "bias", w.dtype, "bias")
            sign = -1.0 if add.op_type == "Sub" else 1.0
            b64 = np.broadcast_to(np.asarray(bias.value, np.float64).reshape(-1), (n,)) + sign * shift
            writes.append(bias.put(b64))
        elif np.all(s == 1):
            raise Rejected(Reason.UNSUPPORTED_PRODUCER, "a shift before a MatMul without a bias Add is already minimal")
        else:
            extra["bias"] = rounded(shift, w.dtype, "bias")
    return Plan(writes, extra=extra)


def apply_next_matmul(view: GraphView, site: Site, plan: Plan) -> None:
    bias = plan.extra.get("bias")
    if bias is not None:
        mm = site.target
        y = mm.output[0]
        inner = view.ctx.fresh_name(f"{y}_bnfold")
        tname = view.add_constant(f"{display_name(mm)}_bias_bnfold", bias)
        view.rename_output(mm, 0, inner)
        add = helper.make_node("Add", [inner, tname], [y], name=view.ctx.fresh_name(f"{display_name(mm)}_bias"))
        view.insert_after(mm, add)
    bypass(view, site)


def apply_bypass(view: GraphView, site: Site, plan: Plan) -> None:
    bypass(view, site)


def bypass(view: GraphView, site: Site) -> None:
    """Remove the affine node before a consumer: what read its output reads its input."""
    aff = site.aff
    out = aff.node.output[0]
    for reader in view.type_only_readers(out):  # same dtype before and after the affine op
        for k, i in enumerate(list(reader.input)):
            if i == out:
                view.set_input(reader, k, aff.data)
    first = site.path[0] if site.path else site.target
    view.remove(aff.node)
    view.vanish(out)
    view.set_input(first, 0, aff.data)


_ANY_AFFINE = AFFINE_OPS
_TOWARDS_LINEAR = LAYOUT_OPS
_SAME_LAYOUT = ("Identity", "Dropout")  # a Conv reads channels on axis 1: only ops that keep every axis

# The one registry: order matters only among rules of one side and target op.
REGISTRY: tuple[Rule, ...] = (
    Rule("Conv+BatchNormalization", Side.PRODUCER, "Conv", _ANY_AFFINE, LAYOUT_OPS,
         "scale output channels of W, shift into the bias (added when absent)", match_conv, apply_splice),
    Rule("ConvTranspose+BatchNormalization", Side.PRODUCER, "ConvTranspose", _ANY_AFFINE, LAYOUT_OPS,
         "weight [Cin, Cout/g, k...]: scale slot (i, j) by s[(i // (Cin/g)) * (Cout/g) + j]",
         match_conv_transpose, apply_splice),
    Rule("Gemm+BatchNormalization", Side.PRODUCER, "Gemm", _ANY_AFFINE, LAYOUT_OPS,
         "scale columns of op(B); C' = s * beta * C + t, beta = 1", match_gemm, apply_gemm),
    Rule("MatMul+BatchNormalization", Side.PRODUCER, "MatMul", _ANY_AFFINE, LAYOUT_OPS,
         "scale columns of W[K, N] (channels on the last axis, any rank); the shift becomes a bias Add",
         match_matmul, apply_matmul),
    Rule("MatMul+Add+BatchNormalization", Side.PRODUCER, "Add", _ANY_AFFINE, LAYOUT_OPS,
         "scale columns of W; fold into the bias Add after the MatMul", match_matmul_bias, apply_splice,
         head=("MatMul",)),
    Rule("MatMul+Sub+BatchNormalization", Side.PRODUCER, "Sub", _ANY_AFFINE, LAYOUT_OPS,
         "scale columns of W; fold into the bias Sub after the MatMul", match_matmul_bias, apply_splice,
         head=("MatMul",)),
    Rule("Conv+Concat+BatchNormalization", Side.PRODUCER, "Concat", _ANY_AFFINE, LAYOUT_OPS,
         "after Concat(axis=1) of private Conv outputs: s and t split by the slices, into each Conv",
         match_concat, apply_splice, head=("Conv",), claim=claim_concat),
    Rule("BatchNormalization+Mul", Side.PRODUCER, "BatchNormalization", ARITH_OPS, LAYOUT_OPS,
         "an affine op after a BN that stays: into its scale and bias", match_bn, apply_splice),
    Rule("BatchNormalization+Conv", Side.CONSUMER, "Conv", _ANY_AFFINE, _SAME_LAYOUT,
         "before a Conv that pads nothing: W' = W * s[c], b' = b + sum W * t[c]", match_next_conv, apply_bypass),
    Rule("BatchNormalization+ConvTranspose", Side.CONSUMER, "ConvTranspose", _ANY_AFFINE, _SAME_LAYOUT,
         "a pure scale before a ConvTranspose: W'[i] = s[i] * W[i] (a shift is left)",
         match_next_conv_transpose, apply_bypass),
    Rule("BatchNormalization+Gemm", Side.CONSUMER, "Gemm", _ANY_AFFINE, _TOWARDS_LINEAR,
         "on A's contracted axis (through Flatten/Reshape: row k reads channel k // inner): "
         "rows of op(B) scaled, C' = beta * C + alpha * t @ op(B)", match_next_gemm, apply_next_gemm),
    Rule("BatchNormalization+MatMul", Side.CONSUMER, "MatMul", _ANY_AFFINE, _TOWARDS_LINEAR,
         "on x's last axis: rows of W[K, N] scaled, t @ W into the bias Add after it (or a new Add)",
         match_next_matmul, apply_next_matmul),
)  # fmt: skip


def rules_for(side: Side, target: onnx.NodeProto, affine_op: str) -> list[Rule]:
    """The registered rules that may fold an ``affine_op`` into ``target`` from ``side``."""
    if not is_standard(target):
        return []
    return [r for r in REGISTRY if r.side is side and r.target == target.op_type and affine_op in r.affine]


def consumer_targets() -> frozenset[str]:
    """Op types some consumer rule folds into."""
    return frozenset(r.target for r in REGISTRY if r.side is Side.CONSUMER)
