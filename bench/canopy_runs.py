"""Running canopy from the Python benchmarks: their work folders, one `canopy cache`, then one
`canopy train` per seed."""
import re
import shutil
import subprocess
import sys
import tempfile
import time

_work_dirs = []
_built = {}  # cache path -> wall seconds of the `canopy cache` that built it in this process


def work_dir(prefix):
    """A fresh work folder for this benchmark under $TMPDIR (or /tmp). run_main removes it when
    the benchmark ends well (its caches reach gigabytes), and keeps it, printing its path, when
    the benchmark fails."""
    path = tempfile.mkdtemp(prefix=prefix)
    _work_dirs.append(path)
    return path


def run_main(main):
    """Runs a benchmark's main() and exits with its status, removing the folders work_dir made
    if it succeeded and keeping them if it failed (an exception, sys.exit with a message or a
    non-zero code, or a non-zero return)."""
    try:
        rc = main()
    except SystemExit as e:
        rc = e.code
    except BaseException:
        _say_kept()
        raise
    if rc in (0, None):
        while _work_dirs:
            shutil.rmtree(_work_dirs.pop(), ignore_errors=True)
    else:
        _say_kept()
    sys.exit(rc)


def _say_kept():
    for path in _work_dirs:
        print(f"work folder kept for inspection: {path}", file=sys.stderr, flush=True)


def cache_then_train(canopy, common, seeds, out_prefix, epochs):
    """`canopy cache` with the arguments `common` (config and --set overrides), then `canopy
    train` per seed into out_prefix-<seed>. Yields (seed, out_dir, train stdout, seconds per
    epoch as canopy reports its training time, total wall seconds including the cache build).
    A row whose cache an earlier row of the same benchmark built (e.g. trunk.top_precision,
    which leaves the cache as it is) is charged that build, as if it ran alone: every row's
    total means the same thing."""
    t = time.time()
    r = subprocess.run([canopy, "cache", *common, "--progress", "quiet"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"canopy cache {' '.join(common)} failed: {r.stderr[-800:]}")
    cache_s = time.time() - t
    said = re.match(r"cache (.+?): (built|up to date)", r.stdout)
    if said and said.group(2) == "built":
        _built[said.group(1)] = cache_s
    elif said and said.group(1) in _built:
        cache_s = _built[said.group(1)]
    for seed in seeds:
        out_dir = f"{out_prefix}-{seed}"
        t = time.time()
        r = subprocess.run([canopy, "train", *common, "--progress", "quiet", "--set", f"train.seed={seed}",
                            "--set", f"train.out_dir={out_dir}"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"canopy train {' '.join(common)} failed: {r.stderr[-800:]}")
        total = cache_s + time.time() - t
        per_epoch = float(re.search(r"train ([\d.]+)s", r.stdout).group(1)) / epochs
        yield seed, out_dir, r.stdout, per_epoch, total


def base_sections(config):
    """The text of `config` without its [task.*] sections: the data, trunk, cache and train
    settings a benchmark reuses with tasks of its own."""
    out, keep = [], True
    for line in open(config):
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            keep = not s.startswith("[task.")
        if keep:
            out.append(line)
    return "".join(out)
