#!/usr/bin/env python3
"""Freezing that moves, checked from outside with torch and h5py, on a slice of
Fashion-MNIST through a small trunk with blocks (stem, blocks.0 .. blocks.2):

- gradual: heads alone for the warm-up epoch, then one more block per epoch from the top
  down (metrics.jsonl says which); the cache sits below the lowest block that ever trains;
  blocks not yet unfrozen are bitwise unchanged while held
- autofreeze: blocks freeze from the bottom up; the highest frozen block's output becomes a
  cache level, written once (an HDF5 file h5py reads), equal to what Python computes from
  the cached prefix with the exported trunk's blocks; evaluation keeps the frozen blocks'
  output on the test rows, and the heads score what canopy predict scores with the exported
  trunk
- autofreeze over a train split that streams: blocks freeze as in memory, a frozen block
  (weights and BatchNorm statistics) stays as it was when it froze; the level is kept on
  disk (rows by position in the split, each row's CRC-32C) and read by row; deleted or
  flipped under a killed run, or with no room on the disk, the frozen blocks are computed
  instead and the run ends as the one that read it; a level too large to hold beside a split
  in memory (under cache.memory_cap_mb) goes on disk too, bitwise the run that held it
- SIGKILL + --resume in the middle of either schedule ends bitwise identical to an
  uninterrupted run (heads, trunk, cache level)
- a cache level flipped or deleted under a killed run: --resume computes it again from the
  cache, and ends as the uninterrupted run
- a disk that fills as autofreeze writes its cache level (a tmpfs with room for the
  checkpoints, not the level): exit 1 naming the level file and the full disk, and saying
  the checkpoint is whole; remounted larger, --resume ends bitwise as the uninterrupted run
- canopy inspect describes the top (blocks training, the level read, the fine-tuned trunk);
  --verify finds a flipped byte in trunk.pt or in the level
- every loss weighting trains, and says its weights per epoch

    test_schedules.py --canopy build/runners/canopy
"""
import json
import re
import os
import signal
import subprocess
import sys

from support import check, finish, flip, kill_when, start, tiny_block_trunk, tiny_trunk_sections, trunk_rows

TRAIN, TEST = 960, 200


def run(canopy, *args):
    return subprocess.run([canopy, *args, "--progress", "quiet"], capture_output=True, text=True)


def state(path):
    import torch
    return {k: v.clone() for k, v in torch.jit.load(path).state_dict().items()}


def same_files(a, b, names):
    return all(open(f"{a}/{n}", "rb").read() == open(f"{b}/{n}", "rb").read() for n in names)


def resume_matches(canopy, config, out, reference, targets, what, extra_files=()):
    """Interrupts `canopy train` at each (epoch, step) in `targets`: SIGKILL, except the last
    of several, which SIGTERM stops (a checkpoint at the step where it stopped); resumes to the
    end, and checks that heads, trunk and `extra_files` are bitwise those of `reference`."""
    import torch
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    for i, target in enumerate(targets):
        stop = len(targets) > 1 and i == len(targets) - 1
        rc, st = kill_when(cmd + (["--resume"] if i else []), f"{out}/checkpoint/state.json",
                           lambda s: (s["epoch"], s["step"]) >= target, sig=signal.SIGTERM if stop else None)
        at = st and (st["epoch"], st["step"])
        if stop:
            saved = json.load(open(f"{out}/checkpoint/state.json"))
            where = (saved["epoch"], saved["step"])
            check(rc == 128 + signal.SIGTERM and st is not None and where > at,
                  f"{what}: stopped by SIGTERM after {at}, its checkpoint at {where} (exit {rc})")
        else:
            check(rc == -signal.SIGKILL and st is not None, f"{what}: killed by SIGKILL at {at}")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    check(r.returncode == 0, f"{what}: --resume finishes ({r.stderr[-300:]})")
    a, b = state(f"{out}/trunk.pt"), state(f"{reference}/trunk.pt")
    check(all(torch.equal(a[k], b[k]) for k in b), f"{what}: the resumed trunk is bitwise the uninterrupted one's")
    heads = [f"heads/{n}.safetensors" for n in ("a_linear", "b_mlp")]
    check(same_files(out, reference, heads), f"{what}: resumed heads bitwise identical")
    for level in extra_files:  # HDF5 files carry times: compare what they hold
        import h5py
        import numpy as np
        with h5py.File(f"{out}/{level}", "r") as a, h5py.File(f"{reference}/{level}", "r") as b:
            check(np.array_equal(a["rows"][:], b["rows"][:]) and a["rows"].attrs["fingerprint"] == b["rows"].attrs["fingerprint"],
                  f"{what}: the resumed run's cache level {level} is bitwise the uninterrupted one's")
    got, want = ([(r["training"], r["level"]) for r in trunk_rows(o)] for o in (out, reference))
    check(got == want, f"{what}: the resumed run froze the same blocks and read the same cache level at the same "
          f"epochs ({got} against {want})")


def goes_on(canopy, config, out, reference, what, levels=()):
    """A finished run of 2 epochs in `out`, resumed with train.epochs = 4: its trunk, heads,
    cache `levels` and the top's blocks per epoch are bitwise those of `reference` (4 epochs)."""
    import h5py
    import numpy as np
    import torch
    r = run(canopy, "train", "--config", config, "--resume", "--set", "train.epochs=4", "--set", f"train.out_dir={out}")
    check(r.returncode == 0 and "with other epochs, train.epochs (2 -> 4)" in r.stderr,
          f"{what}: the 2-epoch run goes on to 4 with --resume --set train.epochs=4 ({r.stderr.strip()[-300:]})")
    if r.returncode:
        return
    a, b = state(f"{out}/trunk.pt"), state(f"{reference}/trunk.pt")
    heads = [f"heads/{n}.safetensors" for n in ("a_linear", "b_mlp")]
    same_levels = True
    for level in levels:  # HDF5 files carry times: compare what they hold
        with h5py.File(f"{out}/{level}", "r") as x, h5py.File(f"{reference}/{level}", "r") as y:
            same_levels = same_levels and np.array_equal(x["rows"][:], y["rows"][:])
    check(all(torch.equal(a[k], b[k]) for k in b) and same_files(out, reference, heads) and same_levels,
          f"{what}: ... and ends bitwise as the run of 4 epochs from the start (trunk, heads"
          f"{''.join(', ' + l for l in levels)})")
    got, want = ([(r["training"], r["level"]) for r in trunk_rows(o)] for o in (out, reference))
    check(got == want, f"{what}: ... its top trained the same blocks each epoch ({got})")


def small_tmpfs(path, what):
    """Mounts a 2 MiB tmpfs at `path` (made here): True when it is there to be unmounted."""
    os.makedirs(path)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", path]).returncode == 0:
        return True
    check(os.environ.get("CI") != "true", f"a 2 MiB tmpfs can be mounted for {what}")
    return False


def level_on_full_disk(canopy, config, small, reference, level):
    """A tmpfs with room for the checkpoints (about 100 KB a generation), not for the cache
    level (7.5 MB): the level's write fails; with the tmpfs remounted larger, --resume."""
    if not small_tmpfs(small, "the full-disk level"):
        return
    try:
        out = f"{small}/out"
        r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={out}")
        check(r.returncode == 1 and f"writing cache level '{out}/levels/{level}.h5' failed: the disk is full" in r.stderr
              and "is whole and resumes at epoch" in r.stderr and "--resume" in r.stderr,
              f"autofreeze on a full disk: exit 1 naming the level file, the full disk and the checkpoint kept "
              f"({r.returncode}: {r.stderr.strip()[-400:]})")
        check(not any(".tmp." in n for n in os.listdir(f"{out}/levels")), "... leaving no partial level file")
        subprocess.run(["mount", "-o", "remount,size=32m", small], check=True)
        r = run(canopy, "train", "--config", config, "--resume", "--set", f"train.out_dir={out}")
        import torch
        heads = [f"heads/{n}.safetensors" for n in ("a_linear", "b_mlp")]
        a, b = (state(f"{out}/trunk.pt"), state(f"{reference}/trunk.pt")) if r.returncode == 0 else ({}, {None: 0})
        check(r.returncode == 0 and same_files(out, reference, heads) and all(k in a and torch.equal(a[k], b[k]) for k in b),
              f"... and once there is room --resume ends bitwise as the uninterrupted run ({r.stderr.strip()[-200:]})")
    finally:
        subprocess.run(["umount", small])


def level_broken_then_resumed(cmd, out, path, how, at, what, rows_flipped):
    """Runs `cmd` into `out` until its checkpoint reaches (epoch, step) `at`, SIGKILLs it, then
    deletes the level at `path` (how == "deleted") or flips a byte in each of `rows_flipped`
    of its rows, and resumes. Returns the resumed run's CompletedProcess, or None when the
    kill did not find the level."""
    import h5py
    subprocess.run(["rm", "-rf", out])
    rc, st = kill_when(cmd, f"{out}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= at)
    check(rc == -signal.SIGKILL and os.path.exists(path), f"{what} {how}: killed while reading it at epoch {at[0] + 1}")
    if not os.path.exists(path):
        return None
    if how == "deleted":
        os.remove(path)
    else:
        with h5py.File(path, "r") as h:
            offset, width = h["rows"].id.get_offset(), 4 * h["rows"].shape[1]
        for row in rows_flipped:
            flip(path, offset + row * width + 2, 0x40)
    return subprocess.run(cmd + ["--resume"], capture_output=True, text=True)


def level_rebuilt(canopy, config, out, reference, level, epoch):
    """A run killed while it reads its cache level, the level then flipped (a byte of its rows)
    or deleted: --resume computes it again from the cache with the checkpoint's frozen blocks,
    says so, and ends as the uninterrupted run (the level to 1e-6, trunk and heads to 1e-5;
    the message says whether bitwise)."""
    import h5py
    import numpy as np
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    path = f"{out}/levels/{level}.h5"
    for how in ("flipped", "deleted"):
        r = level_broken_then_resumed(cmd, out, path, how, (epoch, 10), "level", [250])
        if r is None:
            continue
        said = [l for l in r.stderr.splitlines() if "computing it again from the cache" in l]
        check(r.returncode == 0 and len(said) == 1 and ("missing" if how == "deleted" else "SHA-256") in said[0],
              f"level {how}: --resume computes it again and says why ({said[:1] or r.stderr[-300:]})")
        if r.returncode:
            continue
        with h5py.File(path, "r") as a, h5py.File(f"{reference}/levels/{level}.h5", "r") as b:
            lv = float(np.abs(a["rows"][:] - b["rows"][:]).max())
        worst, heads = same_run(out, reference)
        check(lv <= 1e-6 and worst <= 1e-5,
              f"level {how}: the run ends as the uninterrupted one (level within {lv:.1e}, trunk within {worst:.1e}; "
              f"heads {'bitwise' if heads and lv == 0 and worst == 0 else 'not bitwise'})")


def inspect_top(canopy, out, scratch, level, last):
    """canopy inspect on the finished autofreeze run: the top's last epoch (the blocks training,
    the cache level read) and the fine-tuned trunk; --verify checks the trunk against the
    SHA-256 the cards pin and the level against its rows' hash; a flipped byte in either (in a
    copy of the run) is CORRUPT, exit 1."""
    import shutil
    import h5py
    r = subprocess.run([canopy, "inspect", out, "--verify"], capture_output=True, text=True)
    want = f"reads the cache level levels/{level}.h5"
    check(r.returncode == 0 and want in r.stdout and ", ".join(last["training"]) + " training" in r.stdout and
          "the fine-tuned trunk matches the SHA-256 the cards pin, the cache level its rows' hash" in r.stdout,
          f"canopy inspect --verify on the autofreeze run: the top's blocks, its level, trunk and level verified "
          f"(exit {r.returncode}): {[l for l in r.stdout.splitlines() if 'top' in l or 'verified' in l]}")
    j = json.loads(subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True).stdout or "{}")
    top = j.get("top") or {}
    check(top.get("level") == level and top.get("training") == last["training"] and top.get("epoch") == last["epoch"]
          and top.get("trunk") == f"{out}/trunk.pt", f"... and --json says the same: {top}")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(out, scratch)
    with h5py.File(f"{scratch}/levels/{level}.h5", "r") as h:
        at = h["rows"].id.get_offset() + 4 * 100 + 2
    for path, offset in ((f"{scratch}/trunk.pt", os.path.getsize(f"{scratch}/trunk.pt") // 2),
                         (f"{scratch}/levels/{level}.h5", at)):
        flip(path, offset, 0x10)
    r = subprocess.run([canopy, "inspect", scratch, "--verify"], capture_output=True, text=True)
    bad = [l for l in r.stdout.splitlines() if "CORRUPT" in l]
    check(r.returncode == 1 and len(bad) == 2 and any("trunk.pt" in l and "the exported cards pin" in l for l in bad)
          and any(f"{level}.h5" in l and "SHA-256" in l for l in bad),
          f"a flipped byte in the fine-tuned trunk and one in the cache level: both CORRUPT, exit {r.returncode}: {bad}")


def level_too_large_for_memory(canopy, config, work, reference, level, first):
    """The in-memory autofreeze run again under cache.memory_cap_mb = 8: its 5.7 MiB split is
    read whole, but the 5.7 MiB level beside it would pass the cap, so the level is kept on
    disk. The run says so and ends bitwise as the one that held it in memory (the same numbers,
    stored elsewhere), also after SIGKILL while it is written and SIGTERM while it is read."""
    import h5py
    import numpy as np
    capped = os.path.join(work, "capped.ini")
    with open(config) as f:
        text = f.read().replace("[cache]\n", "[cache]\nmemory_cap_mb = 8\n")
    with open(capped, "w") as f:
        f.write(text.replace(f"out_dir = {reference}\n", f"out_dir = {work}/cout\n"))
    r = subprocess.run([canopy, "train", "--config", capped, "--progress", "quiet"], capture_output=True, text=True)
    said = [l for l in r.stderr.splitlines() if "is kept on disk, not in memory" in l]
    check(r.returncode == 0 and "features, in memory" in r.stderr and len(said) == 1 and f"cache level of {level}" in said[0]
          and "cache.memory_cap_mb" in said[0] and f"levels/{level}.h5 written on disk" in r.stderr,
          f"a level too large to hold beside the split in memory goes on disk and the log says why "
          f"({said[:1] or r.stderr.strip()[-300:]})")
    if r.returncode:
        return
    got, want = ([(x["training"], x["level"]) for x in trunk_rows(o)] for o in (f"{work}/cout", reference))
    worst, heads = same_run(f"{work}/cout", reference)
    with h5py.File(f"{work}/cout/levels/{level}.h5", "r") as a, h5py.File(f"{reference}/levels/{level}.h5", "r") as b:
        same_level = "row_crc32c" in a and np.array_equal(a["rows"][:], b["rows"][:])
    check(got == want and worst == 0 and heads and same_level,
          f"... the same blocks freeze and the same level is read ({got == want}); the level on disk holds the rows "
          f"the one in memory held ({same_level}); trunk and heads bitwise (trunk within {worst:.1e}, heads {heads})")
    resume_matches(canopy, capped, f"{work}/ccut", reference, [(first - 1, 15), (first, 10)],
                   "a level on disk beside a split in memory", [f"levels/{level}.h5"])


def python_level(cache, trunk, level):
    """What a level of `level` holds, as Python computes it: the cached prefix's training rows
    through the blocks of the trunk file `trunk` up to `level`, flattened per row."""
    import h5py
    import torch
    with h5py.File(f"{cache}/cache.h5", "r") as h:
        x = torch.from_numpy(h["train/features"][:].astype("float32")).reshape(-1, 8, 14, 14)
    model = torch.jit.load(trunk).eval()
    with torch.no_grad():
        for b in range(int(level.split(".")[1]) + 1):
            x = getattr(model.blocks, str(b))(x)
    return x.flatten(1).numpy()


def crc32c(data):
    """CRC-32C (Castagnoli), table-driven: what canopy keeps per row of a level on disk."""
    table = crc32c.table if hasattr(crc32c, "table") else None
    if table is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        crc32c.table = table
    c = 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def streamed_autofreeze(canopy, base, work):
    """Autofreeze over a train split that streams (8 shards of 128 rows, a 4 MiB cap against
    the split's 5.7 MiB): the level is kept on disk, by row, and read instead of computed."""
    import h5py
    import numpy as np
    import torch
    config = os.path.join(work, "streamed.ini")
    write_config(config, base, "freeze = first:1\nschedule = autofreeze\nfreeze_interval = 10\npercentile = 100\n"
                 "min_trainable = 1\n", f"{work}/scache", f"{work}/sout")
    with open(config) as f:
        text = f.read().replace("[cache]\n", "[cache]\nbatch_size = 64\nshard_rows = 128\nmemory_cap_mb = 4\n")
        text = text.replace("epochs = 4\n", "epochs = 7\n")  # here the first block froze in epoch 4
    with open(config, "w") as f:
        f.write(text)
    r = run(canopy, "cache", "--config", config)
    check(r.returncode == 0, f"streamed autofreeze: the cache is built ({r.stderr[-300:]})")
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "lines"], capture_output=True, text=True)
    check(r.returncode == 0 and "streaming" in r.stderr and "autofreeze over a streamed train split" in r.stderr
          and "stored on disk" in r.stderr, f"streamed autofreeze: trains, streaming, and says where its level goes "
          f"({r.stderr[-400:]})")
    rows = trunk_rows(f"{work}/sout") if r.returncode == 0 else []
    depth = [3 - len(row["training"]) for row in rows]
    check(len(depth) == 7 and depth == sorted(depth) and depth[-1] >= 1 and depth[-1] <= 2,
          f"streamed autofreeze: blocks freeze from the bottom up and one always trains (frozen per epoch: {depth})")
    # Blocks frozen during epoch `first` (0-based) are stored during the next and read after.
    first = next((i for i, d in enumerate(depth) if d >= 1), 0)
    levels = [row["level"] for row in rows]
    want = [None] * (first + 1) + [f"blocks.{d - 1}" for d in depth[first:-1]]
    written = re.findall(r"cache level (\S+) written on disk", r.stderr)
    check(first + 2 < 7 and levels == want and written == [f"{work}/sout/levels/{l}.h5" for l in sorted(set(want) - {None})],
          f"streamed autofreeze: each level is written on disk once, in the epoch after its blocks froze, and read from "
          f"the next ({levels}; written: {written})")
    level = next((l for l in reversed(levels) if l), "blocks.0")
    path = f"{work}/sout/levels/{level}.h5"
    ok = os.listdir(f"{work}/sout/levels") == [f"{level}.h5"] if os.path.isdir(f"{work}/sout/levels") else False
    check(ok, f"streamed autofreeze: only the current level is kept ({os.listdir(f'{work}/sout/levels') if ok else path})")
    if not ok:
        return
    with h5py.File(path, "r") as h:
        stored, crcs = h["rows"][:], h["row_crc32c"][:]
    err = np.abs(python_level(f"{work}/scache", f"{work}/sout/trunk.pt", level) - stored).max()
    check(stored.shape == (TRAIN, 8 * 14 * 14) and err < 1e-4,
          f"streamed autofreeze: the level on disk holds every row's output of the frozen blocks, in the split's order, "
          f"as Python computes it (max diff {err:.1e})")
    sample = [0, 1, 500, TRAIN - 1]
    check(crcs.shape == (TRAIN,) and all(crc32c(stored[i].astype("<f4").tobytes()) == int(crcs[i]) for i in sample),
          f"streamed autofreeze: row_crc32c holds each row's CRC-32C (rows {sample})")
    # Cut after the epoch that ended with blocks.0 frozen: blocks.0 (weights and BatchNorm
    # statistics) is what the whole run ends with; blocks.2 trained on.
    r = run(canopy, "train", "--config", config, "--set", f"train.epochs={first + 1}",
            "--set", f"train.out_dir={work}/sfirst")
    a, b = (state(f"{work}/sfirst/trunk.pt"), state(f"{work}/sout/trunk.pt")) if r.returncode == 0 else ({}, {})
    frozen = [k for k in b if k.startswith("blocks.0.")]
    check(frozen and all(torch.equal(a[k], b[k]) for k in frozen) and
          any(not torch.equal(a[k], b[k]) for k in b if k.startswith("blocks.2.")),
          f"streamed autofreeze: a frozen block stays bitwise as it froze, weights and statistics ({len(frozen)} "
          f"tensors), while the top block trains on ({r.stderr.strip()[-200:]})")
    # SIGKILL as blocks freeze and while the level is written, SIGTERM while it is read.
    resume_matches(canopy, config, f"{work}/scut", f"{work}/sout", [(first, 15), (first + 1, 10), (first + 2, 5)],
                   "streamed autofreeze", [f"levels/{level}.h5"])
    r = run(canopy, "train", "--config", config, "--set", "trunk.level_on_disk=false", "--set", f"train.out_dir={work}/soff")
    off = trunk_rows(f"{work}/soff") if r.returncode == 0 else []
    kept = os.listdir(f"{work}/soff/levels") if os.path.isdir(f"{work}/soff/levels") else []
    check(r.returncode == 0 and "with trunk.level_on_disk = false" in r.stderr and not kept and
          [row["training"] for row in off] == [row["training"] for row in rows] and not any(row["level"] for row in off),
          f"trunk.level_on_disk = false: the same blocks freeze, no level is kept ({kept}), the log says so "
          f"({r.stderr.strip()[-200:]})")
    if r.returncode == 0:
        worst, heads = same_run(f"{work}/soff", f"{work}/sout")
        check(worst <= 1e-5, f"... and the run ends as the one that read its level (trunk within {worst:.1e}; heads "
              f"{'bitwise' if heads and worst == 0 else 'not bitwise'})")
    disk_level_lost(canopy, config, f"{work}/slost", f"{work}/sout", level, first + 2)
    disk_level_no_room(canopy, config, f"{work}/ssmall", f"{work}/sout")


def same_run(out, reference):
    """How far the run in `out` ended from `reference`: the trunk's largest difference, and
    whether the heads are bitwise the same."""
    x, y = state(f"{out}/trunk.pt"), state(f"{reference}/trunk.pt")
    worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in y)
    return worst, same_files(out, reference, [f"heads/{n}.safetensors" for n in ("a_linear", "b_mlp")])


def disk_level_lost(canopy, config, out, reference, level, epoch):
    """A streamed run killed while it reads its level on disk, the level then deleted, or a
    byte flipped in every row: --resume computes the frozen blocks instead, says why, stores
    the level again, and ends as the uninterrupted run (trunk to 1e-5; says whether bitwise)."""
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    path = f"{out}/levels/{level}.h5"
    for how in ("flipped", "deleted"):
        r = level_broken_then_resumed(cmd, out, path, how, (epoch, 5), "disk level", range(TRAIN))
        if r is None:
            continue
        said = [l for l in r.stderr.splitlines() if "computed in every step" in l]
        why = "is missing" if how == "deleted" else "does not match its CRC-32C"
        check(r.returncode == 0 and len(said) == 1 and why in said[0] and f"levels/{level}.h5 written on disk" in r.stderr,
              f"disk level {how}: --resume computes the frozen blocks, says why, and stores the level again "
              f"({said[:1] or r.stderr[-300:]})")
        if r.returncode:
            continue
        worst, heads = same_run(out, reference)
        check(worst <= 1e-5, f"disk level {how}: the run ends as the uninterrupted one (trunk within {worst:.1e}; "
              f"heads {'bitwise' if heads and worst == 0 else 'not bitwise'})")


def disk_level_no_room(canopy, config, small, reference):
    """A streamed run on a 2 MiB tmpfs, with room for the checkpoints but not for the level
    (5.7 MiB): it says so, computes the frozen blocks instead, and ends as the run that read
    the level (trunk to 1e-5)."""
    if not small_tmpfs(small, "the level with no room"):
        return
    try:
        out = f"{small}/out"
        r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={out}")
        said = [l for l in r.stderr.splitlines() if "reserving" in l and "the disk is full" in l]
        left = os.listdir(f"{out}/levels") if os.path.isdir(f"{out}/levels") else []
        check(r.returncode == 0 and said and "computed in every step instead" in said[0] and not left,
              f"streamed autofreeze with no room for its level: trains on, computing the frozen blocks, says why, "
              f"leaves no partial file (exit {r.returncode}: {said[:1] or r.stderr.strip()[-300:]}; left {left})")
        if r.returncode == 0:
            worst, heads = same_run(out, reference)
            check(worst <= 1e-5, f"... and ends as the run that read its level (trunk within {worst:.1e}; heads "
                  f"{'bitwise' if heads and worst == 0 else 'not bitwise'})")
    finally:
        subprocess.run(["umount", small])


def write_config(path, base, trunk_keys, cache, out):
    """The slice, `trunk_keys` under [trunk], and the two heads every run here trains."""
    with open(path, "w") as f:
        f.write(base + trunk_keys + f"""lr = 0.002
[cache]
path = {cache}
[train]
out_dir = {out}
batch_size = 32
epochs = 4
checkpoint_steps = 10
[task.a_linear]
head = linear
lr = 0.01
[task.b_mlp]
head = mlp
head.hidden = 32
lr = 0.003
""")


def main():
    import h5py
    import numpy as np
    import torch

    canopy, work, trunk = start("canopy-schedules-", tiny_block_trunk, "blocks.pt")
    base = tiny_trunk_sections(trunk, TRAIN, TEST)

    # --- gradual: the cache below blocks.0, everything above it unfrozen one block per epoch.
    gradual = os.path.join(work, "gradual.ini")
    write_config(gradual, base, "unfreeze_to = blocks.0\nschedule = gradual\nwarmup_epochs = 1\nunfreeze_every = 1\n",
                 f"{work}/gcache", f"{work}/gout")
    r = run(canopy, "cache", "--config", gradual)
    check(r.returncode == 0, f"gradual: the cache is built ({r.stderr[-300:]})")
    meta = json.load(open(f"{work}/gcache/manifest.json"))["meta"]
    check(meta.get("boundary") == "stem", f"gradual: the cache sits below the lowest block that ever trains: {meta.get('boundary')}")
    r = subprocess.run([canopy, "train", "--config", gradual, "--progress", "lines"], capture_output=True, text=True)
    check(r.returncode == 0, f"gradual: training finishes ({r.stderr[-400:]})")
    rows = trunk_rows(f"{work}/gout")
    got = [row["training"] for row in rows]
    want = [[], ["blocks.2"], ["blocks.1", "blocks.2"], ["blocks.0", "blocks.1", "blocks.2"]]
    check(got == want, f"gradual: metrics.jsonl says which blocks train per epoch: {got}")
    check("top: frozen" in r.stderr and "top: blocks.2 train" in r.stderr, "gradual: the progress line says it too")
    tuned, before = state(f"{work}/gout/trunk.pt"), state(trunk)
    moved = [k for k in before if k.startswith("blocks.") and "running_" not in k and "num_batches" not in k]
    check(all(not torch.equal(before[k], tuned[k]) for k in moved), "gradual: every block of the top trained by the end")
    check(all(torch.equal(before[k], tuned[k]) for k in before if k.startswith("stem.")), "gradual: the cached stem is unchanged")
    # Held blocks do not move: after two epochs (one unfrozen) blocks.0 and blocks.1 are as loaded.
    r = run(canopy, "train", "--config", gradual, "--set", "train.epochs=2", "--set", f"train.out_dir={work}/g2")
    two = state(f"{work}/g2/trunk.pt") if r.returncode == 0 else {}
    held = [k for k in moved if k.startswith(("blocks.0.", "blocks.1."))]
    check(two and all(torch.equal(before[k], two[k]) for k in held) and
          any(not torch.equal(before[k], two[k]) for k in moved if k.startswith("blocks.2.")),
          "gradual: blocks still held are bitwise unchanged, the unfrozen one moved")
    resume_matches(canopy, gradual, f"{work}/gcut", f"{work}/gout", [(1, 10), (2, 20)], "gradual")
    # The 2-epoch run trained on to 4 (--resume --set train.epochs=4) is the 4-epoch run.
    goes_on(canopy, gradual, f"{work}/g2", f"{work}/gout", "gradual")

    # --- autofreeze over the same trainable range.
    auto = os.path.join(work, "auto.ini")
    write_config(auto, base, "freeze = first:1\nschedule = autofreeze\nfreeze_interval = 10\npercentile = 100\n"
                 "min_trainable = 1\n", f"{work}/gcache", f"{work}/aout")
    r = run(canopy, "cache", "--config", auto)
    check(r.returncode == 0, f"autofreeze: the cache is built ({r.stderr[-300:]})")
    r = run(canopy, "train", "--config", auto)
    check(r.returncode == 0, f"autofreeze: training finishes ({r.stderr[-400:]})")
    rows = trunk_rows(f"{work}/aout")
    depth = [3 - len(row["training"]) for row in rows]
    check(depth == sorted(depth) and depth[-1] >= 1 and all(len(row["training"]) >= 1 for row in rows),
          f"autofreeze: blocks freeze from the bottom up and one always trains (frozen per epoch: {depth})")
    check(all(set(row["change_rates"]) == {"blocks.0", "blocks.1", "blocks.2"} for row in rows) and
          any(v is not None for v in rows[-1]["change_rates"].values()),
          f"autofreeze: each epoch's row has the blocks' change rates: {rows[-1].get('change_rates')}")
    written = len(re.findall(r"cache level \S+ written", r.stderr))
    levels = [row["level"] for row in rows if row["level"]]
    check(levels and written == len(set(levels)),
          f"autofreeze: each cache level is written once ({written} writes for levels {sorted(set(levels))}) and read after")
    level = levels[-1] if levels else "blocks.0"
    path = f"{work}/aout/levels/{level}.h5"
    check(os.listdir(f"{work}/aout/levels") == [f"{level}.h5"], f"autofreeze: only the current level is kept: {os.listdir(f'{work}/aout/levels')}")
    with h5py.File(path, "r") as h:
        stored = h["rows"][:]
        block = h["rows"].attrs["block"]
        check((block.decode() if isinstance(block, bytes) else block) == level, f"autofreeze: the level file names its block ({block})")
    err = np.abs(python_level(f"{work}/gcache", f"{work}/aout/trunk.pt", level) - stored).max()
    check(stored.shape == (TRAIN, 8 * 14 * 14) and err < 1e-4,
          f"autofreeze: the level holds the frozen blocks' output as Python computes it (max diff {err:.1e})")
    # Evaluations after a freeze run the blocks above it over their output, kept: what they
    # score is what canopy predict scores with the exported trunk run whole.
    check("top: evaluation keeps the output of" in r.stderr, "autofreeze: evaluation keeps the frozen blocks' output")
    from support import FMNIST, fmnist_test_inputs
    y = fmnist_test_inputs(TEST)[1]
    p = run(canopy, "predict", "--config", auto, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST),
            "--scores", "--output", f"{work}/apred.csv")
    check(p.returncode == 0, f"autofreeze: canopy predict with the exported trunk runs ({p.stderr[-300:]})")
    lines = open(f"{work}/apred.csv").read().splitlines() if p.returncode == 0 else [""]
    header, preds = lines[0].split(","), [line.split(",") for line in lines[1:]]
    for task in ("a_linear", "b_mlp"):
        card = json.load(open(f"{work}/aout/heads/{task}.json"))
        got = []
        if len(preds) == TEST:
            cols = [header.index(f"{task}:{c}") for c in card["class_names"]]
            top = torch.tensor([[float(row[c]) for c in cols] for row in preds]).topk(5, 1).indices
            got = [(top[:, 0] == y).float().mean().item(), (top == y[:, None]).any(1).float().mean().item()]
        want = [card["eval_accuracy"], card["eval_top5_accuracy"]]
        check(got and all(abs(a - b) <= 1.0 / TEST + 1e-9 for a, b in zip(got, want)),
              f"autofreeze: {task}'s accuracy and top-5 accuracy from predict's scores ({got}) are the card's {want}")
    first = next(i for i, row in enumerate(rows) if row["level"])
    resume_matches(canopy, auto, f"{work}/acut", f"{work}/aout", [(first - 1, 15), (first, 10)], "autofreeze",
                   [f"levels/{level}.h5"])
    r = run(canopy, "train", "--config", auto, "--set", "train.epochs=2", "--set", f"train.out_dir={work}/a2")
    check(r.returncode == 0, f"autofreeze: a run of 2 epochs ({r.stderr[-300:]})")
    goes_on(canopy, auto, f"{work}/a2", f"{work}/aout", "autofreeze", [f"levels/{level}.h5"])

    level_rebuilt(canopy, auto, f"{work}/arb", f"{work}/aout", level, min(first + 1, 3))
    level_on_full_disk(canopy, auto, f"{work}/small", f"{work}/aout", level)
    inspect_top(canopy, f"{work}/aout", f"{work}/ainspect", level, rows[-1])
    level_too_large_for_memory(canopy, auto, work, f"{work}/aout", level, first)
    streamed_autofreeze(canopy, base, work)

    # --- every weighting trains over the shared top and says its weights.
    for w in ("sum", "static", "uncertainty", "dwa", "famo", "pcgrad"):
        out = f"{work}/w-{w}"
        r = run(canopy, "train", "--config", auto, "--set", "trunk.schedule=static", "--set", f"train.weighting={w}",
                "--set", "train.epochs=3", "--set", f"train.out_dir={out}")
        rows = trunk_rows(out) if r.returncode == 0 else []
        weights = [row["loss_weights"] for row in rows]
        ok = r.returncode == 0 and len(weights) == 3 and all(set(x) == {"a_linear", "b_mlp"} for x in weights)
        if w in ("sum", "static", "pcgrad"):
            ok = ok and all(v == 1.0 for x in weights for v in x.values())
        if w == "uncertainty":
            ok = ok and weights[-1]["a_linear"] != 0.5 and weights[-1]["b_mlp"] != weights[-1]["a_linear"]
        if w == "dwa":  # 1 until two epochs' losses exist, then K softmax: summing to 2
            ok = ok and weights[0] == {"a_linear": 1.0, "b_mlp": 1.0} and abs(sum(weights[2].values()) - 2) < 1e-9 \
                and weights[2]["a_linear"] != 1.0
        if w == "famo":
            ok = ok and weights[-1]["a_linear"] != weights[-1]["b_mlp"]
        check(ok, f"train.weighting = {w} trains; weights per epoch {weights} ({r.stderr.strip()[-200:]})")
    check("fused" not in run(canopy, "train", "--config", auto, "--set", "train.weighting=pcgrad", "--set", "train.epochs=1",
                             "--set", f"train.out_dir={work}/pc1").stderr.replace("unfused", ""),
          "pcgrad trains every head alone (each task's gradient apart)")
    r = run(canopy, "run", "--config", auto, "--set", "train.weighting=dwa", "--set", "trunk.freeze=all",
            "--set", "trunk.schedule=static", "--set", f"train.out_dir={work}/wx", "--set", f"cache.path={work}/wxc")
    check(r.returncode != 0 and "train.weighting = dwa" in r.stderr and "frozen whole" in r.stderr,
          f"a weighting with no shared top is refused: {r.stderr.strip()[-200:]}")
    r = run(canopy, "train", "--config", auto, "--set", "task.a_linear.loss_weight=2", "--set", f"train.out_dir={work}/wy")
    check(r.returncode != 0 and "loss_weight" in r.stderr and "weighting = static" in r.stderr,
          f"a loss_weight without weighting = static is refused: {r.stderr.strip()[-200:]}")
    r = run(canopy, "train", "--config", auto, "--set", "trunk.schedule=cosine", "--set", f"train.out_dir={work}/wz")
    check(r.returncode != 0 and "trunk.lr_schedule" in r.stderr, f"trunk.schedule = cosine points to lr_schedule: {r.stderr.strip()[-200:]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
