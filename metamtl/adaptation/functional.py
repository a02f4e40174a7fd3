"""The task-batched functional inner loop: the fast path of :class:`~metamtl.adaptation.InnerLoop`.

Same mathematics as the reference inner loop on ``higher`` (tests check the meta-gradients
agree to 1e-5), without a patched module and a differentiable optimizer per task:

* the weights being adapted are plain tensors with a leading task dimension ``[T, ...]``
  (the meta-weights ``expand``-ed, so their meta-gradient is the sum over tasks);
* the model runs through ``torch.func.functional_call``; a chunk of tasks is evaluated at once
  with ``torch.func.vmap`` (``task_chunk`` tasks per call), one SGD step is one
  ``torch.autograd.grad`` for the whole chunk;
* head-only adaptation (ANIL) runs the trunk over all the chunk's images in one call and adapts
  every head at once (vmap batches the head's matmuls into ``bmm`` over ``[T, ways, D]``);
  BatchNorm still normalises each task with its own statistics (vmap's batch-norm rule keeps
  per-task statistics, support and query forwards stay separate exactly as in the reference).

Layout: with a channels_last model (``MetaLearner(channels_last=True)``) every task's adapted conv
weights stay channels_last after each SGD step (an ``add`` would return them NCHW, and every later
feature map with them), so the whole inner and outer loop runs on the fast NHWC kernels.

Chunk size: ``InnerLoop.task_chunk``; ``0`` (auto) is one task per call on CPU and the whole
meta-batch elsewhere.  On a 2-core CPU, batching tasks into one call is slower (grouped
convolutions and feature maps that no longer fit in cache, see benchmarks/RESULTS.md), so the CPU
gain comes from dropping the per-task ``higher`` machinery; on an accelerator a chunk of tasks
turns dozens of small kernels into a few large ones.

Where it applies (``backend="auto"`` picks it, ``"func"`` demands it): plain SGD inner loops
with fixed learning rate, no extra loss terms, algorithms that do not override the per-task
hooks (learned inner learning rates, per-step BatchNorm, Reptile's update...).  Everything else
runs on the reference, :meth:`InnerLoop.adapt_task <metamtl.adaptation.InnerLoop.adapt_task>`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError
from ..models.backbones import TrunkHead
from ..models.heads import initial_head_params
from ..tasks.episode import Episode, TaskBatch
from .inner_loop import BACKENDS, Adapted, InnerLoop

_SGD_DEFAULTS = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False}
#: InnerLoop methods the functional engine reuses or re-implements; overriding one opts out.
_INNER_METHODS = ("adapt_task", "forward", "features", "_module", "_initial_params", "make_optimizer",
                  "add_loss_terms", "param_names")


def batched_task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task :func:`~metamtl.adaptation.task_loss` of ``[T, B, ...]`` logits: shape ``[T]``."""
    if targets.dtype in (torch.long, torch.int32, torch.int64):
        t, b = targets.shape[:2]
        return F.cross_entropy(logits.reshape(t * b, -1), targets.reshape(-1), reduction="none").view(t, b).mean(1)
    return F.mse_loss(logits, targets, reduction="none").flatten(1).mean(1)


def inner_blockers(inner: InnerLoop) -> list[str]:
    """Why the functional engine cannot run ``inner`` exactly (empty: it can)."""
    reasons = []
    extra = {k: v for k, v in inner.optimizer_kwargs.items() if _SGD_DEFAULTS.get(k, object()) != v}
    if inner.optimizer != "sgd" or extra:
        settings = f" with {extra}" if extra else ""
        reasons.append(f"inner optimizer {inner.optimizer!r}{settings} (only plain SGD runs functionally)")
    if inner.loss_terms:
        reasons.append("extra inner-loop loss terms (distillation/regularisers)")
    for name in _INNER_METHODS:
        if getattr(type(inner), name) is not getattr(InnerLoop, name):
            reasons.append(f"{type(inner).__name__} overrides InnerLoop.{name}")
    return reasons


def select_engine(inner: InnerLoop, model: nn.Module, blockers: Sequence[str] = ()) -> "FunctionalInnerLoop | None":
    """The functional engine for ``inner`` on ``model``, or ``None`` for the reference loop.

    ``blockers`` are the caller's reasons against it (e.g. an algorithm overriding a hook).
    With ``backend="func"`` any reason is a :class:`~metamtl.errors.ConfigError`.
    """
    if inner.backend == "higher":
        return None
    reasons = list(blockers) + inner_blockers(inner)
    if not isinstance(model, TrunkHead):
        reasons.append(f"the model is a {type(model).__name__}, not a TrunkHead")
    if reasons:
        if inner.backend == "func":
            raise ConfigError(
                "backend 'func' cannot run this inner loop exactly: " + "; ".join(reasons)
                + ". Use backend 'auto' (falls back to the higher reference loop) or 'higher'."
            )
        return None
    engine = getattr(inner, "_functional_engine", None)
    if engine is None:
        engine = inner._functional_engine = FunctionalInnerLoop(inner)
    return engine


class _FunctionalModule:
    """``fmodel(x, params=[...])`` over a module's weights, like higher's patched module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]

    def __call__(self, x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return functional_call(self.module, dict(zip(self.names, params)), (x,))

    def call(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self(x, params)


class TaskBatchAdapted(Adapted):
    """The adapted weights of a chunk of ``T`` tasks (every tensor has a leading task dimension).

    Call it on query inputs ``[T, Q, ...]`` for logits ``[T, Q, ...]``.  ``inner_losses`` holds
    one ``[T]`` tensor per inner step; :meth:`backward`, :meth:`backward_first_order` and
    :meth:`delta` are the reference :class:`~metamtl.adaptation.Adapted` methods (they only
    combine lists of tensors, whatever their shapes).
    """

    def __init__(self, engine: "FunctionalInnerLoop", fmodel: _FunctionalModule, **kwargs: Any) -> None:
        super().__init__(engine.inner, fmodel, **kwargs)  # type: ignore[arg-type]
        self.engine = engine

    def __call__(self, x: torch.Tensor, updates: int | None = None) -> torch.Tensor:
        params = self.trajectory[self.steps if updates is None else updates]
        inner, fmodel, trunk = self.inner, self.fmodel, self.trunk

        def one(p: Sequence[torch.Tensor], xi: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
            return inner.forward(fmodel, p, xi, si, trunk)

        return map_tasks(one, params, x, self.support_x)


def _nhwc_per_task(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, O, I, kh, kw]`` with every ``x[t]`` in channels-last layout (same values)."""
    y = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if y.stride(2) != 1:  # one input channel: the stride of a size-1 dim is free, say NHWC
        stride = list(y.stride())
        stride[2] = 1
        y = y.as_strided(y.shape, stride)
    return y


def map_tasks(fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """``stack([fn([p[t] for p in params], *[x[t] for x in xs]) for t])``, vmapped over ``t``."""
    if xs[0].shape[0] == 1:  # one task: a plain call (no vmap overhead)
        return fn([p[0] for p in params], *[x[0] for x in xs]).unsqueeze(0)
    return vmap(fn)(list(params), *xs)


class FunctionalInnerLoop:
    """Run :class:`~metamtl.adaptation.InnerLoop` for a chunk of tasks at once with ``torch.func``.

    Use :func:`select_engine` to get one; algorithms do (see ``Algorithm.fast_path``).
    """

    def __init__(self, inner: InnerLoop) -> None:
        self.inner = inner

    def chunk_size(self, device: torch.device, tasks: int) -> int:
        chunk = self.inner.task_chunk or (1 if device.type == "cpu" else tasks)
        return max(1, min(chunk, tasks))

    def chunks(self, batch: TaskBatch) -> list[list[int]]:
        """Positions of ``batch``'s episodes, grouped by shape, in chunks adapted together."""
        out = []
        for positions in batch.groups().values():
            size = self.chunk_size(batch[positions[0]].support_x.device, len(positions))
            out += [positions[i:i + size] for i in range(0, len(positions), size)]
        return out

    # -- the inner loop -------------------------------------------------------------------------
    def adapt(
        self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
        create_graph: bool, steps: int | None = None,
    ) -> TaskBatchAdapted:
        """Adapt to ``T`` tasks' support sets ``[T, S, ...]`` (cf. ``InnerLoop.adapt_task``)."""
        inner = self.inner
        steps = inner.steps if steps is None else steps
        tasks = support_x.shape[0]
        module = inner._module(model, ways)
        fmodel = _FunctionalModule(module)
        head_only = inner.adapt == "head"
        features = None
        if head_only or inner.head_init == "proto":
            features = map_tasks(lambda _, x: model.trunk(x), [], support_x)

        initial, meta = self._initial_params(model, module, features, support_y, ways, tasks)
        if head_only and not create_graph:
            features = features.detach()  # first order: support features only feed the inner loop
        # As in the reference: meta-weights (expanded over tasks) start the tape; a head computed
        # from them (proto) is stood in for by a leaf whose gradient Adapted.backward pushes back.
        start = [
            p if create_graph and (m or p.grad_fn is None) else p.detach().requires_grad_()
            for p, m in zip(initial, meta)
        ]
        inputs = features if head_only else support_x
        # A channels_last model (MetaLearner(channels_last=True)) keeps its adapted conv weights
        # channels_last too: an SGD step's result would otherwise come out NCHW and turn every
        # later feature map (and the slow NCHW max-pool kernel) back to NCHW.
        nhwc = [p.dim() == 5 and p.shape[-1] * p.shape[-2] > 1 and p.stride(2) == 1 for p in start]
        inner_losses: list[torch.Tensor] = []
        params = start
        trajectory = [params]
        with torch.enable_grad():
            for _ in range(steps):
                losses = batched_task_loss(map_tasks(fmodel.call, params, inputs), support_y)
                inner_losses.append(losses.detach())
                grads = torch.autograd.grad(losses.sum(), params, create_graph=create_graph, allow_unused=True)
                params = [p if g is None else p.add(g, alpha=-inner.lr) for p, g in zip(params, grads)]
                params = [_nhwc_per_task(p) if cl else p for p, cl in zip(params, nhwc)]
                if not create_graph:
                    params = [p.detach().requires_grad_() for p in params]
                trajectory.append(params)
        return TaskBatchAdapted(
            self, fmodel, params=params, initial=initial, start=start, inner_losses=inner_losses,
            support_x=support_x, trunk=model.trunk if head_only else None, trajectory=trajectory,
            on_tape=create_graph,
        )

    def _initial_params(
        self, model: TrunkHead, module: nn.Module, features: torch.Tensor | None, support_y: torch.Tensor,
        ways: int, tasks: int,
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """Initial weights ``[T, ...]`` of every task and whether each is a meta-weight."""

        def per_task(p: torch.Tensor) -> torch.Tensor:
            return p.unsqueeze(0).expand(tasks, *p.shape)

        inner = self.inner
        if inner.head_init == "learned":
            params = [per_task(p) for p in module.parameters()]
            return params, [True] * len(params)
        trunk = [per_task(p) for p in model.trunk.parameters()] if inner.adapt == "all" else []
        like = next(model.parameters())
        heads = [
            initial_head_params(inner.head_init, None if features is None else features[t], support_y[t],
                                ways, model.num_features, like)
            for t in range(tasks)
        ]
        head = [torch.stack(h) for h in zip(*heads)]
        head = [h if h.requires_grad else h.requires_grad_() for h in head]
        return trunk + head, [True] * len(trunk) + [False] * len(head)

    # -- what algorithms call -------------------------------------------------------------------
    def meta_step(self, model: TrunkHead, batch: TaskBatch, second_order: bool) -> dict[str, float]:
        """``Algorithm.meta_step`` for the default per-task hooks: same gradients and metrics."""
        n = len(batch)
        totals: dict[str, float] = {}

        def add(key: str, values: torch.Tensor) -> None:
            totals[key] = totals.get(key, 0.0) + float(values.sum()) / n

        for positions in self.chunks(batch):
            sx, sy, qx, qy = batch.stack(positions)
            first = batch[positions[0]]
            adapted = self.adapt(model, sx, sy, first.ways, create_graph=second_order)
            logits = adapted(qx)
            losses = batched_task_loss(logits, qy)
            adapted.backward(losses.sum() / n)
            add("loss", losses.detach())
            if first.is_classification:
                add("accuracy", (logits.detach().argmax(-1) == qy).float().mean(1))
            for k, v in enumerate(adapted.inner_losses):
                add(f"inner_loss/step_{k}", v)
        return totals

    def evaluate(self, model: TrunkHead, episodes: Sequence[Episode], steps: int) -> list[dict[str, float]]:
        """``Algorithm.evaluate_episode`` for each episode, a chunk of episodes at a time."""
        batch = TaskBatch(episodes)
        out: list[dict[str, float]] = [{} for _ in episodes]
        with torch.no_grad():
            for positions in self.chunks(batch):
                sx, sy, qx, qy = batch.stack(positions)
                first = batch[positions[0]]
                logits = self.adapt(model, sx, sy, first.ways, create_graph=False, steps=steps)(qx)
                losses = batched_task_loss(logits, qy).tolist()
                accs = (logits.argmax(-1) == qy).float().mean(1).tolist() if first.is_classification else None
                for j, p in enumerate(positions):
                    out[p] = {"loss": losses[j]} if accs is None else {"loss": losses[j], "accuracy": accs[j]}
        return out
