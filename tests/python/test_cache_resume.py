#!/usr/bin/env python3
"""Kill a real `canopy cache` run with SIGKILL, start it again, and check that the resumed
cache is bitwise identical to one built without interruption (read back with h5py).

    test_cache_resume.py --canopy build/runners/canopy
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from support import check, finish, read_cache_view, kill_when, slow_conv_trunk, start, tiny_trunk_sections



def write_config(path, trunk, cache):
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, 3000, 500) + f"""[cache]
path = {cache}
batch_size = 50
shard_rows = 250
""")


def manifest(cache):
    try:
        with open(os.path.join(cache, "manifest.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def main():
    canopy, work, trunk = start("canopy-resume-", slow_conv_trunk, "slow.pt")
    env = dict(os.environ, OMP_NUM_THREADS="2")

    ref_cfg, cut_cfg = os.path.join(work, "ref.ini"), os.path.join(work, "cut.ini")
    ref_cache, cut_cache = os.path.join(work, "ref"), os.path.join(work, "cut")
    write_config(ref_cfg, trunk, ref_cache)
    write_config(cut_cfg, trunk, cut_cache)
    t = time.time()
    r = subprocess.run([canopy, "cache", "--config", ref_cfg, "--progress", "quiet"], capture_output=True, text=True, env=env)
    check(r.returncode == 0, f"uninterrupted run ({time.time() - t:.1f}s): {r.stderr[-300:]}")

    # Kill twice at different points, then let it finish.
    kills = 0
    for min_shards in (2, 7):
        returncode, _ = kill_when([canopy, "cache", "--config", cut_cfg, "--progress", "quiet"],
                                  os.path.join(cut_cache, "manifest.json"),
                                  lambda m: len(m["shards"]) >= min_shards, env=env)
        m = manifest(cut_cache)
        killed = returncode == -signal.SIGKILL and m is not None and not m["complete"]
        check(killed, f"run killed by SIGKILL with {len(m['shards']) if m else 0} finished shard(s), cache unfinished")
        kills += killed
        if kills == 1 and killed:
            r = subprocess.run([canopy, "inspect", cut_cache], capture_output=True, text=True)
            check(r.returncode == 1 and "UNFINISHED" in r.stdout, "inspect reports the cache unfinished (exit 1)")
            r = subprocess.run([canopy, "train", "--config", cut_cfg, "--set", "task.t.head=linear", "--progress", "quiet"],
                               capture_output=True, text=True)
            check(r.returncode == 1 and "unfinished" in r.stderr, "training refuses an unfinished cache")
    r = subprocess.run([canopy, "cache", "--config", cut_cfg, "--progress", "lines"], capture_output=True, text=True, env=env)
    check(r.returncode == 0 and "resuming" in r.stderr, f"rerun resumes: {r.stderr.strip().splitlines()[0] if r.stderr else ''}")
    r = subprocess.run([canopy, "inspect", cut_cache, "--verify"], capture_output=True, text=True)
    check(r.returncode == 0 and "complete" in r.stdout and "verified" in r.stdout, "inspect --verify passes after resuming")

    ref, cut = read_cache_view(ref_cache), read_cache_view(cut_cache)
    for split in ("train", "test"):
        same = all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(ref[split], cut[split]))
        check(same, f"{split}: features, labels and ids bitwise identical to the uninterrupted run "
                    f"({ref[split][0].shape})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
