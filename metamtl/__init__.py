"""metamtl: meta-learning and multi-task learning for PyTorch.

The public names below are imported on first use (PEP 562), so ``import metamtl.data`` loads the
data layer only, not the learner and everything under it.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .version import __version__

#: public name -> module that defines it
_EXPORTS = {"MetaLearner": "metamtl.learner", "EvalResult": "metamtl.evaluation", "MetamtlError": "metamtl.errors"}

__all__ = ["MetaLearner", "EvalResult", "MetamtlError", "__version__"]

if TYPE_CHECKING:
    from .errors import MetamtlError
    from .evaluation import EvalResult
    from .learner import MetaLearner


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metamtl' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
