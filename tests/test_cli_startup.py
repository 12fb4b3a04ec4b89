"""Start-up (issue 14): --help and --version import no onnx or numpy; ``import bnfold`` is lazy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import sys
import bnfold.cli
sys.argv = ["bnfold", *{args!r}]
try:
    bnfold.cli.main()
except SystemExit:
    pass
heavy = sorted(m for m in ("onnx", "numpy", "onnxruntime", "ml_dtypes") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def _probe(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=list(args))], capture_output=True, text=True, env=env, timeout=120
    )
    line = [x for x in p.stderr.splitlines() if x.startswith("HEAVY:")]
    assert line, p.stderr
    return line[0][len("HEAVY:") :]


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["fold", "--help"], ["check", "--help"], ["verify", "--help"]]
)
def test_help_and_version_import_no_onnx_or_numpy(args: list[str]) -> None:
    assert _probe(*args) == ""


def test_import_bnfold_is_lazy_and_the_api_still_resolves() -> None:
    code = (
        "import sys, bnfold; assert 'onnx' not in sys.modules and 'numpy' not in sys.modules;"
        "import bnfold.cli; assert 'onnx' not in sys.modules;"
        "f = bnfold.fold_file; assert 'onnx' in sys.modules; print(f.__module__)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "bnfold.api"


def test_light_copies_of_defaults_agree() -> None:
    from bnfold.cli import commands, options
    from bnfold.onnxio.writer import DEFAULT_SIZE_THRESHOLD
    from bnfold.verify.inputs import DEFAULT_INT_RANGE, DEFAULT_TRIALS

    assert commands.DEFAULT_SIZE_THRESHOLD == DEFAULT_SIZE_THRESHOLD
    assert options.DEFAULT_INT_RANGE == DEFAULT_INT_RANGE and options.DEFAULT_TRIALS == DEFAULT_TRIALS
