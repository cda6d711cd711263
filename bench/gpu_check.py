#!/usr/bin/env python3
"""The trunk pass on a GPU (run by bench/gpu_check): EfficientNet-Lite0 to blocks.13 on
Fashion-MNIST images at 64x64 and 224x224, batch 128, rows per second (median of 3).

  python eager fp32 / channels-last / bf16 autocast / torch.compile / .pt2 (AOTInductor, CUDA)
  canopy cache with the TorchScript trunk, with it under trunk.precision = bfloat16, and with
  the CUDA .pt2 (with --canopy)

Prints the GPU's name and RATIO lines: P2b (canopy .pt2 cache build / fastest Python) and
canopy's TorchScript build against it.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import export_trunk  # noqa: E402
from trunk_compare import CONFIG, FMNIST, HOME, images  # noqa: E402
from canopy_runs import run_main, work_dir  # noqa: E402


def rate(run, x, batch, repeats=3):
    with torch.inference_mode():
        run(x[:batch])
        out = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, x.shape[0], batch):
                run(x[i:i + batch])
            torch.cuda.synchronize()
            out.append(x.shape[0] / (time.perf_counter() - start))
    return statistics.median(out)


def canopy_rate(canopy, work, n, size, trunk, sha, tag, repeats=3, extra=()):
    out = []
    for _ in range(repeats):
        r = subprocess.run([canopy, "cache", "--config", CONFIG, "--force", "--progress", "quiet", "--set",
                            f"data.train_limit={n}", "--set", "data.test_limit=1", "--set", f"data.dir={FMNIST}", "--set", f"preprocess.resize={size}",
                            "--set", f"cache.path={work}/c-{size}-{tag}", "--set", f"trunk.path={trunk}", "--set",
                            f"trunk.sha256={sha}", "--set", "trunk.device=cuda", *extra], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"canopy cache ({tag}, {size}) failed: {r.stderr[-600:]}")
        out.append((n + 1) / float(re.search(r"time\s+([\d.]+) s", r.stdout + r.stderr).group(1)))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy")
    ap.add_argument("--images", default="12000,4096")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: bench/gpu_check runs on a machine with a GPU")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    work = work_dir("canopy-gpu-")
    ts_path = os.path.join(HOME, "trunks", "efficientnet_lite0.pt")
    ts_sha = re.search(r"sha256 = (\w+)", open(CONFIG).read()).group(1)
    module = export_trunk.BlockFeatures(export_trunk.efficientnet_lite0(False).eval(), 13).eval().cuda()
    for size, n in zip((64, 224), map(int, a.images.split(","))):
        x = images(n, size).cuda()
        pt2 = os.path.join(work, f"lite0_{size}_cuda.pt2")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "export_trunk.py"), "efficientnet_lite0",
                        "--format", "pt2", "--device", "cuda", "--size", str(size), "--out", pt2], check=True)
        package = torch._inductor.aoti_load_package(pt2)
        cl = export_trunk.BlockFeatures(export_trunk.efficientnet_lite0(False).eval(), 13).eval().cuda()
        cl = cl.to(memory_format=torch.channels_last)
        compiled = torch.compile(module)

        def bf16(b):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(b)

        rates = {
            "python eager fp32": rate(module, x, 128),
            "python channels-last": rate(lambda b: cl(b.contiguous(memory_format=torch.channels_last)), x, 128),
            "python bf16 autocast": rate(bf16, x, 128),
            "python compile": rate(compiled, x, 128),
            "python pt2": rate(lambda b: package(b), x, 128),
        }
        if a.canopy:
            rates["canopy TorchScript"] = canopy_rate(a.canopy, work, n, size, ts_path, ts_sha, "ts")
            rates["canopy pt2"] = canopy_rate(a.canopy, work, n, size, pt2, open(pt2 + ".sha256").read().strip(), "pt2")
            rates["canopy TorchScript bf16"] = canopy_rate(a.canopy, work, n, size, ts_path, ts_sha, "bf16",
                                                           extra=["--set", "trunk.precision=bfloat16"])
        print(f"\n{size}x{size}, {n} images, rows/s:")
        for k, v in rates.items():
            print(f"  {k:22s} {v:10.1f}")
        best = max((k for k in rates if k.startswith("python")), key=rates.get)
        if a.canopy:
            for form in ("pt2", "TorchScript"):
                print(f"    RATIO canopy {form} cache build / fastest python ({best}) at {size}x{size} on GPU = "
                      f"{rates['canopy ' + form] / rates[best]:.2f}")
            print(f"    RATIO canopy TorchScript bf16 (trunk.precision) / python bf16 autocast at {size}x{size} on GPU = "
                  f"{rates['canopy TorchScript bf16'] / rates['python bf16 autocast']:.2f}")


if __name__ == "__main__":
    run_main(main)
