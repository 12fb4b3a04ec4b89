"""Verification calibrated to the model's own rounding noise: fast path, noise floor, overrides, reports."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from verify_builders import ILL_CONDITIONED, conv_chain, scale_channel, softmax_classifier, steep_head

import bnfold
from bnfold.cli.commands import main
from bnfold.report_json import SCHEMA_VERSION
from bnfold.verify.calibrate import Perturber, nudge
from bnfold.verify.foldcheck import verify_fold
from bnfold.verify.inputs import InputOptions
from bnfold.verify.verifier import Verifier, VerifyOptions, verify_models

PADDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "paddle")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def conv_weights(m: onnx.ModelProto) -> list[str]:
    """Weight initializers of every Conv of a (folded) model."""
    inits = {t.name for t in m.graph.initializer}
    return [n.input[1] for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def wrong_folds(folded: onnx.ModelProto, limit: int | None = None):
    """One-channel-wrong folds made by hand: one output channel of one folded Conv weight x 1.5."""
    names = conv_weights(folded)
    for name in names[:limit]:
        yield name, scale_channel(folded, name, channel=0, factor=1.5)


# ---------------------------------------------------------------------------
# the noise model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nudge_moves_weights_by_at_most_one_ulp_unbiased(dtype) -> None:
    a = np.random.default_rng(0).standard_normal(20000).astype(dtype)
    b = nudge(a, np.random.default_rng(1))
    step = np.abs(b.astype(np.float64) - a.astype(np.float64))
    ulp = np.spacing(np.abs(a)).astype(np.float64)
    assert np.all(step <= ulp * 1.0000001)  # one ulp at most (the neighbour above in magnitude)
    moved = np.mean(step > 0)
    assert 0.22 < moved < 0.28  # 1/4 of the weights move
    assert abs(np.mean(np.sign(b.astype(np.float64) - a))) < 0.03  # as many up as down


def test_perturber_leaves_shape_like_floats_alone() -> None:
    m = conv_chain()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    p = Perturber(m, None)
    touched = {t.name for t, _ in p._targets}
    assert "scales" not in touched and "conv0.weight" in touched and "bn0.var" in touched
    a = p.model(0, 0)
    b = p.model(0, 0)  # reproducible
    assert a.SerializeToString() == b.SerializeToString()


# ---------------------------------------------------------------------------
# deciding outputs
# ---------------------------------------------------------------------------


class _Sessions:
    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real = ort.InferenceSession

        def spy(*a, **k):
            self.count += 1
            return real(*a, **k)

        monkeypatch.setattr(ort, "InferenceSession", spy)


def test_well_conditioned_models_take_the_fast_path(monkeypatch) -> None:
    m = conv_chain()
    sessions = _Sessions(monkeypatch)
    v = Verifier(m)
    report = v.check(bnfold.fold_model(m).model)
    assert report.passed and [r.decision for r in report.rows] == ["fast"]
    assert sessions.count == 2 and v.calibration_runs == 0  # the original and the candidate, nothing more
    assert report.calibration is None


@pytest.mark.parametrize("name", sorted(ILL_CONDITIONED))
def test_ill_conditioned_correct_folds_pass(name: str) -> None:
    m = ILL_CONDITIONED[name](0)
    fv = verify_fold(m, bnfold.fold_model(m))
    assert fv.ok and fv.blame is None, fv.report.to_dict()


@pytest.mark.parametrize("seed", [0, 2])
def test_steep_head_passes_calibrated_and_is_refused_by_fixed_tolerances(seed: int) -> None:
    m = steep_head(offset=2e4, seed=seed)
    folded = bnfold.fold_model(m).model
    report = verify_models(m, folded)
    assert report.passed and report.rows[0].decision == "calibrated"
    assert report.rows[0].max_abs > 1e-3  # the fold really moves it: no fast path here
    assert report.calibration == {"runs": 3, "seed": 0, "factor": 3.0}


def test_blame_does_not_blame_noise(monkeypatch) -> None:
    """A correct fold that moves a steep head beyond the fixed atol: calibrated, nothing blamed."""
    m = steep_head(offset=2e4, seed=0)
    result = bnfold.fold_model(m)
    fixed = verify_fold(m, result, VerifyOptions(calibrate=False))
    if fixed.ok:
        pytest.skip("this seed stays within the fixed tolerance")
    assert fixed.blame is not None  # the old rule blamed a correct fold
    fv = verify_fold(m, result, keep_safe=True)
    assert fv.ok and fv.blame is None and not fv.kept_safe


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_classifier_wrong_folds_are_caught(depthwise: bool, seed: int) -> None:
    m = softmax_classifier(seed, depthwise=depthwise)
    folded = bnfold.fold_model(m).model
    assert verify_models(m, folded).passed
    v = Verifier(m)
    missed_by_fixed = 0
    for name, wrong in wrong_folds(folded):
        out = v.run(wrong)
        rep = v.decide(out)
        floor = v.noise_floors()["y"]
        if rep.rows[0].max_abs > floor:  # every wrong fold that moves the output beyond rounding
            assert not rep.passed, (name, rep.to_dict())
        missed_by_fixed += verify_models(m, wrong, VerifyOptions(calibrate=False)).passed
    assert v.ref_outputs[0][0].max() < 0.1  # outputs peak near 1/200
    if not depthwise:
        assert missed_by_fixed > 0  # the fixed atol of 1e-3 is larger than these outputs


def test_noise_fed_detector_wrong_folds_are_caught() -> None:
    path = os.path.join(PADDLE, "ch_PP-OCRv4_det_infer.onnx")
    m = onnx.load(path)
    opts = VerifyOptions(inputs=InputOptions(trials=1, shapes={"x": (1, 3, 64, 64)}))
    folded = bnfold.fold_model(m).model
    v = Verifier(m, opts)
    assert v.check(folded).passed
    weights = conv_weights(folded)
    caught = 0
    chosen = weights[:: max(1, len(weights) // 8)][:8]
    for name in chosen:
        rep = v.decide(v.run(scale_channel(folded, name, channel=0, factor=1.5)))
        floor = v.noise_floors()[v.output_names[0]]
        # Beyond 3x the floor a wrong fold is never taken for rounding; within it, it moves the
        # (near-zero) outputs of a noise-fed detector no more than rounding does.
        if rep.rows[0].max_abs > 3 * floor:
            assert not rep.passed, (name, rep.to_dict())
        caught += not rep.passed
    assert caught >= len(chosen) // 2


# ---------------------------------------------------------------------------
# overrides and reports
# ---------------------------------------------------------------------------


@pytest.fixture
def steep_pair(tmp_path):
    m = steep_head(offset=2e4, seed=0)
    a, b = str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")
    onnx.save(m, a)
    onnx.save(bnfold.fold_model(m).model, b)
    return a, b


def test_overrides_decide_by_fixed_tolerances(steep_pair) -> None:
    a, b = steep_pair
    r = invoke("verify", a, b, "--json")
    row = json.loads(r.stdout)["models"][0]["verification"]["outputs"][0]
    assert r.exit_code == 0 and row["decision"] == "calibrated"
    for extra in (["--atol", "1e-9"], ["--rtol", "0"], ["--no-calibrate"]):
        r = invoke("verify", a, b, "--json", *extra)
        row = json.loads(r.stdout)["models"][0]["verification"]["outputs"][0]
        assert row["decision"] == "tolerance" and row["noise_floor"] is None, extra
    assert invoke("verify", a, b, "--atol", "1e-9").exit_code == 3
    assert invoke("verify", a, b, "--atol", "1").exit_code == 0


def test_decision_fields_in_json_and_text(steep_pair, tmp_path) -> None:
    a, b = steep_pair
    r = invoke("verify", a, b, "--json")
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION >= 2  # 2 added the decision fields
    ver = doc["models"][0]["verification"]
    row = ver["outputs"][0]
    assert row["decision"] == "calibrated" and row["factor"] == 3.0
    assert 0 < row["noise_floor"] and row["max_abs_error"] <= row["atol"] == pytest.approx(3 * row["noise_floor"])
    assert ver["calibration"]["runs"] == 3
    text = invoke("verify", a, b).stdout
    assert "x noise floor" in text and "calibrated" in text and "noise floor: 3 run(s)" in text
    out = str(tmp_path / "o.onnx")
    r = invoke("fold", "-q", a, "-o", out, "--json")
    row = json.loads(r.stdout)["models"][0]["verification"]["outputs"][0]
    assert r.exit_code == 0 and row["decision"] == "calibrated"
    c = str(tmp_path / "c.onnx")
    onnx.save(conv_chain(), c)
    row = json.loads(invoke("fold", c, "-o", out, "--json", "--force").stdout)["models"][0]["verification"]
    assert row["outputs"][0]["decision"] == "fast" and row["calibration"] is None
    assert "fast path" in invoke("fold", c, "-o", out, "--force").stdout


def test_val_range_sets_float_inputs(tmp_path) -> None:
    m = conv_chain()
    v = Verifier(m, VerifyOptions(inputs=InputOptions(val_ranges={"input": (2.0, 3.0)})))
    x = v.plan.feeds[0]["input"]
    assert 2.0 <= x.min() and x.max() <= 3.0
    v = Verifier(m, VerifyOptions(inputs=InputOptions(val_ranges={"": (-0.5, 0.0)})))
    assert v.plan.feeds[1]["input"].max() <= 0.0
    a = str(tmp_path / "a.onnx")
    onnx.save(m, a)
    assert invoke("verify", a, a, "--val-range", "input:0,1").exit_code == 0
    assert invoke("verify", a, a, "--val-range", "0,1").exit_code == 0
    for bad in ("input:1,0", "input:0,inf", "x", "input:a,b"):
        assert invoke("verify", a, a, "--val-range", bad).exit_code == 2, bad
    r = invoke("verify", a, a, "--val-range", "nope:0,1")
    assert r.exit_code == 6 and "no input 'nope'" in r.stderr
