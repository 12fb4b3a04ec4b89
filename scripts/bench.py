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
One markdown table is printed.
"""

from __future__ import annotations

import argparse
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
        return [py, "-m", "bnfold", "fold", src, "-o", dst, "--no-verify"]
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
    m = onnx.load(path, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(path))
    locs = {
        e.value
        for t in onnx.external_data_helper._get_all_tensors(m)
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, loc)) for loc in locs)


def latency(paths: list[str], level: str, budget: float) -> list[float]:
    """Best run time of each model, the runs of all models interleaved in one process."""
    out = subprocess.run(
        [sys.executable, "-c", LATENCY, level, str(budget), *paths], capture_output=True, text=True, check=False
    )
    if out.returncode:
        return [float("nan")] * len(paths)
    return json.loads(out.stdout)


def bench_model(label: str, path: str, tools: list[str], repeat: int, timeout: float, budget: float) -> Row:
    m = onnx.load(path, load_external_data=False)
    external = any(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)
    row = Row(label, files_size(path), sum(n.op_type == "BatchNormalization" for n in m.graph.node), external)
    del m
    outs = os.path.join(os.path.dirname(os.path.abspath(path)), "out")
    reps = 1 if row.size > (1 << 31) else repeat
    for tool in tools:
        row.tools[tool] = Run()
    for _ in range(reps):
        for tool in tools:
            r = row.tools[tool]
            if r.error:
                continue
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
    peers = [t for t in tools if t not in ("floor", "bnfold")]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=BUILT, help="built model names or paths to .onnx files")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (best is kept); 1 for models over 2 GB")
    ap.add_argument("--workdir", help="where models and outputs go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per tool run")
    ap.add_argument("--latency-budget", type=float, default=4.0, help="seconds of onnxruntime runs per measure")
    args = ap.parse_args()

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
        f"Times: best of {args.repeat} runs (1 over 2 GB), each a fresh process; RSS: peak of the child; "
        "(a, b) = (time, RSS) ratios. Latency: best onnxruntime run, CPU."
    )
    print("Versions: " + ", ".join(versions) + f"; {os.cpu_count()} cores")
    for p, ok in installed.items():
        if not ok:
            print(f"Note: {p} is not installed: skipped.")
    print()
    print(table(rows, tools))


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
