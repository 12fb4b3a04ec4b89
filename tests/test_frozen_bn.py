"""Frozen BN exported as arithmetic: the FrozenBatchNorm ResNet stage and the onnx light model zoo.

- ``models/frozen_bn_stage.onnx`` (built by ``scripts/make_frozen_bn.py``): every
  ``Conv -> Mul([1,C,1,1]) -> Add([1,C,1,1])`` ends as one Conv.
- ``light_densenet121`` and ``light_inception_v2`` (shipped in the onnx wheel):
  ``BN -> Mul -> Add`` chains (constants made by ``Unsqueeze``/``ConstantOfShape``)
  fold.  Their final output is uniform (the zoo weights are constant fills), so a
  few mid-network tensors are exposed as extra graph outputs before folding and
  compared too.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter

import numpy as np
import onnx
import pytest
from affine_builders import fold_checked, ops, patterns
from helpers import assert_close, random_feeds, run
from onnx import numpy_helper

import bnfold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _load_script():
    spec = importlib.util.spec_from_file_location("make_frozen_bn", os.path.join(ROOT, "scripts", "make_frozen_bn.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# FrozenBatchNorm ResNet stage
# ---------------------------------------------------------------------------


def test_frozen_bn_model_is_up_to_date_and_small(models_dir: str, tmp_path) -> None:
    """models/frozen_bn_stage.onnx is exactly what the script builds, and small."""
    path = _load_script().build(str(tmp_path))
    committed = os.path.join(models_dir, "frozen_bn_stage.onnx")
    with open(path, "rb") as f, open(committed, "rb") as g:
        assert f.read() == g.read()
    assert os.path.getsize(committed) < 200_000


def test_frozen_bn_stage_folds_to_plain_convs(models_dir: str) -> None:
    model = onnx.load(os.path.join(models_dir, "frozen_bn_stage.onnx"))
    before = ops(model)
    # Structure of the sample, counted here: each Conv has its Mul/Add pair; the
    # remaining Adds are the residual connections (no constant operand).
    inits = {t.name for t in model.graph.initializer}
    const_made = {o for n in model.graph.node if n.op_type in ("Constant", "Reshape") for o in n.output}
    residual = [
        n for n in model.graph.node if n.op_type == "Add" and not any(i in inits or i in const_made for i in n.input)
    ]
    assert before["Conv"] == before["Mul"] == 11 and len(residual) == 3
    assert before["Add"] == before["Conv"] + len(residual)

    result = fold_checked(model)
    after = ops(result.model)
    assert after == Counter({"Conv": 11, "Relu": before["Relu"], "Add": 3, "MaxPool": 1})
    assert patterns(result) == Counter({"Conv+Mul": 11, "Conv+Add": 11})
    assert result.report.skips == [] and result.report.affine_skips == []
    assert result.report.bn_count == 0
    # The constant-making nodes (Constant, Reshape) and the old constants are gone.
    live = {i for n in result.model.graph.node for i in n.input}
    assert {t.name for t in result.model.graph.initializer} <= live
    # Each Conv now has a bias; the residual Adds read Conv outputs or block inputs.
    assert all(len(n.input) == 3 for n in result.model.graph.node if n.op_type == "Conv")
    # More than one input batch: the fold holds for any N.
    for seed in (1, 2):
        feeds = {"input": np.random.default_rng(seed).standard_normal((seed, 3, 64, 64)).astype(np.float32)}
        for a, b in zip(run(model, feeds), run(result.model, feeds), strict=True):
            assert_close(a, b)
    again = bnfold.fold_model(result.model)
    assert again.report.folds == [] and again.model.SerializeToString() == result.model.SerializeToString()


# ---------------------------------------------------------------------------
# onnx light model zoo: densenet121, inception_v2
# ---------------------------------------------------------------------------


def _light(name: str) -> onnx.ModelProto:
    path = os.path.join(LIGHT, f"light_{name}.onnx")
    if not os.path.exists(path):
        pytest.skip(f"{path} is not shipped with this onnx")
    return onnx.load(path)


def _bn_chains(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(BN, Mul, Add) triples where each feeds only the next, found by walking the graph."""
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    chains = []
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        (mul,) = users[bn.output[0]]
        (add,) = users[mul.output[0]]
        assert (mul.op_type, add.op_type) == ("Mul", "Add")
        chains.append((bn, mul, add))
    return chains


def _real_stats_relus(model: onnx.ModelProto, chains) -> list[str]:
    """Relu outputs right after BN chains whose statistics are real (not constant fills)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    users = {i: n for n in model.graph.node for i in n.input}
    names = []
    for bn, _, add in chains:
        var = inits.get(bn.input[4])
        relu = users.get(add.output[0])
        if var is not None and np.unique(var).size > 1 and relu is not None and relu.op_type == "Relu":
            names.append(relu.output[0])
    return names


@pytest.mark.parametrize("name", ["densenet121", "inception_v2"])
def test_light_model_bn_mul_add_chains_fold(name: str) -> None:
    model = _light(name)
    chains = _bn_chains(model)
    assert len(chains) == ops(model)["BatchNormalization"] > 50
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    # A BN folds into the Conv before it when it is that Conv's only reader;
    # otherwise (after Concat / MaxPool in densenet) it stays and takes in Mul and Add.
    into_conv = [bn for bn, _, _ in chains if producers[bn.input[0]].op_type == "Conv" and readers[bn.input[0]] == 1]
    staying = len(chains) - len(into_conv)

    # Expose mid-network tensors: the first and last Relu after real statistics.
    relus = _real_stats_relus(model, chains)
    assert len(relus) >= 2
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in inferred.graph.value_info}
    for r in (relus[0], relus[-1]):
        model.graph.output.append(types[r])

    result = bnfold.fold_model(model)
    onnx.checker.check_model(result.model, full_check=True)
    after = ops(result.model)
    assert after["Mul"] == after["Add"] == 0
    assert after["BatchNormalization"] == staying
    assert after["Conv"] == ops(model)["Conv"]
    assert patterns(result) == Counter(
        {
            "Conv+BatchNormalization": len(into_conv),
            "Conv+Mul": len(into_conv),
            "Conv+Add": len(into_conv),
            "BatchNormalization+Mul": staying,
            "BatchNormalization+Add": staying,
        }
    )
    assert [s.reason for s in result.report.skips] == [bnfold.Reason.UNSUPPORTED_PRODUCER] * staying

    feeds = random_feeds(model, seed=3)
    original, folded = run(model, feeds), run(result.model, feeds)
    assert len(original) == 3
    for a, b in zip(original, folded, strict=True):
        assert np.all(np.isfinite(a))
        assert_close(a, b)
    # The mid-network tensors really vary (they would catch a wrong per-channel fold).
    for a in original[1:]:
        per_channel_means = a.mean(axis=(0, 2, 3))
        assert np.unique(per_channel_means).size > 1 and np.abs(a).max() > 0
