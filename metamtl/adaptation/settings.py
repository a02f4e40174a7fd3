"""Inner-loop settings, the task loss and the loss-term interface."""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BAD_SETTING_ERRORS, ConfigError, setting_error_text, unknown_name
from ..models.heads import HEAD_INITS
from ..models.norm import BN_MODES
from .optim import INNER_OPTIMIZERS, higher_optimizers, torch_settings

ADAPT_MODES = ("all", "head")
#: how a second-order meta-gradient is computed (see :mod:`metamtl.adaptation.metagrad`):
#: ``full`` keeps the unrolled graph, ``checkpoint`` recomputes each step in the backward pass,
#: ``implicit`` is iMAML, ``auto`` lets the planner of :mod:`metamtl.memory` choose.
MEMORY_MODES = ("full", "checkpoint", "implicit", "auto")
#: ``core``: the functional engine (torch.func, task chunks); ``higher``: the ``higher`` engine.
#: ``auto`` and ``func`` (earlier names) mean ``core``.
BACKENDS = ("core", "higher", "auto", "func")
#: prefix of a ``torch.optim`` class's name in a config (``"torch.optim.Rprop"``)
TORCH_OPTIM = "torch.optim."


def torch_optimizer_class(name: str) -> type:
    """The ``torch.optim`` class a config names (``"torch.optim.Rprop"``)."""
    cls = getattr(torch.optim, name[len(TORCH_OPTIM):], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"inner optimizer {name!r} is not a torch.optim optimizer class: name one as "
                          "'torch.optim.<Class>' (backend 'higher'), or a core optimizer such as 'sgd' or 'adam'")
    return cls


def check_inner_optimizer(optimizer: Any, backend: str, lr: float, kwargs: dict) -> Any:
    """``optimizer`` (a core optimizer's name, or a ``torch.optim`` class or its name for backend
    ``higher``), checked with its settings: :class:`ConfigError` naming what would work."""
    if isinstance(optimizer, str) and optimizer.startswith(TORCH_OPTIM):
        optimizer = torch_optimizer_class(optimizer)  # a checkpoint's name for the class
    if backend == "higher" and kwargs.get("maximize"):
        raise ConfigError("inner optimizer_kwargs maximize: higher's differentiable optimizers ignore it (they "
                          "would descend the support loss anyway); use the default backend 'core', which ascends it")
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        torch_settings(optimizer, lr, kwargs)  # validates name and settings
        return optimizer
    if backend != "higher":
        raise ConfigError(
            f"a torch optimizer class ({optimizer.__name__}) runs on backend 'higher' only; the core "
            f"takes one of {sorted(INNER_OPTIMIZERS)} by name"
        )
    known = higher_optimizers()
    if optimizer not in known:
        raise ConfigError(
            f"higher has no differentiable version of {optimizer.__name__}: backend 'higher' takes one of "
            f"{sorted(c.__name__ for c in known)} (higher.register_optim adds your own), or use a core "
            f"optimizer by name, one of {sorted(INNER_OPTIMIZERS)}"
        )
    try:
        optimizer([torch.zeros(1, requires_grad=True)], lr=lr, **kwargs)
    except BAD_SETTING_ERRORS as exc:
        raise ConfigError(f"bad inner optimizer_kwargs {kwargs} for {optimizer.__name__}: {setting_error_text(exc)}") from None
    return optimizer


def check_higher_rmsprop(optimizer: Any, kwargs: dict, backend: str, first_order: bool) -> None:
    """Refuse second-order centered RMSprop on backend ``higher``: higher's differentiable version
    takes ``sqrt(square_avg - grad_avg^2)`` unmasked, so its meta-gradient is NaN wherever that is
    0 (e.g. exactly zero gradients); the core's RMSprop keeps it finite."""
    is_rmsprop = optimizer == "rmsprop" or optimizer is torch.optim.RMSprop
    if backend == "higher" and not first_order and is_rmsprop and kwargs.get("centered"):
        raise ConfigError("centered RMSprop gives NaN second-order meta-gradients on backend 'higher' (higher's "
                          "differentiable RMSprop has no safe square root): use backend 'core' (the same updates, "
                          "finite meta-gradients), first_order=True, or centered=False")


def is_class_labels(targets: torch.Tensor) -> bool:
    """Whether ``targets`` are class labels: a regression task's targets are always floats (checked
    by ``inputs.check_episode``), a classification task's any integer dtype (made int64 here)."""
    return not targets.dtype.is_floating_point


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels (any integer dtype), mean squared error for float targets."""
    if is_class_labels(targets):
        return F.cross_entropy(logits, targets.long())
    return F.mse_loss(logits, targets)


def batched_task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task :func:`task_loss` of ``[T, B, ...]`` logits: shape ``[T]``."""
    if is_class_labels(targets):
        t, b = targets.shape[:2]
        return F.cross_entropy(logits.reshape(t * b, -1), targets.reshape(-1).long(), reduction="none").view(t, b).mean(1)
    return F.mse_loss(logits, targets, reduction="none").flatten(1).mean(1)


def check_positive(name: str, value: float) -> float:
    """``value`` as a finite float > 0; a :class:`~metamtl.errors.ConfigError` otherwise (``True``
    included: a YAML ``yes`` is no number, though ``float(True)`` is 1.0)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number > 0, got {value!r} (a boolean: write the number itself)")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return v


@dataclasses.dataclass
class LossContext:
    """What a loss term sees: one task's forward pass during (or after) adaptation.

    Attributes:
        phase: ``"support"`` (inner loop, every step), ``"query"`` (the outer, meta loss) or
            ``"classes"`` (supervised pre-training over all training classes, the ``transfer``
            algorithm: ``logits``/``targets`` are over the dataset's classes, ``ways`` their number).
        logits: the model's output for ``inputs``.
        targets: labels (or regression targets) of ``inputs``.
        inputs: the model inputs behind ``logits`` (support or query images).
        support_x, support_y: the task's support set (e.g. for a teacher to adapt to).
        ways: number of classes of the task.
        model: the meta-model (its weights are the initialisation, not the adapted ones).
        step: inner step for ``"support"``, ``-1`` for ``"query"``.
        params: the adapted weights of this forward pass (``names`` order).
        names: their names in the model (``"trunk.blocks.0.0.weight"``, ``"head.weight"``).
        features: outputs of the layers loss terms asked for (a term's ``taps``), by layer name.
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
    params: Sequence[torch.Tensor] = ()
    names: Sequence[str] = ()
    features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


#: ``term(ctx) -> extra loss or None``; a term may list layer names in a ``taps`` attribute to get
#: their outputs in ``ctx.features``.  See :attr:`InnerLoop.loss_terms`.
LossTerm = Callable[[LossContext], "torch.Tensor | None"]


def term_taps(terms: Sequence[Any]) -> tuple[str, ...]:
    """Layer names the loss terms want outputs of (their ``taps`` attributes), in order, once."""
    out: list[str] = []
    for term in terms:
        for name in getattr(term, "taps", ()):
            if name not in out:
                out.append(name)
    return tuple(out)


@dataclasses.dataclass
class InnerLoop:
    """How a model adapts to a task: the settings of the inner loop.

    Args:
        steps: inner gradient steps at meta-training time.
        lr: inner learning rate.
        optimizer: one of :data:`~metamtl.adaptation.INNER_OPTIMIZERS` (``sgd``, ``momentum``,
            ``nesterov``, ``adam``, ``adamw``, ...); with ``backend="higher"`` also any
            ``torch.optim.Optimizer`` class that ``higher`` has a differentiable version of.
        optimizer_kwargs: extra settings of the torch optimizer (e.g. ``betas``).
        first_order: never keep the higher-order graph (FOMAML / Reptile).
        adapt: ``"all"`` parameters or only the ``"head"`` (ANIL).
        head_init: ``"learned"``, ``"zero"`` or ``"proto"`` (see :mod:`metamtl.models.heads`).
        eval_steps: inner steps at evaluation (default: ``steps``).
        bn_stats: ``"transductive"`` or ``"support"`` (see :mod:`metamtl.models.norm`).
        backend: ``"core"`` (default; ``"auto"``/``"func"`` are old names for it) or ``"higher"``.
        task_chunk: tasks adapted per ``vmap`` call by the core (``0``: one on CPU, all elsewhere;
            one where the model's training forward pass updates buffers or draws dropout masks).
        task_threads: CPU threads that meta-train chunks of tasks side by side, each with one
            intra-op thread (:mod:`metamtl.adaptation.threads`; the same meta-gradient, added in
            chunk order, so seeded runs repeat).  ``0`` (default): torch's thread count where it is
            safe (core engine on a CPU, a model whose training forward pass writes no shared
            state, no loss terms, ``memory: full``); ``1``: one chunk after another with all
            threads on each operation (the smallest memory: one chunk's graph at a time).
        memory: how the second-order meta-gradient is computed: ``"full"`` (the unrolled graph of
            every inner step is kept: memory grows with ``steps``), ``"checkpoint"`` (only each
            step's weights are kept and the step is recomputed in the backward pass: the same
            meta-gradient, memory of one step), ``"implicit"`` (iMAML: the inner objective gets the
            proximal term ``lam/2 ||w - w_0||^2`` and the meta-gradient comes from the implicit
            function theorem, conjugate gradient on Hessian-vector products: memory independent of
            ``steps``), ``"auto"`` (a planner picks the mode and task chunk that fit
            ``max_memory_mb``).  First-order rules ignore it.
        max_memory_mb: the memory a meta-iteration may add on top of what is in use before it
            (model, optimizer, data), in MiB; read by ``memory="auto"``.
        lam: iMAML's proximal strength ``lambda`` (``memory="implicit"``).
        cg_steps: conjugate-gradient iterations of the implicit meta-gradient.
    """

    steps: int = 1
    lr: float = 0.4
    optimizer: Any = "sgd"
    optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    first_order: bool = False
    adapt: str = "all"
    head_init: str = "learned"
    eval_steps: int | None = None
    bn_stats: str = "transductive"
    backend: str = "core"
    task_chunk: int = 0
    task_threads: int = 0
    memory: str = "full"
    max_memory_mb: float | None = None
    lam: float = 1.0
    cg_steps: int = 5

    def __new__(cls, *args: Any, **kwargs: Any) -> "InnerLoop":
        self = super().__new__(cls)
        #: names of the settings given to the constructor (the others are defaults): an algorithm
        #: that fixes a setting refuses an InnerLoop that sets it otherwise, and applies it if not
        self.explicit = frozenset([f.name for f in dataclasses.fields(cls)][:len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self) -> None:
        for name in ("steps", "eval_steps"):
            v = getattr(self, name)
            if (v is not None or name == "steps") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"inner {name} must be an integer >= 0, got {v!r}")
        self.lr = check_positive("inner lr", self.lr)
        if not isinstance(self.first_order, bool):
            raise ConfigError(f"inner first_order must be true or false, got {self.first_order!r}")
        if not isinstance(self.optimizer_kwargs, dict):
            raise ConfigError(f"inner optimizer_kwargs must be a mapping, got {self.optimizer_kwargs!r}")
        if self.backend not in BACKENDS:
            raise unknown_name("inner-loop backend", self.backend, BACKENDS[:2])
        if self.backend in ("auto", "func"):
            self.backend = "core"
        self.optimizer = check_inner_optimizer(self.optimizer, self.backend, self.lr, self.optimizer_kwargs)
        check_higher_rmsprop(self.optimizer, self.optimizer_kwargs, self.backend, self.first_order)
        if self.adapt not in ADAPT_MODES:
            raise unknown_name("adapt mode", self.adapt, ADAPT_MODES)
        if self.head_init not in HEAD_INITS:
            raise unknown_name("head initialisation", self.head_init, HEAD_INITS)
        if self.bn_stats not in BN_MODES:
            raise unknown_name("bn_stats mode", self.bn_stats, BN_MODES)
        for name, hint in (("task_chunk", "0: automatic"), ("task_threads", "0: automatic, 1: one chunk at a time")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0 ({hint}), got {v!r}")
        if self.memory not in MEMORY_MODES:
            raise unknown_name("memory mode", self.memory, MEMORY_MODES)
        if self.max_memory_mb is not None:
            self.max_memory_mb = check_positive("max_memory_mb", self.max_memory_mb)
        if self.memory == "auto" and self.max_memory_mb is None:
            raise ConfigError("memory 'auto' plans against a budget: set max_memory_mb (MiB a meta-iteration may "
                              "add on top of model, optimizer and data), or choose memory full/checkpoint/implicit")
        self.lam = check_positive("lam (iMAML proximal strength)", self.lam)
        if isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ConfigError(f"cg_steps must be an integer >= 1, got {self.cg_steps!r}")
        if self.memory != "full" and self.backend == "higher" and not self.first_order:
            raise ConfigError(
                f"memory {self.memory!r} recomputes or re-solves inner steps, which needs the core engine: the "
                "higher engine keeps optimizer state inside higher's differentiable optimizer. Use backend 'core' "
                "or memory 'full'"
            )
        #: extra loss terms (not part of the config): see :class:`LossContext`
        self.loss_terms: list[LossTerm] = []
        #: weight of the task's own loss in the phases where an attached loss term acts (e.g. 0.5 CE
        #: + 0.5 KL in born-again distillation; set by the Distillation callback, not part of the config)
        self.task_weight = 1.0

    def config(self) -> dict[str, Any]:
        """The settings; a ``torch.optim`` class as its name (``"torch.optim.Rprop"``), which a
        checkpoint can hold (any other class stays a class: checkpoints refuse it)."""
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        opt = self.optimizer
        if isinstance(opt, type) and getattr(torch.optim, opt.__name__, None) is opt:
            cfg["optimizer"] = TORCH_OPTIM + opt.__name__
        return cfg

    @property
    def evaluation_steps(self) -> int:
        return self.steps if self.eval_steps is None else self.eval_steps

    def add_loss_terms(self, loss: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        """``task_weight * loss`` plus every :attr:`loss_terms` entry (just ``loss`` while the model
        is in eval mode or no term is attached).  ``task_weight`` applies only in the phases where
        some term acts (a term's ``phases``; one without that attribute acts in every phase): terms
        on the query loss alone leave the inner (support) loss, hence the inner loop, as it is."""
        if not self.loss_terms or not ctx.model.training:
            return loss
        acts = any(ctx.phase in getattr(term, "phases", (ctx.phase,)) for term in self.loss_terms)
        if self.task_weight != 1.0 and acts:
            loss = loss * self.task_weight
        for term in self.loss_terms:
            extra = term(ctx)
            if extra is not None:
                loss = loss + extra
        return loss


# the constructor's signature is the dataclass's fields, not ``__new__``'s ``(*args, **kwargs)``:
# help() and the settings an algorithm accepts (:func:`metamtl.algorithms.registry.accepted_settings`)
InnerLoop.__signature__ = inspect.Signature(list(inspect.signature(InnerLoop.__init__).parameters.values())[1:])
