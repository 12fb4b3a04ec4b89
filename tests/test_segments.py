"""Sliced verification runs (``bnfold.verify.segments``): the same outputs as one session, wrong folds still caught.

Graphs with many initializers run as consecutive slices, each its own onnxruntime
session.  The outputs are compared with one whole session of the same model
(bitwise: every node runs the same kernel on the same values), and a fold made
wrong on purpose must still fail verification.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import corrupt_rule
from helpers import session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import VerificationError
from bnfold.verify import runners, segments
from bnfold.verify.segments import SlicedSession, plan_slices


def _dag(n: int, skips: list[int], outputs_mid: list[int], seed: int) -> onnx.ModelProto:
    """A chain of Mul/Add by constants with skip Adds reaching back ``skip`` steps, some middle outputs.

    One initializer is read by every tenth node (shared across slices), one graph
    input is read only at the end.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], [numpy_helper.from_array(np.float32(0.999).reshape(1), "shared")]
    names = ["x"]
    for i in range(n):
        k = numpy_helper.from_array(rng.uniform(0.9, 1.1, (1, 3)).astype(np.float32), f"k{i}")
        inits.append(k)
        src = names[-1]
        if i % 10 == 0:
            nodes.append(helper.make_node("Mul", [src, "shared"], [f"s{i}"]))
            src = f"s{i}"
        nodes.append(helper.make_node("Mul" if i % 2 else "Add", [src, f"k{i}"], [f"v{i}"]))
        out = f"v{i}"
        back = skips[i % len(skips)]
        if back and i >= back:
            nodes.append(helper.make_node("Add", [out, names[-back]], [f"j{i}"]))
            out = f"j{i}"
        names.append(out)
    nodes.append(helper.make_node("Add", [names[-1], "late"], ["y"]))
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    for m in outputs_mid:
        if 0 < m < len(names) - 1 and names[m] not in {o.name for o in outs}:
            outs.append(helper.make_tensor_value_info(names[m], TensorProto.FLOAT, [2, 3]))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("late", TensorProto.FLOAT, [2, 3]),
        ],
        outs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _sliced_run(model: onnx.ModelProto, feed: dict, slice_nodes: int) -> list[np.ndarray]:
    slices = plan_slices(model, slice_nodes)
    assert slices is not None and len(slices) > 1
    sessions = [session(s.model) for s in slices]
    return SlicedSession(slices, sessions, [o.name for o in model.graph.output]).run(feed)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(40, 160),
    skips=st.lists(st.sampled_from([0, 1, 3, 17, 40]), min_size=1, max_size=4),
    mids=st.lists(st.integers(1, 150), max_size=4),
    slice_nodes=st.integers(7, 60),
    seed=st.integers(0, 2**16),
)
def test_sliced_outputs_equal_one_session(monkeypatch, n, skips, mids, slice_nodes, seed) -> None:
    monkeypatch.setattr(segments, "SPLIT_MIN_INITIALIZERS", 1)
    model = _dag(n, skips, mids, seed)
    rng = np.random.default_rng(seed)
    feed = {k: rng.standard_normal((2, 3)).astype(np.float32) for k in ("x", "late")}
    whole = session(model).run(None, feed)
    slice_nodes = min(slice_nodes, len(model.graph.node) - 1)  # at least two slices
    for a, b in zip(whole, _sliced_run(model, feed, slice_nodes), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("why", ["few", "subgraph", "fed_initializer", "external"])
def test_graphs_that_run_whole(tmp_path, why) -> None:
    model = _dag(80, [3], [], 0)
    minimum = segments.SPLIT_MIN_INITIALIZERS if why == "few" else 1
    if why == "subgraph":
        branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "b", [],
                                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])  # fmt: skip
        model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    if why == "fed_initializer":
        model.graph.input.append(helper.make_tensor_value_info("k5", TensorProto.FLOAT, [1, 3]))
    if why == "external":
        onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
        model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(segments, "SPLIT_MIN_INITIALIZERS", minimum)
        assert plan_slices(model, 10) is None


def _conv_bn_chain(blocks: int, seed: int = 0) -> onnx.ModelProto:
    """Conv 1x1 + BN + Relu blocks near the identity (the signal survives 900 of them): five initializers each."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        w = np.eye(2).reshape(2, 2, 1, 1) + rng.standard_normal((2, 2, 1, 1)) * 0.01
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        for k, v in (("g", rng.uniform(0.99, 1.01, 2)), ("b", rng.standard_normal(2) * 0.01),
                     ("m", rng.standard_normal(2) * 0.01), ("v", rng.uniform(0.99, 1.01, 2))):  # fmt: skip
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{k}{i}"))
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"]),
            helper.make_node(
                "BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"bn{i}"
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, 2, 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def big_chain(tmp_path) -> str:
    # 900 blocks: 4,500 initializers, 2,700 nodes: over the real thresholds, cut in two slices.
    path = str(tmp_path / "chain.onnx")
    onnx.save(_conv_bn_chain(900), path)
    return path


def test_many_initializers_are_verified_in_slices(big_chain, tmp_path, monkeypatch) -> None:
    opened = []
    real = runners._open_sliced

    def spy(src, stack):
        r = real(src, stack)
        opened.append(r is not None)
        return r

    monkeypatch.setattr(runners, "_open_sliced", spy)
    res = bnfold.fold_file(big_chain, str(tmp_path / "out.onnx"))
    assert res.verification is not None and res.verification.passed
    # The reference (4,500 initializers) ran in slices; the folded model (1,800) ran whole.
    assert opened == [True, False]


@pytest.mark.parametrize("sliced", [True, False])
def test_a_wrong_fold_still_fails_in_slices(big_chain, tmp_path, monkeypatch, sliced) -> None:
    def spoil(site):  # a BN of the second slice folds wrongly: one channel's scale x 1.5
        if site.aff.node.name == "bn800":
            site.aff.s = np.array(site.aff.s, dtype=np.float64, copy=True)
            site.aff.s[0] *= 1.5

    corrupt_rule(monkeypatch, "Conv+BatchNormalization", spoil)
    if not sliced:
        monkeypatch.setattr(runners, "SPLIT_MIN_INITIALIZERS", 10**9)
        monkeypatch.setattr(segments, "SPLIT_MIN_INITIALIZERS", 10**9)
    with pytest.raises(VerificationError, match="differ beyond tolerance"):
        bnfold.fold_file(big_chain, str(tmp_path / "out.onnx"))
    assert not (tmp_path / "out.onnx").exists()
