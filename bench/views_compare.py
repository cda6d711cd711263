#!/usr/bin/env python3
"""Augmented views in the cache: K = 1, 4, 8 views per training image, side by side in one run.

On the demo's data and trunk (configs/fmnist_lite0.ini: Fashion-MNIST 10 000 / 2 000 at
64x64 through EfficientNet-Lite0), its tasks replaced by the demo's linear probe and its MLP
(class_linear: adam lr 1e-3; class_mlp: hidden 512, dropout 0.5, adam lr 1e-3): for each K a
cache is built (time reported: K x the training images through the trunk) and both heads
train per seed (train.seed = 0, 1, 2: initial weights, batch order and the view drawn for
each row each epoch follow it). Prints the test accuracy per K, head and seed, the mean, and
the gain of K = 8 over K = 1 (goal: >= 0.5 points on the MLP head). Each `--augment` value is
one augmentation setting: [augment] keys, space-separated ("crop_scale=0.8,1 flip=false");
keys it does not name keep their defaults.

  views_compare.py --canopy BUILD/runners/canopy [--config configs/fmnist_lite0.ini]
                   [--views 1,4,8] [--seeds 0,1,2] [--epochs 15] [--train-limit N] [--augment 'crop_scale=0.35,1' ...]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from canopy_runs import base_sections, run_main, work_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--config", default="configs/fmnist_lite0.ini")
    ap.add_argument("--views", default="1,4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-limit", type=int, default=0, help="training images (0: the config's)")
    ap.add_argument("--augment", action="append", default=None)
    a = ap.parse_args()
    work = work_dir("canopy-views-bench-")
    views = [int(v) for v in a.views.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    crops = a.augment or ["crop_scale=0.35,1"]
    base = base_sections(a.config)
    base = re.sub(r"(?m)^epochs = .*$", f"epochs = {a.epochs}", base)
    if a.train_limit:
        base = re.sub(r"(?m)^train_limit = .*$", f"train_limit = {a.train_limit}", base)
    tasks = """
[task.class_linear]
head = linear
optimizer = adam
lr = 0.001

[task.class_mlp]
head = mlp
head.hidden = 512
head.dropout = 0.5
optimizer = adam
lr = 0.001
"""
    results = {}  # (crop, K) -> {head: [acc per seed]}
    for crop in crops:
        for k in views:
            if k == 1 and crop != crops[0]:
                results[(crop, k)] = results[(crops[0], k)]
                continue
            tag = f"{crops.index(crop)}"
            ini = os.path.join(work, f"v{k}-{tag}.ini")
            cache = os.path.join(work, f"cache-v{k}-{tag}")
            with open(ini, "w") as f:
                f.write(re.sub(r"(?m)^path = runs/.*cache$", f"path = {cache}", base)
                        .replace("[cache]\n", f"[cache]\nviews = {k}\n", 1)
                        + "\n[augment]\n" + "".join(kv.replace("=", " = ", 1) + "\n" for kv in crop.split()) + tasks)
            t = time.time()
            r = subprocess.run([a.canopy, "cache", "--config", ini, "--progress", "quiet"], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"canopy cache ({k} views) failed: {r.stderr[-1000:]}")
            build = time.time() - t
            accs = {}
            for seed in seeds:
                out = os.path.join(work, f"out-v{k}-{tag}-{seed}")
                r = subprocess.run([a.canopy, "train", "--config", ini, "--progress", "quiet", "--set", f"train.seed={seed}",
                                    "--set", f"train.out_dir={out}"], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"canopy train ({k} views, seed {seed}) failed: {r.stderr[-1000:]}")
                train_s = float(re.search(r"train ([\d.]+)s", r.stdout).group(1))
                for head in ("class_linear", "class_mlp"):
                    card = json.load(open(os.path.join(out, "heads", head + ".json")))
                    accs.setdefault(head, []).append(100 * card["eval_accuracy"])
                print(f"{crop}: views {k} seed {seed}: linear {accs['class_linear'][-1]:.2f}%  "
                      f"mlp {accs['class_mlp'][-1]:.2f}%  (train {train_s:.2f}s)", flush=True)
            results[(crop, k)] = accs
            print(f"{crop}: views {k}: cache build {build:.1f}s for {k} x the training images", flush=True)

    print("\n| [augment] | views | linear: test accuracy, mean (min-max) | MLP: test accuracy, mean (min-max) |")
    print("|---|---|---|---|")
    for crop in crops:
        for k in views:
            acc = results[(crop, k)]
            cells = [f"{statistics.mean(acc[h]):.2f}% ({min(acc[h]):.2f}-{max(acc[h]):.2f})"
                     for h in ("class_linear", "class_mlp")]
            print(f"| {crop if k > 1 else '-'} | {k} | {cells[0]} | {cells[1]} |")
    lo, hi = min(views), max(views)
    for crop in crops:
        for h, label in (("class_linear", "linear"), ("class_mlp", "MLP")):
            gain = statistics.mean(results[(crop, hi)][h]) - statistics.mean(results[(crops[0], lo)][h])
            goal = "  goal >= 0.5" if h == "class_mlp" else ""
            print(f"[views] {crop}: {label} head, K = {hi} vs K = {lo}: {gain:+.2f} points (mean of {len(seeds)} seeds){goal}")


if __name__ == "__main__":
    run_main(main)
