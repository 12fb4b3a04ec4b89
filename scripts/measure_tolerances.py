"""Measure how far correct and deliberately wrong folds move model outputs (the basis of bnfold's tolerances).

For each model (and dtype): fold it correctly and compare with the original; then,
for up to ``--wrong`` of its folds, fold again with that one fold corrupted (one
output channel's scale doubled) and compare.  Printed per model: the largest
absolute error, that error relative to the output's largest magnitude, and the
smallest ``atol`` that passes at several ``rtol`` values (as polygraphy reports
it); for wrong folds the smallest of these over the folds tried.  Then whether
the correct fold passes bnfold's default tolerance and how many wrong folds it
catches (a wrong fold in a channel that a later ReLU or saturated activation
zeroes cannot change the outputs, and no tolerance catches it).

    python scripts/measure_tolerances.py                       # bundled samples, all dtypes
    python scripts/measure_tolerances.py det.onnx --input-shape x:1,3,640,640 --dtypes float32

The PaddleOCR models of the README table come from the rapidocr-onnxruntime wheel:
``pip download --no-deps rapidocr-onnxruntime==1.4.4`` and unzip its
``rapidocr_onnxruntime/models/*.onnx``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bnfold import fold_model, patterns
from bnfold.inputs import InputOptions, parse_input_shape
from bnfold.verify import DEFAULT_TOLERANCES, Verifier, VerifyOptions

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SAMPLES = ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx"]
RTOLS = (1e-3, 1e-2, 1e-1)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


def steep_head(offset: float = 2e4, k: float = 5.0, seed: int = 0) -> onnx.ModelProto:
    """A model that amplifies rounding: Conv whose outputs sit near ``offset``, a BN that
    subtracts a running mean near ``offset`` and scales by ~``k``, then a Sigmoid.

    float32 holds ``offset`` to ~``offset * 6e-8``; that rounding, moved from the BN's
    subtraction into the folded bias, reaches the sigmoid's steep middle amplified by
    ``k`` (the mechanism of the PP-OCRv4 detector's differentiable-binarization head).
    At ``offset`` 1e4 to 2e4 a correct fold moves the outputs by 1.6e-3 to 7e-3.
    """
    rng = np.random.default_rng(seed)
    c = 8
    arrays = {
        "w": rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c),
        "b": np.full(c, offset),
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.normal(0, 0.1, c),
        "mean": offset + rng.normal(0, 0.1, c),
        "var": rng.uniform(0.5, 2.0, c) / k**2,
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Sigmoid", ["n"], ["y"], name="sigmoid"),
    ]
    g = helper.make_graph(
        nodes,
        "steep_head",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, 32, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c, 32, 32])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def convert(model: onnx.ModelProto, dtype: np.dtype) -> onnx.ModelProto:
    """A float32 model (of plain ops, no Cast/Resize) with every float tensor in ``dtype``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if dtype == np.float32:
        return m
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = elem
    if dtype == ml_dtypes.bfloat16:  # Conv/ConvTranspose take bfloat16 from opset 22
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 22)
        m.ir_version = max(m.ir_version, 10)
    return m


@contextlib.contextmanager
def corrupted(node_name: str, channel: int = 0, factor: float = 2.0):
    """Fold ``node_name`` wrongly: its scale on one output channel is multiplied by ``factor``."""
    original = patterns.Affine.per_channel

    def wrong(self: patterns.Affine, c: int):
        s, t = original(self, c)
        if patterns.display_name(self.node) == node_name:
            s = s.copy()
            s[channel % c] *= factor
        return s, t

    patterns.Affine.per_channel = wrong
    try:
        yield
    finally:
        patterns.Affine.per_channel = original


def errors(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    """Largest abs error, that over the output's largest magnitude, min atol per rtol (worst output)."""
    out = {"abs": 0.0, "scaled": 0.0, **{f"atol@{r:g}": 0.0 for r in RTOLS}}
    for rt, gt in zip(ref, got, strict=True):
        for a, b in zip(rt, gt, strict=True):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            err = np.abs(a64 - b64)
            scale = float(np.max(np.abs(a64))) or 1.0
            out["abs"] = max(out["abs"], float(err.max()))
            out["scaled"] = max(out["scaled"], float(err.max()) / scale)
            for r in RTOLS:
                out[f"atol@{r:g}"] = max(out[f"atol@{r:g}"], float(np.max(err - r * np.abs(a64))))
    return out


def passes(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], atol: float, rtol: float) -> bool:
    """``|a - b| <= atol + rtol * |a|`` everywhere."""
    return all(
        bool(np.all(np.abs(np.float64(a) - np.float64(b)) <= atol + rtol * np.abs(np.float64(a))))
        for rt, gt in zip(ref, got, strict=True)
        for a, b in zip(rt, gt, strict=True)
    )


def measure(label: str, model: onnx.ModelProto, shapes: dict, n_wrong: int, trials: int, files: list[str]) -> list[str]:
    inputs = InputOptions(trials=trials if not files else 0, shapes=shapes, files=files)
    opts = VerifyOptions(inputs=inputs)
    started = time.perf_counter()
    v = Verifier(model, opts)
    result = fold_model(model)
    good_out = v.run(result.model)
    good = errors(v.ref_outputs, good_out)
    dt = str(np.asarray(v.ref_outputs[0][0]).dtype)
    tol = DEFAULT_TOLERANCES[dt]
    folds = result.report.folds
    step = max(1, len(folds) // n_wrong) if n_wrong else len(folds) + 1
    chosen = folds[::step][:n_wrong]
    worst_wrong: dict[str, float] | None = None
    caught = 0
    for f in chosen:
        with corrupted(f.node):
            bad_model = fold_model(model).model
        bad_out = v.run(bad_model)
        caught += not passes(v.ref_outputs, bad_out, tol.atol, tol.rtol)
        e = errors(v.ref_outputs, bad_out)
        if worst_wrong is None:
            worst_wrong = e
        else:
            worst_wrong = {k: min(worst_wrong[k], e[k]) for k in e}
    cols = [
        label,
        dt,
        v.engine,
        str(len(folds)),
        f"{good['abs']:.2g}",
        f"{good['scaled']:.2g}",
        *(f"{max(good[f'atol@{r:g}'], 0):.2g}" for r in RTOLS),
        "yes" if passes(v.ref_outputs, good_out, tol.atol, tol.rtol) else "NO",
    ]
    if worst_wrong is None:
        cols += ["0", "-", "-", *("-" for _ in RTOLS), "-"]
    else:
        cols += [
            str(len(chosen)),
            f"{worst_wrong['abs']:.2g}",
            f"{worst_wrong['scaled']:.2g}",
            *(f"{max(worst_wrong[f'atol@{r:g}'], 0):.2g}" for r in RTOLS),
            f"{caught}/{len(chosen)}",
        ]
    cols.append(f"{tol.atol:g}/{tol.rtol:g}")
    cols.append(f"{time.perf_counter() - started:.0f}s")
    return cols


HEADER = [
    "model",
    "dtype",
    "engine",
    "folds",
    "ok: max abs",
    "ok: abs/max|y|",
    *(f"ok: min atol @rtol {r:g}" for r in RTOLS),
    "ok passes defaults",
    "wrong folds",
    "wrong: min abs",
    "wrong: min abs/max|y|",
    *(f"wrong: min atol @rtol {r:g}" for r in RTOLS),
    "wrong caught by defaults",
    "default atol/rtol",
    "time",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="extra float32 models (default: only the bundled samples)")
    ap.add_argument("--input-shape", action="append", default=[], help="NAME:D0,D1,... (repeatable)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64", help="dtypes for the bundled samples")
    ap.add_argument("--wrong", type=int, default=12, help="wrong folds tried per model (spread over its folds)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--inputs", action="append", default=[], help="input .npz for the extra models (repeatable)")
    args = ap.parse_args()
    shapes = dict(parse_input_shape(s) for s in args.input_shape)
    rows = [HEADER]
    if not args.no_samples:
        for name in SAMPLES:
            base = onnx.load(os.path.join(ROOT, "models", name))
            for dt in args.dtypes.split(","):
                rows.append(measure(name, convert(base, DTYPES[dt]), {}, args.wrong, args.trials, []))
                print(" | ".join(rows[-1]), file=sys.stderr)
        for offset in (1e4, 2e4):
            for seed in range(4):
                label = f"steep_head offset={offset:g} seed={seed}"
                rows.append(measure(label, steep_head(offset, seed=seed), {}, args.wrong, args.trials, []))
                print(" | ".join(rows[-1]), file=sys.stderr)
    for path in args.models:
        model = onnx.load(path)
        own = {k: v for k, v in shapes.items() if k in {i.name for i in model.graph.input}}
        rows.append(measure(os.path.basename(path), model, own, args.wrong, args.trials, args.inputs))
        print(" | ".join(rows[-1]), file=sys.stderr)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
