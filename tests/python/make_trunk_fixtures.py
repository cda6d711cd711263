#!/usr/bin/env python3
"""Writes the TorchScript trunks the C++ trunk tests load, into OUT_DIR.

convnet.pt: a scripted (not traced) CNN built from torch.nn modules, so its BatchNorm2d
layers really update their running statistics in training mode:
    stem   = Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU())
    blocks = ModuleList of 3 Block(conv: Conv2d(8, 8, 3), bn: BatchNorm2d(8), ReLU)
forward: stem, then each block; output [N, 8, H, W].
"""
import os
import sys

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8) for _ in range(3)])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    net = ConvNet().eval()
    # Non-trivial statistics, as a pretrained network has.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.jit.script(net).save(os.path.join(out_dir, "convnet.pt"))
    print(f"wrote {out_dir}/convnet.pt")


if __name__ == "__main__":
    main(sys.argv[1])
