"""The Python API (issue 13, item 10): file-level calls, typed results, top-level errors, logging, progress."""

from __future__ import annotations

import logging
import os

import onnx
import pytest
from helpers import assert_same_outputs, op_count
from verify_builders import conv_chain

import bnfold
from bnfold.jobs import ModelOutcome


@pytest.fixture
def chain(tmp_path) -> str:
    path = str(tmp_path / "chain.onnx")
    onnx.save(conv_chain(), path)
    return path


def test_fold_file_does_what_the_command_does(chain: str, tmp_path) -> None:
    out = str(tmp_path / "out.onnx")
    phases: list[str] = []
    res = bnfold.fold_file(chain, out, progress=phases.append)
    assert isinstance(res, ModelOutcome) and res.exit_code == bnfold.ExitCode.OK
    assert isinstance(res.report, bnfold.FoldReport) and res.report.bn_folded == 3
    assert res.verification is not None and res.verification.passed
    assert phases[:2] == ["load", "fold"] and "verify" in phases and phases[-1] == "write"
    folded = onnx.load(out)
    assert op_count(folded, "BatchNormalization") == 0
    assert_same_outputs(onnx.load(chain), folded)


def test_fold_file_raises_the_top_level_errors(chain: str, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(bnfold.OutputError, match="--force"):
        bnfold.fold_file(chain, out)
    assert out.read_bytes() == b"keep me"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(bnfold.ModelLoadError):
        bnfold.fold_file(bad, tmp_path / "x.onnx")
    assert issubclass(bnfold.VerificationError, bnfold.BnfoldError)
    dyn = str(tmp_path / "dyn.onnx")
    onnx.save(conv_chain(dims=["N", 3, "h", "w"]), dyn)
    with pytest.raises(bnfold.UsageError):
        bnfold.fold_file(dyn, tmp_path / "d.onnx", input_shapes={"nosuch": (1, 3, 8, 8)})
    assert bnfold.fold_file(dyn, tmp_path / "d.onnx", input_shapes={"input": (1, 3, 8, 8)}).exit_code == 0


def test_check_file_and_fold_model_with_a_path(chain: str) -> None:
    res = bnfold.check_file(chain)
    assert res.exit_code == bnfold.ExitCode.FOLDABLE_LEFT and len(res.report.folds) == 3
    result = bnfold.fold_model(chain)
    assert isinstance(result, bnfold.FoldResult) and result.report.bn_folded == 3
    assert op_count(result.model, "BatchNormalization") == 0


def test_verify_functions_at_top_level(chain: str, tmp_path) -> None:
    out = str(tmp_path / "out.onnx")
    bnfold.fold_file(chain, out, verify=False)
    assert bnfold.verify_models(chain, out).passed
    assert callable(bnfold.verify_fold)


def test_logger_named_bnfold(chain: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="bnfold"):
        bnfold.check_file(chain)
    assert any(r.name == "bnfold" and "fold" in r.getMessage() for r in caplog.records)


def test_every_exported_name_resolves() -> None:
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None, name
    assert os.path.exists(os.path.join(os.path.dirname(bnfold.__file__), "py.typed"))


def test_blame_reports_each_verification_run_as_progress(chain: str, tmp_path, monkeypatch) -> None:
    """Blame can run many verifications: each shows as a ``blame N`` phase (the terminal ticker says so)."""
    import numpy as np
    from builders import corrupt_rule

    from bnfold.cli.render import phase_line

    def spoil(site):  # bn1 folds wrongly: one output channel's scale x 2
        if site.aff.node.name == "bn1":
            site.aff.s = np.array(site.aff.s, dtype=np.float64, copy=True)
            site.aff.s[0] *= 2.0

    corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)
    phases: list[str] = []
    res = bnfold.fold_file(chain, str(tmp_path / "out.onnx"), keep_safe=True, progress=phases.append)
    assert res.verification is not None and res.verification.kept_safe
    runs = [p for p in phases if p.startswith("blame ")]
    assert runs == [f"blame {k}" for k in range(1, len(runs) + 1)] and len(runs) >= 1
    assert "finding the folds that break verification (run 1)" in phase_line("m.onnx", runs[0])
