"""Real exported models fold completely and still compute the same.

The fixtures are real exporter output, committed because CI cannot install torch:

- ``tests/fixtures/torch/``: small seeded nets exported by torch 2.13 with the
  TorchScript exporter (opsets 11 and 17) and the dynamo exporter (raw graph,
  ``optimize=False``), float32, float16 and float16 with float32 BN parameters
  (``scripts/make_torch_models.py``; the README there lists every file);
- ``tests/fixtures/paddle/``: two PaddleOCR models exported by paddle2onnx (every
  weight in a ``Constant`` node), from the rapidocr-onnxruntime 1.4.4 wheel.

For each model: every foldable BN is folded and the others are left with the reason
expected for them, the result passes the full checker, computes the same as the
original in onnxruntime with ``ORT_DISABLE_ALL``, keeps no dead constants (the
dynamo zero-bias subgraphs go), folds again to itself, and ``bnfold fold`` (with its
default verification) exits 0 on it.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import session
from onnx import helper, numpy_helper

import bnfold
from bnfold.cli.commands import main

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_DIR = os.path.join(HERE, "fixtures", "torch")
PADDLE_DIR = os.path.join(HERE, "fixtures", "paddle")
TORCH = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TORCH_DIR, "*.onnx")))
CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
DET = "ch_PP-OCRv4_det_infer.onnx"
PADDLE = [CLS, DET]
# Shapes for the dynamic dims of the PaddleOCR inputs (det: H, W multiples of 32).
PADDLE_SHAPES = {CLS: (1, 3, 48, 192), DET: (1, 3, 320, 320)}

# |a - b| <= atol * max(1, max|a|) + rtol * |a|: atol relative to the output's scale.
# float16: resnet_stage's last BN (after a Linear) subtracts running means close to the
# Linear's outputs, so outputs near 0 come from terms ~16 where one float16 ulp is 0.016
# (test_float16_fold_is_as_close_to_float32_as_the_original: the folded model is as
# close to the float32 export of the same net as the original float16 export is).
ATOL, RTOL = 1e-5, 1e-4
ATOL16, RTOL16 = 1e-2, 1e-2
# PP-OCRv4 det ends in a steep sigmoid (differentiable binarization) that amplifies
# float32 rounding.  Measured on synthetic text pages (320x320 and 640x640, 3 each):
# bnfold's fold moves the output by at most 3.5e-5; onnxruntime's own Conv+BN/Mul/Add
# fusion (ORT_ENABLE_ALL) moves it by up to 2.1e-5; moving only the last bit of half
# the Conv weights of the *original* (1-ulp noise, no fold at all) moves it by
# 3e-5 .. 4.9e-5.  So ~5e-5 is this model's float32 rounding floor, and 2e-4 leaves
# 4x margin over it while a wrong fold (one channel's scale doubled) needs >= 0.11
# (README, "Why these").  test_det_fold_error_is_rounding_noise re-measures the floor.
DET_ATOL = 2e-4


@dataclass(frozen=True)
class Expected:
    """What a fold of one model must report: BN fold patterns, and BNs left by module name."""

    patterns: dict[str, int]
    left: dict[str, str] = field(default_factory=dict)


RESNET = Expected({"Conv+BatchNormalization": 8, "Gemm+BatchNormalization": 1})
EXPECTED = {
    "resnet_stage": RESNET,
    "resnet_stage_fp16": RESNET,
    "resnet_stage_fp16bn32": RESNET,
    # in_bn (graph input -> 1x1 Conv) and valid_bn (Relu -> unpadded 3x3 Conv) fold forward.
    "preact": Expected(
        {"BatchNormalization+Conv": 2}, {"mid_bn": "padded_consumer", "side_bn": "producer_output_shared"}
    ),
    "decoder": Expected({"Conv+BatchNormalization": 1, "ConvTranspose+BatchNormalization": 2}),
    # TorchScript: the bias-free Linear is MatMul(x, Transpose(W)); dynamo: Gemm.
    "mlp_ts": Expected({"Gemm+BatchNormalization": 1, "MatMul+BatchNormalization": 1}),
    "mlp_dynamo": Expected({"Gemm+BatchNormalization": 2}),
    "tcn": Expected({"Conv+BatchNormalization": 3}),
    CLS: Expected({"Conv+BatchNormalization": 35}),
    DET: Expected({"Conv+BatchNormalization": 2, "ConvTranspose+BatchNormalization": 1}),
}


def expected(name: str) -> Expected:
    """Expectations for a fixture file: by file name, else by net name (the stem less ``_ts11`` etc.)."""
    if name in EXPECTED:
        return EXPECTED[name]
    net, exporter = name.removesuffix(".onnx").rsplit("_", 1)
    if net == "mlp":
        return EXPECTED["mlp_dynamo" if exporter == "dynamo" else "mlp_ts"]
    return EXPECTED[net]


def path_of(name: str) -> str:
    return os.path.join(PADDLE_DIR if name in PADDLE else TORCH_DIR, name)


@functools.cache
def load(name: str) -> onnx.ModelProto:
    return onnx.load(path_of(name))


@functools.cache
def folded(name: str) -> bnfold.FoldResult:
    return bnfold.fold_model(load(name))


@functools.cache
def _measure_tolerances():
    """``scripts/measure_tolerances.py`` as a module (its synthetic text pages)."""
    path = os.path.join(HERE, "..", "scripts", "measure_tolerances.py")
    spec = importlib.util.spec_from_file_location("measure_tolerances", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def text_page(h: int, w: int, seed: int) -> np.ndarray:
    """A synthetic page of text, normalized like PaddleOCR inputs (a detector fed noise outputs ~0)."""
    return _measure_tolerances().text_image(h, w, np.random.default_rng(seed))


def feeds(name: str) -> list[dict[str, np.ndarray]]:
    """Inputs to compare on: seeded noise (batch 2 where the batch is dynamic); text for PaddleOCR."""
    model = load(name)
    if name in PADDLE:
        shape = PADDLE_SHAPES[name]
        pages = [{"x": text_page(shape[2], shape[3], 100 + k)} for k in range(2)]
        noise = [{"x": np.random.default_rng(k).standard_normal(shape).astype(np.float32)} for k in range(2)]
        return pages if name == DET else pages + noise
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        f = {}
        for i in model.graph.input:
            tt = i.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
            f[i.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        out.append(f)
    return out


def max_errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max absolute error and max relative error ``|a-b|/|a|`` (over ``a != 0``)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = np.abs(a64 - b64)
    nz = a64 != 0
    return float(err.max()), float((err[nz] / np.abs(a64[nz])).max()) if nz.any() else 0.0


def bn_module(model: onnx.ModelProto, bn_name: str) -> str:
    """PyTorch module of a BN node, from its scale's name (``mid_bn.weight`` -> ``mid_bn``)."""
    node = next(n for n in model.graph.node if (n.name or "") == bn_name)
    return node.input[1].rsplit(".", 1)[0]


def dead_nodes(model: onnx.ModelProto) -> set[str]:
    """Outputs of nodes that nothing reads (none is a graph output)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return {n.output[0] for n in model.graph.node if not any(o in read for o in n.output if o)}


ALL = TORCH + PADDLE


@pytest.mark.parametrize("name", ALL)
def test_every_foldable_bn_folds_and_the_rest_is_left_for_its_reason(name: str) -> None:
    model, result = load(name), folded(name)
    report, want = result.report, expected(name)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert report.bn_count == n_bn
    assert report.bn_folded + len(report.skips) == n_bn
    assert report.bn_folded == sum(want.patterns.values()), report.to_dict()
    patterns = Counter(f.pattern for f in report.folds if f.op_type == "BatchNormalization")
    assert patterns == Counter(want.patterns)
    assert {bn_module(model, s.node): s.reason.value for s in report.skips} == want.left
    left = sum(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert left == len(want.left), "BN-free except the BNs reported as left"
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("name", ALL)
def test_folded_model_computes_the_same(name: str) -> None:
    ref, got = session(path_of(name)), session(folded(name).model)
    for f in feeds(name):
        for a, b in zip(ref.run(None, f), got.run(None, f), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            scale = max(1.0, float(np.abs(a64).max()))
            if a.dtype == np.float16:
                atol, rtol = ATOL16 * scale, RTOL16
            elif name == DET:
                atol, rtol = DET_ATOL, RTOL
            else:
                atol, rtol = ATOL * scale, RTOL
            err = np.abs(a64 - b64)
            bad = err > atol + rtol * np.abs(a64)
            assert not bad.any(), f"{name}: max abs {err.max():.3g} (atol {atol:.3g}) at {np.argwhere(bad)[0]}"


FP16 = [n for n in TORCH if "fp16" in n]


@pytest.mark.parametrize("name", FP16)
def test_float16_fold_is_as_close_to_float32_as_the_original(name: str) -> None:
    """Against the float32 export of the same net, the folded float16 model errs no more than the original."""
    twin = session(path_of("resnet_stage_ts17.onnx"))
    ref, got = session(path_of(name)), session(folded(name).model)
    for f in feeds(name):
        exact = twin.run(None, {k: v.astype(np.float32) for k, v in f.items()})[0]
        orig_err = max_errors(exact, ref.run(None, f)[0])[0]
        fold_err = max_errors(exact, got.run(None, f)[0])[0]
        assert fold_err <= 1.25 * orig_err, f"folded {fold_err:.3g} vs original {orig_err:.3g} from float32"


def test_det_fold_error_is_rounding_noise() -> None:
    """On PP-OCRv4 det, the fold moves the output no more than 1-ulp noise in the original's weights does."""
    model, result = load(DET), folded(DET)
    rng = np.random.default_rng(0)
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    weights = {n.input[1] for n in noisy.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    for n in noisy.graph.node:
        if n.op_type == "Constant" and n.output[0] in weights:
            t = n.attribute[0].t
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.where(rng.random(w.shape) < 0.5, np.nextafter(w, np.inf), w), t.name))
    ref, got, noise = session(path_of(DET)), session(result.model), session(noisy)
    fold_err = noise_err = 0.0
    for f in feeds(DET):
        a = ref.run(None, f)[0]
        assert a.max() > 0.9, "the text page must light the detector up (noise outputs ~0 and proves little)"
        fold_err = max(fold_err, max_errors(a, got.run(None, f)[0])[0])
        noise_err = max(noise_err, max_errors(a, noise.run(None, f)[0])[0])
    assert noise_err < DET_ATOL / 2, f"1-ulp weight noise moves the output by {noise_err:.3g}"
    assert fold_err <= 2 * noise_err, f"fold moves {fold_err:.3g}, 1-ulp weight noise {noise_err:.3g}"


# mlp_dynamo has none: its bias-free Linear exports as a Gemm without C.
DYNAMO = [n for n in TORCH if "dynamo" in n and not n.startswith("mlp")]


@pytest.mark.parametrize("name", ALL)
def test_no_dead_constants_are_left(name: str) -> None:
    model, result = load(name), folded(name)
    assert dead_nodes(result.model) <= dead_nodes(model)
    read = {i for n in result.model.graph.node for i in n.input}
    assert all(t.name in read for t in result.model.graph.initializer), "an initializer nothing reads"


@pytest.mark.parametrize("name", DYNAMO)
def test_dynamo_zero_bias_subgraphs_go(name: str) -> None:
    """Every ``Shape -> Expand -> CastLike -> Expand`` zero bias is folded away with its BN."""
    model, result = load(name), folded(name)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["CastLike"] >= 1 and ops["Shape"] >= 1, "the raw dynamo export makes zero biases"
    after = Counter(n.op_type for n in result.model.graph.node)
    assert after["CastLike"] == after["Shape"] == after["Expand"] == 0, after


@pytest.mark.parametrize("name", ALL)
def test_folding_twice_changes_nothing(name: str) -> None:
    once = folded(name)
    twice = bnfold.fold_model(once.model)
    assert not twice.report.folds
    assert twice.model.SerializeToString() == once.model.SerializeToString()


@pytest.mark.parametrize("name", ALL)
def test_cli_fold_verifies_and_writes(name: str, tmp_path) -> None:
    out = str(tmp_path / "out.onnx")
    args = ["fold", path_of(name), "-o", out]
    if name in PADDLE:
        shape = PADDLE_SHAPES[name]
        args += ["--input-shape", "x:" + ",".join(map(str, shape))]
        page = str(tmp_path / "page.npz")
        np.savez(page, x=text_page(shape[2], shape[3], 7))
        args += ["--inputs", page, "--trials", "2"]  # a text page besides noise
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "verify: passed" in res.output
    written = onnx.load(out)
    assert sum(n.op_type == "BatchNormalization" for n in written.graph.node) == len(expected(name).left)
