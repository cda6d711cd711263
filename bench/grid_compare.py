#!/usr/bin/env python3
"""A grid of heads in one pass against training its winner alone, side by side in one run.

On the demo cache (configs/fmnist_lite0.ini: its data, trunk and cache, its tasks replaced;
build it first with `canopy cache`), with train.validation_fraction = 0.1:

  grid    one `canopy train` of a 48-head grid: 12 learning rates x 2 weight decays x
          {linear, MLP 256}, the winner chosen on the validation split;
  single  one `canopy train` of that winner alone (same values, same held-out rows);
  halved  the same grid with successive halving (train.grid_halving = 1, factor 3: after
          epochs 1, 3 and 9 the best third of the members still training go on), and its
          winner alone when it is another member.

Prints, per repeat, each run's training time as canopy reports it and its wall time (process
start, loading, training, evaluation, export), and the ratios grid / single and halved / its single (goal <= 4x);
then the winner's test accuracy against the demo's hand-picked heads (the demo config as
shipped, same epochs). A one-epoch grid run first records the fusion decisions in a
scratch calibration file, so the timed runs read them as later runs on a machine do.

  grid_compare.py --canopy BUILD/runners/canopy [--config configs/fmnist_lite0.ini]
                  [--repeats 3] [--epochs 15] [--halving 1] [--halving-factor 3]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from canopy_runs import base_sections, run_main, work_dir

LRS = "1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1"


def train(canopy, config, out_dir, extra=()):
    t = time.time()
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet", "--set",
                        f"train.out_dir={out_dir}", *extra], capture_output=True, text=True)
    wall = time.time() - t
    if r.returncode:
        sys.exit(f"canopy train {config} failed: {r.stderr[-1500:]}")
    return float(re.search(r"train ([\d.]+)s", r.stdout).group(1)), wall, r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--config", default="configs/fmnist_lite0.ini")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--halving", type=int, default=1, help="train.grid_halving of the halved grid")
    ap.add_argument("--halving-factor", type=int, default=3, help="its train.grid_halving_factor")
    a = ap.parse_args()
    work = work_dir("canopy-grid-bench-")
    os.environ["CANOPY_FUSION_CALIBRATION"] = os.path.join(work, "fusion.tsv")
    base = base_sections(a.config)
    base = re.sub(r"(?m)^epochs = .*$", f"epochs = {a.epochs}", base)
    base = base.replace("[train]\n", "[train]\nvalidation_fraction = 0.1\n", 1)
    grid_ini = os.path.join(work, "grid.ini")
    with open(grid_ini, "w") as f:
        f.write(base + f"""
[task.grid]
head = linear | mlp
head.hidden = 256
optimizer = adam
lr = {LRS}
weight_decay = 0, 1e-4
""")
    train(a.canopy, grid_ini, os.path.join(work, "warm"), ["--set", "train.epochs=1"])  # fusion decisions
    rows = []
    single_ini = os.path.join(work, "single.ini")
    other_ini = os.path.join(work, "other.ini")  # one member of the other head type, alone
    halving = ["--set", f"train.grid_halving={a.halving}", "--set", f"train.grid_halving_factor={a.halving_factor}"]

    def alone(values, out):  # one member of the grid trained alone: (training time, wall time, card)
        with open(single_ini, "w") as f:
            f.write(base + "\n[task.grid]\noptimizer = adam\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
            if values.get("head") == "mlp":
                f.write("head.hidden = 256\n")
        t, w, _ = train(a.canopy, single_ini, out)
        return t, w, json.load(open(os.path.join(out, "heads", "grid.json")))

    halved_rows = []
    for rep in range(a.repeats):
        g_train, g_wall, g_out = train(a.canopy, grid_ini, os.path.join(work, f"grid-{rep}"))
        card = json.load(open(os.path.join(work, f"grid-{rep}", "heads", "grid.json")))
        values = card["grid"]["values"]
        s_train, s_wall, single = alone(values, os.path.join(work, f"single-{rep}"))
        # The bound: every member's work alone, spread over the cores. One MLP and one linear
        # member alone stand for their 24 (same shapes; the learning rate does not change the cost).
        with open(other_ini, "w") as f:
            f.write(base + "\n[task.other]\noptimizer = adam\nlr = 1e-3\n" +
                    ("head = linear\n" if values.get("head") == "mlp" else "head = mlp\nhead.hidden = 256\n"))
        o_train, _, _ = train(a.canopy, other_ini, os.path.join(work, f"other-{rep}"))
        rows.append((g_train, g_wall, s_train, s_wall, card, single, o_train))
        print(f"repeat {rep + 1}: grid of {len(card['grid']['members'])} heads train {g_train:.2f}s wall {g_wall:.2f}s; "
              f"winner alone train {s_train:.2f}s wall {s_wall:.2f}s; winner {card['grid']['winner']}", flush=True)
        h_train, h_wall, _ = train(a.canopy, grid_ini, os.path.join(work, f"halved-{rep}"), halving)
        h_card = json.load(open(os.path.join(work, f"halved-{rep}", "heads", "grid.json")))
        same = h_card["grid"]["winner"] == card["grid"]["winner"]
        hs_train, hs_wall, _ = (s_train, s_wall, single) if same else \
            alone(h_card["grid"]["values"], os.path.join(work, f"halved-single-{rep}"))
        member_epochs = sum(m["epochs"] for m in h_card["grid"]["members"])
        halved_rows.append((h_train, h_wall, hs_train, hs_wall, h_card, same, member_epochs))
        print(f"repeat {rep + 1}: halved grid train {h_train:.2f}s wall {h_wall:.2f}s ({member_epochs} member-epochs "
              f"of {len(h_card['grid']['members']) * a.epochs}); winner {h_card['grid']['winner']}"
              f"{' (the same)' if same else f', alone train {hs_train:.2f}s wall {hs_wall:.2f}s'}", flush=True)

    def med(xs):
        return statistics.median(xs), min(xs), max(xs)
    t = med([r[0] / r[2] for r in rows])
    w = med([r[1] / r[3] for r in rows])
    members = len(rows[0][4]["grid"]["members"])
    cores = os.cpu_count()
    bound = med([(members / 2) * (r[2] + r[6]) / cores / r[2] for r in rows])
    print(f"\nRATIO grid/winner alone (training time) = {t[0]:.2f} (min {t[1]:.2f}, max {t[2]:.2f})  goal <= 4")
    print(f"RATIO grid/winner alone (wall time) = {w[0]:.2f} (min {w[1]:.2f}, max {w[2]:.2f})")
    ht = med([r[0] / r[2] for r in halved_rows])
    hw = med([r[1] / r[3] for r in halved_rows])
    print(f"RATIO halved grid/its winner alone (training time) = {ht[0]:.2f} (min {ht[1]:.2f}, max {ht[2]:.2f})  goal <= 4")
    print(f"RATIO halved grid/its winner alone (wall time) = {hw[0]:.2f} (min {hw[1]:.2f}, max {hw[2]:.2f})")
    print(f"[bounds] each member's training alone, spread perfectly over {cores} cores: {bound[0]:.2f}x the winner "
          f"alone (min {bound[1]:.2f}, max {bound[2]:.2f}); the winner alone {statistics.median(r[2] for r in rows):.2f}s, "
          f"a member of the other head type alone {statistics.median(r[6] for r in rows):.2f}s")
    card, single = rows[-1][4], rows[-1][5]
    print(f"[grid] winner {card['grid']['winner']}: validation {100 * card['validation']['accuracy']:.2f}%, "
          f"test {100 * card['eval_accuracy']:.2f}% (epoch {card['exported_epoch']}); "
          f"trained alone: test {100 * single['eval_accuracy']:.2f}%")
    ranked = sorted(card["grid"]["members"], key=lambda m: -m["validation_score"])
    print("[grid] best five on validation: " + "; ".join(
        f"{m['name'].split('@', 1)[1]} {100 * m['validation_score']:.2f}%" for m in ranked[:5]))
    print("[grid] worst on validation: " + f"{ranked[-1]['name'].split('@', 1)[1]} {100 * ranked[-1]['validation_score']:.2f}%")
    h_card = halved_rows[-1][4]
    print(f"[halved] train.grid_halving = {a.halving}, factor {a.halving_factor}: winner {h_card['grid']['winner']} "
          f"({sum(r[5] for r in halved_rows)} of {len(halved_rows)} repeats the full grid's winner): validation "
          f"{100 * h_card['validation']['accuracy']:.2f}%, test {100 * h_card['eval_accuracy']:.2f}% "
          f"(full grid's winner {100 * card['eval_accuracy']:.2f}%); "
          f"{halved_rows[-1][6]} member-epochs of {len(h_card['grid']['members']) * a.epochs}")

    # The demo's hand-picked heads (its config as shipped: no validation split, last epoch).
    demo_out = os.path.join(work, "demo")
    _, _, out = train(a.canopy, a.config, demo_out, ["--set", f"train.epochs={a.epochs}"])
    demo = []
    for name in sorted(os.listdir(os.path.join(demo_out, "heads"))):
        if name.endswith(".json") and name.startswith("class_"):
            c = json.load(open(os.path.join(demo_out, "heads", name)))
            demo.append((c["task"], c["eval_accuracy"]))
    print("[grid] the demo's hand-picked class heads, test accuracy: " +
          ", ".join(f"{n} {100 * acc:.2f}%" for n, acc in demo))
    best = max(demo, key=lambda d: d[1])
    print(f"[grid] winner vs the demo's best hand-picked head ({best[0]}): "
          f"{100 * (card['eval_accuracy'] - best[1]):+.2f} points on the test split")


if __name__ == "__main__":
    run_main(main)
