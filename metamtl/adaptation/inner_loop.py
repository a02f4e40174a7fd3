"""The one inner loop every algorithm shares.

:class:`InnerLoop` fine-tunes a functional copy of the model on a task's support set with a
differentiable optimizer from ``higher`` (``higher.innerloop_ctx``).  Algorithms only decide what
to do with the result (:class:`Adapted`): backpropagate the query loss through the adaptation
(MAML, second order), map the query gradient of the adapted weights onto the initial ones
(first order), or use the weight change itself (Reptile).

Which parameters adapt
    ``adapt="all"`` fine-tunes trunk and head; ``adapt="head"`` fine-tunes only the head on top of
    trunk features (ANIL): the trunk runs once per task and is not copied.

Per-task heads
    ``head_init="learned"`` starts from the model's meta-learned head; ``"zero"`` and ``"proto"``
    create a head for this task's number of ways (see :mod:`metamtl.models.heads`), so one model
    serves 5-way and 20-way tasks.

Gradients
    With ``create_graph=True`` (MAML at training time) the unrolled optimisation stays on the
    autograd tape and :meth:`Adapted.backward` gives the exact second-order meta-gradient (inner
    gradients are partial derivatives: a ``proto`` head enters the inner loop as a leaf whose
    meta-gradient is then pushed through the prototype computation).  Otherwise
    the inner loop runs on detached copies of the initial weights and without a higher-order graph
    (cheap; used by first-order methods and at evaluation); :meth:`Adapted.backward_first_order`
    then sends ``d loss / d adapted`` to the initial weights (the first-order approximation).

Loss terms
    :attr:`InnerLoop.loss_terms` is a list of callables ``term(ctx: LossContext) -> tensor | None``
    added to the support loss at every inner step (``ctx.phase == "support"``) and, through
    :meth:`Algorithm.task_step <metamtl.algorithms.Algorithm.task_step>`, to the query (meta)
    loss (``ctx.phase == "query"``).  Knowledge distillation and regularisers attach here
    (see :mod:`metamtl.distill`).  Terms shape meta-training only: they are skipped while the
    model is in eval mode (evaluation, ``MetaLearner.adapt``/``predict``).

BatchNorm
    See :mod:`metamtl.models.norm`: batch statistics of each forward pass, never running
    statistics; ``bn_stats="support"`` normalises query images with the support statistics.

Hooks (how algorithms change the inner loop without copying it)
    :class:`InnerHooks` has two methods, both no-ops by default; every
    :class:`~metamtl.algorithms.Algorithm` is an ``InnerHooks`` and passes itself to
    :meth:`InnerLoop.adapt_task`:

    * :meth:`InnerHooks.lr_override` returns optimizer settings per adapted parameter for one
      inner step, as tensors that may require grad (higher's ``override``): learned inner
      learning rates of Meta-SGD (per element) and MAML++ (per layer and step).
    * :meth:`InnerHooks.step_context` returns a context manager entered around every forward
      pass with weights that have had ``k`` inner updates (MAML++ per-step BatchNorm).

    ``track_updates=True`` keeps the update ``w - lr * g`` on the autograd tape even in first
    order (``g`` treated as a constant), so learned settings still get meta-gradients and the
    query gradient reaches the initial weights through a plain ``loss.backward()``.
    :attr:`Adapted.trajectory` holds the weights after every inner step, for losses on
    intermediate steps (MAML++ multi-step loss).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, ContextManager, Sequence

import higher
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, unknown_name
from ..models.backbones import TrunkHead
from ..models.heads import HEAD_INITS, LinearHead, initial_head_params
from ..models.norm import BN_MODES, stats_from_first

#: Inner optimizers: name -> (torch optimizer class, default kwargs). All are supported by higher.
INNER_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adamax": (torch.optim.Adamax, {}),
}
ADAPT_MODES = ("all", "head")
#: see ``InnerLoop.backend`` and :mod:`metamtl.adaptation.functional`
BACKENDS = ("auto", "higher", "func")


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, mean squared error for float targets."""
    if targets.dtype in (torch.long, torch.int32, torch.int64):
        return F.cross_entropy(logits, targets)
    return F.mse_loss(logits, targets)


@dataclasses.dataclass
class LossContext:
    """What a loss term sees: one forward pass of a model adapting to (or adapted to) a task.

    Attributes:
        phase: ``"support"`` (inner loop, every step) or ``"query"`` (the outer, meta loss).
        logits: the model's output for ``inputs``.
        targets: labels (or regression targets) of ``inputs``.
        inputs: the model inputs behind ``logits`` (support or query images).
        support_x, support_y: the task's support set (e.g. for a teacher to adapt to).
        ways: number of classes of the task.
        model: the meta-model (its weights are the initialisation, not the adapted ones).
        step: inner step for ``"support"``, ``-1`` for ``"query"``.
    """

    phase: str
    logits: torch.Tensor
    targets: torch.Tensor
    inputs: torch.Tensor
    support_x: torch.Tensor
    support_y: torch.Tensor
    ways: int
    model: nn.Module
    step: int = -1


#: ``term(ctx) -> extra loss or None``, see :attr:`InnerLoop.loss_terms`.
LossTerm = Callable[[LossContext], "torch.Tensor | None"]


def check_positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class InnerHooks:
    """What an algorithm may change in the shared inner loop; the defaults change nothing."""

    def lr_override(self, names: Sequence[str], step: int) -> dict[str, list] | None:
        """Optimizer settings for inner step ``step`` (0-based), or ``None``.

        Args:
            names: the adapted parameters in optimizer order (one param group each), named as in
                the model (``"trunk.blocks.0.0.weight"``, ``"head.weight"``; per-task heads are
                ``"head.weight"`` / ``"head.bias"`` whatever their number of ways).
        Returns:
            e.g. ``{"lr": [t_0, t_1, ...]}``, one value per name (a tensor that broadcasts
            against the parameter); tensors that require grad receive meta-gradients.
        """
        return None

    def step_context(self, updates: int) -> ContextManager:
        """Entered around each forward pass whose weights have had ``updates`` inner updates."""
        return contextlib.nullcontext()


NO_HOOKS = InnerHooks()


def _detach_grads(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [g if g is None else g.detach() for g in grads]


class Adapted:
    """A model adapted to one task: call it on query inputs to get logits.

    Attributes:
        params: the adapted (fast) weights.
        initial: the weights adaptation started from, connected to the meta-parameters.
        start: the tensors the inner loop actually started from (``initial`` itself when the
            graph is kept, detached copies otherwise).
        inner_losses: support loss before each inner step (floats), for logging.
        trajectory: the weights after ``k`` inner steps, ``trajectory[0] is start`` and
            ``trajectory[-1] is params``.
        on_tape: whether ``params`` are connected to ``initial`` by autograd (second order or
            ``track_updates``); then ``loss.backward()`` is the whole meta-gradient.
    """

    def __init__(
        self,
        inner: "InnerLoop",
        fmodel: nn.Module,
        params: list[torch.Tensor],
        initial: list[torch.Tensor],
        start: list[torch.Tensor],
        inner_losses: list[float],
        support_x: torch.Tensor,
        trunk: nn.Module | None,
        trajectory: list[list[torch.Tensor]] | None = None,
        hooks: InnerHooks = NO_HOOKS,
        on_tape: bool = False,
    ) -> None:
        self.inner = inner
        self.fmodel = fmodel
        self.params = params
        self.initial = initial
        self.start = start
        self.inner_losses = inner_losses
        self.support_x = support_x
        self.trunk = trunk  # set when only the head adapted
        self.trajectory = trajectory if trajectory is not None else [start, params]
        self.hooks = hooks
        self.on_tape = on_tape

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    def __call__(self, x: torch.Tensor, updates: int | None = None) -> torch.Tensor:
        """Logits of ``x`` with the adapted weights, or those after ``updates`` inner steps."""
        updates = self.steps if updates is None else updates
        with self.hooks.step_context(updates):
            return self.inner.forward(self.fmodel, self.trajectory[updates], x, self.support_x, self.trunk)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the meta-gradient of ``loss`` (a function of the adapted weights).

        On the tape, ``loss.backward()`` reaches the meta-weights through the unrolled inner
        loop; initial tensors computed from the meta-weights (the ``proto`` head) are stood in for
        by leaves in :attr:`start` (so inner gradients are partial derivatives, as at evaluation),
        and those leaves' gradients are then pushed through the computation that made them.
        Off the tape this is :meth:`backward_first_order`.
        """
        if not self.on_tape:
            return self.backward_first_order(loss)
        pushed = [(i, s) for i, s in zip(self.initial, self.start) if s is not i and i.requires_grad]
        loss.backward(retain_graph=bool(pushed))
        pairs = [(i, s.grad) for i, s in pushed if s.grad is not None]
        if pairs:
            torch.autograd.backward([i for i, _ in pairs], [g for _, g in pairs])

    def backward_first_order(self, loss: torch.Tensor) -> None:
        """First-order meta-gradient: send ``d loss / d adapted`` to the initial weights.

        Without a higher-order graph the adapted weights are leaves, so ``loss.backward()`` fills
        their ``.grad`` (and the meta-weights' on query paths that bypass them, e.g. the trunk
        features in head-only adaptation); those gradients are then pushed into the initial
        weights, through whatever made them (identity for meta-learned weights, the prototype
        computation for ``head_init="proto"``).
        """
        loss.backward()
        pairs = [
            (i, p.grad) for i, p in zip(self.initial, self.params)
            if i.requires_grad and p.grad is not None
        ]
        if pairs:
            torch.autograd.backward([i for i, _ in pairs], [g for _, g in pairs])

    def delta(self) -> list[torch.Tensor]:
        """``initial - adapted`` for every adapted weight (the Reptile meta-gradient)."""
        return [i.detach() - p.detach() for i, p in zip(self.initial, self.params)]


@dataclasses.dataclass
class InnerLoop:
    """Fine-tune a copy of the model on a support set with a differentiable optimizer.

    Args:
        steps: inner gradient steps at meta-training time.
        lr: inner learning rate.
        optimizer: one of :data:`INNER_OPTIMIZERS` (``sgd``, ``momentum``, ``adam``, ...).
        optimizer_kwargs: extra keyword arguments of the torch optimizer (e.g. ``betas``).
        first_order: never keep the higher-order graph (FOMAML / Reptile).
        adapt: ``"all"`` parameters or only the ``"head"`` (ANIL).
        head_init: ``"learned"``, ``"zero"`` or ``"proto"`` (see :mod:`metamtl.models.heads`).
        eval_steps: inner steps at evaluation (default: ``steps``).
        bn_stats: ``"transductive"`` or ``"support"`` (see :mod:`metamtl.models.norm`).
        backend: ``"auto"`` runs the exact task-batched fast path
            (:mod:`metamtl.adaptation.functional`) where it applies and this loop elsewhere;
            ``"higher"`` always runs this loop (the reference); ``"func"`` always the fast path.
        task_chunk: tasks adapted per call on the fast path (``0``: one on CPU, all elsewhere).
    """

    steps: int = 1
    lr: float = 0.4
    optimizer: str = "sgd"
    optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    first_order: bool = False
    adapt: str = "all"
    head_init: str = "learned"
    eval_steps: int | None = None
    bn_stats: str = "transductive"
    backend: str = "auto"
    task_chunk: int = 0

    def __post_init__(self) -> None:
        for name in ("steps",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"inner {name} must be an integer >= 0, got {v!r}")
        if self.eval_steps is not None and (
            isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int) or self.eval_steps < 0
        ):
            raise ConfigError(f"inner eval_steps must be an integer >= 0, got {self.eval_steps!r}")
        self.lr = check_positive("inner lr", self.lr)
        if not isinstance(self.first_order, bool):
            raise ConfigError(f"inner first_order must be true or false, got {self.first_order!r}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise unknown_name("inner optimizer", self.optimizer, INNER_OPTIMIZERS)
        if not isinstance(self.optimizer_kwargs, dict):
            raise ConfigError(f"inner optimizer_kwargs must be a mapping, got {self.optimizer_kwargs!r}")
        try:  # let torch validate the settings now rather than at the first inner step
            cls, defaults = INNER_OPTIMIZERS[self.optimizer]
            cls([torch.zeros(1, requires_grad=True)], lr=self.lr, **{**defaults, **self.optimizer_kwargs})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad inner optimizer_kwargs {self.optimizer_kwargs} for {self.optimizer!r}: {exc}") from None
        if self.adapt not in ADAPT_MODES:
            raise unknown_name("adapt mode", self.adapt, ADAPT_MODES)
        if self.head_init not in HEAD_INITS:
            raise unknown_name("head initialisation", self.head_init, HEAD_INITS)
        if self.bn_stats not in BN_MODES:
            raise unknown_name("bn_stats mode", self.bn_stats, BN_MODES)
        if self.backend not in BACKENDS:
            raise unknown_name("inner-loop backend", self.backend, BACKENDS)
        if isinstance(self.task_chunk, bool) or not isinstance(self.task_chunk, int) or self.task_chunk < 0:
            raise ConfigError(f"task_chunk must be an integer >= 0 (0: automatic), got {self.task_chunk!r}")
        self._task_modules: dict[tuple[int, int], nn.Module] = {}
        #: extra loss terms (not part of the config): see :class:`LossContext`
        self.loss_terms: list[LossTerm] = []

    def config(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # -- building blocks ----------------------------------------------------------------------
    def _module(self, model: TrunkHead, ways: int) -> nn.Module:
        """The module whose weights adapt for a ``ways``-way task (shares the model's trunk)."""
        if self.head_init == "learned":
            if model.head is None:
                raise ConfigError("head_init='learned' needs a model with a head; use 'zero' or 'proto'")
            if model.out_features != ways:
                raise InputError(
                    f"this model's meta-learned head has {model.out_features} outputs but the task has "
                    f"{ways} classes; build the model for {ways} ways, or use head_init 'zero' or "
                    f"'proto' to serve any number of ways"
                )
            return model.head if self.adapt == "head" else model
        key = (id(model), ways)
        module = self._task_modules.get(key)
        if module is None:
            head = LinearHead(model.num_features, ways).to(next(model.parameters()).device)
            module = head if self.adapt == "head" else TrunkHead(model.trunk, head)
            self._task_modules[key] = module
        return module

    def _initial_params(
        self, model: TrunkHead, module: nn.Module, features: Callable[[], torch.Tensor],
        support_y: torch.Tensor, ways: int,
    ) -> list[torch.Tensor]:
        if self.head_init == "learned":
            return list(module.parameters())
        trunk_params = list(model.trunk.parameters()) if self.adapt == "all" else []
        like = next(model.parameters())
        feats = features() if self.head_init == "proto" else None
        head = initial_head_params(self.head_init, feats, support_y, ways, model.num_features, like)
        # Constant initialisations (zeros) must still be optimised by the inner loop: higher
        # leaves tensors that do not require grad untouched.
        head = [h if h.requires_grad else h.requires_grad_() for h in head]
        return trunk_params + head

    def make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """The torch optimizer whose differentiable twin runs the inner loop (one group per weight).

        Learned settings (Meta-SGD, MAML++) come through :meth:`InnerHooks.lr_override`.
        """
        cls, defaults = INNER_OPTIMIZERS[self.optimizer]
        kwargs = {**defaults, **self.optimizer_kwargs}
        groups = [{"params": [p]} for p in module.parameters()]
        return cls(groups, lr=self.lr, **kwargs)

    def param_names(self, module: nn.Module) -> list[str]:
        """Names of ``module``'s weights as in the model (``head.`` prefix for head-only)."""
        prefix = "head." if self.adapt == "head" else ""
        return [prefix + n for n, _ in module.named_parameters()]

    def forward(
        self, fmodel: nn.Module, params: Sequence[torch.Tensor], x: torch.Tensor,
        support_x: torch.Tensor | None, trunk: nn.Module | None,
    ) -> torch.Tensor:
        """Logits of query inputs ``x`` under the adapted weights, honouring ``bn_stats``."""
        if trunk is not None:  # head-only: weights of the trunk are the meta-weights
            return fmodel(self.features(trunk, x, support_x), params=params)
        if self.bn_stats == "support" and support_x is not None:
            with stats_from_first(support_x.shape[0]):
                return fmodel(torch.cat([support_x, x]), params=params)[support_x.shape[0]:]
        return fmodel(x, params=params)

    def features(self, trunk: nn.Module, x: torch.Tensor, support_x: torch.Tensor | None) -> torch.Tensor:
        if self.bn_stats == "support" and support_x is not None and x is not support_x:
            with stats_from_first(support_x.shape[0]):
                return trunk(torch.cat([support_x, x]))[support_x.shape[0]:]
        return trunk(x)

    def add_loss_terms(self, loss: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        """``loss`` plus every :attr:`loss_terms` entry (none while the model is in eval mode)."""
        if not self.loss_terms or not ctx.model.training:
            return loss
        for term in self.loss_terms:
            extra = term(ctx)
            if extra is not None:
                loss = loss + extra
        return loss

    # -- the inner loop -------------------------------------------------------------------------
    def adapt_task(
        self,
        model: TrunkHead,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        ways: int,
        create_graph: bool,
        steps: int | None = None,
        *,
        hooks: InnerHooks = NO_HOOKS,
        track_updates: bool = False,
    ) -> Adapted:
        """Adapt ``model`` to one task's support set.

        Args:
            create_graph: keep the unrolled optimisation differentiable (second order).
            steps: inner steps (default ``self.steps``).
            hooks: the algorithm's :class:`InnerHooks` (learned settings, per-step context).
            track_updates: without ``create_graph``, still record each update on the tape with
                the inner gradient as a constant (first order with learned inner LRs).
        """
        steps = self.steps if steps is None else steps
        module = self._module(model, ways)
        head_only = self.adapt == "head"
        trunk_features: torch.Tensor | None = None

        def support_features() -> torch.Tensor:
            nonlocal trunk_features
            if trunk_features is None:
                trunk_features = model.trunk(support_x)
            return trunk_features

        initial = self._initial_params(model, module, support_features, support_y, ways)
        if head_only:
            support_features()
            if not create_graph:
                # First order: the support features only feed the (detached) inner loop.
                trunk_features = trunk_features.detach()
        inputs = trunk_features if head_only else support_x
        on_tape = create_graph or track_updates
        # Meta-weights start the tape themselves; anything computed from them (a proto head) is
        # stood in for by a leaf, so inner gradients are partial derivatives (see Adapted.backward).
        start = [p if on_tape and p.grad_fn is None else p.detach().requires_grad_() for p in initial]
        names = self.param_names(module)
        grad_callback = _detach_grads if on_tape and not create_graph else None

        inner_losses: list[float] = []
        with torch.enable_grad(), higher.innerloop_ctx(
            module,
            self.make_optimizer(module),
            copy_initial_weights=False,
            track_higher_grads=on_tape,
        ) as (fmodel, diffopt):
            params = list(start)
            trajectory = [params]
            for step in range(steps):
                with hooks.step_context(step):
                    logits = fmodel(inputs, params=params)
                loss = task_loss(logits, support_y)
                inner_losses.append(float(loss.detach()))
                if self.loss_terms:
                    loss = self.add_loss_terms(loss, LossContext(
                        "support", logits, support_y, support_x, support_x, support_y, ways, model, step))
                params = diffopt.step(
                    loss, params=params, override=hooks.lr_override(names, step), grad_callback=grad_callback
                )
                trajectory.append(params)
        return Adapted(
            self, fmodel, params, initial, start, inner_losses, support_x,
            trunk=model.trunk if head_only else None, trajectory=trajectory, hooks=hooks, on_tape=on_tape,
        )
