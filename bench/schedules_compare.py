#!/usr/bin/env python3
"""Freezing that moves vs static freezing, side by side in one run, on the demo's
Fashion-MNIST subset (64x64, EfficientNet-Lite0), one linear head (Adam lr 1e-3), the
trunk's top at lr 1e-4 for the top block (/2.6 per block down), batch 256, each seed:

  static top-2      trunk.freeze = first:13: blocks.12-13 train every step
  static top-4      trunk.freeze = first:11: blocks.10-13 train every step
  gradual top-4     first:11, trunk.schedule = gradual: the head alone for one epoch, then one
                    more block per epoch from the top down
  autofreeze top-4  first:11, trunk.schedule = autofreeze: every quarter epoch the blocks whose
                    gradient-norm change rate is below the median freeze (from the lowest up),
                    and the highest frozen block's output becomes a cache level
  autofreeze top-4, streamed (level on disk | computed)
                    the same over a train split that streams (shards of 128 rows under an 8 MiB
                    cap, against a split of about 25 MiB): the level kept on disk and read by
                    row, or (trunk.level_on_disk = false) the frozen blocks computed in every step

Columns: test accuracy (mean over seeds, with min and max), wall time per epoch as `canopy
train` reports it, total wall time of `canopy cache` plus `canopy train`, and how many of the
top's blocks were frozen at the end (from metrics.jsonl's "@trunk" rows).

  schedules_compare.py --canopy BUILD/runners/canopy [--train 4000] [--test 1000] [--epochs 4] [--seeds 0,1,2]
"""
import argparse
import json
import os
import re
import statistics
import sys

from canopy_runs import cache_then_train, run_main, work_dir

from finetune_compare import BATCH, canopy_config  # the same trunk, data, head and rates


def run_rows(a, work, freeze, extra, tag):
    path = os.path.join(work, f"{tag}.ini")
    with open(path, "w") as f:
        f.write(canopy_config(work, a, freeze))
    common = ["--config", path, "--set", f"cache.path={work}/cache-{tag}"] + [x for kv in extra for x in ("--set", kv)]
    out = []
    for seed, out_dir, stdout, per_epoch, total in cache_then_train(a.canopy, common, a.seeds, f"{work}/out-{tag}",
                                                                    a.epochs):
        acc = float(re.search(r"^probe .*? ([\d.]+)%", stdout, re.M).group(1)) / 100
        rows = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]
        top = [r for r in rows if r["task"] == "@trunk"]
        blocks = 15 - int(freeze.split(":")[1])
        frozen = blocks - len(top[-1]["training"])
        out.append((acc, per_epoch, total, frozen, blocks))
        print(f"  {tag} seed {seed}: {100 * acc:.2f}%, {per_epoch:.1f} s/epoch, total {total:.1f} s, "
              f"frozen at the end {frozen} of {blocks}; per epoch {[r['training'] for r in top]}",
              file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="", help="some of static2,static4,gradual4,auto4,auto4s,auto4c (default: all)")
    a = ap.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    work = work_dir("canopy-schedules-bench-")
    steps = (a.train + BATCH - 1) // BATCH
    auto = ["trunk.schedule=autofreeze", f"trunk.freeze_interval={max(1, steps // 4)}", "trunk.percentile=50"]
    streamed = ["cache.shard_rows=128", "cache.memory_cap_mb=8"]
    plans = [
        ("static top-2", "first:13", [], "static2"),
        ("static top-4", "first:11", [], "static4"),
        ("gradual top-4", "first:11", ["trunk.schedule=gradual", "trunk.warmup_epochs=1", "trunk.unfreeze_every=1"],
         "gradual4"),
        ("autofreeze top-4", "first:11", auto, "auto4"),
        ("autofreeze top-4, streamed, level on disk", "first:11", auto + streamed, "auto4s"),
        ("autofreeze top-4, streamed, computed", "first:11", auto + streamed + ["trunk.level_on_disk=false"], "auto4c"),
    ]
    wanted = a.only.split(",") if a.only else [p[3] for p in plans]
    rows = [(name, run_rows(a, work, freeze, extra, tag)) for name, freeze, extra, tag in plans if tag in wanted]
    print(f"{a.train} train / {a.test} test images at 64x64, {a.epochs} epochs, seeds "
          f"{','.join(map(str, a.seeds))}; autofreeze decides every {max(1, steps // 4)} of {steps} steps per epoch; "
          f"{os.cpu_count()} cores\n")
    print("| rows | test accuracy (mean, min-max) | s per epoch | total s (with cache build) | frozen at the end |")
    print("|---|---|---|---|---|")
    s = {}
    for name, res in rows:
        acc, per_epoch, total, frozen, blocks = zip(*res)
        s[name] = (statistics.mean(acc), statistics.mean(per_epoch), statistics.mean(total))
        print(f"| {name} | {100 * statistics.mean(acc):.2f}% ({100 * min(acc):.2f}-{100 * max(acc):.2f}) | "
              f"{statistics.mean(per_epoch):.1f} | {statistics.mean(total):.1f} | "
              f"{'/'.join(str(f) for f in frozen)} of {blocks[0]} |")
    print()
    if "static top-4" in s and "autofreeze top-4" in s:
        print(f"RATIO static top-4 / autofreeze top-4, total time = "
              f"{s['static top-4'][2] / s['autofreeze top-4'][2]:.2f}   goal >= 2")
        print(f"DIFF accuracy autofreeze - static top-4 = "
              f"{100 * (s['autofreeze top-4'][0] - s['static top-4'][0]):+.2f} points   goal within -0.5")
    disk, computed = "autofreeze top-4, streamed, level on disk", "autofreeze top-4, streamed, computed"
    if disk in s and computed in s:
        print(f"RATIO streamed autofreeze, computed / level on disk, s per epoch = "
              f"{s[computed][1] / s[disk][1]:.2f}   (what reading the level saves; > 1 is a gain)")
    if disk in s and "autofreeze top-4" in s:
        print(f"DIFF accuracy streamed (level on disk) - in memory = "
              f"{100 * (s[disk][0] - s['autofreeze top-4'][0]):+.2f} points   (a coarser shuffle)")
    statics = [s[k][0] for k in ("static top-2", "static top-4") if k in s]
    if "gradual top-4" in s and statics:
        print(f"DIFF accuracy gradual - best static = {100 * (s['gradual top-4'][0] - max(statics)):+.2f} points"
              "   goal within -0.5")


if __name__ == "__main__":
    run_main(main)
