"""External data in and out, atomic writes, streamed copies and the no-copy fold path."""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import numpy as np
import onnx
import pytest
from helpers import assert_close, op_count, random_feeds, run, run_cli
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import ModelLoadError, OutputError
from bnfold.fold import graph
from bnfold.onnxio import copy, layout, protowire, tensors, writer
from bnfold.onnxio import load as model_io
from bnfold.onnxio.sink import DataSink

RNG = np.random.default_rng(7)


# ---------------------------------------------------------------------------
# Models and files
# ---------------------------------------------------------------------------


def _bn(prefix: str, x: str, y: str, c: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    vals = {
        "scale": RNG.uniform(0.5, 1.5, c),
        "bias": RNG.normal(0, 0.1, c),
        "mean": RNG.normal(0, 0.5, c),
        "var": RNG.uniform(0.5, 2.0, c),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in vals.items()]
    node = helper.make_node("BatchNormalization", [x, *(t.name for t in inits)], [y], name=prefix)
    return node, inits


def _w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def cnn() -> onnx.ModelProto:
    """Conv+BN+Relu, Conv+BN, then a plain Conv (with bias) that no fold touches."""
    c = 16
    bn1, p1 = _bn("bn1", "c1", "b1", c)
    bn2, p2 = _bn("bn2", "c2", "b2", c)
    inits = [_w("conv1.w", (c, 3, 3, 3)), _w("conv2.w", (c, c, 3, 3)), _w("plain.w", (8, c, 3, 3))]
    inits.append(numpy_helper.from_array(RNG.normal(0, 0.1, 8).astype(np.float32), "plain.b"))
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w"], ["c1"], name="conv1", pads=[1] * 4),
        bn1,
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="conv2", pads=[1] * 4),
        bn2,
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "plain.w", "plain.b"], ["y"], name="plain", pads=[1] * 4),
    ]
    g = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        inits + p1 + p2,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def save_external(model: onnx.ModelProto, path: str, location: str | None = None, **kw: object) -> None:
    """Save with every tensor of at least 64 bytes in external data."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kw.setdefault("size_threshold", 64)
    onnx.save(m, path, save_as_external_data=True, location=location or os.path.basename(path) + ".data", **kw)


def save_split(model: onnx.ModelProto, path: str, groups: dict[str, list[str]]) -> None:
    """Save with the named tensors in the given data files (relative locations, subfolders allowed)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    folder = os.path.dirname(path)
    by_name = {t.name: t for t in m.graph.initializer}
    for location, names in groups.items():
        os.makedirs(os.path.dirname(os.path.join(folder, location)), exist_ok=True)
        with open(os.path.join(folder, location), "wb") as f:
            for n in names:
                t = by_name[n]
                raw = t.raw_data
                offset = f.tell()
                f.write(raw)
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", offset), ("length", len(raw))):
                    e = t.external_data.add()
                    e.key, e.value = k, str(v)
    onnx.save(m, path)


def snapshot(folder: str) -> dict[str, str]:
    """File name -> sha256 of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def external_locations(path: str) -> dict[str, str]:
    """Tensor name -> data file location for every external tensor of the model at ``path``."""
    m = onnx.load(path, load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}["location"]
        for t, _ in tensors.model_tensors(m)
        if tensors.is_external(t)
    }


def assert_same_run(original: str, folded: str) -> None:
    feeds = random_feeds(onnx.load(original, load_external_data=False))
    for a, b in zip(run(original, feeds), run(folded, feeds), strict=True):
        assert_close(a, b)


def assert_data_file_exact(path: str) -> None:
    """The output's one data file holds exactly its tensors, back to back from offset 0 (nothing stale)."""
    m = onnx.load(path, load_external_data=False)
    regions = []
    for t, _ in tensors.model_tensors(m):
        if tensors.is_external(t):
            e = {x.key: x.value for x in t.external_data}
            regions.append((int(e["offset"]), int(e["length"])))
    regions.sort()
    pos = 0
    for off, length in regions:
        assert off == pos, "gap or overlap in the data file"
        pos += length
    data = os.path.join(os.path.dirname(path), next(iter(set(external_locations(path).values()))))
    assert os.path.getsize(data) == pos


@pytest.fixture
def ext_model(tmp_path) -> str:
    """``in/model.onnx`` + ``in/model.onnx.data``."""
    os.makedirs(tmp_path / "in")
    path = str(tmp_path / "in" / "model.onnx")
    save_external(cnn(), path)
    return path


# ---------------------------------------------------------------------------
# External data through the CLI
# ---------------------------------------------------------------------------


def test_external_in_external_out_one_file(ext_model: str, tmp_path) -> None:
    before = snapshot(os.path.dirname(ext_model))
    os.makedirs(tmp_path / "out")
    out = str(tmp_path / "out" / "folded.onnx")
    r = run_cli("fold", ext_model, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "BatchNormalization 2 found, 2 folded" in r.stdout
    assert "external data: folded.onnx.data" in r.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["folded.onnx", "folded.onnx.data"]
    assert set(external_locations(out).values()) == {"folded.onnx.data"}
    assert_data_file_exact(out)
    assert snapshot(os.path.dirname(ext_model)) == before, "the input folder must not change"
    onnx.checker.check_model(out, full_check=True)
    assert op_count(onnx.load(out, load_external_data=False), "BatchNormalization") == 0
    assert_same_run(ext_model, out)


def test_several_data_files_in_one_file_out(tmp_path) -> None:
    os.makedirs(tmp_path / "in")
    src = str(tmp_path / "in" / "model.onnx")
    names = [t.name for t in cnn().graph.initializer]
    save_split(
        cnn(),
        src,
        {"weights/conv.bin": names[:2], "plain.bin": names[2:4], "bn.bin": names[4:8], "more/bn2.bin": names[8:]},
    )
    before = snapshot(str(tmp_path / "in"))
    out = str(tmp_path / "folded.onnx")
    r = run_cli("fold", src, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert set(external_locations(out).values()) == {"folded.onnx.data"}
    assert_data_file_exact(out)
    assert snapshot(str(tmp_path / "in")) == before
    assert_same_run(src, out)


def test_no_external_data_embeds_everything(ext_model: str, tmp_path) -> None:
    out = str(tmp_path / "emb.onnx")
    r = run_cli("fold", ext_model, "-o", out, "--no-external-data", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert external_locations(out) == {}
    assert not os.path.exists(out + ".data")
    assert_same_run(ext_model, out)


def test_embedded_stays_embedded_and_external_data_flag(tmp_path) -> None:
    src = str(tmp_path / "model.onnx")
    onnx.save(cnn(), src)
    out = str(tmp_path / "a.onnx")
    assert run_cli("fold", src, "-o", out, "--no-verify").returncode == 0
    assert external_locations(out) == {} and not os.path.exists(out + ".data")

    out2 = str(tmp_path / "b.onnx")
    r = run_cli("fold", src, "-o", out2, "--external-data", "--size-threshold", "2000", "--no-verify")
    assert r.returncode == 0, r.stderr
    m = onnx.load(out2, load_external_data=False)
    for t in m.graph.initializer:
        nbytes = tensors.tensor_nbytes(t)
        assert tensors.is_external(t) == (nbytes >= 2000), (t.name, nbytes)
    assert set(external_locations(out2).values()) == {"b.onnx.data"}
    assert_data_file_exact(out2)
    assert_same_run(src, out2)


def test_stale_data_file_next_to_output_is_replaced(ext_model: str, tmp_path) -> None:
    out = str(tmp_path / "folded.onnx")
    with open(out + ".data", "wb") as f:
        f.write(b"stale" * 100_000)
    with open(out, "wb") as f:
        f.write(b"old model")
    r = run_cli("fold", ext_model, "-o", out, "--no-verify", "--force")
    assert r.returncode == 0, r.stderr
    assert_data_file_exact(out)
    assert_same_run(ext_model, out)
    # The new data file took a fresh name (the old pair stayed whole until the model's
    # rename), and the stale data file of the replaced output is gone.
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "folded.onnx.1.data", "in"], "no temp files left"


def test_output_data_file_name_collides_with_input_data(ext_model: str) -> None:
    """Folding in place: the output's data file would be the input's own data file."""
    folder = os.path.dirname(ext_model)
    data = ext_model + ".data"
    with open(data, "rb") as f:
        data_before = f.read()
    shutil.copytree(folder, folder + ".orig")
    original = os.path.join(folder + ".orig", "model.onnx")
    r = run_cli("fold", ext_model, "--in-place", "--no-verify")
    assert r.returncode == 0, r.stderr
    with open(data, "rb") as f:
        assert f.read() == data_before, "a data file the input uses must not be touched"
    assert set(external_locations(ext_model).values()) == {"model.onnx.1.data"}
    assert_same_run(original, ext_model)


def test_input_data_file_named_like_the_output(tmp_path) -> None:
    """The input keeps its data in ``out.onnx.data``; writing ``out.onnx`` next to it must not touch it."""
    src = str(tmp_path / "model.onnx")
    save_external(cnn(), src, location="out.onnx.data")
    before = snapshot(str(tmp_path))
    out = str(tmp_path / "out.onnx")
    r = run_cli("fold", src, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    after = snapshot(str(tmp_path))
    assert after["out.onnx.data"] == before["out.onnx.data"]
    assert set(external_locations(out).values()) == {"out.onnx.1.data"}
    assert_same_run(src, out)


def test_output_onto_an_input_data_file_is_refused(ext_model: str) -> None:
    before = snapshot(os.path.dirname(ext_model))
    r = run_cli("fold", ext_model, "-o", ext_model + ".data", "--no-verify")
    assert r.returncode == 5, r.stderr
    assert "data file of the input" in r.stderr
    assert snapshot(os.path.dirname(ext_model)) == before


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"location": "/etc/passwd"}, "absolute"),
        ({"location": "../escape.bin"}, "leaves the model's folder"),
        ({"location": "missing.bin"}, "missing"),
        ({"location": "model.onnx.data", "offset": "999999999"}, "too short"),
        ({"location": "model.onnx.data", "length": "4"}, "too short for its shape"),
    ],
)
def test_bad_external_references_are_clear_load_errors(ext_model: str, entries: dict, message: str) -> None:
    m = onnx.load(ext_model, load_external_data=False)
    t = next(t for t in m.graph.initializer if tensors.is_external(t))
    old = {e.key: e.value for e in t.external_data}
    del t.external_data[:]
    for k, v in {**old, **entries}.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    onnx.save(m, ext_model)
    r = run_cli("fold", ext_model, "-o", ext_model + ".out.onnx", "--no-verify")
    assert r.returncode == 4, r.stderr
    assert message in r.stderr and t.name in r.stderr


def test_output_file_mode_follows_umask(ext_model: str, tmp_path) -> None:
    out = str(tmp_path / "folded.onnx")
    assert run_cli("fold", ext_model, "-o", out, "--no-verify").returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    for p in (out, out + ".data"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------------------
# The no-copy path
# ---------------------------------------------------------------------------


def _split_model(tmp_path) -> tuple[str, str]:
    """Folded tensors in ``fold.bin``; the plain Conv's weight and bias (never touched) in ``other.bin``."""
    src = str(tmp_path / "model.onnx")
    names = [t.name for t in cnn().graph.initializer]
    untouched = ["plain.w", "plain.b"]
    save_split(cnn(), src, {"fold.bin": [n for n in names if n not in untouched], "other.bin": untouched})
    return src, str(tmp_path / "other.bin")


def test_fold_reads_only_the_tensors_it_changes(tmp_path, monkeypatch) -> None:
    src, _ = _split_model(tmp_path)
    reads: list[str] = []
    real = tensors.ExternalReader.__call__

    def counting(self: tensors.ExternalReader, t: onnx.TensorProto) -> bytes:
        reads.append(t.name)
        return real(self, t)

    monkeypatch.setattr(tensors.ExternalReader, "__call__", counting)
    m = model_io.load_model(src)
    result = bnfold.fold_model(m, base_dir=str(tmp_path), copy=False)
    assert result.report.bn_folded == 2
    expected = {"conv1.w", "conv2.w"} | {f"bn{i}.{k}" for i in (1, 2) for k in ("scale", "bias", "mean", "var")}
    assert set(reads) == expected
    assert len(reads) == len(expected), "each tensor is read once"
    plain = {t.name: t for t in m.graph.initializer}
    assert tensors.is_external(plain["plain.w"]) and tensors.is_external(plain["plain.b"])


def test_untouched_data_file_is_never_read_by_the_fold(tmp_path) -> None:
    """With the untouched tensors' data file gone, the fold still works; the write then streams it."""
    src, other = _split_model(tmp_path)
    m = model_io.load_model(src)
    hidden = other + ".hidden"
    os.rename(other, hidden)
    try:
        result = bnfold.fold_model(m, base_dir=str(tmp_path), copy=False)
    finally:
        os.rename(hidden, other)
    assert result.report.bn_folded == 2
    out = str(tmp_path / "out" / "folded.onnx")
    os.makedirs(os.path.dirname(out))
    writer.write_model(result.model, out, base_dir=str(tmp_path), external=True, size_threshold=64, check=True)
    assert_same_run(src, out)


def test_write_streams_external_tensors_without_loading_them(ext_model: str, tmp_path, monkeypatch) -> None:
    m = model_io.load_model(ext_model)
    monkeypatch.setattr(copy, "CHUNK", 100)  # many small chunks
    monkeypatch.delattr(os, "copy_file_range", raising=False)

    def no_load(*a: object) -> None:
        raise AssertionError("an external tensor was loaded whole")

    monkeypatch.setattr(copy, "read_external", no_load)
    monkeypatch.setattr(tensors, "read_range", no_load)
    out = str(tmp_path / "copy.onnx")
    base = os.path.dirname(ext_model)
    writer.write_model(m, out, base_dir=base, size_threshold=64, check=True)
    assert_data_file_exact(out)
    assert_same_run(ext_model, out)


def test_data_sink_receives_folded_weights(ext_model: str, tmp_path) -> None:
    base = os.path.dirname(ext_model)
    m = model_io.load_model(ext_model)
    out = str(tmp_path / "sunk.onnx")
    with DataSink(out, size_threshold=64) as sink:
        result = bnfold.fold_model(m, base_dir=base, copy=False, sink=sink)
        w = {t.name: t for t in result.model.graph.initializer}["conv2.w"]
        assert tensors.is_external(w), "a folded weight goes to the sink, not into the model"
        assert graph.tensor_value(w, sink.reader(base)).shape == (16, 16, 3, 3)
        written = writer.write_model(result.model, out, base_dir=base, external=True, size_threshold=64, sink=sink)
    assert written.data_path == out + ".data"
    assert sorted(os.listdir(tmp_path)) == ["in", "sunk.onnx", "sunk.onnx.data"]
    assert_data_file_exact(out)
    assert_same_run(ext_model, out)


def test_data_sink_is_removed_when_the_fold_fails(tmp_path) -> None:
    out = str(tmp_path / "x.onnx")
    with pytest.raises(RuntimeError), DataSink(out, size_threshold=0) as sink:
        sink.put(onnx.TensorProto(), np.ones(1000, np.float32), "w")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing(ext_model: str, tmp_path, monkeypatch) -> None:
    m = model_io.load_model(ext_model)

    def broken(model: onnx.ModelProto, f: io.BufferedWriter, *sink: object) -> int:
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "write_proto", broken)
    os.makedirs(tmp_path / "out")
    with pytest.raises(OutputError, match="No space left"):
        writer.write_model(m, str(tmp_path / "out" / "f.onnx"), base_dir=os.path.dirname(ext_model))
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------------
# Layout decisions, the 2 GB limit, streamed serialization
# ---------------------------------------------------------------------------


def test_over_the_protobuf_limit_goes_external_automatically(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(writer, "MAX_PROTOBUF", 10_000)  # a "2 GB" model in miniature
    monkeypatch.setattr(layout, "MAX_PROTOBUF", 10_000)
    m = cnn()
    index = tensors.TensorIndex.build(m, str(tmp_path), "m")
    assert layout.plan_layout(index) == (True, True)
    with pytest.raises(OutputError, match="over 2 GB"):
        layout.plan_layout(index, external=False)
    res = writer.write_model(m, str(tmp_path / "big.onnx"), size_threshold=64)
    assert res.auto_external and res.data_path == str(tmp_path / "big.onnx.data")


def test_write_proto_is_byte_identical_to_serialize(models_dir: str) -> None:
    for name in sorted(os.listdir(models_dir)):
        m = onnx.load(os.path.join(models_dir, name))
        buf = io.BytesIO()
        n = protowire.write_proto(m, buf)
        assert buf.getvalue() == m.SerializeToString() and n == len(buf.getvalue()), name


def test_short_raw_data_is_caught_although_the_skeleton_stubs_it(tmp_path) -> None:
    m = cnn()
    t = m.graph.initializer[1]  # conv2.w, big enough to be stubbed in the checker's skeleton
    t.raw_data = t.raw_data[:100]
    with pytest.raises(ModelLoadError, match=r"conv2\.w"):
        tensors.check_tensors(m, "m")
    onnx.save(m, str(tmp_path / "short.onnx"))
    with pytest.raises(ModelLoadError, match=r"conv2\.w"):
        model_io.load_model(str(tmp_path / "short.onnx"))
    model_io.check_model(cnn(), "m", full=True)


def test_constant_node_values_in_external_data(tmp_path) -> None:
    """BN parameters held by Constant nodes whose tensors were saved externally (convert_attribute)."""
    m = cnn()
    keep = []
    for t in m.graph.initializer:
        if t.name.startswith("bn1."):
            m.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
        else:
            keep.append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    src = str(tmp_path / "model.onnx")
    save_external(m, src, convert_attribute=True)
    assert any(
        tensors.is_external(n.attribute[0].t)
        for n in onnx.load(src, load_external_data=False).graph.node
        if n.op_type == "Constant"
    )
    out = str(tmp_path / "folded.onnx")
    r = run_cli("fold", src, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "2 found, 2 folded" in r.stdout
    assert_same_run(src, out)


def test_before_commit_sees_the_complete_model_and_can_veto(ext_model: str, tmp_path) -> None:
    base = os.path.dirname(ext_model)
    seen = []

    def look(tmp: str) -> None:
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path)
        assert_same_run(ext_model, tmp)  # runnable by path, data file in place

    out = str(tmp_path / "ok.onnx")
    writer.write_model(model_io.load_model(ext_model), out, base_dir=base, before_commit=look)
    assert len(seen) == 1 and not os.path.exists(seen[0]) and os.path.exists(out)

    def veto(tmp: str) -> None:
        raise OutputError("outputs differ")

    bad = str(tmp_path / "bad.onnx")
    with pytest.raises(OutputError, match="outputs differ"):
        writer.write_model(model_io.load_model(ext_model), bad, base_dir=base, before_commit=veto)
    assert sorted(os.listdir(tmp_path)) == ["in", "ok.onnx", "ok.onnx.data"]


def test_embedded_output_streams_staged_weights_byte_for_byte(tmp_path) -> None:
    """Folded weights staged in a sink file are streamed into an embedded model file:
    the bytes equal the in-memory fold's serialization, and no staging file is left."""
    import bnfold

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "resnet_block.onnx")
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    r = run_cli("fold", src, "-o", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr
    expected = bnfold.fold_model(onnx.load(src)).model.SerializeToString()
    assert out.read_bytes() == expected
    assert os.listdir(out.parent) == ["folded.onnx"]


def test_reader_reuses_a_buffer_only_once_nothing_refers_to_it(tmp_path) -> None:
    """Big weights are read into reused buffers, never one still in use (issue 14: no fresh pages per weight)."""
    rng = np.random.default_rng(3)
    values = [rng.standard_normal((1 << 18,)).astype(np.float32) for _ in range(3)]  # 1 MiB each
    inits = [numpy_helper.from_array(v, f"w{i}") for i, v in enumerate(values)]
    g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w0", TensorProto.FLOAT, [1 << 18])], inits)
    path = str(tmp_path / "m.onnx")
    save_external(helper.make_model(g), path)
    m = model_io.load_model(path, check=False)
    read = tensors.ExternalReader(str(tmp_path))
    ts = list(m.graph.initializer)
    first = graph.tensor_value(ts[0], read)
    second = graph.tensor_value(ts[1], read)  # ``first`` is alive: a new buffer
    # (plain variables: pytest's assertion rewriting would keep ``second`` alive)
    second_ok, second_id = bool(np.array_equal(second, values[1])), _buffer_id(second)
    del second
    third = graph.tensor_value(ts[2], read)  # ``second``'s buffer is free now: reused
    assert second_ok and second_id != _buffer_id(first)
    assert _buffer_id(third) == second_id
    assert np.array_equal(first, values[0]) and np.array_equal(third, values[2])


def _buffer_id(a: np.ndarray) -> int:
    """id of the object that owns an array's memory (no reference to it is kept)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    owner = a.base.obj if isinstance(a.base, memoryview) else a.base
    return id(owner)
