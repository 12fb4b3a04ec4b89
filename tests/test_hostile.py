"""Broken and hostile inputs: one clear line, a documented exit code, nothing lost, no path escapes."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import run_cli
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli.commands import main
from bnfold.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "models", "resnet_block.onnx")


def sample() -> onnx.ModelProto:
    return onnx.load(SAMPLE)


def fold(*args: str):
    return CliRunner().invoke(main, ["fold", *args], catch_exceptions=False)


def assert_one_clear_error(res, code: ExitCode, *words: str) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], errors[0]


def write(path, data: bytes | onnx.ModelProto) -> str:
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.SerializeToString())
    return str(path)


def with_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
    return model


def _bad_inputs(tmp_path) -> dict[str, tuple[str, tuple[str, ...]]]:
    data = sample().SerializeToString()
    m_dangling = sample()
    m_dangling.graph.node[1].input[0] = "nothing_makes_this"
    m_checker = sample()
    m_checker.graph.node[0].op_type = "NoSuchOp"
    m_opset = sample()
    m_opset.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    not_model = helper.make_graph([], "g", [], []).SerializeToString()
    cases = {
        "missing": (str(tmp_path / "missing.onnx"), ("no such file",)),
        "empty": (write(tmp_path / "empty.onnx", b""), ("empty",)),
        "random": (write(tmp_path / "random.onnx", np.random.default_rng(1).bytes(4096)), ("not an ONNX model",)),
        "truncated": (write(tmp_path / "trunc.onnx", data[: len(data) * 2 // 3]), ("not an ONNX model",)),
        "not_a_model": (write(tmp_path / "graph.onnx", not_model), ("not an ONNX model",)),
        "checker": (write(tmp_path / "checker.onnx", m_checker), ("invalid model", "NoSuchOp")),
        "dangling": (write(tmp_path / "dangling.onnx", m_dangling), ("invalid model", "nothing_makes_this")),
        "new_opset": (write(tmp_path / "opset.onnx", m_opset), ("newer than the installed onnx",)),
        "bn_length": (
            write(tmp_path / "bnlen.onnx", with_init(sample(), "bn1.scale", np.ones(15, np.float32))),
            ("bn1", "one length"),
        ),
        "bn_rank": (
            write(tmp_path / "bnrank.onnx", with_init(sample(), "bn1.mean", np.zeros((16, 1), np.float32))),
            ("bn1",),
        ),
        "negative_var": (
            write(tmp_path / "negvar.onnx", with_init(sample(), "bn2.var", -np.ones(16, np.float32))),
            ("bn2", "negative"),
        ),
        "nan_var": (
            write(tmp_path / "nanvar.onnx", with_init(sample(), "bn2.var", np.full(16, np.nan, np.float32))),
            ("bn2", "NaN"),
        ),
    }
    return cases


CASES = [
    "missing", "empty", "random", "truncated", "not_a_model", "checker", "dangling",
    "new_opset", "bn_length", "bn_rank", "negative_var", "nan_var",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_model_gets_one_clear_error(tmp_path, case: str) -> None:
    path, words = _bad_inputs(tmp_path)[case]
    before = open(path, "rb").read() if os.path.isfile(path) else None
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = fold(path, "-o", str(out))
    assert_one_clear_error(res, ExitCode.INVALID_MODEL, *words)
    assert os.listdir(out.parent) == []
    if before is not None:
        assert open(path, "rb").read() == before
    res = CliRunner().invoke(main, ["check", path])
    assert res.exit_code == ExitCode.INVALID_MODEL and "Traceback" not in res.output


def test_folder_where_a_file_is_expected(tmp_path) -> None:
    (tmp_path / "models.onnx").mkdir()
    shutil.copy(SAMPLE, tmp_path / "models.onnx" / "m.onnx")
    res = CliRunner().invoke(main, ["fold", str(tmp_path / "models.onnx"), "-o", str(tmp_path / "out.onnx")])
    assert res.exit_code == ExitCode.USAGE
    assert "folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out.onnx").exists()
    from bnfold.errors import ModelLoadError
    from bnfold.onnxio.load import load_model

    with pytest.raises(ModelLoadError, match="is a folder"):
        load_model(str(tmp_path / "models.onnx"))


# --- external data -------------------------------------------------------------------


def external_model(folder, location: str = "weights.bin") -> str:
    """A sample model whose conv1 weight lives in an external file ``location`` (relative to folder)."""
    m = sample()
    path = os.path.join(folder, "model.onnx")
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)  # fmt: skip
    return path


def set_location(path: str, location: str) -> None:
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, path)


def test_external_data_loads(tmp_path) -> None:
    path = external_model(tmp_path)
    res = fold(path, "-o", str(tmp_path / "o.onnx"))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "missing", "short", "folder"])
def test_unsafe_or_broken_external_data_is_refused(tmp_path, kind: str) -> None:
    model_dir = tmp_path / "model"
    outside = tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    path = external_model(model_dir)
    data = model_dir / "weights.bin"
    secret = outside / "secret.bin"
    shutil.copy(data, secret)
    expect = {"dotdot": "leaves", "absolute": "absolute", "symlink": "link", "hardlink": "hard link",
              "missing": "missing", "short": "too short", "folder": "regular file"}[kind]  # fmt: skip
    if kind == "dotdot":
        set_location(path, "../outside/secret.bin")
    elif kind == "absolute":
        set_location(path, str(secret))
    elif kind == "symlink":
        data.unlink()
        os.symlink(secret, data)
    elif kind == "hardlink":
        data.unlink()
        os.link(secret, data)
    elif kind == "missing":
        data.unlink()
    elif kind == "short":
        with open(data, "r+b") as f:
            f.truncate(100)
    elif kind == "folder":
        data.unlink()
        data.mkdir()
    secret_before = secret.read_bytes()
    res = fold(path, "-o", str(tmp_path / "o.onnx"))
    assert_one_clear_error(res, ExitCode.INVALID_MODEL, expect)
    assert not (tmp_path / "o.onnx").exists()
    assert secret.read_bytes() == secret_before


# --- outputs ---------------------------------------------------------------------------


def test_output_folder_missing(tmp_path) -> None:
    res = fold(SAMPLE, "-o", str(tmp_path / "nope" / "o.onnx"))
    assert_one_clear_error(res, ExitCode.WRITE_FAILED, "does not exist")


def test_output_folder_not_writable(tmp_path) -> None:
    # /sys refuses new files even to root, unlike a chmod-ed folder.
    res = fold(SAMPLE, "-o", "/sys/bnfold-test-output.onnx")
    assert_one_clear_error(res, ExitCode.WRITE_FAILED, "cannot write")


def test_output_equal_to_input_without_in_place(tmp_path) -> None:
    src = shutil.copy(SAMPLE, tmp_path / "m.onnx")
    before = open(src, "rb").read()
    res = fold(str(src), "-o", str(src))
    assert_one_clear_error(res, ExitCode.WRITE_FAILED, "--in-place")
    assert open(src, "rb").read() == before


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous output")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    res = fold(SAMPLE, "-o", str(out), "--force")
    assert_one_clear_error(res, ExitCode.WRITE_FAILED, "No space left")
    assert out.read_bytes() == b"previous output"
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]


def test_unexpected_exception_is_one_line_bug_report(tmp_path, monkeypatch) -> None:
    import bnfold.jobs

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(bnfold.jobs, "fold_model", boom)
    res = fold(SAMPLE, "-o", str(tmp_path / "o.onnx"))
    assert_one_clear_error(res, ExitCode.INTERNAL, "bug", "--debug")
    res = CliRunner().invoke(main, ["fold", SAMPLE, "-o", str(tmp_path / "o2.onnx"), "--debug"])
    assert res.exit_code == ExitCode.INTERNAL
    assert "Traceback" in res.output and "ZeroDivisionError" in res.output


def _big_model(path: str, mb: int = 120) -> None:
    """A model large enough that writing it takes a noticeable moment."""
    c = 64
    k = max(1, mb * 1024 * 1024 // (4 * c * c * 9))
    inits, nodes, x = [], [], "x"
    rng = np.random.default_rng(0)
    for i in range(k):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3), dtype=np.float32), f"w{i}"))
        for p, v in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
            inits.append(numpy_helper.from_array(np.full(c, v, np.float32), f"{p}{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"y{i}"]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 4, 4])], inits)  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_writing_leaves_nothing(tmp_path, sig: int) -> None:
    src = str(tmp_path / "big.onnx")
    _big_model(src)
    before = os.path.getsize(src), os.stat(src).st_mtime_ns
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "bnfold", "fold", src, "-o", str(out_dir / "o.onnx"), "--no-verify"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(f.endswith(".tmp") for f in os.listdir(out_dir)):
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.fail(f"finished before a temp file was seen: {proc.communicate()}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "Traceback" not in err
    assert os.listdir(out_dir) == []
    assert (os.path.getsize(src), os.stat(src).st_mtime_ns) == before


def test_subprocess_missing_file() -> None:
    p = run_cli("fold", "/no/such/model.onnx", "-o", "/tmp/never-written.onnx")
    assert p.returncode == ExitCode.INVALID_MODEL
    assert p.stderr.strip().startswith("bnfold: error:") and "Traceback" not in p.stderr
    assert not os.path.exists("/tmp/never-written.onnx")
