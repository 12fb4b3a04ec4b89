"""No-op removal: ``x * 1``, ``x + 0``, ``x - 0``, ``x / 1`` go exactly when they change nothing.

Whether a node is a no-op is decided here from the spec (the constant is exactly
the identity element on the right side, broadcasting keeps the data's shape);
every folded model is run in onnxruntime (``ORT_DISABLE_ALL``) against the original.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from helpers import op_count, random_feeds, run, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

import bnfold

IDENT = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Bit-identical outputs (inf and NaN included: ``c / relu(x)`` divides by zero)."""
    feeds = random_feeds(original)
    for a, b in zip(run(original, feeds), run(folded, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def model_with(op, c, side, dtype, shape, opset, out_is_noop=False, ir=8):
    """``x -> Relu -> op(., c) -> Relu -> y`` (``out_is_noop``: the no-op makes ``y`` itself)."""
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    ins = ["r", "c"] if side == 1 else ["c", "r"]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu1"), helper.make_node(op, ins, ["n"], name="noop")]
    out = "n"
    if not out_is_noop:
        nodes.append(helper.make_node("Relu", ["n"], ["y"], name="relu2"))
        out = "y"
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", t, list(shape))],
        [helper.make_tensor_value_info(out, t, list(np.broadcast_shapes(tuple(shape), np.shape(c))))],
        [numpy_helper.from_array(np.asarray(c, dtype=dtype), "c")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


@st.composite
def cases(draw):
    op = draw(st.sampled_from(sorted(IDENT)))
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=3))
    kind = draw(st.sampled_from(["scalar", "suffix", "ones", "grow_rank", "grow_dim"]))
    if kind == "scalar":
        cshape: tuple[int, ...] = ()
    elif kind == "suffix":
        k = draw(st.integers(1, len(shape)))
        cshape = tuple(d if draw(st.booleans()) else 1 for d in shape[len(shape) - k :])
    elif kind == "ones":
        cshape = (1,) * draw(st.integers(1, len(shape)))
    elif kind == "grow_rank":
        cshape = (2, *shape)
    else:
        cshape = tuple(2 if d == 1 else d for d in shape)
    ident = IDENT[op]
    value = draw(st.sampled_from(["exact", "negzero", "off"]))
    if value == "exact":
        c = np.full(cshape, ident)
    elif value == "negzero":
        c = np.full(cshape, -0.0 if ident == 0 else ident)
    else:
        c = np.full(cshape, ident)
        flat = c.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = 2.0 if ident else 0.5
    return op, c.astype(dtype), draw(st.sampled_from([0, 1])), dtype, shape, draw(st.sampled_from([7, 13, 17]))


@settings(max_examples=80, deadline=None)
@given(cases())
def test_noop_removed_exactly_when_it_changes_nothing(case):
    op, c, side, dtype, shape, opset = case
    model = model_with(op, c, side, dtype, shape, opset)
    identity = bool(np.all(c.astype(np.float64) == IDENT[op]))
    keeps_shape = np.broadcast_shapes(shape, c.shape) == tuple(shape)
    expect = identity and keeps_shape and (side == 1 or op in ("Mul", "Add"))
    result = bnfold.fold_model(model)
    removed = op_count(result.model, op) == 0
    assert removed == expect
    if expect:
        [f] = result.report.folds
        assert (f.node, f.op_type, f.target, f.pattern) == ("noop", op, "relu1", f"{op}({IDENT[op]:g})")
        assert not result.model.graph.initializer  # the constant went with it
        onnx.checker.check_model(result.model, full_check=True)
    else:
        assert not result.report.folds
    assert_same_outputs(model, result.model)


def test_noop_making_a_graph_output_hands_its_name_to_the_producer():
    model = model_with("Div", np.ones(3, np.float32), 1, "float32", (2, 3), 17, out_is_noop=True)
    result = bnfold.fold_model(model)
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]
    assert result.model.graph.node[0].output[0] == "n" == result.model.graph.output[0].name
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def _output_of_input_or_shared(shared: bool) -> onnx.ModelProto:
    nodes = [helper.make_node("Sub", ["x", "zero"], ["y"], name="noop")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if shared:
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sub", ["r", "zero"], ["y"], name="noop")]
        nodes.append(helper.make_node("Neg", ["r"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        outs,
        [numpy_helper.from_array(np.zeros(3, np.float32), "zero")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_noop_output_left_when_its_data_is_an_input_or_shared():
    """Removing it would need the graph input (or the shared tensor) renamed: it stays."""
    for shared in (False, True):
        model = _output_of_input_or_shared(shared)
        result = bnfold.fold_model(model)
        assert op_count(result.model, "Sub") == 1
        assert not result.report.folds


def test_integer_and_data_dependent_ops_stay():
    """``x + 0`` on an int64 tensor is no float no-op; ``x * y`` has no constant."""
    g = helper.make_graph(
        [
            helper.make_node("Add", ["i", "zero"], ["a"]),
            helper.make_node("Mul", ["x", "x"], ["b"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ],
        [numpy_helper.from_array(np.zeros(3, np.int64), "zero")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert not result.report.folds and len(result.model.graph.node) == 2


def test_computed_identity_constant_and_chains():
    """A computed constant (``Sub(1, 0) -> Reshape``) of ones counts; a chain Div(1) -> Sub(0) goes entirely."""
    nodes = [
        helper.make_node("Sub", ["one", "zero"], ["one_c"]),
        helper.make_node("Reshape", ["one_c", "shape"], ["one_r"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Div", ["r", "one_r"], ["d"], name="div"),
        helper.make_node("Sub", ["d", "zero"], ["s"], name="sub"),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        [
            numpy_helper.from_array(np.ones(4, np.float32), "one"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
            numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Relu"]
    assert sorted(f.pattern for f in result.report.folds) == ["Div(1)", "Sub(0)"]
    assert not result.model.graph.initializer
    assert_same_outputs(model, result.model)


def test_noop_in_a_nested_graph():
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "one"], ["t"], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones((), np.float32), "one")],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    [f] = result.report.folds
    assert f.pattern == "Mul(1)" and f.graph.startswith("main/")
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Relu"] and branch.output[0].name == "t"
    onnx.checker.check_model(result.model, full_check=True)


def test_only_selector_and_cli_reports(tmp_path):
    model = model_with("Sub", np.zeros((), np.float32), 1, "float32", (2, 3), 17)
    assert not bnfold.fold_model(model, only=[]).report.folds
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    proc = run_cli("check", str(path))
    assert proc.returncode == 1, proc.stderr  # something foldable is left
    assert "Sub(0)" in proc.stdout
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = run_cli("fold", str(path), "-o", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    text = json.dumps(data)
    assert '"pattern": "Sub(0)"' in text
    assert op_count(onnx.load(str(out)), "Sub") == 0


def test_noop_between_conv_and_bn_no_longer_blocks_the_fold():
    """``Conv -> Div(1) -> BN``: the Div goes first, then the BN folds into the Conv."""
    rng = np.random.default_rng(0)
    c = 3
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Div", ["c", "one"], ["d"]),
            helper.make_node("BatchNormalization", ["d", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((c, 2, 1, 1)).astype(np.float32), "w"),
            numpy_helper.from_array(np.ones((1, c, 1, 1), np.float32), "one"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "g"),
            numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "b"),
            numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "m"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "v"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold_model(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [f.pattern for f in result.report.folds] == ["Div(1)", "Conv+BatchNormalization"]
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(model, feeds)[0], run(result.model, feeds)[0], rtol=1e-5, atol=1e-5)
