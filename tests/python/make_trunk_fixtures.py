#!/usr/bin/env python3
"""Writes the TorchScript trunks the C++ trunk tests load, into OUT_DIR.

convnet.pt: a scripted (not traced) CNN built from torch.nn modules, so its BatchNorm2d
layers really update their running statistics in training mode:
    stem   = Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU())
    blocks = ModuleList of 3 Block(conv: Conv2d(8, 8, 3), bn: BatchNorm2d(8), ReLU)
forward: stem, then each block; output [N, 8, H, W].

dwnet.pt (scripted) and dwnet_traced.pt (traced): grouped convolutions, as MobileNets have:
    stem   = Sequential(Conv2d(3, 40, 3), BatchNorm2d(40), ReLU())
    blocks = 5 DwBlock(dw, bn, SiLU, pw: 1x1) whose dw is: a 5x5 depthwise convolution; a 3x3
             depthwise one, stride 2, with bias; a 3x3 one with 4 groups (grouped, not
             depthwise); a 5x5 depthwise one that pads with its ZeroPad2d(2) and convolves with
             no padding, as EfficientNet's Conv2dStaticSamePadding; the same with
             ZeroPad2d((1, 2, 1, 2)) and stride 2 (a pad not the same on both sides)

tvnet.pt (scripted) and tvnet_traced.pt (traced): written as torchvision writes its models:
    features   = Sequential(Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU()), 3 Block(8))
    avgpool    = AdaptiveAvgPool2d(1)
    classifier = Linear(8, 5)
forward hands its work to self._forward_impl: features, avgpool, flatten, classifier.

auxnet.pt (scripted) and auxnet_traced.pt (traced): laid out as torchvision's GoogLeNet, with an
auxiliary classifier that runs in training mode only, on an earlier block's output:
    stem = Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU()), b1 = Block(8),
    aux  = Sequential(AdaptiveAvgPool2d(1), Flatten(), Linear(8, 5)), b2, b3 = Block(8),
    drop = Identity()
forward: stem, b1, aux (training mode only), b2, drop, b3; scripted it returns (b3's output,
aux's or None), traced (in eval mode, so aux never runs and has no forward) b3's output; the
trace calls drop with nothing and gets None, as timm's traced models call their Identity.

masknet.pt (scripted): laid out as timm's ViT, whose forward(x, attn_mask=None, is_causal=False)
hands its work to forward_features and runs its blocks one by one when given a mask or
is_causal, else as one Sequential:
    stem = Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU()), blocks = Sequential(3 Block(8))

bertnet_traced.pt (traced): a text trunk laid out as Hugging Face's BERT is, (input_ids [N, T],
attention_mask [N, T]) -> [N, T, 16]:
    embeddings = Embedding(100, 16), times `scale` (a Parameter of the trunk itself, ones)
    encoder    = Encoder whose forward runs its ModuleList `layer` of 4 BertLayer(lin, norm)
    pooler     = Linear(16, 16), which forward does not call
bertwrap_traced.pt (traced): the same model returning (states, pooler(states[:, 0])), as a
traced Hugging Face model returns a tuple, inside a wrapper (`model`) that returns states.
"""
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    def __init__(self, stem=None, blocks=None):
        super().__init__()
        if stem is None:
            stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stem = stem
        self.blocks = nn.ModuleList([Block(8) for _ in range(3)]) if blocks is None else blocks

    def forward(self, x):
        x = self.stem(x)
        # A check on the stem's output, as torchvision's ViT encoder asserts the shape of its
        # input: scripted, it stays in every cut of the graph above it (tracing drops it).
        torch._assert(x.dim() == 4, "the blocks take [N, C, H, W]")
        for block in self.blocks:
            x = block(x)
        return x


class DwBlock(nn.Module):
    """dw (a grouped convolution), BatchNorm2d, SiLU, then a 1x1 convolution. SiLU is smooth:
    the tests compare gradients of two computations equal up to rounding, and ReLU's kink would
    turn a rounding difference at an input near 0 into a different gradient."""

    def __init__(self, c, dw):
        super().__init__()
        self.dw = dw
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        return self.pw(F.silu(self.bn(self.dw(x))))


class SamePadConv2d(nn.Conv2d):
    """A depthwise convolution that pads with its own nn.ZeroPad2d and then convolves with no
    padding, as EfficientNet's Conv2dStaticSamePadding computes "same" padding."""

    def __init__(self, c, k, stride, pad):
        super().__init__(c, c, k, stride=stride, groups=c, bias=False)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def dwnet():
    """ConvNet with dwnet.pt's stem and blocks (see the top of this file)."""
    stem = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU())
    blocks = [DwBlock(40, nn.Conv2d(40, 40, 5, padding=2, groups=40, bias=False)),
              DwBlock(40, nn.Conv2d(40, 40, 3, stride=2, padding=1, groups=40, bias=True)),
              DwBlock(40, nn.Conv2d(40, 40, 3, padding=1, groups=4, bias=False)),
              DwBlock(40, SamePadConv2d(40, 5, 1, 2)), DwBlock(40, SamePadConv2d(40, 5, 2, (1, 2, 1, 2)))]
    return ConvNet(stem, nn.ModuleList(blocks))


class TvNet(nn.Module):
    def __init__(self):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential(stem, Block(8), Block(8), Block(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, 5)

    def _forward_impl(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def forward(self, x):
        return self._forward_impl(x)


class AuxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = Block(8)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.b2 = Block(8)
        self.drop = nn.Identity()
        self.b3 = Block(8)

    def forward(self, x):
        x = self.b1(self.stem(x))
        aux: Optional[torch.Tensor] = None
        if self.training:
            aux = self.aux(x)
        x = self.b3(self.drop(self.b2(x)))
        if torch.jit.is_scripting():
            return x, aux
        return x


class MaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))

    def forward_features(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = self.stem(x)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x)
                if attn_mask is not None:
                    x = x * attn_mask
        else:
            x = self.blocks(x)
        return x

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.forward_features(x, attn_mask, is_causal)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, h, bias):
        return self.norm(h + torch.tanh(self.lin(h)) + bias)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer() for _ in range(4)])

    def forward(self, h, bias):
        for layer in self.layer:
            h = layer(h, bias)
        return h


class BertNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(100, 16)
        self.scale = nn.Parameter(torch.ones(16))  # outside every block, as a ViT's class token
        self.encoder = Encoder()
        self.pooler = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        bias = (1.0 - attention_mask.unsqueeze(-1).float()) * -0.5
        return self.encoder(self.embeddings(input_ids) * self.scale, bias)


class BertTuple(BertNet):
    def forward(self, input_ids, attention_mask):
        states = super().forward(input_ids, attention_mask)
        return states, torch.tanh(self.pooler(states[:, 0]))


class FirstOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)[0]


def with_statistics(net):
    """net in eval mode with non-trivial BatchNorm statistics, as a pretrained network has."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(with_statistics(ConvNet())).save(os.path.join(out_dir, "convnet.pt"))
    print(f"wrote {out_dir}/convnet.pt")
    dw = with_statistics(dwnet())
    torch.jit.script(dw).save(os.path.join(out_dir, "dwnet.pt"))
    torch.jit.trace(dw, torch.randn(2, 3, 12, 12)).save(os.path.join(out_dir, "dwnet_traced.pt"))
    print(f"wrote {out_dir}/dwnet.pt, {out_dir}/dwnet_traced.pt")
    tv = with_statistics(TvNet())
    torch.jit.script(tv).save(os.path.join(out_dir, "tvnet.pt"))
    torch.jit.trace(tv, torch.randn(2, 3, 12, 12)).save(os.path.join(out_dir, "tvnet_traced.pt"))
    print(f"wrote {out_dir}/tvnet.pt, {out_dir}/tvnet_traced.pt")
    aux = with_statistics(AuxNet())
    torch.jit.script(aux).save(os.path.join(out_dir, "auxnet.pt"))
    torch.jit.trace(aux, torch.randn(2, 3, 12, 12)).save(os.path.join(out_dir, "auxnet_traced.pt"))
    print(f"wrote {out_dir}/auxnet.pt, {out_dir}/auxnet_traced.pt")
    torch.jit.script(with_statistics(MaskNet())).save(os.path.join(out_dir, "masknet.pt"))
    print(f"wrote {out_dir}/masknet.pt")
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    torch.jit.trace(BertNet().eval(), (ids, mask)).save(os.path.join(out_dir, "bertnet_traced.pt"))
    print(f"wrote {out_dir}/bertnet_traced.pt")
    torch.jit.trace(FirstOutput(BertTuple()).eval(), (ids, mask)).save(os.path.join(out_dir, "bertwrap_traced.pt"))
    print(f"wrote {out_dir}/bertwrap_traced.pt")


if __name__ == "__main__":
    main(sys.argv[1])
