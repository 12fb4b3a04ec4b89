"""Benchmark ``bnfold fold`` against the I/O floor and the peers, on seeded models from a few MB to over 2 GB.

    python scripts/bench.py [--models NAME|PATH ...] [--repeat N] [--workdir DIR] [--keep]

Built models (seeded, real random weights; ``--models`` picks some, default all):

  resnet50-w0.25   ResNet-50 graph at a quarter of the width, embedded (~7 MB, 53 BN)
  resnet50         ResNet-50, float32, embedded (~100 MB, 53 BN)
  resnet50-ext     the same model with external data (model.onnx + model.onnx.data)
  convnet-2g3      15 Conv(2048, 3x3)+BN+Relu layers, external data (~2.3 GB, over protobuf's 2 GB)

Any other ``--models`` argument is a path to an existing ``.onnx`` file.

Every tool runs as a command-line subprocess (imports included) with the same
interpreter, started from a small wrapper process; wall time is the best of
``--repeat`` interleaved runs (the machine may be shared), peak RSS the largest
``ru_maxrss`` of the tool's process:

  I/O floor      ``onnx.load`` + ``onnx.save`` (with external data into one file when the input has it)
  bnfold         ``python -m bnfold fold --no-verify``
  onnxoptimizer  ``python -m onnxoptimizer IN OUT -p fuse_bn_into_conv``
  onnxsim        ``onnxsim IN OUT 0 --no-certify`` (0: no check runs)
  onnxslim       ``onnxslim IN OUT``

Peers that are not installed are skipped with a note.  Latency is onnxruntime's
(CPU) best run time of the original and of bnfold's output at ``ORT_DISABLE_ALL``
and ``ORT_ENABLE_ALL``, both sessions in one process with their runs interleaved
(twice, in both orders).
One markdown table is printed, then the goals of the speed work as ratios in one run:

  start-up       ``bnfold --help`` / ``--version`` against ``python -c "import click"`` (goal <= 2x)
  fold           resnet50 ``fold --no-verify`` against the load+save floor (goal <= 1.05x);
                 the model over 2 GB against ``cp`` of its files + ``sync`` (goal <= 1.5x), peak
                 RSS against its size (goal < 0.2x)
  verification   ``timings.verify`` of ``bnfold fold --json`` against two bare onnxruntime
                 sessions (original at ORT_DISABLE_ALL, folded) with the same runs (goal <= 1.1x)
  scaling        check and fold-with-verification time of generated graphs at N and 2N nodes
                 (chain, one tensor read by N nodes, Mul chain of unknown rank, N graph inputs):
                 the growth per doubling (goal about 2x, linear)
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPSET = 17
IR_VERSION = 8
MB = 1 << 20

# ---------------------------------------------------------------------------
# Seeded models
# ---------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers; large weights may go straight to an external data file."""

    def __init__(self, seed: int, data_file: str | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.data_file = data_file
        self._data = open(data_file, "wb") if data_file else None

    def weight(self, name: str, shape: tuple[int, ...]) -> None:
        """He-normal float32 weight (written to the data file in chunks when there is one)."""
        fan_in = int(np.prod(shape[1:]))
        scale = np.float32(np.sqrt(2.0 / fan_in))
        if self._data is None:
            w = self.rng.standard_normal(shape, dtype=np.float32) * scale
            self.inits.append(numpy_helper.from_array(w, name))
            return
        n, offset = int(np.prod(shape)), self._data.tell()
        for start in range(0, n, 1 << 24):
            chunk = self.rng.standard_normal(min(1 << 24, n - start), dtype=np.float32) * scale
            self._data.write(chunk.astype("<f4").tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", os.path.basename(self.data_file)), ("offset", offset), ("length", n * 4)):
            e = t.external_data.add()
            e.key, e.value = k, str(v)
        self.inits.append(t)

    def bn(self, prefix: str, x: str, y: str, c: int) -> None:
        """Inference BatchNormalization with trained-looking statistics."""
        vals = {
            "scale": self.rng.uniform(0.5, 1.5, c),
            "bias": self.rng.normal(0, 0.1, c),
            "mean": self.rng.normal(0, 0.5, c),
            "var": self.rng.uniform(0.5, 2.0, c),
        }
        for k, v in vals.items():
            self.inits.append(numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}"))
        names = [f"{prefix}.{k}" for k in vals]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, epsilon=1e-5))

    def conv_bn(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        """Conv (no bias) + BN (+ Relu); returns the output name."""
        self.weight(f"{name}.weight", (cout, cin, k, k))
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [f"{name}.conv"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
            )
        )
        self.bn(f"{name}.bn", f"{name}.conv", f"{name}.bn_out", cout)
        if not relu:
            return f"{name}.bn_out"
        self.nodes.append(helper.make_node("Relu", [f"{name}.bn_out"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    def model(self, name: str, inp: tuple[str, list], out: tuple[str, list]) -> onnx.ModelProto:
        if self._data is not None:
            self._data.close()
        g = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
            [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, out[1])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-bench")
        m.ir_version = IR_VERSION
        return m


def resnet50(width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (bottleneck blocks 3-4-6-3, 53 Conv+BN, fc 1000) with ``width`` times the channels."""
    b = _Builder(seed)
    c0 = max(8, int(64 * width))
    x = b.conv_bn("conv1", "input", 3, c0, 7, 2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["pool1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool1", c0
    for stage, (blocks, w0) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512], strict=True)):
        width_ = max(8, int(w0 * width))
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            pre = f"layer{stage + 1}.{i}"
            y = b.conv_bn(f"{pre}.conv1", x, cin, width_, 1)
            y = b.conv_bn(f"{pre}.conv2", y, width_, width_, 3, stride)
            y = b.conv_bn(f"{pre}.conv3", y, width_, width_ * 4, 1, relu=False)
            short = b.conv_bn(f"{pre}.downsample", x, cin, width_ * 4, 1, stride, relu=False) if i == 0 else x
            b.nodes.append(helper.make_node("Add", [y, short], [f"{pre}.add"], name=f"{pre}.add"))
            b.nodes.append(helper.make_node("Relu", [f"{pre}.add"], [f"{pre}.out"], name=f"{pre}.relu"))
            x, cin = f"{pre}.out", width_ * 4
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    b.weight("fc.weight", (1000, cin))
    b.inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias"))
    b.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1))
    return b.model("resnet50", ("input", [1, 3, 224, 224]), ("output", [1, 1000]))


def wide_convnet(path: str, channels: int = 2048, layers: int = 15, seed: int = 1) -> onnx.ModelProto:
    """``layers`` x (Conv 3x3 ``channels``->``channels`` + BN + Relu) with external data next to ``path``."""
    b = _Builder(seed, data_file=path + ".data")
    x = "input"
    for i in range(layers):
        x = b.conv_bn(f"block{i}", x, channels, channels, 3)
    b.nodes.append(helper.make_node("Identity", [x], ["output"], name="out"))
    return b.model("convnet", ("input", [1, channels, 4, 4]), ("output", [1, channels, 4, 4]))


def build(name: str, folder: str) -> str:
    """Write built model ``name`` into ``folder``; return the model path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    if name == "resnet50-w0.25":
        onnx.save(resnet50(0.25), path)
    elif name == "resnet50":
        onnx.save(resnet50(1.0), path)
    elif name == "resnet50-ext":
        onnx.save(resnet50(1.0), path, save_as_external_data=True, location="model.onnx.data")
    elif name == "convnet-2g3":
        onnx.save(wide_convnet(path), path)
    else:
        raise SystemExit(f"unknown model {name}")
    return path


BUILT = ["resnet50-w0.25", "resnet50", "resnet50-ext", "convnet-2g3"]

# ---------------------------------------------------------------------------
# Running tools
# ---------------------------------------------------------------------------

# Runs one command and reports its wall time and peak RSS.  It is a fresh, small process,
# so the child's ru_maxrss is its own (a child forked from the big bench process would
# start with the bench's RSS: ru_maxrss survives exec).
WRAP = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
tail = (p.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:120]
print(json.dumps({"wall": wall, "rss": rss, "code": p.returncode, "tail": tail}))
"""

FLOOR = """
import os, sys, onnx
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = onnx.load(src)
if ext:
    onnx.save(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(dst) + ".data")
else:
    onnx.save(m, dst)
"""

# The console script's own code path (``bnfold`` = ``from bnfold.cli import main; main()``).
BNFOLD = "import sys; from bnfold.cli import main; sys.argv[0] = 'bnfold'; sys.exit(main())"

# ``cp`` of the model and its data files, then ``sync``: the disk floor of a model with external data.
COPY = """
import os, shutil, subprocess, sys, onnx
src, dst = sys.argv[1], sys.argv[2]
m = onnx.load(src, load_external_data=False)
locs = {e.value for t in onnx.external_data_helper._get_all_tensors(m) for e in t.external_data if e.key == "location"}
files = [src] + [os.path.join(os.path.dirname(src), loc) for loc in locs]
subprocess.run(["cp", *files, os.path.dirname(dst)], check=True)
subprocess.run(["sync"], check=True)
"""

LATENCY = """
import json, sys, time
import numpy as np, onnxruntime as ort
level, budget, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
so.log_severity_level = 3
# Idle sessions must not spin their threads while the other one runs.
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.add_session_config_entry("session.inter_op.allow_spinning", "0")
sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in paths]
rng = np.random.default_rng(0)
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(types[i.type])
         for i in sessions[0].get_inputs()}
for s in sessions:
    s.run(None, feeds)
    s.run(None, feeds)
times, start = [[] for _ in sessions], time.perf_counter()
while len(times[0]) < 5 or (time.perf_counter() - start < budget and len(times[0]) < 100):
    for s, ts in zip(sessions, times):  # interleaved: both see the same machine load
        t = time.perf_counter(); s.run(None, feeds); ts.append(time.perf_counter() - t)
print(json.dumps([min(ts) for ts in times]))
"""


@dataclass
class Run:
    """Best wall time and largest peak RSS over the runs of one tool on one model."""

    wall: float = float("inf")
    rss: int = 0  # bytes
    error: str = ""
    runs: int = 0


@dataclass
class Row:
    name: str
    size: int
    bn: int
    external: bool
    tools: dict[str, Run] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # "DISABLE_ALL/original" -> seconds
    folded_size: int = 0


def peers_installed() -> dict[str, bool]:
    return {p: importlib.util.find_spec(p) is not None for p in ("onnxoptimizer", "onnxsim", "onnxslim")}


def command(tool: str, src: str, dst: str, external: bool) -> list[str]:
    py = sys.executable
    if tool == "floor":
        return [py, "-c", FLOOR, src, dst, "1" if external else "0"]
    if tool == "bnfold":
        return [py, "-c", BNFOLD, "fold", src, "-o", dst, "--no-verify"]
    if tool == "copy":
        return [py, "-c", COPY, src, dst]
    if tool == "onnxoptimizer":
        return [py, "-m", "onnxoptimizer", src, dst, "-p", "fuse_bn_into_conv"]
    if tool == "onnxsim":
        code = "import sys; from onnxsim import main; sys.argv[0] = 'onnxsim'; sys.exit(main())"
        extra = ["--save-as-external-data"] if external else ["--external-data-threshold", "2GB"]
        return [py, "-c", code, src, dst, "0", "--no-certify", *extra]
    if tool == "onnxslim":
        code = "import sys; from onnxslim.cli import main; sys.argv[0] = 'onnxslim'; sys.exit(main())"
        return [py, "-c", code, src, dst, *(["--save-as-external-data"] if external else [])]
    raise ValueError(tool)


def run_once(cmd: list[str], timeout: float) -> tuple[float, int, int, str]:
    """Run ``cmd``; return wall seconds, peak RSS in bytes, exit status and the end of its stderr."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        r = json.loads(out.stdout)
    except subprocess.TimeoutExpired:
        return timeout, 0, -9, "timeout"
    except ValueError:
        return 0.0, 0, -1, (out.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return r["wall"], r["rss"], r["code"], r["tail"]


def files_size(path: str) -> int:
    """Model file plus every file its external tensors point at."""
    return sum(os.path.getsize(f) for f in model_files(path))


def latency(paths: list[str], level: str, budget: float) -> list[float]:
    """Best run time of each model, the runs of all models interleaved in one process."""
    out = subprocess.run(
        [sys.executable, "-c", LATENCY, level, str(budget), *paths], capture_output=True, text=True, check=False
    )
    if out.returncode:
        return [float("nan")] * len(paths)
    return json.loads(out.stdout)


def _settle(files: list[str] | None) -> None:
    """Start every timed run alike: nothing left to write back, ``files`` read into the page cache.

    Without it a run pays for the previous run's writeback (``sync``), and a model over
    2 GB may have been partly evicted between runs.
    """
    os.sync()
    for f in files or ():
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def model_files(path: str) -> list[str]:
    """The model file and the data files its external tensors name."""
    m = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(path))
    locs = {
        e.value for t in onnx.external_data_helper._get_all_tensors(m) for e in t.external_data if e.key == "location"
    }
    return [path, *(os.path.join(folder, loc) for loc in sorted(locs))]


def bench_model(label: str, path: str, tools: list[str], repeat: int, timeout: float, budget: float) -> Row:
    m = onnx.load(path, load_external_data=False)
    external = any(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)
    row = Row(label, files_size(path), sum(n.op_type == "BatchNormalization" for n in m.graph.node), external)
    del m
    outs = os.path.join(os.path.dirname(os.path.abspath(path)), "out")
    big = row.size > (1 << 31)
    warm = model_files(path) if big else None  # over 2 GB: read into the page cache before each run
    if external:
        tools = [*tools, "copy"]  # the disk floor: cp of its files + sync
    for tool in tools:
        row.tools[tool] = Run()
    for k in range(repeat):
        for tool in tools:
            r = row.tools[tool]
            if r.error or (big and k and tool not in ("floor", "bnfold", "copy")):
                continue  # over 2 GB the peers run once (minutes each)
            _settle(warm)
            folder = os.path.join(outs, tool)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            dst = os.path.join(folder, "model.onnx")
            wall, rss, code, tail = run_once(command(tool, path, dst, external), timeout)
            if code != 0 or not os.path.exists(dst):
                r.error = tail or f"exit {code}"
            else:
                r.wall, r.rss, r.runs = min(r.wall, wall), max(r.rss, rss), r.runs + 1
            if tool == "bnfold" and not r.error:
                row.folded_size = files_size(dst)
            else:
                shutil.rmtree(folder, ignore_errors=True)
    folded = os.path.join(outs, "bnfold", "model.onnx")
    if os.path.exists(folded):
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            # Twice, in both orders; the best of each (the machine may be shared).
            a = latency([path, folded], level, budget / 2)
            b = latency([folded, path], level, budget / 2)
            row.latency[f"{level}/original"] = min(a[0], b[1])
            row.latency[f"{level}/folded"] = min(a[1], b[0])
    shutil.rmtree(outs, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def table(rows: list[Row], tools: list[str]) -> str:
    peers = [t for t in tools if t not in ("floor", "bnfold", "copy")]
    head = ["model", "size", "BN", "I/O floor", "bnfold (x floor)"]
    head += [f"{p} (bnfold/{p})" for p in peers]
    head += ["ORT DISABLE_ALL orig -> folded", "ORT ENABLE_ALL orig -> folded", "file orig -> folded"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        floor, bn = r.tools["floor"], r.tools["bnfold"]

        def cell(run: Run, ref: Run | None, inverse: bool = False) -> str:
            if run.error:
                return f"failed: {run.error[:60]}"
            txt = f"{run.wall:.2f} s, {_mb(run.rss)}"
            if ref is not None and not ref.error:
                if inverse:
                    txt += f" ({ref.wall / run.wall:.2f}x, {ref.rss / run.rss:.2f}x)"
                else:
                    txt += f" ({run.wall / ref.wall:.2f}x, {run.rss / ref.rss:.2f}x)"
            return txt

        cells = [r.name + (" (ext)" if r.external else ""), _mb(r.size), str(r.bn), cell(floor, None)]
        cells.append(cell(bn, floor))
        cells += [cell(r.tools[p], bn, inverse=True) for p in peers]
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            a, b = r.latency.get(f"{level}/original"), r.latency.get(f"{level}/folded")
            cells.append("n/a" if a is None or b is None else f"{a * 1e3:.1f} -> {b * 1e3:.1f} ms")
        cells.append(f"{_mb(r.size)} -> {_mb(r.folded_size)}" if r.folded_size else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Goals: start-up, verification cost, scaling
# ---------------------------------------------------------------------------


def best_wall(cmd: list[str], repeat: int, timeout: float, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Best wall time of ``cmd`` over ``repeat`` fresh runs, and the error of a failed run."""
    best = float("inf")
    for _ in range(repeat):
        wall, _rss, code, tail = run_once(cmd, timeout)
        if code not in ok:
            return float("nan"), tail or f"exit {code}"
        best = min(best, wall)
    return best, ""


def startup(repeat: int, timeout: float) -> list[tuple[str, float, float]]:
    """(what, seconds, ratio to ``import click``) for ``bnfold --help`` and ``--version``."""
    py = sys.executable
    floor, _ = best_wall([py, "-c", "import click"], repeat, timeout)
    out = [("python -c 'import click'", floor, 1.0)]
    for arg in ("--help", "--version"):
        wall, _ = best_wall([py, "-c", BNFOLD, arg], repeat, timeout)
        out.append((f"bnfold {arg}", wall, wall / floor))
    return out


# Two bare onnxruntime sessions (original at ORT_DISABLE_ALL, folded at the default level)
# with the same runs as bnfold's verification: import, session creation and runs, timed
# from before ``import onnxruntime`` as bnfold's ``timings.verify`` is.
BARE_VERIFY = """
import json, sys, time
t = time.perf_counter()
import numpy as np, onnxruntime as ort
orig, folded, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
ref = ort.SessionOptions()
ref.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
a = ort.InferenceSession(orig, ref, providers=["CPUExecutionProvider"])
b = ort.InferenceSession(folded, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
for _ in range(trials):
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(types[i.type])
             for i in a.get_inputs()}
    a.run(None, feeds)
    b.run(None, feeds)
print(json.dumps(time.perf_counter() - t))
"""


def verification_cost(path: str, work: str, repeat: int, timeout: float) -> tuple[float, float, int]:
    """(bnfold's ``timings.verify``, the bare sessions' time, trials), best of ``repeat``."""
    from bnfold.verify.inputs import DEFAULT_TRIALS

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = os.path.join(work, "verified.onnx")
    ours, bare = float("inf"), float("inf")
    for _ in range(repeat):
        p = subprocess.run(
            [sys.executable, "-c", BNFOLD, "fold", path, "-o", out, "--force", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        try:
            ours = min(ours, float(json.loads(p.stdout)["models"][0]["timings"]["verify"]))
        except (ValueError, KeyError, IndexError, TypeError):
            return float("nan"), float("nan"), DEFAULT_TRIALS
        q = subprocess.run(
            [sys.executable, "-c", BARE_VERIFY, path, out, str(DEFAULT_TRIALS)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        bare = min(bare, float(json.loads(q.stdout)) if q.returncode == 0 else float("nan"))
    return ours, bare, DEFAULT_TRIALS


def _graph(nodes: list, inits: list, inputs: list, outputs: list) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "scale", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-bench")
    m.ir_version = IR_VERSION
    return m


def _bn_inits(prefix: str, c: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    vals = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)]
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for v, k in zip(vals, BN_KEYS, strict=True)]


BN_KEYS = ("scale", "bias", "mean", "var")


def scaling_model(kind: str, n: int, seed: int = 0) -> onnx.ModelProto:
    """A generated graph of about ``n`` nodes for the scaling table."""
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT
    c = 2
    nodes, inits = [], []
    if kind == "chain":  # Conv 1x1 + BN + Relu, repeated: n nodes, n/3 folds
        x = "x"
        for i in range(n // 3):
            w = numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.5).astype(np.float32), f"w{i}")
            inits += [w, *_bn_inits(f"bn{i}", c, rng)]
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [f"c{i}", *[f"bn{i}.{k}" for k in BN_KEYS]], [f"b{i}"], name=f"bn{i}"
                )
            )
            nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
        return _graph(
            nodes,
            inits,
            [helper.make_tensor_value_info("x", f, [1, c, 2, 2])],
            [helper.make_tensor_value_info("y", f, [1, c, 2, 2])],
        )
    if kind == "fan-out":  # one Conv output read by n Muls, summed
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], name="conv"))
        for i in range(n):
            inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32), f"m{i}"))
            nodes.append(helper.make_node("Mul", ["c", f"m{i}"], [f"p{i}"], name=f"mul{i}"))
        nodes.append(helper.make_node("Sum", [f"p{i}" for i in range(n)], ["y"], name="sum"))
        return _graph(
            nodes,
            inits,
            [helper.make_tensor_value_info("x", f, [1, c, 2, 2])],
            [helper.make_tensor_value_info("y", f, [1, c, 2, 2])],
        )
    if kind == "mul-chain":  # Mul by a scalar, n times, on a tensor of unknown rank
        # Squeeze by axes computed at run time (always [0]): shape inference cannot know the rank.
        inits += [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("zero", 0), ("one", 1))]
        nodes += [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("Slice", ["shape", "zero", "one"], ["dim0"], name="slice"),
            helper.make_node("Sub", ["dim0", "dim0"], ["axes"], name="axes"),
            helper.make_node("Squeeze", ["x", "axes"], ["m"], name="squeeze"),
        ]
        x = "m"
        for i in range(n):
            inits.append(numpy_helper.from_array(np.array(1.0 + 1e-3 * rng.standard_normal(), np.float32), f"k{i}"))
            nodes.append(helper.make_node("Mul", [x, f"k{i}"], [f"m{i}"], name=f"mul{i}"))
            x = f"m{i}"
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
        y = helper.make_tensor_value_info("y", f, [c])  # graph outputs need a shape; the chain has none
        return _graph(nodes, inits, [helper.make_tensor_value_info("x", f, [1, c])], [y])
    if kind == "inputs":  # n graph inputs, each through a Relu into a Sum
        ins = [helper.make_tensor_value_info(f"x{i}", f, [1, c]) for i in range(n)]
        nodes = [helper.make_node("Relu", [f"x{i}"], [f"r{i}"], name=f"relu{i}") for i in range(n)]
        nodes.append(helper.make_node("Sum", [f"r{i}" for i in range(n)], ["y"], name="sum"))
        return _graph(nodes, [], ins, [helper.make_tensor_value_info("y", f, [1, c])])
    raise ValueError(kind)


SCALING = ("chain", "fan-out", "mul-chain", "inputs")


def scaling(sizes: list[int], work: str, timeout: float) -> list[tuple[str, int, float, float, float]]:
    """(kind, n, check, fold without and with verification, in seconds) for every kind and size."""
    rows = []
    for kind in SCALING:
        for n in sizes:
            path = os.path.join(work, f"{kind}-{n}.onnx")
            onnx.save(scaling_model(kind, n), path)
            py = sys.executable
            # check exits 1 when something is foldable: a result, not a failure
            check, _ = best_wall([py, "-c", BNFOLD, "check", path, "-q"], 1, timeout, ok=(0, 1))
            out = [py, "-c", BNFOLD, "fold", path, "-o", path + ".out.onnx", "--force", "-q"]
            bare, _ = best_wall([*out, "--no-verify"], 1, timeout)
            fold, _ = best_wall(out, 1, timeout)
            rows.append((kind, n, check, bare, fold))
            for p in (path, path + ".out.onnx"):
                with contextlib.suppress(OSError):
                    os.remove(p)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=BUILT, help="built model names or paths to .onnx files")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (best is kept); 1 for models over 2 GB")
    ap.add_argument("--workdir", help="where models and outputs go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per tool run")
    ap.add_argument("--latency-budget", type=float, default=4.0, help="seconds of onnxruntime runs per measure")
    ap.add_argument("--no-goals", action="store_true", help="only the model table: no start-up, verification, scaling")
    ap.add_argument(
        "--scale-sizes", type=int, nargs="+", default=[25000, 50000, 100000], help="node counts of the scaling table"
    )
    args = ap.parse_args()
    # bnfold runs from this checkout: compile it once, as installing it does (with
    # PYTHONDONTWRITEBYTECODE set every run would compile it again, ~60 ms).
    compileall.compile_dir(os.path.join(ROOT, "bnfold"), quiet=1)

    installed = peers_installed()
    tools = ["floor", "bnfold"] + [p for p, ok in installed.items() if ok]
    work = args.workdir or tempfile.mkdtemp(prefix="bnfold-bench-")
    rows = []
    try:
        for name in args.models:
            folder = os.path.join(work, os.path.basename(name).replace(".onnx", ""))
            if name in BUILT:
                print(f"building {name} ...", file=sys.stderr, flush=True)
                path = build(name, folder)
            else:
                src = os.path.abspath(name)
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, "model.onnx")
                shutil.copy(src, path)
                m = onnx.load(src, load_external_data=False)
                for t in onnx.external_data_helper._get_all_tensors(m):
                    for e in t.external_data:
                        if e.key == "location" and not os.path.exists(os.path.join(folder, e.value)):
                            shutil.copy(os.path.join(os.path.dirname(src), e.value), os.path.join(folder, e.value))
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, path, tools, args.repeat, args.timeout, args.latency_budget))
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    import onnxruntime

    versions = [f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for p, ok in installed.items():
        if ok:
            versions.append(f"{p} {_version(p)}")
    print(
        f"Times: best of {args.repeat} runs (peers run once over 2 GB), each a fresh process after `sync` "
        "(over 2 GB with the input read into the page cache first); RSS: peak of the child; "
        "(a, b) = (time, RSS) ratios. Latency: best onnxruntime run, CPU."
    )
    print("Versions: " + ", ".join(versions) + f"; {os.cpu_count()} cores")
    for p, ok in installed.items():
        if not ok:
            print(f"Note: {p} is not installed: skipped.")
    print()
    print(table(rows, tools))
    if args.no_goals:
        return
    print()
    print(goals(rows, args, work_root=args.workdir))


def goals(rows: list[Row], args: argparse.Namespace, work_root: str | None) -> str:
    """The speed goals as ratios measured in this run, then the scaling table."""
    work = tempfile.mkdtemp(prefix="bnfold-goals-", dir=work_root)
    lines = ["| goal | measured | ratio | target |", "|---|---|---|---|"]
    try:
        print("measuring start-up ...", file=sys.stderr, flush=True)
        st = startup(max(args.repeat, 5), args.timeout)
        floor = st[0][1]
        for what, wall, ratio in st[1:]:
            lines.append(
                f"| {what} vs `python -c 'import click'` | {wall:.3f} s vs {floor:.3f} s | {ratio:.2f}x | <= 2x |"
            )
        by = {r.name: r for r in rows}
        r = by.get("resnet50")
        if r and not r.tools["bnfold"].error:
            a, f = r.tools["bnfold"], r.tools["floor"]
            lines.append(
                f"| resnet50 `fold --no-verify` vs load+save | {a.wall:.3f} s vs {f.wall:.3f} s "
                f"| {a.wall / f.wall:.2f}x | <= 1.05x |"
            )
        r = by.get("convnet-2g3")
        if r and not r.tools["bnfold"].error and "copy" in r.tools:
            a, c = r.tools["bnfold"], r.tools["copy"]
            vs = f"{a.wall:.2f} s vs {c.wall:.2f} s"
            lines.append(f"| convnet-2g3 fold vs `cp` + `sync` | {vs} | {a.wall / c.wall:.2f}x | <= 1.5x |")
            vs = f"{_mb(a.rss)} vs {_mb(r.size)}"
            lines.append(f"| convnet-2g3 peak RSS vs model size | {vs} | {a.rss / r.size:.2f}x | < 0.2x |")
        print("measuring verification ...", file=sys.stderr, flush=True)
        model = build("resnet50", os.path.join(work, "verify"))
        ours, bare, trials = verification_cost(model, os.path.join(work, "verify"), args.repeat, args.timeout)
        lines.append(
            f"| resnet50 verification vs two bare sessions, {trials} runs each | {ours:.3f} s vs {bare:.3f} s "
            f"| {ours / bare:.2f}x | <= 1.1x |"
        )
        shutil.rmtree(os.path.join(work, "verify"), ignore_errors=True)
        print("measuring scaling ...", file=sys.stderr, flush=True)
        sc = scaling(sorted(args.scale_sizes), work, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = [
        "Goals (this run):",
        "",
        *lines,
        "",
        "Scaling (one run each; growth = time at 2N / time at N, linear is 2x):",
        "",
    ]
    out += [
        "| graph | N | check | growth | fold --no-verify | growth | fold + verify | growth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    prev: dict[str, tuple[int, float, float, float]] = {}
    for kind, n, check, bare, fold in sc:
        g = ["", "", ""]
        if kind in prev:
            pn, *before = prev[kind]
            k = np.log2(n / pn)  # growth normalized to one doubling
            g = [f"{(now / was) ** (1 / k):.2f}x" for now, was in zip((check, bare, fold), before, strict=True)]
        prev[kind] = (n, check, bare, fold)
        out.append(f"| {kind} | {n:,} | {check:.2f} s | {g[0]} | {bare:.2f} s | {g[1]} | {fold:.2f} s | {g[2]} |")
    return "\n".join(out)


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
