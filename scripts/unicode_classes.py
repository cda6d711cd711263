#!/usr/bin/env python3
"""Writes datasets/unicode_classes.h: the code point ranges of Unicode's letters (L: Lu Ll Lt
Lm Lo) and numbers (N: Nd Nl No), from Python's unicodedata, for the byte-level BPE
pre-tokenizer's \\p{L} and \\p{N} (GPT-2's pattern); and each code point's Grapheme_Cluster_Break
property with Extended_Pictographic (UAX #29), from Debian's unicode-data package
(/usr/share/unicode: apt-get install unicode-data), for the grapheme clusters a SentencePiece
charsmap is applied to; and what Hugging Face tokenizers' BertNormalizer and BertPreTokenizer
read: punctuation (P*), "other" characters (Cc Cf Co Cs) and nonspacing marks (Mn) as its
unicode_categories crate has them (Unicode 8.0: characters assigned later are in none of them,
from DerivedAge.txt), each character's lowercase (Rust's char::to_lowercase, one character;
U+0130's two are written in text.cpp) and canonical decomposition (NFD, Hangul left to the
code). Run it again to move to a newer Unicode version:
    python3 scripts/unicode_classes.py > datasets/unicode_classes.h && clang-format -i datasets/unicode_classes.h"""
import re
import sys
import unicodedata


def ranges(prefix):
    out = []
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
    return out


def c_array(declaration, cells, per_row):
    """A C++ array definition: `declaration` = { the cells, `per_row` to a line }."""
    lines = [f"{declaration} = {{"]
    for k in range(0, len(cells), per_row):
        lines.append("    " + ", ".join(cells[k:k + per_row]) + ",")
    lines.append("};")
    return "\n".join(lines)


def table(name, rs):
    return c_array(f"inline constexpr CodeRange {name}[]", [f"{{0x{lo:X}, 0x{hi:X}}}" for lo, hi in rs], 6)


UCD = "/usr/share/unicode"
# The order of GraphemeBreak in datasets/sentencepiece.h.
BREAKS = ["Other", "CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark",
          "L", "V", "T", "LV", "LVT", "Extended_Pictographic"]


def ucd_ranges(path, wanted):
    """(lo, hi, value) of every line of a UCD property file whose value is in `wanted`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            cps, value = (x.strip() for x in line.split(";")[:2])
            if wanted is not None and value not in wanted:
                continue
            lo, _, hi = cps.partition("..")
            out.append((int(lo, 16), int(hi or lo, 16), value))
    return out


def grapheme_breaks():
    """Merged ranges of each code point's break property (Other left out)."""
    prop = {}
    for lo, hi, value in ucd_ranges(f"{UCD}/auxiliary/GraphemeBreakProperty.txt", set(BREAKS)):
        for cp in range(lo, hi + 1):
            prop[cp] = value
    for lo, hi, value in ucd_ranges(f"{UCD}/emoji/emoji-data.txt", {"Extended_Pictographic"}):
        for cp in range(lo, hi + 1):
            assert prop.get(cp, "Other") == "Other", hex(cp)  # UAX #29: pictographs break as Other
            prop[cp] = value
    out = []
    for cp in sorted(prop):
        if out and out[-1][1] == cp - 1 and out[-1][2] == prop[cp]:
            out[-1][1] = cp
        else:
            out.append([cp, cp, prop[cp]])
    return out


CATEGORIES_AGE = (8, 0)  # unicode_categories 0.1.1, which tokenizers' BERT rules use


def assigned_by(version):
    """The code points Unicode had assigned by `version` (DerivedAge.txt)."""
    out = set()
    for lo, hi, value in ucd_ranges(f"{UCD}/DerivedAge.txt", None):
        if tuple(int(x) for x in value.split(".")) <= version:
            out.update(range(lo, hi + 1))
    return out


def category_ranges(categories, assigned):
    out = []
    for cp in range(0x110000):
        if cp in assigned and unicodedata.category(chr(cp)) in categories:
            if out and out[-1][1] == cp - 1:
                out[-1][1] = cp
            else:
                out.append([cp, cp])
    return out


def lowercase_pairs():
    """(upper, lower) for every character whose lowercase is one other character."""
    out = []
    for cp in range(0x110000):
        low = chr(cp).lower()
        if len(low) == 1 and ord(low) != cp:
            out.append((cp, ord(low)))
    return out


def decompositions():
    """(character, its full canonical decomposition) for every character that has one, Hangul
    syllables left out (the code decomposes them)."""
    out = []
    for cp in range(0x110000):
        if 0xAC00 <= cp <= 0xD7A3:
            continue
        d = unicodedata.normalize("NFD", chr(cp))
        if d != chr(cp):
            assert len(d) <= 4, hex(cp)
            out.append((cp, [ord(c) for c in d]))
    return out


def ucd_version():
    with open(f"{UCD}/ReadMe.txt", encoding="utf-8") as f:
        m = re.search(r"Version (\d+\.\d+\.\d+)", f.read())
    return m.group(1) if m else "?"


def break_table(rs):
    return c_array("inline constexpr BreakRange kGraphemeBreaks[]",
                   [f"{{0x{lo:X}, 0x{hi:X}, {BREAKS.index(value)}}}" for lo, hi, value in rs], 5)


def main():
    assigned = assigned_by(CATEGORIES_AGE)
    print(f"""// Generated by scripts/unicode_classes.py from Python's unicodedata (Unicode
// {unicodedata.unidata_version}): the code point ranges of the letters (L) and numbers (N) that GPT-2's
// pre-tokenizing pattern names as \\p{{L}} and \\p{{N}}; and, from the Unicode Character Database
// {ucd_version()} (Debian's unicode-data), each code point's Grapheme_Cluster_Break with
// Extended_Pictographic (UAX #29), numbered as GraphemeBreak in sentencepiece.h (Other left out).
// Do not edit; run the script again (then clang-format).
#pragma once

namespace canopy::datasets::unicode {{

struct CodeRange {{
  char32_t lo, hi;
}};

{table("kLetters", ranges("L"))}

{table("kNumbers", ranges("N"))}

struct BreakRange {{
  char32_t lo, hi;
  unsigned char value;
}};

{break_table(grapheme_breaks())}

// tokenizers' BERT rules (unicode_categories: Unicode 8.0).
{table("kPunctuation8", category_ranges({"Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps"}, assigned))}

{table("kOther8", category_ranges({"Cc", "Cf", "Co", "Cs"}, assigned))}

{table("kNonspacingMarks8", category_ranges({"Mn"}, assigned))}

struct CasePair {{
  char32_t upper, lower;
}};

// Each character's lowercase, where it is one other character.
{c_array("inline constexpr CasePair kLowercase[]", [f"{{0x{a:X}, 0x{b:X}}}" for a, b in lowercase_pairs()], 6)}

struct Decomposition {{
  char32_t cp;
  char32_t nfd[4];  // 0 after the last
}};

// Each character's full canonical decomposition (NFD), Hangul syllables left out.
{c_array("inline constexpr Decomposition kDecompositions[]",
         ["{0x%X, {%s}}" % (cp, ", ".join("0x%X" % c for c in d)) for cp, d in decompositions()], 3)}

}}  // namespace canopy::datasets::unicode""")


if __name__ == "__main__":
    sys.exit(main())
