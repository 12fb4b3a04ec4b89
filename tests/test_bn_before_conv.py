"""BN (or a per-channel Mul/Add) directly before a Conv folds into that Conv when the Conv pads nothing.

``Conv(W, b)(s*x + t)`` is a Conv with ``W'[o, i] = W[o, i] * s[c(o, i)]`` and
``b'[o] = b[o] + sum W[o, i] * t[c(o, i)]``, exact only when no padded zero is
read (docs/folding.md, "Folding into the consumer").  A BN with a padded Conv after
it, or whose output has other readers, stays and is reported with its reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from affine_builders import (
    F16,
    F32,
    bn_node,
    bn_params,
    fold_checked,
    he_weight,
    init,
    initializer,
    make_model,
    ops,
    patterns,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold


@st.composite
def conv_case(draw, padded: bool):
    """A BN -> Conv model: 1-D/2-D/3-D, any group (depthwise too), stride, dilation, bias or not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    dims = draw(st.integers(1, 3))
    g = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    cin_g = 1 if depthwise else draw(st.integers(1, 3))
    cout_g = draw(st.integers(1, 3))
    cin, cout = g * cin_g, g * cout_g
    k = draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims))
    dil = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    stride = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))
    extra = 1 if dims == 3 else draw(st.integers(0, 3))
    size = [(kk - 1) * d + 1 + extra for kk, d in zip(k, dil, strict=True)]
    attrs = {"group": g, "dilations": dil, "strides": stride, "kernel_shape": k}
    if padded:
        style = draw(st.sampled_from(["pads", "SAME_UPPER", "SAME_LOWER"]))
        if style == "pads":
            pads = [0] * (2 * dims)
            pads[draw(st.integers(0, 2 * dims - 1))] = draw(st.integers(1, 2))
            attrs["pads"] = pads
        else:
            attrs["auto_pad"] = style
            # SAME with a kernel of 1 pads nothing: make sure one axis really pads.
            # (onnxruntime runs SAME only without dilation.)
            k[0] = max(k[0], 2)
            attrs["kernel_shape"] = k
            attrs["dilations"] = [1] * dims
            size[0] = max(size[0], k[0])
    else:
        style = draw(st.sampled_from(["none", "zeros", "VALID", "NOTSET"]))
        if style == "zeros":
            attrs["pads"] = [0] * (2 * dims)
        elif style != "none":
            attrs["auto_pad"] = style
    upstream = draw(st.sampled_from(["input", "relu"]))
    has_bias = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    inits = [*bn_params(rng, "bn", cin), init("w", he_weight(rng, (cout, cin_g, *k), cin_g * int(np.prod(k))))]
    ins = ["b", "w"]
    if has_bias:
        inits.append(init("cb", rng.normal(0, 0.5, cout).astype(np.float32)))
        ins.append("cb")
    nodes = [] if upstream == "input" else [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    nodes += [
        bn_node("bn", "x" if upstream == "input" else "r", "b", eps=eps),
        helper.make_node("Conv", ins, ["y"], name="conv", **attrs),
    ]
    model = make_model(nodes, inits, [("x", F32, [2, cin, *size])], ["y"])
    return model, upstream


@settings(max_examples=40, deadline=None)
@given(case=conv_case(padded=False))
def test_bn_folds_into_unpadded_conv(case) -> None:
    model, upstream = case
    result = fold_checked(model)
    expected_ops = Counter({"Conv": 1, **({"Relu": 1} if upstream == "relu" else {})})
    assert ops(result.model) == expected_ops
    assert [(f.node, f.target, f.pattern) for f in result.report.folds] == [("bn", "conv", "BatchNormalization+Conv")]
    assert result.report.bn_folded == 1 and result.report.skips == []
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert conv.input[0] == ("x" if upstream == "input" else "r")
    assert list(conv.output) == ["y"]
    assert bnfold.fold_model(result.model).report.folds == []


@settings(max_examples=30, deadline=None)
@given(case=conv_case(padded=True))
def test_bn_before_padded_conv_is_left(case) -> None:
    model, _ = case
    result = fold_checked(model)
    assert result.model.graph == model.graph, "the model must be left untouched"
    assert [(s.node, s.reason) for s in result.report.skips] == [("bn", bnfold.Reason.PADDED_CONSUMER)]
    assert result.report.folds == []


def test_folded_conv_weights_match_the_definition() -> None:
    """Grouped Conv: the folded weight and bias computed here from the formula, in float64."""
    rng = np.random.default_rng(21)
    g, cin_g, cout_g, c = 2, 3, 2, 6
    params = bn_params(rng, "bn", c)
    w = he_weight(rng, (g * cout_g, cin_g, 2, 2), 12)
    b = rng.normal(0, 0.5, g * cout_g).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "n", eps=1e-3),
            helper.make_node("Conv", ["n", "w", "b"], ["y"], name="conv", group=g),
        ],
        [*params, init("w", w), init("b", b)],
        [("x", F32, [1, c, 5, 5])],
        ["y"],
    )
    result = fold_checked(model)
    gamma, beta, mean, var = (numpy_helper.to_array(p).astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + np.float64(np.float32(1e-3)))
    t = beta - mean * s
    w64 = w.astype(np.float64)
    w_exp, b_exp = np.empty_like(w64), b.astype(np.float64).copy()
    for o in range(g * cout_g):
        for i in range(cin_g):
            ch = (o // cout_g) * cin_g + i  # input channel read by weight slot (o, i)
            w_exp[o, i] = w64[o, i] * s[ch]
            b_exp[o] += w64[o, i].sum() * t[ch]
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    np.testing.assert_array_equal(initializer(result.model, conv.input[1]), w_exp.astype(np.float32))
    np.testing.assert_allclose(initializer(result.model, conv.input[2]), b_exp, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# When the BN stays
# ---------------------------------------------------------------------------


def _bn_conv_model(extra_nodes, outputs, *, conv_pads=None, weight_is_input=False):
    rng = np.random.default_rng(22)
    c = 3
    conv_attrs = {} if conv_pads is None else {"pads": conv_pads}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Conv", ["b", "w"], ["y"], name="conv", **conv_attrs),
        *extra_nodes,
    ]
    inits = bn_params(rng, "bn", c)
    inputs = [("x", F32, [1, c, 4, 4])]
    if weight_is_input:
        inputs.append(("w", F32, [2, c, 1, 1]))
    else:
        inits.append(init("w", he_weight(rng, (2, c, 1, 1), c)))
    return make_model(nodes, inits, inputs, outputs)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other_consumer", "output_shared"),
        ("other_consumer_padded", "output_shared"),
        ("graph_output", "output_shared"),
        ("non_constant_weight", "non_constant_weight"),
        ("padded", "padded_consumer"),
    ],
)
def test_bn_before_conv_left_with_reason(case: str, reason: str) -> None:
    if case.startswith("other_consumer"):
        pads = [1, 1, 1, 1] if case.endswith("padded") else None
        extra = [helper.make_node("Relu", ["b"], ["z"], name="other")]
        model = _bn_conv_model(extra, ["y", "z"], conv_pads=pads)
    elif case == "graph_output":
        model = _bn_conv_model([], ["y", "b"])
    elif case == "non_constant_weight":
        model = _bn_conv_model([], ["y"], weight_is_input=True)
    else:
        model = _bn_conv_model([], ["y"], conv_pads=[0, 1, 0, 0])
    result = fold_checked(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.skips] == [("bn", reason)]
    assert reason in {r.value for r in bnfold.Reason}


@pytest.mark.parametrize("downstream", ["relu", "nothing"])
@pytest.mark.parametrize("upstream", ["input", "relu", "maxpool"])
def test_standalone_bn_stays_with_reason(upstream: str, downstream: str) -> None:
    """Nothing before or after can absorb it: it stays a BN (already one op)."""
    rng = np.random.default_rng(23)
    nodes = {
        "input": [],
        "relu": [helper.make_node("Relu", ["x"], ["u"], name="up")],
        "maxpool": [helper.make_node("MaxPool", ["x"], ["u"], name="up", kernel_shape=[2, 2])],
    }[upstream]
    src = "x" if upstream == "input" else "u"
    out = "y" if downstream == "nothing" else "b"
    nodes.append(bn_node("bn", src, out))
    if downstream == "relu":
        nodes.append(helper.make_node("Relu", ["b"], ["y"], name="down"))
    model = make_model(nodes, bn_params(rng, "bn", 3), [("x", F32, [2, 3, 4, 4])], ["y"])
    result = fold_checked(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.skips] == [("bn", "unsupported_producer")]
    assert result.report.bn_count == 1 and result.report.bn_folded == 0


def test_relu_mul_bn_unpadded_conv_folds_fully() -> None:
    """Relu -> Mul -> BN -> unpadded depthwise Conv: BN, then Mul fold into the Conv (passes repeat)."""
    rng = np.random.default_rng(24)
    c = 4
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
            bn_node("bn", "m", "b"),
            helper.make_node("Conv", ["b", "w"], ["y"], name="conv", group=c, strides=[2, 2]),
        ],
        [
            init("k", rng.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32)),
            *bn_params(rng, "bn", c),
            init("w", he_weight(rng, (2 * c, 1, 3, 3), 9)),
        ],
        [("x", F32, [2, c, 7, 7])],
        ["y"],
    )
    result = fold_checked(model)
    assert ops(result.model) == Counter({"Relu": 1, "Conv": 1})
    assert patterns(result) == Counter({"BatchNormalization+Conv": 1, "Mul+Conv": 1})
    assert {t.name for t in result.model.graph.initializer} == set(result.model.graph.node[1].input[1:])


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "RSub", "Div"])
def test_arith_before_unpadded_conv_folds(op: str) -> None:
    rng = np.random.default_rng(25)
    c = 3
    k = rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32)
    ins = ["k", "r"] if op == "RSub" else ["r", "k"]
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Sub" if op == "RSub" else op, ins, ["a"], name="arith"),
            helper.make_node("Conv", ["a", "w"], ["y"], name="conv", auto_pad="VALID"),
        ],
        [init("k", k), init("w", he_weight(rng, (2, c, 2, 2), 4 * c))],
        [("x", F32, [2, c, 5, 5])],
        ["y"],
    )
    result = fold_checked(model)
    assert ops(result.model) == Counter({"Relu": 1, "Conv": 1})
    assert patterns(result) == Counter({f"{'Sub' if op == 'RSub' else op}+Conv": 1})


def test_conv_producer_with_shared_output_still_folds_into_next_conv() -> None:
    """Conv -> BN -> Conv where the first Conv output has another reader: the BN goes forward."""
    rng = np.random.default_rng(26)
    c = 3
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["p"], name="conv1"),
            helper.make_node("Relu", ["p"], ["side"], name="side"),
            bn_node("bn", "p", "b"),
            helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2"),
        ],
        [
            init("w1", he_weight(rng, (c, 2, 1, 1), 2)),
            *bn_params(rng, "bn", c),
            init("w2", he_weight(rng, (2, c, 1, 1), c)),
        ],
        [("x", F32, [1, 2, 3, 3])],
        ["y", "side"],
    )
    result = fold_checked(model)
    assert [(f.target, f.pattern) for f in result.report.folds] == [("conv2", "BatchNormalization+Conv")]


def test_shared_conv_weight_gets_private_copy() -> None:
    """The Conv after the BN shares its weight with another Conv: fold into a private copy."""
    rng = np.random.default_rng(27)
    c = 3
    w = he_weight(rng, (c, c, 1, 1), c)
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "b"),
            helper.make_node("Conv", ["b", "w"], ["y1"], name="conv1"),
            helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2"),
        ],
        [*bn_params(rng, "bn", c), init("w", w)],
        [("x", F32, [1, c, 3, 3])],
        ["y1", "y2"],
    )
    result = fold_checked(model)
    conv1, conv2 = (n for n in result.model.graph.node if n.op_type == "Conv")
    assert conv2.input[1] == "w" and conv1.input[1] != "w"
    np.testing.assert_array_equal(initializer(result.model, "w"), w)


def test_training_mode_bn_before_conv_stays() -> None:
    rng = np.random.default_rng(28)
    c = 3
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node(
                "BatchNormalization",
                ["r", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                ["b", "running_mean", "running_var"],
                name="bn",
                training_mode=1,
            ),
            helper.make_node("Conv", ["b", "w"], ["y"], name="conv"),
        ],
        [*bn_params(rng, "bn", c), init("w", he_weight(rng, (2, c, 1, 1), c))],
        [("x", F32, [2, c, 3, 3])],
        ["y"],
    )
    result = bnfold.fold_model(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.skips] == [("bn", "training_mode")]


def test_float16_bn_before_conv() -> None:
    """float16 BN -> Conv: the folded weight and bias are float16, the outputs match."""
    rng = np.random.default_rng(29)
    c = 4
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "b"),
            helper.make_node("Conv", ["b", "w"], ["y"], name="conv", group=2),
        ],
        [*bn_params(rng, "bn", c, np.float16), init("w", he_weight(rng, (4, 2, 2, 2), 8, np.float16))],
        [("x", F16, [1, c, 5, 5])],
        ["y"],
        out_type=F16,
    )
    result = fold_checked(model, atol=2e-2, rtol=1e-2)
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert initializer(result.model, conv.input[1]).dtype == np.float16
    assert initializer(result.model, conv.input[2]).dtype == np.float16
    assert patterns(result) == Counter({"BatchNormalization+Conv": 1})


# ---------------------------------------------------------------------------
# Chains of BNs and per-channel Mul/Add/Sub/Div before an unpadded Conv
# ---------------------------------------------------------------------------

CHAIN_OPS = ("BN", "Mul", "Add", "Sub", "RSub", "Div")


def expected_before_conv(chain: list[str]) -> Counter:
    """Pattern names for Relu -> chain -> unpadded Conv.

    A BN folds forward into the Conv.  An arithmetic op right after a BN (or after
    ops already merged into it) folds into that BN first (producer folds win);
    any other arithmetic op folds forward into the Conv.
    """
    names: Counter = Counter()
    after_bn = False
    for op in chain:
        kind = "Sub" if op == "RSub" else op
        if op == "BN":
            names["BatchNormalization+Conv"] += 1
            after_bn = True
        elif after_bn:
            names[f"BatchNormalization+{kind}"] += 1
        else:
            names[f"{kind}+Conv"] += 1
    return names


@settings(max_examples=35, deadline=None)
@given(
    chain=st.lists(st.tuples(st.sampled_from(CHAIN_OPS), st.integers(0, 20)), min_size=1, max_size=4),
    dims=st.integers(1, 3),
    g=st.integers(1, 3),
    cin_g=st.integers(1, 2),
    cout_g=st.integers(1, 2),
    k=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_chain_before_unpadded_conv_folds(chain, dims, g, cin_g, cout_g, k, seed) -> None:
    rng = np.random.default_rng(seed)
    c, rank = g * cin_g, dims + 2
    # Scalar or per-channel constant shapes for a rank-`rank` tensor with c channels.
    shapes = [(), (1,), (1,) * rank, (c,) + (1,) * (rank - 2), (1, c) + (1,) * (rank - 2)]
    nodes = [helper.make_node("Relu", ["x"], ["h0"], name="relu")]
    inits = []
    for i, (op, pick) in enumerate(chain):
        x, y = f"h{i}", f"h{i + 1}"
        if op == "BN":
            inits += bn_params(rng, f"bn{i}", c)
            nodes.append(bn_node(f"bn{i}", x, y))
            continue
        shape = shapes[pick % len(shapes)]
        if op in ("Mul", "Div"):
            v = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        else:
            v = rng.normal(0.0, 1.0, shape)
        inits.append(init(f"k{i}", np.asarray(v, dtype=np.float32)))
        ins = [f"k{i}", x] if op == "RSub" else [x, f"k{i}"]
        nodes.append(helper.make_node("Sub" if op == "RSub" else op, ins, [y], name=f"op{i}"))
    inits.append(init("w", he_weight(rng, (g * cout_g, cin_g) + (k,) * dims, cin_g * k**dims)))
    nodes.append(helper.make_node("Conv", [f"h{len(chain)}", "w"], ["y"], name="conv", group=g))
    model = make_model(nodes, inits, [("x", F32, [2, c] + [3] * dims)], ["y"])
    result = fold_checked(model)
    ops_chain = [op for op, _ in chain]
    assert ops(result.model) == Counter({"Relu": 1, "Conv": 1})
    assert patterns(result) == expected_before_conv(ops_chain)
    assert result.report.skips == [] and result.report.affine_skips == []
    assert result.report.bn_folded == ops_chain.count("BN")


@pytest.mark.parametrize(("after", "reason"), [("padded_conv", "padded_consumer"), ("conv_and_relu", "output_shared")])
def test_bn_after_residual_add_reports_the_consumer_reason(after: str, reason: str) -> None:
    """Residual Add -> BN -> Conv: the Add absorbs nothing, so the Conv side gives the reason."""
    rng = np.random.default_rng(30)
    c = 3
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Add", ["x", "r"], ["s"], name="residual"),
        bn_node("bn", "s", "b"),
    ]
    if after == "padded_conv":
        nodes.append(helper.make_node("Conv", ["b", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]))
        outputs = ["y"]
    else:
        nodes += [
            helper.make_node("Conv", ["b", "w"], ["y"], name="conv"),
            helper.make_node("Relu", ["b"], ["z"], name="other"),
        ]
        outputs = ["y", "z"]
    model = make_model(
        nodes,
        [*bn_params(rng, "bn", c), init("w", he_weight(rng, (2, c, 3, 3), 9 * c))],
        [("x", F32, [1, c, 5, 5])],
        outputs,
    )
    result = fold_checked(model)
    assert result.model.graph == model.graph
    assert [(s.node, s.reason.value) for s in result.report.skips] == [("bn", reason)]
