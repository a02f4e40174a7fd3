"""Feature taps: the latest output of a named layer, also inside ``higher``'s functional copies.

``higher`` rebuilds a model for every task (``monkeypatch``), and the copies carry none of the
original modules' forward hooks but do carry their plain attributes.  A :class:`FeatureTap`
therefore tags the layer with an attribute and one process-wide forward hook (registered while
any tap exists) records the output of every tagged module, original or functional copy.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from ..errors import InputError

_ATTR = "_metamtl_taps"
_TAPS: dict[int, "FeatureTap"] = {}
_HOOK: Any = None
_IDS = itertools.count()


def _record(module: nn.Module, inputs: Any, output: Any) -> None:
    keys = module.__dict__.get(_ATTR)
    if keys:
        for key in keys:
            tap = _TAPS.get(key)
            if tap is not None:
                tap.output = output


def named_layer(model: nn.Module, name: str, what: str = "model") -> nn.Module:
    """``model.get_submodule(name)`` with an error listing the layer names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise InputError(f"{what} has no layer {name!r}; its layers are: {', '.join(names[:40])}") from None


class FeatureTap:
    """Records the output of ``model``'s layer ``name`` on every forward pass.

    Use as a context manager or call :meth:`remove`; ``tap.output`` is the latest output.
    """

    def __init__(self, model: nn.Module, name: str, what: str = "model") -> None:
        global _HOOK
        self.name = name
        self.module = named_layer(model, name, what)
        self.key = next(_IDS)
        self.output: torch.Tensor | None = None
        _TAPS[self.key] = self
        setattr(self.module, _ATTR, tuple(getattr(self.module, _ATTR, ())) + (self.key,))
        if _HOOK is None:
            _HOOK = nn.modules.module.register_module_forward_hook(_record)

    def remove(self) -> None:
        global _HOOK
        _TAPS.pop(self.key, None)
        keys = tuple(k for k in getattr(self.module, _ATTR, ()) if k != self.key)
        if keys:
            setattr(self.module, _ATTR, keys)
        elif _ATTR in self.module.__dict__:
            delattr(self.module, _ATTR)
        if not _TAPS and _HOOK is not None:
            _HOOK.remove()
            _HOOK = None

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def take(self, rows: int) -> torch.Tensor:
        """The latest output's last ``rows`` rows (forward passes may prepend the support set)."""
        out = self.output
        if not isinstance(out, torch.Tensor):
            raise InputError(f"layer {self.name!r} produced no tensor output in the last forward pass")
        if out.shape[0] < rows:
            raise InputError(f"layer {self.name!r} last saw {out.shape[0]} rows, expected at least {rows}")
        return out[out.shape[0] - rows:]
