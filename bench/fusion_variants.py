#!/usr/bin/env python3
"""The measurements behind canopy's fusion design (docs/decisions.md, "Fusion"), in
PyTorch on one thread (the same build as canopy's LibTorch): forward + backward of one
training step of H MLP heads over the same batch, computed

  alone      each head on its own;
  bmm        first layers as one multiply, later layers as bmm over stacked weights;
  first      first layers as one multiply, each head's later layers alone on its slice;

and the single multiplies behind the result.

  fusion_variants.py [--repeats 200]
"""
import argparse
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, repeats):
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def step_variants(H, B, D, h, K, repeats):
    torch.manual_seed(0)
    x, y = torch.randn(B, D), torch.randint(0, K, (B,))
    W1 = [torch.randn(h, D, requires_grad=True) for _ in range(H)]
    b1 = [torch.randn(h, requires_grad=True) for _ in range(H)]
    W2 = [torch.randn(K, h, requires_grad=True) for _ in range(H)]
    b2 = [torch.randn(K, requires_grad=True) for _ in range(H)]

    def alone():
        for i in range(H):
            z = torch.relu(torch.addmm(b1[i], x, W1[i].t()))
            F.cross_entropy(torch.addmm(b2[i], z, W2[i].t()), y).backward()

    def bmm():
        z = torch.relu(torch.addmm(torch.cat(b1), x, torch.cat(W1).t())).view(B, H, h).transpose(0, 1)
        out = torch.baddbmm(torch.stack(b2).unsqueeze(1), z, torch.stack(W2).transpose(1, 2))
        sum(F.cross_entropy(out[i], y) for i in range(H)).backward()

    def first():
        z = torch.relu(torch.addmm(torch.cat(b1), x, torch.cat(W1).t())).split(h, 1)
        sum(F.cross_entropy(torch.addmm(b2[i], z[i], W2[i].t()), y) for i in range(H)).backward()

    return {name: per_call_us(fn, repeats) / 1e3 for name, fn in (("alone", alone), ("bmm", bmm), ("first", first))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"fusion_variants: torch {torch.__version__}, 1 thread, batch 256, 192 features, 10 outputs")
    print("\nms per training step (forward + backward) of H MLP heads of one hidden layer")
    print(f"  {'H':>2} {'hidden':>6} {'alone':>8} {'bmm':>8} {'first':>8}")
    for H, h in ((4, 64), (8, 64), (4, 256), (8, 256)):
        r = step_variants(H, 256, 192, h, 10, max(20, a.repeats // H))
        print(f"  {H:>2} {h:>6} {r['alone']:8.2f} {r['bmm']:8.2f} {r['first']:8.2f}")
    z, w, g = torch.randn(4, 256, 256), torch.randn(4, 256, 10), torch.randn(4, 256, 10)
    print("\nµs per call: the second layer of 4 heads (hidden 256 -> 10), batched vs one by one")
    for label, batched, single in (
        ("forward z @ W", lambda: torch.bmm(z, w), lambda: [z[i] @ w[i] for i in range(4)]),
        ("grad of W: z^T @ g", lambda: torch.bmm(z.transpose(1, 2), g), lambda: [z[i].t() @ g[i] for i in range(4)]),
        ("grad of z: g @ W^T", lambda: torch.bmm(g, w.transpose(1, 2)), lambda: [g[i] @ w[i].t() for i in range(4)]),
    ):
        print(f"  {label:<20} bmm {per_call_us(batched, a.repeats):7.1f}   4 x mm {per_call_us(single, a.repeats):7.1f}")
    x, W = torch.randn(256, 192), torch.randn(1024, 192)
    us = per_call_us(lambda: x @ W.t(), a.repeats)
    print(f"\none 256 x 192 x 1024 multiply: {us:.0f} µs = {256 * 192 * 1024 / us / 1e3:.1f} GMAC/s on one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
