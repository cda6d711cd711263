#!/usr/bin/env python3
"""Kill a real `canopy cache` of texts (Reuters through the real all-MiniLM-L6-v2 trunk,
batches grouped by length) with SIGKILL, start it again, and check that the resumed cache
is bitwise identical to one built without interruption: the length-grouping windows align
with shards, so a resumed run forms the same trunk batches.

    test_text_resume.py --canopy build/runners/canopy
"""
import argparse
import os
import signal
import subprocess
import sys

import h5py
import numpy as np

from support import check, finish, kill_when, work_dir

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")


def write_config(path, cache):
    with open(path, "w") as f:
        f.write(f"""[data]
source = arff
train_files = grain:{REUTERS}/ReutersGrain-train.arff
test_files = grain:{REUTERS}/ReutersGrain-test.arff
train_limit = 256
test_limit = 32
[text]
vocab = {HOME}/trunks/all_minilm_l6_v2.vocab.txt
max_length = 96
[trunk]
path = {HOME}/trunks/all_minilm_l6_v2.pt
allow_unpinned = true
device = cpu
pooling = masked_mean
[cache]
path = {cache}
batch_size = 8
# 8 batches: one length-grouping window per shard
shard_rows = 64
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-text-resume-")
    ref_cfg, cut_cfg = os.path.join(work, "ref.ini"), os.path.join(work, "cut.ini")
    write_config(ref_cfg, os.path.join(work, "ref"))
    write_config(cut_cfg, os.path.join(work, "cut"))
    r = subprocess.run([canopy, "cache", "--config", ref_cfg, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, "uninterrupted run" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))

    returncode, m = kill_when([canopy, "cache", "--config", cut_cfg, "--progress", "quiet"],
                              os.path.join(work, "cut", "manifest.json"), lambda doc: len(doc["shards"]) >= 2)
    check(returncode == -signal.SIGKILL and m is not None and not m["complete"],
          f"run killed by SIGKILL after {len(m['shards']) if m else 0} of 5 shards")
    r = subprocess.run([canopy, "cache", "--config", cut_cfg, "--progress", "lines"], capture_output=True, text=True)
    check(r.returncode == 0 and "resuming" in r.stderr, "rerun resumes after the finished shards")

    with h5py.File(os.path.join(work, "ref", "cache.h5"), "r") as a, h5py.File(os.path.join(work, "cut", "cache.h5"), "r") as b:
        for split in ("train", "test"):
            same = all(np.array_equal(a[f"{split}/{k}"][...], b[f"{split}/{k}"][...])
                       for k in ("features", "labels/grain", "labels/all_labels", "ids"))
            check(same, f"{split}: features, labels and ids bitwise identical to the uninterrupted run "
                        f"{a[f'{split}/features'].shape}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
