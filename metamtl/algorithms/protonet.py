"""Prototypical Networks (Snell et al. 2017): the metric-learning baseline, no inner loop."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import InnerLoop, add_loss_terms, check_positive, task_loss
from ..errors import ConfigError, unknown_name
from ..models.backbones import TrunkHead
from ..models.heads import class_means
from ..tasks.episode import Episode, TaskBatch
from .base import Algorithm, accuracy

DISTANCES = ("euclidean", "cosine")


def prototype_logits(feats: torch.Tensor, prototypes: torch.Tensor, distance: str, scale: torch.Tensor | float) -> torch.Tensor:
    """``-||f - c_k||^2 * scale`` (euclidean) or ``scale * cos(f, c_k)`` (cosine)."""
    if distance == "cosine":
        return scale * F.normalize(feats, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return -torch.cdist(feats, prototypes).pow(2) * scale


class Prototypes:
    """A ProtoNet "adapted" to a support set: logits are ``-||f(x) - c_k||^2 / temperature``
    (or ``scale * cos(f(x), c_k)`` with ``distance="cosine"``).

    Call it on query inputs (``updates`` is accepted and ignored: there is no inner loop).
    """

    inner_losses: list = []

    def __init__(self, algorithm: "ProtoNet", model: TrunkHead, support_x: torch.Tensor,
                 support_y: torch.Tensor, ways: int) -> None:
        self.problem = algorithm.problem(model, support_x.unsqueeze(0), support_y.unsqueeze(0), ways, 0)
        self.algorithm, self.support_x = algorithm, support_x
        self.prototypes = class_means(self.problem.inputs[0], support_y, ways)  # [ways, D]

    def forward(self, x: torch.Tensor, updates: int | None = None, taps: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
        """``(logits, tapped features)`` of ``x``, as :meth:`metamtl.adaptation.Adapted.forward` (so a
        ProtoNet learner can be a distillation teacher); ``taps`` name trunk layers (``trunk.blocks.2``)."""
        feats, tapped = self.problem.features(x.unsqueeze(0), taps)
        alg = self.algorithm
        return prototype_logits(feats[0], self.prototypes, alg.distance, alg.logit_scale), tapped

    def __call__(self, x: torch.Tensor, updates: int | None = None) -> torch.Tensor:
        return self.forward(x, updates)[0]


class ProtoNet(Algorithm):
    """Classify queries by squared Euclidean distance to the class means of support features.

    Meta-training minimises the query cross-entropy of these logits through the trunk; there is
    no inner loop, so ``steps``/``lr`` do not apply.  The model needs no head of its own
    (``out_features: null``); one trained trunk serves tasks with any number of ways.

    Args:
        temperature: logits are divided by it (1 in the paper; euclidean distance).
        bn_stats: ``"transductive"`` or ``"support"`` (see :mod:`metamtl.models.norm`): whether
            query images are normalised with their own batch statistics or the support set's.
        distance: ``"euclidean"`` (the paper) or ``"cosine"``: logits ``scale * cos(f(x), c_k)``,
            the meta-stage of Meta-Baseline (Chen et al. 2021), usually trained from a
            classifier-pre-trained trunk (config ``stages``).
        scale: the cosine logits' scale (inverse temperature; 10 in Meta-Baseline).
        learn_scale: meta-learn ``scale`` with the trunk (Meta-Baseline does); it is saved with
            the algorithm.

    The prototype-initialised MAML head ("Proto-MAML") is ``head_init="proto"`` of any
    gradient-based algorithm (e.g. ``build_algorithm("maml", head_init="proto")``): its initial
    logits are these logits up to a per-query constant, then fine-tuned by the inner loop.
    """

    name = "protonet"
    loss_term_phases = ("query",)  # no inner loop: no support phase
    has_inner_loop = False

    def __init__(self, temperature: float = 1.0, bn_stats: str = "transductive", distance: str = "euclidean",
                 scale: float = 10.0, learn_scale: bool = False) -> None:
        super().__init__(InnerLoop(steps=0, adapt="head", head_init="proto", bn_stats=bn_stats))
        self.temperature = check_positive("protonet temperature", temperature)
        if distance not in DISTANCES:
            raise unknown_name("protonet distance", distance, DISTANCES)
        if not isinstance(learn_scale, bool):
            raise ConfigError(f"protonet learn_scale must be true or false, got {learn_scale!r}")
        self.distance, self.learn_scale = distance, learn_scale
        self.initial_scale = check_positive("protonet scale", scale)
        if distance == "cosine":  # state only where it is used (euclidean checkpoints stay as they were)
            value = torch.tensor(self.initial_scale)
            if learn_scale:
                self.scale = nn.Parameter(value)
            else:
                self.register_buffer("scale", value)

    @property
    def logit_scale(self) -> torch.Tensor | float:
        """What distances or cosines are multiplied by (``1 / temperature`` for euclidean)."""
        return self.scale if self.distance == "cosine" else 1.0 / self.temperature

    def config(self) -> dict[str, Any]:
        out = {"name": self.name, "temperature": self.temperature, "bn_stats": self.inner.bn_stats}
        if self.distance != "euclidean":  # configs of euclidean ProtoNets stay as they were
            out.update(distance=self.distance, scale=self.initial_scale, learn_scale=self.learn_scale)
        return out

    def adapt(self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
              steps: int | None = None) -> Prototypes:
        return Prototypes(self, model, support_x, support_y, ways)

    def _episode(self, model: TrunkHead, episode: Episode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, query loss, objective)``: the objective adds the loss terms (phase ``"query"``,
        e.g. distillation; only while training) to the query loss."""
        protos = self.adapt(model, episode.support_x, episode.support_y, episode.ways)
        p = protos.problem
        logits, feats = protos.forward(episode.query_x, taps=p.taps)
        loss = task_loss(logits, episode.query_y)
        objective = add_loss_terms(p, "query", loss.unsqueeze(0), logits.unsqueeze(0), episode.query_y.unsqueeze(0),
                                   episode.query_x.unsqueeze(0), p.initial, feats)[0]
        return logits, loss, objective

    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        totals: dict[str, float] = {}
        for episode in batch:
            logits, loss, objective = self._episode(model, episode)
            (objective / len(batch)).backward()
            for k, v in (("loss", float(loss.detach())), ("accuracy", accuracy(logits.detach(), episode.query_y))):
                totals[k] = totals.get(k, 0.0) + v / len(batch)
        return totals

    def evaluate_episodes(self, model, episodes, steps=None):
        with torch.no_grad():
            return [{"loss": float(loss), "accuracy": accuracy(logits, e.query_y)}
                    for e in episodes for logits, loss, _ in [self._episode(model, e)]]
