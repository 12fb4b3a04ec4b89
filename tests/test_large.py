"""A model over 2 GB (protobuf's limit) folds end to end: external data, checker and onnxruntime by path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import assert_close, run, run_cli
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnxio import tensors, writer

C = 8192  # 1x1 Conv weights of C x C float32: 256 MiB each
LAYERS = 9  # 2.25 GiB of weights in all


def build_large(path: str, seed: int = 0) -> int:
    """LAYERS x (Conv 1x1 + BN + Relu), weights streamed to ``path + '.data'``; returns the data size."""
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 23, dtype=np.float32) * np.float32(np.sqrt(2.0 / C))).tobytes()  # 32 MiB
    n_bytes = C * C * 4
    nodes, inits, x = [], [], "x"
    with open(path + ".data", "wb") as data:
        for i in range(LAYERS):
            offset = data.tell()
            shift = (i * 4099 * 4) % len(block)  # a different phase of the pattern per layer
            pattern = block[shift:] + block[:shift]
            for _ in range(n_bytes // len(pattern)):
                data.write(pattern)
            w = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[C, C, 1, 1])
            w.data_location = TensorProto.EXTERNAL
            for k, v in (("location", os.path.basename(path) + ".data"), ("offset", offset), ("length", n_bytes)):
                e = w.external_data.add()
                e.key, e.value = k, str(v)
            inits.append(w)
            bn = {
                "scale": rng.uniform(0.5, 1.5, C),
                "bias": rng.normal(0, 0.1, C),
                "mean": rng.normal(0, 0.5, C),
                "var": rng.uniform(0.5, 2.0, C),
            }
            inits += [numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}") for k, v in bn.items()]
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
            nodes.append(
                helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in bn], [f"b{i}"], name=f"bn{i}")
            )
            nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
        size = data.tell()
    g = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 1, 1])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, 1, 1])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return size


@pytest.mark.large
def test_fold_model_over_2gb(tmp_path) -> None:
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    os.makedirs(src_dir)
    os.makedirs(out_dir)
    src, out = str(src_dir / "large.onnx"), str(out_dir / "large.folded.onnx")
    try:
        data_size = build_large(src)
        assert data_size > writer.MAX_PROTOBUF

        # Embedding is impossible: refused before any work, nothing written.
        r = run_cli("fold", src, "-o", out, "--no-external-data", "--no-verify")
        assert r.returncode == 5, r.stderr
        assert "over 2 GB" in r.stderr and os.listdir(out_dir) == []

        proc = subprocess.Popen(
            [sys.executable, "-m", "bnfold", "fold", src, "-o", out, "--no-verify"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert os.waitstatus_to_exitcode(status) == 0, stderr
        assert f"BatchNormalization {LAYERS} found, {LAYERS} folded, 0 left" in stdout
        assert "external data: large.folded.onnx.data" in stdout
        # Only folded tensors are ever in memory, one at a time (the bound: 1.5x the model).
        assert usage.ru_maxrss * 1024 < 1.5 * data_size

        assert sorted(os.listdir(out_dir)) == ["large.folded.onnx", "large.folded.onnx.data"]
        in_total = os.path.getsize(src) + data_size
        assert os.path.getsize(out) + os.path.getsize(out + ".data") <= in_total, "the folded model is not larger"
        onnx.checker.check_model(out, full_check=True)  # by path: the model is over 2 GB
        folded = onnx.load(out, load_external_data=False)
        assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
        assert all(tensors.is_external(t) for t in folded.graph.initializer if t.name.startswith("w"))

        # bnfold's own verification runs both models by path (nothing serialized).
        r = run_cli("verify", src, out)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verify: passed" in r.stdout

        # onnxruntime by path, graph optimizations off: same outputs.
        feeds = {"x": np.random.default_rng(1).standard_normal((1, C, 1, 1)).astype(np.float32)}
        expected = run(src, feeds)[0]
        got = run(out, feeds)[0]
        assert_close(expected, got, atol=1e-4, rtol=1e-3)
    finally:
        shutil.rmtree(src_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
