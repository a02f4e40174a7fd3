"""Task families by name: task sources that are not made of classes (for configs).

``load_tasks("sinusoid", shots=5)`` builds the MAML sinusoid regression tasks; class-indexed
datasets are built by :func:`metamtl.data.load_dataset` and sampled by
:class:`~metamtl.tasks.EpisodeSampler`.
"""
from __future__ import annotations

from typing import Any

from ..data.registry import accepted_options, check_options
from ..errors import unknown_name
from .sinusoid import Sinusoid

TASK_FAMILIES = {"sinusoid": Sinusoid}


def load_tasks(name: str, **kwargs: Any) -> Sinusoid:
    """Build task family ``name`` (a key of :data:`TASK_FAMILIES`) with constructor ``kwargs``."""
    if not isinstance(name, str) or name not in TASK_FAMILIES:
        raise unknown_name("task family", name, TASK_FAMILIES)
    check_options("task family", name, kwargs, accepted_options(TASK_FAMILIES[name]))
    return TASK_FAMILIES[name](**kwargs)
