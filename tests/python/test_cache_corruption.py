#!/usr/bin/env python3
"""Flipped bits anywhere in a finished cache: the manifest, the view cache.h5 and the shards,
their data and their HDF5 headers alike. For each seeded flip, `canopy inspect --verify` and
`canopy train` must either succeed with what an intact cache gives (the same exported heads
for train; for verify, h5py reading the same view) or exit 1 with an error; never a signal,
never exit 0 with other data. Also a flip that crashes HDF5 1.10 itself (the rank of a virtual
dataset's selection: H5S_select_deserialize overflows a buffer) is an error, not a crash, and
the mends the errors advise (delete the shard or the view, run `canopy cache`) work.

    test_cache_corruption.py --canopy build/runners/canopy [--seed 20261202] [--flips 60]
"""
import argparse
import glob
import hashlib
import os
import random
import shutil
import subprocess
import sys

import support
from support import check, finish, flip, tiny_conv_trunk, tiny_trunk_sections, work_dir

READ_VIEW = """
import sys, h5py, numpy as np
with h5py.File(sys.argv[1] + "/cache.h5", "r") as h:
    out = {"attrs": np.frombuffer(repr(sorted((k, str(v)) for k, v in h.attrs.items())).encode(), np.uint8)}
    h.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
np.savez(sys.argv[2], **out)
"""


def write_config(path, work, trunk, cache, out):
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, 600, 200) + f"""[cache]
path = {cache}
shard_rows = 128
[train]
out_dir = {out}
batch_size = 64
epochs = 2
tensorboard = false
[task.linear]
head = linear
[task.mlp]
head = mlp
head.hidden = 32
""")


def heads(out):
    return {os.path.relpath(p, out): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out, "heads", "**", "*.safetensors"), recursive=True))}


def read_view(cache, npz):
    """The view as h5py reads it, in a child process (a corrupt file can crash h5py's HDF5 too):
    a dict of arrays, or the error text."""
    import numpy as np
    r = subprocess.run([sys.executable, "-c", READ_VIEW, cache, npz], capture_output=True, text=True,
                       errors="backslashreplace")
    if r.returncode:
        return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def same(a, b):
    import numpy as np
    return isinstance(b, dict) and set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def run(canopy, *args):
    return subprocess.run([canopy, *args], capture_output=True, text=True, errors="backslashreplace",
                          timeout=120 * support.slowdown())


def no_crash(r):
    return r.returncode in (0, 1) and "terminate called" not in r.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--seed", type=int, default=20261202)
    ap.add_argument("--flips", type=int, default=60)
    a = ap.parse_args()
    canopy, work = a.canopy, work_dir("canopy-corruption-")
    import torch
    torch.manual_seed(0)
    trunk = os.path.join(work, "tiny.pt")
    torch.jit.script(tiny_conv_trunk().eval()).save(trunk)
    base, config = os.path.join(work, "base"), os.path.join(work, "job.ini")
    write_config(config, work, trunk, base, os.path.join(work, "out0"))
    r = run(canopy, "run", "--config", config, "--progress", "quiet")
    check(r.returncode == 0, "the intact cache builds and trains" + (f" ({r.stderr.strip()[-300:]})" if r.returncode else ""))
    if r.returncode:
        return finish()
    want_heads = heads(os.path.join(work, "out0"))
    want_view = read_view(base, os.path.join(work, "view.npz"))
    check(len(want_heads) == 2 and isinstance(want_view, dict), "two heads exported; h5py reads the view")
    r = run(canopy, "inspect", base, "--verify", "--progress", "lines")
    rows = sum(len(v) for k, v in want_view.items() if k.endswith("/ids"))
    check(r.returncode == 0 and f"verify shards: {rows}/{rows} rows (100%)" in r.stderr
          and f"verify view: {rows}/{rows} rows (100%)" in r.stderr,
          f"`inspect --verify` shows its progress over the {rows} rows, the shards then the view "
          f"({r.stderr.strip()[-300:]})")
    files = sorted(p for p in glob.glob(os.path.join(base, "**"), recursive=True)
                   if os.path.isfile(p) and not p.endswith(".lock"))
    trial = os.path.join(work, "trial")
    out = os.path.join(work, "out")

    def corrupt(rel, offset, bit):
        shutil.rmtree(trial, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, trial)
        flip(os.path.join(trial, rel), offset, bit)
        write_config(config, work, trunk, trial, out)

    # A flip that crashes HDF5 1.10.8 when it opens the dataset: the rank (1) of the source
    # selection stored with a virtual dataset's mapping, made 1025 (bit 2 of its second byte).
    view = open(os.path.join(base, "cache.h5"), "rb").read()
    mapping = b"/labels/class\x00\x03\x00\x00\x00\x01\x00\x00\x00" + b"\x00" * 8 + b"\x02\x00\x00\x00\x01\x00\x00\x00"
    at = view.find(mapping)
    check(at > 0, "the view holds the mapping of labels/class (HDF5's serialised selections)")
    if at > 0:
        rank = at + len(mapping) + 8  # past the reserved word and the selection's length
        check(view[rank:rank + 4] == b"\x01\x00\x00\x00", "the selection's rank is 1 where it is read")
        corrupt("cache.h5", rank + 1, 4)
        r = run(canopy, "inspect", trial, "--verify")
        check(r.returncode == 1 and "VERIFY FAILED" in r.stdout and "cache.h5" in r.stdout and no_crash(r),
              f"a selection rank of 1025 in the view: an error naming cache.h5, exit 1, no crash "
              f"(exit {r.returncode}: {r.stdout.strip().splitlines()[-1][:200]})")
        os.remove(os.path.join(trial, "cache.h5"))
        r = run(canopy, "cache", "--config", config, "--progress", "quiet")
        v = run(canopy, "inspect", trial, "--verify")
        check(r.returncode == 0 and v.returncode == 0 and same(want_view, read_view(trial, os.path.join(work, "v.npz"))),
              f"deleted as advised, `canopy cache` writes the view again and it verifies ({v.stdout.strip().splitlines()[-1][:160]})")

    # A shard's header says its features have 16512 rows, not 128: the data verifies by its
    # checksums, the header does not; deleted as advised, the shard is computed again.
    shard = os.path.join("shards", "train-00000.h5")
    corrupt(shard, 0, 0)
    raw = open(os.path.join(trial, shard), "rb").read()
    dims = raw.find((128).to_bytes(8, "little") + (8).to_bytes(8, "little"))  # the dataspace of [128, 8]
    check(dims > 0, "the shard's header holds the dataspace [128, 8]")
    if dims > 0:
        flip(os.path.join(trial, shard), dims + 1, 64)
        r = run(canopy, "inspect", trial, "--verify")
        check(r.returncode == 1 and "HDF5 header of dataset 'features' is corrupt" in r.stdout and
              "[16512, 8]" in r.stdout, f"a shard header of [16512, 8] is found ({r.stdout.strip()[-240:]})")
        r = run(canopy, "train", "--config", config, "--progress", "quiet")
        check(r.returncode == 0 and heads(out) == want_heads,
              "training reads the verified data regions, not the header: the same heads")
        os.remove(os.path.join(trial, shard))
        r = run(canopy, "cache", "--config", config, "--progress", "quiet")
        v = run(canopy, "inspect", trial, "--verify")
        check(r.returncode == 0 and v.returncode == 0 and same(want_view, read_view(trial, os.path.join(work, "v.npz"))),
              f"deleted as advised, `canopy cache` computes the shard again and it verifies ({v.stdout.strip().splitlines()[-1][:160]})")

    # A shard's split renamed in the manifest ("train" -> "trein", one bit): without a check the
    # train split loses the shard's rows and reads as a smaller cache. The manifest's own
    # checksum finds it; in a manifest written before that field, the shards' rows do.
    import json
    corrupt("manifest.json", 0, 0)
    text = open(os.path.join(trial, "manifest.json")).read()
    check('"manifest_crc32c"' in text, "the manifest records its own checksum")
    last = text.rindex('"split": "train"')
    with open(os.path.join(trial, "manifest.json"), "w") as f:
        f.write(text[:last] + '"split": "trein"' + text[last + len('"split": "train"'):])
    r = run(canopy, "train", "--config", config, "--progress", "quiet")
    check(r.returncode == 1 and "does not match its checksum" in r.stderr,
          f"a shard's split renamed: the manifest's checksum fails ({r.stderr.strip()[-200:]})")
    doc = json.loads(open(os.path.join(trial, "manifest.json")).read())
    del doc["manifest_crc32c"]
    with open(os.path.join(trial, "manifest.json"), "w") as f:
        json.dump(doc, f, indent=1)
    r = run(canopy, "train", "--config", config, "--progress", "quiet")
    check(r.returncode == 1 and "belongs to split 'trein', which the manifest does not list" in r.stderr,
          f"the same in a manifest without its checksum: the shards' rows do not add up ({r.stderr.strip()[-200:]})")

    # Seeded flips anywhere.
    rng = random.Random(a.seed)
    failed, outcomes, loud = [], {}, []
    for i in range(a.flips):
        path = rng.choice(files)
        rel = os.path.relpath(path, base)
        offset, bit = rng.randrange(os.path.getsize(path)), 1 << rng.randrange(8)
        corrupt(rel, offset, bit)
        what = f"{rel} byte {offset} bit {bit.bit_length() - 1}"
        v = run(canopy, "inspect", trial, "--verify")
        t = run(canopy, "train", "--config", config, "--progress", "quiet")
        outcomes[(v.returncode, t.returncode)] = outcomes.get((v.returncode, t.returncode), 0) + 1
        if not no_crash(v) or not no_crash(t):
            failed.append(f"{what}: exit {v.returncode} / {t.returncode} {(v.stderr + t.stderr).strip()[-200:]}")
        elif t.returncode == 0 and heads(out) != want_heads:
            failed.append(f"{what}: train exits 0 with other heads")
        elif v.returncode == 0:
            got = read_view(trial, os.path.join(work, "v.npz"))
            if isinstance(got, dict) and not same(want_view, got):
                failed.append(f"{what}: verify passes, h5py reads other data")
            elif not isinstance(got, dict):
                loud.append(f"{what}: {got[:160]}")
    for f in failed:
        print(f"  {f}")
    for l in loud:
        print(f"  verify passed, h5py (another HDF5) refuses it: {l}")
    print(f"  outcomes (verify exit, train exit): {dict(sorted(outcomes.items()))}")
    check(not failed, f"{a.flips} seeded flips (seed {a.seed}): no crash, no exit 0 with other data")
    check(outcomes.get((1, 1), 0) > 0 and outcomes.get((1, 0), 0) + outcomes.get((0, 0), 0) > 0,
          "the flips reach data regions (both fail) and headers or unused bytes (training, on verified regions, goes on)")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
