#!/usr/bin/env python3
"""Image files as users have them give the same cache as the idx files they came from.

Fashion-MNIST images are written here as PNG files (a minimal PNG writer: zlib-compressed
8-bit grey rows), listed once in CSV manifests (path,class,name,ink) and once in class
folders (train/<class name>/<n>.png). `canopy cache` runs on the idx files, on the CSV
manifests and on the folders with the same tiny trunk; h5py reads the three caches:
  * CSV: the same features, bitwise, and the same class column, in the same order; the
    class-name column numbered by sorted name; a real-valued column stored as float64;
  * folders: the same features per image (rows in folder order: class name, then file);
  * JSON: the manifests as Hugging Face's imagefolder writes them (metadata.jsonl beside the
    images, the path in `file_name`, keys in another order, a list of tags; data.train naming
    the folder): the same
    features and columns as the CSV's, bitwise, and the tags as a bitmask per image;
  * images shrunk with preprocess.antialias = true give F.interpolate(antialias=True)'s
    features, and without it plain bilinear's;
  * `canopy evaluate` over class folders and CSV manifests scores heads on the classes as
    training numbered them (a folder of two of the classes: as predict's answers);
  * CMYK JPEGs decode as PIL's Image.convert("RGB") decodes them: their cache equals, bitwise,
    one of PNGs holding PIL's RGB pixels of the same files;
  * so do the other kinds of PNG, JPEG and WebP files PIL writes (palettes with transparency,
    grey with alpha, 1-bit, 16-bit, gamma chunks, progressive JPEG, lossy and lossless WebP,
    with alpha), in class folders with sub-folders read in torchvision's ImageFolder order;
    16-bit grey gives its high byte (PIL clips it at 255); a HEIC file is refused, naming it; a GIF is read by predict and left out of a class folder, as
    ImageFolder leaves it out (test_image_formats.py checks BMP, GIF, TIFF and Netpbm);
  * JPEG, PNG and WebP files recording each EXIF orientation give PIL's pixels as stored (and
    a line saying so), and with data.exif_orientation = apply those of ImageOps.exif_transpose;
  * photos of many shapes under preprocess.resize_shorter + center_crop give the features of
    torchvision's Resize(S) + CenterCrop(C) (v2, on float tensors, antialiased); the exported
    model file's features() does the same to raw pixels.
"""
import csv
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np

from support import FMNIST, check, finish, read_idx, run_measured, start, tiny_conv_trunk

NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TRAIN, TEST = 60, 30



def write_png(path, img):
    """A PNG, no filtering: grey [H, W] (or [H, W, 1]) or RGB [H, W, 3], 8-bit (uint8) or 16-bit
    (uint16, big-endian samples as PNG stores them)."""
    img = img.reshape(img.shape[0], img.shape[1], -1)
    h, w, c = img.shape
    bits = 16 if img.dtype == np.uint16 else 8
    raw = b"".join(b"\x00" + img[y].astype(">u2" if bits == 16 else np.uint8).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 0 if c == 1 else 2, 0, 0, 0))
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
    import json
    for split in ("train", "test"):
        # Hugging Face's imagefolder layout: metadata.jsonl in the split's folder, file_name
        # relative to it.
        os.makedirs(os.path.join(work, "folders", split), exist_ok=True)
        with open(os.path.join(work, "folders", split, "metadata.jsonl"), "w") as f:
            for i, (img, y) in enumerate(zip(images[split], labels[split])):
                tags = (["dark"] if img.mean() < 64 else []) + (["footwear"] if y in (5, 7, 9) else [])
                f.write(json.dumps({"name": NAMES[y], "ink": float(img.mean() / 255), "class": int(y),
                                    "file_name": f"{NAMES[y]}/{i:05d}.png", "tags": tags}) + "\n")
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
        # data.train and data.test name the folders: their metadata.jsonl is the manifest.
        "json": f"source = image-json\ntrain = {work}/folders/train\ntest = {work}/folders/test",
    }
    caches = {}
    for name, data in runs.items():
        r = subprocess.run([canopy, "cache", "--config", config(work, trunk, name, data), "--progress", "quiet"],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"canopy cache from {name}" + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
        if r.returncode != 0:
            return finish()
        caches[name] = h5py.File(os.path.join(work, name, "cache.h5"), "r")
    # A folder where a CSV manifest is read holds no metadata.csv: said so (before: "image list
    # '...' is empty").
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "nocsv", runs["json"].replace(
        "image-json", "image-csv")), "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 1 and f"'{work}/folders/train' is a folder without metadata.csv: name the manifest file"
          in r.stderr, f"a folder without a manifest is refused, saying so ({r.stderr.strip()[-160:]})")

    # The tags as a CSV column of labels separated by | (data.list_columns): the JSON list's bitmasks,
    # an empty field no tag.
    for split in ("train", "test"):
        with open(os.path.join(work, f"{split}.csv")) as f, open(os.path.join(work, f"{split}_tags.csv"), "w") as out:
            lines = f.read().splitlines()
            out.write(lines[0] + ",tags\n")
            for i, line in enumerate(lines[1:]):
                img, y = images[split][i], labels[split][i]
                tags = (["dark"] if img.mean() < 64 else []) + (["footwear"] if y in (5, 7, 9) else [])
                out.write(f"{line},{' | '.join(tags)}\n")
    r = subprocess.run([canopy, "cache", "--config", config(
        work, trunk, "csvtags", f"source = image-csv\ntrain = {work}/train_tags.csv\ntest = {work}/test_tags.csv\n"
        "list_columns = tags\nlist_separator = |"), "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, "canopy cache of a CSV manifest with a column of tags"
          + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))
    with h5py.File(os.path.join(work, "csvtags", "cache.h5"), "r") as h:
        check(all(np.array_equal(h[f"{s}/labels/tags"][...], caches["json"][f"{s}/labels/tags"][...])
                  and np.array_equal(h[f"{s}/features"][...], caches["json"][f"{s}/features"][...])
                  for s in ("train", "test")),
              "a CSV column of tags split at | (data.list_columns) caches as the JSON list of tags, bitwise")

    for split in ("train", "test"):
        ref = caches["idx"][f"{split}/features"][...]
        listed = caches["csv"][f"{split}/features"]
        check(listed.shape == ref.shape and np.array_equal(listed[...], ref),
              f"{split}: CSV-listed PNGs give bitwise the idx features {ref.shape}")
        check(np.array_equal(caches["csv"][f"{split}/labels/class"][...], labels[split]), f"{split}: CSV class column")
        by_name = caches["csv"][f"{split}/labels/name"][...]
        sorted_names = sorted(set(NAMES[y] for y in labels["train"]))
        check(all(sorted_names[k] == NAMES[y] for k, y in zip(by_name, labels[split])),
              f"{split}: class-name column numbered in sorted name order")
        ink = caches["csv"][f"{split}/labels/ink"]
        check(ink.dtype == np.float64 and np.allclose(ink[...], images[split].reshape(len(ink), -1).mean(1) / 255),
              f"{split}: real-valued column stored as float64")
        for column in ("features", "labels/class", "labels/name", "labels/ink"):
            got = caches["json"][f"{split}/{column}"][...]
            check(got.dtype == caches["csv"][f"{split}/{column}"].dtype
                  and np.array_equal(got, caches["csv"][f"{split}/{column}"][...]),
                  f"{split}: the JSON manifest's {column} equals the CSV manifest's, bitwise")
        tags = caches["json"][f"{split}/labels/tags"][...]
        want = [(images[split][i].mean() < 64) * 1 + (labels[split][i] in (5, 7, 9)) * 2 for i in range(len(tags))]
        check(list(tags) == want, f"{split}: a list of tags is a bitmask per image (dark = 1, footwear = 2)")
        order = folder_order[split]
        folders = caches["folders"][f"{split}/features"][...]
        check(np.array_equal(folders, ref[order]), f"{split}: class folders give the same features, in folder order")
        folder_labels = caches["folders"][f"{split}/labels/class"][...]
        check([sorted_names[k] for k in folder_labels] == [NAMES[labels[split][i]] for i in order],
              f"{split}: folder classes numbered by sorted folder name")
    names = caches["folders"].attrs["class_names"]
    names = (names.decode() if isinstance(names, bytes) else names).split(",")
    check(names == sorted(set(NAMES[y] for y in labels["train"])), f"class names recorded: {names[:3]}...")
    check_evaluate(canopy, work, trunk, runs)

    # Shrinking: images 4x the size, each pixel a 4x4 block under a one-pixel checker pattern
    # (detail that aliases), cached at 32x32. With preprocess.antialias = true the features are
    # those of F.interpolate(..., antialias=True), the resize torchvision and PIL do; without
    # it, those of plain bilinear, which differ.
    import torch
    import torch.nn.functional as F
    checker = (np.indices((112, 112)).sum(0) % 2 * 80).astype(np.int16) - 40
    big = {}
    for split, n in (("train", 12), ("test", 6)):  # the test split: the first 6 again (its classes)
        big[split] = [np.clip(np.kron(images["train"][i], np.ones((4, 4), np.int16)) + checker, 0, 255)
                      .astype(np.uint8) for i in range(n)]
        for i, img in enumerate(big[split]):
            os.makedirs(os.path.join(work, "big", split, NAMES[labels["train"][i]]), exist_ok=True)
            write_png(os.path.join(work, "big", split, NAMES[labels["train"][i]], f"{i:05d}.png"), img)
    model = torch.jit.load(trunk).eval()
    order = sorted(range(12), key=lambda i: (NAMES[labels["train"][i]], i))
    x = torch.from_numpy(np.stack([big["train"][i] for i in order])).float().div(255).unsqueeze(1)
    features = {}
    for aa in (True, False):
        name = "big-aa" if aa else "big"
        path = config(work, trunk, name, f"source = image-folders\ntrain = {work}/big/train\ntest = {work}/big/test")
        text = open(path).read().replace("resize = 32\n", f"resize = 32\nantialias = {'true' if aa else 'false'}\n")
        open(path, "w").write(text)
        r = subprocess.run([canopy, "cache", "--config", path, "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 0, f"canopy cache of 112x112 images at 32x32, antialias = {aa} {r.stderr[-300:]}")
        hint = "images of 112x112 are shrunk to 32x32 without antialiasing" in r.stderr
        check(hint != aa, f"antialias = {aa}: the hint to set it is {'not ' if aa else ''}given")
        with h5py.File(os.path.join(work, name, "cache.h5"), "r") as h:
            features[aa] = h["train/features"][...]
        with torch.no_grad():
            ref = model((F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=aa)
                         .expand(-1, 3, -1, -1) - 0.5) / 0.5).mean((2, 3)).numpy()
        err = np.abs(features[aa] - ref).max()
        check(err < 1e-5, f"antialias = {aa}: the features are F.interpolate(antialias={aa})'s, to {err:.1e}")
    apart = np.abs(features[True] - features[False]).max()
    check(apart > 1e-2, f"... and the two differ (by up to {apart:.3f}): the key does what it says")

    # A broken image is an error naming the file, and the cache is not marked complete.
    with open(os.path.join(work, "folders", "test", NAMES[labels["test"][0]], "00000.png"), "r+b") as f:
        f.truncate(40)
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "broken", runs["folders"]), "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "00000.png" in r.stderr and "cannot decode PNG" in r.stderr,
          f"a truncated PNG fails the run naming it (exit {r.returncode}: {r.stderr.strip()[-160:]})")

    # Images the CSV lists that are not there: all counted at once, the first three named with
    # their rows and the system's reason.
    with open(os.path.join(work, "train.csv")) as f:
        rows = f.read().split("\n")
    for k in (3, 5, 7, 9, 11):
        rows[k] = f"folders/train/gone{k}.png," + rows[k].split(",", 1)[1]
    with open(os.path.join(work, "missing.csv"), "w") as f:
        f.write("\n".join(rows))
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "missing", runs["csv"]), "--progress", "quiet",
                        "--set", f"data.train={work}/missing.csv"], capture_output=True, text=True)
    check(r.returncode == 1 and f"5 of the {TRAIN} images '{work}/missing.csv' lists cannot be read (row 3 '" in r.stderr
          and "gone3.png': No such file or directory; row 5 '" in r.stderr and "gone7.png': No such file or directory; ...)"
          in r.stderr and "gone9" not in r.stderr,
          f"the images the CSV lists that are not there are counted, the first named with their rows "
          f"({r.stderr.strip()[-300:]})")
    # A manifest moved away from its images: none can be read, and where relative paths are read from is said.
    os.makedirs(os.path.join(work, "moved"), exist_ok=True)
    shutil.copy(os.path.join(work, "train.csv"), os.path.join(work, "moved", "train.csv"))
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "moved", runs["csv"]), "--progress", "quiet",
                        "--set", f"data.train={work}/moved/train.csv"], capture_output=True, text=True)
    check(r.returncode == 1 and f"{TRAIN} of the {TRAIN} images" in r.stderr
          and f"none can: a relative path is read from the manifest's folder, '{work}/moved'" in r.stderr,
          f"a manifest moved from its images says where its paths are read from ({r.stderr.strip()[-300:]})")

    # A PNG of a few hundred bytes whose header declares 60000 x 60000 pixels (a decompression
    # bomb) is refused from its header, as PIL refuses it, before memory is taken for it.
    bomb = os.path.join(work, "folders", "train", NAMES[labels["train"][0]], "00000.png")
    with open(bomb, "r+b") as f:
        f.seek(16)
        f.write(struct.pack(">II", 60000, 60000))
        f.seek(12)
        ihdr = f.read(17)
        f.write(struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF))
    from PIL import Image
    try:
        Image.open(bomb).load()
        pil = "decodes it"
    except Image.DecompressionBombError as e:
        pil = f"refuses it: {str(e)[:60]}"
    cmd = [canopy, "cache", "--config", config(work, trunk, "bomb", runs["folders"]), "--progress", "quiet"]
    rc, err, rss_mb, _ = run_measured(cmd)
    check(rc == 1 and "60000 x 60000 = 3600000000 pixels" in err and "data.max_image_pixels" in err
          and rss_mb < 1000, f"a PNG declaring 60000 x 60000 pixels is refused from its header, peak {rss_mb:.0f} MiB "
          f"(PIL {pil}): {err.strip()[-230:]}")
    r = subprocess.run(cmd + ["--set", "data.max_image_pixels=1000"], capture_output=True, text=True)
    check(r.returncode == 1 and "28 x 28 = 784" not in r.stderr and "more than data.max_image_pixels = 1000" in r.stderr,
          f"data.max_image_pixels sets the limit: {r.stderr.strip()[-200:]}")
    os.remove(bomb)
    # The same from a JPEG's header (its start-of-frame marker declaring 60000 x 60000).
    jpeg = bomb[:-4] + ".jpg"
    Image.fromarray(images["train"][0]).save(jpeg, quality=90)
    data = bytearray(open(jpeg, "rb").read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    with open(jpeg, "wb") as f:
        f.write(data)
    rc, err, rss_mb, _ = run_measured(cmd)
    check(rc == 1 and "60000 x 60000 = 3600000000 pixels" in err and ".jpg" in err and rss_mb < 1000,
          f"a JPEG declaring 60000 x 60000 pixels is refused from its header, peak {rss_mb:.0f} MiB: "
          f"{err.strip()[-160:]}")
    os.remove(jpeg)

    # Class names are written into JSON and HDF5 as UTF-8: a class folder, or a CSV class name,
    # in Latin-1 is refused, naming it, before any trunk pass (before, every image went through
    # the trunk and the run then ended in a JSON writer's error).
    latin = b"Caf\xe9"
    for split in ("train", "test"):
        os.makedirs(os.path.join(work, "folders", split).encode() + b"/" + latin)
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "latin", runs["folders"]), "--progress", "quiet"],
                       capture_output=True, text=True, errors="replace")
    check(r.returncode == 1 and "class folder name 'Caf\\xe9' is not UTF-8 (byte 0xe9 at offset 3)" in r.stderr
          and not os.path.exists(os.path.join(work, "latin", "shards")),
          f"a Latin-1 class folder is refused before any trunk pass: {r.stderr.strip()[-200:]}")
    with open(os.path.join(work, "train.csv"), "rb") as f:
        rows = f.read().split(b"\n")
    rows[5] = rows[5].replace(b'"' + NAMES[labels["train"][4]].encode() + b'"', b'"' + latin + b'"')
    with open(os.path.join(work, "latin.csv"), "wb") as f:
        f.write(b"\n".join(rows))
    r = subprocess.run([canopy, "cache", "--config", config(work, trunk, "latincsv", runs["csv"]), "--progress",
                        "quiet", "--set", f"data.train={work}/latin.csv"], capture_output=True, text=True, errors="replace")
    check(r.returncode == 1 and "latin.csv: row 5: the class name 'Caf\\xe9' is not UTF-8" in r.stderr,
          f"a Latin-1 class name in a CSV is refused, naming its row: {r.stderr.strip()[-200:]}")
    check_cmyk(canopy, work, trunk)
    check_formats(canopy, work, trunk)
    check_exif(canopy, work, trunk)
    check_center_crop(canopy, work, trunk)
    return finish()


def check_evaluate(canopy, work, trunk, runs):
    """canopy evaluate over class folders and CSV manifests numbers the classes as training did."""
    import json
    reports = {}
    for name in ("folders", "csv", "json"):
        cfg = config(work, trunk, name, runs[name])
        tasks = "[task.c]\nhead = linear\nlabels = class\nlr = 0.03\n"
        if name == "csv":
            tasks += "[task.n]\nhead = linear\nlabels = name\nlr = 0.03\n[task.ink]\nkind = regression\nlabels = ink\nhead = linear\n"
        if name == "json":  # a multilabel task on the list of tags, named by them (no class_names)
            tasks += "[task.tags]\nkind = multilabel\nhead = linear\nlabels = tags\nlr = 0.03\n"
        with open(cfg, "a") as f:
            f.write(f"[train]\nout_dir = {work}/{name}-out\nepochs = 40\nbatch_size = 20\n{tasks}")
        r = subprocess.run([canopy, "train", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 0, f"heads train on the {name} cache ({r.stderr.strip()[-200:]})")
        if name == "csv" and r.returncode == 0:
            # Each head is named by its own label column's classes: n by the names column's, c by
            # its indices (before, every head took the first column's names, here none).
            names = {t: json.load(open(f"{work}/csv-out/heads/{t}.json"))["class_names"] for t in ("c", "n")}
            check(names["n"] == sorted(set(NAMES)) and names["c"] == [str(i) for i in range(len(names["c"]))],
                  f"a head's class names are its own label column's ({names})")
        if name == "json" and r.returncode == 0:
            names = json.load(open(f"{work}/json-out/heads/tags.json"))["class_names"]
            check(names == ["dark", "footwear"], f"the tags head is named by the list's labels ({names})")
            # A validation split is stratified by the class where there is one, not label by label
            # over the list of tags beside it.
            v = subprocess.run([canopy, "train", "--config", cfg, "--progress", "quiet", "--set",
                                "train.validation_fraction=0.2", "--set", "train.epochs=1", "--set",
                                f"train.out_dir={work}/json-validated"], capture_output=True, text=True)
            check(v.returncode == 0 and "stratified by 'class');" in v.stderr and "label by label" not in v.stderr,
                  "a validation split of the cache of classes and tags is stratified by the class "
                  f"({[line for line in v.stderr.splitlines() if 'validation split' in line][:1] or v.stderr[-200:]})")
        test = {"folders": f"{work}/folders/test", "csv": f"{work}/test.csv", "json": f"{work}/folders/test"}[name]
        r = subprocess.run([canopy, "evaluate", "--config", cfg, "--input", test, "--json", "--progress", "quiet"],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"canopy evaluate over the {name} test split ({r.stderr.strip()[-200:]})")
        reports[name] = {h["task"]: h for h in json.loads(r.stdout)["heads"]} if r.returncode == 0 else {}
        for task, h in reports[name].items():
            card = json.load(open(f"{work}/{name}-out/heads/{task}.json"))
            key = "r2" if task == "ink" else "accuracy"
            check(abs(h[key] - card[f"eval_{key}"]) < 1e-6,
                  f"{name}: evaluate on the test split gives head {task}'s card {key} ({h[key]} vs {card[f'eval_{key}']})")
    # predict reads a manifest's paths whatever it is written as: the CSV with its labels, one of
    # paths alone (before, refused: "the header must be path,<label>"), the JSON manifest.
    answers = {}
    with open(f"{work}/paths.csv", "w") as f:
        f.write("path\n" + "".join(line.split(",")[0] + "\n" for line in open(f"{work}/test.csv").readlines()[1:]))
    import gzip
    with open(f"{work}/test.csv", "rb") as f, gzip.open(f"{work}/test.csv.gz", "wb") as out:
        out.write(f.read())  # as pandas' to_csv("test.csv.gz") compresses it
    for manifest in ("test.csv", "paths.csv", "folders/test/metadata.jsonl", "test.csv.gz"):
        p = subprocess.run([canopy, "predict", "--config", f"{work}/csv.ini", "--input", f"{work}/{manifest}",
                            "--progress", "quiet"], capture_output=True, text=True)
        answers[manifest] = p.stdout if p.returncode == 0 else p.stderr.strip()[-200:]
    check(answers["test.csv"].count("\n") == TEST + 1 and answers["paths.csv"] == answers["test.csv"]
          and answers["folders/test/metadata.jsonl"] == answers["test.csv"] and answers["test.csv.gz"] == answers["test.csv"],
          f"predict answers the same over a CSV manifest, one of paths only, a JSON manifest and the CSV gzipped "
          f"({[a[:80] for a in answers.values()]})")
    # --keep: the manifest's own columns beside each answer (its labels here, which predict does
    # not otherwise read); a folder (no table) and a column the manifest lacks refused.
    p = subprocess.run([canopy, "predict", "--config", f"{work}/csv.ini", "--input", f"{work}/test.csv",
                        "--keep", "name,class", "--progress", "quiet"], capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    manifest = list(csv.DictReader(open(f"{work}/test.csv")))
    plain = list(csv.DictReader(io.StringIO(answers["test.csv"])))
    check(p.returncode == 0 and p.stdout.startswith("id,path,name,class,c,")
          and [(r["name"], r["class"]) for r in rows] == [(m["name"], m["class"]) for m in manifest]
          and [r["c"] for r in rows] == [r["c"] for r in plain],
          f"predict --keep name,class writes the manifest's columns beside each answer ({p.stderr.strip()[-160:]})")
    # A JSON list of tags is kept as a multilabel task's answer is written: its items joined by |.
    p = subprocess.run([canopy, "predict", "--config", f"{work}/csv.ini", "--input",
                        f"{work}/folders/test/metadata.jsonl", "--keep", "tags", "--progress", "quiet"],
                       capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    with open(f"{work}/folders/test/metadata.jsonl") as f:
        tags = ["|".join(json.loads(line)["tags"]) for line in f if line.strip()]
    check(p.returncode == 0 and p.stdout.startswith("id,path,tags,c,") and [r["tags"] for r in rows] == tags
          and "dark|footwear" in tags and "" in tags and [r["c"] for r in rows] == [r["c"] for r in plain],
          f"predict --keep tags writes each image's list of tags joined by | ({p.stderr.strip()[-160:]})")
    for args, said in ((["--input", f"{work}/folders/test", "--keep", "name"], "is not one"),
                       (["--input", f"{work}/test.csv", "--keep", "label"], "has no such column (its columns: path, class")):
        p = subprocess.run([canopy, "predict", "--config", f"{work}/csv.ini", "--progress", "quiet"] + args,
                           capture_output=True, text=True)
        check(p.returncode in (1, 2) and said in p.stderr and p.stdout == "",
              f"predict {' '.join(args[2:])} on {os.path.basename(args[1])}: refused ({p.stderr.strip()[-140:]})")
    listed = [row["path"] for row in csv.DictReader(io.StringIO(answers["test.csv"]))]
    want = [f"{work}/" + line.split(",")[0] for line in open(f"{work}/test.csv").read().splitlines()[1:]]
    check(listed == want, f"each answer names its image file, as the manifest lists it joined to its folder "
          f"({listed[:1]} vs {want[:1]})")
    # A folder of two of the classes only (their training images, which the head fits best):
    # its classes are numbered by the training folder's names, not by its own (Bag would be its
    # class 0, training's 1). Scored as predict's answers.
    subset = f"{work}/subset"
    for cls in ("Bag", "Trouser"):
        shutil.copytree(f"{work}/folders/train/{cls}", f"{subset}/{cls}")
    cfg = f"{work}/folders.ini"
    r = subprocess.run([canopy, "evaluate", "--config", cfg, "--input", subset, "--json", "--progress", "quiet"],
                       capture_output=True, text=True)
    got = json.loads(r.stdout)["heads"][0] if r.returncode == 0 else {}
    p = subprocess.run([canopy, "predict", "--config", cfg, "--input", subset, "--progress", "quiet"],
                       capture_output=True, text=True)
    # Each answer's file is in its `path` column (the folder's files in sorted order): its class
    # is the folder it is in.
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    listed = sorted(os.path.join(d, n) for d, _, names in os.walk(subset) for n in names)
    check([row["path"] for row in rows] == listed, f"predict names each image file of the folder, sorted "
          f"({[row['path'] for row in rows][:1]})")
    truth = [os.path.basename(os.path.dirname(row["path"])) for row in rows]
    answers = [row["c"] for row in rows]
    accuracy = np.mean([a == t for a, t in zip(answers, truth)])
    support = {c["class"]: c["support"] for c in got.get("per_class", [])}
    check(r.returncode == 0 and len(answers) == len(truth) and got.get("accuracy") == accuracy
          and support.get("Bag") == truth.count("Bag") and support.get("Trouser") == truth.count("Trouser")
          and sum(support.values()) == len(truth),
          f"evaluate over a folder of 2 of the classes: accuracy {got.get('accuracy')} is predict's {accuracy}, "
          f"support by training's class names {support} ({r.stderr.strip()[-200:]})")
    # The same images named on standard input, one path per line (`find ... | canopy predict --input -`).
    s = subprocess.run([canopy, "predict", "--config", cfg, "--input", "-", "--progress", "quiet"],
                       input="\n".join(listed) + "\n", capture_output=True, text=True)
    check(s.returncode == 0 and s.stdout == p.stdout and len(listed) == len(truth),
          f"--input - reads image paths from standard input: predict's answers over the folder "
          f"({s.stderr.strip()[-300:]})")
    os.makedirs(f"{subset}/Unknown")
    shutil.copy(f"{subset}/Bag/" + sorted(os.listdir(f"{subset}/Bag"))[0], f"{subset}/Unknown/x.png")
    r = subprocess.run([canopy, "evaluate", "--config", cfg, "--input", subset, "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "Unknown" in r.stderr,
          f"a class folder training did not have is refused, named ({r.stderr.strip()[-200:]})")


def check_cmyk(canopy, work, trunk):
    """CMYK JPEGs (print and product photos are often CMYK) against PIL's RGB of them."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k in range(n):
            cls = f"c{k % 2}"
            for kind in ("cmyk", "pil"):
                os.makedirs(f"{work}/{kind}/{split}/{cls}", exist_ok=True)
            jpg = f"{work}/cmyk/{split}/{cls}/{k}.jpg"
            colour = rng.integers(0, 256, (29, 23, 3), dtype=np.uint8)  # odd sizes, every value
            Image.fromarray(colour).convert("CMYK").save(jpg, quality=90)
            Image.open(jpg).convert("RGB").save(f"{work}/pil/{split}/{cls}/{k}.png")
    check(Image.open(f"{work}/cmyk/train/c0/0.jpg").mode == "CMYK", "the JPEGs written are CMYK")
    feats = {}
    for kind in ("cmyk", "pil"):
        data = f"source = image-folders\ntrain = {work}/{kind}/train\ntest = {work}/{kind}/test"
        r = subprocess.run([canopy, "cache", "--config", config(work, trunk, kind + "-cache", data), "--progress",
                            "quiet"], capture_output=True, text=True)
        check(r.returncode == 0, f"canopy cache of the {kind} images ({r.stderr.strip()[-200:]})")
        with h5py.File(f"{work}/{kind}-cache/cache.h5", "r") as h:
            feats[kind] = {split: h[f"{split}/features"][:] for split in ("train", "test")}
    check(all(np.array_equal(feats["cmyk"][s], feats["pil"][s]) for s in ("train", "test")),
          "CMYK JPEGs give, bitwise, the features of PIL's RGB pixels of them (16 images)")
    # canopy predict over a folder of them leaves hidden entries out, as training's class
    # folders do: a macOS resource fork (._0.jpg, not a JPEG) and a hidden folder.
    cfg = f"{work}/cmyk-cache.ini"
    with open(cfg, "a") as f:
        f.write(f"[train]\nout_dir = {work}/cmyk-out\nepochs = 1\n[task.c]\nhead = linear\n")
    r = subprocess.run([canopy, "train", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"a head trains on the CMYK cache ({r.stderr.strip()[-200:]})")
    with open(f"{work}/cmyk/test/c0/._0.jpg", "wb") as f:
        f.write(b"\x00\x05\x16\x07 resource fork")
    os.makedirs(f"{work}/cmyk/test/.cache")
    Image.new("RGB", (5, 5)).save(f"{work}/cmyk/test/.cache/x.png")
    r = subprocess.run([canopy, "predict", "--config", cfg, "--input", f"{work}/cmyk/test", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 + 4,
          f"canopy predict over the CMYK test folder: its 4 images, hidden entries left out "
          f"({r.stdout.strip().splitlines()[:1]}, {r.stderr.strip()[-200:]})")
    # A task named path would share the column of the files' paths: refused, not written twice.
    with open(cfg, "a") as f:
        f.write("[task.path]\nhead = linear\nlabels = class\n")
    r = subprocess.run([canopy, "train", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True)
    p = subprocess.run([canopy, "predict", "--config", cfg, "--input", f"{work}/cmyk/test", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0 and p.returncode == 2 and "task 'path' would share its column" in p.stderr
          and p.stdout == "", f"predict refuses a task named path over image files ({p.stderr.strip()[-120:]})")
    # So is any task named as another column of the answers (id here; before, written twice).
    with open(cfg) as f:
        text = f.read().replace("[task.path]", "[task.id]").replace(f"{work}/cmyk-out", f"{work}/cmyk-id")
    with open(f"{work}/cmyk-id.ini", "w") as f:
        f.write(text)
    r = subprocess.run([canopy, "train", "--config", f"{work}/cmyk-id.ini", "--progress", "quiet"],
                       capture_output=True, text=True)
    p = subprocess.run([canopy, "predict", "--config", f"{work}/cmyk-id.ini", "--input", f"{work}/cmyk/test",
                        "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and p.returncode == 2 and "task 'id' would write a second column 'id' (id,path,c,id)"
          in p.stderr and p.stdout == "", f"predict refuses a task named id ({p.stderr.strip()[-120:]})")


def check_formats(canopy, work, trunk):
    """The PNG, JPEG and WebP files users have, as PIL writes them, against PIL's RGB pixels of
    them, in class folders with sub-folders against torchvision's ImageFolder order."""
    from PIL import Image, PngImagePlugin
    from torchvision.datasets import ImageFolder
    rng = np.random.default_rng(1)

    def gamma(g):
        info = PngImagePlugin.PngInfo()
        info.add(b"gAMA", struct.pack(">I", round(g * 100000)))
        return info

    def write(path, kind):
        img = Image.fromarray(rng.integers(0, 256, (29, 23, 3), dtype=np.uint8))  # odd sizes, every value
        if kind == "palette+tRNS":
            img.convert("P", palette=Image.ADAPTIVE, colors=64).save(path + ".png", transparency=3)
        elif kind == "RGBA":
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray(rng.integers(0, 256, (29, 23), dtype=np.uint8)))
            img.save(path + ".png")
        elif kind in ("LA", "1", "L"):
            img.convert(kind).save(path + ".png")
        elif kind == "gamma 1.0":
            img.save(path + ".png", pnginfo=gamma(1.0))
        elif kind == "gamma 1/1.8":
            img.save(path + ".png", pnginfo=gamma(1 / 1.8))
        elif kind == "RGB 16-bit":
            write_png(path + ".png", rng.integers(0, 65536, (29, 23, 3), dtype=np.uint16))
        elif kind == "grey 16-bit":
            write_png(path + ".png", rng.integers(0, 65536, (29, 23, 1), dtype=np.uint16))
        elif kind == "progressive JPEG":
            img.save(path + ".jpg", quality=90, progressive=True)
        elif kind == "grey JPEG":
            img.convert("L").save(path + ".JPEG", quality=90)
        elif kind == "JPEG 4:4:4":
            img.save(path + ".jpg", quality=90, subsampling=0)
        elif kind == "lossy WebP":
            img.save(path + ".webp", quality=80)
        elif kind == "lossless WebP":
            img.save(path + ".webp", lossless=True)
        elif kind == "lossy WebP with alpha":
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray(rng.integers(0, 256, (29, 23), dtype=np.uint8)))
            img.save(path + ".webp", quality=80)
    kinds = ["palette+tRNS", "RGBA", "LA", "1", "L", "gamma 1.0", "gamma 1/1.8", "RGB 16-bit", "grey 16-bit",
             "progressive JPEG", "grey JPEG", "JPEG 4:4:4", "lossy WebP", "lossless WebP", "lossy WebP with alpha"]
    # Each kind in both classes, in the class folder or a sub-folder of it (or two deep).
    for split in ("train", "test"):
        for k, kind in enumerate(kinds):
            for cls in ("c0", "c1"):
                sub = ("", "sub", "sub/deeper", "a b")[k % 4]
                folder = os.path.join(work, "formats", split, cls, sub)
                os.makedirs(folder, exist_ok=True)
                write(os.path.join(folder, f"{k:02d}"), kind)
        with open(os.path.join(work, "formats", split, "c0", "notes.txt"), "w") as f:
            f.write("not an image\n")
    # PIL's RGB pixels of each, in ImageFolder's order (hidden entries and notes are not images).
    for split in ("train", "test"):
        samples = ImageFolder(os.path.join(work, "formats", split),
                              is_valid_file=lambda p: p.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))).samples
        check(len(samples) == 2 * len(kinds), f"{split}: every file is an ImageFolder sample ({len(samples)})")
        for i, (path, cls) in enumerate(samples):
            out = os.path.join(work, "formats-pil", split, f"c{cls}", f"{i:03d}.png")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            img = Image.open(path)
            if img.mode == "I;16":  # PIL's convert("RGB") clips 16-bit grey at 255; canopy takes the high byte
                img = Image.fromarray((np.array(img) >> 8).astype(np.uint8))
            img.convert("RGB").save(out)
    feats = {}
    for kind in ("formats", "formats-pil"):
        data = f"source = image-folders\ntrain = {work}/{kind}/train\ntest = {work}/{kind}/test"
        r = subprocess.run([canopy, "cache", "--config", config(work, trunk, kind + "-cache", data)],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"canopy cache of the {kind} images ({r.stderr.strip()[-300:]})")
        with h5py.File(f"{work}/{kind}-cache/cache.h5", "r") as h:
            feats[kind] = {split: h[f"{split}/features"][:] for split in ("train", "test")}
        if kind == "formats":
            check(f"image folder '{work}/formats/train': left out files that are not images (1 .txt)" in r.stderr,
                  f"the file that is no image is said to be left out ({r.stderr.strip()[-300:]})")
    for split in ("train", "test"):
        got, want = feats["formats"][split], feats["formats-pil"][split]
        same = [bool(np.array_equal(g, w)) for g, w in zip(got, want)]
        check(got.shape == want.shape and all(same),
              f"{split}: {len(kinds)} kinds of PNG, JPEG and WebP file in sub-folders give, bitwise and in "
              f"ImageFolder's order, the features of PIL's RGB pixels of them (rows differing: "
              f"{[i for i, ok in enumerate(same) if not ok]})")
    # Refused, naming the file: a HEIC photo.
    frames = [Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)) for _ in range(2)]
    with open(f"{work}/phone.heic", "wb") as f:
        f.write(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")
    with open(f"{work}/formats-cache.ini", "a") as f:
        f.write(f"[train]\nout_dir = {work}/formats-out\nepochs = 1\n[task.c]\nhead = linear\n")
    r = subprocess.run([canopy, "train", "--config", f"{work}/formats-cache.ini", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"a head trains on them ({r.stderr.strip()[-200:]})")
    for path, said in ((f"{work}/phone.heic", "is a HEIC file"),):
        r = subprocess.run([canopy, "predict", "--config", f"{work}/formats-cache.ini", "--input", path,
                            "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 1 and path in r.stderr and said in r.stderr and len(r.stdout.splitlines()) <= 1,
              f"predict refuses {os.path.basename(path)}, saying it {said}, with no answer written "
              f"({r.stdout.splitlines()[1:2]}, {r.stderr.strip()[-200:]})")
    # A GIF: predict reads it (its first frame); in a class folder it is left out, as
    # torchvision's ImageFolder leaves it out, and the log says so.
    frames[0].save(f"{work}/still.gif")
    r = subprocess.run([canopy, "predict", "--config", f"{work}/formats-cache.ini", "--input", f"{work}/still.gif",
                        "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and len(r.stdout.splitlines()) == 2, f"predict answers for a GIF ({r.stderr.strip()[-200:]})")
    os.replace(f"{work}/still.gif", f"{work}/formats/test/c1/sub/still.gif")
    r = subprocess.run([canopy, "evaluate", "--config", f"{work}/formats-cache.ini", "--input",
                        f"{work}/formats/test"], capture_output=True, text=True)
    check(r.returncode == 0 and "left out images torchvision's ImageFolder leaves out too (1 .gif; the first: "
          f"{work}/formats/test/c1/sub/still.gif)" in r.stderr,
          f"a GIF in a class folder is left out, as ImageFolder leaves it out, and said ({r.stderr.strip()[-300:]})")


def check_exif(canopy, work, trunk):
    """Photos taken sideways: every EXIF orientation, in JPEG, PNG and WebP, against PIL."""
    from PIL import Image, ImageOps
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for o in range(1, 9):
            for fmt, kw in (("jpg", {"quality": 90}), ("png", {}), ("webp", {"lossless": True})):
                cls = f"c{o % 2}"
                for kind in ("exif", "stored", "turned"):
                    os.makedirs(f"{work}/{kind}/{split}/{cls}", exist_ok=True)
                exif = Image.Exif()
                exif[0x0112] = o
                path = f"{work}/exif/{split}/{cls}/{o}{fmt}.{fmt}"
                Image.fromarray(rng.integers(0, 256, (29, 23, 3), dtype=np.uint8)).save(path, exif=exif, **kw)
                img = Image.open(path)
                check(img.getexif().get(0x0112) == o, f"PIL reads orientation {o} back from the {fmt} file")
                img.convert("RGB").save(f"{work}/stored/{split}/{cls}/{o}{fmt}.png")
                ImageOps.exif_transpose(img).convert("RGB").save(f"{work}/turned/{split}/{cls}/{o}{fmt}.png")
    feats, logs = {}, {}
    for name, kind, how in (("exif-ignore", "exif", "ignore"), ("exif-apply", "exif", "apply"),
                            ("exif-stored", "stored", "ignore"), ("exif-turned", "turned", "ignore")):
        data = (f"source = image-folders\ntrain = {work}/{kind}/train\ntest = {work}/{kind}/test\n"
                f"exif_orientation = {how}")
        r = subprocess.run([canopy, "cache", "--config", config(work, trunk, name, data)], capture_output=True,
                           text=True)
        check(r.returncode == 0, f"canopy cache {name} ({r.stderr.strip()[-300:]})")
        logs[name] = r.stderr
        with h5py.File(f"{work}/{name}/cache.h5", "r") as h:
            feats[name] = np.concatenate([h[f"{s}/features"][:] for s in ("train", "test")])
    check(np.array_equal(feats["exif-ignore"], feats["exif-stored"]),
          "exif_orientation = ignore: PIL's pixels as stored (48 images, bitwise)")
    check(np.array_equal(feats["exif-apply"], feats["exif-turned"]),
          "exif_orientation = apply: PIL's ImageOps.exif_transpose of them (48 images, bitwise)")
    check(not np.array_equal(feats["exif-apply"], feats["exif-ignore"]), "the two differ")
    check("records EXIF orientation" in logs["exif-ignore"] and "data.exif_orientation = apply" in logs["exif-ignore"]
          and "records EXIF orientation" not in logs["exif-apply"],
          f"ignoring them is said once, with the key that turns them ({logs['exif-ignore'].count('EXIF orientation')})")


def check_center_crop(canopy, work, trunk):
    """Resize(S) + CenterCrop(C), the ImageNet evaluation's preprocessing, against torchvision."""
    import torch
    from torchvision.transforms.v2 import functional as TF
    from PIL import Image
    rng = np.random.default_rng(4)
    # Landscape, portrait, square, odd margins on both sides (x.5 offsets: Python's round, half
    # to even), one already at the shorter size, one enlarged. (Padding: datasets_test.cpp.)
    shapes = [(40, 60), (61, 45), (50, 50), (33, 70), (71, 37), (32, 47), (90, 20)]
    for split in ("train", "test"):
        for k, (h, w) in enumerate(shapes):
            path = f"{work}/shapes-img/{split}/c{k % 2}/{k}.png"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    # The cache's training rows: class folder, then file name (one digit each: sorted paths).
    train_rows = sorted(f"{work}/shapes-img/train/c{k % 2}/{k}.png" for k in range(len(shapes)))
    data = f"source = image-folders\ntrain = {work}/shapes-img/train\ntest = {work}/shapes-img/test"
    cfg = config(work, trunk, "shapes", data)
    text = open(cfg).read().replace("resize = 32\n", "resize_shorter = 32\ncenter_crop = 28\nantialias = true\n")
    text += f"[train]\nout_dir = {work}/shapes-out\nepochs = 1\n[task.c]\nhead = linear\n"
    open(cfg, "w").write(text)
    r = subprocess.run([canopy, "run", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"canopy run with resize_shorter = 32, center_crop = 28 ({r.stderr.strip()[-300:]})")
    model = torch.jit.load(trunk).eval()
    with h5py.File(f"{work}/shapes/cache.h5", "r") as h:
        got = h["train/features"][:]
    worst = 0.0
    with torch.no_grad():
        for i, path in enumerate(train_rows):
            x = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float().div(255)
            x = TF.center_crop(TF.resize(x, [32], antialias=True), [28])
            ref = model(((x - 0.5) / 0.5).unsqueeze(0)).mean((2, 3))[0].numpy()
            worst = max(worst, float(np.abs(got[i] - ref).max()))
    check(worst < 1e-5, f"the cache is torchvision's Resize(32) + CenterCrop(28) of {len(shapes)} shapes, "
          f"to {worst:.1e}")
    r = subprocess.run([canopy, "export", "--config", cfg, "--output", f"{work}/shapes-model.pt"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"canopy export ({r.stderr.strip()[-200:]})")
    exported = torch.jit.load(f"{work}/shapes-model.pt")
    worst = 0.0
    with torch.no_grad():
        for i, path in enumerate(train_rows):
            pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).unsqueeze(0)
            worst = max(worst, float((exported.features(pixels)[0] - torch.from_numpy(got[i])).abs().max()))
    check(worst < 1e-5, f"the model file's features() of the raw pixels is the cache's, to {worst:.1e}")


if __name__ == "__main__":
    sys.exit(main())
