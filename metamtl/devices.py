"""Which device a device setting names: one check for the learner, checkpoints and
:class:`~metamtl.memory.PeakMemory` (torch only: :func:`metamtl.placement.resolve_device` adds the
rank's GPU under torchrun)."""
from __future__ import annotations

import torch

from .errors import ConfigError


def parse_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as
    given; anything else, or CUDA without a GPU, is a :class:`ConfigError` saying what to use."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: metamtl trains on 'cpu' or 'cuda' ('cuda:N', 'auto')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev
