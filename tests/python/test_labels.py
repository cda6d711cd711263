#!/usr/bin/env python3
"""Label sources as the data declares them, on small ARFF files through the real MiniLM
trunk, checked with h5py:

- all_labels' bit k is set when label k has its positive value (yes, whatever the order
  the file declares its values in), not its second declared value
- a task's class count comes from the declaration (manifest meta.label_classes), not from
  the values a split happens to hold: a binary task whose test split has no positive, and a
  label_map over every all_labels value, both train
- a declaration with two candidate positives is refused until data.positive_value says which

    test_labels.py --canopy build/runners/canopy
"""
import json
import os
import subprocess
import sys

import h5py
import numpy as np

from support import check, finish, work_dir

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
WORDS = ["wheat", "corn", "price", "market", "rain", "farm", "export", "bank"]


def write_arff(path, values, labels, docs):
    with open(path, "w") as f:
        f.write(f"@relation r\n@attribute Text string\n@attribute c {{{','.join(values)}}}\n@data\n")
        for d, l in zip(docs, labels):
            f.write(f"'{d}',{l}\n")


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-labels-")
    rng = np.random.default_rng(0)
    docs = {s: [" ".join(rng.choice(WORDS, 6)) for _ in range(n)] for s, n in (("train", 48), ("test", 12))}
    # a: declared {yes,no} (positive first); b: {no,yes}, and its test split has no yes.
    a = {s: rng.integers(0, 2, len(docs[s])) for s in docs}
    b = {"train": rng.integers(0, 2, len(docs["train"])), "test": np.zeros(len(docs["test"]), dtype=int)}
    a["test"][:] = np.where(b["test"] == 1, 0, a["test"])  # the test split never has both (value 3)
    files = {}
    for s in docs:
        files[("a", s)] = os.path.join(work, f"a-{s}.arff")
        write_arff(files[("a", s)], ["yes", "no"], ["yes" if v else "no" for v in a[s]], docs[s])
        files[("b", s)] = os.path.join(work, f"b-{s}.arff")
        write_arff(files[("b", s)], ["no", "yes"], ["yes" if v else "no" for v in b[s]], docs[s])
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(f"""[data]
source = arff
train_files = a:{files[('a', 'train')]}, b:{files[('b', 'train')]}
test_files = a:{files[('a', 'test')]}, b:{files[('b', 'test')]}
[text]
vocab = {HOME}/trunks/all_minilm_l6_v2.vocab.txt
max_length = 16
[trunk]
path = {HOME}/trunks/all_minilm_l6_v2.pt
allow_unpinned = true
device = cpu
pooling = masked_mean
[cache]
path = {work}/cache
batch_size = 16
shard_rows = 128
[train]
out_dir = {work}/out
batch_size = 16
epochs = 2
[task.b_only]
head = linear
labels = b
class_names = no,yes
[task.any]
head = linear
labels = all_labels
label_map = 0,1,1,1
class_names = none,some
""")
    r = subprocess.run([canopy, "run", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"a binary task whose test split has no positive, and a label_map over every all_labels "
          f"value, train ({r.stderr.strip()[-300:]})")
    meta = json.load(open(f"{work}/cache/manifest.json"))["meta"]
    check(meta.get("label_classes") == {"a": 2, "all_labels": 4, "b": 2},
          f"the manifest records the declared class counts: {meta.get('label_classes')}")
    with h5py.File(f"{work}/cache/cache.h5", "r") as h:
        for s in ("train", "test"):
            got = h[f"{s}/labels/all_labels"][:]
            want = a[s] * 1 + b[s] * 2
            check(np.array_equal(got, want), f"{s}: all_labels' bits follow yes, whatever the declared order")
    # A task's label source the data lacks (a typo): `canopy run` refuses it before the trunk
    # pass, nothing cached; `canopy cache` (whose cache serves any config) says it and builds;
    # `canopy cache --check-tasks` refuses as run does.
    typo = ["--set", "task.b_only.labels=B", "--set", f"cache.path={work}/cache3", "--progress", "quiet"]
    said = "task 'b_only': labels = 'B' but the data has label sources: a, b, all_labels"
    r = subprocess.run([canopy, "run", "--config", config, *typo], capture_output=True, text=True)
    check(r.returncode == 2 and said in r.stderr and not os.path.exists(f"{work}/cache3/manifest.json") and
          "building" not in r.stderr, f"canopy run: a label the data lacks refused before the trunk pass "
          f"({r.stderr.strip()[-300:]})")
    # So is what else training would refuse of the tasks only once it reads the cache.
    for mistake, refusal in ((["--set", "task.b_only.class_names=no,yes,maybe"], "class_names has 3 names for 2 classes"),
                             (["--set", "task.b_only.label_map=0,1,1"], "label_map has 3 entries, label source 'b' has 2"),
                             (["--set", "task.any.head.hiden=8"], "unknown option(s) for head 'linear': task.any.head.hiden"),
                             (["--set", "task.b_only.class_weights=1,2,3"], "class_weights has 3 values for 2 classes"),
                             (["--set", "train.eval_split=valid"], "train.eval_split = valid: the data has no such split")):
        r = subprocess.run([canopy, "run", "--config", config, *mistake, *typo[2:]], capture_output=True, text=True)
        check(r.returncode == 2 and refusal in r.stderr and "building" not in r.stderr and
              not os.path.exists(f"{work}/cache3/manifest.json"),
              f"canopy run {' '.join(mistake)}: refused before the trunk pass ({r.stderr.strip()[-300:]})")
    r = subprocess.run([canopy, "cache", "--config", config, "--check-tasks", *typo], capture_output=True, text=True)
    check(r.returncode == 2 and said in r.stderr and not os.path.exists(f"{work}/cache3/manifest.json"),
          f"canopy cache --check-tasks refuses it too ({r.stderr.strip()[-300:]})")
    r = subprocess.run([canopy, "cache", "--config", config, *typo], capture_output=True, text=True)
    check(r.returncode == 0 and said + " (canopy train of this config will refuse it)" in r.stderr and
          os.path.exists(f"{work}/cache3/manifest.json"), f"canopy cache says it and builds the cache, which any "
          f"config of these features reads ({r.stderr.strip()[-300:]})")
    # Two candidate positives: refused until data.positive_value names one.
    for s in ("train", "test"):
        write_arff(os.path.join(work, f"t-{s}.arff"), ["true", "yes"], ["yes"] * len(docs[s]), docs[s])
    amb = ["--set", f"data.train_files=t:{work}/t-train.arff", "--set", f"data.test_files=t:{work}/t-test.arff",
           "--set", f"cache.path={work}/cache2"]
    r = subprocess.run([canopy, "cache", "--config", config, *amb, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode != 0 and "data.positive_value" in r.stderr and "{true,yes}" in r.stderr,
          f"{{true,yes}} is refused, naming data.positive_value ({r.stderr.strip()[-200:]})")
    r = subprocess.run([canopy, "cache", "--config", config, *amb, "--set", "data.positive_value=true",
                        "--progress", "quiet"], capture_output=True, text=True)
    ok = r.returncode == 0
    if ok:
        with h5py.File(f"{work}/cache2/cache.h5", "r") as h:
            ok = int(h["train/labels/all_labels"][:].sum()) == 0  # every document is 'yes', not 'true'
    check(ok, f"data.positive_value = true picks it: no document has the bit ({r.stderr.strip()[-200:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
