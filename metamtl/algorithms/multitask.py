"""Multi-dataset meta-learning: one meta-gradient per dataset, combined by a multi-task strategy.

:class:`MultiTask` wraps any algorithm (MAML, ANIL, Reptile, ...).  Its meta-step splits the
meta-batch by ``episode.dataset``, runs the wrapped algorithm's ``meta_step`` on each dataset's
episodes (mean over that dataset's tasks), keeps each dataset's meta-gradient and mean query
loss, and lets a :mod:`strategy <metamtl.multitask.strategies>` (equal, uncertainty, GradNorm,
DWA, PCGrad, CAGrad) combine them into ``.grad``.  A parameter with no (or an all-zero)
meta-gradient from a dataset is one that dataset does not reach, whatever the base algorithm.  The strategy is a sub-module, so learnable
weights (uncertainty log-variances, GradNorm weights) are meta-parameters: the learner's
meta-optimizer steps them and checkpoints save and resume them.

With a :class:`~metamtl.models.MultiDatasetModel`, each dataset's episodes run inside
:func:`~metamtl.models.dataset_scope`; its soft-sharing penalty is added by the learner's meta-step,
as for every algorithm (:func:`metamtl.fit_loop.add_model_penalty`).

Under distributed training (torchrun) each process runs the base algorithm on its own share of
the meta-batch, then the processes all-reduce every dataset's summed meta-gradient, summed
metrics and task count (:meth:`MultiTask.global_meta_step`), so each holds the whole meta-batch's
per-dataset meta-gradients and losses, in the order one process sees them.  Every process then
runs the strategy on the same inputs and gets the same combined gradient (and the same updates
of the strategy's state: DWA's loss history, GradNorm's initial losses); the learner does not
average it again.  The result is the one-process result, up to float rounding.  (PCGrad's random
order uses torch's global generator, which agrees across processes as long as the base algorithm
draws nothing from it per task.)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models.backbones import TrunkHead
from ..models.multidataset import dataset_scope, routed_dataset, routed_scope
from ..multitask.strategies import Strategy, apply_strategy, build_strategy
from ..tasks.episode import Episode, TaskBatch
from .base import Algorithm
from .registry import ALGORITHMS, build_algorithm, with_data_settings


class MultiTask(Algorithm):
    """Per-dataset meta-gradients combined by a multi-task strategy.

    Args:
        base: the algorithm run on each dataset's episodes (an :class:`Algorithm`, its name, or
            its config dict such as ``{"name": "anil", "head_init": "proto", "steps": 3}``).
        strategy: a :class:`~metamtl.multitask.Strategy`, its name or config dict
            (``{"name": "gradnorm", "alpha": 1.5}``).
        datasets: the dataset labels (``episode.dataset``) of the task distribution (declared in
            :attr:`from_data`: runs fill them in from the config's datasets).
        num_classes: the mixture's training classes, passed on to a base config that takes them
            from the data and leaves them out (``transfer``); declared in :attr:`from_data` too.
    """

    name = "multitask"
    from_data = ("datasets", "num_classes")

    def __init__(self, base: Algorithm | str | dict[str, Any] = "maml",
                 strategy: Strategy | str | dict[str, Any] = "equal",
                 datasets: Sequence[str] = (), num_classes: int | None = None) -> None:
        nn.Module.__init__(self)
        if isinstance(base, str):
            base = {"name": base}
        if isinstance(base, dict):  # what the base takes from the data: the mixture's
            base = build_algorithm(**with_data_settings(base, {"num_classes": lambda: num_classes}))
        if not isinstance(base, Algorithm) or isinstance(base, MultiTask):
            raise ConfigError(f"multitask needs a (non-multitask) base algorithm, got {base!r}")
        if not datasets and isinstance(strategy, Strategy):
            datasets = strategy.tasks
        if not datasets:
            raise ConfigError("multitask needs the list of 'datasets' (the labels of the mixed task sources)")
        self.base = base
        self.strategy = build_strategy(strategy, list(datasets))
        self.inner = base.inner

    @classmethod
    def trains_over_classes(cls, settings: Mapping[str, Any]) -> bool:
        """Whether the wrapped algorithm (``settings["base"]``: an algorithm, its name or config) does;
        ``num_classes`` is declared only to hand it on to a base such as ``transfer``."""
        base = settings.get("base", "maml")
        if isinstance(base, Algorithm):
            base = base.config()
        if isinstance(base, str):
            base = {"name": base}
        name = base.get("name") if isinstance(base, Mapping) else None
        base_cls = ALGORITHMS.get(name) if isinstance(name, str) else None
        return base_cls is not None and base_cls is not cls and base_cls.trains_over_classes(base)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.config(), "strategy": self.strategy.config(),
                "datasets": list(self.strategy.tasks)}

    def extra_repr(self) -> str:
        return f"datasets={self.strategy.tasks}"

    def check_trainable(self) -> None:
        self.base.check_trainable()

    @property
    def eval_steps(self) -> int:
        return self.base.eval_steps

    memory_mode = property(lambda self: self.base.memory_mode, doc="The base algorithm's memory mode.")
    loss_term_phases = property(lambda self: self.base.loss_term_phases, doc="The base algorithm's loss-term phases.")
    has_inner_loop = property(lambda self: self.base.has_inner_loop, doc="Whether the base algorithm has an inner loop.")
    memory_plan = property(lambda self: self.base.memory_plan, doc="The base algorithm's memory plan (``auto``).")

    def setup(self, model: TrunkHead) -> None:
        self.base.setup(model)

    def trunk_loaded(self, model: TrunkHead) -> None:
        self.base.trunk_loaded(model)  # e.g. MAML++'s per-step BatchNorm copies of the loaded trunk

    def meta_gradient(self, iteration: int):
        return self.base.meta_gradient(iteration)  # e.g. MAML++'s first-order, then second-order schedule

    # -- training -----------------------------------------------------------------------------
    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        return self._combined_step(model, batch, iteration, None)

    def global_meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int,
                         processes: Any) -> dict[str, float]:
        """Every process gets the whole meta-batch's per-dataset meta-gradients and losses
        (:meth:`_exchange`) before the strategy combines them, so all run it on the same inputs."""
        return self._combined_step(model, batch, iteration, processes)

    def exchanged_buffers(self) -> list[torch.Tensor]:
        return list(self.strategy.buffers())  # set from the exchanged losses, alike on every process

    def _combined_step(self, model: TrunkHead, batch: TaskBatch, iteration: int,
                       processes: Any) -> dict[str, float]:
        groups: dict[str, list[int]] = {}
        for i, ep in enumerate(batch):
            groups.setdefault(ep.dataset, []).append(i)
        self.strategy.index(list(groups))  # clear error for an unknown dataset
        self.setup(model)
        if self.inner.memory == "auto" and self.base.checked_rule(iteration).second_order:
            for name, positions in groups.items():  # every dataset's shapes first: one mode for all of them
                with dataset_scope(name):
                    self.base.plan_memory(model, TaskBatch([batch[i] for i in positions]), iteration)
        def with_terms(params: list[nn.Parameter]) -> list[nn.Parameter]:
            # the loss terms' parameters (distillation adapters, built at first use) are combined like the model's
            known = {id(p) for p in params}
            return params + [p for t in self.inner.loss_terms if isinstance(t, nn.Module) for p in t.parameters()
                             if p.requires_grad and id(p) not in known]

        params = with_terms(self._shared_params(model))
        before = [p.grad for p in params]
        parts: list[_Part] = []
        for name, positions in groups.items():
            for p in params:
                p.grad = None
            with dataset_scope(name):
                metrics = self.base.meta_step(model, TaskBatch([batch[i] for i in positions]), iteration)
            params = with_terms(params)
            parts.append(_Part(name, positions, _reached([p.grad for p in params]), metrics))
        for part in parts:  # an adapter built in a later dataset's step: unused by the earlier ones
            part.grads += [None] * (len(params) - len(part.grads))
        self.base.keep_batch_plan(model, batch, iteration)  # the batch's memory plan, not its last dataset's
        for p, g in zip(params, before + [None] * (len(params) - len(before))):
            p.grad = g
        if processes is not None:
            parts = self._exchange(parts, params, processes, iteration)
        totals: dict[str, float] = {}
        n = sum(part.count for part in parts)
        for part in parts:
            for k, v in part.metrics.items():
                totals[k] = totals.get(k, 0.0) + v * (part.count / n)
                if k in ("loss", "accuracy"):
                    totals[f"{part.name}/{k}"] = v
        loss_values = torch.tensor([part.metrics["loss"] for part in parts], dtype=torch.float32)
        totals.update(apply_strategy(self.strategy, loss_values, [part.grads for part in parts], params,
                                     [part.name for part in parts]))
        return totals

    def _exchange(self, parts: list["_Part"], params: Sequence[torch.Tensor], processes: Any,
                  iteration: int) -> list["_Part"]:
        """The whole meta-batch's datasets, each with its mean meta-gradient and metrics over all
        processes' tasks, identical on every process.

        Each process contributes per dataset its task count, the sums (mean times count) of its
        gradients and metrics, zero for a dataset it has no task of; datasets come in the order of
        their first task in the meta-batch (the order one process sees), local position ``i``
        being global position ``rank + i * world_size``; a dataset with no task anywhere is left
        out, as in one process.
        """
        rank, size = processes.rank, processes.world_size
        mine = {part.name: {"count": part.count, "first": rank + part.positions[0] * size,
                            "has_grad": [g is not None for g in part.grads],
                            "sums": {k: v * part.count for k, v in part.metrics.items()}} for part in parts}
        infos = processes.all_gather(mine, f"multitask dataset exchange (iteration {iteration + 1})")
        names = sorted({name for info in infos for name in info},
                       key=lambda name: min(info[name]["first"] for info in infos if name in info))
        local = {part.name: part for part in parts}
        out, tensors = [], []
        for name in names:
            present = [info[name] for info in infos if name in info]
            count = sum(i["count"] for i in present)
            sums: dict[str, float] = {}
            for i in present:
                for k, v in i["sums"].items():
                    sums[k] = sums.get(k, 0.0) + v
            grads: list[torch.Tensor | None] = []
            for j, p in enumerate(params):
                if not any(i["has_grad"][j] for i in present):
                    grads.append(None)
                    continue
                g = local[name].grads[j] if name in local else None
                grads.append(torch.zeros_like(p) if g is None else g * local[name].count)
                tensors.append(grads[-1])
            out.append(_Part(name, [], grads, {k: v / count for k, v in sums.items()}, count))
        processes.all_reduce_sum(tensors, f"multitask meta-gradient all-reduce (iteration {iteration + 1})")
        for part in out:
            for g in part.grads:
                if g is not None:
                    g.div_(part.count)
        return out

    def _shared_params(self, model: TrunkHead) -> list[nn.Parameter]:
        """Model and base-algorithm parameters (the strategy's own are handled by the strategy)."""
        seen: set[int] = set()
        out = []
        for p in list(model.parameters()) + list(self.base.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _scope(self, model: TrunkHead, episode: Episode):
        """The episode's dataset scope (for a dataset not trained on, the one its support images'
        shape routes to, as in :meth:`adapt`: per-dataset heads get features, which carry no shape)."""
        known = episode.dataset in self.strategy.tasks
        return routed_scope(model, episode.dataset if known else None, episode.support_x)

    # -- evaluation --------------------------------------------------------------------------
    def adapt(self, model, support_x, support_y, ways, steps=None):
        """The base algorithm's adaptation in the support set's dataset scope (the open one, else
        routed by the support images' shape); queries of the result run in the same scope."""
        name = routed_dataset(model, None, support_x)
        with dataset_scope(name):
            adapted = self.base.adapt(model, support_x, support_y, ways, steps)
        return adapted if name is None else _Scoped(adapted, name)

    def evaluate_episodes(self, model: TrunkHead, episodes: Sequence[Episode], steps: int | None = None) -> list[dict[str, float]]:
        """The base algorithm's evaluation, each dataset's episodes in that dataset's scope."""
        out: list[dict[str, float]] = [{} for _ in episodes]
        groups: dict[str, list[int]] = {}
        for i, ep in enumerate(episodes):
            groups.setdefault(ep.dataset, []).append(i)
        for name, positions in groups.items():
            with self._scope(model, episodes[positions[0]]):
                results = self.base.evaluate_episodes(model, [episodes[i] for i in positions], steps)
            for i, r in zip(positions, results):
                out[i] = r
        return out


def _reached(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """One dataset's meta-gradients with an all-zero one as ``None``: a parameter the dataset never
    reaches (another dataset's stem, trunk or head).  Reptile's ``initial - adapted`` gives such a
    parameter zeros where backpropagation gives ``None``; without this every parameter would count
    as shared by every dataset (one device sync for all of them)."""
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    nonzero = torch.stack([grads[i].ne(0).any() for i in present]).tolist()
    out = list(grads)
    for i, keep in zip(present, nonzero):
        if not keep:
            out[i] = None
    return out


class _Part:
    """One dataset's share of a meta-step: its tasks' positions, meta-gradient (mean over them,
    per shared parameter; ``None``: unused) and metrics (means)."""

    def __init__(self, name: str, positions: list[int], grads: list[torch.Tensor | None],
                 metrics: dict[str, float], count: int | None = None) -> None:
        self.name, self.positions, self.grads, self.metrics = name, positions, grads, metrics
        self.count = len(positions) if count is None else count


class _Scoped:
    """An adaptation result (:class:`~metamtl.adaptation.Adapted`, prototypes...) whose calls run
    in dataset ``name``'s :func:`~metamtl.models.dataset_scope`; everything else is the result's."""

    def __init__(self, adapted: Any, name: str) -> None:
        self.adapted, self.dataset = adapted, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.__dict__["adapted"], attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with dataset_scope(self.dataset):
            return self.adapted(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with dataset_scope(self.dataset):
            return self.adapted.forward(*args, **kwargs)
