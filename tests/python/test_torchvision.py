#!/usr/bin/env python3
"""A trunk as users bring one: torchvision's models, scripted (torch.jit.script) as torchvision
writes them, checked from outside with torch and h5py on a slice of Fashion-MNIST at 64x64.
(No hub can be reached here, so the weights are torchvision's own initialisation, with
BatchNorm statistics gathered on random images as a trained network has them.)

- ResNet-18, whose forward hands its work to self._forward_impl: `trunk show` lists its blocks
  as tap points, and the cache's features at taps = layer3 are Python's (layer3's output,
  averaged) to 1e-5
- MobileNetV3-Small, whose blocks are items of a Sequential (`features`): with trunk.expand =
  features, blocks 10 to 12 train over the cached output of features.9; the exported trunk
  holds features.0-9 and the classifier bitwise as they were, features.10-12 changed; the
  classifier after the tap is said to be kept frozen; `canopy predict` answers with the
  fine-tuned trunk
- the same MobileNet compiled as a user compiles their own trunk: `canopy trunk extract` writes it
  up to two taps (features.6, features.12) as TorchScript whose outputs are Python's; then
  scripts/export_trunk.py compiles the file up to features.12 into an AOTInductor .pt2, whose
  cache holds the TorchScript trunk's features within the documented tolerance (1e-3 + 1e-4 |a|),
  and `trunk show` names its source; what cannot be extracted or compiled is refused, saying why
  (a .pt2, no --output, a misspelt subcommand, no --size, a GPU, a tap that does not exist)
- Swin-T, whose stages are channels-last ([N, H, W, C]): tapped at `features` with
  pooling = avg_channels_last, the cache and the exported file's features() hold Python's
  features(x).mean((1, 2)); pooling = avg, which averages the dimensions after the second,
  is said to look wrong for it, naming what to set

    test_torchvision.py --canopy build/runners/canopy
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import torch
import torchvision

from support import FMNIST, check, finish, fmnist_test_inputs, read_idx, work_dir

SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN, TEST = 400, 200


def run(canopy, *args):
    quiet = [] if args[0] == "trunk" else ["--progress", "quiet"]
    return subprocess.run([canopy, *args, *quiet], capture_output=True, text=True)


def scripted(name, path):
    """torchvision's `name` (seed 0) with BatchNorm statistics of random images, in eval mode,
    scripted and saved at `path`; returns (the eval-mode model, the file's SHA-256)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 64, 64))
    model.eval()
    torch.jit.script(model).save(path)
    return model, hashlib.sha256(open(path, "rb").read()).hexdigest()


def config(path, trunk, sha, out, trunk_keys, task="[task.cls]\nhead = linear\nlr = 0.01\n"):
    with open(path, "w") as f:
        f.write(f"""[data]
dir = {FMNIST}
train_limit = {TRAIN}
test_limit = {TEST}
[preprocess]
resize = 64
[trunk]
path = {trunk}
sha256 = {sha}
device = cpu
{trunk_keys}
[cache]
path = {out}/cache
[train]
out_dir = {out}
epochs = 2
{task}""")
    return path


def resnet(canopy, work):
    model, sha = scripted("resnet18", os.path.join(work, "resnet18.pt"))
    cfg = config(os.path.join(work, "resnet.ini"), os.path.join(work, "resnet18.pt"), sha,
                 os.path.join(work, "resnet"), "taps = layer3")
    r = run(canopy, "trunk", "show", "--config", cfg)
    check(r.returncode == 0 and "tap points  conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc"
          in r.stdout, "scripted ResNet-18: its blocks are tap points (through _forward_impl)"
          + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))
    r = run(canopy, "cache", "--config", cfg)
    check(r.returncode == 0, "canopy cache at taps = layer3" + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
    if r.returncode != 0:
        return
    with h5py.File(os.path.join(work, "resnet", "cache", "cache.h5"), "r") as h:
        got = h["test/features"][:]
    x, _ = fmnist_test_inputs(TEST, 64)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        want = model.layer3(model.layer2(model.layer1(h))).mean((2, 3)).numpy()
    diff = float(np.abs(got - want).max())
    check(got.shape == want.shape and diff < 1e-5 * max(1.0, float(np.abs(want).max())),
          f"the cached layer3 features are Python's: {got.shape}, largest difference {diff:.2e} "
          f"of values up to {float(np.abs(want).max()):.2f}")


def mobilenet(canopy, work, model, sha):
    out = os.path.join(work, "mobilenet")
    cfg = config(os.path.join(work, "mobilenet.ini"), os.path.join(work, "mobilenet.pt"), sha, out,
                 "expand = features\ntaps = features.12\nfreeze = first:10\nlr = 0.001")
    # The file alone, as a user looks at a model before writing its config: the [trunk] keys by --set.
    r = run(canopy, "trunk", "show", os.path.join(work, "mobilenet.pt"), "--set", f"trunk.sha256={sha}",
            "--set", "trunk.expand=features", "--set", "trunk.taps=features.12", "--set", "trunk.freeze=first:10")
    shown = r.stdout
    check(r.returncode == 0 and "trains      the top (features.10, features.11, features.12, then the pooling)" in shown
          and "holds the output of features.9" in shown
          and "avgpool, classifier: never run (after the last tap), kept frozen" in shown
          and "blocks      15 (what freeze = first:N counts): features.0, features.1," in shown,
          "trunk show FILE --set ...: the top is features.10-12 over features.9's output, the classifier kept frozen"
          + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))
    r = run(canopy, "trunk", "show", os.path.join(work, "mobilenet.pt"), "--allow-unpinned", "--set", "train.epochs=3")
    check(r.returncode == 2 and "takes trunk.* keys only, got train.epochs" in r.stderr,
          f"trunk show FILE refuses a key outside [trunk] (exit {r.returncode}): {r.stderr.strip()[-160:]}")
    r = run(canopy, "run", "--config", cfg)
    check(r.returncode == 0, "canopy run with the expanded MobileNetV3's top training"
          + ("" if r.returncode == 0 else ": " + r.stderr[-800:]))
    if r.returncode != 0:
        return
    before = {k: v for k, v in model.state_dict().items()}
    after = torch.jit.load(os.path.join(out, "trunk.pt")).state_dict()
    same = [k for k in before if torch.equal(before[k], after[k])]
    top = ("features.10.", "features.11.", "features.12.")
    moved = [k for k in before if k.startswith(top) and k not in same and not k.endswith("num_batches_tracked")]
    kept = all(k in same for k in before if not k.startswith(top))
    top_params = [k for k, _ in model.named_parameters() if k.startswith(top)]
    check(kept and all(k in moved for k in top_params),
          f"the exported trunk: features.0-9 and the classifier bitwise as they were ({kept}), "
          f"{len([k for k in top_params if k in moved])} of the top's {len(top_params)} parameters changed")
    r = run(canopy, "predict", "--config", os.path.join(out, "config.ini"), "--input",
            f"{FMNIST}/t10k-images-idx3-ubyte.gz", "--limit", "20")
    lines = r.stdout.strip().splitlines()
    check(r.returncode == 0 and lines[0] == "id,cls" and len(lines) == 21 and
          "the heads read the fine-tuned trunk" in r.stderr,
          f"canopy predict with the fine-tuned trunk: {len(lines) - 1} answers"
          + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))


def compiled_own(canopy, work, model, sha):
    own = os.path.join(work, "mobilenet.pt")
    extract = os.path.join(work, "own_features.pt")
    r = run(canopy, "trunk", "extract", own, "--set", f"trunk.sha256={sha}", "--set", "trunk.expand=features",
            "--set", "trunk.taps=features.6,features.12", "--output", extract)
    check(r.returncode == 0 and "outputs features.6, features.12 (unpooled, a tuple)" in r.stderr,
          "canopy trunk extract at two taps" + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))
    if r.returncode != 0:
        return
    extra = {"canopy/trunk.json": ""}
    m = torch.jit.load(extract, _extra_files=extra)
    meta = json.loads(extra["canopy/trunk.json"])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got = m(x)
        want = (model.features[:7](x), model.features(x))
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    check(meta["outputs"] == ["features.6", "features.12"] and meta["source_sha256"] == sha
          and len(got) == 2 and max(diffs) < 1e-5,
          f"the extracted module returns Python's features.6 and features.12 outputs (largest differences "
          f"{', '.join(f'{d:.1e}' for d in diffs)}), and its canopy/trunk.json names them and the source")

    pt2 = os.path.join(work, "own_64.pt2")
    p = subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "export_trunk.py"), own, "--format", "pt2",
                        "--size", "64", "--expand", "features", "--taps", "features.12", "--canopy", canopy,
                        "--out", pt2], capture_output=True, text=True)
    check(p.returncode == 0 and os.path.exists(pt2 + ".sha256"),
          "export_trunk.py compiles the file up to features.12" + ("" if p.returncode == 0 else ": " + p.stderr[-600:]))
    if p.returncode != 0:
        return
    pt2_sha = open(pt2 + ".sha256").read().strip()
    caches = {}
    for form, trunk, pin, keys in (("torchscript", own, sha, "expand = features\ntaps = features.12"),
                                   ("pt2", pt2, pt2_sha, "")):
        cfg = config(os.path.join(work, f"own-{form}.ini"), trunk, pin, os.path.join(work, "own-" + form), keys)
        caches[form] = os.path.join(work, "own-" + form, "cache", "cache.h5")
        r = run(canopy, "cache", "--config", cfg)
        check(r.returncode == 0, f"canopy cache with the {form} trunk" + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
        if r.returncode != 0:
            return
    with h5py.File(caches["torchscript"], "r") as a, h5py.File(caches["pt2"], "r") as b:
        ts, pt = a["test/features"][:], b["test/features"][:]
    excess = float((np.abs(ts - pt) - (1e-3 + 1e-4 * np.abs(ts))).max())
    check(ts.shape == pt.shape and excess <= 0,
          f"the .pt2's features are the TorchScript trunk's within 1e-3 + 1e-4 |a| ({ts.shape}, largest "
          f"difference {float(np.abs(ts - pt).max()):.1e} of values up to {float(np.abs(ts).max()):.2f})")
    r = run(canopy, "trunk", "show", pt2, "--set", f"trunk.sha256={pt2_sha}")
    check(r.returncode == 0 and f"mobilenet.pt (sha256 {sha}), expand features" in r.stdout
          and "features.12" in r.stdout,
          "trunk show names the package's source, its expand and its output" + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))

    refusals = [
        (run(canopy, "trunk", "extract", pt2, "--set", f"trunk.sha256={pt2_sha}", "--output", extract), 2,
         "is a compiled package (.pt2)", "a .pt2 is not extracted"),
        (run(canopy, "trunk", "extract", own, "--allow-unpinned"), 2, "--output FILE is required", "no --output"),
        (run(canopy, "trunk", "extrat", own), 2, "did you mean 'extract'", "a misspelt subcommand"),
        (subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "export_trunk.py"), own, "--format", "pt2",
                         "--out", pt2], capture_output=True, text=True), 1, "--size is required",
         "export_trunk.py without --size"),
        (subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "export_trunk.py"), own, "--format", "pt2",
                         "--size", "64", "--device", "cuda", "--out", pt2], capture_output=True, text=True), 1,
         "a trunk file compiles for the CPU", "export_trunk.py of a trunk file for a GPU"),
        (subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "export_trunk.py"), own, "--format", "pt2",
                         "--size", "64", "--taps", "features.13", "--expand", "features", "--canopy", canopy,
                         "--out", os.path.join(work, "bad.pt2")], capture_output=True, text=True), 1,
         "canopy trunk extract failed", "export_trunk.py with a tap that does not exist"),
    ]
    for r, code, says, what in refusals:
        check(r.returncode == code and says in r.stderr,
              f"{what}: exit {r.returncode}, {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    check(not os.path.exists(os.path.join(work, "bad.pt2")), "a refused compile writes no package")


def swin(canopy, work):
    model, sha = scripted("swin_t", os.path.join(work, "swin_t.pt"))
    out = os.path.join(work, "swin")
    cfg = config(os.path.join(work, "swin.ini"), os.path.join(work, "swin_t.pt"), sha, out,
                 "taps = features\npooling = avg_channels_last")
    r = run(canopy, "run", "--config", cfg)
    check(r.returncode == 0 and "features = avg_channels_last of features [N, 2, 2, 768]: 768 per sample" in r.stderr,
          "canopy run with Swin-T's channels-last stages averaged over H and W, saying so"
          + ("" if r.returncode == 0 else ": " + r.stderr[-600:]))
    if r.returncode != 0:
        return
    x, _ = fmnist_test_inputs(TEST, 64)
    with torch.no_grad():
        want = model.features(x).mean((1, 2)).numpy()
    with h5py.File(os.path.join(out, "cache", "cache.h5"), "r") as h:
        got = h["test/features"][:]
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got - want).max())
    check(got.shape == want.shape and diff < 1e-5 * scale,
          f"the cache holds Python's features(x).mean((1, 2)): {got.shape}, largest difference {diff:.2e}")
    model_path = os.path.join(work, "swin_model.pt")
    r = run(canopy, "export", "--config", os.path.join(out, "config.ini"), "--output", model_path)
    check(r.returncode == 0, "canopy export of the Swin run" + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))
    if r.returncode == 0:
        images = torch.from_numpy(read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:8].copy())
        with torch.no_grad():
            exported = torch.jit.load(model_path).features(images).numpy()
        diff = float(np.abs(exported - want[:8]).max())
        check(exported.shape == (8, 768) and diff < 1e-4 * scale,
              f"the exported file pools as the cache does: features() of 8 raw images, largest difference {diff:.2e}")
    r = run(canopy, "trunk", "show", os.path.join(work, "swin_t.pt"), "--set", f"trunk.sha256={sha}", "--size", "64")
    check(r.returncode == 0 and "    features  [N, 2, 2, 768]        2 per sample (looks channels-last [N, H, W, C]: "
          "avg_channels_last gives 768)" in r.stdout and "    permute   [N, 768, 2, 2]        768 per sample" in r.stdout,
          "trunk show --size 64 gives each tap point's shape, and says that features looks channels-last"
          + ("" if r.returncode == 0 else ": " + r.stderr[-300:]))
    # Averaged as if its channels came first, a Swin stage gives H numbers: said, with what to set.
    r = run(canopy, "cache", "--config", cfg, "--set", "trunk.pooling=avg", "--set", f"cache.path={out}/avg",
            "--set", "data.train_limit=8", "--set", "data.test_limit=8")
    check(r.returncode == 0 and "features = avg of features [N, 2, 2, 768]: 2 per sample; features looks "
          "channels-last [N, H, W, C]" in r.stderr and "pooling = avg_channels_last averages over H and W" in r.stderr,
          "pooling = avg on Swin's stages says they look channels-last"
          + ("" if r.returncode == 0 else ": " + r.stderr[-400:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    torch.set_num_threads(2)
    work = work_dir("canopy-torchvision-")
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}")
    resnet(canopy, work)
    mobilenet_v3 = scripted("mobilenet_v3_small", os.path.join(work, "mobilenet.pt"))  # the file both read
    mobilenet(canopy, work, *mobilenet_v3)
    compiled_own(canopy, work, *mobilenet_v3)
    swin(canopy, work)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
