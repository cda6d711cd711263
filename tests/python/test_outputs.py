#!/usr/bin/env python3
"""Reads canopy's outputs with the tools users read them with.

Runs the real `canopy` binary on a tiny TorchScript trunk (scripted here) over a slice of
Fashion-MNIST, then checks:
  * the cache opens with h5py: features, labels, ids and the fingerprint attributes;
  * the cached features equal what Python torch computes from the same images and trunk;
  * `h5ls -r` lists the documented layout;
  * every exported head loads with the `safetensors` package and, in plain torch,
    reproduces the accuracy canopy reported for it;
  * the example program registers its own head and trains it through the same CLI; over a
    trained top, the head reads the top's pooled output (not the cached prefix's) and
    `evaluate` rebuilds it over the fine-tuned trunk to the card's accuracy.
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import torch

from support import FMNIST, check, finish, read_idx, tiny_block_trunk, tiny_trunk_sections, work_dir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from rebuild_head import head_answers, rebuild_head  # noqa: E402  (the snippet docs/training.md shows)
import torch.nn.functional as F
from safetensors.torch import load_file

TRAIN, TEST, SIZE = 1000, 300, 32
D = 24 * 8 * 8  # the tiny trunk's [24, 8, 8] output, flattened


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv(x))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--custom", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    work = work_dir("canopy-py-")
    trunk_path = os.path.join(work, "tiny.pt")
    model = Tiny()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    torch.jit.script(model.eval()).save(trunk_path)
    sha = hashlib.sha256(open(trunk_path, "rb").read()).hexdigest()
    cache = os.path.join(work, "cache")
    view = os.path.join(cache, "cache.h5")
    out_dir = os.path.join(work, "out")
    config = os.path.join(work, "job.ini")
    with open(config, "w") as f:
        f.write(f"""[data]
dir = {FMNIST}
train_limit = {TRAIN}
test_limit = {TEST}
[preprocess]
resize = {SIZE}
mean = 0.485,0.456,0.406
std = 0.229,0.224,0.225
[trunk]
path = {trunk_path}
sha256 = {sha}
device = cpu
pooling = flatten
[cache]
path = {cache}
batch_size = 100
shard_rows = 300
[train]
out_dir = {out_dir}
epochs = 5
batch_size = 50
[task.fine]
head = linear
lr = 0.01
[task.coarse]
head = mlp
head.hidden = 32
label_map = 0,1,0,0,0,2,0,2,3,2
class_names = tops,bottoms,footwear,bags
lr = 0.01
[task.ink]
kind = regression
labels = ink
head = linear
lr = 0.01
""")
    run = subprocess.run([a.canopy, "run", "--config", config, "--progress", "lines"],
                         capture_output=True, text=True)
    print(run.stdout)
    check(run.returncode == 0, f"canopy run exits 0 (got {run.returncode}: {run.stderr[-2000:]})")
    if run.returncode != 0:
        return 1
    check("[canopy] cache:" in run.stderr and "(100%)" in run.stderr, "plain progress lines when not a terminal")

    # --- the cache, with h5py -------------------------------------------------
    # The view reads its shards through HDF5 virtual datasets, from any working directory.
    os.chdir("/")
    with h5py.File(view, "r") as h:
        check(h["train/features"].is_virtual, "train/features is a virtual dataset over the shards")
        attrs = dict(h.attrs)
        check(int(attrs["canopy_schema"]) == 2, "canopy_schema attribute is 2")
        fp = attrs["fingerprint"]
        fp = fp.decode() if isinstance(fp, bytes) else fp
        check(len(fp) == 64 and all(c in "0123456789abcdef" for c in fp), "fingerprint is a SHA-256")
        desc = attrs["description"]
        desc = desc.decode() if isinstance(desc, bytes) else desc
        check(hashlib.sha256(desc.encode()).hexdigest() == fp, "fingerprint = SHA-256 of the description")
        ts = attrs["trunk_sha256"]
        check((ts.decode() if isinstance(ts, bytes) else ts) == sha, "trunk_sha256 matches the trunk file")
        pre = attrs["preprocessing"]
        check(f"resize={SIZE}" in (pre.decode() if isinstance(pre, bytes) else pre), "preprocessing recorded")
        feats = h["train/features"]
        check(feats.shape == (TRAIN, D) and feats.dtype == np.float32, f"train/features is float32 [{TRAIN}, {D}]: {feats.shape} {feats.dtype}")
        labels = h["train/labels/class"][:]
        truth = read_idx(f"{FMNIST}/train-labels-idx1-ubyte.gz")[:TRAIN]
        check(labels.dtype == np.int64 and np.array_equal(labels, truth), "train/labels/class = the data set's labels")
        check(np.array_equal(h["train/ids"][:], np.arange(TRAIN)), "train/ids are the sample indices")
        ink = h["train/labels/ink"][:]
        images = read_idx(f"{FMNIST}/train-images-idx3-ubyte.gz")[:TRAIN]
        check(ink.dtype == np.float64 and np.allclose(ink, images.reshape(TRAIN, -1).mean(1) / 255, atol=1e-12),
              "train/labels/ink is float64 = each image's mean pixel intensity / 255")
        test_ink = h["test/labels/ink"][:]
        check(h["test/features"].shape == (TEST, D), "test split present")
        cached_test = h["test/features"][:]
        test_labels = h["test/labels/class"][:]

    # --- the same features computed by Python torch --------------------------
    imgs = torch.from_numpy(read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:TEST].copy()).float().div(255)
    x = F.interpolate(imgs.unsqueeze(1), size=(SIZE, SIZE), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    trunk = torch.jit.load(trunk_path).eval()
    with torch.no_grad():
        ref = trunk((x - mean) / std).flatten(1).numpy()
    err = np.abs(ref - cached_test).max()
    check(np.allclose(ref, cached_test, rtol=1e-4, atol=1e-4), f"cached features match Python torch (max abs diff {err:.2e})")

    # --- h5ls -----------------------------------------------------------------
    ls = subprocess.run(["h5ls", "-r", view], capture_output=True, text=True).stdout
    check(any(l.startswith("/train/features") and f"{{{TRAIN}, {D}}}" in l for l in ls.splitlines()),
          f"h5ls lists /train/features as Dataset {{{TRAIN}, {D}}}")
    check("/test/labels/class" in ls, "h5ls lists /test/labels/class")

    # --- exported heads, with safetensors + torch ------------------------------
    feats_t = torch.from_numpy(cached_test)
    for name, remap in (("fine", None), ("coarse", [0, 1, 0, 0, 0, 2, 0, 2, 3, 2])):
        card = json.load(open(os.path.join(out_dir, "heads", f"{name}.json")))
        w = load_file(os.path.join(out_dir, "heads", card["weights"]))
        per_class = card["per_class"]
        check(len(per_class) == (10 if remap is None else 4) and sum(c["support"] for c in per_class) == TEST,
              f"{name}: the card has a per-class report over all {TEST} eval rows")
        check(card["in_features"] == D and card["trunk_sha256"] == sha, f"{name}: card names dims and trunk")
        with torch.no_grad():
            if card["head"] == "linear":
                logits = feats_t @ w["linear.weight"].T + w["linear.bias"]
            else:
                h1 = F.relu(feats_t @ w["layers.0.weight"].T + w["layers.0.bias"])
                logits = h1 @ w["layers.2.weight"].T + w["layers.2.bias"]
        y = torch.from_numpy(test_labels)
        if remap is not None:
            y = torch.tensor(remap)[y]
            check(card["class_names"] == ["tops", "bottoms", "footwear", "bags"], "coarse: class names in the card")
        acc = (logits.argmax(1) == y).float().mean().item()
        k = len(per_class)
        confusion = np.bincount(y.numpy() * k + logits.argmax(1).numpy(), minlength=k * k).reshape(k, k)
        check(card.get("confusion") == confusion.tolist(),
              f"{name}: the card's confusion matrix (rows: truth) is torch's on the eval split")
        with torch.no_grad():  # the documented snippet rebuilds the head from its card alone
            rebuilt = rebuild_head(os.path.join(out_dir, "heads", f"{name}.json"))(feats_t)
        check(torch.allclose(rebuilt, logits, atol=1e-5), f"{name}: scripts/rebuild_head.py rebuilds it from the card")
        pred = logits.argmax(1)
        recalls = [((pred == k) & (y == k)).sum().item() / max(1, (y == k).sum().item()) for k in range(len(per_class))]
        check(all(abs(r - c["recall"]) <= 1e-5 for r, c in zip(recalls, per_class)),
              f"{name}: per-class recall in the card matches torch")
        check(abs(acc - card["eval_accuracy"]) <= 1.0 / TEST,
              f"{name}: torch reproduces canopy's accuracy ({acc:.4f} vs {card['eval_accuracy']:.4f})")
        if remap is None:  # 10 classes: top-5 accuracy too
            top5 = (logits.topk(5, dim=1).indices == y.unsqueeze(1)).any(1).float().mean().item()
            check(card["eval_top5_accuracy"] is not None and abs(top5 - card["eval_top5_accuracy"]) <= 1.0 / TEST
                  and top5 >= acc, f"{name}: torch reproduces canopy's top-5 accuracy "
                  f"({top5:.4f} vs {card['eval_top5_accuracy']})")
        else:
            check(card["eval_top5_accuracy"] is None, f"{name}: no top-5 accuracy over 4 classes")
        check(acc > 0.6, f"{name}: accuracy {acc:.3f} is far above chance")

    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training.md")).read()
    snippet = open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "rebuild_head.py")).read()
    check(snippet.split('"""', 2)[2].strip() in doc, "docs/training.md shows scripts/rebuild_head.py as it is")

    # A regression head: torch on the exported weights reproduces the card's MAE and R^2.
    card = json.load(open(os.path.join(out_dir, "heads", "ink.json")))
    w = load_file(os.path.join(out_dir, "heads", "ink.safetensors"))
    with torch.no_grad():
        out = (feats_t @ w["linear.weight"].T + w["linear.bias"]).squeeze(1).double().numpy()
    pred_ink = out * card["target_std"] + card["target_mean"]  # the head predicts standardised ink
    check(abs(card["target_mean"] - ink.mean()) < 1e-9 and abs(card["target_std"] - ink.std(ddof=1)) < 1e-9,
          "ink: the card's target scale is the train split's mean and std")
    mae = np.abs(pred_ink - test_ink).mean()
    r2 = 1 - ((pred_ink - test_ink) ** 2).sum() / ((test_ink - test_ink.mean()) ** 2).sum()
    check(card["kind"] == "regression" and card["out_features"] == 1, "ink: the card says regression, one output")
    check(abs(mae - card["eval_mae"]) < 1e-6 and abs(r2 - card["eval_r2"]) < 1e-5,
          f"ink: torch reproduces canopy's MAE {mae:.5f} (card {card['eval_mae']:.5f}) and R^2 {r2:.4f}")
    check(r2 > 0.5, f"ink: R^2 {r2:.3f} is far better than predicting the mean")
    with torch.no_grad():
        rebuilt_ink = head_answers(card, rebuild_head(os.path.join(out_dir, "heads", "ink.json"))(feats_t))["values"]
    check(np.abs(rebuilt_ink.double().numpy() - pred_ink).max() < 1e-5,
          "ink: scripts/rebuild_head.py's head_answers gives the values in the label's units")

    # --- canopy predict: trunk + every head in one pass ---------------------------
    pred_path = os.path.join(work, "pred.csv")
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", str(TEST), "--output", pred_path, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, f"canopy predict exits 0 ({r.stderr[-300:]})")
    rows = open(pred_path).read().splitlines()
    check(rows[0] == "id,coarse,fine,ink" and len(rows) == TEST + 1, f"predict writes a header and {TEST} rows")
    with torch.no_grad():
        w = load_file(os.path.join(out_dir, "heads", "fine.safetensors"))
        expect = (feats_t @ w["linear.weight"].T + w["linear.bias"]).argmax(1)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    agree = sum(row.split(",")[2] == names[int(e)] for row, e in zip(rows[1:], expect)) / TEST
    check(agree >= 0.99, f"predict agrees with torch on the cached features for {100 * agree:.1f}% of rows")
    check(all(row.split(",")[1] in ("tops", "bottoms", "footwear", "bags") for row in rows[1:]), "coarse predictions use its class names")
    got_ink = np.array([float(row.split(",")[3]) for row in rows[1:]])
    check(np.abs(got_ink - pred_ink).max() < 1e-4, "predict writes the regression head's values")
    # With --scores (JSON lines): each class's softmax probability next to the prediction.
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", "50", "--format", "jsonl", "--scores", "--progress", "quiet"],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"canopy predict --scores exits 0 ({r.stderr[-300:]})")
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    fine_cols = [f"fine:{n}" for n in names]
    check(len(lines) == 50 and all(c in lines[0] for c in fine_cols) and "ink:" not in "".join(lines[0]),
          "predict --scores adds one column per class of each classifier (none for regression)")
    with torch.no_grad():
        probs = (feats_t[:50] @ w["linear.weight"].T + w["linear.bias"]).softmax(1).numpy()
    got = np.array([[l[c] for c in fine_cols] for l in lines])
    check(np.abs(got - probs).max() < 1e-4 and np.allclose(got.sum(1), 1, atol=1e-4),
          f"the scores are torch's softmax of the head (max diff {np.abs(got - probs).max():.1e})")
    check(all(l["fine"] == names[int(np.argmax([l[c] for c in fine_cols]))] for l in lines),
          "each prediction is the class with the highest score")
    # With --top K: each multiclass head's K most probable classes and their probabilities.
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", "50", "--format", "jsonl", "--top", "5", "--progress", "quiet"],
                       capture_output=True, text=True)
    tops = [json.loads(l) for l in r.stdout.splitlines()]

    def top_right(i, t):  # names in torch's order (a near-tie, within 1e-4, either way), probabilities to 1e-4
        got = [names.index(t[f"fine:top{j}"]) for j in range(1, 6)]
        p = [t[f"fine:top{j}_p"] for j in range(1, 6)]
        best = sorted(probs[i], reverse=True)[:5]
        return all(abs(probs[i, c] - q) < 1e-4 and abs(q - b) < 1e-4 for c, q, b in zip(got, p, best))
    check(r.returncode == 0 and len(tops) == 50 and all(top_right(i, t) for i, t in enumerate(tops)),
          "predict --top 5: fine's five most probable classes, best first, with torch's probabilities")
    check(tops and "coarse:top4_p" in tops[0] and "coarse:top5" not in tops[0] and not any(k.startswith("ink:") for k in tops[0]),
          "... capped at coarse's 4 classes, and none for the regression head")
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", "3", "--top", "2", "--progress", "quiet"], capture_output=True, text=True)
    header = r.stdout.splitlines()[0].split(",") if r.returncode == 0 else []
    check(header[-8:] == [f"{t}:top{j}{p}" for t in ("coarse", "fine") for j in (1, 2) for p in ("", "_p")],
          f"predict --top in CSV: a class and a probability column per rank ({header[-8:]})")

    # --- canopy export: the whole model as one TorchScript file, loaded by torch alone ---
    model_path = os.path.join(work, "model.pt")
    r = subprocess.run([a.canopy, "export", "--config", config, "--output", model_path], capture_output=True, text=True)
    check(r.returncode == 0 and f"wrote {model_path}" in r.stderr, f"canopy export exits 0 ({r.stderr[-300:]})")
    # --output /dev/stdout into a pipe: the same bytes on stdout, the report on stderr.
    r = subprocess.run([a.canopy, "export", "--config", config, "--output", "/dev/stdout"], capture_output=True)
    check(r.returncode == 0 and b"wrote /dev/stdout" in r.stderr and r.stdout == open(model_path, "rb").read(),
          f"canopy export --output /dev/stdout writes the model file to a pipe ({r.stderr[-200:]})")
    extra = {"canopy/model.json": ""}
    model_file = torch.jit.load(model_path, _extra_files=extra)
    meta = json.loads(extra["canopy/model.json"])
    check(meta["trunk_sha256"] == sha and sorted(meta["heads"]) == ["coarse", "fine", "ink"]
          and meta["heads"]["fine"] == {k: v for k, v in json.load(open(os.path.join(out_dir, "heads", "fine.json"))).items()
                                        if k != "card_crc32c"},
          "the model file records the trunk's SHA-256 and each head's card")
    check(dict(model_file.kinds) == {"fine": "multiclass", "coarse": "multiclass", "ink": "regression"}
          and model_file.class_names["coarse"] == ["tops", "bottoms", "footwear", "bags"]
          and model_file.class_names["fine"] == names, "its kinds and class names are the cards'")
    raw = torch.from_numpy(read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:50].copy())
    with torch.no_grad():
        got = model_file(raw)
    for task in ("fine", "coarse"):
        want = np.array([[l[f"{task}:{n}"] for n in model_file.class_names[task]] for l in lines])
        diff = np.abs(got[task].numpy() - want).max()
        check(diff < 1e-4, f"model file: {task}'s probabilities on 50 raw images are canopy predict's (max diff {diff:.1e})")
    want_ink = np.array([float(row.split(",")[3]) for row in rows[1:51]])
    check(got["ink"].shape == (50,) and np.abs(got["ink"].numpy() - want_ink).max() < 1e-4,
          "model file: ink's values are canopy predict's, in the label's units")
    with torch.no_grad():  # its features are the cache's; its heads on them, softmax of the exported head's logits
        f = model_file.features(raw)
        on_cached = model_file.heads(feats_t[:50])["fine"]
    check(np.abs(f.numpy() - cached_test[:50]).max() < 1e-4, "model file: features(images) are the cached test features")
    check(torch.allclose(on_cached, (feats_t[:50] @ w["linear.weight"].T + w["linear.bias"]).softmax(1), atol=1e-6),
          "model file: heads(cached features) is the exported head's softmax")
    # Any size and 3 channels are taken (resized as [preprocess] says); other pixels are refused.
    colour = raw[:4].unsqueeze(1).expand(-1, 3, -1, -1)
    big = F.interpolate(colour.float(), size=(56, 56), mode="nearest").to(torch.uint8)
    with torch.no_grad():
        check(torch.allclose(model_file(colour)["fine"], got["fine"][:4], atol=1e-5)
              and model_file(big)["fine"].shape == (4, 10), "model file: 3-channel images of any size are taken")
    try:
        model_file(raw.float())
        refused = ""
    except Exception as e:  # torch.jit.Error
        refused = str(e)
    check("images must be uint8 pixels (0-255)" in refused, f"model file: float pixels are refused ({refused[-80:]})")

    # --- canopy evaluate: the exported model's metrics on labelled inputs -----------
    # On the run's own test split (the first TEST rows of t10k), every metric is the card's.
    evaluate = [a.canopy, "evaluate", "--config", config, "--progress", "quiet", "--json"]
    r = subprocess.run(evaluate + ["--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST)],
                       capture_output=True, text=True)
    check(r.returncode == 0, f"canopy evaluate exits 0 ({r.stderr[-300:]})")
    report = json.loads(r.stdout) if r.returncode == 0 else {"heads": []}
    by_task = {h["task"]: h for h in report["heads"]}
    check(sorted(by_task) == ["coarse", "fine", "ink"] and report["rows"] == TEST, f"evaluate scores every head on {TEST} rows")
    for name, keys in (("fine", ("accuracy", "macro_f1", "top5_accuracy")), ("coarse", ("accuracy", "macro_f1")),
                       ("ink", ("mae", "rmse", "r2"))):
        card = json.load(open(os.path.join(out_dir, "heads", f"{name}.json")))
        got = by_task.get(name, {})
        diffs = {k: abs(got.get(k, -9) - card[f"eval_{k}"]) for k in keys}
        check(max(diffs.values()) < 1e-6 and [c["f1"] for c in got.get("per_class", [])] ==
              [c["f1"] for c in card["per_class"]][:len(got.get("per_class", []))],
              f"evaluate on the run's test split: {name}'s {', '.join(keys)} are its card's ({diffs})")
    # On rows the run never saw (t10k rows 300-799, written as idx files with the labels beside
    # them under the data sets' names): evaluate's metrics are those of predict's answers.
    new_images = read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[TEST:TEST + 500]
    new_labels = read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[TEST:TEST + 500]
    new_dir = os.path.join(work, "new")
    os.makedirs(new_dir)

    def write_idx(path, array):
        with gzip.open(path, "wb") as f:
            f.write(bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes())

    write_idx(os.path.join(new_dir, "new-images-idx3-ubyte.gz"), new_images)
    write_idx(os.path.join(new_dir, "new-labels-idx1-ubyte.gz"), new_labels)
    new_input = os.path.join(new_dir, "new-images-idx3-ubyte.gz")
    report_path = os.path.join(work, "evaluation.json")
    r = subprocess.run(evaluate[:-1] + ["--input", new_input, "--output", report_path], capture_output=True, text=True)
    check(r.returncode == 0 and "per-class F1 on" in r.stdout and os.path.exists(report_path),
          f"evaluate on new rows prints its table and writes --output ({r.stderr[-300:]})")
    p = subprocess.run([a.canopy, "predict", "--config", config, "--input", new_input, "--progress", "quiet"],
                       capture_output=True, text=True)
    rows = [row.split(",") for row in p.stdout.splitlines()[1:]]
    report = json.load(open(report_path)) if os.path.exists(report_path) else {"heads": []}
    by_task = {h["task"]: h for h in report["heads"]}
    coarse_names = ["tops", "bottoms", "footwear", "bags"]
    remap = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]
    fine_acc = np.mean([row[2] == names[y] for row, y in zip(rows, new_labels)])
    coarse_acc = np.mean([row[1] == coarse_names[remap[y]] for row, y in zip(rows, new_labels)])
    truth_ink = new_images.reshape(500, -1).mean(1) / 255
    pred_ink = np.array([float(row[3]) for row in rows])
    r2 = 1 - ((pred_ink - truth_ink) ** 2).sum() / ((truth_ink - truth_ink.mean()) ** 2).sum()
    got = (by_task.get("fine", {}).get("accuracy"), by_task.get("coarse", {}).get("accuracy"),
           by_task.get("ink", {}).get("r2", 9))
    confusion = np.zeros((4, 4), dtype=np.int64)  # the coarse head's, from predict's answers
    for row, y in zip(rows, new_labels):
        confusion[remap[y], coarse_names.index(row[1])] += 1
    check(by_task.get("coarse", {}).get("confusion") == confusion.tolist(),
          f"evaluate's confusion matrix of the coarse head (rows: truth) is that of predict's answers "
          f"({by_task.get('coarse', {}).get('confusion')} vs {confusion.tolist()})")
    check(len(rows) == 500 and report["rows"] == 500 and got[0] == fine_acc and got[1] == coarse_acc
          and abs(got[2] - r2) < 1e-4,
          f"evaluate on 500 new rows: fine {got[0]}, coarse {got[1]} (through its label map), ink R^2 {got[2]:.5f} are "
          f"those of predict's answers against the labels ({fine_acc}, {coarse_acc}, {r2:.5f})")
    # A folder whose name is not UTF-8 (Latin-1 here): the JSON report says the path with the
    # byte written \xe9, as error messages do (a JSON writer refuses the raw byte).
    latin = os.path.join(work, "caf").encode() + b"\xe9"
    os.makedirs(latin)
    for name in ("new-images-idx3-ubyte.gz", "new-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(new_dir, name), latin + b"/" + name.encode())
    r = subprocess.run([os.fsencode(x) for x in evaluate] + [b"--input", latin + b"/new-images-idx3-ubyte.gz",
                                                              b"--limit", b"50"], capture_output=True)
    said = json.loads(r.stdout)["input"] if r.returncode == 0 else ""
    check(r.returncode == 0 and said.endswith("caf\\xe9/new-images-idx3-ubyte.gz"),
          f"evaluate --json under a folder whose name is not UTF-8 writes the path escaped ({said or r.stderr[-200:]})")

    # The labels are found beside the images by name, or given; a mismatch is named.
    os.rename(new_input, os.path.join(new_dir, "unnamed.gz"))
    r = subprocess.run(evaluate + ["--input", os.path.join(new_dir, "unnamed.gz")], capture_output=True, text=True)
    check(r.returncode == 2 and "--labels: name the idx label file" in r.stderr,
          f"evaluate asks for --labels when none are named beside the images ({r.stderr.strip()[-160:]})")
    write_idx(os.path.join(new_dir, "short.gz"), new_labels[:499])
    r = subprocess.run(evaluate + ["--input", os.path.join(new_dir, "unnamed.gz"), "--labels",
                                   os.path.join(new_dir, "short.gz")], capture_output=True, text=True)
    check(r.returncode == 1 and "should hold one label per image" in r.stderr and "(500), holds 499 labels" in r.stderr,
          f"labels that are not one per image are refused, with both counts ({r.stderr.strip()[-160:]})")

    # A flipped bit in an exported head's weights: the card's weights_sha256 no longer matches,
    # and predict refuses the head instead of predicting with other weights.
    fine_w = os.path.join(out_dir, "heads", "fine.safetensors")
    card = json.load(open(os.path.join(out_dir, "heads", "fine.json")))
    check(card.get("weights_sha256") == hashlib.sha256(open(fine_w, "rb").read()).hexdigest(),
          "the card records the weights file's SHA-256")
    intact = open(fine_w, "rb").read()
    with open(fine_w, "r+b") as f:
        f.seek(len(intact) - 7)
        f.write(bytes([intact[-7] ^ 0x10]))
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", "5", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 1 and "fine.safetensors" in r.stderr and "the file is corrupt or was replaced" in r.stderr,
          f"predict refuses a flipped bit in a head's weights ({r.stderr.strip()[-200:]})")
    with open(fine_w, "wb") as f:
        f.write(intact)
    # A flipped bit in the card itself (a class name: "Bag" -> "BaG") is refused by the CRC-32C it
    # carries; a user's deliberate edit is read once its card_crc32c is deleted.
    card_path = os.path.join(out_dir, "heads", "fine.json")
    card_text = open(card_path, "rb").read()
    at = card_text.index(b'"Bag"') + 3
    with open(card_path, "wb") as f:
        f.write(card_text[:at] + bytes([card_text[at] ^ 0x20]) + card_text[at + 1:])
    predict5 = [a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                "--limit", "300", "--progress", "quiet"]
    r = subprocess.run(predict5, capture_output=True, text=True)
    check(r.returncode == 1 and "fine.json' does not match its checksum" in r.stderr and "delete its card_crc32c" in r.stderr,
          f"predict refuses a flipped bit in a head's card ({r.stderr.strip()[-200:]})")
    edited = json.loads(card_text)
    edited["class_names"] = [n.upper() for n in edited["class_names"]]
    del edited["card_crc32c"]
    with open(card_path, "w") as f:
        json.dump(edited, f, indent=2)
    r = subprocess.run(predict5, capture_output=True, text=True)
    check(r.returncode == 0 and all(row.split(",")[2] in edited["class_names"] for row in r.stdout.splitlines()[1:]),
          f"an edit with the checksum deleted is read: {r.stdout.splitlines()[1:3]} ({r.stderr.strip()[-160:]})")
    with open(card_path, "wb") as f:
        f.write(card_text)

    # --- TensorBoard event files, read back with the tensorboard package ----------
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    for name in ("fine", "coarse"):
        acc = EventAccumulator(os.path.join(out_dir, "tensorboard", name))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        expected = (["eval/accuracy", "eval/ece", "eval/macro_f1", "eval/nll"] +
                    (["eval/top5_accuracy"] if name == "fine" else []) + ["train/loss"])
        check(sorted(tags) == expected, f"{name}: TensorBoard tags {sorted(tags)}")
        events = acc.Scalars("eval/accuracy")
        mine = [m for m in metrics if m["task"] == name]
        check([e.step for e in events] == [1, 2, 3, 4, 5], f"{name}: one eval/accuracy point per epoch")
        check(all(abs(e.value - m["eval_accuracy"]) < 1e-6 for e, m in zip(events, mine)),
              f"{name}: TensorBoard values equal metrics.jsonl")

    # --- calibrate = temperature: softmax(logits / T), T fitted on a validation split ---------
    calibrated = os.path.join(work, "calibrated")
    tune = ["--set", f"train.out_dir={calibrated}", "--set", "train.validation_fraction=0.2",
            "--set", "task.fine.calibrate=temperature", "--set", "task.fine.monitor=nll",
            "--set", "task.coarse.monitor=macro_f1"]
    r = subprocess.run([a.canopy, "train", "--config", config, "--progress", "quiet"] + tune, capture_output=True, text=True)
    summary = r.stdout
    card = json.load(open(os.path.join(calibrated, "heads", "fine.json"))) if r.returncode == 0 else {}
    temp = card.get("temperature", 1.0)
    fit = card.get("calibration", {})
    held = card.get("validation", {}).get("rows")
    check(r.returncode == 0 and f"task 'fine': temperature {temp:.4g} fitted on {held} validation rows" in r.stderr,
          f"calibrate = temperature: trains and says the fitted temperature ({r.stderr.strip()[-200:]})")
    check(temp != 1.0 and fit.get("validation_rows") == held and fit["validation_nll"] <= fit["validation_nll_before"],
          f"the card records the temperature ({temp:.4f}) and the validation NLL it lowered ({fit})")
    # task.NAME.monitor: the exported epoch is the one with the lowest validation NLL (fine) and the
    # highest validation macro-F1 (coarse) in metrics.jsonl, whose eval_* are on the validation split.
    rows = [json.loads(l) for l in open(os.path.join(calibrated, "metrics.jsonl"))] if card else []
    for name, key, pick in (("fine", "eval_nll", min), ("coarse", "eval_macro_f1", max)):
        mine = [m for m in rows if m["task"] == name]
        want = pick(mine, key=lambda m: m[key])["epoch"] if mine else None  # the first of equals
        c = json.load(open(os.path.join(calibrated, "heads", f"{name}.json"))) if card else {}
        check(want is not None and c.get("exported_epoch") == want and c.get("monitor") == key[5:],
              f"monitor = {key[5:]}: {name} exports epoch {c.get('exported_epoch')}, the {pick.__name__} of "
              f"{[round(m[key], 4) for m in mine]}")
    wc = load_file(os.path.join(calibrated, "heads", "fine.safetensors"))
    with torch.no_grad():
        logits = (feats_t @ wc["linear.weight"].T + wc["linear.bias"]).double()
    y = torch.from_numpy(test_labels)
    p = (logits / temp).softmax(1)
    nll = float(F.cross_entropy(logits / temp, y))
    confidence, predicted = p.max(1)
    bins = (confidence * 15).ceil().sub(1).clamp(0, 14).long()
    ece = sum(abs(float(((predicted == y).double() - confidence)[bins == b].sum())) for b in range(15)) / len(y)
    check(abs(card.get("eval_nll", -1) - nll) < 1e-6 and abs(card.get("eval_ece", -1) - ece) < 1e-6,
          f"the card's test NLL and ECE (15 bins) are torch's at that temperature ({nll:.5f}, {ece:.5f})")
    check(f"task 'fine': probabilities at temperature {temp:.4g}: NLL {nll:.4f}, ECE {ece:.4f} on the eval split"
          in summary and "task 'coarse': probabilities" not in summary,
          "the training summary says them for the calibrated head alone")
    check(abs(card.get("eval_accuracy", -1) - float((predicted == y).double().mean())) < 1e-9,
          "the classes given are still the logits' argmax")
    # The card's intervals: the percentile bootstrap of the test rows, each resample drawn as torch
    # draws with the generator seeded seed * 1000003 + resample * 7919 + 1, quantiles as numpy's.
    iv = card.get("eval_intervals", {})
    n, k, resamples = len(y), logits.shape[1], iv.get("resamples", 0)
    pred, row_nll = logits.argmax(1), F.cross_entropy(logits / temp, y, reduction="none")
    drawn = {"accuracy": [], "macro_f1": [], "nll": []}
    for i in range(resamples):
        rows = torch.randint(n, (n,), generator=torch.Generator().manual_seed(i * 7919 + 1))  # train.seed 0
        cm = torch.bincount(y[rows] * k + pred[rows], minlength=k * k).view(k, k).double()
        both = cm.sum(0) + cm.sum(1)
        drawn["accuracy"].append(float((pred[rows] == y[rows]).double().mean()))
        drawn["macro_f1"].append(float((2 * cm.diag()[both > 0] / both[both > 0]).mean()))
        drawn["nll"].append(float(row_nll[rows].mean()))
    want = {m: np.quantile(v, [0.025, 0.975]) for m, v in drawn.items()}
    check(resamples == 1000 and iv.get("rows") == n and iv.get("level") == 0.95 and
          all(np.abs(np.array(iv.get(m, [9, 9])) - w).max() < 1e-6 for m, w in want.items()),
          f"the card's 95% intervals are the percentile bootstrap Python draws from the same resamples "
          f"(accuracy {want['accuracy'].round(4)}, macro-F1 {want['macro_f1'].round(4)}, NLL {want['nll'].round(4)})")
    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                        "--limit", "50", "--format", "jsonl", "--scores", "--progress", "quiet"] + tune,
                       capture_output=True, text=True)
    got = np.array([[json.loads(l)[c] for c in fine_cols] for l in r.stdout.splitlines()]) if r.returncode == 0 else 0
    check(r.returncode == 0 and np.abs(got - p[:50].numpy()).max() < 1e-4,
          "predict --scores gives softmax(logits / T)")
    with torch.no_grad():
        answers = head_answers(card, rebuild_head(os.path.join(calibrated, "heads", "fine.json"))(feats_t[:50]))
    check(r.returncode == 0 and np.abs(answers["probabilities"].numpy() - got).max() < 1e-4
          and answers["classes"].tolist() == [names.index(json.loads(l)["fine"]) for l in r.stdout.splitlines()],
          "scripts/rebuild_head.py's head_answers gives predict's calibrated probabilities and classes")
    r = subprocess.run([a.canopy, "evaluate", "--config", config, "--progress", "quiet", "--json", "--input",
                        f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST)] + tune, capture_output=True, text=True)
    fine = {h["task"]: h for h in json.loads(r.stdout)["heads"]}.get("fine", {}) if r.returncode == 0 else {}
    check(abs(fine.get("nll", -1) - nll) < 1e-6 and abs(fine.get("ece", -1) - ece) < 1e-6,
          f"evaluate scores the calibrated probabilities: its NLL and ECE are the card's ({fine.get('nll')}, {fine.get('ece')})")
    got = fine.get("intervals", {})
    check(all(np.abs(np.array(got.get(m, [9, 9])) - w).max() < 1e-6 for m, w in want.items()),
          f"... and its intervals, on the same rows, are the card's: {got}")
    r = subprocess.run([a.canopy, "evaluate", "--config", config, "--progress", "quiet", "--input",
                        f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST)] + tune, capture_output=True, text=True)
    said = f"task 'fine': probabilities at temperature {temp:.4g}: NLL {nll:.4f}, ECE {ece:.4f} on '"
    check(r.returncode == 0 and said in r.stdout, f"... and its text says them: {said}")
    model_path = os.path.join(work, "calibrated.pt")
    r = subprocess.run([a.canopy, "export", "--config", config, "--output", model_path] + tune, capture_output=True, text=True)
    with torch.no_grad():
        on_cached = torch.jit.load(model_path).heads(feats_t)["fine"] if r.returncode == 0 else None
    check(on_cached is not None and torch.allclose(on_cached.double(), p, atol=1e-6),
          "the model file gives softmax(logits / T) too")
    r = subprocess.run([a.canopy, "train", "--config", config, "--set", "task.fine.calibrate=temperature"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "task.fine.calibrate = temperature" in r.stderr and "set train.validation_fraction" in r.stderr,
          f"calibrate without a validation split is refused ({r.stderr.strip()[-120:]})")

    r = subprocess.run([a.canopy, "predict", "--config", config, "--input", "-"], input="x\n", capture_output=True,
                       text=True)
    check(r.returncode == 2 and "with data.source = fashion-mnist the inputs are an idx file: --input FILE" in r.stderr,
          f"--input - with idx images: exit 2, saying what it reads ({r.stderr.strip()[-200:]})")

    # --- the example program with its own head ---------------------------------
    heads = subprocess.run([a.custom, "heads"], capture_output=True, text=True).stdout
    check("residual_mlp" in heads and "linear" in heads, "example program lists its own head next to the built-ins")
    with open(config, "a") as f:
        f.write("[task.residual]\nhead = residual_mlp\nhead.width = 16\nlr = 0.01\n")
    run = subprocess.run([a.custom, "train", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(run.returncode == 0 and f"residual_mlp {D}-(16)-10" in run.stdout,
          f"example program trains its head through run_cli ({run.returncode}: {run.stderr[-500:]})")

    # ... over a trained top: the cache holds the prefix's 8 x 14 x 14 values a row, the head
    # reads the top's pooled 8; evaluate rebuilds it (the registry, the exported trunk) to its card.
    torch.manual_seed(0)
    blocks = os.path.join(work, "blocks.pt")
    torch.jit.script(tiny_block_trunk().eval()).save(blocks)
    top_config = os.path.join(work, "top.ini")
    with open(top_config, "w") as f:
        f.write(tiny_trunk_sections(blocks, 600, 200) + f"""freeze = first:2
[cache]
path = {work}/top-cache
[train]
out_dir = {work}/top-out
epochs = 3
batch_size = 50
[task.residual]
head = residual_mlp
head.width = 16
lr = 0.01
""")
    run = subprocess.run([a.custom, "run", "--config", top_config, "--progress", "quiet"], capture_output=True, text=True)
    card = json.load(open(f"{work}/top-out/heads/residual.json")) if run.returncode == 0 else {}
    check(run.returncode == 0 and "residual_mlp 8-(16)-10" in run.stdout and card.get("in_features") == 8 and
          "1568 values per row" in run.stderr,
          f"over a trained top the example's head reads the top's 8 pooled features, the cache the prefix's 1568 "
          f"({run.returncode}: {run.stdout[-400:]} {run.stderr[-400:]})")
    r = subprocess.run([a.custom, "evaluate", "--config", top_config, "--progress", "quiet", "--json"],
                       capture_output=True, text=True)
    got = {h["task"]: h for h in json.loads(r.stdout)["heads"]} if r.returncode == 0 else {}
    want = card.get("eval_accuracy")
    check(want is not None and abs(got.get("residual", {}).get("accuracy", -1) - want) < 1e-9,
          f"evaluate rebuilds the example's head over the fine-tuned trunk to its card's accuracy: "
          f"{got.get('residual', {}).get('accuracy')} vs {want} ({r.stderr[-300:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
