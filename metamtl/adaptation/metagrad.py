"""Meta-gradient rules: how the gradient of an outer objective reaches the meta-parameters.

A rule gets an :class:`~metamtl.adaptation.InnerProblem` (a chunk of tasks ready to adapt), the
algorithm's outer objective and a weight, and must leave ``weight * sum_t objective_t`` 's
meta-gradient (or its approximation) accumulated in ``.grad`` of the meta-parameters.  See the
contract in the :mod:`metamtl.adaptation` docstring.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from .gradients import checkpointed_unroll, implicit_solution
from .problem import Adapted, InnerProblem, InnerView

#: ``outer(adapted) -> (objective [T], logits [T, Q, ...])``: the outer objective of each task and
#: the final query logits (for metrics).
Outer = Callable[[Adapted], "tuple[torch.Tensor, torch.Tensor]"]


@contextlib.contextmanager
def kept_buffers(*sources: nn.Module | Iterable[torch.Tensor]) -> Iterator[None]:
    """Restore, on exit, the buffers of modules and the given tensors that need no gradient
    (BatchNorm running statistics and counters): forward passes that are not part of the
    training trajectory (a memory probe, a checkpointed step's recomputation, the implicit
    gradient's support pass) leave them as they were."""
    tensors = [t for src in sources for t in (src.buffers() if isinstance(src, nn.Module) else src)
               if not t.requires_grad]
    saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        for t, v in zip(tensors, saved):
            # through .data: a batch-norm graph saves its running statistics (unread in training
            # mode), and a version bump would fail the recomputed step's backward
            t.data.copy_(v)


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
    #: whether the rule differentiates through the inner loop (what ``memory`` and its planner are
    #: about); first-order rules (FOMAML, Reptile's difference) keep no second-order graph
    second_order: ClassVar[bool] = True

    def backward(self, problem: InnerProblem, outer: Outer, weight: float) -> tuple[Adapted, torch.Tensor, torch.Tensor]:
        """Accumulate the meta-gradient; returns ``(adapted, objective [T], logits)``."""
        start = problem.leaves()
        return self.descend(problem, start, problem.unroll(start, tape=True, create_graph=self.create_graph),
                            outer, weight)

    @staticmethod
    def descend(problem: InnerProblem, start: list[torch.Tensor], adapted: Adapted, outer: Outer,
                weight: float) -> tuple[Adapted, torch.Tensor, torch.Tensor]:
        """Backpropagate ``weight * outer(adapted).sum()`` (``adapted`` on the tape from the leaves
        ``start``) and push the start leaves' gradients into the meta-parameters."""
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
    second_order = False


class Difference(MetaGradient):
    """Reptile: the meta-gradient of a task is ``weight * (start - adapted)``; no backward pass
    through the outer objective (it is evaluated for the metrics only)."""

    name = "difference"
    create_graph = False
    second_order = False

    def backward(self, problem, outer, weight):
        start = problem.leaves()
        adapted = problem.unroll(start, tape=False, create_graph=False)
        with torch.no_grad():
            objective, logits = outer(adapted)
        problem.push([(s.detach() - p.detach()) * weight for s, p in zip(start, adapted.params)])
        return adapted, objective, logits


class Checkpointed(MetaGradient):
    """Second order with the memory of one inner step (``memory: checkpoint``): the same
    meta-gradient as :class:`SecondOrder`, each step recomputed from its saved weights during the
    backward pass (:func:`~metamtl.adaptation.checkpointed_unroll`).  Learned inner rates and
    per-step BatchNorm sets (closed over by the step) get their meta-gradients as well."""

    name = "checkpoint"

    def backward(self, problem, outer, weight):
        start = problem.leaves()
        n = len(start)
        inner_losses: list[torch.Tensor] = []

        def step(state, k, context, create_graph):
            if create_graph:  # the backward's recomputation: no logging, running statistics left alone
                with kept_buffers(problem.model, problem.tensors(k).values()):
                    return problem._step(state, k, context, create_graph, tape=True)[0]
            new, loss = problem._step(state, k, context, create_graph, tape=True)
            inner_losses.append(loss)
            return new

        states = checkpointed_unroll(step, start + problem.init_state(start), problem.steps, problem.context(start))
        return self.descend(problem, start, Adapted(problem, [s[:n] for s in states], inner_losses), outer, weight)


def proximal_term(view: InnerView, lam: float) -> torch.Tensor:
    """iMAML's ``lam/2 ||w - w_0||^2`` per task ``[T]``: ``w`` the weights, ``w_0`` where the loop started."""
    if len(view.anchor) != len(view.params):
        raise RuntimeError("the proximal term needs the start weights: call InnerProblem.step with context "
                           "InnerProblem.context(start)")
    return lam / 2 * sum((p - a).pow(2).flatten(1).sum(1) for p, a in zip(view.params, view.anchor))


class Implicit(MetaGradient):
    """iMAML (Rajeswaran et al. 2019, ``memory: implicit``): the inner loop minimises the inner
    objective, which then includes :func:`proximal_term`, without any graph; the meta-gradient is
    ``(I + H/lam)^{-1} g`` from ``cg_steps`` conjugate-gradient iterations on Hessian-vector
    products at the adapted weights (:func:`~metamtl.adaptation.implicit_solution`, per task).
    Memory does not depend on the number of inner steps.  Needs an outer objective of the final
    weights only (``adapted.trajectory`` holds just the start and the solution)."""

    name = "implicit"

    def __init__(self, cg_steps: int = 5) -> None:
        self.cg_steps = cg_steps

    def backward(self, problem, outer, weight):
        start = problem.leaves()
        n, steps = len(start), problem.steps
        inner_losses: list[torch.Tensor] = []

        def solve(anchor, context):
            state = [a.detach().requires_grad_() for a in anchor]
            state += problem.init_state(state)
            for k in range(steps):
                state, loss = problem._step(state, k, [context[0], *anchor], create_graph=False, tape=False)
                inner_losses.append(loss)
            return state[:n]

        def objective(params, anchor, context):  # the backward's support pass: running statistics left alone
            with kept_buffers(problem.model, problem.tensors(steps).values()):
                return problem.objective_at(params, steps, [context[0], *anchor])[0].sum()

        solution = implicit_solution(solve, objective, start, [problem.inputs], self.cg_steps, batched=True)
        return self.descend(problem, start, Adapted(problem, [start, solution], inner_losses), outer, weight)


RULES: dict[str, type[MetaGradient]] = {
    cls.name: cls for cls in (SecondOrder, FirstOrder, Difference, Checkpointed, Implicit)
}


def second_order_rule(memory: str, cg_steps: int = 5) -> MetaGradient:
    """The second-order rule of a memory mode: ``full``, ``checkpoint`` or ``implicit``."""
    if memory == "checkpoint":
        return Checkpointed()
    if memory == "implicit":
        return Implicit(cg_steps)
    return SecondOrder()
