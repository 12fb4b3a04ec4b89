"""Test helpers: run models in onnxruntime with graph optimizations off, compare outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """onnxruntime session with ORT_DISABLE_ALL (so onnxruntime's own Conv+BN fusion is off)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Normal random inputs for every true graph input (symbolic dims become ``dim``)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_close(a: np.ndarray, b: np.ndarray, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """``|a - b| <= atol + rtol * |a|`` elementwise (float16 compared in float32)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a64.shape == b64.shape
    err = np.abs(a64 - b64)
    bad = err > atol + rtol * np.abs(a64)
    assert not bad.any(), f"max abs err {err.max():.3g} at {np.argwhere(bad)[0].tolist()}"


def assert_same_outputs(
    original: onnx.ModelProto, folded: onnx.ModelProto, atol: float = 1e-5, rtol: float = 1e-4, seed: int = 0
) -> None:
    """Run both models on the same random inputs; every output must match."""
    feeds = random_feeds(original, seed)
    for x, y in zip(run(original, feeds), run(folded, feeds), strict=True):
        assert_close(x, y, atol, rtol)


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def run_cli(*args: str, cwd: str | None = None, timeout: float = 300):
    """Run ``python -m bnfold ARGS`` in a real subprocess (bnfold importable from this checkout)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
