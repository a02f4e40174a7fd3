"""The fit loop behind :meth:`MetaLearner.fit <metamtl.MetaLearner.fit>` (a Lightning-style trainer).

:class:`FitLoop` owns the iteration: it draws meta-batches, runs one guarded meta-step
(:class:`MetaStep`), validates when due, dispatches the callbacks' hooks with the run's
:class:`~metamtl.callbacks.FitState`, and decides when to stop (iterations done, a callback's
request, the time budget, SIGINT/SIGTERM) the same way on every process.

:class:`MetaStep` is one meta-optimizer step: the algorithm's meta-gradient, averaged across
processes, skipped with a warning when it is not finite (an error after ``max_bad_steps`` in a
row), clipped to ``grad_clip`` and applied.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from . import distributed, run_state
from .adaptation import check_positive
from .callbacks import FitState
from .checkpoint import history_continues, safe_load
from .evaluation import validation_metrics
from .errors import (BAD_SETTING_ERRORS, CheckpointError, ConfigError, FitInterrupted, TrainingError, setting_error_text,
                     unknown_name)
from .inputs import check_int, check_task_source
from .interrupt import StopOnSignal, signal_name
from .memory import PeakMemory
from .numerics import check_finite_weights
from .placement import set_layout
from .tasks.episode import TaskBatch
from .tasks.fingerprint import tasks_fingerprint
from .tasks.sampler import TaskSource, source_fingerprint, task_batches

if TYPE_CHECKING:
    from .learner import MetaLearner

#: Where ``fit`` saves a resumable checkpoint on SIGINT/SIGTERM when no callback names one.
INTERRUPT_CHECKPOINT = Path("metamtl-interrupted.pt")

META_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


NOTHING_TO_META_LEARN = (
    "nothing to meta-learn: every weight of the model and the algorithm has requires_grad=False. Unfreeze the "
    "weights to train (e.g. model.head.requires_grad_(True)) before building the MetaLearner and calling fit")


def build_meta_optimizer(name: str, params: list[torch.nn.Parameter], lr: float,
                         kwargs: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The meta-optimizer ``name`` (a key of :data:`META_OPTIMIZERS`) over ``params``."""
    if not isinstance(name, str) or name not in META_OPTIMIZERS:
        raise unknown_name("meta optimizer", name, META_OPTIMIZERS)
    if not params:
        raise ConfigError(NOTHING_TO_META_LEARN)
    try:
        return META_OPTIMIZERS[name](params, lr=lr, **dict(kwargs or {}))
    except BAD_SETTING_ERRORS as exc:
        raise ConfigError(f"bad meta_optimizer_kwargs for {name!r}: {setting_error_text(exc)}") from None


def set_meta_lr(learner: "MetaLearner", value: Any) -> None:
    """``learner.meta_lr = value``: checked (:class:`ConfigError` unless a number > 0) and applied to every
    group of the meta-optimizer (its rate and ``initial_lr``, what schedules start from), so the learner trains
    at the rate its config and checkpoints say."""
    learner._meta_lr = lr = check_positive("meta_lr", value)
    optimizer = getattr(learner, "meta_optimizer", None)  # None while the learner is built
    for group in optimizer.param_groups if optimizer is not None else ():
        group["lr"] = group["initial_lr"] = lr


#: ``fit``'s defaults of the settings that only act with validation tasks / a checkpoint folder
VAL_EPISODES, CHECKPOINT_EVERY = 100, 100


def check_fit_arguments(train_tasks: Any, val_tasks: Any, budget_minutes: float | None, checkpoint_dir: Any = None,
                        **counts: tuple[Any, int]) -> tuple[Any, ...]:
    """:class:`ConfigError` for a bad argument of ``fit``: ``counts`` maps names to ``(value, minimum)``
    (``None``: not given); returns ``budget_minutes`` as a float (``None``: no budget) followed by the
    counts as Python ints, in the order given (a numpy integer kept in the fit settings or the stop
    record would make every checkpoint of the run unloadable).  A ``UserWarning``
    for validation settings without ``val_tasks`` and ``checkpoint_every`` without ``checkpoint_dir``,
    which would do nothing (configs pass their defaults, so not an error)."""
    given = {name: None if value is None else check_int(name, value, low) for name, (value, low) in counts.items()}
    check_task_source("train_tasks", train_tasks)
    if val_tasks is not None:
        check_task_source("val_tasks", val_tasks)
    warn_unused_settings(given, val_tasks, checkpoint_dir)
    return (None if budget_minutes is None else check_positive("budget_minutes", budget_minutes), *given.values())


def warn_unused_settings(given: dict[str, Any], val_tasks: Any, checkpoint_dir: Any) -> None:
    """``UserWarning`` for ``fit`` settings given away from their defaults that do nothing: validation
    settings without ``val_tasks``, ``checkpoint_every`` without ``checkpoint_dir``."""
    val = [f"{n}={given[n]}" for n, default in (("val_every", None), ("val_episodes", VAL_EPISODES))
           if given.get(n, default) != default]
    every = given.get("checkpoint_every", CHECKPOINT_EVERY)
    unused = ([f"{', '.join(val)} without val_tasks (no validation runs)"] if val and val_tasks is None else []) + (
        [f"checkpoint_every={every} without checkpoint_dir (no checkpoints are written)"]
        if every != CHECKPOINT_EVERY and checkpoint_dir is None else [])
    if unused:
        warnings.warn(f"fit: {'; '.join(unused)}: pass val_tasks / checkpoint_dir, or drop the setting",
                      UserWarning, stacklevel=4)


def fit_settings(train_tasks: Any, val_tasks: Any, meta_batch_size: int, val_every: int | None, val_episodes: int,
                 callbacks: list[Any]) -> dict[str, Any]:
    """What a resume of this fit must repeat to continue it exactly: the training tasks (their
    ``repr``, and what their episodes are drawn from: :func:`~metamtl.tasks.fingerprint.tasks_fingerprint`),
    the meta-batch size, the validation tasks (the same fingerprint; ``None`` without validation),
    cadence and episodes as given, and what the callbacks change of the trajectory
    (:meth:`~metamtl.callbacks.Callback.run_settings`: the learning-rate schedule, early stopping).
    Iterations and the time budget may differ (to extend a run)."""
    settings = {"meta_batch_size": meta_batch_size, "train_tasks": source_fingerprint(train_tasks), "val_every": val_every,
                "val_episodes": val_episodes, "train_tasks_content": tasks_fingerprint(train_tasks),
                "val_tasks": tasks_fingerprint(val_tasks) if val_tasks is not None else None}
    for cb in callbacks:
        settings.update(cb.run_settings())
    return settings


def check_optimizer_covers(learner: "MetaLearner") -> None:
    """:class:`ConfigError` when a trainable weight is missing from the meta-optimizer: unfrozen
    (``requires_grad_(True)``) or put in (a replaced module) after the learner was built, it would get
    meta-gradients but never be updated."""
    known = {id(p) for group in learner.meta_optimizer.param_groups for p in group["params"]}
    missing = [f"{prefix}{name}" for prefix, module in (("model.", learner.model), ("algorithm.", learner.algorithm))
               for name, p in module.named_parameters() if p.requires_grad and id(p) not in known]
    if missing:
        raise ConfigError(
            f"trainable weights the meta-optimizer does not know: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "they were unfrozen or replaced after the MetaLearner was built, so fit would never update them. "
            "Freeze or unfreeze weights and replace modules before building the MetaLearner (build a new one "
            "to train them: MetaLearner(learner.model, ...))")


def check_continued_batches(learner: "MetaLearner", settings: dict[str, Any], resume: Any, iterations: int | None) -> None:
    """:class:`ConfigError` for a continued fit (not a resume) training ``iterations`` (``None``: unknown) on the
    same training tasks with another meta-batch size than the latest iteration trained: the task stream continues
    at meta-batch ``iteration`` (episodes ``iteration * meta_batch_size`` on), so another size would repeat or skip
    episodes (a fit on other tasks, e.g. fine-tuning a loaded learner, takes any size)."""
    before = learner.run.meta_batch_size  # on other tasks (fine-tuning) nothing is repeated or skipped
    same = learner.run.stream is not None and learner.run.stream == settings.get("train_tasks")
    if resume is None and iterations != 0 and same and before is not None and before != settings["meta_batch_size"]:
        raise ConfigError(
            f"meta_batch_size={settings['meta_batch_size']} but this learner's previous fit used {before}: a continued "
            f"fit on the same training tasks goes on with the next meta-batch of their stream, and another size would "
            f"repeat or skip episodes. "
            f"Continue with meta_batch_size={before}, or start a new learner (MetaLearner(...)) for another size")


def start_run(learner: "MetaLearner", settings: dict[str, Any], resume: str | Path | None = None,
              iterations: int | None = None) -> None:
    """Before the first iteration of a fit: continue from the checkpoint ``resume`` (or continue
    the learner's own run: its seconds and the callback states kept by the previous fit call), then join the process group and check every process starts the same
    fit (config, ``settings``, iteration) with process 0's weights."""
    if not learner.meta_parameters():  # frozen after the learner was built
        raise ConfigError(NOTHING_TO_META_LEARN)
    learner.algorithm.check_trainable()
    check_optimizer_covers(learner)
    check_continued_batches(learner, settings, resume, iterations)
    run = learner.run
    run.stop, run.resumed, run.val_every = None, False, None  # a continued fit trains on: only a checkpoint's stop counts
    if resume is not None:
        run_state.resume(resume, config=learner.config(), settings=settings, optimizer=learner.meta_optimizer,
                         iterations=iterations, modules=(learner.model, learner.algorithm), run=run)
        logging.getLogger("metamtl.fit").info("resumed from %s: iteration %d, %.0f s trained before", resume,
                                              learner.iteration, run.seconds)
    # the default cadence, a tenth of the fit's iterations, as the interrupted fit computed it on resume
    run.val_every = None if settings["val_tasks"] is None else (
        settings["val_every"] or run.val_every or max(1, (iterations or 0) // 10))
    run.settings = settings
    learner.strategy = distributed.process_strategy(learner.device)
    fingerprint = {"config": learner.config(), "fit": settings, "iteration": learner.iteration,
                   "meta_parameters": [list(p.shape) for p in learner.meta_parameters()]}
    learner.strategy.sync_start(fingerprint, [*learner.model.state_dict().values(),
                                              *learner.algorithm.state_dict().values()])


def use_layout(learner: "MetaLearner", channels_last: bool) -> None:
    """Compute in this memory layout from now on (weights and meta-optimizer state converted in
    place); the learner's setting (forced or automatic) is unchanged."""
    set_layout([learner.model, learner.algorithm], learner.meta_optimizer, channels_last)
    learner.placement = learner.placement.with_layout(channels_last)


def layout_workload(learner: "MetaLearner", batch: TaskBatch) -> str:
    """What the layout of ``batch``'s meta-step depends on: the shapes of its episodes and the
    meta-gradient rule of this iteration (MAML++ turns second order at ``msl_until``).

    Under torchrun the shapes are those of the whole meta-batch (every process's share, gathered),
    so all processes get the same key and probe, or skip the probe, in the same iteration."""
    rule = learner.algorithm.checked_rule(learner.iteration).name
    shapes = sorted(map(repr, batch.groups()))
    if learner.strategy.world_size > 1:
        shares = learner.strategy.all_gather(shapes, f"layout workload exchange (iteration {learner.iteration + 1})")
        shapes = sorted({shape for share in shares for shape in share})
    return repr((rule, shapes))


def choose_layout(learner: "MetaLearner", batch: TaskBatch, iterations_left: int | None = None) -> TaskBatch:
    """``batch`` in the memory layout to run its meta-step in, the learner switched to it (what
    ``fit`` does before each meta-step).

    A forced layout is kept.  Under an automatic layout (``channels_last=None``, conv model on the
    CPU) the first meta-batch of each workload (:func:`layout_workload`) runs a few meta-steps on
    ``probe.tasks`` of its tasks in both layouts (:class:`~metamtl.placement.LayoutProbe`); the
    faster layout is kept for that workload (``learner.run.layouts``, saved in checkpoints) and
    logged (logger ``metamtl.placement``).  The probe steps leave no trace: gradients (of the
    meta-parameters and of the loss terms' parameters, e.g. distillation adapters), buffers
    (BatchNorm statistics) and random number generators are restored afterwards.  Under torchrun
    every process takes channels_last if any process measured it faster.  With fewer than
    ``probe.min_iterations`` ``iterations_left`` (``None``: unknown) an unseen workload is not
    probed: the current layout is kept and nothing recorded.
    """
    key = layout_workload(learner, batch) if learner.placement.automatic else None
    layouts, probe = learner.run.layouts, learner.layout_probe
    if key is None or (key not in layouts and iterations_left is not None and iterations_left < probe.min_iterations):
        return batch
    if key not in layouts:
        first = next(iter(batch.groups().values()))
        sample = TaskBatch([batch[i] for i in first[:probe.tasks]])
        choice = probe.choose(_probe_step(learner, sample), learner.placement.channels_last)
        channels_last = learner.strategy.any_rank(choice.channels_last, what="layout choice")[0]
        layouts[key] = channels_last
        logging.getLogger("metamtl.placement").info("layout for %s: %s", key, choice.describe())
    if layouts[key] != learner.placement.channels_last:
        use_layout(learner, layouts[key])
    return learner.placement.batch(batch)


def buffer_snapshot(learner: "MetaLearner") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` of every buffer of the model and the algorithm (BatchNorm statistics,
    which forward passes update), for :func:`restore_buffers`."""
    return [(b, b.detach().clone()) for m in (learner.model, learner.algorithm) for b in m.buffers()]


def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the values a :func:`buffer_snapshot` saved."""
    with torch.no_grad():
        for buffer, saved in snapshot:
            buffer.copy_(saved)


def trained_parameters(learner: "MetaLearner") -> list[torch.nn.Parameter]:
    """The meta-parameters and the parameters of the inner loop's loss terms (distillation
    adapters, trained by their callback from the same backward pass)."""
    terms = getattr(getattr(learner.algorithm, "inner", None), "loss_terms", ())
    extra = [p for t in terms if isinstance(t, torch.nn.Module) for p in t.parameters() if p.requires_grad]
    return list({id(p): p for p in [*learner.meta_parameters(), *extra]}.values())


def _probe_step(learner: "MetaLearner", sample: TaskBatch) -> Callable[[bool], None]:
    """``run(channels_last)``: a meta-step on ``sample`` in that layout that leaves no trace."""

    def run(channels_last: bool) -> None:
        if channels_last != learner.placement.channels_last:
            use_layout(learner, channels_last)
        params = trained_parameters(learner)
        grads = {id(p): p.grad for p in params}
        buffers = buffer_snapshot(learner)
        rng = run_state.rng_state()
        try:
            for p in params:
                p.grad = None
            with learner.placement.autocast():
                learner.algorithm.meta_step(learner.model, learner.placement.batch(sample), learner.iteration)
        finally:
            for p in trained_parameters(learner):  # parameters built during the probe (adapters) get none
                p.grad = grads.get(id(p))
            restore_buffers(buffers)
            run_state.set_rng_state(rng)

    return run


def add_model_penalty(model: torch.nn.Module, metrics: dict[str, float]) -> None:
    """Add the gradient of ``model.penalty()`` (a multi-dataset model's soft-sharing tie; ``None``:
    none) to ``.grad`` and log it as ``penalty``: once per meta-step, whatever the algorithm, after
    the meta-gradient (and its average over processes, which are alike in the weights it depends on)."""
    penalty = getattr(model, "penalty", None)
    value = penalty() if callable(penalty) else None
    if value is not None:
        if value.requires_grad:  # (frozen trunks: nothing to tie)
            value.backward()
        metrics["penalty"] = float(value.detach())


class MetaStep:
    """One meta-optimizer step with non-finite skipping and global-norm clipping.

    A step whose loss, meta-gradient or updated running statistics (BatchNorm buffers, changed by
    the forward passes) are not finite is skipped and leaves every weight and buffer as it was; an
    update that makes weights non-finite raises :class:`TrainingError` naming the iteration.

    Args:
        learner: whose model, algorithm, meta-optimizer, placement and run state are used, and
            whose ``max_bad_steps`` (consecutive non-finite meta-gradients tolerated before
            :class:`TrainingError`) and ``grad_clip`` (global-norm clipping; ``None``: none) apply.
        after_backward: called once ``.grad`` holds the (averaged) meta-gradient.
    """

    def __init__(self, learner: "MetaLearner", after_backward: Callable[[], None] = lambda: None) -> None:
        self.learner = learner
        self.after_backward = after_backward
        self.memory = PeakMemory(learner.device)
        learner.run.peak_memory_mb = 0.0

    def __call__(self, batch: TaskBatch) -> dict[str, float]:
        state = self.learner.fit_state
        batch = choose_layout(self.learner, batch, None if state is None else state.iterations - self.learner.iteration)
        self.memory.start()
        metrics = self._step(batch)
        # the iteration's peak: process resident set on CPU, max allocated tensor memory on CUDA
        metrics["memory_mb"] = peak = self.memory.peak_mb
        self.learner.run.peak_memory_mb = max(self.learner.run.peak_memory_mb, peak)
        return metrics

    def _step(self, batch: TaskBatch) -> dict[str, float]:
        ln = self.learner
        ln.model.train()
        ln.meta_optimizer.zero_grad(set_to_none=True)
        # forward passes and strategies update them (BatchNorm statistics, counters such as DWA's steps):
        # a skipped step restores all of them
        buffers = buffer_snapshot(ln)
        with ln.placement.autocast():
            # under torchrun, an algorithm whose meta-gradient is no mean over tasks (multitask)
            # exchanges what it needs itself and leaves the whole meta-batch's gradient on every rank
            metrics = (ln.algorithm.global_meta_step(ln.model, batch, ln.iteration, ln.strategy)
                       if ln.strategy.world_size > 1 else None)
            averaged = metrics is None
            if averaged:
                metrics = ln.algorithm.meta_step(ln.model, batch, ln.iteration)
        if averaged:
            metrics = ln.strategy.reduce_gradients(ln.meta_parameters(), metrics, len(batch), iteration=ln.iteration)
        add_model_penalty(ln.model, metrics)
        self.after_backward()
        params = [p for p in ln.meta_parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        buffers_finite = agree_buffers(ln, buffers, len(batch), () if averaged else ln.algorithm.exchanged_buffers())
        if not (bool(torch.isfinite(norm)) and math.isfinite(metrics.get("loss", 0.0)) and buffers_finite):
            return self._skip(metrics, buffers)
        ln.run.bad_steps = 0
        if ln.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, ln.grad_clip, norm)
        ln.meta_optimizer.step()
        self._check_weights()
        metrics["grad_norm"] = float(norm)
        metrics["lr"] = float(ln.meta_optimizer.param_groups[0]["lr"])
        return metrics

    def _check_weights(self) -> None:
        """After the update: weights made non-finite by a finite meta-gradient (an overflowing
        step) stop training here, naming the iteration, instead of evaluating to chance later."""
        ln = self.learner
        if not _finite(ln.meta_parameters()):
            check_finite_weights(
                [("model.", ln.model), ("algorithm.", ln.algorithm)], f"iteration {ln.iteration + 1}",
                "the meta-optimizer step made them so (a finite but huge update overflowed). Lower meta_lr or "
                "set grad_clip; the last checkpoint written before this step holds finite weights")

    def _skip(self, metrics: dict[str, float], buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        ln = self.learner
        restore_buffers(buffers)  # a skipped step changes nothing, running statistics included
        ln.run.bad_steps += 1
        ln.meta_optimizer.zero_grad(set_to_none=True)
        warnings.warn(
            f"iteration {ln.iteration + 1}: non-finite loss or meta-gradient; step skipped "
            f"({ln.run.bad_steps}/{ln.max_bad_steps} consecutive)", RuntimeWarning, stacklevel=3,
        )
        if ln.run.bad_steps >= ln.max_bad_steps:
            raise TrainingError(
                f"{ln.run.bad_steps} consecutive non-finite meta-gradients; stopping with the last "
                "good parameters. Lower the learning rates or enable grad_clip."
            )
        return {**metrics, "skipped": 1.0}


def agree_buffers(learner: "MetaLearner", snapshot: list[tuple[torch.Tensor, torch.Tensor]], tasks: int,
                  exchanged: Sequence[torch.Tensor] = ()) -> bool:
    """After a meta-step's forward passes: whether every floating buffer is finite on every process.

    Under torchrun each process folded its own share of ``tasks`` into the buffers (MAML++'s
    per-step BatchNorm running statistics, also as multitask's base): every buffer that changed on
    some process is replaced on all of them by the task-weighted mean ``sum_r (n_r / B) * buffer_r``,
    so every process evaluates and saves the same statistics.  One process folds all ``B`` tasks
    in turn, so this is close to, not bitwise, its statistics.  ``exchanged`` (the algorithm's
    :meth:`~metamtl.algorithms.base.Algorithm.exchanged_buffers`, e.g. a multitask strategy's
    state, already alike everywhere) are left as the algorithm set them."""
    buffers = [(b, saved) for b, saved in snapshot if b.is_floating_point()]
    finite = _finite(b for b, _ in buffers)
    if learner.strategy.world_size == 1 or not buffers:  # every process has the same buffers (sync_start)
        return finite
    what = f"running statistics exchange (iteration {learner.iteration + 1})"
    kept = {id(b) for b in exchanged}
    changed = [id(b) not in kept and not torch.equal(b, saved) for b, saved in buffers]
    infos = learner.strategy.all_gather({"tasks": tasks, "changed": changed, "finite": finite}, what)
    total = sum(i["tasks"] for i in infos)
    synced = [b for k, (b, _) in enumerate(buffers) if any(i["changed"][k] for i in infos)]
    if synced:
        with torch.no_grad():
            for b in synced:
                b.mul_(tasks / total)
            learner.strategy.all_reduce_sum(synced, what)
    return all(i["finite"] for i in infos)


def _finite(tensors: Any) -> bool:
    """Whether every value of ``tensors`` is finite: one fused norm, and per tensor only when the
    norm is not finite (it also overflows for huge finite values)."""
    tensors = list(tensors)
    if not tensors or bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class FitLoop:
    """Iterate meta-batches until done; see the module docstring.

    Args:
        learner: the learner being trained.
        state: this fit's :class:`~metamtl.callbacks.FitState` (handed to every hook); its
            ``callbacks`` are the hooks, in call order, and get back the states a resumed
            checkpoint saved for them.
        train_tasks, val_tasks: task sources; ``val_episodes`` fixed episodes are evaluated every
            ``state.val_every`` iterations and after the last one, whatever ended training (the
            iterations, the time budget, a callback's stop request; not a signal).  A stop signal
            received anywhere in :meth:`run` ends it in :class:`~metamtl.errors.FitInterrupted`
            once the resumable checkpoint is saved (after ``on_fit_end`` when it came in the final
            validation or ``on_fit_end`` itself).
        num_workers: DataLoader workers building episodes.
    """

    def __init__(self, learner: "MetaLearner", state: FitState, train_tasks: TaskSource,
                 val_tasks: TaskSource | None = None, val_episodes: int = 100, num_workers: int = 0) -> None:
        learner.check_finite("fit")  # NaN weights (a diverged checkpoint): no step can repair them
        self.learner, self.state, self.callbacks = learner, state, state.callbacks
        carried = learner.run.callbacks  # what a resumed checkpoint (or the previous fit) saved
        # a learner's first fit, or one with callbacks last used by another learner, starts the callbacks it carries
        # nothing for afresh (objects reused across learners)
        state.callbacks.load_state_dict(carried, fresh=learner.iteration == 0 and not learner.run.resumed,
                                        learner=learner)
        taken = {cb.saved_key(carried) for cb in state.callbacks.callbacks}
        learner.run.callbacks = {k: v for k, v in carried.items() if k not in taken}  # for a later fit with them
        self.train_tasks, self.val_tasks, self.val_episodes = train_tasks, val_tasks, val_episodes
        self.num_workers = num_workers
        self.validated_at: int | None = None  # the iteration of the latest validation
        self.step = MetaStep(learner, after_backward=lambda: state.callbacks.on_after_backward(state))

    def run(self) -> None:
        """Train from ``learner.iteration`` to ``state.iterations`` (or an earlier stop), with gradients
        on also when ``fit`` is called under ``torch.no_grad()`` or ``torch.inference_mode()``."""
        with torch.inference_mode(False), torch.enable_grad():
            self._run()

    def _run(self) -> None:
        ln, state, cbs = self.learner, self.state, self.callbacks
        batches = self._batches()
        signals = StopOnSignal(lambda: ln.iteration).install()  # Ctrl-C / SIGTERM: stop cleanly
        try:
            cbs.on_fit_start(state)
            ln.run.start_clock()  # after the callbacks' set-up (W&B start-up, reading last.pt): not meta-training
            self._agree_clock()
            spent = self._stopped_at_start()  # e.g. a run stopped by its budget, resumed with the same one
            first = ln.iteration
            while not spent and ln.iteration < state.iterations and not self._stop_after_iteration(next(batches), signals):
                pass
            if signals.requested:
                raise self.interrupted(signals.signum)
            if self._final_validation_due(first, spent):
                self._final_validation()
            state.stopped_by = state.stopped_by or "iterations"
            self._agree_clock()  # the final validation's time too: saved in last.pt, continued by a later fit
            cbs.on_fit_end(state)
            late = signals.signum  # during the final validation or on_fit_end: fit still ends interrupted
        except BaseException as exc:
            if isinstance(exc, FitInterrupted):  # also a second signal's, raised at once by the handler
                state.stopped_by = signal_name(exc.signum)
            self._clean_up(exc)
            raise
        finally:
            # what the learner's next fit call continues from (callbacks absent from this fit keep theirs)
            ln.run.callbacks = {**ln.run.callbacks, **cbs.continued_state()}
            signals.restore()
            ln.run.stop_clock()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if late is not None:  # on_fit_end closed the callbacks (and wrote last.pt): save, then stop
            raise self.interrupted(late)

    def _clean_up(self, exc: BaseException) -> None:
        """Every callback's ``on_exception`` for ``exc``.  A stop request (``exc`` a
        :class:`FitInterrupted`, whose checkpoint is already written) stays the error fit raises when a
        further signal interrupts a callback's clean-up: that signal's error would claim nothing was
        saved."""
        try:
            self.callbacks.on_exception(self.state, exc)
        except KeyboardInterrupt:
            if not isinstance(exc, FitInterrupted):
                raise
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note("a further stop request interrupted a callback's clean-up (on_exception); the "
                             "other callbacks' clean-up still ran")

    def _batches(self) -> Iterator[TaskBatch]:
        ln = self.learner
        return task_batches(
            self.train_tasks, self.state.meta_batch_size, start_batch=ln.iteration, num_workers=self.num_workers,
            rank=ln.strategy.rank, world_size=ln.strategy.world_size, pin_memory=ln.placement.device.type == "cuda",
        )

    def _stop_after_iteration(self, batch: TaskBatch, signals: StopOnSignal) -> bool:
        """One iteration (meta-step, validation when due, hooks); whether fit stops after it."""
        ln, state, cbs = self.learner, self.state, self.callbacks
        for episode in batch:
            ln.check_episode(episode, "fit")
        batch = ln.placement.batch(batch, non_blocking=True)
        cbs.on_iteration_start(state)
        metrics = self.step(batch)
        ln.run.iteration, ln.run.meta_batch_size = ln.run.iteration + 1, state.meta_batch_size
        ln.run.stream = ln.run.settings.get("train_tasks")
        self._agree_clock()
        cbs.on_iteration_end(state, metrics)
        if self._validation_due():
            self._validate()
        cbs.on_iteration_complete(state)
        return self._stop_vote(signals)

    def _agree_clock(self) -> None:
        """Under torchrun: ``elapsed`` becomes the slowest process's clock on every process
        (:attr:`~metamtl.run_state.RunState.agreed`), so hooks reading it (``LRScheduler(over="budget")``,
        the history's times) act alike on every process until the next agreement."""
        ln = self.learner
        if ln.strategy.world_size > 1:
            clocks = ln.strategy.all_gather(ln.run.measured, what=f"clock exchange (iteration {ln.iteration})")
            ln.run.agreed = max(clocks)

    def _validate(self) -> None:
        ln = self.learner
        metrics = validation_metrics(ln, self.val_tasks, self.val_episodes)
        self.validated_at = ln.iteration
        self.callbacks.on_validation_end(self.state, metrics)

    def _validation_due(self) -> bool:
        it, every = self.learner.iteration, self.state.val_every
        return self.val_tasks is not None and every is not None and (it % every == 0 or it == self.state.iterations)

    def _out_of_time(self) -> bool:
        end = self.state.budget_end
        return end is not None and self.learner.elapsed >= end

    def _stopped_at_start(self) -> bool:
        """Whether the run is over before its first iteration: the checkpoint it resumes says a
        callback (early stopping) stopped it, unless this fit asks for more iterations than that run
        had (an extended run), its time budget is spent, or a callback set ``should_stop`` in
        ``on_fit_start``; ``state`` then says why."""
        ln, state = self.learner, self.state
        saved, ln.run.stop = ln.run.stop, None  # read once: the learner's next fit (continued) trains on
        if saved is not None and state.iterations <= saved["iterations"]:
            state.should_stop, state.stopped_by = True, saved["by"]
            return True
        if self._budget_spent_at_start():
            state.stopped_by = "budget"
            return True
        # a callback's stop request in on_fit_start (on any process): stop before the first iteration
        self._agree_stop(what="stop check (fit start)")
        return state.should_stop

    def _final_validation_due(self, first: int, stopped_at_start: bool) -> bool:
        """Whether to validate after the loop: it trained past its last validation, or it stopped at
        once on resume and the run it continues had not validated its last iteration (a signal came
        in the iteration that spent the budget)."""
        ln = self.learner
        if self.val_tasks is None or self.state.val_every is None or ln.iteration == self.validated_at:
            return False
        if first < ln.iteration:
            return True
        if not (stopped_at_start and ln.run.resumed and ln.iteration > 0):
            return False
        validated = [r.get("iteration") for r in ln.history if any(k.startswith("val/") for k in r)]
        return (validated or [None])[-1] != ln.iteration

    def _final_validation(self) -> None:
        """Validate after the last iteration, whatever stopped the run (the budget, a callback);
        the first reason to stop is kept (early stopping reacting to this validation changes nothing)."""
        state = self.state
        stop, reason = state.should_stop, state.stopped_by
        self._validate()
        state.should_stop, state.stopped_by = stop, reason or state.stopped_by

    def _budget_spent_at_start(self) -> bool:
        """Whether the time budget is spent before the first iteration (every process agreeing)."""
        if self.state.budget_minutes is None:
            return False
        return self.learner.strategy.any_rank(self._out_of_time(), what="budget check (fit start)")[0]

    def _agree_stop(self, *flags: bool, what: str) -> tuple[bool, ...]:
        """``should_stop`` and each of ``flags`` OR-ed over every process; a callback's reason
        (``stopped_by``) becomes that of the first process, in rank order, that asked to stop."""
        state = self.state
        votes = self.learner.strategy.all_gather((state.should_stop, state.stopped_by if state.should_stop else None,
                                                  *flags), what=what)
        state.should_stop = any(v[0] for v in votes)
        state.stopped_by = next((v[1] for v in votes if v[1] is not None), state.stopped_by)
        return tuple(any(v[k] for v in votes) for k in range(2, 2 + len(flags)))

    def _stop_vote(self, signals: StopOnSignal) -> bool:
        """Stop requests of every process OR-ed, so all stop after the same iteration (:meth:`_agree_stop`)."""
        state = self.state
        out_of_time, interrupted = self._agree_stop(self._out_of_time(), signals.requested,
                                                    what=f"stop check (iteration {self.learner.iteration})")
        stop = state.should_stop
        if interrupted:
            raise self.interrupted(signals.signum or signal.SIGTERM)
        if out_of_time and not stop:  # a callback's stop in the same iteration came first
            state.stopped_by = "budget"
        return stop or out_of_time

    def interrupted(self, signum: int) -> FitInterrupted:
        """After a stop signal: save a resumable checkpoint, return the exception fit raises.

        The checkpoint goes to ``state.resume_checkpoint`` (set by a checkpoint callback such as
        :class:`~metamtl.callbacks.ModelCheckpoint`) or, without one, :func:`interrupt_checkpoint`.
        """
        ln, state = self.learner, self.state
        name = signal_name(signum)
        path, note = None, ""
        if ln.is_main_process:  # saved before stopped_by names the signal: a callback's stop is kept for the resume
            try:
                path = ln.save(state.resume_checkpoint or interrupt_checkpoint(ln.history), training_state=True)
                note = (f"; resumable checkpoint: {path} (continue with fit(..., resume='{path}') or "
                        f"`metamtl fit CONFIG --resume {path}`)")
            except CheckpointError as exc:
                note = f"; the checkpoint could not be written: {exc}"
        state.stopped_by = name
        return FitInterrupted(f"{name} received: meta-training stopped after iteration {ln.iteration}{note}",
                              signum, ln.iteration, path)


def interrupt_checkpoint(history: list[dict[str, float]]) -> Path:
    """Where a fit without a checkpoint folder saves on a stop signal (absolute, so right after a
    ``chdir`` too): :data:`INTERRUPT_CHECKPOINT` in the current folder, unless that file holds another
    run (its history is not a prefix of ``history``, the learner's), which is never overwritten: then
    ``metamtl-interrupted-<pid>-<time>.pt`` beside it."""
    path = INTERRUPT_CHECKPOINT.resolve()
    if not path.is_file():
        return path
    try:
        theirs = safe_load(path)
    except CheckpointError:
        return path  # unreadable: nothing a new checkpoint could lose
    if history_continues(history, theirs.get("history", []) if isinstance(theirs, dict) else None):
        return path
    stem, n = f"{path.stem}-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    unique = path.with_name(stem + path.suffix)
    while unique.exists():  # another run of this process stopped in the same second
        unique, n = path.with_name(f"{stem}-{n}{path.suffix}"), n + 1
    return unique
