"""MetaLearner: the surface users, the CLI, benchmarks and tests share.

``fit`` meta-trains, ``evaluate`` reports mean accuracy with a 95% confidence interval,
``adapt``/``predict`` use the learned initialisation on new tasks, ``preprocess`` turns raw images
into model input exactly as during training, and ``save``/``load`` round-trip everything needed
to use (or resume training) the learner standalone.

It is a facade over parts that each do one thing: :mod:`~metamtl.placement` (device, precision,
layout), :mod:`~metamtl.fit_loop` (the training loop), :mod:`~metamtl.run_state` (what a
checkpoint holds, resume, trunk initialisation), :mod:`~metamtl.inputs` (what the learner accepts),
:mod:`~metamtl.predictors` (``adapt``/``predict``), :mod:`~metamtl.evaluation` and
:mod:`~metamtl.distributed` (several processes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import distributed, inputs, predictors, run_state
from .adaptation import check_positive
from .algorithms import Algorithm
from .callbacks import Callback, CallbackList, FitState, check_callbacks, standard_callbacks
from .checkpoint import atomic_save, safe_load
from .data.base import Preprocessing
from .evaluation import (EvalResult, episode_reader, evaluate_episodes, feature_means, hierarchy_of, mean_ci95,
                         means_follow_trunk, scorer)
from .fit_loop import (CHECKPOINT_EVERY, INTERRUPT_CHECKPOINT, META_OPTIMIZERS, VAL_EPISODES, FitLoop,
                       build_meta_optimizer, check_fit_arguments, fit_settings, set_meta_lr, start_run)
from .heads import head_name
from .inference import InferenceSettings
from .inputs import check_int, check_mapping, check_steps
from .models.backbones import TrunkHead
from .numerics import check_learner_weights
from .placement import PRECISIONS, LayoutProbe, Placement, resolve_device
from .predictors import AdaptedPredictor, HeadPredictor
from .tasks.episode import Episode
from .tasks.sampler import TaskSource

__all__ = ["MetaLearner", "AdaptedPredictor", "HeadPredictor", "EvalResult", "mean_ci95", "resolve_device",
           "META_OPTIMIZERS", "PRECISIONS", "INTERRUPT_CHECKPOINT"]


class MetaLearner:
    """Meta-train a model with an algorithm, then adapt it to new tasks.

    Args:
        model: a :class:`~metamtl.models.TrunkHead` (e.g. from :func:`metamtl.models.build_model`).
        algorithm: an :class:`~metamtl.algorithms.Algorithm` or its registered name.
        preprocessing: how raw images become model input (taken from the training dataset by
            the CLI); needed by :meth:`preprocess` and saved with the learner.
        meta_optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``; ``meta_lr``, ``meta_optimizer_kwargs``: its settings.
        grad_clip: clip the meta-gradient to this global norm (``None``: no clipping).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        callbacks: callbacks used by every :meth:`fit` call.
        max_bad_steps: consecutive non-finite meta-gradients tolerated (each skipped with a
            warning) before :meth:`fit` stops with :class:`~metamtl.errors.TrainingError`.
        task: ``"classification"`` or ``"regression"``.
        task_defaults: the ways/shots/queries it was trained with (saved; not evaluate's defaults).
        metadata: free-form, JSON-like information saved with the learner (e.g. data config).
        precision: ``"fp32"``, ``"bf16"`` (autocast; weights, optimizer state, gradients stay float32)
            or ``"auto"`` (bf16 where the device has it natively: :func:`~metamtl.placement.native_bf16`).
        channels_last: 4-D weights and image batches in NHWC layout (same maths, different speed);
            ``None`` (default): for conv models on the CPU, timed in both layouts on the first
            meta-batch of each workload (:func:`~metamtl.fit_loop.choose_layout`); NCHW for other models and on GPUs.
            ``True``/``False`` force one (bit-identical runs: the layouts sum in different orders).
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

    @torch.inference_mode(False)  # built in a serving context: weights that can still adapt and train
    def __init__(self, model: TrunkHead, algorithm: Algorithm | str = "maml", *,
                 preprocessing: Preprocessing | None = None, meta_optimizer: str = "adam", meta_lr: float = 1e-3,
                 meta_optimizer_kwargs: dict[str, Any] | None = None, grad_clip: float | None = None,
                 device: str | torch.device | None = "auto", callbacks: Iterable[Callback] = (),
                 max_bad_steps: int = 10, task: str = "classification", task_defaults: dict[str, int] | None = None,
                 metadata: dict[str, Any] | None = None, precision: str = "fp32", channels_last: bool | None = None,
                 support_augment: Any = None, head: Any = None) -> None:
        model, algorithm = inputs.check_learner_parts(model, algorithm, task)
        self.placement = Placement.create(device, precision, channels_last, model)
        algorithm.setup(model)  # model-dependent learnable state, before the meta-optimizer exists
        self.model = self.placement.module(model)
        self.algorithm = algorithm.to(self.device)
        self.preprocessing, self.task, self.run = preprocessing, task, run_state.RunState()
        self.meta_optimizer_name, self.meta_optimizer_kwargs = meta_optimizer, dict(meta_optimizer_kwargs or {})
        self.meta_lr = meta_lr  # checked by the setter
        self.grad_clip = None if grad_clip is None else check_positive("grad_clip", grad_clip)
        self.callbacks = check_callbacks(callbacks, "MetaLearner(callbacks=...)")
        self.max_bad_steps = check_int("max_bad_steps", max_bad_steps, 1)
        self.task_defaults, self.metadata = check_mapping("task_defaults", task_defaults), check_mapping("metadata", metadata)
        self.inference = InferenceSettings.create(support_augment, head, task=task)
        self.meta_optimizer = build_meta_optimizer(meta_optimizer, self.meta_parameters(), self.meta_lr, self.meta_optimizer_kwargs)
        self.strategy = distributed.ProcessStrategy()  # fit switches to the process group under torchrun
        self.fit_state: FitState | None = None  # the last (or running) fit's state
        #: how an automatic layout is timed (:func:`~metamtl.fit_loop.choose_layout`)
        self.layout_probe = LayoutProbe()

    # -- small helpers --------------------------------------------------------------------------
    device = property(lambda self: self.placement.device, doc="The device weights and inputs live on.")
    precision = property(lambda self: self.placement.precision, doc='``"fp32"`` or ``"bf16"`` (as chosen).')
    channels_last = property(lambda self: self.placement.channels_last, doc="NHWC memory layout (now).")
    memory_format = property(lambda self: self.placement.memory_format, doc="Layout of image batches.")
    elapsed = property(lambda self: self.run.elapsed, doc="Seconds of meta-training (all fit calls, resumes).")
    rank = property(lambda self: self.strategy.rank, doc="This process's rank (0 without torchrun).")
    world_size = property(lambda self: self.strategy.world_size, doc="Processes training together.")
    is_main_process = property(lambda self: self.strategy.is_main_process, doc="Rank 0: prints and saves.")

    meta_lr = property(lambda self: self._meta_lr, set_meta_lr, doc="The meta-optimizer's rate (set: every group's, checked).")
    iteration = property(lambda self: self.run.iteration, doc="Completed meta-iterations.")
    history = property(lambda self: self.run.history, doc="One row per logged iteration / validation (saved).")
    support_augment = property(lambda self: self.inference.support_augment, doc="Default support augmentation.")
    head = property(lambda self: self.inference.head, doc="Default feature head (None: the algorithm's own).")
    feature_means = property(lambda self: self.inference.feature_means, doc="Training features' means by dataset.")
    bn_stats = property(lambda self: self.algorithm.config().get("bn_stats", "transductive"),
                        doc="Whose BatchNorm statistics query features use (the algorithm's ``bn_stats``).")

    def autocast(self) -> torch.autocast:
        """The autocast context of :attr:`precision` (a no-op for ``"fp32"``)."""
        return self.placement.autocast()

    def meta_parameters(self) -> list[nn.Parameter]:
        """Everything the meta-optimizer updates: model weights and learnable algorithm state."""
        params = {id(p): p for p in [*self.model.parameters(), *self.algorithm.parameters()] if p.requires_grad}
        return list(params.values())

    def config(self) -> dict[str, Any]:
        """The settings that define this learner (compared when resuming)."""
        learner = {"meta_optimizer": self.meta_optimizer_name, "meta_lr": self.meta_lr,
                   "meta_optimizer_kwargs": self.meta_optimizer_kwargs, "grad_clip": self.grad_clip,
                   "max_bad_steps": self.max_bad_steps, "task": self.task, "precision": self.placement.precision_setting,
                   "channels_last": self.placement.layout_setting}
        return {"model": dict(self.model.config), "algorithm": self.algorithm.config(), "learner": learner}

    def __repr__(self) -> str:
        return (f"MetaLearner(algorithm={self.algorithm.name}, model={self.model.config.get('name', '?')}, "
                f"device={self.device}, iteration={self.iteration})")

    # -- training -----------------------------------------------------------------------------
    def fit(self, train_tasks: TaskSource, val_tasks: TaskSource | None = None, iterations: int = 1000,
            meta_batch_size: int = 32, *, val_every: int | None = None, val_episodes: int = VAL_EPISODES,
            num_workers: int = 0, callbacks: Iterable[Callback] = (), checkpoint_dir: str | Path | None = None,
            checkpoint_every: int = CHECKPOINT_EVERY, resume: str | Path | None = None, budget_minutes: float | None = None,
            progress: bool = True) -> list[dict[str, float]]:
        """Meta-train for ``iterations`` more meta-batches of ``meta_batch_size`` tasks.

        Called again, ``fit`` trains ``iterations`` more (continuing the task stream, the
        meta-optimizer and the history where the last call stopped): ``fit(t, iterations=100)``
        twice trains 200 iterations, like one ``fit(t, iterations=200)`` (with the same ``meta_batch_size``:
        another is a :class:`~metamtl.errors.ConfigError`, as it would repeat or skip episodes).  With ``resume``,
        ``iterations`` is the total of the run the checkpoint belongs to (what the interrupted
        call was asked for), so a resumed run ends where the uninterrupted one would.

        Args:
            train_tasks: task source for meta-training (e.g. an ``EpisodeSampler``).
            val_tasks: task source for validation every ``val_every`` iterations (default: a
                tenth of ``iterations``) on ``val_episodes`` fixed episodes.
            num_workers: DataLoader worker processes building episodes (0: in-process).
            callbacks: extra callbacks for this call (see :mod:`metamtl.callbacks`).
            checkpoint_dir: write ``last.pt`` every ``checkpoint_every`` iterations, ``best.pt`` on the best validation.
            resume: a checkpoint written with training state; training continues exactly
                where it stopped (same episodes, optimizer and RNG state).
            budget_minutes: stop once this much more wall-clock time is spent (``resume``: in all).

        Faults: on SIGINT (Ctrl-C) or SIGTERM, fit finishes the iteration in progress, saves a
        resumable checkpoint (``checkpoint_dir/last.pt``, else ``metamtl-interrupted.pt`` in the
        current folder) and raises :class:`~metamtl.errors.FitInterrupted`; a second signal aborts
        at once.  Non-finite steps are skipped with a warning; ``max_bad_steps`` in a row raise
        :class:`~metamtl.errors.TrainingError`, keeping the last good parameters.  Under
        ``torchrun`` every rank calls ``fit`` with the same arguments (:mod:`metamtl.distributed`).

        Returns ``self.history``. :attr:`feature_means`, if any, are recomputed from ``train_tasks`` for the new trunk.
        """
        budget_minutes, iterations, meta_batch_size, val_episodes, checkpoint_every, num_workers, val_every = check_fit_arguments(
            train_tasks, val_tasks, budget_minutes, checkpoint_dir, iterations=(iterations, 0), meta_batch_size=(meta_batch_size, 1),
            val_episodes=(val_episodes, 1), checkpoint_every=(checkpoint_every, 0), num_workers=(num_workers, 0), val_every=(val_every, 1))
        cbs = CallbackList(standard_callbacks(progress, checkpoint_dir, checkpoint_every, self.task, self.callbacks + check_callbacks(callbacks)))
        with means_follow_trunk(self, train_tasks):  # feature means of the trained trunk, recomputed
            start_run(self, fit_settings(train_tasks, val_tasks, meta_batch_size, val_every, val_episodes, cbs), resume, iterations)
            self.fit_state = FitState(
                self, iterations if resume is not None else self.iteration + iterations, meta_batch_size, rank=self.rank,
                val_every=self.run.val_every, budget_minutes=budget_minutes,
                start_seconds=0.0 if resume is not None else self.run.seconds, world_size=self.world_size, callbacks=cbs)
            FitLoop(self, self.fit_state, train_tasks, val_tasks, val_episodes, num_workers).run()
        return self.history

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, tasks: TaskSource | Sequence[Episode], episodes: int = 600, *, ways: int | None = None,
                 shots: int | None = None, queries: int | None = None, steps: int | None = None, start: int = 0,
                 progress: bool = True, support_augment: Any = None, head: Any = None) -> EvalResult:
        """Mean query accuracy over ``episodes`` fixed episodes, with a 95% confidence interval.

        Args:
            tasks: a task source (episodes ``start .. start+episodes-1`` are used, so repeated
                evaluations see the same tasks) or a list of episodes.
            ways, shots, queries: evaluate another setting of the same source
                (e.g. 20-way with a learner trained 5-way; needs per-task heads).
            steps: inner steps (default: the algorithm's ``eval_steps``, else its ``steps``; none with a feature head).
            support_augment: test-time support augmentation for this call (default: the
                learner's :attr:`support_augment`; ``False``: none).  Episode ``i``'s copies are
                drawn from a generator seeded by the augmentation's seed and ``i``.
            head: what classifies the queries (default: the learner's :attr:`head`;
                ``"algorithm"``: the algorithm's adaptation; or a :mod:`metamtl.heads` head).

        After a ``fit`` under torchrun, call it on every rank: ranks split the episodes and
        gather the per-episode results, so every rank gets the single-process result.
        """
        check_steps(steps)
        episode_at, n = episode_reader(tasks, episodes, ways=ways, shots=shots, queries=queries, start=start)
        self.check_finite("evaluate")
        head = self.inference.classifier(head, self.task, steps, self.algorithm)  # refuses steps nothing takes
        steps = self.algorithm.eval_steps if steps is None or not self.algorithm.has_inner_loop else steps
        score = scorer(self.algorithm, self.model, steps, head, self.bn_stats, lambda e: predictors.episode_mean(self, head, e))
        return evaluate_episodes(  # a feature head takes no inner steps: its rows say 0
            score, self.model, episode_at, n, steps if head is None else 0, placement=self.placement, strategy=self.strategy,
            progress=progress, check=lambda ep: self.check_episode(ep, "evaluate"),
            support_augment=self.inference.augment(support_augment, self.task), hierarchy=hierarchy_of(tasks),
            head=head_name(head), transductive=bool(head is not None and head.transductive))

    def feature_mean(self, dataset: str | None = None) -> torch.Tensor | None:
        """The training split's mean trunk feature for ``dataset`` (the only one of a learner of one dataset)."""
        return self.inference.feature_mean(dataset, self.device, predictors.learner_datasets(self))

    def compute_feature_mean(self, source: Any, max_images: int = 10_000, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Mean trunk feature of the training images (:attr:`feature_means`, saved) for centring heads (SimpleShot):
        :func:`~metamtl.evaluation.feature_means`; with batch-statistics BatchNorm it depends on ``batch_size``."""
        self.feature_means.update(feature_means(self.model, source, self.placement, max_images, batch_size))
        return dict(self.feature_means)

    # -- using the learner --------------------------------------------------------------------
    def preprocess(self, images: Any, dataset: str | None = None) -> torch.Tensor:
        """Raw images (PIL images or arrays, one or a list) -> model input ``[N, C, H, W]``, decoded (resize, colour
        mode, inversion) and normalised as the training data (``dataset``'s, when trained on several)."""
        return inputs.preprocess(images, inputs.preprocessing_for(self.preprocessing, self.metadata, dataset))

    def model_input(self, x: Any, what: str = "input", dataset: str | None = None) -> torch.Tensor:
        """Model input on this learner's device from tensors, ``uint8`` images or raw images (of ``dataset``)."""
        return inputs.model_input(x, what, model=self.model, placement=self.placement, task=self.task,
                                  preprocessing=inputs.preprocessing_for(self.preprocessing, self.metadata, dataset))

    def check_finite(self, what: str) -> None:
        """:class:`~metamtl.errors.TrainingError` if a weight (parameter or buffer) is NaN or inf."""
        check_learner_weights(self, what)  # and in the dtype the learner was built for (ConfigError)

    def check_episode(self, episode: Episode, what: str) -> None:
        """Refuse, with a clear message, an episode this learner cannot train or evaluate on."""
        inputs.check_episode(episode, what, task=self.task, model=self.model)

    def adapt(self, support_x: Any, support_y: Any, steps: int | None = None,
              support_augment: Any = None, head: Any = None, dataset: str | None = None) -> AdaptedPredictor:
        """Adapt to a support set; returns a predictor for query inputs (while the weights stay: after fit, InputError).

        ``support_x``: model input (float tensor), stored ``uint8`` images or raw images (PIL / arrays), which are
        preprocessed (``dataset``'s way if trained on several, else its own way for any ``dataset``: cross-domain
        use; :meth:`evaluate` normalises an episode's stored images with its dataset's); ``support_y``: labels ``0..N-1``, N >= 2.
        ``support_augment``, ``head``: as in :meth:`evaluate` (copies from the augmentation's seed; a feature
        head gives a :class:`~metamtl.predictors.HeadPredictor`, centred with ``dataset``'s :attr:`feature_means`)."""
        return predictors.adapt(self, support_x, support_y, steps, support_augment, head, dataset)

    def predict(self, support_x: Any, support_y: Any, query_x: Any, steps: int | None = None,
                support_augment: Any = None, head: Any = None, dataset: str | None = None) -> torch.Tensor:
        """Logits for ``query_x`` after adapting to ``(support_x, support_y)`` (arguments as in
        :meth:`adapt`; with a transductive head, the queries are classified together)."""
        return predictors.predict(self, support_x, support_y, query_x, steps, support_augment, head, dataset)

    def init_from(self, source: Any) -> None:
        """Copy the trunk weights of another learner (a :class:`MetaLearner` or the path of a saved
        one) into this model: e.g. meta-train from a classifier-pre-trained trunk (Meta-Baseline).

        Only ``trunk.*`` weights are taken (heads, algorithm state and optimizer start fresh; the old
        trunk's :attr:`feature_means` are dropped, with a warning); the trunks must have the same
        architecture (:class:`~metamtl.errors.CheckpointError` otherwise)."""
        run_state.load_trunk(self.model, source.model.state_dict() if isinstance(source, MetaLearner) else source, self.algorithm)
        self.inference.drop_means("init_from replaced the trunk")

    # -- persistence --------------------------------------------------------------------------
    def state(self, training_state: bool = False) -> dict[str, Any]:
        """Everything :meth:`save` writes (tensors and plain containers only; see :mod:`metamtl.run_state`)."""
        return run_state.learner_state(self, training_state)

    def save(self, path: str | Path, training_state: bool = False) -> Path:
        """Write the learner to ``path`` atomically; ``training_state=True`` adds the meta-optimizer,
        RNG and callback states, so ``fit(resume=path)`` continues exactly."""
        return atomic_save(self.state(training_state), path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = "auto",
             model: TrunkHead | None = None) -> "MetaLearner":
        """Rebuild a learner saved with :meth:`save` (weights-only, safe loading); ``model``: an
        already-built model of the same config to load the weights into."""
        return run_state.learner_from_state(cls, safe_load(path), path, device=device, model=model)
