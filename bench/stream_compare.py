#!/usr/bin/env python3
"""Where reading once matters most: 8 linear heads over a cache larger than the memory
cap, streamed from a cold file, in one `canopy train` against 8 separate runs.

The cache: all 60 000 Fashion-MNIST training images (and 2 000 test images) at 64x64 through
EfficientNet-Lite0 up to its last layer (1280 features per image, 293 MiB of float32),
exported by scripts/export_trunk.py --tap final if not there yet. Training streams it under
cache.memory_cap_mb (default 96 MiB, a third of the cache). Before every `canopy train`
process the cache's files are evicted from the page cache (posix_fadvise DONTNEED on every
file; no root needed, unlike drop_caches), so each process starts from a cold file, and the
measured read speed cold vs warm is printed to show the eviction took. Then, per repeat:

  one       one `canopy train` with the 8 heads (learning rates 1e-4 .. 3e-2)
  separate  8 `canopy train` processes, one head each, run one after the other

RATIO separate/one = the 8 separate wall times summed over the one run's (goal >= 5). Every
run is a whole `canopy train` with its defaults (fusion decided by timing, recorded in a
scratch calibration file by an untimed first run).

  stream_compare.py --canopy BUILD/runners/canopy [--repeats 3] [--epochs 2] [--cap-mb 96]
                    [--trunk PATH.pt] [--set KEY=VALUE ...]
"""
import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import time

from canopy_runs import run_main, work_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = ["1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "5e-4", "5e-3"]


def evict(directory):
    """Drops the files under `directory` from the page cache."""
    for base, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_speed(directory):
    t = time.time()
    n = 0
    for base, _, files in os.walk(os.path.join(directory, "shards")):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                while True:
                    b = f.read(1 << 24)
                    if not b:
                        break
                    n += len(b)
    return n / (1 << 20) / (time.time() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cap-mb", type=float, default=96)
    ap.add_argument("--trunk", default=os.path.join(os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy")),
                                                    "trunks", "efficientnet_lite0_final.pt"))
    ap.add_argument("--work", default=None, help="keep the cache here (default: a new temporary folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to every `canopy train` (e.g. train.flush_denormals=false)")
    a = ap.parse_args()
    if not os.path.exists(a.trunk):
        print(f"exporting the trunk to its last layer: {a.trunk}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_trunk.py"), "efficientnet_lite0",
                        "--tap", "final", "--out", a.trunk], check=True)
    sha = hashlib.sha256(open(a.trunk, "rb").read()).hexdigest()
    work = a.work or work_dir("canopy-stream-bench-")
    os.makedirs(work, exist_ok=True)
    cache = os.path.join(work, "cache")
    common = f"""[data]
source = fashion-mnist
dir = /usr/share/datasets/fashion-mnist
train_limit = 0
test_limit = 2000
[preprocess]
resize = 64
channels = 3
mean = 0.5
std = 0.5
[trunk]
path = {a.trunk}
sha256 = {sha}
pooling = avg
[cache]
path = {cache}
batch_size = 128
shard_rows = 4096
memory_cap_mb = {a.cap_mb}
[train]
batch_size = 256
epochs = {a.epochs}
"""

    def write(name, lrs):
        path = os.path.join(work, name + ".ini")
        with open(path, "w") as f:
            f.write(common + "".join(f"\n[task.lin{LRS.index(lr)}]\nhead = linear\nlr = {lr}\n" for lr in lrs))
        return path
    one = write("one", LRS)
    separate = [write(f"sep{i}", [lr]) for i, lr in enumerate(LRS)]
    t = time.time()
    r = subprocess.run([a.canopy, "cache", "--config", one, "--progress", "quiet"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"canopy cache failed: {r.stderr[-1000:]}")
    print(f"cache: {time.time() - t:.1f}s to build or check; {sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in os.walk(cache) for f in fs) / (1 << 20):.0f} MiB on disk", flush=True)
    warm = read_speed(cache)
    evict(cache)
    cold = read_speed(cache)
    print(f"eviction: reading the shards warm {warm:.0f} MiB/s, after posix_fadvise(DONTNEED) {cold:.0f} MiB/s", flush=True)

    def train(config, out):
        evict(cache)
        t = time.time()
        r = subprocess.run([a.canopy, "train", "--config", config, "--progress", "quiet", "--set",
                            f"train.out_dir={out}"] + [x for kv in a.set for x in ("--set", kv)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"canopy train {config} failed: {r.stderr[-1000:]}")
        if "streaming" not in r.stderr:
            sys.exit(f"{config}: the train split was not streamed; lower --cap-mb")
        inside.append(float(re.search(r"train ([\d.]+)s", r.stdout).group(1)))
        return time.time() - t

    # train.fuse = auto times the 8 heads fused and alone the first time it meets them and
    # records the decision; a first, untimed run does that, so every timed run reads it.
    os.environ["CANOPY_FUSION_CALIBRATION"] = os.path.join(work, "fusion.tsv")
    inside = []  # the training time each run reports
    train(one, os.path.join(work, "warm-up"))
    ratios = []
    for rep in range(a.repeats):
        inside.clear()
        t_one = train(one, os.path.join(work, f"one-{rep}"))
        t_sep = [train(c, os.path.join(work, f"sep-{rep}-{i}")) for i, c in enumerate(separate)]
        ratios.append(sum(t_sep) / t_one)
        print(f"repeat {rep + 1}: one run with 8 heads {t_one:.1f}s (training {inside[0]:.2f}s); 8 separate runs "
              f"{sum(t_sep):.1f}s ({', '.join(f'{x:.1f}' for x in t_sep)}; training "
              f"{', '.join(f'{x:.2f}' for x in inside[1:])})", flush=True)
    print(f"\nRATIO separate/one (8 linear heads, streamed cold under {a.cap_mb:g} MiB) = {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})  goal >= 5")


if __name__ == "__main__":
    run_main(main)
