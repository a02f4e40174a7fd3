"""Reptile (Nichol et al. 2018)."""
from __future__ import annotations

from ..adaptation import Difference, MetaGradient
from .base import Algorithm


class Reptile(Algorithm):
    """Move the initialisation towards the weights adapted to each task.

    The meta-gradient of a task is ``initial - adapted`` (the :class:`~metamtl.adaptation.Difference`
    rule), so a meta-optimizer step of SGD with learning rate ``eps`` gives
    ``initial + eps * mean(adapted - initial)``, the Reptile update.  Query loss/accuracy are
    measured after adaptation, for monitoring only.
    """

    name = "reptile"
    fixed = {"first_order": True}
    loss_term_phases = ("support",)  # the query loss is for the metrics only (no gradient flows from it)

    def meta_gradient(self, iteration: int) -> MetaGradient:
        return Difference()
