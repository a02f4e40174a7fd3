"""Inductive feature heads: each query is classified from the support set alone."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..models.heads import class_means
from .base import FeatureHead


@dataclasses.dataclass
class NearestCentroid(FeatureHead):
    """SimpleShot (Wang et al. 2019): nearest class mean of centred, L2-normalised features ("CL2N").

    Logits are negative squared Euclidean distances to the class means of the transformed support
    features.  ``center: false`` gives "L2N", ``normalize: false`` too the plain Euclidean rule.
    """

    name: ClassVar[str] = "simpleshot"
    center: bool = True

    def classify(self, support, support_y, query, ways):  # noqa: D102
        return -torch.cdist(query, class_means(support, support_y, ways)).pow(2)


@dataclasses.dataclass
class LogisticRegression(FeatureHead):
    """Multinomial logistic regression on frozen support features (RFS evaluation, Tian et al. 2020).

    Minimises ``C * sum(cross-entropy) + ||W||^2 / 2`` (scikit-learn's ``LogisticRegression``
    objective; the bias is not penalised) with L-BFGS for ``steps`` iterations, from zero weights,
    on L2-normalised features.  It is minimised as ``mean(cross-entropy) + ||W||^2 / (2 C n)``
    (divided by ``C n``, ``n`` support rows: the same minimiser), so that a small ``C`` does not
    shrink the gradient below L-BFGS's tolerance at the zero start (all-zero logits: every query
    class 0).  RFS fits it on several augmented copies of every support image: combine it with
    test-time support augmentation (``support_augment``).

    Args:
        C: inverse regularisation strength, at least ``1e-5`` (below it the optimum's logits are
            too small to separate in float32).
        steps: L-BFGS iterations.
    """

    name: ClassVar[str] = "logreg"
    checks: ClassVar[dict] = {"C": (float, 1e-5), "steps": (int, 1)}
    C: float = 1.0
    steps: int = 100

    def classify(self, support, support_y, query, ways):  # noqa: D102
        weight, bias = self.fit(support, support_y, ways)
        return query @ weight.T + bias

    def fit(self, support: torch.Tensor, support_y: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fitted ``(weight [ways, D], bias [ways])`` on (transformed) support features, taken as frozen
        (features that require grad are fitted on without reaching back into the caller's graph), also under
        ``torch.inference_mode()``, which ``enable_grad`` alone does not leave."""
        with torch.inference_mode(False), torch.enable_grad():  # inference tensors cannot enter autograd: copies
            return self._fit(support.detach().clone(), support_y.detach().clone(), ways)

    def _fit(self, support: torch.Tensor, support_y: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = support.new_zeros(ways, support.shape[1], requires_grad=True)
        bias = support.new_zeros(ways, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.steps, history_size=10,
                                      tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        decay = 0.5 / (self.C * support.shape[0])  # C * sum(CE) + ||W||^2 / 2 divided by C * n: the same minimiser

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(support @ weight.T + bias, support_y) + weight.pow(2).sum() * decay
            loss.backward()
            return loss

        optimizer.step(objective)
        return weight.detach(), bias.detach()
