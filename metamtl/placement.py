"""Where and how a learner computes: device, precision (bf16 autocast) and memory layout.

:class:`Placement` is the one place that decides these for :class:`~metamtl.MetaLearner`:
``autocast()`` for forward/backward passes, ``batch()`` to move episodes, ``model_input()`` to
move raw inputs, and ``module()`` to place a model.  On the CPU it also tunes the allocator once
per process (:mod:`metamtl.allocator`).

The memory layout of a conv model on the CPU is chosen by measurement when the user leaves it
open (``channels_last=None``): neither layout is faster everywhere.  oneDNN's NHWC convolutions
and PyTorch's NHWC max-pool and BatchNorm forward kernels make forward-heavy work faster (FOMAML,
ANIL, one-step MAML: 0.66-0.82x the NCHW CPU time on conv4/Omniglot), but BatchNorm's double
backward sums NHWC tensors one dimension at a time into NCHW results, several times slower, so
second-order inner loops with many steps or large supports are slower in NHWC (MAML 5 steps:
1.03x, 5 steps on 25-image supports: 1.12x).  Where the crossover lies depends on the machine and
the PyTorch build, so :class:`LayoutProbe` times a meta-step in both layouts on the first
meta-batch of each workload, as ``torch.backends.cudnn.benchmark`` times convolution algorithms.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .allocator import tune_cpu_allocator
from .devices import parse_device
from .environment import cpuinfo_field
from .errors import ConfigError, unknown_name

log = logging.getLogger(__name__)

#: ``precision`` settings: float32 everywhere, bfloat16 autocast (weights stay float32), or
#: ``"auto"``: bf16 where the device computes bfloat16 natively (:func:`native_bf16`), else fp32
PRECISIONS = ("fp32", "bf16", "auto")

#: /proc/cpuinfo flags of x86 CPUs with bfloat16 arithmetic in hardware (AVX512-BF16, AMX)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where there is no such file)."""
    return set((cpuinfo_field("flags", "Features", cpuinfo=cpuinfo) or "").split())


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether ``device`` computes bfloat16 in hardware, so bf16 autocast is faster than fp32 there:
    a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX (where conv4's forward+backward
    took 0.5x fp32's CPU time; with oneDNN held to AVX2 bf16 is emulated and took 8.6x)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_CPU_FLAGS)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """:func:`~metamtl.devices.parse_device` (``"auto"`` -> CUDA when available, else CPU;
    :class:`ConfigError` for others), under torchrun an unindexed ``cuda`` being this rank's GPU."""
    return distributed.process_device(parse_device(device))


def auto_channels_last(model: nn.Module | None, device: torch.device) -> bool:
    """Whether ``channels_last=None`` leaves the layout to :class:`LayoutProbe`: for models with
    2-D convolutions on the CPU (starting in channels_last, the faster layout for forward passes
    and first-order training); NCHW otherwise (MLPs; GPUs, where cuDNN picks its own layouts).

    Only models built of metamtl's and torch's own modules are laid out automatically: a user's
    module may flatten with ``.view``, which fails on NHWC tensors, so a model with one computes
    in NCHW, as it was written for (logged; ``channels_last=True`` forces NHWC)."""
    if device.type != "cpu" or model is None or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    foreign = next((type(m) for m in model.modules() if not type(m).__module__.startswith(("metamtl.", "torch."))), None)
    if foreign is not None:
        log.info("layout NCHW (channels_last=None): %s is not one of metamtl's or torch's modules and may need NCHW "
                 "tensors (e.g. .view); set channels_last=True to compute in NHWC", foreign.__name__)
        return False
    return True


def memory_format_of(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def set_layout(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None, channels_last: bool) -> None:
    """Put the 4-D weights of ``modules`` (and the optimizer's state tensors of the same shape) in
    a layout, in place: parameters keep their identity, so optimizers keep working."""
    fmt = memory_format_of(channels_last)
    for module in modules:
        module.to(memory_format=fmt)
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape == p.shape:
                    state[k] = v.contiguous(memory_format=fmt)


@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    """The layout :class:`LayoutProbe` chose for a workload, and why."""

    channels_last: bool
    #: CPU seconds of one probe step in each layout (``{}``: not timed)
    seconds: dict[bool, float] = dataclasses.field(default_factory=dict)
    reason: str = ""

    def describe(self) -> str:
        name = "channels_last" if self.channels_last else "NCHW"
        if not self.seconds:
            return f"{name} ({self.reason})"
        return (f"{name}: a meta-step on the probe tasks took {self.seconds[True] * 1e3:.0f} ms of CPU time in "
                f"channels_last, {self.seconds[False] * 1e3:.0f} ms in NCHW "
                f"(channels_last / NCHW {self.seconds[True] / self.seconds[False]:.2f}x)")


class LayoutProbe:
    """Chooses the faster memory layout of a workload by timing it, once per workload.

    :meth:`choose` runs ``run(channels_last)`` (one meta-step on a few tasks of the real
    meta-batch, in that layout) in ``initial`` twice; when the second step is shorter than
    ``min_seconds`` the layout cannot matter much: ``initial`` is kept without running the other
    (so small models, e.g. in tests, always compute in the same layout).  Otherwise ``warmup``
    untimed rounds of both layouts follow, then ``repeats`` timed rounds, alternating, and the
    layout with the lower best time is kept (``initial`` on a tie).  The warm-up matters: the first
    steps in each layout build oneDNN's kernels for the shapes and grow the heap (page faults,
    counted in CPU time), and they alternate with the other layout's allocations: on the
    mini-ImageNet transfer config the first three channels_last steps took 0.65-1.9 s of CPU
    time and the later ones 0.25 s (NCHW: 0.44 s), so one warm-up step per layout chose NCHW, 2x
    slower in training.  Fits of fewer than ``min_iterations`` iterations are not probed at all:
    the probe's meta-steps on ``tasks`` tasks would not pay for themselves.

    Args:
        timer: the clock (default ``time.process_time``: CPU time of this process, which other
            processes on a shared machine disturb far less than wall time); tests inject one.
        min_seconds: the shortest step (after a warm-up) worth timing the other layout for.
        min_iterations: the shortest fit (iterations left) worth probing for.
        repeats: timed steps per layout.
        tasks: tasks of the meta-batch a probe step runs.
    """

    def __init__(self, timer: Callable[[], float] = time.process_time, min_seconds: float = 0.1,
                 repeats: int = 3, tasks: int = 2, min_iterations: int = 50, warmup: int = 2) -> None:
        self.timer, self.min_seconds, self.repeats, self.tasks = timer, min_seconds, repeats, tasks
        self.warmup = warmup
        self.min_iterations = min_iterations
        #: the latest choice (for reports; the learner keeps the layouts themselves)
        self.last: LayoutChoice | None = None

    def _time(self, run: Callable[[bool], None], channels_last: bool) -> float:
        start = self.timer()
        run(channels_last)
        return self.timer() - start

    def choose(self, run: Callable[[bool], None], initial: bool) -> LayoutChoice:
        self._time(run, initial)  # warm-up: oneDNN builds its kernels for the shapes, caches fill
        first = self._time(run, initial)
        if first < self.min_seconds:
            self.last = LayoutChoice(initial, reason=f"a probe step takes {first * 1e3:.0f} ms: too short to matter")
            return self.last
        for _ in range(self.warmup):  # both layouts' kernels built, the heap grown for both
            for layout in (not initial, initial):
                run(layout)
        best = {initial: math.inf, not initial: math.inf}
        for _ in range(self.repeats):
            for layout in (initial, not initial):
                best[layout] = min(best[layout], self._time(run, layout))
        self.last = LayoutChoice((not initial) if best[not initial] < best[initial] else initial, best)
        return self.last


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def model_dtype(model: nn.Module | None) -> torch.dtype:
    """The floating dtype of ``model``'s weights (float32 without any), which inputs are cast to;
    :class:`ConfigError` for a floating parameter or buffer that is neither float32 nor float64
    (half or bfloat16 weights, even in one part of the model), for parameters mixing the two and
    for weights on torch's ``meta`` device (shapes without values)."""
    named = list(model.named_parameters()) if model is not None else []
    meta = next((n for n, t in [*named, *(model.named_buffers() if model is not None else ())] if t.is_meta), None)
    if meta is not None:
        raise ConfigError(
            f"the model's weights are on torch's 'meta' device ({meta}): they have shapes but no values; "
            "materialise them before building the learner, e.g. model.to_empty(device='cpu') and then initialise "
            "them or load_state_dict(...) from a checkpoint")
    floats = [(n, t.dtype) for n, t in named if t.is_floating_point()]
    tensors = floats + [(n, t.dtype) for n, t in (model.named_buffers() if model is not None else ())
                        if t.is_floating_point()]
    other = next(((n, d) for n, d in tensors if d not in (torch.float32, torch.float64)), None)
    if other is not None:
        raise ConfigError(
            f"the model's weights are {_dtype_name(other[1])} ({other[0]}): metamtl trains float32 (or float64) "
            "weights; call model.float() before building the learner, and set precision 'bf16' "
            "(MetaLearner(precision='bf16'), config: train.precision) to compute in bfloat16 with float32 weights"
        )
    first = floats[0] if floats else ("", torch.float32)
    mixed = next(((n, d) for n, d in floats if d != first[1]), None)
    if mixed is not None:
        raise ConfigError(
            f"the model's weights mix {_dtype_name(first[1])} ({first[0]}) and {_dtype_name(mixed[1])} ({mixed[0]}): "
            "inputs are cast to one dtype, so every weight must have it; call model.float() or model.double() "
            "before building the learner"
        )
    return first[1]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved device, a precision (``"fp32"`` or ``"bf16"``) and the image memory layout."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    #: the layout is left to :class:`LayoutProbe` (``channels_last=None`` for a conv model on the CPU)
    automatic: bool = False
    #: the precision was chosen by :func:`native_bf16` (setting ``"auto"``)
    auto_precision: bool = False
    #: the model's floating dtype, which inputs are cast to (float32 unless the model was built
    #: in another, e.g. ``model.double()``)
    dtype: torch.dtype = torch.float32

    @classmethod
    def create(cls, device: str | torch.device | None = "auto", precision: str = "fp32",
               channels_last: bool | None = None, model: nn.Module | None = None) -> "Placement":
        """Check the settings, resolve ``device`` and tune the CPU allocator when on the CPU.

        ``channels_last=None`` leaves the layout of a conv model on the CPU to measurement
        (:attr:`automatic`, starting in channels_last; :func:`auto_channels_last`), else NCHW.
        ``precision="auto"`` resolves to ``"bf16"`` where :func:`native_bf16`, else ``"fp32"``."""
        if precision not in PRECISIONS:
            raise unknown_name("precision", precision, PRECISIONS)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ConfigError(f"channels_last must be true, false or null (automatic), got {channels_last!r}")
        dev = resolve_device(device)
        if dev.type == "cpu":
            tune_cpu_allocator()  # heap reuse instead of mmap/munmap per step (see metamtl.allocator)
        if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision 'bf16' needs a GPU with bfloat16 support; use precision 'fp32' or 'auto'")
        dtype = model_dtype(model)
        if precision == "bf16" and dtype == torch.float64:  # autocast leaves float64 ops alone: it would compute fp64
            raise ConfigError("precision 'bf16' autocasts float32 weights; this model's are float64, which it would "
                              "leave in float64: use precision 'fp32' (or 'auto'), or call model.float() for bf16")
        auto_precision = precision == "auto"
        if auto_precision:
            precision = "bf16" if native_bf16(dev) and dtype != torch.float64 else "fp32"
            log.info("precision auto: %s (%s)", precision, "the device computes bfloat16 natively" if precision == "bf16"
                     else "float64 weights" if dtype == torch.float64
                     else "no native bfloat16 on this device: bf16 would be emulated")
        automatic = channels_last is None and auto_channels_last(model, dev)
        return cls(dev, precision, automatic if channels_last is None else channels_last, automatic, auto_precision, dtype)

    @property
    def precision_setting(self) -> str:
        """What the user chose: ``"fp32"``, ``"bf16"`` or ``"auto"`` (saved, so a checkpoint loaded
        on another machine chooses again)."""
        return "auto" if self.auto_precision else self.precision

    @property
    def layout_setting(self) -> bool | None:
        """What the user chose: ``True``/``False`` (forced) or ``None`` (automatic)."""
        return None if self.automatic else self.channels_last

    def with_layout(self, channels_last: bool) -> "Placement":
        """This placement in another memory layout (the setting stays as it was)."""
        return dataclasses.replace(self, channels_last=channels_last)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout image batches are given to the model in: NHWC inputs of an NCHW learner are
        converted too, so the layout (and the bits of a result) never depends on the input's strides."""
        return memory_format_of(self.channels_last)

    def autocast(self) -> torch.autocast:
        """The autocast context of :attr:`precision` (a no-op for ``"fp32"``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def module(self, module: nn.Module) -> nn.Module:
        """``module`` on this device (4-D weights in the memory layout)."""
        module = module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def batch(self, episodes: Any, non_blocking: bool = False) -> Any:
        """An :class:`~metamtl.tasks.Episode` or :class:`~metamtl.tasks.TaskBatch` as model input here."""
        return episodes.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format, dtype=self.dtype)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A float input tensor on this device, in the memory layout when it is an image batch."""
        x = x.to(self.device, self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x
