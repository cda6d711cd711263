#!/usr/bin/env python3
"""A trunk of your own: canopy's cache build against Python inference of the same module.

torchvision's own models, scripted as a user exports them (docs/trunk.md, "Your own trunk"),
on the demo's Fashion-MNIST images preprocessed as canopy does, at 224x224, same thread count:

  ResNet-18           trunk.taps = layer4 (its 512 channels before the classifier)
  MobileNetV3-Small   trunk.expand = features, trunk.taps = features.12

  canopy               `canopy cache` with the scripted file (the time canopy reports for the
                       build: decode, trunk, HDF5 writes)
  canopy .pt2          the same with the file compiled up to its tap by scripts/export_trunk.py
                       (AOTInductor; its compile reported apart)
  python eager         the same layers up to the tap in inference mode, batch = cache.batch_size
  python channels-last the same with channels-last weights and inputs
  python compile       torch.compile (Inductor) of the eager layers, after its compile (reported
                       apart)

The weights are torchvision's initialisation (no hub can be reached here); the speed does not
depend on them. Rates are rows per second, the median of interleaved repeats.

    own_trunk_compare.py --canopy build/runners/canopy [--images 512] [--size 224] [--repeats 3]
"""
import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from canopy_runs import run_main, work_dir  # noqa: E402
from trunk_compare import canopy_rate, images, interleaved, python_rate  # noqa: E402


def resnet18():
    m = torchvision.models.resnet18().eval()
    upto = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return m, upto.eval(), {"taps": "layer4"}


def mobilenet_v3_small():
    m = torchvision.models.mobilenet_v3_small().eval()
    return m, m.features.eval(), {"expand": "features", "taps": "features.12"}


def compile_own(canopy, work, path, size, keys, tag):
    """scripts/export_trunk.py's .pt2 of the trunk file up to its tap; (package, sha, seconds)."""
    out = os.path.join(work, f"{tag}_{size}.pt2")
    flags = [f"--{k}={v}" for k, v in keys.items()]
    start = time.time()
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "scripts", "export_trunk.py"),
                        path, "--format", "pt2", "--size", str(size), "--canopy", canopy, "--out", out, *flags],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"export_trunk.py {path} --format pt2 failed: {r.stderr[-800:]}")
    return out, open(out + ".sha256").read().strip(), time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="the demo's cache.batch_size")
    a = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    work = work_dir("canopy-own-trunk-bench-")
    x = images(a.images, a.size)
    print(f"{threads} threads, batch {a.batch}, torchvision {torchvision.__version__}, Fashion-MNIST images "
          f"at {a.size}x{a.size}")
    for name, make in (("ResNet-18", resnet18), ("MobileNetV3-Small", mobilenet_v3_small)):
        torch.manual_seed(0)
        model, upto, keys = make()  # [trunk] keys
        sets = [x for k, v in keys.items() for x in ("--set", f"trunk.{k}={v}")]
        path = os.path.join(work, f"{make.__name__}.pt")
        torch.jit.script(model).save(path)
        sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
        channels_last = make()[1].to(memory_format=torch.channels_last)
        channels_last.load_state_dict(upto.state_dict())
        pt2, pt2_sha, pt2_s = compile_own(a.canopy, work, path, a.size, keys, make.__name__)
        compiled = torch.compile(upto)
        start = time.time()
        with torch.inference_mode():
            compiled(x[:a.batch])
        compile_s = time.time() - start

        def cl(b, m=channels_last):
            return m(b.contiguous(memory_format=torch.channels_last))

        runs = {
            "canopy": lambda: canopy_rate(a.canopy, work, a.images, a.size, path, sha, make.__name__, sets),
            "canopy .pt2": lambda: canopy_rate(a.canopy, work, a.images, a.size, pt2, pt2_sha, make.__name__ + "-pt2"),
            "python eager": lambda: python_rate(upto, x, a.batch),
            "python channels-last": lambda: python_rate(cl, x, a.batch),
            "python compile": lambda: python_rate(compiled, x, a.batch),
        }
        python_rate(upto, x[:a.batch], a.batch)  # warm-up
        python_rate(cl, x[:a.batch], a.batch)
        rates, med = interleaved(runs, a.repeats, f"{name} ({' '.join(sets[1::2])}), {a.images} images")
        print(f"  compile: torch.compile {compile_s:.1f} s (first call), export_trunk.py --format pt2 {pt2_s:.1f} s")
        for ours in ("canopy", "canopy .pt2"):
            for form in ("python eager", "python channels-last", "python compile"):
                ratios = [c / p for c, p in zip(rates[ours], rates[form])]
                print(f"    RATIO {name} {ours} cache build / {form} = {statistics.median(ratios):.2f} "
                      f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
        ratios = [c / p for c, p in zip(rates["canopy .pt2"], rates["canopy"])]
        print(f"    RATIO {name} canopy .pt2 / canopy TorchScript = {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    run_main(main)
