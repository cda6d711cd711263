#!/usr/bin/env python3
"""Grids of heads, chosen on a validation split held out of the training data.

1. Winner chosen on validation, not on test. Real Fashion-MNIST images written as PNG files
   and listed in CSV manifests with a binary label `skew`: 80% of the training rows are 0,
   80% of the test rows are 1. A two-head grid over `class_weights` makes one head that
   always answers 0 and one that always answers 1. On the validation split (held out of
   train) the first wins; on the test split the second would. canopy must export the first.
2. No test row is used in selection: the same run with every test label changed (skew
   flipped, classes rotated) chooses the same winner with the same validation scores and
   exports bitwise the same weights.
3. A grid's best epochs survive SIGKILL: a grid with train.export = best, killed twice after
   checkpoints and resumed, exports bitwise the weights and card of an uninterrupted run.
4. Successive halving (train.grid_halving = 1, factor 2) over the same 4 members: after epoch 1
   the best 2 on the validation split go on, after epoch 2 the best 1; the stopped members are
   the lower-scored ones in metrics.csv; killed by SIGKILL between the cuts and resumed, it
   exports the uninterrupted halving run's card and weights.
5. class_weights = balanced: the card's weights are rows / (2 x the class's rows) of train.csv;
   the head's mean probability of the rare class on the training rows moves from about its
   share (0.2) to about 0.5; a grid member balances over the rows left by the validation split.

    test_grids.py --canopy build/runners/canopy
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys

from support import FMNIST, check, finish, kill_when, read_idx, start, tiny_conv_trunk, tiny_trunk_sections
from test_images import write_png

TRAIN, TEST = 300, 100


def run(cmd):
    r = subprocess.run(cmd + ["--progress", "quiet"], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def write_manifests(work, images, classes, flip_test):
    rng = random.Random(7)
    for split in ("train", "test"):
        n = len(images[split])
        ones = set(rng.sample(range(n), n // 5))  # 20% of the rows
        rows = ["path,class,skew"]
        for i in range(n):
            rel = os.path.join("png", split, f"{i:05d}.png")
            if not os.path.exists(os.path.join(work, rel)):
                os.makedirs(os.path.dirname(os.path.join(work, rel)), exist_ok=True)
                write_png(os.path.join(work, rel), images[split][i])
            skew = int(i in ones) if split == "train" else int(i not in ones)
            cls = int(classes[split][i])
            if split == "test" and flip_test:
                skew, cls = 1 - skew, (cls + 3) % 10
            rows.append(f"{rel},{cls},{skew}")
        with open(os.path.join(work, f"{split}{'_flipped' if flip_test and split == 'test' else ''}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")


def skew_config(work, trunk, name, test_csv):
    path = os.path.join(work, name + ".ini")
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, 0, 0, data=f"source = image-csv\ntrain = {work}/train.csv\n"
                                                      f"test = {work}/{test_csv}") + f"""[cache]
path = {work}/{name}/cache
batch_size = 50
shard_rows = 100
[train]
out_dir = {work}/{name}/out
batch_size = 32
epochs = 3
validation_fraction = 0.2
[task.skew]
head = linear
labels = skew
lr = 0.01
class_weights = 1,0.0001 | 0.0001,1
""")
    return path


def main():
    canopy, work, trunk = start("canopy-grids-", tiny_conv_trunk, "tiny.pt")
    images = {"train": read_idx(f"{FMNIST}/train-images-idx3-ubyte.gz")[:TRAIN],
              "test": read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:TEST]}
    classes = {"train": read_idx(f"{FMNIST}/train-labels-idx1-ubyte.gz")[:TRAIN],
               "test": read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:TEST]}
    write_manifests(work, images, classes, flip_test=False)
    write_manifests(work, images, classes, flip_test=True)

    # 1. The validation winner, not the test winner.
    cards, summaries = {}, {}
    for name, test_csv in (("plain", "test.csv"), ("flipped", "test_flipped.csv")):
        code, out, err = run([canopy, "run", "--config", skew_config(work, trunk, name, test_csv)])
        check(code == 0, f"{name}: canopy run with a 2-head grid" + ("" if code == 0 else ": " + err[-800:]))
        if code != 0:
            return finish()
        cards[name] = json.load(open(f"{work}/{name}/out/heads/skew.json"))
        summaries[name] = out
    card = cards["plain"]
    members = {m["name"]: m for m in card["grid"]["members"]}
    says_zero = "skew@class_weights=1,0.0001"
    says_one = "skew@class_weights=0.0001,1"
    check(set(members) == {says_zero, says_one}, f"the grid's members are named by their values: {sorted(members)}")
    check(members[says_zero]["validation_score"] > 0.7 > 0.3 > members[says_one]["validation_score"],
          f"on the validation split the always-0 head leads ({members[says_zero]['validation_score']:.3f} vs "
          f"{members[says_one]['validation_score']:.3f})")
    check(card["grid"]["winner"] == says_zero, f"the validation winner is exported: {card['grid']['winner']}")
    # Its lead over the runner-up on the validation split, both on the same 1000 resamples of its
    # rows: the scores' difference, an interval around it that a 0.5 lead on 60 rows keeps above 0.
    lead = card["grid"].get("lead", {})
    gap = members[says_zero]["validation_score"] - members[says_one]["validation_score"]
    lo, hi = lead.get("interval", [0, 0])
    check(lead.get("runner_up") == says_one and lead.get("metric") == "accuracy" and lead.get("resamples") == 1000
          and abs(lead.get("lead", 0) - gap) < 1e-12 and 0 < lo < gap < hi,
          f"the card gives the winner's lead over the runner-up, {gap:.3f}, with its interval [{lo:.3f}, {hi:.3f}]")
    check(f"grid 'skew': {says_zero} leads {says_one} by {100 * gap:+.2f} points of accuracy on the validation split "
          f"[{100 * lo:+.2f}, {100 * hi:+.2f}] (95%, 1000 resamples, paired)\n" in summaries["plain"],
          "... and the summary says it, without \"no difference\"")
    check(card["eval_accuracy"] < 0.3,
          f"its test accuracy is what it is ({card['eval_accuracy']:.3f}): the test split's best "
          f"(the always-1 head, about 0.8 there) was not chosen")
    held = card["validation"]["rows"]
    check(held == 60, f"validation rows held out: {held} (0.2 of 300, stratified by class)")
    check(sorted(os.listdir(f"{work}/plain/out/heads")) == ["skew.json", "skew.safetensors"],
          "only the winner is exported, under the grid's name")
    # canopy export writes that winner, under the grid's name, into the model file.
    code, out, err = run([canopy, "export", "--config", f"{work}/plain.ini", "--output", f"{work}/model.pt"])
    check(code == 0 and "heads   skew\n" in err, f"canopy export of a grid: its winner as 'skew' ({err[-200:]})")
    if code == 0:
        import h5py
        import torch
        from safetensors.torch import load_file
        with h5py.File(f"{work}/plain/cache/cache.h5", "r") as h5:
            features = torch.from_numpy(h5["test/features"][...])
        w = load_file(f"{work}/plain/out/heads/skew.safetensors")
        with torch.no_grad():
            got = torch.jit.load(f"{work}/model.pt").heads(features)["skew"]
        check(torch.allclose(got, (features @ w["linear.weight"].T + w["linear.bias"]).softmax(1), atol=1e-6),
              "the model file's skew head is the exported winner's weights")

    with open(f"{work}/plain/out/metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    check({r["task"] for r in rows} == set(members) and all(len(r) == 11 and None not in r for r in rows),
          f"metrics.csv reads back with Python's csv module: a row per member and epoch ({len(rows)} rows)")

    # 2. Test labels play no part in the choice.
    flipped = cards["flipped"]
    same = (flipped["grid"]["winner"] == card["grid"]["winner"] and
            [m["validation_score"] for m in flipped["grid"]["members"]] ==
            [m["validation_score"] for m in card["grid"]["members"]] and
            open(f"{work}/flipped/out/heads/skew.safetensors", "rb").read() ==
            open(f"{work}/plain/out/heads/skew.safetensors", "rb").read())
    check(same, "with every test label changed: the same winner, validation scores and weights, bitwise")
    check(abs(flipped["eval_accuracy"] - (1 - card["eval_accuracy"])) < 1e-9,
          f"... and only the test accuracy moves ({card['eval_accuracy']:.3f} -> {flipped['eval_accuracy']:.3f})")

    # 5. class_weights = balanced: from the training rows' labels (80% of them 0), said in the log and
    # the card. The skew label is random, so a head can only learn its prior: with equal weights
    # the rare class's probability on the training rows is about its share (0.2); balanced, both
    # classes weigh the same in the loss and it is about 0.5.
    import h5py
    import torch
    from safetensors.torch import load_file
    plain_ini = f"{work}/plain.ini"
    with open(f"{work}/train.csv", newline="") as f:
        skews = [int(r["skew"]) for r in csv.DictReader(f)]
    want = [len(skews) / (2 * skews.count(k)) for k in (0, 1)]
    with h5py.File(f"{work}/plain/cache/cache.h5", "r") as h5:
        train_features = torch.from_numpy(h5["train/features"][...])
    prior = {}
    for weights in ("balanced", "1,1"):
        code, _, err = run([canopy, "train", "--config", plain_ini, "--set", f"task.skew.class_weights={weights}",
                            "--set", "train.validation_fraction=0", "--set", f"train.out_dir={work}/weights-{weights}"])
        check(code == 0, f"class_weights = {weights}: trains {err[-300:]}")
        if code != 0:
            return finish()
        w = load_file(f"{work}/weights-{weights}/heads/skew.safetensors")
        prior[weights] = float((train_features @ w["linear.weight"].T + w["linear.bias"]).softmax(1)[:, 1].mean())
        if weights == "balanced":
            c = json.load(open(f"{work}/weights-{weights}/heads/skew.json"))
            check(c.get("class_weights_balanced") is True and c.get("class_weights") == want,
                  f"the card records the balanced weights, rows / (2 x the class's rows) = {want}: {c.get('class_weights')}")
            check(f"class_weights = balanced over 300 training rows: 0 {want[0]:.3g}, 1 {want[1]:.3g}" in err,
                  "the log says them")
    check(abs(prior["1,1"] - 0.2) < 0.06 and abs(prior["balanced"] - 0.5) < 0.06,
          f"the rare class's mean probability on the training rows: {prior['1,1']:.3f} with equal weights, "
          f"{prior['balanced']:.3f} balanced")
    code, _, err = run([canopy, "train", "--config", plain_ini, "--set", "task.skew.class_weights=balanced | 1,1",
                        "--set", f"train.out_dir={work}/weights-grid"])
    check(code == 0 and "task 'skew@class_weights=balanced': class_weights = balanced over 240 training rows" in err,
          f"a grid member balances over the rows it trains on (the validation split held out) {err[-300:]}")

    # 3. Best epochs across SIGKILL and --resume.
    config = os.path.join(work, "resume.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, 3000, 300, pooling="flatten") + f"""[cache]
path = {work}/resume/cache
[train]
batch_size = 16
epochs = 4
checkpoint_steps = 25
validation_fraction = 0.1
export = best
[task.probe]
head = linear | mlp
head.dropout = 0.3
optimizer = sgd
lr = 0.003, 0.03
""")
    code, _, err = run([canopy, "cache", "--config", config])
    check(code == 0, f"cache for the resume check {err[-300:]}")
    code, _, err = run([canopy, "train", "--config", config, "--set", f"train.out_dir={work}/resume/ref"])
    check(code == 0, f"uninterrupted grid run {err[-300:]}")
    out = f"{work}/resume/cut"
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    kills = []
    # The second kill comes after the linear members' best epoch (3 of 4): their best weights
    # must come back from the checkpoint.
    for target in ((1, 40), (3, 90)):
        returncode, st = kill_when(cmd + (["--resume"] if kills else []), os.path.join(out, "checkpoint", "state.json"),
                                   lambda st: (st["epoch"], st["step"]) >= target)
        seen = (st["epoch"], st["step"]) if st else None
        check(returncode == -signal.SIGKILL and seen is not None, f"grid training killed by SIGKILL after checkpoint {seen}")
        kills.append(seen)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    check(r.returncode == 0, f"--resume finishes {r.stderr[-300:]}")
    ref_card = json.load(open(f"{work}/resume/ref/heads/probe.json"))
    cut_card = json.load(open(f"{out}/heads/probe.json"))
    for c in (ref_card, cut_card):
        for m in c["grid"]["members"]:
            del m["seconds"]  # time spent, the one field that differs between runs
        del c["card_crc32c"]  # over the seconds too
    check(ref_card == cut_card, f"the grid's card (winner {cut_card['grid']['winner']}, epoch "
          f"{cut_card['exported_epoch']} of 4, every member's score) equals the uninterrupted run's")
    check(open(f"{work}/resume/ref/heads/probe.safetensors", "rb").read() ==
          open(f"{out}/heads/probe.safetensors", "rb").read(), "the winner's weights are bitwise the uninterrupted run's")
    epochs = [m["exported_epoch"] for m in cut_card["grid"]["members"]]
    print(f"     exported epochs of the 4 members: {epochs}")

    # 4. Successive halving, across SIGKILL too.
    halving = ["--set", "train.grid_halving=1", "--set", "train.grid_halving_factor=2"]
    code, out_text, err = run([canopy, "train", "--config", config, "--set", f"train.out_dir={work}/halving/ref"] + halving)
    check(code == 0, f"uninterrupted grid run with successive halving {err[-300:]}")
    check("grid 'probe': 4 heads, 4 finished (3 of them cut by successive halving);" in out_text,
          "the summary counts the members halving cut")
    check("grid 'probe': successive halving after epochs 1, 2 (4 -> 2 -> 1 members training" in err,
          "the cuts to come are said at the start")
    ref_card = json.load(open(f"{work}/halving/ref/heads/probe.json"))
    trained = {m["name"]: m["epochs"] for m in ref_card["grid"]["members"]}
    check(sorted(trained.values()) == [1, 1, 2, 4], f"epochs trained per member: {trained} (cuts after 1 and 2)")
    with open(f"{work}/halving/ref/metrics.csv", newline="") as f:
        scores = {(int(r["epoch"]), r["task"]): float(r["eval_accuracy"]) for r in csv.DictReader(f)}

    def best_until(name, epoch):
        return max(scores[(e, name)] for e in range(1, epoch + 1))

    ranked_right = all(best_until(a, cut) >= best_until(b, cut)
                       for cut in (1, 2) for a in trained if trained[a] > cut
                       for b in trained if trained[b] == cut)
    check(ranked_right, "at each cut the members that went on scored at least as well on validation as those stopped")
    notes = {m["name"]: m.get("note", "") for m in ref_card["grid"]["members"]}
    check(all(notes[n].startswith(f"stopped by successive halving at epoch {e} (accuracy ") == (e < 4)
              for n, e in trained.items()), f"the card says which members halving stopped, and when: {notes}")
    winner = max(ref_card["grid"]["members"], key=lambda m: m["validation_score"])
    check(ref_card["grid"]["winner"] == winner["name"] and trained[winner["name"]] == 4,
          f"the winner is the last member training: {ref_card['grid']['winner']}")
    out = f"{work}/halving/cut"
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"] + halving
    returncode, st = kill_when(cmd, os.path.join(out, "checkpoint", "state.json"),
                               lambda st: (st["epoch"], st["step"]) >= (1, 40))
    seen = (st["epoch"], st["step"]) if st else None
    check(returncode == -signal.SIGKILL and seen is not None, f"halving run killed by SIGKILL after checkpoint {seen}")
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    check(r.returncode == 0, f"--resume finishes {r.stderr[-300:]}")
    cut_card = json.load(open(f"{out}/heads/probe.json"))
    for c in (ref_card, cut_card):
        for m in c["grid"]["members"]:
            del m["seconds"]
        del c["card_crc32c"]
    check(ref_card == cut_card, "the halving run's card, resumed between the cuts, equals the uninterrupted run's")
    check(open(f"{work}/halving/ref/heads/probe.safetensors", "rb").read() ==
          open(f"{out}/heads/probe.safetensors", "rb").read(), "... and so do the winner's weights, bitwise")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
