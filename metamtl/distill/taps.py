"""Feature taps: the latest output of a named layer (a forward hook on that layer only).

The inner loop hands loss terms the outputs of the layers they list in ``taps`` explicitly
(``LossContext.features``); :class:`FeatureTap` is for everything else (e.g. a plain teacher
module run as is).  The core runs the real modules through ``torch.func.functional_call``, so a
tap on a layer of the meta-model also sees the inner loop's forward passes with adapted weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError


def named_layer(model: nn.Module, name: str, what: str = "model") -> nn.Module:
    """``model.get_submodule(name)`` with an error listing the layer names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise InputError(f"{what} has no layer {name!r}; its layers are: {', '.join(names[:40])}") from None


def take_rows(out: Any, name: str, rows: int) -> torch.Tensor:
    """The last ``rows`` rows of a layer output (forward passes may prepend the support set)."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"layer {name!r} produced no tensor output in the last forward pass")
    if out.shape[0] < rows:
        raise InputError(f"layer {name!r} last saw {out.shape[0]} rows, expected at least {rows}")
    return out[out.shape[0] - rows:]


class FeatureTap:
    """Records the output of ``model``'s layer ``name`` on every forward pass.

    Use as a context manager or call :meth:`remove`; ``tap.output`` is the latest output.
    """

    def __init__(self, model: nn.Module, name: str, what: str = "model") -> None:
        self.name = name
        self.module = named_layer(model, name, what)
        self.output: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def take(self, rows: int) -> torch.Tensor:
        """The latest output's last ``rows`` rows (forward passes may prepend the support set)."""
        return take_rows(self.output, self.name, rows)
