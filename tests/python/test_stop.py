#!/usr/bin/env python3
"""Stop real `canopy cache` and `canopy train` runs with SIGINT (Ctrl-C) and SIGTERM (`kill`,
a scheduler's preemption): each ends with exit status 128 + the signal, says how to go on and
leaves no temporary file; running the same command again (`--resume` for train) finishes
bitwise equal to a run that was never stopped. A process started with SIGINT ignored (a
background job of a shell script) keeps ignoring it.

    test_stop.py --canopy build/runners/canopy
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np

from support import check, finish, kill_when, read_cache_view, slow_conv_trunk, start, tiny_trunk_sections


def default_sigint():
    # A test runner started in the background of a shell script has SIGINT ignored, and its
    # children inherit that; canopy leaves an ignored SIGINT ignored (checked below).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def shards_written(n):
    return lambda m: len(m["shards"]) >= n


def main():
    canopy, work, trunk = start("canopy-stop-", slow_conv_trunk, "slow.pt")
    env = dict(os.environ, OMP_NUM_THREADS="2")

    def config(name, cache):
        path = os.path.join(work, name + ".ini")
        with open(path, "w") as f:
            f.write(tiny_trunk_sections(trunk, 3000, 500) + f"""[cache]
path = {cache}
batch_size = 50
shard_rows = 250
[train]
batch_size = 16
epochs = 4
[task.a_linear]
head = linear
optimizer = sgd
lr = 0.01
[task.b_mlp]
head = mlp
head.hidden = 64
head.dropout = 0.3
lr = 0.001
""")
        return path

    ref_cache, cut_cache = os.path.join(work, "ref"), os.path.join(work, "cut")
    ref_cfg, cut_cfg = config("ref", ref_cache), config("cut", cut_cache)
    r = subprocess.run([canopy, "cache", "--config", ref_cfg, "--progress", "quiet"], capture_output=True, text=True,
                       env=env)
    check(r.returncode == 0, f"uninterrupted cache (exit {r.returncode}) {r.stderr[-300:] if r.returncode else ''}")

    # Ctrl-C while caching: the finished shards stay, the next run computes the rest.
    err = []
    rc, seen = kill_when([canopy, "cache", "--config", cut_cfg, "--progress", "quiet"],
                         os.path.join(cut_cache, "manifest.json"), shards_written(2), env=env, sig=signal.SIGINT,
                         stderr=err, preexec_fn=default_sigint)
    last = err[0].strip().splitlines()[-1] if err[0].strip() else ""
    check(seen is not None and rc == 128 + signal.SIGINT and "stopped by SIGINT" in last and
          "run the same command again" in last, f"cache stopped by SIGINT: exit {rc}, '{last}'")
    m = json.load(open(os.path.join(cut_cache, "manifest.json")))
    check(not m["complete"] and len(m["shards"]) >= 2,
          f"the stopped cache keeps its {len(m['shards'])} finished shards, unfinished")
    left = glob.glob(os.path.join(cut_cache, "**", "*.tmp.*"), recursive=True)
    check(not left, f"no temporary file left behind ({left})")
    r = subprocess.run([canopy, "cache", "--config", cut_cfg, "--progress", "quiet"], capture_output=True, text=True,
                       env=env)
    said = [l for l in r.stderr.splitlines() if "resuming" in l]
    check(r.returncode == 0 and said, f"the same command goes on: {said}")
    ref, cut = read_cache_view(ref_cache), read_cache_view(cut_cache)
    same = all(np.array_equal(x, y) for s in ("train", "test") for x, y in zip(ref[s], cut[s]))
    check(same, "the finished cache is bitwise the uninterrupted one (h5py)")

    # SIGINT ignored from the start stays ignored: the run finishes.
    ignored_cache = os.path.join(work, "ignored")
    ignored_cfg = config("ignored", ignored_cache)
    rc, seen = kill_when([canopy, "cache", "--config", ignored_cfg, "--progress", "quiet"],
                         os.path.join(ignored_cache, "manifest.json"), shards_written(1), env=env,
                         sig=signal.SIGINT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    m = json.load(open(os.path.join(ignored_cache, "manifest.json")))
    check(seen is not None and rc == 0 and m["complete"], f"with SIGINT ignored the cache finishes (exit {rc})")

    # SIGTERM while training, after the first epoch: a checkpoint where it stopped, then --resume.
    r = subprocess.run([canopy, "train", "--config", ref_cfg, "--set", f"train.out_dir={work}/train-ref",
                        "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"uninterrupted training (exit {r.returncode}) {r.stderr[-300:] if r.returncode else ''}")
    out = f"{work}/train-cut"
    cmd = [canopy, "train", "--config", ref_cfg, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    err = []
    rc, seen = kill_when(cmd, os.path.join(out, "checkpoint", "state.json"), lambda st: st["epoch"] >= 1,
                         sig=signal.SIGTERM, stderr=err)
    last = err[0].strip().splitlines()[-1] if err[0].strip() else ""
    st = json.load(open(os.path.join(out, "checkpoint", "state.json")))
    check(seen is not None and rc == 128 + signal.SIGTERM and "stopped by SIGTERM" in last and
          f"resumes at epoch {st['epoch'] + 1} step {st['step']}" in last and "--resume" in last,
          f"training stopped by SIGTERM: exit {rc}, '{last}'")
    check((st["epoch"], st["step"]) > (1, 0) and st["epoch"] < 4,
          f"its checkpoint is where it stopped, after the first epoch's (epoch {st['epoch']} step {st['step']})")
    left = glob.glob(os.path.join(out, "**", "*.tmp.*"), recursive=True)
    check(not left, f"no temporary file left behind ({left})")
    # The same command without --resume says what it is about to replace (on a copy).
    shutil.copytree(out, out + "-copy")
    r = subprocess.run([canopy, "train", "--config", ref_cfg, "--set", f"train.out_dir={out}-copy",
                        "--progress", "quiet"], capture_output=True, text=True)
    plural = lambda n, what: f"{n} {what}" + ("" if n == 1 else "s")
    done = plural(st["epoch"], "epoch") + (" and " + plural(st["step"], "step") if st["step"] else "") + " done"
    said = [l for l in r.stderr.splitlines() if "earlier run" in l]
    check(r.returncode == 0 and said and f"({done})" in said[0] and "--resume" in said[0],
          f"a fresh run in its out_dir says it replaces the checkpoint ({done}): {said}")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    said = [l for l in r.stderr.splitlines() if "resuming" in l]
    check(r.returncode == 0 and said, f"--resume finishes: {said}")
    for name in ("a_linear", "b_mlp"):
        a = open(f"{work}/train-ref/heads/{name}.safetensors", "rb").read()
        b = open(f"{out}/heads/{name}.safetensors", "rb").read()
        check(a == b, f"{name}: weights bitwise identical to the uninterrupted run")
    strip = lambda path: [(l["epoch"], l["task"], l["eval_accuracy"], l["train_loss"])
                          for l in map(json.loads, open(path))]
    check(strip(f"{work}/train-ref/metrics.jsonl") == strip(f"{out}/metrics.jsonl"),
          "metrics.jsonl equal to the uninterrupted run's")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
