#!/usr/bin/env python3
"""The input-file fuzzer: seeded damage to the data files users point canopy at, each run
through the real binary. Small data sets are written at test time, all from Fashion-MNIST:

  * idx files, plain and gzip (40 training, 20 test images);
  * PNG files in class folders (grey, RGB, RGBA and palette; every fifth one 40x33);
  * JPEG files in class folders (grey and RGB, a third of them progressive);
  * BMP, TIFF (uncompressed, LZW, Deflate, PackBits, JPEG) and Netpbm (P4, P5, P6) files in
    class folders, and GIF files in a CSV manifest (class folders leave GIFs out, as ImageFolder);
  * a CSV manifest of the PNGs (path, class, class name), and a JSON lines one (file_name,
    class, class name, a list of tags);
  * an ARFF file with quoted texts, escapes and comments (read by `canopy tokenize --arff`);
  * a CSV table of texts, quoted ones holding commas, quotes and line breaks, with labels (read
    by `canopy tokenize --input texts.csv`);
  * the same as JSON lines, with escapes, true/false, null and lists of labels (`tokenize
    --input texts.jsonl`), and the CSV table gzip-compressed (`tokenize --input texts.csv.gz`).

A mutant is one of them with a bit flipped (half of the flips in the first 64 bytes, where the
headers are), cut short, or with four bytes set to 0x00, 0x7f, 0x80 or 0xff. `canopy cache`
(or `tokenize`) must then end with exit 0 (the damage was data, e.g. a pixel) or 1 with
canopy's own error; a mutant fails the test when canopy

  - dies by a signal or exits with another status;
  - prints "unexpected error" or "LibTorch error" (an exception it did not make its own: e.g.
    LibTorch's allocator asked for the 100 GB a flipped idx header declared);
  - peaks above 1 GiB of memory (a 1.1 MB PNG declaring 20000 x 20000 pixels took 11.3 GiB), or
    runs past 60 s.

Replay: --seed S --only N reruns mutant N and keeps its files.

    test_input_fuzz.py --canopy build/runners/canopy [--seed 20261202] [--count 120]
"""
import argparse
import gzip
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image

import support
from support import FMNIST, check, finish, read_idx, run_measured, tiny_conv_trunk, work_dir

TRAIN, TEST = 40, 20
KINDS = ("idx", "idxgz", "png", "jpg", "bmp", "tif", "gif", "ppm", "csv", "csvtags", "imagejson", "arff", "textcsv",
         "textjson", "textcsvgz")
# How each image format's files are written: PIL modes in turn, and save options.
MODES = {"png": ("L", "RGB", "RGBA", "P"), "jpg": ("L", "RGB"), "bmp": ("L", "RGB", "P", "1"),
         "tif": ("L", "RGB", "P", "1", "RGBA"), "gif": ("L", "P"), "ppm": ("L", "RGB", "1")}
TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg")


def idx_bytes(a):
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


def write_inputs(base):
    """The undamaged data sets under `base`."""
    images = {"train": read_idx(f"{FMNIST}/train-images-idx3-ubyte.gz")[:TRAIN],
              "test": read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:TEST]}
    labels = {"train": read_idx(f"{FMNIST}/train-labels-idx1-ubyte.gz")[:TRAIN],
              "test": read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:TEST]}
    os.makedirs(f"{base}/idx")
    os.makedirs(f"{base}/idxgz")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, a in (("images-idx3", images[split]), ("labels-idx1", labels[split])):
            with open(f"{base}/idx/{prefix}-{kind}-ubyte", "wb") as f:
                f.write(idx_bytes(a))
            with open(f"{base}/idxgz/{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(gzip.compress(idx_bytes(a), mtime=0))
    for ext in MODES:
        for split in ("train", "test"):
            rows = ["path,class,name"]
            tagged = ["path,tags,class"]  # tags as a column of labels separated by | (data.list_columns)
            records = []
            for i, (img, y) in enumerate(zip(images[split], labels[split])):
                folder = f"{base}/{ext}/{split}/c{y}"
                os.makedirs(folder, exist_ok=True)
                mode = MODES[ext][i % len(MODES[ext])]
                pil = Image.fromarray(img).convert(mode)
                if i % 5 == 0:
                    pil = pil.resize((40, 33))
                options = {"jpg": {"quality": 90, "progressive": i % 3 == 0},
                           "tif": {"compression": TIFF_COMPRESSIONS[i % len(TIFF_COMPRESSIONS)]
                                   if mode in ("L", "RGB") else TIFF_COMPRESSIONS[i % 4]}}.get(ext, {})
                name = f"{i}.{ext}"  # a .ppm holds P4, P5 or P6 as the mode says: read by content
                pil.save(f"{folder}/{name}", **options)
                rows.append(f"{split}/c{y}/{name},{y},name{y}")
                tagged.append(f"{split}/c{y}/{name},{' | '.join(['a', 'b'][:i % 3])},{y}")
                records.append(json.dumps({"class": int(y), "file_name": f"{split}/c{y}/{name}",
                                           "name": f"name{y}", "tags": ["a", "b"][:i % 3]}) + "\n")
            with open(f"{base}/{ext}/{split}.csv", "w") as f:
                f.write("\n".join(rows) + "\n")
            with open(f"{base}/{ext}/{split}.jsonl", "w") as f:
                f.write("".join(records))
            with open(f"{base}/{ext}/{split}_tags.csv", "w") as f:
                f.write("\n".join(tagged) + "\n")
    os.makedirs(f"{base}/arff")
    with open(f"{base}/arff/vocab.txt", "w") as f:
        f.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\nsat\n##s\non\nmat\n")
    body = "% a comment\n@relation r\n@attribute Text string\n@attribute c {no,yes}\n@data\n"
    body += "".join(f"'the cat {i} sat\\n on \\u00e9 \\101 mat',{'yes' if i % 2 else 'no'}\n" if i % 3 else
                    f"\"dq {i}, x\",no % a comment\n" for i in range(30))
    with open(f"{base}/arff/a.arff", "w") as f:
        f.write(body)
    with open(f"{base}/arff/texts.csv", "w", newline="") as f:
        f.write("topic,Text,score\r\n" + "".join(
            f"{'yes' if i % 2 else 'no'},\"the cat {i}, \"\"sat\"\"\r\non the mat\",{i / 4}\r\n" if i % 3 else
            f"no,the mat {i},{i}\r\n" for i in range(30)))
    with open(f"{base}/arff/texts.jsonl", "w") as f:
        f.write("".join(json.dumps({"topic": "yes" if i % 2 else "no", "Text": f"the cat {i}, \"sat\"\non \u00e9",
                                    "score": i / 4, "flag": bool(i % 3), "none": None,
                                    "tags": ["mat", "cat"][:i % 3]}) + "\n" for i in range(30)))
    with open(f"{base}/arff/texts.csv", "rb") as f:
        data = f.read()
    with open(f"{base}/arff/texts.csv.gz", "wb") as f:
        f.write(gzip.compress(data, mtime=0))


def job(folder, kind, trunk):
    """The config of a cache job over `folder`'s copy of the inputs of `kind`."""
    data = {"idx": f"source = fashion-mnist\ndir = {folder}/idx",
            "idxgz": f"source = fashion-mnist\ndir = {folder}/idxgz",
            "png": f"source = image-folders\ntrain = {folder}/png/train\ntest = {folder}/png/test",
            "jpg": f"source = image-folders\ntrain = {folder}/jpg/train\ntest = {folder}/jpg/test",
            "bmp": f"source = image-folders\ntrain = {folder}/bmp/train\ntest = {folder}/bmp/test",
            "tif": f"source = image-folders\ntrain = {folder}/tif/train\ntest = {folder}/tif/test",
            "ppm": f"source = image-folders\ntrain = {folder}/ppm/train\ntest = {folder}/ppm/test",
            "gif": f"source = image-csv\ntrain = {folder}/gif/train.csv\ntest = {folder}/gif/test.csv",
            "csv": f"source = image-csv\ntrain = {folder}/png/train.csv\ntest = {folder}/png/test.csv",
            "csvtags": f"source = image-csv\ntrain = {folder}/png/train_tags.csv\ntest = {folder}/png/test_tags.csv\n"
                       "list_columns = tags\nlist_separator = |",
            "imagejson": f"source = image-json\ntrain = {folder}/png/train.jsonl\ntest = {folder}/png/test.jsonl"}[kind]
    path = f"{folder}/job.ini"
    with open(path, "w") as f:
        f.write(f"[data]\n{data}\n[preprocess]\nresize = 28\n[trunk]\nallow_unpinned = true\npath = {trunk}\n"
                f"device = cpu\npooling = avg\n[cache]\npath = {folder}/cache\nbatch_size = 16\nshard_rows = 16\n")
    return path


def targets(folder, kind):
    sub = {"idxgz": "idxgz", "idx": "idx", "png": "png", "jpg": "jpg", "bmp": "bmp", "tif": "tif", "gif": "gif",
           "ppm": "ppm", "csv": "png", "csvtags": "png", "imagejson": "png",
           "arff": "arff",
           "textcsv": "arff", "textjson": "arff", "textcsvgz": "arff"}[kind]
    out = []
    for root, _, names in os.walk(f"{folder}/{sub}"):
        for name in names:
            wanted = {"csv": name.endswith(".csv") and not name.endswith("_tags.csv"),
                      "csvtags": name.endswith("_tags.csv"),
                      "arff": name.endswith(".arff"), "textcsv": name.endswith(".csv"),
                      "textjson": name.endswith(".jsonl"), "imagejson": name.endswith(".jsonl"),
                      "textcsvgz": name.endswith(".csv.gz"),
                      "png": name.endswith(".png"), "jpg": name.endswith(".jpg"), "bmp": name.endswith(".bmp"),
                      "tif": name.endswith(".tif"), "gif": name.endswith(".gif"),
                      "ppm": name.endswith(".ppm")}.get(kind, True)
            if wanted:
                out.append(os.path.join(root, name))
    return sorted(out)


def damage(path, rng):
    """Damages the file in place; returns what was done."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    op = rng.random()
    if op < 0.75 or len(data) < 2:
        at = rng.randrange(min(64, len(data))) if rng.random() < 0.5 else rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        data[at] ^= bit
        what = f"bit {bit} of byte {at} flipped"
    elif op < 0.9:
        at = rng.randrange(len(data))
        del data[at:]
        what = f"cut at byte {at}"
    else:
        at = rng.randrange(len(data))
        value = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        data[at:at + 4] = bytes([value] * 4)
        what = f"bytes {at}..{at + 3} set to {value:#04x}"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return what


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--count", type=int, default=120)
    ap.add_argument("--only", type=int, default=None, help="run mutant N alone and keep its files")
    a = ap.parse_args()
    canopy = os.path.abspath(a.canopy)
    work = work_dir("canopy-input-fuzz-")
    torch.manual_seed(0)
    trunk = os.path.join(work, "tiny.pt")
    torch.jit.script(tiny_conv_trunk().eval()).save(trunk)
    base = os.path.join(work, "base")
    write_inputs(base)

    limit = 60 * support.slowdown()
    rng = random.Random(a.seed)
    outcomes = {}
    problems = []
    print(f"seed {a.seed}: {a.count} damaged input files (replay one with --seed {a.seed} --only N)", flush=True)
    for n in range(a.count):
        kind = rng.choice(KINDS)
        folder = os.path.join(work, "m")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder)
        path = rng.choice(targets(folder, kind))
        what = f"mutant {n}: {os.path.relpath(path, folder)}, {damage(path, rng)}"
        if a.only is not None and n != a.only:
            continue
        if kind == "arff":
            cmd = [canopy, "tokenize", "--vocab", f"{folder}/arff/vocab.txt", "--arff", path, "--attribute", "Text"]
        elif kind in ("textcsv", "textjson", "textcsvgz"):
            cmd = [canopy, "tokenize", "--vocab", f"{folder}/arff/vocab.txt", "--input", path]
        else:
            cmd = [canopy, "cache", "--config", job(folder, kind, trunk), "--progress", "quiet"]
        rc, err, peak_mb, seconds = run_measured(cmd, timeout=limit)
        last = ([line for line in err.splitlines() if line.startswith("canopy:")] or [err.strip()[-300:]])[-1]
        outcomes[(kind, rc)] = outcomes.get((kind, rc), 0) + 1
        wrong = []
        if rc not in (0, 1):
            wrong.append(f"exit {rc}")
        if "canopy: unexpected error" in err or "canopy: LibTorch error" in err:
            wrong.append("an error canopy did not make its own")
        if rc == 1 and not last.startswith("canopy: error"):
            wrong.append("exit 1 without canopy's error line")
        if peak_mb > 1024:
            wrong.append(f"a peak of {peak_mb:.0f} MiB")
        if seconds > limit:
            wrong.append(f"{seconds:.0f} s")
        if wrong or a.only is not None:
            print(f"{what}: exit {rc}, {peak_mb:.0f} MiB, {seconds:.1f} s: {last[:300]}", flush=True)
        if wrong:
            problems.append(f"{what}: {', '.join(wrong)}")
            shutil.copytree(folder, os.path.join(work, f"mutant{n}"))
    if a.only is not None:
        print(f"mutant {a.only}'s files: {folder}")
        return 0
    summary = ", ".join(f"{k} exit {rc}: {c}" for (k, rc), c in sorted(outcomes.items()))
    print(f"outcomes: {summary}")
    check(not problems and sum(outcomes.values()) == a.count,
          f"{a.count} damaged input files (seed {a.seed}): each an exit 0 or canopy's own error, under 1 GiB and "
          f"{limit:.0f} s" + ("" if not problems else "; " + "; ".join(problems[:5])))
    # Both outcomes happen: the damage reaches the readers (not only files never read).
    check(any(rc == 1 for (_, rc) in outcomes) and any(rc == 0 for (_, rc) in outcomes),
          "some damage is refused and some is read as data")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
