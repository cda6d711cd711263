#!/usr/bin/env python3
"""canopy over MPI ranks on one machine, side by side with one process:

  cache   `canopy cache` of the demo's images through EfficientNet-Lite0 (a subset, --images;
          shards of 512 rows, the unit ranks split), rebuilt from nothing each time: one process with 2 LibTorch threads against
          `mpirun -np 2` with 1 thread per rank (--bind-to none). RATIO one/ranks: goal >= 0.9
          (MPI costs nothing on one machine: the ranks split the shards, nothing else).
  train   the demo's ten heads on the demo cache: one process with 2 TBB workers against
          `mpirun -np 2` with 1 worker per rank. RATIO one/ranks, on the training time each
          reports (and the wall time of the whole command beside it).
  top     the demo's heads over EfficientNet-Lite0's last two blocks (freeze = first:13) trained
          over the cached prefix: one process with 2 threads against `mpirun -np 2` (data
          parallel: each rank a slice of every batch, the top's gradients all-reduced). Prints
          the all-reduce time per step (the slowest rank's mean) beside the step time.

Each repeat runs the two sides back to back, in alternating order. The cache is a scratch
copy; the demo's own cache (runs/fmnist_lite0/cache) is read, never written, by the train rows.

  mpi_compare.py --canopy BUILD/runners/canopy [--config configs/fmnist_lite0.ini]
                 [--images 8192] [--repeats 3] [--epochs 5] [--tune-epochs 1]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from canopy_runs import run_main, work_dir

MPIRUN = [shutil.which("mpirun") or "mpirun", "--oversubscribe", "--allow-run-as-root", "--bind-to", "none"]


def run(cmd, env=None):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-1500:]}")
    return time.time() - t, r.stdout


def ratio_line(name, values, goal=None):
    med = statistics.median(values)
    tail = f"  goal {goal}" if goal else ""
    return f"RATIO {name} = {med:.2f} (min {min(values):.2f}, max {max(values):.2f}){tail}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--config", default="configs/fmnist_lite0.ini")
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--tune-epochs", type=int, default=1)
    a = ap.parse_args()
    work = work_dir("canopy-mpi-bench-")
    env1 = dict(os.environ, OMP_NUM_THREADS="2")
    # Shards of 512 rows: the unit the ranks split (a data set of millions has thousands).
    common = ["--config", a.config, "--progress", "quiet", "--set", f"data.train_limit={a.images}",
              "--set", f"data.test_limit={a.images // 4}", "--set", "cache.shard_rows=512"]

    cache_one, cache_two, cache_ratio = [], [], []
    for rep in range(a.repeats):
        sides = [("one", None), ("two", None)] if rep % 2 == 0 else [("two", None), ("one", None)]
        times = {}
        for side, _ in sides:
            path = os.path.join(work, f"cache-{side}")
            shutil.rmtree(path, ignore_errors=True)
            args = common + ["--set", f"cache.path={path}"]
            if side == "one":
                times[side], _ = run([a.canopy, "cache", *args], env=env1)
            else:
                times[side], _ = run(MPIRUN + ["-np", "2", "-x", "OMP_NUM_THREADS=1", a.canopy, "cache", *args])
        cache_one.append(times["one"])
        cache_two.append(times["two"])
        cache_ratio.append(times["one"] / times["two"])
    n = a.images + a.images // 4
    print(f"[cache] {n} images at 64x64 through EfficientNet-Lite0, rebuilt from nothing, {a.repeats} repeats")
    print(f"  1 process x 2 threads   {statistics.median(cache_one):6.2f} s  ({n / statistics.median(cache_one):.0f} images/s)")
    print(f"  2 ranks x 1 thread      {statistics.median(cache_two):6.2f} s  ({n / statistics.median(cache_two):.0f} images/s)")
    print(ratio_line("cache one/ranks (1x2 threads over 2 ranks x1)", cache_ratio, ">= 0.9"))

    # The demo cache (the demo's own subset), read by both sides.
    run([a.canopy, "cache", "--config", a.config, "--progress", "quiet"])
    train_one, train_two, wall_one, wall_two, train_ratio = [], [], [], [], []
    for rep in range(a.repeats):
        order = ["one", "two"] if rep % 2 == 0 else ["two", "one"]
        got = {}
        for side in order:
            out = os.path.join(work, f"out-{side}")
            args = ["--config", a.config, "--progress", "quiet", "--set", f"train.epochs={a.epochs}",
                    "--set", f"train.out_dir={out}", "--set", "train.fuse=never"]
            if side == "one":
                wall, stdout = run([a.canopy, "train", *args, "--set", "train.workers=2"], env=env1)
            else:
                wall, stdout = run(MPIRUN + ["-np", "2", "-x", "OMP_NUM_THREADS=1", a.canopy, "train", *args,
                                             "--set", "train.workers=1"])
            got[side] = (float(re.search(r"train ([\d.]+)s", stdout).group(1)), wall)
        train_one.append(got["one"][0])
        train_two.append(got["two"][0])
        wall_one.append(got["one"][1])
        wall_two.append(got["two"][1])
        train_ratio.append(got["one"][0] / got["two"][0])
    print(f"\n[train] the demo's 10 heads, {a.epochs} epochs on its cache (train.fuse = never), {a.repeats} repeats")
    print(f"  1 process x 2 workers   train {statistics.median(train_one):6.2f} s, wall {statistics.median(wall_one):6.2f} s")
    print(f"  2 ranks x 1 worker      train {statistics.median(train_two):6.2f} s, wall {statistics.median(wall_two):6.2f} s")
    print(ratio_line("train one/ranks (the demo's heads over 2 ranks)", train_ratio))

    # The top fine-tuned data parallel: the demo's heads over EfficientNet-Lite0's last two
    # blocks (freeze = first:13) trained over the cached prefix.
    tune = common + ["--set", "trunk.freeze=first:13", "--set", "trunk.lr=1e-4", "--set",
                     f"cache.path={os.path.join(work, 'tune-cache')}", "--set", f"train.epochs={a.tune_epochs}"]
    run([a.canopy, "cache", *tune], env=env1)
    tune_one, tune_two, ar_ms, tune_ratio = [], [], [], []
    for rep in range(a.repeats):
        order = ["one", "two"] if rep % 2 == 0 else ["two", "one"]
        got = {}
        for side in order:
            args = tune + ["--set", f"train.out_dir={os.path.join(work, 'tune-' + side)}"]
            if side == "one":
                cmd = [a.canopy, "train", *args, "--set", "train.workers=2"]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env1)
            else:
                cmd = MPIRUN + ["-np", "2", "-x", "OMP_NUM_THREADS=1", a.canopy, "train", *args, "--set",
                                "train.workers=1"]
                r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-1500:]}")
            got[side] = float(re.search(r"train ([\d.]+)s", r.stdout).group(1))
            if side == "two":
                per_step = [float(x) for x in re.findall(r"all-reduce of the top's gradients: ([\d.]+) ms per step", r.stderr)]
                steps = int(re.search(r"over (\d+) steps", r.stderr).group(1))
                ar_ms.append(max(per_step))
                got["steps"] = steps
        tune_one.append(got["one"])
        tune_two.append(got["two"])
        tune_ratio.append(got["one"] / got["two"])
        steps = got["steps"]
    step_ms = 1000 * statistics.median(tune_two) / steps
    print(f"\n[top] the demo's heads over EfficientNet-Lite0's top (freeze = first:13) trained data parallel, "
          f"{a.tune_epochs} epoch(s) of {a.images} images, {steps} steps, {a.repeats} repeats")
    print(f"  1 process x 2 threads   train {statistics.median(tune_one):6.2f} s")
    print(f"  2 ranks x 1 thread      train {statistics.median(tune_two):6.2f} s  ({step_ms:.1f} ms per step)")
    print(f"  all-reduce of the top's gradients: {statistics.median(ar_ms):.2f} ms per step "
          f"(min {min(ar_ms):.2f}, max {max(ar_ms):.2f}), {100 * statistics.median(ar_ms) / step_ms:.1f}% of a step")
    print(ratio_line("top one/ranks (data-parallel top over 2 ranks)", tune_ratio))


if __name__ == "__main__":
    run_main(main)
