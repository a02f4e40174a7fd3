"""Outer loops: what an algorithm does with a task after the shared inner loop adapted to it.

An :class:`Algorithm` is an ``nn.Module`` (so learnable pieces such as inner learning rates are
saved with it, meta-optimized with the model and restored on resume) and the
:class:`~metamtl.adaptation.InnerHooks` of the shared inner loop, with the entry points the
:class:`~metamtl.MetaLearner` uses:

* :meth:`Algorithm.setup` is called once with the model before the meta-optimizer is built:
  algorithms whose learnable state depends on the model (Meta-SGD's per-weight learning rates,
  MAML++'s per-layer ones and per-step BatchNorm) create it there;

* :meth:`Algorithm.meta_step` accumulates the meta-gradient of a meta-batch into ``.grad`` of the
  meta-parameters (the learner then clips and steps its meta-optimizer);
* :meth:`Algorithm.adapt` adapts to one support set without a higher-order graph, for
  evaluation, ``MetaLearner.adapt`` and ``predict``.

Subclasses usually override a hook or two: :meth:`Algorithm.task_step` /
:meth:`Algorithm.task_backward` (what to do with an adapted task), and the inner-loop hooks
:meth:`~metamtl.adaptation.InnerHooks.lr_override` / ``step_context``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..adaptation import Adapted, FunctionalInnerLoop, InnerHooks, InnerLoop, LossContext, select_engine, task_loss
from ..models.backbones import TrunkHead
from ..tasks.episode import Episode, TaskBatch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


class Algorithm(nn.Module, InnerHooks):
    """Base class: MAML-style meta-learning on the shared :class:`InnerLoop`.

    Args:
        inner: the inner loop; or pass its settings as keyword arguments
            (``steps``, ``lr``, ``optimizer``, ``first_order``, ``adapt``, ``head_init``, ...).
    """

    name: ClassVar[str] = "base"
    #: settings this algorithm fixes whatever the user passes (e.g. ANIL adapts only the head)
    fixed: ClassVar[dict[str, Any]] = {}
    #: keep first-order inner updates on the tape (algorithms with learned inner settings)
    track_updates: ClassVar[bool] = False

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

    # -- training -----------------------------------------------------------------------------
    @property
    def second_order(self) -> bool:
        return not self.inner.first_order

    def adapt_task(self, model: TrunkHead, episode: Episode) -> Adapted:
        """The shared inner loop on one training episode, with this algorithm's hooks."""
        return self.inner.adapt_task(
            model, episode.support_x, episode.support_y, episode.ways, create_graph=self.second_order,
            hooks=self, track_updates=self.track_updates,
        )

    def meta_step(self, model: TrunkHead, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` (mean over tasks) into ``.grad``.

        Tasks are processed one at a time and their graphs freed after each backward, so
        memory does not grow with the meta-batch size.  Returns mean query loss/accuracy and the
        mean support loss before each inner step (``inner_loss/step_k``).
        """
        self.setup(model)
        engine = self.fast_path(model)
        if engine is not None:
            return engine.meta_step(model, batch, self.second_order)
        totals: dict[str, float] = {}
        n = len(batch)
        for episode in batch:
            for key, value in self.task_step(model, episode, 1.0 / n).items():
                totals[key] = totals.get(key, 0.0) + value / n
        return totals

    #: overriding any of these opts out of the task-batched fast path (it re-implements them)
    _FAST_PATH_METHODS: ClassVar[tuple[str, ...]] = (
        "adapt_task", "task_step", "task_backward", "evaluate_episode", "adapt", "lr_override", "step_context",
    )

    def fast_path(self, model: TrunkHead) -> FunctionalInnerLoop | None:
        """The exact task-batched engine for this algorithm and model, or ``None`` (reference loop).

        See :mod:`metamtl.adaptation.functional` and the inner loop's ``backend`` setting.
        """
        blockers = [
            f"{type(self).__name__} overrides {name}" for name in self._FAST_PATH_METHODS
            if getattr(type(self), name) is not getattr(Algorithm, name)
        ]
        if self.track_updates:
            blockers.append(f"{type(self).__name__} keeps first-order updates on the tape (track_updates)")
        return select_engine(self.inner, model, blockers)

    def task_step(self, model: TrunkHead, episode: Episode, weight: float) -> dict[str, float]:
        """Adapt to one task, backpropagate ``weight * query loss``, return its metrics.

        The query loss includes the inner loop's :attr:`~metamtl.adaptation.InnerLoop.loss_terms`
        (phase ``"query"``); the reported ``loss`` is the plain task loss.
        """
        adapted = self.adapt_task(model, episode)
        logits = adapted(episode.query_x)
        loss = task_loss(logits, episode.query_y)
        objective = self.inner.add_loss_terms(loss, LossContext(
            "query", logits, episode.query_y, episode.query_x, episode.support_x, episode.support_y,
            episode.ways, model))
        self.task_backward(adapted, objective * weight)
        return self._metrics(loss, logits, episode, adapted)

    def task_backward(self, adapted: Adapted, loss: torch.Tensor) -> None:
        """Turn one task's weighted query loss into meta-gradients."""
        adapted.backward(loss)

    @staticmethod
    def _metrics(loss: torch.Tensor, logits: torch.Tensor, episode: Episode, adapted: Adapted | None) -> dict[str, float]:
        out = {"loss": float(loss.detach())}
        if episode.is_classification:
            out["accuracy"] = accuracy(logits.detach(), episode.query_y)
        if adapted is not None:
            for k, v in enumerate(adapted.inner_losses):
                out[f"inner_loss/step_{k}"] = v
        return out

    # -- evaluation --------------------------------------------------------------------------
    def adapt(
        self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
        steps: int | None = None,
    ) -> Adapted:
        """Adapt to a support set for prediction (no higher-order graph)."""
        self.setup(model)
        if steps is None:
            steps = self.eval_steps
        return self.inner.adapt_task(model, support_x, support_y, ways, create_graph=False, steps=steps, hooks=self)

    @property
    def eval_steps(self) -> int:
        """Inner steps used at evaluation by default."""
        return self.inner.eval_steps if self.inner.eval_steps is not None else self.inner.steps

    def evaluate_episode(self, model: TrunkHead, episode: Episode, steps: int | None = None) -> dict[str, float]:
        """Query loss/accuracy after adapting to the episode's support set."""
        with torch.no_grad():
            adapted = self.adapt(model, episode.support_x, episode.support_y, episode.ways, steps)
            logits = adapted(episode.query_x)
            return self._metrics(task_loss(logits, episode.query_y), logits, episode, None)

    def evaluate_episodes(self, model: TrunkHead, episodes: list[Episode], steps: int | None = None) -> list[dict[str, float]]:
        """:meth:`evaluate_episode` for each episode (task-batched on the fast path)."""
        engine = self.fast_path(model)
        if engine is None:
            return [self.evaluate_episode(model, e, steps) for e in episodes]
        self.setup(model)
        return engine.evaluate(model, episodes, self.eval_steps if steps is None else steps)
