"""Reptile (Nichol et al. 2018)."""
from __future__ import annotations

from ..adaptation import Difference, MetaGradient
from ..errors import ConfigError
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

    def check_trainable(self) -> None:
        """Refuse the settings under which a meta-parameter could never move: only adapted weights
        (and, through a proto head, the trunk behind it) get Reptile's meta-gradient.  Checked when
        training starts, not when the algorithm is built, so learners saved with such settings
        still load, evaluate and predict."""
        if self.inner.steps < 1:
            raise ConfigError("reptile needs steps >= 1: its meta-gradient is the weight change of the inner loop, "
                              "which is zero without inner steps (eval_steps may still be 0)")
        head_init = self.inner.head_init
        if self.inner.adapt == "head" and head_init != "proto":
            trains = "nothing (the per-task head starts at zero)" if head_init == "zero" else "only the head"
            raise ConfigError(
                f"reptile with adapt 'head' and head_init {head_init!r} never trains the trunk, it trains {trains}: "
                "its meta-gradient reaches only adapted weights. Use head_init 'proto' (the head's change reaches "
                "the trunk through the prototypes) or adapt 'all'; to meta-learn the head alone on a fixed trunk, "
                "use adapt 'all' with the trunk frozen (model.trunk.requires_grad_(False))")

    def meta_gradient(self, iteration: int) -> MetaGradient:
        return Difference()
