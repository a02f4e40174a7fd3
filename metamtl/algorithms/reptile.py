"""Reptile (Nichol et al. 2018)."""
from __future__ import annotations

import torch

from ..adaptation import Adapted, task_loss
from ..tasks.episode import Episode
from .base import Algorithm


class Reptile(Algorithm):
    """Move the initialisation towards the weights adapted to each task.

    The meta-gradient of a task is ``initial - adapted``, so a meta-optimizer step of SGD with
    learning rate ``eps`` gives ``initial + eps * mean(adapted - initial)``, the Reptile update.
    Query loss/accuracy are measured after adaptation, for monitoring only.
    """

    name = "reptile"
    fixed = {"first_order": True}

    def task_step(self, model, episode: Episode, weight: float) -> dict[str, float]:
        adapted = self.adapt_task(model, episode)
        self.task_backward(adapted, weight)
        with torch.no_grad():
            logits = adapted(episode.query_x)
            loss = task_loss(logits, episode.query_y)
        return self._metrics(loss, logits, episode, adapted)

    def task_backward(self, adapted: Adapted, weight) -> None:  # type: ignore[override]
        pairs = [(i, d * weight) for i, d in zip(adapted.initial, adapted.delta()) if i.requires_grad]
        if pairs:
            torch.autograd.backward([i for i, _ in pairs], [d for _, d in pairs])
