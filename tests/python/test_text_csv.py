#!/usr/bin/env python3
"""Texts from a CSV table (data.source = text-csv) and JSON lines (text-json) against the same
texts from ARFF files, with the real pieces users get from scripts/setup: the Reuters-21578
grain/corn stories through the real all-MiniLM-L6-v2 trunk.

The stories are written as a CSV by Python's csv module (CRLF rows; every story quoted, its line
breaks kept inside the quotes), the text column between the labels and named `text` (the key's
default is `Text`), grain as no/yes, corn as 0/1. Then:

  * `canopy cache` of the table stores, read back with h5py, the features, ids, grain, corn and
    all_labels columns of the cache the ARFF config builds: bitwise equal;
  * `canopy train` on it gives the same head files as on the ARFF cache;
  * `canopy evaluate --input test.csv` scores each head as its card does (the same rows: the
    eval split is the test table's first rows);
  * `canopy predict --input test.csv` gives the answers the ARFF run gives on the ARFF file,
    each head's classes named by its own label column (grain no/yes, corn 0/1);
  * the same stories as JSON lines (data.source = text-json) cache the same columns bitwise, and
    the CSV run's evaluate and predict read JSON records as they read the CSV's rows;
  * a list of 80 words per story (more than a bitmask's 62 labels) is a multi-hot source that a
    multilabel head learns, and evaluate and predict read back.
"""
import argparse
import collections
import csv
import json
import math
import os
import re
import subprocess
import sys

import h5py
import numpy as np

from support import arff_labels, check, finish, work_dir

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")
TRUNK = os.path.join(HOME, "trunks", "all_minilm_l6_v2.pt")
VOCAB = os.path.join(HOME, "trunks", "all_minilm_l6_v2.vocab.txt")
TRAIN_ROWS, TEST_ROWS = 96, 48


def config(work, name, data):
    path = os.path.join(work, f"{name}.ini")
    with open(path, "w") as f:
        f.write(f"""[data]
{data}
train_limit = {TRAIN_ROWS}
test_limit = {TEST_ROWS}

[text]
vocab = {VOCAB}
max_length = 128

[trunk]
path = {TRUNK}
allow_unpinned = true
pooling = masked_mean

[cache]
path = {work}/cache_{name}
batch_size = 32
shard_rows = 64

[train]
out_dir = {work}/run_{name}
batch_size = 32
epochs = 4
fuse = never

[task.grain]
head = linear
labels = grain
lr = 0.003

[task.corn]
head = mlp
head.hidden = 32
labels = corn

[task.topics]
kind = multilabel
head = linear
labels = all_labels
label_map = 0,1,2,3
class_names = grain,corn
""")
    return path


def cache_columns(cache):
    out = {}
    with h5py.File(os.path.join(cache, "cache.h5"), "r") as h:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        h.visititems(visit)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-text-csv-")

    def run(*args):
        r = subprocess.run([canopy] + list(args), capture_output=True, text=True)
        if r.returncode != 0:  # what follows reads its output
            check(False, f"canopy {' '.join(args[:3])} exits 0 (got {r.returncode}: {r.stderr[-600:]})")
            sys.exit(finish())
        return r.stdout

    # The stories as canopy reads them from ARFF, written as a CSV table.
    tables = {}
    for split in ("train", "test"):
        lines = run("tokenize", "--vocab", VOCAB, "--arff", os.path.join(REUTERS, f"ReutersGrain-{split}.arff"))
        texts = [json.loads(line)["text"] for line in lines.splitlines()]
        grain = arff_labels(os.path.join(REUTERS, f"ReutersGrain-{split}.arff"))
        corn = arff_labels(os.path.join(REUTERS, f"ReutersCorn-{split}.arff"))
        tables[split] = os.path.join(work, f"{split}.csv")
        with open(tables[split], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
            w.writerow(["grain", "text", "corn"])
            for t, g, c in zip(texts, grain, corn):
                w.writerow(["yes" if g else "no", t, int(c)])
    with open(tables["train"], "rb") as f:
        raw = f.read()
    check(b"\r\n" in raw and raw.count(b"\r\n") < raw.count(b"\n"),
          "the table has CRLF rows and line breaks inside quoted stories")

    from_arff = config(work, "arff", f"""source = arff
train_files = grain:{REUTERS}/ReutersGrain-train.arff, corn:{REUTERS}/ReutersCorn-train.arff
test_files = grain:{REUTERS}/ReutersGrain-test.arff, corn:{REUTERS}/ReutersCorn-test.arff""")
    from_csv = config(work, "csv", f"""source = text-csv
train = {tables['train']}
test = {tables['test']}""")
    run("cache", "--config", from_arff)
    run("cache", "--config", from_csv)
    a, c = cache_columns(f"{work}/cache_arff"), cache_columns(f"{work}/cache_csv")
    check(sorted(a) == sorted(c), f"the caches hold the same columns ({sorted(c)} vs {sorted(a)})")
    for name in sorted(a):
        if name in c:
            check(a[name].dtype == c[name].dtype and np.array_equal(a[name], c[name]),
                  f"{name}: the CSV table's cache equals the ARFF files' bitwise")
    check(c["train/features"].shape == (TRAIN_ROWS, 384) and int(c["train/labels/all_labels"].max()) == 3,
          f"{TRAIN_ROWS} stories of 384 features, all_labels reaching both bits")

    labels = [line for line in run("inspect", f"{work}/cache_csv").splitlines() if line.startswith("  labels")]
    check(labels == ["  labels        grain (no, yes); corn; all_labels (bits: grain, corn)"],
          f"canopy inspect names each label source's own classes ({labels})")
    run("train", "--config", from_arff)
    run("train", "--config", from_csv)
    for task in ("grain", "corn", "topics"):
        with open(f"{work}/run_arff/heads/{task}.safetensors", "rb") as f1, \
                open(f"{work}/run_csv/heads/{task}.safetensors", "rb") as f2:
            check(f1.read() == f2.read(), f"head '{task}': the same file trained from the table as from ARFF")

    report = json.loads(run("evaluate", "--config", f"{work}/run_csv/config.ini", "--input", tables["test"],
                            "--limit", str(TEST_ROWS), "--json"))
    for task in ("grain", "corn", "topics"):
        head = next(h for h in report["heads"] if h["task"] == task)
        check(head["rows"] == TEST_ROWS and abs(head["accuracy"] - head["card_eval_accuracy"]) < 1e-9,
              f"evaluate --input test.csv scores '{task}' as its card ({head['accuracy']} vs "
              f"{head['card_eval_accuracy']} on {head['rows']} rows)")

    by_csv = run("predict", "--config", f"{work}/run_csv/config.ini", "--input", tables["test"],
                 "--limit", "20", "--scores", "--format", "csv")
    by_arff = run("predict", "--config", f"{work}/run_arff/config.ini", "--input",
                  os.path.join(REUTERS, "ReutersGrain-test.arff"), "--limit", "20", "--scores", "--format", "csv")
    # The same answers and scores; grain's classes named as the table names them (no, yes: the
    # ARFF file declares 0, 1), corn's by its own values (0, 1), not by grain's names.
    rows = [r.split(",") for r in by_arff.splitlines()]
    rows[0] = [c.replace("grain:0", "grain:no").replace("grain:1", "grain:yes") for c in rows[0]]
    for r in rows[1:]:
        r[2] = {"0": "no", "1": "yes"}[r[2]]
    check(by_csv.splitlines()[0] == "id,corn,grain,topics,corn:0,corn:1,grain:no,grain:yes,topics:grain,topics:corn",
          f"predict's columns name each label's own classes ({by_csv.splitlines()[0]})")
    check(len(by_csv.splitlines()) == 21 and by_csv.splitlines() == [",".join(r) for r in rows],
          "predict --input test.csv answers as the ARFF run on the ARFF file")

    # The same stories as JSON lines (Hugging Face datasets' to_json: one object per line, keys in
    # the columns' order, non-ASCII escaped), corn as true/false, each story's list of tags and an
    # object beside them: data.source = text-json caches the CSV table's columns bitwise, each
    # source named by its own values, plus the tags as a bitmask source (bit 0 corn, bit 1 grain:
    # sorted), all_labels with its bits swapped.
    records = {}
    for split in ("train", "test"):
        records[split] = os.path.join(work, f"{split}.jsonl")
        with open(tables[split], newline="", encoding="utf-8") as f, open(records[split], "w") as out:
            for row in csv.DictReader(f):
                tags = [t for t, on in (("grain", row["grain"] == "yes"), ("corn", row["corn"] == "1")) if on]
                out.write(json.dumps({"text": row["text"], "grain": row["grain"], "corn": row["corn"] == "1",
                                      "tags": tags, "source": {"file": "reuters"}}) + "\n")
    from_json = config(work, "json", f"""source = text-json
train = {records['train']}
test = {records['test']}""")
    with open(from_json, "a") as f:  # a multilabel task on the tags, named by them (no class_names)
        f.write("\n[task.tags]\nkind = multilabel\nhead = linear\nlabels = tags\nlr = 0.003\n")
    run("cache", "--config", from_json)
    j = cache_columns(f"{work}/cache_json")
    tag_sets = ("train/labels/tags", "test/labels/tags")
    check(sorted(j) == sorted(list(c) + list(tag_sets))
          and all(j[n].dtype == c[n].dtype and np.array_equal(j[n], c[n]) for n in c),
          "the JSON lines' cache equals the CSV table's bitwise, plus the tags")
    for name in tag_sets:
        t, a = j[name], c[name.replace("tags", "all_labels")]
        check(np.array_equal(((t & 1) << 1) | (t >> 1), a) and int(t.max()) == 3,
              f"{name}: each story's bitmask of its tags (corn, grain), all_labels' bits swapped")
    labels = [line for line in run("inspect", f"{work}/cache_json").splitlines() if line.startswith("  labels")]
    check(labels == ["  labels        grain (no, yes); corn (false, true); tags (bits: corn, grain); "
                     "all_labels (bits: grain, corn)"],
          f"canopy inspect names the JSON table's label sources ({labels})")
    run("train", "--config", from_json)
    with open(f"{work}/run_json/heads/tags.json") as f:
        card = json.load(f)
    check(card["class_names"] == ["corn", "grain"] and card["label_map"] == [],
          f"the tags head is named by the list's labels ({card['class_names']})")
    tags_eval = json.loads(run("evaluate", "--config", f"{work}/run_json/config.ini", "--input", records["test"],
                               "--limit", str(TEST_ROWS), "--json"))
    head = next(h for h in tags_eval["heads"] if h["task"] == "tags")
    check(head["rows"] == TEST_ROWS and abs(head["accuracy"] - head["card_eval_accuracy"]) < 1e-9
          and [p["label"] for p in head["per_label"]] == ["corn", "grain"],
          f"evaluate --input test.jsonl scores the tags head as its card ({head['accuracy']} on {head['rows']} rows)")
    # A run trained from the CSV table scores and answers JSON records (keys in another order)
    # as it does the CSV's rows.
    shuffled = os.path.join(work, "test_keys.json")
    with open(records["test"]) as f, open(shuffled, "w") as out:
        for line in f:
            r = json.loads(line)
            out.write(json.dumps({"corn": int(r["corn"]), "grain": r["grain"], "text": r["text"]}) + "\n")
    by_json = json.loads(run("evaluate", "--config", f"{work}/run_csv/config.ini", "--input", shuffled,
                             "--limit", str(TEST_ROWS), "--json"))
    check([(h["task"], h["rows"], h["accuracy"]) for h in by_json["heads"]]
          == [(h["task"], h["rows"], h["accuracy"]) for h in report["heads"]],
          "evaluate --input test.json (keys in another order) scores every head as on test.csv")
    check(run("predict", "--config", f"{work}/run_csv/config.ini", "--input", shuffled, "--limit", "20",
              "--scores", "--format", "csv") == by_csv, "predict --input test.json answers as on test.csv")
    # --keep writes columns of the input table beside each answer, as the table holds them (the
    # row's own key, to join the answers back); a task's name is refused as one.
    kept = [json.loads(line) for line in run("predict", "--config", f"{work}/run_csv/config.ini", "--input", shuffled,
                                             "--limit", "20", "--keep", "text", "--format", "jsonl").splitlines()]
    with open(shuffled) as f:
        stories = [json.loads(line)["text"] for line in f][:20]
    answers = [r.split(",")[1:4] for r in by_csv.splitlines()[1:]]
    check([r["text"] for r in kept] == stories and list(kept[0])[:3] == ["id", "text", "corn"]
          and [[r["corn"], r["grain"], r["topics"]] for r in kept] == answers,
          f"predict --keep text writes each story beside its answers, which are as without it ({list(kept[0])})")
    r = subprocess.run([canopy, "predict", "--config", f"{work}/run_csv/config.ini", "--input", shuffled, "--keep",
                        "grain"], capture_output=True, text=True)
    check(r.returncode == 2 and "'grain' is empty, repeated or already a column of the answers" in r.stderr,
          f"--keep of a task's name is refused ({r.stderr.strip()[-120:]})")

    # More than 62 labels in a list: a multi-hot source. Each story's label list is which of 80
    # words (4+ letters, in 6 to 80 of the training stories) it uses, a real multi-label task a
    # head on the sentence embeddings can learn. The cache holds a row of 80 zeros and ones per
    # story (h5py), a multilabel head named by the words learns them above chance, evaluate and
    # predict read it back, and a multiclass task on it is refused.
    def story_words(text):
        return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4}
    stories = {}
    for split in ("train", "test"):
        with open(records[split]) as f:
            stories[split] = [json.loads(line)["text"] for line in f][:TRAIN_ROWS if split == "train" else TEST_ROWS]
    counts = collections.Counter(w for t in stories["train"] for w in story_words(t))
    vocabulary = sorted(w for w, n in counts.items() if 6 <= n <= 80)[:80]
    check(len(vocabulary) == 80, f"80 words to label the stories by ({len(vocabulary)})")
    word_records = {}
    for split in ("train", "test"):
        word_records[split] = os.path.join(work, f"words_{split}.jsonl")
        with open(word_records[split], "w") as out:
            for t in stories[split]:
                out.write(json.dumps({"text": t, "words": sorted(story_words(t) & set(vocabulary))}) + "\n")
    from_words = config(work, "words", f"""source = text-json
train = {word_records['train']}
test = {word_records['test']}""")
    with open(from_words) as f:  # one multilabel task on the words, named by them
        ini = f.read()
    with open(from_words, "w") as f:
        f.write(ini[:ini.index("[task.grain]")] + "[task.words]\nkind = multilabel\nhead = linear\nlabels = words\n"
                "lr = 0.01\nepochs = 30\n")
    run("cache", "--config", from_words)
    with open(f"{work}/cache_words/manifest.json") as f:
        manifest = json.load(f)
    with h5py.File(f"{work}/cache_words/cache.h5", "r") as h:
        for split in ("train", "test"):
            got = h[f"{split}/labels/words"]
            want = np.array([[int(w in story_words(t)) for w in vocabulary] for t in stories[split]], dtype=np.int64)
            check(got.dtype == np.int64 and np.array_equal(got[()], want),
                  f"{split}/labels/words: a row of 80 zeros and ones per story, the words in sorted order "
                  f"({got.shape}, {int(want.sum())} words used)")
        check(json.loads(h["train/labels/words"].attrs["labels"]) == vocabulary
              and manifest["meta"]["label_bits"]["words"] == vocabulary
              and manifest["schema"] == 4 and int(h.attrs["canopy_schema"]) == 4,
              "the view and the manifest name the 80 columns; the cache is schema 4")
    labels = [line for line in run("inspect", f"{work}/cache_words").splitlines() if line.startswith("  labels")]
    check(labels == ["  labels        words (multi-hot: " + ", ".join(vocabulary[:10]) + ", ... 80 labels)"],
          f"canopy inspect says the source is multi-hot ({labels})")
    run("train", "--config", from_words)
    with open(f"{work}/run_words/heads/words.json") as f:
        card = json.load(f)
    present = [p for p in card["per_label"] if p["support"] > 0]
    chance = sum(p["support"] for p in present) / len(present) / TEST_ROWS  # a constant scorer's mean AP
    check(card["class_names"] == vocabulary and card["out_features"] == 80
          and card["eval_mean_ap"] > 1.5 * chance,
          f"the words head is named by the 80 words and learns them: mean AP {card['eval_mean_ap']:.3f} on the "
          f"test stories, {chance:.3f} by chance over the {len(present)} words they use")
    words_eval = json.loads(run("evaluate", "--config", f"{work}/run_words/config.ini", "--input",
                                word_records["test"], "--json"))["heads"][0]
    check(words_eval["rows"] == TEST_ROWS and abs(words_eval["mean_ap"] - card["eval_mean_ap"]) < 1e-9,
          f"evaluate --input words_test.jsonl scores the head as its card ({words_eval['mean_ap']:.4f})")
    answers = run("predict", "--config", f"{work}/run_words/config.ini", "--input", word_records["test"],
                  "--format", "csv").splitlines()
    given = [set(a.split(",")[1].split("|")) - {""} for a in answers[1:]]
    check(answers[0] == "id,words" and len(given) == TEST_ROWS and set().union(*given) <= set(vocabulary)
          and any(given), f"predict names each story's words among the 80 ({sum(map(len, given))} given)")
    r = subprocess.run([canopy, "train", "--config", from_words, "--set", "task.words.kind=multiclass"],
                       capture_output=True, text=True)
    check(r.returncode != 0 and "label source 'words' holds lists of 80 labels" in r.stderr
          and "only kind = multilabel without label_map reads it" in r.stderr,
          f"a multiclass task on the multi-hot source is refused (exit {r.returncode}: {r.stderr.strip()[-200:]})")

    # A validation split of it is held out label by label: nearly every word, even one of 6
    # stories, gives the validation stories some, where a plain draw of as many stories misses
    # about 11 of the 80 words (the expectation, worked out from the cache's rows).
    r = subprocess.run([canopy, "train", "--config", from_words, "--set", "train.validation_fraction=0.2",
                        "--set", "task.words.epochs=2", "--set", f"train.out_dir={work}/run_words_validated"],
                       capture_output=True, text=True)
    held = re.search(r"validation split: (\d+) rows held out of 'train' \(.*stratified by 'words', label by "
                     r"label over its 80 labels(; no row held out for (\d+) of them)?", r.stderr)
    with h5py.File(f"{work}/cache_words/cache.h5", "r") as h:
        per_word = h["train/labels/words"][()].sum(0)
    n = int(held.group(1)) if held else 19
    missed = int(held.group(3) or 0) if held else None
    plain = sum(math.comb(TRAIN_ROWS - int(k), n) / math.comb(TRAIN_ROWS, n) for k in per_word)
    check(r.returncode == 0 and held and 17 <= n <= 21 and missed <= 3 and plain > 3 * max(missed, 1),
          f"a validation split of 0.2 holds out {n} stories label by label: {missed} of the 80 words "
          f"without a story there (against {plain:.1f} expected of a plain draw) "
          f"({[line for line in r.stderr.splitlines() if 'validation split:' in line][:1] or r.stderr[-400:]})")

    # The same words as a CSV column separated by blanks (data.list_columns, Kaggle's tags): the
    # JSON lists' cache, bitwise; naming the text column there is refused.
    for split in ("train", "test"):
        with open(os.path.join(work, f"words_{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["words", "text"])
            for t in stories[split]:
                w.writerow(["  ".join(sorted(story_words(t) & set(vocabulary))), t])
    from_word_csv = from_words.replace("words.ini", "word_csv.ini")
    with open(from_words) as f, open(from_word_csv, "w") as out:
        out.write(f.read().replace("source = text-json", "source = text-csv\nlist_columns = words")
                  .replace(word_records["train"], f"{work}/words_train.csv")
                  .replace(word_records["test"], f"{work}/words_test.csv")
                  .replace(f"{work}/cache_words", f"{work}/cache_word_csv"))
    run("cache", "--config", from_word_csv)
    with h5py.File(f"{work}/cache_words/cache.h5", "r") as a, h5py.File(f"{work}/cache_word_csv/cache.h5", "r") as b:
        check(all(np.array_equal(a[n][()], b[n][()]) for n in
                  ("train/labels/words", "test/labels/words", "train/features", "test/features")),
              "a CSV column of words separated by blanks (data.list_columns) caches as the JSON lists, bitwise")
    r = subprocess.run([canopy, "cache", "--config", from_word_csv, "--set", "data.list_columns=words,Text"],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "'Text' is the text column (data.text_attribute)" in r.stderr,
          f"the text column as a list column is refused ({r.stderr.strip()[-160:]})")

    # all_labels over more than 62 columns of two values (a CSV of 64 yes/no word columns): multi-hot
    # too, a row of the 64 columns' positives, in the columns' order.
    columns = vocabulary[:64][::-1]  # not sorted: all_labels follows the columns' order
    for split in ("train", "test"):
        with open(os.path.join(work, f"wide_{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text"] + columns)
            for t in stories[split]:
                w.writerow([t] + ["yes" if c in story_words(t) else "no" for c in columns])
    from_wide = config(work, "wide", f"""source = text-csv
train = {work}/wide_train.csv
test = {work}/wide_test.csv""")
    with open(from_wide) as f:
        ini = f.read()
    with open(from_wide, "w") as f:
        f.write(ini[:ini.index("[task.grain]")] + "[task.all]\nkind = multilabel\nhead = linear\nlabels = all_labels\n")
    run("run", "--config", from_wide)
    with h5py.File(f"{work}/cache_wide/cache.h5", "r") as h:
        want = np.array([[int(c in story_words(t)) for c in columns] for t in stories["test"]], dtype=np.int64)
        check(np.array_equal(h["test/labels/all_labels"][()], want)
              and json.loads(h["test/labels/all_labels"].attrs["labels"]) == columns,
              f"all_labels over 64 yes/no columns: a row of their positives, in the columns' order {want.shape}")
    with open(f"{work}/run_wide/heads/all.json") as f:
        check(json.load(f)["class_names"] == columns, "a multilabel head on it is named by the columns")

    # The same 64 columns as 64 ARFF label files (Weka's one file per label, as the Reuters
    # demo's): all_labels over them is multi-hot too, the same rows as the CSV's.
    def arff_string(text):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"
    files = {"train": [], "test": []}
    for split in ("train", "test"):
        for c in columns:
            path = os.path.join(work, "arff", f"{c}-{split}.arff")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"@relation {c}\n\n@attribute Text string\n@attribute class-att {{0,1}}\n\n@data\n\n")
                for t in stories[split]:
                    f.write(f"{arff_string(t)},{int(c in story_words(t))}\n")
            files[split].append(f"{c}:{path}")
    from_wide_arff = config(work, "wide_arff", f"""source = arff
train_files = {', '.join(files['train'])}
test_files = {', '.join(files['test'])}
text_attribute = Text""")
    with open(from_wide_arff) as f:
        ini = f.read()
    with open(from_wide_arff, "w") as f:
        f.write(ini[:ini.index("[task.grain]")] + "[task.all]\nkind = multilabel\nhead = linear\nlabels = all_labels\n")
    run("cache", "--config", from_wide_arff)
    with h5py.File(f"{work}/cache_wide_arff/cache.h5", "r") as h, \
            h5py.File(f"{work}/cache_wide/cache.h5", "r") as w:
        check(all(np.array_equal(h[f"{s}/labels/all_labels"][()], w[f"{s}/labels/all_labels"][()])
                  and np.array_equal(h[f"{s}/features"][()], w[f"{s}/features"][()]) for s in ("train", "test"))
              and json.loads(h["train/labels/all_labels"].attrs["labels"]) == columns,
              "all_labels over 64 ARFF label files: the rows and features of the CSV's 64 columns")

    # A test table with a class training never saw: refused before any trunk pass, naming it.
    bad = os.path.join(work, "bad.csv")
    with open(bad, "w", newline="") as f:
        f.write('grain,text,corn\nmaybe,"a story",0\n')
    r = subprocess.run([canopy, "cache", "--config", from_csv, "--set", f"data.test={bad}", "--set",
                        f"cache.path={work}/cache_bad"], capture_output=True, text=True)
    check(r.returncode == 1 and "'maybe'" in r.stderr and "no, yes" in r.stderr
          and not os.path.exists(f"{work}/cache_bad/manifest.json"),
          f"a test class the training table lacks is refused, naming it (exit {r.returncode}: {r.stderr[-300:]})")

    # A label left empty in some rows (pandas writes a missing value so): the cache says which
    # column, and a task on it is refused, not trained to answer "no label" as a class.
    holes = os.path.join(work, "holes.csv")
    with open(holes, "w", newline="") as f:
        f.write('grain,text,corn\nyes,"wheat, barley",0\n,"no grain said",1\nno,"cocoa",0\nno,"corn",1\n')
    r = subprocess.run([canopy, "run", "--config", from_csv, "--set", f"data.train={holes}", "--set",
                        f"cache.path={work}/cache_holes", "--set", f"train.out_dir={work}/run_holes"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "label column(s) grain of" in r.stderr and "have empty fields" in r.stderr
          and "task 'grain': label source 'grain' has rows without a value" in r.stderr
          and not os.path.exists(f"{work}/run_holes/heads/grain.safetensors"),
          f"an empty label field is named when cached and its task refused (exit {r.returncode}: {r.stderr[-400:]})")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
