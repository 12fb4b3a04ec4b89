"""A read-and-edit view of one ONNX graph: producers, consumers, constants, ranks.

Structural edits (removing and inserting nodes) are queued and applied once by
:meth:`GraphView.commit`, so node references stay valid while folds run.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import ModelLoadError
from bnfold.fold import consteval as constants
from bnfold.fold.report import Reason, Rejected

_MISSING = object()
_TYPE_ONLY_OPS = frozenset(op for op, _ in constants.TYPE_ONLY)

# Reads the bytes of one external tensor (location and bounds validated by the caller's I/O layer).
ExternalReader = Callable[[onnx.TensorProto], bytes]


class ValueSink(Protocol):
    """Where big folded values go instead of into the model (the output's data file)."""

    def put(self, t: onnx.TensorProto, value: np.ndarray, name: str) -> bool:
        """Take ``value`` as tensor ``name``, making ``t`` a reference to it; False to embed it."""
        ...

    def lend(self, shape: tuple[int, ...], dtype: np.dtype, source: np.ndarray | None = None) -> np.ndarray | None:
        """Uninitialized memory for a value about to be :meth:`put` (None: allocate it as usual).

        With ``source`` (a weight whose values the caller gives up), ``source`` itself when
        its memory is a read buffer the sink's reader may see overwritten; else None.
        """
        ...


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def graph_and_nested(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes, at any depth (iterative)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for n in g.node:
            stack.extend(subgraphs(n))


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a graph (and its nested graphs) reads, including outer-scope names."""
    names: set[str] = set()
    for g in graph_and_nested(graph):
        for n in g.node:
            names.update(i for i in n.input if i)
        names.update(o.name for o in g.output)
    return names


@dataclass
class ModelContext:
    """Model-wide facts shared by the views of all graphs."""

    opset: int
    ir_version: int
    read_external: ExternalReader | None = None  # None: the model has no external data
    freeze_initializer_inputs: bool = False
    value_types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    used_names: set[str] = field(default_factory=set)
    # Unrounded float64 values of tensors a fold wrote while a chain of folds goes on
    # (Conv -> BN -> Mul -> Add): the next fold starts from them, so each weight is
    # rounded once, at the end of its chain.
    exact: dict[str, np.ndarray] = field(default_factory=dict)
    sink: ValueSink | None = None  # where big folded values go (the output's data file)

    def fresh_name(self, base: str) -> str:
        """A tensor name not used anywhere in the model."""
        name, k = base, 0
        while name in self.used_names:
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name


class GraphView:
    """Producers, consumers and constants of one graph, with queued edits."""

    def __init__(
        self, graph: onnx.GraphProto, ctx: ModelContext, outer: GraphView | None = None, path: str = "main"
    ) -> None:
        self.graph = graph
        self.ctx = ctx
        self.outer = outer
        self.path = path
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            self._add_uses(n)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self._cache: dict[str, np.ndarray | None] = {}
        self._has_subgraphs: bool | None = None  # see owns_initializer
        # Tensors left non-constant because evaluating them would pass the size bound: why.
        self.oversized: dict[str, str] = {}
        # Per-view memo tables of derived facts (ranks along chains, ...), by kind.
        self.memo: dict[str, dict] = {}
        self.removed: set[int] = set()
        self.inserted: dict[int, list[int]] = {}  # position -> positions of nodes inserted after it
        self.new_initializers: list[onnx.TensorProto] = []
        self.dropped_initializers: set[str] = set()
        self.disconnected: set[str] = set()
        self.vanished: set[str] = set()

    # ---- structure -------------------------------------------------------
    def _add_uses(self, n: onnx.NodeProto) -> None:
        for i in n.input:
            if i:
                self.consumers[i].append(n)
        # A nested graph reading an outer name is a use by the enclosing node.
        for g in subgraphs(n):
            for name in graph_reads(g):
                self.consumers[name].append(n)

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Distinct live nodes reading ``name`` (directly or from a nested graph)."""
        seen: dict[int, onnx.NodeProto] = {}
        for n in self.consumers.get(name, ()):
            if id(n) not in seen and self.position[id(n)] not in self.removed:
                seen[id(n)] = n
        return list(seen.values())

    def type_only_readers(self, name: str) -> list[onnx.NodeProto]:
        """Live nodes that read nothing of ``name`` but its dtype (the target of a CastLike).

        A raw dynamo export casts a bias-free Conv's zero bias like the Conv's input;
        such a reader does not stop a fold that keeps the dtype (it is pointed elsewhere).
        """
        return [
            u
            for u in self.users(name)
            # the op check first: a Sum or Concat with thousands of inputs is never scanned
            if u.op_type in _TYPE_ONLY_OPS
            and all((u.op_type, k) in constants.TYPE_ONLY for k, i in enumerate(u.input) if i == name)
            and not any(name in graph_reads(g) for g in subgraphs(u))
        ]

    def value_users(self, name: str) -> list[onnx.NodeProto]:
        """:meth:`users` less :meth:`type_only_readers`: the nodes that read the values of ``name``."""
        skip = {id(u) for u in self.type_only_readers(name)}
        return [u for u in self.users(name) if id(u) not in skip]

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def only_consumer(self, name: str, node: onnx.NodeProto, shape_readers: bool = False) -> bool:
        """True when ``node`` is the single reader of ``name`` and ``name`` is no graph output.

        With ``shape_readers``, Shape and Size nodes do not count as readers: they see
        only the shape, which a fold that keeps the tensor keeps too (torch exports
        read ``Shape`` of a MatMul output to reshape tokens back).  Stops at the
        first other reader.
        """
        if self.is_graph_output(name):
            return False
        found = False
        for n in self.consumers.get(name, ()):
            if self.position[id(n)] in self.removed:
                continue
            if shape_readers and n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx"):
                continue
            if n is not node:
                return False
            found = True
        return found

    def sole_user(self, name: str) -> onnx.NodeProto | None:
        """The one live node reading ``name`` (None when none or several), stopping at the second."""
        one: onnx.NodeProto | None = None
        for n in self.consumers.get(name, ()):
            if self.position[id(n)] in self.removed or n is one:
                continue
            if one is not None:
                return None
            one = n
        return one

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        if n is None or self.position[id(n)] in self.removed:
            return None
        return n

    # ---- constants -------------------------------------------------------
    def is_overridable(self, name: str) -> bool:
        """An initializer that is also a graph input can be fed at run time (IR >= 4)."""
        return name in self.inputs and self.ctx.ir_version >= 4 and not self.ctx.freeze_initializer_inputs

    def constant(self, name: str) -> np.ndarray | None:
        """Value of ``name`` when it is a constant (initializer, Constant, constant subgraph).

        Evaluates the inputs first with an explicit stack, never by recursion: a
        chain of thousands of Identity nodes making a BN parameter is fine.
        """
        if not name:
            return None
        hit = self._cache.get(name, _MISSING)
        if hit is not _MISSING:
            return hit  # type: ignore[return-value]
        # Iterative post-order walk (a constant chain may be thousands of ops long):
        # a name is computed once every input it reads the value of is cached.
        stack, on_stack = [name], {name}
        while stack:
            top = stack[-1]
            pending = None
            for i in self._value_inputs(top):
                v = self._cache.get(i, _MISSING)
                if v is None:
                    break  # an input is no constant: _compute_constant says None (and why)
                if v is _MISSING:
                    pending = i
                    break
            if pending is not None and pending not in on_stack:
                stack.append(pending)
                on_stack.add(pending)
                continue
            stack.pop()
            on_stack.discard(top)
            # With a cycle (an invalid graph) the input still pending reads as no constant.
            self._cache[top] = None if pending is not None else self._compute_constant(top)
        return self._cache[name]  # type: ignore[return-value]

    def owns_initializer(self, name: str) -> bool:
        """``name`` is an initializer of this top-level graph, which holds no subgraph (no other view reads it)."""
        if self.outer is not None or name not in self.initializers:
            return False
        if self._has_subgraphs is None:  # folds never add one: computed once
            self._has_subgraphs = any(True for n in self.nodes for _ in subgraphs(n))
        return not self._has_subgraphs

    def forget_constants_sharing(self, value: np.ndarray) -> None:
        """Drop every cached constant whose memory overlaps ``value`` (about to be overwritten)."""
        # An array that owns its memory (no base) is never a view of another one's buffer.
        for name, v in list(self._cache.items()):
            if isinstance(v, np.ndarray) and v.base is not None and np.may_share_memory(v, value):
                del self._cache[name]

    def reject_if_oversized(self, name: str) -> None:
        """Raise ``constant_too_large`` when ``name`` is no constant only because of the evaluation size bound."""
        why = self.oversized.get(name)
        if why is not None:
            raise Rejected(Reason.CONSTANT_TOO_LARGE, f"'{name}' is not evaluated as a constant: {why}")

    def _value_inputs(self, name: str) -> list[str]:
        """Names of this graph whose constant values :meth:`_compute_constant` reads for ``name``."""
        if name in self.initializers:
            return []
        node = self.producer.get(name)
        if node is None or node.op_type not in constants.EVALUATORS or list(node.output).index(name) != 0:
            return []
        return [
            i
            for k, i in enumerate(node.input)
            if i
            and not (node.op_type in constants.SHAPE_ONLY and k == 0)
            and not ((node.op_type, k) in constants.TYPE_ONLY and self.tensor_dtype(i))
        ]

    def _compute_constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            if self.is_overridable(name):
                return None
            return tensor_value(self.initializers[name], self.ctx.read_external)
        node = self.producer.get(name)
        if node is None:
            if name in self.inputs or self.outer is None:
                return None
            return self.outer.constant(name)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    return tensor_value(a.t, self.ctx.read_external)  # saved with convert_attribute=True
            return constants.evaluate(node, [], self.ctx.opset)
        if node.op_type not in constants.EVALUATORS or list(node.output).index(name) != 0:
            return None
        values: list[np.ndarray | None] = []
        for k, i in enumerate(node.input):
            if not i:
                values.append(None)
                continue
            v: np.ndarray | None
            if node.op_type in constants.SHAPE_ONLY and k == 0:
                shape = self.static_shape(i)
                # A zero-strided stand-in: only the shape is read, nothing is allocated.
                v = (
                    np.broadcast_to(np.zeros((), dtype=np.uint8), shape)
                    if shape is not None and all(d >= 0 for d in shape)
                    else None
                )
            elif (node.op_type, k) in constants.TYPE_ONLY and (dtype := self.tensor_dtype(i)):
                v = constants.empty_of_type(dtype)
            else:
                v = self.constant(i)
            if v is None:
                if i in self.oversized:
                    self.oversized[name] = self.oversized[i]
                return None
            values.append(v)
        try:
            return constants.evaluate(node, values, self.ctx.opset)
        except constants.ConstantTooLarge as e:
            self.oversized[name] = str(e)
            return None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """Fully known shape of a tensor (from a constant or from shape inference)."""
        t = self.initializers.get(name)
        if t is not None:
            return tuple(t.dims)
        c = self.constant(name)
        if c is not None:
            return c.shape
        tp = self.ctx.value_types.get(name)
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dims = tp.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            return tuple(d.dim_value for d in dims)
        return None

    def rank(self, name: str) -> int | None:
        """Rank of a tensor from shape inference (never from declared value_info), or None."""
        tp = self.ctx.value_types.get(name)
        if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape"):
            return len(tp.tensor_type.shape.dim)
        c = self.constant(name) if name in self.initializers or name in self.producer else None
        return None if c is None else c.ndim

    def dims(self, name: str) -> list[int | None] | None:
        """Dims of a tensor (None for each unknown one) when its rank is known, else None."""
        tp = self.ctx.value_types.get(name)
        if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]
        shape = self.static_shape(name) if name in self.initializers or name in self.producer else None
        return None if shape is None else list(shape)

    def tensor_dtype(self, name: str) -> int | None:
        """ONNX element type of a tensor when known."""
        t = self.initializers.get(name)
        if t is not None:
            return t.data_type
        tp = self.ctx.value_types.get(name)
        if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.elem_type:
            return tp.tensor_type.elem_type
        return None

    # ---- edits -----------------------------------------------------------
    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        """Queue a new ``node`` right after ``anchor`` (it produces and reads from now on)."""
        self.nodes.append(node)
        k = len(self.nodes) - 1
        self.position[id(node)] = k
        self.inserted.setdefault(self.position[id(anchor)], []).append(k)
        for o in node.output:
            if o:
                self.producer[o] = node
                self._cache.pop(o, None)
        self._add_uses(node)

    def remove(self, node: onnx.NodeProto) -> None:
        """Queue ``node`` for removal; its inputs may become dead."""
        self.removed.add(self.position[id(node)])
        self.disconnected.update(i for i in node.input if i)

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Point input ``index`` of ``node`` at ``name`` (appending empty slots as needed)."""
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        if old:
            self.consumers[old] = [n for n in self.consumers[old] if n is not node]
            self.disconnected.add(old)
        node.input[index] = name
        self.consumers[name].append(node)

    def replace_inputs(self, node: onnx.NodeProto, names: list[str]) -> None:
        """Give ``node`` a whole new input list (old inputs may become dead)."""
        for old in node.input:
            if old:
                self.consumers[old] = [n for n in self.consumers[old] if n is not node]
                self.disconnected.add(old)
        del node.input[:]
        node.input.extend(names)
        for name in names:
            if name:
                self.consumers[name].append(node)

    def vanish(self, name: str) -> None:
        """Note that tensor ``name`` no longer exists (its value_info goes)."""
        self.vanished.add(name)

    def rename_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Make ``node`` produce ``name`` (taking over a removed node's output)."""
        self.producer.pop(node.output[index], None)
        node.output[index] = name
        self.producer[name] = node
        self._cache.pop(name, None)

    def add_constant(self, base: str, value: np.ndarray) -> str:
        """Add a new initializer with a fresh name; return the name."""
        name = self.ctx.fresh_name(base)
        t = onnx.TensorProto()
        set_tensor_value(t, value, name, self.ctx.sink)
        self.new_initializers.append(t)
        self.initializers[name] = t
        # Not cached: the proto holds the value; a second numpy copy of every folded
        # weight would double the memory a fold needs.  A later read decodes it again.
        self._cache.pop(name, None)
        return name

    def replace_constant(self, name: str, value: np.ndarray, base: str, reader: onnx.NodeProto) -> str:
        """New value for a constant read by ``reader``.

        Overwrites the initializer in place when ``reader`` is its only reader;
        otherwise (shared, outer scope, Constant node, constant subgraph) adds a
        private copy under a fresh name.
        """
        t = self.initializers.get(name)
        # In IR < 4 every initializer is listed as an input by convention (still a
        # constant): overwrite it in place too, so names and input order stay.
        listed_by_convention = self.ctx.ir_version < 4
        if t is not None and self.only_consumer(name, reader) and (name not in self.inputs or listed_by_convention):
            set_tensor_value(t, value, name, self.ctx.sink)
            self._cache.pop(name, None)  # not cached: see add_constant
            if name in self.inputs:
                self._retype_input(name, t)
            return name
        return self.add_constant(base, value)

    def _retype_input(self, name: str, t: onnx.TensorProto) -> None:
        """Make the graph-input entry of an IR < 4 initializer match its (possibly reshaped) value."""
        for i in self.graph.input:
            if i.name == name:
                i.type.CopyFrom(onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))

    def live_nodes(self) -> Iterator[onnx.NodeProto]:
        for i, n in enumerate(self.nodes):
            if i not in self.removed:
                yield n

    def commit(self) -> None:
        """Apply queued edits to the graph and drop constants nothing reads any more."""
        self._remove_dead_constants()
        self._drop_value_info()
        if self.removed or self.inserted:
            self._reorder_nodes()
        if self.ctx.ir_version < 4 and self.outer is not None:
            # IR < 4 lists initializers among the graph inputs, but a nested graph's
            # inputs are its formal parameters (Loop/Scan state): use Constant nodes.
            for k, t in enumerate(self.new_initializers):
                self.graph.node.insert(k, onnx.helper.make_node("Constant", [], [t.name], value=t))
            self.new_initializers = []
        self.graph.initializer.extend(self.new_initializers)
        if self.ctx.ir_version < 4:
            # IR < 4 convention: every initializer is also listed as a graph input.
            for t in self.new_initializers:
                self.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        self._drop_initializers()

    def _reorder_nodes(self) -> None:
        """Apply queued removals and insertions to ``graph.node`` in one sort (no node is copied but the new)."""
        n_original = len(self.graph.node)
        order: list[int] = []
        pending = list(range(n_original - 1, -1, -1))
        while pending:
            i = pending.pop()
            order.append(i)
            pending.extend(reversed(self.inserted.get(i, [])))
        rank: dict[int, int] = {}
        added: list[onnx.NodeProto] = []  # held, so their ids stay theirs while sorting
        gone = len(order) + 1
        for k, i in enumerate(order):
            if i >= n_original:
                new = self.graph.node.add()
                new.CopyFrom(self.nodes[i])
                added.append(new)
                rank[id(new)] = gone if i in self.removed else k
            else:
                rank[id(self.nodes[i])] = gone if i in self.removed else k
        live = sum(1 for r in rank.values() if r != gone)
        self.graph.node.sort(key=lambda n: rank[id(n)])
        del self.graph.node[live:]

    def _remove_dead_constants(self) -> None:
        """Remove Constant/constant-subgraph nodes and initializers that folds disconnected."""
        work = list(self.disconnected)
        while work:
            name = work.pop()
            if self.users(name) or self.is_graph_output(name):
                continue
            node = self.producer_of(name)
            if node is not None:
                if node.op_type != "Constant" and node.op_type not in constants.EVALUATORS:
                    continue
                if any(self.users(o) or self.is_graph_output(o) for o in node.output if o):
                    continue
                if self.constant(node.output[0]) is None and node.op_type != "Constant":
                    continue
                self.remove(node)
                work.extend(i for i in node.input if i)
            elif name in self.initializers:
                self.dropped_initializers.add(name)

    def _drop_initializers(self) -> None:
        drop = self.dropped_initializers
        if not drop:
            return
        _keep_only(self.graph.initializer, drop)
        # An initializer listed as a graph input goes with its input entry
        # (nothing reads it; leaving the input would make it a required feed).
        _keep_only(self.graph.input, drop)
        _keep_only(self.graph.value_info, drop)

    def _drop_value_info(self) -> None:
        gone = self.vanished
        for n in self.nodes:
            if self.position[id(n)] in self.removed:
                gone |= {o for o in n.output if o}
        live = {o for n in self.live_nodes() for o in n.output}
        gone -= live
        if gone:
            _keep_only(self.graph.value_info, gone)


def _keep_only(field: Any, drop: set[str]) -> None:
    """Remove the entries named in ``drop`` from a repeated proto field.

    A stable sort moves them to the end, then one slice goes: O(n log n), where
    deleting entries one by one is O(n) each, and no entry is copied.
    """
    kept = sum(1 for e in field if e.name not in drop)
    if kept == len(field):
        return
    field.sort(key=lambda e: e.name in drop)
    del field[kept:]


def set_tensor_value(t: onnx.TensorProto, value: np.ndarray, name: str, sink: ValueSink | None = None) -> None:
    """Make ``t`` the tensor ``name`` holding ``value`` (replacing any external reference).

    With a ``sink``, a big value is written to the sink's data file and ``t`` refers to
    it; otherwise ``t`` embeds it: the same result as
    ``t.CopyFrom(numpy_helper.from_array(value, name))``, with one copy of the data fewer
    for the common little-endian float types.
    """
    value = np.asarray(value)
    if sink is not None and sink.put(t, value, name):
        return
    dtype = _SIMPLE_DTYPES.get(value.dtype)
    if dtype is None or value.dtype.byteorder == ">":
        t.CopyFrom(numpy_helper.from_array(value, name))
        return
    t.Clear()
    t.name = name
    t.data_type = dtype
    t.dims.extend(value.shape)
    t.raw_data = np.ascontiguousarray(value).tobytes()


_SIMPLE_DTYPES = {
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
}


def tensor_value(t: onnx.TensorProto, read_external: ExternalReader | None) -> np.ndarray:
    """numpy value of an initializer, reading external data with ``read_external`` when needed.

    Raises:
        ModelLoadError: the tensor's data does not match its dtype and shape.
    """
    try:
        return _tensor_value(t, read_external)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"invalid model: tensor '{t.name}': {e}") from e


def _tensor_value(t: onnx.TensorProto, read_external: ExternalReader | None) -> np.ndarray:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    if read_external is None:
        raise ValueError("its data is external and no reader was given")
    # Only this tensor's bytes, never the whole file.
    raw = read_external(t)
    if sys.byteorder == "little" and t.data_type in _FROMBUFFER_TYPES:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))
    proxy = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    proxy.raw_data = raw
    return numpy_helper.to_array(proxy)


_FROMBUFFER_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


def infer_value_types(model: onnx.ModelProto, max_inline: int = 1024) -> dict[str, onnx.TypeProto]:
    """Types and shapes of every tensor that onnx shape inference can tell, by name.

    Runs on a skeleton of the model (large initializers replaced by typed graph
    inputs), so it works on models of any size without copying their weights.
    The skeleton keeps the graph inputs (the contract onnxruntime checks feeds
    against) but not the model's value_info nor the shapes declared for its
    outputs: those are claims a fold must not trust (a value_info that lies about
    a rank would turn a per-W constant into a "per-channel" one).
    Returns an empty dict when inference fails.
    """
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    for o in g.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
    listed = {i.name for i in src.input}
    for t in src.initializer:
        small = t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= max_inline
        if small:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; ranks then come from weights
        return {}
    types: dict[str, onnx.TypeProto] = {}
    for graph in graph_and_nested(inferred.graph):
        for v in (*graph.input, *graph.output, *graph.value_info):
            types.setdefault(v.name, v.type)
    return types


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in a graph and its nested graphs."""
    names: set[str] = set()
    for g in graph_and_nested(graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
            names.add(n.name)
    return names
