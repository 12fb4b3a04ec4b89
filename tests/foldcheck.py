"""Shared assertions for fold tests: fold, check, run both models, compare."""

from __future__ import annotations

import numpy as np
import onnx
import reference as ref
from builders import count_ops
from helpers import assert_close, random_feeds, run
from numpy.typing import DTypeLike

import bnfold

TOL = {
    np.dtype(np.float64): (1e-12, 1e-10),
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (1e-2, 1e-2),
}


def fold_and_check(
    model: onnx.ModelProto,
    *,
    folded: int | None = None,
    left: int = 0,
    dtype: DTypeLike = np.float32,
    feeds: dict[str, np.ndarray] | None = None,
    scale_atol: bool = False,
    **kwargs,
) -> bnfold.FoldResult:
    """Fold ``model``; assert the counts, the full checker and equal onnxruntime outputs.

    ``scale_atol`` multiplies atol by ``max(1, max|output|)`` per output: for exposed
    intermediate tensors far from O(1), float32 rounding scales with the terms summed.
    """
    before = model.SerializeToString()
    result = bnfold.fold_model(model, **kwargs)
    assert model.SerializeToString() == before, "fold_model changed its input"
    n_bn = count_ops(model.graph, "BatchNormalization")
    assert result.report.bn_count == n_bn
    assert count_ops(result.model.graph, "BatchNormalization") == left, result.report.to_dict()
    assert len(result.report.skips) == left, result.report.to_dict()
    if folded is not None:
        assert result.report.bn_folded == folded
    onnx.checker.check_model(result.model, full_check=True)
    atol, rtol = TOL[np.dtype(dtype)]
    feeds = feeds or random_feeds(model)
    a, b = run(model, feeds), run(result.model, feeds)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        scale = max(1.0, float(np.abs(x.astype(np.float64)).max())) if scale_atol and x.size else 1.0
        assert_close(x, y, atol * scale, rtol)
    return result


def abs_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers are replaced by their absolute values."""
    from builders import to_tensor
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == onnx.TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, dtype=np.uint16) & np.uint16(0x7FFF)
            t.raw_data = bits.tobytes()
        else:
            t.CopyFrom(to_tensor(np.abs(numpy_helper.to_array(t)), t.name))
    for n in out.graph.node:
        for a in n.attribute:
            if a.name in ("alpha", "beta") and a.type == onnx.AttributeProto.FLOAT:
                a.f = abs(a.f)
    return out


def reference_compare(original: onnx.ModelProto, folded: onnx.ModelProto, unit_roundoff: float, seed: int = 0) -> None:
    """Evaluate both models in float64 (tests/reference.py) and bound the difference.

    The original computes BN exactly from its stored parameters; the folded model's
    only error is the one rounding of each folded weight and bias to its dtype,
    so ``|y_folded - y_exact| <= u * (sum |w'| |x| + |b'|)`` (u = unit roundoff),
    which the folded model evaluated on ``|x|`` with ``|w'|``, ``|b'|`` gives.
    """
    rng = np.random.default_rng(seed)
    inits = {t.name for t in original.graph.initializer}
    feeds = {}
    for i in original.graph.input:
        if i.name not in inits:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = rng.standard_normal(shape)
    exact = ref.evaluate(original, feeds)
    got = ref.evaluate(folded, feeds)
    bound = ref.evaluate(abs_model(folded), {k: np.abs(v) for k, v in feeds.items()})
    for e, g, bnd in zip(exact, got, bound, strict=True):
        err = np.abs(e - g)
        limit = unit_roundoff * 1.01 * bnd + 1e-12
        assert np.all(err <= limit), f"max err {err.max():.3g}, worst ratio {(err / limit).max():.3g}"
