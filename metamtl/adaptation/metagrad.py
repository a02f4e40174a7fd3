"""Meta-gradient rules: how the gradient of an outer objective reaches the meta-parameters.

A rule gets an :class:`~metamtl.adaptation.InnerProblem` (a chunk of tasks ready to adapt), the
algorithm's outer objective and a weight, and must leave ``weight * sum_t objective_t`` 's
meta-gradient (or its approximation) accumulated in ``.grad`` of the meta-parameters.  See the
contract in the :mod:`metamtl.adaptation` docstring.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch

from .problem import Adapted, InnerProblem

#: ``outer(adapted) -> (objective [T], logits [T, Q, ...])``: the outer objective of each task and
#: the final query logits (for metrics).
Outer = Callable[[Adapted], "tuple[torch.Tensor, torch.Tensor]"]


class MetaGradient:
    """Unrolled differentiation: the inner loop stays on the autograd tape, then one backward.

    ``create_graph=True`` (:class:`SecondOrder`) keeps the inner gradients differentiable (exact
    MAML); ``False`` (:class:`FirstOrder`) treats them as constants while the updates stay on the
    tape, so learned inner rates still get meta-gradients and the query gradient reaches the
    start weights through the identity (FOMAML).  The inner loop starts from leaves
    (:meth:`InnerProblem.leaves`) whose gradients are then pushed into the meta-parameters.
    """

    name: ClassVar[str] = "unrolled"
    create_graph: ClassVar[bool] = True

    def backward(self, problem: InnerProblem, outer: Outer, weight: float) -> tuple[Adapted, torch.Tensor, torch.Tensor]:
        """Accumulate the meta-gradient; returns ``(adapted, objective [T], logits)``."""
        start = problem.leaves()
        adapted = problem.unroll(start, tape=True, create_graph=self.create_graph)
        objective, logits = outer(adapted)
        (objective.sum() * weight).backward(retain_graph=problem.push_needs_graph)
        problem.push([s.grad for s in start])
        return adapted, objective.detach(), logits.detach()


class SecondOrder(MetaGradient):
    name = "second_order"
    create_graph = True


class FirstOrder(MetaGradient):
    name = "first_order"
    create_graph = False


class Difference(MetaGradient):
    """Reptile: the meta-gradient of a task is ``weight * (start - adapted)``; no backward pass
    through the outer objective (it is evaluated for the metrics only)."""

    name = "difference"
    create_graph = False

    def backward(self, problem, outer, weight):
        start = problem.leaves()
        adapted = problem.unroll(start, tape=False, create_graph=False)
        with torch.no_grad():
            objective, logits = outer(adapted)
        problem.push([(s.detach() - p.detach()) * weight for s, p in zip(start, adapted.params)])
        return adapted, objective, logits


RULES: dict[str, type[MetaGradient]] = {cls.name: cls for cls in (SecondOrder, FirstOrder, Difference)}
