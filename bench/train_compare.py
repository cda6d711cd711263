#!/usr/bin/env python3
"""Trainer benchmarks against what a user would otherwise run, side by side in one run.

On the demo cache (configs/fmnist_lite0.ini; build it first with `canopy cache`):

  P3  8 heads in one `canopy train` vs 8 sequential single-head `canopy train` runs
      (separate processes, as a user would run them).                   goal >= 5x
  P4  the same 8 heads (architectures, optimizers, hyperparameters, epochs, batch order)
      written as an idiomatic PyTorch-Python loop over the same cached features in memory:
      canopy's whole process (start, load, train, evaluate, export) vs Python's training
      and evaluation loop alone; and test accuracy per head, as the mean over one seed per
      repeat (train.seed = repeat; initial weights, dropout and batch order all follow it,
      so the mean averages seed noise out of the comparison).     goal >= 2x, +-0.5 points
  P5  8 same-shape heads: canopy (fused) vs torch.func.stack_module_state + vmap in
      Python, again canopy's whole process vs Python's loop alone.     goal >= 1.0x
  P7  the one-run trainer with 1 and 2 TBB workers: speed-up and peak RSS of each run.
  fusion: 8 same-input heads (linear, narrow MLPs, wide MLPs) trained as canopy decides
      (train.fuse = auto: each group timed fused and alone) and with --no-fuse, by the
      training time canopy reports (start-up and loading aside).

Python runs in this process with the venv's torch, the same build as canopy's LibTorch.

  train_compare.py --canopy BUILD/runners/canopy [--config configs/fmnist_lite0.ini]
                   [--repeats 5] [--epochs 15]
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from canopy_runs import run_main, work_dir

GROUP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]

# The 8 heads of P3/P4: several head types and optimizers on the 10 classes and the group.
HEADS8 = [
    dict(name="class_linear", head="linear", optimizer="adam", lr=1e-3),
    dict(name="class_linear_cosine", head="linear", optimizer="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine"),
    # SGD at lr 0.01 diverges in some seeds on these unstandardised features (72-86%); 0.001 does not.
    dict(name="class_sgd", head="linear", optimizer="sgd", lr=0.001, momentum=0.9),
    dict(name="class_mlp", head="mlp", hidden=512, dropout=0.5, optimizer="adam", lr=1e-3),
    dict(name="class_mlp_gelu", head="mlp", hidden=256, activation="gelu", dropout=0.3, optimizer="adamw", lr=1e-3),
    dict(name="class_mlp_small", head="mlp", hidden=64, optimizer="adam", lr=2e-3),
    dict(name="group_linear", head="linear", optimizer="adam", lr=1e-3, group=True),
    dict(name="group_mlp", head="mlp", hidden=128, dropout=0.2, optimizer="adam", lr=1e-3, group=True),
]
# The 8 same-shape heads of P5 (an ensemble: same settings, different initial weights).
SAME8 = [dict(name=f"member{i}", head="mlp", hidden=128, optimizer="adam", lr=1e-3) for i in range(8)]
# Fusion by width: a learning-rate sweep of linear heads, narrow MLPs, wide MLPs.
FUSION_SETS = {
    "8 linear heads (lr sweep)": [dict(name=f"lin{i}", head="linear", optimizer="adam", lr=1e-3 * (i + 1)) for i in range(8)],
    "8 MLPs, hidden 64": [dict(name=f"mlp{i}", head="mlp", hidden=64, optimizer="adam", lr=1e-3 * (i + 1)) for i in range(8)],
    "8 MLPs, hidden 256": [dict(name=f"wide{i}", head="mlp", hidden=256, optimizer="adam", lr=1e-3 * (i + 1)) for i in range(8)],
}


def base_sections(config_path):
    text = open(config_path).read()
    return text[: text.index("[task.")]


def write_config(path, base, out_dir, heads, epochs, extra=""):
    lines = [re.sub(r"(?m)^out_dir = .*$", f"out_dir = {out_dir}", base)]
    lines[0] = re.sub(r"(?m)^epochs = .*$", f"epochs = {epochs}", lines[0])
    lines[0] = lines[0].replace("[train]\n", "[train]\ntensorboard = false\n" + extra)
    for h in heads:
        lines.append(f"[task.{h['name']}]\nhead = {h['head']}\noptimizer = {h['optimizer']}\nlr = {h['lr']}\n")
        for key in ("weight_decay", "momentum", "schedule"):
            if key in h:
                lines.append(f"{key} = {h[key]}\n")
        for key in ("hidden", "dropout", "activation"):  # the head's own options
            if key in h:
                lines.append(f"head.{key} = {h[key]}\n")
        if h.get("group"):
            lines.append("label_map = " + ",".join(map(str, GROUP)) + "\n")
        if h["optimizer"] == "sgd" and "momentum" not in h:
            lines.append("momentum = 0\n")
    open(path, "w").write("".join(lines))


def run_process(args, want_stdout=False):
    """Wall seconds and peak RSS (MiB) of one child process (and its stdout if asked)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(args)} failed:\n{err.read().decode()[-2000:]}")
        out.seek(0)
        text = out.read().decode()
    if want_stdout:
        return wall, usage.ru_maxrss / 1024.0, text
    return wall, usage.ru_maxrss / 1024.0


def fmt(values, unit="s", digits=2):
    return f"median {statistics.median(values):.{digits}f}{unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def ratio_line(name, values, goal):
    return f"    RATIO {name} = {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})   goal {goal}"


# ---------------------------------------------------------------- the Python side
def make_head(h, d):
    k = 4 if h.get("group") else 10
    if h["head"] == "linear":
        return nn.Linear(d, k)
    act = nn.GELU() if h.get("activation") == "gelu" else nn.ReLU()
    layers = [nn.Linear(d, h["hidden"]), act]
    if h.get("dropout", 0) > 0:
        layers.append(nn.Dropout(h["dropout"]))
    layers.append(nn.Linear(h["hidden"], k))
    return nn.Sequential(*layers)


def make_optimizer(h, params):
    wd = h.get("weight_decay", 0.0)
    if h["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=h["lr"], momentum=h.get("momentum", 0.0), weight_decay=wd)
    if h["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=h["lr"], weight_decay=wd)
    return torch.optim.Adam(params, lr=h["lr"], weight_decay=wd)


def canopy_order(n, seed, epoch):
    """The batch order canopy's in-memory source uses (same generator, same seed)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch * 7919)
    return torch.randperm(n, generator=g)


def python_train(heads, data, epochs, batch_size, seed):
    """Idiomatic PyTorch: every head trained on every batch, evaluated every epoch."""
    xtr, ytr, xte, yte = data
    ytr_group, yte_group = torch.tensor(GROUP)[ytr], torch.tensor(GROUP)[yte]
    torch.manual_seed(seed)
    models = [make_head(h, xtr.shape[1]) for h in heads]
    opts = [make_optimizer(h, m.parameters()) for h, m in zip(heads, models)]
    t = time.perf_counter()
    for epoch in range(epochs):
        for h, o in zip(heads, opts):
            if h.get("schedule") == "cosine":
                for g in o.param_groups:
                    g["lr"] = h["lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = canopy_order(len(xtr), seed, epoch)
        for m in models:
            m.train()
        for i in range(0, len(xtr), batch_size):
            idx = order[i:i + batch_size]
            x = xtr[idx]
            for h, m, o in zip(heads, models, opts):
                y = (ytr_group if h.get("group") else ytr)[idx]
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
        accs = []
        with torch.no_grad():
            for h, m in zip(heads, models):
                m.eval()
                y = yte_group if h.get("group") else yte
                accs.append((m(xte).argmax(1) == y).float().mean().item())
    return time.perf_counter() - t, accs


def python_vmap(heads, data, epochs, batch_size, seed):
    """The same-shape heads as one stacked model: torch.func.stack_module_state + vmap."""
    from torch.func import functional_call, stack_module_state

    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    models = [make_head(h, xtr.shape[1]) for h in heads]
    params, buffers = stack_module_state(models)
    base = make_head(heads[0], xtr.shape[1]).to("meta")

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    ensemble = torch.vmap(one, in_dims=(0, 0, None))
    opt = torch.optim.Adam(list(params.values()), lr=heads[0]["lr"])
    n_heads = len(heads)
    t = time.perf_counter()
    for epoch in range(epochs):
        order = canopy_order(len(xtr), seed, epoch)
        for i in range(0, len(xtr), batch_size):
            idx = order[i:i + batch_size]
            logits = ensemble(params, buffers, xtr[idx])  # [H, B, K]
            y = ytr[idx]
            # Sum of the per-head mean losses: each head gets its own gradient.
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(n_heads)) * n_heads
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs = (ensemble(params, buffers, xte).argmax(2) == yte).float().mean(1).tolist()
    return time.perf_counter() - t, accs


def step_compute_seconds(heads, data, batch_size, steps=60):
    """Median time of one training step of every head on one core (forward, backward, optimizer)."""
    xtr, ytr = data[0], data[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = [make_head(h, xtr.shape[1]) for h in heads]
    opts = [make_optimizer(h, m.parameters()) for h, m in zip(heads, models)]
    x, y = xtr[:batch_size], torch.tensor(GROUP)[ytr[:batch_size]]  # 4 classes fit every head
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        if i >= 5:
            times.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    return statistics.median(times)


def canopy_accuracies(out_dir, heads):
    return [json.load(open(os.path.join(out_dir, "heads", h["name"] + ".json")))["eval_accuracy"] for h in heads]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--config", default="configs/fmnist_lite0.ini")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    work = work_dir("canopy-train-compare-")
    # train.fuse = auto times each group once per machine and records it: a fresh record here,
    # so the decisions are the ones this machine makes now (the first run of each config measures).
    calibration = os.path.join(work, "fusion.tsv")
    os.environ["CANOPY_FUSION_CALIBRATION"] = calibration
    base = base_sections(a.config)
    cache_dir = re.search(r"(?m)^path = (.*)$", base[base.index("[cache]"):]).group(1).strip()
    batch_size = int(re.search(r"(?m)^batch_size = (\d+)$", base[base.index("[train]"):]).group(1))
    seed = int(re.search(r"(?m)^seed = (\d+)$", base[base.index("[train]"):]).group(1))
    with h5py.File(os.path.join(cache_dir, "cache.h5"), "r") as f:
        data = (torch.from_numpy(f["train/features"][:]).float(), torch.from_numpy(f["train/labels/class"][:]),
                torch.from_numpy(f["test/features"][:]).float(), torch.from_numpy(f["test/labels/class"][:]))
    print(f"train_compare: {a.config}, {len(data[0])} train x {data[0].shape[1]} features, {len(data[2])} eval rows, "
          f"{a.epochs} epochs, batch {batch_size}, {a.repeats} repeats; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    one_cfg = os.path.join(work, "heads8.ini")
    write_config(one_cfg, base, os.path.join(work, "one"), HEADS8, a.epochs)
    singles = []
    for h in HEADS8:
        path = os.path.join(work, f"single_{h['name']}.ini")
        # A lone head gets both cores through LibTorch's threads (its fastest setting).
        write_config(path, base, os.path.join(work, "single"), [h], a.epochs, "intra_op_threads = 2\n")
        singles.append(path)
    same_cfg = os.path.join(work, "same8.ini")
    write_config(same_cfg, base, os.path.join(work, "same"), SAME8, a.epochs)
    train = lambda cfg, *extra: run_process([a.canopy, "train", "--config", cfg, "--progress", "quiet", *extra])

    fusion_cfgs = {}
    for k, (label, heads) in enumerate(FUSION_SETS.items()):
        fusion_cfgs[label] = os.path.join(work, f"fusion{k}.ini")
        write_config(fusion_cfgs[label], base, os.path.join(work, f"fusion{k}"), heads, a.epochs)
    fusion = {label: ([], []) for label in FUSION_SETS}

    def train_seconds(cfg, *extra):
        text = run_process([a.canopy, "train", "--config", cfg, "--progress", "quiet", *extra], want_stdout=True)[2]
        return float(re.search(r"train ([\d.]+)s", text).group(1))

    train(one_cfg)  # warm-up: page cache, dynamic loader
    start = statistics.median(run_process([a.canopy, "version"])[0] for _ in range(5))
    step = step_compute_seconds(HEADS8, data, batch_size)
    steps = a.epochs * math.ceil(len(data[0]) / batch_size)
    one, apart, p3, w1, w2, rss1, rss2, p7 = [], [], [], [], [], [], [], []
    py, p4, fused, unfused, vm, p5 = [], [], [], [], [], []
    canopy_acc, py_acc, same_acc, vm_acc = [], [], [], []
    for r in range(a.repeats):
        print(f"[train_compare] repeat {r + 1}/{a.repeats}", file=sys.stderr)
        one.append(train(one_cfg, "--set", f"train.seed={seed + r}")[0])
        canopy_acc.append(canopy_accuracies(os.path.join(work, "one"), HEADS8))
        apart.append(sum(train(c)[0] for c in singles))
        p3.append(apart[-1] / one[-1])
        t1, m1 = train(one_cfg, "--set", "train.workers=1")
        t2, m2 = train(one_cfg, "--set", "train.workers=2")
        w1.append(t1), w2.append(t2), rss1.append(m1), rss2.append(m2), p7.append(t1 / t2)
        t_py, acc = python_train(HEADS8, data, a.epochs, batch_size, seed + r)
        py.append(t_py)
        py_acc.append(acc)
        p4.append(t_py / one[-1])
        fused.append(train(same_cfg)[0])
        same_acc.append(statistics.mean(canopy_accuracies(os.path.join(work, "same"), SAME8)))
        unfused.append(train(same_cfg, "--no-fuse")[0])
        t_vm, acc = python_vmap(SAME8, data, a.epochs, batch_size, seed)
        vm.append(t_vm)
        vm_acc.append(statistics.mean(acc))
        p5.append(t_vm / fused[-1])
        for label, cfg in fusion_cfgs.items():
            fusion[label][0].append(train_seconds(cfg))
            fusion[label][1].append(train_seconds(cfg, "--no-fuse"))

    print(f"\n[P3] {len(HEADS8)} heads: one canopy run vs {len(HEADS8)} sequential single-head runs (processes)")
    print(f"    one run          {fmt(one)}")
    print(f"    separate runs    {fmt(apart)}")
    print(ratio_line("separate/one", p3, ">= 5"))
    print(f"\n[P4] the same {len(HEADS8)} heads in PyTorch-Python (training loop alone) vs canopy (whole process)")
    print(f"    canopy           {fmt(one)}")
    print(f"    PyTorch-Python   {fmt(py)}")
    print(ratio_line("python/canopy", p4, ">= 2"))
    print(f"    test accuracy, mean over {a.repeats} seeds (range over seeds): canopy | Python | difference of means")
    worst = 0.0
    for k, h in enumerate(HEADS8):
        c = [100 * acc[k] for acc in canopy_acc]
        p = [100 * acc[k] for acc in py_acc]
        diff = statistics.mean(c) - statistics.mean(p)
        worst = max(worst, abs(diff))
        print(f"      {h['name']:<22} {statistics.mean(c):6.2f}% ({min(c):.2f}-{max(c):.2f}) | "
              f"{statistics.mean(p):6.2f}% ({min(p):.2f}-{max(p):.2f}) | {diff:+.2f}")
    print(f"    largest difference of means {worst:.2f} points   goal <= 0.5")
    print(f"\n[P5] {len(SAME8)} same-shape heads ({SAME8[0]['head']} hidden {SAME8[0]['hidden']}): canopy fused vs vmap")
    print(f"    canopy fused     {fmt(fused)}")
    print(f"    canopy unfused   {fmt(unfused)}")
    print(f"    Python vmap      {fmt(vm)}")
    print(ratio_line("vmap/canopy", p5, ">= 1.0"))
    print(f"    mean test accuracy of the 8: canopy {100 * statistics.mean(same_acc):.2f}%, vmap {100 * statistics.mean(vm_acc):.2f}%")
    print("\n[fusion] canopy fused vs --no-fuse: training time as canopy reports it (no start-up, no loading)")
    for label, (f, u) in fusion.items():
        r = [b / a_ for a_, b in zip(f, u)]
        print(f"    {label:<26} fused {fmt(f)}, alone {fmt(u)}")
        print(ratio_line(f"alone/fused, {label}", r, "(> 1: fusion helps)"))
    cores = os.cpu_count()
    work1 = statistics.median(w1) - start  # one run's work on one core, start-up aside
    floor = work1 / cores + start
    print(f"\n[bounds] what {cores} cores allow, from parts measured above:")
    print(f"    canopy's one run on 1 core (P7, 1 worker): {statistics.median(w1):.2f} s, of which starting the process "
          f"(LibTorch loaded, `canopy version`) {start:.2f} s")
    print(f"    a perfect {cores}-core run: {work1:.2f} / {cores} + {start:.2f} = {floor:.2f} s; canopy's: "
          f"{statistics.median(one):.2f} s ({floor / statistics.median(one):.0%} of ideal)")
    print(f"    => P3 at most {statistics.median(apart) / floor:.2f}x (separate runs {statistics.median(apart):.2f} s),"
          f" P4 at most {statistics.median(py) / floor:.2f}x (Python {statistics.median(py):.2f} s)")
    print(f"    for scale: one step of the 8 heads in PyTorch on one core takes {1e3 * step:.2f} ms; "
          f"{steps} steps = {steps * step:.2f} s")
    print(f"\n[P7] one canopy run of {len(HEADS8)} heads by TBB workers (1 LibTorch thread each)")
    print(f"    1 worker         {fmt(w1)}, peak RSS {fmt(rss1, ' MiB', 0)}")
    print(f"    2 workers        {fmt(w2)}, peak RSS {fmt(rss2, ' MiB', 0)}")
    print(ratio_line("speed-up 1->2 cores", p7, "(2 cores: <= 2)"))
    print("\n[fusion decisions] train.fuse = auto on this machine (group shape: fused, alone per forward+backward):")
    for line in open(calibration) if os.path.exists(calibration) else []:
        f = line.rstrip("\n").split("\t")
        shape = f[1][f[1].index(" batch=") + 1:]
        print(f"    {shape:<48} {f[2]:<6} fused {float(f[3]) / 1e3:.2f} ms, alone {float(f[4]) / 1e3:.2f} ms")
    subprocess.run(["rm", "-rf", work])
    return 0


if __name__ == "__main__":
    run_main(main)
