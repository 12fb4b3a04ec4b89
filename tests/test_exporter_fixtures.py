"""Real exporter output for issue 11: folds, outputs that still match, and what is left.

The fixtures are committed (CI installs no exporter) and made by
``scripts/make_keras_fixtures.py`` (tensorflow-cpu 2.21, Keras 3.15, tf_keras
2.21, tf2onnx 1.17) and ``scripts/make_exporter_fixtures.py`` (torch 2.14.1,
torchvision 0.29.1, timm 1.0.31, onnxscript 0.7.2); those scripts list every file.

Every fixture folds to a model that passes the full checker and computes the same
as the original in onnxruntime (``ORT_DISABLE_ALL``).  Then the affine ops left are
counted: the counts that computed constants and no-op removal achieve are plain
assertions; the ones that need the layout-aware folds of issue 11 (through
Squeeze/Transpose/Flatten, forward into Gemm) are marked xfail(strict) until
those folds land.
"""

from __future__ import annotations

import os
from collections import Counter

import onnx
import pytest
from helpers import assert_same_outputs

import bnfold

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

KERAS = ["keras3_conv1d_bn", "tfkeras_conv1d_bn", "keras3_conv2d_bn_noopt"]
NORMALIZATION = ["keras3_normalization", "tfkeras_normalization", "keras3_normalization_noopt"]
TIMM = ["levit_128s_tiny_ts17", "efficientvit_m0_tiny_ts17"]
FROZEN = ["frozen_bn_block_dynamo", "frozen_bn_block_ts17"]
FOLDERS = {
    **dict.fromkeys(KERAS + NORMALIZATION, "keras"),
    **dict.fromkeys(TIMM, "timm"),
    **dict.fromkeys(FROZEN, "frozen_bn"),
}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(os.path.join(HERE, FOLDERS[name], f"{name}.onnx"))


_FOLDED: dict[str, tuple[onnx.ModelProto, bnfold.FoldResult]] = {}


def folded(name: str) -> tuple[onnx.ModelProto, bnfold.FoldResult]:
    """``(original, fold result)``, folded once per test session."""
    if name not in _FOLDED:
        model = load(name)
        _FOLDED[name] = (model, bnfold.fold_model(model))
    return _FOLDED[name]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_fixture_folds_and_matches(name):
    model, result = folded(name)
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, atol=1e-5, rtol=1e-4)
    again = bnfold.fold_model(result.model)
    assert not again.report.folds  # nothing new shows up on a second run


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_bn_computed_chain_folds_completely(name):
    """``Conv -> Mul(m) -> Add(a)`` with ``m``, ``a`` computed from the buffers: every Mul/Sub/Div goes,
    and so does the constant chain (Reshape, Sqrt, Reciprocal, the dynamo zero bias); the residual Add stays."""
    model, result = folded(name)
    before, after = ops(model), ops(result.model)
    assert before["Mul"] == 9 and before["Sub"] == 3
    assert after == Counter({"Conv": 3, "Relu": 2, "Add": 1})
    assert sum(1 for f in result.report.folds if f.target_op == "Conv") == 6  # 3 Mul + 3 Add


@pytest.mark.parametrize("name", NORMALIZATION)
def test_normalization_noops_removed(name):
    """Keras' Normalization layer without weights: ``(x - 0) / 1``, exported as ``Add(x, 0)`` and ``Mul(x, 1)``."""
    _, result = folded(name)
    noops = sorted(f.pattern for f in result.report.folds if "normalization" in f.node and "(" in f.pattern)
    assert noops == ["Add(0)", "Mul(1)"]
    # Left: the Rescaling Mul(1/255) (before a Transpose and a padded Conv) and swish's Mul(x, sigmoid(x)).
    assert ops(result.model)["Mul"] == 2
    if not name.endswith("noopt"):
        assert ops(result.model)["Add"] == 0


def test_normalization_noopt_bn_shift_folds_through_transpose():
    _, result = folded("keras3_normalization_noopt")
    assert ops(result.model)["Add"] == 0


@pytest.mark.parametrize("name", KERAS)
def test_keras_affine_after_layout_ops_folds(name):
    """tf2onnx's ``Conv -> Squeeze -> Mul([1,C,1]) -> Add([1,C,1])``, ``Conv -> Transpose -> Mul([C]) -> Add([C])``."""
    _, result = folded(name)
    after = ops(result.model)
    assert after["Mul"] == 0 and after["Add"] == 0


@pytest.mark.parametrize("name", TIMM)
def test_timm_token_and_head_bns_fold(name):
    """LeViT's ``MatMul -> Flatten -> BN -> Reshape`` and both nets' ``BN -> (Flatten) -> Gemm`` heads."""
    model, result = folded(name)
    assert ops(model)["BatchNormalization"] > 0
    assert ops(result.model)["BatchNormalization"] == 0


@pytest.mark.parametrize("name", TIMM)
def test_timm_bns_are_all_reported(name):
    """Every BN of the timm nets is folded or left with a reason (none is lost)."""
    model, result = folded(name)
    assert len(result.report.skips) + result.report.bn_folded == ops(model)["BatchNormalization"]
