#!/usr/bin/env python3
"""`canopy compare`: runs that froze the trunk whole and trained its top, scored on the same
Fashion-MNIST test images. Checks that each run's heads score as `canopy evaluate` scores them
(intervals included), that the paired differences from run A are what Python computes from
`canopy predict`'s answers on the same resamples (drawn with torch's generator, quantiles as
numpy's), that runs reading the same features share one trunk pass, that a head compared with itself
differs by 0, that what differs between the runs'
configs is said, that tasks on other labels or in one run only are named and left out, that a
run moved to another folder is read where it is, that bad uses are refused with exit 2, and that
`canopy inspect` of a run gives each exported head's test interval. Arms of two seeds each are
scored by their runs' mean, with the runs resampled as well as the rows, as Python draws them.

    test_compare.py --canopy build/runners/canopy
"""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import torch

from support import FMNIST, check, finish, read_idx, start, tiny_block_trunk, tiny_trunk_sections

TRAIN, TEST, ROWS = 1200, 300, 400
IMAGES = f"{FMNIST}/t10k-images-idx3-ubyte.gz"
TASKS = """[task.cls]
head = linear
lr = 0.01
[task.mlp]
head = mlp
head.hidden = 32
lr = 0.003
[task.ink]
kind = regression
labels = ink
head = linear
lr = 0.01
"""


def job(work, trunk, name, freeze, tasks=TASKS, epochs=2, seed=0, cache=None):
    path = os.path.join(work, f"{name}.ini")
    with open(path, "w") as f:
        f.write(tiny_trunk_sections(trunk, TRAIN, TEST, pooling="flatten") + f"""freeze = {freeze}
lr = 0.01
[cache]
path = {work}/{cache or name}-cache
[train]
out_dir = {work}/{name}
batch_size = 32
epochs = {epochs}
seed = {seed}
""" + tasks)
    return path


def canopy_json(cmd):
    r = subprocess.run(cmd + ["--json", "--progress", "quiet"], capture_output=True, text=True)
    return r, (json.loads(r.stdout) if r.returncode == 0 else {})


def main():
    canopy, work, trunk = start("canopy-compare-", tiny_block_trunk, "blocks.pt")
    frozen = job(work, trunk, "frozen", "all")
    top = job(work, trunk, "top", "first:2")
    # Run C: `cls` on 4 groups of the classes (other labels), and a task of its own.
    other = job(work, trunk, "other", "all", TASKS.replace("[task.cls]\n", "[task.cls]\nlabel_map = 0,1,0,0,0,2,0,2,3,2\n")
                + "[task.extra]\nhead = linear\n", epochs=1)
    frozen_s1 = job(work, trunk, "frozen_s1", "all", seed=1, cache="frozen")
    top_s1 = job(work, trunk, "top_s1", "first:2", seed=1, cache="top")
    for config in (frozen, top, other, frozen_s1, top_s1):
        r = subprocess.run([canopy, "run", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 0, f"{os.path.basename(config)} trained ({r.stderr.strip()[-300:]})")
    runs = [f"{work}/frozen", f"{work}/top", f"{work}/other"]
    base = [canopy, "compare"] + runs + ["--input", IMAGES, "--limit", str(ROWS)]

    r, c = canopy_json(base)
    check(r.returncode == 0, f"canopy compare of 3 runs ({r.stderr.strip()[-400:]})")
    check(c.get("rows") == ROWS and c.get("resamples") == 1000 and c.get("level") == 0.95 and
          [x["label"] for x in c.get("runs", [])] == ["A", "B", "C"],
          f"{ROWS} rows, 1000 resamples, runs A B C: {c.get('rows')} {c.get('resamples')}")
    runs_of = {x["label"]: x for x in c.get("runs", [])}

    # Each arm against each other: C - B is what `canopy compare B C` says of C, to the last digit.
    r, bc = canopy_json([canopy, "compare", runs[1], runs[2], "--input", IMAGES, "--limit", str(ROWS)])
    pairs = {t["task"]: t.get("between", {}).get("C - B") for t in c.get("tasks", [])}
    alone = {t["task"]: t["versus_A"].get("B") for t in bc.get("tasks", [])}
    check(r.returncode == 0 and pairs.get("cls") is None and {t for t in pairs if pairs[t]} == {"mlp", "ink"} and
          all(pairs[t]["difference"] == alone[t]["difference"] and pairs[t]["interval"] == alone[t]["interval"]
              for t in ("mlp", "ink")), f"C - B of the three runs is compare B C's: {pairs} {alone}")
    between = c.get("between", {})
    swap = lambda n: {"better": n["worse"], "worse": n["better"], "no_difference": n["no_difference"]}
    check(between.get("B", {}).get("A") == c["against_A"]["B"] and between.get("C", {}).get("B") == bc["against_A"]["B"]
          and between["A"]["B"] == swap(between["B"]["A"]) and between["B"]["C"] == swap(between["C"]["B"]),
          f"each arm's tally against each other: against A's, compare B C's, and swapped the other way: {between}")
    # Each task's unbeaten arms: those no other arm's difference from them is clear of 0 on the
    # better side (lower for nll/mae/rmse), from the task's own intervals.
    def shown_better(t, hi, lo):  # is arm `hi` shown better than arm `lo` on task t?
        def pair(b, a):
            return t["versus_A"].get(b) if a == "A" else t.get("between", {}).get(f"{b} - {a}")
        d, sign = pair(hi, lo), -1 if t["metric"] in ("nll", "mae", "rmse") else 1
        if d is None:
            d, sign = pair(lo, hi), -sign
        return d is not None and min(sign * d["interval"][0], sign * d["interval"][1]) > 0
    unbeaten = {t["task"]: t.get("unbeaten") for t in c.get("tasks", [])}
    want = {t["task"]: [a for a in "ABC" if a in t["arms"] and not any(shown_better(t, o, a) for o in "ABC" if o != a)]
            for t in c.get("tasks", [])}
    check(unbeaten == want and any(len(t["unbeaten"]) < len(t["arms"]) for t in c.get("tasks", [])),
          f"each task's unbeaten arms, from its intervals: {unbeaten} (want {want})")
    r = subprocess.run(base + ["--progress", "quiet"], capture_output=True, text=True)
    counts = {a: sum(a in u for u in unbeaten.values()) for a in "ABC"}
    check(f"unbeaten (no other arm shown better on the task): A on {counts['A']} of {len(unbeaten)} tasks, "
          f"B on {counts['B']}, C on {counts['C']}" in r.stdout, f"the text report counts them: {r.stdout[-400:]}")
    # What to choose by cost: each run's checkpoint records its training time (state.json's
    # train_seconds, shown by canopy inspect); per task the cheapest unbeaten arm, and the
    # cheapest unbeaten on every task, if any.
    def recorded(out):
        with open(f"{out}/checkpoint/state.json") as f:
            return json.load(f).get("train_seconds")
    cost = {a: recorded(d) for a, d in zip("ABC", runs)}
    by_cost = lambda arms: sorted(arms, key=lambda a: cost[a])
    per_task = {t: by_cost(u)[0] for t, u in unbeaten.items() if u}
    everywhere = by_cost([a for a in "ABC" if all(a in u for u in unbeaten.values() if u)])
    choice = c.get("choice") or {}
    check(all(isinstance(v, float) and v > 0 for v in cost.values()) and choice.get("per_task") == per_task and
          choice.get("every_task") == (everywhere[0] if everywhere else None) and
          [x["seconds"] for x in choice.get("settings", [])] == sorted(cost.values()),
          f"compare's choice by cost: the cheapest unbeaten arm per task by the runs' recorded training times "
          f"{cost}: {choice.get('per_task')} (want {per_task}), on every task {choice.get('every_task')}")
    said = subprocess.run([canopy, "inspect", runs[0]], capture_output=True, text=True).stdout
    check("choosing by cost (training time per run)" in r.stdout and " of training" in said,
          f"the text report says the choice; canopy inspect the training time: {said[:300]}")
    n = between["C"]["B"]
    check(f"  C  {between['C']['A']['better']}/" in r.stdout and
          f"{n['better']}/{n['worse']}/{n['no_difference']}  -" in r.stdout,
          f"the text report has the table of each arm against each other:\n{r.stdout[-600:]}")

    # Where each time was measured: state.json records the machine (CPU, its family and model,
    # the cores the process may use), canopy inspect says it. Times from two machines do not
    # compare, and the choice says so: a run trained under `taskset -c 0` had 1 core of the 2.
    machine = json.load(open(f"{runs[0]}/checkpoint/state.json")).get("machines", [None])[0] or ""
    cores = len(os.sched_getaffinity(0))
    check(f", {cores} core" in machine and re.search(r" \(family \d+ model \d+\), ", machine) and
          choice.get("one_machine") is True and
          all(choice.get("machines", {}).get(a) == [machine] for a in "ABC") and
          f" of training on {machine}" in said and "measured on more than one machine" not in r.stdout,
          f"each run records where it trained ({machine!r}); one machine, nothing said: {choice.get('machines')}")
    if cores >= 2:
        one = f"{work}/frozen_1core"
        r1 = subprocess.run(["taskset", "-c", "0", canopy, "train", "--config", frozen, "--set", f"train.out_dir={one}",
                             "--progress", "quiet"], capture_output=True, text=True)
        r, two = canopy_json([canopy, "compare", runs[0], one, "--input", IMAGES, "--limit", str(ROWS)])
        text = subprocess.run([canopy, "compare", runs[0], one, "--input", IMAGES, "--limit", str(ROWS), "--progress",
                               "quiet"], capture_output=True, text=True).stdout
        other_machine = machine.replace(f", {cores} cores", ", 1 core")
        check(r1.returncode == 0 and (two.get("choice") or {}).get("one_machine") is False and
              two["choice"]["machines"] == {"A": [machine], "B": [other_machine]} and
              f"the times were measured on more than one machine, so they do not compare: A on {machine}; "
              f"B on {other_machine}" in text,
              f"a run on 1 core against one on {cores}: the choice says the times do not compare "
              f"({(two.get('choice') or {}).get('machines')}):\n{text[-700:]}")
        # Trained on elsewhere: the machines of its epochs, each once, in order.
        r2 = subprocess.run([canopy, "train", "--config", frozen, "--set", f"train.out_dir={one}", "--set",
                             "train.epochs=3", "--resume", "--progress", "quiet"], capture_output=True, text=True)
        state = json.load(open(f"{one}/checkpoint/state.json"))
        said = subprocess.run([canopy, "inspect", one], capture_output=True, text=True).stdout
        check(r2.returncode == 0 and state.get("machines") == [other_machine, machine] and
              f"of training on {other_machine}, then on {machine}" in said,
              f"a run trained on on another machine records both: {state.get('machines')} {said[:400]}")

    # Each run's heads as `canopy evaluate` scores them: values and intervals.
    # C's heads read A's features: one trunk pass serves both, B's tuned trunk has its own.
    check(runs_of.get("C", {}).get("pass_with") == "A" and runs_of.get("B", {}).get("pass_with") == "" and
          runs_of.get("A", {}).get("pass_with") == "", "runs A and C (the same frozen trunk) share one trunk pass")
    for label, config in zip("ABC", (frozen, top, other)):
        r, e = canopy_json([canopy, "evaluate", "--config", config, "--input", IMAGES, "--limit", str(ROWS)])
        want = {h["task"]: h for h in e.get("heads", [])}
        got = {h["task"]: h for h in runs_of.get(label, {}).get("heads", [])}
        tasks = {"cls", "mlp", "ink"} | ({"extra"} if label == "C" else set())
        same = r.returncode == 0 and set(want) == set(got) == tasks and all(
            abs(got[t].get(m, 9) - want[t].get(m, 9)) < 1e-12 and
            np.abs(np.array(got[t]["intervals"][m]) - np.array(want[t]["intervals"][m])).max() < 1e-12
            for t, m in (("cls", "accuracy"), ("mlp", "accuracy"), ("mlp", "macro_f1"), ("ink", "r2"), ("ink", "mae")))
        check(same, f"run {label}'s heads score as canopy evaluate scores them, intervals included")

    # Without --input: the run's eval split, the rows training scored its heads on: evaluate gives
    # the cards' numbers (R^2 to float rounding, 1e-9 here), and compare run A's heads the cards'
    # intervals.
    r, e = canopy_json([canopy, "evaluate", "--config", frozen])
    cards = {t: json.load(open(f"{work}/frozen/heads/{t}.json")) for t in ("cls", "mlp", "ink")}
    got = {h["task"]: h for h in e.get("heads", [])}
    check(r.returncode == 0 and e.get("rows") == TEST and e.get("eval_split") == "test" and e.get("input") == "" and
          all(got[t]["accuracy"] == cards[t]["eval_accuracy"] and got[t]["macro_f1"] == cards[t]["eval_macro_f1"]
              for t in ("cls", "mlp")) and abs(got["ink"]["r2"] - cards["ink"]["eval_r2"]) < 1e-6,
          f"canopy evaluate without --input scores the eval split's {TEST} rows as the cards say")
    r, on_eval = canopy_json([canopy, "compare", f"{work}/frozen", f"{work}/top"])
    heads_a = {h["task"]: h for h in (on_eval.get("runs") or [{}])[0].get("heads", [])}
    check(r.returncode == 0 and on_eval.get("rows") == TEST and on_eval.get("eval_split") == "test" and
          all(heads_a[t]["intervals"]["accuracy"] == cards[t]["eval_intervals"]["accuracy"] for t in ("cls", "mlp")),
          "canopy compare without --input: the eval split, run A's intervals the cards'")
    check("stop early" not in r.stderr, "no head stops early: nothing said of the eval split's rows")
    r = subprocess.run([canopy, "compare", f"{work}/frozen", f"{work}/top", "--set", "task.mlp.early_stop_patience=2",
                        "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and "canopy compare: runs A, B: task 'mlp' stops early by its score on the eval split"
          in r.stderr and "lean optimistic" in r.stderr, f"heads that stop early on the eval split, compared on it: "
          f"said, naming the runs ({r.stderr.strip()[-300:]})")
    r = subprocess.run([canopy, "evaluate", "--config", frozen, "--set", "task.mlp.early_stop_patience=2",
                        "--progress", "quiet"], capture_output=True, text=True)
    said = "canopy evaluate: task 'mlp' stops early by its score on the eval split (train.eval_split = test;"
    check(r.returncode == 0 and said in r.stderr, f"and by evaluate ({r.stderr.strip()[-300:]})")
    r = subprocess.run([canopy, "evaluate", "--config", frozen, "--set", "task.mlp.early_stop_patience=2", "--input",
                        IMAGES, "--limit", "50", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and "stop early" not in r.stderr, "not on other rows (--input)")
    r = subprocess.run([canopy, "compare", f"{work}/frozen", f"{work}/top", "--labels", IMAGES], capture_output=True,
                       text=True)
    check(r.returncode == 2 and "without --input" in r.stderr, f"--labels without --input: exit 2 ({r.stderr.strip()})")

    # The paired differences, from predict's answers on the same rows and the same resamples.
    names = None
    answers = {}
    for label, config in zip("AB", (frozen, top)):
        r = subprocess.run([canopy, "predict", "--config", config, "--input", IMAGES, "--limit", str(ROWS),
                            "--format", "jsonl", "--progress", "quiet"], capture_output=True, text=True)
        check(r.returncode == 0, f"predict with run {label} ({r.stderr.strip()[-200:]})")
        answers[label] = [json.loads(line) for line in r.stdout.splitlines()]
    card = json.load(open(f"{work}/frozen/heads/cls.json"))
    names = card["class_names"]
    y = torch.from_numpy(read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:ROWS].astype(np.int64))
    images = read_idx(IMAGES)[:ROWS].astype(np.float64) / 255
    ink = torch.from_numpy(images.reshape(ROWS, -1).mean(1))
    drawn = [torch.randint(ROWS, (ROWS,), generator=torch.Generator().manual_seed(i * 7919 + 1))  # train.seed 0
             for i in range(1000)]

    def accuracy_lead(task):
        right = {k: torch.tensor([names.index(a[task]) for a in answers[k]]) == y for k in "AB"}
        d = [float(right["B"][rows].double().mean() - right["A"][rows].double().mean()) for rows in drawn]
        return float(right["B"].double().mean() - right["A"].double().mean()), np.quantile(d, [0.025, 0.975])

    def r2(p, t):
        return 1 - float(((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum())

    for task in ("cls", "mlp"):
        lead, interval = accuracy_lead(task)
        v = next((t for t in c.get("tasks", []) if t["task"] == task), {}).get("versus_A", {}).get("B", {})
        check(v and abs(v["difference"] - lead) < 1e-12 and np.abs(np.array(v["interval"]) - interval).max() < 1e-12,
              f"task {task}: B - A in accuracy {lead:+.4f} {interval.round(4)} as Python draws it "
              f"(canopy: {v.get('difference')} {v.get('interval')})")
    pred = {k: torch.tensor([float(a["ink"]) for a in answers[k]], dtype=torch.float64) for k in "AB"}
    d = [r2(pred["B"][rows], ink[rows]) - r2(pred["A"][rows], ink[rows]) for rows in drawn]
    want = np.quantile(d, [0.025, 0.975])
    ink_task = next((t for t in c.get("tasks", []) if t["task"] == "ink"), {})
    v = ink_task.get("versus_A", {}).get("B", {})
    check(v and ink_task["metric"] == "r2" and np.abs(np.array(v["interval"]) - want).max() < 1e-4,
          f"task ink: B - A in R^2 {want.round(4)} as Python computes it from predict's values "
          f"(canopy: {v.get('interval')})")
    check(all(m in v.get("metrics", {}) for m in ("mae", "rmse", "r2")), "every resampled metric's difference is given")

    # The tally per arm: better / worse / no difference, from the intervals the tasks give.
    lower = {"nll", "mae", "rmse"}
    for arm in ("B", "C"):
        want = {"better": 0, "worse": 0, "no_difference": 0}
        for t in c.get("tasks", []):
            v = t["versus_A"].get(arm)
            if not v:
                continue
            lo, hi = sorted(x * (-1 if t["metric"] in lower else 1) for x in v["interval"])
            want["better" if lo > 0 else "worse" if hi < 0 else "no_difference"] += 1
        check(c.get("against_A", {}).get(arm) == want, f"arm {arm} against A: {want}")

    # What differs between the runs' configs, and what is not compared.
    differs = runs_of.get("B", {}).get("differs", [])
    check(differs == ["trunk.freeze = first:2 (A: all)"],  # train.out_dir and cache.path left out
          f"run B's keys that differ from A's are listed: {differs}")
    nc = c.get("not_compared", [])
    check(any("task 'cls'" in n and "run C" in n and "4 classes" in n for n in nc) and
          any("task 'extra'" in n and "not in run A" in n for n in nc),
          f"a task on other labels and a task in one run are named, not compared: {nc}")
    cls = next((t for t in c.get("tasks", []) if t["task"] == "cls"), {})
    check(set(cls.get("arms", {})) == {"A", "B"} and set(cls.get("versus_A", {})) == {"B"},
          "C's cls is left out of cls's row")
    mlp = next((t for t in c.get("tasks", []) if t["task"] == "mlp"), {})
    check(set(mlp.get("versus_A", {})) == {"B", "C"}, "C's mlp (same labels) is compared")

    r = subprocess.run(base + ["--progress", "quiet"], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    row = next((l for l in lines if l.startswith("cls ")), "")
    check(r.returncode == 0 and "B differs from A in " in r.stdout and "trunk.freeze = first:2 (A: all)" in r.stdout
          and "B - A" in r.stdout and "C - A" in r.stdout and " points [" in row and
          "not compared: task 'extra'" in r.stdout and
          f"B against A: better on {c['against_A']['B']['better']}, worse on {c['against_A']['B']['worse']}" in r.stdout,
          f"the text report:\n{r.stdout}")

    # `canopy inspect` of a run gives each exported head's test score with its card's interval.
    r = subprocess.run([canopy, "inspect", runs[1], "--json"], capture_output=True, text=True)
    doc = json.loads(r.stdout) if r.returncode == 0 else {}
    got = {e["name"]: e.get("test_interval") for e in doc.get("exported", [])}
    want = {n: json.load(open(f"{runs[1]}/heads/{n}.json"))["eval_intervals"]["r2" if n == "ink" else "accuracy"]
            for n in ("cls", "mlp", "ink")}
    check(got == want, f"inspect --json: each head's test interval is its card's ({got})")
    r = subprocess.run([canopy, "inspect", runs[1]], capture_output=True, text=True)
    lo, hi = want["cls"]
    check(f"[{100 * lo:.2f}, {100 * hi:.2f}] (95%) on the eval split" in r.stdout,
          f"inspect says it beside the score: {r.stdout[:600]}")

    # --metric: each task compared by it where its head's kind has it, else by its own.
    r, by = canopy_json(base + ["--metric", "macro_f1"])
    got = {t["task"]: t for t in by.get("tasks", [])}
    want = {t["task"]: t for t in c.get("tasks", [])}
    check(r.returncode == 0 and got["cls"]["metric"] == "macro_f1" and got["ink"]["metric"] == "r2" and
          got["cls"]["versus_A"]["B"]["difference"] == want["cls"]["versus_A"]["B"]["metrics"]["macro_f1"]["difference"]
          and got["cls"]["versus_A"]["B"]["interval"] == want["cls"]["versus_A"]["B"]["metrics"]["macro_f1"]["interval"],
          "--metric macro_f1 compares cls by its macro-F1 (as the JSON's metrics had it), ink by R^2")
    r = subprocess.run(base + ["--metric", "mae", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0 and "MAE (lower)" in r.stdout, "--metric mae: the regression row says lower is better")
    r = subprocess.run(base + ["--metric", "f1", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 2 and "--metric 'f1' is not one of" in r.stderr, "an unknown metric: exit 2")

    # A run against itself: every difference 0, said as no difference.
    r, same = canopy_json([canopy, "compare", runs[0], runs[0], "--input", IMAGES, "--limit", str(ROWS)])
    diffs = [t["versus_A"]["B"] for t in same.get("tasks", [])]
    check(len(diffs) == 3 and all(d["difference"] == 0 and d["interval"] == [0, 0] for d in diffs),
          "a run compared with itself differs by 0 [0, 0] in every task")
    r = subprocess.run([canopy, "compare", runs[0], runs[0], "--input", IMAGES, "--limit", str(ROWS),
                        "--progress", "quiet"], capture_output=True, text=True)
    check("(no difference shown)" in r.stdout, "and the text says no difference is shown")

    # A run moved to another folder is read where it is.
    moved = f"{work}/moved"
    shutil.move(runs[0], moved)
    r, m = canopy_json([canopy, "compare", moved, runs[1], "--input", IMAGES, "--limit", str(ROWS)])
    check(r.returncode == 0 and [t["versus_A"].get("B") for t in m.get("tasks", [])] ==
          [t["versus_A"].get("B") for t in c.get("tasks", [])],
          f"the moved run compares as before ({r.stderr.strip()[-300:]})")

    # A run whose weights file is gone: exit 1, naming the run and the file.
    broken = f"{work}/broken"
    shutil.copytree(runs[1], broken)
    os.remove(f"{broken}/heads/mlp.safetensors")
    r = subprocess.run([canopy, "compare", moved, broken, "--input", IMAGES, "--limit", "50", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and f"run B ({broken})" in r.stderr and "mlp.safetensors" in r.stderr,
          f"a run missing a weights file: exit 1 naming the run and the file ({r.stderr.strip()[-250:]})")

    # Arms of two seeds each: each arm scored by its runs' mean, and each resample also draws an
    # arm's runs with replacement (generator seeded seed * 1000003 + resample * 7919 + 2 + arm).
    arm_a, arm_b = f"{moved},{work}/frozen_s1", f"{runs[1]},{work}/top_s1"
    r, arms = canopy_json([canopy, "compare", arm_a, arm_b, "--input", IMAGES, "--limit", str(ROWS)])
    check(r.returncode == 0 and [x["label"] for x in arms.get("runs", [])] == ["A1", "A2", "B1", "B2"] and
          arms.get("arms") == [{"label": "A", "runs": ["A1", "A2"]}, {"label": "B", "runs": ["B1", "B2"]}],
          f"two arms of two runs: A1 A2, B1 B2 ({r.stderr.strip()[-300:]})")
    check(next((x for x in arms.get("runs", []) if x["label"] == "A2"), {}).get("differs") == ["train.seed = 1 (A1: 0)"]
          and next((x for x in arms.get("runs", []) if x["label"] == "B1"), {}).get("differs_from") == "A1",
          "A2 differs from A1 in its seed; B1 is described against A1")
    # Each arm's cost is the mean of its own runs' recorded training times, and each task goes to
    # the cheaper of the arms unbeaten on it: two arms whose first run is the same (their costs
    # were once merged under one name) and which cannot be told apart on some task.
    twin_a, twin_b = f"{moved},{work}/frozen_s1", f"{moved},{work}/top_s1"
    r, twins = canopy_json([canopy, "compare", twin_a, twin_b, "--input", IMAGES, "--limit", str(ROWS)])
    spent = {p: recorded(p) for p in (moved, f"{work}/frozen_s1", f"{work}/top_s1")}
    want_cost = {a: np.mean([spent[p] for p in arm.split(",")]) for a, arm in (("A", twin_a), ("B", twin_b))}
    listed = {x["arm"]: x for x in (twins.get("choice") or {}).get("settings", [])}
    both = [t["task"] for t in twins.get("tasks", []) if sorted(t.get("unbeaten", [])) == ["A", "B"]]
    cheaper = min("AB", key=lambda a: want_cost[a])
    check(r.returncode == 0 and {a: x["setting"] for a, x in listed.items()} == {"A": twin_a, "B": twin_b} and
          all(abs(listed[a]["seconds"] - want_cost[a]) < 1e-9 for a in "AB") and both and
          all(twins["choice"]["per_task"][t] == cheaper for t in both),
          f"arms sharing a run: each costs its own runs' mean {want_cost} ({listed}), and {both}, unbeaten by "
          f"either, go to the cheaper, {cheaper} ({(twins.get('choice') or {}).get('per_task')})")
    for label, config in (("A2", frozen_s1), ("B2", top_s1)):
        p = subprocess.run([canopy, "predict", "--config", config, "--input", IMAGES, "--limit", str(ROWS),
                            "--format", "jsonl", "--progress", "quiet"], capture_output=True, text=True)
        answers[label] = [json.loads(line) for line in p.stdout.splitlines()]
    answers["A1"], answers["B1"] = answers["A"], answers["B"]
    right = {k: torch.tensor([names.index(a["cls"]) for a in answers[k]]) == y for k in ("A1", "A2", "B1", "B2")}

    def arm_draws(arm, i):
        return torch.randint(2, (2,), generator=torch.Generator().manual_seed(i * 7919 + 2 + arm)).tolist()

    # Seeds 0, 1 in both arms: paired by seed, every arm draws the generator of arm 0's stream.
    check(arms.get("paired_by_seed") is True, "arms of seeds 0, 1 each are paired by seed")
    per = {arm: [float(np.mean([right[f"{arm}{1 + j}"][rows].double().mean() for j in arm_draws(0, i)]))
                 for i, rows in enumerate(drawn)] for arm in "AB"}
    mean = {arm: float(np.mean([right[f"{arm}{j}"].double().mean() for j in (1, 2)])) for arm in "AB"}
    cls2 = next((t for t in arms.get("tasks", []) if t["task"] == "cls"), {})
    v = cls2.get("versus_A", {}).get("B", {})
    want = np.quantile(np.array(per["B"]) - np.array(per["A"]), [0.025, 0.975])
    check(v and abs(v["difference"] - (mean["B"] - mean["A"])) < 1e-12 and
          np.abs(np.array(v["interval"]) - want).max() < 1e-12 and
          np.abs(np.array(cls2["arms"]["A"]["interval"]) - np.quantile(per["A"], [0.025, 0.975])).max() < 1e-12,
          f"task cls: arm B - arm A {mean['B'] - mean['A']:+.4f} {want.round(4)}, the runs and the rows resampled, "
          f"as Python draws them (canopy: {v.get('difference')} {v.get('interval')})")
    # Seeds 0, 1 against 1, 0: not paired, each arm draws its own runs.
    r, unpaired = canopy_json([canopy, "compare", arm_a, f"{work}/top_s1,{runs[1]}", "--input", IMAGES,
                               "--limit", str(ROWS)])
    flipped = {"B1": "B2", "B2": "B1"}
    per_b = [float(np.mean([right[flipped[f"B{1 + j}"]][rows].double().mean() for j in arm_draws(1, i)]))
             for i, rows in enumerate(drawn)]
    u = next((t for t in unpaired.get("tasks", []) if t["task"] == "cls"), {}).get("versus_A", {}).get("B", {})
    check(unpaired.get("paired_by_seed") is False and u and
          np.abs(np.array(u["interval"]) - np.quantile(np.array(per_b) - np.array(per["A"]), [0.025, 0.975])).max() < 1e-12,
          f"arms of seeds 0, 1 and 1, 0 are drawn independently, as Python draws them ({u.get('interval')})")
    single = next((t for t in c.get("tasks", []) if t["task"] == "cls"), {}).get("versus_A", {}).get("B", {})
    check(v and single and v["interval"][1] - v["interval"][0] > 0 and v["interval"] != single["interval"],
          "the arms' interval is not the single runs' one")
    r = subprocess.run([canopy, "compare", arm_a, arm_b, "--input", IMAGES, "--limit", str(ROWS), "--progress", "quiet"],
                       capture_output=True, text=True)
    check("A (mean of 2)" in r.stdout and "A2 differs from A1 in train.seed = 1 (A1: 0)" in r.stdout and
          "draws its runs with replacement" in r.stdout and "paired by train.seed" in r.stdout,
          f"the text report names the arms:\n{r.stdout[:900]}")
    r = subprocess.run([canopy, "compare", arm_a, "--input", IMAGES, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 2 and "nothing to be compared with" in r.stderr, "one arm alone is refused")

    # Refused, exit 2, saying why.
    for args, said in (([moved], "name 2 to 26 runs"),
                       ([moved, work], "without config.ini"),
                       ([moved, f"{work}/nothing"], "no run"),
                       ([moved, runs[1], "--set", "train.bootstrap_resamples=0"], "train.bootstrap_resamples=1000")):
        r = subprocess.run([canopy, "compare"] + args + ["--input", IMAGES, "--progress", "quiet"],
                           capture_output=True, text=True)
        check(r.returncode == 2 and said in r.stderr, f"compare {' '.join(args[1:]) or 'one run'}: exit 2, "
              f"'{said}' ({r.returncode}: {r.stderr.strip()[-200:]})")
    # An --input that is not there is said as such, before any run's model loads.
    for cmd in ([canopy, "compare", moved, runs[1]], [canopy, "evaluate", "--config", top],
                [canopy, "predict", "--config", top]):
        r = subprocess.run(cmd + ["--input", f"{work}/absent-images-idx3-ubyte.gz", "--progress", "quiet"],
                           capture_output=True, text=True)
        check(r.returncode == 2 and f"--input '{work}/absent-images-idx3-ubyte.gz' does not exist" in r.stderr and
              "[canopy] trunk" not in r.stderr, f"canopy {cmd[1]} --input absent: exit 2 before loading a model "
              f"({r.returncode}: {r.stderr.strip()[-200:]})")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
