"""Input generation: dtypes, ranges, seeds, dynamic dimensions, .npz files."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from verify_builders import conv_chain, int_bool_model

from bnfold.errors import ExitCode, InputFileError, InputShapeError, NotVerifiableError
from bnfold.verify.inputs import (
    InputOptions,
    InputSpec,
    generate,
    graph_inputs,
    make_inputs,
    parse_input_shape,
    parse_int_range,
    resolve_shapes,
)


def _model_with_inputs(*infos: onnx.ValueInfoProto) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in infos]
    outs = [helper.make_tensor_value_info(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in infos]
    return helper.make_model(helper.make_graph(nodes, "g", list(infos), outs))


# ---------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------


def test_parse_input_shape() -> None:
    assert parse_input_shape("x:1,3,224,224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("ns:input:0:2,5") == ("ns:input:0", (2, 5))  # colons in names
    assert parse_input_shape("scalar:") == ("scalar", ())
    for bad in ("x", ":1,2", "x:1,a", "x:1,-2"):
        with pytest.raises(ValueError):
            parse_input_shape(bad)


def test_parse_int_range() -> None:
    assert parse_int_range("0,255") == (0, 255)
    assert parse_int_range("-5,5") == (-5, 5)
    for bad in ("5", "1,2,3", "a,b", "9,1"):
        with pytest.raises(ValueError):
            parse_int_range(bad)


# ---------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------


def test_symbolic_batch_becomes_one_with_a_note() -> None:
    specs = graph_inputs(conv_chain())  # input [N, 3, 8, 8]
    notes: list[str] = []
    assert resolve_shapes(specs, {}, notes) == {"input": (1, 3, 8, 8)}
    assert any("input" in n and "N" in n and "1" in n for n in notes)


def test_unknown_inner_dimension_names_the_input_and_the_option() -> None:
    specs = graph_inputs(conv_chain(dims=["N", 3, "height", "width"]))
    with pytest.raises(InputShapeError) as e:
        resolve_shapes(specs, {})
    msg = str(e.value)
    assert "'input'" in msg and "--input-shape" in msg and "height" in msg
    assert "\n" not in msg
    assert e.value.exit_code == ExitCode.NOT_VERIFIED


def test_explicit_shape_sets_dynamic_dimensions() -> None:
    specs = graph_inputs(conv_chain(dims=["N", 3, "height", "width"]))
    assert resolve_shapes(specs, {"input": (2, 3, 10, 12)}) == {"input": (2, 3, 10, 12)}


def test_explicit_shape_must_fit_the_model() -> None:
    specs = graph_inputs(conv_chain(dims=["N", 3, "H", "W"]))
    with pytest.raises(InputShapeError, match="dimension 1 is 4"):
        resolve_shapes(specs, {"input": (1, 4, 8, 8)})
    with pytest.raises(InputShapeError, match="3 dimension"):
        resolve_shapes(specs, {"input": (1, 3, 8)})
    with pytest.raises(InputShapeError, match="no input 'nope'"):
        resolve_shapes(specs, {"nope": (1,)})


def test_symbols_are_shared_between_inputs() -> None:
    m = _model_with_inputs(
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "T", 4]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", "T"]),
    )
    shapes = resolve_shapes(graph_inputs(m), {"a": (2, 7, 4)})
    assert shapes == {"a": (2, 7, 4), "b": (2, 7)}


def test_minus_one_and_missing_dims_are_unknown() -> None:
    m = _model_with_inputs(helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3]))
    assert resolve_shapes(graph_inputs(m), {}) == {"x": (1, 3)}
    no_shape = _model_with_inputs(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    with pytest.raises(InputShapeError, match="no shape"):
        resolve_shapes(graph_inputs(no_shape), {})


def test_initializers_listed_as_inputs_are_not_fed() -> None:
    m = conv_chain()
    m.graph.input.append(helper.make_tensor_value_info("conv0.weight", TensorProto.FLOAT, [8, 3, 3, 3]))
    assert [s.name for s in graph_inputs(m)] == ["input"]


def test_string_and_sequence_inputs_are_not_verifiable() -> None:
    s = _model_with_inputs(helper.make_tensor_value_info("s", TensorProto.STRING, [1]))
    with pytest.raises(NotVerifiableError, match="'s'"):
        graph_inputs(s)
    seq = helper.make_tensor_sequence_value_info("q", TensorProto.FLOAT, None)
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["q"], ["o"])],
            "g",
            [seq],
            [helper.make_tensor_sequence_value_info("o", TensorProto.FLOAT, None)],
        )
    )
    with pytest.raises(NotVerifiableError, match="sequence"):
        graph_inputs(m)


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elem", "dtype"),
    [
        (TensorProto.FLOAT, np.float32),
        (TensorProto.FLOAT16, np.float16),
        (TensorProto.DOUBLE, np.float64),
        (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
    ],
)
def test_floats_are_standard_normal(elem: int, dtype) -> None:
    a = generate(InputSpec("x", elem, (4000,)), (4000,), np.random.default_rng(0), (0, 9))
    assert a.dtype == np.dtype(dtype)
    f = a.astype(np.float64)
    assert abs(f.mean()) < 0.1 and 0.9 < f.std() < 1.1
    assert f.min() < -2 and f.max() > 2


def test_integers_cover_the_range_inclusive() -> None:
    a = generate(InputSpec("i", TensorProto.INT64, (2000,)), (2000,), np.random.default_rng(0), (3, 6))
    assert a.dtype == np.int64 and set(np.unique(a).tolist()) == {3, 4, 5, 6}


def test_integer_range_is_clipped_to_the_dtype() -> None:
    a = generate(InputSpec("u", TensorProto.UINT8, (2000,)), (2000,), np.random.default_rng(0), (-10, 1000))
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() == 255
    with pytest.raises(InputFileError):
        generate(InputSpec("u", TensorProto.UINT8, (2,)), (2,), np.random.default_rng(0), (-10, -1))


def test_bools_take_both_values() -> None:
    a = generate(InputSpec("b", TensorProto.BOOL, (200,)), (200,), np.random.default_rng(0), (0, 9))
    assert a.dtype == np.bool_ and a.any() and not a.all()


def test_trials_are_seeded_and_different() -> None:
    m = int_bool_model()
    p1 = make_inputs(m, InputOptions(seed=3, trials=2))
    p2 = make_inputs(m, InputOptions(seed=3, trials=2))
    p3 = make_inputs(m, InputOptions(seed=4, trials=2))
    assert len(p1.feeds) == 2
    for k in ("x", "mask", "ids"):
        assert np.array_equal(p1.feeds[0][k], p2.feeds[0][k])
    assert not np.array_equal(p1.feeds[0]["x"], p1.feeds[1]["x"])
    assert not np.array_equal(p1.feeds[0]["x"], p3.feeds[0]["x"])
    assert p1.feeds[0]["ids"].dtype == np.int64 and p1.feeds[0]["mask"].dtype == np.bool_
    assert p1.feeds[0]["x"].shape == (1, 4, 5, 5)


def test_default_is_three_trials() -> None:
    assert len(make_inputs(conv_chain()).feeds) == 3


# ---------------------------------------------------------------------------
# .npz files
# ---------------------------------------------------------------------------


def test_npz_replaces_generated_inputs(tmp_path) -> None:
    x = np.arange(2 * 3 * 8 * 8, dtype=np.float64).reshape(2, 3, 8, 8)  # float64: cast to float32
    path = str(tmp_path / "in.npz")
    np.savez(path, input=x)
    plan = make_inputs(conv_chain(), InputOptions(files=[path]))
    assert len(plan.feeds) == 1 and plan.sources == [path]
    assert plan.feeds[0]["input"].dtype == np.float32
    assert np.array_equal(plan.feeds[0]["input"], x.astype(np.float32))


def test_npz_plus_generated_trials_follow_its_shapes(tmp_path) -> None:
    path = str(tmp_path / "in.npz")
    np.savez(path, input=np.ones((1, 3, 5, 7), np.float32))
    plan = make_inputs(conv_chain(dims=["N", 3, "H", "W"]), InputOptions(files=[path], trials=2))
    assert len(plan.feeds) == 3
    assert [f["input"].shape for f in plan.feeds] == [(1, 3, 5, 7)] * 3


def test_npz_missing_inputs_are_generated(tmp_path) -> None:
    path = str(tmp_path / "in.npz")
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    np.savez(path, ids=ids)
    plan = make_inputs(int_bool_model(), InputOptions(files=[path]))
    feed = plan.feeds[0]
    assert np.array_equal(feed["ids"], ids)
    assert feed["x"].shape == (2, 4, 5, 5) and feed["mask"].shape == (2, 4, 5, 5)  # batch from the file
    assert any("generated" in n for n in plan.notes)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"nope": np.zeros((1, 3, 8, 8), np.float32)}, "'nope' is not an input"),
        ({"input": np.zeros((1, 3, 8, 8), np.int64)}, "int64"),
        ({"input": np.zeros((1, 4, 8, 8), np.float32)}, "shape"),
    ],
)
def test_npz_that_does_not_fit(tmp_path, arrays: dict, match: str) -> None:
    path = str(tmp_path / "in.npz")
    np.savez(path, **arrays)
    with pytest.raises(InputFileError, match=match) as e:
        make_inputs(conv_chain(), InputOptions(files=[path]))
    assert e.value.exit_code == ExitCode.USAGE


def test_unreadable_npz(tmp_path) -> None:
    path = tmp_path / "in.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="cannot read"):
        make_inputs(conv_chain(), InputOptions(files=[str(path)]))


def test_no_inputs_at_all() -> None:
    with pytest.raises(InputFileError):
        make_inputs(conv_chain(), InputOptions(trials=0))
