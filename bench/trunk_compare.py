#!/usr/bin/env python3
"""P2b: canopy's cache build against the fastest Python inference of the same weights.

For each image size (the demo's 64x64, and 224x224): the pretrained EfficientNet-Lite0 up to
blocks.13 (the demo's trunk), on the demo's Fashion-MNIST images preprocessed as canopy does
(bilinear resize, grey replicated to 3 channels, (x - 0.5) / 0.5), same thread count.

  canopy TorchScript   `canopy cache` with the TorchScript trunk (the time canopy reports for
                        the build: decode, trunk, HDF5 writes)
  canopy pt2           `canopy cache` with an AOTInductor package compiled for this size here
  python eager         the module in inference mode, batch = cache.batch_size
  python channels-last the same with channels-last weights and inputs
  python compile       torch.compile (Inductor) of the eager module, after its compile
  ... kept heap        the Python forms again with glibc's malloc keeping freed memory (no
                       mmap, no trim: mallopt through ctypes), as canopy does during a trunk
                       pass; without it every batch page-faults its activations in again
  python cache job     what a user's caching script does around the compiled module (kept
                       heap): read the idx file, per batch resize and normalise as canopy does,
                       run, average-pool, write the features with h5py. Reported beside the
                       goal, which is against the forward passes alone

Rates are rows per second, the median of interleaved repeats. Compile times (torch.compile's
first call, AOTInductor's package build) are reported apart, with the data set size from which
each pays for itself against the fastest form that needs no compile.

    trunk_compare.py --canopy build/runners/canopy [--sizes 64,224] [--images 2048,512] [--repeats 3]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
import export_trunk  # noqa: E402
from support import FMNIST, read_idx  # noqa: E402
from canopy_runs import run_main, work_dir  # noqa: E402

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
CONFIG = os.path.join(ROOT, "configs", "fmnist_lite0.ini")


def raw_images(n):
    """The first n Fashion-MNIST training images, uint8 [n, 28, 28]."""
    return torch.from_numpy(read_idx(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))[:n].copy())


def preprocess(raw, size):
    """uint8 [B, 28, 28] -> the demo's trunk input [B, 3, size, size], as canopy makes it."""
    x = torch.nn.functional.interpolate(raw[:, None].float() / 255, size=(size, size), mode="bilinear",
                                        align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def images(n, size):
    return preprocess(raw_images(n), size)


def python_rate(run, x, batch, kept_heap=False):
    if kept_heap:
        with export_trunk.KeptHeap():
            return python_rate(run, x, batch)
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, x.shape[0], batch):
            run(x[i:i + batch].contiguous())
        return x.shape[0] / (time.perf_counter() - start)


def python_cache_rate(run, n, size, batch, path):
    """A user's caching script around `run`, timed whole: rows per second."""
    import h5py
    with export_trunk.KeptHeap(), torch.inference_mode():
        start = time.perf_counter()
        raw = raw_images(n)
        with h5py.File(path, "w") as f:
            features = None
            for i in range(0, n, batch):
                y = run(preprocess(raw[i:i + batch], size)).mean((2, 3))
                if features is None:
                    features = f.create_dataset("features", (n, y.shape[1]), dtype="float32")
                features[i:i + y.shape[0]] = y.numpy()
        return n / (time.perf_counter() - start)


def canopy_rate(canopy, work, n, size, trunk, sha, tag, extra=()):
    """Rows per second of `canopy cache` over the first n images at size x size with `trunk`
    (pinned by `sha`), as canopy reports the build's time; `extra`: more arguments."""
    cache = os.path.join(work, f"cache-{size}-{tag}")
    r = subprocess.run([canopy, "cache", "--config", CONFIG, "--force", "--progress", "quiet",
                        "--set", f"data.train_limit={n}", "--set", "data.test_limit=1", "--set", f"data.dir={FMNIST}", "--set",
                        f"preprocess.resize={size}", "--set", f"cache.path={cache}", "--set", f"trunk.path={trunk}",
                        "--set", f"trunk.sha256={sha}", *extra], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"canopy cache ({tag}, {size}) failed: {r.stderr[-800:]}")
    seconds = float(re.search(r"time\s+([\d.]+) s", r.stdout + r.stderr).group(1))
    return (n + 1) / seconds


def interleaved(runs, repeats, what):
    """Each of `runs` (name: a function giving rows/s) `repeats` times, interleaved; prints
    the medians with their min-max under `what`. Returns (rates per name, median per name)."""
    rates = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            rates[k].append(run())
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{what} (median of {repeats}, rows/s; min-max):")
    width = max(map(len, runs))
    for k, v in rates.items():
        print(f"  {k:{width}s} {med[k]:8.1f}   ({min(v):.1f}-{max(v):.1f})")
    return rates, med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--images", default="12000,1024",
                    help="images per size (default: the demo's 12 000 at 64x64, 1 024 at 224x224)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="the demo's cache.batch_size")
    a = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    work = work_dir("canopy-trunk-bench-")
    ts_path = os.path.join(HOME, "trunks", "efficientnet_lite0.pt")
    ts_sha = re.search(r"sha256 = (\w+)", open(CONFIG).read()).group(1)
    net = export_trunk.efficientnet_lite0(False).eval()
    module = export_trunk.BlockFeatures(net, 13).eval()
    print(f"{threads} threads, batch {a.batch}, EfficientNet-Lite0 to blocks.13, Fashion-MNIST images")
    for size, n in zip(map(int, a.sizes.split(",")), map(int, a.images.split(","))):
        x = images(n, size)
        # The .pt2 for this size, compiled here (timed).
        pt2 = os.path.join(work, f"lite0_{size}.pt2")
        start = time.time()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_trunk.py"), "efficientnet_lite0",
                            "--format", "pt2", "--size", str(size), "--out", pt2], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"export --format pt2 --size {size} failed: {r.stderr[-800:]}")
        aoti_compile = time.time() - start
        pt2_sha = open(pt2 + ".sha256").read().strip()
        channels_last = export_trunk.BlockFeatures(export_trunk.efficientnet_lite0(False).eval(), 13).eval()
        channels_last = channels_last.to(memory_format=torch.channels_last)
        compiled = torch.compile(module)
        start = time.time()
        with torch.inference_mode():
            compiled(x[:a.batch])
        torch_compile = time.time() - start
        def cl(b):
            return channels_last(b.contiguous(memory_format=torch.channels_last))

        runs = {
            "canopy TorchScript": lambda: canopy_rate(a.canopy, work, n, size, ts_path, ts_sha, "ts"),
            "canopy pt2": lambda: canopy_rate(a.canopy, work, n, size, pt2, pt2_sha, "pt2"),
            "python eager": lambda: python_rate(module, x, a.batch),
            "python channels-last": lambda: python_rate(cl, x, a.batch),
            "python compile": lambda: python_rate(compiled, x, a.batch),
            "python eager, kept heap": lambda: python_rate(module, x, a.batch, True),
            "python channels-last, kept heap": lambda: python_rate(cl, x, a.batch, True),
            "python compile, kept heap": lambda: python_rate(compiled, x, a.batch, True),
            "python cache job (compile)": lambda: python_cache_rate(compiled, n, size, a.batch,
                                                                    os.path.join(work, f"python-{size}.h5")),
        }
        python_rate(module, x[:a.batch], a.batch)  # warm-up
        python_rate(cl, x[:a.batch], a.batch)
        rates, med = interleaved(runs, a.repeats, f"{size}x{size}, {n} images")
        print(f"  compile: torch.compile {torch_compile:.1f} s (first call), AOTInductor package {aoti_compile:.1f} s")
        py_best = max((k for k in med if k.startswith("python") and "job" not in k), key=med.get)
        no_compile = max((k for k in med if k.startswith("python") and "compile" not in k), key=med.get)
        with_compile = max((k for k in med if k.startswith("python compile")), key=med.get)
        if med[with_compile] > med[no_compile]:
            pays = torch_compile / (1 / med[no_compile] - 1 / med[with_compile])
            print(f"  torch.compile pays for its compile from {pays:.0f} images on (against {no_compile})")
        if med["canopy pt2"] > med["canopy TorchScript"]:
            pays = aoti_compile / (1 / med["canopy TorchScript"] - 1 / med["canopy pt2"])
            print(f"  the pt2 package pays for its compile from {pays:.0f} images on (against canopy TorchScript)")
        # The goal holds for each form: the compiled package and the TorchScript file (whose
        # convolutions canopy fuses) are both ways a user builds a cache.
        for form in ("pt2", "TorchScript"):
            ratios = [c / p for c, p in zip(rates[f"canopy {form}"], rates[py_best])]
            print(f"    RATIO canopy {form} cache build / fastest python ({py_best}) at {size}x{size} = "
                  f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})   goal >= 1.0")
        faster = max(("pt2", "TorchScript"), key=lambda form: med[f"canopy {form}"])
        job = [c / p for c, p in zip(rates[f"canopy {faster}"], rates["python cache job (compile)"])]
        print(f"    RATIO canopy {faster} (its faster form) cache build / python cache job (compile, kept heap) at "
              f"{size}x{size} = {statistics.median(job):.2f} (min {min(job):.2f}, max {max(job):.2f})   goal (reported)")
        with open(os.path.join(work, f"rates-{size}.json"), "w") as f:
            json.dump(rates, f)


if __name__ == "__main__":
    run_main(main)
