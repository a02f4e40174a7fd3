"""Multi-task strategies: turn several tasks' losses and gradients into one update.

A strategy is a small ``nn.Module`` (learnable weights are its parameters and running statistics
its buffers, so they are saved and resumed with whatever owns it) built for a fixed list of task
names.  Its one job is :meth:`Strategy.combine`::

    direction, weights = strategy.combine(losses [k], grads [k, P], tasks)

``losses`` are the (detached) losses of the ``k`` tasks present in this step, ``grads`` their
gradients with respect to the *shared* parameters, flattened, and ``tasks`` their indices in
``strategy.tasks``.  ``direction`` is scaled like a mean over tasks (``equal`` gives the plain
average); ``weights`` scale the gradients of task-specific parameters (heads, stems), which get
``weights[i] * g_i / k``.  Learnable strategies add the gradient of their own objective to their
parameters' ``.grad``, for the optimizer that steps the model to apply.

Strategies (``build_strategy(name, tasks, **settings)``):

* ``equal`` - every task weighted 1.
* ``uncertainty`` - homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018): minimise
  ``sum_i exp(-s_i) L_i + s_i`` over learnable log-variances ``s_i``; at the optimum
  ``exp(s_i) = L_i`` so task ``i`` is weighted ``1 / L_i``.
* ``gradnorm`` - GradNorm (Chen et al. 2018): learnable weights ``w_i`` (renormalised to sum to
  the number of tasks) move so that the weighted gradient norms ``G_i = w_i ||g_i||`` approach
  ``mean(G) * r_i ** alpha`` with ``r_i`` the task's relative inverse training rate
  ``(L_i / L_i(0)) / mean_j (L_j / L_j(0))``.  The norms are over all shared parameters (the
  per-task gradients are available anyway) rather than the last shared layer of the paper.
* ``dwa`` - Dynamic Weight Average (Liu, Johns & Davison 2019): ``w_i = K softmax(r_i / T)``
  with ``r_i`` the ratio of the task's mean loss over the last two periods of ``period`` steps
  (the paper's period is an epoch; meta-learning has none, so it is a number of steps).
* ``pcgrad`` - gradient surgery (Yu et al. 2020): each task's gradient loses its component along
  any other task's gradient it conflicts with (negative dot product), in random order.
* ``cagrad`` - conflict-averse gradient descent (Liu et al. 2021): the direction within
  ``c ||g0||`` of the mean gradient ``g0`` that maximises the worst task's improvement.

Two uses share :func:`apply_strategy`: the ``multitask`` meta-learning algorithm (one
meta-gradient per dataset, :mod:`metamtl.algorithms.multitask`) and ordinary multi-task training,
through :meth:`Strategy.backward`::

    strategy = build_strategy("pcgrad", ["depth", "segmentation"])
    optimizer.zero_grad()
    strategy.backward([loss_depth, loss_seg], model.parameters())
    optimizer.step()
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InputError, unknown_name, unknown_settings


def _setting(strategy: str, name: str, value: Any, low: float | None = None, integer: bool = False,
             above: bool = False) -> Any:
    """``value`` of setting ``name`` checked: a finite number (an integer with ``integer``), ``>= low``
    (``> low`` with ``above``; ``None``: any), else a :class:`ConfigError` saying what it must be."""
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    ok = math.isfinite(number) and (not integer or number == int(number))
    if ok and low is not None:
        ok = number > low if above else number >= low
    if not ok:
        what = ("an integer" if integer else "a finite number") + (
            "" if low is None else f" {'>' if above else '>='} {low:g}")
        raise ConfigError(f"{strategy} {name} must be {what}, got {value!r}; set algorithm.strategy.{name} "
                          "(or the strategy's settings) to one")
    return int(number) if integer else number


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


class Strategy(nn.Module):
    """Base class: equal weighting.  Subclasses override :meth:`weights` or :meth:`combine`.

    Args:
        tasks: task names (for meta-learning: the dataset labels), fixed at construction.
    """

    name: ClassVar[str] = "equal"
    #: whether the strategy acts on the gradients of parameters several tasks share (with none it
    #: would train exactly like ``equal``: :func:`apply_strategy` warns once)
    needs_shared: ClassVar[bool] = False
    #: which of the tasks of the current :meth:`combine` call have a finite loss with a graph
    #: (``None``: all; set by :func:`apply_strategy`); the others are absent from the strategy's own state
    present: list[bool] | None = None

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        tasks = [str(t) for t in tasks]
        if not tasks:
            raise ConfigError(f"strategy {self.name!r} needs the list of task (dataset) names")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"strategy task names must be distinct, got {tasks}")
        self.tasks = tasks
        self.last_metrics: dict[str, float] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def settings(self) -> dict[str, Any]:
        """Hyper-parameters (everything :func:`build_strategy` needs besides ``tasks``)."""
        return {}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings()}

    def extra_repr(self) -> str:
        return ", ".join([f"tasks={self.tasks}"] + [f"{k}={v!r}" for k, v in self.settings().items()])

    def index(self, names: Iterable[str]) -> list[int]:
        """Indices of task ``names`` (error naming the known tasks for an unknown one)."""
        out = []
        for n in names:
            if n not in self.tasks:
                raise InputError(
                    f"task {n!r} is not one of this {self.name} strategy's tasks {self.tasks}; "
                    "build the strategy (or the multitask algorithm's 'datasets') with every task name"
                )
            out.append(self.tasks.index(n))
        return out

    # -- the combination -------------------------------------------------------------------------
    def weights(self, losses: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Loss weights of the present tasks (``[k]``)."""
        return torch.ones(len(tasks), dtype=losses.dtype, device=losses.device)

    def combine(self, losses: torch.Tensor, grads: torch.Tensor, tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(direction [P], weights [k])`` for the present tasks (see the module docstring)."""
        w = self.weights(losses, tasks).to(grads)
        return (w.unsqueeze(1) * grads).sum(0) / len(tasks), w

    def _live(self, k: int) -> list[int]:
        """Positions, among the ``k`` tasks of this :meth:`combine`, of the tasks whose loss has a
        graph: a constant loss (a task with no labels in the batch) leaves the strategy's learnable
        weights and loss statistics as they were, like a task missing from the step."""
        return [i for i in range(k) if self.present is None or self.present[i]]

    def _accumulate(self, param: nn.Parameter, tasks: list[int], values: torch.Tensor) -> None:
        if not tasks:
            return
        g = torch.zeros_like(param)
        g[torch.as_tensor(tasks, device=g.device)] = values.to(g)
        _add_grad(param, g)

    # -- ordinary multi-task training ------------------------------------------------------------
    def backward(self, losses: Sequence[torch.Tensor] | dict[str, torch.Tensor],
                 params: Iterable[torch.Tensor]) -> dict[str, float]:
        """Combine the gradients of several task losses into ``.grad`` of ``params``.

        ``losses``: one scalar per task, in the order of :attr:`tasks`, or a dict by task name (a
        subset of the tasks is allowed).  Gradients are accumulated into ``.grad`` like
        ``loss.backward()``; the strategy's own parameters get theirs too, so pass them to the
        same optimizer.  Returns metrics (weights, gradient cosine, ...).
        """
        if isinstance(losses, dict):
            names, values = list(losses), list(losses.values())
        else:
            values = list(losses)
            if len(values) != self.num_tasks:
                raise InputError(f"got {len(values)} losses for {self.num_tasks} tasks {self.tasks}; "
                                 "pass one per task or a dict by task name")
            names = list(self.tasks)
        if isinstance(params, torch.Tensor):  # iterating one would give its rows, non-leaf slices: no gradient
            raise InputError(f"{self.name} strategy backward got one tensor as params; pass an iterable of "
                             "parameters, e.g. model.parameters() or [w]")
        params = list({id(p): p for p in params if p.requires_grad}.values())  # each once, as loss.backward()
        if not params:
            raise InputError(f"{self.name} strategy backward got no parameter that requires grad; pass the "
                             "model's trainable parameters (e.g. model.parameters() of a model that is not frozen)")
        values = _scalar_losses(values, names)
        # a loss without a graph (a constant, e.g. a task with no labelled example in the batch) depends
        # on no parameter: like a parameter a task does not use, it contributes no gradient
        grads = [torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) if v.requires_grad
                 else (None,) * len(params) for v in values]
        loss_values = torch.stack([v.detach() for v in values])
        return apply_strategy(self, loss_values, [list(g) for g in grads], params, names,
                              present=[bool(v.requires_grad) for v in values])


def _scalar_losses(values: list[Any], names: Sequence[str]) -> list[torch.Tensor]:
    """Task losses as scalar tensors; a Python number is a constant (graph-less) loss."""
    if not values:
        raise InputError("no task losses to combine; pass at least one (a list in task order or a dict by name)")
    like = next((v for v in values if isinstance(v, torch.Tensor)), None)
    out = []
    for name, v in zip(names, values):
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = torch.tensor(float(v), dtype=like.dtype if like is not None and like.is_floating_point() else None,
                             device=None if like is None else like.device)
        if not isinstance(v, torch.Tensor) or v.dim() != 0:
            got = f"shape {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise InputError(f"each task loss must be a scalar tensor (or a number), got {got} for task {name!r}")
        out.append(v)
    return out


def _warn_nothing_shared(strategy: Strategy) -> None:
    """Warn (once per strategy) that a strategy built on shared gradients has none to act on."""
    if not strategy.needs_shared or getattr(strategy, "_warned_nothing_shared", False):
        return
    strategy._warned_nothing_shared = True
    warnings.warn(
        f"multi-task strategy {strategy.name!r} found no parameter shared by two or more tasks (e.g. "
        "model.sharing: soft with per-dataset or per-task heads), so it has nothing to act on and trains "
        "exactly like 'equal'; share parameters (model.sharing: hard) or use a loss-weighting strategy "
        "(uncertainty, dwa)", RuntimeWarning, stacklevel=3)


def apply_strategy(strategy: Strategy, losses: torch.Tensor, grads: list[list[torch.Tensor | None]],
                   params: Sequence[torch.Tensor], names: Sequence[str],
                   present: Sequence[bool] | None = None) -> dict[str, float]:
    """:func:`_apply_strategy` with autocast off on the parameters' device: the strategies work on the
    gradients in their own precision (fp32), like the optimizer step, even inside a learner's bf16/fp16
    meta-step (PCGrad's and CAGrad's products ran in bfloat16 there)."""
    device = params[0].device.type if len(params) else "cpu"
    with torch.autocast(device, enabled=False):
        return _apply_strategy(strategy, losses, grads, params, names, present)


def _apply_strategy(strategy: Strategy, losses: torch.Tensor, grads: list[list[torch.Tensor | None]],
                    params: Sequence[torch.Tensor], names: Sequence[str],
                    present: Sequence[bool] | None = None) -> dict[str, float]:
    """Combine per-task gradients ``grads[i][j]`` (task ``i``, parameter ``j``; ``None``: unused).

    ``present[i]``: whether task ``i``'s loss has a graph (``None``: all do); an absent task
    still counts in the ``k`` of the scaling, but the strategy's state ignores it.  A task whose
    loss is not finite is absent as well.

    Parameters used by two or more tasks (all used parameters when there is one task) are
    *shared*: their flattened gradients go through :meth:`Strategy.combine`.  The others are
    task-specific and get ``weights[i] * g_i / k``.  Results are added to ``.grad``.
    """
    k = len(grads)
    tasks = strategy.index(names)
    used = [sum(g[j] is not None for g in grads) for j in range(len(params))]
    shared = [j for j, n in enumerate(used) if n >= 2 or (k == 1 and n == 1)]
    like = losses.new_zeros(())
    if shared:
        matrix = torch.stack([
            torch.cat([(g[j] if g[j] is not None else torch.zeros_like(params[j])).reshape(-1) for j in shared])
            for g in grads
        ])
    else:
        matrix = like.new_zeros(k, 0)
        if sum(any(x is not None for x in g) for g in grads) >= 2:  # two tasks with gradients share none
            _warn_nothing_shared(strategy)
    losses = losses.to(matrix)
    # a non-finite loss (an fp16 overflow whose step is skipped) must not become the strategy's
    # reference statistics (GradNorm's first losses, DWA's period means): that task is absent too
    live = torch.isfinite(losses).tolist()
    live_tasks = [bool(f) and (present is None or bool(p)) for f, p in zip(live, present or live)]
    strategy.present = live_tasks
    try:
        direction, weights = strategy.combine(losses, matrix, tasks)
    finally:
        strategy.present = None
    offset = 0
    for j in shared:
        n = params[j].numel()
        _add_grad(params[j], direction[offset:offset + n].view_as(params[j]))
        offset += n
    shared_set = set(shared)
    for j, p in enumerate(params):
        if j in shared_set:
            continue
        for i, g in enumerate(grads):
            if g[j] is not None:
                _add_grad(p, g[j] * (weights[i] / k))
    metrics = {f"mtl/weight/{n}": float(w) for n, w in zip(names, weights)}
    # over the tasks with a gradient (an absent task's zero row is no direction), as the strategy's state
    rows = matrix[[i for i, on in enumerate(live_tasks) if on]] if matrix.shape[1] else matrix
    rows = rows[rows.norm(dim=1) > 0]
    if rows.shape[0] >= 2:
        unit = rows / rows.norm(dim=1, keepdim=True)
        cos = unit @ unit.T
        metrics["mtl/grad_cosine"] = float(cos[~torch.eye(len(rows), dtype=torch.bool, device=cos.device)].mean())
    metrics.update(strategy.last_metrics)
    return metrics


class Equal(Strategy):
    """Every task weighted 1 (the direction is the mean of the task gradients)."""

    name = "equal"


class Uncertainty(Strategy):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018), learnable log-variances ``s``.

    The combined objective is ``(1/k) sum_i exp(-s_i) L_i + s_i``: the model gets weights
    ``exp(-s_i)`` and ``s_i`` gets ``(1 - exp(-s_i) L_i) / k`` (zero at ``exp(s_i) = L_i``).
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.init = _setting("uncertainty", "init", init)
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), self.init))

    def settings(self) -> dict[str, Any]:
        return {"init": self.init}

    def weights(self, losses: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        s = self.log_var.detach()[tasks].to(losses)
        w = torch.exp(-s)
        live = self._live(len(tasks))
        self._accumulate(self.log_var, [tasks[i] for i in live], ((1.0 - w * losses) / len(tasks))[live])
        self.last_metrics = {f"mtl/sigma2/{self.tasks[t]}": float(torch.exp(v)) for t, v in zip(tasks, s)}
        return w


class GradNorm(Strategy):
    """GradNorm (Chen et al. 2018): learnable weights balancing the tasks' gradient norms.

    Task losses must be >= 0 (the training rates divide by each task's first loss): a negative one
    is an :class:`InputError`.

    Args:
        alpha: strength of the pull towards equal training rates (the paper uses 0.12 - 3).
    """

    name = "gradnorm"
    needs_shared = True

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        self.alpha = _setting("gradnorm", "alpha", alpha, 0)
        self.weight = nn.Parameter(torch.ones(self.num_tasks))
        # each task's first loss; 0 = not seen yet (a NaN marker, as DWA once had, makes the meta-step's
        # finiteness check on buffers skip every step whose meta-batch lacks a task)
        self.register_buffer("initial_loss", torch.zeros(self.num_tasks))

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "initial_loss"  # checkpoints written before 0 replaced NaN as "not seen"
        if key in state_dict:
            state_dict[key] = torch.nan_to_num(state_dict[key], nan=0.0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_positive(self, losses: torch.Tensor, tasks: list[int]) -> None:
        """Training rates ``L_i / L_i(0)`` need losses >= 0 (a negative first loss made the rates
        about -1e12 and the targets NaN, freezing that task's weight)."""
        negative = [(self.tasks[t], float(v)) for t, v in zip(tasks, losses) if float(v) < 0]
        if negative:
            name, value = negative[0]
            raise InputError(
                f"gradnorm needs task losses >= 0 (its training rates are L / L(0)), got {value:.4g} for task "
                f"{name!r}; add a constant to that loss (e.g. a Gaussian NLL's) or use another strategy "
                "(equal, pcgrad, cagrad)")

    def combine(self, losses, grads, tasks):
        live = self._live(len(tasks))  # tasks whose loss has a graph: the others' weights stay
        self._check_positive(losses[live], [tasks[i] for i in live])
        with torch.no_grad():  # the paper renormalises after every update: sum(w) = number of tasks
            self.weight.clamp_(min=1e-3).mul_(self.num_tasks / self.weight.sum())
        w = self.weight.detach()[tasks].to(grads)
        norms = grads.norm(dim=1)
        g = w * norms
        if live:
            on = [tasks[i] for i in live]
            with torch.no_grad():
                idx = torch.as_tensor(on, device=self.initial_loss.device)
                first = self.initial_loss[idx] <= 0
                self.initial_loss[idx] = torch.where(first, losses[live].to(self.initial_loss), self.initial_loss[idx])
            rate = losses[live] / self.initial_loss[idx].to(losses).clamp_min(1e-12)
            target = g[live].mean() * (rate / rate.mean().clamp_min(1e-12)) ** self.alpha
            # d/dw_i of sum_i |w_i ||g_i|| - target_i| with the targets held constant
            self._accumulate(self.weight, on, torch.sign(g[live] - target) * norms[live])
        self.last_metrics = {f"mtl/grad_norm/{self.tasks[t]}": float(v) for t, v in zip(tasks, g)}
        return (w.unsqueeze(1) * grads).sum(0) / len(tasks), w


class DWA(Strategy):
    """Dynamic Weight Average (Liu et al. 2019): weights from the tasks' recent loss ratios.

    Args:
        temperature: softmax temperature ``T`` (2 in the paper).
        period: steps whose losses are averaged into one "epoch" of the paper.
    """

    name = "dwa"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, period: int = 20) -> None:
        super().__init__(tasks)
        self.temperature = _setting("dwa", "temperature", temperature, 0, above=True)
        self.period = _setting("dwa", "period", period, 1, integer=True)
        k = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(k, dtype=torch.float64))
        # mean losses of the last two periods; 0 = not seen yet (a NaN marker would make the
        # meta-step's finiteness check on buffers skip every step)
        self.register_buffer("history", torch.zeros((2, k), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "period": self.period}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "history"  # checkpoints written before 0 replaced NaN as "not seen"
        if key in state_dict:
            state_dict[key] = torch.nan_to_num(state_dict[key], nan=0.0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def current_weights(self) -> torch.Tensor:
        """Weights of every task for the next step: ``K softmax(r / T)`` over the tasks whose loss ratio
        is known (two periods seen, mean losses > 0), scaled by their number; 1 for the others (a task
        not seen yet, or never, leaves the weighting of the others on)."""
        known = (self.history > 0).all(0)
        w = torch.ones(self.num_tasks, dtype=torch.float64, device=self.history.device)
        if bool(known.any()):
            ratio = self.history[1][known] / self.history[0][known]
            w[known] = int(known.sum()) * torch.softmax(ratio / self.temperature, 0)
        return w

    def weights(self, losses, tasks):
        w = self.current_weights()[tasks].to(losses)
        live = self._live(len(tasks))  # a constant loss is no loss of that period
        with torch.no_grad():
            if live:
                idx = torch.as_tensor([tasks[i] for i in live], device=self.loss_sum.device)
                self.loss_sum[idx] += losses[live].to(self.loss_sum)
                self.loss_count[idx] += 1
            self.steps += 1
            if int(self.steps) % self.period == 0:
                seen = self.loss_count > 0
                mean = torch.where(seen, self.loss_sum / self.loss_count.clamp_min(1), self.history[1])
                self.history.copy_(torch.stack([self.history[1], mean]))
                self.loss_sum.zero_()
                self.loss_count.zero_()
        return w


class PCGrad(Strategy):
    """Projecting conflicting gradients (Yu et al. 2020).

    For each task ``i`` and every other task ``j`` in random order: if ``g_i . g_j < 0``, remove
    from ``g_i`` its component along ``g_j`` (the original ``g_j``).  The direction is the mean of
    the projected gradients.  The order uses torch's global RNG, which checkpoints save.
    """

    name = "pcgrad"
    needs_shared = True

    def combine(self, losses, grads, tasks):
        k = len(tasks)
        out = grads.clone()
        sq = (grads * grads).sum(1)
        conflicts = 0
        for i in range(k):
            for j in torch.randperm(k).tolist():
                if j == i:
                    continue
                dot = out[i] @ grads[j]
                if dot < 0 and sq[j] > 0:
                    out[i] -= (dot / sq[j]) * grads[j]
                    conflicts += 1
        self.last_metrics = {"mtl/conflicts": float(conflicts)}
        return out.mean(0), torch.ones(k, dtype=grads.dtype, device=grads.device)


class CAGrad(Strategy):
    """Conflict-averse gradient descent (Liu et al. 2021).

    Finds ``w`` on the simplex minimising ``g_w . g0 + c ||g0|| ||g_w||`` (``g_w = sum_i w_i g_i``,
    ``g0`` the mean gradient) and returns ``d = g0 + c ||g0|| g_w / ||g_w||`` (divided by
    ``1 + c^2`` with ``rescale=1`` as in the paper's code, ``1 + c`` with 2, unscaled with 0).  ``d``
    maximises ``min_i g_i . d`` over the ball ``||d - g0|| <= c ||g0||``.  Only the tasks whose loss
    has a graph and is finite take part (``g0`` is their mean, and ``d`` is scaled by their share of
    the ``k`` tasks, like a mean over all of them); ``g_w = 0`` (up to the solver's residual) gives
    ``d = g0``, as in the paper's code.

    Args:
        c: radius of the ball, relative to ``||g0||`` (0: plain average).
        rescale: 0, 1 or 2, see above.
        iterations: steps of the simplex solver (a ``k``-dimensional convex problem).
    """

    name = "cagrad"
    needs_shared = True
    #: ``||g_w||`` below this fraction of ``||g0||`` counts as 0 (the solver's residual)
    gw_tolerance: ClassVar[float] = 1e-4

    def __init__(self, tasks: Sequence[str], c: float = 0.4, rescale: int = 1, iterations: int = 100) -> None:
        super().__init__(tasks)
        self.c = _setting("cagrad", "c", c, 0)
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ConfigError(f"cagrad rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)
        # 0 solver steps would silently give uniform weights (plain averaging)
        self.iterations = _setting("cagrad", "iterations", iterations, 1, integer=True)

    def settings(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale, "iterations": self.iterations}

    def simplex_weights(self, gram: torch.Tensor) -> torch.Tensor:
        """``argmin_w w.G.1/k + c ||g0|| sqrt(w.G.w)`` over the simplex (``G`` the Gram matrix)."""
        k = gram.shape[0]
        gram = gram.detach().double()
        radius = self.c * float(gram.mean().clamp_min(0).sqrt())
        mean_dir = gram.mean(1)
        if k == 2:  # one variable: golden-section search on w = (t, 1 - t)
            (a, b), (_, d) = gram.tolist()
            m0, m1 = mean_dir.tolist()

            def f(t: float) -> float:
                u = 1.0 - t
                return t * m0 + u * m1 + radius * math.sqrt(max(t * t * a + 2 * t * u * b + u * u * d, 0.0) + 1e-12)

            lo, hi, phi = 0.0, 1.0, (math.sqrt(5) - 1) / 2
            for _ in range(self.iterations):
                x1, x2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
                lo, hi = (lo, x2) if f(x1) <= f(x2) else (x1, hi)
            t = (lo + hi) / 2
            return torch.tensor([t, 1.0 - t], dtype=torch.float64)
        z = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=self.iterations, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-14)

        def objective() -> torch.Tensor:
            opt.zero_grad()
            w = torch.softmax(z, 0)
            f = w @ mean_dir + radius * torch.sqrt(w @ gram @ w + 1e-12)
            f.backward()
            return f

        with torch.enable_grad():
            opt.step(objective)
        return torch.softmax(z.detach(), 0)

    def combine(self, losses, grads, tasks):
        k = len(tasks)
        ones = torch.ones(k, dtype=grads.dtype, device=grads.device)
        live = self._live(k)  # absent tasks (constant or non-finite losses) take no part in the solve
        self.last_metrics = {}  # no solve, no weights: not the previous step's
        if len(live) <= 1 or self.c == 0 or grads.shape[1] == 0:
            return grads[live].sum(0) / k, ones
        rows = grads[live]
        g0 = rows.mean(0)
        w = self.simplex_weights(rows.double() @ rows.double().T).to(grads)
        gw = w @ rows
        d = g0
        # ||g_w|| ~ 0: the exact minimiser is g_w = 0 (0 in the tasks' hull), whose term is 0 in the
        # paper's code (lmbda * g_w); normalising the solver's residual would point anywhere
        if gw.norm() > self.gw_tolerance * g0.norm():
            d = g0 + self.c * g0.norm() * gw / gw.norm()
        weights = torch.zeros(k, dtype=grads.dtype, device=grads.device)
        weights[live] = w
        self.last_metrics = {f"mtl/cagrad_w/{self.tasks[t]}": float(v) for t, v in zip(tasks, weights)}
        scale = {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        return d * (len(live) / k) / scale, ones  # scaled like a mean over all k tasks


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Equal, Uncertainty, GradNorm, DWA, PCGrad, CAGrad)
}


def build_strategy(spec: str | dict[str, Any] | Strategy, tasks: Sequence[str], **settings: Any) -> Strategy:
    """A strategy from its name and settings (``build_strategy("dwa", tasks, temperature=2)``) or its config dict
    (``{"name": "dwa", "temperature": 2}``)."""
    if settings and not isinstance(spec, str):
        raise ConfigError(f"build_strategy takes keyword settings {sorted(settings)} only with a strategy name, got "
                          f"a {type(spec).__name__}: put them in its config dict, or pass the name")
    if isinstance(spec, Strategy):
        if list(spec.tasks) != [str(t) for t in tasks]:
            raise ConfigError(f"strategy was built for tasks {spec.tasks}, expected {list(tasks)}")
        return spec
    if "name" in settings:
        raise ConfigError(f"build_strategy got the strategy name twice ({spec!r} and name={settings['name']!r}); "
                          "name is not a setting: pass it once, as the first argument")
    if isinstance(spec, str):
        spec = {"name": spec, **settings}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"a multi-task strategy is a name or a mapping with a 'name', got {spec!r}")
    settings = dict(spec)
    name = settings.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"a multi-task strategy name is a string (one of {', '.join(sorted(STRATEGIES))}), "
                          f"got {name!r}")
    if name not in STRATEGIES:
        raise unknown_name("multi-task strategy", name, STRATEGIES)
    error = unknown_settings(f"multi-task strategy {name!r}", settings,
                             set(inspect.signature(STRATEGIES[name]).parameters) - {"tasks"})
    if error is not None:
        raise error
    try:
        return STRATEGIES[name](list(tasks), **settings)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad settings for multi-task strategy {name!r}: {exc}") from None
