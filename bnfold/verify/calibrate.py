"""The model's own rounding noise: the original re-run with its float weights perturbed within their rounding.

A correct fold rounds each folded weight once, so it moves every weight by at most
half an ulp of its dtype (of the exact product); the outputs then move by however
much the model amplifies such rounding.  :class:`Perturber` makes copies of the
original whose weights move by the same kind of amount: each float weight ``w`` is
displaced by ``d``, uniform in ``±ulp(w)/2``, and rounded back to its dtype
*stochastically* (to ``w`` or to its neighbour towards ``w + d``, with probability
proportional to nearness), so the expected weight is unchanged and each moves to a
neighbouring value with probability 1/4 (standard deviation ulp/2, against ulp/√12
for a fold's round-to-nearest: the same order; the factor is measured on top).

Only tensors a fold can change are perturbed: float initializers and ``Constant``
values read by Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, Mul, Add, Sub
and Div.  Shape-like floats (Resize scales, values cast to integers) are left
alone: half an ulp there can change a shape or an index, which no fold does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.onnxio.tensors import is_external
from bnfold.verify.evaluator import tensor_array
from bnfold.verify.tolerances import is_float

PERTURBED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "Sub", "Div"})
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _graphs(graph: onnx.GraphProto):
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def nudge(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``a`` with each finite nonzero value moved one ulp up in magnitude with probability 1/8,
    one ulp down with probability 1/8 (a half-ulp displacement, stochastically rounded)."""
    a = np.ascontiguousarray(a)
    if a.size == 0 or a.dtype.itemsize not in _UINT:
        return a
    uint = _UINT[a.dtype.itemsize]
    bits = a.view(uint)
    u = rng.random(a.shape)
    wide = a.astype(np.float64)
    movable = np.isfinite(wide) & (wide != 0)
    up = ((u < 0.125) & movable).astype(uint)
    down = ((u >= 0.125) & (u < 0.25) & movable).astype(uint)
    out = (bits + up - down).view(a.dtype)  # sign-magnitude: bits +- 1 is the next value in magnitude
    return np.where(np.isfinite(out.astype(np.float64)), out, a).astype(a.dtype)


class Perturber:
    """Copies of a model with the weights a fold can touch perturbed (see the module docstring).

    Args:
        model: the original (its external tensors stay external unless perturbed).
        base_dir: the folder its external data is relative to.

    The same ModelProto is returned by every :meth:`model` call, with new values.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | None) -> None:
        self.base_dir = base_dir
        self.model_proto = onnx.ModelProto()
        self.model_proto.CopyFrom(model)
        self._targets: list[tuple[onnx.TensorProto, np.ndarray]] = []
        for graph in _graphs(self.model_proto.graph):
            read = {i for n in graph.node if n.op_type in PERTURBED_OPS for i in n.input if i}
            tensors = [t for t in graph.initializer if t.name in read]
            tensors += [
                a.t
                for n in graph.node
                if n.op_type == "Constant" and n.output and n.output[0] in read
                for a in n.attribute
                if a.name == "value" and a.HasField("t")
            ]
            for t in tensors:
                if not _float_tensor(t):
                    continue
                if is_external(t) and base_dir is None:
                    continue
                self._targets.append((t, tensor_array(t, base_dir)))

    @property
    def count(self) -> int:
        """Number of tensors perturbed."""
        return len(self._targets)

    def model(self, seed: int, run: int) -> onnx.ModelProto:
        """The model with every target tensor perturbed, reproducibly for ``(seed, run)``."""
        rng = np.random.default_rng([seed, 0x6E6F697365, run])  # "noise"
        for t, arr in self._targets:
            new = numpy_helper.from_array(nudge(arr, rng), t.name)
            t.CopyFrom(new)
        return self.model_proto


def _float_tensor(t: onnx.TensorProto) -> bool:
    try:
        return is_float(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        return False
