#!/usr/bin/env python3
"""Compiled (AOTInductor .pt2) trunks as scripts/setup makes them for this machine, against
the TorchScript trunks they were compiled from, through the real binary, read with h5py:

- the cache of the pt2 trunk holds the TorchScript trunk's features within the documented
  tolerance (|a - b| <= 1e-3 + 1e-4 |a| elementwise; docs/trunks.md), on Fashion-MNIST
  (EfficientNet-Lite0, 64x64) and on Reuters (MiniLM, texts of any length up to 256 tokens)
- heads train on it end to end
- what a compiled trunk cannot do is refused with a clear error, never a crash: another
  input size (compiled code would read out of bounds), fine-tuning, other taps, passes under
  autocast (trunk.precision), trunk.expand, an unpinned
  or wrongly pinned file, a truncated package
- `canopy trunk show` says what the package is
- a CPU package links libtorch_cpu, not libtorch.so, and canopy runs it without loading
  LibTorch's CUDA half (the dynamic loader's own log, LD_DEBUG=files); a package whose
  metadata does not say so (an older export) gets libtorch.so loaded as before; metadata
  naming inputs canopy cannot run (another dtype, a malformed dimension) is refused at load
- a /tmp mounted noexec (where LibTorch unpacks a package) gives an error that says so and
  leaves nothing behind there

    test_compiled_trunk.py --canopy build/runners/canopy
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import h5py
import numpy as np

from support import check, finish, work_dir

HOME = os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy"))
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL, RTOL = 1e-3, 1e-4


def canopy_run(canopy, *args):
    quiet = ["--progress", "quiet"] if args[0] in ("cache", "train", "run") else []
    p = subprocess.run([canopy, *args, *quiet], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def features(cache):
    with h5py.File(os.path.join(cache, "cache.h5"), "r") as f:
        return {s: f[s]["features"][:] for s in ("train", "test")}


def compare(canopy, work, demo, pt2, limits, what):
    config = os.path.join(SOURCE, "configs", demo)
    sha = open(pt2 + ".sha256").read().strip()
    caches = {}
    for form, extra in (("torchscript", []), ("pt2", ["--set", f"trunk.path={pt2}", "--set", f"trunk.sha256={sha}"])):
        cache = os.path.join(work, f"{demo}-{form}")
        rc, out = canopy_run(canopy, "cache", "--config", config, "--set", f"cache.path={cache}", *limits, *extra)
        check(rc == 0, f"{what}: canopy cache with the {form} trunk (exit {rc}) {out[-300:] if rc else ''}")
        caches[form] = cache
    a, b = features(caches["torchscript"]), features(caches["pt2"])
    for split in ("train", "test"):
        diff = np.abs(a[split] - b[split])
        worst = float((diff - RTOL * np.abs(a[split])).max())
        check(a[split].shape == b[split].shape and worst <= ATOL,
              f"{what} {split}: {a[split].shape} features agree (max |a-b| {diff.max():.2e}, "
              f"scale {np.abs(a[split]).max():.1f}; tolerance 1e-3 + 1e-4|a|)")
    return config, sha, caches["pt2"]


def package_member(pt2, suffix):
    with zipfile.ZipFile(pt2) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        return z.read(names[0]) if len(names) == 1 else None


def with_metadata(pt2, out, edit):
    """A copy of `pt2` whose metadata `edit` (a function of the dict) has changed."""
    import json
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
            dst.writestr(info, data)


def loaded_libraries(canopy, *args):
    """`canopy trunk show` under the dynamic loader's log: its exit, output and the libraries loaded."""
    env = dict(os.environ, LD_DEBUG="files")
    p = subprocess.run([canopy, "trunk", "show", *args], capture_output=True, text=True, env=env)
    loaded = {os.path.basename(line.split("file=")[1].split()[0]) for line in p.stderr.splitlines() if "file=" in line}
    out = "\n".join(line for line in (p.stdout + p.stderr).splitlines() if "file=" not in line and "\t" not in line)
    return p.returncode, out, loaded


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    canopy = ap.parse_args().canopy
    work = work_dir("canopy-compiled-")
    lite = os.path.join(HOME, "trunks", "efficientnet_lite0_64.pt2")
    minilm = os.path.join(HOME, "trunks", "all_minilm_l6_v2_256.pt2")
    for pt2 in (lite, minilm):
        present = os.path.isfile(pt2) and os.path.isfile(pt2 + ".sha256")
        check(present, f"scripts/setup compiled {os.path.basename(pt2)} and recorded its pin "
                       f"({'see ' + pt2 + '.log' if not present else 'present'})")
        if not present:
            return finish()

    config, sha, cache = compare(canopy, work, "fmnist_lite0.ini", lite,
                                 ["--set", "data.train_limit=512", "--set", "data.test_limit=128"], "EfficientNet-Lite0")
    compare(canopy, work, "reuters_minilm.ini", minilm,
            ["--set", "data.train_limit=96", "--set", "data.test_limit=32"], "MiniLM")
    pinned = ["--set", f"trunk.path={lite}", "--set", f"trunk.sha256={sha}"]
    small = ["--set", "data.train_limit=512", "--set", "data.test_limit=128", "--set", f"cache.path={cache}"]

    rc, out = canopy_run(canopy, "train", "--config", config, *small, *pinned, "--set", "train.epochs=1",
                         "--set", f"train.out_dir={work}/out")
    check(rc == 0 and os.path.isfile(f"{work}/out/heads/class_linear.safetensors"),
          f"ten heads train on the compiled trunk's cache (exit {rc})")
    # Predicting with the config that names the TorchScript file (as scripts/demo's users do
    # after it chose the .pt2): refused, naming the run's own config, which then predicts.
    images = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    rc, out = canopy_run(canopy, "predict", "--config", config, *small, "--set", f"train.out_dir={work}/out",
                         "--input", images, "--limit", "2")
    check(rc == 1 and f"the run's own config names that trunk (trunk.path = {lite}): use --config {work}/out/config.ini"
          f", or --set trunk.path={lite} --set trunk.sha256={sha}; or retrain the head" in out,
          f"heads over the .pt2 asked for with the TorchScript trunk's config: refused, saying which config to use "
          f"(exit {rc}): {out.strip()[-500:]}")
    rc, out = canopy_run(canopy, "predict", "--config", f"{work}/out/config.ini", "--input", images, "--limit", "2")
    check(rc == 0 and out.startswith("id,") and ",class_linear," in out.split("\n")[0] and
          [line.split(",")[0] for line in out.split("\n")[1:3]] == ["0", "1"],
          f"... and the run's own config predicts (exit {rc}): {out.strip()[-300:]}")

    rc, out = canopy_run(canopy, "trunk", "show", "--config", config, *pinned)
    check(rc == 0 and "AOTInductor package" in out and "float32 N,3,64,64" in out and "blocks.13" in out,
          "trunk show names the package, its inputs and its output")

    # What a CPU package links: libtorch_cpu and c10, not libtorch.so (LibTorch's CUDA half).
    for pt2 in (lite, minilm):
        name = os.path.basename(pt2)
        meta = package_member(pt2, "wrapper_metadata.json")
        library = package_member(pt2, "wrapper.so")
        check(meta is not None and b'"canopy.links_libtorch": "0"' in meta,
              f"{name}: its metadata says it links libtorch_cpu only (canopy.links_libtorch = 0)")
        check(library is not None and b"\0libtorch_cpu.so\0" in library and b"\0libtorch.so\0" not in library,
              f"{name}: its library needs libtorch_cpu.so and not libtorch.so")
    rc, out, loaded = loaded_libraries(canopy, "--config", config, *pinned, "--set", "trunk.device=cpu")
    check(rc == 0 and "libtorch_cpu only" in out and "libtorch_cuda.so" not in loaded and "libtorch.so" not in loaded,
          f"canopy runs the CPU package without libtorch.so or LibTorch's CUDA half (exit {rc}; "
          f"{len(loaded)} libraries loaded{', libtorch_cuda.so among them' if 'libtorch_cuda.so' in loaded else ''})")
    older = os.path.join(work, "older.pt2")
    with_metadata(lite, older, lambda meta: meta.pop("canopy.links_libtorch"))  # as an older export's
    rc, out, loaded = loaded_libraries(canopy, "--config", config, "--set", f"trunk.path={older}",
                                       "--set", "trunk.sha256=", "--set", "trunk.allow_unpinned=true",
                                       "--set", "trunk.device=cpu")
    check(rc == 0 and "libtorch.so" in loaded and "libtorch_cuda.so" in loaded and "links       libtorch.so" in out,
          f"a package whose metadata does not say what it links gets libtorch.so loaded as before (exit {rc}) "
          f"{out[-300:] if rc else ''}")

    # Metadata that does not say what canopy can run is refused when the package loads.
    for what, inputs, expect in (("an unknown dtype", "float16 N,3,64,64", "dtype 'float16'"),
                                 ("a dimension that is no number", "float32 N,3,sixty,64", "dimension 'sixty'")):
        odd = os.path.join(work, "odd.pt2")
        with_metadata(lite, odd, lambda meta: meta.update({"canopy.inputs": inputs}))
        rc, out = canopy_run(canopy, "trunk", "show", "--config", config, "--set", f"trunk.path={odd}",
                             "--set", "trunk.sha256=", "--set", "trunk.allow_unpinned=true")
        check(rc == 1 and expect in out and "canopy.inputs" in out,
              f"a package whose canopy.inputs holds {what} is refused at load: '{expect}' (exit {rc}) "
              f"{out.strip().splitlines()[-1][:200] if out.strip() else ''}")

    # A /tmp mounted noexec (a real one: tmpfs in a private mount namespace, as root): LibTorch's
    # loader unpacks the package's library there and cannot map it. A clear error saying so,
    # and nothing left behind in /tmp.
    # What this test itself keeps under /tmp (a checkout there, its work folder) stays visible
    # through bind mounts, which keep their own exec permission.
    if os.geteuid() == 0 and shutil.which("unshare") and os.path.isdir("/run"):
        binary = os.path.abspath(canopy)
        hold = tempfile.mkdtemp(prefix="canopy-real-tmp-", dir="/run")  # the real /tmp, seen from inside
        keep = sorted({p.split("/")[2] for p in (binary, config, work, lite) if p.startswith("/tmp/")})
        script = ('mount --bind /tmp "$HOLD" && mount -t tmpfs -o noexec,size=64m tmpfs /tmp || exit 99; '
                  'for e in $KEEP; do mkdir /tmp/$e && mount --bind "$HOLD/$e" /tmp/$e || exit 99; done; '
                  '"$@"; echo "exit $?"; echo "left in /tmp: [$(ls -A /tmp | grep -vxF -e "${KEEP:-/}" | tr -d "\\n")]"')
        env = dict(os.environ, KEEP="\n".join(keep), HOLD=hold)
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", binary,
                            "trunk", "show", "--config", config, *pinned], capture_output=True, text=True, env=env)
        os.rmdir(hold)
        out = p.stdout + p.stderr
        if p.returncode == 99 or "left in /tmp:" not in out:  # no namespace or no mount here
            print(f"skip a noexec /tmp: cannot mount one here ({out.strip()[-160:]})")
        else:
            check("exit 1" in out and "/tmp is mounted noexec" in out and "left in /tmp: []" in out,
                  f"a noexec /tmp gives a clear error and leaves nothing in /tmp: {out.strip()[-300:]}")
    else:
        print("skip a noexec /tmp: needs root, unshare and /run to mount one")

    # Refusals: each a clear error (exit 1, or 2 for the config), none a crash.
    cases = [
        ("another image size", ["--set", "preprocess.resize=32", "--set", f"cache.path={work}/c32"],
         "accepts float32 N,3,64,64"),
        ("fine-tuning", ["--set", "trunk.freeze=first:12", "--set", f"cache.path={work}/ft"], "cannot be fine-tuned"),
        ("other taps", ["--set", "trunk.taps=blocks.12", "--set", f"cache.path={work}/taps"], "taps are fixed"),
        ("bfloat16 passes", ["--set", "trunk.precision=bfloat16", "--set", f"cache.path={work}/bf16"],
         "runs at the precision it was compiled with"),
        ("trunk.expand", ["--set", "trunk.expand=blocks", "--set", f"cache.path={work}/expand"],
         "its outputs fixed when it was exported; expand the TorchScript trunk"),
    ]
    for what, extra, expect in cases:
        rc, out = canopy_run(canopy, "run", "--config", config, *small[:4], *pinned, *extra, "--set",
                             f"train.out_dir={work}/refused")
        check(rc in (1, 2) and expect in out,
              f"{what} is refused: '{expect}' (exit {rc}) {out[-200:] if rc not in (1, 2) else ''}")
    rc, out = canopy_run(canopy, "trunk", "show", "--config", config, "--set", f"trunk.path={lite}",
                         "--set", "trunk.sha256=")
    check(rc == 2 and "not pinned" in out, f"an unpinned compiled trunk is refused (exit {rc})")
    flipped = os.path.join(work, "flipped.pt2")
    shutil.copyfile(lite, flipped)
    with open(flipped, "r+b") as f:
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    rc, out = canopy_run(canopy, "trunk", "show", "--config", config, "--set", f"trunk.path={flipped}",
                         "--set", f"trunk.sha256={sha}")
    check(rc == 1 and "refusing to load it" in out, f"a flipped byte is refused by the pin before loading (exit {rc})")
    truncated = os.path.join(work, "truncated.pt2")
    with open(lite, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read(os.path.getsize(lite) // 2))
    rc, out = canopy_run(canopy, "trunk", "show", "--config", config, "--set", f"trunk.path={truncated}",
                         "--set", "trunk.sha256=", "--set", "trunk.allow_unpinned=true")
    check(rc == 1 and ("compiled trunk" in out or "AOTInductor" in out),
          f"a truncated package is refused with a message (exit {rc}): {out.strip().splitlines()[-1][:160]}")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
