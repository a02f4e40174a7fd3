"""MetaLearner: the surface users, the CLI, benchmarks and tests share.

``fit`` meta-trains, ``evaluate`` reports mean accuracy with a 95% confidence interval,
``adapt``/``predict`` use the learned initialisation on new tasks, ``preprocess`` turns raw images
into model input exactly as during training, and ``save``/``load`` round-trip everything needed
to use (or resume training) the learner standalone.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed
from .version import __version__
from .adaptation import Adapted, check_positive, task_loss
from .allocator import tune_cpu_allocator
from .algorithms import Algorithm, build_algorithm
from .callbacks import Callback, CallbackList, History, ModelCheckpoint, ProgressBar
from .checkpoint import FORMAT, FORMAT_VERSION, atomic_save, config_diff, safe_load
from .data.augment import SupportAugment
from .heads import ALGORITHM, FeatureHead, build_head, episode_metrics, head_name, query_features
from .data.base import Preprocessing
from .errors import (CheckpointError, ConfigError, FitInterrupted, InputError, MetamtlError, TrainingError,
                     unknown_name)
from .interrupt import StopOnSignal, signal_name
from .models.backbones import TrunkHead
from .models.registry import build_model
from .tasks.episode import Episode, TaskBatch
from .tasks.sampler import TaskSource, episode_generator, task_batches

#: Where ``fit`` saves a resumable checkpoint on SIGINT/SIGTERM when it has no ``checkpoint_dir``.
INTERRUPT_CHECKPOINT = Path("metamtl-interrupted.pt")

#: episodes handed to ``Algorithm.evaluate_episodes`` at once by :meth:`MetaLearner.evaluate`
EVAL_CHUNK = 50
#: ``precision`` settings: float32 everywhere, or bfloat16 autocast (weights stay float32)
PRECISIONS = ("fp32", "bf16")

META_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU (under torchrun: this rank's GPU)."""
    if device is None or device == "auto":
        return distributed.process_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return distributed.process_device(dev)


@dataclasses.dataclass
class EvalResult:
    """Mean query accuracy (and loss) over evaluation episodes, with 95% confidence intervals.

    ``accuracy`` and ``ci95`` are fractions (0.973 means 97.3%); ``ci95`` is
    ``1.96 * std / sqrt(episodes)``.  For regression tasks ``accuracy`` is ``None`` and ``loss``
    is the mean squared error.  ``hierarchy`` is the task source's superclass setting (episodes
    within one superclass, see :class:`~metamtl.tasks.EpisodeSampler`), ``None`` for random classes.
    ``head`` names what classified the queries (``"algorithm"``: the algorithm's own adaptation,
    else a :mod:`metamtl.heads` feature head); ``transductive`` is true when the head used the
    whole query set of each task: such results must not be compared with inductive ones.
    """

    accuracy: float | None
    ci95: float | None
    loss: float
    loss_ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    steps: int
    per_episode_accuracy: list[float] = dataclasses.field(default_factory=list, repr=False)
    per_episode_loss: list[float] = dataclasses.field(default_factory=list, repr=False)
    hierarchy: Any = None
    head: str = ALGORITHM
    transductive: bool = False

    def __str__(self) -> str:
        setting = f"{self.ways}-way {self.shots}-shot" if self.accuracy is not None else f"{self.shots}-shot regression"
        if self.hierarchy is not None:
            setting += " within one superclass"
        if self.head != ALGORITHM:
            setting += f", head {self.head}" + (" (TRANSDUCTIVE)" if self.transductive else "")
        if self.accuracy is None:
            return f"MSE {self.loss:.4f} ± {self.loss_ci95:.4f} ({setting}, {self.episodes} episodes)"
        return (
            f"accuracy {100 * self.accuracy:.2f}% ± {100 * self.ci95:.2f}% "
            f"({setting}, {self.episodes} episodes, 95% CI)"
        )

    def metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss, f"{prefix}loss_ci95": self.loss_ci95}
        if self.accuracy is not None:
            out.update({f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_ci95": self.ci95})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    std = arr.std(ddof=1) if arr.size > 1 else 0.0
    return float(arr.mean()), float(1.96 * std / math.sqrt(arr.size))


class AdaptedPredictor:
    """A learner adapted to one support set. Call it on query inputs to get logits."""

    #: whether a prediction depends on the other queries passed in the same call
    transductive = False

    def __init__(self, learner: "MetaLearner", adapted: Adapted, ways: int) -> None:
        self.learner = learner
        self.adapted = adapted
        self.ways = ways

    @property
    def support_x(self) -> torch.Tensor:
        return self.adapted.support_x

    def __call__(self, query_x: Any) -> torch.Tensor:
        x = self.learner._prepare_inputs(query_x, "query_x")
        with torch.no_grad(), self.learner.autocast():
            return self.adapted(x).detach().float()

    def predict(self, query_x: Any) -> torch.Tensor:
        """Predicted labels ``0..ways-1`` (classification) or values (regression)."""
        out = self(query_x)
        return out.argmax(-1) if self.learner.task == "classification" else out


class HeadPredictor(AdaptedPredictor):
    """A :mod:`metamtl.heads` feature head on one support set's trunk features.

    With a transductive head (:attr:`transductive`), the queries given in one call are classified
    together.
    """

    def __init__(self, learner: "MetaLearner", head: FeatureHead, support_x: torch.Tensor,
                 support_y: torch.Tensor, ways: int) -> None:
        super().__init__(learner, None, ways)  # type: ignore[arg-type]
        self.head, self._support_x, self.support_y = head, support_x, support_y
        self.transductive = head.transductive
        with torch.no_grad(), learner.autocast():
            self.features = learner.model.trunk(support_x)

    @property
    def support_x(self) -> torch.Tensor:
        return self._support_x

    def __call__(self, query_x: Any) -> torch.Tensor:
        x = self.learner._prepare_inputs(query_x, "query_x")
        with torch.no_grad(), self.learner.autocast():
            query = query_features(self.learner.model.trunk, x, self._support_x, self.learner.bn_stats)
        return self.head(self.features, self.support_y, query, self.ways, self.learner.feature_mean()).detach()


class MetaLearner:
    """Meta-train a model with an algorithm, then adapt it to new tasks.

    Args:
        model: a :class:`~metamtl.models.TrunkHead` (e.g. from :func:`metamtl.models.build_model`).
        algorithm: an :class:`~metamtl.algorithms.Algorithm` or its registered name.
        preprocessing: how raw images become model input (taken from the training dataset by
            the CLI); needed by :meth:`preprocess` and saved with the learner.
        meta_optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; ``meta_lr`` its learning rate.
        grad_clip: clip the meta-gradient to this global norm (``None``: no clipping).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        callbacks: callbacks used by every :meth:`fit` call.
        max_bad_steps: consecutive non-finite meta-gradients tolerated (each skipped with a
            warning) before :meth:`fit` stops with :class:`~metamtl.errors.TrainingError`.
        task: ``"classification"`` or ``"regression"``.
        task_defaults: the ways/shots/queries it was trained for (used by ``metamtl evaluate``).
        metadata: free-form, JSON-like information saved with the learner (e.g. data config).
        precision: ``"fp32"`` or ``"bf16"``: run forward and backward passes (training,
            evaluation, adaptation) under bfloat16 autocast; weights, optimizer state and
            gradients stay float32.  About 1.8x faster convolutions on CPUs with AVX512-BF16 or
            AMX and on recent GPUs; accuracy is that of mixed precision, not bit-equal to fp32.
        channels_last: keep 4-D weights and image batches in channels-last memory layout
            (NHWC), which oneDNN (CPU) and cuDNN run faster for most conv nets (1.7x for conv4
            forward+backward on a 2-core CPU, see benchmarks/RESULTS.md). Same mathematics.
        support_augment: test-time support augmentation for :meth:`evaluate`, :meth:`adapt` and
            :meth:`predict` (a :class:`~metamtl.data.augment.SupportAugment` or its settings,
            e.g. ``{"copies": 5, "augment": {"name": "affine"}}``): every support set gets
            augmented copies of its images, with their labels, before adaptation.  Saved with
            the learner; not part of what must match to resume training.
        head: the default way :meth:`evaluate`, :meth:`adapt` and :meth:`predict` classify
            queries: ``None``/``"algorithm"`` (the algorithm's own adaptation) or a
            :mod:`metamtl.heads` feature head (name, ``{"name": ..., **settings}`` or object),
            e.g. ``"simpleshot"``.  Heads that centre features use :attr:`feature_means`
            (:meth:`compute_feature_mean`).  Saved with the learner, as are the means.
    """

    def __init__(
        self,
        model: TrunkHead,
        algorithm: Algorithm | str = "maml",
        *,
        preprocessing: Preprocessing | None = None,
        meta_optimizer: str = "adam",
        meta_lr: float = 1e-3,
        meta_optimizer_kwargs: dict[str, Any] | None = None,
        grad_clip: float | None = None,
        device: str | torch.device | None = "auto",
        callbacks: Iterable[Callback] = (),
        max_bad_steps: int = 10,
        task: str = "classification",
        task_defaults: dict[str, int] | None = None,
        metadata: dict[str, Any] | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        support_augment: Any = None,
        head: Any = None,
    ) -> None:
        if not isinstance(model, TrunkHead):
            raise ConfigError(
                f"MetaLearner needs a metamtl.models.TrunkHead (trunk + head), got {type(model).__name__}; "
                "wrap your network as TrunkHead(trunk, head) or use metamtl.models.build_model"
            )
        if isinstance(algorithm, str):
            algorithm = build_algorithm(algorithm)
        if not isinstance(algorithm, Algorithm):
            raise ConfigError(f"algorithm must be an Algorithm or a name, got {type(algorithm).__name__}")
        if meta_optimizer not in META_OPTIMIZERS:
            raise unknown_name("meta optimizer", meta_optimizer, META_OPTIMIZERS)
        if task not in ("classification", "regression"):
            raise unknown_name("task type", task, ("classification", "regression"))
        if precision not in PRECISIONS:
            raise unknown_name("precision", precision, PRECISIONS)
        if not isinstance(channels_last, bool):
            raise ConfigError(f"channels_last must be true or false, got {channels_last!r}")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            tune_cpu_allocator()  # heap reuse instead of mmap/munmap per step (see metamtl.allocator)
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision 'bf16' needs a GPU with bfloat16 support; use precision 'fp32'")
        self.precision, self.channels_last = precision, channels_last
        algorithm.setup(model)  # model-dependent learnable state, before the meta-optimizer exists
        self.model = model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.algorithm = algorithm.to(self.device)
        self.preprocessing = preprocessing
        self.meta_optimizer_name = meta_optimizer
        self.meta_lr = check_positive("meta_lr", meta_lr)
        self.meta_optimizer_kwargs = dict(meta_optimizer_kwargs or {})
        self.grad_clip = None if grad_clip is None else check_positive("grad_clip", grad_clip)
        self.callbacks = list(callbacks)
        self.max_bad_steps = _check_int("max_bad_steps", max_bad_steps, 1)
        self.task = task
        self.task_defaults = dict(task_defaults or {})
        self.metadata = dict(metadata or {})
        self.support_augment = _support_augment(support_augment)
        self.head = build_head(head)
        #: mean trunk feature of each training dataset (by name), for heads that centre features
        self.feature_means: dict[str, torch.Tensor] = {}
        try:
            self.meta_optimizer = META_OPTIMIZERS[meta_optimizer](
                self.meta_parameters(), lr=self.meta_lr, **self.meta_optimizer_kwargs
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad meta_optimizer_kwargs for {meta_optimizer!r}: {exc}") from None
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.fit_state: dict[str, Any] = {}
        self.should_stop = False
        self.rank, self.world_size = 0, 1
        self._bad_steps = 0
        self._t_start: float | None = None

    # -- small helpers --------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def elapsed(self) -> float:
        """Seconds of meta-training so far (across resumed runs)."""
        base = self.fit_state.get("elapsed", 0.0)
        return base + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def autocast(self) -> torch.autocast:
        """The autocast context of :attr:`precision` (a no-op for ``"fp32"``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def memory_format(self) -> torch.memory_format | None:
        """The layout of image batches given to the model (``None``: leave as they are)."""
        return torch.channels_last if self.channels_last else None

    def _to_device(self, episode: Episode | TaskBatch, non_blocking: bool = False) -> Any:
        """An episode or batch as model input on this learner's device, in its memory layout."""
        return episode.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format)

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the meta-optimizer updates: model weights and learnable algorithm state."""
        seen: set[int] = set()
        params = []
        for p in list(self.model.parameters()) + list(self.algorithm.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def config(self) -> dict[str, Any]:
        """The settings that define this learner (compared when resuming)."""
        return {
            "model": dict(self.model.config),
            "algorithm": self.algorithm.config(),
            "learner": {
                "meta_optimizer": self.meta_optimizer_name,
                "meta_lr": self.meta_lr,
                "meta_optimizer_kwargs": self.meta_optimizer_kwargs,
                "grad_clip": self.grad_clip,
                "max_bad_steps": self.max_bad_steps,
                "task": self.task,
                "precision": self.precision,
                "channels_last": self.channels_last,
            },
        }

    def __repr__(self) -> str:
        return (
            f"MetaLearner(algorithm={self.algorithm.name}, model={self.model.config.get('name', '?')}, "
            f"device={self.device}, iteration={self.iteration})"
        )

    # -- training -----------------------------------------------------------------------------
    def fit(
        self,
        train_tasks: TaskSource,
        val_tasks: TaskSource | None = None,
        iterations: int = 1000,
        meta_batch_size: int = 32,
        *,
        val_every: int | None = None,
        val_episodes: int = 100,
        num_workers: int = 0,
        callbacks: Iterable[Callback] = (),
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 100,
        resume: str | Path | None = None,
        budget_minutes: float | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Meta-train for ``iterations`` meta-batches of ``meta_batch_size`` tasks.

        Args:
            train_tasks: task source for meta-training (e.g. an ``EpisodeSampler``).
            val_tasks: task source for validation every ``val_every`` iterations
                (``val_episodes`` fixed episodes, so validation numbers are comparable).
            num_workers: DataLoader worker processes building episodes (0: in-process).
            callbacks: extra callbacks for this call (see :mod:`metamtl.callbacks`).
            checkpoint_dir: write ``last.pt`` every ``checkpoint_every`` iterations and
                ``best.pt`` on the best validation accuracy.
            resume: a checkpoint written with training state; training continues exactly
                where it stopped (same episodes, optimizer and RNG state).
            budget_minutes: stop meta-training once this much wall-clock time is spent.

        Faults (see docs/reliability.md): on SIGINT (Ctrl-C) or SIGTERM, fit finishes the
        iteration in progress, saves a resumable checkpoint (``checkpoint_dir/last.pt``, else
        :data:`INTERRUPT_CHECKPOINT` in the current folder) and raises
        :class:`~metamtl.errors.FitInterrupted`; a second signal aborts at once.  A step whose loss
        or meta-gradient is not finite is skipped with a warning; ``max_bad_steps`` consecutive
        ones raise :class:`~metamtl.errors.TrainingError`, keeping the last good parameters (also
        saved to ``last.pt`` with a ``checkpoint_dir``).

        Under ``torchrun`` every rank calls ``fit`` with the same arguments; ranks share each
        meta-batch and average meta-gradients (see :mod:`metamtl.distributed`).
        Returns:
            ``self.history``: one row per iteration/validation.
        """
        _check_int("iterations", iterations, 0)
        _check_int("meta_batch_size", meta_batch_size, 1)
        _check_int("val_episodes", val_episodes, 1)
        _check_int("checkpoint_every", checkpoint_every, 0)
        _check_int("num_workers", num_workers, 0)
        if val_every is not None:
            _check_int("val_every", val_every, 1)
        _check_task_source("train_tasks", train_tasks)
        if val_tasks is not None:
            _check_task_source("val_tasks", val_tasks)
        if budget_minutes is not None:
            check_positive("budget_minutes", budget_minutes)
        fit_settings = {"meta_batch_size": meta_batch_size, "train_tasks": repr(train_tasks)}
        if resume is not None:
            self._resume(resume, fit_settings)
            self.fit_state.pop("stopped_by", None)
        else:
            self.fit_state = {"elapsed": 0.0}
        self.fit_state.update(iterations=iterations, settings=fit_settings)
        distributed.init_distributed(self.device)
        self.rank, self.world_size = distributed.world()
        if self.world_size > 1:
            distributed.sync_start(self, fit_settings)
        val_every = val_every or max(1, iterations // 10)

        self.fit_state["val_every"] = val_every if val_tasks is not None else None
        self.fit_state["budget_minutes"] = budget_minutes

        cbs: list[Callback] = [History()]
        if progress:
            cbs.append(ProgressBar())
        if checkpoint_dir is not None:
            cbs.append(ModelCheckpoint(checkpoint_dir, every=checkpoint_every))
        cbs += self.callbacks + list(callbacks)
        # Checkpoints are written after every other callback has updated its state.
        cbs.sort(key=lambda cb: isinstance(cb, ModelCheckpoint))
        self._callbacks = CallbackList(cbs)
        if resume is not None:
            self._callbacks.load_state_dict(self.fit_state.pop("callbacks", {}))

        self.should_stop = stop = False
        self._t_start = time.perf_counter()
        batches = task_batches(
            train_tasks, meta_batch_size, start_batch=self.iteration, num_workers=num_workers,
            rank=self.rank, world_size=self.world_size, pin_memory=self.device.type == "cuda",
        )
        signals = StopOnSignal(lambda: self.iteration).install()  # Ctrl-C / SIGTERM: stop cleanly
        try:
            self._callbacks.on_fit_start(self)
            while self.iteration < iterations and not stop:
                batch = next(batches)
                for episode in batch:
                    self._check_episode(episode, "fit")
                batch = self._to_device(batch, non_blocking=True)
                self._callbacks.on_iteration_start(self)
                metrics = self._train_step(batch)
                self.iteration += 1
                self._callbacks.on_iteration_end(self, metrics)
                if val_tasks is not None and (self.iteration % val_every == 0 or self.iteration == iterations):
                    result = self.evaluate(val_tasks, val_episodes, progress=False, head=ALGORITHM)
                    self._callbacks.on_validation_end(self, result.metrics("val/"))
                self._callbacks.on_iteration_complete(self)
                stop = self.should_stop
                out_of_time = budget_minutes is not None and self.elapsed >= 60.0 * budget_minutes
                interrupted = signals.requested
                if self.world_size > 1:  # every rank stops at the same iteration
                    stop, out_of_time, interrupted = distributed.any_rank(
                        stop, out_of_time, interrupted, what=f"stop check (iteration {self.iteration})")
                    self.should_stop = self.should_stop or stop
                if interrupted:
                    raise self._interrupted(signals.signum or signal.SIGTERM)
                if out_of_time:
                    self.fit_state["stopped_by"] = "budget"
                    break
            if signals.requested:
                raise self._interrupted(signals.signum)
            self._callbacks.on_fit_end(self)
        except BaseException as exc:
            self._callbacks.on_exception(self, exc)
            raise
        finally:
            signals.restore()
            self.fit_state["elapsed"] = self.elapsed
            self._t_start = None
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self.history

    def _interrupted(self, signum: int) -> FitInterrupted:
        """After a stop signal: save a resumable checkpoint, return the exception fit raises.

        The checkpoint is ``last.pt`` of the fit's :class:`ModelCheckpoint` (``checkpoint_dir``)
        or, without one, :data:`INTERRUPT_CHECKPOINT` in the current folder.
        """
        name = signal_name(signum)
        self.fit_state["stopped_by"] = name
        path, note = None, ""
        if self.is_main_process:
            target = next((cb.last_path for cb in self._callbacks if isinstance(cb, ModelCheckpoint)), None)
            try:
                path = self.save(target or INTERRUPT_CHECKPOINT, training_state=True)
                note = (f"; resumable checkpoint: {path} (continue with fit(..., resume='{path}') or "
                        f"`metamtl fit CONFIG --resume {path}`)")
            except CheckpointError as exc:
                note = f"; the checkpoint could not be written: {exc}"
        return FitInterrupted(f"{name} received: meta-training stopped after iteration {self.iteration}{note}",
                              signum, self.iteration, path)

    def _train_step(self, batch: TaskBatch) -> dict[str, float]:
        self.model.train()
        self.meta_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            metrics = self.algorithm.meta_step(self.model, batch)
        metrics = self._reduce_gradients(metrics, len(batch))
        self._callbacks.on_after_backward(self)
        params = [p for p in self.meta_parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        finite = bool(torch.isfinite(norm)) and math.isfinite(metrics.get("loss", 0.0))
        if not finite:
            self._bad_steps += 1
            self.meta_optimizer.zero_grad(set_to_none=True)
            warnings.warn(
                f"iteration {self.iteration + 1}: non-finite loss or meta-gradient; step skipped "
                f"({self._bad_steps}/{self.max_bad_steps} consecutive)", RuntimeWarning, stacklevel=2,
            )
            if self._bad_steps >= self.max_bad_steps:
                raise TrainingError(
                    f"{self._bad_steps} consecutive non-finite meta-gradients; stopping with the last "
                    "good parameters. Lower the learning rates or enable grad_clip."
                )
            return {**metrics, "skipped": 1.0}
        self._bad_steps = 0
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.meta_optimizer.step()
        metrics["grad_norm"] = float(norm)
        metrics["lr"] = float(self.meta_optimizer.param_groups[0]["lr"])
        return metrics

    def _reduce_gradients(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """Average meta-gradients and metrics across processes (``weight``: this rank's tasks)."""
        if self.world_size == 1:
            return metrics
        return distributed.reduce_meta_gradients(self.meta_parameters(), metrics, weight, iteration=self.iteration)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(
        self,
        tasks: TaskSource | Sequence[Episode],
        episodes: int = 600,
        *,
        ways: int | None = None,
        shots: int | None = None,
        queries: int | None = None,
        steps: int | None = None,
        start: int = 0,
        progress: bool = True,
        support_augment: Any = None,
        head: Any = None,
    ) -> EvalResult:
        """Mean query accuracy over ``episodes`` fixed episodes, with a 95% confidence interval.

        Args:
            tasks: a task source (episodes ``start .. start+episodes-1`` are used, so repeated
                evaluations see the same tasks) or a list of episodes.
            ways, shots, queries: evaluate another setting of the same source
                (e.g. 20-way with a learner trained 5-way; needs per-task heads).
            steps: inner steps (default: the algorithm's ``eval_steps``, else its ``steps``).
            support_augment: test-time support augmentation for this call (default: the
                learner's :attr:`support_augment`; ``False``: none).  Episode ``i``'s copies are
                drawn from a generator seeded by the augmentation's seed and ``i``.
            head: what classifies the queries (default: the learner's :attr:`head`;
                ``"algorithm"``: the algorithm's adaptation; or a :mod:`metamtl.heads` head).

        After a ``fit`` under torchrun, call it on every rank: ranks split the episodes and
        gather the per-episode results, so every rank gets the single-process result.
        """
        _check_steps(steps)
        if isinstance(tasks, (list, tuple)):
            episode_at = tasks.__getitem__
            n = len(tasks)
            if not all(isinstance(e, Episode) for e in tasks):
                raise ConfigError("evaluate needs a task source or a list of Episode objects")
        else:
            _check_task_source("tasks", tasks)
            if any(v is not None for v in (ways, shots, queries)):
                if not hasattr(tasks, "with_settings"):
                    raise ConfigError(f"{type(tasks).__name__} cannot change ways/shots/queries")
                kw = {k: v for k, v in dict(ways=ways, shots=shots, queries=queries).items() if v is not None}
                tasks = tasks.with_settings(**kw)
            if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
                raise ConfigError(f"episodes must be an integer >= 1, got {episodes!r}")
            n = episodes
            episode_at = lambda i: tasks.episode(start + i)  # noqa: E731
        if steps is None:
            steps = self.algorithm.eval_steps
        tta = self.support_augment if support_augment is None else _support_augment(support_augment)
        head = self.head if head is None else build_head(head)
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        rows: list[tuple[int, tuple[dict[str, float], tuple[int, int, int]]]] = []
        mine = list(range(self.rank, n, self.world_size))  # this rank's share (all in one process)
        bar = tqdm(total=len(mine), desc="evaluate", leave=False,
                   disable=not progress or not self.is_main_process, dynamic_ncols=True)
        try:  # a chunk of episodes at a time: the algorithm may adapt them together (fast path)
            for lo in range(0, len(mine), EVAL_CHUNK):
                part = mine[lo:lo + EVAL_CHUNK]
                eps = [episode_at(i) for i in part]
                metrics = self._evaluate_chunk(eps, steps, tta, head)
                rows += [(i, (m, (e.ways, e.shots, e.queries))) for i, e, m in zip(part, eps, metrics)]
                bar.update(len(part))
        finally:
            bar.close()
            self.model.train(was_training)
        results = distributed.gather_ordered(rows) if self.world_size > 1 else [r for _, r in rows]
        if not results:
            raise ConfigError("no episodes to evaluate")
        losses = [m["loss"] for m, _ in results]
        accs = [m["accuracy"] for m, _ in results if "accuracy" in m]
        acc, ci = mean_ci95(accs) if accs else (None, None)
        loss, loss_ci = mean_ci95(losses)
        return EvalResult(acc, ci, loss, loss_ci, len(losses), *results[0][1], int(steps), accs, losses,
                          hierarchy=_hierarchy_of(tasks), head=head_name(head),
                          transductive=bool(head is not None and head.transductive))

    def _evaluate_chunk(self, episodes: list[Episode], steps: int, tta: Any, head: FeatureHead | None) -> list[dict]:
        """Per-episode query metrics: the algorithm adapts (several at once on its fast path), or a
        feature head classifies trunk features."""
        for ep in episodes:
            self._check_episode(ep, "evaluate")
        with self.autocast():
            inputs = [self._with_support_copies(self._to_device(e), tta) for e in episodes]
            if head is None:
                return self.algorithm.evaluate_episodes(self.model, inputs, steps)
            return episode_metrics(head, self.model.trunk, inputs, self.bn_stats, lambda e: self.feature_mean(e.dataset))

    @property
    def bn_stats(self) -> str:
        """Whose BatchNorm statistics query features use (the algorithm's ``bn_stats``)."""
        return self.algorithm.config().get("bn_stats", "transductive")

    def feature_mean(self, dataset: str | None = None) -> torch.Tensor | None:
        """The training split's mean trunk feature for ``dataset`` (the only one if there is one)."""
        if dataset in self.feature_means:
            return self.feature_means[dataset].to(self.device)
        if len(self.feature_means) == 1:
            return next(iter(self.feature_means.values())).to(self.device)
        return None

    def compute_feature_mean(self, source: Any, max_images: int = 10_000, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Mean trunk feature of the training images, for heads that centre features (SimpleShot).

        ``source``: the training tasks (an ``EpisodeSampler``, a ``MixedTasks`` of them: one mean
        per dataset) or a ``ClassDataset``.  At most ``max_images`` images (a seeded random
        subset) are forwarded in batches of ``batch_size``.  Stored in :attr:`feature_means`
        (saved with the learner) and returned.
        """
        _check_int("max_images", max_images, 1)
        _check_int("batch_size", batch_size, 1)
        sources = getattr(source, "sources", [source])
        was_training = self.model.training
        self.model.eval()
        try:
            for src in sources:
                data = getattr(src, "dataset", src)
                if not hasattr(data, "images") or not hasattr(data, "preprocessing"):
                    raise ConfigError(f"compute_feature_mean needs training tasks or a ClassDataset, got {type(src).__name__}")
                self.feature_means[getattr(src, "name", data.name)] = self._mean_feature(data, max_images, batch_size)
        finally:
            self.model.train(was_training)
        return dict(self.feature_means)

    def _mean_feature(self, data: Any, max_images: int, batch_size: int) -> torch.Tensor:
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:max_images]
        total = None
        for lo in range(0, len(rows), batch_size):
            x = data.images.index_select(0, rows[lo:lo + batch_size])
            x = data.preprocessing.normalize(x) if data.preprocessing is not None else x.float()
            x = x.to(self.device)
            if self.memory_format is not None and x.dim() == 4:
                x = x.contiguous(memory_format=self.memory_format)
            with torch.no_grad(), self.autocast():
                part = self.model.trunk(x).float().sum(0)
            total = part if total is None else total + part
        return (total / len(rows)).cpu()

    def _with_support_copies(self, episode: Episode, tta: Any) -> Episode:
        """``episode`` (model input) with :class:`SupportAugment` copies in its support set."""
        if tta is None:
            return episode
        g = episode_generator(tta.seed, max(episode.index, 0), stream=3)
        x, y = tta.expand(episode.support_x, episode.support_y, g)
        return dataclasses.replace(episode, support_x=x, support_y=y, shots=episode.shots * tta.copies)

    # -- using the learner --------------------------------------------------------------------
    def preprocess(self, images: Any) -> torch.Tensor:
        """Raw images (PIL images or arrays, one or a list) -> model input ``[N, C, H, W]``.

        Applies exactly the decoding (resize, colour mode, inversion) and normalisation used for
        the training data.
        """
        if self.preprocessing is None:
            raise ConfigError(
                "this learner has no preprocessing: pass preprocessing=dataset.preprocessing when "
                "creating it (the CLI does), or give model-ready float tensors"
            )
        return self.preprocessing(images)

    def _prepare_inputs(self, x: Any, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype == torch.uint8:
            if self.preprocessing is None and isinstance(x, np.ndarray) and x.dtype != np.uint8:
                x = torch.as_tensor(x, dtype=torch.float32)
            else:
                x = self.preprocess(x)
        elif not x.is_floating_point():
            raise InputError(f"{what} must be float model input, uint8 images or raw images; got {x.dtype}")
        x = x.to(self.device, torch.float32)
        if self.memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        try:
            self.model.check_input(x)
        except InputError as exc:
            raise InputError(
                f"{what}: {exc}; give raw images (PIL images or arrays, preprocessed like the training "
                "data) or the output of MetaLearner.preprocess()"
            ) from None
        if not torch.isfinite(x).all():
            raise InputError(f"{what} contains NaN or infinite values")
        return x

    def _check_episode(self, episode: Episode, what: str) -> None:
        """Refuse, with a clear message, an episode this learner cannot train or evaluate on."""
        if not isinstance(episode, Episode):
            raise InputError(f"{what}: the task source returned {type(episode).__name__}, not an Episode")
        where = f"{what}: episode {episode.index}" + (f" of {episode.dataset!r}" if episode.dataset else "")
        episode.validate()
        if episode.task != self.task:
            raise InputError(f"{where} is a {episode.task} task but this learner does {self.task}")
        if episode.query_x.shape[0] == 0:
            raise InputError(f"{where} has no query examples; {what} needs queries >= 1 per class "
                             "(the query loss is what meta-training optimises and evaluation measures)")
        try:
            self.model.check_input(episode.support_x)
        except InputError as exc:
            raise InputError(
                f"{where}: the data does not fit the model: {exc}. Build the model for this data "
                "(e.g. conv4 in_channels/image_size) or load the data at the model's size (image_size=)"
            ) from None

    def _prepare_labels(self, y: Any, n: int) -> tuple[torch.Tensor, int]:
        try:
            y = torch.as_tensor(y, device=self.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"support_y must be labels 0..N-1 (a list, array or tensor of integers), got {y!r:.80}: {exc}") from None
        if y.dim() != 1 and not (self.task == "regression" and y.dim() == 2):
            raise InputError(f"support_y must be a 1-D tensor of labels, got shape {list(y.shape)}")
        if y.shape[0] != n:
            raise InputError(f"support_x has {n} examples but support_y has {y.shape[0]} labels")
        if self.task == "regression":
            return y.float().view(n, -1), 1
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise InputError("support_y must hold integer class labels 0..N-1")
            y = y.long()
        y = y.long()
        if n == 0 or int(y.min()) < 0:
            raise InputError(f"support labels must be integers in 0..N-1, got {sorted(set(y.tolist()))}")
        ways = int(y.max()) + 1
        missing = sorted(set(range(ways)) - set(y.tolist()))
        if missing:
            raise InputError(
                f"support labels must cover every class 0..{ways - 1}; class(es) {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''} have no "
                "support example (relabel classes to 0..N-1)"
            )
        return y, ways

    def adapt(self, support_x: Any, support_y: Any, steps: int | None = None,
              support_augment: Any = None, head: Any = None) -> AdaptedPredictor:
        """Adapt to a support set; returns a predictor for query inputs.

        ``support_x`` may be model input (float tensor), stored ``uint8`` images, or raw images
        (PIL / arrays), which are preprocessed; ``support_y`` holds labels ``0..N-1``.
        ``support_augment`` and ``head``: as in :meth:`evaluate` (support copies drawn from the
        augmentation's seed; a feature head gives a :class:`HeadPredictor`).
        """
        _check_steps(steps)
        x = self._prepare_inputs(support_x, "support_x")
        y, ways = self._prepare_labels(support_y, x.shape[0])
        tta = self.support_augment if support_augment is None else _support_augment(support_augment)
        if tta is not None:
            x, y = tta.expand(x, y, episode_generator(tta.seed, 0, stream=3))
        head = self.head if head is None else build_head(head)
        if head is not None:
            if self.task != "classification":
                raise ConfigError(f"feature head {head.name!r} classifies; this learner does {self.task}")
            self.model.eval()
            return HeadPredictor(self, head, x, y, ways)
        self.model.eval()
        with torch.no_grad(), self.autocast():
            adapted = self.algorithm.adapt(self.model, x, y, ways, steps)
        return AdaptedPredictor(self, adapted, ways)

    def predict(self, support_x: Any, support_y: Any, query_x: Any, steps: int | None = None,
                support_augment: Any = None, head: Any = None) -> torch.Tensor:
        """Logits for ``query_x`` after adapting to ``(support_x, support_y)`` (with a transductive
        head, the queries are classified together)."""
        predictor = self.adapt(support_x, support_y, steps, support_augment=support_augment, head=head)
        q = self._prepare_inputs(query_x, "query_x")
        if q.shape[1:] != predictor.support_x.shape[1:]:
            raise InputError(
                f"query images have shape {list(q.shape[1:])} but support images {list(predictor.support_x.shape[1:])}"
            )
        return predictor(q)

    # -- persistence --------------------------------------------------------------------------
    def state(self, training_state: bool = False) -> dict[str, Any]:
        """Everything :meth:`save` writes (tensors and plain containers only)."""
        if not self.model.config.get("name"):
            raise CheckpointError(
                "the model has no config (build it with metamtl.models.build_model); "
                "it could not be rebuilt on load"
            )
        obj: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "metamtl_version": __version__,
            "config": self.config(),
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "algorithm_state": {k: v.detach().cpu() for k, v in self.algorithm.state_dict().items()},
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
            "task_defaults": dict(self.task_defaults),
            "metadata": dict(self.metadata),
            "iteration": self.iteration,
            "history": list(self.history),
            "evaluation": {
                "support_augment": self.support_augment.config() if self.support_augment else None,
                "head": self.head.config() if self.head is not None else None,
                "feature_means": {k: v.detach().cpu() for k, v in self.feature_means.items()},
            },
        }
        if training_state:
            obj["training"] = {
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "fit_state": {k: v for k, v in self.fit_state.items() if k != "callbacks"},
                "callbacks": self._callbacks.state_dict() if hasattr(self, "_callbacks") else {},
                "elapsed": self.elapsed,
                "bad_steps": self._bad_steps,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": _numpy_state(),
                    "python": _python_state(),
                },
            }
        return obj

    def save(self, path: str | Path, training_state: bool = False) -> Path:
        """Write the learner to ``path`` atomically.

        With ``training_state=True`` the file also holds the meta-optimizer, RNG and callback
        states so ``fit(resume=path)`` continues exactly.
        """
        return atomic_save(self.state(training_state), path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = "auto",
             model: TrunkHead | None = None) -> "MetaLearner":
        """Rebuild a learner saved with :meth:`save` (weights-only, safe loading)."""
        obj = _require(safe_load(path), path, "config", "model_state", "algorithm_state")
        cfg = obj["config"]
        try:
            if model is None:
                model = build_model(**cfg["model"])
            elif model.config.get("name") and config_diff(cfg["model"], model.config):
                raise CheckpointError(
                    f"{path} holds a different model than the one given:\n  "
                    + "\n  ".join(config_diff(cfg["model"], model.config))
                )
            model.load_state_dict(obj["model_state"])
            algorithm = build_algorithm(**cfg["algorithm"])
            algorithm.setup(model)
            algorithm.load_state_dict(obj["algorithm_state"])
            prep = obj.get("preprocessing")
            learner = cls(
                model, algorithm, preprocessing=Preprocessing.from_dict(prep) if prep else None,
                device=device, task_defaults=obj.get("task_defaults"), metadata=obj.get("metadata"),
                **dict(cfg["learner"]),
            )
            learner.iteration = int(obj.get("iteration", 0))
            learner.history = list(obj.get("history", []))
            evaluation = obj.get("evaluation") or {}
            learner.support_augment = _support_augment(evaluation.get("support_augment"))
            learner.head = build_head(evaluation.get("head"))
            learner.feature_means = dict(evaluation.get("feature_means") or {})
        except CheckpointError:
            raise
        except (MetamtlError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{path} does not match this metamtl version's models and settings "
                f"(written by metamtl {obj.get('metamtl_version', '?')}, this is {__version__}): {exc}"
            ) from exc
        learner._checkpoint = obj  # kept for resume
        return learner

    def _resume(self, path: str | Path, fit_settings: dict[str, Any]) -> None:
        obj = safe_load(path)
        if "training" not in obj:
            raise CheckpointError(f"{path} holds no training state (saved without training_state=True); cannot resume")
        _require(obj, path, "config", "model_state", "algorithm_state", "iteration")
        if not isinstance(obj["training"], dict) or not isinstance(obj["config"], dict) or not isinstance(
            obj["training"].get("fit_state"), dict
        ):
            raise CheckpointError(f"{path}: damaged checkpoint (training state or config is not a mapping)")
        diff = config_diff(obj["config"], self.config())
        if diff:
            raise CheckpointError(f"cannot resume from {path}: its config differs from this learner's:\n  " + "\n  ".join(diff))
        tr = obj["training"]
        old_settings = tr.get("fit_state", {}).get("settings", {})
        sdiff = config_diff(old_settings, fit_settings)
        if sdiff:
            raise CheckpointError(f"cannot resume from {path}: fit settings differ:\n  " + "\n  ".join(sdiff))
        backup = self._snapshot()
        try:
            self._restore(obj, tr)
        except Exception as exc:  # whatever a damaged file makes torch/numpy raise: roll back
            self._restore(*backup)
            raise CheckpointError(
                f"{path}: damaged checkpoint or one from an incompatible metamtl version "
                f"({type(exc).__name__}: {exc}); nothing was changed"
            ) from exc

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """A deep copy of the training state, in the layout :meth:`_restore` reads."""
        obj = {"model_state": self.model.state_dict(), "algorithm_state": self.algorithm.state_dict(),
               "iteration": self.iteration, "history": self.history}
        tr = {"meta_optimizer": self.meta_optimizer.state_dict(),
              "fit_state": {k: v for k, v in self.fit_state.items() if k != "callbacks"},
              "callbacks": self.fit_state.get("callbacks", {}), "elapsed": self.fit_state.get("elapsed", 0.0),
              "bad_steps": self._bad_steps,
              "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}}
        return copy.deepcopy(obj), copy.deepcopy(tr)

    def _restore(self, obj: dict[str, Any], tr: dict[str, Any]) -> None:
        self.model.load_state_dict(obj["model_state"])
        self.algorithm.load_state_dict(obj["algorithm_state"])
        self.meta_optimizer.load_state_dict(tr["meta_optimizer"])
        self.iteration = int(obj["iteration"])
        self.history = list(obj.get("history", []))
        self._bad_steps = int(tr.get("bad_steps", 0))
        self.fit_state = dict(tr["fit_state"])
        self.fit_state["elapsed"] = float(tr.get("elapsed", 0.0))
        self.fit_state["callbacks"] = tr.get("callbacks", {})
        rng = tr["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_state(rng["numpy"])
        _set_python_state(rng["python"])


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _require(obj: dict[str, Any], path: Any, *keys: str) -> dict[str, Any]:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is damaged or not a learner checkpoint: it lacks {', '.join(missing)}")
    return obj


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _hierarchy_of(tasks: Any) -> Any:
    """A source's superclass setting for results (a mapping is summarised by its size)."""
    h = getattr(tasks, "hierarchy", None)
    return f"mapping of {len(h)} classes" if isinstance(h, dict) else h


def _support_augment(spec: Any) -> SupportAugment | None:
    """A :class:`SupportAugment` from itself, its settings mapping, or ``None``/``False`` (none)."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, SupportAugment):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"support_augment must be a mapping such as {{copies: 5, augment: {{name: affine}}}}, "
                          f"a SupportAugment or null; got {spec!r}")
    unknown = sorted(set(spec) - {"augment", "copies", "seed"})
    if unknown:
        raise ConfigError(f"unknown support_augment key {unknown[0]!r}; valid keys: augment, copies, seed")
    return SupportAugment(**spec)


def _check_steps(steps: Any) -> None:
    if steps is not None:
        _check_int("steps", steps, 0)


def _check_task_source(name: str, tasks: Any) -> None:
    if not isinstance(tasks, TaskSource):
        hint = " (wrap it: EpisodeSampler(dataset, ways, shots, queries))" if hasattr(tasks, "class_counts") else ""
        raise ConfigError(
            f"{name} must be a task source with .episode(index) and ways/shots/queries, such as "
            f"metamtl.tasks.EpisodeSampler; got {type(tasks).__name__}{hint}"
        )
