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

import dataclasses
import gc
import math
import re
import resource
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .devices import parse_device
from .errors import ConfigError

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
    """Peak memory of a stretch of code on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``,
    resolved as :class:`~metamtl.MetaLearner` resolves its device: others are a :class:`ConfigError`).

    ``start()`` marks the beginning (resets the peak where possible and remembers what was in
    use); ``peak_mb`` is the highest total since then and ``added_mb`` how far that peak rose
    above the memory in use at ``start()`` (what the measured code needed on top).

    On the CPU the figures are the process's resident set (``VmHWM``/``VmRSS``); on CUDA,
    ``torch.cuda.max_memory_allocated``/``memory_allocated`` of that device.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = parse_device(device)  # the learner's rules: 'auto', ConfigError for 'meta' or a missing GPU
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


# -- planning: which meta-gradient mode and task chunk fit a memory budget -----------------------
def graph_mb(fn: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> tuple[float, Any]:
    """``(MiB, fn())``: the tensors the autograd graph built by ``fn`` still holds once it has
    returned (distinct storages, other than those of ``exclude``: inputs alive anyway)."""
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    alive: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(alive.values()) / 2**20, out


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What one task's second-order meta-gradient keeps alive, in MiB (measured by a probe).

    Attributes:
        step_mb: the graph of one second-order inner step (forward + differentiable gradient).
        query_mb: the graph of the outer objective's forward pass (the query set).
        state_mb: the adapted weights and inner-optimizer state (what ``checkpoint`` keeps per step).
        context_mb: the graph of building the inner problem, alive until the backward in every
            mode: the support set's trunk pass (head-only adaptation: ANIL, ``adapt: head``) and
            the prototype head (``head_init: proto``).
    """

    step_mb: float
    query_mb: float
    state_mb: float
    context_mb: float = 0.0


#: The transient memory of a backward pass (activation gradients, double-backward buffers) and
#: allocator slack, as a multiple of one step's and the query's graphs (``S + Q``).  Measured with
#: benchmarks/memory.py (mini-ImageNet conv4-32, peak RSS with the tuned CPU allocator): the peaks
#: of full (2 and 5 steps), checkpoint (5-25 steps) and implicit exceed the retained graphs by
#: 0.8-1.3 (S + Q); 1.4 leaves a margin.
TRANSIENT = 1.4
PLAN_MODES = ("full", "checkpoint", "implicit")
#: :func:`plan_memory`'s reason when the first mode it may take fits
FASTEST = "the fastest mode fits"


def _mb(x: float) -> str:
    """MiB for messages: whole numbers, or two significant digits below 10 (tiny models)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _mb_up(x: float) -> str:
    """:func:`_mb`'s rounding, but up: a budget of at least ``x`` MiB (advice that must fit)."""
    digits = 0 if x >= 10 else max(0, 1 - math.floor(math.log10(x))) if x > 0 else 0
    up = math.ceil(x * 10**digits) / 10**digits
    while up < x:  # the float product rounded down
        up += 10**-digits
    return f"{up:.0f}" if digits == 0 else f"{up:g}"


def estimate_mb(mode: str, footprint: Footprint, steps: int, chunk: int) -> float:
    """Estimated peak (MiB above what is in use before the meta-step) of ``mode`` with ``chunk``
    tasks adapted at once and ``steps`` inner steps, from one task's :class:`Footprint`
    (``S`` step graph, ``Q`` query graph, ``W`` inner-loop state, ``C`` the problem's graph):

    * ``full`` keeps every step's graph and the query graph: ``steps S + Q``;
    * ``checkpoint`` one recomputed step, the query graph and the state of every step:
      ``S + Q + steps W``;
    * ``implicit`` one Hessian-vector-product graph and the query graph: ``S + Q``;

    each plus ``C`` (the support trunk pass of head-only adaptation, prototype heads: alive until
    the backward in every mode), plus :data:`TRANSIENT` ``(S + Q + C)`` for the backward pass,
    times ``chunk``.
    """
    s, q, w, c = footprint.step_mb, footprint.query_mb, footprint.state_mb, footprint.context_mb
    retained = {"full": steps * s + q, "checkpoint": s + q + steps * w, "implicit": s + q}[mode]
    return chunk * (retained + c + TRANSIENT * (s + q + c))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The planner's choice: a meta-gradient mode and how many tasks adapt at once."""

    mode: str
    chunk: int
    estimate_mb: float
    budget_mb: float
    reason: str

    def describe(self) -> str:
        return (f"memory plan: {self.mode}, {self.chunk} task(s) at a time, ~{_mb(self.estimate_mb)} MB "
                f"estimated within max_memory_mb={self.budget_mb:g} ({self.reason})")


def plan_memory(footprint: Footprint, steps: int, tasks: int, budget_mb: float, preferred_chunk: int,
                modes: Sequence[str] = PLAN_MODES) -> MemoryPlan:
    """The first of ``modes`` (cheapest in time first: full, checkpoint, implicit) that fits
    ``budget_mb`` with the largest task chunk from ``preferred_chunk`` down to 1.

    Raises :class:`~metamtl.errors.ConfigError` when nothing fits, with the smallest estimate.
    """
    preferred_chunk = max(1, min(preferred_chunk, tasks))
    chunks = sorted({max(1, preferred_chunk >> i) for i in range(preferred_chunk.bit_length())}, reverse=True)
    misses: list[str] = []
    for mode in modes:
        for chunk in chunks:
            est = estimate_mb(mode, footprint, steps, chunk)
            if est <= budget_mb:
                why = "; ".join(misses) if misses else FASTEST
                return MemoryPlan(mode, chunk, est, budget_mb, why)
        misses.append(f"{mode} needs ~{_mb(estimate_mb(mode, footprint, steps, 1))} MB even one task at a time")
    smallest = min(estimate_mb(m, footprint, steps, 1) for m in modes)
    raise ConfigError(
        f"no memory mode fits max_memory_mb={budget_mb:g} with {steps} inner steps: {'; '.join(misses)}. "
        f"Raise max_memory_mb to at least {_mb_up(smallest)}, or use fewer inner steps or smaller tasks"
    )
