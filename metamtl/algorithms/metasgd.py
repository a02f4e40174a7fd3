"""Meta-SGD (Li et al. 2017): MAML that also meta-learns a learning rate for every weight."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..adaptation.optim import check_learnable_rates
from ..errors import ConfigError
from ..models.backbones import TrunkHead
from .maml import MAML


def lr_key(name: str) -> str:
    """Module-safe key of a weight name (``trunk.blocks.0.0.weight`` -> ``trunk-blocks-0-0-weight``)."""
    return name.replace(".", "-")


def per_task_head_shapes(model: TrunkHead) -> dict[str, tuple[int, ...]]:
    """Learning-rate shapes for per-task heads, whose number of outputs changes with the ways.

    One rate per input feature shared by every output class (``[1, D]`` for the weight), and
    one rate shared by every bias (``[1]``): they broadcast against a head of any width.
    """
    return {"head.weight": (1, model.num_features), "head.bias": (1,)}


def learned_rates(alg: MAML, model: TrunkHead, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fill ``alg.lrs`` with a learned rate of each shape (by weight name), starting at the inner
    ``lr``; where it holds rates already, a :class:`ConfigError` unless they include these (rates made
    for another model, or before a frozen weight was unfrozen).  Rates of weights frozen since they
    were made stay, unused while the weight is frozen (a trained learner frozen to be served)."""
    if len(alg.lrs):
        have = {k: tuple(v.shape) for k, v in alg.lrs.items()}
        want = {lr_key(n): s for n, s in shapes.items()}
        missing = sorted(k for k, s in want.items() if have.get(k) != s)
        if missing:
            raise ConfigError(
                f"{alg.name}: this algorithm's learned learning rates were made for another model (no rate of "
                f"that shape for {missing[:4]}: weights of another shape, or frozen when the rates were made "
                "and unfrozen since); build a new algorithm"
            )
        return
    like = next(model.parameters())
    for n, shape in shapes.items():
        alg.lrs[lr_key(n)] = nn.Parameter(torch.full(shape, alg.inner.lr, dtype=like.dtype, device=like.device))


class MetaSGD(MAML):
    """Learnable per-element inner learning rates, meta-trained with the initialisation.

    The inner update is ``w <- w - lr_w * g`` (elementwise: ``lr_w`` has the shape of ``w``);
    with another inner ``optimizer`` the rates replace its ``lr``.  Rates start at ``lr`` and are
    ``nn.Parameter`` s of the algorithm: saved with it, meta-optimized by the learner (they are
    in ``MetaLearner.meta_parameters()``) and restored on resume.  They may become negative
    (Meta-SGD learns update directions as well as sizes).

    Per-task heads (``head_init`` ``"zero"``/``"proto"``) change shape with the number of ways,
    so their rates are shared across output classes (see :func:`per_task_head_shapes`); one
    learner keeps serving 5-way and 20-way tasks.  With ``first_order=True`` the update is kept
    on the tape with constant inner gradients, so the rates still get meta-gradients.
    """

    name = "metasgd"
    supports_implicit = False  # learned inner rates shape the path, not the proximal solution

    def __init__(self, inner=None, **inner_kwargs) -> None:
        super().__init__(inner, **inner_kwargs)
        check_learnable_rates(self.name, self.inner.optimizer)
        self.lrs = nn.ParameterDict()

    def lr_shapes(self, model: TrunkHead) -> dict[str, tuple[int, ...]]:
        """Shape of the learning rate of every weight the inner loop adapts (frozen weights,
        ``requires_grad=False``, do not adapt and get none)."""
        adapt_head_only = self.inner.adapt == "head"
        shapes = {} if adapt_head_only else {f"trunk.{n}": tuple(p.shape) for n, p in model.trunk.named_parameters()
                                                 if p.requires_grad}
        if self.inner.head_init == "learned":
            if model.head is None:
                raise ConfigError("head_init='learned' needs a model with a head; use 'zero' or 'proto'")
            shapes.update({f"head.{n}": tuple(p.shape) for n, p in model.head.named_parameters() if p.requires_grad})
        else:
            shapes.update(per_task_head_shapes(model))
        return shapes

    def setup(self, model: TrunkHead) -> None:
        learned_rates(self, model, self.lr_shapes(model))

    def inner_lrs(self, names: Sequence[str], step: int) -> list:
        return [self.lrs[lr_key(n)] for n in names]
