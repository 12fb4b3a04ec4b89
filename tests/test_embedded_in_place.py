"""Embedded weights left in the model file (``bnfold.onnxio.embedded``): same model, same errors, same outputs.

The shortcut parses a model without the raw data of its big initializers and reads
them from the file when needed; every test here compares it with a plain
``onnx.load`` of the same bytes, or runs the folded output in onnxruntime against
the original.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import onnx
import pytest
from affine_builders import bn_node, bn_params
from helpers import assert_same_outputs, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnxio import embedded
from bnfold.onnxio.embedded import EmbeddedSource, load_in_place
from bnfold.onnxio.load import load_indexed
from bnfold.onnxio.tensors import is_external, read_external


def _conv_bn_model(channels: list[int], seed: int = 0, doc_on_weights: bool = False) -> onnx.ModelProto:
    """Conv+BN+Relu blocks, then a Flatten+Gemm head: weights from tiny to a few hundred KB."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"w{i}")
        if doc_on_weights:
            w.doc_string = f"weight {i}"  # a field after raw_data: not streamable as is
        inits += [w, *bn_params(rng, f"bn{i}", cout)]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            bn_node(f"bn{i}", f"c{i}", f"n{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    c = channels[-1]
    fc = numpy_helper.from_array(rng.standard_normal((c * 16, 10)).astype(np.float32), "fc")
    if doc_on_weights:
        fc.doc_string = "head"  # not folded: written back with its doc_string
    inits.append(fc)
    nodes += [helper.make_node("Flatten", [x], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels[0], 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _materialize(model: onnx.ModelProto, source: EmbeddedSource) -> onnx.ModelProto:
    """The lazily loaded model with every held tensor's bytes read back in."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if source.holds(t):
            data = read_external(t, source.base_dir)
            del t.external_data[:]
            t.ClearField("data_location")
            t.raw_data = data
    return m


def test_same_model_as_onnx_load(tmp_path) -> None:
    path = str(tmp_path / "m.onnx")
    onnx.save(_conv_bn_model([3, 16, 32, 64]), path)
    lazy = load_in_place(path)
    assert lazy is not None
    model, source = lazy
    held = [t.name for t in model.graph.initializer if source.holds(t)]
    assert {"w0", "w1", "w2", "fc"} <= set(held)  # the weights of at least 1 KiB
    assert "bn0.scale" not in held  # 16 floats: parsed as usual
    assert _materialize(model, source) == onnx.load(path)


# Each piece of a graph is serialized alone and the bytes concatenated: protobuf merges
# them, so initializers end up interleaved with nodes and with each other, in any order.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=6),
    minimum=st.sampled_from([0, 1, 64, 1024]),
    doc=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_interleaved_fields_give_the_same_model(tmp_path, sizes, minimum, doc, seed) -> None:
    rng = np.random.default_rng(seed)
    parts = []
    for i, n in enumerate(sizes):
        t = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"t{i}")
        if doc and i % 2:
            t.doc_string = "after raw_data"
        g = onnx.GraphProto(node=[helper.make_node("Identity", [f"t{i}"], [f"o{i}"])], initializer=[t])
        parts.append(g.SerializeToString())
    graph_bytes = b"".join(parts[::-1] if seed % 2 else parts)
    tail = onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)]).SerializeToString()
    data = tail + bytes([0x3A]) + _varint(len(graph_bytes)) + graph_bytes  # field 7 (graph), wire type 2
    path = tmp_path / f"m{seed}.onnx"
    path.write_bytes(data)
    expected = onnx.ModelProto.FromString(data)
    lazy = load_in_place(str(path), minimum)
    if lazy is None:  # nothing big enough to leave in the file
        assert all(n * 4 < max(minimum, 1) for n in sizes)
        return
    model, source = lazy
    assert _materialize(model, source) == expected
    os.remove(path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _raw_field(data: bytes) -> bytes:
    return bytes([9 << 3 | 2]) + _varint(len(data)) + data


@pytest.mark.parametrize(
    "spoil",
    [
        "two_raw_data",  # protobuf keeps the last: left to the parser
        "short_raw_data",  # holds fewer bytes than its shape: the usual error
        "external_too",  # raw_data and an external location: left as it is
    ],
)
def test_unusual_tensors_are_left_to_the_parser(tmp_path, spoil) -> None:
    w = np.arange(600, dtype=np.float32)
    t = numpy_helper.from_array(w, "w")
    if spoil == "short_raw_data":
        t.raw_data = t.raw_data[:-4]
    if spoil == "external_too":
        e = t.external_data.add()
        e.key, e.value = "location", "w.bin"
        t.data_location = TensorProto.EXTERNAL
    t_bytes = t.SerializeToString()
    if spoil == "two_raw_data":
        t_bytes += _raw_field(np.ones(600, np.float32).tobytes())
    graph = onnx.GraphProto(node=[helper.make_node("Identity", ["w"], ["y"])], name="g").SerializeToString()
    graph += bytes([5 << 3 | 2]) + _varint(len(t_bytes)) + t_bytes
    head = onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)]).SerializeToString()
    data = head + bytes([0x3A]) + _varint(len(graph)) + graph
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    expected = onnx.ModelProto.FromString(data)
    lazy = load_in_place(str(path))
    if lazy is not None:
        model, source = lazy
        assert not source.holds(model.graph.initializer[0])
        assert model == expected


def test_truncated_file_falls_back_to_the_usual_error(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_conv_bn_model([3, 16, 32]), str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert load_in_place(str(cut)) is None
    r = run_cli("check", str(cut))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "not an ONNX model" in r.stderr


def test_two_graph_fields_fall_back(tmp_path) -> None:
    m = _conv_bn_model([3, 16])
    data = m.SerializeToString()
    g = onnx.GraphProto(name="again").SerializeToString()
    data += bytes([0x3A]) + _varint(len(g)) + g  # a second graph field: protobuf merges it
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert load_in_place(str(path)) is None


def test_hard_linked_model_file_is_parsed_as_usual(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_conv_bn_model([3, 16, 32]), str(path))
    os.link(path, tmp_path / "other.onnx")
    assert load_in_place(str(path)) is None  # a hard link is never read as external data
    model, index = load_indexed(str(path), in_place=True)
    assert index.source is None and not any(is_external(t) for t in model.graph.initializer)
    r = run_cli("fold", str(path), "-o", str(tmp_path / "out.onnx"))
    assert r.returncode == 0, r.stderr


def test_index_counts_held_tensors_as_embedded(tmp_path) -> None:
    path = str(tmp_path / "m.onnx")
    onnx.save(_conv_bn_model([3, 16, 32]), path)
    _model, index = load_indexed(path, in_place=True)
    assert index.source is not None
    assert not index.external and not index.data_files
    assert index.embedded_size >= os.path.getsize(path) - 4096


@pytest.mark.parametrize("doc", [False, True])
@pytest.mark.parametrize("layout", ["embedded", "external", "in-place"])
def test_fold_output_matches_original(tmp_path, monkeypatch, layout, doc) -> None:
    original = _conv_bn_model([3, 16, 32, 48], seed=3, doc_on_weights=doc)
    src = tmp_path / "in.onnx"
    onnx.save(original, str(src))
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    args = ["fold", str(src), "-o", str(out)]
    if layout == "external":
        args.append("--external-data")
    if layout == "in-place":
        out = src
        args = ["fold", str(src), "--in-place"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    ext = [t.name for t in onnx.load(str(out), load_external_data=False).graph.initializer if is_external(t)]
    folded = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    if layout == "external":
        assert ext and os.path.exists(str(out) + ".data")
    else:
        assert not ext and not os.path.exists(str(out) + ".data")
        assert sorted(os.listdir(tmp_path)) == ["in.onnx"] + ([] if layout == "in-place" else ["out.onnx"])
    if layout != "in-place":
        assert src.read_bytes() == before  # the input is never written
    assert_same_outputs(original, folded)
    if doc:  # the fields a tensor carried beside its raw data survive
        assert [t.doc_string for t in folded.graph.initializer if t.name == "fc"] == ["head"]


def test_nothing_big_loads_as_usual(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "m.onnx")
    onnx.save(_conv_bn_model([3, 16, 32]), path)
    monkeypatch.setattr(embedded, "IN_PLACE_MIN", 1 << 30)
    assert load_in_place(path, minimum=1 << 30) is None
    model, index = load_indexed(path, in_place=True)
    assert index.source is None and model == onnx.load(path)
