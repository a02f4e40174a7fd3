"""Multi-dataset meta-learning: one meta-gradient per dataset, combined by a multi-task strategy.

:class:`MultiTask` wraps any algorithm (MAML, ANIL, Reptile, ...).  Its meta-step splits the
meta-batch by ``episode.dataset``, runs the wrapped algorithm's ``meta_step`` on each dataset's
episodes (mean over that dataset's tasks), keeps each dataset's meta-gradient and mean query
loss, and lets a :mod:`strategy <metamtl.multitask.strategies>` (equal, uncertainty, GradNorm,
DWA, PCGrad, CAGrad) combine them into ``.grad``.  The strategy is a sub-module, so learnable
weights (uncertainty log-variances, GradNorm weights) are meta-parameters: the learner's
meta-optimizer steps them and checkpoints save and resume them.

With a :class:`~metamtl.models.MultiDatasetModel`, each dataset's episodes run inside
:func:`~metamtl.models.dataset_scope`, and its soft-sharing penalty is added to the gradient.

Under distributed training each process combines the gradients of its own share of the
meta-batch; the learner then averages the combined gradients across processes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models.backbones import TrunkHead
from ..models.multidataset import dataset_scope
from ..multitask.strategies import Strategy, apply_strategy, build_strategy
from ..tasks.episode import Episode, TaskBatch
from .base import Algorithm
from .registry import build_algorithm


class MultiTask(Algorithm):
    """Per-dataset meta-gradients combined by a multi-task strategy.

    Args:
        base: the algorithm run on each dataset's episodes (an :class:`Algorithm`, its name, or
            its config dict such as ``{"name": "anil", "head_init": "proto", "steps": 3}``).
        strategy: a :class:`~metamtl.multitask.Strategy`, its name or config dict
            (``{"name": "gradnorm", "alpha": 1.5}``).
        datasets: the dataset labels (``episode.dataset``) of the task distribution (declared in
            :attr:`from_data`: runs fill them in from the config's datasets).
    """

    name = "multitask"
    from_data = ("datasets",)

    def __init__(self, base: Algorithm | str | dict[str, Any] = "maml",
                 strategy: Strategy | str | dict[str, Any] = "equal",
                 datasets: Sequence[str] = ()) -> None:
        nn.Module.__init__(self)
        if isinstance(base, str):
            base = {"name": base}
        if isinstance(base, dict):
            base = build_algorithm(**base)
        if not isinstance(base, Algorithm) or isinstance(base, MultiTask):
            raise ConfigError(f"multitask needs a (non-multitask) base algorithm, got {base!r}")
        if not datasets and isinstance(strategy, Strategy):
            datasets = strategy.tasks
        if not datasets:
            raise ConfigError("multitask needs the list of 'datasets' (the labels of the mixed task sources)")
        self.base = base
        self.strategy = build_strategy(strategy, list(datasets))
        self.inner = base.inner

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.config(), "strategy": self.strategy.config(),
                "datasets": list(self.strategy.tasks)}

    def extra_repr(self) -> str:
        return f"datasets={self.strategy.tasks}"

    @property
    def eval_steps(self) -> int:
        return self.base.eval_steps

    memory_mode = property(lambda self: self.base.memory_mode, doc="The base algorithm's memory mode.")
    memory_plan = property(lambda self: self.base.memory_plan, doc="The base algorithm's memory plan (``auto``).")

    def setup(self, model: TrunkHead) -> None:
        self.base.setup(model)

    # -- training -----------------------------------------------------------------------------
    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        groups: dict[str, list[int]] = {}
        for i, ep in enumerate(batch):
            groups.setdefault(ep.dataset, []).append(i)
        names = list(groups)
        self.strategy.index(names)  # clear error for an unknown dataset
        self.setup(model)
        params = self._shared_params(model)
        before = [p.grad for p in params]
        grads, losses = [], []
        totals: dict[str, float] = {}
        n = len(batch)
        for name in names:
            for p in params:
                p.grad = None
            with dataset_scope(name):
                metrics = self.base.meta_step(model, TaskBatch([batch[i] for i in groups[name]]), iteration)
            grads.append([p.grad for p in params])
            losses.append(metrics["loss"])
            share = len(groups[name]) / n
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v * share
                if k in ("loss", "accuracy"):
                    totals[f"{name}/{k}"] = v
        for p, g in zip(params, before):
            p.grad = g
        loss_values = torch.tensor(losses, dtype=torch.float32)
        totals.update(apply_strategy(self.strategy, loss_values, grads, params, names))
        penalty = getattr(model, "penalty", None)
        if callable(penalty):
            value = penalty()
            if value is not None:
                value.backward()
                totals["penalty"] = float(value.detach())
        return totals

    def _shared_params(self, model: TrunkHead) -> list[nn.Parameter]:
        """Model and base-algorithm parameters (the strategy's own are handled by the strategy)."""
        seen: set[int] = set()
        out = []
        for p in list(model.parameters()) + list(self.base.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _scope(self, episode: Episode):
        """The episode's dataset scope (none for datasets not trained on: routed by shape)."""
        return dataset_scope(episode.dataset if episode.dataset in self.strategy.tasks else None)

    # -- evaluation --------------------------------------------------------------------------
    def adapt(self, model, support_x, support_y, ways, steps=None):
        return self.base.adapt(model, support_x, support_y, ways, steps)

    def evaluate_episodes(self, model: TrunkHead, episodes: Sequence[Episode], steps: int | None = None) -> list[dict[str, float]]:
        """The base algorithm's evaluation, each dataset's episodes in that dataset's scope."""
        out: list[dict[str, float]] = [{} for _ in episodes]
        groups: dict[str, list[int]] = {}
        for i, ep in enumerate(episodes):
            groups.setdefault(ep.dataset, []).append(i)
        for name, positions in groups.items():
            with self._scope(episodes[positions[0]]):
                results = self.base.evaluate_episodes(model, [episodes[i] for i in positions], steps)
            for i, r in zip(positions, results):
                out[i] = r
        return out
