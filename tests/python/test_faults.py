#!/usr/bin/env python3
"""Real faults, from outside, as a user meets them:

  * two `canopy cache` processes on one cache directory: the second is refused at once,
    naming the first one's pid; the first finishes and its cache verifies;
  * two `canopy train` processes into one out_dir: the second is refused; `canopy cache`
    cannot rebuild a cache a training run is reading;
  * a training run SIGKILLed while it holds its locks leaves no stale lock: the next run
    starts;
  * a complete cache with its view (cache.h5) or a shard deleted: `inspect --verify` fails,
    and `canopy cache` repairs it instead of calling it up to date, to the same bytes;
  * a trunk that gives NaN for some inputs: `canopy cache` fails, naming how many rows and
    the first ids, and leaves no finished cache that training would accept;
  * a full disk under out_dir (a 1 MiB tmpfs, mounted here; needs root): `canopy train` exits 1
    (not a LibTorch abort) with an error that says the disk is full and names the file, and
    leaves no temporary file behind; one that fills at the second epoch's checkpoint says the
    first is whole and how to go on, and after more space `--resume` gives the heads of a run
    that never failed, bit for bit;
  * a cache whose disk fills at its last shard, its manifest or its view, swept 4 KiB at a
    time: exit 1 saying so (never a crash), no temporary file, and then a cache that
    verifies, its features those of one that never failed;
  * a train split larger than the memory this process may take (a real memory cgroup made
    here, as a container has; needs root): `canopy train` streams it, saying why, and trains,
    where reading it whole (as it did by default before) is ended by the kernel's OOM kill;
  * trunk passes over batches larger than a memory cgroup allows: `canopy cache` stops saying
    so, with a batch size that fits, where the kernel's OOM kill would end it without a word;
    that batch size builds the cache within the same limit; `canopy predict` the same;
  * a head whose steps need more memory than a memory cgroup allows, beside one that fits:
    it FAILS alone, saying memory is why, and the other trains, where the kernel's OOM kill
    would end the run and every head with it;
  * a CPU quota below the cores the process may run on (a real cgroup with a CFS quota, as a
    Kubernetes CPU limit sets): `canopy train` says so and trains on that many TBB workers,
    unless train.workers asks for more;
  * a finished cache on a read-only filesystem (a bind mount remounted read-only; needs root):
    `canopy train` and `canopy run` read it to the heads of a writable copy, bit for bit;
    `canopy cache` says it is up to date; `--force` is refused saying it cannot be written;
  * output on a full disk (/dev/full): `canopy predict --output` and `canopy predict`,
    `canopy keys` to standard output exit 1 saying so (never "wrote N predictions" with
    nothing written), and /dev/full is still the device afterwards.

    test_faults.py --canopy build/runners/canopy
"""
import glob
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import support
from support import check, finish, start, tiny_conv_trunk, tiny_trunk_sections


import torch


class NanForBrightImages(torch.nn.Module):
    """The tiny conv trunk, but NaN for every image brighter than average."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        bright = x.mean(dim=[1, 2, 3]) > -0.4
        return torch.where(bright.view(-1, 1, 1, 1), torch.full_like(y, float("nan")), y)


def write_config(path, work, trunk, train_limit, epochs=3, extra=""):
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, train_limit, 200, pooling="flatten") + f"""[cache]
path = {work}/cache
[train]
out_dir = {work}/out
batch_size = 64
epochs = {epochs}
tensorboard = false
{extra}
[task.linear]
head = linear
""")


def wait_for_holder(lock, timeout=60):
    """Waits until a writer has recorded itself in the lock file."""
    deadline = time.time() + timeout * support.slowdown()
    while time.time() < deadline:
        try:
            if "pid" in open(lock).read():
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return False


def second_writer_is_refused(canopy, work, trunk):
    config = os.path.join(work, "job.ini")
    write_config(config, work, trunk, 60000)
    lock = os.path.join(work, "cache", "canopy.lock")
    first = subprocess.Popen([canopy, "cache", "--config", config, "--progress", "quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check(wait_for_holder(lock), "the first `canopy cache` holds the cache's lock")
    # The second writer: another trunk, same cache directory (the corruption issue 17 found).
    other = os.path.join(work, "other.pt")
    import torch
    torch.manual_seed(1)
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()).save(other)
    t = time.time()
    r = subprocess.run([canopy, "cache", "--config", config, "--set", f"trunk.path={other}", "--progress", "quiet"],
                       capture_output=True, text=True)
    took = time.time() - t
    running = first.poll() is None
    check(r.returncode == 1 and "in use by another canopy process" in r.stderr and f"pid {first.pid}" in r.stderr,
          f"a second `canopy cache` is refused naming the first one's pid {first.pid}: {r.stderr.strip()[-300:]}")
    check(running and took < 10, f"... at once ({took:.2f} s), while the first still runs")
    out, err = first.communicate()
    check(first.returncode == 0 and "built" in out, f"the first `canopy cache` finishes ({err[-300:]})")
    r = subprocess.run([canopy, "inspect", os.path.join(work, "cache"), "--config", config, "--verify"],
                       capture_output=True, text=True)
    check(r.returncode == 0 and "matches" in r.stdout and "yes" in r.stdout,
          f"its cache verifies and matches its config ({r.stdout[-200:]})")
    return config


def features_digest(work):
    import hashlib

    import h5py
    with h5py.File(os.path.join(work, "cache", "cache.h5"), "r") as f:
        return hashlib.sha256(f["train/features"][...].tobytes() + f["test/features"][...].tobytes()).hexdigest()


def repair(canopy, work, config):
    cache = os.path.join(work, "cache")
    before = features_digest(work)
    verify = [canopy, "inspect", cache, "--verify"]
    os.remove(os.path.join(cache, "cache.h5"))
    r = subprocess.run(verify, capture_output=True, text=True)
    check(r.returncode == 1 and "cache.h5" in r.stdout and "missing" in r.stdout,
          f"inspect --verify reports the deleted view ({r.returncode} {r.stdout.strip()[-160:]} {r.stderr.strip()[-300:]})")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    said = [l for l in r.stderr.splitlines() if "repairing" in l]
    check(r.returncode == 0 and "up to date" not in r.stdout and os.path.exists(os.path.join(cache, "cache.h5")) and
          said and "the view cache.h5 is missing" in said[0],
          f"`canopy cache` rebuilds a deleted view, not 'up to date' ({said[:1]})")
    shards = sorted(glob.glob(os.path.join(cache, "shards", "*.h5")))
    shard = sorted(glob.glob(os.path.join(cache, "shards", "train-*.h5")))[3]
    os.remove(shard)
    r = subprocess.run(verify, capture_output=True, text=True)
    check(r.returncode == 1, "inspect --verify reports the deleted shard")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    said = [l for l in r.stderr.splitlines() if "repairing" in l]
    # Every other shard is kept (they verify); only the deleted one is computed again.
    check(r.returncode == 0 and said and "shard 'shards/train-00003.h5' is missing" in said[0] and
          f"resuming: {len(shards) - 1} finished shard(s)" in said[0],
          f"`canopy cache` resumes at the deleted shard ({said[:1]})")
    r = subprocess.run(verify, capture_output=True, text=True)
    check(r.returncode == 0 and features_digest(work) == before,
          "after the repairs the cache verifies and its features are the same bytes as before")


def train_locks(canopy, work, config):
    lock = os.path.join(work, "out", "canopy.lock")
    first = subprocess.Popen([canopy, "train", "--config", config, "--set", "train.epochs=400",
                              "--set", "data.train_limit=60000", "--progress", "quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    check(wait_for_holder(lock), "`canopy train` holds its out_dir's lock")
    r = subprocess.run([canopy, "train", "--config", config, "--set", "data.train_limit=60000", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "in use by another canopy process" in r.stderr and f"pid {first.pid}" in r.stderr,
          f"a second `canopy train` into the same out_dir is refused ({r.stderr.strip()[-200:]})")
    r = subprocess.run([canopy, "cache", "--config", config, "--force", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "in use by another canopy process" in r.stderr,
          f"`canopy cache --force` cannot rebuild the cache a run is reading ({r.stderr.strip()[-200:]})")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    r = subprocess.run([canopy, "train", "--config", config, "--set", "data.train_limit=60000",
                        "--set", "train.epochs=1", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"after a SIGKILL no stale lock remains: the next run trains ({r.stderr[-200:]})")


def memory_limit(canopy, work, config):
    """The train split (60 000 x 1568 floats, 359 MiB) against a memory cgroup limited to 9/10 of
    it: the default cache.memory_cap_mb = 0 streams it, where reading it whole, as 0 meant
    before, is ended by the kernel's OOM kill (the split alone is more than the limit)."""
    if support.slowdown() > 1:
        print("skip the memory limit: a sanitizer's own memory (shadow, quarantine) is charged to the cgroup too")
        return
    train = [canopy, "train", "--config", config, "--set", "data.train_limit=60000", "--set", "train.epochs=2",
             "--progress", "quiet"]
    ref = os.path.join(work, "mem-ref")
    r = subprocess.run(train + ["--set", f"train.out_dir={ref}"], capture_output=True, text=True)
    check(r.returncode == 0 and "streaming" not in r.stderr,
          f"unlimited, the train split is read whole ({r.stderr.strip()[-200:]})")
    split = 60200 * 1568 * 4
    limit = split * 9 // 10
    with support.MemoryCgroup(f"canopy-test-{os.getpid()}", limit) as cg:
        if not cg.made("the memory limit"):
            return
        out = os.path.join(work, "mem-out")
        r = subprocess.run(train + ["--set", f"train.out_dir={out}"], capture_output=True, text=True,
                           preexec_fn=cg.enter)
        check(r.returncode == 0 and "is more than 3/4 of the memory this process may take: the memory cgroup" in r.stderr
              and "streaming (window of" in r.stderr and cg.oom_kills() == 0,
              f"under a {limit >> 20} MiB limit "
              f"`canopy train` streams the split, saying why, and ends ({r.returncode}: {r.stderr.strip()[-400:]})")

        def accuracy(d):
            with open(os.path.join(d, "heads", "linear.json")) as f:
                return json.load(f)["eval_accuracy"]
        if r.returncode == 0:
            check(abs(accuracy(out) - accuracy(ref)) < 0.03,
                  f"... to a head as accurate as the one read whole ({accuracy(out):.4f} against {accuracy(ref):.4f})")
        # The eval split is read whole: the train split named as the one to evaluate on
        # cannot fit, and is refused before it is read.
        r = subprocess.run(train + ["--set", f"train.out_dir={out}-eval", "--set", "train.eval_split=train"],
                           capture_output=True, text=True, preexec_fn=cg.enter)
        check(r.returncode == 1 and f"the eval split 'train' (60000 rows, {60000 * 1568 * 4 / 2**20:.0f} MiB in memory as float32) is read "
              "whole" in r.stderr and "the memory cgroup" in r.stderr and cg.oom_kills() == 0
              and not os.path.exists(os.path.join(f"{out}-eval", "heads")),
              f"... an eval split larger than the limit is refused, saying so, before it is read "
              f"({r.returncode}: {r.stderr.strip()[-400:]})")
        r = subprocess.run(train + ["--set", f"train.out_dir={out}-whole", "--set", "cache.memory_cap_mb=100000"],
                           capture_output=True, text=True, preexec_fn=cg.enter)
        check(r.returncode == -signal.SIGKILL and cg.oom_kills() == 1,
              f"... where reading it whole is ended by the kernel's OOM kill (exit {r.returncode}, "
              f"{cg.oom_kills()} OOM kills): the limit is real")
    # Evaluated on the train split itself, training shares the rows evaluated on: under a
    # limit that holds the split once (with room to spare) but not twice, it is read whole
    # and held once, where a second copy would have been streamed.
    with support.MemoryCgroup(f"canopy-test-twice-{os.getpid()}", split * 3 // 2) as cg:
        if not cg.made("the shared split's memory limit"):
            return
        r = subprocess.run(train + ["--set", f"train.out_dir={work}/mem-shared", "--set", "train.eval_split=train"],
                           capture_output=True, text=True, preexec_fn=cg.enter)
        check(r.returncode == 0 and "streaming" not in r.stderr and cg.oom_kills() == 0,
              f"under a {(split * 3 // 2) >> 20} MiB limit, train.eval_split = train holds the split once, "
              f"read whole ({r.returncode}: {r.stderr.strip()[-300:]})")


def exit_and_peak(cmd):
    """Runs `cmd` without a limit: its exit code and its peak resident memory in bytes."""
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def head_memory_limit(canopy, work, config):
    """A head whose steps need more memory than a memory cgroup allows, beside one that fits:
    the greedy head FAILS alone, saying memory is why, and the other trains, where the kernel's
    OOM kill would end the run and every head with it."""
    if support.slowdown() > 1:
        print("skip the heads' memory limit: a sanitizer's own memory is charged to the cgroup too")
        return
    train = [canopy, "train", "--config", config, "--set", "data.train_limit=60000", "--set", "train.epochs=1",
             "--set", "train.batch_size=30000", "--set", "task.big.head=mlp", "--set", "task.big.head.hidden=4096",
             "--progress", "quiet"]
    limit = 1000 << 20

    def exported(out):
        return sorted(t for t in ("linear", "big") if os.path.exists(os.path.join(out, "heads", f"{t}.safetensors")))

    ref = os.path.join(work, "heads-mem-ref")
    code, peak = exit_and_peak(train + ["--set", f"train.out_dir={ref}"])
    check(code == 0 and peak > limit and exported(ref) == ["big", "linear"],
          f"unlimited, a 4096-wide MLP at batches of 30 000 trains beside a linear head with a peak of "
          f"{peak >> 20} MiB, above a {limit >> 20} MiB limit")
    with support.MemoryCgroup(f"canopy-test-heads-{os.getpid()}", limit) as cg:
        if not cg.made("the heads' memory limit"):
            return
        out = os.path.join(work, "heads-mem")
        r = subprocess.run(train + ["--set", f"train.out_dir={out}"], capture_output=True, text=True,
                           preexec_fn=cg.enter)
        check(r.returncode == 3 and "task 'big' FAILED" in r.stdout and "can't allocate memory" in r.stdout
              and "frame #" not in r.stdout + r.stderr
              and "training needs more memory than this process may take (the memory cgroup" in r.stderr
              and cg.oom_kills() == 0 and exported(out) == ["linear"],
              f"under a {limit >> 20} MiB limit the MLP fails alone, saying memory is why, and the linear head "
              f"trains, with no OOM kill ({r.returncode}, {cg.oom_kills()} OOM kills: {r.stderr.strip()[-300:]})")


class WideConv(torch.nn.Module):
    """A trunk with wide activations: 64 channels at full resolution, then pooled to 8."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.narrow = torch.nn.Conv2d(64, 8, 3, stride=4, padding=1)

    def forward(self, x):
        return torch.relu(self.narrow(torch.relu(self.wide(x))))


def cache_memory_limit(canopy, work):
    """Trunk passes over batches larger than a memory cgroup allows (a real one, as a container
    has): `canopy cache` stops with an error that says so and names a batch size that fits,
    where the kernel's OOM kill would end it without a word; that batch size builds the cache
    within the same limit."""
    if support.slowdown() > 1:
        print("skip the cache's memory limit: a sanitizer's own memory is charged to the cgroup too")
        return
    trunk = os.path.join(work, "wide.pt")
    torch.manual_seed(0)
    torch.jit.script(WideConv().eval()).save(trunk)
    mem_work = os.path.join(work, "cache-mem")
    os.makedirs(mem_work)
    config = os.path.join(mem_work, "job.ini")
    write_config(config, mem_work, trunk, 1024)
    with open(config) as f:
        text = f.read().replace("resize = 28", "resize = 128").replace("pooling = flatten", "pooling = avg")
    with open(config, "w") as f:
        f.write(text)
    cache = [canopy, "cache", "--config", config, "--set", "cache.batch_size=256", "--progress", "quiet"]
    limit = 640 << 20
    # Unlimited, the batches take more than the limit: the kernel would kill for it.
    code, peak = exit_and_peak(cache + ["--set", f"cache.path={mem_work}/ref"])
    check(code == 0 and peak > limit,
          f"unlimited, batches of 256 build the cache with a peak of {peak >> 20} MiB, above a {limit >> 20} MiB limit")
    with support.MemoryCgroup(f"canopy-test-cache-{os.getpid()}", limit) as cg:
        if not cg.made("the cache's memory limit"):
            return
        r = subprocess.run(cache + ["--set", f"cache.path={mem_work}/cache"], capture_output=True, text=True,
                           preexec_fn=cg.enter)
        said = re.search(r"set cache.batch_size = (\d+) or less", r.stderr)
        check(r.returncode == 1 and "the trunk passes over batches of 256 rows (cache.batch_size) need more memory "
              "than this process may take" in r.stderr and "the memory cgroup" in r.stderr and said
              and cg.oom_kills() == 0,
              f"under a {limit >> 20} MiB limit `canopy cache` stops, saying why and what fits, with no OOM kill "
              f"({r.returncode}, {cg.oom_kills()} OOM kills: {r.stderr.strip()[-400:]})")
        if not said:
            return
        fits = int(said.group(1))
        r = subprocess.run(cache + ["--set", f"cache.path={mem_work}/cache", "--set", f"cache.batch_size={fits}"],
                           capture_output=True, text=True, preexec_fn=cg.enter)
        v = subprocess.run([canopy, "inspect", f"{mem_work}/cache", "--verify"], capture_output=True, text=True)
        check(r.returncode == 0 and cg.oom_kills() == 0 and v.returncode == 0,
              f"... and with cache.batch_size = {fits}, as it says, builds a cache that verifies within the limit "
              f"({r.returncode}: {r.stderr.strip()[-300:]}; {v.stdout.strip()[-200:]})")
        # `canopy predict` runs the same trunk passes: the same, with nothing written.
        t = subprocess.run([canopy, "train", "--config", config, "--set", f"cache.path={mem_work}/cache",
                            "--set", "train.epochs=1", "--progress", "quiet"], capture_output=True, text=True)
        predictions = os.path.join(mem_work, "predictions.csv")
        predict = [canopy, "predict", "--config", config, "--input", os.path.join(support.FMNIST, "t10k-images-idx3-ubyte.gz"),
                   "--limit", "1000", "--output", predictions, "--progress", "quiet"]
        r = subprocess.run(predict + ["--set", "cache.batch_size=256"], capture_output=True, text=True, preexec_fn=cg.enter)
        said = re.search(r"set cache.batch_size = (\d+) or less", r.stderr)
        check(t.returncode == 0 and r.returncode == 1 and "predicting over batches of 256 rows (cache.batch_size) needs "
              "more memory than this process may take" in r.stderr and said and cg.oom_kills() == 0
              and not os.path.exists(predictions),
              f"`canopy predict` over batches of 256 stops the same way, writing nothing ({r.returncode}: {r.stderr.strip()[-300:]})")
        # `canopy evaluate` runs them too.
        evaluate = [canopy, "evaluate", "--config", config, "--input", os.path.join(support.FMNIST, "t10k-images-idx3-ubyte.gz"),
                    "--limit", "1000", "--progress", "quiet", "--set", "cache.batch_size=256"]
        e = subprocess.run(evaluate, capture_output=True, text=True, preexec_fn=cg.enter)
        check(e.returncode == 1 and "evaluating over batches of 256 rows (cache.batch_size) needs more memory than this "
              "process may take" in e.stderr and "set cache.batch_size = " in e.stderr and cg.oom_kills() == 0,
              f"`canopy evaluate` over batches of 256 stops the same way ({e.returncode}: {e.stderr.strip()[-300:]})")
        if said:
            r = subprocess.run(predict + ["--set", f"cache.batch_size={said.group(1)}"], capture_output=True, text=True,
                               preexec_fn=cg.enter)
            rows = sum(1 for _ in open(predictions)) - 1 if os.path.exists(predictions) else 0
            check(r.returncode == 0 and rows == 1000 and cg.oom_kills() == 0,
                  f"... and predicts the 1000 rows with the batch size it names, {said.group(1)} ({r.stderr.strip()[-200:]})")


def cpu_quota(canopy, work, config):
    """A CFS quota of 1 CPU on a machine where the process may run on more: the threads follow
    the quota, not the cores."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        print("skip the CPU quota: this process may run on one core only, which a quota of 1 does not cut")
        return
    train = [canopy, "train", "--config", config, "--set", "data.train_limit=60000", "--set", "train.epochs=1",
             "--set", f"train.out_dir={work}/quota-out", "--progress", "quiet"]
    r = subprocess.run(train, capture_output=True, text=True)
    check(r.returncode == 0 and f"({cores} TBB workers x" in r.stderr and "CPU quota" not in r.stderr,
          f"without a quota `canopy train` runs {cores} TBB workers ({r.stderr.strip()[-200:]})")
    with support.CpuCgroup(f"canopy-test-{os.getpid()}", 1) as cg:
        if not cg.made("the CPU quota"):
            return
        r = subprocess.run(train, capture_output=True, text=True, preexec_fn=cg.enter)
        check(r.returncode == 0 and f"grants 1 of the {cores} CPUs this process may run on" in r.stderr and
              "(1 TBB worker x" in r.stderr,
              f"under a 1-CPU quota it says so and runs 1 TBB worker ({r.stderr.strip()[-300:]})")
        r = subprocess.run(train + ["--set", f"train.workers={cores}"], capture_output=True, text=True,
                           preexec_fn=cg.enter)
        check(r.returncode == 0 and f"({cores} TBB workers x" in r.stderr,
              f"... and {cores} when train.workers asks for them ({r.stderr.strip()[-200:]})")
        # A program of its own calling run_cache and run_train: the same, through
        # fit_threads_to_cpu_quota (examples/in_process).
        example = os.path.join(os.path.dirname(os.path.dirname(canopy)), "examples", "in_process", "canopy_in_process")
        if not os.path.exists(example):
            print(f"skip the in-process example under the quota: {example} is not built (CANOPY_BUILD_EXAMPLES=OFF)")
        else:
            r = subprocess.run([example, config, "data.train_limit=60000", "train.epochs=1",
                                f"train.out_dir={work}/quota-example"], capture_output=True, text=True,
                               preexec_fn=cg.enter)
            check(r.returncode == 0 and f"grants 1 of the {cores} CPUs this process may run on" in r.stderr and
                  "(1 TBB worker x" in r.stderr,
                  f"... and so does the in-process example ({r.returncode}: {r.stderr.strip()[-300:]})")


def non_finite_features(canopy, work):
    trunk = os.path.join(work, "nan.pt")
    torch.manual_seed(0)
    torch.jit.script(NanForBrightImages().eval()).save(trunk)
    nan_work = os.path.join(work, "nan")
    os.makedirs(nan_work)
    config = os.path.join(nan_work, "job.ini")
    write_config(config, nan_work, trunk, 1000)
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 1 and "non-finite features (NaN or Inf) for" in r.stderr and "(first: train " in r.stderr,
          f"a trunk that gives NaN: `canopy cache` fails naming the rows ({r.stderr.strip()[-260:]})")
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 1 and "loss is nan" not in r.stderr,
          f"... and `canopy train` finds no cache to train on ({r.stderr.strip()[-160:]})")


def disk_full(canopy, work, config):
    out = os.path.join(work, "small")
    os.makedirs(out)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", out], capture_output=True, text=True)
    if mounted.returncode != 0:
        # Without the right to mount there is no real full disk to test with; under CI that is a failure.
        check(os.environ.get("CI") != "true", f"a 1 MiB tmpfs can be mounted for the full-disk test ({mounted.stderr.strip()})")
        return
    try:
        # An MLP whose checkpoint (weights + Adam's two moments, ~3 MB) cannot fit in 1 MiB.
        r = subprocess.run([canopy, "train", "--config", config, "--set", f"train.out_dir={out}",
                            "--set", "data.train_limit=60000", "--set", "train.epochs=2",
                            "--set", "task.linear.head=mlp", "--set", "task.linear.head.hidden=512",
                            "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 1, f"on a full disk `canopy train` exits 1, not with a signal ({r.returncode})")
        check("terminate called" not in r.stderr and "disk is full" in r.stderr and "linear." in r.stderr,
              f"... saying the disk is full and naming the file: {r.stderr.strip()[-300:]}")
        check("no checkpoint had been written yet" in r.stderr,
              f"... and that there is no checkpoint to resume from ({r.stderr.strip()[-200:]})")
        leftovers = temporaries(out)
        check(not leftovers, f"... and leaving no temporary file ({leftovers})")
        # The cache on a full disk: 60 000 rows of 1568 floats (376 MB) into 1 MiB: refused before
        # the trunk runs, since the rows' data alone cannot fit (the sweep below fills the disk
        # while writing).
        r = subprocess.run([canopy, "cache", "--config", config, "--set", f"cache.path={out}/cache",
                            "--progress", "quiet"], capture_output=True, text=True)
        leftovers = temporaries(os.path.join(out, "cache"))
        shards = glob.glob(os.path.join(out, "cache", "shards", "*"))
        need = 60200 * (1568 * 4 + 8 * 2)  # every row's features, id and class label
        check(r.returncode == 1 and "terminate called" not in r.stderr and
              f"not enough disk space for the cache: its 60200 rows still to compute need at least {need / 2**20:.0f} "
              "MiB in shards (1568 features each in float32, with ids and labels)" in r.stderr and
              "MiB free" in r.stderr and not leftovers and not shards,
              f"on a disk too small `canopy cache` exits 1 before the trunk runs, saying how much it needs and has, "
              f"writing no shard ({r.stderr.strip()[-300:]}; {leftovers}; {shards})")
    finally:
        subprocess.run(["umount", out])
    full_at_second_checkpoint(canopy, work, config)
    cache_full_at_each_file(canopy, work, config)
    output_on_full_disk(canopy, work, config)


def read_only_cache(canopy, work, config):
    """A shared cache on a read-only mount: readers need no write access (the lock is a shared
    flock on a file opened read-only); what would change it is refused, naming why."""
    small = ["--set", "data.train_limit=2000", "--set", "train.epochs=2", "--progress", "quiet"]
    src = os.path.join(work, "ro-src")
    r = subprocess.run([canopy, "cache", "--config", config, "--set", f"cache.path={src}/cache"] + small,
                       capture_output=True, text=True)
    check(r.returncode == 0, f"a cache to mount read-only is built ({r.stderr.strip()[-200:]})")
    ref = os.path.join(work, "ro-ref-out")
    r = subprocess.run([canopy, "train", "--config", config, "--set", f"cache.path={src}/cache",
                        "--set", f"train.out_dir={ref}"] + small, capture_output=True, text=True)
    check(r.returncode == 0, f"... and trained on where it was written ({r.stderr.strip()[-200:]})")
    mnt = os.path.join(work, "ro")
    os.makedirs(mnt)
    mounted = subprocess.run(["mount", "--bind", src, mnt], capture_output=True, text=True)
    if mounted.returncode == 0:
        mounted = subprocess.run(["mount", "-o", "remount,bind,ro", mnt], capture_output=True, text=True)
    if mounted.returncode != 0:
        check(os.environ.get("CI") != "true", f"a read-only bind mount can be made ({mounted.stderr.strip()})")
        subprocess.run(["umount", mnt])
        return
    try:
        cache = os.path.join(mnt, "cache")
        check(subprocess.run(["touch", os.path.join(cache, "x")], capture_output=True).returncode != 0,
              "the mounted cache is read-only")
        for cmd in ("train", "run"):
            out = os.path.join(work, f"ro-{cmd}-out")
            r = subprocess.run([canopy, cmd, "--config", config, "--set", f"cache.path={cache}",
                                "--set", f"train.out_dir={out}"] + small, capture_output=True, text=True)
            check(r.returncode == 0 and heads_digest(out) == heads_digest(ref) and heads_digest(ref),
                  f"`canopy {cmd}` reads the read-only cache to the heads trained where it was written "
                  f"({r.stderr.strip()[-200:]})")
        r = subprocess.run([canopy, "cache", "--config", config, "--set", f"cache.path={cache}"] + small,
                           capture_output=True, text=True)
        check(r.returncode == 0 and "up to date" in r.stdout,
              f"`canopy cache` calls the read-only cache up to date ({r.stdout.strip()[:120]} {r.stderr.strip()[-200:]})")
        r = subprocess.run([canopy, "cache", "--config", config, "--set", f"cache.path={cache}", "--force"] + small,
                           capture_output=True, text=True)
        check(r.returncode == 1 and "cannot be written (Read-only file system) and is not up to date: rebuilding "
              "(forced)" in r.stderr, f"`canopy cache --force` is refused saying why ({r.stderr.strip()[-260:]})")
        r = subprocess.run([canopy, "inspect", "--verify", cache], capture_output=True, text=True)
        check(r.returncode == 0, f"`canopy inspect --verify` checks it ({r.stderr.strip()[-200:]})")
        r = subprocess.run([canopy, "train", "--config", config, "--set", f"cache.path={cache}",
                            "--set", f"train.out_dir={cache}/out"] + small, capture_output=True, text=True)
        check(r.returncode == 1 and f"cannot create directory '{cache}/out': Read-only file system" in r.stderr,
              f"an out_dir there is refused naming it ({r.stderr.strip()[-200:]})")
    finally:
        subprocess.run(["umount", mnt])


def temporaries(path):
    """The temporary files (canopy's `<name>.tmp.<pid>`) anywhere under `path`."""
    return [p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if ".tmp." in p]


def view_bytes(cache):
    """Each split's features, labels and ids as the cache's view gives them, as bytes."""
    return {split: [a.tobytes() for a in arrays] for split, arrays in support.read_cache_view(cache).items()}


def du(path):
    return int(subprocess.run(["du", "-sB1", path], capture_output=True, text=True, check=True).stdout.split()[0])


def cache_full_at_each_file(canopy, work, config):
    """`canopy cache` on a disk that fills at its last files: the last shards, the manifest and
    the view (cache.h5), one 4 KiB step of free space at a time. Each run exits 0, or 1 saying
    the disk is full, never with a signal (HDF5 1.10 crashed at exit after the view's close
    had failed) and never leaving a temporary file; once there is space, `canopy cache`
    finishes and the cache verifies, its features those of a cache that never failed."""
    cache = [canopy, "cache", "--config", config, "--set", "data.train_limit=2000", "--set", "cache.shard_rows=512",
             "--progress", "quiet"]
    ref = os.path.join(work, "ref-cache")
    r = subprocess.run(cache + ["--set", f"cache.path={ref}"], capture_output=True, text=True)
    check(r.returncode == 0, f"a reference cache is built ({r.stderr.strip()[-200:]})")
    want = view_bytes(ref)
    # What the cache takes without its view: the free space at which the view is the file that
    # no longer fits (tmpfs counts whole pages).
    base = du(ref) - du(os.path.join(ref, "cache.h5"))
    mnt = os.path.join(work, "small3")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", mnt]).returncode != 0:
        return  # disk_full has said why
    failed_at = []
    try:
        for free in range(base - 16384, base + 40960, 4096):
            subprocess.run(["rm", "-rf", os.path.join(mnt, "cache")], check=True)
            st = os.statvfs(mnt)
            filler = os.path.join(mnt, "filler")
            subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - free), filler], check=True)
            out = os.path.join(mnt, "cache")
            r = subprocess.run(cache + ["--set", f"cache.path={out}"], capture_output=True, text=True)
            os.remove(filler)
            left = temporaries(out)
            last = (r.stderr.strip().splitlines() or [""])[-1]
            check(r.returncode in (0, 1) and (r.returncode == 0 or "disk is full" in last) and not left,
                  f"{free} bytes free for a cache of {base} without its view: exit 0, or 1 saying the disk is full, "
                  f"and no temporary file ({r.returncode}: {last[-300:]}; {left})")
            if r.returncode != 0:
                failed_at.append(last)
                r = subprocess.run(cache + ["--set", f"cache.path={out}"], capture_output=True, text=True)
                check(r.returncode == 0, f"... then, with space, `canopy cache` finishes it ({r.stderr.strip()[-200:]})")
            v = subprocess.run([canopy, "inspect", "--verify", out], capture_output=True, text=True)
            try:
                got = view_bytes(out)
            except OSError as e:
                got = f"h5py cannot read the view: {e}"
            check(v.returncode == 0 and got == want,
                  f"... and the cache verifies, its features, labels and ids those of the reference "
                  f"({v.stderr.strip()[-200:]}{got if isinstance(got, str) else ''})")
    finally:
        subprocess.run(["umount", mnt])
    where = {w for w in ("writing shard", "manifest.json", "writing the view") if any(w in f for f in failed_at)}
    check(where == {"writing shard", "manifest.json", "writing the view"},
          f"the sweep filled the disk at a shard, the manifest and the view, each said so ({sorted(where)})")


def heads_digest(out):
    import hashlib
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(out, "heads", "*.safetensors")))}


def full_at_second_checkpoint(canopy, work, config):
    """A disk with room for one checkpoint generation and not two: the second epoch's cannot be
    written. The error says the first is whole and to go on with --resume; with more space
    (the same tmpfs, remounted larger) --resume ends as a run that never failed did."""
    ref = os.path.join(work, "ref-out")
    train = [canopy, "train", "--config", config, "--progress", "quiet"]
    r = subprocess.run(train + ["--set", f"train.out_dir={ref}"], capture_output=True, text=True)
    check(r.returncode == 0, f"a reference run trains ({r.stderr.strip()[-200:]})")
    one = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ref, "checkpoint", "*")))
    small = os.path.join(work, "small2")
    os.makedirs(small)
    # One generation, the config and metrics, and half a generation more (tmpfs counts pages).
    kib = (one * 3 // 2 + 64 * 1024) // 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", small]).returncode != 0:
        return  # disk_full has said why
    try:
        out = os.path.join(small, "out")
        r = subprocess.run(train + ["--set", f"train.out_dir={out}"], capture_output=True, text=True)
        check(r.returncode == 1 and "disk is full" in r.stderr and "is whole and resumes at epoch 2 step 0" in r.stderr
              and "with --resume" in r.stderr,
              f"a disk full at the second checkpoint ({kib} KiB for {one} bytes a generation): exit 1, the first "
              f"checkpoint named whole, --resume advised ({r.returncode}: {r.stderr.strip()[-400:]})")
        subprocess.run(["mount", "-o", "remount,size=16m", small], check=True)
        r = subprocess.run(train + ["--resume", "--set", f"train.out_dir={out}"], capture_output=True, text=True)
        check(r.returncode == 0 and "resuming from the checkpoint at epoch 2 step 0" in r.stderr,
              f"... once there is space, --resume goes on from it ({r.stderr.strip()[-200:]})")
        got, want = heads_digest(out), heads_digest(ref)
        check(got == want and want, f"... and exports the heads of the run that never failed, bit for bit ({sorted(got)})")
    finally:
        subprocess.run(["umount", small])


def output_on_full_disk(canopy, work, config):
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    predict = [canopy, "predict", "--config", config, "--set", f"train.out_dir={work}/ref-out", "--input",
               f"{support.FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", "3000", "--progress", "quiet"]
    r = subprocess.run(predict + ["--output", "/dev/full"], capture_output=True, text=True)
    check(r.returncode == 1 and "disk is full" in r.stderr and "wrote" not in r.stderr,
          f"`canopy predict --output /dev/full` exits 1 saying the disk is full ({r.returncode}: {r.stderr.strip()[-200:]})")
    kept = stat.S_ISCHR(os.stat("/dev/full").st_mode)
    check(kept, "... and /dev/full is still a character device, not replaced by a file")
    if not kept:  # put the device back for the rest of the machine
        os.remove("/dev/full")
        os.mknod("/dev/full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    with open("/dev/full", "w") as full:
        r = subprocess.run(predict, stdout=full, stderr=subprocess.PIPE, text=True)
        check(r.returncode == 1 and "writing the predictions failed after" in r.stderr and "disk is full" in r.stderr,
              f"`canopy predict > /dev/full` exits 1 at the first failed write ({r.returncode}: {r.stderr.strip()[-200:]})")
        r = subprocess.run([canopy, "export", "--config", config, "--set", f"train.out_dir={work}/ref-out",
                            "--output", "/dev/stdout", "--progress", "quiet"], stdout=full, stderr=subprocess.PIPE, text=True)
        check(r.returncode == 1 and "disk is full" in r.stderr and stat.S_ISCHR(os.stat("/dev/full").st_mode),
              f"`canopy export --output /dev/stdout > /dev/full` exits 1 saying the disk is full, the device kept "
              f"({r.returncode}: {r.stderr.strip()[-200:]})")
        r = subprocess.run([canopy, "keys"], stdout=full, stderr=subprocess.PIPE, text=True)
        check(r.returncode == 1 and "writing the output failed" in r.stderr,
              f"`canopy keys > /dev/full` exits 1 ({r.returncode}: {r.stderr.strip()[-200:]})")


def rebuild_beside(canopy, work, config):
    """A rebuild (--force, or other inputs) runs beside the complete cache and replaces it only
    once complete: killed or failed, it leaves the old cache usable."""
    cache = os.path.join(work, "cache")
    before = features_digest(work)
    verify = [canopy, "inspect", cache, "--verify"]
    staged = os.path.join(cache, "rebuild", "manifest.json")
    p = subprocess.Popen([canopy, "cache", "--config", config, "--force", "--set", "trunk.pooling=avg",
                          "--progress", "quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not os.path.exists(staged):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    r = subprocess.run(verify, capture_output=True, text=True)
    check(p.returncode == -signal.SIGKILL and r.returncode == 0 and features_digest(work) == before,
          f"a rebuild killed by SIGKILL leaves the old cache verified and unchanged ({p.returncode}, {r.stdout.strip()[-120:]})")
    r = subprocess.run([canopy, "train", "--config", config, "--set", "train.epochs=1", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"... and `canopy train` still trains on it ({r.stderr.strip()[-200:]})")
    nan = os.path.join(work, "nan.pt")
    r = subprocess.run([canopy, "cache", "--config", config, "--force", "--set", f"trunk.path={nan}",
                        "--progress", "quiet"], capture_output=True, text=True)
    v = subprocess.run(verify, capture_output=True, text=True)
    check(r.returncode == 1 and "non-finite" in r.stderr and v.returncode == 0 and features_digest(work) == before,
          f"a rebuild that fails leaves the old cache verified and unchanged ({r.stderr.strip()[-160:]})")
    r = subprocess.run([canopy, "cache", "--config", config, "--force", "--progress", "quiet"], capture_output=True, text=True)
    v = subprocess.run(verify, capture_output=True, text=True)
    check(r.returncode == 0 and "built beside the old cache" in r.stderr and v.returncode == 0 and
          not os.path.exists(os.path.join(cache, "rebuild")) and features_digest(work) == before,
          f"a rebuild that finishes replaces the cache and cleans up ({r.stderr.strip()[-200:]})")


def replaced_trunk(canopy, work, config):
    """A trunk file replaced at its pinned path is refused by train and inspect too."""
    import hashlib
    import shutil
    pinned = os.path.join(work, "pinned.pt")
    shutil.copy(os.path.join(work, "tiny.pt"), pinned)
    sha = hashlib.sha256(open(pinned, "rb").read()).hexdigest()
    pin = ["--set", f"trunk.path={pinned}", "--set", f"trunk.sha256={sha}", "--set", f"cache.path={work}/pcache",
           "--set", "train.epochs=1", "--progress", "quiet"]
    r = subprocess.run([canopy, "run", "--config", config, *pin], capture_output=True, text=True)
    check(r.returncode == 0, f"a pinned trunk caches and trains ({r.stderr.strip()[-200:]})")
    shutil.copy(os.path.join(work, "other.pt"), pinned)
    r = subprocess.run([canopy, "train", "--config", config, *pin], capture_output=True, text=True)
    check(r.returncode == 1 and "refusing to load it" in r.stderr and sha in r.stderr,
          f"`canopy train` refuses a trunk file that no longer matches its pin ({r.stderr.strip()[-220:]})")
    r = subprocess.run([canopy, "inspect", f"{work}/pcache", "--config", config, *pin[:4]], capture_output=True, text=True)
    check(r.returncode != 0 and "refusing to load it" in r.stderr,
          f"... and so does `canopy inspect --config` ({r.stderr.strip()[-200:]})")
    os.remove(pinned)
    r = subprocess.run([canopy, "train", "--config", config, *pin], capture_output=True, text=True)
    check(r.returncode == 0 and "is absent" in r.stderr and "pinned SHA-256 alone" in r.stderr,
          f"without the file, training on the cache says the pin alone is checked ({r.stderr.strip()[-200:]})")


def main():
    canopy, work, trunk = start("canopy-faults-", tiny_conv_trunk, "tiny.pt")
    config = second_writer_is_refused(canopy, work, trunk)
    repair(canopy, work, config)
    train_locks(canopy, work, config)
    memory_limit(canopy, work, config)
    cache_memory_limit(canopy, work)
    head_memory_limit(canopy, work, config)
    cpu_quota(canopy, work, config)
    non_finite_features(canopy, work)
    rebuild_beside(canopy, work, config)
    replaced_trunk(canopy, work, config)
    read_only_cache(canopy, work, config)
    disk_full(canopy, work, config)
    subprocess.run(["rm", "-rf", work])
    return finish()


if __name__ == "__main__":
    sys.exit(main())
