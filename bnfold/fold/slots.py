"""Weight slots: the constant inputs a fold rewrites, and rounding each of them once.

A rule reads every weight it changes through a :class:`SlotReader` and returns the
new float64 values as :class:`Write` records; it never writes.  The engine then
rounds every write once to its slot's dtype (an overflow rejects the whole fold
before anything changed) and stores them.  While a chain of folds goes on
(Conv -> BN -> Mul -> Add) the float64 values are kept next to the rounded ones,
and the next fold of the chain reads those, so each weight is rounded once, at
the end of its chain, whatever the rule does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold import math as fm
from bnfold.fold.graph import GraphView
from bnfold.fold.nodes import display_name
from bnfold.fold.report import Reason, Rejected


@dataclass(frozen=True)
class Slot:
    """Input ``index`` of ``node``: its current value (None when absent) and the dtype it is stored in.

    ``round_into`` is what a math function may round its product into at once (the
    end of a chain): the dtype, with memory lent by the sink; None while the chain
    goes on (keep float64).
    """

    node: onnx.NodeProto
    index: int
    value: np.ndarray | None
    dtype: np.dtype
    what: str
    base: str
    round_into: fm.RoundInto | None

    def put(self, value: np.ndarray) -> Write:
        """The record that gives this slot ``value`` (float64, or already rounded into ``round_into``)."""
        return Write(self, np.asarray(value))


@dataclass(frozen=True)
class Write:
    """A new value for one slot, not yet rounded nor stored."""

    slot: Slot
    value: np.ndarray


def _float_constant(view: GraphView, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    """Constant value of an optional input; Rejected when present but not a float constant."""
    if len(node.input) <= index or not node.input[index]:
        return None
    v = view.constant(node.input[index])
    if v is None:
        view.reject_if_oversized(node.input[index])
        raise Rejected(
            Reason.NON_CONSTANT_WEIGHT, f"the {what} '{node.input[index]}' of {node.op_type} is not a constant"
        )
    if v.dtype.kind != "f" and str(v.dtype) != "bfloat16":
        raise Rejected(Reason.NON_CONSTANT_WEIGHT, f"the {what} of {node.op_type} has dtype {v.dtype}")
    return v


class SlotReader:
    """Opens the slots of one fold; ``keep_exact`` says whether the chain goes on after it."""

    def __init__(self, view: GraphView, keep_exact: bool) -> None:
        self.view = view
        self.keep_exact = keep_exact
        self._opened: list[tuple[str, np.ndarray]] = []  # (name, stored value) of every slot opened

    def _slot(self, node: onnx.NodeProto, index: int, stored: np.ndarray | None, dtype: np.dtype, what: str,
              base: str) -> Slot:  # fmt: skip
        value = stored
        if stored is not None:
            value = self.view.ctx.exact.get(node.input[index], stored)
            self._opened.append((node.input[index], stored))
        into = None if self.keep_exact else fm.RoundInto(np.dtype(dtype), self._lend)
        return Slot(node, index, value, np.dtype(dtype), what, base, into)

    def _lend(self, shape: tuple[int, ...], dtype: np.dtype, source: np.ndarray) -> np.ndarray | None:
        """Memory for a product: the weight's own buffer when nothing else needs its values, else the sink's."""
        sink = self.view.ctx.sink
        if sink is None:
            return None
        if self._may_overwrite(shape, dtype, source):
            out = sink.lend(shape, dtype, source)
            if out is source:
                # Its values are gone: every cached constant sharing its memory is dropped
                # (a later read decodes the unchanged tensor from its file again).
                self.view.forget_constants_sharing(source)
                return out
        return sink.lend(shape, dtype)

    def _may_overwrite(self, shape: tuple[int, ...], dtype: np.dtype, source: np.ndarray) -> bool:
        """``source`` is one opened weight's values, of the product's layout, read by no other slot."""
        if source.shape != tuple(shape) or source.dtype != dtype or not source.flags.c_contiguous:
            return False
        if not source.flags.writeable:
            return False
        owners = [name for name, v in self._opened if np.may_share_memory(v, source)]
        # One initializer of a graph without subgraphs: no other view can have cached its values.
        return len(owners) == 1 and self.view.owns_initializer(owners[0])

    def weight(self, node: onnx.NodeProto, index: int = 1, what: str = "weight") -> Slot:
        """A constant float input that must be there (Rejected when missing or not constant)."""
        w = _float_constant(self.view, node, index, what)
        if w is None:
            raise Rejected(Reason.NON_CONSTANT_WEIGHT, f"{node.op_type} has no {what} input")
        return self._slot(node, index, w, w.dtype, what, f"{node.input[index]}_bnfold")

    def optional(self, node: onnx.NodeProto, index: int, what: str, dtype: np.dtype, suffix: str) -> Slot:
        """A constant float input that may be absent (then ``value`` is None and it is added as ``dtype``)."""
        v = _float_constant(self.view, node, index, what)
        base = f"{node.input[index]}_bnfold" if v is not None else f"{display_name(node)}_{suffix}_bnfold"
        return self._slot(node, index, v, v.dtype if v is not None else dtype, what, base)


def rounded(x: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round once to ``dtype``; turn overflow into Rejected."""
    try:
        return fm.round_to(x, dtype, what)
    except fm.FoldValueError as e:
        reason = Reason.DTYPE_OVERFLOW if e.code == "dtype_overflow" else Reason.NON_FINITE
        raise Rejected(reason, str(e)) from None


def round_all(writes: list[Write]) -> list[tuple[Write, np.ndarray]]:
    """Every write with its value rounded to its slot's dtype; Rejected at the first that cannot be."""
    return [(w, rounded(w.value, w.slot.dtype, w.slot.what)) for w in writes]


def store(view: GraphView, ready: list[tuple[Write, np.ndarray]], keep_exact: bool) -> None:
    """Store rounded writes (a private copy where the constant is shared); keep float64 values while a chain goes on."""
    for w, value in ready:
        node, index = w.slot.node, w.slot.index
        old = node.input[index] if len(node.input) > index else ""
        name = view.replace_constant(old, value, w.slot.base, node) if old else view.add_constant(w.slot.base, value)
        if name != old:
            view.set_input(node, index, name)
        if keep_exact and w.value.dtype == np.float64:
            view.ctx.exact[name] = w.value
        else:
            view.ctx.exact.pop(name, None)
