#!/usr/bin/env python3
"""The config fuzzer: seeded mutations of the two demo configs (at tiny limits), each run
through the real `canopy` binary twice:

  1. `canopy train --config M --dump-config`
  2. when that accepts it, `canopy run --config M` (cache, then one epoch of every head) on
     48 training and 24 test samples (`--set` train.epochs, data.train_limit, data.test_limit:
     a mutant that drops its limits would otherwise cache the whole data set)

Mutations: lines deleted or duplicated, unknown keys, empty values, wrong types,
negative/huge/non-finite numbers, bad label maps, binary garbage, very long lines, non-UTF-8
bytes, broken section headers. A mutant fails the test when canopy

  - dies by a signal, exits with a status >= 128, or prints "terminate called"
  - ends in "unexpected error" (an exception canopy did not turn into its own error, e.g. a
    JSON writer refusing a non-UTF-8 name at the first checkpoint)
  - runs past its time limit (a hang)
  - exits 0 although a key holds a value outside what `canopy keys` documents for it (its
    type, its range or its choices), read from the mutant as canopy reads it

Replay: the seed is printed and can be given with --seed; --only N reruns mutant N and
prints its text. The cache and out_dir stay inside a scratch folder per worker: no mutation
writes a path outside it (the tests run as root, so "/" is never generated).

    test_config_fuzz.py --canopy build/runners/canopy [--seed 20261130] [--count 300]
"""
import concurrent.futures
import os
import random
import re
import shutil
import subprocess
import sys
import time

import support
from support import check, finish, work_dir

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMOS = {"fmnist_lite0.ini": 200, "reuters_minilm.ini": 100}  # mutants per demo config
HOSTILE = [
    "", "  ", "-1", "0", "1", "-7", "2", "1e308", "-1e308", "nan", "inf", "-inf", "0x10", "abc",
    "999999999999999999999", "9223372036854775807", "-9223372036854775808", "0.5", "1.5",
    "first:99", "first:-1", "match:(", "modules:nowhere", "a,a,a,a", "0,1,2", ",,,", "true",
    "maybe", "cosine", "step", "gradual", "autofreeze", "pcgrad", "12 34", "=", "[x]", "%",
    "sub/dir", "${NO_SUCH_VARIABLE}", "${HOME", "\u00e9t\u00e9",
]
BAD_LABEL_MAPS = ["0,1", "0,1,2,3,4,5,6,7,8,9,10", "-1,0,0,0,0,0,0,0,0,0", "a,b,c", "1e9,0,0,0,0,0,0,0,0,0",
                  "0,0,0,0,0,0,0,0,0,99999999999", ""]
GARBAGE = [b"\xc3\x28", b"\xff\xfe\x00\x01", b"\x00\x00\x00", b"\x1b[2J", b"\xe2\x82", bytes(range(1, 32))]


def documented_keys(canopy):
    """{name: (type, range)} from `canopy keys` (its Markdown tables)."""
    out = subprocess.run([canopy, "keys"], capture_output=True, text=True, check=True).stdout
    keys = {}
    for line in out.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\x00", "|") for c in line.replace("\\|", "\x00").split("|")[1:-1]]
        keys[cells[0].strip("`")] = (cells[1], cells[3])
    return keys


def as_number(v):
    try:
        return float(v)
    except ValueError:
        try:
            return float.fromhex(v)
        except (ValueError, OverflowError):
            return None


def out_of_range(kind, rng, v):
    """Why value v (as canopy reads it: trimmed) is outside what the key documents, or None."""
    if rng == "not empty" and not v:
        return "empty"
    if kind in ("path", "string", "path list", "string list"):
        return None
    if kind == "bool":
        return None if v in ("true", "false", "1", "0", "yes", "no", "on", "off") else "not a bool"
    if kind == "choice":
        choices = [c.strip() for c in rng.split("|")]
        return None if v in choices else "not one of " + rng
    if kind == "integer":
        if not re.fullmatch(r"[+-]?[0-9]+", v) or not -2**63 <= int(v) < 2**63:
            return "not an integer"
        x = float(int(v))
    elif kind == "number":
        x = as_number(v)
        if x is None or x != x or x in (float("inf"), float("-inf")):
            return "not a finite number"
    else:  # lists: each element's type is checked by canopy; ranges are per key
        return None
    for part in rng.split(","):
        m = re.fullmatch(r"\s*(>=|>|<=|<)\s*(\S+)\s*", part)
        if not m:
            continue
        bound = float(m.group(2))
        ok = {">=": x >= bound, ">": x > bound, "<=": x <= bound, "<": x < bound}[m.group(1)]
        if not ok:
            return f"outside {rng}"
    return None


def parse_ini(text):
    """[(section, key, value)] as canopy's reader sees them (comments and blanks skipped)."""
    entries, section = [], None
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if "=" in line and section is not None:
            k, v = line.split("=", 1)
            entries.append((section, k.strip(), v.strip()))
    return entries


def expected_refusals(text, keys):
    """Reasons a mutant must be refused: keys met once, whose value is outside their range."""
    entries = parse_ini(text)
    count = {}
    for s, k, _ in entries:
        count[(s, k)] = count.get((s, k), 0) + 1
    reasons = []
    for s, k, v in entries:
        if count[(s, k)] != 1:
            continue
        name = f"task.NAME.{k}" if s.startswith("task.") and "." not in s[5:] else f"{s}.{k}"
        if name not in keys:
            continue
        kind, rng = keys[name]
        why = out_of_range(kind, rng, v)
        if why:
            reasons.append(f"{s}.{k} = {v!r}: {why}")
    return reasons


def base_config(name):
    """The demo config at tiny limits, with its cache and out_dir inside the scratch folder."""
    text = open(os.path.join(SOURCE, "configs", name), encoding="utf-8").read()
    text = re.sub(r"(?m)^train_limit = .*$", "train_limit = 48", text)
    text = re.sub(r"(?m)^test_limit = .*$", "test_limit = 24", text)
    text = re.sub(r"(?m)^path = runs/.*$", "path = cache", text)
    text = re.sub(r"(?m)^out_dir = .*$", "out_dir = out", text)
    text = re.sub(r"(?m)^epochs = .*$", "epochs = 1", text)
    if "[data]" in text and "train_limit" not in text:  # the Reuters demo has no limits
        text = text.replace("[data]\n", "[data]\ntrain_limit = 48\ntest_limit = 24\n", 1)
    return text.encode()


def mutate(lines, rng):
    m = list(lines)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(m))
        line = m[at]
        eq = line.find(b"=")
        op = rng.randrange(10)
        if op <= 2 and eq >= 0:  # a value replaced by a hostile one
            m[at] = line[:eq + 1] + b" " + rng.choice(HOSTILE).encode()
        elif op == 3:
            del m[at]
        elif op == 4:
            m.insert(at, line)
        elif op == 5 and eq >= 0:  # an empty value
            m[at] = line[:eq + 1]
        elif op == 6:  # a bad label map, an unknown key or a broken header
            m.insert(at, rng.choice([b"label_map = " + rng.choice(BAD_LABEL_MAPS).encode(), b"no_such_key = 3",
                                     b"[task.", b"[task.x", b"[]", b"[task.extra]\nhead = nowhere"]))
        elif op == 7:  # binary garbage, in a value or on a line of its own
            g = rng.choice(GARBAGE)
            m[at] = (line[:eq + 1] + b" " + g) if eq >= 0 and rng.random() < 0.5 else g
        elif op == 8:  # a very long line
            m[at] = (line[:eq + 1] + b" " if eq >= 0 else b"") + b"x" * rng.choice([5000, 70000, 1 << 20])
        else:  # a line cut short
            m[at] = line[:rng.randrange(len(line) + 1)]
    return b"\n".join(m) + b"\n"


def crashed(p):
    return (p.returncode < 0 or p.returncode >= 128 or b"terminate called" in p.stderr
            or b"canopy: unexpected error" in p.stderr)


def tail(b, n=600):
    return b.decode(errors="replace")[-n:]


def run_mutant(canopy, keys, index, body, scratch, limit):
    """Runs one mutant in its worker's scratch folder; returns (index, problems, accepted, ran)."""
    os.makedirs(scratch, exist_ok=True)
    config = os.path.join(scratch, "job.ini")
    with open(config, "wb") as f:
        f.write(body)
    shutil.rmtree(os.path.join(scratch, "out"), ignore_errors=True)
    problems = []
    text = body.decode("utf-8", errors="replace")
    try:
        dump = subprocess.run([canopy, "train", "--config", config, "--dump-config"], cwd=scratch,
                              capture_output=True, timeout=30 * support.slowdown())
    except subprocess.TimeoutExpired:
        return index, [f"--dump-config hung (over {30 * support.slowdown():.0f} s)"], False, False
    if crashed(dump):
        problems.append(f"--dump-config crashed (exit {dump.returncode}): {tail(dump.stderr)}")
    must_refuse = expected_refusals(text, keys)
    if dump.returncode == 0 and must_refuse:
        problems.append("--dump-config accepted " + "; ".join(must_refuse))
    if dump.returncode != 0:
        if dump.returncode == 1 and b"canopy" not in dump.stderr and b"error" not in dump.stderr.lower():
            problems.append(f"refused without a message: {tail(dump.stderr)}")
        return index, problems, False, False
    try:
        # At tiny limits whatever the mutant says (its limits were checked by --dump-config).
        run = subprocess.run([canopy, "run", "--config", config, "--set", "train.epochs=1", "--set",
                              "data.train_limit=48", "--set", "data.test_limit=24", "--progress", "quiet"],
                             cwd=scratch, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return index, problems + [f"the 1-epoch run hung (over {limit:.0f} s)"], True, True
    if crashed(run):
        problems.append(f"the 1-epoch run crashed (exit {run.returncode}): {tail(run.stderr)}")
    elif run.returncode != 0:
        last = [l for l in run.stderr.decode(errors="replace").splitlines() if l.strip()]
        print(f"mutant {index}: the run refused it: {last[-1][:300] if last else '(no message)'}", flush=True)
    return index, problems, True, run.returncode == 0


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--count", type=int, default=sum(DEMOS.values()))
    ap.add_argument("--only", type=int, default=None, help="run mutant N alone and print it")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    canopy = os.path.abspath(a.canopy)
    keys = documented_keys(canopy)
    check(len(keys) > 70 and keys["train.epochs"] == ("integer", ">= 1"),
          f"canopy keys documents {len(keys)} keys with types and ranges")
    work = work_dir("canopy-fuzz-")
    rng = random.Random(a.seed)
    mutants = []
    share = {n: round(a.count * c / sum(DEMOS.values())) for n, c in DEMOS.items()}
    for name, n in share.items():
        lines = base_config(name).split(b"\n")
        mutants += [(name, mutate(lines, rng)) for _ in range(n)]
    print(f"seed {a.seed}: {len(mutants)} mutants of {', '.join(DEMOS)} (replay one with --seed {a.seed} --only N)",
          flush=True)
    limit = 120 * support.slowdown()
    chosen = range(len(mutants)) if a.only is None else [a.only]
    if a.only is not None:
        sys.stdout.buffer.write(mutants[a.only][1])
    # Each worker owns a scratch folder (its cache and out_dir), so mutants never share files.
    start = time.time()
    results = []
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {}
        free = [os.path.join(work, f"w{j}") for j in range(a.jobs)]
        pending = list(chosen)
        while pending or futures:
            while pending and free:
                i = pending.pop(0)
                scratch = free.pop()
                futures[pool.submit(run_mutant, canopy, keys, i, mutants[i][1], scratch, limit)] = scratch
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                free.append(futures.pop(f))
                results.append(f.result())
    results.sort()
    accepted = sum(1 for r in results if r[2])
    trained = sum(1 for r in results if r[3])
    bad = [r for r in results if r[1]]
    for i, problems, _, _ in bad:
        print(f"mutant {i} ({mutants[i][0]}): " + " | ".join(problems), flush=True)
    print(f"{len(results)} mutants in {time.time() - start:.0f} s: {len(results) - accepted} refused, "
          f"{accepted} accepted by --dump-config, {trained} ran their epoch to exit 0", flush=True)
    check(not bad, f"no crash, hang or out-of-range value accepted in {len(results)} mutants (seed {a.seed})")
    if a.only is None:
        check(len(results) - accepted > len(results) // 3, "most mutants break something and are refused")
        check(trained >= len(results) // 10, "some mutants stay valid and train to the end (the fuzzer reaches the trainer)")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
