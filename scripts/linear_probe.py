#!/usr/bin/env python3
"""Linear probe: is the default trunk really pretrained?

Trains the same multinomial logistic regression (full-batch L-BFGS; L2 strength chosen
on a validation fifth of the training set, from the same grid) on
  1. raw pixels of Fashion-MNIST,
  2. features of the pretrained trunk,
  3. features of the same architecture with random initial weights,
and prints test accuracy of each. Reads Fashion-MNIST from the Debian package.

    linear_probe.py --pretrained T.pt --random R.pt [--train 5000 --test 2000 --size 64]
"""
import argparse
import gzip
import time

import numpy as np
import torch
import torch.nn.functional as F

FMNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split, n):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz")[:n]
    y = read_idx(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz")[:n]
    return torch.from_numpy(x.copy()).float().div(255.0), torch.from_numpy(y.astype(np.int64))


def preprocess(x, size):
    x = x.unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    return (x - 0.5) / 0.5


def features(trunk_path, x, size, batch=256):
    trunk = torch.jit.load(trunk_path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            f = trunk(preprocess(x[i:i + batch], size))
            out.append(f.mean(dim=(2, 3)))
    return torch.cat(out)


L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def probe(xtr, ytr, xte, yte):
    """Picks the L2 strength on a held-out fifth of the training set, refits on all of it."""
    n_val = len(xtr) // 5
    best = max(L2_GRID, key=lambda l2: fit(xtr[n_val:], ytr[n_val:], xtr[:n_val], ytr[:n_val], l2))
    return fit(xtr, ytr, xte, yte, best), best


def fit(xtr, ytr, xte, yte, l2, iters=200):
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    w = torch.zeros(xtr.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xte @ w + b).argmax(1) == yte).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--random", required=True)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    xtr, ytr = load("train", a.train)
    xte, yte = load("test", a.test)
    print(f"Fashion-MNIST {a.train} train / {a.test} test, trunk input {a.size}x{a.size}")
    rows = [("raw pixels (784)", probe(xtr.flatten(1), ytr, xte.flatten(1), yte))]
    for name, path in (("pretrained EfficientNet-Lite0", a.pretrained), ("random-init EfficientNet-Lite0", a.random)):
        t = time.time()
        ftr, fte = features(path, xtr, a.size), features(path, xte, a.size)
        dt = time.time() - t
        rows.append((f"{name} ({ftr.shape[1]}, {(a.train + a.test) / dt:.0f} img/s)", probe(ftr, ytr, fte, yte)))
    for name, (acc, l2) in rows:
        print(f"  {name:<52} test accuracy {100 * acc:5.1f}%  (L2 {l2:g}, chosen on validation)")


if __name__ == "__main__":
    main()
