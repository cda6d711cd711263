#!/usr/bin/env python3
"""Image files as users have them give the same cache as the idx files they came from.

Fashion-MNIST images are written here as PNG files (a minimal PNG writer: zlib-compressed
8-bit grey rows), listed once in CSV manifests (path,class,name,ink) and once in class
folders (train/<class name>/<n>.png). `canopy cache` runs on the idx files, on the CSV
manifests and on the folders with the same tiny trunk; h5py reads the three caches:
  * CSV: the same features, bitwise, and the same class column, in the same order; the
    class-name column numbered by sorted name; a real-valued column stored as float64;
  * folders: the same features per image (rows in folder order: class name, then file).
"""
import os
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np

from support import FMNIST, check, finish, read_idx, start, tiny_conv_trunk

NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TRAIN, TEST = 60, 30



def write_png(path, img):
    """8-bit greyscale PNG, no filtering."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def config(work, trunk, name, data):
    path = os.path.join(work, name + ".ini")
    with open(path, "w") as f:
        f.write(f"""[data]
{data}
train_limit = {TRAIN}
test_limit = {TEST}

[preprocess]
resize = 32
channels = 3
mean = 0.5
std = 0.5

[trunk]
allow_unpinned = true
path = {trunk}
device = cpu
pooling = avg

[cache]
path = {work}/{name}
batch_size = 16
shard_rows = 32
""")
    return path


def main():
    canopy, work, trunk = start("canopy-images-", tiny_conv_trunk, "tiny.pt")
    images = {"train": read_idx(f"{FMNIST}/train-images-idx3-ubyte.gz")[:TRAIN],
              "test": read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:TEST]}
    labels = {"train": read_idx(f"{FMNIST}/train-labels-idx1-ubyte.gz")[:TRAIN],
              "test": read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:TEST]}
    folder_order = {}
    for split in ("train", "test"):
        rows = ["path,class,name,ink"]
        for i, (img, y) in enumerate(zip(images[split], labels[split])):
            os.makedirs(os.path.join(work, "folders", split, NAMES[y]), exist_ok=True)
            rel = os.path.join("folders", split, NAMES[y], f"{i:05d}.png")
            write_png(os.path.join(work, rel), img)
            rows.append(f"{rel},{y},\"{NAMES[y]}\",{img.mean() / 255:.17g}")
        with open(os.path.join(work, f"{split}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
        folder_order[split] = sorted(range(len(labels[split])), key=lambda i: (NAMES[labels[split][i]], i))

    runs = {
        "idx": "source = fashion-mnist\ndir = " + FMNIST,
        "csv": f"source = image-csv\ntrain = {work}/train.csv\ntest = {work}/test.csv",
        "folders": f"source = image-folders\ntrain = {work}/folders/train\ntest = {work}/folders/test",
    }
    caches = {}
    for name, data in runs.items():
        r = subprocess.run([canopy, "cache", "--config", config(work, trunk, name, data), "--progress", "quiet"],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"canopy cache from {name}" + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
        if r.returncode != 0:
            return finish()
        caches[name] = h5py.File(os.path.join(work, name, "cache.h5"), "r")

    for split in ("train", "test"):
        ref = caches["idx"][f"{split}/features"][...]
        csv = caches["csv"][f"{split}/features"]
        check(csv.shape == ref.shape and np.array_equal(csv[...], ref),
              f"{split}: CSV-listed PNGs give bitwise the idx features {ref.shape}")
        check(np.array_equal(caches["csv"][f"{split}/labels/class"][...], labels[split]), f"{split}: CSV class column")
        by_name = caches["csv"][f"{split}/labels/name"][...]
        sorted_names = sorted(set(NAMES[y] for y in labels["train"]))
        check(all(sorted_names[k] == NAMES[y] for k, y in zip(by_name, labels[split])),
              f"{split}: class-name column numbered in sorted name order")
        ink = caches["csv"][f"{split}/labels/ink"]
        check(ink.dtype == np.float64 and np.allclose(ink[...], images[split].reshape(len(ink), -1).mean(1) / 255),
              f"{split}: real-valued column stored as float64")
        order = folder_order[split]
        folders = caches["folders"][f"{split}/features"][...]
        check(np.array_equal(folders, ref[order]), f"{split}: class folders give the same features, in folder order")
        folder_labels = caches["folders"][f"{split}/labels/class"][...]
        check([sorted_names[k] for k in folder_labels] == [NAMES[labels[split][i]] for i in order],
              f"{split}: folder classes numbered by sorted folder name")
    names = caches["folders"].attrs["class_names"]
    names = (names.decode() if isinstance(names, bytes) else names).split(",")
    check(names == sorted(set(NAMES[y] for y in labels["train"])), f"class names recorded: {names[:3]}...")

    # A broken image is an error naming the file, and the cache is not marked complete.
    with open(os.path.join(work, "folders", "test", NAMES[labels["test"][0]], "00000.png"), "r+b") as f:
        f.truncate(40)
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "broken", runs["folders"]), "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "00000.png" in r.stderr and "cannot decode PNG" in r.stderr,
          f"a truncated PNG fails the run naming it (exit {r.returncode}: {r.stderr.strip()[-160:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
