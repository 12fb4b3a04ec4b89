"""BNs inside If/Loop/Scan bodies fold, including bodies that read weights from the outer graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import Net, count_ops, to_tensor
from foldcheck import fold_and_check
from onnx import TensorProto, helper

from bnfold import Reason

F = TensorProto.FLOAT
X_SHAPE = [1, 3, 5, 5]
Y_SHAPE = [1, 4, 5, 5]
RNG = np.random.default_rng(42)


def _w(shape, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _bn_inits(prefix: str, c: int = 4) -> list[onnx.TensorProto]:
    vals = [RNG.uniform(0.5, 1.5, c), RNG.standard_normal(c), RNG.standard_normal(c), RNG.uniform(0.5, 2, c)]
    return [to_tensor(v.astype(np.float32), f"{prefix}_{k}") for k, v in zip("gbmv", vals, strict=True)]


def conv_bn_body(
    name: str,
    x: str,
    w: str,
    out: str,
    *,
    inputs: list[onnx.ValueInfoProto] = (),
    extra_nodes: list[onnx.NodeProto] = (),
    extra_outputs: list[onnx.ValueInfoProto] = (),
    local_inits: list[onnx.TensorProto] = (),
    bn_prefix: str | None = None,
) -> onnx.GraphProto:
    """A graph ``out = BN(Conv(x, w, pads=1))``; BN parameters are local unless ``bn_prefix`` names outer ones."""
    p = bn_prefix or f"{name}_bn"
    inits = list(local_inits) + ([] if bn_prefix else _bn_inits(p))
    nodes = [
        *extra_nodes,
        helper.make_node("Conv", [x, w], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{name}_c", *[f"{p}_{k}" for k in "gbmv"]], [out], name=f"{name}_bn"),
    ]
    outputs = [*extra_outputs, helper.make_tensor_value_info(out, F, Y_SHAPE)]
    return helper.make_graph(nodes, name, list(inputs), outputs, inits)


def if_model(then_g: onnx.GraphProto, else_g: onnx.GraphProto, outer_inits, outer_nodes=(), extra_out=()):
    nodes = [*outer_nodes, helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(
        nodes,
        "main",
        [helper.make_tensor_value_info("x", F, X_SHAPE), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, Y_SHAPE), *extra_out],
        list(outer_inits),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def feeds(cond: bool) -> dict:
    return {"x": RNG.standard_normal(X_SHAPE).astype(np.float32), "cond": np.array(cond)}


def _inits(g: onnx.GraphProto) -> set[str]:
    return {t.name for t in g.initializer}


def test_if_branches_with_local_weights() -> None:
    then_g = conv_bn_body("then", "x", "tw", "t_out", local_inits=[to_tensor(_w((4, 3, 3, 3)), "tw")])
    else_g = conv_bn_body("else", "x", "ew", "e_out", local_inits=[to_tensor(_w((4, 3, 3, 3)), "ew")])
    model = if_model(then_g, else_g, [])
    for cond in (True, False):
        result = fold_and_check(model, folded=2, feeds=feeds(cond))
    g = result.model.graph.node[0]
    for branch in g.attribute:
        assert [n.op_type for n in branch.g.node] == ["Conv"]
        assert branch.g.output[0].name in ("t_out", "e_out")
    assert {s.graph for s in result.report.skips} == set()
    assert {f.graph for f in result.report.folds} == {"main/if.then_branch", "main/if.else_branch"}


def test_if_branch_reading_outer_weight_removes_it_when_unused() -> None:
    """Both branches read outer W and outer BN parameters; after folding nothing reads them."""
    outer = [to_tensor(_w((4, 3, 3, 3)), "W"), *_bn_inits("obn")]
    then_g = conv_bn_body("then", "x", "W", "t_out", bn_prefix="obn")
    else_g = conv_bn_body("else", "x", "W", "e_out")
    model = if_model(then_g, else_g, outer)
    for cond in (True, False):
        result = fold_and_check(model, folded=2, feeds=feeds(cond))
    assert _inits(result.model.graph) == set(), "outer initializers no longer read must go"


def test_if_branch_reading_outer_weight_keeps_it_when_still_used() -> None:
    """The outer W also feeds an outer Conv: it must stay, unchanged."""
    w = to_tensor(_w((4, 3, 3, 3)), "W")
    outer_conv = helper.make_node("Conv", ["x", "W"], ["z"], name="outer_conv", pads=[1, 1, 1, 1])
    then_g = conv_bn_body("then", "x", "W", "t_out")
    else_g = conv_bn_body("else", "x", "W", "e_out")
    extra = [helper.make_tensor_value_info("z", F, Y_SHAPE)]
    model = if_model(then_g, else_g, [w], [outer_conv], extra)
    for cond in (True, False):
        result = fold_and_check(model, folded=2, feeds=feeds(cond))
    kept = next(t for t in result.model.graph.initializer if t.name == "W")
    assert kept.SerializeToString() == w.SerializeToString()
    assert list(result.model.graph.node[0].input) == ["x", "W"]


def test_if_branch_only_one_reads_outer_weight_other_branch_unchanged() -> None:
    """One branch folds (private copy of W); the other reads W without a BN: W stays as it was."""
    w = to_tensor(_w((4, 3, 3, 3)), "W")
    then_g = conv_bn_body("then", "x", "W", "t_out")
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["e_out"], name="else_conv", pads=[1, 1, 1, 1])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F, Y_SHAPE)],
    )
    model = if_model(then_g, else_g, [w])
    for cond in (True, False):
        result = fold_and_check(model, folded=1, feeds=feeds(cond))
    assert next(t for t in result.model.graph.initializer if t.name == "W").SerializeToString() == w.SerializeToString()


def _loop_model(body_reads_outer: bool) -> onnx.ModelProto:
    winit = to_tensor(_w((4, 3, 3, 3)), "W")
    body = conv_bn_body(
        "body",
        "x",
        "W",
        "scan_y",
        inputs=[
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
        ],
        extra_nodes=[helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond")],
        extra_outputs=[helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
        local_inits=[] if body_reads_outer else [winit],
    )
    loop = helper.make_node("Loop", ["trip", "cond"], ["y"], name="loop", body=body)
    g = helper.make_graph(
        [loop],
        "main",
        [helper.make_tensor_value_info("x", F, X_SHAPE), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [2, *Y_SHAPE])],
        [to_tensor(np.array(2, dtype=np.int64), "trip")] + ([winit] if body_reads_outer else []),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("outer", [False, True])
def test_loop_body_folds(outer: bool) -> None:
    model = _loop_model(outer)
    result = fold_and_check(model, folded=1, feeds=feeds(True))
    body = result.model.graph.node[0].attribute[0].g
    assert [n.op_type for n in body.node] == ["Identity", "Conv"]
    assert _inits(result.model.graph) == {"trip"}


def test_scan_body_folds() -> None:
    w = to_tensor(_w((4, 3, 3, 3)), "W")
    body = conv_bn_body(
        "body", "xt", "W", "yt", inputs=[helper.make_tensor_value_info("xt", F, X_SHAPE)], bn_prefix="sbn"
    )
    scan = helper.make_node("Scan", ["xs"], ["ys"], name="scan", body=body, num_scan_inputs=1)
    g = helper.make_graph(
        [scan],
        "main",
        [helper.make_tensor_value_info("xs", F, [3, *X_SHAPE])],
        [helper.make_tensor_value_info("ys", F, [3, *Y_SHAPE])],
        [w, *_bn_inits("sbn")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = fold_and_check(model, folded=1)
    assert _inits(result.model.graph) == set()
    assert count_ops(result.model.graph, "Conv") == 1


def test_if_nested_in_loop_reads_top_level_weight() -> None:
    w = to_tensor(_w((4, 3, 3, 3)), "W")
    then_g = conv_bn_body("then", "x", "W", "t_out")
    else_g = conv_bn_body("else", "x", "W", "e_out")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond"),
            helper.make_node("If", ["c_in"], ["scan_y"], name="inner_if", then_branch=then_g, else_branch=else_g),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("scan_y", F, Y_SHAPE),
        ],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond"], ["y"], name="loop", body=body)],
        "main",
        [helper.make_tensor_value_info("x", F, X_SHAPE), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [2, *Y_SHAPE])],
        [to_tensor(np.array(2, dtype=np.int64), "trip"), w],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for cond in (True, False):
        result = fold_and_check(model, folded=2, feeds=feeds(cond))
    assert _inits(result.model.graph) == {"trip"}


def test_bn_in_branch_after_outer_conv_is_left() -> None:
    """The Conv is in the outer graph, the BN in a branch: nothing to fold into inside the branch."""
    outer_conv = helper.make_node("Conv", ["x", "W"], ["c"], name="outer_conv", pads=[1, 1, 1, 1])
    bn = _bn_inits("ibn")
    then_g = helper.make_graph(
        [helper.make_node("BatchNormalization", ["c", *[f"ibn_{k}" for k in "gbmv"]], ["t_out"], name="inner_bn")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", F, Y_SHAPE)],
        bn,
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["e_out"], name="relu")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", F, Y_SHAPE)],
    )
    model = if_model(then_g, else_g, [to_tensor(_w((4, 3, 3, 3)), "W")], [outer_conv])
    result = fold_and_check(model, folded=0, left=1, feeds=feeds(True))
    assert result.report.skips[0].graph == "main/if.then_branch"


def test_outer_bn_whose_conv_output_is_read_in_a_branch_is_left() -> None:
    net = Net(opset=17)
    x = net.input("x", np.float32, X_SHAPE)
    c = net.node("Conv", [x, net.weight((4, 3, 3, 3))], name="conv", pads=[1, 1, 1, 1])
    z = net.bn(c, 4)
    branch = lambda n, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, [c], [n], name=f"{n}_node")], n, [], [helper.make_tensor_value_info(n, F, Y_SHAPE)]
    )
    net.input("cond", bool, [])
    net.nodes.append(
        helper.make_node(
            "If", ["cond"], ["y"], name="if", then_branch=branch("a", "Relu"), else_branch=branch("b", "Sigmoid")
        )
    )
    net.output(z, np.float32)
    net.output("y", np.float32, Y_SHAPE)
    model = net.build()
    result = fold_and_check(model, folded=0, left=1, feeds=feeds(True))
    assert result.report.skips[0].reason == Reason.PRODUCER_OUTPUT_SHARED


def test_ir3_if_branches_reading_outer_listed_initializers() -> None:
    """IR 3: outer initializers are listed as inputs (still constants); folded branches pass the checker."""
    outer = [to_tensor(_w((4, 3, 3, 3)), "W"), *_bn_inits("obn")]
    then_g = conv_bn_body("then", "x", "W", "t_out", bn_prefix="obn")
    else_g = conv_bn_body("else", "x", "W", "e_out", bn_prefix="obn")
    model = if_model(then_g, else_g, outer)
    model.ir_version = 3
    model.opset_import[0].version = 8
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in outer)
    for cond in (True, False):
        result = fold_and_check(model, folded=2, feeds=feeds(cond))
    assert _inits(result.model.graph) == set()
    assert [i.name for i in result.model.graph.input] == ["x", "cond"]


def test_ir3_loop_body_keeps_its_formal_inputs() -> None:
    """IR 3: a folded Loop body gets its new weights as Constant nodes, never as extra body inputs."""
    winit = to_tensor(_w((4, 3, 3, 3)), "W")
    body = conv_bn_body(
        "body",
        "x",
        "W",
        "scan_y",
        inputs=[
            helper.make_tensor_value_info("i", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, [1]),
            helper.make_tensor_value_info("v_in", F, [1]),
        ],
        extra_nodes=[
            helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond"),
            helper.make_node("Identity", ["v_in"], ["v_out"], name="body_state"),
        ],
        extra_outputs=[
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, [1]),
            helper.make_tensor_value_info("v_out", F, [1]),
        ],
        bn_prefix="obn",
    )
    outer = [to_tensor(np.array([2], dtype=np.int64), "trip"), to_tensor(np.zeros(1, np.float32), "v0"), winit]
    outer += _bn_inits("obn")
    loop = helper.make_node("Loop", ["trip", "cond", "v0"], ["v_final", "y"], name="loop", body=body)
    g = helper.make_graph(
        [loop],
        "main",
        [helper.make_tensor_value_info("x", F, X_SHAPE), helper.make_tensor_value_info("cond", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", F, [2, *Y_SHAPE])],
        outer,
    )
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in outer)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal(X_SHAPE).astype(np.float32), "cond": np.array([True])}
    result = fold_and_check(model, folded=1, feeds=feed)
    body = result.model.graph.node[0].attribute[0].g
    assert [i.name for i in body.input] == ["i", "c_in", "v_in"]
    assert "BatchNormalization" not in [n.op_type for n in body.node]
    assert [n.op_type for n in body.node].count("Constant") == 2  # the folded weight and the new bias


@pytest.mark.parametrize("ir", [3, 8])
@pytest.mark.parametrize("fold", [True, False])
def test_bn_before_matmul_in_a_branch(ir: int, fold: bool) -> None:
    """A forward fold inside an If branch adds its new Add after the MatMul, in the branch (IR 3: its bias a Constant).

    With ``fold`` False the BN runs over [1, 3, 5, 5] and its channel is no contracted axis: a trap.
    """
    w = to_tensor(_w((5, 4)), "mw")
    c = 5 if fold else 3
    then_nodes = [helper.make_node("Reshape", ["x", "rows"], ["xr"], name="rows")] if fold else []
    then_nodes += [
        helper.make_node(
            "BatchNormalization", ["xr" if fold else "x", *[f"tbn_{k}" for k in "gbmv"]], ["tb"], name="then_bn"
        ),
        helper.make_node("MatMul", ["tb", "mw"], ["t_out"], name="then_mm"),
    ]
    shape = [15, 4] if fold else [1, 3, 5, 4]
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", F, shape)])
    else_nodes = [helper.make_node("Reshape", ["x", "rows"], ["er"], name="erows")] if fold else []
    else_nodes.append(helper.make_node("MatMul", ["er" if fold else "x", "mw"], ["e_out"], name="else_mm"))
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info("e_out", F, shape)])
    outer = [w, to_tensor(np.array([15, 5], np.int64), "rows"), *_bn_inits("tbn", c)]
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inputs = [
        helper.make_tensor_value_info("x", F, X_SHAPE),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    if ir < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in outer]
    g = helper.make_graph(nodes, "main", inputs, [helper.make_tensor_value_info("y", F, shape)], outer)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9 if ir < 4 else 17)], ir_version=ir)
    if not fold:
        result = fold_and_check(model, folded=0, left=1, feeds=feeds(True))
        assert [s.reason for s in result.report.skips] == [Reason.CHANNEL_IS_BATCH_AXIS]
        return
    for cond in (True, False):
        result = fold_and_check(model, folded=1, feeds=feeds(cond))
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    ops = [n.op_type for n in branch.node]
    # IR 3: the branch's private copy of the outer weight and its new bias are Constant nodes
    assert ops == (["Reshape", "MatMul", "Add"] if ir >= 4 else ["Constant", "Constant", "Reshape", "MatMul", "Add"])
    assert branch.node[-1].output[0] == "t_out"
