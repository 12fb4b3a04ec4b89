"""Hostile inputs at the command line (issue 15): forged lines, strict JSON, side files, folders, dying workers."""

from __future__ import annotations

import glob
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

import onnx
import pytest
from click.testing import CliRunner
from helpers import op_count, run_cli
from onnx import TensorProto, helper
from verify_builders import conv_chain, model

import bnfold.jobs
from bnfold.cli import batch
from bnfold.cli.commands import main
from bnfold.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def save(m: onnx.ModelProto, path) -> str:
    onnx.save(m, str(path))
    return str(path)


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------
# forged output lines
# ---------------------------------------------------------------------------

FORGED = "bn0\n::error title=forged::owned\r\x1b[31m"


def forged_model(path: str) -> str:
    m = conv_chain(channels=(3, 4, 4))
    for n in m.graph.node:
        if n.name == "bn0":
            n.name = FORGED
    return save(m, path)


@pytest.mark.parametrize("fmt", ["text", "github"])
def test_control_characters_in_node_names_cannot_forge_lines(tmp_path, fmt: str) -> None:
    path = forged_model(str(tmp_path / "m.onnx"))
    p = run_cli("check", path, "--format", fmt, "-v")
    assert p.returncode == ExitCode.FOLDABLE_LEFT, p.stderr
    lines = p.stdout.splitlines()
    assert not any(line.startswith("::error title=forged") for line in lines)
    assert "\x1b" not in p.stdout and "\r" not in p.stdout
    if fmt == "github":
        assert sum(line.startswith("::error ") for line in lines) == 2  # bn0 and bn1, one annotation each
        assert "%0A::error title=forged" in p.stdout
    else:
        assert "\\n::error title=forged" in p.stdout


def test_control_characters_in_file_names_are_escaped(tmp_path) -> None:
    folder = tmp_path / "in\n::error title=x::y"
    folder.mkdir()
    path = save(conv_chain(channels=(3, 4, 4)), folder / "m.onnx")
    p = run_cli("check", path)
    assert not any(line.startswith("::error") for line in p.stdout.splitlines())
    bad = str(folder / "missing\n::warning::x.onnx")
    p = run_cli("check", bad)
    assert p.returncode == ExitCode.INVALID_MODEL
    assert len(p.stderr.strip().splitlines()) == 1 and "\\n::warning" in p.stderr


# ---------------------------------------------------------------------------
# strict JSON
# ---------------------------------------------------------------------------


def _unary(op: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    return model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]))


def test_nan_and_infinity_never_reach_the_json(tmp_path) -> None:
    ref = save(_unary("Abs"), tmp_path / "ref.onnx")
    cand = save(_unary("Sqrt"), tmp_path / "cand.onnx")  # NaN for negative inputs
    report = tmp_path / "r.json"
    p = run_cli("verify", ref, cand, "--json", "--report", str(report))
    assert p.returncode == ExitCode.VERIFY_FAILED, p.stderr
    doc = strict_json(p.stdout)
    strict_json(report.read_text())
    assert "nan" in json.dumps(doc["models"][0]["verification"])


def test_dumps_refuses_nothing_and_writes_strings() -> None:
    from bnfold.report_json import dumps

    doc = strict_json(dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": math.nan}}))
    assert doc == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": {"d": "nan"}}


# ---------------------------------------------------------------------------
# side files never replace models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--report", "--save-io"])
@pytest.mark.parametrize("target", ["input", "output", "output_data"])
def test_side_file_onto_a_model_is_refused(tmp_path, option: str, target: str) -> None:
    src = save(conv_chain(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old output")
    (tmp_path / "o.onnx.data").write_bytes(b"old data")
    victim = {"input": src, "output": str(out), "output_data": str(tmp_path / "o.onnx.data")}[target]
    before = open(victim, "rb").read()
    res = invoke("fold", src, "-o", str(out), "--force", option, victim)
    assert res.exit_code == ExitCode.WRITE_FAILED, res.output
    assert "choose another file" in res.stderr
    assert open(victim, "rb").read() == before


def test_side_file_onto_an_input_data_file_is_refused(tmp_path) -> None:
    src = str(tmp_path / "ext.onnx")
    onnx.save(conv_chain(channels=(3, 32, 4)), src, save_as_external_data=True, location="w.bin", size_threshold=0)
    data = tmp_path / "w.bin"
    before = data.read_bytes()
    res = invoke("check", src, "--report", str(data))
    assert res.exit_code == ExitCode.WRITE_FAILED, res.output
    assert "data file" in res.stderr
    assert data.read_bytes() == before


def test_report_mode_is_like_the_model(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        src = save(conv_chain(), tmp_path / "m.onnx")
        out, report, summary = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "s.md"
        io = tmp_path / "io.npz"
        assert invoke("fold", src, "-o", str(out), "--report", str(report), "--no-verify").exit_code == 0
        assert invoke("check", src, "--summary", str(summary)).exit_code == ExitCode.FOLDABLE_LEFT
        assert invoke("verify", src, str(out), "--save-io", str(io)).exit_code == 0
    finally:
        os.umask(old)
    mode = os.stat(out).st_mode & 0o777
    assert mode == 0o644
    assert os.stat(report).st_mode & 0o777 == mode and os.stat(summary).st_mode & 0o777 == mode
    assert os.stat(io).st_mode & 0o777 == mode


# ---------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------


def test_report_into_missing_folder_is_one_line(tmp_path) -> None:
    src = save(conv_chain(), tmp_path / "m.onnx")
    p = run_cli("fold", src, "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "nope" / "r.json"))
    assert p.returncode == ExitCode.WRITE_FAILED
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_batch_output_folder_under_a_regular_file_is_one_line(tmp_path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    save(conv_chain(), d / "a.onnx")
    save(conv_chain(seed=1), d / "b.onnx")
    (tmp_path / "file").write_text("x")
    p = run_cli("fold", str(d), "-o", str(tmp_path / "file" / "out"))
    assert p.returncode == ExitCode.WRITE_FAILED, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_batch_of_one_model_in_a_subfolder_mirrors_it(tmp_path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    save(conv_chain(), tmp_path / "in" / "sub" / "m.onnx")
    res = invoke("fold", str(tmp_path / "in"), "-o", str(tmp_path / "folded"))
    assert res.exit_code == 0, res.output
    assert op_count(onnx.load(str(tmp_path / "folded" / "sub" / "m.onnx")), "BatchNormalization") == 0


def test_output_folder_aliasing_a_folder_in_the_input_tree(tmp_path) -> None:
    src = tmp_path / "in"
    (src / "folded").mkdir(parents=True)
    save(conv_chain(), src / "m.onnx")
    alias = tmp_path / "alias"
    alias.symlink_to(src / "folded")
    for _ in range(2):
        res = invoke("fold", str(src), "-o", str(alias), "--force", "--json")
        assert res.exit_code == 0, res.output
        assert [os.path.basename(m["input"]) for m in json.loads(res.stdout)["models"]] == ["m.onnx"]
    assert sorted(os.listdir(src / "folded")) == ["m.onnx"]


# ---------------------------------------------------------------------------
# dying workers, SIGTERM
# ---------------------------------------------------------------------------

_real_fold_job = bnfold.jobs.fold_job


def _dies_on_victim(path: str, output: str, opts, progress=None):
    if os.path.basename(path) == "victim.onnx":
        # As if killed mid-write: a temp file next to the output, then SIGKILL.
        open(os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.abc123.tmp"), "wb").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_fold_job(path, output, opts, progress)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="patching a job needs fork")
def test_batch_worker_killed_is_that_models_error_and_the_rest_go_on(tmp_path, monkeypatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.onnx", "victim.onnx", "z.onnx"):
        save(conv_chain(), src / name)
    monkeypatch.setattr(bnfold.jobs, "fold_job", _dies_on_victim)
    jobs_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "bnfold-job-*")))
    res = invoke("fold", str(src), "-o", str(tmp_path / "out"), "--jobs", "2", "--json")
    doc = json.loads(res.stdout)
    by = {os.path.basename(m["input"]): m for m in doc["models"]}
    assert by["victim.onnx"]["status"] != "ok" and "SIGKILL" in by["victim.onnx"]["error"]
    assert by["a.onnx"]["status"] == by["z.onnx"]["status"] == "ok"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.onnx", "z.onnx"]  # no temp files
    assert multiprocessing.active_children() == []
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "bnfold-job-*"))) == jobs_before


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
    return out


def _slow_model(path: str) -> None:
    """Big enough that verifying it takes a while on any machine."""
    save(conv_chain(channels=(3, 64, 64, 64, 64), dims=["N", 3, 96, 96]), path)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the workers")
def test_sigterm_to_batch_parent_stops_now_and_cleans_up(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        _slow_model(str(src / f"m{i}.onnx"))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(out), "--jobs", "2", "--trials", "20"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not workers:
        workers = _children(proc.pid)
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the batch finished before a worker was seen")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "Traceback" not in err
    left = [f for f in os.listdir(out) if f.endswith(".tmp")] if out.exists() else []
    assert left == []
    for w in workers:
        assert not os.path.exists(f"/proc/{w}") or open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_dead_worker_message_names_the_signal() -> None:
    assert "SIGKILL" in batch._how(-signal.SIGKILL) and "out-of-memory" in batch._how(-signal.SIGKILL)
    assert batch._how(3) == "exit status 3"
