"""Export small, seeded PyTorch nets with BatchNormalization to ONNX (the fixtures in ``tests/fixtures/torch/``).

Needs torch (not a bnfold dependency; CI never runs this script, it uses the committed files):

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 onnx onnxscript numpy
    /work/venv-torch/bin/python scripts/make_torch_models.py [--out tests/fixtures/torch]

Every net is built from a fixed seed, its BN layers get trained-looking parameters
(gamma/beta drawn at random, running statistics calibrated in train mode on a few
batches of shifted, scaled inputs), then it is put in ``eval()`` mode and exported with

- the TorchScript exporter (``dynamo=False``, ``do_constant_folding=False``,
  ``training=TrainingMode.EVAL``: BN nodes stay) at opsets 11 and 17, and
- the dynamo exporter with ``optimize=False`` (the raw graph: a bias-free Conv gets a
  zero bias computed by ``Shape(weight) -> Expand -> CastLike(0, x) -> Expand``).

One net is also exported as float16 with both exporters: all float16 (``model.half()``),
and float16 with float32 BN parameters (BatchNormalization-15 allows that; PyTorch's
mixed-precision BN).
The script writes ``README.md`` next to the models with the table of what was made.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import warnings

import onnx
import torch
from torch import nn

TS_OPSETS = (11, 17)
CALIBRATION_BATCHES = 4


class ResNetStage(nn.Module):
    """Stem, a ResNet basic block, a downsampling block (grouped, depthwise, pointwise Convs and a
    1x1 stride-2 shortcut), a dilated Conv with bias, then pooling and Linear + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=4, bias=True)
        self.grouped_bn = nn.BatchNorm2d(24)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(24)
        self.pointwise = nn.Conv2d(24, 32, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(32)
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(32)
        self.dilated = nn.Conv2d(32, 16, 3, padding=2, dilation=2, bias=True)
        self.dilated_bn = nn.BatchNorm2d(16, eps=1e-3)
        self.fc = nn.Linear(16, 10)
        self.fc_bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        y = torch.relu(self.grouped_bn(self.grouped(x)))
        y = torch.relu(self.depthwise_bn(self.depthwise(y)))
        y = self.pointwise_bn(self.pointwise(y))
        x = torch.relu(y + self.shortcut_bn(self.shortcut(x)))
        x = torch.relu(self.dilated_bn(self.dilated(x)))
        x = torch.flatten(torch.mean(x, dim=(2, 3)), 1)
        return self.fc_bn(self.fc(x))


class PreActivation(nn.Module):
    """BNs that sit *before* Convs (pre-activation ResNets, DenseNets) and one after a shared Conv output.

    ``in_bn`` (on the graph input) feeds a 1x1 Conv that pads nothing: it folds forward.
    ``mid_bn`` (after a ReLU) feeds a padded 3x3 Conv: left, ``padded_consumer``.
    ``valid_bn`` (after a ReLU) feeds an unpadded 3x3 Conv: it folds forward.
    ``side_bn`` normalizes a Conv output that is also added back unnormalized:
    left, ``producer_output_shared``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_bn = nn.BatchNorm2d(3)
        self.proj = nn.Conv2d(3, 16, 1, bias=False)
        self.mid_bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.valid_bn = nn.BatchNorm2d(16)
        self.valid = nn.Conv2d(16, 8, 3, padding=0, bias=False)
        self.side = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.side_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.in_bn(x))
        x = self.conv(self.mid_bn(torch.relu(x)))
        x = self.valid(self.valid_bn(torch.relu(x)))
        y = self.side(x)
        return y + self.side_bn(y)


class Decoder(nn.Module):
    """Conv + BN, then ConvTranspose2d + BN (square, no bias) and grouped ConvTranspose2d + BN (Cin != Cout)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(16)
        self.up1 = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, bias=False)
        self.up1_bn = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 12, 3, stride=2, padding=1, output_padding=1, groups=4, bias=True)
        self.up2_bn = nn.BatchNorm2d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.down_bn(self.down(x)))
        x = torch.relu(self.up1_bn(self.up1(x)))
        return self.up2_bn(self.up2(x))


class Mlp(nn.Module):
    """Linear + BatchNorm1d + ReLU twice (with and without bias), then a plain Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.bn1 = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 48, bias=False)
        self.bn2 = nn.BatchNorm1d(48)
        self.out = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        x = torch.relu(self.bn2(self.fc2(x)))
        return self.out(x)


class Tcn(nn.Module):
    """1-D: Conv1d + BatchNorm1d (no bias; dilated and grouped with bias; pointwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, groups=4, bias=True)
        self.bn2 = nn.BatchNorm1d(16)
        self.conv3 = nn.Conv1d(16, 8, 1, bias=True)
        self.bn3 = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


# name -> (net class, seed, input shape, export a float16 copy too)
NETS: dict[str, tuple[type[nn.Module], int, tuple[int, ...], bool]] = {
    "resnet_stage": (ResNetStage, 1, (1, 3, 32, 32), True),
    "preact": (PreActivation, 2, (1, 3, 16, 16), False),
    "decoder": (Decoder, 3, (1, 8, 16, 16), False),
    "mlp": (Mlp, 4, (2, 32), False),
    "tcn": (Tcn, 5, (1, 4, 64), False),
}


def build(cls: type[nn.Module], seed: int, shape: tuple[int, ...]) -> nn.Module:
    """The net with trained-looking BN parameters and calibrated running statistics, in eval mode."""
    torch.manual_seed(seed)
    net = cls()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.weight.copy_(torch.empty(c).uniform_(0.4, 1.6) * torch.where(torch.rand(c) < 0.1, -1.0, 1.0))
            bn.bias.copy_(torch.randn(c) * 0.3)
            bn.momentum = None  # cumulative average: running stats = mean of the batch statistics
        net.train()
        batch = (8, *shape[1:])
        shift = torch.randn(1, shape[1], *([1] * (len(shape) - 2))) * 0.5
        for _ in range(CALIBRATION_BATCHES):
            net(torch.randn(batch) * 1.5 + shift)
    return net.eval()


def export_torchscript(net: nn.Module, x: torch.Tensor, path: str, opset: int, dynamic_batch: bool) -> None:
    """The legacy TorchScript exporter, BN kept (no constant folding, eval mode)."""
    axes = {"input": {0: "N"}, "output": {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            path,
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
        )


def export_dynamo(net: nn.Module, x: torch.Tensor, path: str) -> int:
    """The dynamo (torch.export) exporter, raw graph (``optimize=False``); returns the opset.

    Node metadata ``pkg.torch.onnx.stack_trace`` is dropped (local paths, line numbers);
    the rest of the export is written as the exporter made it.
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(net, (x,), dynamo=True, optimize=False, input_names=["input"], output_names=["output"])
        prog.save(path)
    model = onnx.load(path)
    for node in model.graph.node:
        # Python stack traces hold this machine's paths and the script's line numbers.
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(model, path)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def summary(path: str) -> dict:
    """Facts about an exported file for the README table."""
    m = onnx.load(path)
    ops = [n.op_type for n in m.graph.node]
    return {
        "file": os.path.basename(path),
        "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        "ir": m.ir_version,
        "bn": ops.count("BatchNormalization"),
        "nodes": len(ops),
        "kb": os.path.getsize(path) / 1024,
    }


def export_all(out: str) -> list[dict]:
    """Export every net with every exporter into ``out``; return one summary row per file."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for name, (cls, seed, shape, fp16) in NETS.items():
        net = build(cls, seed, shape)
        torch.manual_seed(seed)
        x = torch.randn(shape)
        for opset in TS_OPSETS:
            path = os.path.join(out, f"{name}_ts{opset}.onnx")
            export_torchscript(net, x, path, opset, dynamic_batch=opset >= 17)
            rows.append({**summary(path), "exporter": "TorchScript", "dtype": "float32"})
        path = os.path.join(out, f"{name}_dynamo.onnx")
        export_dynamo(net, x, path)
        rows.append({**summary(path), "exporter": "dynamo, optimize=False", "dtype": "float32"})
        if fp16:
            for tag, half, dtype in (
                ("fp16", copy.deepcopy(net).half(), "float16"),
                ("fp16bn32", half_except_bn(net), "float16, BN parameters float32"),
            ):
                path = os.path.join(out, f"{name}_{tag}_ts17.onnx")
                export_torchscript(half, x.half(), path, 17, dynamic_batch=True)
                rows.append({**summary(path), "exporter": "TorchScript", "dtype": dtype})
                path = os.path.join(out, f"{name}_{tag}_dynamo.onnx")
                export_dynamo(half, x.half(), path)
                rows.append({**summary(path), "exporter": "dynamo, optimize=False", "dtype": dtype})
    return rows


def half_except_bn(net: nn.Module) -> nn.Module:
    """A float16 copy of ``net`` whose BN layers keep float32 parameters (BatchNormalization-15 T1/T2)."""
    half = copy.deepcopy(net).half()
    for m in half.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.float()
    return half


def write_readme(out: str, rows: list[dict]) -> None:
    """``README.md`` next to the models: how they were made, one row per file."""
    versions = f"torch {torch.__version__}, onnx {onnx.__version__}, onnxscript {_version('onnxscript')}"
    lines = [
        "# PyTorch exports (test fixtures)",
        "",
        f"Made by `scripts/make_torch_models.py` ({versions}, CPU).",
        "The script is seeded and deterministic; CI does not run it (torch is no dependency of",
        "bnfold), `tests/test_real_exports.py` folds the committed files.",
        "",
        "Each net gets trained-looking BN parameters (gamma and beta drawn at random, running",
        f"statistics calibrated in train mode on {CALIBRATION_BATCHES} batches of shifted, scaled inputs),"
        " is put in `eval()`",
        "mode and exported with",
        "",
        "- **TorchScript** (legacy exporter): `torch.onnx.export(net, (x,), path, dynamo=False,",
        "  do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, opset_version=11 or 17)`.",
        "  BN nodes stay. Opset 17 files have a dynamic batch dimension `N`. A bias-free `nn.Linear`",
        "  becomes `MatMul(x, Transpose(W))`.",
        "- **dynamo, optimize=False**: `torch.onnx.export(net, (x,), dynamo=True, optimize=False)`, the",
        "  raw graph: every bias-free Conv reads a zero bias made by",
        "  `Shape(W, end=1) -> Expand -> CastLike(0, conv_input) -> Expand`. Node metadata",
        "  `pkg.torch.onnx.stack_trace` (local paths, line numbers) is removed; nothing else is changed.",
        "",
        "`resnet_stage` is also exported as float16 (`net.half()`) and as float16 with float32 BN",
        "parameters (`net.half()`, then `.float()` on the BN layers; BatchNormalization-15 allows it).",
        "",
        "The nets:",
        "",
    ]
    for name, (cls, seed, shape, _fp16) in NETS.items():
        doc = " ".join((cls.__doc__ or "").split()).replace("``", "`")
        lines.append(f"- `{name}` (`{cls.__name__}`, seed {seed}, input {list(shape)}): {doc}")
    lines += [
        "",
        "| file | exporter | dtype | opset | IR | BatchNormalization | nodes | size (KB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['exporter']} | {r['dtype']} | {r['opset']} | {r['ir']} | {r['bn']} "
            f"| {r['nodes']} | {r['kb']:.1f} |"
        )
    lines.append("")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except (ImportError, AttributeError):
        return "?"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "torch"))
    args = ap.parse_args()
    table = export_all(args.out)
    write_readme(args.out, table)
    for r in table:
        print(f"{r['file']:32} {r['exporter']:24} opset {r['opset']:2} BN {r['bn']:2} {r['kb']:7.1f} KB")
