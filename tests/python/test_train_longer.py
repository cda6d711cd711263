#!/usr/bin/env python3
"""Training a finished run longer: `canopy train --resume --set train.epochs=N` goes on from
the checkpoint of a shorter run and ends bitwise as a run of N epochs from the start (heads,
cards, metrics.jsonl), with heads stopped early staying stopped, a head with epochs of its own
staying done, a step schedule going on, and a grid's halving cut at the shorter run's last epoch
made when it goes on; killed by SIGKILL as it goes on, the same command finishes it, the same.
Refused, with the reason and nothing in the run changed: fewer epochs than
were trained, a cosine schedule (the epochs done would have learnt at other rates), and a change
to any other key but train.out_dir (a copy of the run resumes in its new folder). `canopy
inspect` on a finished run says the command.

    test_train_longer.py --canopy build/runners/canopy
"""
import hashlib
import json
import os
import signal
import subprocess
import sys

from support import check, finish, kill_when, start, tiny_conv_trunk, tiny_trunk_sections


def run(canopy, config, out, *sets, resume=False):
    cmd = [canopy, "train", "--config", config, "--set", f"train.out_dir={out}", "--progress", "quiet"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True)


def files_of(out):
    """Every file of a run's heads/ and checkpoint/, with its SHA-256."""
    got = {}
    for sub in ("heads", "checkpoint"):
        for name in sorted(os.listdir(f"{out}/{sub}")):
            got[f"{sub}/{name}"] = hashlib.sha256(open(f"{out}/{sub}/{name}", "rb").read()).hexdigest()
    return got


def card(path):
    """A head's card less the seconds each grid member took (and the checksum over them)."""
    c = json.load(open(path))
    c.pop("card_crc32c")
    for m in c.get("grid", {}).get("members", []):
        m.pop("seconds")
    return c


def metrics(out):
    return [(l["epoch"], l["task"], l.get("eval_accuracy"), l["train_loss"])
            for l in map(json.loads, open(f"{out}/metrics.jsonl"))]


def main():
    canopy, work, trunk = start("canopy-train-longer-", tiny_conv_trunk, "tiny.pt")
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, 1200, 300, pooling="flatten") + f"""[cache]
path = {work}/cache
[train]
batch_size = 32
epochs = 5
checkpoint_steps = 5
validation_fraction = 0.1
grid_halving = 1
grid_halving_factor = 2
[task.a_linear]
head = linear
optimizer = sgd
lr = 0.01
[task.b_step]
head = mlp
head.hidden = 32
head.dropout = 0.2
schedule = step
step_size = 2
gamma = 0.5
[task.c_patient]
head = linear
lr = 0.05
early_stop_patience = 1
[task.d_two]
head = linear
epochs = 2
[task.probe]
head = linear
lr = 0.03 | 0.01 | 0.003 | 0.001
""")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"cache built {r.stderr[-300:]}")
    names = ["a_linear", "b_step", "c_patient", "d_two", "probe"]

    r = run(canopy, config, f"{work}/five")
    check(r.returncode == 0, f"a run of 5 epochs from the start {r.stderr[-300:]}")
    r = run(canopy, config, f"{work}/two", "train.epochs=2")
    check(r.returncode == 0, f"a run of 2 epochs {r.stderr[-300:]}")
    two = json.load(open(f"{work}/two/heads/probe.json"))
    r = subprocess.run([canopy, "inspect", f"{work}/two"], capture_output=True, text=True)
    said = f"`canopy train --config {work}/two/config.ini --resume --set train.epochs=N` (or task.NAME.epochs)"
    check(r.returncode == 0 and said in r.stdout, f"canopy inspect on the finished run says how to train it longer: "
          f"{[l for l in r.stdout.splitlines() if 'status' in l]}")

    seconds = lambda: json.load(open(f"{work}/two/checkpoint/state.json")).get("train_seconds", 0)
    before = seconds()
    r = run(canopy, f"{work}/two/config.ini", f"{work}/two", "train.epochs=5", resume=True)
    took = float(r.stdout.split(", train ")[1].split("s")[0]) if ", train " in r.stdout else -1
    said = r.stdout.split("s in all, with the training before it resumed)")[0].rsplit("(", 1)[-1]
    in_all = float(said) if said.replace(".", "", 1).isdigit() else -1
    check(r.returncode == 0 and before > 0 and abs(seconds() - (before + took)) < 0.05 + 0.1 * took and
          abs(in_all - seconds()) < 0.05 + 0.1 * took,
          f"the checkpoint's training time goes on from the 2-epoch run's {before:.3f} s: {seconds():.3f} s "
          f"after {took:.3f} s more, and the summary says it ({in_all} s in all): "
          f"{[l for l in r.stdout.splitlines() if ', train ' in l]}")
    check(r.returncode == 0 and "with other epochs, train.epochs (2 -> 5)" in r.stderr,
          f"--resume --set train.epochs=5 goes on from the 2-epoch run and says so "
          f"({[l for l in r.stderr.splitlines() if 'resuming' in l] or r.stderr[-400:]})")
    going_on = [l for l in r.stderr.splitlines() if "train on:" in l]
    check(len(going_on) == 1 and "d_two" not in going_on[0] and "a_linear" in going_on[0],
          f"... the heads done at its end train on, the one with 2 epochs of its own stays done: {going_on}")
    cut = [l for l in r.stderr.splitlines() if "successive halving after epoch 2:" in l]
    check(len(cut) == 1 and "1 of 2 members training go on" in cut[0],
          f"... the grid's halving cut after epoch 2, which the 2-epoch run ended at, is made now: {cut}")
    for name in names:
        a = open(f"{work}/five/heads/{name}.safetensors", "rb").read()
        b = open(f"{work}/two/heads/{name}.safetensors", "rb").read()
        ca, cb = card(f"{work}/five/heads/{name}.json"), card(f"{work}/two/heads/{name}.json")
        check(a == b and ca == cb, f"{name}: weights and card bitwise those of the 5-epoch run "
              f"(exported epoch {cb.get('exported_epoch')} of {cb.get('epochs')})")
    check(metrics(f"{work}/five") == metrics(f"{work}/two"),
          f"metrics.jsonl holds each epoch once, as the 5-epoch run's ({len(metrics(f'{work}/two'))} lines)")
    probe = card(f"{work}/two/heads/probe.json")
    stopped = [m for m in probe["grid"]["members"] if "successive halving" in (m.get("note") or "")]
    check(two["epochs"] == 2 and len(stopped) == 3, f"the grid went from 2 epochs to its halving's 3 cuts "
          f"({len(stopped)} members stopped by halving)")

    # SIGKILL while it goes on; the same command again finishes it, as the 5-epoch run.
    r = run(canopy, config, f"{work}/cut", "train.epochs=2")
    go_on = [canopy, "train", "--config", f"{work}/cut/config.ini", "--set", "train.epochs=5", "--resume",
             "--progress", "quiet"]
    rc, st = kill_when(go_on, f"{work}/cut/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= (3, 10))
    check(r.returncode == 0 and rc == -signal.SIGKILL and st is not None,
          f"the run going on from 2 to 5 epochs killed by SIGKILL at {st and (st['epoch'], st['step'])}")
    r = subprocess.run(go_on, capture_output=True, text=True)
    check(r.returncode == 0 and "resuming from the checkpoint" in r.stderr and "with other epochs" not in r.stderr and
          all(open(f"{work}/five/heads/{n}.safetensors", "rb").read() ==
              open(f"{work}/cut/heads/{n}.safetensors", "rb").read() for n in names),
          f"... the same command again resumes it (its checkpoint has the new epochs) and every head is the "
          f"5-epoch run's ({r.stderr.strip()[-200:]})")

    # Refusals: the run stays as it was, every file unchanged.
    before = files_of(f"{work}/two")
    r = run(canopy, f"{work}/two/config.ini", f"{work}/two", "train.epochs=3", resume=True)
    check(r.returncode == 2 and "task 'a_linear' has trained 5 epochs of its 5" in r.stderr and
          "train.epochs (5 -> 3)" in r.stderr and "start over without --resume" in r.stderr,
          f"fewer epochs than were trained: refused, exit 2 ({r.stderr.strip()[-300:]})")
    r = run(canopy, f"{work}/two/config.ini", f"{work}/two", "train.epochs=7", "task.a_linear.lr=0.02", resume=True)
    check(r.returncode == 2 and "task.a_linear.lr (0.01 -> 0.02)" in r.stderr and "train.epochs (" not in r.stderr
          and "only train.epochs, task.NAME.epochs and train.out_dir may change" in r.stderr,
          f"another key changed beside the epochs: refused, naming it ({r.stderr.strip()[-300:]})")
    check(files_of(f"{work}/two") == before, "... and the run's heads and checkpoint are unchanged, byte for byte")
    # The run's folder copied elsewhere resumes there (its config.ini still names the old one).
    import shutil
    shutil.copytree(f"{work}/two", f"{work}/copied")
    r = run(canopy, f"{work}/copied/config.ini", f"{work}/copied", resume=True)
    check(r.returncode == 0 and f"of the run copied or moved from '{work}/two'" in r.stderr and
          all(open(f"{work}/five/heads/{n}.safetensors", "rb").read() ==
              open(f"{work}/copied/heads/{n}.safetensors", "rb").read() for n in names) and
          files_of(f"{work}/two") == before,
          f"a copy of the run resumes in its new folder, to the same heads, the original untouched "
          f"({[l for l in r.stderr.splitlines() if 'resuming' in l] or r.stderr[-300:]})")

    r = run(canopy, config, f"{work}/cos", "train.epochs=3", "task.b_step.schedule=cosine")
    check(r.returncode == 0, f"a 3-epoch run with a cosine schedule {r.stderr[-300:]}")
    before = files_of(f"{work}/cos")
    r = run(canopy, f"{work}/cos/config.ini", f"{work}/cos", "train.epochs=6", resume=True)
    check(r.returncode == 2 and "task 'b_step' learns on schedule = cosine" in r.stderr and
          "epoch 2, done, learnt at 0.7500 x the rate, 0.9330 x in a run of 6; --set task.b_step.epochs=3 keeps its 3 "
          "and lets the others go on" in r.stderr,
          f"a cosine schedule over more epochs: refused, saying the rate an epoch done had ({r.stderr.strip()[-300:]})")
    r = run(canopy, f"{work}/cos/config.ini", f"{work}/cos", "train.epochs=6", "task.b_step.epochs=3", resume=True)
    check(r.returncode == 0 and files_of(f"{work}/cos")["heads/b_step.safetensors"] == before["heads/b_step.safetensors"],
          f"... while the cosine head keeps its 3 epochs the others go on, and it is exported unchanged "
          f"({r.stderr.strip()[-200:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
