"""Per-fold blame: corrupted folds are found and named; the model without them passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from builders import corrupt_rule
from onnx import TensorProto, helper
from verify_builders import bn, bn_params, conv_chain, two_outputs, weight

import bnfold
from bnfold.cli.render import blame_lines
from bnfold.fold import math as fold_math
from bnfold.fold.report import Reason
from bnfold.verify.blame import find_culprits, fold_subset
from bnfold.verify.foldcheck import verify_fold
from bnfold.verify.inputs import InputOptions
from bnfold.verify.verifier import Verifier, VerifyOptions, verify_models


@pytest.fixture
def corrupt_bn(monkeypatch):
    """Make the fold of the named BNs wrong: one output channel's scale off by 50%."""

    def apply(*names: str) -> None:
        def spoil(site):
            aff = site.aff
            if aff.node.name in names:
                aff.s = np.array(aff.s, dtype=np.float64, copy=True)
                aff.s[1] *= 1.5

        corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)

    return apply


@pytest.fixture
def wrong_axis(monkeypatch):
    """fold_conv scaling the *input*-channel axis of square Conv weights (the classic bug)."""
    right = fold_math.fold_conv

    def fold_conv(w, b, s, t, weight_dtype=None):
        w = np.asarray(w, dtype=np.float64)
        if w.shape[0] != w.shape[1]:
            return right(w, b, s, t)
        _, b2 = right(w, b, s, t)
        return w * s.reshape(1, -1, *([1] * (w.ndim - 2))), b2

    monkeypatch.setattr(fold_math, "fold_conv", fold_conv)


def _bn_left(m: onnx.ModelProto) -> set[str]:
    return {n.name for n in m.graph.node if n.op_type == "BatchNormalization"}


def test_corrupted_fold_is_caught_and_blamed_on_its_bn(corrupt_bn) -> None:
    m = conv_chain(channels=(3, 8, 8, 8, 4))
    corrupt_bn("bn2")
    result = bnfold.fold_model(m)
    assert len(result.report.folds) == 4
    fv = verify_fold(m, result)
    assert not fv.ok and not fv.report.passed
    assert [f.node for f in fv.blame.culprits] == ["bn2"]
    assert fv.blame.culprits[0].pattern == "Conv+BatchNormalization"
    assert fv.blame.groups == []
    assert fv.blame.safe_passed
    text = "\n".join(blame_lines(fv.blame))
    assert "bn2" in text and "Conv+BatchNormalization" in text and "bn1 " not in text
    # bisection, not one run per fold and subset: 4 folds, 1 culprit
    assert fv.blame.checks <= 6


def test_keep_safe_returns_every_fold_but_the_culprit(corrupt_bn) -> None:
    m = conv_chain(channels=(3, 8, 8, 8, 4))
    corrupt_bn("bn1")
    fv = verify_fold(m, bnfold.fold_model(m), keep_safe=True)
    assert fv.ok and fv.kept_safe
    safe = fv.result
    assert _bn_left(safe.model) == {"bn1"}
    assert [s.reason for s in safe.report.skips] == [Reason.EXCLUDED]
    assert {f.node for f in safe.report.folds} == {"bn0", "bn2", "bn3"}
    # independently of the blame run: the safe model matches the original
    assert verify_models(m, safe.model).passed


def test_wrong_axis_is_blamed_on_the_square_convs_only(wrong_axis) -> None:
    m = conv_chain(channels=(3, 8, 8, 4))  # conv1 is 8 -> 8: the only one where the wrong axis fits
    result = bnfold.fold_model(m)
    fv = verify_fold(m, result, keep_safe=True)
    assert [f.node for f in fv.blame.culprits] == ["bn1"]
    assert fv.kept_safe and _bn_left(fv.result.model) == {"bn1"}


def test_several_culprits(corrupt_bn) -> None:
    m = conv_chain(channels=(3, 8, 8, 8, 8, 8, 4))
    corrupt_bn("bn0", "bn3", "bn4")
    fv = verify_fold(m, bnfold.fold_model(m), keep_safe=True)
    assert sorted(f.node for f in fv.blame.culprits) == ["bn0", "bn3", "bn4"]
    assert fv.kept_safe and _bn_left(fv.result.model) == {"bn0", "bn3", "bn4"}
    for f in fv.blame.culprits:  # each one fails on its own
        alone = fold_subset(m, {(f.graph, f.node)})
        assert not verify_models(m, alone.model).passed


def test_culprit_in_one_of_several_outputs(monkeypatch) -> None:
    m = two_outputs()

    def spoil(site):
        site.aff.t = np.asarray(site.aff.t, dtype=np.float64) + 1.0

    corrupt_rule(monkeypatch, "Gemm+BatchNormalization", spoil)
    fv = verify_fold(m, bnfold.fold_model(m))
    assert [r.name for r in fv.report.failing] == ["vector"]
    assert [(f.node, f.pattern) for f in fv.blame.culprits] == [("bn_vec", "Gemm+BatchNormalization")]
    d = fv.to_dict()
    assert d["blame"]["culprits"][0]["node"] == "bn_vec"
    assert d["blame"]["culprits"][0]["failing_outputs"][0]["name"] == "vector"


def test_a_correct_fold_needs_no_blame() -> None:
    m = conv_chain()
    fv = verify_fold(m, bnfold.fold_model(m), keep_safe=True)
    assert fv.ok and fv.blame is None and not fv.kept_safe


def test_blame_from_a_path_reloads_the_original(tmp_path, corrupt_bn) -> None:
    path = str(tmp_path / "m.onnx")
    onnx.save(conv_chain(channels=(3, 8, 8, 4)), path)
    corrupt_bn("bn0")
    fv = verify_fold(path, bnfold.fold_model(onnx.load(path)), keep_safe=True)
    assert [f.node for f in fv.blame.culprits] == ["bn0"] and fv.kept_safe


# ---------------------------------------------------------------------------
# the search itself, against a verifier that knows the answer
# ---------------------------------------------------------------------------


@dataclass
class _Report:
    passed: bool
    failing: tuple = ()
    error: str | None = None


class _OracleVerifier:
    """Fails a folded model when it holds a bad fold, or all folds of a bad group."""

    def __init__(self, bad: set[str], together: set[str] = frozenset()) -> None:
        self.bad, self.together, self.runs = bad, together, 0

    def check(self, model: onnx.ModelProto, base_dir: str | None = None) -> _Report:
        self.runs += 1
        folded = {f"bn{i}" for i in range(12)} - _bn_left(model)
        broken = bool(folded & self.bad) or (bool(self.together) and self.together <= folded)
        return _Report(passed=not broken)


@pytest.mark.parametrize("bad", [{"bn0"}, {"bn11"}, {"bn5", "bn6"}, {"bn1", "bn4", "bn9"}])
def test_search_finds_exactly_the_bad_folds(bad: set[str]) -> None:
    m = conv_chain(channels=(3,) + (4,) * 12)
    folds = bnfold.fold_model(m).report.folds
    oracle = _OracleVerifier(bad)
    res = find_culprits(m, folds, oracle)  # type: ignore[arg-type]
    assert {f.node for f in res.culprits} == bad and res.groups == []
    assert res.safe is not None and res.safe_passed
    assert _bn_left(res.safe.model) == bad
    assert res.checks == oracle.runs <= 2 * len(bad) * 4 + 2


def test_folds_that_fail_only_together_are_a_group() -> None:
    m = conv_chain(channels=(3,) + (4,) * 12)
    folds = bnfold.fold_model(m).report.folds
    res = find_culprits(m, folds, _OracleVerifier(bad={"bn2"}, together={"bn7", "bn8"}))  # type: ignore[arg-type]
    assert {f.node for f in res.culprits} == {"bn2"}
    assert len(res.groups) == 1 and {"bn7", "bn8"} <= {f.node for f in res.groups[0]}
    assert res.safe_passed


def test_search_stops_at_its_budget() -> None:
    m = conv_chain(channels=(3,) + (4,) * 12)
    folds = bnfold.fold_model(m).report.folds
    res = find_culprits(m, folds, _OracleVerifier(bad={"bn1", "bn6", "bn10"}), max_checks=3)  # type: ignore[arg-type]
    assert res.exhausted and res.checks == 3 and res.safe is None
    assert any("stopped" in line for line in blame_lines(res))


# ---------------------------------------------------------------------------
# the engine hook
# ---------------------------------------------------------------------------


def test_fold_model_only_names() -> None:
    m = conv_chain(channels=(3, 8, 8, 4))
    r = bnfold.fold_model(m, only={"bn0", "bn2"})
    assert {f.node for f in r.report.folds} == {"bn0", "bn2"}
    assert _bn_left(r.model) == {"bn1"}
    (skip,) = r.report.skips
    assert skip.node == "bn1" and skip.reason == Reason.EXCLUDED
    assert verify_models(m, r.model).passed


def test_fold_model_only_predicate_sees_graph_paths() -> None:
    m = conv_chain(channels=(3, 8, 4))
    seen: list[tuple[str, str]] = []

    def allow(name: str, path: str) -> bool:
        seen.append((name, path))
        return name != "bn0"

    r = bnfold.fold_model(m, only=allow)
    assert ("bn0", "main") in seen and ("bn1", "main") in seen
    assert {f.node for f in r.report.folds} == {"bn1"}


def test_fold_model_only_empty_folds_nothing() -> None:
    m = conv_chain()
    r = bnfold.fold_model(m, only=set())
    assert r.report.folds == [] and len(r.report.skips) == 3


def test_verifier_reuses_reference_outputs(corrupt_bn) -> None:
    m = conv_chain(channels=(3, 8, 8, 4))
    v = Verifier(m)
    ref = [list(o) for o in v.ref_outputs]
    corrupt_bn("bn1")
    find_culprits(m, bnfold.fold_model(m).report.folds, v)
    assert v.checks >= 2
    for a, b in zip(ref, v.ref_outputs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)


def _if_model() -> onnx.ModelProto:
    """Main: Conv+BN ``bn_main``; then an If whose then-branch holds Conv+BN ``bn_inner`` (outer weights)."""
    rng = np.random.default_rng(0)
    inits = [weight(rng, "w_main", (4, 3, 3, 3)), weight(rng, "w_inner", (4, 4, 1, 1))]
    inits += bn_params(rng, "bn_main", 4) + bn_params(rng, "bn_inner", 4)
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["h", "w_inner"], ["ci"], name="conv_inner"),
            bn("bn_inner", "ci", "then_out"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 4, 6, 6])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["else_out"], name="keep")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 4, 6, 6])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w_main"], ["c"], name="conv_main", pads=[1, 1, 1, 1]),
        bn("bn_main", "c", "h"),
        helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes,
        "if_model",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_blame_inside_an_if_branch(corrupt_bn) -> None:
    m = _if_model()
    corrupt_bn("bn_inner")
    result = bnfold.fold_model(m)
    assert {(f.node, f.graph) for f in result.report.folds} == {
        ("bn_main", "main"),
        ("bn_inner", "main/branch.then_branch"),
    }
    opts = VerifyOptions(inputs=InputOptions(trials=6))  # the bool flag takes both values
    fv = verify_fold(m, result, opts, keep_safe=True)
    assert [(f.node, f.graph) for f in fv.blame.culprits] == [("bn_inner", "main/branch.then_branch")]
    assert fv.kept_safe
    assert "in main/branch.then_branch" in "\n".join(blame_lines(fv.blame))
