"""Build the torch / timm fixtures for the issue-11 folds with the real exporters.

Needs torch, torchvision, timm, onnx and onnxscript (not project dependencies; CI
uses the committed files).  Every model is seeded, in eval mode, with random BN
gammas, betas and running statistics, so a wrong fold shows.  Files:

``tests/fixtures/timm/``
  ``levit_128s_tiny_ts17.onnx``, ``efficientvit_m0_tiny_ts17.onnx``: timm's
  ``levit_128s`` and ``efficientvit_m0`` (pretrained=False) cut down to a few
  channels and one block per stage (the full nets are 31 MB and 9 MB), 64x64
  input, TorchScript exporter, opset 17 (attention biases randomized too).  The
  exporter fuses every Conv+BN itself; what stays is "Linear + BatchNorm1d" on
  tokens, ``MatMul -> Flatten -> BatchNormalization -> Reshape`` (LeViT), and the
  heads' ``... -> BatchNormalization -> (Flatten) -> Gemm`` (both).
``tests/fixtures/frozen_bn/``
  ``frozen_bn_block_dynamo.onnx``: a ResNet basic block with torchvision's
  ``FrozenBatchNorm2d``, raw dynamo export (``dynamo=True, optimize=False``,
  opset 18): each frozen BN is ``Conv -> Mul(m) -> Add(a)`` with
  ``m = Mul(Reshape(w), Rsqrt(Add(Reshape(var), eps)))`` written as
  ``Reciprocal(Sqrt(...))`` and ``a = Sub(Reshape(b), Mul(Reshape(mean), m))``.
  ``frozen_bn_block_ts17.onnx``: the same block, TorchScript exporter with
  ``do_constant_folding=False`` (the chain is kept as computed constants).

    pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxscript   # in a separate venv
    python scripts/make_exporter_fixtures.py [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

SEED = 11


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Random affine parameters and running statistics for every BN (and FrozenBatchNorm2d)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | FrozenBatchNorm2d):
            c = m.running_mean.shape
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    for name, p in model.named_parameters():
        if "attention_biases" in name:  # zeros at init: a trained net's are not
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


class FrozenBlock(nn.Module):
    """ResNet basic block with FrozenBatchNorm2d (as detectron2 and torchvision detection use)."""

    def __init__(self, cin: int = 3, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(c)
        self.down = nn.Conv2d(cin, c, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.bn3(self.down(x)))


def tiny_timm(name: str) -> nn.Module:
    """timm model ``name`` (pretrained=False) with a few channels and one block per stage."""
    if name == "levit_128s":
        kw = dict(embed_dim=(24, 32, 48), key_dim=8, num_heads=(2, 2, 2), depth=(1, 1, 1), img_size=64)
    else:
        kw = dict(
            embed_dim=(16, 24, 32),
            key_dim=(4, 4, 4),
            num_heads=(2, 2, 2),
            depth=(1, 1, 1),
            window_size=(4, 4, 4),
            img_size=64,
        )
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def export_ts(model: nn.Module, x: torch.Tensor, path: str, **kw) -> None:
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"], **kw)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures"))
    args = ap.parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    timm_dir = os.path.join(args.out, "timm")
    frozen_dir = os.path.join(args.out, "frozen_bn")
    os.makedirs(timm_dir, exist_ok=True)
    os.makedirs(frozen_dir, exist_ok=True)
    for name in ("levit_128s", "efficientvit_m0"):
        m = tiny_timm(name).eval()
        randomize_bn(m, gen)
        export_ts(m, torch.randn(1, 3, 64, 64), os.path.join(timm_dir, f"{name}_tiny_ts17.onnx"))
    block = FrozenBlock().eval()
    randomize_bn(block, gen)
    x = torch.randn(1, 3, 16, 16)
    path = os.path.join(frozen_dir, "frozen_bn_block_dynamo.onnx")
    torch.onnx.export(
        block,
        (x,),
        path,
        dynamo=True,
        optimize=False,
        opset_version=18,
        input_names=["x"],
        output_names=["y"],
        external_data=False,
    )
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    export_ts(block, x, os.path.join(frozen_dir, "frozen_bn_block_ts17.onnx"), do_constant_folding=False)


if __name__ == "__main__":
    main()
