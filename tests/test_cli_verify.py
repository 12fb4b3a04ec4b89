"""``bnfold fold`` verification and ``bnfold verify`` on the command line (CliRunner and real processes)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from builders import corrupt_rule
from click.testing import CliRunner
from helpers import run_cli
from verify_builders import conv_chain, custom_op_model, int_bool_model, scale_channel

import bnfold
from bnfold.cli.commands import main
from bnfold.errors import ExitCode
from bnfold.verify.verifier import load_io_file, verify_models


def invoke(*args: str):
    """Run the CLI in-process; ``fold`` runs reuse one output path, so they overwrite it (--force)."""
    extra = ["--force"] if args and args[0] == "fold" else []
    return CliRunner().invoke(main, [*args, *extra], catch_exceptions=False)


def save(m: onnx.ModelProto, path) -> str:
    onnx.save(m, str(path))
    return str(path)


@pytest.fixture
def corrupt_bn1(monkeypatch) -> None:
    def spoil(site):
        aff = site.aff
        if aff.node.name == "bn1":
            aff.s = np.array(aff.s, dtype=np.float64, copy=True)
            aff.s[0] *= 2.0

    corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)


@pytest.fixture
def chain(tmp_path) -> str:
    return save(conv_chain(channels=(3, 8, 8, 4)), tmp_path / "chain.onnx")


# ---------------------------------------------------------------------------
# bnfold fold
# ---------------------------------------------------------------------------


def test_fold_verifies_by_default(models_dir: str, tmp_path) -> None:
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", os.path.join(models_dir, "resnet_block.onnx"), "-o", out)
    assert r.exit_code == 0, r.output
    assert "verify: passed (3 trial(s)" in r.stdout
    assert "ok   output float32[1,8,32,32]" in r.stdout
    assert os.path.exists(out)


def test_wrong_fold_writes_nothing_exits_3_and_names_the_bn(chain: str, tmp_path, corrupt_bn1) -> None:
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", chain, "-o", out)
    assert r.exit_code == ExitCode.VERIFY_FAILED == 3
    assert not os.path.exists(out)
    assert "FAIL output" in r.stdout and "max abs" in r.stdout
    assert "bn1 (BatchNormalization) folded into conv1 as Conv+BatchNormalization" in r.stdout
    assert "bn0 (" not in r.stdout and "bn2 (" not in r.stdout
    assert "verification failed" in r.stderr and "nothing written" in r.stderr and "--keep-safe" in r.stderr


def test_keep_safe_writes_a_model_that_passes(chain: str, tmp_path, corrupt_bn1) -> None:
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", chain, "-o", out, "--keep-safe")
    assert r.exit_code == 0, r.output
    assert "keep-safe: left bn1 unfolded" in r.stdout
    written = onnx.load(out)
    assert [n.name for n in written.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    assert verify_models(chain, out).passed
    assert "left bn1: excluded" in r.stdout


def test_no_verify_skips_the_check(chain: str, tmp_path, corrupt_bn1) -> None:
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", chain, "-o", out, "--no-verify")
    assert r.exit_code == 0 and "verify:" not in r.stdout
    # the wrong model got written; `bnfold verify` is what catches it
    v = invoke("verify", chain, out)
    assert v.exit_code == 3 and "FAIL output" in v.stdout


def test_dynamic_shape_needs_input_shape(tmp_path) -> None:
    path = save(conv_chain(dims=["N", 3, "height", "width"]), tmp_path / "dyn.onnx")
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", path, "-o", out)
    assert r.exit_code == ExitCode.NOT_VERIFIED == 6
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "'input'" in err and "--input-shape input:" in err and "--no-verify" in err
    assert not os.path.exists(out)
    r = invoke("fold", path, "-o", out, "--input-shape", "input:2,3,12,10")
    assert r.exit_code == 0, r.output and os.path.exists(out)
    assert "output float32[2,4,12,10]" in r.stdout


@pytest.mark.parametrize(
    "bad", ["input", "input:1,x,3", "input:1,3", "other:1,3,8,8"], ids=["syntax", "int", "rank", "name"]
)
def test_bad_input_shape(chain: str, tmp_path, bad: str) -> None:
    r = invoke("fold", chain, "-o", str(tmp_path / "o.onnx"), "--input-shape", bad)
    assert r.exit_code in (ExitCode.USAGE, ExitCode.NOT_VERIFIED)
    assert "Traceback" not in r.output
    if bad in ("input", "input:1,x,3"):
        assert r.exit_code == 2


def test_integer_and_bool_inputs_and_input_range(tmp_path) -> None:
    path = save(int_bool_model(), tmp_path / "ib.onnx")
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", path, "-o", out)
    assert r.exit_code == 0, r.output
    assert "ok   argmax int64" in r.stdout and "ok   inverse bool" in r.stdout
    r = invoke("fold", path, "-o", out, "--force", "--input-range", "0,500")  # ids past the 10-row table
    assert r.exit_code == 6 and "--input-range" in r.stderr
    assert invoke("fold", path, "-o", out, "--input-range", "9,0").exit_code == 2


def test_npz_inputs_instead_of_and_with_generated(chain: str, tmp_path) -> None:
    data = str(tmp_path / "in.npz")
    np.savez(data, input=np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32))
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", chain, "-o", out, "--inputs", data)
    assert r.exit_code == 0 and "(1 trial(s)" in r.stdout and "output float32[2,4,8,8]" in r.stdout
    r = invoke("fold", chain, "-o", out, "--inputs", data, "--trials", "2")
    assert r.exit_code == 0 and "(3 trial(s)" in r.stdout
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, image=np.zeros((1, 3, 8, 8), np.float32))
    r = invoke("fold", chain, "-o", out, "--inputs", wrong)
    assert r.exit_code == 2 and "'image' is not an input" in r.stderr


def test_save_io_round_trip(chain: str, tmp_path) -> None:
    io_path = str(tmp_path / "io.npz")
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", chain, "-o", out, "--save-io", io_path, "--trials", "2", "--seed", "7")
    assert r.exit_code == 0, r.output
    io = load_io_file(io_path)
    assert len(io["trials"]) == 2
    # reproducible elsewhere: the saved inputs give the saved outputs
    again = bnfold.verify.verifier.Verifier(
        chain, bnfold.verify.verifier.VerifyOptions(inputs=bnfold.verify.inputs.InputOptions(files=[io_path]))
    )
    np.testing.assert_array_equal(again.ref_outputs[1][0], io["trials"][1]["reference"]["output"])
    r = invoke("verify", chain, out, "--inputs", io_path)
    assert r.exit_code == 0 and "(2 trial(s)" in r.stdout


def test_float64_model_is_verified_by_the_numpy_reference(tmp_path) -> None:
    path = save(conv_chain(dtype=np.float64), tmp_path / "f64.onnx")
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", path, "-o", out)
    assert r.exit_code == 0, r.output
    assert "bnfold numpy reference" in r.stdout and "Could not find an implementation for Conv" in r.stdout


def test_custom_op_model_is_not_verifiable(tmp_path) -> None:
    path = save(custom_op_model(), tmp_path / "custom.onnx")
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", path, "-o", out)
    assert r.exit_code == 6 and not os.path.exists(out)
    assert "Frobnicate" in r.stderr and "--no-verify" in r.stderr and "Traceback" not in r.output
    assert invoke("fold", path, "-o", out, "--no-verify").exit_code == 0


# ---------------------------------------------------------------------------
# bnfold verify
# ---------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path) -> tuple[str, str, str]:
    """(original, correctly folded, wrongly folded) model files."""
    m = conv_chain(channels=(3, 8, 8, 4))
    folded = bnfold.fold_model(m).model
    conv1_w = next(n for n in folded.graph.node if n.name == "conv1").input[1]
    wrong = scale_channel(folded, conv1_w, channel=3, factor=1.5)
    return save(m, tmp_path / "a.onnx"), save(folded, tmp_path / "b.onnx"), save(wrong, tmp_path / "c.onnx")


def test_verify_equal_and_different(pair) -> None:
    a, b, c = pair
    r = invoke("verify", a, b)
    assert r.exit_code == 0 and "verify: passed" in r.stdout
    r = invoke("verify", a, c)
    assert r.exit_code == 3
    assert "FAIL output" in r.stdout and "x noise floor" in r.stdout and "calibrated" in r.stdout
    assert "differs" in r.stderr
    r = invoke("verify", a, c, "--no-calibrate")
    assert r.exit_code == 3 and "passes with atol >=" in r.stdout and "noise floor" not in r.stdout


def test_verify_tolerance_options(pair) -> None:
    a, _, c = pair
    r = invoke("verify", a, c, "--atol", "100")
    assert r.exit_code == 0 and "atol 100" in r.stdout
    assert invoke("verify", a, c, "--atol", "-1").exit_code == 2


def test_verify_unreadable_and_not_verifiable(pair, tmp_path) -> None:
    a, b, _ = pair
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    assert invoke("verify", a, str(junk)).exit_code == 4
    assert invoke("verify", str(tmp_path / "missing.onnx"), b).exit_code == 4
    custom = save(custom_op_model(), tmp_path / "custom.onnx")
    r = invoke("verify", custom, custom)
    assert r.exit_code == 6 and "Frobnicate" in r.stderr


def test_verify_in_a_real_process(pair) -> None:
    a, b, c = pair
    same = run_cli("verify", a, b)
    assert same.returncode == 0, same.stderr
    assert "verify: passed" in same.stdout
    diff = run_cli("verify", a, c, "--trials", "1")
    assert diff.returncode == 3
    assert "FAIL output" in diff.stdout and "Traceback" not in diff.stderr


def test_fold_in_a_real_process(models_dir: str, tmp_path) -> None:
    out = str(tmp_path / "mlp.onnx")
    p = run_cli("fold", os.path.join(models_dir, "mlp_bn.onnx"), "-o", out)
    assert p.returncode == 0, p.stderr
    assert "verify: passed" in p.stdout and os.path.exists(out)


def test_in_place_with_failing_verification_leaves_the_input(chain: str, corrupt_bn1) -> None:
    before = open(chain, "rb").read()
    r = CliRunner().invoke(main, ["fold", chain, "--in-place"], catch_exceptions=False)
    assert r.exit_code == 3, r.output
    assert open(chain, "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(chain))) == ["chain.onnx"]


def test_verify_json_matches_schema(chain: str, tmp_path) -> None:
    import json

    from test_cli import validate

    from bnfold.report_json import SCHEMA

    out = str(tmp_path / "out.onnx")
    assert invoke("fold", chain, "-o", out).exit_code == 0
    r = CliRunner().invoke(main, ["verify", chain, out, "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    validate(doc, SCHEMA)
    assert doc["command"] == "verify" and doc["models"][0]["verification"]["passed"] is True
    r = CliRunner().invoke(main, ["verify", chain, os.path.join(os.path.dirname(chain), "..", "nope.onnx"), "--json"])
    assert r.exit_code == 4
    validate(json.loads(r.stdout), SCHEMA)
