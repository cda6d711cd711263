#!/usr/bin/env python3
"""How much to freeze: canopy over a cached frozen prefix vs recomputing it in PyTorch-Python,
side by side in one run, on the demo's Fashion-MNIST subset (64x64 unless --size, EfficientNet-Lite0).

Every row trains the same head (linear on the pooled 192 features, Adam lr 1e-3) for the
same number of epochs (batch 256), over each seed; trunk blocks that train use Adam at
lr 1e-4 for the top block (/2.6 per block further down, as canopy's trunk.lr_decay), and
BatchNorm statistics stay fixed everywhere (the exported trunk was traced in eval mode).

  linear probe            canopy, trunk frozen whole (cache of pooled features)
  top-1 / top-2 / top-4   canopy, trunk.freeze = first:14 / 13 / 11, over the cached prefix
  top-2 / top-4, bfloat16 the same with trunk.top_precision = bfloat16 (mixed precision)
  top-2, recomputed       PyTorch-Python: requires_grad=False on the prefix, the whole trunk
                          runs every step (what users do today), channels-last weights and
                          inputs as canopy's (contiguous, an epoch takes twice as long)
  full fine-tuning        PyTorch-Python: every block trains (lr 1e-4 throughout)

Columns: test accuracy (mean over seeds, with min and max), wall time per epoch (training
and evaluation), total wall time (canopy: `canopy cache` plus `canopy train` processes;
Python: data preparation plus training). Python runs in this process with the venv's torch,
the same build as canopy's LibTorch.

  finetune_compare.py --canopy BUILD/runners/canopy [--train 10000] [--test 2000] [--epochs 2] [--seeds 0,1,2]
                      [--size 64] [--canopy-only]
"""
import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
TRUNK = os.path.join(HOME, "trunks", "efficientnet_lite0.pt")
FMNIST = os.environ.get("CANOPY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
from support import read_idx  # noqa: E402

from canopy_runs import cache_then_train, run_main, work_dir  # noqa: E402

HEAD_LR, TOP_LR, DECAY, BATCH = 1e-3, 1e-4, 2.6, 256


def canopy_config(work, a, freeze, top_precision="float32", size=64):
    return f"""[data]
source = fashion-mnist
dir = {FMNIST}
train_limit = {a.train}
test_limit = {a.test}
[preprocess]
resize = {size}
[trunk]
path = {TRUNK}
allow_unpinned = true
device = cpu
pooling = avg
freeze = {freeze}
lr = {TOP_LR}
lr_decay = {DECAY}
top_precision = {top_precision}
[cache]
path = {work}/cache-{freeze.replace(':', '')}
[train]
batch_size = {BATCH}
epochs = {a.epochs}
[task.probe]
head = linear
optimizer = adam
lr = {HEAD_LR}
"""


def run_canopy(a, work, freeze, top_precision="float32"):
    """Per seed: (accuracy, seconds per epoch, total seconds); the cache is built once."""
    tag = freeze.replace(":", "") + ("" if top_precision == "float32" else "-" + top_precision)
    config = os.path.join(work, f"{tag}.ini")
    with open(config, "w") as f:
        f.write(canopy_config(work, a, freeze, top_precision, a.size))
    out = []
    for seed, _, stdout, per_epoch, total in cache_then_train(a.canopy, ["--config", config], a.seeds,
                                                              f"{work}/out-{tag}", a.epochs):
        acc = float(re.search(r"^probe .*? ([\d.]+)%", stdout, re.M).group(1)) / 100
        out.append((acc, per_epoch, total))
        print(f"  canopy {tag} seed {seed}: {100 * acc:.2f}%, {per_epoch:.1f} s/epoch, total {total:.1f} s",
              file=sys.stderr, flush=True)
    return out


def images(split, n, size):
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(read_idx(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz")[:n].copy()).float().div(255)
    x = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(read_idx(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz")[:n].astype("int64"))
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), y


def run_python(a, trained_blocks):
    """PyTorch-Python over the same trunk file: `trained_blocks` (None: all) train, the rest
    has requires_grad=False; the whole trunk runs forward every step."""
    out = []
    for seed in a.seeds:
        t0 = time.time()
        xtr, ytr = images("train", a.train, a.size)
        xte, yte = images("test", a.test, a.size)
        torch.manual_seed(seed)
        trunk = torch.jit.load(TRUNK).eval()  # traced in eval mode: BatchNorm statistics fixed
        for p in trunk.parameters():  # channels-last, as canopy trains (2x faster on the CPU)
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        xtr = xtr.contiguous(memory_format=torch.channels_last)
        xte = xte.contiguous(memory_format=torch.channels_last)
        blocks = ["stem"] + [f"blocks.{i}" for i in range(14)]
        groups = []
        for p in trunk.parameters():
            p.requires_grad_(trained_blocks is None)
        if trained_blocks is None:
            groups.append({"params": list(trunk.parameters()), "lr": TOP_LR})
        else:
            for depth, b in enumerate(reversed(blocks[-trained_blocks:])):
                ps = [p for n, p in trunk.named_parameters() if n.startswith(b + ".")]
                for p in ps:
                    p.requires_grad_(True)
                groups.append({"params": ps, "lr": TOP_LR / DECAY ** depth})
        head = torch.nn.Linear(192, 10)
        opt = torch.optim.Adam(groups + [{"params": head.parameters(), "lr": HEAD_LR}])
        prep = time.time() - t0
        epoch_times = []
        for epoch in range(a.epochs):
            t = time.time()
            order = torch.randperm(a.train)
            for i in range(0, a.train, BATCH):
                idx = order[i:i + BATCH]
                loss = F.cross_entropy(head(trunk(xtr[idx]).mean((2, 3))), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = torch.cat([head(trunk(xte[i:i + BATCH]).mean((2, 3))).argmax(1) for i in range(0, a.test, BATCH)])
            epoch_times.append(time.time() - t)
        acc = (pred == yte).float().mean().item()
        total = prep + sum(epoch_times)
        out.append((acc, statistics.mean(epoch_times), total))
        what = "full" if trained_blocks is None else f"top-{trained_blocks}"
        print(f"  python {what} seed {seed}: {100 * acc:.2f}%, {out[-1][1]:.1f} s/epoch, total {total:.1f} s",
              file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", type=int, default=64, help="images resized to this height and width")
    ap.add_argument("--canopy-only", action="store_true", help="leave out the PyTorch-Python rows")
    a = ap.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    work = work_dir("canopy-finetune-bench-")
    rows = [("linear probe", "canopy, trunk frozen whole", run_canopy(a, work, "all"))]
    for n, cut in ((1, 14), (2, 13), (4, 11)):
        rows.append((f"top-{n} trained", f"canopy, over the cached prefix (freeze = first:{cut})",
                     run_canopy(a, work, f"first:{cut}")))
    for n, cut in ((2, 13), (4, 11)):
        rows.append((f"top-{n} trained, bfloat16", f"canopy, the same with trunk.top_precision = bfloat16",
                     run_canopy(a, work, f"first:{cut}", "bfloat16")))
    if not a.canopy_only:
        rows.append(("top-2 trained, prefix recomputed", "PyTorch-Python, requires_grad=False on the prefix",
                     run_python(a, 2)))
        rows.append(("full fine-tuning", "PyTorch-Python, every block trained", run_python(a, None)))

    print(f"{a.train} train / {a.test} test images at {a.size}x{a.size}, {a.epochs} epochs, seeds {','.join(map(str, a.seeds))}; "
          f"{os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| rows | how | test accuracy (mean, min-max) | s per epoch | total s (with cache build) |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, how, res in rows:
        accs, per_epoch, total = zip(*res)
        summary[name] = (statistics.mean(accs), statistics.mean(per_epoch), statistics.mean(total))
        print(f"| {name} | {how} | {100 * statistics.mean(accs):.2f}% ({100 * min(accs):.2f}-{100 * max(accs):.2f}) | "
              f"{statistics.mean(per_epoch):.1f} | {statistics.mean(total):.1f} |")
    probe, top2 = summary["linear probe"], summary["top-2 trained"]
    best = max((summary[k] for k in ("top-1 trained", "top-2 trained", "top-4 trained")), key=lambda s: s[0])
    print()
    if not a.canopy_only:
        rec, full = summary["top-2 trained, prefix recomputed"], summary["full fine-tuning"]
        print(f"RATIO recomputed/cached per epoch (top-2) = {rec[1] / top2[1]:.2f}   goal >= 5")
        print(f"DIFF accuracy top-2 cached - recomputed = {100 * (top2[0] - rec[0]):+.2f} points   goal within +-0.5")
    print(f"DIFF accuracy top-2 - linear probe = {100 * (top2[0] - probe[0]):+.2f} points   goal >= +2")
    if not a.canopy_only:
        print(f"DIFF accuracy best partial - full fine-tuning = {100 * (best[0] - full[0]):+.2f} points   goal >= -1")
        print(f"RATIO full fine-tuning / best partial, total time = {full[2] / best[2]:.2f}   goal >= 3")
    for n in (2, 4):
        plain, mixed = summary[f"top-{n} trained"], summary[f"top-{n} trained, bfloat16"]
        print(f"RATIO top-{n} float32 / bfloat16 top, per epoch = {plain[1] / mixed[1]:.2f}   goal (reported)")
        print(f"DIFF accuracy top-{n} bfloat16 - float32 = {100 * (mixed[0] - plain[0]):+.2f} points   goal (reported)")


if __name__ == "__main__":
    run_main(main)
