"""Where and how a learner computes: device, precision (bf16 autocast) and memory layout.

:class:`Placement` is the one place that decides these for :class:`~metamtl.MetaLearner`:
``autocast()`` for forward/backward passes, ``batch()`` to move episodes, ``model_input()`` to
move raw inputs, and ``module()`` to place a model.  On the CPU it also tunes the allocator once
per process (:mod:`metamtl.allocator`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import distributed
from .allocator import tune_cpu_allocator
from .errors import ConfigError, unknown_name

#: ``precision`` settings: float32 everywhere, or bfloat16 autocast (weights stay float32)
PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU (under torchrun: this rank's GPU)."""
    if device is None or device == "auto":
        return distributed.process_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return distributed.process_device(dev)


def auto_channels_last(model: nn.Module | None, device: torch.device) -> bool:
    """The layout ``channels_last=None`` chooses: channels_last for models with 2-D convolutions on
    the CPU, where it is faster (oneDNN's NHWC convolutions; PyTorch's NCHW max-pool and BatchNorm
    kernels are slow: the ``*_nchw`` rows of benchmarks/speed.py), NCHW otherwise (MLPs; GPUs,
    where cuDNN picks its own layouts)."""
    return device.type == "cpu" and model is not None and any(isinstance(m, nn.Conv2d) for m in model.modules())


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved device, a precision (``"fp32"`` or ``"bf16"``) and the image memory layout."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def create(cls, device: str | torch.device | None = "auto", precision: str = "fp32",
               channels_last: bool | None = None, model: nn.Module | None = None) -> "Placement":
        """Check the settings, resolve ``device`` and tune the CPU allocator when on the CPU.

        ``channels_last=None`` chooses the layout for ``model`` (:func:`auto_channels_last`)."""
        if precision not in PRECISIONS:
            raise unknown_name("precision", precision, PRECISIONS)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ConfigError(f"channels_last must be true, false or null (automatic), got {channels_last!r}")
        dev = resolve_device(device)
        if dev.type == "cpu":
            tune_cpu_allocator()  # heap reuse instead of mmap/munmap per step (see metamtl.allocator)
        if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision 'bf16' needs a GPU with bfloat16 support; use precision 'fp32'")
        if channels_last is None:
            channels_last = auto_channels_last(model, dev)
        return cls(dev, precision, channels_last)

    @property
    def memory_format(self) -> torch.memory_format | None:
        """The layout of image batches given to the model (``None``: leave as they are)."""
        return torch.channels_last if self.channels_last else None

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
        return episodes.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A float input tensor on this device, in the memory layout when it is an image batch."""
        x = x.to(self.device, torch.float32)
        if self.memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x
