"""Shared fixtures: where the real data lives, offline W&B, small thread counts."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _test_threads() -> int:
    """Threads per test process: 2 on an idle 2-core machine, 1 when it is already busy.

    On an oversubscribed machine, multi-threaded torch ops spin-wait against other processes and
    run many times slower; one thread is then much faster. ``METAMTL_TEST_THREADS`` overrides.
    """
    if os.environ.get("METAMTL_TEST_THREADS"):
        return max(1, int(os.environ["METAMTL_TEST_THREADS"]))
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > cores
    except OSError:
        busy = False
    return 1 if busy else max(1, min(2, cores))


# A shell starts background jobs (`make test &`, CI steps run without job control) with SIGINT
# ignored, and Python then keeps it ignored instead of raising KeyboardInterrupt.  metamtl rightly
# leaves ignored signals alone, so the tests that send SIGINT (tests/reliability/test_faults.py)
# passed in a terminal and failed in the background.  Every run of the suite starts from Python's
# default Ctrl-C handler instead of inheriting its launcher's (subprocesses then get SIG_DFL).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

THREADS = _test_threads()
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # subprocesses (CLI, torchrun) inherit it


def _data_root() -> Path | None:
    env = os.environ.get("METAMTL_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real datasets (../shared/data or $METAMTL_DATA)."""
    root = _data_root()
    if root is None:
        pytest.fail("real data not found: set METAMTL_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def omniglot_root(data_root: Path) -> Path:
    return data_root / "omniglot"


@pytest.fixture(scope="session")
def miniimagenet_root(data_root: Path) -> Path:
    return data_root / "mini-imagenet"


def _with_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """Run a test of tiny models on one thread (faster, and no spin-waiting against other processes)."""
    yield from _with_threads(1)


@pytest.fixture
def two_threads():
    """Two torch threads (task threads then run two chunks of tasks side by side)."""
    yield from _with_threads(2)


@pytest.fixture
def float64():
    """Double precision for one test, so metamtl and its references agree to tight tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script("speed")``: a script of benchmarks/ imported as a module (its functions
    tested without running it)."""
    import importlib
    import sys

    def load(name: str):
        sys.path.insert(0, str(REPO / "benchmarks"))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(REPO / "benchmarks"))

    return load
