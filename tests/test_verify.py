"""Comparing models: the tolerance rule, defaults, several outputs, dtypes, engines, large models, --save-io."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import run
from onnx import TensorProto, helper, numpy_helper
from verify_builders import (
    conv_chain,
    custom_op_model,
    int_bool_model,
    scale_channel,
    steep_head,
    two_outputs,
)

import bnfold
from bnfold.cli.render import report_lines
from bnfold.errors import ExitCode, NotVerifiableError
from bnfold.verify import evaluator as reference
from bnfold.verify import runners
from bnfold.verify.inputs import InputOptions, load_npz, make_inputs
from bnfold.verify.verifier import OutputRow, Verifier, VerifyOptions, compare, load_io_file, verify_models


def _row(atol: float, rtol: float) -> OutputRow:
    return OutputRow("y", "float32", [], atol, rtol)


def _folded_weight(folded: onnx.ModelProto, conv_name: str) -> str:
    return next(n for n in folded.graph.node if n.name == conv_name).input[1]


# ---------------------------------------------------------------------------
# the rule |a - b| <= atol + rtol * |a|
# ---------------------------------------------------------------------------


def test_rule_is_atol_plus_rtol_times_reference() -> None:
    a = np.array([0.0, 10.0, -10.0], np.float32)
    ok = compare(_row(0.5, 0.1), a, a + np.array([0.5, 1.4, -1.4], np.float32))
    assert ok.passed and ok.mismatches == 0
    bad = compare(_row(0.5, 0.1), a, a + np.array([0.0, 1.6, 0.0], np.float32))
    assert not bad.passed and bad.mismatches == 1
    assert bad.worst["index"] == [1]
    assert bad.max_abs == pytest.approx(1.6, rel=1e-6)
    assert bad.max_rel == pytest.approx(0.16, rel=1e-5)
    # smallest atol that passes at rtol 0.1: 1.6 - 0.1 * 10
    assert bad.min_atol == pytest.approx(0.6, rel=1e-5)


def test_relative_error_skips_reference_zeros() -> None:
    r = compare(_row(1.0, 0.0), np.array([0.0, 2.0]), np.array([0.5, 2.5]))
    assert r.max_rel == pytest.approx(0.25)
    assert r.mean_abs == pytest.approx(0.5)


def test_nan_in_the_same_place_is_equal_elsewhere_a_mismatch() -> None:
    a = np.array([1.0, np.nan, 3.0], np.float32)
    assert compare(_row(0, 0), a, a.copy()).passed
    r = compare(_row(1.0, 1.0), a, np.array([1.0, 2.0, np.nan], np.float32))
    assert not r.passed and r.mismatches == 2 and r.max_abs == np.inf and r.min_atol == np.inf


def test_infinities_must_agree() -> None:
    a = np.array([np.inf, -np.inf, 1.0])
    assert compare(_row(0, 0), a, a.copy()).passed
    r = compare(_row(1e9, 1e9), a, np.array([np.inf, 5.0, 1.0]))
    assert not r.passed and r.mismatches == 1


def test_float16_and_bfloat16_are_compared_widened() -> None:
    a = np.array([1000.0, 0.1], np.float16)
    b = np.array([1001.0, 0.1], np.float16)  # float16 subtraction would still give 1; widened: exact
    r = compare(_row(0.0, 1e-3), a, b)
    assert r.passed and r.max_abs == pytest.approx(1.0)
    bf = np.array([1.0, 2.0], dtype=ml_dtypes.bfloat16)
    r = compare(_row(0.0, 0.0), bf, (bf.astype(np.float32) * 2).astype(ml_dtypes.bfloat16))
    assert r.mismatches == 2 and r.max_abs == pytest.approx(2.0)


def test_shape_mismatch_fails_with_a_note() -> None:
    r = compare(_row(1, 1), np.zeros((2, 3)), np.zeros((3, 2)))
    assert not r.passed and "shape" in r.note


def test_stats_merge_over_trials() -> None:
    r = _row(1.0, 0.0)
    compare(r, np.zeros(4), np.full(4, 0.5), trial=0)
    compare(r, np.zeros(4), np.array([0, 0, 0, 3.0]), trial=1)
    assert r.elements == 8 and r.mismatches == 1
    assert r.max_abs == 3.0 and r.worst["trial"] == 1
    assert r.mean_abs == pytest.approx((4 * 0.5 + 3.0) / 8)


# ---------------------------------------------------------------------------
# defaults: correct folds pass, a wrong channel fails
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx"])
def test_correct_folds_of_the_samples_pass(models_dir: str, name: str) -> None:
    path = os.path.join(models_dir, name)
    folded = bnfold.fold_model(onnx.load(path)).model
    report = verify_models(path, folded)
    assert report.passed, report_lines(report)
    assert report.engine == "onnxruntime" and len(report.sources) == 3


def test_one_wrong_channel_fails_the_defaults() -> None:
    m = conv_chain()
    folded = bnfold.fold_model(m).model
    wrong = scale_channel(folded, _folded_weight(folded, "conv1"), channel=2, factor=1.5)
    report = verify_models(m, wrong)
    assert not report.passed
    (row,) = report.failing
    assert row.name == "output" and row.max_abs > 1e-2 and row.min_atol > 1e-2
    assert "FAIL" in "\n".join(report_lines(report))


def test_rounding_amplifying_model_passes_the_defaults_but_not_atol_1e4() -> None:
    """A correct fold that moves a steep sigmoid by ~3e-3 (the PP-OCRv4 det regime) must pass."""
    m = steep_head()
    folded = bnfold.fold_model(m).model
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    moved = np.abs(run(m, {"x": x})[0].astype(np.float64) - run(folded, {"x": x})[0]).max()
    assert 1e-3 < moved < 5e-3  # the regime this test is about
    assert verify_models(m, folded).passed
    assert not verify_models(m, folded, VerifyOptions(atol=1e-4)).passed
    wrong = scale_channel(folded, "w", channel=0, factor=1.5)
    assert not verify_models(m, wrong).passed


def test_explicit_tolerances_override_the_defaults() -> None:
    m = conv_chain()
    folded = bnfold.fold_model(m).model
    wrong = scale_channel(folded, _folded_weight(folded, "conv2"), channel=0, factor=1.5)
    first = verify_models(m, wrong)
    needed = first.failing[0].min_atol
    assert verify_models(m, wrong, VerifyOptions(atol=needed * 1.01)).passed
    row = verify_models(m, wrong, VerifyOptions(atol=0.25, rtol=0.0)).rows[0]
    assert (row.atol, row.rtol) == (0.25, 0.0)


def test_weak_comparison_is_flagged() -> None:
    m = conv_chain()
    scaled = scale_channel(m, "bn2.scale", channel=0, factor=1.0)  # same model
    for name in ("bn2.scale", "bn2.bias"):
        for t in scaled.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e-5), name))
    report = verify_models(scaled, scaled, VerifyOptions(calibrate=False))  # fixed tolerances: atol decides
    assert report.passed and report.rows[0].weak
    assert any("warning" in line and "--inputs" in line for line in report_lines(report))


# ---------------------------------------------------------------------------
# several outputs, integer and bool outputs
# ---------------------------------------------------------------------------


def test_several_outputs_each_get_a_row_and_only_the_wrong_one_fails() -> None:
    m = two_outputs()
    folded = bnfold.fold_model(m).model
    good = verify_models(m, folded)
    assert good.passed and [r.name for r in good.rows] == ["image", "vector"]
    wrong = scale_channel(folded, _folded_weight(folded, "fc"), channel=1, factor=2.0)
    report = verify_models(m, wrong)
    assert [r.passed for r in report.rows] == [True, False]
    d = report.to_dict()
    assert d["passed"] is False and [o["name"] for o in d["outputs"]] == ["image", "vector"]
    assert d["outputs"][1]["max_abs_error"] > 0.1


def test_integer_and_bool_inputs_and_outputs() -> None:
    m = int_bool_model()
    folded = bnfold.fold_model(m).model
    report = verify_models(m, folded)
    assert report.passed, report_lines(report)
    rows = {r.name: r for r in report.rows}
    assert rows["argmax"].dtype == "int64" and (rows["argmax"].atol, rows["argmax"].rtol) == (0.0, 0.0)
    assert rows["inverse"].dtype == "bool"


def test_integer_inputs_out_of_range_make_the_reference_fail() -> None:
    opts = VerifyOptions(inputs=InputOptions(int_range=(0, 50)))  # ids index a table of 10 rows
    with pytest.raises(NotVerifiableError, match="--input-range"):
        Verifier(int_bool_model(), opts)


def test_outputs_must_match_by_name() -> None:
    m = conv_chain()
    other = onnx.ModelProto()
    other.CopyFrom(m)
    other.graph.output[0].name = "renamed"
    other.graph.node[-1].output[0] = "renamed"
    report = verify_models(m, other)
    assert not report.passed and "different outputs" in report.error


# ---------------------------------------------------------------------------
# engines: onnxruntime without kernels, custom ops
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16])
def test_float64_and_bfloat16_conv_fall_back_to_the_numpy_reference(dtype) -> None:
    m = conv_chain(dtype=dtype, opset=22)
    folded = bnfold.fold_model(m).model
    report = verify_models(m, folded)
    assert report.engine == "reference" and report.passed, report_lines(report)
    assert any("numpy reference" in n for n in report.notes)
    wrong = scale_channel(folded, _folded_weight(folded, "conv1"), channel=1, factor=1.5)
    assert not verify_models(m, wrong).passed


def test_custom_op_is_not_verifiable_and_names_the_node() -> None:
    m = custom_op_model()
    with pytest.raises(NotVerifiableError) as e:
        Verifier(m)
    assert "Frobnicate" in str(e.value) and e.value.exit_code == ExitCode.NOT_VERIFIED
    assert "\n" not in str(e.value)


def test_custom_op_in_the_candidate_only_is_not_verifiable() -> None:
    with pytest.raises(NotVerifiableError, match="candidate"):
        verify_models(conv_chain(channels=(3, 4)), _rename_io(custom_op_model()))


def _rename_io(m: onnx.ModelProto) -> onnx.ModelProto:
    """custom_op_model with conv_chain's input/output names and input shape."""
    m.graph.input[0].name = "input"
    for n in m.graph.node:
        n.input[:] = ["input" if i == "x" else i for i in n.input]
        n.output[:] = ["output" if o == "y" else o for o in n.output]
    m.graph.output[0].name = "output"
    return m


# ---------------------------------------------------------------------------
# the numpy reference agrees with onnxruntime (float32)
# ---------------------------------------------------------------------------

CONV_CASES = [
    {},
    {"strides": [2, 2], "pads": [1, 0, 2, 1]},
    {"dilations": [2, 1], "pads": [2, 2, 2, 2]},
    {"group": 2},
    {"group": 4, "strides": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID", "dilations": [1, 2]},
]


def _single_node_model(op: str, x_shape, w, b, attrs: dict) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if b is not None else [])
    node = helper.make_node(op, ["x", "w"] + (["b"] if b is not None else []), ["y"], name="n", **attrs)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _agree(m: onnx.ModelProto, x: np.ndarray) -> None:
    ours = reference.Evaluator(m).run({"x": x})[0]
    theirs = run(m, {"x": x})[0]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_reference_conv_2d(attrs: dict) -> None:
    rng = np.random.default_rng(1)
    g = attrs.get("group", 1)
    w = rng.standard_normal((8, 4 // g, 3, 2)).astype(np.float32)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    _agree(_single_node_model("Conv", [2, 4, 9, 7], w, rng.standard_normal(8).astype(np.float32), attrs), x)


@pytest.mark.parametrize("nd", [1, 3])
def test_reference_conv_1d_3d(nd: int) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 2) + (3,) * nd).astype(np.float32)
    x = rng.standard_normal((1, 2) + (6,) * nd).astype(np.float32)
    attrs = {"strides": [2] * nd, "pads": [1] * (2 * nd)}
    _agree(_single_node_model("Conv", list(x.shape), w, None, attrs), x)


CONVT_CASES = [
    {},
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"group": 2, "strides": [2, 1], "dilations": [1, 2]},
    {"strides": [2, 2], "output_shape": [10, 9]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [3, 2], "auto_pad": "SAME_LOWER"},
]


@pytest.mark.parametrize("attrs", CONVT_CASES)
def test_reference_conv_transpose(attrs: dict) -> None:
    rng = np.random.default_rng(3)
    g = attrs.get("group", 1)
    w = rng.standard_normal((4, 6 // g, 3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 5, 4)).astype(np.float32)
    _agree(_single_node_model("ConvTranspose", [2, 4, 5, 4], w, rng.standard_normal(6).astype(np.float32), attrs), x)


@pytest.mark.parametrize("opset", [7, 9, 14])
def test_reference_batchnorm_is_inference_mode(opset: int) -> None:
    rng = np.random.default_rng(4)
    c = 3
    params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c), rng.normal(3, 1, c), rng.uniform(0.5, 2, c)]
    names = ["s", "b", "m", "v"]
    attrs = {"epsilon": 1e-3} | ({"is_test": 1} if opset < 7 else {})
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"], **attrs)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names, strict=True)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    x = rng.normal(0, 5, (2, c, 4, 4)).astype(np.float32)
    _agree(m, x)
    # and the formula itself, computed here: (x - mean) / sqrt(var + eps) * scale + bias
    s, b, mu, v = (p.astype(np.float32).astype(np.float64).reshape(1, c, 1, 1) for p in params)
    expect = (x - mu) / np.sqrt(v + np.float64(np.float32(1e-3))) * s + b
    np.testing.assert_allclose(reference.Evaluator(m).run({"x": x})[0], expect, rtol=1e-5, atol=1e-5)


def test_reference_runs_the_samples_like_onnxruntime(models_dir: str) -> None:
    for name in ("resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx", "int_bool"):
        m = int_bool_model() if name == "int_bool" else onnx.load(os.path.join(models_dir, name))
        plan_feed = make_inputs(m).feeds[0]
        ours = reference.Evaluator(m).run(plan_feed)
        theirs = run(m, plan_feed)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-4, atol=1e-5)


def test_reference_names_unsupported_ops() -> None:
    with pytest.raises(NotVerifiableError, match="Frobnicate"):
        reference.Evaluator(custom_op_model())


# ---------------------------------------------------------------------------
# large models go to onnxruntime by path
# ---------------------------------------------------------------------------


class _SessionSpy:
    """Records what each InferenceSession was created from."""

    def __init__(self, monkeypatch) -> None:
        self.args: list = []
        real = ort.InferenceSession

        def spy(src, *a, **k):
            self.args.append(src)
            return real(src, *a, **k)

        monkeypatch.setattr(ort, "InferenceSession", spy)


def test_external_data_models_run_by_path(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "big.onnx")
    m = conv_chain(channels=(3, 16, 16, 4))
    # a weight no fold touches: a Mul by a constant that varies over positions
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("Mul", ["pre", "spatial"], ["output"], name="spatial_mul"))
    spatial = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    m.graph.initializer.append(numpy_helper.from_array(spatial, "spatial"))
    onnx.save(
        m,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="big.data",
        size_threshold=0,
    )
    spy = _SessionSpy(monkeypatch)
    # weights left on disk: the folded model still points at big.data for what the fold did not touch
    folded = bnfold.fold_model(onnx.load(path, load_external_data=False), base_dir=str(tmp_path)).model
    assert runners.needs_path(folded)
    assert verify_models(path, folded, base_dir=str(tmp_path)).passed
    assert spy.args[0] == path
    assert all(isinstance(a, str) for a in spy.args)


def test_big_in_memory_models_are_written_not_serialized(monkeypatch) -> None:
    monkeypatch.setattr(runners, "BY_PATH_BYTES", 0)  # every model counts as big
    m = conv_chain()
    folded = bnfold.fold_model(m).model
    before = folded.SerializeToString()
    spy = _SessionSpy(monkeypatch)
    assert verify_models(m, folded).passed
    assert all(isinstance(a, str) for a in spy.args)
    assert folded.SerializeToString() == before  # the tensors were put back


def test_write_for_runtime_copies_existing_external_data(tmp_path) -> None:
    m = conv_chain()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(conv_chain(), str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = onnx.load(str(src / "m.onnx"), load_external_data=False)
    out = tmp_path / "out"
    out.mkdir()
    path = runners.write_for_runtime(loaded, str(out), base_dir=str(src))
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(path, x)[0], run(m, x)[0])
    assert {e.value for t in loaded.graph.initializer for e in t.external_data if e.key == "location"} == {"m.data"}


# ---------------------------------------------------------------------------
# --save-io
# ---------------------------------------------------------------------------


def test_save_io_round_trip(tmp_path) -> None:
    m = int_bool_model()
    folded = bnfold.fold_model(m).model
    path = str(tmp_path / "io.npz")
    report = verify_models(m, folded, VerifyOptions(save_io=path, inputs=InputOptions(trials=2)))
    assert report.passed
    io = load_io_file(path)
    assert io["meta"]["trials"] == 2 and len(io["trials"]) == 2
    for trial in io["trials"]:
        assert set(trial["input"]) == {"x", "mask", "ids"}
        assert trial["input"]["ids"].dtype == np.int64 and trial["input"]["mask"].dtype == np.bool_
        again_ref = run(m, trial["input"])
        again_cand = run(folded, trial["input"])
        names = [o.name for o in m.graph.output]
        for name, a, b in zip(names, again_ref, again_cand, strict=True):
            np.testing.assert_array_equal(trial["reference"][name], a)
            np.testing.assert_array_equal(trial["candidate"][name], b)
    # the file feeds --inputs again: same trials, same outcome
    feeds = load_npz(path)
    assert len(feeds) == 2 and np.array_equal(feeds[1]["x"], io["trials"][1]["input"]["x"])
    again = verify_models(m, folded, VerifyOptions(inputs=InputOptions(files=[path])))
    assert again.passed and len(again.sources) == 2


def test_save_io_keeps_bfloat16(tmp_path) -> None:
    m = conv_chain(dtype=ml_dtypes.bfloat16, opset=22, channels=(3, 4))
    folded = bnfold.fold_model(m).model
    path = str(tmp_path / "io.npz")
    verify_models(m, folded, VerifyOptions(save_io=path, inputs=InputOptions(trials=1)))
    io = load_io_file(path)
    assert io["trials"][0]["input"]["input"].dtype == ml_dtypes.bfloat16
    assert io["trials"][0]["reference"]["output"].dtype == ml_dtypes.bfloat16


def test_save_io_written_when_the_candidate_fails(tmp_path) -> None:
    m = conv_chain()
    folded = bnfold.fold_model(m).model
    wrong = scale_channel(folded, _folded_weight(folded, "conv0"), channel=0, factor=3.0)
    path = str(tmp_path / "io.npz")
    assert not verify_models(m, wrong, VerifyOptions(save_io=path)).passed
    io = load_io_file(path)
    assert io["meta"]["passed"] is False
    got = io["trials"][0]
    assert not np.allclose(got["reference"]["output"], got["candidate"]["output"], atol=1e-3)
