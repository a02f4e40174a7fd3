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

Heap reuse trades memory for time, and memory-bounded meta-steps (``memory: checkpoint``,
``implicit`` or ``auto``) want the opposite trade: while an inner loop runs, the heap fragments
(most likely small long-lived blocks, each step's kept weights, are cut from the large freed
activation blocks, so the next step's activations no longer fit in the holes) and grows by
about one step's activations per inner step.  Measured (2026-12-04, benchmarks/memory.py's setting, one 50-step
checkpointed meta-step, glibc's ``mallinfo2`` sampled every 3 ms): the blocks in use peaked at
405 MB above the start while the heap, and with it the resident set, grew by 2.6 GB.
:func:`mapped_large_blocks` makes such a step serve every block of ``MAPPED_BLOCK`` bytes or more
that free heap memory cannot hold from a fresh mapping, unmapped when freed, instead of growing
the heap: peak 474 MB above the start, for 1.45x the step's time (page faults; with a 1 MiB
threshold 422 MB and 1.7x, with 8 MiB 659 MB and 1.17x).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
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

#: Inside :func:`mapped_large_blocks`: blocks of this size or more that free heap memory cannot
#: hold are mapped afresh (and returned to the OS when freed) instead of growing the heap.
MAPPED_BLOCK = 4 * 1024 * 1024
#: glibc's default ``M_MMAP_MAX`` (how many blocks may be mapped at once)
DEFAULT_MMAP_MAX = 65536

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


@contextlib.contextmanager
def mapped_large_blocks(threshold: int = MAPPED_BLOCK) -> Iterator[bool]:
    """Within the block, ``malloc`` serves blocks of ``threshold`` bytes or more that free heap
    memory cannot hold from fresh mappings, unmapped when freed, instead of growing the heap
    (glibc); then the tuned settings come back.  Yields True if it did so.

    For memory-bounded meta-steps: the resident set then follows the bytes the step holds instead
    of the heap's fragmented high-water mark, at the cost of page faults on large blocks.  Does
    nothing (yields False) unless :func:`tune_cpu_allocator` tuned this process, so an allocator
    left alone (``METAMTL_TUNE_MALLOC=0``, jemalloc, no glibc) stays as it is.  Blocks mapped
    inside and freed after the block are still unmapped; blocks from the heap stay in the heap.
    """
    libc = _libc() if _state["tuned"] else None
    ok = False
    if libc is not None:
        try:
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX))
        except (AttributeError, OSError):
            ok = False
    try:
        yield ok
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
