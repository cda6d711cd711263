#!/usr/bin/env python3
"""Texts through the trunk in batches grouped by length vs in story order, side by side.

`canopy cache` on the Reuters stories (configs/reuters_minilm.ini) twice per repeat, into
two scratch caches:
  grouped    cache.shard_rows = 8 x cache.batch_size: stories are sorted by token count
             within windows of 8 batches, then stored in story order (the default)
  in order   cache.shard_rows = 9 x cache.batch_size, not a multiple of 8 batches, which
             turns the grouping off: each batch is padded to its longest story
Prints each run's trunk seconds (canopy's "rows through the trunk" time), the ratio, and
the largest difference between the two caches' features (padding must not change them).

  text_grouping.py --canopy BUILD/runners/canopy [--stories 512] [--repeats 3]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

import h5py
import numpy as np

from canopy_runs import run_main, work_dir


def cache(canopy, config, path, shard_rows, stories):
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet", "--force",
                        "--set", f"cache.path={path}", "--set", f"cache.shard_rows={shard_rows}",
                        "--set", f"data.train_limit={stories}", "--set", "data.test_limit=1"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"canopy cache failed: {r.stderr[-800:]}")
    return float(re.search(r"rows through the trunk: ([0-9.]+) s", r.stdout).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--config", default="configs/reuters_minilm.ini")
    ap.add_argument("--stories", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="cache.batch_size of the config")
    a = ap.parse_args()
    work = work_dir("canopy-text-bench-")
    grouped_rows, plain_rows = 8 * a.batch, 9 * a.batch
    print(f"[text grouping] {a.stories} Reuters stories through the trunk of {a.config}, batch {a.batch}, "
          f"{a.repeats} repeat(s), trunk seconds")
    ratios = []
    for rep in range(a.repeats):
        g = cache(a.canopy, a.config, f"{work}/grouped", grouped_rows, a.stories)
        p = cache(a.canopy, a.config, f"{work}/plain", plain_rows, a.stories)
        ratios.append(p / g)
        print(f"  repeat {rep + 1}: in order {p:.1f} s, grouped {g:.1f} s, ratio {p / g:.2f}")
    with h5py.File(f"{work}/grouped/cache.h5", "r") as x, h5py.File(f"{work}/plain/cache.h5", "r") as y:
        diff = float(np.abs(x["train/features"][...] - y["train/features"][...]).max())
    print(f"  in order / grouped: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"largest feature difference between the two caches {diff:.1e}")


if __name__ == "__main__":
    run_main(main)
