#!/usr/bin/env python3
"""Fine-tuning the trunk's top over a cached frozen prefix, checked from outside with torch,
h5py and safetensors, on a slice of Fashion-MNIST through a small trunk with blocks:

- the cache holds the prefix's output (unpooled) and says so; the fingerprint covers the cut
- the prefix's weights and every BatchNorm statistic are bitwise unchanged in the exported
  trunk, the top's weights changed; every card pins the exported trunk's SHA-256
- Python loads the exported trunk and a head's safetensors and reproduces canopy's accuracy
- fused and unfused heads give the same top; SIGKILL + --resume ends bitwise identical, also
  after the machine's fusion calibration changed (the checkpoint's decisions are kept)
- a grid with the top: its members fuse only with each other, the log says it weighs on the
  top as one task, SIGKILL + --resume ends bitwise identical
- trunk.lr_warmup_steps and trunk.max_grad_norm move the top by exactly what they say (one
  SGD step), warm up over the steps the top trains, and resume bitwise; so does a top trained
  under bfloat16 autocast (trunk.top_precision); a rate that makes its weights overflow stops
  the run naming the parameter
- train.export = best with the top: the top and every head of the one epoch whose mean
  validation score over the tasks was best, bitwise those of a run stopped at that epoch;
  SIGKILL + --resume exports the same
- a policy that leaves no frozen prefix is refused with a message saying what to write

    test_finetune.py --canopy build/runners/canopy
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

from support import (check, finish, flip, fmnist_test_inputs, kill_when, start, tiny_block_trunk, tiny_trunk_sections,
                     trunk_rows)

TRAIN, TEST = 1200, 300


def run(canopy, *args):
    return subprocess.run([canopy, *args, "--progress", "quiet"], capture_output=True, text=True)


def state(path):
    import torch
    return {k: v.clone() for k, v in torch.jit.load(path).state_dict().items()}


def killed_twice_then_resumed(canopy, config, out, what, *extra):
    """`canopy train` into `out`, SIGKILLed at epoch 1 step 20, resumed and SIGKILLed at epoch 2
    step 20, then resumed to its end; returns the last run (a CompletedProcess)."""
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet", *extra]
    for target, resume in (((0, 20), []), ((1, 20), ["--resume"])):
        rc, st = kill_when(cmd + resume, f"{out}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= target)
        check(rc == -signal.SIGKILL and st is not None, f"{what} killed by SIGKILL at {st and (st['epoch'], st['step'])}")
    return subprocess.run(cmd + ["--resume"], capture_output=True, text=True)


def check_warmup_and_clipping(canopy, work, config, trunk, plain):
    """trunk.lr_warmup_steps and trunk.max_grad_norm, checked on the weights they move: one SGD
    step over the whole split (momentum's first step is the gradient itself) moves the top by
    exactly lr x warm-up factor x gradient, clipped to max_grad_norm."""
    import torch
    one = ["--set", "trunk.optimizer=sgd", "--set", "trunk.lr_decay=1", "--set", "trunk.lr=0.05", "--set",
           f"train.batch_size={TRAIN}", "--set", "train.epochs=1", "--set", "trunk.lr_warmup_steps=4"]
    params = dict(torch.jit.load(trunk).named_parameters())

    def step_of(out, *extra):
        r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={out}", *one, *extra)
        if r.returncode != 0:
            check(False, f"one SGD step of the top: {r.stderr[-300:]}")
            return None, None
        after = dict(torch.jit.load(f"{out}/trunk.pt").named_parameters())
        return {k: after[k].double() - params[k].double() for k in params}, trunk_rows(out)[-1]

    free, row = step_of(f"{work}/sgd-free")
    if free is None:
        return
    g = row["grad_norm"]
    norm = torch.sqrt(sum((d ** 2).sum() for d in free.values())).item()
    check(row["steps"] == 1 and row["clipped_steps"] == 0 and abs(row["lr"] - 0.05 / 4) < 1e-15 and
          abs(norm / (0.05 / 4 * g) - 1) < 1e-3,
          f"the first step of a 4-step warm-up takes 1/4 of trunk.lr ({row['lr']}): the top moves by lr / 4 x the "
          f"gradient norm metrics.jsonl reports ({norm:.4e} vs {0.05 / 4 * g:.4e})")
    c = g / 3
    clipped, row = step_of(f"{work}/sgd-clip", "--set", f"trunk.max_grad_norm={c!r}")
    if clipped is None:
        return
    scale = c / (g + 1e-6)
    off = max((clipped[k] - free[k] * scale).abs().max().item() for k in free)
    big = max(free[k].abs().max().item() for k in free)
    norm = torch.sqrt(sum((d ** 2).sum() for d in clipped.values())).item()
    check(row["clipped_steps"] == 1 and abs(row["grad_norm"] - g) < 1e-9 * g and abs(norm / (0.05 / 4 * c) - 1) < 1e-3 and
          off < 1e-3 * big,
          f"trunk.max_grad_norm = gradient norm / 3 scales the step to it: moved {norm:.4e} (lr / 4 x max_grad_norm "
          f"{0.05 / 4 * c:.4e}), in the unclipped step's direction (largest difference {off:.1e} of {big:.1e}); "
          f"the norm reported before clipping")

    # Over epochs: the warm-up counts the steps the top trains (gradual's first epoch trains
    # none); each epoch's row has the rate of its last step.
    L, W, S = 0.01, 57, (TRAIN + 31) // 32
    for sched, want in (("static", [L * S / W, L, L]), ("gradual", [L / W, L * S / W, L])):
        r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/warm-{sched}", "--set",
                f"trunk.schedule={sched}", "--set", f"trunk.lr_warmup_steps={W}", "--set", "train.checkpoint_steps=0")
        rows = trunk_rows(f"{work}/warm-{sched}") if r.returncode == 0 else []
        got = [x["lr"] for x in rows]
        check(len(got) == 3 and all(abs(a - b) < 1e-12 for a, b in zip(got, want)) and
              [x["steps"] for x in rows] == ([S] * 3 if sched == "static" else [0, S, S]),
              f"trunk.schedule = {sched}, a warm-up of {W} steps over epochs of {S}: the top block's rate per epoch "
              f"{got} (expected {want}; steps {[x['steps'] for x in rows]})")
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/warm-long", "--set",
            "trunk.lr_warmup_steps=1000", "--set", "train.epochs=1")
    check(r.returncode == 0 and f"trunk.lr_warmup_steps = 1000 is more than the {S} steps" in r.stderr,
          f"a warm-up longer than the run is said ({[l for l in r.stderr.splitlines() if 'warmup' in l][:1]})")

    # A rate that throws the weights past float32's range stops the run at that step, naming
    # the parameter and the checkpoint to go on from.
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/diverged", "--set",
            "trunk.optimizer=sgd", "--set", "trunk.lr=3e38", "--set", "trunk.lr_decay=1", "--set", "train.epochs=1",
            "--set", "task.a_linear.loss_weight=1e6")
    said = [l for l in r.stderr.splitlines() if "not finite" in l]
    check(r.returncode != 0 and said and "the shared top's weights are not finite after the step (blocks." in said[0]
          and "lower trunk.lr" in said[0] and "is the last good state" in said[0],
          f"a diverging top is stopped with its parameter named (exit {r.returncode}: {said[:1]})")

    # Killed twice (in the warm-up, with clipping at work) and resumed: bitwise the
    # uninterrupted run, the epochs' rows (norms, clipped steps, rates) too.
    keys = ["--set", "trunk.lr_warmup_steps=60", "--set", "trunk.max_grad_norm=0.2"]
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/warm", *keys)
    whole = state(f"{work}/warm/trunk.pt") if r.returncode == 0 else {}
    rows = trunk_rows(f"{work}/warm") if r.returncode == 0 else []
    check(len(rows) == 3 and sum(x["clipped_steps"] for x in rows) > 0 and
          any(not torch.equal(whole[k], plain[k]) for k in plain),
          f"a warmed-up, clipped run trains, some steps clipped, to another top than without "
          f"({[(x['clipped_steps'], x['steps']) for x in rows]})")
    # TensorBoard's @trunk run, read with the tensorboard package: the same numbers per epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(f"{work}/warm/tensorboard/@trunk")
    acc.Reload()
    tb = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("trunk/lr", "trunk/grad_norm",
                                                                          "trunk/clipped_fraction")}
    want = {"trunk/lr": [x["lr"] for x in rows], "trunk/grad_norm": [x["grad_norm"] for x in rows],
            "trunk/clipped_fraction": [x["clipped_steps"] / x["steps"] for x in rows]}
    check(all([s for s, _ in tb[t]] == [1, 2, 3] and all(abs(v - w) <= 1e-6 * max(1, abs(w)) for (_, v), w in
                                                         zip(tb[t], want[t])) for t in tb),
          f"TensorBoard's @trunk run has trunk/lr, trunk/grad_norm and trunk/clipped_fraction per epoch, as "
          f"metrics.jsonl: {tb['trunk/clipped_fraction']}")
    r = subprocess.run([canopy, "inspect", f"{work}/warm", "--json"], capture_output=True, text=True)
    top = json.loads(r.stdout)["top"] if r.returncode == 0 else {}
    check(rows and [top.get(k) for k in ("lr", "grad_norm", "clipped_steps")] ==
          [rows[-1][k] for k in ("lr", "grad_norm", "clipped_steps")],
          f"canopy inspect --json gives the last epoch's rate, gradient norm and clipped steps: {top}")
    out = f"{work}/warm-cut"
    r = killed_twice_then_resumed(canopy, config, out, "warmed up and clipped,", *keys)
    resumed = state(f"{out}/trunk.pt") if r.returncode == 0 else {}
    check(whole and resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole) and
          trunk_rows(out) == rows,
          "... and resumed: the trunk and every epoch's @trunk row bitwise the uninterrupted run's")

    # Mixed precision (trunk.top_precision = bfloat16, the top's passes under autocast): killed
    # twice and resumed, bitwise the uninterrupted run too.
    mixed = ["--set", "trunk.top_precision=bfloat16"]
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/mixed", *mixed)
    whole = state(f"{work}/mixed/trunk.pt") if r.returncode == 0 else {}
    rows = trunk_rows(f"{work}/mixed") if r.returncode == 0 else []
    check(whole and any(not torch.equal(whole[k], plain[k]) for k in plain),
          "a top trained under bfloat16 autocast ends elsewhere than in float32")
    out = f"{work}/mixed-cut"
    r = killed_twice_then_resumed(canopy, config, out, "a bfloat16 top,", *mixed)
    resumed = state(f"{out}/trunk.pt") if r.returncode == 0 else {}
    check(whole and resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole) and
          trunk_rows(out) == rows,
          "... and resumed: the trunk and every epoch's @trunk row bitwise the uninterrupted run's")


def export_best_with_top(canopy, work, config):
    """train.export = best over the top: the epoch whose tasks' mean validation score is best,
    computed here from metrics.jsonl, is exported for the top and every head, bitwise as a run
    of that many epochs leaves them. At a top rate high enough for validation to fall again
    (on this trunk the scores jump between epochs): the first of three rates whose best epoch
    is not the last, so that the check tells the two apart on any CPU's rounding."""
    import torch
    names = ("a_linear", "b_linear", "c_mlp")
    for rate in (["trunk.lr=0.04"], ["trunk.lr=0.02"], ["trunk.lr=0.2", "trunk.lr_warmup_steps=240"]):
        common = ["--set", "train.validation_fraction=0.2"] + [a for r in rate for a in ("--set", r)]
        best = common + ["--set", "train.export=best", "--set", "train.epochs=8"]
        out = f"{work}/best"
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "lines",
                            *best], capture_output=True, text=True)
        if r.returncode != 0:
            check(False, f"export = best with a top trains ({r.stderr.strip()[-300:]})")
            return
        mean = {}
        for row in (json.loads(l) for l in open(f"{out}/metrics.jsonl")):
            if row["task"] in names:
                mean.setdefault(row["epoch"], []).append(row["eval_accuracy"])  # on the validation split
        mean = {e: sum(v) / len(v) for e, v in mean.items()}
        epoch = max(mean, key=lambda e: (mean[e], -e))
        if epoch < 8:
            break
    check(epoch < 8, f"at one of three rates the best epoch is not the last (means per epoch at {rate}: {mean})")
    said = {row["epoch"]: row.get("validation_score") for row in trunk_rows(out)}
    check(all(abs(said[e] - mean[e]) < 1e-12 for e in mean) and trunk_rows(out)[-1]["best_epoch"] == epoch,
          f"each epoch's @trunk row has the tasks' mean validation score ({said}) and the best epoch so far, {epoch}")
    cards = {n: json.load(open(f"{out}/heads/{n}.json")) for n in names}
    check(all(c["exported_epoch"] == epoch for c in cards.values()) and f"as they were at epoch {epoch}," in r.stderr,
          f"every head's card exports epoch {epoch} and the log says so: {[c['exported_epoch'] for c in cards.values()]}")
    r = subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True)
    top = json.loads(r.stdout).get("top") or {} if r.returncode == 0 else {}
    check(top.get("best_epoch") == epoch and abs(top.get("best_validation_score", -1) - mean[epoch]) < 1e-12,
          f"canopy inspect --json names the best epoch and its mean score: {top}")
    # The same run stopped at that epoch: the exported trunk and heads are its.
    cut = common + ["--set", f"train.epochs={epoch}", "--set", "train.export=last"]
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/best-cut", *cut)
    a, b = (state(f"{out}/trunk.pt"), state(f"{work}/best-cut/trunk.pt")) if r.returncode == 0 else ({}, {None: 0})
    check(r.returncode == 0 and all(k in a and torch.equal(a[k], b[k]) for k in b) and
          all(open(f"{out}/heads/{n}.safetensors", "rb").read() == open(f"{work}/best-cut/heads/{n}.safetensors", "rb").read()
              for n in names),
          f"the exported trunk and heads are bitwise those of a run of {epoch} epochs at {rate} ({r.stderr.strip()[-200:]})")
    last = json.load(open(f"{work}/best-cut/heads/a_linear.json")) if r.returncode == 0 else {}
    check(last.get("eval_accuracy") == cards["a_linear"]["eval_accuracy"],
          f"... and so are the test scores on the cards ({last.get('eval_accuracy')}, {cards['a_linear']['eval_accuracy']})")
    # SIGKILLed before the best epoch and after it (the best top and heads then come from the
    # checkpoint), resumed to the end.
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={work}/best-resumed", "--progress", "quiet", *best]
    for target, resume in (((1, 20), []), ((epoch, 10), ["--resume"])):
        rc, st = kill_when(cmd + resume, f"{work}/best-resumed/checkpoint/state.json",
                           lambda s: (s["epoch"], s["step"]) >= target)
        check(rc == -signal.SIGKILL and st is not None, f"export = best with a top killed by SIGKILL at "
              f"{st and (st['epoch'], st['step'])}")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    a = state(f"{work}/best-resumed/trunk.pt") if r.returncode == 0 else {}
    check(r.returncode == 0 and all(k in a and torch.equal(a[k], b[k]) for k in b) and
          all(open(f"{out}/heads/{n}.safetensors", "rb").read() ==
              open(f"{work}/best-resumed/heads/{n}.safetensors", "rb").read() for n in names),
          f"killed twice, the second time after the best epoch, and resumed: the run exports the same trunk and "
          f"heads ({r.stderr.strip()[-200:]})")

    # train.export_monitor: one task's validation score chooses the epoch instead of the mean.
    out = f"{work}/best-mlp"
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={out}", *best, "--set", "train.export_monitor=c_mlp")
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")] if r.returncode == 0 else []
    mlp = {row["epoch"]: row["eval_accuracy"] for row in rows if row["task"] == "c_mlp"}
    said = {row["epoch"]: row.get("validation_score") for row in rows if row["task"] == "@trunk"}
    mlp_epoch = max(mlp, key=lambda e: (mlp[e], -e)) if mlp else None
    cards = [json.load(open(f"{out}/heads/{n}.json"))["exported_epoch"] for n in names] if r.returncode == 0 else []
    check(mlp and said == mlp and cards == [mlp_epoch] * 3 and f"where c_mlp's score on the validation split" in r.stderr,
          f"export_monitor = c_mlp: its validation accuracy per epoch ranks them ({said}), epoch {mlp_epoch} exported "
          f"({cards}; the tasks' mean chose {epoch})")
    for extra, said in ((["--set", "train.export=best", "--set", "train.export_monitor=d_none"], "names no task; the tasks are a_linear, b_linear, c_mlp"),
                        (["--set", "train.export=last", "--set", "train.export_monitor=c_mlp"], "set export = best")):
        r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/x", *common, *extra)
        check(r.returncode == 2 and said in r.stderr, f"{extra[-1]} is refused: {r.stderr.strip()[-200:]}")


def main():
    import h5py
    import numpy as np
    import torch
    from safetensors.torch import load_file

    canopy, work, trunk = start("canopy-finetune-", tiny_block_trunk, "blocks.pt")
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, TRAIN, TEST) + f"""freeze = first:2
lr = 0.01
[cache]
path = {work}/cache
[train]
out_dir = {work}/out
batch_size = 32
epochs = 3
checkpoint_steps = 20
weighting = static
[task.a_linear]
head = linear
lr = 0.01
[task.b_linear]
head = linear
lr = 0.005
loss_weight = 0.5
[task.c_mlp]
head = mlp
head.hidden = 32
lr = 0.003
""")
    r = run(canopy, "cache", "--config", config)
    check(r.returncode == 0, f"cache of the prefix built ({r.stderr[-400:]})")
    manifest = json.load(open(f"{work}/cache/manifest.json"))["meta"]
    check(manifest.get("boundary") == "blocks.0" and manifest["row_parts"] == [{"name": "boundary", "shape": [8, 14, 14]}],
          f"the manifest names the boundary and the row layout: {manifest.get('boundary')} {manifest.get('row_parts')}")
    check("freeze=first:2" in manifest["description"], "the fingerprint's description holds the cut")
    with h5py.File(f"{work}/cache/cache.h5", "r") as h:
        cached = h["test/features"][:16]
        check(h["train/features"].shape == (TRAIN, 8 * 14 * 14), f"the view holds [rows, 8*14*14]: {h['train/features'].shape}")
    x, y = fmnist_test_inputs(TEST)
    base = torch.jit.load(trunk).eval()
    with torch.no_grad():  # a scripted ModuleList is not indexable from Python
        prefix = getattr(base.blocks, "0")(base.stem(x[:16]))
    err = np.abs(prefix.flatten(1).numpy() - cached).max()
    check(err < 1e-5, f"the cached rows are the prefix's output as Python torch computes it (max diff {err:.1e})")

    r = run(canopy, "train", "--config", config)
    check(r.returncode == 0, f"training with a shared top finishes ({r.stderr[-600:]})")
    check("fine-tuning the trunk's top" in r.stderr and "blocks.1, blocks.2" in r.stderr, "the log says what trains")
    tuned_path = f"{work}/out/trunk.pt"
    tuned, before = state(tuned_path), state(trunk)
    prefix_keys = [k for k in before if k.startswith(("stem.", "blocks.0."))]
    check(len(prefix_keys) >= 10 and all(torch.equal(before[k], tuned[k]) for k in prefix_keys),
          f"the prefix's {len(prefix_keys)} tensors are bitwise unchanged")
    stats = [k for k in before if "running_" in k]
    check(len(stats) == 8 and all(torch.equal(before[k], tuned[k]) for k in stats),
          "every BatchNorm's running statistics are unchanged (the top's too)")
    moved = [k for k in before if k.startswith(("blocks.1.", "blocks.2.")) and "running_" not in k and "num_batches" not in k]
    check(all(not torch.equal(before[k], tuned[k]) for k in moved), f"all {len(moved)} weights of the top changed")
    sha = hashlib.sha256(open(tuned_path, "rb").read()).hexdigest()

    # Python: the exported trunk, average pooling, each head's safetensors.
    model = torch.jit.load(tuned_path).eval()
    with torch.no_grad():
        feats = model(x).mean((2, 3))
    accs = {}
    for name in ("a_linear", "b_linear", "c_mlp"):
        card = json.load(open(f"{work}/out/heads/{name}.json"))
        check(card["trunk_sha256"] == sha and card["trunk_file"] == tuned_path and card["trunk_boundary"] == "blocks.0",
              f"{name}: the card pins the fine-tuned trunk by its SHA-256")
        w = load_file(f"{work}/out/heads/{card['weights']}")
        with torch.no_grad():
            if card["head"] == "linear":
                logits = feats @ w["linear.weight"].T + w["linear.bias"]
            else:
                logits = torch.relu(feats @ w["layers.0.weight"].T + w["layers.0.bias"]) @ w["layers.2.weight"].T + w["layers.2.bias"]
        acc = (logits.argmax(1) == y).float().mean().item()
        check(abs(acc - card["eval_accuracy"]) <= 1.0 / TEST + 1e-9,
              f"{name}: Python reproduces canopy's accuracy ({acc:.4f} vs {card['eval_accuracy']:.4f})")
        accs[name] = card["eval_accuracy"]

    # This trunk's frozen features are near chance; what its top learns is not.
    r = run(canopy, "run", "--config", config, "--set", "trunk.freeze=all", "--set", f"cache.path={work}/frozen-cache",
            "--set", f"train.out_dir={work}/frozen")
    frozen = {n: json.load(open(f"{work}/frozen/heads/{n}.json"))["eval_accuracy"] for n in accs} if r.returncode == 0 else {}
    check(frozen and all(accs[n] > frozen[n] + 0.03 for n in accs),
          f"every head does better with the trained top: {accs} vs frozen {frozen}")
    said = [l for l in r.stderr.splitlines() if "goes unused" in l]
    check(len(said) == 1 and said[0].endswith("trunk.lr = 0.01"),
          f"frozen whole, the run says the top's keys the config sets go unused: {said}")
    r = run(canopy, "train", "--config", config, "--set", "trunk.freeze=all", "--set", f"cache.path={work}/frozen-cache",
            "--set", f"train.out_dir={work}/frozen-best", "--set", "train.validation_fraction=0.2",
            "--set", "train.export=best", "--set", "train.export_monitor=c_mlp")
    said = [l for l in r.stderr.splitlines() if "goes unused" in l]
    epochs = {n: json.load(open(f"{work}/frozen-best/heads/{n}.json"))["exported_epoch"] for n in accs} \
        if r.returncode == 0 else {}
    scores = {}  # each head's validation accuracy per epoch
    for row in (json.loads(l) for l in open(f"{work}/frozen-best/metrics.jsonl")) if r.returncode == 0 else ():
        scores.setdefault(row["task"], {})[row["epoch"]] = row["eval_accuracy"]
    own = {n: max(scores[n], key=lambda e: (scores[n][e], -e)) for n in accs if n in scores}
    check(len(said) == 1 and said[0].endswith("trunk.lr = 0.01, train.export_monitor = c_mlp") and epochs and
          epochs == own, f"... and export_monitor too: each head exports its own best epoch ({epochs}, its best "
          f"{own}): {said}")
    for cmd, cache in (("cache", "frozen-cache2"), ("train", "frozen-cache")):
        r = run(canopy, cmd, "--config", config, "--set", "trunk.freeze=all", "--set", f"cache.path={work}/{cache}",
                "--set", f"train.out_dir={work}/frozen-gradual", "--set", "trunk.schedule=gradual")
        check(r.returncode == 2 and "trunk.schedule = gradual" in r.stderr and "frozen whole" in r.stderr and
              "unfreeze_to" in r.stderr, f"canopy {cmd}: a schedule over a trunk frozen whole is refused, saying what "
                                         f"to write: {r.stderr.strip()[-160:]}")

    # canopy predict runs the fine-tuned trunk it exported.
    from support import FMNIST
    r = run(canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
            "--limit", str(TEST), "--output", f"{work}/pred.csv")
    check(r.returncode == 0 and "fine-tuned trunk" in r.stderr, f"canopy predict uses the fine-tuned trunk ({r.stderr[-300:]})")
    rows = open(f"{work}/pred.csv").read().splitlines()[1:] if r.returncode == 0 else []
    card = json.load(open(f"{work}/out/heads/a_linear.json"))
    names = card["class_names"]
    hits = sum(row.split(",")[1] == names[int(t)] for row, t in zip(rows, y))
    check(len(rows) == TEST and abs(hits / TEST - card["eval_accuracy"]) <= 1.0 / TEST + 1e-9,
          f"predict's a_linear accuracy {hits / max(1, TEST):.4f} is the card's {card['eval_accuracy']:.4f}")

    # canopy export writes that fine-tuned trunk into the model file: torch alone answers as predict does.
    r = run(canopy, "export", "--config", config, "--output", f"{work}/model.pt")
    check(r.returncode == 0, "canopy export of the fine-tuned model" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
    if r.returncode == 0:
        import torch
        from support import read_idx
        extra = {"canopy/model.json": ""}
        model_file = torch.jit.load(f"{work}/model.pt", _extra_files=extra)
        with torch.no_grad():
            probs = model_file(torch.from_numpy(read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:TEST].copy()))["a_linear"]
        same = sum(row.split(",")[1] == names[int(k)] for row, k in zip(rows, probs.argmax(1)))
        check(json.loads(extra["canopy/model.json"])["trunk_sha256"] == card["trunk_sha256"] and same == len(rows) == TEST,
              f"the model file holds the fine-tuned trunk (its SHA-256 the card's) and answers as predict on {same} of "
              f"{TEST} rows")

    # The heads one by one instead of fused: the same top, to float rounding, over one epoch
    # at a small learning rate (Adam turns rounding-level differences of tiny gradients into
    # lr-sized steps, so long runs drift apart; step_runner_test checks the gradients exactly).
    short = ["--set", "train.epochs=1", "--set", "trunk.lr=0.0005"]
    r1 = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/fused1", "--set", "train.fuse=always", *short)
    r2 = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/unfused1", "--set", "train.fuse=never", *short)
    check(r1.returncode == 0 and r2.returncode == 0 and "fused 2 heads" in r1.stderr and "fused 2 heads" not in r2.stderr,
          "fused and unfused training finish")
    one, other = state(f"{work}/fused1/trunk.pt"), state(f"{work}/unfused1/trunk.pt")
    diff = max((one[k] - other[k]).abs().max().item() for k in moved)
    moved_by = max((one[k] - before[k]).abs().max().item() for k in moved)
    check(diff < 1e-5 < moved_by, f"fused and unfused heads train the same top (max difference {diff:.1e}; moved {moved_by:.1e})")

    # SIGKILL twice, resume: bitwise the uninterrupted run.
    out = f"{work}/cut"
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    r = killed_twice_then_resumed(canopy, config, out, "training with a top")
    check(r.returncode == 0, f"--resume finishes ({r.stderr[-300:]})")
    resumed = state(f"{out}/trunk.pt")
    check(all(torch.equal(resumed[k], tuned[k]) for k in tuned), "the resumed run's trunk is bitwise the uninterrupted one's")
    for name in ("a_linear", "b_linear", "c_mlp"):
        same = open(f"{out}/heads/{name}.safetensors", "rb").read() == open(f"{work}/out/heads/{name}.safetensors", "rb").read()
        check(same, f"{name}: resumed head bitwise identical")
    # A flipped bit in the top's checkpoint file is refused by the checksum state.json records.
    top_file = glob.glob(f"{out}/checkpoint/@top.*.pt")
    check(len(top_file) == 1, f"one @top checkpoint file ({top_file})")
    flip(top_file[0], os.path.getsize(top_file[0]) // 2, 8)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    check(r.returncode == 1 and os.path.basename(top_file[0]) in r.stderr and "does not match the checksum" in r.stderr,
          f"a flipped bit in the top's checkpoint file: --resume refuses it ({r.stderr.strip()[-200:]})")

    # A grid with the top: it weighs on the top as one task (each member's gradient to it 1 / n,
    # step_runner_test checks the arithmetic), so its members fuse only with each other; a run
    # killed twice and resumed ends bitwise the uninterrupted one.
    grid = ["--set", "train.validation_fraction=0.2", "--set", "task.a_linear.lr=0.01,0.005", "--set", "train.fuse=always",
            "--set", "train.workers=1"]
    r = run(canopy, "train", "--config", config, "--set", f"train.out_dir={work}/grid", *grid)
    fused = sorted(l.split("fused ", 1)[1] for l in r.stderr.splitlines() if l.startswith("[canopy] fused "))
    check(r.returncode == 0 and fused == ["2 heads: a_linear@lr=0.01 + a_linear@lr=0.005 (in=8, grid a_linear)",
                                          "2 heads: b_linear + c_mlp (in=8)"] and
          "grid 'a_linear' (2 members) trains the trunk's shared top as one task" in r.stderr,
          f"a grid's members fuse only with each other (fuse = always, one worker), and the log says how the grid weighs on the "
          f"top: {fused}")
    out = f"{work}/grid-cut"
    r = killed_twice_then_resumed(canopy, config, out, "a grid with a top", *grid)
    resumed, whole = state(f"{out}/trunk.pt"), state(f"{work}/grid/trunk.pt")
    check(r.returncode == 0 and all(torch.equal(resumed[k], whole[k]) for k in whole) and
          open(f"{out}/heads/a_linear.safetensors", "rb").read() == open(f"{work}/grid/heads/a_linear.safetensors", "rb").read(),
          "... and resumed, its top and the grid's winner are bitwise the uninterrupted run's")

    # The run's fusion decisions are its checkpoint's: resumed after the machine's calibration
    # was timed again (here its decision flipped by hand), the run keeps fusing as it began and
    # ends bitwise the uninterrupted run (a fused group's gradient reaches the top summed in
    # another order than its heads' one by one).
    env = dict(os.environ, CANOPY_FUSION_CALIBRATION=f"{work}/fusion.tsv")
    cmd = [canopy, "train", "--config", config, "--progress", "quiet", "--set", "train.workers=1"]
    r = subprocess.run(cmd + ["--set", f"train.out_dir={work}/pin-whole"], capture_output=True, text=True, env=env)
    lines = open(f"{work}/fusion.tsv").read().splitlines() if r.returncode == 0 else []
    check(len(lines) == 1 and "measured now" in r.stderr, f"the group's decision measured and recorded: {lines}")
    decided = len(lines) == 1 and "\tfused\t" in lines[0]
    out = f"{work}/pin-cut"
    rc, st = kill_when(cmd + ["--set", f"train.out_dir={out}"], f"{out}/checkpoint/state.json",
                       lambda s: (s["epoch"], s["step"]) >= (1, 0), env=env)
    groups = list(st.get("fusion", {}).values()) if st else []
    kept = groups[0]["fuse"] if len(groups) == 1 else None
    check(rc == -signal.SIGKILL and kept is decided,
          f"killed by SIGKILL, its checkpoint records the group's decision ({st and st.get('fusion')})")
    if lines:
        was, now = ("\tfused\t", "\talone\t") if decided else ("\talone\t", "\tfused\t")
        open(f"{work}/fusion.tsv", "w").write(lines[0].replace(was, now) + "\n")
    r = subprocess.run(cmd + ["--set", f"train.out_dir={out}", "--resume"], capture_output=True, text=True, env=env)
    resumed, whole = (state(f"{out}/trunk.pt"), state(f"{work}/pin-whole/trunk.pt")) if r.returncode == 0 else ({}, {})
    check(r.returncode == 0 and "(kept from the checkpoint)" in r.stderr,
          f"... resumed after the calibration file said otherwise, the log says the decision is the checkpoint's")
    check(whole and all(torch.equal(resumed[k], whole[k]) for k in whole) and
          all(open(f"{out}/heads/{n}.safetensors", "rb").read() == open(f"{work}/pin-whole/heads/{n}.safetensors", "rb").read()
              for n in ("a_linear", "b_linear", "c_mlp")),
          "... and keeps it: the top and every head bitwise the uninterrupted run's "
          f"(max difference in the top {max(((resumed[k] - whole[k]).abs().max().item() for k in resumed), default=-1):.1e})")

    check_warmup_and_clipping(canopy, work, config, trunk, tuned)
    export_best_with_top(canopy, work, config)

    # The cut is part of the fingerprint; a policy with no frozen prefix is refused.
    r = run(canopy, "train", "--config", config, "--set", "trunk.freeze=first:3", "--set", f"train.out_dir={work}/x")
    check(r.returncode != 0 and "freeze (first:2 -> first:3)" in r.stderr,
          f"a cache cut elsewhere is refused, naming the change: {r.stderr.strip()[-200:]}")
    r = run(canopy, "cache", "--config", config, "--set", "trunk.freeze=none", "--set", f"cache.path={work}/c2")
    check(r.returncode != 0 and "no frozen prefix" in r.stderr and "first:N" in r.stderr,
          f"freeze = none is refused, saying what to write: {r.stderr.strip()[-300:]}")
    r = run(canopy, "cache", "--config", config, "--set", "trunk.batchnorm_affine_trainable=true",
            "--set", f"cache.path={work}/c3")
    check(r.returncode != 0 and "batchnorm_affine_trainable" in r.stderr and "no frozen prefix" in r.stderr,
          f"BatchNorm weights made trainable inside the prefix are refused, naming the key: {r.stderr.strip()[-250:]}")
    r = run(canopy, "train", "--config", config, "--set", "trunk.lr_schedule=step")
    check(r.returncode != 0 and "trunk.lr_schedule" in r.stderr and "constant or cosine" in r.stderr,
          f"trunk.lr_schedule = step is refused: {r.stderr.strip()[-200:]}")
    # A policy that freezes every block leaves no top: pooled features, and predict runs the
    # config's trunk as with freeze = all.
    every = ["--set", "trunk.freeze=first:4", "--set", f"cache.path={work}/all4", "--set", f"train.out_dir={work}/all4-out"]
    r = run(canopy, "run", "--config", config, *every)
    ok = r.returncode == 0 and "row_parts" not in json.load(open(f"{work}/all4/manifest.json"))["meta"]
    r = run(canopy, "predict", "--config", config, *every, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", "20")
    check(ok and r.returncode == 0 and "fine-tuned" not in r.stderr and len(r.stdout.splitlines()) == 21,
          f"freeze = first:4 (every block) caches features and predicts with the trunk file ({r.stderr.strip()[-200:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
