"""Everything a fold does not need to change stays as it was."""

from __future__ import annotations

import os

import numpy as np
import onnx
from builders import Net
from foldcheck import fold_and_check
from helpers import assert_close, random_feeds, run
from onnx import TensorProto, helper

import bnfold

F = TensorProto.FLOAT


def rich_model() -> onnx.ModelProto:
    """Conv+BN+Relu, an unfused Conv, a local function, value_info, metadata, doc strings."""
    net = Net(opset=17, seed=21)
    x = net.input("x", np.float32, ["N", 3, 6, 6])
    c1 = net.node("Conv", [x, net.weight((4, 3, 3, 3), name="w1")], name="conv1", pads=[1, 1, 1, 1])
    b1 = net.bn(c1, 4, name="bn1")
    r = net.node("Relu", [b1], name="relu")
    c2 = net.node("Conv", [r, net.weight((4, 4, 1, 1), name="w2"), net.weight((4,), name="b2", fan_in=1)], name="conv2")
    s = net.node("MySwish", [c2], name="swish")
    net.nodes[-1].domain = "local"
    a = net.node("Add", [s, b1], name="add")
    c3 = net.node("Conv", [a, net.weight((2, 4, 3, 3), name="w3")], name="conv3")
    b3 = net.bn(c3, 2, name="bn3")
    net.output(b3, np.float32, ["N", 2, 4, 4])
    net.output(r, np.float32, ["N", 4, 6, 6])
    for k, n in enumerate(net.nodes):
        n.doc_string = f"node doc {k}"
    model = net.build()
    swish = helper.make_function(
        "local",
        "MySwish",
        ["X"],
        ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.functions.append(swish)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.producer_name, model.producer_version = "unit-test", "9.9"
    model.domain, model.model_version, model.doc_string = "org.example", 7, "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "tests", "license": "none"})
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _vi(g: onnx.GraphProto) -> dict[str, bytes]:
    return {v.name: v.SerializeToString() for v in g.value_info}


def test_everything_else_is_preserved() -> None:
    model = rich_model()
    names = {v.name for v in model.graph.value_info}
    assert {"conv1_out", "bn1_out", "conv3_out", "conv2_out", "add_out"} <= names
    result = fold_and_check(model, folded=2)
    out, g, g0 = result.model, result.model.graph, model.graph
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(out, field) == getattr(model, field), field
    assert list(out.opset_import) == list(model.opset_import)
    assert list(out.metadata_props) == list(model.metadata_props)
    assert [f.SerializeToString() for f in out.functions] == [f.SerializeToString() for f in model.functions]
    assert g.name == g0.name and g.doc_string == g0.doc_string
    assert [i.SerializeToString() for i in g.input] == [i.SerializeToString() for i in g0.input]
    assert [o.SerializeToString() for o in g.output] == [o.SerializeToString() for o in g0.output]
    # untouched nodes keep name, order, doc string; folded Convs take over the BN output names
    kept = [(n.name, n.op_type, n.doc_string) for n in g0.node if n.op_type != "BatchNormalization"]
    assert [(n.name, n.op_type, n.doc_string) for n in g.node] == kept
    by_name = {n.name: n for n in g.node}
    assert list(by_name["conv1"].output) == ["bn1_out"]
    assert list(by_name["conv3"].output) == ["bn3_out"]
    for n0 in g0.node:
        if n0.name in ("relu", "conv2", "swish", "add"):
            assert by_name[n0.name].SerializeToString() == n0.SerializeToString()
    # untouched initializers keep their order and bytes
    untouched = [t.SerializeToString() for t in g0.initializer if t.name in ("w2", "b2")]
    assert [t.SerializeToString() for t in g.initializer if t.name in ("w2", "b2")] == untouched
    # value_info: kept for tensors that still exist, gone for those that vanished
    vi0, vi = _vi(g0), _vi(g)
    assert "conv1_out" not in vi and "conv3_out" not in vi
    for name in ("bn1_out", "conv2_out", "swish_out", "add_out"):
        assert vi[name] == vi0[name], name
    live = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    assert set(vi) <= live
    assert not any(n.startswith("bn1_") and n != "bn1_out" for n in {t.name for t in g.initializer})


def test_untouched_initializer_order_is_kept() -> None:
    net = Net(opset=17, seed=2)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    names = []
    y = x
    for k in range(4):
        w = net.weight((3, 3, 1, 1), name=f"w{k}")
        names.append(w)
        y = net.node("Conv", [y, w], name=f"conv{k}")
        if k == 1:
            y = net.bn(y, 3, name="bn")
    net.output(y, np.float32)
    model = net.build()
    result = fold_and_check(model, folded=1)
    order = [t.name for t in result.model.graph.initializer]
    untouched = [n for n in order if n in ("w0", "w2", "w3")]
    assert untouched == ["w0", "w2", "w3"]
    assert order[:1] == ["w0"] and order.index("w2") < order.index("w3")


def test_output_is_deterministic_and_refolding_changes_nothing() -> None:
    model = rich_model()
    once = bnfold.fold_model(model)
    assert bnfold.fold_model(model).model.SerializeToString() == once.model.SerializeToString()
    again = bnfold.fold_model(once.model)
    assert again.report.folds == [] and again.report.skips == []
    assert again.model.SerializeToString() == once.model.SerializeToString()


def test_new_names_are_unique() -> None:
    """A name the fold would pick for a new bias is already taken: the new one must differ."""
    net = Net(opset=17, seed=3)
    x = net.input("x", np.float32, [1, 3, 5, 5])
    c = net.node("Conv", [x, net.weight((4, 3, 3, 3), name="w")], name="conv")
    y = net.bn(c, 4, name="bn")
    # squat on plausible generated names (with constants that vary spatially: nothing folds them)
    taken = ["conv_bias_bnfold", "w_bnfold", "conv_bias", "bias"]
    for t in taken:
        net.init(t, np.ones((1, 4, 3, 3), np.float32))
        y = net.node("Add", [y, t], name=f"add_{t}")
    net.output(y, np.float32)
    model = net.build()
    result = fold_and_check(model, folded=1)
    g = result.model.graph
    names = [t.name for t in g.initializer]
    assert len(names) == len(set(names))
    for t in taken:
        kept = next(i for i in g.initializer if i.name == t)
        assert np.all(onnx.numpy_helper.to_array(kept) == 1.0)
    all_outputs = [o for n in g.node for o in n.output]
    assert len(all_outputs) == len(set(all_outputs))


def test_external_data_of_untouched_weights_stays_external(tmp_path) -> None:
    net = Net(opset=17, seed=4)
    x = net.input("x", np.float32, [1, 8, 6, 6])
    y = net.node("Conv", [x, net.weight((8, 8, 3, 3), name="big_a")], name="a", pads=[1, 1, 1, 1])
    y = net.bn(y, 8, name="bn")
    y = net.node("Conv", [y, net.weight((8, 8, 3, 3), name="big_b")], name="b", pads=[1, 1, 1, 1])
    net.output(y, np.float32)
    model = net.build()
    path = str(tmp_path / "m.onnx")
    onnx.save_model(
        onnx.ModelProto.FromString(model.SerializeToString()),
        path,
        save_as_external_data=True,
        location="m.data",
        size_threshold=64,
    )
    lazy = onnx.load(path, load_external_data=False)
    before = {t.name: t.SerializeToString() for t in lazy.graph.initializer}
    assert next(t for t in lazy.graph.initializer if t.name == "big_b").data_location == TensorProto.EXTERNAL
    result = bnfold.fold_model(lazy, base_dir=str(tmp_path))
    assert result.report.bn_folded == 1
    after = {t.name: t for t in result.model.graph.initializer}
    assert after["big_b"].SerializeToString() == before["big_b"], "untouched external weight is still a reference"
    # the folded model, with its external data loaded, computes what the original does
    full = onnx.ModelProto()
    full.CopyFrom(result.model)
    onnx.load_external_data_for_model(full, str(tmp_path))
    feeds = random_feeds(model)
    for a, b in zip(run(model, feeds), run(full, feeds), strict=True):
        assert_close(a, b)
    assert os.path.exists(tmp_path / "m.data")
