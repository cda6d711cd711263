#!/usr/bin/env python3
"""`text.tokenizer = tokenizer.json` of a SentencePiece Unigram model (XLM-R, multilingual-e5,
paraphrase-multilingual, T5) against Hugging Face `tokenizers` loading the same file:

  * Unigram models trained here by `sentencepiece` itself on the Reuters stories and sentences in
    46 languages, with SentencePiece's own normalization rules (nmt_nfkc, as XLM-R's and T5's
    models were trained, its case-folding form, and none), with byte fallback and with symbols
    of their own, converted to tokenizer.json as transformers converts XLM-R's, T5's and today's
    models (their charsmap in a Precompiled normalizer, then the Strip and Replace steps each
    writes, Metaspace prepending always, first or never, or not splitting; XLM-R's vocabulary
    with fairseq's four tokens first and <mask> last), give the reference's ids on every story,
    on every sentence, on their NFD, NFKD and upper-case forms and on 3 000 random strings of
    combining marks, joiners, controls, CR LF, Hangul jamo, flags, emoji, fullwidth forms and
    ligatures (the grapheme clusters the charsmap is applied to), cut at two lengths;
  * a cache through a trunk holds its masked mean over `tokenizers`' ids padded with the file's
    <pad>, and with `text.prompt = "query: "` (e5's) over the ids of the prompted texts, the
    head's card naming the prompt;
  * the grapheme clusters canopy finds are UAX #29's on every case of the Unicode Character
    Database's GraphemeBreakTest.txt (tests/text_test.cpp reads it too; here through the
    charsmap: a cluster's first character mapped alone changes the whole cluster);
  * what canopy does not read is refused naming it: another normalizer (NFKC, Lowercase), a
    Replace regular expression other than a run, another pre-tokenizer, a model without an
    unknown token, a damaged charsmap (its trie larger than it; bits flipped at random: refused
    as damaged or read, never a crash), text.lowercase given with such a file, and a prompt that
    fills text.max_length.
"""
import argparse
import base64
import copy
import io
import json
import os
import random
import subprocess
import unicodedata

import h5py
import numpy as np
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from support import (canopy_texts, check, finish, grain_stories_config, multilingual_sentences, same_ids_as_tokenizers,
                     work_dir)

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
REUTERS = os.path.join(HOME, "data", "reuters")
TRUNK = os.path.join(HOME, "trunks", "all_minilm_l6_v2.pt")

# Code points that make grapheme clusters and that a charsmap maps.
POOL = (
    list("abcdefxyzABCXYZ019 .,-'") + [" ", " ", "  "]
    + [chr(c) for c in range(0x300, 0x370, 7)] + ["\u20d7", "\u20e3", "\ufe0f", "\ufe0e", "\u200d", "\u200c"]
    + ["\r", "\n", "\r\n", "\t", "\x01", "\x7f", "\x85", "\u00ad", "\u200b", "\u2028", "\ufeff"]
    + [chr(c) for c in range(0xFF01, 0xFF5F, 5)] + [chr(c) for c in range(0xFF61, 0xFFA0, 3)] + ["\uff9e", "\uff9f"]
    + ["\u1100", "\u1161", "\u11a8", "\u1112", "\u1175", "\uac00", "\uac01", "\ud55c", "\u3131", "\u314f"]
    + ["\U0001F1EF", "\U0001F1F5", "\U0001F1EB", "\U0001F1F7", "\U0001F468", "\U0001F469", "\U0001F44D", "\U0001F3FD",
       "\u2764", "\u00a9"]
    + ["\u0600", "\u0601", "\u06dd", "\u0627", "\u064e", "\u0915", "\u094d", "\u0937", "\u093f", "\u0903", "\u0e33",
       "\u0e01", "\u0e4d", "\u0dca", "\u0dbb"]
    + ["\ufb01", "\ufb00", "\u2460", "\u3300", "\u2161", "\u00bd", "\u2122", "\u00b5", "\u212b", "\u00c5", "A\u030a",
       "e\u0301", "\u0438\u0306", "\u00e9", "\u1e9b\u0323", "\u0130", "\u00df", "\u03a3", "\u1f80"]
    + ["\u00a0", "\u2003", "\u3000", "\u2581", "\ufffd", "\ue000", "\u0000"]
)


def fuzz_texts(n, seed=7):
    rnd = random.Random(seed)
    return ["".join(rnd.choice(POOL) for _ in range(rnd.randint(1, 24))) for _ in range(n)]


def train(texts, work, name, **options):
    """A SentencePiece Unigram model trained on `texts`; returns its ModelProto."""
    model = io.BytesIO()
    options.setdefault("pad_id", 3)  # SentencePiece has no <pad> unless asked; the models canopy reads have one
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
                                   vocab_size=options.pop("vocab_size", 1500), character_coverage=0.9995,
                                   num_threads=2, minloglevel=2, **options)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    with open(os.path.join(work, f"{name}.model"), "wb") as f:
        f.write(model.getvalue())
    return proto


def convert(proto, style="today", prepend="always", split=True, xlmr=False, template="<s> $A </s>"):
    """A tokenizer.json as transformers' SpmConverter writes one (style: "today", Strip then
    Replace(" {2,}", "▁"); "older", Replace(" {2,}", " "); "charsmap", the Precompiled normalizer
    alone, as XLM-R's own file), XLM-R's vocabulary layout with `xlmr`."""
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    if xlmr:  # fairseq's <s> <pad> </s> <unk> first, the model's pieces after its own three, <mask> last
        pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces[3:] + [("<mask>", 0.0)]
        unk_id = 3
    tok = Tokenizer(models.Unigram(pieces, unk_id=unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if style == "today":
        steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "\u2581")]
    elif style == "older":
        steps += [normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=split)
    specials = [p.piece for p in proto.pieces if p.type in (3, 4)]  # control and user-defined symbols
    tok.add_tokens([AddedToken(s, normalized=False, special=True) for s in specials if s not in ("<s>", "</s>")])
    if xlmr:
        tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True, special=True)])
    elif template:
        tok.add_special_tokens([t for t in ("<s>", "</s>") if t in template])
    if template:
        ids = {t: tok.token_to_id(t) for t in ("<s>", "</s>") if t in template}
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, i) for t, i in ids.items() if t in template])
    return json.loads(tok.to_str())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-unigram-")

    stories = canopy_texts(canopy, "--arff", os.path.join(REUTERS, "ReutersGrain-train.arff"))
    sentences = multilingual_sentences()
    forms = sentences + [unicodedata.normalize(form, s) for form in ("NFD", "NFKD") for s in sentences] + [
        s.upper() for s in sentences]
    training = stories + sentences * 20
    texts = stories[:600] + forms + fuzz_texts(3000) + ["", " ", "<s>hello</s> <mask> x", "a <mask>  b<unk>c"]
    all_texts = os.path.join(work, "texts.jsonl")
    with open(all_texts, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    # --- the same ids as tokenizers -------------------------------------------------------
    nfkc = train(training, work, "nmt_nfkc")
    fairseq = train(training, work, "xlmr", pad_id=-1)  # XLM-R's: <unk> <s> </s>, fairseq adds <pad>
    files = {
        "xlmr_like": convert(fairseq, style="charsmap", xlmr=True),
        "xlmr_today": convert(fairseq, xlmr=True),
        "t5_like": convert(train(training, work, "t5", pad_id=0, eos_id=1, unk_id=2, bos_id=-1), style="older",
                           template="$A </s>"),
        "prepend_first": convert(nfkc, prepend="first"),
        "prepend_never": convert(nfkc, prepend="never", template=None),
        "no_split": convert(nfkc, split=False),
        "case_folding": convert(train(training, work, "nfkc_cf", normalization_rule_name="nmt_nfkc_cf")),
        "no_charsmap": convert(train(training, work, "identity", normalization_rule_name="identity")),
        "byte_fallback": convert(train(training, work, "bytes", byte_fallback=True, vocab_size=1800)),
        "own_symbols": convert(train(training, work, "symbols", user_defined_symbols=["[SEC]", "wheat"])),
    }
    trained = Tokenizer(models.Unigram())  # trained by tokenizers itself: no normalizer, no template
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(training[:400], trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>"], unk_token="<unk>", show_progress=False))
    files["tokenizers_trained"] = json.loads(trained.to_str())
    for name, content in files.items():
        same_ids_as_tokenizers(canopy, work, name, content, texts, all_texts, (64, 512))

    # --- a cache through a trunk: the ids tokenizers gives, padded with the file's <pad> ----
    xlmr = os.path.join(work, "xlmr_like.json")
    config = grain_stories_config(os.path.join(work, "run.ini"), work, "xlmr", f"tokenizer = {xlmr}", TRUNK)
    # The MiniLM trunk reads these ids as its own (the model is not the tokenizer's): what is
    # checked is canopy's path from a Unigram tokenizer.json to the cached rows; then the same
    # with e5's prompt put before every text (in double quotes: its blank kept).
    for tag, prompt in (("plain", ""), ("prompt", "query: ")):
        r = subprocess.run([canopy, "run", "--config", config, "--progress", "quiet", "--set",
                            f"cache.path={work}/cache_{tag}", "--set", f"train.out_dir={work}/train_{tag}", "--set",
                            f'text.prompt="{prompt}"'], capture_output=True, text=True)
        check(r.returncode == 0, f"canopy run with an XLM-R-like tokenizer.json, prompt {prompt!r}"
              + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
        if r.returncode != 0:
            continue
        reference = Tokenizer.from_file(xlmr)
        reference.no_padding()
        reference.enable_truncation(max_length=96)
        enc = [reference.encode(prompt + t).ids for t in stories[:48]]
        width = max(len(e) for e in enc)
        pad = reference.token_to_id("<pad>")
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in enc])[:, None]).to(torch.int64)
        with torch.no_grad():
            states = torch.jit.load(TRUNK).eval()(ids, mask)
            want = ((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy()
        with h5py.File(os.path.join(work, f"cache_{tag}", "cache.h5"), "r") as h5:
            got = h5["train/features"][...]
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        check(diff < 1e-4 and pad == 1, f"prompt {prompt!r}: the cache holds the trunk's masked mean over tokenizers' "
              f"ids of the prompted texts, padded with <pad> = {pad} (48 stories, max diff {diff:.2e})")
        card = open(os.path.join(work, f"train_{tag}", "heads", "grain.json")).read()
        check(('prompt=\\"query: \\"' in card) == bool(prompt), f"prompt {prompt!r}: the head's card names it "
              f"(or no prompt): {'prompt=' in card}")

    # --- refused, naming what --------------------------------------------------------------
    sentences_file = os.path.join(work, "sentences.txt")
    with open(sentences_file, "w") as f:
        f.write("\n".join(sentences[:5]) + "\n")

    def changed(name, edit):
        content = copy.deepcopy(files["xlmr_today"])
        edit(content)
        path = os.path.join(work, f"{name}.json")
        with open(path, "w") as f:
            json.dump(content, f)
        return path

    blob = bytearray(base64.b64decode(files["xlmr_today"]["normalizer"]["normalizers"][0]["precompiled_charsmap"]))
    blob[0:4] = (len(blob) * 2).to_bytes(4, "little")  # a trie larger than the charsmap
    damaged = base64.b64encode(bytes(blob)).decode()
    cases = [
        (changed("nfkc", lambda c: c["normalizer"]["normalizers"].insert(0, {"type": "NFKC"})),
         ["nfkc.json", "normalizer 'NFKC' is not read", "Precompiled"]),
        (changed("regex", lambda c: c["normalizer"]["normalizers"][2].update(pattern={"Regex": "\\s+"})),
         ["regex.json", "regular expression '\\s+'"]),
        (changed("whitespace", lambda c: c.update(pre_tokenizer={"type": "WhitespaceSplit"})),
         ["whitespace.json", "pre-tokenizer 'WhitespaceSplit'", "Metaspace"]),
        (changed("no_unk", lambda c: c["model"].update(unk_id=None)), ["no_unk.json", "no unknown token"]),
        (changed("damaged", lambda c: c["normalizer"]["normalizers"][0].update(precompiled_charsmap=damaged)),
         ["damaged.json", "charsmap is damaged"]),
    ]
    for path, words in cases:
        r = subprocess.run([canopy, "tokenize", "--tokenizer", path, "--input", sentences_file], capture_output=True,
                           text=True)
        check(r.returncode == 1 and all(w in r.stderr for w in words) and r.stdout == "",
              f"{os.path.basename(path)} refused naming {words}: {r.stderr.strip()[-200:]}")
    # A charsmap with flipped bits (it has no checksum): refused as damaged where its replacements
    # stop being UTF-8 or its trie leads outside it, else read as it now says; never a crash.
    rnd = random.Random(11)
    outcomes = []
    original = base64.b64decode(files["xlmr_today"]["normalizer"]["normalizers"][0]["precompiled_charsmap"])
    for k in range(16):
        blob = bytearray(original)
        for _ in range(rnd.choice([1, 8, 64])):
            i = rnd.randrange(len(blob))
            blob[i] ^= 1 << rnd.randrange(8)
        path = changed(f"flipped{k}", lambda c: c["normalizer"]["normalizers"][0].update(
            precompiled_charsmap=base64.b64encode(bytes(blob)).decode()))
        r = subprocess.run([canopy, "tokenize", "--tokenizer", path, "--input", all_texts, "--attribute", "text"],
                           capture_output=True, text=True)
        outcomes.append(r.returncode if r.returncode != 1 or "charsmap is damaged" in r.stderr else "other error")
    check(set(outcomes) <= {0, 1}, f"16 charsmaps with flipped bits: read or refused as damaged, no crash ({outcomes})")
    r = subprocess.run([canopy, "tokenize", "--tokenizer", xlmr, "--max-length", "8", "--prompt",
                        "query: a prompt longer than eight tokens", "--input", sentences_file], capture_output=True, text=True)
    check(r.returncode == 2 and "leave no room for the text" in r.stderr and r.stdout == "",
          f"a prompt filling max_length refused: {r.stderr.strip()}")
    r = subprocess.run([canopy, "tokenize", "--tokenizer", xlmr, "--cased", "--input", sentences_file],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "does not apply" in r.stderr, f"--cased with a Unigram tokenizer.json: {r.stderr.strip()}")
    return finish()


if __name__ == "__main__":
    raise SystemExit(main())
