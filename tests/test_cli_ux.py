"""The command line as black/ruff/polygraphy users expect it (issue 13): CI gate, stdin/stdout, scannable output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import assert_same_outputs, op_count, run_cli
from onnx import TensorProto, helper
from verify_builders import bn, bn_params, conv_chain, model

from bnfold.cli.commands import main
from bnfold.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args: str, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def save(m: onnx.ModelProto, path) -> str:
    onnx.save(m, str(path))
    return str(path)


def left_alone(n: int = 5) -> onnx.ModelProto:
    """``n`` BNs straight on the graph input, each to its own output: all left, for the same reason."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(n):
        inits += bn_params(rng, f"bn{i}", 3)
        nodes.append(bn(f"bn{i}", "x", f"y{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 3, 4, 4]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    return model(helper.make_graph(nodes, "g", [x], outs, inits))


@pytest.fixture
def chain(tmp_path) -> str:
    return save(conv_chain(channels=(3, 8, 8, 4)), tmp_path / "chain.onnx")


# ---------------------------------------------------------------------------
# 1. side files checked before any model runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--report", "--summary"])
def test_side_file_in_missing_folder_is_exit_5_before_any_model_runs(chain: str, tmp_path, option: str) -> None:
    bad = str(tmp_path / "no" / "such" / "r.json")
    p = run_cli("check", chain, option, bad)
    assert p.returncode == ExitCode.WRITE_FAILED, p.stderr
    assert p.stderr.count("\n") == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""  # no model ran: nothing was reported


def test_fold_report_to_unwritable_path_writes_no_model(chain: str, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    res = invoke("fold", chain, "-o", str(out), "--report", os.path.join(chain, "r.json"))  # under a file
    assert res.exit_code == ExitCode.WRITE_FAILED
    assert "does not exist" in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------
# 2. - for stdin and stdout
# ---------------------------------------------------------------------------


def _pipe(args: list[str], data: bytes, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args], input=data, capture_output=True, env=env, cwd=cwd, timeout=300
    )


def test_fold_stdin_to_stdout(chain: str, tmp_path) -> None:
    data = open(chain, "rb").read()
    p = _pipe(["fold", "-", "-o", "-"], data, str(tmp_path))
    assert p.returncode == 0, p.stderr
    folded = onnx.load_from_string(p.stdout)
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(onnx.load(chain), folded)
    assert b"BatchNormalization 3 found, 3 folded" in p.stderr  # messages on stderr
    assert sorted(os.listdir(tmp_path)) == ["chain.onnx"]  # no file named '-'


def test_check_stdin(chain: str, tmp_path) -> None:
    p = _pipe(["check", "-"], open(chain, "rb").read(), str(tmp_path))
    assert p.returncode == ExitCode.FOLDABLE_LEFT, p.stderr
    assert p.stdout.startswith(b"-: 3 of 3 BatchNormalization foldable")


def test_stdin_with_external_data_is_refused(tmp_path) -> None:
    m = conv_chain(channels=(3, 64, 4))
    path = str(tmp_path / "ext.onnx")
    onnx.save(m, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    p = _pipe(["fold", "-", "-o", "-"], open(path, "rb").read(), str(tmp_path))
    assert p.returncode == ExitCode.INVALID_MODEL
    assert b"external data" in p.stderr and b"pipe" in p.stderr and b"Traceback" not in p.stderr
    assert p.stdout == b""


# ---------------------------------------------------------------------------
# 3. --input-shape mistakes are usage errors; bare shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "words"),
    [("nosuch:1,3,8,8", "has no input 'nosuch'"), ("input:1,3,8", "3 dimension(s) given"), ("input:1,4,8,8", "fixes")],
)
def test_input_shape_typo_is_exit_2_and_suggests_no_no_verify(tmp_path, shape: str, words: str) -> None:
    path = save(conv_chain(dims=["N", 3, "h", "w"]), tmp_path / "dyn.onnx")
    res = invoke("fold", path, "-o", str(tmp_path / "o.onnx"), "--input-shape", shape)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert words in res.stderr and "--no-verify" not in res.stderr


def test_suggested_input_shape_parses_and_works(tmp_path) -> None:
    path = save(conv_chain(dims=["N", 3, "height", "width"]), tmp_path / "dyn.onnx")
    res = invoke("fold", path, "-o", str(tmp_path / "o.onnx"))
    assert res.exit_code == ExitCode.NOT_VERIFIED
    suggested = res.stderr.split("--input-shape ", 1)[1].split()[0]
    again = invoke("fold", path, "-o", str(tmp_path / "o.onnx"), "--input-shape", suggested)
    assert again.exit_code == 0, again.output


def test_bare_shape_for_single_input_model(tmp_path) -> None:
    path = save(conv_chain(dims=["N", 3, "h", "w"]), tmp_path / "dyn.onnx")
    res = invoke("fold", path, "-o", str(tmp_path / "o.onnx"), "--input-shape", "1,3,8,8")
    assert res.exit_code == 0, res.output
    assert "verify: passed" in res.stdout


# ---------------------------------------------------------------------------
# 4. check as a CI gate
# ---------------------------------------------------------------------------


def test_ignore_by_pattern_name_passes_the_gate(chain: str) -> None:
    assert invoke("check", chain).exit_code == ExitCode.FOLDABLE_LEFT
    assert invoke("check", chain, "--ignore", "Conv+BatchNormalization").exit_code == 0
    assert invoke("check", chain, "--ignore", "*+BatchNormalization").exit_code == 0
    assert invoke("check", chain, "--ignore", "Gemm+BatchNormalization").exit_code == ExitCode.FOLDABLE_LEFT


def test_select_reason_code_fails_on_bn_left(tmp_path) -> None:
    path = save(left_alone(), tmp_path / "left.onnx")
    assert invoke("check", path).exit_code == 0
    assert invoke("check", path, "--select", "unsupported_producer").exit_code == ExitCode.FOLDABLE_LEFT
    assert invoke("check", path, "--select", "shape_mismatch").exit_code == 0


def test_unknown_code_is_a_usage_error(chain: str) -> None:
    res = invoke("check", chain, "--ignore", "bogus")
    assert res.exit_code == ExitCode.USAGE and "unknown code 'bogus'" in res.output


def test_keep_safe_output_passes_check_with_ignore_excluded(tmp_path) -> None:
    # A model whose owner accepts some BNs: --ignore by reason code turns off a --select of it.
    path = save(left_alone(), tmp_path / "left.onnx")
    sel = ("--select", "unsupported_producer")
    assert invoke("check", path, *sel, "--ignore", "unsupported_producer").exit_code == 0


def test_github_format_and_markdown_summary(chain: str, tmp_path) -> None:
    summary = tmp_path / "summary.md"
    res = invoke("check", chain, "--format", "github", "--summary", str(summary))
    assert res.exit_code == ExitCode.FOLDABLE_LEFT
    annotations = [line for line in res.stdout.splitlines() if line.startswith("::error ")]
    assert len(annotations) == 3
    assert all("file=" in a and "title=bnfold%3A foldable Conv+BatchNormalization::" in a for a in annotations)
    text = summary.read_text()
    assert "| model | status |" in text and "chain.onnx" in text and "foldable nodes left" in text


def test_mul_add_only_model_reads_as_what_it_is(models_dir: str) -> None:
    res = invoke("check", os.path.join(models_dir, "frozen_bn_stage.onnx"))
    first = res.stdout.splitlines()[0]
    assert "22 foldable Add/Mul" in first and "BatchNormalization" not in first


# ---------------------------------------------------------------------------
# 5. output people can scan
# ---------------------------------------------------------------------------


def test_identical_reasons_are_grouped_with_counts_and_verbose_lists_all(tmp_path) -> None:
    path = save(left_alone(5), tmp_path / "left.onnx")
    res = invoke("check", path)
    lines = res.stdout.splitlines()
    assert len(lines) == 4, lines  # head, the group, its one shared sentence, the verdict
    assert "left 5 BatchNormalization" in lines[1] and "[unsupported_producer]" in lines[1]
    assert "and 2 more" in lines[1]
    verbose = invoke("check", path, "--verbose").stdout
    assert all(f"bn{i}: " in verbose for i in range(5))


def test_fold_lists_folds_grouped_by_pattern_and_verdict_is_last(chain: str, tmp_path) -> None:
    res = invoke("fold", chain, "-o", str(tmp_path / "o.onnx"))
    lines = res.stdout.splitlines()
    assert "  folded 3 x Conv+BatchNormalization: bn0, bn1, bn2" in lines
    assert lines[-1].startswith("fold: 1 of 1 model done")


def test_progress_lines_use_words(chain: str, tmp_path) -> None:
    shutil.copy(chain, tmp_path / "b.onnx")
    p = run_cli("check", chain, str(tmp_path / "b.onnx"))
    assert "[2/2]" in p.stderr and "foldable nodes left" in p.stderr and "foldable_left" not in p.stderr


@pytest.mark.parametrize(("args", "env", "colored"), [
    (["--color", "always"], {}, True),
    (["--color", "never"], {}, False),
    (["--color", "auto"], {}, False),  # not a terminal
    (["--color", "always"], {"NO_COLOR": "1"}, True),  # an explicit option wins
])  # fmt: skip
def test_color_option_and_no_color(chain: str, args: list[str], env: dict, colored: bool) -> None:
    res = CliRunner(env=env).invoke(main, ["check", chain, *args])
    assert ("\x1b[" in res.stdout) is colored


def test_close_numbers_get_enough_digits() -> None:
    from bnfold.cli.render import distinct

    a, b = distinct(-2.3712, -2.3718)
    assert a != b and float(a) == pytest.approx(-2.3712, abs=1e-3) and float(b) == pytest.approx(-2.3718, abs=1e-3)
    assert distinct(1.5, 2.5) == ("1.5", "2.5")


# ---------------------------------------------------------------------------
# 6. idempotence, 7. size growth
# ---------------------------------------------------------------------------


def test_in_place_with_nothing_to_fold_leaves_the_file_untouched(chain: str, tmp_path) -> None:
    assert invoke("fold", chain, "--in-place").exit_code == 0
    before = os.stat(chain)
    res = invoke("fold", chain, "--in-place")
    assert res.exit_code == 0
    after = os.stat(chain)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "left unchanged" in res.stdout
    doc = json.loads(invoke("fold", chain, "--in-place", "--json").stdout)
    assert doc["models"][0]["unchanged"] is True


def _constant_of_shape_weights(path: str) -> None:
    """A Conv whose 2 MiB weight is built by ConstantOfShape: folding stores it."""
    c, k = 96, 8
    rng = np.random.default_rng(0)
    shape = helper.make_tensor("wshape", TensorProto.INT64, [4], [c, c, k, k])
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.01])
        ),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn("bn", "c", "y"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, k, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 1, 1])
    onnx.save(model(helper.make_graph(nodes, "g", [x], [y], [shape, *bn_params(rng, "bn", c)])), path)


def test_size_growth_is_stated(tmp_path) -> None:
    src = str(tmp_path / "cos.onnx")
    _constant_of_shape_weights(src)
    res = invoke("fold", src, "-o", str(tmp_path / "o.onnx"), "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["models"][0]
    assert m["size_growth"] > 100
    assert any("computes at run time" in n for n in m["notes"])
    text = invoke("fold", src, "-o", str(tmp_path / "o2.onnx")).stdout
    assert "the output is" in text and "ConstantOfShape" in text


# ---------------------------------------------------------------------------
# 11. configuration, 12. small inconsistencies
# ---------------------------------------------------------------------------


def test_pyproject_config_found_upward_and_overridden(chain: str, tmp_path) -> None:
    proj = tmp_path / "proj"
    (proj / "deep" / "er").mkdir(parents=True)
    (proj / "pyproject.toml").write_text('[tool.bnfold]\nignore = ["Conv+BatchNormalization"]\n')
    cwd = str(proj / "deep" / "er")
    assert run_cli("check", chain, cwd=cwd).returncode == 0
    assert run_cli("check", chain, cwd=str(tmp_path)).returncode == ExitCode.FOLDABLE_LEFT
    # The command line overrides the file (a --select replaces the ignore list's effect only with its own).
    p = run_cli("check", chain, "--ignore", "Gemm+BatchNormalization", cwd=cwd)
    assert p.returncode == ExitCode.FOLDABLE_LEFT


def test_config_input_shapes_per_glob(tmp_path) -> None:
    save(conv_chain(dims=["N", 3, "h", "w"]), tmp_path / "dyn.onnx")
    (tmp_path / "pyproject.toml").write_text('[tool.bnfold.input-shapes]\n"dyn*.onnx" = ["input:1,3,8,8"]\n')
    p = run_cli("fold", "dyn.onnx", "-o", "out.onnx", cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr


def test_config_unknown_key_is_exit_2(chain: str, tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.bnfold]\natoll = 1\n")
    p = run_cli("check", chain, cwd=str(tmp_path))
    assert p.returncode == ExitCode.USAGE and "atoll" in p.stderr


def test_single_input_with_output_folder(chain: str, tmp_path) -> None:
    res = invoke("fold", chain, "-o", str(tmp_path / "newdir") + "/")
    assert res.exit_code == 0, res.output
    assert op_count(onnx.load(str(tmp_path / "newdir" / "chain.onnx")), "BatchNormalization") == 0


def test_verify_line_names_both_models(chain: str, tmp_path) -> None:
    out = str(tmp_path / "o.onnx")
    invoke("fold", chain, "-o", out, "--no-verify")
    res = invoke("verify", chain, out)
    line = next(x for x in res.stdout.splitlines() if x.startswith("verify: passed"))
    assert chain in line and out in line


def test_json_of_invalid_model_has_the_same_keys(chain: str, tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    doc = json.loads(invoke("check", chain, str(bad), "--json").stdout)
    good, broken = doc["models"]
    assert set(good) == set(broken)


def test_group_help_does_not_truncate_and_options_are_in_sections() -> None:
    text = invoke("--help").output
    assert "Read-only lint: list what could still be folded, and what cannot and" in " ".join(text.split("\n"))
    assert "..." not in text.split("Commands:")[1].split("Examples")[0]
    fold_help = invoke("fold", "--help").output
    for section in ("Output options:", "Verification options:", "Models options:", "Reports and messages options:"):
        assert section in fold_help
    assert "CI gate options:" in invoke("check", "--help").output


def test_shell_completion_works() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT, _BNFOLD_COMPLETE="bash_source")
    p = subprocess.run([sys.executable, "-c", "import bnfold.cli; bnfold.cli.main(prog_name='bnfold')"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert "_bnfold_completion" in p.stdout


# ---------------------------------------------------------------------------
# 9. feedback on long work
# ---------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_single_model_shows_its_phases_on_a_terminal(chain: str, tmp_path) -> None:
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, "-m", "bnfold", "fold", chain, "-o", str(tmp_path / "o.onnx")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    for words in (b"reading...", b"folding...", b"verifying", b"writing..."):
        assert words in seen, seen
    assert b"verifying" not in proc.stdout.read()  # the phases are terminal feedback, not results
    # Not on a terminal: no phase lines at all.
    p = run_cli("fold", chain, "-o", str(tmp_path / "o2.onnx"))
    assert "folding..." not in p.stderr


def test_every_reason_code_has_words() -> None:
    from bnfold.cli.render import REASON_WORDS
    from bnfold.fold.report import Reason

    assert {r.value for r in Reason} <= set(REASON_WORDS)
