"""Outer loops: an algorithm is a few declarations on the one inner-loop core.

An :class:`Algorithm` is an ``nn.Module`` (learnable pieces such as inner learning rates are saved
with it, meta-optimized with the model and restored on resume) that declares:

* :meth:`~Algorithm.inner_objective` - what the inner loop minimises (default: the support task
  loss plus any loss terms);
* :meth:`~Algorithm.outer_objective` - what the meta-gradient is the gradient of (default: the
  query task loss after the last inner step, plus query loss terms);
* :meth:`~Algorithm.meta_gradient` - the rule that turns it into ``.grad`` of the
  meta-parameters (:class:`~metamtl.adaptation.SecondOrder`, :class:`~metamtl.adaptation.FirstOrder`,
  :class:`~metamtl.adaptation.Difference`, or your own), chosen per meta-iteration;
* optionally :meth:`~Algorithm.inner_lrs` (learned inner rates, per weight and step) and
  :meth:`~Algorithm.step_tensors` (per-step BatchNorm sets: tensors handed to the forward pass
  of the weights after ``k`` updates).

Everything else - building the inner problem of a chunk of tasks, running it on the core (or the
``higher`` engine), metrics, evaluation - is :meth:`Algorithm.meta_step`, :meth:`Algorithm.adapt`
and :meth:`Algorithm.evaluate_episodes`, shared by all.  :meth:`Algorithm.setup` creates
model-dependent learnable state before the meta-optimizer is built.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..adaptation import (
    Adapted, FirstOrder, InnerLoop, InnerProblem, InnerView, MetaGradient, SecondOrder, add_loss_terms,
    batched_task_loss, build_problem, default_objective,
)
from ..models.backbones import TrunkHead
from ..tasks.episode import Episode, TaskBatch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


class Algorithm(nn.Module):
    """Base class: MAML (second order, or first order with ``first_order=True``) on the core.

    Args:
        inner: the inner-loop settings; or pass them as keyword arguments
            (``steps``, ``lr``, ``optimizer``, ``first_order``, ``adapt``, ``head_init``, ...).
    """

    name: ClassVar[str] = "base"
    #: settings this algorithm fixes whatever the user passes (e.g. ANIL adapts only the head)
    fixed: ClassVar[dict[str, Any]] = {}

    def __init__(self, inner: InnerLoop | None = None, **inner_kwargs: Any) -> None:
        super().__init__()
        if inner is not None and inner_kwargs:
            raise TypeError("pass either an InnerLoop or its settings, not both")
        if inner is None:
            inner = InnerLoop(**{**inner_kwargs, **self.fixed})
        self.inner = inner

    # -- configuration ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this algorithm with :func:`build_algorithm`."""
        return {"name": self.name, **self.inner.config()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")

    def setup(self, model: TrunkHead) -> None:
        """Create model-dependent learnable state (called before the meta-optimizer is built).

        Must be idempotent: it is called again by ``meta_step``/``adapt`` and on load.
        """

    @property
    def eval_steps(self) -> int:
        """Inner steps used at evaluation by default."""
        return self.inner.evaluation_steps

    # -- declarations ------------------------------------------------------------------------
    def meta_gradient(self, iteration: int) -> MetaGradient:
        """The meta-gradient rule at meta-iteration ``iteration``."""
        return FirstOrder() if self.inner.first_order else SecondOrder()

    def inner_lrs(self, names: Sequence[str], step: int) -> list | None:
        """Inner learning rate of each adapted weight (model names) at step ``step``; ``None``: ``lr``."""
        return None

    def step_tensors(self, step: int, training: bool) -> dict[str, torch.Tensor]:
        """Tensors handed to the forward pass of the weights after ``step`` updates (by model name)."""
        return {}

    def inner_objective(self, view: InnerView) -> torch.Tensor:
        """The inner objective ``[T]`` of one inner step."""
        return default_objective(view)

    def outer_objective(self, adapted: Adapted, query_x: torch.Tensor, query_y: torch.Tensor,
                        iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective [T], final logits)``: the query task loss after the last step plus query loss terms."""
        p = adapted.problem
        logits, feats = adapted.forward(query_x, taps=p.taps)
        loss = batched_task_loss(logits, query_y)
        return add_loss_terms(p, "query", loss, logits, query_y, query_x, adapted.params, feats), logits

    def chunk_limit(self, training: bool) -> int | None:
        """At most this many tasks adapted at once (``None``: the engine decides)."""
        return None

    # -- the machinery every algorithm shares -------------------------------------------------
    def problem(self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
                steps: int | None = None) -> InnerProblem:
        """The inner problem of ``T`` tasks' support sets ``[T, S, ...]`` with this algorithm's declarations."""
        return build_problem(self.inner, model, support_x, support_y, ways, steps=steps, lrs=self.inner_lrs,
                             tensors=self.step_tensors, objective=self.inner_objective)

    def chunks(self, batch: TaskBatch, training: bool) -> list[list[int]]:
        """Positions of ``batch``'s episodes grouped by shape, in chunks adapted together."""
        from ..adaptation import ENGINES

        engine = ENGINES[self.inner.backend]
        limit = self.chunk_limit(training)
        if training and self.inner.loss_terms:
            limit = 1  # loss terms see one task at a time
        out = []
        for positions in batch.groups().values():
            size = engine.chunk_size(self.inner, batch[positions[0]].support_x.device, len(positions))
            size = min(size, limit) if limit else size
            out += [positions[i:i + size] for i in range(0, len(positions), size)]
        return out

    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` (mean over tasks) into ``.grad``.

        ``iteration`` is the meta-iteration (0-based) the learner is at: schedules (MAML++'s
        annealing) follow it.  Chunks of tasks are processed one after the other and their graphs
        freed after each backward.  Returns mean query loss/accuracy and the mean support loss
        before each inner step (``inner_loss/step_k``).
        """
        self.setup(model)
        rule = self.meta_gradient(iteration)
        n = len(batch)
        totals: dict[str, float] = {}

        def add(key: str, values: torch.Tensor) -> None:
            totals[key] = totals.get(key, 0.0) + float(values.sum()) / n

        for positions in self.chunks(batch, training=True):
            sx, sy, qx, qy = batch.stack(positions)
            first = batch[positions[0]]
            problem = self.problem(model, sx, sy, first.ways)
            adapted, _, logits = rule.backward(
                problem, lambda a: self.outer_objective(a, qx, qy, iteration), 1.0 / n)
            add("loss", batched_task_loss(logits, qy))
            if first.is_classification:
                add("accuracy", (logits.argmax(-1) == qy).float().mean(1))
            for k, v in enumerate(adapted.inner_losses):
                add(f"inner_loss/step_{k}", v)
        return totals

    # -- evaluation --------------------------------------------------------------------------
    def adapt(self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
              steps: int | None = None) -> Adapted:
        """Adapt to one support set for prediction (no meta-gradient); call the result on query inputs."""
        self.setup(model)
        problem = self.problem(model, support_x.unsqueeze(0), support_y.unsqueeze(0), ways,
                               self.eval_steps if steps is None else steps)
        adapted = problem.unroll(problem.leaves(), tape=False, create_graph=False)
        adapted.single = True
        return adapted

    def evaluate_episodes(self, model: TrunkHead, episodes: Sequence[Episode],
                          steps: int | None = None) -> list[dict[str, float]]:
        """Query loss (and accuracy) of each episode after adapting to its support set."""
        self.setup(model)
        steps = self.eval_steps if steps is None else steps
        batch = TaskBatch(list(episodes))
        out: list[dict[str, float]] = [{} for _ in episodes]
        with torch.no_grad():
            for positions in self.chunks(batch, training=model.training):
                sx, sy, qx, qy = batch.stack(positions)
                first = batch[positions[0]]
                problem = self.problem(model, sx, sy, first.ways, steps)
                logits = problem.unroll(problem.leaves(), tape=False, create_graph=False)(qx)
                losses = batched_task_loss(logits, qy).tolist()
                accs = (logits.argmax(-1) == qy).float().mean(1).tolist() if first.is_classification else None
                for j, p in enumerate(positions):
                    out[p] = {"loss": losses[j]} if accs is None else {"loss": losses[j], "accuracy": accs[j]}
        return out

    def evaluate_episode(self, model: TrunkHead, episode: Episode, steps: int | None = None) -> dict[str, float]:
        """:meth:`evaluate_episodes` of one episode."""
        return self.evaluate_episodes(model, [episode], steps)[0]
