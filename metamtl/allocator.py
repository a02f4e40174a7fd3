"""Keep glibc's allocator from returning tensor memory to the OS after every iteration (CPU).

PyTorch's CPU tensors come from ``malloc``.  glibc serves blocks above ``M_MMAP_THRESHOLD``
(128 KiB at start-up) with a fresh ``mmap`` and gives them back with ``munmap`` when freed, and
trims the heap above ``M_TRIM_THRESHOLD``; a training step that allocates and frees tens of
megabytes of activations then spends much of its time in the kernel, zeroing new pages (a
84x84 conv4 step on 2 cores: 39% of its CPU time in the kernel).  glibc raises both thresholds
on its own only once a large mmapped block is freed; :func:`tune_cpu_allocator` sets them up
front (1.33x on that step, benchmarks/allocator.py).

The threshold cannot exceed 32 MiB, and a block larger than that is still mapped afresh
whenever the heap has no free chunk big enough: one 84x84 feature map of a 128-image batch is
58 MiB in bfloat16, so the mini-ImageNet transfer step still took ~20,700 page faults and 39 ms
of kernel time per iteration (13% of its CPU time) until the first validation pass happened to
grow the heap enough to hold them.  :func:`tune_cpu_allocator` therefore also turns ``mmap`` off
for ``malloc`` (``M_MMAP_MAX = 0``): every block comes from the heap, freed ones are reused, and
the heap is trimmed only beyond ``TRIM_THRESHOLD`` of free memory at its top (measured on that
step: 0 page faults per iteration, 1.19x less CPU time; see benchmarks/RESULTS.md).

:class:`~metamtl.MetaLearner` calls it once per process when it runs on the CPU.  Set
``METAMTL_TUNE_MALLOC=0`` to leave the allocator alone (e.g. with jemalloc/tcmalloc preloaded, or
to measure the difference).  On systems without glibc it does nothing.

A reused heap holds on to memory its blocks no longer need, and memory-bounded meta-steps
(``memory: checkpoint`` or ``auto``) care: when a long-lived block is cut from a large freed one
(say, each inner step's kept weights from the previous step's activations), the next block of
that large size no longer fits in the hole and the heap grows instead.  Measured (2026-12-04,
benchmarks/memory.py's setting, one 50-step checkpointed meta-step, glibc's ``mallinfo2``
sampled every 3 ms): the blocks in use peaked 405 MB above the start while the heap, and with it
the resident set, grew by 2.6 GB.  Two remedies, neither giving up heap reuse (mapping large
blocks afresh instead kept the resident set at the bytes in use but cost 1.9-2.9x the step's
time in page faults): the checkpointed unroll stores every step's weights in memory taken before
its loop (:mod:`metamtl.adaptation.gradients`: peak 740 MB above the start, faster too), and
under ``memory: auto`` :func:`trim_above` hands free heap memory back whenever the resident set
would pass ``max_memory_mb``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Iterator

#: glibc ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: Blocks up to this size come from the heap and are reused (glibc's largest allowed value on
#: 64-bit systems, ``DEFAULT_MMAP_THRESHOLD_MAX``).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap is returned to the OS only beyond this.
TRIM_THRESHOLD = 256 * 1024 * 1024

_state: dict[str, bool | None] = {"tuned": None}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt but ignores these settings)
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the memory freed inside the process's heap back to the OS (glibc ``malloc_trim``), e.g.
    before measuring a peak from a fresh baseline; ``False`` where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def tune_cpu_allocator(force: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds and stop ``malloc`` from using ``mmap`` for this
    process (once); True if they are set.

    Skipped (False) when ``METAMTL_TUNE_MALLOC=0``, off glibc, or when ``mallopt`` refuses.
    ``force`` applies the settings again even if an earlier call did.
    """
    if _state["tuned"] is not None and not force:
        return bool(_state["tuned"])
    if os.environ.get("METAMTL_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["tuned"] = False
        return False
    libc = _libc()
    ok = False
    if libc is not None:
        try:
            ok = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                  and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
                  and bool(libc.mallopt(M_MMAP_MAX, 0)))  # blocks above the threshold: heap too
        except (AttributeError, OSError):
            ok = False
    _state["tuned"] = ok
    return ok


class _Guard:
    """What :func:`trim_above` did: ``trims`` (calls of ``malloc_trim``) and ``active``."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.trims = 0


@contextlib.contextmanager
def trim_above(limit_mb: float, interval: float = 0.002) -> Iterator[_Guard]:
    """Within the block, whenever the resident set passes ``limit_mb`` MiB, give the allocator's
    free memory back to the OS (glibc ``malloc_trim``: free pages inside the heap too), so that
    free-but-kept memory never pushes a run over a memory budget; yields a :class:`_Guard`.

    A background thread reads the resident set every ``interval`` seconds; below the limit it
    costs nothing else, above it each trim costs a walk over the free blocks and the page faults
    of reusing trimmed pages later.  Memory the code actually holds is not touched: if that alone
    passes the limit, the limit is passed.  Does nothing (``active`` False) off glibc/Linux.
    """
    from .memory import rss_mb

    libc = _libc()
    if libc is None or not os.path.exists("/proc/self/status"):
        yield _Guard(False)
        return
    guard = _Guard(True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            if rss_mb() > limit_mb:
                libc.malloc_trim(0)
                guard.trims += 1

    thread = threading.Thread(target=watch, name="metamtl-trim-guard", daemon=True)
    thread.start()
    try:
        yield guard
    finally:
        stop.set()
        thread.join()
