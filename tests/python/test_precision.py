#!/usr/bin/env python3
"""trunk.precision: the trunk's passes under autocast, through the real binary, read with h5py.

On a small conv + BatchNorm trunk over a slice of Fashion-MNIST:
- a bfloat16 cache holds what Python computes with torch.autocast("cpu", torch.bfloat16)
  around the same module as canopy runs it (frozen, channels-last weights and inputs); it
  differs from the float32 cache (the autocast took effect) by about bfloat16's rounding
- the precision is part of the fingerprint: a float32 config finds the bfloat16 cache stale
  and says "changed precision"; a float32 cache keeps the fingerprint it had before the key
- heads train on it; their cards say trunk_precision; `canopy predict` with another precision
  is refused (the heads were trained on other features), with the same one it runs
- a fine-tuning cache (the frozen prefix) is made under the autocast too; a top trained over
  it, exported, predicts with the accuracy its card says (the prefix under the autocast, the
  top in float32, as it trained)
- trunk.top_precision = bfloat16 trains the top under the autocast: deterministic, other
  weights than float32's, in the card, checked by predict; a top's grouped (depthwise)
  convolutions stay float32 on the CPU (predict's scores = Python's with that policy)
- `trunk show` says so; float16 on a CPU without float16 arithmetic is refused (exit 2)

    test_precision.py --canopy build/runners/canopy
"""
import json
import os
import subprocess
import sys

import h5py
import torch

from support import FMNIST, check, finish, fmnist_test_inputs, start, tiny_block_trunk, tiny_trunk_sections

TRAIN, TEST = 256, 128


def canopy(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def cpu_flags():
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def as_canopy_runs(module):
    """The module as canopy runs inference passes (trunk.optimize): 4-D weights channels-last,
    then torch.jit.freeze."""
    m = module
    for p in m.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return torch.jit.freeze(m.eval())


def python_features(module, x, dtype):
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = module(x.contiguous(memory_format=torch.channels_last))
    return out.float().mean((2, 3))


def depthwise_top(binary, work):
    """Under trunk.top_precision = bfloat16 on the CPU the top's grouped (depthwise)
    convolutions run in float32 (their bfloat16 backward is the slower there), the rest under
    the autocast: predict's scores are Python's with exactly that policy, and not those of the
    plain autocast."""
    import torch.nn.functional as F
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    from rebuild_head import rebuild_head
    torch.manual_seed(1)
    trunk = f"{work}/depthwise.pt"
    torch.jit.script(tiny_block_trunk(depthwise=True).eval()).save(trunk)
    config = f"{work}/depthwise.ini"
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, TRAIN, TEST) + f"""freeze = first:2
top_precision = bfloat16
lr = 0.003
[cache]
path = {work}/dw-cache
[train]
out_dir = {work}/dw-out
epochs = 2
batch_size = 32
[task.a]
head = linear
lr = 0.01
""")
    rc, out = canopy(binary, "run", "--config", config, "--progress", "quiet")
    check(rc == 0 and "grouped (depthwise) convolutions run in float32" in out,
          f"a depthwise top trains under trunk.top_precision = bfloat16, saying its grouped convolutions "
          f"stay float32 (exit {rc}): {out[-400:]}")
    rc, out = canopy(binary, "predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz",
                     "--limit", str(TEST), "--scores", "--output", f"{work}/dw.csv")
    check(rc == 0, f"predict with the depthwise bfloat16 top (exit {rc}) {out[-300:] if rc else ''}")
    if rc != 0:
        return
    eager = tiny_block_trunk(depthwise=True).eval()
    eager.load_state_dict(torch.jit.load(f"{work}/dw-out/trunk.pt").state_dict())
    with h5py.File(f"{work}/dw-cache/cache.h5", "r") as h:
        prefix = torch.from_numpy(h["test/features"][:]).reshape(TEST, 8, 14, 14)
    head = rebuild_head(f"{work}/dw-out/heads/a.json")

    def scores(grouped_float32):
        def conv(m, x):
            if m.groups > 1 and grouped_float32:
                with torch.autocast("cpu", enabled=False):
                    return F.conv2d(x.float(), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            return m._conv_forward(x, m.weight, m.bias)
        x = prefix.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for b in (eager.blocks[1], eager.blocks[2]):
                x = b[2](b[1](conv(b[0], x)))
        return torch.softmax(head(x.float().mean((2, 3))), 1)

    got = torch.tensor([[float(v) for v in row.split(",")[2:]]
                        for row in open(f"{work}/dw.csv").read().splitlines()[1:]])
    want, plain = scores(True), scores(False)
    worst = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    apart = (want - plain).abs().max().item()
    check(worst <= 2e-6 and apart > 1e-5,
          f"predict's scores with the depthwise bfloat16 top = Python's autocast with its grouped convolutions "
          f"in float32 (max diff {worst:.1e}; the plain autocast's scores are {apart:.1e} away)")


def main():
    binary, work, trunk = start("canopy-precision-", tiny_block_trunk, "blocks.pt")
    config = f"{work}/job.ini"
    with open(config, "w") as f:
        f.write(tiny_trunk_sections(trunk, TRAIN, TEST) + f"""[cache]
path = {work}/cache32
[train]
out_dir = {work}/out32
epochs = 3
[task.a]
head = linear
""")
    runs = {}
    for name in ("float32", "bfloat16"):
        short = name[:1] + name[-2:]  # f32, b16
        rc, out = canopy(binary, "run", "--config", config, "--progress", "quiet", "--set", f"trunk.precision={name}",
                         "--set", f"cache.path={work}/cache-{short}", "--set", f"train.out_dir={work}/out-{short}")
        check(rc == 0, f"canopy run with trunk.precision = {name} (exit {rc}) {out[-400:] if rc else ''}")
        runs[name] = short
    if not all(os.path.isfile(f"{work}/cache-{s}/cache.h5") for s in runs.values()):
        return finish()

    def cache(name):
        with h5py.File(f"{work}/cache-{runs[name]}/cache.h5", "r") as h:
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in (h.attrs["fingerprint"],
                                                                          h.attrs["description"])]
            return torch.from_numpy(h["test/features"][:]), text[0], text[1]

    f32, fp32, desc32 = cache("float32")
    b16, fpb16, descb16 = cache("bfloat16")
    module = as_canopy_runs(torch.jit.load(trunk))
    x, _ = fmnist_test_inputs(TEST)
    ref32, ref16 = python_features(module, x, torch.float32), python_features(module, x, torch.bfloat16)
    scale = ref32.abs().max().item()
    off16 = (b16 - ref16).abs().max().item()
    off32 = (f32 - ref32).abs().max().item()
    apart = (b16 - f32).abs().max().item()
    check(off32 <= 1e-5 * scale, f"float32 cache = Python's float32 pass (max diff {off32:.2e})")
    check(off16 <= 1e-5 * scale,
          f"bfloat16 cache = Python's pass under torch.autocast(cpu, bfloat16) (max diff {off16:.2e})")
    check(1e-4 * scale < apart < 5e-2 * scale,
          f"bfloat16 features differ from float32 by about bfloat16's rounding: max diff {apart:.2e} "
          f"({apart / scale:.2%} of the largest feature)")

    # The fingerprint: float32 caches keep theirs; bfloat16 is another cache.
    check("precision=" not in desc32 and "precision=bfloat16" in descb16 and fp32 != fpb16,
          "the precision is in the bfloat16 cache's description and fingerprint, not in float32's")
    rc2, out2 = canopy(binary, "inspect", f"{work}/cache-b16", "--config", config)
    check(f"matches {config}: NO, changed precision" in out2,
          f"inspect with a float32 config says the precision differs: {out2[-120:]}")
    rc, out = canopy(binary, "cache", "--config", config, "--progress", "quiet", "--set",
                     f"cache.path={work}/cache-b16")
    check(rc == 0 and "changed precision" in out, f"a float32 config rebuilds the bfloat16 cache, saying why: {out[-300:]}")

    # Heads: cards say the precision; predict refuses another.
    card = json.load(open(f"{work}/out-b16/heads/a.json"))
    card32 = json.load(open(f"{work}/out-f32/heads/a.json"))
    check(card.get("trunk_precision") == "bfloat16" and card32.get("trunk_precision") == "float32",
          f"cards say trunk_precision ({card.get('trunk_precision')}, {card32.get('trunk_precision')})")
    predict = ["predict", "--config", config, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit",
               str(TEST), "--set", f"train.out_dir={work}/out-b16", "--output"]
    rc, out = canopy(binary, *predict, f"{work}/wrong.csv")
    check(rc == 1 and "trunk.precision = bfloat16" in out and not os.path.exists(f"{work}/wrong.csv"),
          f"predict with float32 passes refuses heads trained on bfloat16 features (exit {rc}): {out[-300:]}")
    rc, out = canopy(binary, *predict, f"{work}/pred.csv", "--set", "trunk.precision=bfloat16")
    rows = open(f"{work}/pred.csv").read().splitlines()[1:] if rc == 0 else []
    check(rc == 0 and len(rows) == TEST, f"predict with bfloat16 passes runs (exit {rc}) {out[-300:] if rc else ''}")

    # A fine-tuning cache: the frozen prefix's output, under the autocast too.
    prefixes = {}
    for name in ("float32", "bfloat16"):
        rc, out = canopy(binary, "cache", "--config", config, "--progress", "quiet", "--set", "trunk.freeze=first:2",
                         "--set", f"trunk.precision={name}", "--set", f"cache.path={work}/prefix-{name}")
        check(rc == 0, f"a fine-tuning cache at {name} (exit {rc}) {out[-300:] if rc else ''}")
        if rc == 0:
            with h5py.File(f"{work}/prefix-{name}/cache.h5", "r") as h:
                prefixes[name] = torch.from_numpy(h["test/features"][:])
    if len(prefixes) == 2:
        d = (prefixes["bfloat16"] - prefixes["float32"]).abs().max().item()
        top = prefixes["float32"].abs().max().item()
        check(1e-4 * top < d < 5e-2 * top, f"the prefix cache under bfloat16 differs from float32's by {d:.2e}")

    # Fine-tuned under bfloat16: predict runs the exported trunk as training ran it, the prefix
    # under the autocast and the trained top in float32. Its scores are Python's: the cached
    # bfloat16 prefix of the test images (what training evaluated on) through the exported
    # trunk's top blocks in float32, pooled, through the rebuilt head. (The whole trunk under
    # the autocast, top included, was 7.7e-6 away here; this path 5e-7, the CSV's rounding.)
    tune = ["--config", config, "--set", "trunk.freeze=first:2", "--set", "trunk.precision=bfloat16", "--set",
            f"cache.path={work}/prefix-bfloat16", "--set", f"train.out_dir={work}/tuned", "--set", "trunk.lr=0.003",
            "--set", "task.a.lr=0.01", "--set", "train.batch_size=32"]
    rc, out = canopy(binary, "train", *tune, "--progress", "quiet")
    check(rc == 0, f"the top trains over the bfloat16 prefix (exit {rc}) {out[-300:] if rc else ''}")
    rc, out = canopy(binary, "predict", *tune, "--input", f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST),
                     "--scores", "--output", f"{work}/tuned.csv")
    check(rc == 0, f"predict with the fine-tuned trunk (exit {rc}) {out[-300:] if rc else ''}")
    if rc == 0 and "bfloat16" in prefixes:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
        from rebuild_head import rebuild_head
        tuned = torch.jit.load(f"{work}/tuned/trunk.pt").eval()
        x = prefixes["bfloat16"].reshape(TEST, 8, 14, 14)
        with torch.no_grad():
            for b in ("1", "2"):
                x = getattr(tuned.blocks, b)(x)
            want = torch.softmax(rebuild_head(f"{work}/tuned/heads/a.json")(x.mean((2, 3))), 1)
        got = torch.tensor([[float(v) for v in row.split(",")[2:]]
                            for row in open(f"{work}/tuned.csv").read().splitlines()[1:]])
        worst = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
        check(worst <= 2e-6, f"predict's scores with the fine-tuned trunk = its float32 top over the bfloat16 "
                             f"prefix, as trained (max diff {worst:.1e})")

    # trunk.top_precision = bfloat16: the top trains under the autocast (mixed precision). It
    # trains to other weights than in float32, the same ones run after run; its card says so,
    # predict refuses another top precision and with the same one scores the card's accuracy.
    def top_state(out_dir):
        return {k: v.detach().clone() for k, v in torch.jit.load(f"{out_dir}/trunk.pt").state_dict().items()}

    mixed = [*tune, "--set", "trunk.top_precision=bfloat16"]
    states = []
    for k in range(2):
        rc, out = canopy(binary, "train", *mixed, "--set", f"train.out_dir={work}/mixed{k}", "--progress", "quiet")
        check(rc == 0, f"the top trains under trunk.top_precision = bfloat16, run {k} (exit {rc}) {out[-300:] if rc else ''}")
        if rc == 0:
            states.append(top_state(f"{work}/mixed{k}"))
    if len(states) == 2 and os.path.isfile(f"{work}/tuned/trunk.pt"):
        plain = top_state(f"{work}/tuned")
        same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
        moved = max((states[0][k].float() - plain[k].float()).abs().max().item() for k in plain)
        check(same and moved > 0, f"a bfloat16 top trains to the same weights run after run ({same}) and to others "
                                  f"than a float32 top (max diff {moved:.1e})")
        card = json.load(open(f"{work}/mixed0/heads/a.json"))
        check(card.get("top_precision") == "bfloat16", f"the card says top_precision ({card.get('top_precision')})")
        rc, out = canopy(binary, "predict", *tune, "--set", f"train.out_dir={work}/mixed0", "--input",
                         f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST), "--output", f"{work}/m.csv")
        check(rc == 1 and "trunk.top_precision = bfloat16" in out,
              f"predict with a float32 top refuses a top trained at bfloat16 (exit {rc}): {out[-200:]}")
        rc, out = canopy(binary, "predict", *mixed, "--set", f"train.out_dir={work}/mixed0", "--input",
                         f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", str(TEST), "--scores", "--output",
                         f"{work}/m.csv")
        check(rc == 0, f"predict with the bfloat16 top (exit {rc}) {out[-300:] if rc else ''}")
        if rc == 0:
            # Python: the exported top's blocks under torch.autocast over the cached prefix,
            # pooled in float32, the head in float32.
            tuned = torch.jit.load(f"{work}/mixed0/trunk.pt").eval()
            x = prefixes["bfloat16"].reshape(TEST, 8, 14, 14)
            with torch.no_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    for b in ("1", "2"):
                        x = getattr(tuned.blocks, b)(x)
                want = torch.softmax(rebuild_head(f"{work}/mixed0/heads/a.json")(x.float().mean((2, 3))), 1)
            got = torch.tensor([[float(v) for v in row.split(",")[2:]]
                                for row in open(f"{work}/m.csv").read().splitlines()[1:]])
            worst = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
            check(worst <= 2e-6, f"predict's scores with the bfloat16 top = Python's autocast over the cached "
                                 f"prefix (max diff {worst:.1e})")

    depthwise_top(binary, work)
    rc, out = canopy(binary, "trunk", "show", "--config", config, "--set", "trunk.precision=bfloat16")
    check(rc == 0 and "passes under bfloat16 autocast" in out, f"trunk show says the precision: {out[:300]}")
    rc, out = canopy(binary, "cache", "--config", config, "--set", "trunk.precision=float16", "--set",
                     f"cache.path={work}/cache-f16")
    if not cpu_flags() & {"avx512_fp16", "amx_fp16"}:
        check(rc == 2 and "no float16 arithmetic" in out and "bfloat16" in out,
              f"float16 on a CPU without float16 arithmetic is refused (exit {rc}): {out[-300:]}")
    else:
        check(rc == 0, f"float16 on a CPU with float16 arithmetic runs (exit {rc})")
    rc, out = canopy(binary, "cache", "--config", config, "--set", "trunk.precision=int8")
    check(rc == 2 and "trunk.precision" in out and "int8" in out, f"an unknown precision is refused: {out[-200:]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
