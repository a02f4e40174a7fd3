"""Outer loops, each a short class on the shared inner loop.

=============  ==========================================================================
``maml``       MAML (Finn et al. 2017); ``first_order=True`` or ``fomaml`` for first order
``imaml``      iMAML (Rajeswaran et al. 2019): proximal inner objective, implicit meta-gradient
``reptile``    Reptile (Nichol et al. 2018)
``anil``       ANIL (Raghu et al. 2020): only the head adapts
``metasgd``    Meta-SGD (Li et al. 2017): learned per-weight inner learning rates
``mamlpp``     MAML++ (Antoniou et al. 2019): multi-step loss, per-layer per-step learned
               rates, per-step BatchNorm, derivative-order annealing
``protonet``   Prototypical Networks (Snell et al. 2017): metric baseline, no inner loop
``transfer``   pre-train + fine-tune baseline (Chen et al. 2019), linear or cosine classifier
``multitask``  any of these on several datasets: per-dataset meta-gradients combined by a
               multi-task strategy (:mod:`metamtl.multitask`)
=============  ==========================================================================

Any gradient-based algorithm takes ``head_init="proto"`` for a prototype-initialised head
(Proto-MAML), and ``optimizer`` for its inner optimizer (``sgd``, ``momentum``, ``adam``, ...).
"""
from __future__ import annotations

from .anil import ANIL
from .base import DATA_SETTINGS, Algorithm, accuracy
from .imaml import IMAML
from .maml import FOMAML, MAML
from .mamlpp import MAMLPlusPlus, multi_step_weights
from .metasgd import MetaSGD
from .multitask import MultiTask
from .protonet import ProtoNet
from .registry import ALGORITHMS, build_algorithm, register_algorithm, with_data_settings
from .reptile import Reptile
from .transfer import Transfer

# The built-in algorithms, registered here explicitly: any import of metamtl.algorithms (or of one
# of its modules) runs this first, so the registry holds them whatever was imported before.
for _cls in (MAML, FOMAML, IMAML, Reptile, ANIL, MetaSGD, MAMLPlusPlus, ProtoNet, Transfer, MultiTask):
    register_algorithm(_cls)
del _cls

__all__ = ["ALGORITHMS", "DATA_SETTINGS", "Algorithm", "ANIL", "FOMAML", "IMAML", "MAML", "MAMLPlusPlus", "MetaSGD", "MultiTask", "ProtoNet",
           "Reptile", "Transfer", "accuracy", "build_algorithm", "multi_step_weights", "register_algorithm",
           "with_data_settings"]
