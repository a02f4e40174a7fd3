"""The inner loop, once: an :class:`InnerProblem` (what adapts, from where, on what) and its unroll.

See the package docstring (:mod:`metamtl.adaptation`) for the whole picture.  Two engines execute
the same problem: :class:`CoreEngine` (``torch.func.functional_call`` + the functional
optimizers of :mod:`~metamtl.adaptation.optim`, a chunk of tasks at once with ``vmap``) and
:class:`HigherEngine` (``higher``'s patched module and differentiable optimizers, one task at a
time: the reference the core is tested against).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Iterator, Sequence

import higher
import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError, InputError
from ..models.backbones import TrunkHead
from ..models.heads import LinearHead, initial_head_params
from ..models.norm import support_rows, torch_batch_norms
from .optim import INNER_OPTIMIZERS, InnerOptimizer, build_optimizer, higher_class, torch_settings
from .settings import InnerLoop, LossContext, batched_task_loss, term_taps

Tensors = list[torch.Tensor]


# -- small tensor helpers ---------------------------------------------------------------------
def map_tasks(fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """``stack([fn([p[t] for p in params], *[x[t] for x in xs]) for t])``, vmapped over tasks ``t``."""
    if xs[0].shape[0] == 1:  # one task: a plain call (no vmap overhead; hooks see real tensors)
        # squeeze, not [0]: its backward is a view, where select's allocates and fills a copy
        return fn([p.squeeze(0) for p in params], *[x.squeeze(0) for x in xs]).unsqueeze(0)
    return vmap(fn)(list(params), *xs)


def nhwc_per_task(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, O, I, kh, kw]`` with every ``x[t]`` in channels-last layout (same values)."""
    y = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if y.stride(2) != 1:  # one input channel: the stride of a size-1 dim is free, say NHWC
        stride = list(y.stride())
        stride[2] = 1
        y = y.as_strided(y.shape, stride)
    return y


def _is_nhwc(p: torch.Tensor) -> bool:
    return p.dim() == 5 and p.shape[-1] * p.shape[-2] > 1 and p.stride(2) == 1


@contextlib.contextmanager
def tap_outputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``module``'s sub-modules ``names`` during the block (local hooks)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            layers = [n for n, _ in module.named_modules() if n]
            raise InputError(f"the model has no layer {name!r}; its layers are: {', '.join(layers[:40])}") from None
        handles.append(layer.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


# -- what adapts ---------------------------------------------------------------------------------
_TASK_MODULES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def _template_head(model: nn.Module, ways: int) -> LinearHead:
    """A zero ``ways``-way head on the model's device and dtype, built without drawing random
    numbers: a shape template (its weights always come from the inner loop), so building it in a
    fit, a predict or a worker thread leaves the global generator (dropout masks, resume) alone."""
    like = next(model.parameters())
    with torch.device("meta"):
        head = LinearHead(model.num_features, ways)
    head = head.to_empty(device=like.device).to(like.dtype)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return head.requires_grad_(False)


def task_module(model: TrunkHead, ways: int, adapt: str, head_init: str) -> nn.Module:
    """The module whose weights adapt for a ``ways``-way task (it shares the model's trunk).

    The model itself (``adapt="all"``, learned head), its head (``"head"``), or for per-task
    heads a :class:`TrunkHead` / :class:`LinearHead` with a fresh ``ways``-way head whose
    weights the inner loop supplies.
    """
    if head_init == "learned":
        if model.head is None:
            raise ConfigError("head_init='learned' needs a model with a head; use 'zero' or 'proto'")
        if model.out_features != ways:
            raise InputError(
                f"this model's meta-learned head has {model.out_features} outputs but the task has "
                f"{ways} classes; build the model for {ways} ways, or use head_init 'zero' or "
                f"'proto' to serve any number of ways"
            )
        return model.head if adapt == "head" else model
    cache = _TASK_MODULES.setdefault(model, {})
    key = (ways, adapt)
    if key not in cache or (adapt != "head" and cache[key].trunk is not model.trunk):  # a replaced trunk: rebuilt
        head = _template_head(model, ways)
        cache[key] = head if adapt == "head" else TrunkHead(model.trunk, head)
    return cache[key]


@dataclasses.dataclass
class InnerView:
    """One inner step as the inner objective sees it (every tensor has a leading task dimension).

    ``loss`` is the task loss ``[T]`` of ``logits`` on the support set; ``params`` the weights
    being adapted (after ``step`` updates); ``features`` the outputs of tapped layers; ``anchor``
    the weights the inner loop started from (the centre of a proximal term, as in iMAML).
    """

    problem: "InnerProblem"
    step: int
    params: Tensors
    logits: torch.Tensor
    loss: torch.Tensor
    features: dict[str, torch.Tensor]
    anchor: Tensors = dataclasses.field(default_factory=list)


def add_loss_terms(problem: "InnerProblem", phase: str, loss: torch.Tensor, logits: torch.Tensor,
                   targets: torch.Tensor, inputs: torch.Tensor, params: Tensors,
                   features: dict[str, torch.Tensor], step: int = -1) -> torch.Tensor:
    """``loss [T]`` plus the settings' loss terms of each task (none while the model is in eval mode)."""
    settings = problem.settings
    if not settings.loss_terms or not problem.training:
        return loss
    out = []
    for t in range(loss.shape[0]):  # loss terms see one task at a time (Algorithm.sequential_tasks: one task per chunk)
        sx, sy = problem.task(t)
        ctx = LossContext(phase, logits[t], targets[t], sx if inputs is problem.support_x else inputs[t], sx, sy,
                          problem.ways, problem.model, step, [p[t] for p in params], problem.model_names,
                          features)
        out.append(settings.add_loss_terms(loss[t], ctx))
    return torch.stack(out)


def default_objective(view: InnerView) -> torch.Tensor:
    """Task loss plus the loss terms (phase ``"support"``): the inner objective of every built-in."""
    p = view.problem
    return add_loss_terms(p, "support", view.loss, view.logits, p.support_y, p.support_x, view.params,
                          view.features, view.step)


class InnerProblem:
    """A chunk of ``T`` tasks ready to adapt: every input of the inner loop, explicitly.

    Built by :func:`build_problem`.  Attributes:
        names: the adapted weights, named as in :attr:`module`; :attr:`model_names` as in the model.
        initial: their initial values ``[T, ...]``, connected to the meta-parameters (the
            meta-weights expanded over tasks, or per-task heads computed from the support set).
        inputs: what the inner loop's forward passes read: support images, or support features
            for head-only adaptation (then connected to the trunk).
        lrs: ``lrs(k) -> [rate per weight]`` for inner step ``k`` (floats or tensors).
        tensors: ``tensors(k) -> {name: tensor}``: what the forward pass with weights after ``k``
            updates is handed besides the adapted weights (per-step BatchNorm sets, support rows).
        objective: ``objective(InnerView) -> [T]``: the inner objective.
    """

    def __init__(self, *, settings: InnerLoop, engine: "Engine", model: TrunkHead, module: nn.Module,
                 names: list[str], model_names: list[str], initial: Tensors, support_x: torch.Tensor,
                 support_y: torch.Tensor, ways: int, inputs: torch.Tensor, steps: int,
                 lrs: Callable[[int], list], tensors: Callable[[int], dict[str, torch.Tensor]],
                 objective: Callable[[InnerView], torch.Tensor], head_only: bool) -> None:
        self.settings, self.engine, self.model, self.module = settings, engine, model, module
        self.names, self.model_names, self.initial = names, model_names, initial
        self.support_x, self.support_y, self.ways, self.inputs = support_x, support_y, ways, inputs
        self.steps, self.lrs, self.tensors, self.objective = steps, lrs, tensors, objective
        self.head_only = head_only
        self.training = model.trunk.training
        self.taps = term_taps(settings.loss_terms) if settings.loss_terms and self.training else ()
        #: the taps of the adapted module's forward pass (head-only: the trunk's are in ``features``)
        self.module_taps = self.module_names(self.taps)
        self._tasks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        #: tapped trunk outputs of the support set (head-only adaptation runs the trunk once)
        self.input_features: dict[str, torch.Tensor] = {}

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    def task(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``t``'s support set ``(x, y)``: the same tensor objects for the problem's lifetime
        (loss terms and teachers may cache per support set)."""
        if self._tasks is None:
            self._tasks = [(self.support_x[i], self.support_y[i]) for i in range(self.tasks)]
        return self._tasks[t]

    # -- forward passes ---------------------------------------------------------------------
    def module_names(self, taps: Sequence[str]) -> dict[str, str]:
        """``{name in the adapted module: name in the model}`` of the ``taps`` in the adapted module
        (head-only adaptation: the head's layers, ``"head"`` its output)."""
        if not self.head_only:
            return {n: n for n in taps}
        return {n[len("head."):]: n for n in taps if n.startswith("head.")} | ({"": "head"} if "head" in taps else {})

    def module_forward(self, params: Tensors, fixed: dict, x: torch.Tensor,
                       taps: dict[str, str]) -> tuple[torch.Tensor, dict]:
        """The engine's forward pass of the adapted module, its ``taps`` (:meth:`module_names`) named as
        in the model."""
        logits, feats = self.engine.forward(self, params, fixed, x, list(taps))
        return logits, {taps[n]: f for n, f in feats.items()}

    def features(self, x: torch.Tensor, taps: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
        """Trunk features ``[T, N, D]`` of inputs ``[T, N, ...]`` (query: normalised per ``bn_stats``)."""
        trunk, sx = self.model.trunk, self.support_x
        fixed, rows = self.trunk_tensors(), 0
        if self.settings.bn_stats == "support" and x is not sx:
            support = support_rows(trunk, sx.shape[1])
            if support:  # no metamtl norm layer: nothing reads the support rows, the query runs alone
                fixed, rows, x = {**fixed, **support}, sx.shape[1], torch.cat([sx, x], 1)

        def one(_: Tensors, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(trunk, fixed, (xi,)) if fixed else trunk(xi)

        # "trunk" itself (its flat output) is the trunk module's own name "" under it
        trunk_taps = {n: n[len("trunk."):] for n in taps if n == "trunk" or n.startswith("trunk.")}
        with tap_outputs(trunk, list(trunk_taps.values())) as out_feats:
            out = map_tasks(one, [], x)
        feats = {n: out_feats[k] for n, k in trunk_taps.items() if k in out_feats}
        return (out[:, rows:] if rows else out), feats

    def trunk_tensors(self) -> dict[str, torch.Tensor]:
        """What the trunk is handed in :meth:`features`: the step-0 tensors (:attr:`tensors`) of the trunk's
        layers, so that prototypes and a head-only loop see the features the weights before any update
        see (MAML++: per-step BatchNorm set 0).  Not in training mode: running statistics, which the
        support pass of step 0 already folds in (batch statistics normalise either way)."""
        if self.head_only:  # the tensors are named in the head: none reaches the trunk
            return {}
        out = {n[len("trunk."):]: t for n, t in self.tensors(0).items() if n.startswith("trunk.")}
        if self.training:
            out = {n: t for n, t in out.items() if not n.endswith((".running_mean", ".running_var"))}
        return out

    def forward(self, params: Tensors, k: int, x: torch.Tensor, taps: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
        """Logits ``[T, N, ...]`` of module inputs ``x`` with ``params`` (weights after ``k`` updates)."""
        fixed = self.tensors(k)
        rows = 0
        support = {} if self.head_only or self.settings.bn_stats != "support" or x is self.inputs else \
            support_rows(self.module, self.support_x.shape[1])
        if support:  # (no metamtl norm layer: nothing reads the support rows, the query runs alone)
            rows = self.support_x.shape[1]
            fixed = {**fixed, **support}
            x = torch.cat([self.support_x, x], 1)
        logits, feats = self.module_forward(params, fixed, x, self.module_names(taps))
        return (logits[:, rows:] if rows else logits), feats

    # -- the inner loop -----------------------------------------------------------------------
    def leaves(self) -> Tensors:
        """Fresh leaves holding :attr:`initial`'s values: where the inner loop starts."""
        return [i.detach().requires_grad_() for i in self.initial]

    @property
    def push_needs_graph(self) -> bool:
        """Whether :meth:`push` backpropagates through graph the outer backward also uses (a proto
        head computed from the support features): that backward must then ``retain_graph``."""
        return any(i.grad_fn is not None and not isinstance(i, nn.Parameter) and i.grad_fn.name() != "ExpandBackward0"
                   for i in self.initial)

    def push(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Send gradients with respect to the start leaves into the meta-parameters (through
        whatever made :attr:`initial`: an expand for meta-weights, the prototypes for a proto head)."""
        pairs = [(i, g) for i, g in zip(self.initial, grads) if g is not None and i.requires_grad]
        if pairs:
            torch.autograd.backward([i for i, _ in pairs], [g for _, g in pairs])

    def init_state(self, params: Tensors) -> Tensors:
        """The inner optimizer's initial state for ``params`` (a flat list of tensors)."""
        return self.engine.init_state(self, params)

    def step(self, state: Tensors, k: int, context: Sequence[torch.Tensor], create_graph: bool,
             tape: bool = True) -> Tensors:
        """Inner step ``k``: a pure function of ``state`` (weights, then optimizer state) and
        ``context`` (``[inputs, *start]``: what the forward passes read and the weights the loop
        started from).  ``create_graph``: second-order gradients; ``tape=False``: detach the
        result (no meta-gradient through it)."""
        return self._step(state, k, context, create_graph, tape)[0]

    def context(self, start: Tensors, tape: bool = True) -> Tensors:
        """``[inputs, *start]``: what :meth:`step` reads besides the state (detached when ``tape`` is off)."""
        return [self.inputs, *start] if tape else [self.inputs.detach(), *[s.detach() for s in start]]

    def objective_at(self, params: Tensors, k: int, context: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inner objective [T], task loss [T])`` of the weights ``params`` (after ``k`` updates)."""
        return self._objective(self.engine.bind(self, list(params)), k, context)

    def _objective(self, params: Tensors, k: int, context: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.module_forward(params, self.tensors(k), context[0], self.module_taps)
        feats = {**self.input_features, **feats}
        loss = batched_task_loss(logits, self.support_y)
        objective = self.objective(InnerView(self, k, params, logits, loss, feats, list(context[1:])))
        if not isinstance(objective, torch.Tensor) or objective.shape != loss.shape:
            got = list(objective.shape) if isinstance(objective, torch.Tensor) else type(objective).__name__
            raise InputError(f"inner_objective must return a tensor of shape {list(loss.shape)}, one objective per "
                             f"task of the chunk (e.g. default_objective(view) + a term per task), got {got}")
        return objective, loss

    def _step(self, state: Tensors, k: int, context: Sequence[torch.Tensor], create_graph: bool,
              tape: bool) -> tuple[Tensors, torch.Tensor]:
        n = len(self.names)
        with torch.enable_grad():
            params = self.engine.bind(self, list(state[:n]))
            objective, loss = self._objective(params, k, context)
            new_params, new_opt = self.engine.update(self, params, list(state[n:]), objective.sum(), k,
                                                     create_graph, tape)
        return new_params + new_opt, loss.detach()

    def unroll(self, start: Tensors, steps: int | None = None, *, tape: bool, create_graph: bool) -> "Adapted":
        """Run ``steps`` inner steps from ``start``; the weights after every step are kept."""
        steps = self.steps if steps is None else steps
        n = len(self.names)
        state = list(start) + self.init_state(start)
        context = self.context(start, tape=create_graph)
        trajectory, inner_losses = [list(start)], []
        for k in range(steps):
            state, loss = self._step(state, k, context, create_graph, tape)
            trajectory.append(state[:n])
            inner_losses.append(loss)
        return Adapted(self, trajectory, inner_losses)


class Adapted:
    """A chunk of tasks after adaptation: call it on query inputs ``[T, Q, ...]`` for logits.

    Attributes:
        trajectory: the adapted weights after ``k`` inner steps (``trajectory[0]``: the start).
        inner_losses: the support task loss ``[T]`` before each inner step (detached).
        single: built for one task without a task dimension (``MetaLearner.adapt``): calls take
            and return tensors without it.
    """

    def __init__(self, problem: InnerProblem, trajectory: list[Tensors], inner_losses: list[torch.Tensor]) -> None:
        self.problem, self.trajectory, self.inner_losses = problem, trajectory, inner_losses
        self.single = False
        self._features: tuple[tuple, torch.Tensor, dict] | None = None

    @property
    def params(self) -> Tensors:
        return self.trajectory[-1]

    @property
    def steps(self) -> int:
        return len(self.trajectory) - 1

    @property
    def support_x(self) -> torch.Tensor:
        return self.problem.support_x[0] if self.single else self.problem.support_x

    def forward(self, x: torch.Tensor, updates: int | None = None, taps: Sequence[str] = ()) -> tuple[torch.Tensor, dict]:
        """``(logits, tapped features)`` of ``x`` with the weights after ``updates`` steps (default: all)."""
        if self.single:
            logits, feats = self._forward(x.unsqueeze(0), updates, taps)
            return logits[0], feats
        return self._forward(x, updates, taps)

    def _forward(self, x: torch.Tensor, updates: int | None, taps: Sequence[str]) -> tuple[torch.Tensor, dict]:
        k = self.steps if updates is None else updates
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.steps:
            raise InputError(f"updates must be an integer in 0..{self.steps} (the inner steps made), got {updates!r}; "
                             "leave it out for the adapted weights after every step")
        p = self.problem
        feats: dict = {}
        if p.head_only:  # the trunk does not adapt: its features of x are computed once
            # keyed on the tensor itself (kept alive here), not its address: a freed batch's memory
            # may hold the next batch, which must not get the old features; an inference tensor has no
            # version counter to key on, so its features are always computed afresh
            key = None if x.is_inference() else (x._version, tuple(taps))
            cached = self._features
            if key is None or cached is None or cached[0] is not x or cached[1] != key:
                self._features = cached = (x, key, *p.features(x, taps))
            x_in, feats = cached[2], cached[3]
        else:
            x_in = x
        logits, more = p.forward(self.trajectory[k], k, x_in, taps)
        return logits, {**feats, **more}

    def __call__(self, x: torch.Tensor, updates: int | None = None) -> torch.Tensor:
        return self.forward(x, updates)[0]


# -- engines ---------------------------------------------------------------------------------------
class Engine:
    """How an :class:`InnerProblem` is executed: forward passes, optimizer state, updates."""

    name = "engine"

    def chunk_size(self, settings: InnerLoop, device: torch.device, tasks: int) -> int:
        return 1

    def forward(self, problem: InnerProblem, params: Tensors, fixed: dict, x: torch.Tensor,
                taps: Sequence[str]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def init_state(self, problem: InnerProblem, params: Tensors) -> Tensors:
        raise NotImplementedError

    def bind(self, problem: InnerProblem, params: Tensors) -> Tensors:
        """The weights as the step's forward pass, inner objective and update all see them."""
        return params

    def update(self, problem: InnerProblem, params: Tensors, state: Tensors, loss: torch.Tensor, k: int,
               create_graph: bool, tape: bool) -> tuple[Tensors, Tensors]:
        raise NotImplementedError


class CoreEngine(Engine):
    """``functional_call`` + functional optimizers; ``vmap`` over a chunk of tasks."""

    name = "core"

    def chunk_size(self, settings: InnerLoop, device: torch.device, tasks: int) -> int:
        chunk = settings.task_chunk or (1 if device.type == "cpu" else tasks)
        return max(1, min(chunk, tasks))

    def optimizer(self, settings: InnerLoop) -> InnerOptimizer:
        key = (settings.optimizer, repr(sorted(settings.optimizer_kwargs.items())), settings.lr)
        cached = getattr(settings, "_core_optimizer", None)
        if cached is None or cached[0] != key:
            cached = (key, build_optimizer(settings.optimizer, settings.lr, settings.optimizer_kwargs))
            settings._core_optimizer = cached  # type: ignore[attr-defined]
        return cached[1]

    def forward(self, problem, params, fixed, x, taps):
        module, names = problem.module, problem.names

        def one(p: Tensors, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {**fixed, **dict(zip(names, p))}, (xi,))

        with tap_outputs(module, taps) as feats:
            logits = map_tasks(one, params, x)
        return logits, feats

    def init_state(self, problem, params):
        return self.optimizer(problem.settings).init(params)

    def update(self, problem, params, state, loss, k, create_graph, tape):
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        new, state = self.optimizer(problem.settings).update(params, grads, state, problem.lrs(k), k)
        # A channels_last model keeps its adapted conv weights channels_last: an update's result
        # would otherwise come out NCHW and turn every later feature map (and the slow NCHW
        # max-pool and BatchNorm kernels) back to NCHW.
        new = [nhwc_per_task(q) if _is_nhwc(p) and not _is_nhwc(q) else q for p, q in zip(params, new)]
        if not tape:
            new = [q.detach().requires_grad_() for q in new]
            state = [s.detach() for s in state]
        return new, state


class HigherEngine(Engine):
    """``higher.monkeypatch`` + a ``higher`` differentiable optimizer, one task at a time.

    Runs any ``torch.optim`` class ``higher`` knows (``higher.register_optim`` adds more) on any
    module; learned rates go through higher's ``override``.  The reference the core is tested on.
    """

    name = "higher"

    def torch_optimizer(self, settings: InnerLoop) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        if isinstance(settings.optimizer, type):
            return higher_class(settings.optimizer, dict(settings.optimizer_kwargs))
        cls, _ = torch_settings(settings.optimizer, settings.lr, settings.optimizer_kwargs)
        return higher_class(cls, {**INNER_OPTIMIZERS[settings.optimizer][1], **settings.optimizer_kwargs})

    def forward(self, problem, params, fixed, x, taps):
        fmodel = problem._higher[0]
        full = self._full(problem, params, fixed)
        # the module's own buffers, not the copies higher's patched module made: running statistics
        # updated in the forward pass reach the model, as on the core
        buffers = {**problem._buffers, **{k: v for k, v in fixed.items() if k not in problem._param_index}}
        with tap_outputs(fmodel, taps) as feats:
            logits = functional_call(fmodel, buffers, (x[0],), {"params": full})
        return logits.unsqueeze(0), feats

    def bind(self, problem, params):
        """Each weight ``[1, ...]`` as ``v.unsqueeze(0)`` of one view ``v = p[0]``: higher
        differentiates the loss with respect to ``v``, so the forward pass and the inner objective
        (e.g. a proximal term on the weights) must both reach the loss through it."""
        views, out = problem._views, []
        for q in params:
            v = q[0]
            u = v.unsqueeze(0)
            views[id(u)] = (u, v)
            out.append(u)
        return out

    def _full(self, problem: InnerProblem, params: Tensors, fixed: dict) -> Tensors:
        """Every weight of the module in ``parameters()`` order: adapted, handed in, or its own."""
        views = problem._views
        for q in params:
            if id(q) not in views:
                views[id(q)] = (q, q[0])
        adapted = {n: views[id(q)][1] for n, q in zip(problem.names, params)}
        return [adapted[n] if n in adapted else fixed.get(n, p) for n, p in problem._param_index.items()]

    def init_state(self, problem, params):
        module = problem.module
        problem._param_index = dict(module.named_parameters())
        problem._buffers = dict(module.named_buffers())
        problem._views = {}
        refs = [problem._param_index[n] for n in problem.names]
        cls, kwargs = self.torch_optimizer(problem.settings)
        opt = cls([{"params": [r]} for r in refs], lr=problem.settings.lr, **kwargs)
        problem._higher = (higher.monkeypatch(module, copy_initial_weights=False, track_higher_grads=True),
                           higher.optim.get_diff_optim(opt, module.parameters(), track_higher_grads=True))
        return []

    def update(self, problem, params, state, loss, k, create_graph, tape):
        diffopt = problem._higher[1]
        diffopt._track_higher_grads = create_graph or tape
        full = self._full(problem, params, problem.tensors(k))
        callback = (lambda grads: [g if g is None else g.detach() for g in grads]) if not create_graph else None
        lrs = problem.lrs(k)
        new = diffopt.step(loss, params=full, override={"lr": list(lrs)}, grad_callback=callback)
        index = list(problem._param_index)
        new = [new[index.index(n)].unsqueeze(0) for n in problem.names]
        if not tape:
            new = [q.detach().requires_grad_() for q in new]
        return new, []


ENGINES: dict[str, Engine] = {"core": CoreEngine(), "higher": HigherEngine()}


# -- building a problem ----------------------------------------------------------------------------
def check_support_statistics(model: nn.Module) -> None:
    """:class:`ConfigError` when ``bn_stats="support"`` cannot reach a BatchNorm layer that
    normalises with batch statistics: a torch one would normalise the query with its own."""
    layers = torch_batch_norms(model, batch_statistics=True)
    if layers:
        raise ConfigError(
            f"bn_stats: support normalises query images with the support set's statistics only in metamtl's "
            f"EpisodicBatchNorm layers; the torch BatchNorm layer(s) {', '.join(layers)} of this model normalise "
            "with the statistics of their batch (training mode, or track_running_stats=False), the query's "
            "own. Use bn_stats: transductive, or build those layers as metamtl.models.EpisodicBatchNorm")


def check_registered_once(module: nn.Module) -> None:
    """:class:`ConfigError` when a sub-module holding weights is registered under several names
    (``nn.Sequential(block, block)``): ``functional_call`` would leave adapted tensors in it."""
    seen: dict[int, str] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        first = seen.setdefault(id(m), name)
        if first != name and (next(m.parameters(recurse=False), None) is not None
                              or next(m.buffers(recurse=False), None) is not None):
            raise ConfigError(
                f"the model registers one {type(m).__name__} with weights under two names, {first!r} and {name!r} "
                "(e.g. nn.Sequential(block, block)); the core engine adapts each weight under one name only. "
                "Share the weights by registering the module once and calling it twice in forward(), "
                "or use backend: higher")
def build_problem(
    settings: InnerLoop, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int, *,
    steps: int | None = None,
    lrs: Callable[[Sequence[str], int], list | None] | None = None,
    tensors: Callable[[int, bool], dict[str, torch.Tensor]] | None = None,
    objective: Callable[[InnerView], torch.Tensor] = default_objective,
) -> InnerProblem:
    """The inner problem of ``T`` tasks' support sets ``[T, S, ...]`` (an algorithm's declarations
    ``lrs(model_names, k)``, ``tensors(k, training)`` and ``objective`` filled in)."""
    engine = ENGINES[settings.backend]
    head_only = settings.adapt == "head"
    if support_y.is_floating_point():  # regression targets [T, S, d]: d outputs (a per-task head's too)
        ways = support_y.shape[-1] if support_y.dim() == 3 else 1
    module = task_module(model, ways, settings.adapt, settings.head_init)
    if engine is ENGINES["core"]:
        check_registered_once(module)
    if settings.bn_stats == "support":
        check_support_statistics(model)
    tasks = support_x.shape[0]
    training = model.trunk.training  # (a wrapper model, e.g. Transfer's cosine features, keeps its own flag)
    fixed_of = (lambda k: _step_tensors(tensors, k, training)) if tensors is not None else (lambda k: {})
    fixed_names = set(fixed_of(0))
    # a frozen weight (``requires_grad=False``) takes part in the forward pass as it is: neither
    # adapted nor meta-learned (the per-task head template is frozen but always supplied: ``head``)
    own = [n for n, p in module.named_parameters() if n not in fixed_names and p.requires_grad]
    per_task_head = settings.head_init != "learned"
    head = (["weight", "bias"] if head_only else ["head.weight", "head.bias"]) if per_task_head else []
    names = [n for n in own if n not in head] + head
    model_names = [("head." + n) if head_only else n for n in names]
    if not names and (settings.steps if steps is None else steps) > 0:
        raise ConfigError(
            f"nothing to adapt: every weight the inner loop adapts ({'the head' if head_only else 'the model'}) has "
            "requires_grad=False, so its steps would change nothing. Unfreeze them (e.g. "
            "model.head.requires_grad_(True)), or classify without adapting (steps=0, or a feature head such as "
            "head='proto')")

    problem = InnerProblem(
        settings=settings, engine=engine, model=model, module=module, names=names, model_names=model_names,
        initial=[], support_x=support_x, support_y=support_y, ways=ways, inputs=support_x,
        steps=settings.steps if steps is None else steps,
        lrs=lambda k: _rates(settings, lrs, model_names, k), tensors=fixed_of, objective=objective,
        head_only=head_only,
    )
    features = None
    if head_only or settings.head_init == "proto":
        features, problem.input_features = problem.features(support_x, problem.taps)
        if head_only:
            problem.inputs = features
    params = dict(module.named_parameters())
    initial: Tensors = [params[n].unsqueeze(0).expand(tasks, *params[n].shape) for n in names[:len(names) - len(head)]]
    if per_task_head:
        like = next(model.parameters())
        heads = [initial_head_params(settings.head_init, None if features is None else features[t], support_y[t],
                                     ways, model.num_features, like) for t in range(tasks)]
        initial += [torch.stack(h) for h in zip(*heads)]
    problem.initial = initial
    return problem


def _step_tensors(tensors: Callable[[int, bool], dict], k: int, training: bool) -> dict[str, torch.Tensor]:
    out = tensors(k, training)
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise InputError(f"step_tensors must return a dict {{name: tensor}} (empty for none); it returned "
                         f"{type(out).__name__} at step {k}")
    return out


def _rates(settings: InnerLoop, lrs: Callable | None, names: list[str], k: int) -> list:
    out = lrs(names, k) if lrs is not None else None
    if out is None:
        return [settings.lr] * len(names)
    try:
        out = list(out)
    except TypeError:
        raise InputError(f"inner_lrs must return a list of rates, one per name it is given, or None for the inner "
                         f"lr; it returned {type(out).__name__} at step {k}") from None
    if len(out) != len(names):
        raise InputError(f"inner_lrs returned {len(out)} rate(s) at step {k} for {len(names)} adapted weights: "
                         "return one rate (a float or a tensor) per name it is given, in that order, or None for "
                         "the inner lr")
    return out
