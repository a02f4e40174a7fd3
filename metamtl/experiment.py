"""Config -> datasets, task samplers, model, algorithm and learner; run and record an experiment.

The CLI (``metamtl fit``), the benchmark scripts and the demo all go through :func:`run`, which
uses only the public API (datasets, :class:`~metamtl.tasks.EpisodeSampler`,
:func:`~metamtl.models.build_model`, :func:`~metamtl.algorithms.build_algorithm`,
:class:`~metamtl.MetaLearner`).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, steps_curve
from .algorithms import build_algorithm, with_data_settings
from .callbacks import Callback, CallbackList, EarlyStopping, LRScheduler, MetricsLogger, check_callbacks
from .config import Config, DataConfig, is_regression
from .data.augment import check_fits
from .data.base import ClassDataset
from .environment import git_commit, machine_info
from .checkpoint import DERIVED_FILES, RUN_FILES, RunFolderLock, ensure_writable_dir
from .files import atomic_write_json, json_nulls
from .errors import CheckpointError, ConfigError, TaskError
from .inputs import as_support_augment
from .learner import EvalResult, MetaLearner
from .models.registry import MODEL_FROM_DATA, MODELS, build_model
from .placement import resolve_device
from .progress_bars import silenced
from .tasks.sampler import EpisodeSampler, MixedTasks, TaskSource


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_root(cfg: Config, data: DataConfig | None = None) -> str | None:
    return (data or cfg.data).root or os.environ.get("METAMTL_DATA")


def absolute_roots(cfg: Config) -> None:
    """Make every ``root`` of the config (``data``, ``datasets``, ``stages``' data) an absolute path,
    as the run reads it: a saved config then names the same folder wherever ``metamtl evaluate``
    runs from (a relative root was read against the evaluating shell's folder)."""
    def absolute(root: Any) -> Any:
        return os.path.abspath(os.path.expanduser(root)) if isinstance(root, str) and root else root

    for d in [cfg.data, *cfg.datasets]:
        d.root = absolute(d.root)
    for stage in cfg.stages or []:  # a stage's own data sections (plain mappings until merged)
        stage = stage if isinstance(stage, dict) else {}
        for d in [stage.get("data"), *(stage.get("datasets") or [])]:
            if isinstance(d, dict) and "root" in d:
                d["root"] = absolute(d["root"])


def load_split(cfg: Config, split: str, rotations: list[int] | None = None,
               data: DataConfig | None = None, preprocessing: Any = None) -> ClassDataset:
    """One split of the configured dataset (``data``: one of ``cfg.datasets``; default ``cfg.data``).

    Only the options that were set are passed on.  ``preprocessing`` (a trained model's, for a folder
    or csv dataset): store the images as that model reads them, instead of as the training split's
    images are stored (which reads the whole training split).
    """
    from .data.registry import USER_DATASETS, load_dataset

    d = data or cfg.data
    kwargs: dict[str, Any] = {}
    for key in ("sources", "image_size", "split_fractions", "split_seed", "split_by", "cache_dir"):
        value = getattr(d, key)
        if value is not None:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    if d.download:
        kwargs["download"] = True
    if d.follow_outside_links:
        kwargs["follow_outside_links"] = True
    if rotations:
        kwargs["rotations"] = tuple(rotations)
    if preprocessing is not None and d.name in USER_DATASETS:
        kwargs["preprocessing"] = preprocessing
    return load_dataset(d.name, split=split, root=data_root(cfg, d), **kwargs)


def train_augment(data: DataConfig) -> dict | list | None:
    """The training augmentation a dataset entry asks for (``EpisodeSampler(augment=...)``)."""
    return data.train_augment


def build_tasks(cfg: Config) -> dict[str, Any]:
    """Train / val / test task sources for the config (classes disjoint across splits).

    With several ``datasets``: train (and val, over the datasets that have a val split) are
    :class:`~metamtl.tasks.MixedTasks` drawing each episode from one dataset with
    ``tasks.mixture``/``tasks.temperature``; test is a dict ``{label: source}`` so every dataset
    is evaluated on its own held-out classes.
    """
    t = cfg.tasks
    if cfg.datasets:
        return _build_mixed_tasks(cfg)
    if is_regression(cfg):
        from .tasks.sinusoid import Sinusoid

        if cfg.data.train_augment is not None:
            raise ConfigError("data.train_augment transforms images; the sinusoid tasks have none (set it to null)")

        return {
            "train": Sinusoid(shots=t.shots, queries=t.queries, seed=t.seed),
            "val": _sinusoid_split(cfg, cfg.data.val_split, t.queries, "data.val_split"),
            "test": build_test_tasks(cfg),
        }
    d = cfg.data
    out: dict[str, TaskSource | None] = {
        "train": EpisodeSampler(load_split(cfg, d.train_split, d.train_rotations), t.ways, t.shots, t.queries,
                                hierarchy=t.hierarchy,
                                seed=t.seed, augment=train_augment(d))
    }
    out["val"] = (_held_out(load_split(cfg, d.val_split), cfg, t.val_seed, t.queries, t.hierarchy, "val_split")
                  if d.val_split else None)
    out["test"] = build_test_tasks(cfg)
    return out


def build_test_tasks(cfg: Config, preprocessing: dict[str | None, Any] | None = None) -> Any:
    """The held-out test tasks of :func:`build_tasks` (``None`` without a test split) alone, without
    loading the training data: what a staged run checks before its first stage trains.

    ``preprocessing``: a trained learner's, by dataset label (``None`` for a one-dataset config), for
    :func:`load_split`; ``metamtl evaluate`` passes the checkpoint's, so a damaged training split
    does not block evaluating an intact test split."""
    preps = preprocessing or {}
    if is_regression(cfg):
        return _sinusoid_split(cfg, cfg.data.test_split, cfg.eval.queries, "data.test_split (evaluate: --split)")
    t = cfg.tasks
    if cfg.datasets:
        return {label: _held_out(load_split(cfg, d.test_split, data=d, preprocessing=preps.get(label)), cfg,
                                 t.test_seed, cfg.eval.queries, key="test_split", data=d, name=label)
                for d in cfg.datasets if d.test_split for label in [d.label or d.name]} or None
    d = cfg.data
    if not d.test_split:
        return None
    return _held_out(load_split(cfg, d.test_split, preprocessing=preps.get(None)), cfg, t.test_seed, cfg.eval.queries,
                     key="test_split")


def _sinusoid_split(cfg: Config, split: str | None, queries: int, key: str) -> Any:
    """The sinusoid tasks of ``split`` (``None``: no tasks, e.g. ``data.val_split: null``): ``test``
    and ``val`` are drawn from ``tasks.test_seed`` / ``tasks.val_seed``; another name is a :class:`ConfigError`."""
    from .tasks.sinusoid import Sinusoid

    if split is None:
        return None
    seeds = {"test": cfg.tasks.test_seed, "val": cfg.tasks.val_seed}
    if split not in seeds:
        raise ConfigError(f"{key} {split!r}: the sinusoid tasks have the splits 'test' or 'val' (drawn with "
                          "tasks.test_seed / tasks.val_seed) and no others: use one of them")
    return Sinusoid(shots=cfg.tasks.shots, queries=queries, seed=seeds[split], split=split)  # its own stream


def _held_out(dataset: ClassDataset, cfg: Config, seed: int, queries: int, hierarchy: Any = None,
              key: str = "val_split", data: DataConfig | None = None, name: str | None = None) -> EpisodeSampler:
    """Validation (or test, ``key``) episodes of one dataset (``data``, default ``cfg.data``): the
    training episodes' ways and shots, with at most the split's classes (64-class pre-training batches
    validate as 16-way episodes on 16 validation classes; 60-way Omniglot training tests on 48 classes)."""
    t, data = cfg.tasks, data or cfg.data
    if dataset.num_classes == 1:  # a 1-way episode scores 100% whatever the model
        raise TaskError(
            f"data.{key} ({getattr(data, key)!r}) of {dataset.name!r} holds a single class "
            f"({dataset.class_names[0]}): too few for held-out episodes, which need 2 or more ways; give the "
            f"split more classes (more class folders, or data.split_fractions) or set data.{key}: null"
        )
    try:
        return EpisodeSampler(dataset, min(t.ways, dataset.num_classes), t.shots, queries, seed=seed,
                              hierarchy=hierarchy, name=name)
    except TaskError as exc:  # name the settings that decide it (eval.queries is 15 unless set)
        queries_key = "eval.queries" if key == "test_split" else "tasks.queries"
        smallest = int(dataset.class_counts.min())
        if smallest >= t.shots + queries and hierarchy is not None:  # images suffice: the superclasses are too small
            hint = (f"They are drawn within one superclass (tasks.hierarchy {hierarchy!r}) with "
                    f"min(tasks.ways, the split's classes) = {min(t.ways, dataset.num_classes)} ways; lower "
                    "tasks.ways, or set tasks.hierarchy: null")
        else:
            fits = (f"; with {smallest} images in its smallest class, {queries_key}: {smallest - t.shots} or less fits"
                    if smallest > t.shots else "")
            hint = f"They take tasks.shots ({t.shots}) + {queries_key} ({queries}) images per class{fits}"
        raise TaskError(f"data.{key} ({getattr(data, key)!r}) cannot give held-out episodes: {exc}. {hint}") from None


def build_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks a config asks for: LR schedule, early stopping, metrics file."""
    tr = cfg.train
    cbs: list[Callback] = []
    if tr.scheduler is not None:
        cbs.append(LRScheduler(**dataclasses.asdict(tr.scheduler)))
    if tr.early_stopping is not None:
        cbs.append(EarlyStopping(**dataclasses.asdict(tr.early_stopping)))
    if cfg.logging.metrics:
        cbs.append(MetricsLogger(cfg.run_dir / f"metrics.{cfg.logging.metrics}"))
    return cbs


def _build_mixed_tasks(cfg: Config) -> dict[str, Any]:
    t = cfg.tasks
    train, val, test = [], [], {}
    for d in cfg.datasets:
        label = d.label or d.name
        train.append(EpisodeSampler(load_split(cfg, d.train_split, d.train_rotations, d), t.ways, t.shots,
                                    t.queries, seed=t.seed, name=label, augment=train_augment(d)))
        if d.val_split:
            val.append(_held_out(load_split(cfg, d.val_split, data=d), cfg, t.val_seed, t.queries, data=d, name=label))
        if d.test_split:
            test[label] = _held_out(load_split(cfg, d.test_split, data=d), cfg, t.test_seed, cfg.eval.queries,
                                    key="test_split", data=d, name=label)
    weights = t.mixture
    mixed = MixedTasks(train, weights, t.temperature, seed=t.seed)
    val_weights = weights if not isinstance(weights, list) else [
        w for w, d in zip(weights, cfg.datasets) if d.val_split]
    return {"train": mixed, "val": MixedTasks(val, val_weights, t.temperature, seed=t.val_seed) if val else None,
            "test": test or None}


def square_side(preprocessing: Any, dataset: str, model_cfg: dict[str, Any]) -> int:
    """The ``image_size`` of a model built for ``dataset``'s stored images, refusing (before
    training) images that are not square: the image models (conv4, resnet12) take square inputs."""
    h, w = preprocessing.size
    if h != w and "image_size" not in model_cfg:
        raise ConfigError(
            f"{dataset!r}: its images are stored at {h}x{w} (height x width, the most common size among them), "
            f"but metamtl's image models take square images; set data.image_size: N to store every image at NxN "
            f"(e.g. data.image_size: {max(h, w)}; in Python ClassFolder(..., image_size=N)) and train again")
    return h


def shape_model(model_cfg: dict[str, Any], preps: dict[str, Any]) -> None:
    """Fill in the model settings the training images decide, where the config leaves them out:
    ``inputs`` (``{dataset: [C, H, W]}``) for models declaring it (MODEL_FROM_DATA), else, for one
    input shape, ``in_channels`` / ``image_size`` for models that take them; :class:`ConfigError` for
    a model that takes no images."""
    name = model_cfg.get("name", "conv4")
    if name not in MODELS:
        return  # build_model names the unknown model
    if "inputs" in MODEL_FROM_DATA.get(name, ()):
        model_cfg.setdefault("inputs", {k: [p.channels, *p.size] for k, p in preps.items()})
        return
    takes = set(inspect.signature(MODELS[name]).parameters) & {"in_channels", "image_size"}
    if not takes:
        raise ConfigError(
            f"model {name!r} takes vectors [batch, in_features], not images, but the training data "
            f"{sorted(preps)} are images; use an image model (conv4, resnet12, or multidataset)")
    if len({(p.channels, *p.size) for p in preps.values()}) == 1:  # one input shape
        dataset, first = next(iter(preps.items()))
        if "in_channels" in takes:
            model_cfg.setdefault("in_channels", first.channels)
        if "image_size" in takes:
            model_cfg.setdefault("image_size", square_side(first, dataset, model_cfg))


def shape_vector_model(model_cfg: dict[str, Any], data: str) -> None:
    """Fill in ``in_features`` / ``out_features`` (1) for the ``[batch, 1]`` vectors of a regression dataset
    (``sinusoid``) where the config leaves them out; :class:`ConfigError` for a model that takes images
    (it has no ``in_features``), the mirror of :func:`shape_model`."""
    name = model_cfg.get("name", "conv4")
    if name not in MODELS:
        return  # build_model names the unknown model
    params = inspect.signature(MODELS[name]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "in_features" not in params and not takes_any:
        raise ConfigError(
            f"model {name!r} takes images, but {data} tasks are vectors [batch, 1]; use model mlp "
            "(model: {name: mlp, hidden: [40, 40]})")
    model_cfg.setdefault("in_features", 1)
    model_cfg.setdefault("out_features", 1)


def _check_algorithm_datasets(given: Any, labels: list[str]) -> None:
    """A :class:`ConfigError` for an ``algorithm.datasets`` that is not the run's dataset labels (an
    unknown one would keep DWA at equal weights and never train; a missing one fails the first step)."""
    names = [str(n) for n in given] if isinstance(given, (list, tuple)) else None
    if names is None or sorted(names) != sorted(labels):
        one = " (a one-dataset run's episodes carry its data.name, whatever data.label says)" if len(labels) == 1 else ""
        raise ConfigError(f"algorithm.datasets must list the run's dataset labels {labels} (each once){one}, got "
                          f"{given!r}; fix it or leave it out (it is filled in from the datasets)")


def build_learner(cfg: Config, train_tasks: TaskSource, callbacks: list[Callback] = ()) -> MetaLearner:
    """Model + algorithm + learner for the config, shaped after the training data."""
    model_cfg = dict(cfg.model)
    mixed = isinstance(train_tasks, MixedTasks)
    alg_cfg = with_data_settings(cfg.algorithm, {  # what the algorithm declares it takes (Algorithm.from_data)
        "num_classes": lambda: getattr(train_tasks, "num_classes", None),  # a mixture's: the sum
        "datasets": lambda: [s.name for s in train_tasks.sources] if mixed else None})  # type: ignore[attr-defined]
    labels = [s.name for s in train_tasks.sources] if mixed else [getattr(train_tasks, "name", None)]  # type: ignore[attr-defined]
    if cfg.algorithm.get("datasets") is not None and None not in labels:  # one dataset: its episodes' label
        _check_algorithm_datasets(cfg.algorithm["datasets"], labels)
    algorithm = build_algorithm(**alg_cfg)
    regression = is_regression(cfg)
    metadata: dict[str, Any] = {"config": cfg.to_dict()}
    if regression:
        shape_vector_model(model_cfg, cfg.data.name)
        preprocessing = None
    elif isinstance(train_tasks, MixedTasks):
        # Several datasets: models declaring ``inputs`` (MODEL_FROM_DATA) get each dataset's input
        # shape (algorithms declaring ``datasets`` got the labels above); preprocessing is per dataset.
        preps = {s.name: s.dataset.preprocessing for s in train_tasks.sources}  # type: ignore[attr-defined]
        metadata["preprocessing"] = {k: p.to_dict() for k, p in preps.items()}
        shape_model(model_cfg, preps)
        learned_head = algorithm.inner.head_init == "learned"
        model_cfg.setdefault("out_features", cfg.tasks.ways if learned_head else None)
        preprocessing = None
    else:
        preprocessing = train_tasks.dataset.preprocessing  # type: ignore[attr-defined]
        shape_model(model_cfg, {train_tasks.dataset.name: preprocessing})  # type: ignore[attr-defined]
        learned_head = algorithm.inner.head_init == "learned"
        model_cfg.setdefault("out_features", cfg.tasks.ways if learned_head else None)
    model = build_model(**model_cfg)
    tr = cfg.train
    return MetaLearner(
        model, algorithm, preprocessing=preprocessing, meta_optimizer=tr.meta_optimizer,
        meta_lr=tr.meta_lr, meta_optimizer_kwargs=tr.meta_optimizer_kwargs, grad_clip=tr.grad_clip, device=tr.device, callbacks=callbacks,
        max_bad_steps=tr.max_bad_steps, task="regression" if regression else "classification",
        task_defaults={"ways": cfg.tasks.ways, "shots": cfg.tasks.shots, "queries": cfg.eval.queries},
        metadata=metadata, precision=tr.precision, channels_last=tr.channels_last,
        support_augment=cfg.eval.support_augment, head=cfg.eval.heads[0],
    )


def memory_summary(learner: MetaLearner) -> dict[str, Any]:
    """How the run's peak memory was measured, the memory mode of the second-order meta-gradient
    (``None`` for first-order algorithms, Reptile and FOMAML, and for those without an inner loop,
    ProtoNet: they ignore ``memory``) and the memory planner's choice (``memory: auto``)."""
    alg = learner.algorithm
    second_order = alg.has_inner_loop and not alg.inner.first_order
    plan = getattr(alg, "memory_plan", None) if second_order else None
    return {"measure": "cuda_max_allocated" if learner.device.type == "cuda" else "rss",
            "mode": getattr(alg, "memory_mode", None) if second_order else None,
            "plan": plan.describe() if plan is not None else None}


def setting_tasks(test_tasks: TaskSource, setting: Any, cfg: Config) -> TaskSource:
    """The test tasks of one ``eval.settings`` entry (its ways, shots and hierarchy; a regression
    run's: its shots, with ``eval.queries``)."""
    if not hasattr(test_tasks, "with_settings"):
        return test_tasks
    if is_regression(cfg):
        return test_tasks.with_settings(shots=setting.shots, queries=cfg.eval.queries)
    return test_tasks.with_settings(ways=setting.ways, shots=setting.shots, queries=cfg.eval.queries,
                                    hierarchy=setting.hierarchy)


def _shown_tasks(cfg: Config, split: str, tasks: TaskSource | None) -> list[TaskSource]:
    """What a run prints for ``split``: its tasks, or for ``test`` the tasks of each ``eval.settings``
    entry (what is evaluated: the test split's sampler itself carries the training ways)."""
    if tasks is None:
        return []
    if split != "test" or not hasattr(tasks, "with_settings"):
        return [tasks]
    return [setting_tasks(tasks, s, cfg) for s in cfg.eval.settings]


def evaluate_settings(learner: MetaLearner, cfg: Config, test_tasks: TaskSource, progress: bool = True) -> list[EvalResult]:
    """Evaluate every ``eval.settings`` entry with every ``eval.heads`` entry on the test tasks."""
    return [learner.evaluate(setting_tasks(test_tasks, s, cfg), cfg.eval.episodes, steps=head_steps(cfg, h, learner),
                             progress=progress, head=h) for s in cfg.eval.settings for h in cfg.eval.heads]


def head_steps(cfg: Config, head: Any, learner: MetaLearner) -> int | None:
    """``eval.steps`` where a learner (an Ensemble's member) adapts with its algorithm's inner loop for
    ``head`` (``None``: its own default head); ``None`` where each classifies with a feature head or
    has no inner loop (neither takes inner steps: a staged run's ``eval.steps`` may be meant for a
    later stage).  What ``metamtl fit`` tests with, and ``metamtl evaluate`` without ``--steps``."""
    members = getattr(learner, "members", [learner])  # an Ensemble's
    adapts = any(m.algorithm.has_inner_loop and m.inference.classifier(head if m.task == "classification" else None)
                 is None for m in members)
    return cfg.eval.steps if adapts else None


def prepare_heads(learner: MetaLearner, cfg: Config, train_tasks: TaskSource, say: Any = print) -> None:
    """Compute the training split's mean feature when an ``eval.heads`` entry centres features."""
    from .heads import build_head

    heads = [build_head(h) for h in cfg.eval.heads]
    if not is_regression(cfg) and any(h is not None and h.center for h in heads):
        learner.compute_feature_mean(train_tasks)
        say(f"[metamtl] feature mean of the training split for centring heads: {sorted(learner.feature_means)}")


def evaluate_per_dataset(learner: MetaLearner, cfg: Config, test_tasks: dict[str, TaskSource],
                         progress: bool = True, say: Any = print) -> list[dict[str, Any]]:
    """``eval.settings`` on each dataset's held-out classes; rows carry a ``dataset`` key.

    A setting with more ways than a dataset has held-out classes is recorded as skipped.
    """
    rows = []
    for label, source in test_tasks.items():
        for s in cfg.eval.settings:
            skipped = skipped_setting(label, source, s.ways, s.shots, say)
            if skipped is not None:
                rows.append(skipped)
                continue
            for h in cfg.eval.heads:
                res = learner.evaluate(setting_tasks(source, s, cfg), cfg.eval.episodes, steps=head_steps(cfg, h, learner),
                                       progress=progress, head=h)
                say(f"[metamtl] held-out test ({label}): {res}")
                rows.append({"dataset": label, **res.to_dict()})
    return rows


def skipped_setting(label: str, source: Any, ways: int, shots: int, say: Any = print) -> dict[str, Any] | None:
    """The result row of a ``ways``-way setting skipped on dataset ``label``, whose held-out classes
    are fewer (said with ``say``), or ``None`` when the dataset can serve it."""
    available = getattr(source, "num_classes", ways)
    if ways <= available:
        return None
    say(f"[metamtl] {label}: skipping {ways}-way evaluation ({available} held-out classes)")
    return {"dataset": label, "ways": ways, "shots": shots, "skipped": f"only {available} held-out classes"}


def restore_best(learner: MetaLearner, run_dir: Path) -> int | None:
    """Load ``run_dir/best.pt``'s weights (best validation accuracy) into ``learner``.

    Returns the iteration they come from, or ``None`` when there is no ``best.pt`` from this
    training run (no validation happened; a ``best.pt`` whose history is not a prefix of the
    learner's comes from an older run and is ignored).  Under torchrun rank 0 decides and gives
    every rank its weights: the ranks' histories differ in per-process rows such as ``memory_mb``,
    and every rank must test the same model.
    """
    strategy = learner.strategy
    selected = _load_best(learner, run_dir) if strategy.is_main_process else None
    selected = strategy.broadcast_object(selected, "eval.checkpoint 'best' choice")
    if selected is not None:
        strategy.broadcast_tensors([*learner.model.state_dict().values(), *learner.algorithm.state_dict().values()],
                                   "best.pt weight broadcast")
    return selected


def _load_best(learner: MetaLearner, run_dir: Path) -> int | None:
    from .checkpoint import history_continues, safe_load

    best = run_dir / "best.pt"
    if not best.is_file():
        return None
    obj = safe_load(best)
    if int(obj.get("iteration", 0)) > learner.iteration or not history_continues(learner.history, obj.get("history", [])):
        return None
    learner.model.load_state_dict(obj["model_state"])
    learner.algorithm.load_state_dict(obj["algorithm_state"])
    return int(obj.get("iteration", learner.iteration))


def run(cfg: Config, resume: str | Path | None = None, progress: bool = True,
        callbacks: list[Callback] = (), quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Meta-train, evaluate on held-out classes, save the learner and ``results.json``.

    Returns the results dict (also written to ``<output_dir>/<name>/results.json``).
    Under torchrun every rank runs this; rank 0 alone prints and writes files.  A config with
    ``stages`` runs :func:`run_stages`; ``init_from`` starts from a saved learner's trunk; one with
    ``ensemble.members > 1`` trains that many members side by side and evaluates their ensemble
    (:func:`run_ensemble`).  A staged run resumes stage by stage from ``<run_dir>/last.pt`` (which
    need not exist: the interrupted stage's ``last.pt`` is used) or a stage's ``last.pt``.

    The run folder is claimed first (:func:`claim_run_dir`): a folder holding another run is
    refused unless ``resume`` continues it or ``overwrite=True`` replaces it, and one process
    at a time writes it.  Every ``eval.settings`` entry is checked against the test split
    before training (:func:`check_eval_settings`).
    """
    callbacks = check_callbacks(callbacks, "run(callbacks=...)")  # one Callback or a list of them
    absolute_roots(cfg)
    if resume is not None and overwrite:
        raise ConfigError("resume (--resume) continues the run and overwrite (--overwrite) deletes it and starts "
                          "afresh: pass one of them")
    # before the run folder is judged or data loaded (a staged run's resume: run_stages judges it)
    if resume is not None and not Path(resume).is_file() and not (cfg.stages and cfg.ensemble.members <= 1):
        raise CheckpointError(f"cannot resume: checkpoint {resume} does not exist (a run folder's resumable "
                              f"checkpoint is {cfg.run_dir / 'last.pt'})")
    if cfg.ensemble.members > 1:  # one process per member, then their ensemble (metamtl.ensemble_fit)
        if callbacks:
            raise ConfigError("callbacks cannot reach an ensemble's member processes; train the members as separate "
                              "runs (seed=...) and combine them with metamtl.ensemble.Ensemble")
        return run_ensemble(cfg, resume, progress, quiet, overwrite)
    if cfg.stages:
        return run_stages(cfg, resume, progress, callbacks, quiet, overwrite)
    main_process = distributed.launch_env().is_main_process
    check_output_dir(cfg)  # fail before loading data or training, not at the first checkpoint
    lock = claim_run_dir(cfg, resume, overwrite)
    try:
        with silenced(not progress):  # every bar of the run, the data layer's decoding too
            return _run(cfg, resume, progress, callbacks, quiet, main_process)
    finally:
        lock.release()


def write_history(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Write ``history.json``: the rows of ``learner.history`` as strict JSON (a skipped step's
    non-finite loss, an undefined CI: ``null``)."""
    atomic_write_json(path, json_nulls(history))


def _run(cfg: Config, resume: str | Path | None, progress: bool, callbacks: list[Callback], quiet: bool,
         main_process: bool) -> dict[str, Any]:
    say = (lambda *a: None) if quiet or not main_process else print
    seed_everything(cfg.seed)
    run_dir = cfg.run_dir
    record = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # the code that trains
    if cfg.distill:  # before any data loads
        from .distill.hooks import check_teacher_file

        check_teacher_file(cfg.distill)
    t0 = time.perf_counter()
    tasks = build_tasks(cfg)
    record["data_seconds"] = time.perf_counter() - t0
    record["data_sources"] = data_sources(cfg)
    check_eval_settings(cfg, tasks["test"])
    for split in ("train", "val", "test"):
        for shown in _shown_tasks(cfg, split, tasks[split]):
            say(f"[metamtl] {split} tasks:{' ' * (6 - len(split))}{shown}")
    learner = build_learner(cfg, tasks["train"])  # first: its initial weights depend on the seed alone,
    cbs = run_callbacks(cfg, callbacks)  # not on what building the callbacks (e.g. loading a teacher) draws
    chosen = f" | precision auto: {learner.precision}" if learner.placement.auto_precision else ""
    say(f"[metamtl] {learner} | {sum(p.numel() for p in learner.model.parameters()):,} parameters{chosen}")
    if cfg.init_from:
        learner.init_from(os.path.expanduser(cfg.init_from))  # ~/runs/a/learner.pt: under $HOME
        say(f"[metamtl] trunk initialised from {cfg.init_from}")
    record["train_seconds"] = _train(learner, cfg, tasks, resume, progress, cbs)
    try:  # a failure or Ctrl-C after fit (the test evaluation) fails the run in the callbacks too (W&B: exit code 1)
        selected = restore_best(learner, run_dir) if cfg.eval.checkpoint == "best" else None
        if selected is not None:
            best = "loss" if is_regression(cfg) else "accuracy"
            say(f"[metamtl] evaluating best.pt (best validation {best}, iteration {selected})")
        elif cfg.eval.checkpoint == "best" and any("val/loss" in r for r in learner.history):
            say(f"[metamtl] warning: eval.checkpoint is 'best' but {run_dir} holds no best.pt of this run (deleted, or "
                f"no validation since the run came to this folder?): evaluating the last weights (iteration {learner.iteration})")
        if tasks["test"] is not None:
            prepare_heads(learner, cfg, tasks["train"], say)
        if main_process:
            learner.save(run_dir / "learner.pt")
        results = _results(cfg, learner, selected, record)
        if tasks["test"] is not None:
            t2 = time.perf_counter()
            results["test"] = evaluate_held_out(learner, cfg, tasks["test"], progress, say)
            results["eval_seconds"] = time.perf_counter() - t2
        if main_process:
            write_history(run_dir / "history.json", learner.history)
            atomic_write_json(run_dir / "results.json", results, indent=2)
        if cfg.logging.report:
            write_run_steps_curve(learner, cfg, results, progress, main_process)
    except BaseException as exc:
        CallbackList(cbs).on_exception(learner.fit_state, exc)
        raise
    CallbackList(cbs).on_results(learner.fit_state, results)
    if "report" in results:
        say(f"[metamtl] report: {results['report']}")
    return results


def run_callbacks(cfg: Config, callbacks: list[Callback] = ()) -> list[Callback]:
    """A run's callbacks, in call order: the caller's, distillation, W&B, the config's (schedule,
    early stopping, metrics file) and the HTML report (written in ``on_results``)."""
    cbs = list(callbacks)
    if cfg.distill:
        from .distill import from_config

        cbs.append(from_config(cfg.distill))
    if cfg.logging.wandb:
        cbs.append(wandb_logger(cfg))
    cbs += build_callbacks(cfg)
    if cfg.logging.report:
        from .reporting.report import HTMLReport

        cbs.append(HTMLReport(cfg.run_dir))
    return cbs


def wandb_logger(cfg: Config, tags: list[str] = ()) -> Callback:
    """The run's :class:`~metamtl.reporting.WandbLogger` as ``cfg.logging`` sets it (``tags`` added)."""
    from .reporting.wandb_logger import WandbLogger  # optional: imports wandb lazily

    return WandbLogger(project=cfg.logging.project, entity=cfg.logging.entity, mode=cfg.logging.mode,
                       tags=[*cfg.logging.tags, *tags], config=cfg.to_dict(), run_dir=cfg.run_dir)


def _train(learner: MetaLearner, cfg: Config, tasks: dict[str, Any], resume: str | Path | None, progress: bool,
           callbacks: list[Callback]) -> float:
    """``learner.fit`` with the config's training settings; returns the seconds of meta-training of
    the whole run (a resumed run's include those before the interruption)."""
    tr = cfg.train
    with warnings.catch_warnings():
        if tasks["val"] is None:  # train.val_every / val_episodes of a run without validation (train+val): unused
            warnings.filterwarnings("ignore", message="fit: val_every=", category=UserWarning)
        learner.fit(
            tasks["train"], tasks["val"], iterations=tr.iterations, meta_batch_size=tr.meta_batch_size,
            val_every=tr.val_every, val_episodes=tr.val_episodes, num_workers=cfg.tasks.num_workers,
            checkpoint_dir=cfg.run_dir, checkpoint_every=tr.checkpoint_every, resume=resume,
            budget_minutes=tr.budget_minutes, progress=progress, callbacks=callbacks,
        )
    return learner.elapsed


def _results(cfg: Config, learner: MetaLearner, selected: int | None, record: dict[str, Any]) -> dict[str, Any]:
    """The ``results.json`` of a trained run (its ``test`` rows are filled in afterwards)."""
    return {
        "name": cfg.name, "config": cfg.to_dict(), "iterations": learner.iteration,
        "stopped_by": learner.fit_state.stopped_by or "iterations",
        "selected_iteration": selected if selected is not None else learner.iteration,
        "world_size": learner.world_size, "train_seconds": record["train_seconds"],
        "data_seconds": record["data_seconds"], "data_sources": record["data_sources"],
        "checkpoint": str(cfg.run_dir / "learner.pt"),
        "peak_memory_mb": learner.run.peak_memory_mb,  # highest per-iteration peak (RSS / CUDA max allocated)
        "memory": memory_summary(learner),
        "machine": machine_info(), "commit": record["commit"], "date": record["date"], "test": [],
        "layout": "channels_last" if learner.channels_last else "nchw",  # as chosen (train.channels_last: null)
        "precision": learner.precision,  # as chosen (train.precision: auto)
    }


def data_sources(cfg: Config) -> dict[str, list[str]]:
    """The archives each Omniglot dataset of a run reads, by its label (``label`` or ``name``):
    ``sources`` as set, or with ``sources: null`` every official archive found under its root (what
    the loader reads).  The report's data protocol is judged on them (``results["data_sources"]``)."""
    from .data.omniglot import Omniglot
    from .errors import DataNotFoundError

    out = {}
    for d in cfg.datasets or [cfg.data]:
        if d.name != "omniglot":
            continue
        try:
            out[d.label or d.name] = list(d.sources) if d.sources else list(Omniglot.available_sources(data_root(cfg, d)))
        except DataNotFoundError:  # no root to look in (its data was never loaded here): not recorded
            continue
    return out


def evaluate_held_out(learner: MetaLearner, cfg: Config, test_tasks: Any, progress: bool = True,
                      say: Any = print) -> list[dict[str, Any]]:
    """The ``test`` rows of a run: every ``eval.settings`` entry (per dataset with several)."""
    if isinstance(test_tasks, dict):
        return evaluate_per_dataset(learner, cfg, test_tasks, progress, say)
    rows = []
    for res in evaluate_settings(learner, cfg, test_tasks, progress):
        say(f"[metamtl] held-out test: {res}")
        rows.append(res.to_dict())
    return rows


def held_out_sources(cfg: Config) -> tuple[dict[str | None, Any], str]:
    """Task sources of a run's held-out classes by dataset label (``None`` for one dataset) and
    the split's name: the test split, else the validation split (the training split is not loaded;
    a dataset with neither is left out: training-only). Datasets held out on different splits give
    ``held-out (label: split, ...)``."""
    held = [d for d in cfg.datasets or [cfg.data] if d.test_split or d.val_split]  # none: training-only datasets
    if not held:
        names = [d.label or d.name for d in cfg.datasets or [cfg.data]]
        raise ConfigError(f"no dataset of this run ({', '.join(names)}) has a test or a validation split: set "
                          "test_split (or val_split) of one of them")
    if is_regression(cfg):  # the test split, else the validation split (as for image data)
        key, split = ("data.test_split (evaluate: --split)", cfg.data.test_split) if cfg.data.test_split else (
            "data.val_split", cfg.data.val_split)
        return {None: _sinusoid_split(cfg, split, cfg.eval.queries, key)}, str(split)
    t = cfg.tasks
    sources: dict[str | None, Any] = {}
    splits: dict[str | None, str] = {}
    for d in held:
        split, seed = (d.test_split, t.test_seed) if d.test_split else (d.val_split, t.val_seed)
        label = (d.label or d.name) if cfg.datasets else None
        sources[label] = _held_out(load_split(cfg, split, data=d), cfg, seed, cfg.eval.queries,
                                   key="test_split" if d.test_split else "val_split", data=d, name=label)
        splits[label] = str(split)
    if len(set(splits.values())) == 1:
        return sources, next(iter(splits.values()))
    return sources, "held-out (" + ", ".join(f"{label}: {split}" for label, split in splits.items()) + ")"


def write_run_steps_curve(learner: MetaLearner, cfg: Config, results: dict[str, Any], progress: bool = True,
                          write: bool = True, episodes: int | None = None, steps: list[int] | None = None) -> None:
    """Accuracy against inner steps of the trained learner (``<run_dir>/steps_curve.json``, read
    by the report): ``episodes`` test episodes per point (default ``logging.report_steps_episodes``;
    0: none), ``steps`` (default ``logging.report_steps``, else 0 .. max(2x, +2) the evaluation steps).

    Under torchrun every rank calls it (the evaluations are shared); rank 0 ``write``s.  A failure
    (e.g. data moved away) is recorded in the file, for the report to show, and not raised; a valid
    curve already there is kept, with the failure beside it (:func:`steps_curve.write_failure`).
    """
    episodes = cfg.logging.report_steps_episodes if episodes is None else episodes
    if not episodes:
        return
    try:
        sources, split = held_out_sources(cfg)
        first = cfg.eval.settings[0]  # no test rows (a stage before the last): the first test setting, not training's
        settings = steps_curve.curve_settings(results.get("test", []), first.ways, first.shots)
        steps_curve.write_steps_curve(cfg.run_dir, learner, sources, split, settings, episodes=episodes,
                                      steps=steps or cfg.logging.report_steps, queries=cfg.eval.queries,
                                      progress=progress, write=write, eval_steps=cfg.eval.steps)
    except Exception as exc:  # the run and its report go on without the curve
        if write:
            steps_curve.write_failure(cfg.run_dir, exc)


def _curve_is_current(run_dir: Path, episodes: int, steps: list[int] | None) -> bool:
    """Whether ``steps_curve.json`` holds the curve of the current ``learner.pt`` for these settings."""
    saved = steps_curve.read_steps_curve(run_dir)
    if saved is None or "error" in saved or not (run_dir / "learner.pt").is_file():
        return False
    wanted = sorted({int(s) for s in steps}) if steps else saved.get("steps")
    now, key = steps_curve.cache_key(run_dir / "learner.pt", episodes, wanted or []), saved.get("key")
    # not by the file's time, which a copied run folder (cp -r, scp, unzip) changes
    return isinstance(key, dict) and all(key.get(f) == v for f, v in now.items() if f != "mtime")


def selection_done(config: dict[str, Any]) -> dict[str, Any]:
    """A finished run's saved config without what selected its weights (``eval.checkpoint``,
    ``train.early_stopping``, ``train.scheduler``, in every stage): done when the learner was saved,
    and a run saved before a check on them was added still loads to evaluate its learner again."""
    def settled(section: dict[str, Any]) -> dict[str, Any]:
        out = dict(section)
        if isinstance(out.get("eval"), dict):
            out["eval"] = {**out["eval"], "checkpoint": "last"}
        if isinstance(out.get("train"), dict):
            out["train"] = {**out["train"], "early_stopping": None, "scheduler": None}
        return out

    done = settled(config)
    if isinstance(done.get("stages"), list):
        done["stages"] = [settled(st) if isinstance(st, dict) else st for st in done["stages"]]
    return done


def check_steps_request(run_dir: str | Path, episodes: int | None = None,
                        steps: list[int] | None = None) -> tuple[dict[str, Any], Config | None, Exception | None, int]:
    """What :func:`refresh_steps_curve` would compute for ``run_dir``: ``(results, config, failure, episodes)``
    (``failure``: why its saved config no longer loads; ``episodes`` 0: no curve), with nothing computed or
    written.  :class:`ConfigError` for a request it cannot honour: ``steps`` where the run's config turns the
    curve off (``logging.report_steps_episodes: 0``) and no ``episodes`` are given, or ``steps``/``episodes``
    for an ensemble run, which has no curve of its own (its members' run folders have theirs).
    ``metamtl report`` checks every RUN_DIR with it before anything is computed or written."""
    from .config import config_from_dict, stage_configs
    from .reporting.report import load_run

    run_dir = Path(run_dir).resolve()  # '.' has no name: the config's name is the folder's
    results, _ = load_run(run_dir)
    if "ensemble" in results:  # an ensemble run has no learner.pt; each member's report has its curve
        if steps or episodes:
            raise ConfigError(f"--steps/--steps-episodes: {run_dir.name} is an ensemble run, which has no "
                              "accuracy-vs-inner-steps curve of its own; report a member's run folder instead, "
                              f"e.g. metamtl report {run_dir / 'members' / 'member0'} --steps ...")
        return results, None, None, 0
    cfg, failure = None, None
    try:
        cfg = config_from_dict({**selection_done(results["config"]), "output_dir": str(run_dir.parent),
                                "name": run_dir.name})
        cfg = stage_configs(cfg)[-1][1] if cfg.stages else cfg  # a staged run's learner: its last stage's
    except Exception as exc:  # noqa: BLE001 - an older run's config this version refuses: the report says why
        failure = ConfigError(f"the run's saved config (results.json) does not load in this metamtl version, so "
                              f"its learner cannot be evaluated again ({exc})")
    given = episodes is not None
    if not given:
        episodes = (results["config"].get("logging") or {}).get("report_steps_episodes", 100) if cfg is None \
            else cfg.logging.report_steps_episodes
    if not episodes and steps and not given:  # --steps asks for the curve the config's 0 turned off
        raise ConfigError(f"--steps: {run_dir.name}'s config turns the accuracy-vs-inner-steps curve off "
                          "(logging.report_steps_episodes: 0); add --steps-episodes N (e.g. 100) to compute it")
    return results, cfg, failure, episodes


def refresh_steps_curve(run_dir: str | Path, episodes: int | None = None, steps: list[int] | None = None,
                        device: str | None = None, progress: bool = True) -> None:
    """Compute a finished run's curve from its saved ``learner.pt`` and ``results.json``, unless
    ``steps_curve.json`` already holds it for these episodes and steps (``metamtl report``).

    A failure of the run's own (its learner, its data, a saved config this version no longer
    accepts) is recorded in ``steps_curve.json`` for the report, never in place of a valid curve
    there (kept, the failure beside it); an unusable ``device`` or request (:func:`check_steps_request`)
    is the caller's: :class:`ConfigError` before anything is written.
    """
    if device is not None:
        resolve_device(device)
    run_dir = Path(run_dir).resolve()
    results, cfg, failure, episodes = check_steps_request(run_dir, episodes, steps)
    if not episodes:
        return
    if _curve_is_current(run_dir, episodes, steps):  # nothing to compute: an older failure to do so is past
        steps_curve.clear_refresh_error(run_dir)
        return
    if failure is not None:
        steps_curve.write_failure(run_dir, failure)
        return
    try:
        learner = MetaLearner.load(run_dir / "learner.pt", device=device or cfg.train.device)
    except Exception as exc:  # noqa: BLE001 - recorded for the report
        steps_curve.write_failure(run_dir, exc)
        return
    write_run_steps_curve(learner, cfg, results, progress, episodes=episodes, steps=steps)


def _write_report(run_dir: Path, results: dict[str, Any], say: Any) -> None:
    """The run's report, if it can be written (a failure is a warning: the results are saved)."""
    from .reporting.report import write_report_safely

    path = write_report_safely(run_dir)
    if path is not None:
        results["report"] = str(path)
        say(f"[metamtl] report: {path}")


def run_stages(cfg: Config, resume: str | Path | None = None, progress: bool = True,
               callbacks: list[Callback] = (), quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.stages`` in order, each from the previous stage's trunk; one result and report.

    Stage ``k`` < last trains in ``<run_dir>/stages/<name>/`` without test evaluation; the last
    stage trains in ``<run_dir>`` and is evaluated on the held-out classes.  ``history.json``
    holds every stage's rows (``stage`` key, iterations counted across stages) and
    ``results.json`` a ``stages`` list (iterations, time, stop reason of each), so the run's
    report covers the whole schedule.  ``cfg.init_from`` initialises the first stage.

    ``resume`` (``<run_dir>/last.pt``, or the ``last.pt`` of one of its stages) continues an
    interrupted run stage by stage (:func:`stage_plan`): finished stages are skipped, the
    interrupted one resumes from its ``last.pt``, the others train.
    """
    from .config import stage_configs

    stages = stage_configs(cfg)
    for name, scfg in stages[:-1]:  # no test classes before the last stage, of any dataset
        scfg.output_dir, scfg.name, scfg.data.test_split = str(cfg.run_dir / "stages"), name, None
        for d in scfg.datasets:
            d.test_split = None
    plan = stage_plan(cfg, stages, resume)
    check_stages(stages, overwrite or resume is not None)
    init, done, history = cfg.init_from, [], []
    given = [copy.deepcopy(c.state_dict()) for c in callbacks]  # every stage starts from the callbacks as given
    for i, (name, scfg) in enumerate(stages):
        last = i == len(stages) - 1
        for callback, state in zip(callbacks, given):  # (early stopping's best, a scheduler's base rates)
            callback.load_state_dict(copy.deepcopy(state))
        scfg.init_from, scfg.logging.report = init, cfg.logging.report and last  # the last one draws the curve
        if plan[i] == "done":
            results = json.loads((scfg.run_dir / "results.json").read_text())
            if not quiet and distributed.launch_env().is_main_process:
                print(f"[metamtl] stage {name!r} finished before: skipped ({scfg.run_dir / 'learner.pt'})")
        else:
            results = run(scfg, resume=plan[i], progress=progress, callbacks=callbacks, quiet=quiet,
                          overwrite=overwrite)
            # rank 0 alone writes the stage's learner.pt, history.json and results.json, read next by all
            distributed.barrier(f"stage {name!r} hand-off")
        rows = json.loads((scfg.run_dir / "history.json").read_text()) if (scfg.run_dir / "history.json").is_file() else []
        offset = sum(d["iterations"] for d in done)
        history += [{**r, "stage": name, "iteration": r.get("iteration", 0) + offset} for r in rows]
        done.append({"stage": name, **{k: results[k] for k in ("iterations", "train_seconds", "stopped_by",
                                                                "selected_iteration", "checkpoint")},
                     "algorithm": scfg.algorithm.get("name")})
        init = results["checkpoint"]
    results["selected_iteration"] += sum(d["iterations"] for d in done[:-1])  # counted across stages
    results.update(stages=done, iterations=sum(d["iterations"] for d in done),
                   train_seconds=sum(d["train_seconds"] for d in done), config=cfg.to_dict())
    if distributed.launch_env().is_main_process:
        write_history(cfg.run_dir / "history.json", history)
        atomic_write_json(cfg.run_dir / "results.json", results, indent=2)
        if cfg.logging.report:  # over the last stage's page: every stage's history, the same path
            _write_report(cfg.run_dir, results, lambda *a: None)
    return results


def stage_plan(cfg: Config, stages: list[tuple[str, Config]], resume: str | Path | None) -> list[Any]:
    """What each stage of a staged run does: ``None`` (train), ``"done"`` (finished before: it holds
    ``learner.pt`` and ``results.json``) or the ``last.pt`` to resume it from.  Without ``resume``
    every stage trains; with it (``<run_dir>/last.pt`` or a stage's ``last.pt``) the stages before
    the first unfinished one are done, that one resumes from its ``last.pt`` if it has one, and the
    last stage (in ``<run_dir>`` itself) never counts as done (resuming a finished one re-evaluates)."""
    if resume is None:
        return [None] * len(stages)
    folders = [scfg.run_dir.resolve() for _, scfg in stages]
    if Path(resume).resolve().parent not in folders or Path(resume).name != "last.pt":
        raise ConfigError(f"a staged run resumes from its own folder: --resume {cfg.run_dir / 'last.pt'} (finished "
                          f"stages are skipped, the interrupted one continues from its last.pt), not {resume}")
    plan: list[Any] = []
    for i, (_, scfg) in enumerate(stages):
        finished = all((scfg.run_dir / f).is_file() for f in ("learner.pt", "results.json"))
        if finished and i < len(stages) - 1 and all(p == "done" for p in plan):
            plan.append("done")
        elif all(p == "done" for p in plan) and (scfg.run_dir / "last.pt").is_file():
            plan.append(str(scfg.run_dir / "last.pt"))
        else:
            plan.append(None)
    if all(p is None for p in plan):
        raise CheckpointError(f"cannot resume: no stage of {cfg.run_dir} saved a checkpoint (a stage's resumable "
                              f"checkpoint is its last.pt, under {cfg.run_dir / 'stages'}); rerun the config")
    return plan


def check_stages(stages: list[tuple[str, Config]], overwrite: bool) -> None:
    """What would stop a staged run after its first stages trained, found before any stage trains:
    a run folder holding another run, a model that cannot take the previous stage's trunk,
    distillation phases a stage's algorithm never applies, eval settings the last stage's test
    split cannot serve."""
    for name, scfg in stages:
        held = held_run(scfg.run_dir)
        if held and not overwrite:
            raise ConfigError(
                f"stage {name!r}: {scfg.run_dir} already holds a run ({', '.join(held)}); it is not overwritten "
                f"silently: continue an interrupted run with --resume {stages[-1][1].run_dir / 'last.pt'} (finished "
                "stages are skipped; Python: run(cfg, resume=...)), replace it with --overwrite (Python: "
                "overwrite=True), or start a new run with name=... or output_dir=...")
    from .run_state import load_trunk

    previous = None
    for name, scfg in stages:  # every run reseeds before it builds its learner: nothing here changes it
        learner = build_learner(scfg, build_tasks(scfg)["train"])
        model = learner.model
        if scfg.distill:
            _check_stage_distill(name, scfg.distill, learner.algorithm)
        if previous is not None:
            try:
                load_trunk(model, previous.state_dict())
            except CheckpointError as exc:
                raise ConfigError(f"stage {name!r} cannot start from the previous stage's trunk: {exc}") from None
        previous = model
    check_eval_settings(stages[-1][1], build_test_tasks(stages[-1][1]))


def _check_stage_distill(name: str, distill: dict[str, Any], algorithm: Any) -> None:
    """A stage's ``distill`` phases that its algorithm never applies: a :class:`ConfigError` naming the stage."""
    from .distill.hooks import check_config_applies

    try:
        check_config_applies(distill, algorithm)
    except ConfigError as exc:
        raise ConfigError(f"stage {name!r}: {exc}") from None


def check_output_dir(cfg: Config) -> None:
    """Create the run folder and make sure files can be written there, before any work starts."""
    try:
        ensure_writable_dir(cfg.run_dir)
    except CheckpointError as exc:
        raise ConfigError(
            f"cannot write to the output directory {cfg.run_dir} ({exc.__cause__.strerror or exc.__cause__}); "
            "choose another with output_dir=... or fix its permissions"
        ) from exc


def _empty_metrics(path: Path) -> bool:
    """A metrics file without a single row (only the CSV header): left by a run that stopped before
    its first iteration was logged (a bad setting found when training starts)."""
    if path.suffix not in (".csv", ".jsonl"):
        return False
    with open(path, "rb") as fh:
        lines = fh.read(4096).splitlines()
    return len(lines) <= (1 if path.suffix == ".csv" else 0)


def held_run_files(run_dir: Path) -> list[str]:
    """The run files in ``run_dir`` that a new run would lose (metrics without a row do not count)."""
    return [f for f in RUN_FILES if (run_dir / f).exists() and not _empty_metrics(run_dir / f)]


def held_run(run_dir: Path) -> list[str]:
    """What a new run in ``run_dir`` would lose: its run files, else the W&B runs that logged iterations
    (a crashed run's only record when it wrote no metrics file or checkpoint yet)."""
    from .reporting.wandb_offline import runs_with_history  # stdlib only until a run file is read

    return held_run_files(run_dir) or [f"wandb/{r.name}" for r in runs_with_history(run_dir)]


def discard_run(run_dir: Path, files: list[str]) -> None:
    """Delete a run that ``--overwrite`` replaces: its ``files``, those derived from them and its W&B
    runs (``<run_dir>/wandb``: the new run's report would list them, and its `wandb sync` command
    upload them, as its own)."""
    for name in [f for f in files if f in RUN_FILES] + [f for f in DERIVED_FILES if (run_dir / f).exists()]:
        (run_dir / name).unlink()  # (files may name W&B runs: wandb/ goes below)
    discard_wandb(run_dir, "the run that --overwrite replaces")


def discard_wandb(run_dir: Path, whose: str) -> None:
    """Delete ``<run_dir>/wandb``, the W&B runs of ``whose`` run (a replaced one, one that failed before
    its first iteration): the new run's report would list them, and its `wandb sync` command upload
    them, as its own."""
    wandb_dir = run_dir / "wandb"
    if wandb_dir.is_symlink():
        wandb_dir.unlink()
    elif wandb_dir.is_dir():
        try:
            shutil.rmtree(wandb_dir)
        except OSError as exc:
            raise ConfigError(f"cannot delete the W&B runs of {whose} ({wandb_dir}: "
                              f"{exc.strerror or exc}); delete or move that folder yourself and run again") from None


def claim_run_dir(cfg: Config, resume: str | Path | None = None, overwrite: bool = False) -> RunFolderLock:
    """Take the run folder for this process and make sure no earlier run in it is lost.

    Returns the held :class:`~metamtl.checkpoint.RunFolderLock` (rank 0 only; other ranks get an
    unheld one).  A folder that already holds checkpoints, metrics or results is refused with a
    :class:`ConfigError` naming ``--resume`` and ``--overwrite``, unless ``resume`` is a
    checkpoint inside it (the run continues) or ``overwrite`` is set (its run files are deleted
    first).  A folder another process is writing is refused with a :class:`CheckpointError`.
    """
    run_dir = cfg.run_dir
    main_process = distributed.launch_env().is_main_process
    lock = RunFolderLock(run_dir)
    if main_process:
        lock.acquire()
    try:
        existing = held_run(run_dir)
        if main_process and not existing:  # a run that failed before its first iteration holds nothing to keep
            for f in RUN_FILES:
                (run_dir / f).unlink(missing_ok=True)
            discard_wandb(run_dir, "the run that failed in this folder before its first iteration")
        continuing = resume is not None and Path(resume).resolve().parent == run_dir.resolve()
        if existing and not continuing:
            if not overwrite:
                hint = (f"continue it with --resume {run_dir / 'last.pt'} (Python: run(cfg, resume=...)), "
                        if "last.pt" in existing else "")
                elsewhere = ("" if resume is None else
                             f"the checkpoint to resume ({resume}) is not in this run's folder, and ")
                raise ConfigError(
                    f"{elsewhere}{run_dir} already holds a run ({', '.join(existing)}); it is not overwritten silently: "
                    f"{hint}replace it with --overwrite (Python: overwrite=True), or start a new run with "
                    "name=... or output_dir=..."
                )
            if main_process:
                discard_run(run_dir, existing)
    except BaseException:
        lock.release()
        raise
    return lock


def check_eval_settings(cfg: Config, test_tasks: Any) -> None:
    """Refuse, before training, an ``eval.settings`` entry the test split cannot serve.

    Each setting (with ``eval.queries``) must be drawable from the test classes: enough classes
    for its ways, enough images per class for shots + queries.  With several datasets a setting
    with more ways than a dataset's held-out classes is skipped for that dataset (and recorded
    as skipped), as :func:`evaluate_per_dataset` does; shots/queries must still fit.
    """
    if test_tasks is None or is_regression(cfg):
        return
    several = isinstance(test_tasks, dict)
    tta = as_support_augment(cfg.eval.support_augment)
    for label, source in (test_tasks.items() if several else [(None, test_tasks)]):
        where = f"dataset {label!r}'s test split" if several else f"the test split ({cfg.data.test_split!r})"
        if tta is not None and isinstance(getattr(source, "dataset", None), ClassDataset):
            try:  # the support copies fit the test images
                check_fits(tta.augment, source.dataset.images, source.dataset.name)
            except ConfigError as exc:
                raise ConfigError(f"eval.support_augment: {exc}") from None
        for i, s in enumerate(cfg.eval.settings):
            if several and s.ways > getattr(source, "num_classes", s.ways):
                continue
            try:
                setting_tasks(source, s, cfg)  # the very source evaluation draws from, hierarchy included
            except TaskError as exc:
                within = "" if s.hierarchy is None else f" within one superclass (hierarchy {s.hierarchy!r})"
                raise TaskError(
                    f"eval.settings[{i}] ({s.ways}-way {s.shots}-shot{within}, eval.queries {cfg.eval.queries}) cannot be "
                    f"evaluated on {where}: {exc}. Change eval.settings / eval.queries (or the split) before "
                    "training: nothing was trained"
                ) from None


# -- ensembles from one config (ensemble.members > 1) ------------------------------------------
def run_ensemble(cfg: Config, resume: str | Path | None = None, progress: bool = True, quiet: bool = False,
                 overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.ensemble.members`` members side by side, then evaluate their ensemble on the
    held-out classes (every ``eval.settings`` entry with every ``eval.heads`` entry).

    Returns the results dict (also ``<run_dir>/results.json``); ``results["checkpoint"]`` is the
    ensemble file.  A member that fails stops the others and raises with the end of its log.
    """
    from .config import stage_configs
    from .ensemble_fit import member_configs, train_members

    if resume is not None:
        raise ConfigError("an ensemble run is not resumed as a whole: resume each unfinished member with "
                          f"metamtl fit {cfg.run_dir / 'members' / 'memberI.yaml'} --resume "
                          f"{cfg.run_dir / 'members' / 'memberI' / 'last.pt'}, then evaluate the members' "
                          "learner.pt files together with metamtl evaluate A.pt B.pt ...")
    if distributed.launch_env().world_size > 1:
        raise ConfigError("ensemble.members > 1 starts one process per member itself; run it without torchrun "
                          "(or train members under torchrun one by one and evaluate them with metamtl evaluate)")
    say = (lambda *a: None) if quiet else print
    check_output_dir(cfg)
    lock = claim_run_dir(cfg, None, overwrite)
    try:
        last = stage_configs(cfg)[-1][1] if cfg.stages else cfg
        test_tasks = build_test_tasks(last)
        check_eval_settings(last, test_tasks)  # before any member trains
        members = member_configs(cfg)
        if not overwrite:
            check_members_free(cfg, members)
        record = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        t0 = time.perf_counter()
        train_members(cfg, members, progress, overwrite, say)
        record["train_seconds"] = time.perf_counter() - t0
        return _evaluate_ensemble(cfg, last, members, test_tasks, record, progress, say)
    finally:
        lock.release()


def check_members_free(cfg: Config, members: list[tuple[str, Config]]) -> None:
    """Refuse an ensemble whose members' run folders (a staged member's stage folders too) hold a run,
    before any member's ``memberI.yaml`` or ``memberI.log`` is rewritten: those of a stopped run stay
    the ones its resume command needs."""
    for name, m in members:
        stages = [m.run_dir / "stages" / s["name"] for s in m.stages[:-1]]
        for folder in stages + [m.run_dir]:
            held = held_run(folder)
            if held:
                yaml = cfg.run_dir / "members" / f"{name}.yaml"
                raise ConfigError(
                    f"ensemble member {name}: {folder} already holds a run ({', '.join(held)}); nothing was written: "
                    f"continue an interrupted member with metamtl fit {yaml} --resume {m.run_dir / 'last.pt'} (then "
                    "metamtl evaluate the members' learner.pt files together), replace the whole ensemble with "
                    "--overwrite (Python: overwrite=True), or start a new run with name=... or output_dir=...")


def _evaluate_ensemble(cfg: Config, last: Config, members: list[tuple[str, Config]], test_tasks: Any,
                       record: dict[str, Any], progress: bool, say: Any) -> dict[str, Any]:
    """Build the ensemble from the members' learners, save it, evaluate it, write results and report."""
    from .ensemble import Ensemble
    from .ensemble_fit import member_threads

    rows = [json.loads((m.run_dir / "results.json").read_text()) for _, m in members]
    ensemble = Ensemble([r["checkpoint"] for r in rows], device=cfg.train.device)  # where a single run evaluates
    path = ensemble.save(cfg.run_dir / "ensemble.pt")
    say(f"[metamtl] {ensemble}: {ensemble.averages} averaged; saved to {path}")
    results = {
        "name": cfg.name, "config": cfg.to_dict(), "checkpoint": str(path),
        "iterations": sum(r["iterations"] for r in rows), "train_seconds": record["train_seconds"],
        "stopped_by": "+".join(sorted({str(r.get("stopped_by")) for r in rows})),
        "machine": machine_info(), "commit": record["commit"], "date": record["date"], "test": [],
        "data_sources": data_sources(last), "ensemble": {"threads": member_threads(cfg), "members": [
            {"name": name, "seed": m.seed, "tasks_seed": m.tasks.seed, "run_dir": str(m.run_dir),
             **{k: r.get(k) for k in ("iterations", "train_seconds", "stopped_by", "selected_iteration",
                                       "stages", "test")}}
            for (name, m), r in zip(members, rows)]},
    }
    if test_tasks is not None:
        t = time.perf_counter()
        results["test"] = evaluate_held_out(ensemble, last, test_tasks, progress, say)
        results["eval_seconds"] = time.perf_counter() - t
    if cfg.logging.wandb:  # the members logged their own trainings; this run logs the ensemble's rows
        wandb_logger(cfg, tags=["ensemble"]).log_evaluation(results)
    atomic_write_json(cfg.run_dir / "results.json", results, indent=2)
    if cfg.logging.report:
        _write_report(cfg.run_dir, results, say)
    return results
