"""Hostile inputs to verification (issue 15): each builds the file, runs bnfold, and asserts the promise."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import onnx
import pytest
from builders import corrupt_rule
from click.testing import CliRunner
from helpers import run_cli
from onnx import TensorProto, helper, numpy_helper
from verify_builders import conv_chain

import bnfold
from bnfold.cli.commands import main
from bnfold.errors import InputFileError, InputShapeError
from bnfold.verify import iofile
from bnfold.verify.inputs import InputOptions, load_npz
from bnfold.verify.iofile import SAVE_IO_MARKER, load_io_file
from bnfold.verify.runners import Runner
from bnfold.verify.verifier import Verifier, VerifyOptions, verify_models


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def chain(tmp_path) -> str:
    path = str(tmp_path / "chain.onnx")
    onnx.save(conv_chain(), path)
    return path


def one_line(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


# ---------------------------------------------------------------------------
# blame reads external data from the model's folder, through the validated reader
# ---------------------------------------------------------------------------


def test_blame_from_another_folder_ignores_a_decoy_data_file(tmp_path, monkeypatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = str(src / "m.onnx")
    m = conv_chain(channels=(3, 8, 8, 8, 4))
    onnx.save(m, path, save_as_external_data=True, location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a decoy with the same name and size in the working directory: garbage weights
    size = os.path.getsize(src / "m.data")
    (elsewhere / "m.data").write_bytes(np.full(size // 4, 1e3, np.float32).tobytes())
    monkeypatch.chdir(elsewhere)

    def spoil(site):  # bn1 folds wrongly: one output channel's scale x 1.5
        if site.aff.node.name == "bn1":
            site.aff.s = np.array(site.aff.s, dtype=np.float64, copy=True)
            site.aff.s[1] *= 1.5

    corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)
    out = str(tmp_path / "out" / "o.onnx")
    os.makedirs(os.path.dirname(out))
    r = invoke("fold", path, "-o", out, "--keep-safe", "--external-data")
    assert r.exit_code == 0, r.output
    assert "bn1 (BatchNormalization) folded into conv1" in r.stdout
    assert "blame: 1 fold(s) break verification on their own" in r.stdout
    assert "fail only together" not in r.stdout


# ---------------------------------------------------------------------------
# --inputs files
# ---------------------------------------------------------------------------


def test_a_fifo_as_inputs_is_refused_not_waited_on(chain, tmp_path) -> None:
    fifo = str(tmp_path / "x.npz")
    os.mkfifo(fifo)
    r = run_cli("verify", chain, chain, "--inputs", fifo, timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    with pytest.raises(InputFileError, match="not a regular file"):
        load_npz(fifo)  # the library refuses it too (no blocking open)
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx", "x.npz"]


def _npz(path: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(a: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """An .npy member; ``shape`` makes its header lie about its size."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a)
    data = buf.getvalue()
    if shape is None:
        return data
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return head.getvalue() + a.astype("<f4").tobytes()


def test_inputs_whose_header_declares_a_huge_array_are_refused(chain, tmp_path) -> None:
    bomb = str(tmp_path / "bomb.npz")
    _npz(bomb, {"input.npy": _npy(np.zeros(4, np.float32), shape=(100000, 100000, 30))})
    r = invoke("verify", chain, chain, "--inputs", bomb)
    assert r.exit_code == 2 and "declares shape [100000, 100000, 30]" in r.stderr and one_line(r.stderr)


def test_inputs_that_unpack_beyond_the_bound_are_refused(chain, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(iofile, "MAX_NPZ_BYTES", 10_000)
    big = str(tmp_path / "big.npz")
    np.savez_compressed(big, input=np.zeros((1, 3, 8, 8 * 20), np.float32))  # compresses to almost nothing
    assert os.path.getsize(big) < 10_000
    with pytest.raises(InputFileError, match="too big: its arrays unpack to"):
        load_npz(big)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("not json {", "marker is not JSON"),
        (json.dumps({"sources": []}), "has no 'trials' count"),
        (json.dumps({"trials": 100_000_000}), "declares 100000000 trials"),
        (json.dumps({"trials": 7}), "declares 7 trials but holds"),
        (json.dumps([1, 2]), "has no 'trials' count"),
    ],
)
def test_malformed_save_io_markers_are_clear_errors(chain, tmp_path, marker: str, message: str) -> None:
    path = str(tmp_path / "io.npz")
    np.savez(path, **{SAVE_IO_MARKER: np.array(marker), "trial0/input/input": np.zeros((1, 3, 8, 8), np.float32)})
    r = invoke("verify", chain, chain, "--inputs", path)
    assert r.exit_code == 2 and message in r.stderr and one_line(r.stderr), r.stderr


def test_graph_names_in_save_io_members_are_encoded(tmp_path) -> None:
    evil = "trial0/../../../../x"
    m = conv_chain()
    m.graph.input[0].name = evil
    m.graph.node[0].input[0] = evil
    m.graph.output[0].name = "../out"
    m.graph.node[-1].output[0] = "../out"
    path = str(tmp_path / "io.npz")
    report = verify_models(m, m, VerifyOptions(save_io=path))
    assert report.passed
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    for n in names:
        assert ".." not in n.split("/") and not n.startswith("/"), n
        assert n.count("/") <= 2
    io_ = load_io_file(path)
    assert set(io_["trials"][0]["input"]) == {evil}
    assert set(io_["trials"][0]["reference"]) == {"../out"}
    # and the file feeds the model again, names decoded
    again = Verifier(m, VerifyOptions(inputs=InputOptions(files=[path])))
    np.testing.assert_array_equal(again.plan.feeds[0][evil], io_["trials"][0]["input"][evil])


# ---------------------------------------------------------------------------
# generated inputs and option values
# ---------------------------------------------------------------------------


def test_a_huge_declared_input_is_not_allocated(tmp_path) -> None:
    m = conv_chain(dims=[1, 3, 100000, 100000])
    path = str(tmp_path / "huge.onnx")
    onnx.save(m, path)
    r = run_cli("fold", path, "-o", str(tmp_path / "o.onnx"), timeout=120)
    assert r.returncode == 6, r.stderr
    assert "input 'input' float32[1,3,100000,100000] is too big to generate: 120000000000 bytes" in r.stderr
    assert one_line(r.stderr)
    with pytest.raises(InputShapeError):
        Verifier(m)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("option", ["--atol", "--rtol"])
def test_non_finite_tolerances_are_refused(chain, option: str, value: str) -> None:
    r = invoke("verify", chain, chain, f"{option}={value}")
    assert r.exit_code == 2


def test_negative_seed_is_refused(chain) -> None:
    r = invoke("verify", chain, chain, "--seed", "-1")
    assert r.exit_code == 2 and "--seed" in r.output


# ---------------------------------------------------------------------------
# many inputs, onnxruntime's state
# ---------------------------------------------------------------------------


def _many_inputs(n: int) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 2]) for i in range(n)]
    g = helper.make_graph(
        [helper.make_node("Sum", [f"x{i}" for i in range(n)], ["s"]), helper.make_node("Mul", ["s", "k"], ["y"])],
        "many",
        ins,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.array([2.0], np.float32), "k")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_many_inputs_skip_onnxruntimes_quadratic_feed_check(monkeypatch) -> None:
    """onnxruntime's InferenceSession.run checks each input with ``in list(feed)``: n^2 for n inputs."""
    import onnxruntime as ort

    def quadratic(self, names):
        raise AssertionError("InferenceSession._validate_input is O(n^2) in the number of inputs")

    monkeypatch.setattr(ort.InferenceSession, "_validate_input", quadratic, raising=False)
    m = _many_inputs(300)
    assert verify_models(m, m).passed
    # the check it replaces still names missing inputs
    runner = Verifier(m)._open(m, None, __import__("contextlib").ExitStack())
    assert isinstance(runner, Runner)
    with pytest.raises(ValueError, match="x299"):
        runner.run({f"x{i}": np.zeros((1, 2), np.float32) for i in range(299)})


def test_verification_writes_no_onnxruntime_state_outside_the_output_folder(chain, tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root
    out = str(tmp_path / "o.onnx")
    r = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", chain, "-o", out], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    written = [os.path.join(d, f) for d, _, files in os.walk(home) for f in files]
    assert written == []  # no ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}
    assert bnfold.__name__ == "bnfold"


def test_in_memory_models_read_external_data_only_inside_their_folder(tmp_path, monkeypatch) -> None:
    from bnfold.errors import ModelLoadError
    from bnfold.verify import runners

    src = tmp_path / "src"
    src.mkdir()
    m = conv_chain()
    onnx.save(m, str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = onnx.load(str(src / "m.onnx"), load_external_data=False)
    (tmp_path / "m.data").write_bytes((src / "m.data").read_bytes())
    for t in loaded.graph.initializer:  # point one tensor outside the model's folder
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.data"
        break
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelLoadError, match="leaves the model's folder"):
        runners.write_for_runtime(loaded, str(out), base_dir=str(src))
    monkeypatch.chdir(src)  # and an unknown folder is never taken to be the working directory
    with pytest.raises(Exception, match="folder is not known"):
        runners.write_for_runtime(onnx.load(str(src / "m.onnx"), load_external_data=False), str(out), None)


def test_calibration_of_an_external_data_model_run_from_elsewhere(tmp_path, monkeypatch) -> None:
    from verify_builders import steep_head

    src = tmp_path / "src"
    src.mkdir()
    path = str(src / "steep.onnx")
    m = steep_head(offset=2e4, seed=0)
    onnx.save(m, path, save_as_external_data=True, location="steep.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    folded = bnfold.fold_model(onnx.load(path, load_external_data=False), base_dir=str(src)).model
    report = verify_models(path, folded, base_dir=str(src))
    assert report.passed and report.rows[0].decision == "calibrated", report.to_dict()
