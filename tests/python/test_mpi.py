#!/usr/bin/env python3
"""canopy over MPI ranks (`mpirun --oversubscribe -np 3` on this machine's loopback):

  - the 3-rank cache is bitwise identical to the one-process cache (read back with h5py, and
    the manifests list the same shards with the same checksums);
  - a rank SIGKILLed mid-build ends the whole job within seconds, non-zero; the rerun with a
    different number of ranks (2) resumes, keeping the shards already written, and gives the
    same cache;
  - 3-rank training of frozen-trunk heads exports heads bitwise identical to a one-process run,
    and the same metrics;

    test_mpi.py --canopy build/runners/canopy
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from support import check, finish, slow_conv_trunk, slowdown, start, tiny_trunk_sections

MPIRUN = [shutil.which("mpirun") or "mpirun", "--oversubscribe", "--allow-run-as-root"]


def mpirun(n, *args):
    # Every rank one LibTorch thread: 3 ranks share 2 cores.
    return MPIRUN + ["-np", str(n), "-x", "OMP_NUM_THREADS=1"] + list(args)


def write_config(path, trunk, cache, out=None, tasks=""):
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, 3000, 500) + f"""[cache]
path = {cache}
batch_size = 50
shard_rows = 250
[train]
out_dir = {out or cache + '-out'}
epochs = 3
batch_size = 128
{tasks}""")


def read_all(cache):
    out = {}
    with h5py.File(os.path.join(cache, "cache.h5"), "r") as h:
        for split in ("train", "test"):
            out[split] = (h[f"{split}/features"][:], h[f"{split}/labels/class"][:], h[f"{split}/ids"][:])
    return out


def same_cache(a, b):
    ra, rb = read_all(a), read_all(b)
    return all(np.array_equal(x, y) for s in ra for x, y in zip(ra[s], rb[s]))


def shard_records(cache):
    with open(os.path.join(cache, "manifest.json")) as f:
        m = json.load(f)
    keep = ("split", "index", "first_row", "rows", "file", "features_crc32c", "ids_crc32c", "labels")
    return m["complete"], [{k: s[k] for k in keep} for s in m["shards"]]


def rank_pids(parent):
    """The canopy processes mpirun `parent` started, by rank."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            out[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            pass
    return out


def main():
    canopy, work, trunk = start("canopy-mpi-", slow_conv_trunk, "slow.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    # --- the cache: one process, then 3 ranks -----------------------------------------
    ref_cfg, mpi_cfg = os.path.join(work, "ref.ini"), os.path.join(work, "mpi.ini")
    ref_cache, mpi_cache = os.path.join(work, "ref"), os.path.join(work, "mpi")
    write_config(ref_cfg, trunk, ref_cache)
    write_config(mpi_cfg, trunk, mpi_cache)
    t = time.time()
    r = subprocess.run([canopy, "cache", "--config", ref_cfg, "--progress", "quiet"], capture_output=True,
                       text=True, env=env)
    check(r.returncode == 0, f"one-process cache ({time.time() - t:.1f} s): {r.stderr[-300:]}")
    t = time.time()
    r = subprocess.run(mpirun(3, canopy, "cache", "--config", mpi_cfg, "--progress", "lines"),
                       capture_output=True, text=True)
    check(r.returncode == 0, f"3-rank cache ({time.time() - t:.1f} s): {r.stderr[-600:]}")
    check("[canopy 1/3]" in r.stderr and "[canopy 2/3]" in r.stderr,
          "every rank's log lines carry its rank")
    check(r.stdout.count("cache '") <= 1 and "rows" in r.stdout, "rank 0 alone prints the report")
    check(same_cache(ref_cache, mpi_cache), "3-rank cache bitwise identical to the one-process cache (h5py)")
    check(shard_records(ref_cache) == shard_records(mpi_cache),
          "the manifests list the same shards with the same checksums")
    check(not [n for n in os.listdir(mpi_cache) if n.startswith("manifest.rank")],
          "no helper manifest is left once the cache is complete")

    # --- a rank SIGKILLed mid-build: the job ends fast; 2 ranks resume it --------------
    cut_cfg, cut_cache = os.path.join(work, "cut.ini"), os.path.join(work, "cut")
    write_config(cut_cfg, trunk, cut_cache)
    p = subprocess.Popen(mpirun(3, canopy, "cache", "--config", cut_cfg, "--progress", "quiet"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    deadline = time.time() + 120 * slowdown()
    shards_dir = os.path.join(cut_cache, "shards")
    while time.time() < deadline and p.poll() is None:
        done = [n for n in os.listdir(shards_dir) if n.endswith(".h5")] if os.path.isdir(shards_dir) else []
        if len(done) >= 5:
            pids = rank_pids(p.pid)
            if 1 in pids:
                os.kill(pids[1], signal.SIGKILL)
                killed_at = time.time()
                break
        time.sleep(0.01)
    check(killed_at is not None, "rank 1 SIGKILLed after 5 shards were written")
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    ended = time.time() - (killed_at or time.time())
    check(p.returncode != 0 and ended < 10 * slowdown(),
          f"the job ended {ended:.1f} s after the kill, exit {p.returncode}")
    check("rank 1" in err or "rank 1 " in err.lower(), f"the message names rank 1: {err[-400:]!r}")
    kept_before = len([n for n in os.listdir(shards_dir) if n.endswith(".h5")])
    r = subprocess.run(mpirun(2, canopy, "cache", "--config", cut_cfg, "--progress", "quiet"),
                       capture_output=True, text=True)
    check(r.returncode == 0 and "resuming" in r.stdout + r.stderr,
          f"2 ranks resume the killed 3-rank build: {(r.stdout + r.stderr)[-500:]}")
    check(same_cache(ref_cache, cut_cache) and shard_records(ref_cache) == shard_records(cut_cache),
          f"the resumed cache is bitwise the one-process cache ({kept_before} shard files were there)")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
