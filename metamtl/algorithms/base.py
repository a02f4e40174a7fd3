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

import contextlib
import dataclasses
import logging
import weakref
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..adaptation import (
    Adapted, FirstOrder, InnerLoop, InnerProblem, InnerView, MetaGradient, add_loss_terms, batched_task_loss,
    build_problem, default_objective, kept_buffers, proximal_term, second_order_rule,
)
from ..adaptation.gradients import cuda_devices
from ..adaptation.threads import DrewRandomNumbers, in_worker, map_chunks, threadable
from ..errors import ConfigError, InputError
from ..allocator import trim_above
from ..memory import FASTEST, PLAN_MODES, Footprint, MemoryPlan, graph_mb, plan_memory, rss_mb
from ..models.backbones import TrunkHead
from ..models.multidataset import routed_scope
from ..tasks.episode import Episode, TaskBatch

log = logging.getLogger(__name__)

#: :func:`vmap_blocker`'s forward-pass verdicts, per model: by training mode and module tree
_WRITES_BUFFERS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, str | None]]" = weakref.WeakKeyDictionary()


def vmap_blocker(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``model``'s forward pass (in its current mode) cannot adapt several tasks in one
    ``vmap`` call (``None``: it can): a layer that updates BatchNorm running statistics or draws
    dropout masks in training mode, or a buffer the forward pass changes (a running normaliser, a
    counter: one forward pass of ``x``, one task's inputs, watches the buffers' versions, once per
    model, mode and module tree; the buffers are restored).  Such a model adapts one task per
    call, which is what ``task_chunk: 1`` computes."""
    for name, m in model.named_modules():
        where = f"layer {name!r} ({type(m).__name__})" if name else f"the model ({type(m).__name__})"
        if m.training and isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            return f"{where} updates BatchNorm running statistics in training mode"
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{where} draws dropout masks in training mode"
    buffers = dict(model.named_buffers())
    if not buffers:
        return None
    verdicts = _WRITES_BUFFERS.setdefault(model, {})
    key = (model.training, tuple(id(m) for m in model.modules()))
    if key not in verdicts:
        versions = {n: b._version for n, b in buffers.items()}
        with torch.no_grad(), kept_buffers(model):
            features = model.trunk(x)
            if model.head is not None:
                model.head(features)
            changed = [n for n, b in buffers.items() if b._version != versions[n]]
        verdicts[key] = f"its forward pass changes the buffer {changed[0]!r}" if changed else None
    return verdicts[key]


#: What an algorithm can take from the training data (:attr:`Algorithm.from_data`), and what it is.
DATA_SETTINGS: dict[str, str] = {
    "num_classes": "the number of training classes",
    "datasets": "the labels of the training datasets (runs on several datasets)",
}


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


#: the model of the learner each algorithm was last given to (:func:`claim_algorithm`)
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def claim_algorithm(algorithm: "Algorithm", model: nn.Module) -> None:
    """``algorithm`` given to a new learner of ``model``: a :class:`ConfigError` when it holds learned state
    (Meta-SGD's rates, MAML++'s per-step rates and norms, a classifier) that the learner of another, live
    model trains, since both meta-optimizers would update (and both ``save`` write) the same tensors. An
    algorithm without such state (MAML, ProtoNet) may serve several learners."""
    ref = _OWNERS.get(algorithm)
    other = ref() if ref is not None else None
    state = [n for n, _ in [*algorithm.named_parameters(), *algorithm.named_buffers()]]
    if state and other is not None and other is not model:
        raise ConfigError(
            f"this {algorithm.name} algorithm already belongs to another learner: its learned state ({', '.join(state[:3])}"
            f"{', ...' if len(state) > 3 else ''}) is trained by that learner, and sharing it would couple the two "
            "learners. Build a new algorithm for each learner (build_algorithm(...) again; copy.deepcopy(learner.algorithm) "
            "to start from the other learner's state)")
    _OWNERS[algorithm] = weakref.ref(model)


class Algorithm(nn.Module):
    """Base class: MAML (second order, or first order with ``first_order=True``) on the core.

    Args:
        inner: the inner-loop settings; or pass them as keyword arguments
            (``steps``, ``lr``, ``optimizer``, ``first_order``, ``adapt``, ``head_init``, ...).
    """

    name: ClassVar[str] = "base"
    #: settings this algorithm fixes whatever the user passes (e.g. ANIL adapts only the head)
    fixed: ClassVar[dict[str, Any]] = {}
    #: ``memory: implicit`` (iMAML) applies: no learned inner settings, an outer objective of the
    #: final weights only (the implicit gradient knows nothing of the path to the solution)
    supports_implicit: ClassVar[bool] = True
    #: constructor settings this algorithm takes from the training data when its config leaves
    #: them out or ``None`` (names of :data:`DATA_SETTINGS`): e.g. ``("num_classes",)`` for the
    #: transfer baseline's global head.  Declared here, never guessed from the signature.
    from_data: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def trains_over_classes(cls, settings: Mapping[str, Any]) -> bool:
        """Whether this algorithm, configured with ``settings`` (its :meth:`config`), trains over the
        training classes (takes ``num_classes`` from the data), which regression tasks do not have;
        a wrapper (``multitask``) answers for the algorithm it wraps."""
        return "num_classes" in cls.from_data

    #: the phases (``LossContext.phase``) in which this algorithm's training applies loss terms:
    #: a distillation term acting in none of them would be ignored, so the Distillation refuses it
    loss_term_phases: ClassVar[tuple[str, ...]] = ("support", "query")
    #: whether evaluation adapts with inner steps (``False``: ``steps`` do not apply, rows say 0)
    has_inner_loop: ClassVar[bool] = True

    def __init__(self, inner: InnerLoop | None = None, **inner_kwargs: Any) -> None:
        super().__init__()
        if inner is not None and inner_kwargs:
            raise TypeError("pass either an InnerLoop or its settings, not both")
        clash = {k: v for k, v in inner_kwargs.items() if k in self.fixed and self.fixed[k] != v}
        if clash:  # as build_algorithm and with_fixed refuse them: never a setting replaced silently
            raise ConfigError(f"algorithm {self.name!r} fixes {self.fixed}; drop the contradictory setting(s) {clash}")
        inner = InnerLoop(**{**inner_kwargs, **self.fixed}) if inner is None else self.with_fixed(inner)
        self.inner = inner
        if inner.memory == "implicit" and not inner.first_order and not self.supports_implicit:
            raise ConfigError(
                f"algorithm {self.name!r} cannot use memory 'implicit' (iMAML): its meta-gradient depends on the "
                "inner-loop path (learned inner rates, per-step BatchNorm or losses after intermediate steps); "
                "use memory 'checkpoint' for the same meta-gradient with the memory of one inner step"
            )
        #: the planner's latest choice under ``memory: auto`` (see :meth:`plan_memory`)
        self.memory_plan: MemoryPlan | None = None
        if inner.memory == "auto":  # its mode, chunk and estimate (KiB), saved with the state: loaded, it adapts alike
            self.register_buffer("memory_planned", torch.tensor([-1, 0, 0]))
        self._plans: dict[tuple, MemoryPlan] = {}  # by episode shape and task count, in the mode last planned
        self._footprints: dict[tuple, Footprint] = {}  # by episode shape (see _shape)
        self._warned: set[str] = set()  # the reasons for running serially already logged

    # -- configuration ---------------------------------------------------------------------
    def with_fixed(self, inner: InnerLoop) -> InnerLoop:
        """``inner`` with this algorithm's :attr:`fixed` settings (a copy where one differs, loss
        terms kept): a :class:`ConfigError` where ``inner`` was given a contradicting value (a
        default that differs, such as ``first_order=False`` for FOMAML, is replaced)."""
        clash = {k: getattr(inner, k) for k, v in self.fixed.items() if getattr(inner, k) != v}
        if not clash:
            return inner
        explicit = {k: v for k, v in clash.items() if k in inner.explicit}
        if explicit:
            raise ConfigError(f"algorithm {self.name!r} fixes {self.fixed}; the InnerLoop passed sets {explicit}: "
                              "drop the contradictory setting(s) or use an algorithm that takes them")
        out = dataclasses.replace(inner, **self.fixed)
        out.explicit, out.loss_terms, out.task_weight = inner.explicit, inner.loss_terms, inner.task_weight
        return out

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this algorithm with :func:`build_algorithm`."""
        return {"name": self.name, **self.inner.config()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")

    def setup(self, model: TrunkHead) -> None:
        """Create model-dependent learnable state (called before the meta-optimizer is built).

        Must be idempotent: it is called again by ``meta_step``/``adapt`` and on load.
        """

    def check_trainable(self) -> None:
        """:class:`~metamtl.errors.ConfigError` when these settings could not train the model
        (checked when a fit starts, not when the algorithm is built: a saved learner still loads)."""

    def trunk_loaded(self, model: TrunkHead) -> None:
        """``model``'s trunk weights were just replaced (:meth:`MetaLearner.init_from
        <metamtl.MetaLearner.init_from>`): refresh state that :meth:`setup` copied from them."""

    @property
    def eval_steps(self) -> int:
        """Inner steps used at evaluation by default."""
        return self.inner.evaluation_steps

    @property
    def memory_mode(self) -> str:
        """``full``, ``checkpoint`` or ``implicit``: the ``memory`` setting or, under ``auto``, the
        planner's latest choice (``full`` before the first plan)."""
        if self.inner.memory == "auto":
            return self.memory_plan.mode if self.memory_plan is not None else "full"
        return self.inner.memory

    def second_order(self) -> MetaGradient:
        """The second-order rule of :attr:`memory_mode` (full unroll, checkpointed or implicit)."""
        return second_order_rule(self.memory_mode, self.inner.cg_steps)

    def checked_rule(self, iteration: int) -> MetaGradient:
        """:meth:`meta_gradient`, checked: an :class:`~metamtl.errors.InputError` unless it is a rule object."""
        rule = self.meta_gradient(iteration)
        if isinstance(rule, type) or not callable(getattr(rule, "backward", None)):
            raise InputError(f"{type(self).__name__}.meta_gradient must return a rule object with "
                             f"backward(problem, outer, weight), e.g. FirstOrder() (an instance), got {rule!r}")
        missing = [a for a in ("name", "second_order") if not hasattr(rule, a)]
        if missing:  # the fit loop's layout key and the memory planner read them
            raise InputError(f"{type(self).__name__}.meta_gradient returned a rule without {' and '.join(missing)}: "
                             "subclass metamtl.adaptation.MetaGradient (or FirstOrder) to inherit them, or set "
                             "name (a str) and second_order (a bool) on the rule")
        return rule

    def checked_outer(self, adapted: Adapted, query_x: torch.Tensor, query_y: torch.Tensor,
              iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`outer_objective`, checked: an :class:`~metamtl.errors.InputError` unless it gives
        ``(objective [T], logits)``."""
        out = self.outer_objective(adapted, query_x, query_y, iteration)
        tasks = adapted.problem.tasks
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
                and out[0].shape == (tasks,)):
            got = (f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else
                   f"({', '.join(str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out)})"
                   if isinstance(out, tuple) else type(out).__name__)
            raise InputError(f"{type(self).__name__}.outer_objective must return (objective [T], logits): one "
                             f"objective per task of the chunk ([{tasks}]) and the query logits, got {got}")
        return out

    # -- declarations ------------------------------------------------------------------------
    def meta_gradient(self, iteration: int) -> MetaGradient:
        """The meta-gradient rule at meta-iteration ``iteration``."""
        return FirstOrder() if self.inner.first_order else self.second_order()

    def inner_lrs(self, names: Sequence[str], step: int) -> list | None:
        """Inner learning rate of each adapted weight (model names) at step ``step``; ``None``: ``lr``."""
        return None

    def step_tensors(self, step: int, training: bool) -> dict[str, torch.Tensor]:
        """Tensors handed to the forward pass of the weights after ``step`` updates (by model name)."""
        return {}

    def inner_objective(self, view: InnerView) -> torch.Tensor:
        """The inner objective ``[T]`` of one inner step: the support loss plus loss terms, and
        iMAML's proximal term ``lam/2 ||w - w_0||^2`` under ``memory: implicit``."""
        objective = default_objective(view)
        if self.memory_mode == "implicit" and not self.inner.first_order:
            objective = objective + proximal_term(view, self.inner.lam)
        return objective

    def outer_objective(self, adapted: Adapted, query_x: torch.Tensor, query_y: torch.Tensor,
                        iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective [T], final logits)``: the query task loss after the last step plus query loss terms."""
        p = adapted.problem
        logits, feats = adapted.forward(query_x, taps=p.taps)
        loss = batched_task_loss(logits, query_y)
        return add_loss_terms(p, "query", loss, logits, query_y, query_x, adapted.params, feats), logits

    def sequential_tasks(self, training: bool) -> str | None:
        """Why tasks must be adapted one at a time, one after the other (``None``: chunks of tasks,
        side by side on CPU threads where :meth:`task_workers` allows).  A reason makes every chunk
        one task and keeps the chunks on the calling thread."""
        if training and self.inner.loss_terms:
            return "loss terms see one task at a time"
        return None

    # -- the machinery every algorithm shares -------------------------------------------------
    def problem(self, model: TrunkHead, support_x: torch.Tensor, support_y: torch.Tensor, ways: int,
                steps: int | None = None) -> InnerProblem:
        """The inner problem of ``T`` tasks' support sets ``[T, S, ...]`` with this algorithm's declarations."""
        return build_problem(self.inner, model, support_x, support_y, ways, steps=steps, lrs=self.inner_lrs,
                             tensors=self.step_tensors, objective=self.inner_objective)

    def chunks(self, batch: TaskBatch, training: bool, rule: MetaGradient | None = None,
               model: TrunkHead | None = None) -> list[list[int]]:
        """Positions of ``batch``'s episodes grouped by shape, in chunks adapted together (at most
        the memory plan's chunk while meta-training with a second-order ``rule`` under ``memory: auto``;
        one task where :meth:`sequential_tasks` says so or ``model``'s forward pass cannot be vmapped
        over tasks, see :func:`vmap_blocker`)."""
        from ..adaptation import ENGINES

        engine = ENGINES[self.inner.backend]
        limit = 1 if self.sequential_tasks(training) else None
        plan = self.memory_plan if rule is not None and rule.second_order and self.inner.memory == "auto" else None
        out = []
        for positions in batch.groups().values():
            size = engine.chunk_size(self.inner, batch[positions[0]].support_x.device, len(positions))
            if size > 1 and not limit and model is not None:
                limit = self._one_task_per_call(model, batch[positions[0]].support_x)
            size = min(size, limit) if limit else size
            if training and plan is not None:  # the chunk planned for this shape
                own = self._plans.get((self._shape(batch, positions), len(positions)))
                size = min(size, own.chunk if own is not None and own.mode == plan.mode else plan.chunk)
            out += [positions[i:i + size] for i in range(0, len(positions), size)]
        return out

    def _one_task_per_call(self, model: TrunkHead, x: torch.Tensor) -> int | None:
        """``1`` (logged once) where ``model``'s forward pass of inputs like ``x`` cannot run in one
        ``vmap`` call for several tasks (:func:`vmap_blocker`), else ``None``."""
        reason = vmap_blocker(model, x)
        if reason is None:
            return None
        if "vmap: " + reason not in self._warned:
            self._warned.add("vmap: " + reason)
            (log.warning if self.inner.task_chunk > 1 else log.info)(
                "task_chunk=%d: adapting one task per vmap call (as task_chunk 1) because %s",
                self.inner.task_chunk, reason)
        return 1

    def meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> dict[str, float]:
        """Accumulate the meta-gradient of ``batch`` (mean over tasks) into ``.grad``.

        ``iteration`` is the meta-iteration (0-based) the learner is at: schedules (MAML++'s
        annealing) follow it.  Chunks of tasks are processed one after the other and their graphs
        freed after each backward.  Returns mean query loss/accuracy and the mean support loss
        before each inner step (``inner_loss/step_k``).
        """
        self.setup(model)
        if self.inner.memory != "auto" or not self.checked_rule(iteration).second_order:  # memory: not used
            return self._meta_step(model, batch, iteration)
        cpu = batch[0].support_x.device.type == "cpu"  # free heap memory must not break the budget
        with trim_above(rss_mb() + self.inner.max_memory_mb) if cpu else contextlib.nullcontext():
            self.plan_memory(model, batch, iteration)
            return self._meta_step(model, batch, iteration)

    def global_meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int,
                         processes: Any) -> dict[str, float] | None:
        """The meta-step of one of several processes (torchrun), for an algorithm whose
        meta-gradient is not a mean over tasks; ``None`` (this default): it is one.

        ``batch`` is this process's share of the meta-batch (positions ``rank, rank + W, ...``).
        Returning metrics means ``.grad`` now holds the meta-gradient of the *whole* meta-batch,
        bitwise the same on every process, and the metrics are the whole meta-batch's: the
        learner does not average them again.  With ``None`` the learner runs :meth:`meta_step`
        and averages its per-process mean gradients weighted by task counts, which is exact for
        every mean over tasks.  ``processes`` (the learner's
        :class:`~metamtl.distributed.ProcessStrategy`) offers ``rank``, ``world_size``,
        ``all_gather(obj, what)`` and ``all_reduce_sum(tensors, what)``; every process must make
        the same calls.
        """
        return None

    def exchanged_buffers(self) -> list[torch.Tensor]:
        """Buffers :meth:`global_meta_step` itself leaves bitwise alike on every process (e.g. a
        multitask strategy's state); the learner averages every other buffer a step changed
        (running statistics of the forward passes) over the processes' tasks, but not these."""
        return []

    def _meta_step(self, model: TrunkHead, batch: TaskBatch, iteration: int) -> dict[str, float]:
        rule = self.checked_rule(iteration)
        n = len(batch)
        chunks = self.chunks(batch, training=True, rule=rule, model=model)

        def one(m: TrunkHead, positions: list[int]) -> dict[str, torch.Tensor]:
            sx, sy, qx, qy = batch.stack(positions)
            first = batch[positions[0]]  # (a chunk is of one dataset: its scope routes per-dataset parts)
            with routed_scope(m, first.dataset, first.support_x):
                problem = self.problem(m, sx, sy, first.ways)
                adapted, _, logits = rule.backward(
                    problem, lambda a: self.checked_outer(a, qx, qy, iteration), 1.0 / n)
            out = {"loss": batched_task_loss(logits, qy)}
            if first.is_classification:
                out["accuracy"] = (logits.argmax(-1) == qy).float().mean(1)
            out.update({f"inner_loss/step_{k}": v for k, v in enumerate(adapted.inner_losses)})
            return out

        workers = self.task_workers(model, batch, len(chunks))
        results: Iterable[dict[str, torch.Tensor]] = []
        if workers > 1:
            params = [*model.parameters(), *self.parameters()]
            try:
                results = map_chunks(one, chunks, model, params, workers)
            except DrewRandomNumbers:  # (discarded, the generator restored): the serial loop
                workers = 1
        if workers <= 1:
            results = (one(model, positions) for positions in chunks)
        totals: dict[str, float] = {}
        for values in results:  # in chunk order whichever thread ran them
            for key, v in values.items():
                totals[key] = totals.get(key, 0.0) + float(v.sum()) / n
        return totals

    def task_workers(self, model: TrunkHead, batch: TaskBatch, chunks: int, training: bool = True) -> int:
        """Threads that adapt ``batch``'s ``chunks`` chunks side by side (``task_threads``; 1: serial),
        for meta-training (``training``) or evaluation."""
        setting = self.inner.task_threads
        if setting == 1 or chunks < 2 or in_worker():
            return 1
        reason = self._serial_reason(model, batch, training)
        if reason is not None:
            if setting > 1 and reason not in self._warned:
                self._warned.add(reason)
                log.warning("task_threads=%d: adapting one chunk of tasks at a time because %s", setting, reason)
            return 1
        return min(chunks, setting or torch.get_num_threads())

    def _serial_reason(self, model: TrunkHead, batch: TaskBatch, training: bool) -> str | None:
        device = batch[0].support_x.device.type
        if device != "cpu":
            return f"it runs on the {device}"
        if self.inner.backend != "core":
            return "backend higher keeps state in its patched modules"
        if training and self.inner.memory != "full":
            return f"memory {self.inner.memory!r} keeps one chunk's graph at a time"
        return self.sequential_tasks(training) or threadable(model)

    # -- memory planning (memory: auto) -------------------------------------------------------
    def plan_memory(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> MemoryPlan:
        """Choose the meta-gradient mode and the task chunks that fit ``max_memory_mb`` for ``batch``.

        Every episode shape of ``batch`` is probed once (:meth:`memory_footprint`, cached per shape)
        and planned with :func:`~metamtl.memory.plan_memory`, with its own task chunk.  The learner
        keeps one mode for every shape, whatever their order: the most frugal one any shape needed
        (full, then checkpoint, then implicit), never going back, so one learner never mixes
        meta-objectives (implicit is iMAML's: once chosen it is trained, saved and adapted with for
        every shape).  New shapes and mode changes are logged (logger ``metamtl.memory``).  Returns
        the batch's plan: the mode, the smallest chunk and the largest estimate of its shapes.
        """
        groups = list(batch.groups().values())
        fresh = set()
        for positions in groups:
            shape = self._shape(batch, positions)
            if shape not in self._footprints:
                self._footprints[shape] = self.memory_footprint(model, batch, iteration, positions[0])
                fresh.add(shape)
        before = self.memory_plan.mode if self.memory_plan is not None else None
        plans = self._plan_shapes(batch, groups)
        say = logging.getLogger("metamtl.memory")
        for (shape, _), p in plans:
            if shape in fresh:
                say.info("%s: episodes of %s support, %s query: %s", self.name, "x".join(map(str, shape[1])),
                         "x".join(map(str, shape[2])), p.describe())
        worst = max((p for _, p in plans), key=lambda p: p.estimate_mb)
        plan = dataclasses.replace(worst, chunk=min(p.chunk for _, p in plans))
        if len({key for key, _ in plans}) > 1:
            plan = dataclasses.replace(plan, reason=plan.reason + f"; the largest of {len(plans)} episode shapes")
        if before is not None and plan.mode != before:
            (say.warning if plan.mode == "implicit" else say.info)(
                "%s: memory mode %s -> %s for every episode shape (one meta-objective per learner): a new "
                "episode shape needs it%s", self.name, before, plan.mode,
                "; the meta-objective is now iMAML's (proximal inner loop)" if plan.mode == "implicit" else "")
        if plan != self.memory_plan:
            planned = [PLAN_MODES.index(plan.mode), plan.chunk, round(plan.estimate_mb * 1024)]
            self.memory_planned.copy_(torch.tensor(planned))
        self.memory_plan = plan
        return plan

    def keep_batch_plan(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0) -> None:
        """Under ``auto`` (second-order iterations), make ``batch``'s plan the learner's once its
        sub-batches have been stepped (multi-task: one :meth:`meta_step` per dataset, each planning
        its own shapes): the mode, the smallest chunk and the largest estimate of them all, not the
        last sub-batch's.  Every shape was probed by those steps: nothing runs the model again."""
        if self.inner.memory == "auto" and self.checked_rule(iteration).second_order:
            self.plan_memory(model, batch, iteration)

    def _shape(self, batch: TaskBatch, positions: Sequence[int]) -> tuple:
        """What a memory footprint depends on: the dataset, support and query shapes, steps, device."""
        first = batch[positions[0]]
        return (first.dataset, tuple(first.support_x.shape), tuple(first.query_x.shape), self.inner.steps,
                first.support_x.device.type)

    def _plan_shapes(self, batch: TaskBatch, groups: list[list[int]]) -> list[tuple[tuple, MemoryPlan]]:
        """A plan for each group of ``batch`` (by shape and task count), all in one mode: the
        learner's current one, or the first more frugal one where a group fits nothing else."""
        from ..adaptation import ENGINES

        modes = PLAN_MODES if self.supports_implicit else tuple(m for m in PLAN_MODES if m != "implicit")
        mode = self.memory_plan.mode if self.memory_plan is not None else modes[0]
        plans: list[tuple[tuple, MemoryPlan]] = []
        while len(plans) < len(groups):
            positions = groups[len(plans)]
            key = (self._shape(batch, positions), len(positions))
            plan = self._plans.get(key)
            if plan is None or plan.mode != mode or plan.budget_mb != self.inner.max_memory_mb:
                device = batch[positions[0]].support_x.device
                preferred = ENGINES[self.inner.backend].chunk_size(self.inner, device, len(positions))
                plan = plan_memory(self._footprints[key[0]], self.inner.steps, len(positions),
                                   self.inner.max_memory_mb, preferred, modes[modes.index(mode):])
                if plan.mode == mode != modes[0] and plan.reason == FASTEST:
                    plan = dataclasses.replace(plan, reason=f"{mode}: this learner's mode for every episode shape")
                if plan.mode == "implicit":
                    plan = dataclasses.replace(plan, reason=plan.reason + "; implicit is iMAML: the inner objective "
                                               f"gains the proximal term lam/2 ||w - w_0||^2 with lam={self.inner.lam:g}")
            if plan.mode != mode:  # a more frugal mode for every shape: plan them all again (this one kept)
                mode, plans, self._plans[key] = plan.mode, [], plan
                continue
            plans.append((key, plan))
        self._plans.update(plans)
        return plans

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "memory_planned"
        if not hasattr(self, "memory_planned"):  # saved under auto, loaded with another memory setting
            state_dict.pop(key, None)
            return super()._load_from_state_dict(state_dict, prefix, *args)
        state_dict.setdefault(key, self.memory_planned.new_tensor([-1, 0, 0]))  # saved before plans were saved
        super()._load_from_state_dict(state_dict, prefix, *args)
        mode, chunk, estimate = self.memory_planned.tolist()
        self.memory_plan = None if mode < 0 else MemoryPlan(
            PLAN_MODES[mode], chunk, estimate / 1024, self.inner.max_memory_mb, "the plan saved with the learner")

    def memory_footprint(self, model: TrunkHead, batch: TaskBatch, iteration: int = 0, position: int = 0) -> Footprint:
        """What one task of ``batch`` keeps alive: one second-order inner step's graph, the outer
        objective's graph, the inner-loop state and the graph of building the inner problem (the
        support set's trunk pass of head-only adaptation, prototype heads) (MiB; see
        :class:`~metamtl.memory.Footprint`).

        Activations grow linearly with the number of images, so the probe runs on one and then two
        images of every class (regression: 2 and 4 images) of episode ``position``'s support and query
        sets and extrapolates to the episode's sizes: it costs a fraction of a meta-step's memory (a
        full-size probe would leave the allocator holding as much again as the step it measures),
        and every class keeps a support image (prototype heads need them all).  The outer objective
        sees the one-step weights after every step (MAML++'s multi-step loss reads them all).  The
        probe leaves running statistics (every buffer of the model and the algorithm) and the random
        number generators (CPU, and the batch's CUDA devices) as they were.
        """
        sx, sy, qx, qy = batch.stack([position])
        ways, classification = batch[position].ways, batch[position].is_classification

        def first(y: torch.Tensor, per: int) -> torch.Tensor:
            """Positions of the first ``per`` images of each class (regression: of ``2 per`` images)."""
            if not classification:
                return torch.arange(min(2 * per, y.shape[0]), device=y.device)
            rank = torch.tril(y[:, None] == y[None, :], -1).sum(1)  # earlier images of the same class
            return torch.nonzero(rank < per).flatten()

        def probe(per: int) -> tuple[float, float, float, float, int, int]:
            s, q = first(sy[0], per), first(qy[0], per)
            s_x, s_y, q_x, q_y = sx[:, s], sy[:, s], qx[:, q], qy[:, q]
            keep = [s_x, s_y, q_x, q_y, *model.parameters(), *self.parameters()]
            # the support trunk pass (head-only adaptation) and proto heads: alive until the backward
            context_mb, problem = graph_mb(lambda: self.problem(model, s_x, s_y, ways), keep)
            start = problem.leaves()
            state = start + problem.init_state(start)
            keep += [*state, problem.inputs]
            step_mb, new = graph_mb(lambda: problem.step(state, 0, problem.context(start), create_graph=True), keep)
            adapted = Adapted(problem, [start] + [new[:len(start)]] * problem.steps, [])
            query_mb, _ = graph_mb(lambda: self.checked_outer(adapted, q_x, q_y, iteration), keep + new)
            state_mb = sum(t.numel() * t.element_size() for t in state) / 2**20
            return step_mb, query_mb, state_mb, context_mb, len(s), len(q)

        def extrapolate(mb1: float, mb2: float, n1: int, n2: int, n: int) -> float:
            return mb2 if n2 == n1 else mb1 + (mb2 - mb1) * (n - n1) / (n2 - n1)

        # on a fork of the generators: the probe's dropout masks and noise draw nothing the run draws
        with kept_buffers(model, self), torch.random.fork_rng(devices=cuda_devices([sx, qx])), \
                routed_scope(model, batch[position].dataset, batch[position].support_x):
            (s1, q1, w, c1, ns1, nq1), (s2, q2, _, c2, ns2, nq2) = probe(1), probe(2)
        n_s, n_q = sx.shape[1], qx.shape[1]
        return Footprint(extrapolate(s1, s2, ns1, ns2, n_s), extrapolate(q1, q2, nq1, nq2, n_q), w,
                         extrapolate(c1, c2, ns1, ns2, n_s))

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

        def one(m: TrunkHead, positions: list[int]) -> tuple[list[int], list[float], list[float] | None]:
            sx, sy, qx, qy = batch.stack(positions)
            first = batch[positions[0]]
            with routed_scope(m, first.dataset, first.support_x):
                problem = self.problem(m, sx, sy, first.ways, steps)
                logits = problem.unroll(problem.leaves(), tape=False, create_graph=False)(qx)
            losses = batched_task_loss(logits, qy).tolist()
            accs = (logits.argmax(-1) == qy).float().mean(1).tolist() if first.is_classification else None
            return positions, losses, accs

        chunks = self.chunks(batch, training=model.training, model=model)
        workers = self.task_workers(model, batch, len(chunks), training=model.training)
        with torch.no_grad():
            results = []
            if workers > 1:
                try:
                    results = map_chunks(one, chunks, model, [], workers)
                except DrewRandomNumbers:  # (discarded, the generator restored): the serial loop
                    workers = 1
            if workers <= 1:
                results = (one(model, positions) for positions in chunks)
            for positions, losses, accs in results:
                for j, p in enumerate(positions):
                    out[p] = {"loss": losses[j]} if accs is None else {"loss": losses[j], "accuracy": accs[j]}
        return out

    def evaluate_episode(self, model: TrunkHead, episode: Episode, steps: int | None = None) -> dict[str, float]:
        """:meth:`evaluate_episodes` of one episode."""
        return self.evaluate_episodes(model, [episode], steps)[0]
