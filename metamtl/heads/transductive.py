"""Transductive feature heads: a task's queries are classified together, using their structure.

Their accuracy is not comparable with inductive numbers (a query's prediction depends on the
other queries of its task); every head here has ``transductive = True`` and evaluation results
carry the flag.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models.heads import class_means
from .base import FeatureHead


def _cosine(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).T


def rectified_prototypes(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                         epsilon: float, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-CSPN (Liu et al. 2020): ``(prototypes, queries)`` after bias diminishing.

    Cross-class bias: queries are shifted by ``mean(support) - mean(query)``.  Intra-class bias:
    every query is pseudo-labelled with its nearest basic prototype (cosine), and each class's
    prototype becomes the mean of its support images and pseudo-labelled queries weighted by
    ``exp(epsilon * cos(x, basic prototype))``, normalised within the class.
    """
    if shift:
        query = query + (support.mean(0) - query.mean(0))
    basic = class_means(support, support_y, ways)
    pseudo = _cosine(query, basic).argmax(1)
    points = torch.cat([support, query])
    labels = torch.cat([support_y, pseudo])
    # normalised within each class in log space (minus the class's largest exponent): exp(epsilon * cos)
    # itself overflows float32 from epsilon ~89 on
    scores = epsilon * _cosine(points, basic).gather(1, labels.unsqueeze(1)).squeeze(1)
    top = torch.full((ways,), -math.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, labels, scores, reduce="amax")
    weights = torch.exp(scores - top[labels])
    total = points.new_zeros(ways).index_add(0, labels, weights)
    protos = points.new_zeros(ways, points.shape[1]).index_add(0, labels, weights.unsqueeze(1) * points)
    return protos / total.unsqueeze(1), query


@dataclasses.dataclass
class BDCSPN(FeatureHead):
    """BD-CSPN prototype rectification; queries are classified by ``scale * cosine`` to the
    rectified prototypes.

    Args:
        epsilon: sharpness of the confidence weights.
        shift: apply the cross-class bias shift.
        scale: multiplies the cosine logits.
    """

    name: ClassVar[str] = "bdcspn"
    transductive: ClassVar[bool] = True
    checks: ClassVar[dict] = {"epsilon": (float, 0.0), "shift": (bool, None), "scale": (float, 1e-12)}
    epsilon: float = 10.0
    shift: bool = True
    scale: float = 10.0

    def classify(self, support, support_y, query, ways):  # noqa: D102
        protos, query = rectified_prototypes(support, support_y, query, ways, self.epsilon, self.shift)
        return self.scale * _cosine(query, protos)


@dataclasses.dataclass
class LaplacianShot(FeatureHead):
    """LaplacianShot (Ziko et al. 2020) on centred, L2-normalised features.

    Minimises ``sum_q y_q . a_q - lam * sum_{q,p} W_qp y_q . y_p`` plus the assignments' negative
    entropy over soft assignments ``y``, where ``a_q`` are squared distances to the prototypes
    (BD-CSPN-rectified with ``rectify``) and ``W`` the kNN graph of the queries (``W_qp = 1``
    when ``p`` is among the ``knn`` nearest queries of ``q``), by the paper's bound updates
    ``y = softmax(-a + lam W y)`` for up to ``iterations`` rounds (stopping when the bound
    changes by less than 1e-6 relative).  Logits are the last ``-a + lam W y``.
    """

    name: ClassVar[str] = "laplacianshot"
    transductive: ClassVar[bool] = True
    checks: ClassVar[dict] = {"lam": (float, 0.0), "knn": (int, 1), "iterations": (int, 1),
                              "rectify": (bool, None), "epsilon": (float, 0.0)}
    center: bool = True
    lam: float = 0.7
    knn: int = 3
    iterations: int = 20
    rectify: bool = True
    epsilon: float = 10.0

    def classify(self, support, support_y, query, ways):  # noqa: D102
        if self.rectify:
            protos, query = rectified_prototypes(support, support_y, query, ways, self.epsilon, True)
        else:
            protos = class_means(support, support_y, ways)
        unary = torch.cdist(query, protos).pow(2)
        k = min(self.knn, query.shape[0] - 1)
        if k < 1:
            return -unary
        dist = torch.cdist(query, query).fill_diagonal_(float("inf"))
        graph = torch.zeros_like(dist).scatter_(1, dist.topk(k, largest=False).indices, 1.0)
        scores, assign, bound = -unary, F.softmax(-unary, 1), None
        for _ in range(self.iterations):
            scores = -unary + self.lam * graph @ assign
            assign = F.softmax(scores, 1)
            energy = float((assign * (assign + 1e-12).log() + unary * assign
                            - self.lam * (graph @ assign) * assign).sum())
            if bound is not None and abs(energy - bound) <= 1e-6 * abs(bound):
                break
            bound = energy
        return scores


def log_sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The log of :func:`sinkhorn`'s plan, computed in log space (logsumexp normalisations): any
    scale of logits works, e.g. squared distances of unnormalised features in the thousands."""
    log_plan = logits - torch.logsumexp(logits, 1, keepdim=True)
    log_target = math.log(logits.shape[0] / logits.shape[1])
    for _ in range(iterations):
        log_plan = log_plan + (log_target - torch.logsumexp(log_plan, 0, keepdim=True))
        log_plan = log_plan - torch.logsumexp(log_plan, 1, keepdim=True)
    return log_plan


def sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Soft assignments ``exp(logits)`` scaled so every row sums to 1 and every column to
    ``rows / columns`` (class-balanced), by alternate normalisation (Sinkhorn-Knopp)."""
    return log_sinkhorn(logits, iterations).exp()


@dataclasses.dataclass
class SoftKMeans(FeatureHead):
    """Soft k-means refinement of the prototypes with the queries (Ren et al. 2018).

    Starting from the support class means, ``iterations`` times: soft-assign every query with
    ``softmax(-scale * ||q - c_k||^2)`` (``balanced``: Sinkhorn-balanced assignments, every class
    receiving ``queries / ways`` of the mass), then recompute each prototype as the mean of its
    support images and the queries weighted by their assignments.  Logits: ``-scale * d^2`` to the
    final prototypes (log of the balanced assignments when ``balanced``).
    """

    name: ClassVar[str] = "softkmeans"
    transductive: ClassVar[bool] = True
    checks: ClassVar[dict] = {"iterations": (int, 0), "scale": (float, 1e-12), "balanced": (bool, None),
                              "sinkhorn_iterations": (int, 1)}
    iterations: int = 10
    scale: float = 10.0
    balanced: bool = False
    sinkhorn_iterations: int = 50

    def assign(self, logits: torch.Tensor) -> torch.Tensor:
        return sinkhorn(logits, self.sinkhorn_iterations) if self.balanced else F.softmax(logits, 1)

    def classify(self, support, support_y, query, ways):  # noqa: D102
        onehot = F.one_hot(support_y, ways).to(support.dtype)
        protos = class_means(support, support_y, ways)
        for _ in range(self.iterations):
            z = self.assign(-self.scale * torch.cdist(query, protos).pow(2))
            protos = (onehot.T @ support + z.T @ query) / (onehot.sum(0) + z.sum(0)).unsqueeze(1)
        logits = -self.scale * torch.cdist(query, protos).pow(2)
        return log_sinkhorn(logits, self.sinkhorn_iterations) if self.balanced else logits


@dataclasses.dataclass
class Sinkhorn(SoftKMeans):
    """:class:`SoftKMeans` with class-balanced (Sinkhorn) assignments."""

    name: ClassVar[str] = "sinkhorn"
    balanced: bool = True
