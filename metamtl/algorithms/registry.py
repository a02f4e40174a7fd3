"""Algorithms by name: ``build_algorithm("maml", steps=5)`` (the built-ins are registered by
:mod:`metamtl.algorithms`, which Python runs before any of its modules)."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown_name
from .base import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    ALGORITHMS[cls.name] = cls
    return cls


def build_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """Build a registered algorithm from its config (as returned by ``Algorithm.config()``)."""
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise unknown_name("algorithm", name, ALGORITHMS)
    cls = ALGORITHMS[name]
    clash = {k: v for k, v in kwargs.items() if k in cls.fixed and cls.fixed[k] != v}
    if clash:
        raise ConfigError(
            f"algorithm {name!r} fixes {cls.fixed}; drop the contradictory setting(s) {clash}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad settings for algorithm {name!r}: {exc}") from None
