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
    python scripts/measure_tolerances.py --no-samples det.onnx --input-shape x:1,3,640,640 --text-images 3

The PaddleOCR models of the README table come from the rapidocr-onnxruntime wheel:
``pip download --no-deps rapidocr-onnxruntime==1.4.4`` and unzip its
``rapidocr_onnxruntime/models/*.onnx``.  ``--text-images N`` feeds them synthetic
pages of text (a detector fed noise outputs ~0 everywhere, which proves little);
``--float16`` converts them to float16 first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bnfold import fold_model
from bnfold.fold import affine as patterns
from bnfold.fold.nodes import display_name
from bnfold.verify.inputs import InputOptions, parse_input_shape
from bnfold.verify.verifier import DEFAULT_TOLERANCES, Verifier, VerifyOptions

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SAMPLES = ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx"]
RTOLS = (1e-3, 1e-2, 1e-1)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}


def steep_head(
    offset: float = 2e4, k: float = 5.0, seed: int = 0, batch: int | str = "N", size: int = 32
) -> onnx.ModelProto:
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
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, c, size, size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, c, size, size])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def convert(model: onnx.ModelProto, dtype: np.dtype) -> onnx.ModelProto:
    """A float32 model with every float tensor in ``dtype`` (initializers, Constant nodes, Cast
    targets, graph inputs and outputs); Resize's roi and scales stay float32, as the op requires."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if dtype == np.float32:
        return m
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    keep = {n.input[i] for n in m.graph.node if n.op_type == "Resize" for i in (1, 2) if len(n.input) > i}

    def cast(t: onnx.TensorProto) -> None:
        if t.data_type == onnx.TensorProto.FLOAT and t.name not in keep:
            with np.errstate(over="ignore"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))

    for t in m.graph.initializer:
        cast(t)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.name == "value" and n.output[0] not in keep:
                a.t.name = n.output[0]
                cast(a.t)
            if n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = elem
    for v in (*m.graph.input, *m.graph.output):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = elem
    del m.graph.value_info[:]
    if dtype == ml_dtypes.bfloat16:  # Conv/ConvTranspose take bfloat16 from opset 22
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 22)
        m.ir_version = max(m.ir_version, 10)
    return m


# A 5x7 bitmap font: enough strokes for a text detector to see text.
GLYPHS = [
    "01110100011000111111100011000110001",  # A
    "11110100011000111110100011000111110",  # B
    "01110100011000010000100001000101110",  # C
    "11111100001000011110100001000011111",  # E
    "10001100011000111111100011000110001",  # H
    "10000100001000010000100001000011111",  # L
    "01110100011000110001100011000101110",  # O
    "11111001000010000100001000010000100",  # T
    "10001100010101000100010101000110001",  # X
    "00100011000010000100001000010001110",  # 1
]


def text_image(height: int, width: int, rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """``[1, 3, H, W]`` float32: dark glyph lines on a light page, normalized like PaddleOCR inputs."""
    page = np.full((height, width), 235.0)
    glyph_h, glyph_w = 7 * scale, 5 * scale
    line_gap = max(glyph_h + scale, min(12 * scale, height))
    y = min(2 * scale, max(0, height - glyph_h))
    while y + glyph_h <= height:
        x = scale
        for _ in range(int(rng.integers(4, 14))):
            if x + glyph_w > width:
                break
            bits = np.array([c == "1" for c in GLYPHS[int(rng.integers(len(GLYPHS)))]], float).reshape(7, 5)
            page[y : y + glyph_h, x : x + glyph_w] -= 200 * np.kron(bits, np.ones((scale, scale)))
            x += glyph_w + scale
        y += line_gap
    page = np.clip(page + rng.normal(0, 4, page.shape), 0, 255) / 255.0
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((np.stack([page] * 3) - mean) / std).astype(np.float32)[None]


@contextlib.contextmanager
def corrupted(node_name: str, channel: int = 0, factor: float = 2.0):
    """Fold ``node_name`` wrongly: its scale on one output channel is multiplied by ``factor``."""
    original = patterns.Affine.per_channel

    def wrong(self: patterns.Affine, c: int):
        s, t = original(self, c)
        if display_name(self.node) == node_name:
            s = s.copy()
            s[channel % c] *= factor
        return s, t

    patterns.Affine.per_channel = wrong
    try:
        yield
    finally:
        patterns.Affine.per_channel = original


def errors(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], rtol: float) -> dict[str, float]:
    """Largest abs error, that over the output's largest magnitude, min atol per rtol (worst output).

    ``atol@default`` is the min atol at ``rtol`` (the dtype's default).
    """
    out = {"abs": 0.0, "scaled": 0.0, "atol@default": 0.0, **{f"atol@{r:g}": 0.0 for r in RTOLS}}
    for rt, gt in zip(ref, got, strict=True):
        for a, b in zip(rt, gt, strict=True):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            err = np.abs(a64 - b64)
            scale = float(np.max(np.abs(a64))) or 1.0
            out["abs"] = max(out["abs"], float(err.max()))
            out["scaled"] = max(out["scaled"], float(err.max()) / scale)
            for r in RTOLS:
                out[f"atol@{r:g}"] = max(out[f"atol@{r:g}"], float(np.max(err - r * np.abs(a64))))
            out["atol@default"] = max(out["atol@default"], float(np.max(err - rtol * np.abs(a64))))
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
    dt = str(np.asarray(v.ref_outputs[0][0]).dtype)
    tol = DEFAULT_TOLERANCES[dt]
    good = errors(v.ref_outputs, good_out, tol.rtol)
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
        e = errors(v.ref_outputs, bad_out, tol.rtol)
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
        f"{max(good['atol@default'], 0):.2g}",
        "yes" if passes(v.ref_outputs, good_out, tol.atol, tol.rtol) else "NO",
    ]
    if worst_wrong is None:
        cols += ["0", "-", "-", *("-" for _ in RTOLS), "-", "-"]
    else:
        cols += [
            str(len(chosen)),
            f"{worst_wrong['abs']:.2g}",
            f"{worst_wrong['scaled']:.2g}",
            *(f"{max(worst_wrong[f'atol@{r:g}'], 0):.2g}" for r in RTOLS),
            f"{max(worst_wrong['atol@default'], 0):.2g}",
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
    "ok: min atol @default rtol",
    "ok passes defaults",
    "wrong folds",
    "wrong: min abs",
    "wrong: min abs/max|y|",
    *(f"wrong: min atol @rtol {r:g}" for r in RTOLS),
    "wrong: min atol @default rtol",
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
    ap.add_argument(
        "--text-images",
        type=int,
        default=0,
        metavar="N",
        help="feed the extra models N synthetic text pages (input NAME:1,3,H,W from --input-shape)",
    )
    ap.add_argument("--float16", action="store_true", help="convert the extra models to float16 first")
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
        files = list(args.inputs)
        label = os.path.basename(path)
        with tempfile.TemporaryDirectory() as tmp:
            if args.text_images:
                ((name, shape),) = own.items()
                for k in range(args.text_images):
                    f = os.path.join(tmp, f"text{k}.npz")
                    np.savez(f, **{name: text_image(shape[2], shape[3], np.random.default_rng(100 + k))})
                    files.append(f)
                label += f" ({args.text_images} text pages)"
            if args.float16:
                model, label = convert(model, np.float16), label + " as float16"
            rows.append(measure(label, model, own, args.wrong, args.trials, files))
        print(" | ".join(rows[-1]), file=sys.stderr)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
