"""Prototypical Networks (Snell et al. 2017): the metric-learning baseline, no inner loop."""
from __future__ import annotations

from typing import Any

import torch

from ..adaptation import InnerLoop, check_positive, task_loss
from ..models.backbones import TrunkHead
from ..models.heads import class_means
from ..tasks.episode import Episode, TaskBatch
from .base import Algorithm, accuracy


class Prototypes:
    """A ProtoNet "adapted" to a support set: logits are ``-||f(x) - c_k||^2 / temperature``.

    Call it on query inputs (``updates`` is accepted and ignored: there is no inner loop).
    """

    inner_losses: list = []

    def __init__(self, algorithm: "ProtoNet", model: TrunkHead, support_x: torch.Tensor,
                 support_y: torch.Tensor, ways: int) -> None:
        self.problem = algorithm.problem(model, support_x.unsqueeze(0), support_y.unsqueeze(0), ways, 0)
        self.algorithm, self.support_x = algorithm, support_x
        self.prototypes = class_means(self.problem.inputs[0], support_y, ways)  # [ways, D]

    def __call__(self, x: torch.Tensor, updates: int | None = None) -> torch.Tensor:
        feats = self.problem.features(x.unsqueeze(0))[0][0]
        return -torch.cdist(feats, self.prototypes).pow(2) / self.algorithm.temperature


class ProtoNet(Algorithm):
    """Classify queries by squared Euclidean distance to the class means of support features.

    Meta-training minimises the query cross-entropy of these logits through the trunk; there is
    no inner loop, so ``steps``/``lr`` do not apply.  The model needs no head of its own
    (``out_features: null``); one trained trunk serves tasks with any number of ways.

    Args:
        temperature: logits are divided by it (1 in the paper).
        bn_stats: ``"transductive"`` or ``"support"`` (see :mod:`metamtl.models.norm`): whether
            query images are normalised with their own batch statistics or the support set's.

    The prototype-initialised MAML head ("Proto-MAML") is ``head_init="proto"`` of any
    gradient-based algorithm (e.g. ``build_algorithm("maml", head_init="proto")``): its initial
    logits are these logits up to a per-query constant, then fine-tuned by the inner loop.
    """

    name = "protonet"

    def __init__(self, temperature: float = 1.0, bn_stats: str = "transductive") -> None:
        super().__init__(InnerLoop(steps=0, adapt="head", head_init="proto", bn_stats=bn_stats))
        self.temperature = check_positive("protonet temperature", temperature)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature, "bn_stats": self.inner.bn_stats}

    def adapt(self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
              steps: int | None = None) -> Prototypes:
        return Prototypes(self, model, support_x, support_y, ways)

    def _episode(self, model: TrunkHead, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.adapt(model, episode.support_x, episode.support_y, episode.ways)(episode.query_x)
        return logits, task_loss(logits, episode.query_y)

    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        totals: dict[str, float] = {}
        for episode in batch:
            logits, loss = self._episode(model, episode)
            (loss / len(batch)).backward()
            for k, v in (("loss", float(loss.detach())), ("accuracy", accuracy(logits.detach(), episode.query_y))):
                totals[k] = totals.get(k, 0.0) + v / len(batch)
        return totals

    def evaluate_episodes(self, model, episodes, steps=None):
        with torch.no_grad():
            return [{"loss": float(loss), "accuracy": accuracy(logits, e.query_y)}
                    for e in episodes for logits, loss in [self._episode(model, e)]]
