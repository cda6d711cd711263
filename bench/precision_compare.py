#!/usr/bin/env python3
"""trunk.precision = bfloat16 against float32: the cache build's speed and the heads' accuracy,
side by side in one run.

Speed, per image size (the demo's 64x64, and 224x224): the demo's trunk (EfficientNet-Lite0
to blocks.13) on the demo's Fashion-MNIST images, interleaved repeats of

  canopy TorchScript float32    `canopy cache` with the TorchScript trunk (the time canopy
                                reports for the build: decode, trunk, HDF5 writes)
  canopy TorchScript bfloat16   the same with trunk.precision = bfloat16 (autocast)
  canopy pt2 float32            the AOTInductor package scripts/setup compiled for this size,
                                when there is one (compiled trunks run at float32 only)
  python bfloat16 autocast      the module in inference mode under torch.autocast("cpu",
                                torch.bfloat16), channels-last weights and inputs: what a
                                Python user writes for 16-bit passes

Accuracy: the demo (configs/fmnist_lite0.ini, its ten heads) trained per seed on a float32
cache and on a bfloat16 cache of the same images; the mean test accuracy of every classifier
(R^2 of the regression head) and the difference, and how far apart the two caches' features are.

    precision_compare.py --canopy build/runners/canopy [--sizes 64,224] [--images 12000,1024]
                         [--repeats 3] [--seeds 0,1,2]
"""
import argparse
import json
import os
import re
import statistics

import h5py
import numpy as np
import torch

from canopy_runs import cache_then_train, run_main, work_dir
from trunk_compare import CONFIG, HOME, canopy_rate, export_trunk, images, interleaved, python_rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--images", default="12000,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch", type=int, default=128, help="the demo's cache.batch_size")
    a = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    work = work_dir("canopy-precision-bench-")
    ts = os.path.join(HOME, "trunks", "efficientnet_lite0.pt")
    ts_sha = re.search(r"sha256 = (\w+)", open(CONFIG).read()).group(1)
    module = export_trunk.BlockFeatures(export_trunk.efficientnet_lite0(False).eval(), 13).eval()
    module = module.to(memory_format=torch.channels_last)

    def autocast_bf16(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(b.contiguous(memory_format=torch.channels_last))

    print(f"{threads} threads, batch {a.batch}, EfficientNet-Lite0 to blocks.13, Fashion-MNIST images")
    for size, n in zip(map(int, a.sizes.split(",")), map(int, a.images.split(","))):
        x = images(n, size)
        runs = {
            "canopy TorchScript float32": lambda: canopy_rate(a.canopy, work, n, size, ts, ts_sha, "f32"),
            "canopy TorchScript bfloat16": lambda: canopy_rate(a.canopy, work, n, size, ts, ts_sha, "b16",
                                                               ["--set", "trunk.precision=bfloat16"]),
            "python bfloat16 autocast": lambda: python_rate(autocast_bf16, x, a.batch),
        }
        pt2 = os.path.join(HOME, "trunks", f"efficientnet_lite0_{size}.pt2")
        if os.path.isfile(pt2 + ".sha256"):
            sha = open(pt2 + ".sha256").read().strip()
            runs["canopy pt2 float32"] = lambda: canopy_rate(a.canopy, work, n, size, pt2, sha, "pt2")
        python_rate(autocast_bf16, x[:a.batch], a.batch)  # warm-up
        rates, _ = interleaved(runs, a.repeats, f"{size}x{size}, {n} images")

        def ratio(num, den, goal="(reported)"):
            r = [p / q for p, q in zip(rates[num], rates[den])]
            print(f"    RATIO {num} / {den} at {size}x{size} = {statistics.median(r):.2f} "
                  f"(min {min(r):.2f}, max {max(r):.2f})   goal {goal}")

        ratio("canopy TorchScript bfloat16", "canopy TorchScript float32")
        if "canopy pt2 float32" in rates:
            ratio("canopy TorchScript bfloat16", "canopy pt2 float32")
        ratio("canopy TorchScript bfloat16", "python bfloat16 autocast")

    # Accuracy: the demo's heads on float32 and on bfloat16 features of the same images.
    seeds = [int(s) for s in a.seeds.split(",")]
    epochs = int(re.search(r"^epochs = (\d+)", open(CONFIG).read(), re.M).group(1))
    acc, features, regression = {}, {}, set()
    for precision in ("float32", "bfloat16"):
        cache = os.path.join(work, f"demo-{precision}")
        common = ["--config", CONFIG, "--set", f"cache.path={cache}", "--set", f"trunk.precision={precision}"]
        for seed, out_dir, _, _, _ in cache_then_train(a.canopy, common, seeds, os.path.join(work, precision), epochs):
            heads = os.path.join(out_dir, "heads")
            for name in sorted(os.listdir(heads)):
                if not name.endswith(".json"):
                    continue
                card = json.load(open(os.path.join(heads, name)))
                score = card.get("eval_r2") if card.get("kind") == "regression" else card.get("eval_accuracy")
                if card.get("kind") == "regression":
                    regression.add(card["task"])
                if score is not None:
                    acc.setdefault(card["task"], {}).setdefault(precision, []).append(score)
        with h5py.File(os.path.join(cache, "cache.h5"), "r") as h:
            features[precision] = h["test/features"][:]
    diff = np.abs(features["bfloat16"] - features["float32"])
    scale = np.abs(features["float32"]).max()
    print(f"\nthe demo's heads, test accuracy (mean of seeds {a.seeds}; the demo's config, {epochs} epochs):")
    print(f"  {'task':22s} {'float32':>8s} {'bfloat16':>9s} {'difference':>11s}")
    gaps = []
    for task in sorted(acc):
        if len(acc[task].get("float32", [])) != len(seeds) or len(acc[task].get("bfloat16", [])) != len(seeds):
            continue
        f, b = statistics.mean(acc[task]["float32"]), statistics.mean(acc[task]["bfloat16"])
        if task in regression:
            print(f"  {task + ' (R^2)':22s} {f:8.4f} {b:9.4f} {b - f:+11.4f}")
            continue
        gaps.append(b - f)
        print(f"  {task:22s} {100 * f:7.2f}% {100 * b:8.2f}% {100 * (b - f):+10.2f}")
    print(f"  mean difference over the {len(gaps)} classifiers: {100 * statistics.mean(gaps):+.2f} points "
          f"(min {100 * min(gaps):+.2f}, max {100 * max(gaps):+.2f})")
    print(f"  features: bfloat16 minus float32, max |diff| {diff.max():.3g} ({diff.max() / scale:.2%} of the "
          f"largest feature), mean |diff| {diff.mean():.3g} (mean |feature| {np.abs(features['float32']).mean():.3g})")


if __name__ == "__main__":
    run_main(main)
