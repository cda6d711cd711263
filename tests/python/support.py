"""Helpers shared by canopy's Python checks: a check that records failures, and where
Fashion-MNIST lives."""
import atexit
import os
import shutil

FMNIST = os.environ.get("CANOPY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
failures = []
_work_dirs = []


def work_dir(prefix):
    """A fresh work folder for this check under $TMPDIR (or /tmp). finish() removes it when every
    check passed; when one failed, or the script stopped on an exception, it is kept and its path
    printed, to look into."""
    import tempfile
    path = tempfile.mkdtemp(prefix=prefix)
    _work_dirs.append(path)
    return path


@atexit.register
def _say_kept():
    for path in _work_dirs:
        print(f"work folder kept for inspection: {path}", flush=True)


def pinned_trunk_section(path, pooling="masked_mean"):
    """A config's [trunk] section for the trunk file `path`, pinned by its SHA-256, on the CPU."""
    import hashlib
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    return f"[trunk]\npath = {path}\nsha256 = {sha256}\ndevice = cpu\npooling = {pooling}\n"


def canopy_texts(canopy, *args):
    """The texts `canopy tokenize` reads from its input arguments (`--arff FILE`, `--input FILE`),
    as it reads them: through the all-MiniLM-L6-v2 vocabulary the set-up writes."""
    import json
    import os
    import subprocess
    vocab = os.path.join(os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy")), "trunks",
                         "all_minilm_l6_v2.vocab.txt")
    out = subprocess.run([canopy, "tokenize", "--vocab", vocab] + list(args), check=True, capture_output=True,
                         text=True).stdout
    return [json.loads(line)["text"] for line in out.split("\n") if line]  # not splitlines: U+2028


def multilingual_sentences():
    """The 47 lines of tests/python/data/multilingual_sentences.txt (46 languages, emoji, forms)."""
    import os
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "multilingual_sentences.txt"),
              encoding="utf-8") as f:
        return f.read().splitlines()


def same_ids_as_tokenizers(canopy, work, name, content, texts, texts_path, max_lengths, echoed=False):
    """Writes `content` (a tokenizer.json) to {work}/{name}.json and checks, at each of
    `max_lengths`, that `canopy tokenize` of `texts_path` (JSON lines of `texts`, field "text")
    gives Hugging Face tokenizers' ids for every text (and, with `echoed`, the text as read)."""
    import json
    import os
    import subprocess
    from tokenizers import Tokenizer
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump(content, f, ensure_ascii=False)
    reference = Tokenizer.from_file(path)
    reference.no_padding()
    for max_length in max_lengths:
        reference.enable_truncation(max_length=max_length)
        r = subprocess.run([canopy, "tokenize", "--tokenizer", path, "--max-length", str(max_length), "--input",
                            texts_path, "--attribute", "text"], capture_output=True, text=True)
        rows = [json.loads(line) for line in r.stdout.split("\n") if line]  # not splitlines: U+2028 is in texts
        same = 0
        first_bad = r.stderr.strip()[-300:] if r.returncode != 0 else None
        for text, row in zip(texts, rows):
            ref = reference.encode(text).ids
            ok = ref == row["ids"] and (not echoed or text == row["text"])
            same += ok
            if not ok and first_bad is None:
                first_bad = (text[:40], [reference.id_to_token(i) for i in ref][:16],
                             [reference.id_to_token(i) for i in row["ids"]][:16])
        check(len(rows) == len(texts) and same == len(texts),
              f"{name}, max_length {max_length}: {same} of {len(texts)} texts tokenized as tokenizers does"
              + (f"; first difference {first_bad!r}" if first_bad else ""))
    return path


def grain_stories_config(path, work, tag, text_lines, trunk):
    """A config of 48 training and 16 test Reuters grain stories through the text trunk `trunk`
    ([text] holding `text_lines` and max_length 96), cached to {work}/cache_{tag}, one linear head
    trained for an epoch into {work}/train_{tag}; written to `path`, which it returns."""
    import os
    reuters = os.path.join(os.environ.get("CANOPY_HOME", os.path.expanduser("~/.cache/canopy")), "data", "reuters")
    with open(path, "w") as f:
        f.write(f"""
[data]
source = arff
train_files = grain:{reuters}/ReutersGrain-train.arff
test_files = grain:{reuters}/ReutersGrain-test.arff
train_limit = 48
test_limit = 16

[text]
{text_lines}
max_length = 96

{pinned_trunk_section(trunk)}
[cache]
path = {work}/cache_{tag}
batch_size = 16

[train]
out_dir = {work}/train_{tag}
epochs = 1

[task.grain]
head = linear
labels = grain
""")
    return path


def arff_labels(path):
    """The class (last value) of every instance, as a numpy array: each Weka Reuters row ends in
    ',0' or ',1'."""
    import numpy as np
    out = []
    data = False
    for line in open(path, encoding="utf-8"):
        if line.lower().startswith("@data"):
            data = True
        elif data and line.strip():
            out.append(int(line.rstrip("\n")[-1]))
    return np.array(out)


def read_idx(path):
    """An idx file (gzip) as a uint8 numpy array with the file's dimensions."""
    import gzip

    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_cache_view(cache):
    """The train and test splits of a cache as users read them (cache.h5 through h5py):
    {split: (features, class labels, ids)}."""
    import h5py
    out = {}
    with h5py.File(os.path.join(cache, "cache.h5"), "r") as h:
        for split in ("train", "test"):
            out[split] = (h[f"{split}/features"][:], h[f"{split}/labels/class"][:], h[f"{split}/ids"][:])
    return out


def run_measured(cmd, timeout=None):
    """Runs cmd to its end; returns (exit status, stderr as text, its peak resident memory in MiB,
    seconds); the status is -9 when it ran past `timeout` seconds. The peak is GNU time's (the
    Debian package `time`, which scripts/setup installs): the process's own wait4() figure would
    count this Python process's memory, which the child holds until it starts canopy."""
    import subprocess
    import tempfile
    import time
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.time()
        try:
            r = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", peak.name] + list(cmd), capture_output=True,
                               text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return -9, (e.stderr or b"").decode(errors="replace"), 0.0, time.time() - start
        seconds = time.time() - start
        text = peak.read().split()
        return r.returncode, r.stderr, (int(text[-1]) / 1024 if text else 0.0), seconds


def flip(path, offset, bit):
    """XORs the byte at `offset` of the file at `path` with `bit`: a corrupt file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ bit]))


def trunk_rows(out):
    """metrics.jsonl's rows for the trunk's trained top (task "@trunk") in the run folder `out`."""
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["task"] == "@trunk"]


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def finish():
    """Prints the closing line and returns the exit status. Removes the work folders when every
    check passed."""
    print(f"\n{len(failures) == 0 and 'all checks passed' or str(len(failures)) + ' check(s) failed'}")
    if not failures:
        while _work_dirs:
            shutil.rmtree(_work_dirs.pop(), ignore_errors=True)
    return 1 if failures else 0


def tiny_conv_trunk():
    """A small image trunk: Conv2d(3, 8, 3, stride 2) + ReLU, [N, 3, H, W] -> [N, 8, H/2, W/2]."""
    import torch

    class TinyConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    return TinyConv()


def slow_conv_trunk():
    """A conv trunk heavy enough that caching a few thousand 28x28 images takes seconds on 2
    cores (room to SIGKILL a build midway): 3 -> 48 -> 48 -> 16 channels, the last stride 2."""
    import torch

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 48, 3, padding=1)
            self.b = torch.nn.Conv2d(48, 48, 3, padding=1)
            self.c = torch.nn.Conv2d(48, 16, 3, stride=2, padding=1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    return Slow()


def tiny_block_trunk(depthwise=False):
    """A small image trunk with blocks, for fine-tuning: stem = Sequential(Conv2d(3, 8, 3,
    stride 2), BatchNorm2d, ReLU), then blocks.0 .. blocks.2, each Sequential(Conv2d(8, 8, 3),
    BatchNorm2d, ReLU) with non-trivial running statistics. [N, 3, H, W] -> [N, 8, H/2, W/2].
    depthwise: the blocks' convolutions are depthwise (groups = 8), as in MobileNets."""
    import torch
    from torch import nn

    def conv_bn(c_in, stride):
        groups = 8 if depthwise and c_in == 8 else 1
        return nn.Sequential(nn.Conv2d(c_in, 8, 3, stride=stride, padding=1, groups=groups), nn.BatchNorm2d(8),
                             nn.ReLU())

    class TinyBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 2)
            self.blocks = nn.ModuleList([conv_bn(8, 1) for _ in range(3)])
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return x

    return TinyBlocks()


def fmnist_test_inputs(n, size=28):
    """The first n Fashion-MNIST test images as canopy's default preprocessing makes them
    ([n, 3, size, size], (x - 0.5) / 0.5), and their labels."""
    import torch
    import torch.nn.functional as F
    imgs = torch.from_numpy(read_idx(f"{FMNIST}/t10k-images-idx3-ubyte.gz")[:n].copy()).float().div(255)
    x = F.interpolate(imgs.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(read_idx(f"{FMNIST}/t10k-labels-idx1-ubyte.gz")[:n].astype("int64"))
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), labels


def tiny_trunk_sections(trunk, train_limit, test_limit, pooling="avg", data=None):
    """The [data], [preprocess] and [trunk] sections of a job over a slice of Fashion-MNIST at
    28x28 through the unpinned TorchScript trunk `trunk` on the CPU. `data`, when given, is the
    [data] section's body instead (other images at 28x28; the limits are then not written)."""
    data = data or f"dir = {FMNIST}\ntrain_limit = {train_limit}\ntest_limit = {test_limit}"
    return f"""[data]
{data}
[preprocess]
resize = 28
[trunk]
allow_unpinned = true
path = {trunk}
device = cpu
pooling = {pooling}
"""


def start(prefix, trunk_module, trunk_name):
    """The common start of a check: parses --canopy, makes a work directory, and saves
    `trunk_module` (made with torch's seed 0) there as TorchScript. Returns (canopy, work, trunk)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    a = ap.parse_args()
    work = work_dir(prefix)
    torch.manual_seed(0)
    trunk = os.path.join(work, trunk_name)
    torch.jit.script(trunk_module().eval()).save(trunk)
    return a.canopy, work, trunk


def slowdown():
    """How many times slower than usual canopy runs here (a sanitizer build sets
    CANOPY_TEST_SLOWDOWN); waits scale by it."""
    return float(os.environ.get("CANOPY_TEST_SLOWDOWN", "1"))


def kill_when(cmd, json_path, reached, timeout=120, env=None, sig=None, stderr=None, preexec_fn=None):
    """Starts `cmd`, polls the JSON file `json_path` until `reached(doc)` is true, then sends
    the process `sig` (SIGKILL by default). Returns (returncode, the document that triggered
    the signal or None); appends the process's standard error, as text, to the list `stderr`."""
    import json
    import signal
    import subprocess
    import time

    sig = signal.SIGKILL if sig is None else sig
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=preexec_fn)
    deadline = time.time() + timeout * slowdown()
    seen = None
    while time.time() < deadline and p.poll() is None:
        try:
            with open(json_path) as f:
                doc = json.load(f)
            if reached(doc):
                p.send_signal(sig)
                seen = doc
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    _, err = p.communicate()
    if stderr is not None:
        stderr.append(err.decode(errors="replace"))
    return p.returncode, seen


class Cgroup:
    """A cgroup made here (needs root and a writable cgroup filesystem), v1 or v2, under the one
    this process is in, for `controller` ("memory", "cpu"), with its files set from `v1` or `v2`
    (file: value) by the hierarchy found: a real limit, as a container has. `enter` is a
    preexec_fn that moves a child into it. `reason` says why none could be made (then `path`
    is None). As a context manager it is removed at the end of the block."""

    def __init__(self, controller, name, v1, v2):
        self.path, self.v1, self.reason, self.controller = None, True, "", controller
        own = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                hid, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    own["v1"] = path
                if hid == "0" and controllers == "":
                    own["v2"] = path
        tries = []
        if "v1" in own:
            for mount in (controller, "cpu,cpuacct" if controller == "cpu" else controller):
                if os.path.isdir(f"/sys/fs/cgroup/{mount}"):
                    tries.append((True, f"/sys/fs/cgroup/{mount}" + own["v1"]))
                    break
        if "v2" in own:
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                if os.path.exists(os.path.join(root, "cgroup.controllers")):
                    tries.append((False, root + own["v2"]))
        for is_v1, parent in tries:
            path = os.path.join(parent.rstrip("/"), name)
            try:
                if not is_v1:
                    with open(os.path.join(parent, "cgroup.controllers")) as f:
                        if controller not in f.read().split():
                            raise OSError(f"no {controller} controller in {parent}")
                    with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                        f.write("+" + controller)
                os.makedirs(path, exist_ok=True)
                for file, value in (v1 if is_v1 else v2).items():
                    if file.startswith("?"):  # only where the kernel has it
                        file = file[1:]
                        if not os.path.exists(os.path.join(path, file)):
                            continue
                    with open(os.path.join(path, file), "w") as f:
                        f.write(str(value))
                self.path, self.v1 = path, is_v1
                return
            except OSError as e:
                self.reason += f"{path}: {e}; "
        self.reason = self.reason or f"no {controller} cgroup hierarchy in /proc/self/cgroup"

    def enter(self):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def made(self, what):
        """Whether the cgroup exists; if not, says that `what` is skipped and why."""
        if self.path is None:
            print(f"skip {what}: no {self.controller} cgroup can be made here ({self.reason.strip()})")
        return self.path is not None

    def remove(self):
        if self.path:
            os.rmdir(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class MemoryCgroup(Cgroup):
    """A memory cgroup limited to `limit` bytes, swap included (where there is swap, the limit
    would otherwise page out instead of limiting); `oom_kills()` counts the kernel's OOM kills in it."""

    def __init__(self, name, limit):
        super().__init__("memory", name, {"memory.limit_in_bytes": limit, "?memory.memsw.limit_in_bytes": limit},
                         {"memory.max": limit, "?memory.swap.max": 0})

    def oom_kills(self):
        name = "memory.oom_control" if self.v1 else "memory.events"
        with open(os.path.join(self.path, name)) as f:
            for line in f:
                key, value = line.split()
                if key == "oom_kill":
                    return int(value)
        return 0


class CpuCgroup(Cgroup):
    """A cgroup whose CFS quota grants `cpus` CPUs (of every 100 ms, cpus x 100 ms)."""

    def __init__(self, name, cpus):
        quota = int(cpus * 100000)
        super().__init__("cpu", name, {"cpu.cfs_period_us": 100000, "cpu.cfs_quota_us": quota},
                         {"cpu.max": f"{quota} 100000"})
