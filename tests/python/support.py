"""Helpers shared by canopy's Python checks: a check that records failures, and where
Fashion-MNIST lives."""
import os

FMNIST = os.environ.get("CANOPY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
failures = []


def read_idx(path):
    """An idx file (gzip) as a uint8 numpy array with the file's dimensions."""
    import gzip

    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def finish():
    """Prints the closing line and returns the exit status."""
    print(f"\n{len(failures) == 0 and 'all checks passed' or str(len(failures)) + ' check(s) failed'}")
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


def tiny_trunk_sections(trunk, train_limit, test_limit, pooling="avg"):
    """The [data], [preprocess] and [trunk] sections of a job over a slice of Fashion-MNIST at
    28x28 through the unpinned TorchScript trunk `trunk` on the CPU."""
    return f"""[data]
dir = {FMNIST}
train_limit = {train_limit}
test_limit = {test_limit}
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
    import tempfile

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--canopy", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix=prefix)
    torch.manual_seed(0)
    trunk = os.path.join(work, trunk_name)
    torch.jit.script(trunk_module().eval()).save(trunk)
    return a.canopy, work, trunk


def kill_when(cmd, json_path, reached, timeout=120, env=None):
    """Starts `cmd`, polls the JSON file `json_path` until `reached(doc)` is true, then
    SIGKILLs the process. Returns (returncode, the document that triggered the kill or None)."""
    import json
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + timeout
    seen = None
    while time.time() < deadline and p.poll() is None:
        try:
            with open(json_path) as f:
                doc = json.load(f)
            if reached(doc):
                p.send_signal(signal.SIGKILL)
                seen = doc
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    p.communicate()
    return p.returncode, seen
