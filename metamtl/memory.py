"""Measuring memory: the process's resident set (CPU) or CUDA allocations, and their peaks.

* :func:`rss_mb` is the current resident set size of this process (``VmRSS``), :func:`peak_rss_mb`
  its high-water mark (``VmHWM``).  On Linux the high-water mark can be reset
  (``/proc/self/clear_refs``), so :class:`PeakMemory` measures the peak of one stretch of code
  (a meta-iteration, a whole ``fit``) in a long-lived process; where it cannot be reset, the
  peak since the process started is reported and :attr:`PeakMemory.resettable` says so.
* On a CUDA device :class:`PeakMemory` uses ``torch.cuda.max_memory_allocated`` (reset with
  ``torch.cuda.reset_peak_memory_stats``): tensor memory only, not the caching allocator's
  reserve or the CUDA context.
"""
from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    return peak_rss_mb()  # no /proc: the best available figure


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since start or the last reset)."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0); True if done."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory of a stretch of code on ``device``.

    ``start()`` marks the beginning (resets the peak where possible and remembers what was in
    use); ``peak_mb`` is the highest total since then and ``added_mb`` how far that peak rose
    above the memory in use at ``start()`` (what the measured code needed on top).

    On the CPU the figures are the process's resident set (``VmHWM``/``VmRSS``); on CUDA,
    ``torch.cuda.max_memory_allocated``/``memory_allocated`` of that device.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        self.start_mb = 0.0
        self.start()

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "rss"

    def current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20
        return rss_mb()

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.resettable = reset_peak_rss()
        self.start_mb = self.current_mb()
        return self

    @property
    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()

    @property
    def added_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)
