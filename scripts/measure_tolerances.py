"""Measure how far correct and one-channel-wrong folds move outputs, against each model's own noise floor.

For each model (and dtype) the original is run with its float weights perturbed
within their rounding (``bnfold.verify.calibrate``: the noise floor of every
output), folded correctly, and folded again once per chosen fold with that fold
wrong: one output channel's weights scaled by 1.5 in one Conv (the BN's scale on
that channel multiplied by 1.5).  Every outcome is decided by bnfold's own rule
(``Verifier.decide``), and reported as the ratio ``max|a - b| / noise floor`` of
the output where it is largest (the floor at least one ulp of the output's scale).

The factor of the calibrated rule must sit above every correct fold's ratio and
below every wrong fold's ratio; a wrong fold whose ratio is at most 1 moves the
outputs no more than rounding does (a channel that a later ReLU, pooling or
saturated activation hides on these inputs) and cannot be told from a correct fold.

    python scripts/measure_tolerances.py                      # every set (minutes)
    python scripts/measure_tolerances.py --sets ill,softmax   # some of them
    python scripts/measure_tolerances.py --sets none --wrong 16 det.onnx --input-shape x:1,3,640,640 --text-images 3

Sets: ``samples`` (models/, in float32/float16/bfloat16/float64), ``zoo`` (the onnx
light zoo, weights randomized as in tests/test_zoo.py), ``paddle`` (PP-OCRv4 det fed
noise and synthetic text pages, ppocr cls on text lines; tests/fixtures/paddle),
``ill`` (ill-conditioned nets of tests/verify_builders.py plus the steep head below)
and ``softmax`` (classifiers whose softmax peaks near 0.005).  ``--text-images N``
feeds extra models N synthetic pages of text; ``--float16`` converts them first.
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
from bnfold.errors import NotVerifiableError
from bnfold.fold import affine as patterns
from bnfold.fold.nodes import display_name
from bnfold.verify.inputs import InputOptions, parse_input_shape
from bnfold.verify.tolerances import DEFAULT_TOLERANCES, eps
from bnfold.verify.verifier import Verifier, VerifyOptions

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
SAMPLES = ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx", "frozen_bn_stage.onnx"]
ZOO = ["resnet50", "densenet121", "inception_v2", "shufflenet"]
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
def corrupted(node_name: str, channel: int = 0, factor: float = 1.5):
    """Fold ``node_name`` wrongly: its scale on one output channel is multiplied by ``factor``
    (that channel's folded weights come out ``factor`` times too big)."""
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


def fixed_passes(v: Verifier, got: list[list[np.ndarray]]) -> bool:
    """Whether the old fixed per-dtype tolerances (``--no-calibrate``) pass ``got``."""
    for rt, gt in zip(v.ref_outputs, got, strict=True):
        for a, b in zip(rt, gt, strict=True):
            a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            tol = DEFAULT_TOLERANCES.get(str(np.asarray(a).dtype), None)
            if tol is None:
                continue
            if not np.all(np.abs(a64 - b64) <= tol.atol + tol.rtol * np.abs(a64)):
                return False
    return True


def ratio(v: Verifier, report) -> float:
    """Largest ``max|a - b| / floor`` over the float outputs (floor at least one ulp of the scale)."""
    floors = v.noise_floors() or {}
    worst = 0.0
    for r in report.rows:
        if r.name not in floors:
            continue
        dt = np.asarray(v.ref_outputs[0][v.output_names.index(r.name)]).dtype
        floor = max(floors[r.name], eps(dt) * r.max_ref)
        worst = max(worst, r.max_abs / floor if floor > 0 else (0.0 if r.max_abs == 0 else np.inf))
    return worst


def measure(label: str, model: onnx.ModelProto, inputs: InputOptions, n_wrong: int) -> dict:
    """Correct fold and wrong folds of one model, decided by bnfold's rule."""
    started = time.perf_counter()
    v = Verifier(model, VerifyOptions(inputs=inputs))
    v.noise_floors()
    result = fold_model(model)
    good_out = v.run(result.model)
    good = v.decide(good_out)
    folds = result.report.folds
    step = max(1, len(folds) // n_wrong) if n_wrong else len(folds) + 1
    chosen = folds[::step][:n_wrong]
    wrong = []
    for f in chosen:
        with corrupted(f.node):
            bad_model = fold_model(model).model
        out = v.run(bad_model)
        rep = v.decide(out)
        wrong.append(
            {"node": f.node, "ratio": ratio(v, rep), "caught": not rep.passed, "fixed": not fixed_passes(v, out)}
        )
    floors = v.noise_floors() or {}
    row0 = max(good.rows, key=lambda r: r.max_ref)
    return {
        "label": label,
        "dtype": good.rows[0].dtype,
        "engine": v.engine,
        "folds": len(folds),
        "scale": row0.max_ref,
        "floor": max(floors.values()) if floors else 0.0,
        "ok_err": max(r.max_abs for r in good.rows),
        "ok_ratio": ratio(v, good),
        "ok_decision": ",".join(sorted({r.decision for r in good.rows})),
        "ok_passed": good.passed,
        "ok_fixed": fixed_passes(v, good_out),
        "wrong": wrong,
        "seconds": time.perf_counter() - started,
    }


def line(m: dict) -> list[str]:
    """One table row."""
    w = m["wrong"]
    visible = [x for x in w if x["ratio"] > 1]
    least = min((x["ratio"] for x in visible), default=None)
    return [
        m["label"],
        m["dtype"],
        str(m["folds"]),
        f"{m['scale']:.2g}",
        f"{m['floor']:.2g}",
        f"{m['ok_err']:.2g}",
        f"{m['ok_ratio']:.2g}",
        ("pass" if m["ok_passed"] else "**REFUSED**") + f" ({m['ok_decision']})",
        "pass" if m["ok_fixed"] else "refused",
        f"{len(visible)}/{len(w)}",
        "-" if least is None else f"{least:.3g}",
        f"{sum(x['caught'] for x in visible)}/{len(visible)}",
        f"{sum(x['caught'] for x in w)}/{len(w)}",
        f"{sum(x['fixed'] for x in w)}/{len(w)}",
        f"{m['seconds']:.1f}s",
    ]


HEADER = [
    "model",
    "dtype",
    "folds",
    "max abs output",
    "noise floor",
    "correct: max abs error",
    "correct: error/floor",
    "correct: decision",
    "correct: old fixed tolerances",
    "wrong folds moving outputs beyond the floor",
    "least visible wrong: error/floor",
    "visible wrong caught",
    "all wrong caught",
    "wrong caught by old fixed tolerances",
    "time",
]


def models_of(sets: set[str], args: argparse.Namespace):
    """(set, label, model, InputOptions, wrong folds to try) of every chosen set."""
    trials = args.trials
    gen = InputOptions(trials=trials)
    if "samples" in sets:
        for name in SAMPLES:
            base = onnx.load(os.path.join(ROOT, "models", name))
            for dt in args.dtypes.split(","):
                yield f"samples ({dt})", f"{name} (sample)", convert(base, DTYPES[dt]), gen, args.wrong
    if "ill" in sets:
        import verify_builders as vb

        for name, build in vb.ILL_CONDITIONED.items():
            for seed in range(args.seeds):
                yield "ill-conditioned", f"{name} seed {seed} (ill-conditioned)", build(seed), gen, args.wrong
        for offset in (1e4, 2e4):
            for seed in range(args.seeds):
                label = f"steep_head offset {offset:g} seed {seed} (ill-conditioned)"
                yield "ill-conditioned", label, steep_head(offset, seed=seed), InputOptions(trials=trials), args.wrong
    if "softmax" in sets:
        import verify_builders as vb

        for depthwise in (False, True):
            for seed in range(args.seeds):
                kind = "depthwise, Clip 0..6" if depthwise else "Conv+BN+Relu"
                m = vb.softmax_classifier(seed, depthwise=depthwise)
                label = f"softmax classifier, 200 classes, {kind}, seed {seed}"
                yield "softmax classifiers", label, m, gen, 99
    if "zoo" in sets:
        from test_zoo import randomize

        zoo = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
        for name in ZOO:
            path = os.path.join(zoo, f"light_{name}.onnx")
            if os.path.exists(path):
                m = randomize(onnx.load(path))
                yield "onnx light zoo", f"light zoo {name} (random weights)", m, InputOptions(trials=1), args.zoo_wrong
    if "paddle" in sets:
        paddle = os.path.join(ROOT, "tests", "fixtures", "paddle")
        det = onnx.load(os.path.join(paddle, "ch_PP-OCRv4_det_infer.onnx"))
        cls = onnx.load(os.path.join(paddle, "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
        size = args.det_size
        shapes = {"x": (1, 3, size, size)}
        label = f"PP-OCRv4 det {size}x{size}, noise"
        yield "PP-OCRv4 det, noise", label, det, InputOptions(trials=trials, shapes=shapes), args.paddle_wrong
        with tempfile.TemporaryDirectory() as tmp:
            det_files = _pages(tmp, "det", size, size, trials)
            cls_files = _pages(tmp, "cls", 48, 192, trials)
            label = f"PP-OCRv4 det {size}x{size}, {trials} text pages"
            yield "PP-OCR, text", label, det, InputOptions(trials=0, files=det_files), args.paddle_wrong
            label = f"ppocr mobile v2.0 cls, {trials} text lines 48x192"
            yield "PP-OCR, text", label, cls, InputOptions(trials=0, files=cls_files), args.paddle_wrong
    for path in args.models:
        model = onnx.load(path)
        own = {k: v for k, v in args.shapes.items() if k in {i.name for i in model.graph.input}}
        label = os.path.basename(path)
        with tempfile.TemporaryDirectory() as tmp:
            files = list(args.inputs)
            if args.text_images:
                ((_, shape),) = own.items()
                files += _pages(tmp, "page", shape[2], shape[3], args.text_images)
                label += f" ({args.text_images} text pages)"
            if args.float16:
                model, label = convert(model, np.float16), label + " as float16"
            inputs = InputOptions(trials=0 if files else trials, shapes=own, files=files)
            yield "extra", label, model, inputs, args.wrong


def _pages(folder: str, stem: str, height: int, width: int, n: int) -> list[str]:
    files = []
    for k in range(n):
        f = os.path.join(folder, f"{stem}{k}.npz")
        np.savez(f, x=text_image(height, width, np.random.default_rng(100 + k)))
        files.append(f)
    return files


SUMMARY = [
    "set",
    "models",
    "correct folds: worst error/floor",
    "correct refused",
    "correct refused by old fixed tolerances",
    "wrong folds beyond the floor",
    "least visible wrong: error/floor",
    "visible wrong caught",
    "wrong caught by old fixed tolerances",
]


def summary(results: list[dict]) -> None:
    """The separation per set (the README table)."""
    print("| " + " | ".join(SUMMARY) + " |")
    print("|" + "---|" * len(SUMMARY))
    for group in dict.fromkeys(r["set"] for r in results):
        rs = [r for r in results if r["set"] == group]
        wrong = [w for r in rs for w in r["wrong"]]
        visible = [w for w in wrong if w["ratio"] > 1]
        least = min((w["ratio"] for w in visible), default=None)
        cells = [
            group,
            str(len(rs)),
            f"{max(r['ok_ratio'] for r in rs):.2g}",
            f"{sum(not r['ok_passed'] for r in rs)}/{len(rs)}",
            f"{sum(not r['ok_fixed'] for r in rs)}/{len(rs)}",
            f"{len(visible)}/{len(wrong)}",
            "-" if least is None else f"{least:.3g}",
            f"{sum(w['caught'] for w in visible)}/{len(visible)}",
            f"{sum(w['fixed'] for w in wrong)}/{len(wrong)}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="extra float models")
    ap.add_argument("--sets", default="samples,ill,softmax,zoo,paddle", help="comma-separated, or none")
    ap.add_argument("--input-shape", action="append", default=[], help="NAME:D0,D1,... (repeatable)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,float64", help="dtypes for the samples")
    ap.add_argument("--wrong", type=int, default=8, help="wrong folds tried per model (spread over its folds)")
    ap.add_argument("--zoo-wrong", type=int, default=4)
    ap.add_argument("--paddle-wrong", type=int, default=16)
    ap.add_argument("--det-size", type=int, default=320, help="PP-OCRv4 det input size")
    ap.add_argument("--seeds", type=int, default=2, help="seeds of each built model")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--inputs", action="append", default=[], help="input .npz for the extra models (repeatable)")
    ap.add_argument("--text-images", type=int, default=0, metavar="N", help="feed the extra models N text pages")
    ap.add_argument("--float16", action="store_true", help="convert the extra models to float16 first")
    args = ap.parse_args()
    args.shapes = dict(parse_input_shape(s) for s in args.input_shape)
    sets = set(args.sets.split(",")) - {"none", ""}
    results = []
    for group, label, model, inputs, n_wrong in models_of(sets, args):
        try:
            results.append({"set": group, **measure(label, model, inputs, n_wrong)})
        except NotVerifiableError as e:  # no engine runs it (bfloat16 MaxPool): nothing to measure
            print(f"{label}: skipped: {e}", file=sys.stderr)
            continue
        print(" | ".join(line(results[-1])), file=sys.stderr, flush=True)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in results:
        print("| " + " | ".join(line(r)) + " |")
    print()
    summary(results)
    ok = [r["ok_ratio"] for r in results]
    visible = [w["ratio"] for r in results for w in r["wrong"] if w["ratio"] > 1]
    print()
    print(f"worst correct fold: {max(ok, default=0):.3g} x its noise floor")
    print(f"least visible wrong fold: {min(visible, default=float('nan')):.3g} x its noise floor")
    for r in results:
        for w in r["wrong"]:
            if w["ratio"] > 1 and not w["caught"]:
                print(f"missed: {r['label']} {r['dtype']}: {w['node']} at {w['ratio']:.3g} x the floor")


if __name__ == "__main__":
    main()
