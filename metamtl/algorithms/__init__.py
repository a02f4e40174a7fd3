"""Outer loops, each a short class on the shared inner loop.

=============  ==========================================================================
``maml``       MAML (Finn et al. 2017); ``first_order=True`` or ``fomaml`` for first order
``reptile``    Reptile (Nichol et al. 2018)
``anil``       ANIL (Raghu et al. 2020): only the head adapts
``metasgd``    Meta-SGD (Li et al. 2017): learned per-weight inner learning rates
``mamlpp``     MAML++ (Antoniou et al. 2019): multi-step loss, per-layer per-step learned
               rates, per-step BatchNorm, derivative-order annealing
``protonet``   Prototypical Networks (Snell et al. 2017): metric baseline, no inner loop
``transfer``   pre-train + fine-tune baseline (Chen et al. 2019), linear or cosine classifier
=============  ==========================================================================

Any gradient-based algorithm takes ``head_init="proto"`` for a prototype-initialised head
(Proto-MAML), and ``optimizer`` for its inner optimizer (``sgd``, ``momentum``, ``adam``, ...).
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown_name
from .anil import ANIL
from .base import Algorithm, accuracy
from .maml import FOMAML, MAML
from .mamlpp import MAMLPlusPlus, multi_step_weights
from .metasgd import MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile
from .transfer import Transfer

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (MAML, FOMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus, ProtoNet, Transfer)
}


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


__all__ = ["ALGORITHMS", "Algorithm", "ANIL", "FOMAML", "MAML", "MAMLPlusPlus", "MetaSGD", "ProtoNet", "Reptile",
           "Transfer", "accuracy", "build_algorithm", "multi_step_weights", "register_algorithm"]
