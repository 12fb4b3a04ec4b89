"""Channel tracking through layout ops: where a weighted op's channel axis ends up.

Between a weighted op and an affine op, exporters put ops that only move data:
Identity, Dropout (inference), Transpose, Squeeze, Unsqueeze, Reshape, Flatten.
:func:`path_up` and :func:`path_down` find the layout ops between two nodes;
:func:`follow` maps a :class:`Pos` (the axis a channel index lives on) through
one of them, or says why the channel does not survive it (dropped, merged,
split over axes).  Positions are exact facts derived from the ops' attributes,
constants and inferred shapes, never from declared value_info.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold.graph import GraphView
from bnfold.fold.nodes import attr, display_name, is_standard
from bnfold.fold.report import Reason, Rejected

LAYOUT_OPS = ("Identity", "Dropout", "Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten")


@dataclass(frozen=True)
class Pos:
    """Channel ``c`` of an element at index ``k`` of ``axis`` is ``(k // inner) % C``.

    ``inner`` > 1 when the channel axis was merged with the axes after it
    (Flatten of NCHW: ``inner = H*W``); ``outer`` is how often the channel block
    repeats along the axis (1: the axis is the channels and ``inner`` only;
    None: unknown).  ``rank`` is None while unknown; ``axis`` is then negative
    (counted from the end).
    """

    axis: int
    rank: int | None
    inner: int = 1
    outer: int | None = 1

    @property
    def alone(self) -> bool:
        """The channel is an axis of its own (extent C)."""
        return self.inner == 1 and self.outer == 1

    def index(self) -> int | None:
        """The non-negative axis index, when the rank is known."""
        if self.rank is None:
            return self.axis if self.axis >= 0 else None
        return self.axis % self.rank


def is_layout(view: GraphView, node: onnx.NodeProto | None) -> bool:
    """A layout op that only moves data in inference (a Dropout whose mask nothing reads)."""
    if node is None or not is_standard(node, *LAYOUT_OPS) or not node.input or not node.output:
        return False
    if node.op_type == "Dropout":
        if view.ctx.opset < 7 and not attr(node, "is_test", 0):
            return False
        if len(node.input) > 2 and node.input[2]:
            mode = view.constant(node.input[2])
            if mode is None or bool(np.any(mode)):
                return False
        if any(o and (view.users(o) or view.is_graph_output(o)) for o in node.output[1:]):
            return False
    return True


def path_up(view: GraphView, name: str) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The first non-layout op making ``name`` and the layout ops after it, in data-flow order."""
    path: list[onnx.NodeProto] = []
    seen: set[int] = set()
    node = view.producer_of(name)
    while node is not None and is_layout(view, node) and id(node) not in seen:
        seen.add(id(node))
        path.append(node)
        node = view.producer_of(node.input[0])
    path.reverse()
    return node, path


def path_down(
    view: GraphView, name: str, first: onnx.NodeProto
) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto], str | None]:
    """The layout ops reading ``name`` one after another (``first`` reads it), and the node after them.

    Returns ``(target, path, shared)``: ``shared`` names the first tensor on the way
    (after ``name``) that has several readers or is a graph output; the walk stops
    there and ``target`` is None.
    """
    path: list[onnx.NodeProto] = []
    seen: set[int] = set()
    node: onnx.NodeProto | None = first
    while node is not None and is_layout(view, node) and id(node) not in seen and node.input[0] == name:
        seen.add(id(node))
        path.append(node)
        name = node.output[0]
        nxt = view.sole_user(name)
        if view.is_graph_output(name) or (nxt is None and view.users(name)):
            return None, path, name
        node = nxt
    return node, path, None


def _ints(view: GraphView, node: onnx.NodeProto, index: int, name: str, since: int) -> list[int] | None:
    """An int-list operand given as attribute ``name`` before opset ``since``, as input ``index`` from it."""
    if view.ctx.opset < since:
        v = attr(node, name)
        return None if v is None else [int(a) for a in v]
    if len(node.input) <= index or not node.input[index]:
        return None
    c = view.constant(node.input[index])
    if c is None:
        raise Rejected(Reason.UNKNOWN_SHAPE, f"the {name} of {display_name(node)} are not constant")
    return [int(a) for a in np.asarray(c).reshape(-1)]


def _need_rank(pos: Pos, node: onnx.NodeProto) -> int:
    if pos.rank is None:
        raise Rejected(Reason.UNKNOWN_RANK, f"the rank of the input of {display_name(node)} is unknown")
    return pos.rank


def _known_dims(view: GraphView, name: str, rank: int, node: onnx.NodeProto) -> list[int | None]:
    dims = view.dims(name)
    if dims is None or len(dims) != rank:
        raise Rejected(Reason.UNKNOWN_SHAPE, f"the shape of '{name}' before {display_name(node)} is unknown")
    return dims


def _stride(view: GraphView, pos: Pos, node: onnx.NodeProto) -> tuple[int, list[int | None]]:
    """Elements after one channel step in flat (row-major) order, and the input's dims."""
    rank = _need_rank(pos, node)
    dims = _known_dims(view, node.input[0], rank, node)
    after = dims[pos.axis % rank + 1 :]
    if any(d is None for d in after):
        raise Rejected(Reason.UNKNOWN_SHAPE, f"the dims after the channel axis of '{node.input[0]}' are unknown")
    return pos.inner * math.prod(d for d in after if d is not None), dims


def _regroup(stride: int, channels: int, out: list[int | None], node: onnx.NodeProto) -> Pos:
    """Where the channel lands in output dims ``out`` (None unknown), given its flat stride.

    The channel digit spans flat strides ``[stride, stride * C)``; it stays on one
    axis ``j`` when that axis covers the whole span (``acc <= stride`` and
    ``stride * C <= acc * d``, ``acc`` being the product of the dims after ``j``).
    """
    acc = 1
    block = stride * channels
    for j in range(len(out) - 1, -1, -1):
        d = out[j]
        if d is None and j > 0:
            raise Rejected(Reason.UNKNOWN_SHAPE, f"the output shape of {display_name(node)} is not known")
        if d is not None and acc * d < block:
            acc *= d
            continue
        if acc > stride or stride % acc:
            break
        inner = stride // acc
        if d is None:
            return Pos(j, len(out), inner, None)
        if (acc * d) % block:
            break
        return Pos(j, len(out), inner, d // (channels * inner))
    raise Rejected(Reason.CHANNEL_AXIS_LOST, f"{display_name(node)} splits the {channels} channels over several axes")


def follow(view: GraphView, pos: Pos, node: onnx.NodeProto, channels: int) -> Pos:
    """The channel's position in the output of layout op ``node`` given its position in the input."""
    op = node.op_type
    if op in ("Identity", "Dropout"):
        return pos
    if op == "Transpose":
        perm = attr(node, "perm")
        rank = len(perm) if perm is not None else _need_rank(pos, node)
        if pos.rank is not None and pos.rank != rank:
            raise Rejected(Reason.SHAPE_MISMATCH, f"{display_name(node)} has perm of rank {rank}, not {pos.rank}")
        perm = list(perm) if perm is not None else list(range(rank - 1, -1, -1))
        return Pos(perm.index(pos.axis % rank), rank, pos.inner, pos.outer)
    if op == "Squeeze":
        rank = _need_rank(pos, node)
        axes = _ints(view, node, 1, "axes", 13)
        if axes is None:
            dims = _known_dims(view, node.input[0], rank, node)
            if any(d is None for d in dims):
                raise Rejected(Reason.UNKNOWN_SHAPE, f"{display_name(node)} squeezes axes of unknown size")
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = sorted({a % rank for a in axes})
        axis = pos.axis % rank
        if axis in axes:
            raise Rejected(Reason.CHANNEL_AXIS_LOST, f"{display_name(node)} removes the channel axis {axis}")
        return Pos(axis - sum(a < axis for a in axes), rank - len(axes), pos.inner, pos.outer)
    if op == "Unsqueeze":
        rank = _need_rank(pos, node)
        axes = _ints(view, node, 1, "axes", 13)
        if axes is None:
            raise Rejected(Reason.UNKNOWN_SHAPE, f"{display_name(node)} has no axes")
        out_rank = rank + len(axes)
        new = {a % out_rank for a in axes}
        kept = [i for i in range(out_rank) if i not in new]
        return Pos(kept[pos.axis % rank], out_rank, pos.inner, pos.outer)
    if op == "Flatten":
        rank = _need_rank(pos, node)
        k = attr(node, "axis", 1) % rank if rank else 0
        stride, dims = _stride(view, pos, node)
        tail = dims[k:]
        if any(d is None for d in tail):
            raise Rejected(Reason.UNKNOWN_SHAPE, f"the dims that {display_name(node)} merges are unknown")
        head = dims[:k]
        first = None if any(d is None for d in head) else math.prod(d for d in head if d is not None)
        return _regroup(stride, channels, [first, math.prod(d for d in tail if d is not None)], node)
    if op == "Reshape":
        stride, dims = _stride(view, pos, node)
        target = attr(node, "shape") if view.ctx.opset < 5 else None
        if target is None:
            shape = view.constant(node.input[1]) if len(node.input) > 1 else None
            if shape is None:
                raise Rejected(Reason.UNKNOWN_SHAPE, f"the target shape of {display_name(node)} is not a constant")
            target = [int(d) for d in np.asarray(shape).reshape(-1)]
        out: list[int | None] = []
        for i, d in enumerate(target):
            if d == 0 and not attr(node, "allowzero", 0):
                out.append(dims[i] if i < len(dims) else None)
            else:
                out.append(None if d < 0 else int(d))
        if out.count(None) == 1 and all(d is not None for d in dims):
            total = math.prod(d for d in dims if d is not None)
            known = math.prod(d for d in out if d is not None)
            if known and total % known == 0:
                out[out.index(None)] = total // known
        return _regroup(stride, channels, out, node)
    raise Rejected(Reason.UNSUPPORTED_PRODUCER, f"{op} is no layout op")


def follow_path(view: GraphView, pos: Pos, path: list[onnx.NodeProto], channels: int) -> Pos:
    """:func:`follow` through every node of ``path`` in order."""
    for node in path:
        pos = follow(view, pos, node, channels)
    return pos
