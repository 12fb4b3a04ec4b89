"""The bundled sample models fold completely and still compute the same outputs."""

from __future__ import annotations

import os

import onnx
import pytest
from helpers import assert_same_outputs, op_count

import bnfold

SAMPLES = ["resnet_block.onnx", "convtranspose_decoder.onnx", "mlp_bn.onnx"]


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_folds_and_matches(models_dir: str, name: str) -> None:
    model = onnx.load(os.path.join(models_dir, name))
    before = model.SerializeToString()
    result = bnfold.fold_model(model)
    assert model.SerializeToString() == before, "fold_model must not modify its input"
    assert op_count(result.model, "BatchNormalization") == 0
    assert result.report.bn_folded == result.report.bn_count == op_count(model, "BatchNormalization")
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("name", SAMPLES)
def test_fold_is_deterministic_and_idempotent(models_dir: str, name: str) -> None:
    model = onnx.load(os.path.join(models_dir, name))
    once = bnfold.fold_model(model).model
    assert bnfold.fold_model(model).model.SerializeToString() == once.SerializeToString()
    again = bnfold.fold_model(once)
    assert again.model.SerializeToString() == once.SerializeToString()
    assert again.report.folds == []


def test_sample_models_are_up_to_date(models_dir: str, tmp_path) -> None:
    """models/ holds exactly what scripts/make_models.py builds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_models", os.path.join(models_dir, "..", "scripts", "make_models.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for path in mod.build_all(str(tmp_path)):
        with open(path, "rb") as f, open(os.path.join(models_dir, os.path.basename(path)), "rb") as g:
            assert f.read() == g.read(), os.path.basename(path)
