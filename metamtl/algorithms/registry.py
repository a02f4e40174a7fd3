"""Algorithms by name: ``build_algorithm("maml", steps=5)`` (the built-ins are registered by
:mod:`metamtl.algorithms`, which Python runs before any of its modules)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ..adaptation.settings import InnerLoop
from ..errors import ConfigError, unexpected_keyword, unknown_name, unknown_settings
from .base import DATA_SETTINGS, Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm] | None = None, *, replace: bool = False) -> Any:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``.

    The class must set its own ``name``; a name another class holds is a
    :class:`~metamtl.errors.ConfigError` unless ``replace=True`` (``@register_algorithm(replace=True)``)
    or the class is a new definition of the same one (a module reloaded, a notebook cell re-run).
    """
    if cls is None:
        return lambda klass: register_algorithm(klass, replace=replace)
    name = vars(cls).get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"algorithm class {cls.__qualname__} sets no name of its own (it would take "
                          f"{getattr(cls, 'name', None)!r} from its base class); give it one: name = \"my_algorithm\"")
    unknown = [key for key in cls.from_data if key not in DATA_SETTINGS]
    if unknown:
        raise ConfigError(f"algorithm {name!r} declares from_data {unknown} that the data cannot give; "
                          f"an algorithm can take {', '.join(DATA_SETTINGS)} from the data")
    held = ALGORITHMS.get(name)
    same = held is not None and (held.__module__, held.__qualname__) == (cls.__module__, cls.__qualname__)
    if held is not None and held is not cls and not same and not replace:
        raise ConfigError(f"algorithm name {name!r} is already registered by {held.__module__}.{held.__qualname__}; "
                          f"give {cls.__qualname__} another name, or replace it deliberately with "
                          "@register_algorithm(replace=True)")
    ALGORITHMS[name] = cls
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
        if unexpected_keyword(exc) in kwargs:  # a misspelt or foreign setting: name the accepted ones
            raise unknown_settings(f"algorithm {name!r}", kwargs, accepted_settings(cls)) or exc from None
        raise ConfigError(f"bad settings for algorithm {name!r}: {exc}") from None


def accepted_settings(cls: type[Algorithm]) -> list[str]:
    """The settings ``cls(**settings)`` takes: its constructor's named arguments and, where it passes
    ``**kwargs`` on, its base classes' (:class:`~metamtl.adaptation.InnerLoop`'s for ``Algorithm``'s)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "inner"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
        if klass is Algorithm:  # its **inner_kwargs are the InnerLoop's settings
            names |= set(inspect.signature(InnerLoop).parameters)
            break
    return sorted(names)


def with_data_settings(settings: Mapping[str, Any], data: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """An algorithm config plus the settings its algorithm declares it takes from the data
    (:attr:`~metamtl.algorithms.Algorithm.from_data`) where the config leaves them out or ``None``.

    ``data`` maps names of :data:`~metamtl.algorithms.base.DATA_SETTINGS` to functions giving
    their value for this run (``None``: this data has none); only the declared ones are called.
    """
    out = dict(settings)
    cls = ALGORITHMS.get(out.get("name")) if isinstance(out.get("name"), str) else None
    for key in cls.from_data if cls is not None else ():
        if out.get(key) is None and key in data and (value := data[key]()) is not None:
            out[key] = value
    return out
