#!/usr/bin/env python3
"""canopy's ARFF reader against liac-arff (Debian's python3-liac-arff) on the same files:
quoted strings with every escape liac-arff decodes (\\b \\f \\t \\n \\r, octal \\0 to \\377 as
1-3 digits, \\uXXXX, \\% \\' \\" \\\\), bare and quoted values, comments; canopy's texts come from
`canopy tokenize --arff`, as JSON. Where liac-arff stops (\\a and \\v, which it refuses; a
% comment after a value, which Weka's reader allows), canopy is checked against Weka's
reading; an unquoted ? (missing) is refused by canopy naming the line and attribute.

Runs with the system python3 (liac-arff is a Debian package): test_arff.py --canopy BUILD/runners/canopy
"""
import argparse
import json
import os
import subprocess
import sys

import arff

from support import check, finish, work_dir


def canopy_texts(canopy, vocab, path):
    r = subprocess.run([canopy, "tokenize", "--vocab", vocab, "--arff", path, "--attribute", "Text"],
                       capture_output=True, text=True)
    return r, [json.loads(line)["text"] for line in r.stdout.splitlines()] if r.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-arff-")
    vocab = os.path.join(work, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nx\ny\n")
    rows = [
        r"'back\b form\f tab\t nl\n cr\r'",
        r"'oct\007 esc\033 nul\0 two\12 three\101'",
        r"'latin \351t\351 \377 \200'",  # octal past 0x7f: the code point (U+00E9), not a byte
        r"'unicode \u00e9\u4e2d pct\% q\' dq\" bs\\'",
        r'"double \"quoted\" with, comma"',
        r"bare_word",
        r"'?'",
        r"'  spaced  '",
    ]
    body = "% header comment\n@relation escapes\n@attribute Text string\n@attribute c {no,yes}\n@data\n"
    body += "".join(f"{r},{'yes' if i % 2 else 'no'}\n" for i, r in enumerate(rows))
    path = os.path.join(work, "escapes.arff")
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
    want = [row[0] for row in arff.loads(body)["data"]]
    r, got = canopy_texts(canopy, vocab, path)
    check(r.returncode == 0, f"canopy reads the file liac-arff reads ({r.stderr.strip()[-200:]})")
    for i, (w, g) in enumerate(zip(want, got or [])):
        check(w == g, f"row {i + 1}: canopy {g!r} == liac-arff {w!r}")
    check(got is not None and len(got) == len(want), f"as many texts as liac-arff ({len(got or [])} vs {len(want)})")

    # Beyond liac-arff: \a and \v (C's, which liac-arff refuses) and a comment after a value.
    for esc, char in ((r"\a", "\a"), (r"\v", "\v")):
        try:
            arff.loads(f"@relation r\n@attribute Text string\n@data\n'x{esc}y'\n")
            liac = "decodes it"
        except Exception as e:  # noqa: BLE001 - liac-arff raises its own error types
            liac = f"refuses it ({e})"
        p = os.path.join(work, "bell.arff")
        with open(p, "w") as f:
            f.write(f"@relation r\n@attribute Text string\n@data\n'x{esc}y'\n")
        r, got = canopy_texts(canopy, vocab, p)
        check(got == [f"x{char}y"], f"canopy decodes {esc} as {char!r} (liac-arff {liac}): {got}")
    p = os.path.join(work, "comment.arff")
    with open(p, "w") as f:
        f.write("@relation r\n@attribute Text string\n@attribute c {no,yes}\n@data\n'first',yes % a comment\n"
                "second,no%another\n")
    r, got = canopy_texts(canopy, vocab, p)
    check(got == ["first", "second"], f"a % comment after a value ends the line, as in Weka's reader: {got} "
          f"({r.stderr.strip()[-160:]})")

    # ? is a missing value: liac-arff gives None; canopy needs every text and refuses, naming it.
    p = os.path.join(work, "missing.arff")
    text = "@relation r\n@attribute Text string\n@attribute c {no,yes}\n@data\n'a',yes\n?,no\n"
    with open(p, "w") as f:
        f.write(text)
    check(arff.loads(text)["data"][1][0] is None, "liac-arff reads an unquoted ? as a missing value")
    r, got = canopy_texts(canopy, vocab, p)
    check(r.returncode != 0 and "missing.arff:6" in r.stderr and "'Text' is missing" in r.stderr,
          f"canopy refuses it naming the line and the attribute ({r.stderr.strip()[-200:]})")

    # A UTF-16 surrogate pair in \u escapes is one character, as Java (Weka) reads it; a lone
    # surrogate is no character (U+FFFD). liac-arff keeps both halves in its Python str.
    p = os.path.join(work, "pair.arff")
    with open(p, "w") as f:
        f.write("@relation r\n@attribute Text string\n@data\n'tree \\ud83c\\udf32 lone \\ud800 x'\n")
    liac = arff.load(open(p))["data"][0][0]
    r, got = canopy_texts(canopy, vocab, p)
    check(got == ["tree \U0001F332 lone \ufffd x"] and liac == "tree \ud83c\udf32 lone \ud800 x",
          f"a surrogate pair is one character, a lone surrogate U+FFFD: {got} (liac-arff {liac!r}; {r.stderr.strip()[-160:]})")

    # Bytes that are not UTF-8 (a Latin-1 file) are refused naming the line, as Python's reader
    # refuses them (liac-arff reads a str); before, the tokenizer dropped them without a word.
    p = os.path.join(work, "latin1.arff")
    with open(p, "wb") as f:
        f.write(b"@relation r\n@attribute Text string\n@data\n'ok'\n'caf\xe9 cr\xe8me'\n")
    try:
        open(p, encoding="utf-8").read()
        python = "reads it"
    except UnicodeDecodeError as e:
        python = f"refuses it ({e.reason})"
    r, got = canopy_texts(canopy, vocab, p)
    check(r.returncode == 1 and "latin1.arff:5" in r.stderr and "not UTF-8 (byte 0xe9 at offset 4)" in r.stderr,
          f"canopy refuses a Latin-1 line naming it (Python {python}): {r.stderr.strip()[-220:]}")
    r = subprocess.run([canopy, "tokenize", "--vocab", vocab, "--input", p], capture_output=True, text=True)
    check(r.returncode == 1 and "latin1.arff:5" in r.stderr,
          f"tokenize --input refuses it too: {r.stderr.strip()[-160:]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
