#!/usr/bin/env python3
"""canopy over MPI ranks on one machine, side by side with one process:

  cache   `canopy cache` of the demo's images through EfficientNet-Lite0 (a subset, --images),
          rebuilt from nothing each time: one process with 2 LibTorch threads against
          `mpirun -np 2` with 1 thread per rank (--bind-to none). RATIO one/ranks: goal >= 0.9
          (MPI costs nothing on one machine: the ranks split the shards, nothing else).
  train   the demo's ten heads on the demo cache: one process with 2 TBB workers against
          `mpirun -np 2` with 1 worker per rank. RATIO one/ranks, on the training time each
          reports (and the wall time of the whole command beside it).
  top     the all-reduce time per step of a data-parallel fine-tuned top: not measured (the
          data-parallel top is not built yet; `mpirun canopy train` refuses a trainable top).

Each repeat runs the two sides back to back, in alternating order. The cache is a scratch
copy; the demo's own cache (runs/fmnist_lite0/cache) is read, never written, by the train rows.

  mpi_compare.py --canopy BUILD/runners/canopy [--config configs/fmnist_lite0.ini]
                 [--images 4096] [--repeats 3] [--epochs 5]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="canopy-mpi-bench-")
    env1 = dict(os.environ, OMP_NUM_THREADS="2")
    common = ["--config", a.config, "--progress", "quiet", "--set", f"data.train_limit={a.images}",
              "--set", f"data.test_limit={a.images // 4}"]

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
    print("\n[top] all-reduce time per step of a data-parallel top: not measured (not built yet)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
