"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML")."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from ..adaptation import FirstOrder, MetaGradient, add_loss_terms, batched_task_loss, check_positive
from ..adaptation.optim import check_learnable_rates
from ..errors import ConfigError, unknown_name
from ..models.backbones import TrunkHead
from ..models.norm import BN_EVAL_STATS, StepNorms, torch_batch_norms
from .maml import MAML
from .metasgd import learned_rates, lr_key


def multi_step_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """Per-step query-loss weights of the multi-step loss at meta-iteration ``iteration``.

    With ``S = steps``, ``m = 0.03 / S`` and ``p = iteration / anneal_iterations``: while
    ``p < 1`` the weight of the loss after step ``k < S`` is ``1/S - p (1/S - m)`` and the final
    step's is ``1/S + (S - 1) p (1/S - m)``: uniform at the start, linearly shifting towards the
    final step (the MAML++ schedule, per iteration instead of per epoch).  From
    ``iteration >= anneal_iterations`` on, only the final step counts (weights ``0, ..., 0, 1``).
    The weights always sum to 1.
    """
    if iteration >= anneal_iterations or steps <= 1:
        return [0.0] * (steps - 1) + [1.0] if steps else []
    p = iteration / anneal_iterations
    m = 0.03 / steps
    early = 1.0 / steps - p * (1.0 / steps - m)
    return [early] * (steps - 1) + [1.0 - (steps - 1) * early]


class MAMLPlusPlus(MAML):
    """MAML with the MAML++ fixes, each one a switch.

    * **Multi-step loss** (``multi_step_iterations``): for the first N meta-iterations the
      meta-loss is a weighted sum of the query losses after every inner step, with weights
      annealed towards the last step (:func:`multi_step_weights`); then the last step only.
    * **LSLR** (``learn_lr``): a learned inner learning rate per weight tensor (layer) and per
      step, starting at ``lr``; evaluation with more steps than training reuses the last step's.
    * **BNWB + BNRS** (``per_step_bn``): every EpisodicBatchNorm layer gets per-step weights, biases and
      running statistics (:class:`~metamtl.models.StepNorms`), set ``k`` used by forward passes
      whose weights have had ``k`` updates (``steps + 1`` sets; more eval steps reuse the last).
      These weights are meta-learned, not adapted in the inner loop (the layers' own affine
      weights are unused).  In training mode layers normalise with batch statistics and update
      the running statistics of their set; in eval mode (evaluation, ``adapt``/``predict``)
      they normalise with the running statistics (``bn_eval="running"``, no transduction: every
      image is normalised independently of the others) or, with ``bn_eval="batch"``, with batch
      statistics as in training.
    * **Derivative-order annealing** (``first_order_iterations``): first order for the first N
      meta-iterations (inner gradients treated as constants, but learned rates still get
      meta-gradients), second order afterwards.
    * **Cosine annealing of the meta-optimizer**: a callback, not an algorithm setting:
      ``LRScheduler("cosine")`` (config: ``train.scheduler: {name: cosine}``).

    Both annealings follow the meta-iteration the learner passes to ``meta_step`` (under
    ``multitask`` too).  ``first_order=True`` keeps first order throughout.
    """

    name = "mamlpp"
    supports_implicit = False  # learned per-step rates and BatchNorm, losses after every step

    def __init__(
        self,
        inner=None,
        *,
        learn_lr: bool = True,
        per_step_bn: bool = True,
        bn_eval: str = "running",
        bn_momentum: float = 0.1,
        multi_step_iterations: int = 500,
        first_order_iterations: int = 500,
        **inner_kwargs,
    ) -> None:
        if inner is None:  # the paper's defaults: 5 steps, inner lr 0.1
            inner_kwargs = {"steps": 5, "lr": 0.1, **inner_kwargs}
        super().__init__(inner, **inner_kwargs)
        for key, value in (("multi_step_iterations", multi_step_iterations),
                           ("first_order_iterations", first_order_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"mamlpp {key} must be an integer >= 0, got {value!r}")
        if bn_eval not in BN_EVAL_STATS:
            raise unknown_name("bn_eval statistics", bn_eval, BN_EVAL_STATS)
        for key, value in (("learn_lr", learn_lr), ("per_step_bn", per_step_bn)):
            if not isinstance(value, bool):
                raise ConfigError(f"mamlpp {key} must be true or false, got {value!r}")
        if not check_positive("mamlpp bn_momentum", bn_momentum) <= 1:
            raise ConfigError(f"mamlpp bn_momentum must be a number in (0, 1] (the weight of a new batch in the "
                              f"running statistics), got {bn_momentum!r}")
        if per_step_bn and self.inner.adapt != "all":
            raise ConfigError("mamlpp per_step_bn needs adapt='all' (the trunk must run inside the inner loop)")
        if self.inner.steps < 1:
            raise ConfigError("mamlpp needs steps >= 1")
        if learn_lr:
            check_learnable_rates(self.name, self.inner.optimizer)
        self.learn_lr, self.per_step_bn, self.bn_eval = learn_lr, per_step_bn, bn_eval
        self.bn_momentum = float(bn_momentum)
        self.multi_step_iterations, self.first_order_iterations = multi_step_iterations, first_order_iterations
        self.lrs = nn.ParameterDict()
        self.norms: StepNorms | None = None

    def config(self):
        return {
            **super().config(), "learn_lr": self.learn_lr, "per_step_bn": self.per_step_bn, "bn_eval": self.bn_eval,
            "bn_momentum": self.bn_momentum, "multi_step_iterations": self.multi_step_iterations,
            "first_order_iterations": self.first_order_iterations,
        }

    # -- learnable state --------------------------------------------------------------------
    def setup(self, model: TrunkHead) -> None:
        if self.per_step_bn:
            if self.norms is None:
                self.norms = StepNorms(model, self.inner.steps + 1, self.bn_momentum, self.bn_eval)
                unreached = torch_batch_norms(model)
                if unreached:
                    warnings.warn(
                        f"mamlpp per_step_bn applies to metamtl's EpisodicBatchNorm layers only: the torch BatchNorm "
                        f"layer(s) {', '.join(unreached)} get no per-step weights or running statistics (bn_eval and "
                        "bn_momentum do not reach them) and adapt like any weight. Set per_step_bn: false to say "
                        "so, or build them as metamtl.models.EpisodicBatchNorm", UserWarning, stacklevel=2)
            else:
                self.norms.bind(model)
        if self.learn_lr:
            # (a frozen weight, requires_grad=False, does not adapt: no learned rate)
            names = ([f"trunk.{n}" for n, p in model.trunk.named_parameters() if p.requires_grad]
                     if self.inner.adapt == "all" else [])
            names += ([f"head.{n}" for n, p in model.head.named_parameters() if p.requires_grad]
                      if self.inner.head_init == "learned" and model.head is not None else ["head.weight", "head.bias"])
            learned_rates(self, model, {n: (self.inner.steps,) for n in names})

    def trunk_loaded(self, model: TrunkHead) -> None:
        if self.norms is not None:  # the per-step sets started as copies of the layers' (random) affine weights
            self.norms.copy_affine(model)

    # -- declarations -------------------------------------------------------------------------
    def inner_lrs(self, names: Sequence[str], step: int) -> list | None:
        if not self.learn_lr:
            return None
        k = min(step, self.inner.steps - 1)
        return [self.lrs[lr_key(n)][k] for n in names]

    def step_tensors(self, step: int, training: bool) -> dict[str, torch.Tensor]:
        return self.norms.tensors(step, training) if self.norms is not None else {}

    def sequential_tasks(self, training: bool) -> str | None:
        if training and self.norms is not None:  # as in the paper
            return "its per-step running statistics are folded in task after task"
        return super().sequential_tasks(training)

    def meta_gradient(self, iteration: int) -> MetaGradient:
        """First order for the first ``first_order_iterations`` meta-iterations, then second order."""
        if self.inner.first_order or iteration < self.first_order_iterations:
            return FirstOrder()
        return self.second_order()

    def step_weights(self, iteration: int) -> list[float]:
        """Weights of the query loss after each inner step at meta-iteration ``iteration``."""
        return multi_step_weights(self.inner.steps, iteration, self.multi_step_iterations)

    def outer_objective(self, adapted, query_x, query_y, iteration):
        """The multi-step loss: query losses after every step, weighted (:func:`multi_step_weights`)."""
        p = adapted.problem
        objective = 0.0
        for k, w in enumerate(self.step_weights(iteration), start=1):
            if w > 0:
                logits, feats = adapted.forward(query_x, updates=k, taps=p.taps if k == p.steps else ())
                objective = objective + w * batched_task_loss(logits, query_y)
        # the last step's logits (weights[-1] > 0 always) carry the query loss terms
        return add_loss_terms(p, "query", objective, logits, query_y, query_x, adapted.params, feats), logits
