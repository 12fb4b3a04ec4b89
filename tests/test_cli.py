"""The command line: commands, JSON reports against the schema, exit codes, batches."""

from __future__ import annotations

import json
import os
import shutil

import onnx
import pytest
from click.testing import CliRunner
from helpers import assert_same_outputs, op_count, run_cli

from bnfold import __version__
from bnfold.cli.commands import main
from bnfold.errors import ExitCode
from bnfold.report_json import SCHEMA, SCHEMA_VERSION

SAMPLES = ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx"]


def validate(doc: object, schema: dict, where: str = "$") -> None:
    """A small JSON Schema check (type, enum, required, properties, items): enough for our schema."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        py = {
            "object": dict,
            "array": list,
            "string": str,
            "integer": int,
            "number": (int, float),
            "null": type(None),
            "boolean": bool,
        }
        ok = any(isinstance(doc, py[t]) and not (t == "integer" and isinstance(doc, bool)) for t in names)
        assert ok, f"{where}: {doc!r} is not {names}"
    if "enum" in schema:
        assert doc in schema["enum"], f"{where}: {doc!r} not in {schema['enum']}"
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            assert key in doc, f"{where}: missing {key}"
        for key, sub in schema.get("properties", {}).items():
            if key in doc:
                validate(doc[key], sub, f"{where}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            validate(item, schema["items"], f"{where}[{i}]")


@pytest.fixture
def samples(tmp_path, models_dir: str) -> str:
    """A folder with copies of the sample models (inputs must never change)."""
    d = tmp_path / "in"
    d.mkdir()
    for name in SAMPLES:
        shutil.copy(os.path.join(models_dir, name), d / name)
    return str(d)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_fold_single_model_writes_equivalent_model(samples: str, tmp_path) -> None:
    src = os.path.join(samples, "resnet_block.onnx")
    before = open(src, "rb").read()
    out = str(tmp_path / "out.onnx")
    res = invoke("fold", src, "-o", out)
    assert res.exit_code == 0, res.output
    assert "3 found, 3 folded, 0 left" in res.output
    assert open(src, "rb").read() == before
    folded = onnx.load(out)
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(onnx.load(src), folded)


def test_fold_refuses_existing_output_without_force(samples: str, tmp_path) -> None:
    src = os.path.join(samples, "mlp_bn.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    res = invoke("fold", src, "-o", str(out))
    assert res.exit_code == ExitCode.WRITE_FAILED
    assert "--force" in res.output
    assert out.read_bytes() == b"keep me"
    assert invoke("fold", src, "-o", str(out), "--force").exit_code == 0
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0


def test_fold_output_equal_to_input_needs_in_place(samples: str) -> None:
    src = os.path.join(samples, "mlp_bn.onnx")
    before = open(src, "rb").read()
    res = invoke("fold", src, "-o", src)
    assert res.exit_code == ExitCode.WRITE_FAILED
    assert "--in-place" in res.output
    assert open(src, "rb").read() == before


def test_fold_in_place_replaces_input(samples: str) -> None:
    src = os.path.join(samples, "convtranspose_decoder.onnx")
    original = onnx.load(src)
    res = invoke("fold", src, "--in-place")
    assert res.exit_code == 0, res.output
    folded = onnx.load(src)
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(original, folded)
    assert [f for f in os.listdir(samples) if f.endswith(".tmp")] == []


def test_in_place_and_output_exclude_each_other(samples: str, tmp_path) -> None:
    res = CliRunner().invoke(main, ["fold", os.path.join(samples, "mlp_bn.onnx"), "--in-place", "-o", "x.onnx"])
    assert res.exit_code == ExitCode.USAGE


def test_check_exit_codes(samples: str, tmp_path) -> None:
    src = os.path.join(samples, "resnet_block.onnx")
    res = invoke("check", src)
    assert res.exit_code == ExitCode.FOLDABLE_LEFT
    assert "foldable 3 x Conv+BatchNormalization: bn1, bn2, head_bn" in res.output
    out = str(tmp_path / "folded.onnx")
    assert invoke("fold", src, "-o", out).exit_code == 0
    assert invoke("check", out).exit_code == ExitCode.OK
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    res = invoke("check", str(bad))
    assert res.exit_code == ExitCode.INVALID_MODEL
    assert "Traceback" not in res.output


def test_check_never_writes(samples: str) -> None:
    before = {f: open(os.path.join(samples, f), "rb").read() for f in os.listdir(samples)}
    invoke("check", samples)
    after = {f: open(os.path.join(samples, f), "rb").read() for f in os.listdir(samples)}
    assert before == after


@pytest.mark.parametrize("command", ["fold", "check"])
def test_json_report_matches_schema(samples: str, tmp_path, command: str) -> None:
    args = [command, samples, "--json"]
    if command == "fold":
        args += ["-o", str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)  # click >= 8.2: res.stdout excludes stderr
    doc = json.loads(res.stdout)
    validate(doc, SCHEMA)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["command"] == command
    assert doc["exit_code"] == res.exit_code
    assert len(doc["models"]) == len(SAMPLES)
    assert doc["summary"]["bn_found"] == 8
    for m in doc["models"]:
        assert m["bn_found"] == m["bn_folded"] == len(m["folds"])
        assert m["timings"]["total"] >= 0


def test_report_file_and_quiet(samples: str, tmp_path) -> None:
    report = tmp_path / "report.json"
    res = invoke("check", samples, "--report", str(report), "--quiet")
    assert res.exit_code == ExitCode.FOLDABLE_LEFT
    assert res.stdout == ""
    # -q still names the models that fail, one line each (on stderr, with the errors).
    assert len(res.stderr.splitlines()) == 3 and "mlp_bn.onnx: foldable nodes left" in res.stderr
    doc = json.loads(report.read_text())
    validate(doc, SCHEMA)
    assert doc["status"] == "foldable_left"


def test_batch_mirrors_tree_and_survives_a_broken_model(samples: str, tmp_path) -> None:
    sub = os.path.join(samples, "nested", "deeper")
    os.makedirs(sub)
    shutil.copy(os.path.join(samples, "mlp_bn.onnx"), os.path.join(sub, "mlp_copy.onnx"))
    with open(os.path.join(samples, "broken.onnx"), "wb") as f:
        f.write(b"\x08\x07garbage")
    out = tmp_path / "out"
    res = invoke("fold", samples, "-o", str(out), "--jobs", "2")
    assert res.exit_code == ExitCode.INVALID_MODEL, res.output
    for rel in [*SAMPLES, os.path.join("nested", "deeper", "mlp_copy.onnx")]:
        folded = onnx.load(str(out / rel))
        assert op_count(folded, "BatchNormalization") == 0
    assert not (out / "broken.onnx").exists()
    assert "broken.onnx" in res.output and "invalid model" in res.output


def test_batch_glob_selects_files(samples: str, tmp_path) -> None:
    res = invoke("check", samples, "--glob", "mlp*.onnx", "--json")
    doc = json.loads(res.stdout)
    assert [os.path.basename(m["input"]) for m in doc["models"]] == ["mlp_bn.onnx"]


def test_pattern_is_a_deprecated_alias_of_glob(samples: str) -> None:
    res = invoke("check", samples, "--pattern", "mlp*.onnx", "--json")
    assert "deprecated" in res.stderr and "--glob" in res.stderr
    assert [os.path.basename(m["input"]) for m in json.loads(res.stdout)["models"]] == ["mlp_bn.onnx"]
    assert "--pattern" not in invoke("check", "--help").output


def test_version_and_help() -> None:
    res = invoke("--version")
    assert __version__ in res.output
    for cmd in ([], ["fold"], ["check"]):
        res = invoke(*cmd, "--help")
        assert res.exit_code == 0
        assert "Exit codes" in res.output and "Examples" in res.output


def test_usage_error_exit_code() -> None:
    res = CliRunner().invoke(main, ["fold", "--no-such-option"])
    assert res.exit_code == ExitCode.USAGE


# --- real subprocesses: python -m bnfold behaves like the console script -------------


def test_subprocess_fold_and_check(samples: str, tmp_path) -> None:
    out = str(tmp_path / "o.onnx")
    p = run_cli("fold", os.path.join(samples, "resnet_block.onnx"), "-o", out)
    assert p.returncode == 0, p.stderr
    assert "3 folded" in p.stdout
    p = run_cli("check", out, "--json")
    assert p.returncode == 0, p.stderr
    validate(json.loads(p.stdout), SCHEMA)
    p = run_cli("check", os.path.join(samples, "mlp_bn.onnx"))
    assert p.returncode == ExitCode.FOLDABLE_LEFT
    p = run_cli("check", str(tmp_path / "missing.onnx"))
    assert p.returncode == ExitCode.INVALID_MODEL
    assert "no such file" in p.stderr and "Traceback" not in p.stderr


def test_subprocess_batch_plain_progress_lines(samples: str, tmp_path) -> None:
    p = run_cli("fold", samples, "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert "[3/3]" in p.stderr  # not a terminal: one plain line per model on stderr
    assert "\x1b[" not in p.stdout  # no colour codes when not on a terminal
