#!/usr/bin/env python3
"""`canopy sweep`: the trunk frozen whole and its top trained, two seeds each, then compared.
Checks the plan (--dry-run), that the runs reading the same features share one cache and every
run's config is its setting's, that a SIGTERM to the sweep stops the run in progress at its
checkpoint (the sweep's exit 143; the run's 138, the stop passed on as SIGUSR1, which mpirun and
srun pass to their ranks) and the same command goes on from there (runs done kept, the stopped one
resumed: its heads and top bitwise those of a run never stopped), that the comparison is
`canopy compare`'s of the same runs (on the eval split without --input), that more epochs train every run on, and that bad uses and
an out_dir holding another configuration's run are refused with exit 2, nothing touched.

    test_sweep.py --canopy build/runners/canopy
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from support import FMNIST, check, finish, kill_when, slowdown, start, tiny_block_trunk, tiny_trunk_sections

TRAIN, TEST, ROWS = 1200, 300, 300
IMAGES = f"{FMNIST}/t10k-images-idx3-ubyte.gz"


def main():
    canopy, work, trunk = start("canopy-sweep-", tiny_block_trunk, "blocks.pt")
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, TRAIN, TEST, pooling="flatten") + f"""freeze = all
lr = 0.01
[cache]
path = {work}/unused-cache
[train]
out_dir = {work}/unused
batch_size = 32
epochs = 4
[task.cls]
head = linear
lr = 0.01
[task.ink]
kind = regression
labels = ink
head = linear
lr = 0.01
""")
    out = f"{work}/sweep"
    sweep = [canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--seeds", "0,1",
             "--out", out, "--progress", "quiet"]
    names = ["freeze-all-s0", "freeze-all-s1", "freeze-first_2-s0", "freeze-first_2-s1"]

    r = subprocess.run(sweep + ["--dry-run"], capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    check(r.returncode == 0 and "2 settings x 2 seeds, 4 runs" in r.stdout and "2 caches" in r.stdout and
          [row[-1] for row in rows] == ["train"] * 4 and [os.path.basename(row[4]) for row in rows] == names and
          not os.path.exists(out), f"--dry-run plans 4 runs over 2 caches and runs nothing:\n{r.stdout}")

    # SIGTERM to the sweep while the third run trains: it stops at its checkpoint.
    third = f"{out}/{names[2]}"
    errors = []
    rc, st = kill_when(sweep, f"{third}/checkpoint/state.json", lambda s: (s["epoch"], s["step"]) >= (0, 10),
                       sig=signal.SIGTERM, stderr=errors)
    record = json.load(open(f"{out}/sweep.json"))
    codes = [x["exit_code"] for x in record["runs"]]
    check(rc == 143 and st is not None and codes == [0, 0, 128 + signal.SIGUSR1, -1] and
          "stopped by SIGTERM" in errors[0] and "run the same command to go on" in errors[0],
          f"SIGTERM stops the sweep (exit {rc}, runs' exits {codes}): {errors[0].strip()[-300:]}")
    r = subprocess.run([canopy, "inspect", third, "--json"], capture_output=True, text=True)
    check(r.returncode == 0 and json.loads(r.stdout)["status"] == "stopped",
          "the run it stopped is kept at its checkpoint, stopped before its end")
    r = subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True)
    where = json.loads(r.stdout) if r.returncode == 0 else {}
    check(where.get("counts") == {"finished": 2, "stopped": 1, "not_started": 1} and
          [x["status"] for x in where.get("runs", [])] == ["finished", "finished", "stopped", "not_started"] and
          where.get("command", "").startswith(f"canopy sweep --config {config} --vary trunk.freeze=all,first:2 "
                                               "--seeds 0,1"), f"canopy inspect of the sweep says where it stands: "
          f"{where.get('counts')} {where.get('command')} {r.stderr.strip()[-200:]}")
    r = subprocess.run([canopy, "inspect", out], capture_output=True, text=True)
    check(r.returncode == 0 and "go on       canopy sweep --config" in r.stdout and "4 (2 finished" in r.stdout,
          f"its text report has the command that goes on:\n{r.stdout}")

    # The same command goes on: the finished runs kept, the stopped one resumed, the last trained.
    r = went_on = subprocess.run(sweep + ["--input", IMAGES, "--limit", str(ROWS)], capture_output=True, text=True)
    table = {os.path.basename(line.split()[4]): line for line in r.stdout.splitlines() if line.startswith("trunk.")}
    check(r.returncode == 0 and [table.get(n, "").split()[5] if n in table else "" for n in names] ==
          ["done", "done", "resumed", "trained"],
          f"run again, the sweep goes on: {r.stderr.strip()[-400:]}\n{r.stdout[:900]}")
    caches = sorted(os.listdir(f"{out}/caches"))
    check(len(caches) == 2, f"the frozen runs share one cache and the tuned runs another: {caches}")
    for name in names:
        with open(f"{out}/{name}/config.ini") as f:
            text = f.read()
        freeze = "first:2" if "first_2" in name else "all"
        check(f"freeze = {freeze}\n" in text and f"seed = {name[-1]}\n" in text and
              f"path = {out}/caches/" in text, f"{name}'s config is its setting's and seed's, its cache the sweep's")

    # The resumed run's heads and top are bitwise a run's that was never stopped.
    whole = f"{work}/whole"
    overrides = ["trunk.freeze=first:2", "train.seed=0", f"train.out_dir={whole}",
                 f"cache.path={json.load(open(f'{out}/sweep.json'))['runs'][2]['cache']}"]
    r = subprocess.run([canopy, "run", "--config", config, "--progress", "quiet"] +
                       [a for o in overrides for a in ("--set", o)], capture_output=True, text=True)
    same = r.returncode == 0 and all(
        json.load(open(f"{third}/heads/{t}.json"))[k] == json.load(open(f"{whole}/heads/{t}.json"))[k]
        for t in ("cls", "ink") for k in ("weights_sha256", "trunk_sha256"))
    check(same, "the stopped and resumed run's heads and top equal an uninterrupted run's, bitwise")

    # The comparison is canopy compare's of the same arms.
    got = json.load(open(f"{out}/compare.json"))
    arms = [",".join(f"{out}/{n}" for n in names[:2]), ",".join(f"{out}/{n}" for n in names[2:])]
    r = subprocess.run([canopy, "compare", *arms, "--input", IMAGES, "--limit", str(ROWS), "--json", "--progress",
                        "quiet"], capture_output=True, text=True)
    want = json.loads(r.stdout) if r.returncode == 0 else {}
    check(got.get("paired_by_seed") is True and got.get("tasks") == want.get("tasks") and
          got.get("against_A") == want.get("against_A") and [x["out_dir"] for x in got.get("runs", [])] ==
          [f"{out}/{n}" for n in names], "the sweep's comparison is canopy compare's of its two arms, paired by seed")
    check("B against A: better on" in went_on.stdout, "the sweep prints the comparison and its tally")
    check("done in" in went_on.stderr and "for the 1 run left" in went_on.stderr,
          "each run's end says how long the runs left will take")
    r = subprocess.run([canopy, "inspect", out], capture_output=True, text=True)
    check(r.returncode == 0 and "B (trunk.freeze = first:2) against A (trunk.freeze = all): better on" in r.stdout
          and "  cost        training time per run, mean: trunk.freeze = all: " in r.stdout and
          "              caches: trunk.freeze = all: built in " in r.stdout
          and "go on" not in r.stdout,
          f"canopy inspect of the finished sweep has the comparison's tally:\n{r.stdout}")
    # What to choose: per task the cheapest setting no other is shown better than, by the mean
    # training time per run in sweep.json, and the cheapest unbeaten on every task.
    record = json.load(open(f"{out}/sweep.json"))
    mean = {}
    for x in record["runs"]:
        mean.setdefault(x["setting"], []).append(x["train_seconds"])
    cost = {chr(65 + i): sum(mean[s]) / len(mean[s]) for i, s in enumerate(record["settings"])}
    unbeaten = {t["task"]: t["unbeaten"] for t in got["tasks"]}
    cheapest = lambda arms: min(arms, key=lambda a: cost[a]) if arms else None
    everywhere = cheapest([a for a in "AB" if all(a in u for u in unbeaten.values())])
    shown = json.loads(subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True).stdout)
    choice = shown.get("choice") or {}
    check(choice.get("per_task") == {t: cheapest(u) for t, u in unbeaten.items()} and
          choice.get("every_task") == everywhere,
          f"the choice per task and on every task, from compare.json and sweep.json: {choice} {unbeaten} {cost}")
    check("choosing by cost (training time per run)" in went_on.stdout and
          "  choice      choosing by cost" in r.stdout and
          (f"the cheapest setting unbeaten on every task: {everywhere} (" in r.stdout if everywhere else
           "no setting is unbeaten on every task" in r.stdout),
          f"the sweep and canopy inspect say what to choose:\n{went_on.stdout[-700:]}\n{r.stdout[-700:]}")

    # More epochs: every run trains on from its checkpoint.
    more = sweep + ["--set", "train.epochs=5"]
    r = subprocess.run(more + ["--dry-run"], capture_output=True, text=True)
    check(r.returncode == 0 and r.stdout.count("train on (finished, trains on: train.epochs (4 -> 5))") == 4,
          f"--set train.epochs=5 plans every run to train on:\n{r.stdout}")
    r = subprocess.run(more, capture_output=True, text=True)
    epochs = [json.load(open(f"{out}/{n}/heads/cls.json"))["epochs"] for n in names]
    trained_on = [line for line in r.stdout.splitlines() if line.startswith("trunk.") and "  trained on  " in line]
    check(r.returncode == 0 and len(trained_on) == 4 and epochs == [5] * 4,
          f"every run trained on to 5 epochs: {epochs} {r.stderr.strip()[-300:]}")
    timed = json.load(open(f"{out}/sweep.json"))["runs"]
    states = [json.load(open(f"{x['out_dir']}/checkpoint/state.json")) for x in timed]
    recorded = [st["train_seconds"] for st in states]
    before = {x["out_dir"]: x["train_seconds"] for x in record["runs"]}
    check([x["train_seconds"] for x in timed] == recorded and all(x["timed_by"] == "checkpoint" for x in timed) and
          all(x["train_seconds"] > before[x["out_dir"]] > 0 and x["seconds"] > 0 for x in timed) and
          [x["machines"] for x in timed] == [st["machines"] for st in states] and len(states[0]["machines"]) == 1 and
          "training time per run, mean" in r.stdout and "trunk.freeze = first:2: " in r.stdout,
          f"each run's cost is the training time its checkpoint records, the epochs before included (not its "
          f"process's), each setting's mean said: {timed} {recorded}")

    fewer = subprocess.run(sweep + ["--set", "train.epochs=3", "--dry-run"], capture_output=True, text=True)
    check(fewer.returncode == 2 and "cannot go on to this configuration: train.epochs (5 -> 3): task 'cls' has "
          "trained" in fewer.stderr, f"fewer epochs than the runs trained, which --resume refuses: refused before "
          f"any run ({fewer.stderr.strip()[-300:]})")

    # SIGTERM while the runs are compared (all done before): the comparison stops, nothing written.
    compared_at = os.path.getmtime(f"{out}/compare.json")
    errors = []
    rc, seen = kill_when(more + ["--input", IMAGES], f"{out}/sweep.json",
                         lambda doc: all(x["action"] == "done before" for x in doc["runs"]), sig=signal.SIGTERM,
                         stderr=errors)
    check(rc == 143 and seen is not None and "run the same command to compare them" in errors[0] and
          os.path.getmtime(f"{out}/compare.json") == compared_at,
          f"SIGTERM during the comparison stops it, exit {rc}: {errors[0].strip()[-200:]}")

    on_eval = json.load(open(f"{out}/compare.json"))
    check(on_eval.get("rows") == TEST and on_eval.get("eval_split") == "test" and "B against A:" in r.stdout,
          "without --input the settings are compared on the runs' eval split")

    # Refused, exit 2, nothing touched.
    before = {n: os.path.getmtime(f"{out}/{n}/heads/cls.json") for n in names}
    for args, said in ((["--set", "train.epochs=5", "--set", "task.cls.lr=0.5"], "task.cls.lr (0.01 -> 0.5)"),
                       (["--set", "cache.path=x"], "sets train.out_dir and cache.path itself"),
                       (["--vary", "train.out_dir=a,b"], "sets train.out_dir and cache.path itself"),
                       (["--vary", "trunk.freeze=all"], "is given twice"),
                       (["--labels", IMAGES], "without --input"),
                       (["--seeds", "0,0"], "names a seed twice")):
        base = sweep if "--seeds" not in args else [a for a in sweep if a not in ("--seeds", "0,1")]
        r = subprocess.run(base + args, capture_output=True, text=True)
        check(r.returncode == 2 and said in r.stderr, f"{' '.join(args)}: exit 2 ({r.stderr.strip()[-250:]})")
    r = subprocess.run([canopy, "sweep", "--config", config, "--set", "task.cls.labels=nope", "--vary",
                        "trunk.freeze=all,first:2", "--out", f"{work}/typo", "--progress", "quiet"],
                       capture_output=True, text=True)
    built = [c for c in os.listdir(f"{work}/typo/caches") if os.path.exists(f"{work}/typo/caches/{c}/manifest.json")] \
        if os.path.isdir(f"{work}/typo/caches") else []
    check(r.returncode == 2 and "task 'cls': labels = 'nope' but the data has label sources" in r.stderr and
          not built and "run 1 of 2" in r.stderr and not os.path.exists(f"{work}/typo/freeze-all-s0/heads"),
          f"a task's label the data lacks: the first cache's build refuses it before its trunk pass, nothing "
          f"cached or trained ({r.stderr.strip()[-400:]})")
    r = subprocess.run([a if a != "quiet" else "bogus" for a in sweep], capture_output=True, text=True)
    check(r.returncode == 2 and "--progress: expected" in r.stderr and "[canopy] trunk:" not in r.stderr,
          f"a bad --progress is refused before the plan loads any trunk ({r.stderr.strip()[-250:]})")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "task.cls.lr=0.01,0.003", "--out",
                        f"{work}/lr", "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 0 and "a grid in the config (task.cls.lr = 0.01, 0.003)" in r.stderr and
          "1 cache" in r.stdout, f"a sweep of a head's key says a grid does it in one run: {r.stderr.strip()}")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--out",
                        f"{out}/{names[0]}"], capture_output=True, text=True)
    check(r.returncode == 2 and "is a training run's out_dir" in r.stderr and
          not os.path.exists(f"{out}/{names[0]}/sweep.json"), f"--out a run's out_dir: exit 2 ({r.stderr.strip()})")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,none", "--out",
                        f"{work}/none", "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 2 and "setting 'trunk.freeze = none'" in r.stderr and not os.path.exists(f"{work}/none"),
          f"a setting no run could cache (the trunk loaded to check it): exit 2 before anything runs "
          f"({r.stderr.strip()[-250:]})")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "train.weighting=sum,pcgrad", "--out",
                        f"{work}/weighting"], capture_output=True, text=True)
    check(r.returncode == 2 and "setting 'train.weighting = pcgrad'" in r.stderr and "frozen whole" in r.stderr and
          not any(d.startswith("weighting-") for d in os.listdir(f"{work}/weighting")), f"a setting its run would refuse only "
          f"once training (a weighting over a trunk frozen whole): exit 2 before anything runs ({r.stderr.strip()[-250:]})")
    r = subprocess.run([canopy, "sweep", "--config", config, "--set", "trunk.freeze=first:2", "--set",
                        "trunk.schedule=autofreeze", "--vary", "trunk.min_trainable=1,9", "--out", f"{work}/af",
                        "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 2 and "setting 'trunk.min_trainable = 9'" in r.stderr and "can freeze nothing" in r.stderr,
          f"an autofreeze its top cannot take: exit 2 before anything runs ({r.stderr.strip()[-250:]})")
    one = [canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all", "--out", out]
    r = subprocess.run(one, capture_output=True, text=True)
    check(r.returncode == 2 and "1 setting" in r.stderr, f"one setting: exit 2 ({r.stderr.strip()})")
    os.makedirs(f"{work}/other/freeze-all-s0")
    open(f"{work}/other/freeze-all-s0/notes.txt", "w").close()
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--out",
                        f"{work}/other"], capture_output=True, text=True)
    check(r.returncode == 2 and "is not a training run's out_dir" in r.stderr,
          f"a folder that is not a run in a run's place: exit 2 ({r.stderr.strip()})")
    check(before == {n: os.path.getmtime(f"{out}/{n}/heads/cls.json") for n in names},
          "the refused sweeps touched no run")

    # A second sweep into a folder a sweep runs in is refused; inspect says who runs there.
    busy = [canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--out", f"{work}/busy",
            "--set", "train.epochs=400", "--progress", "quiet"]
    first = subprocess.Popen(busy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = f"{work}/busy/freeze-all-s0/checkpoint/state.json"
    deadline = time.time() + 120 * slowdown()
    while time.time() < deadline and first.poll() is None and not os.path.exists(state):
        time.sleep(0.05)
    second = subprocess.run(busy, capture_output=True, text=True)
    shown = subprocess.run([canopy, "inspect", f"{work}/busy"], capture_output=True, text=True)
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120 * slowdown())
    check(second.returncode == 1 and "canopy sweep" in second.stderr and str(first.pid) in second.stderr,
          f"a second sweep into the same folder: exit 1, naming the first ({second.stderr.strip()[-250:]})")
    check(f"running: canopy sweep, pid {first.pid}" in shown.stdout,
          f"canopy inspect says a sweep runs in it:\n{shown.stdout}")
    check(first.returncode == 143, f"the first, SIGTERMed, stopped (exit {first.returncode})")

    # The config's own cache holds the frozen setting's features: read where it is, not built again.
    own = f"{work}/unused-cache"
    subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], check=True, capture_output=True)
    built_at = os.path.getmtime(f"{own}/manifest.json")
    linked = [canopy, "sweep", "--config", config, "--vary", "trunk.freeze=all,first:2", "--seeds", "0", "--out",
              f"{work}/linked", "--progress", "quiet"]
    r = subprocess.run(linked + ["--set", "train.epochs=1", "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 0 and "2 caches (1 read where it is)" in r.stdout and f"-> {os.path.realpath(own)}: "
          in r.stdout and not os.path.exists(f"{work}/linked"), f"--dry-run says which cache is read where it is:\n"
          f"{r.stdout}{r.stderr.strip()[-300:]}")
    r = subprocess.run(linked + ["--set", "train.epochs=1"], capture_output=True, text=True)
    links = {c: os.readlink(f"{work}/linked/caches/{c}") for c in os.listdir(f"{work}/linked/caches")
             if os.path.islink(f"{work}/linked/caches/{c}")}
    with open(f"{work}/linked/logs/freeze-all-s0.log") as f:
        frozen_log = f.read()
    built = [n for n in os.listdir(f"{work}/linked/logs") if n.startswith("cache-")]
    check(r.returncode == 0 and list(links.values()) == [os.path.realpath(own)] and "up to date" in frozen_log and
          os.path.getmtime(f"{own}/manifest.json") == built_at and len(built) == 1 and
          f"trunk.freeze = all: read where it is ({os.path.realpath(own)})" in r.stdout and
          "trunk.freeze = first:2: built in " in r.stdout,
          f"the frozen runs read the config's cache through a link, untouched; the tuned setting's cache is built "
          f"by a canopy cache of its own ({built}): {links} {r.stderr.strip()[-300:]}\n{r.stdout[-700:]}")
    r = subprocess.run([canopy, "inspect", f"{work}/linked"], capture_output=True, text=True)
    check(f"-> {os.path.realpath(own)}" in r.stdout, f"canopy inspect shows the link:\n{r.stdout}")
    tuned = [f"{out}/caches/{c}" for c in os.listdir(f"{out}/caches")
             if json.load(open(f"{out}/caches/{c}/manifest.json"))["meta"].get("boundary")]
    r = subprocess.run(linked[:-4] + ["--out", f"{work}/from", "--cache-from", tuned[0], "--dry-run"],
                       capture_output=True, text=True)
    check(r.returncode == 0 and "2 caches (2 read where they are)" in r.stdout and
          f"-> {os.path.realpath(tuned[0])}: " in r.stdout, f"--cache-from: a cache of another sweep read where it "
          f"is too:\n{r.stdout}{r.stderr.strip()[-300:]}")
    r = subprocess.run(linked[:-4] + ["--out", f"{work}/from", "--cache-from", out, "--dry-run"], capture_output=True,
                       text=True)
    check(r.returncode == 0 and "2 caches (2 read where they are)" in r.stdout and
          f"-> {os.path.realpath(tuned[0])}: " in r.stdout, f"--cache-from an earlier sweep's folder: its caches "
          f"read where they are:\n{r.stdout}{r.stderr.strip()[-300:]}")
    r = subprocess.run([canopy, "sweep", "--config", config, "--vary", "trunk.freeze=first:1,first:2", "--out",
                        f"{work}/from", "--cache-from", own, "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 0 and f"--cache-from {own}: not read; it holds none of these settings' features "
          "(against the first setting's: freeze" in r.stdout, f"a --cache-from of other features: said, with what "
          f"differs:\n{r.stdout}")
    linked_tuned = [f"{work}/linked/caches/{c}" for c in os.listdir(f"{work}/linked/caches")
                    if not os.path.islink(f"{work}/linked/caches/{c}")]
    r = subprocess.run(more + ["--cache-from", linked_tuned[0], "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 0 and f"--cache-from {linked_tuned[0]}: not read; the sweep's own {out}/caches/" in r.stdout
          and "holds the same features already" in r.stdout, f"a --cache-from of features the sweep has a cache of "
          f"already: said so:\n{r.stdout[-400:]}{r.stderr.strip()[-300:]}")
    r = subprocess.run(linked + ["--cache-from", work, "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 2 and f"--cache-from '{work}' is neither a feature cache nor a sweep's folder" in r.stderr,
          f"a --cache-from that is no cache: exit 2 ({r.stderr.strip()[-200:]})")
    shutil.rmtree(own)
    r = subprocess.run(linked + ["--set", "train.epochs=2"], capture_output=True, text=True)
    caches = os.listdir(f"{work}/linked/caches")
    check(r.returncode == 0 and not any(os.path.islink(f"{work}/linked/caches/{c}") for c in caches) and
          len(caches) == 2 and "the cache it links to is gone" in r.stderr and "building the cache" in r.stderr,
          f"the config's cache removed: the link goes, the sweep builds the cache and trains on "
          f"({r.stderr.strip()[-300:]})")

    # The linked cache changes while the sweep runs: the next run does not rebuild it in its owner's place.
    subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], check=True, capture_output=True)
    moving = subprocess.Popen([canopy, "sweep", "--config", config, "--vary", "train.epochs=30,31", "--out",
                               f"{work}/moving", "--progress", "quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = f"{work}/moving/epochs-30-s0/checkpoint/state.json"
    deadline = time.time() + 120 * slowdown()
    while time.time() < deadline and moving.poll() is None and not os.path.exists(state):
        time.sleep(0.02)
    os.remove(f"{own}/manifest.json")  # as a rebuild from other inputs begins
    _, moved_err = moving.communicate(timeout=600 * slowdown())
    frozen_cache = os.listdir(f"{work}/moving/caches")
    check(moving.returncode == 0 and "that cache no longer holds these features complete; the link goes" in moved_err
          and len(frozen_cache) == 1 and not os.path.islink(f"{work}/moving/caches/{frozen_cache[0]}") and
          not os.path.exists(f"{own}/manifest.json"), f"a linked cache changed under the sweep: the link goes, the "
          f"sweep builds its own, the owner's folder untouched ({moved_err.strip()[-400:]})")

    # A run trained on by hand since: canopy inspect's cost and choice read its checkpoint now.
    r = subprocess.run([canopy, "train", "--config", f"{out}/{names[0]}/config.ini", "--resume", "--set",
                        "train.epochs=7", "--progress", "quiet"], capture_output=True, text=True)
    now = json.load(open(f"{out}/{names[0]}/checkpoint/state.json"))["train_seconds"]
    recorded = {x["out_dir"]: x["train_seconds"] for x in json.load(open(f"{out}/sweep.json"))["runs"]}
    shown = json.loads(subprocess.run([canopy, "inspect", out, "--json"], capture_output=True, text=True).stdout)
    live = {x["out_dir"]: x["train_seconds"] for x in shown["runs"]}
    check(r.returncode == 0 and now > recorded[f"{out}/{names[0]}"] and live[f"{out}/{names[0]}"] == now and
          all(live[d] == t for d, t in recorded.items() if d != f"{out}/{names[0]}"),
          f"inspect of the sweep reads each run's cost from its checkpoint now: {live} (sweep.json {recorded}, "
          f"trained on by hand to {now})")
    # Another trunk file at the same path: the runs read other features now, and say so.
    import torch
    torch.manual_seed(1)
    torch.jit.script(tiny_block_trunk().eval()).save(trunk)
    r = subprocess.run(sweep + ["--set", "train.epochs=5", "--dry-run"], capture_output=True, text=True)
    check(r.returncode == 2 and "their cache fingerprint changed since it ran" in r.stderr,
          f"a trunk changed under the sweep: its runs are refused, the reason said ({r.stderr.strip()[-200:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
