"""The transfer-learning baseline (Chen et al. 2019, "A closer look at few-shot classification")."""
from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import LossContext, check_positive, tap_outputs, term_taps
from ..errors import ConfigError, InputError, unknown_name
from ..models.backbones import TrunkHead, scaled_unit
from ..tasks.episode import TaskBatch
from .base import Algorithm, accuracy

CLASSIFIERS = ("linear", "cosine")


class ScaledNormalize(nn.Module):
    """``scale * f(x) / ||f(x)||`` (:func:`~metamtl.models.backbones.scaled_unit`): the feature map
    of a cosine classifier."""

    def __init__(self, trunk: nn.Module, scale: float) -> None:
        super().__init__()
        self.trunk, self.scale, self.out_features = trunk, scale, trunk.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_unit(self.trunk(x), self.scale)


class Transfer(Algorithm):
    """Pre-train trunk + one head on all training classes, fine-tune a fresh head per task.

    Training is plain supervised learning inside the episodic pipeline: every episode's images
    (support and query) are a mini-batch labelled with their dataset class ids
    (``episode.classes``), classified by a global head over ``num_classes`` classes.  The
    meta-learning code paths are not used; gradients reach trunk and global head directly.

    To adapt to a task, a new head (``head_init`` ``"zero"`` or ``"proto"``) is fine-tuned on
    the support features with the shared inner loop (``adapt="head"``; ``steps`` steps of
    ``optimizer`` at ``lr``); the trunk stays frozen.

    Args:
        num_classes: training classes (declared in :attr:`from_data`: runs fill it from the training split).
        classifier: ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++: scaled cosine
            similarity to class weight vectors in pre-training; the per-task head is then
            fine-tuned on ``scale``-scaled L2-normalised features).
        scale: cosine-classifier scale (temperature inverse).
    """

    name = "transfer"
    fixed = {"adapt": "head", "first_order": True}
    from_data = ("num_classes",)
    loss_term_phases = ("classes",)  # training is supervised over all classes (support/query: evaluation only)

    def __init__(self, inner=None, *, num_classes: int | None = None, classifier: str = "linear",
                 scale: float = 10.0, **inner_kwargs: Any) -> None:
        if inner is None:
            inner_kwargs = {"steps": 100, "optimizer": "adam", "lr": 0.01, "head_init": "zero", **inner_kwargs}
        super().__init__(inner, **inner_kwargs)
        if self.inner.head_init == "learned":
            raise ConfigError("transfer fine-tunes a fresh head per task: use head_init 'zero' or 'proto'")
        if classifier not in CLASSIFIERS:
            raise unknown_name("classifier", classifier, CLASSIFIERS)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ConfigError(f"transfer num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes, self.classifier = num_classes, classifier
        self.scale = check_positive("transfer scale", scale)
        self.head: nn.Linear | None = None
        self._features: tuple[int, TrunkHead] | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_classes": self.num_classes, "classifier": self.classifier, "scale": self.scale}

    def setup(self, model: TrunkHead) -> None:
        if self.head is not None:
            if self.head.in_features != model.num_features:
                raise ConfigError(f"transfer head expects {self.head.in_features} features, model has {model.num_features}")
            return
        if self.num_classes is None:
            raise ConfigError("transfer needs num_classes (the number of training classes)")
        like = next(model.parameters())
        self.head = nn.Linear(model.num_features, self.num_classes, bias=self.classifier == "linear").to(like)

    def feature_model(self, model: TrunkHead) -> TrunkHead:
        """The model whose trunk gives the features fine-tuned on (normalised for ``cosine``)."""
        if self.classifier == "linear":
            return model
        if self._features is None or self._features[0] != id(model):
            self._features = (id(model), TrunkHead(ScaledNormalize(model.trunk, self.scale), None))
        return self._features[1]

    def global_logits(self, feats: torch.Tensor) -> torch.Tensor:
        if self.classifier == "linear":
            return self.head(feats)
        return self.scale * F.normalize(feats, dim=-1) @ F.normalize(self.head.weight, dim=-1).T

    def class_ids(self, episode: Any) -> torch.Tensor:
        """An episode's dataset class ids (``episode.classes``: one integer in ``0 .. num_classes - 1``
        per class of the task); :class:`InputError` for anything else."""
        if not episode.is_classification or episode.classes is None or not len(episode.classes):
            raise InputError("transfer pre-training needs classification episodes with dataset class ids")
        ids = episode.classes.tolist() if isinstance(episode.classes, torch.Tensor) else list(episode.classes)
        if len(ids) != episode.ways or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in ids):
            raise InputError(f"episode.classes must hold one integer dataset class id per class of the task "
                             f"({episode.ways}), got {ids!r}")
        if min(ids) < 0 or max(ids) >= self.num_classes:
            raise InputError(
                f"episode has dataset class id {min(ids) if min(ids) < 0 else max(ids)} but transfer num_classes is "
                f"{self.num_classes} (ids are 0 .. num_classes - 1); set it to the number of training classes"
            )
        return torch.tensor([int(c) for c in ids])

    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        """Supervised pre-training: every episode's images classified over all training classes.

        Loss terms (distillation) see the phase ``"classes"``: logits over all training classes.
        """
        self.setup(model)
        totals: dict[str, float] = {}
        for episode in batch:
            classes = self.class_ids(episode).to(episode.support_y.device)
            x = torch.cat([episode.support_x, episode.query_x])
            y = classes[torch.cat([episode.support_y, episode.query_y])]
            # the layers loss terms read (feature distillation: ``ctx.features``), tapped by their names in the model
            taps = term_taps(self.inner.loss_terms) if self.inner.loss_terms and model.training else ()
            with tap_outputs(model, taps) as features:
                logits = self.global_logits(model.trunk(x))
            loss = F.cross_entropy(logits, y)
            objective = self.inner.add_loss_terms(loss, LossContext(
                "classes", logits, y, x, episode.support_x, episode.support_y, self.num_classes, model,
                features=dict(features)))
            (objective / len(batch)).backward()
            for k, v in (("loss", float(loss.detach())), ("accuracy", accuracy(logits.detach(), y))):
                totals[k] = totals.get(k, 0.0) + v / len(batch)
        return totals

    def problem(self, model: TrunkHead, support_x, support_y, ways, steps=None):
        """Fine-tuning a fresh head on the (normalised, for ``cosine``) features of the frozen trunk."""
        return super().problem(self.feature_model(model), support_x, support_y, ways, steps)
