"""Helpers shared by canopy's Python checks: a check that records failures, and where
Fashion-MNIST lives."""
import os

FMNIST = os.environ.get("CANOPY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def finish():
    """Prints the closing line and returns the exit status."""
    print(f"\n{len(failures) == 0 and 'all checks passed' or str(len(failures)) + ' check(s) failed'}")
    return 1 if failures else 0
