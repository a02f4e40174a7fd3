"""Non-finite numbers never become a result: which weights are NaN/inf, and which step made them so.

A model whose weights hold NaN or infinity computes NaN logits, and ``argmax`` of NaN logits is
class 0: such a model used to evaluate to exactly ``1/ways`` accuracy ("50.00% ± 0.00%" for 2
ways) as if it were merely bad.  The learner checks its weights (parameters and buffers such as
BatchNorm running statistics) where they can go wrong and raises
:class:`~metamtl.errors.TrainingError` naming the tensors and the step: after each meta-optimizer
step (:class:`~metamtl.fit_loop.MetaStep`), before evaluating, adapting or predicting, and per
evaluation episode (finite weights whose adaptation diverged).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from .errors import ConfigError, TrainingError
from .placement import model_dtype

if TYPE_CHECKING:
    from .learner import MetaLearner


def nonfinite_tensors(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """``"prefix.name (k of n values)"`` for every parameter or buffer holding NaN or infinity."""
    bad = []
    for prefix, module in modules:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() or t.is_complex():
                k = int((~torch.isfinite(t.detach())).sum())
                if k:
                    bad.append(f"{prefix}{name} ({k} of {t.numel()} values)")
    return bad


def check_finite_weights(modules: Iterable[tuple[str, nn.Module]], what: str, cause: str) -> None:
    """Raise :class:`TrainingError` if any weight is not finite: ``what`` failed, ``cause`` says
    which step produced them and what to do."""
    bad = nonfinite_tensors(modules)
    if bad:
        raise TrainingError(
            f"{what}: the model's weights are not finite ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}; "
            f"{len(bad)} tensor(s) hold NaN or inf), so no result from them would mean anything; {cause}"
        )


def check_weights_before(modules: Iterable[tuple[str, nn.Module]], what: str, iteration: int) -> None:
    """:func:`check_finite_weights` of a learner at ``iteration`` before ``what`` (evaluate, adapt)
    starts: non-finite weights came from training or from the checkpoint it was loaded from."""
    check_finite_weights(
        modules, what,
        f"they were already so before {what} started: training (this learner is at iteration {iteration}) "
        "or the checkpoint it was loaded from produced them. Retrain with a lower meta_lr or with grad_clip, "
        "or load an earlier checkpoint")


def check_learner_weights(learner: "MetaLearner", what: str) -> None:
    """Before ``what`` (fit, evaluate, adapt) runs ``learner``: its weights are finite
    (:func:`check_weights_before`) and still in the floating dtype the learner was built for, which inputs
    are cast to (:class:`ConfigError` naming the fix when e.g. ``learner.model.double()`` came after)."""
    check_weights_before([("model.", learner.model), ("algorithm.", learner.algorithm)], what, learner.iteration)
    built, now = learner.placement.dtype, model_dtype(learner.model)  # half/bf16/mixed weights: ConfigError there
    if now != built:
        name, was = str(now).removeprefix("torch."), str(built).removeprefix("torch.")
        raise ConfigError(
            f"{what}: the model's weights became {name} after the learner was built for {was} weights, the dtype "
            f"its inputs are cast to. Convert them back (learner.model.{'double' if was == 'float64' else 'float'}()), "
            f"or build a new MetaLearner around the {name} model (or save this learner and MetaLearner.load it)")


def divergence(steps: int | None, head: str | None = None) -> str:
    """Why outputs computed from finite weights are not finite, and what to do: the algorithm's
    adaptation with ``steps`` inner steps, or the feature ``head`` (a name) that classified them."""
    if head is not None and head != "algorithm":
        return (f"from finite weights with feature head {head}: the trunk's features or the head's fit on them "
                "overflowed (the head takes no inner steps: change the head's settings, e.g. a smaller logreg C, "
                "or use another head)")
    after = f"after adapting with {steps} inner step(s) " if steps is not None else ""
    return (f"{after}from finite weights: the adaptation diverged (lower the inner learning rate algorithm.lr, "
            "or the number of steps)")


def check_finite_episodes(losses: list[float], steps: int, head: str | None = None) -> None:
    """Raise :class:`TrainingError` at the first evaluation episode whose query loss is not finite
    (the weights were checked finite before: the adaptation, the head or the forward pass diverged)."""
    for i, loss in enumerate(losses):
        if not torch.isfinite(torch.tensor(loss)):
            raise TrainingError(
                f"evaluate: episode {i}: the query loss is {loss} {divergence(steps, head)}, so no accuracy is reported")
