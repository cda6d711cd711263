#!/usr/bin/env python3
"""Augmented views in the cache (cache.views = K), read back with h5py.

  * view 0 is the plain image: a 3-view cache's train and test splits equal, bitwise, the
    cache built without views from the same config;
  * views 1..K-1 are augmented (they differ from view 0 and from each other), row for row
    with the same ids and labels;
  * reproducible: a 3-view cache build SIGKILLed twice and resumed equals, bitwise in every
    view, one built without interruption;
  * the format says so: schema 3 in the manifest and the view file; the fingerprint covers
    the augmentation (changing it rebuilds), texts are refused, and training reads one view per
    sample each epoch;
  * under a memory cap smaller than the views, training streams them, each shard as one of
    its views per epoch, and resumes bitwise after SIGKILL;
  * under a trained top (trunk.freeze = first:N), the views are of the frozen prefix's output
    (view 0 bitwise the prefix cache without views) and the top trains on the view drawn;
    autofreeze keeps no cache level over them, says so, and still freezes; SIGKILL + --resume
    ends with the trunk and head bitwise the uninterrupted run's.

    test_views.py --canopy build/runners/canopy
"""
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np

from support import (check, finish, kill_when, slow_conv_trunk, start, tiny_block_trunk, tiny_trunk_sections,
                     trunk_rows)


def write_config(path, trunk, cache, views, extra="", trunk_extra=""):
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, 1500, 200) + trunk_extra + f"""[cache]
path = {cache}
batch_size = 50
shard_rows = 250
views = {views}
{extra}
[train]
out_dir = {cache}-out
epochs = 2
[task.lin]
head = linear
""")
    return path


def read_all(cache):
    with h5py.File(os.path.join(cache, "cache.h5"), "r") as h:
        out = {split: (h[f"{split}/features"][:], h[f"{split}/labels/class"][:], h[f"{split}/ids"][:])
               for split in h.keys()}
        return out, int(h.attrs["canopy_schema"])


def run(args, env=None):
    r = subprocess.run(args + ["--progress", "quiet"], capture_output=True, text=True, env=env)
    return r.returncode, r.stdout, r.stderr


def check_streamed(canopy, work, env, ref_cfg, plain_cfg, dim):
    """Views under a cap smaller than the split's views: streamed, each shard read as one of
    its views per epoch; seeded, so a run SIGKILLed twice resumes bitwise."""
    from safetensors.torch import load_file
    shard = 250 * (4 * dim + 16)
    cap = ["--set", f"cache.memory_cap_mb={8 * shard / 2 ** 20!r}", "--set", "train.batch_size=50",
           "--set", "train.epochs=3", "--set", "train.checkpoint_steps=1"]
    head = lambda out: load_file(os.path.join(out, "heads", "lin.safetensors"))["linear.weight"]
    code, _, err = run([canopy, "train", "--config", ref_cfg, "--set", f"train.out_dir={work}/streamed", *cap], env)
    check(code == 0 and "each shard as one of 3 views each epoch" in err,
          f"views over a cap of 8 shards (the split's 3 views are 18): streamed, one view per shard and epoch "
          f"{[l for l in err.splitlines() if 'streaming' in l][-1:]}")
    code, _, err = run([canopy, "train", "--config", plain_cfg, "--set", f"train.out_dir={work}/streamed-plain", *cap], env)
    check(code == 0 and "views" not in err and not head(f"{work}/streamed").equal(head(f"{work}/streamed-plain")),
          "... training on other rows than the cache without views streamed alike (the augmented views are served)")
    out = f"{work}/streamed-cut"
    cmd = [canopy, "train", "--config", ref_cfg, "--set", f"train.out_dir={out}", *cap, "--progress", "quiet"]
    for target, extra in (((0, 12), []), ((1, 20), ["--resume"])):
        rc, st = kill_when(cmd + extra, f"{out}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= target, env=env)
        check(rc == -signal.SIGKILL and st is not None, f"streamed views, killed by SIGKILL at {st and (st['epoch'], st['step'])}")
    code = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env).returncode
    check(code == 0 and head(out).equal(head(f"{work}/streamed")),
          "... and resumed: the head bitwise the uninterrupted streamed run's")
    code, _, err = run([canopy, "train", "--config", ref_cfg, "--set", "cache.memory_cap_mb=0.1"], env)
    check(code == 1 and "raise the cap" in err, f"a cap too small to stream is refused: {err.strip()[-160:]}")


def check_top(canopy, work, env):
    """Views of a frozen prefix's output, under a top of blocks.1 and blocks.2 that trains."""
    import torch
    from safetensors.torch import load_file
    torch.manual_seed(0)
    trunk = os.path.join(work, "blocks.pt")
    torch.jit.script(tiny_block_trunk().eval()).save(trunk)
    top = "freeze = first:2\n"
    plain_cfg = write_config(os.path.join(work, "top1.ini"), trunk, os.path.join(work, "top1"), 1, trunk_extra=top)
    cfg = write_config(os.path.join(work, "top3.ini"), trunk, os.path.join(work, "top3"), 3, trunk_extra=top)
    for c in (plain_cfg, cfg):
        code, _, err = run([canopy, "cache", "--config", c], env)
        check(code == 0, f"top: canopy cache {os.path.basename(c)} {err[-300:]}")
    plain, _ = read_all(os.path.join(work, "top1"))
    views, _ = read_all(os.path.join(work, "top3"))
    check(sorted(views) == ["test", "train", "train.view1", "train.view2"] and views["train"][0].shape[1] == 8 * 14 * 14,
          f"top: the 3-view cache holds the prefix's output (blocks.0: 8 x 14 x 14 per row): "
          f"{sorted(views)}, {views['train'][0].shape}")
    check(all(np.array_equal(views[s][0], plain[s][0]) for s in ("train", "test")),
          "top: view 0 and the test split equal the prefix cache without views, bitwise")
    differ = (np.abs(views["train.view1"][0] - views["train"][0]).max(1) > 0).mean()
    check(differ > 0.99, f"top: the views of the prefix's output are augmented ({100 * differ:.1f}% of rows differ)")

    trunk_state = lambda out: torch.jit.load(f"{out}/trunk.pt").state_dict()
    head = lambda out: load_file(os.path.join(out, "heads", "lin.safetensors"))["linear.weight"]
    args = ["--set", "train.batch_size=50", "--set", "train.epochs=3"]
    code, _, err = run([canopy, "train", "--config", plain_cfg, *args], env)
    check(code == 0, f"top: trains without views {err[-300:]}")
    code, _, err = run([canopy, "train", "--config", cfg, *args], env)
    check(code == 0 and "one of 3 views per row each epoch" in err, f"top: trains on the views {err[-300:]}")
    a, b = trunk_state(os.path.join(work, "top3-out")), trunk_state(os.path.join(work, "top1-out"))
    check(code == 0 and not all(torch.equal(a[k], b[k]) for k in b),
          "top: the top trained on the views drawn ends with other weights than without views")

    auto = [*args, "--set", "trunk.schedule=autofreeze", "--set", "trunk.freeze_interval=10",
            "--set", "trunk.percentile=100", "--set", "trunk.min_trainable=1", "--set", "train.checkpoint_steps=1"]
    ref = os.path.join(work, "top3-auto")
    r = subprocess.run([canopy, "train", "--config", cfg, *auto, "--set", f"train.out_dir={ref}", "--progress", "lines"],
                       capture_output=True, text=True, env=env)
    rows = trunk_rows(ref) if r.returncode == 0 else []
    levels = os.path.join(ref, "levels")
    check(r.returncode == 0 and "no cache level of their output is kept" in r.stderr
          and any(len(row["training"]) == 1 for row in rows)
          and not (os.path.isdir(levels) and os.listdir(levels)),
          f"top: autofreeze over views freezes blocks.1 ({[len(row['training']) for row in rows]} training per epoch), "
          f"keeps no level and says so ({r.stderr[-300:] if r.returncode else ''})")
    out = os.path.join(work, "top3-cut")
    cmd = [canopy, "train", "--config", cfg, *auto, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    rc, st = kill_when(cmd, f"{out}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= (1, 10), env=env)
    check(rc == -signal.SIGKILL and st is not None,
          f"top: views + autofreeze killed by SIGKILL in epoch 2 at {st and (st['epoch'], st['step'])}")
    code = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env).returncode
    a, b = trunk_state(out), trunk_state(ref)
    check(code == 0 and all(torch.equal(a[k], b[k]) for k in b) and head(out).equal(head(ref)),
          "top: ... resumed: trunk and head bitwise the uninterrupted run's")


def main():
    canopy, work, trunk = start("canopy-views-", slow_conv_trunk, "slow.pt")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    plain_cfg = write_config(os.path.join(work, "plain.ini"), trunk, os.path.join(work, "plain"), 1)
    ref_cfg = write_config(os.path.join(work, "ref.ini"), trunk, os.path.join(work, "ref"), 3)
    cut_cfg = write_config(os.path.join(work, "cut.ini"), trunk, os.path.join(work, "cut"), 3)
    for cfg in (plain_cfg, ref_cfg):
        code, _, err = run([canopy, "cache", "--config", cfg], env)
        check(code == 0, f"canopy cache {os.path.basename(cfg)} {err[-300:]}")
    plain, plain_schema = read_all(os.path.join(work, "plain"))
    ref, ref_schema = read_all(os.path.join(work, "ref"))
    check(sorted(ref) == ["test", "train", "train.view1", "train.view2"], f"splits of the 3-view cache: {sorted(ref)}")
    check(all(np.array_equal(ref[s][0], plain[s][0]) for s in ("train", "test")),
          "view 0 (train) and the test split equal the cache without views, bitwise")
    same_rows = all(np.array_equal(ref[v][k], ref["train"][k]) for v in ("train.view1", "train.view2") for k in (1, 2))
    check(same_rows, "every view holds the same rows: ids and labels equal view 0's")
    d01 = np.abs(ref["train.view1"][0] - ref["train"][0]).mean()
    d12 = np.abs(ref["train.view2"][0] - ref["train.view1"][0]).mean()
    rows_differ = (np.abs(ref["train.view1"][0] - ref["train"][0]).max(1) > 0).mean()
    check(d01 > 0 and d12 > 0 and rows_differ > 0.99,
          f"views are augmented: mean |view1 - view0| {d01:.4f}, |view2 - view1| {d12:.4f}; {100 * rows_differ:.1f}% of rows differ")
    manifest = json.load(open(os.path.join(work, "ref", "manifest.json")))
    check(plain_schema == 2 and ref_schema == 3 and manifest["schema"] == 3 and manifest["meta"]["views"] == 3,
          f"format version: 2 without views, 3 with (manifest and view file)")

    # SIGKILL twice while building, then resume: every view bitwise the uninterrupted build's.
    for min_shards in (3, 10):
        returncode, m = kill_when([canopy, "cache", "--config", cut_cfg, "--progress", "quiet"],
                                  os.path.join(work, "cut", "manifest.json"),
                                  lambda m: len(m["shards"]) >= min_shards, env=env)
        check(returncode == -signal.SIGKILL and m is not None and not m["complete"],
              f"cache build killed by SIGKILL with {len(m['shards']) if m else 0} shard(s) written")
    code, _, err = run([canopy, "cache", "--config", cut_cfg], env)
    check(code == 0 and "resum" in err, f"the third run resumes and finishes {err[-200:]}")
    cut, _ = read_all(os.path.join(work, "cut"))
    check(sorted(cut) == sorted(ref) and all(np.array_equal(cut[s][k], ref[s][k]) for s in ref for k in range(3)),
          "the resumed cache equals the uninterrupted one in every view, bitwise")

    check_streamed(canopy, work, env, ref_cfg, plain_cfg, ref["train"][0].shape[1])
    check_top(canopy, work, env)

    # The fingerprint covers the augmentation; training draws one view per sample.
    code, out, err = run([canopy, "cache", "--config", ref_cfg, "--set", "augment.jitter=0.2"], env)
    check(code == 0 and "augment" in err, f"changing augment.jitter rebuilds, naming it: "
          f"{[l for l in err.splitlines() if 'changed' in l][:1]}")
    code, out, err = run([canopy, "train", "--config", ref_cfg, "--set", "augment.jitter=0.2"], env)
    check(code == 0 and "one of 3 views per row each epoch" in err, f"training reads the views {err[-300:]}")
    code, _, err = run([canopy, "cache", "--config", ref_cfg, "--set", "augment.crop_scale=0.9,0.5"], env)
    check(code == 2 and "augment.crop_scale" in err, f"a bad crop range is refused: {err.strip()[-120:]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
