#!/usr/bin/env python3
"""Image decoding: canopy's decoders against PIL's, on the same files, one thread each.

Photo-like images (gradients and noise, 512 x 384 RGB unless --size) are written by PIL in each
format canopy reads; `decode_bench` decodes them all, one after another, and so does PIL
(Image.open(path).convert("RGB") into a numpy array, what a Python Dataset does per sample). A
pass over the files is timed on each side, alternating, --repeats times; printed: the
milliseconds per image (median) and PIL's time over canopy's (median, min and max over the
passes; above 1: canopy is faster).

    image_decode_compare.py --bench build/bench/decode_bench [--images 40] [--repeats 5]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

FORMATS = {  # name: (file suffix, PIL mode, save options)
    "PNG": ("png", "RGB", {}),
    "JPEG q90": ("jpg", "RGB", {"quality": 90}),
    "WebP lossy": ("webp", "RGB", {"quality": 80}),
    "BMP 24-bit": ("bmp", "RGB", {}),
    "BMP palette": ("p.bmp", "P", {}),
    "TIFF": ("tif", "RGB", {}),
    "TIFF LZW": ("lzw.tif", "RGB", {"compression": "tiff_lzw"}),
    "TIFF JPEG": ("jpeg.tif", "RGB", {"compression": "jpeg"}),
    "GIF": ("gif", "P", {}),
    "PPM": ("ppm", "RGB", {}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="the decode_bench executable")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", default="512x384")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"{a.images} images of {w} x {h} per format, one thread each side, {a.repeats} passes")
    print(f"{'format':12s} {'canopy ms':>10s} {'PIL ms':>8s} {'PIL/canopy':>11s} {'(min-max)':>12s}")
    with tempfile.TemporaryDirectory(prefix="canopy-decode-") as d:
        for name, (suffix, mode, options) in FORMATS.items():
            files = []
            for i in range(a.images):
                img = np.stack([(x + 3 * i) % 256, (2 * y + i) % 256, ((x + y) // 2) % 256], -1)
                img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
                path = os.path.join(d, f"{i}.{suffix}")
                Image.fromarray(img).convert(mode).save(path, **options)
                files.append(path)
            ours, theirs = [], []
            for _ in range(a.repeats):
                r = subprocess.run([a.bench, "--repeats", "1"] + files, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    sys.exit(f"decode_bench failed on {name}: {r.stderr.strip()[-400:]}")
                ours.append(float(r.stdout.split()[0]))
                t = time.perf_counter()
                for f in files:
                    with Image.open(f) as im:
                        np.asarray(im.convert("RGB"))
                theirs.append(time.perf_counter() - t)
            ratios = [p / c for p, c in zip(theirs, ours)]
            print(f"{name:12s} {statistics.median(ours) * 1000 / a.images:10.2f} "
                  f"{statistics.median(theirs) * 1000 / a.images:8.2f} {statistics.median(ratios):10.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    sys.exit(main())
