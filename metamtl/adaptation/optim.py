"""Functional, differentiable inner optimizers (the TorchOpt style: explicit state, no mutation).

An :class:`InnerOptimizer` is a pair of pure functions::

    state = opt.init(params)                                  # list of tensors
    params, state = opt.update(params, grads, state, lrs, k)  # inner step k = 0, 1, ...

``params``/``grads`` are lists of tensors (any leading dimensions: the core adapts a chunk of
tasks at once, ``[T, ...]``), ``state`` is a flat list of tensors (momentum buffers, moment
estimates; flat so a memory mode can save or recompute it like the weights), ``lrs`` holds one
learning rate per tensor: a float or a tensor that broadcasts against it and may require grad
(Meta-SGD's per-element rates, MAML++'s per-layer-per-step rates are just tensors passed in).
Nothing is updated in place, so every output is a differentiable function of every input: with
``create_graph=True`` gradients the unrolled loop is second order; with detached gradients the
update itself still stays on the tape (first order with learned rates).  The step index ``k`` is
explicit (Adam's bias correction uses ``k + 1``).

Each optimizer computes the update of the ``torch.optim`` class of the same name with the same
settings (tests step both side by side), and of ``higher``'s differentiable version of it: Adam and
AdamW add ``eps`` to ``sqrt(v)`` before the bias correction, as higher does (torch.optim adds it
after; the two agree up to the size of ``eps``).  Settings are validated by building the torch class.
A gradient of ``None`` (a weight the loss does not use) leaves the weight and its state unchanged.
Square roots of second-moment estimates are taken with a zero gradient where the estimate is
exactly zero (``higher`` masks the same places), so second-order gradients never see ``inf * 0``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import higher
import torch

from ..errors import BAD_SETTING_ERRORS, ConfigError, setting_error_text, unknown_name

Tensors = Sequence[torch.Tensor]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose gradient is 0 (not ``inf``) where ``x == 0``.

    ``x`` is clamped to the smallest normal number first (a value change below 1e-19 in float32,
    and none where ``x`` is larger), and the clamp passes no gradient where it is active."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _step(p: torch.Tensor, lr: Any, direction: torch.Tensor) -> torch.Tensor:
    """``p - lr * direction`` (one fused op for a float rate)."""
    return p.sub(direction, alpha=lr) if isinstance(lr, float) else p - lr * direction


def _steps(params: list[torch.Tensor], lrs: list[Any], directions: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_step` of every weight, the same values in one or two ``torch._foreach_*`` calls
    where the rates allow (one float rate for all, or a tensor rate per weight)."""
    if all(isinstance(lr, float) for lr in lrs) and len(set(lrs)) == 1:
        return list(torch._foreach_add(params, directions, alpha=-lrs[0]))
    if all(isinstance(lr, torch.Tensor) for lr in lrs):
        return list(torch._foreach_sub(params, torch._foreach_mul(directions, lrs)))
    return [_step(p, lr, d) for p, lr, d in zip(params, lrs, directions)]


class InnerOptimizer:
    """Base class: subclasses write ``slots`` (state tensors per weight) and ``rule``.

    Args:
        settings: the hyper-parameters of the ``torch.optim`` class (``lr`` excluded: learning
            rates are passed to :meth:`update`).
    """

    name: ClassVar[str] = "base"
    torch_class: ClassVar[type[torch.optim.Optimizer]]
    #: state tensors kept per weight (each starts as zeros of the weight's shape, or ``fill``)
    slots: ClassVar[tuple[str, ...]] = ()
    #: settings the rule ignores (implementation choices of torch.optim, not mathematics)
    IGNORED: ClassVar[tuple[str, ...]] = ("foreach", "fused", "capturable", "differentiable", "lr")

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def __getattr__(self, key: str) -> Any:
        settings = self.__dict__.get("settings", {})
        if key in settings:
            return settings[key]
        raise AttributeError(key)

    def fill(self, slot: str) -> float:
        return 0.0

    def init(self, params: Tensors) -> list[torch.Tensor]:
        """Zero (or initial) state for ``params``: ``len(slots)`` tensors per weight, weight-major."""
        return [torch.full_like(p, self.fill(s), memory_format=torch.preserve_format)
                for p in params for s in self.slots]

    def update(self, params: Tensors, grads: Sequence[torch.Tensor | None], state: Tensors,
               lrs: Sequence[Any], step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One step from ``params`` with ``grads``: ``(new params, new state)``."""
        if params and all(g is not None for g in grads) and not self.settings.get("maximize") and self.fused():
            # every weight at once: the same values in a few torch._foreach_* calls instead of
            # several ops per weight (inner steps are many small ops, each also in the backward)
            return self.rule_all(list(params), list(grads), list(state), list(lrs), step)
        n = len(self.slots)
        new_params, new_state = [], []
        for i, (p, g, lr) in enumerate(zip(params, grads, lrs)):
            slots = list(state[i * n:(i + 1) * n])
            if g is not None:
                if self.settings.get("maximize"):
                    g = -g
                p, slots = self.rule(p, g, slots, lr, step)
            new_params.append(p)
            new_state += slots
        return new_params, new_state

    def rule(self, p: torch.Tensor, g: torch.Tensor, slots: list[torch.Tensor], lr: Any,
             step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def fused(self) -> bool:
        """Whether :meth:`rule_all` applies with these settings (default: there is none)."""
        return False

    def rule_all(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: list[torch.Tensor],
                 lrs: list[Any], step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`rule` of every weight at once (with ``torch._foreach_*`` ops), where :meth:`fused`."""
        raise NotImplementedError


class SGD(InnerOptimizer):
    """``torch.optim.SGD``: weight decay, momentum (first buffer = gradient), dampening, Nesterov."""

    name = "sgd"
    torch_class = torch.optim.SGD

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.slots = ("momentum_buffer",) if settings.get("momentum", 0) else ()

    def rule(self, p, g, slots, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = g if step == 0 else slots[0] * self.momentum + (1 - self.dampening) * g
            slots = [buf]
            g = g + self.momentum * buf if self.nesterov else buf
        return _step(p, lr, g), slots

    def fused(self):
        return not self.weight_decay and not self.momentum

    def rule_all(self, params, grads, state, lrs, step):
        return _steps(params, lrs, grads), []


class Adam(InnerOptimizer):
    """``torch.optim.Adam`` / ``AdamW`` (decoupled weight decay), with ``amsgrad``."""

    name = "adam"
    torch_class = torch.optim.Adam

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.slots = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if settings.get("amsgrad") else ())

    def rule(self, p, g, slots, lr, step):
        beta1, beta2 = self.betas
        if self.weight_decay:
            if self.decoupled_weight_decay:
                p = p * (1 - lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        m = torch.lerp(slots[0], g, 1 - beta1)  # beta1 m + (1 - beta1) g
        v = torch.lerp(slots[1], g * g, 1 - beta2)
        out = [m, v]
        if self.amsgrad:
            v = torch.maximum(slots[2], v) if step else v
            out.append(v)
        t = step + 1
        # eps is added before the bias correction, as in higher's differentiable Adam (and torch.optim
        # before 1.6); torch.optim now adds it after: the same update up to the size of eps.
        step_size = lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t)
        return _step(p, step_size, m / (safe_sqrt(v) + self.eps)), out

    def fused(self):
        return not self.weight_decay and not self.amsgrad

    def rule_all(self, params, grads, state, lrs, step):
        beta1, beta2 = self.betas
        m = torch._foreach_lerp(state[0::2], grads, 1 - beta1)
        v = torch._foreach_lerp(state[1::2], torch._foreach_mul(grads, grads), 1 - beta2)
        root = torch._foreach_sqrt(torch._foreach_clamp_min(v, torch.finfo(v[0].dtype).tiny))  # safe_sqrt
        t = step + 1
        sizes = [lr * (1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t) for lr in lrs]
        directions = torch._foreach_div(m, torch._foreach_add(root, self.eps))
        return _steps(params, sizes, list(directions)), [s for pair in zip(m, v) for s in pair]


class AdamW(Adam):
    name = "adamw"
    torch_class = torch.optim.AdamW


class RMSprop(InnerOptimizer):
    """``torch.optim.RMSprop`` (centered and momentum variants)."""

    name = "rmsprop"
    torch_class = torch.optim.RMSprop

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.slots = (("square_avg",) + (("momentum_buffer",) if settings.get("momentum") else ())
                      + (("grad_avg",) if settings.get("centered") else ()))

    def rule(self, p, g, slots, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        a = self.alpha
        sq = slots[0] * a + (1 - a) * g * g
        out = [sq]
        if self.centered:
            ga = slots[-1] * a + (1 - a) * g
            avg = safe_sqrt(sq - ga * ga) + self.eps
        else:
            avg = safe_sqrt(sq) + self.eps
        if self.momentum:
            buf = slots[1] * self.momentum + g / avg
            out.append(buf)
            p = _step(p, lr, buf)
        else:
            p = _step(p, lr, g / avg)
        if self.centered:
            out.append(ga)
        return p, out


class Adagrad(InnerOptimizer):
    """``torch.optim.Adagrad`` (``lr_decay``, ``initial_accumulator_value``)."""

    name = "adagrad"
    torch_class = torch.optim.Adagrad
    slots = ("sum",)

    def fill(self, slot: str) -> float:
        return float(self.initial_accumulator_value)

    def rule(self, p, g, slots, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        clr = lr / (1 + step * self.lr_decay)
        total = slots[0] + g * g
        return _step(p, clr, g / (safe_sqrt(total) + self.eps)), [total]


class Adadelta(InnerOptimizer):
    """``torch.optim.Adadelta``."""

    name = "adadelta"
    torch_class = torch.optim.Adadelta
    slots = ("square_avg", "acc_delta")

    def rule(self, p, g, slots, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        rho, eps = self.rho, self.eps
        sq = slots[0] * rho + (1 - rho) * g * g
        delta = (slots[1] + eps).sqrt() / (sq + eps).sqrt() * g
        acc = slots[1] * rho + (1 - rho) * delta * delta
        return _step(p, lr, delta), [sq, acc]


class Adamax(InnerOptimizer):
    """``torch.optim.Adamax``."""

    name = "adamax"
    torch_class = torch.optim.Adamax
    slots = ("exp_avg", "exp_inf")

    def rule(self, p, g, slots, lr, step):
        beta1, beta2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        m = slots[0] * beta1 + (1 - beta1) * g
        u = torch.maximum(slots[1] * beta2, g.abs() + self.eps)
        return _step(p, lr / (1 - beta1 ** (step + 1)), m / u), [m, u]


#: name -> (optimizer class, settings that differ from the torch class's defaults)
INNER_OPTIMIZERS: dict[str, tuple[type[InnerOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (Adam, {}),
    "adamw": (AdamW, {}),
    "rmsprop": (RMSprop, {}),
    "adagrad": (Adagrad, {}),
    "adadelta": (Adadelta, {}),
    "adamax": (Adamax, {}),
}


def torch_settings(name: str, lr: float, kwargs: dict[str, Any]) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The ``torch.optim`` class of inner optimizer ``name`` and its full settings (validated)."""
    if not isinstance(name, str) or name not in INNER_OPTIMIZERS:
        raise unknown_name("inner optimizer", name, INNER_OPTIMIZERS)
    cls, defaults = INNER_OPTIMIZERS[name]
    try:
        probe = cls.torch_class([torch.zeros(1, requires_grad=True)], lr=lr, **{**defaults, **kwargs})
    except BAD_SETTING_ERRORS as exc:
        raise ConfigError(f"bad inner optimizer_kwargs {kwargs} for {name!r}: {setting_error_text(exc)}") from None
    return cls.torch_class, dict(probe.defaults)


def build_optimizer(name: str, lr: float, kwargs: dict[str, Any]) -> InnerOptimizer:
    """The functional optimizer ``name`` with ``kwargs`` (validated by the torch class)."""
    cls = INNER_OPTIMIZERS[name][0] if name in INNER_OPTIMIZERS else None
    _, settings = torch_settings(name, lr, kwargs)
    settings = {k: v for k, v in settings.items() if k not in InnerOptimizer.IGNORED}
    return cls(**settings)  # type: ignore[misc]


__all__ = ["INNER_OPTIMIZERS", "InnerOptimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax",
           "build_optimizer", "higher_class", "higher_optimizers", "safe_sqrt", "torch_settings"]


class _AdamW(higher.optim.DifferentiableAdam):
    """``higher`` has no AdamW: Adam with decoupled weight decay, written like higher's Adam."""

    def _update(self, grouped_grads, **kwargs):
        for group in self.param_groups:
            wd, group["weight_decay"] = group["weight_decay"], 0
            group["params"] = [p * (1 - group["lr"] * wd) if wd else p for p in group["params"]]
            group["_wd"] = wd
        super()._update(grouped_grads, **kwargs)
        for group in self.param_groups:
            group["weight_decay"] = group.pop("_wd")


if torch.optim.AdamW not in higher.optim._opt_mapping:
    higher.register_optim(torch.optim.AdamW, _AdamW)


def higher_class(cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The ``torch.optim`` class and settings to hand ``higher`` for ``cls(**kwargs)``: higher's
    differentiable Adam never reads ``decoupled_weight_decay`` (it would run L2 weight decay), so
    Adam with it becomes AdamW, which it is (Adam's weight decay default 0 kept)."""
    if cls is torch.optim.Adam and kwargs.get("decoupled_weight_decay"):
        kwargs = {k: v for k, v in kwargs.items() if k != "decoupled_weight_decay"}
        return torch.optim.AdamW, {"weight_decay": 0.0, **kwargs}
    return cls, kwargs


def higher_optimizers() -> tuple[type, ...]:
    """The ``torch.optim`` classes ``higher`` has a differentiable version of (``higher.register_optim``
    adds more)."""
    return tuple(higher.optim._opt_mapping)


#: ``torch.optim`` classes whose differentiable ``higher`` version reads ``lr`` as one Python number
#: (``Rprop`` fills its step sizes with it, ``ASGD`` turns it into a float): no learned inner rates
SCALAR_LR_OPTIMIZERS: tuple[type, ...] = (torch.optim.Rprop, torch.optim.ASGD)


def check_learnable_rates(algorithm: str, optimizer: Any) -> None:
    """:class:`ConfigError` when the inner ``optimizer`` (a ``torch.optim`` class on backend
    higher) cannot take the learned rates ``algorithm`` hands it."""
    if isinstance(optimizer, type) and issubclass(optimizer, SCALAR_LR_OPTIMIZERS):
        raise ConfigError(
            f"{algorithm} learns its inner learning rates (tensors), but higher's {optimizer.__name__} takes its lr "
            "as one Python number only, so the rates would fail or not learn; use another inner optimizer (e.g. sgd, "
            "adam, or torch.optim.SGD/Adam on backend higher)"
            + ("" if algorithm != "mamlpp" else ", or learn_lr: false"))
