"""The file layer's promises (README "Bad input, safety, and what is never lost"), one reproduction each.

Every test builds its files, runs the CLI (in-process with CliRunner when a fault is
injected, as a real process otherwise) and checks the promise on disk.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import corrupt_rule
from click.testing import CliRunner
from helpers import assert_close, random_feeds, run, run_cli
from onnx import TensorProto, helper
from verify_builders import conv_chain

import bnfold.verify.foldcheck
from bnfold.cli.commands import main
from bnfold.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def save_ext(m: onnx.ModelProto, path: str, location: str | None = None) -> str:
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    onnx.save(
        m2, path, save_as_external_data=True, location=location or os.path.basename(path) + ".data", size_threshold=64
    )
    return path


def digest(folder) -> dict[str, str]:
    """Name -> sha256 of every file of a folder (links by their target's bytes)."""
    out = {}
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[n] = hashlib.sha256(f.read()).hexdigest()
    return out


def outputs_of(path: str) -> list[np.ndarray]:
    feeds = random_feeds(onnx.load(path, load_external_data=False), seed=3)
    return run(path, feeds)


def assert_runs_like(path: str, expected: list[np.ndarray]) -> None:
    for a, b in zip(outputs_of(path), expected, strict=True):
        assert_close(a, b)


@pytest.fixture
def pair(tmp_path):
    """An input with external data, and an external-data output of another model already at ``out.onnx``.

    The old output's weights differ from what the new run writes, so a replaced data
    file shows (the old model then runs with different outputs or not at all).
    """
    src = save_ext(conv_chain(channels=(3, 8, 8, 4)), str(tmp_path / "in.onnx"))
    old = save_ext(conv_chain(channels=(3, 8, 8, 4), seed=1), str(tmp_path / "old.onnx"))
    out = str(tmp_path / "out.onnx")
    r = run_cli("fold", old, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    return src, out, outputs_of(out)


@pytest.fixture
def corrupt_bn1(monkeypatch) -> None:
    """A fold that gets bn1 wrong: verification fails (exit 3)."""

    def spoil(site):
        if site.aff.node.name == "bn1":
            site.aff.s = np.array(site.aff.s, dtype=np.float64, copy=True)
            site.aff.s[0] *= 2.0

    corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)


# ---------------------------------------------------------------------------
# Data loss: never overwrite an input; the old output pair stays whole until the new one is verified
# ---------------------------------------------------------------------------


def test_output_data_file_name_is_the_input_model(tmp_path) -> None:
    """``-o out.onnx`` where ``out.onnx.data`` is the input model itself."""
    src = save_ext(conv_chain(), str(tmp_path / "out.onnx.data"), location="weights.bin")
    before = digest(tmp_path)
    expected = outputs_of(src)
    out = str(tmp_path / "out.onnx")
    r = run_cli("fold", src, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    after = digest(tmp_path)
    assert {k: after[k] for k in before} == before, "the input model and its data are untouched"
    assert_runs_like(src, expected)
    assert_runs_like(out, expected)
    assert sorted(after) == ["out.onnx", "out.onnx.1.data", "out.onnx.data", "weights.bin"]


def test_force_keeps_the_old_pair_when_verification_fails(pair, corrupt_bn1, monkeypatch) -> None:
    src, out, expected = pair
    folder = os.path.dirname(out)
    before = digest(folder)
    r = invoke("fold", src, "-o", out, "--force")
    assert r.exit_code == ExitCode.VERIFY_FAILED, r.output
    assert digest(folder) == before, "old model and old data file untouched, nothing left"
    assert_runs_like(out, expected)


def test_force_keeps_the_old_pair_when_the_model_cannot_be_verified(tmp_path) -> None:
    src = save_ext(conv_chain(dims=["N", 3, "h", "w"]), str(tmp_path / "in.onnx"))
    old = save_ext(conv_chain(dims=["N", 3, "h", "w"], seed=1), str(tmp_path / "old.onnx"))
    out = str(tmp_path / "out.onnx")
    r = invoke("fold", old, "-o", out, "--input-shape", "input:1,3,8,8")
    assert r.exit_code == 0, r.output
    expected = outputs_of(out)
    before = digest(tmp_path)
    r = invoke("fold", src, "-o", out, "--force")  # no --input-shape: exit 6 during verification
    assert r.exit_code == ExitCode.NOT_VERIFIED, r.output
    assert digest(tmp_path) == before
    assert_runs_like(out, expected)


def test_force_keeps_the_old_pair_when_interrupted_during_verification(pair, monkeypatch) -> None:
    src, out, expected = pair
    folder = os.path.dirname(out)
    before = digest(folder)
    seen = []

    def interrupted(original, result, *a, **kw):
        seen.append(sorted(os.listdir(folder)))  # the new data file is complete: the old one must be too
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.verify.foldcheck, "verify_fold", interrupted)
    r = invoke("fold", src, "-o", out, "--force")
    assert r.exit_code == ExitCode.INTERRUPTED, r.output
    assert seen and "out.onnx.data" in seen[0]
    assert digest(folder) == before
    assert_runs_like(out, expected)


def test_sigkill_during_verification_leaves_the_old_pair(pair) -> None:
    src, out, expected = pair
    folder = os.path.dirname(out)
    before = digest(folder)
    script = (
        "import os, signal, sys\n"
        "import bnfold.verify.foldcheck as b\n"
        "b.verify_fold = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from bnfold.cli import main\n"
        "sys.argv = ['bnfold', 'fold', sys.argv[1], '-o', sys.argv[2], '--force']\n"
        "main()\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", script, src, out], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    after = digest(folder)
    assert {k: after[k] for k in before} == before, "the old model and data file are byte for byte the same"
    assert_runs_like(out, expected)
    # What a SIGKILL cannot clean: the new, unreferenced data file and a hidden temp file;
    # the next run to this output removes the data file.
    r = run_cli("fold", src, "-o", out, "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    visible = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    assert len([n for n in visible if n.startswith("out.onnx") and n.endswith(".data")]) == 1, visible
    assert_runs_like(out, outputs_of(src))


def test_concurrent_runs_to_one_external_output(tmp_path) -> None:
    """Runs of two different models race to one output: it ends whole, one model's pair."""
    srcs = [save_ext(conv_chain(channels=(3, 16, 16, 8), seed=k), str(tmp_path / f"in{k}.onnx")) for k in (0, 1)]
    expected = [outputs_of(s) for s in srcs]
    out = str(tmp_path / "o" / "out.onnx")
    os.makedirs(os.path.dirname(out))
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bnfold", "fold", src, "-o", out, "--force", "--no-verify"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in (*srcs, *srcs)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    names = sorted(os.listdir(os.path.dirname(out)))
    assert len(names) == 2 and names[0] == "out.onnx" and names[1].endswith(".data"), names
    got = outputs_of(out)
    assert any(all(np.allclose(a, b, atol=1e-5) for a, b in zip(got, e, strict=True)) for e in expected)


# ---------------------------------------------------------------------------
# File identity: mode, owner, symlinks, hard links, non-regular files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o444, 0o600, 0o640])
def test_force_and_in_place_keep_the_mode(tmp_path, mode: int) -> None:
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    out = str(tmp_path / "out.onnx")
    with open(out, "wb") as f:
        f.write(b"old")
    os.chmod(out, mode)
    r = run_cli("fold", src, "-o", out, "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == mode
    assert stat.S_IMODE(os.stat(out + ".data").st_mode) == mode
    os.chmod(src, mode)
    r = run_cli("fold", src, "--in-place", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(src).st_mode) == mode


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_in_place_keeps_the_owner(tmp_path) -> None:
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    os.chown(src, 4321, 4322)
    r = run_cli("fold", src, "--in-place", "--no-verify")
    assert r.returncode == 0, r.stderr
    st = os.stat(src)
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_in_place_through_a_symlink_folds_its_target(tmp_path) -> None:
    target = save_ext(conv_chain(), str(tmp_path / "m-v3.onnx"))
    expected = outputs_of(target)
    link = str(tmp_path / "m.onnx")
    os.symlink("m-v3.onnx", link)
    r = run_cli("fold", link, "--in-place", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and os.readlink(link) == "m-v3.onnx", "the link stays a link"
    folded = onnx.load(target, load_external_data=False)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"], "the target was folded"
    assert_runs_like(link, expected)


def test_force_onto_a_symlink_writes_its_target(tmp_path) -> None:
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    real = tmp_path / "real.onnx"
    real.write_bytes(b"old")
    link = str(tmp_path / "link.onnx")
    os.symlink("real.onnx", link)
    r = run_cli("fold", src, "-o", link, "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link)
    assert_runs_like(str(real), outputs_of(src))


def test_dangling_symlink_needs_force(tmp_path) -> None:
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    link = str(tmp_path / "link.onnx")
    os.symlink("nowhere.onnx", link)
    r = run_cli("fold", src, "-o", link, "--no-verify")
    assert r.returncode == ExitCode.WRITE_FAILED and "already exists" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "link.onnx"]
    r = run_cli("fold", src, "-o", link, "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and os.path.isfile(tmp_path / "nowhere.onnx")


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_non_regular_outputs_are_refused(tmp_path, kind: str) -> None:
    """``-o /dev/null --force`` and ``-o FIFO --force``, on a device node of the test's own (never /dev/null:
    a bnfold that replaced it would break the machine)."""
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    out = str(tmp_path / kind)
    try:
        if kind == "device":
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
        else:
            os.mkfifo(out)
    except (PermissionError, OSError):
        pytest.skip(f"cannot make a {kind} here")
    r = run_cli("fold", src, "-o", out, "--force", "--no-verify")
    assert r.returncode == ExitCode.WRITE_FAILED and "not a regular file" in r.stderr, r.stderr
    mode = os.stat(out).st_mode
    assert stat.S_ISCHR(mode) if kind == "device" else stat.S_ISFIFO(mode)
    assert sorted(os.listdir(tmp_path)) == sorted(["in.onnx", "in.onnx.data", kind]), "nothing written next to it"


def test_hard_link_is_broken_like_sed_i_and_said(tmp_path) -> None:
    src = save_ext(conv_chain(), str(tmp_path / "in.onnx"))
    out = str(tmp_path / "out.onnx")
    with open(out, "wb") as f:
        f.write(b"old model")
    os.link(out, tmp_path / "other.onnx")
    r = run_cli("fold", src, "-o", out, "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "other.onnx").read_bytes() == b"old model", "the other name keeps the old file"
    assert "1 other hard link(s)" in r.stdout + r.stderr
    assert_runs_like(out, outputs_of(src))


# ---------------------------------------------------------------------------
# Every allocation that comes from the file is bounded: exit 4 with what is too big
# ---------------------------------------------------------------------------


def test_a_5_gb_sparse_model_file_is_refused_without_reading_it(tmp_path) -> None:
    path = str(tmp_path / "huge.onnx")
    with open(path, "wb") as f:
        f.truncate(5 << 30)
    r = run_cli("fold", path, "-o", str(tmp_path / "o.onnx"), timeout=120)
    assert r.returncode == ExitCode.INVALID_MODEL, r.stderr
    assert "5.0 GiB" in r.stderr and "2 GiB" in r.stderr and "Traceback" not in r.stderr


def _huge_weight_model(tmp_path, dims: list[int], data_size: int) -> str:
    """Conv+BN whose weight is external, declared with ``dims``, over a sparse data file."""
    c = dims[0]
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(data_size))):
        e = w.external_data.add()
        e.key, e.value = k, v
    ones = np.ones(c, np.float32)
    params = [onnx.numpy_helper.from_array(ones * v, n) for n, v in (("s", 1), ("b", 0), ("m", 0), ("v", 1))]
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[1], 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 1, 1])],
        [w, *params],
    )
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with open(tmp_path / "w.bin", "wb") as f:
        f.truncate(data_size)
    return path


def test_an_external_tensor_declared_at_4_tb_is_refused(tmp_path) -> None:
    dims = [1 << 20, 1 << 20, 1, 1]  # 2**40 floats: 4 TiB
    try:
        path = _huge_weight_model(tmp_path, dims, 4 << 40)
    except OSError:
        pytest.skip("this file system has no 4 TiB sparse files")
    r = run_cli("fold", path, "-o", str(tmp_path / "o.onnx"), "--no-verify", timeout=120)
    assert r.returncode == ExitCode.INVALID_MODEL, r.stderr
    assert "'w'" in r.stderr and "4.0 TiB" in r.stderr and "too big" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "w.bin"]


def test_dims_whose_product_overflows_a_float_are_refused(tmp_path) -> None:
    t = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 62] * 17)  # 2**1054: inf as a float
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [t],
    )
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = run_cli("fold", path, "-o", str(tmp_path / "o.onnx"), "--no-verify")
    assert r.returncode == ExitCode.INVALID_MODEL, r.stderr
    assert "'huge'" in r.stderr and "Traceback" not in r.stderr and "OverflowError" not in r.stderr


# ---------------------------------------------------------------------------
# One verified write path: the --keep-safe output is checked and verified as written
# ---------------------------------------------------------------------------


def test_keep_safe_output_is_the_bytes_that_were_verified(tmp_path, corrupt_bn1, monkeypatch) -> None:
    src = save_ext(conv_chain(channels=(3, 8, 8, 4)), str(tmp_path / "in.onnx"))
    out = str(tmp_path / "out.onnx")
    verified: list[tuple[str, str]] = []
    real = bnfold.verify.foldcheck.verify_fold

    def recording(original, result, *a, **kw):
        checked = real(original, result, *a, **kw)
        if isinstance(result.model, str) and checked.report.passed:
            m = onnx.load(result.model, load_external_data=False)
            verified.append((hashlib.sha256(m.SerializeToString()).hexdigest(), str(checked.report.passed)))
        return checked

    monkeypatch.setattr(bnfold.verify.foldcheck, "verify_fold", recording)
    r = invoke("fold", src, "-o", out, "--keep-safe")
    assert r.exit_code == 0, r.output
    written = onnx.load(out, load_external_data=False)
    assert [n.name for n in written.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    digest_out = hashlib.sha256(written.SerializeToString()).hexdigest()
    assert (digest_out, "True") in verified, "the written model is one that passed verification by path"
