#!/usr/bin/env python3
"""canopy over MPI ranks (`mpirun --oversubscribe -np 3` on this machine's loopback):

  - the 3-rank cache is bitwise identical to the one-process cache (read back with h5py, and
    the manifests list the same shards with the same checksums);
  - a rank that throws (an MPMD launch starting rank 1 where the config's relative trunk path
    finds nothing) ends the job at once, naming itself; ranks given different configurations
    are refused;
  - a rank SIGKILLed mid-build ends the whole job within seconds, non-zero; the rerun with a
    different number of ranks (2) resumes, keeping the shards already written, and gives the
    same cache; so does a build stopped by SIGTERM to one rank (it tells the others: every
    rank stops before its next trunk batch, exit 143);
  - 3-rank training of frozen-trunk heads (fused in 3 units, one per rank) exports heads
    bitwise identical to a one-process run's, with the same metrics, cards and grid winner
    (the grid halved after epoch 1, every rank cutting the same member);
  - a rank SIGKILLed mid-training ends the job within seconds; 2 ranks resume it (heads move
    between ranks through the checkpoint) to the same heads; SIGTERM to one rank alone stops
    all three after the same window with a checkpoint there (exit 143), and 2 ranks resume
    that to the same heads;
  - the trunk's top fine-tuned data parallel over 3 ranks (each a slice of every batch, the
    gradients all-reduced) gives the one-process run's top and heads to 1e-5; stopped by
    SIGUSR1 to mpirun, every rank after the same step, it resumes to the uninterrupted run's
    bitwise;
  - so do the freezing schedules (gradual, autofreeze), freezing the same blocks per epoch,
    and the loss weightings (famo, pcgrad, uncertainty), weighing the heads alike;
    autofreeze's cache level, gathered from the ranks' slices and written by rank 0, is the
    one-process level; a rank SIGKILLed while it is stored resumes bitwise with 3 ranks, and
    with 2 once it is written.

    test_mpi.py --canopy build/runners/canopy
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from support import (check, finish, kill_when, read_cache_view, slow_conv_trunk, slowdown, start, tiny_block_trunk,
                     tiny_trunk_sections, trunk_rows)

MPIRUN = [shutil.which("mpirun") or "mpirun", "--oversubscribe", "--allow-run-as-root"]


def mpirun(n, *args):
    # Every rank one LibTorch thread: 3 ranks share 2 cores.
    return MPIRUN + ["-np", str(n), "-x", "OMP_NUM_THREADS=1"] + list(args)


def mpi_env(base=None):
    """The environment for mpirun (its ranks inherit it). Under AddressSanitizer the ranks do
    not check for leaks: Open MPI keeps what MPI_Init allocates (hwloc's topology, its
    plugins' tables; the plugins unload at MPI_Finalize, leaving stacks LeakSanitizer cannot
    name or suppress). Every other check stays on, and the one-process runs check leaks."""
    env = dict(base or os.environ)
    if "ASAN_OPTIONS" in env:
        env["ASAN_OPTIONS"] += ":detect_leaks=0"
    return env


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


def same_cache(a, b):
    ra, rb = read_cache_view(a), read_cache_view(b)
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
    canopy = os.path.abspath(canopy)  # one of the launches below starts in another directory
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
                       capture_output=True, text=True, env=mpi_env())
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
    killed, rc, err, ended = signal_rank_when(mpirun(3, canopy, "cache", "--config", cut_cfg, "--progress", "quiet"),
                                              lambda: shards_in(cut_cache) >= 5 or None)
    check(killed is not None, "rank 1 SIGKILLed after 5 shards were written")
    check(rc != 0 and ended < 10 * slowdown(), f"the job ended {ended:.1f} s after the kill, exit {rc}")
    check("process rank 1" in err, f"the message names rank 1: {err[-400:]!r}")
    kept_before = shards_in(cut_cache)
    r = subprocess.run(mpirun(2, canopy, "cache", "--config", cut_cfg, "--progress", "quiet"),
                       capture_output=True, text=True, env=mpi_env())
    check(r.returncode == 0 and "resuming" in r.stdout + r.stderr,
          f"2 ranks resume the killed 3-rank build: {(r.stdout + r.stderr)[-500:]}")
    check(same_cache(ref_cache, cut_cache) and shard_records(ref_cache) == shard_records(cut_cache),
          f"the resumed cache is bitwise the one-process cache ({kept_before} shard files were there)")
    # --- SIGTERM to rank 2 alone mid-build (`kill` of one process; SIGUSR1 to mpirun reaches
    # every rank, below): it stops before its next trunk batch and tells the others, which stop
    # before theirs (the ranks do not go in step); the finished shards are kept, and the job
    # ends with 143, said once (before, no rank took a signal and mpirun's SIGTERM then SIGKILL
    # ended them mid-shard); 2 ranks finish it.
    stop_cfg, stop_cache = os.path.join(work, "stop.ini"), os.path.join(work, "stop")
    write_config(stop_cfg, trunk, stop_cache)
    sent, rc, err, ended = signal_rank_when(mpirun(3, canopy, "cache", "--config", stop_cfg, "--progress", "quiet"),
                                            lambda: shards_in(stop_cache) >= 3 or None, rank=2, sig=signal.SIGTERM)
    kept = shards_in(stop_cache)
    told = sorted(l.split("]")[0] + "]" for l in err.splitlines() if "another rank was sent SIGTERM" in l)
    check(sent is not None and rc == 128 + signal.SIGTERM and ended < 10 * slowdown() and
          err.count("stopped by SIGTERM after") == 1 and "over 3 ranks" in err and "MPI_ABORT" not in err and
          told == ["[canopy 0/3]", "[canopy 1/3]"],
          f"SIGTERM to rank 2 of 3 stops every rank of the build, ranks 0 and 1 told by it ({ended:.1f} s after "
          f"it, exit {rc}, {kept} shards kept, told: {told}): "
          f"{[l for l in err.splitlines() if 'stopped' in l][:1] or err[-400:]}")
    r = subprocess.run(mpirun(2, canopy, "cache", "--config", stop_cfg, "--progress", "quiet"),
                       capture_output=True, text=True, env=mpi_env())
    check(r.returncode == 0 and "resuming" in r.stdout + r.stderr and 3 <= kept < 14 and
          same_cache(ref_cache, stop_cache) and shard_records(ref_cache) == shard_records(stop_cache),
          f"2 ranks finish the stopped build, keeping its {kept} shards, to the one-process cache "
          f"({(r.stdout + r.stderr)[-300:]})")
    # --- a rank that throws ends the job: the config names its trunk by a relative path and
    # rank 1 starts in another directory (an MPMD launch), so it alone cannot find it; rank 0
    # waits for it in a collective call until MPI_Abort ends it.
    rel_cfg, rel_cache = os.path.join(work, "rel.ini"), os.path.join(work, "rel")
    write_config(rel_cfg, os.path.basename(trunk), rel_cache)
    bad_cfg = os.path.join(work, "bad.ini")
    write_config(bad_cfg, trunk, os.path.join(work, "bad"))
    for what, second, said in (("a rank that throws", ["-wdir", "/", canopy, "cache", "--config", rel_cfg],
                                "error on rank 1 of 2: trunk file 'slow.pt' does not exist"),
                               ("ranks given different configurations", [canopy, "cache", "--config", bad_cfg],
                                "were given different configurations")):
        t = time.time()
        try:
            r = subprocess.run(MPIRUN + ["-np", "1", canopy, "cache", "--config", rel_cfg, "--progress", "quiet", ":",
                                         "-np", "1", *second, "--progress", "quiet"], capture_output=True, text=True,
                               timeout=60 * slowdown(), env=mpi_env(), cwd=work)
            took = time.time() - t
            check(r.returncode != 0 and took < 20 * slowdown() and said in r.stderr,
                  f"{what} ends the job in {took:.1f} s, exit {r.returncode}, saying so: "
                  f"{[l for l in r.stderr.splitlines() if 'rank' in l and 'error' in l][:2] or r.stderr[-300:]}")
        except subprocess.TimeoutExpired:
            check(False, f"{what} ends the job (it hung for 60 s)")
        check(not os.path.exists(os.path.join(rel_cache, "cache.h5")), "... leaving no finished cache")

    # --- frozen-trunk heads spread over 3 ranks ------------------------------------------
    check_training(canopy, work, trunk, ref_cache, env)
    # --- the trunk's top fine-tuned data parallel over 3 ranks ------------------------
    check_finetune(canopy, work, env)
    # --- canopy run under mpirun on a cache not built yet, as a sweep's runs ---------
    check_sweep(canopy, work)
    return finish()


def check_sweep(canopy, work):
    """`canopy sweep --run-with 'mpirun ...'`: each run a `canopy run` over 2 ranks, its cache
    built by them first (the ranks then read it: before, rank 1 found it still locked by rank
    0 and the run failed). The frozen run's head is bitwise a one-process run's."""
    import torch
    torch.manual_seed(0)
    blocks = os.path.join(work, "sweep-blocks.pt")
    torch.jit.script(tiny_block_trunk().eval()).save(blocks)
    config = os.path.join(work, "sweep.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(blocks, 1200, 300, pooling="flatten") + f"""freeze = all
lr = 0.01
[cache]
path = {work}/unused
[train]
out_dir = {work}/unused-out
batch_size = 32
epochs = 2
[task.cls]
head = linear
lr = 0.01
""")
    launch = " ".join(mpirun(2))
    out = os.path.join(work, "sweep")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--out", out,
                        "--run-with", launch, "--progress", "quiet"], capture_output=True, text=True, env=mpi_env())
    runs = [os.path.join(out, n) for n in ("freeze-all-s0", "freeze-first_2-s0")]
    check(r.returncode == 0 and all(os.path.exists(os.path.join(d, "heads", "cls.json")) for d in runs) and
          "[canopy 1/2]" in r.stderr and os.path.exists(os.path.join(out, "compare.json")),
          f"a sweep whose runs are started under mpirun -np 2 trains both and compares them ({r.stderr[-500:]})")
    one = os.path.join(work, "sweep-one")
    r = subprocess.run([canopy, "run", "--config", config, "--set", f"train.out_dir={one}", "--set",
                        f"cache.path={one}-cache", "--progress", "quiet"], capture_output=True, text=True)
    card = lambda d: json.load(open(os.path.join(d, "heads", "cls.json")))["weights_sha256"]
    check(r.returncode == 0 and card(runs[0]) == card(one),
          "the frozen run's head over 2 ranks is bitwise the one-process run's")


# The two heads every run over a trained top here has (and the loss weighting they start with).
TUNE_HEADS = """weighting = static
[task.a_linear]
head = linear
lr = 0.01
[task.c_mlp]
head = mlp
head.hidden = 32
lr = 0.003
"""


def top_and_heads(out):
    """The fine-tuned trunk's weights and both heads' of a run, by name."""
    import torch
    from safetensors.torch import load_file
    w = {k: v.detach().clone() for k, v in torch.jit.load(os.path.join(out, "trunk.pt")).state_dict().items()}
    for n in ("a_linear", "c_mlp"):
        w.update({f"{n}.{k}": v for k, v in load_file(os.path.join(out, "heads", f"{n}.safetensors")).items()})
    return w


def check_finetune(canopy, work, env):
    import torch
    torch.manual_seed(0)
    blocks = os.path.join(work, "blocks.pt")
    trunk = tiny_block_trunk().eval()
    # The comparison is of float rounding, so the run must not amplify rounding: with the
    # BatchNorm shifts at 0, most of this trunk's channels are dead ReLUs, the top's gradients
    # are near zero, and Adam scales rounding-sized gradients up to whole steps. On a Zen 3
    # EPYC that turned a one-step difference of 7e-9 into 3.4e-3 after 76 steps (1200 rows,
    # 2 epochs, lr 0.01), while the same run measured 1.6e-6 elsewhere. Live channels, a
    # short run (6 steps) and a smaller rate: 8e-8 there.
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.fill_(0.5)
    torch.jit.script(trunk).save(blocks)
    cfg = os.path.join(work, "tune.ini")
    with open(cfg, "w") as f:
        f.write(tiny_trunk_sections(blocks, 96, 300) + f"""freeze = first:2
lr = 0.003
[cache]
path = {work}/tune-cache
[train]
out_dir = {work}/tune-one
batch_size = 32
epochs = 2
{TUNE_HEADS}""")
    r = subprocess.run([canopy, "cache", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True, env=env)
    check(r.returncode == 0, f"cache of the prefix: {r.stderr[-300:]}")
    r = subprocess.run([canopy, "train", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True, env=env)
    check(r.returncode == 0, f"one-process fine-tuning: {r.stderr[-300:]}")
    r = subprocess.run(mpirun(3, canopy, "train", "--config", cfg, "--set", f"train.out_dir={work}/tune-three",
                              "--progress", "quiet"), capture_output=True, text=True, env=mpi_env())
    check(r.returncode == 0 and "data parallel over 3 ranks" in r.stderr,
          f"3-rank data-parallel fine-tuning: {r.stderr[-600:]}")
    said = [l for l in r.stderr.splitlines() if "all-reduce of the top's gradients" in l]
    check(len(said) == 3, f"every rank reports its all-reduce time: {said[:1]}")

    one, three = top_and_heads(f"{work}/tune-one"), top_and_heads(f"{work}/tune-three")
    worst = max(float((one[k].float() - three[k].float()).abs().max()) for k in one)
    moved = max(float((one[k].float() - torch.jit.load(blocks).state_dict()[k].float()).abs().max())
                for k in one if k.startswith("blocks.2"))
    check(one.keys() == three.keys() and worst <= 1e-5 and moved > 1e-3,
          f"3-rank trunk top and heads equal the one-process run's to 1e-5 (largest difference {worst:.2e}; "
          f"the top moved by up to {moved:.3f})")
    # Each rank runs the top over a third of the eval split's batches; gathered, the heads
    # score as in one process (a row out of place would move the scores).
    said = [l for l in r.stderr.splitlines() if "evaluated over the ranks" in l]
    check(eval_scores(f"{work}/tune-one") == eval_scores(f"{work}/tune-three") and len(said) == 3,
          f"the eval split's top output is shared out over the ranks; every epoch's scores are the one-process run's "
          f"({said[:1]})")
    # train.export = best over 3 ranks: rank 0 exports the top and heads of the best epoch,
    # bitwise those of a 3-rank run stopped there.
    best = ["--set", "train.validation_fraction=0.25", "--set", "train.epochs=4", "--set", "trunk.lr=0.03"]
    r = subprocess.run(mpirun(3, canopy, "train", "--config", cfg, "--set", f"train.out_dir={work}/best-three",
                              "--set", "train.export=best", *best, "--progress", "quiet"),
                       capture_output=True, text=True, env=mpi_env())
    rows = trunk_rows(f"{work}/best-three") if r.returncode == 0 else []
    epoch = rows[-1].get("best_epoch") if rows else None
    cards = [json.load(open(f"{work}/best-three/heads/{n}.json"))["exported_epoch"] for n in ("a_linear", "c_mlp")] \
        if r.returncode == 0 else []
    scores = [row.get("validation_score") for row in rows]
    check(epoch and cards == [epoch, epoch] and scores[epoch - 1] == max(scores),
          f"export = best over 3 ranks: epoch {epoch} of the scores {scores} exported ({cards}; {r.stderr.strip()[-200:]})")
    if epoch:
        best[best.index("train.epochs=4")] = f"train.epochs={epoch}"
        r = subprocess.run(mpirun(3, canopy, "train", "--config", cfg, "--set", f"train.out_dir={work}/best-cut",
                                  *best, "--progress", "quiet"), capture_output=True, text=True, env=mpi_env())
        a, b = top_and_heads(f"{work}/best-three"), top_and_heads(f"{work}/best-cut") if r.returncode == 0 else {}
        check(b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
              f"... bitwise the top and heads of a 3-rank run of {epoch} epochs ({r.stderr.strip()[-200:]})")
    check_unlike_calibrations(canopy, work, cfg)
    check_top_stop(canopy, work, blocks)
    check_schedules(canopy, work, env, blocks)


def check_unlike_calibrations(canopy, work, cfg):
    """Data-parallel ranks on hosts whose fusion calibration files disagree (one says fuse the
    heads' group, the other alone; each rank given its own file, as on two hosts without a shared
    home): every rank fuses as rank 0 decided, so the replicas stay equal. Before, the ranks
    followed their own files and the job failed after epoch 1, "the data-parallel replicas
    diverged"."""
    one = ["--set", "train.workers=1", "--set", f"train.out_dir={work}/cal-one", "--progress", "quiet"]
    r = subprocess.run([canopy, "train", "--config", cfg, *one], capture_output=True, text=True,
                       env=dict(os.environ, CANOPY_FUSION_CALIBRATION=f"{work}/cal-a.tsv"))
    lines = open(f"{work}/cal-a.tsv").read().splitlines() if r.returncode == 0 else []
    check(len(lines) == 1, f"the heads' group timed once ({lines or r.stderr[-300:]})")
    if len(lines) != 1:
        return
    fused = "\tfused\t" in lines[0]
    with open(f"{work}/cal-b.tsv", "w") as f:
        f.write(lines[0].replace("\tfused\t", "\talone\t") if fused else lines[0].replace("\talone\t", "\tfused\t"))
        f.write("\n")
    rank = [canopy, "train", "--config", cfg, "--set", "train.workers=1", "--set", f"train.out_dir={work}/cal-two",
            "--progress", "quiet"]
    r = subprocess.run(MPIRUN + ["--bind-to", "none", "-np", "1", "-x", "OMP_NUM_THREADS=1", "-x",
                                 f"CANOPY_FUSION_CALIBRATION={work}/cal-a.tsv", *rank, ":", "-np", "1", "-x",
                                 "OMP_NUM_THREADS=1", "-x", f"CANOPY_FUSION_CALIBRATION={work}/cal-b.tsv", *rank],
                       capture_output=True, text=True, env=mpi_env())
    said = [l for l in r.stderr.splitlines() if "fused" in l and "a_linear" in l]
    check(r.returncode == 0 and "diverged" not in r.stderr and len(said) == 1 and
          ("-> fused" in said[0]) == fused,
          f"2 data-parallel ranks whose calibration files disagree fuse as rank 0's says and finish: "
          f"{said or r.stderr.strip()[-400:]}")


def check_top_stop(canopy, work, blocks):
    """SIGUSR1 to mpirun while 3 ranks fine-tune the top data parallel: every rank stops after
    the same step, a checkpoint there (exit 138); 3 ranks resume it to the uninterrupted 3-rank
    run's top and heads, bitwise."""
    import torch
    cfg = os.path.join(work, "tune-stop.ini")
    with open(cfg, "w") as f:
        f.write(tiny_trunk_sections(blocks, 640, 200) + f"""freeze = first:2
lr = 0.003
[cache]
path = {work}/tune-stop-cache
[train]
out_dir = {work}/tune-stop-ref
batch_size = 32
epochs = 3
checkpoint_steps = 5
{TUNE_HEADS}""")
    r = subprocess.run([canopy, "cache", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"cache of the prefix: {r.stderr[-300:]}")
    r = subprocess.run(mpirun(3, canopy, "train", "--config", cfg, "--progress", "quiet"), capture_output=True,
                       text=True, env=mpi_env())
    check(r.returncode == 0, f"3-rank fine-tuning of 3 epochs: {r.stderr[-300:]}")
    out, errors = f"{work}/tune-stop", []
    rc, seen = kill_when(mpirun(3, canopy, "train", "--config", cfg, "--set", f"train.out_dir={out}", "--progress",
                                "quiet"), f"{out}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= (0, 5),
                         env=mpi_env(), sig=signal.SIGUSR1, stderr=errors)
    with open(f"{out}/checkpoint/state.json") as f:
        st = json.load(f)
    check(seen is not None and rc == 128 + signal.SIGUSR1 and (st["epoch"], st["step"]) > (0, 5) and
          errors[0].count("stopped by SIGUSR1") == 1 and "MPI_ABORT" not in errors[0],
          f"SIGUSR1 to mpirun stops the 3 data-parallel ranks at epoch {st['epoch']} step {st['step']}, exit {rc}: "
          f"{[l for l in errors[0].splitlines() if 'stopped by' in l] or errors[0][-500:]}")
    r = subprocess.run(mpirun(3, canopy, "train", "--config", cfg, "--set", f"train.out_dir={out}", "--resume",
                              "--progress", "quiet"), capture_output=True, text=True, env=mpi_env())
    a = top_and_heads(f"{work}/tune-stop-ref")
    b = top_and_heads(out) if r.returncode == 0 else {}
    check(b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
          f"... 3 ranks resume it to the uninterrupted run's top and heads, bitwise ({r.stderr.strip()[-300:]})")


def trunk_epochs(out):
    """What metrics.jsonl says the top did per epoch: (blocks training, cache level read)."""
    return [(r["training"], r["level"]) for r in trunk_rows(out)]


def signal_rank_when(cmd, reached, rank=1, sig=signal.SIGKILL, env=None):
    """Starts the mpirun `cmd` and sends its rank `rank` `sig` (SIGKILL) once `reached()`
    returns something other than None; returns (that, or None if never), the job's exit, its
    standard error and the seconds from the signal to the job's end."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(env))
    at, sent = None, None
    deadline = time.time() + 120 * slowdown()
    while time.time() < deadline and p.poll() is None:
        try:
            got = reached()
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            got = None
        pids = rank_pids(p.pid) if got is not None else {}
        if rank in pids:
            os.kill(pids[rank], sig)
            at, sent = got, time.time()
            break
        time.sleep(0.002)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return at, p.returncode, err, time.time() - (sent or time.time())


def kill_rank_when(cmd, out, reached, rank=1, sig=signal.SIGKILL, env=None, stderr=None):
    """signal_rank_when once out_dir's checkpoint position (epoch, step) is at least `reached`;
    returns that position (None if never) and the exit, and appends the job's standard error to
    the list `stderr`."""
    def position():
        with open(os.path.join(out, "checkpoint", "state.json")) as f:
            st = json.load(f)
        return (st["epoch"], st["step"]) if (st["epoch"], st["step"]) >= reached else None
    at, rc, err, _ = signal_rank_when(cmd, position, rank, sig, env)
    if stderr is not None:
        stderr.append(err)
    return at, rc


def shards_in(cache):
    """How many shard files the cache's shards/ holds."""
    d = os.path.join(cache, "shards")
    return len([n for n in os.listdir(d) if n.endswith(".h5")]) if os.path.isdir(d) else 0


def check_schedules(canopy, work, env, blocks):
    """gradual and autofreeze over data-parallel ranks: the same blocks train and freeze per
    epoch as in one process; autofreeze's cache level is gathered from the ranks' slices and
    written once, by rank 0; a rank SIGKILLed while the level is being stored resumes, with 3
    ranks, to the uninterrupted run bitwise, and killed once the level is written, with 2."""
    import h5py
    import numpy as np

    cfg = os.path.join(work, "auto.ini")
    with open(cfg, "w") as f:
        f.write(tiny_trunk_sections(blocks, 320, 100) + f"""freeze = first:1
schedule = autofreeze
freeze_interval = 5
percentile = 100
min_trainable = 1
lr = 0.003
[cache]
path = {work}/auto-cache
[train]
out_dir = {work}/auto-one
batch_size = 32
epochs = 4
checkpoint_steps = 3
{TUNE_HEADS}""")

    def train(n, out, *extra):
        cmd = [canopy, "train", "--config", cfg, "--set", f"train.out_dir={out}", *extra, "--progress", "quiet"]
        return subprocess.run(mpirun(n, *cmd) if n > 1 else cmd, capture_output=True, text=True,
                              env=mpi_env() if n > 1 else env)

    def level(out, block):
        with h5py.File(os.path.join(out, "levels", f"{block}.h5"), "r") as h:
            return h["rows"][:]

    def differ(a, b):
        wa, wb = top_and_heads(a), top_and_heads(b)
        return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) if wa.keys() == wb.keys() else 1.0

    r = subprocess.run([canopy, "cache", "--config", cfg, "--progress", "quiet"], capture_output=True, text=True, env=env)
    check(r.returncode == 0, f"cache below the top's 3 blocks: {r.stderr[-300:]}")
    for name, keys in (("gradual", ["--set", "trunk.schedule=gradual", "--set", "trunk.warmup_epochs=1",
                                    "--set", "trunk.unfreeze_every=1"]), ("autofreeze", [])):
        one, three = f"{work}/{name}-one", f"{work}/{name}-three"
        r1, r3 = train(1, one, *keys), train(3, three, *keys)
        check(r1.returncode == 0 and r3.returncode == 0, f"{name}: one process and 3 ranks train "
              f"({r1.stderr.strip()[-200:]} {r3.stderr.strip()[-300:]})")
        if r1.returncode or r3.returncode:
            continue
        epochs, worst = trunk_epochs(three), differ(one, three)
        check(epochs == trunk_epochs(one) and worst <= 1e-5 and eval_scores(one) == eval_scores(three),
              f"{name} over 3 ranks: the blocks train (and freeze) per epoch as in one process {epochs}; "
              f"top and heads equal to 1e-5 (largest difference {worst:.2e}), the same scores every epoch")
        if name == "gradual":
            continue
        block = next((lv for _, lv in epochs if lv), None)
        check(block is not None and os.listdir(f"{three}/levels") == [f"{block}.h5"],
              f"autofreeze over 3 ranks reads a cache level from epoch {[lv for _, lv in epochs]}")
        if block is None:
            return
        written = [l for l in r3.stderr.splitlines() if "cache level" in l and " written (" in l]
        check(len(written) == 1 and written[0].startswith("[canopy 0/3]"), f"rank 0 alone writes it: {written}")
        a, b = level(one, block), level(three, block)
        check(a.shape == b.shape and np.abs(a - b).max() <= 1e-5 and np.abs(b).sum(1).min() > 0,
              f"the level gathered from 3 ranks' slices is the one-process level to 1e-5 "
              f"(largest difference {np.abs(a - b).max():.1e}; every row stored)")
    # The loss weightings over the ranks: each rank holds every head and the weighting's
    # state, and sees every head's loss on the whole batch, so they weigh alike.
    for w in ("famo", "pcgrad", "uncertainty"):
        keys = ("--set", "trunk.schedule=static", "--set", f"train.weighting={w}", "--set", "train.epochs=2")
        one, three = f"{work}/w-{w}-one", f"{work}/w-{w}-three"
        r1, r3 = train(1, one, *keys), train(3, three, *keys)
        if r1.returncode or r3.returncode:
            check(False, f"weighting {w}: one process and 3 ranks train ({r1.stderr[-200:]} {r3.stderr[-300:]})")
            continue
        lw = [[r["loss_weights"] for r in trunk_rows(o)] for o in (one, three)]
        gap = max(abs(x[k] - y[k]) for x, y in zip(*lw) for k in x)
        worst = differ(one, three)
        check(len(lw[0]) == len(lw[1]) == 2 and gap <= 1e-6 and worst <= 1e-5,
              f"train.weighting = {w} over 3 ranks: the loss weights per epoch within {gap:.1e} of one process's, "
              f"top and heads within {worst:.1e}")
    # The top's warm-up and gradient clipping over the ranks: the norm clipped is the summed
    # gradient's (the whole batch's, as in one process), so every rank clips the same steps
    # by the same factor. Clipping at the first epoch's mean norm clips some steps, not all.
    keys = ("--set", "trunk.schedule=static", "--set", "train.epochs=2", "--set", "trunk.optimizer=sgd",
            "--set", "trunk.lr=0.05", "--set", "trunk.lr_warmup_steps=15")
    r = train(1, f"{work}/clip-probe", *keys)
    rows = trunk_rows(f"{work}/clip-probe") if r.returncode == 0 else []
    if rows:
        keys += ("--set", f"trunk.max_grad_norm={rows[0]['grad_norm']!r}")
        one, three = f"{work}/clip-one", f"{work}/clip-three"
        r1, r3 = train(1, one, *keys), train(3, three, *keys)
        a, b = (trunk_rows(o) if r.returncode == 0 else [] for o, r in ((one, r1), (three, r3)))
        clipped = [x["clipped_steps"] for x in a]
        gap = max((abs(x["grad_norm"] / y["grad_norm"] - 1) for x, y in zip(a, b)), default=1.0)
        check(len(a) == len(b) == 2 and 0 < sum(clipped) < 20 and clipped == [y["clipped_steps"] for y in b] and
              [x["lr"] for x in a] == [y["lr"] for y in b] and gap <= 1e-5 and differ(one, three) <= 1e-5,
              f"trunk.max_grad_norm and lr_warmup_steps over 3 ranks: the same steps clipped per epoch ({clipped}), the "
              f"same rates, the gradient norms within {gap:.1e} of one process's, top and heads within "
              f"{differ(one, three) if a and b else 1.0:.1e}")
    else:
        check(False, f"a warmed-up SGD top trains: {r.stderr[-300:]}")
    # Batches of 2 rows over 3 ranks: rank 0's slice of every batch is empty, so it stores no
    # row of the level; it gets every rank's and writes the whole level.
    small = ("--set", "train.batch_size=2", "--set", "train.epochs=2")
    r1, r3 = train(1, f"{work}/auto2-one", *small), train(3, f"{work}/auto2-three", *small)
    ok = r1.returncode == 0 and r3.returncode == 0 and os.path.exists(f"{work}/auto2-three/levels/blocks.1.h5")
    a, b = (level(f"{work}/auto2-{n}", "blocks.1") if ok else np.zeros(1) for n in ("one", "three"))
    check(ok and a.shape == b.shape and np.abs(a - b).max() <= 1e-5 and np.abs(b).sum(1).min() > 0,
          f"batches of 2 over 3 ranks (rank 0's slices all empty): rank 0 writes the whole level, the one-process "
          f"level to 1e-5 ({r3.stderr.strip()[-200:] if not ok else np.abs(a - b).max()})")
    # Killed while the level is stored (the epoch whose metrics row first names it, mid-way):
    # 3 ranks replay their slices of the steps done and end bitwise as the uninterrupted run.
    stored = next(i for i, (_, lv) in enumerate(trunk_epochs(f"{work}/autofreeze-three")) if lv)
    for n, at, what in ((3, (stored, 3), "while the level is stored"), (2, (stored + 1, 3), "once the level is written")):
        out = f"{work}/auto-cut{n}"
        cmd = [canopy, "train", "--config", cfg, "--set", f"train.out_dir={out}", "--progress", "quiet"]
        killed, rc = kill_rank_when(mpirun(3, *cmd), out, at)
        check(killed is not None and rc != 0, f"autofreeze: rank 1 of 3 SIGKILLed {what}, at {killed} (exit {rc})")
        r = train(n, out, "--resume")
        check(r.returncode == 0 and "resuming from the checkpoint" in r.stderr,
              f"... {n} ranks resume it ({r.stderr.strip()[-300:]})")
        if r.returncode:
            continue
        ref = f"{work}/autofreeze-three"
        worst, lv = differ(ref, out), np.abs(level(ref, block) - level(out, block)).max()
        if n == 3:
            check(worst == 0 and lv == 0 and trunk_epochs(out) == trunk_epochs(ref),
                  f"... to the uninterrupted 3-rank run bitwise: top, heads and cache level "
                  f"(largest differences {worst:.1e}, {lv:.1e})")
        else:
            check(worst <= 1e-5 and lv == 0 and trunk_epochs(out) == trunk_epochs(ref),
                  f"... every rank reading rank 0's level file: the level bitwise, top and heads to 1e-5 "
                  f"(largest difference {worst:.1e})")


TASKS = """validation_fraction = 0.1
grid_halving = 1
grid_halving_factor = 2
fuse = always
workers = 3
checkpoint_steps = 7
[task.a]
head = linear
lr = 0.05
[task.b]
head = linear
lr = 0.02
weight_decay = 1e-4
[task.deep]
head = mlp
head.hidden = 64
head.dropout = 0.2
lr = 0.01
[task.wide]
head = mlp
head.hidden = 128
lr = 0.005
[task.g]
head = linear
lr = 0.1 | 0.01
epochs = 2
"""


def eval_scores(out):
    """Every (epoch, head)'s scores on the eval split from metrics.csv."""
    import csv
    with open(os.path.join(out, "metrics.csv")) as f:
        return [(r["epoch"], r["task"], *(r[k] for k in sorted(r) if k.startswith("eval_"))) for r in csv.DictReader(f)]


def metrics_rows(out):
    """metrics.csv without the seconds column (time differs between runs)."""
    import csv
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.reader(f))
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


def same_heads(a, b):
    files = sorted(n for n in os.listdir(os.path.join(a, "heads")) if n.endswith(".safetensors"))
    if not files or files != sorted(n for n in os.listdir(os.path.join(b, "heads")) if n.endswith(".safetensors")):
        return False, files
    for n in files:
        with open(os.path.join(a, "heads", n), "rb") as fa, open(os.path.join(b, "heads", n), "rb") as fb:
            if fa.read() != fb.read():
                return False, n
    return True, files


def check_training(canopy, work, trunk, cache, env):
    env = dict(env, CANOPY_FUSION_CALIBRATION=os.path.join(work, "fusion.tsv"))
    outs = {}
    for name in ("one", "three", "cut", "stop", "mixed"):
        cfg = os.path.join(work, f"train-{name}.ini")
        write_config(cfg, trunk, cache, out=os.path.join(work, f"out-{name}"), tasks=TASKS)
        outs[name] = (cfg, os.path.join(work, f"out-{name}"))
    t = time.time()
    r = subprocess.run([canopy, "train", "--config", outs["one"][0], "--progress", "quiet"],
                       capture_output=True, text=True, env=env)
    check(r.returncode == 0, f"one-process training ({time.time() - t:.1f} s): {r.stderr[-400:]}")
    t = time.time()
    r = subprocess.run(mpirun(3, "-x", "CANOPY_FUSION_CALIBRATION", canopy, "train", "--config", outs["three"][0],
                              "--progress", "lines"), capture_output=True, text=True, env=mpi_env(env))
    check(r.returncode == 0, f"3-rank training ({time.time() - t:.1f} s): {r.stderr[-800:]}")
    spread = [l for l in r.stderr.splitlines() if "this rank trains" in l][:3]
    counts = [int(l.split("trains ")[1].split()[0]) for l in spread]
    check(len(spread) == 3 and sum(counts) == 6 and min(counts) >= 1,
          f"the 6 heads are spread over the 3 ranks: {spread}")
    check(r.stdout.count("heads, metrics") == 1, "rank 0 alone prints the summary")
    check(sum(1 for l in r.stderr.splitlines() if l.startswith("[canopy] epoch")) == 3,
          "rank 0 alone prints the epoch lines (3 epochs)")
    ok, what = same_heads(outs["one"][1], outs["three"][1])
    check(ok, f"3-rank heads bitwise identical to the one-process run's ({what})")
    check(metrics_rows(outs["one"][1]) == metrics_rows(outs["three"][1]),
          "3-rank metrics.csv equal to the one-process run's (every head, every epoch; seconds aside)")
    for card in ("g.json", "deep.json"):
        with open(os.path.join(outs["one"][1], "heads", card)) as f1, open(os.path.join(outs["three"][1], "heads", card)) as f3:
            c1, c3 = json.load(f1), json.load(f3)
        check(all(c1[k] == c3[k] for k in ("exported_epoch", "eval_accuracy", "eval_macro_f1", "validation")),
              f"card {card}: same exported epoch and test metrics")
    with open(os.path.join(outs["three"][1], "heads", "g.json")) as f:
        members = json.load(f)["grid"]["members"]
    cut = [m["name"] for m in members if m.get("note", "").startswith("stopped by successive halving at epoch 1")]
    check(len(cut) == 1 and sorted(m["epochs"] for m in members) == [1, 2],
          f"grid g over 3 ranks: successive halving cut {cut} after epoch 1, the other trained 2 epochs")

    # A rank SIGKILLed mid-training ends the job; 2 ranks resume it to the same heads.
    cfg, out = outs["cut"]
    state = os.path.join(out, "checkpoint", "state.json")
    killed, rc, _, ended = signal_rank_when(
        mpirun(3, "-x", "CANOPY_FUSION_CALIBRATION", canopy, "train", "--config", cfg, "--progress", "quiet"),
        lambda: json.load(open(state))["epoch"] >= 1 or None, rank=2, env=env)
    check(killed is not None, "rank 2 SIGKILLed after the first epoch's checkpoint")
    check(rc != 0 and ended < 10 * slowdown(), f"training job ended {ended:.1f} s after the kill, exit {rc}")
    r = subprocess.run(mpirun(2, "-x", "CANOPY_FUSION_CALIBRATION", canopy, "train", "--config", cfg, "--resume",
                              "--progress", "quiet"), capture_output=True, text=True, env=mpi_env(env))
    check(r.returncode == 0 and "resuming from the checkpoint" in r.stderr,
          f"2 ranks resume the killed 3-rank training: {r.stderr[-500:]}")
    ok, what = same_heads(outs["one"][1], out)
    check(ok, f"resumed heads bitwise identical to the one-process run's ({what})")
    check(metrics_rows(outs["one"][1]) == metrics_rows(out), "resumed metrics.csv equal to the one-process run's")
    # state.json (rank 0's) records a checksum of every head file, whichever rank wrote it.
    with open(state) as f:
        st = json.load(f)
    want = {f"{t['name']}.{st['generation']}.pt" for t in st["tasks"]}
    check(set(st.get("files", {})) == want, f"state.json checks every rank's head files ({sorted(st.get('files', {}))})")

    # SIGTERM to rank 2 alone (`kill` of one process, a node's scheduler): the ranks agree after
    # each window of steps whether any was asked to stop, so all three stop after the same one
    # with a checkpoint there; the job ends with 143, said once, not MPI_Abort. 2 ranks resume it.
    cfg, out = outs["stop"]
    errors = []
    at, rc = kill_rank_when(mpirun(3, "-x", "CANOPY_FUSION_CALIBRATION", canopy, "train", "--config", cfg,
                                   "--progress", "quiet"), out, (0, 7), rank=2, sig=signal.SIGTERM, env=env,
                            stderr=errors)
    with open(os.path.join(out, "checkpoint", "state.json")) as f:
        st = json.load(f)
    where = (st["epoch"], st["step"])
    check(at is not None and rc == 128 + signal.SIGTERM and where > at and
          errors[0].count("stopped by SIGTERM") == 1 and "MPI_ABORT" not in errors[0],
          f"SIGTERM to rank 2 of 3 at {at} stops every rank at {where}, exit {rc}: "
          f"{[l for l in errors[0].splitlines() if 'stopped by' in l] or errors[0][-500:]}")
    r = subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True)
    said = json.loads(r.stdout) if r.returncode == 0 else {}
    check(said.get("checkpoint", {}).get("ranks") == 3 and "written by 3 MPI ranks" in said.get("status_text", ""),
          f"canopy inspect says the stopped run's checkpoint was written by 3 ranks: {said.get('status_text')}")
    r = subprocess.run(mpirun(2, "-x", "CANOPY_FUSION_CALIBRATION", canopy, "train", "--config", cfg, "--resume",
                              "--progress", "quiet"), capture_output=True, text=True, env=mpi_env(env))
    ok, what = same_heads(outs["one"][1], out) if r.returncode == 0 else (False, r.stderr[-300:])
    check(ok and metrics_rows(outs["one"][1]) == metrics_rows(out),
          f"... 2 ranks resume it to the one-process run's heads and metrics, bitwise ({what})")
    with open(f"{out}/checkpoint/state.json") as f:
        machines = json.load(f).get("machines", [])
    # (rank 0's cores: mpirun binds each of 2 ranks to a core of the 2, not 3 ranks on 2 cores)
    cpu = lambda m: m.split(" core")[0].rsplit(", ", 1)[0]
    check(len(machines) == 2 and machines[0].endswith(", 3 MPI ranks") and machines[1].endswith(", 2 MPI ranks") and
          cpu(machines[0]) == cpu(machines[1]) != "",
          f"its checkpoint records the ranks of each part of its training time: {machines}")

    # Ranks on unlike machines (here one given both cores, one given one by taskset, as ranks on
    # two kinds of host): the checkpoint names each machine with its ranks, not rank 0's alone.
    cfg, out = outs["mixed"]
    rank = [canopy, "train", "--config", cfg, "--progress", "quiet"]
    r = subprocess.run(MPIRUN + ["--bind-to", "none", "-x", "OMP_NUM_THREADS=1", "-x", "CANOPY_FUSION_CALIBRATION",
                                 "-np", "1", *rank, ":", "-np", "1", "taskset", "-c", "0", *rank],
                       capture_output=True, text=True, env=mpi_env(env))
    machines = []
    if r.returncode == 0:
        with open(f"{out}/checkpoint/state.json") as f:
            machines = json.load(f).get("machines", [])
    ok = len(machines) == 1 and machines[0].endswith(", 2 MPI ranks") and " (1 rank) and " in machines[0]
    parts = machines[0].split(" (1 rank) and ") if ok else []
    check(ok and parts[0].endswith(", 2 cores") and parts[1].startswith(cpu(parts[0])) and ", 1 core (1 rank)" in parts[1],
          f"2 ranks on unlike machines: the checkpoint names each: {machines or r.stderr[-400:]}")


if __name__ == "__main__":
    sys.exit(main())
