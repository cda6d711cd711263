#!/usr/bin/env python3
"""How much to freeze, on text: Reuters-21578 grain and corn through all-MiniLM-L6-v2
(configs/reuters_minilm_tune.ini: texts cut at 128 tokens, float16 cache), the trunk frozen
whole vs its last layer (layers.5) trained over the cached token states, shared by the four
tasks, in float32 and under trunk.top_precision = bfloat16 (mixed precision). Same epochs, same heads, each seed; one run side by side.

Columns: F1 of "yes" for the grain and corn linear heads on the test split (mean over seeds,
with min and max), wall time per epoch as `canopy train` reports it, and total wall time of
`canopy cache` plus `canopy train`.

  finetune_text.py --canopy BUILD/runners/canopy [--epochs 6] [--seeds 0,1,2]
"""
import argparse
import json
import os
import statistics
import sys

from canopy_runs import cache_then_train, run_main, work_dir

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "reuters_minilm_tune.ini")


def run_rows(a, work, freeze, top_precision="float32"):
    tag = freeze.replace(":", "")
    common = ["--config", CONFIG, "--set", f"trunk.freeze={freeze}", "--set", f"cache.path={work}/cache-{tag}",
              "--set", f"train.epochs={a.epochs}", "--set", f"trunk.top_precision={top_precision}"]
    out = []
    runs = f"{work}/out-{tag}-{top_precision}"
    for seed, out_dir, _, per_epoch, total in cache_then_train(a.canopy, common, a.seeds, runs, a.epochs):
        f1 = {}
        for task in ("grain", "corn"):
            card = json.load(open(f"{out_dir}/heads/{task}.json"))
            f1[task] = next(c["f1"] for c in card["per_class"] if c["class"] == "yes")
        out.append((f1["grain"], f1["corn"], per_epoch, total))
        print(f"  {freeze} {top_precision} seed {seed}: grain F1 {f1['grain']:.3f}, corn F1 {f1['corn']:.3f}, "
              f"{per_epoch:.1f} s/epoch, total {total:.1f} s", file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    work = work_dir("canopy-finetune-text-")
    rows = [("frozen (heads only)", run_rows(a, work, "all")),
            ("layers.5 trained over the cached prefix", run_rows(a, work, "first:6")),
            ("the same, trunk.top_precision = bfloat16", run_rows(a, work, "first:6", "bfloat16"))]
    print(f"Reuters grain/corn (ModApte, 1554 train / 604 test stories, 128 tokens), {a.epochs} epochs, "
          f"seeds {','.join(map(str, a.seeds))}\n")
    print("| rows | grain F1 (mean, min-max) | corn F1 (mean, min-max) | s per epoch | total s (with cache build) |")
    print("|---|---|---|---|---|")
    for name, res in rows:
        grain, corn, per_epoch, total = zip(*res)
        print(f"| {name} | {statistics.mean(grain):.3f} ({min(grain):.3f}-{max(grain):.3f}) | "
              f"{statistics.mean(corn):.3f} ({min(corn):.3f}-{max(corn):.3f}) | {statistics.mean(per_epoch):.1f} | "
              f"{statistics.mean(total):.1f} |")
    plain, mixed = (statistics.mean(r[2] for r in res) for _, res in rows[1:])
    print(f"\nRATIO layers.5 float32 / bfloat16, per epoch = {plain / mixed:.2f}   goal (reported)")


if __name__ == "__main__":
    run_main(main)
