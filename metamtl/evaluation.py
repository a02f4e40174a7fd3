"""Evaluation: mean query accuracy (and loss) over fixed episodes, with 95% confidence intervals.

:func:`evaluate_episodes` is the loop behind :meth:`MetaLearner.evaluate
<metamtl.MetaLearner.evaluate>`: it scores a chunk of episodes at a time (so an algorithm may
adapt them together), splits the episodes across processes and gathers the per-episode results
in order, so every process gets the single-process numbers.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .distributed import ProcessStrategy
from .errors import ConfigError
from .heads import ALGORITHM, FeatureHead, episode_metrics
from .heads.base import full_precision
from .inputs import check_int, check_task_source, eval_mode, with_support_copies
from .models.multidataset import dataset_scope, routed_dataset
from .numerics import check_finite_episodes
from .placement import Placement
from .progress_bars import progress_bar
from .tasks.episode import Episode
from .tasks.sampler import MixedTasks, TaskSource

if TYPE_CHECKING:
    from .learner import MetaLearner

#: episodes handed to ``Algorithm.evaluate_episodes`` at once
EVAL_CHUNK = 50

_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that ``evaluate``, ``adapt``, ``predict``, a predictor's call and the feature means hold
    while they run ``model``: they swap its weights (``functional_call``) and its train/eval modes
    (:func:`~metamtl.inputs.eval_mode`) in place, so calls from several threads take turns instead of
    restoring each other's temporary weights as the learner's own (re-entrant: ``predict`` adapts)."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


def within_superclass(hierarchy: Any) -> str:
    """A setting label's suffix for episodes drawn within one superclass, naming the depth (or the
    mapping's size) so that settings that differ only in ``hierarchy`` never share a label
    (`` within one superclass (depth 1)``); empty for ``None``."""
    if hierarchy is None:
        return ""
    if isinstance(hierarchy, str) and hierarchy.startswith("mixed: "):  # a mixture's sources differ (hierarchy_of)
        return f" (superclass settings {hierarchy})"
    what = f"depth {hierarchy}" if isinstance(hierarchy, int) else str(hierarchy)  # 'mapping of N classes'
    return f" within one superclass ({what})"


@dataclasses.dataclass
class EvalResult:
    """Mean query accuracy (and loss) over evaluation episodes, with 95% confidence intervals.

    ``accuracy`` and ``ci95`` are fractions (0.973 means 97.3%); ``ci95`` is
    ``1.96 * std / sqrt(episodes)`` (``nan`` for a single episode).  For regression tasks ``accuracy`` is ``None`` and ``loss``
    is the mean squared error.  ``hierarchy`` is the task source's superclass setting (episodes
    within one superclass, see :class:`~metamtl.tasks.EpisodeSampler`), ``None`` for random classes.
    ``head`` names what classified the queries (``"algorithm"``: the algorithm's own adaptation,
    else a :mod:`metamtl.heads` feature head); ``transductive`` is true when the head used the
    whole query set of each task: such results must not be compared with inductive ones.  Every row,
    the algorithm's and a feature head's alike, normalises the queries as the learner's ``bn_stats``
    says (default ``"transductive"``: with the query set's own BatchNorm statistics, the protocol of
    the published MAML / ProtoNet numbers), so rows of one learner compare with each other and with
    those numbers; ``transductive`` does not repeat it (:attr:`AdaptedPredictor.transductive
    <metamtl.predictors.AdaptedPredictor.transductive>`, which answers whether one ``predict`` call's
    queries affect each other, does).
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
        setting += within_superclass(self.hierarchy)  # naming the depth, as the report's labels do
        if self.head != ALGORITHM:
            setting += f", head {self.head}" + (" (TRANSDUCTIVE)" if self.transductive else "")
        if self.accuracy is None:
            return f"MSE {self.loss:.4f}{plus_minus(self.loss_ci95, digits=4)} ({setting}, {self.episodes} episodes)"
        return (
            f"accuracy {100 * self.accuracy:.2f}%{plus_minus(self.ci95, 100, unit='%')} "
            f"({setting}, {self.episodes} episodes, 95% CI)"
        )

    def metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss, f"{prefix}loss_ci95": self.loss_ci95}
        if self.accuracy is not None:
            out.update({f"{prefix}accuracy": self.accuracy, f"{prefix}accuracy_ci95": self.ci95})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields, an undefined CI (one episode) as ``None``: JSON ``null`` (``NaN`` is no JSON)."""
        return {**dataclasses.asdict(self), "ci95": defined(self.ci95), "loss_ci95": defined(self.loss_ci95)}


def defined(ci: float | None) -> float | None:
    """A CI half-width, ``None`` when it is undefined (``nan``: fewer than two episodes)."""
    return ci if ci is not None and math.isfinite(ci) else None


def defined_cis(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every CI (a ``*_ci95`` key) :func:`defined`: an undefined one (a single
    validation episode) is ``None``, JSON ``null``, as in ``results.json`` (``NaN`` is no JSON)."""
    return {k: defined(v) if k.endswith("_ci95") else v for k, v in metrics.items()}


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)``.

    The mean is ``nan`` for no values; the half-width is ``nan`` for fewer than two (one episode
    says nothing about the spread: a CI of 0 would claim certainty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    if arr.size == 1:
        return float(arr[0]), float("nan")
    return float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(arr.size))


def plus_minus(ci: float | None, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """``" ± 0.29%"``-style text for a CI half-width; ``" ± n/a"`` when it is undefined (one episode)."""
    if ci is None or not math.isfinite(ci):
        return " ± n/a"
    return f" ± {scale * ci:.{digits}f}{unit}"


def episode_reader(tasks: TaskSource | Sequence[Episode], episodes: int = 600, *, ways: int | None = None,
                   shots: int | None = None, queries: int | None = None,
                   start: int = 0) -> tuple[Callable[[int], Episode], int]:
    """``(episode_at, n)``: the ``n`` episodes to evaluate, ``episode_at(i)`` for ``i < n``.

    ``tasks`` is a task source whose episodes ``start .. start+episodes-1`` are used (in another
    ways/shots/queries setting when given; at most ``tasks.distinct_episodes`` of a source that
    has only that many distinct tasks), or a list (any sequence, e.g. a TaskBatch) of episodes of one
    setting, of which ``tasks[start:start+episodes]`` are used (ways/shots/queries are a :class:`ConfigError`: a
    list has no source to draw another setting from).
    """
    episodes, start = check_int("episodes", episodes, 1), check_int("start", start, 0)
    if isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)) and not hasattr(tasks, "episode"):
        return _listed_episodes(list(tasks), episodes, start, dict(ways=ways, shots=shots, queries=queries))
    check_task_source("tasks", tasks)
    kw = {k: v for k, v in dict(ways=ways, shots=shots, queries=queries).items()
          if v is not None and getattr(tasks, k, None) != v}  # the source's own values need no change
    if kw:
        if not hasattr(tasks, "with_settings"):
            own = ", ".join(f"{k}={getattr(tasks, k, None)!r}" for k in kw)
            raise ConfigError(f"{type(tasks).__name__} cannot change ways/shots/queries (asked for "
                              f"{', '.join(f'{k}={v!r}' for k, v in kw.items())}; it draws {own}): leave them out, "
                              "or pass a source with with_settings (e.g. an EpisodeSampler)")
        tasks = tasks.with_settings(**kw)
    distinct = getattr(tasks, "distinct_episodes", None)  # a fixed set of tasks: score each once
    return (lambda i: tasks.episode(start + i)), min(episodes, distinct or episodes)


def _listed_episodes(tasks: Sequence[Episode], episodes: int, start: int,
                     settings: dict[str, int | None]) -> tuple[Callable[[int], Episode], int]:
    """:func:`episode_reader` of a list of episodes."""
    if not all(isinstance(e, Episode) for e in tasks):
        raise ConfigError("evaluate needs a task source or a list of Episode objects")
    given = [f"{k}={v!r}" for k, v in settings.items() if v is not None]
    if given:
        raise ConfigError(f"evaluate got a list of episodes and {', '.join(given)}: a list has no source to draw "
                          "another setting from; pass a task source (EpisodeSampler) to change the setting, or "
                          "leave ways/shots/queries out")
    chosen = list(tasks[start:start + episodes])
    if not chosen:
        raise ConfigError(f"start={start} is past the end of the list of {len(tasks)} episodes")
    check_one_setting([(e.ways, e.shots, e.queries) for e in chosen], "a list")
    return chosen.__getitem__, len(chosen)


def check_one_setting(settings: Sequence[tuple[int, int, int]], what: str) -> None:
    """A :class:`ConfigError` unless every episode evaluated has one ``(ways, shots, queries)``."""
    kinds = sorted(set(settings))
    if len(kinds) > 1:
        raise ConfigError(f"evaluate got {what} mixing episodes of different settings (ways, shots, queries: "
                          f"{', '.join(map(str, kinds))}), which one result would average under one label; "
                          "evaluate each setting's episodes separately (e.g. each source of a MixedTasks)")


def evaluate_episodes(score: Callable[[list[Episode]], list[dict[str, float]]], model: nn.Module,
                      episode_at: Callable[[int], Episode], n: int, steps: int, *, placement: Placement,
                      strategy: ProcessStrategy, check: Callable[[Episode], None], progress: bool = True,
                      support_augment: Any = None, **fields: Any) -> EvalResult:
    """Score episodes ``0..n-1`` (this process's share, then gathered) with ``score``, which gets a
    chunk of episodes as model input (the algorithm may adapt them together) and returns their
    query metrics.

    ``support_augment``: a :class:`~metamtl.data.augment.SupportAugment` adding augmented copies
    to every support set (episode ``i``'s drawn from its seed and ``i``), or ``None``;
    ``fields``: recorded in the result (``hierarchy``, ``head``, ``transductive``).
    """
    rows: list[tuple[int, tuple[dict[str, float], tuple[int, int, int]]]] = []
    mine = strategy.shard(n)
    bar = progress_bar(progress and strategy.is_main_process, total=len(mine), desc="evaluate", leave=False,
                       dynamic_ncols=True)
    with model_lock(model), eval_mode(model), closing(bar):  # a chunk of episodes at a time: the algorithm may adapt them together
        for lo in range(0, len(mine), EVAL_CHUNK):
            part = mine[lo:lo + EVAL_CHUNK]
            eps = [episode_at(i) for i in part]
            for ep in eps:
                check(ep)
            with torch.inference_mode(False), placement.autocast():  # an inner loop needs autograd, also there
                metrics = score([with_support_copies(placement.batch(outside_inference_mode(e)), support_augment)
                                 for e in eps])
            rows += [(i, (m, (e.ways, e.shots, e.queries))) for i, e, m in zip(part, eps, metrics)]
            bar.update(len(part))
    return summarize(strategy.gather_ordered(rows), steps, **fields)


def outside_inference_mode(value: Any) -> Any:
    """``value`` (a tensor or an :class:`Episode`) with copies of the tensors made under
    ``torch.inference_mode()``, which cannot enter autograd (call outside inference mode)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    copies = {f.name: outside_inference_mode(getattr(value, f.name)) for f in dataclasses.fields(value)
              if isinstance(getattr(value, f.name), torch.Tensor) and getattr(value, f.name).is_inference()}
    return dataclasses.replace(value, **copies) if copies else value


def hierarchy_of(tasks: Any) -> Any:
    """A source's superclass setting for results (a mapping is summarised by its size); a mixture of
    sources (:class:`~metamtl.tasks.MixedTasks`) has its sources' one setting, else a text naming each."""
    parts = getattr(tasks, "sources", None)
    if isinstance(parts, (list, tuple)) and parts and not hasattr(tasks, "hierarchy"):
        each = [hierarchy_of(p) for p in parts]
        if all(h == each[0] for h in each):
            return each[0]
        return "mixed: " + ", ".join("random classes" if h is None else f"depth {h}" if isinstance(h, int) else str(h)
                                     for h in each)
    h = getattr(tasks, "hierarchy", None)
    return f"mapping of {len(h)} classes" if isinstance(h, dict) else h


def summarize(results: list[tuple[dict[str, float], tuple[int, int, int]]], steps: int,
              **fields: Any) -> EvalResult:
    """One :class:`EvalResult` from per-episode ``(metrics, (ways, shots, queries))`` rows."""
    if not results:
        raise ConfigError("no episodes to evaluate")
    check_one_setting([setting for _, setting in results], "a task source")
    losses = [m["loss"] for m, _ in results]
    check_finite_episodes(losses, steps, fields.get("head"))  # never an accuracy computed from NaN logits
    accs = [m["accuracy"] for m, _ in results if "accuracy" in m]
    acc, ci = mean_ci95(accs) if accs else (None, None)
    loss, loss_ci = mean_ci95(losses)
    return EvalResult(acc, ci, loss, loss_ci, len(losses), *results[0][1], int(steps), accs, losses, **fields)


class PickedEpisodes:
    """The task source of episodes ``indices`` of ``tasks`` (all of one setting): episode ``k`` is
    ``tasks.episode(indices[k])``."""

    def __init__(self, tasks: TaskSource, indices: Sequence[int], setting: tuple[int, int, int]) -> None:
        self.tasks, self.indices, self.name = tasks, list(indices), tasks.name
        self.ways, self.shots, self.queries = setting
        self.task = getattr(tasks, "task", "classification")

    def episode(self, index: int) -> Episode:
        return self.tasks.episode(self.indices[index])


def setting_groups(tasks: Any, episodes: int) -> list[PickedEpisodes] | None:
    """Episodes ``0..episodes-1`` of a :class:`MixedTasks` whose sources draw different settings,
    one source of them per setting, judged by the source each episode is drawn from (in a nested
    mixture, the innermost one); ``None`` for any other source (one setting)."""
    if not isinstance(tasks, MixedTasks) or len({_setting(s) for s in mixture_leaves(tasks)}) == 1:
        return None
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i in range(episodes):
        leaf = tasks
        while isinstance(leaf, MixedTasks):  # a mixture hands the episode's index on to the source it picks
            leaf = leaf.sources[leaf.source_of(i)]
        groups.setdefault(_setting(leaf), []).append(i)
    return [PickedEpisodes(tasks, idx, setting) for setting, idx in groups.items()]


def _setting(source: Any) -> tuple[int, int, int]:
    return source.ways, source.shots, source.queries


def validation_metrics(learner: "MetaLearner", tasks: Any, episodes: int) -> dict[str, float]:
    """``fit``'s ``val/`` metrics: the algorithm's adaptation on episodes ``0..episodes-1`` of
    ``tasks``.  A mixture whose datasets draw different settings (a dataset with fewer validation
    classes than the training ways takes them all) is evaluated one setting at a time, and the
    metrics are the mean (and CI) over all its episodes, as for a mixture of one setting."""
    groups = setting_groups(tasks, episodes)
    if groups is None:
        return learner.evaluate(tasks, episodes, progress=False, head=ALGORITHM).metrics("val/")
    parts = [learner.evaluate(g, len(g.indices), progress=False, head=ALGORITHM) for g in groups]
    losses = [v for r in parts for v in r.per_episode_loss]
    accs = [v for r in parts for v in r.per_episode_accuracy]
    acc, ci = mean_ci95(accs) if accs else (None, None)
    loss, loss_ci = mean_ci95(losses)
    return dataclasses.replace(parts[0], accuracy=acc, ci95=ci, loss=loss, loss_ci95=loss_ci).metrics("val/")


def mean_feature(trunk: nn.Module, data: Any, placement: Placement, max_images: int = 10_000,
                 batch_size: int = 256) -> torch.Tensor:
    """Mean trunk feature over at most ``max_images`` (a seeded random subset) of a dataset's images,
    in chunks of ``batch_size`` (with batch-statistics BatchNorm, the mean depends on it: :func:`feature_means`)."""
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:max_images]
    total = None
    for lo in range(0, len(rows), batch_size):
        x = data.images.index_select(0, rows[lo:lo + batch_size])
        x = data.preprocessing.normalize(x) if data.preprocessing is not None else x.float()
        with torch.no_grad(), placement.autocast():
            part = full_precision(trunk(placement.model_input(x))).sum(0)
        total = part if total is None else total + part
    return (total / len(rows)).cpu()


def mixture_leaves(source: Any) -> list[Any]:
    """The task sources of a :class:`MixedTasks` (those of a nested one too), else ``[source]``."""
    if not isinstance(source, MixedTasks):
        return [source]
    return [leaf for part in source.sources for leaf in mixture_leaves(part)]


def feature_means(model: nn.Module, source: Any, placement: Placement, max_images: int = 10_000,
                  batch_size: int = 256, strict: bool = True) -> dict[str, torch.Tensor]:
    """Mean trunk feature of each training dataset (by name) of ``source``: an ``EpisodeSampler``,
    a ``MixedTasks`` of them (one mean per dataset, nested mixtures too) or a ``ClassDataset``; the
    model in eval mode.

    The images go through the trunk ``batch_size`` at a time.  A trunk whose BatchNorm normalises
    with batch statistics also in eval mode (conv4's episodic BatchNorm, which keeps no running
    statistics) normalises every chunk with its own statistics, so the mean depends on
    ``batch_size`` (and on ``max_images``, which sets the last chunk's size): it is then not only a
    memory setting.  Keep the default (256, what ``metamtl fit`` and ``metamtl evaluate`` use) for
    means, and SimpleShot/LaplacianShot results, that compare across runs.  A source without stored
    images (a task source of the user's) is a :class:`ConfigError`, or skipped when not ``strict``."""
    check_int("max_images", max_images, 1)
    check_int("batch_size", batch_size, 1)
    out = {}
    with model_lock(model), eval_mode(model):
        for src in mixture_leaves(source):  # a ClassDataset's: file names
            data = getattr(src, "dataset", src)
            if not hasattr(data, "images") or not hasattr(data, "preprocessing"):
                if not strict:
                    continue
                raise ConfigError(f"compute_feature_mean needs training tasks or a ClassDataset, got {type(src).__name__}")
            name = getattr(src, "name", data.name)
            with dataset_scope(routed_dataset(model, name)):  # a multi-dataset model: that dataset's stem
                out[name] = mean_feature(model.trunk, data, placement, max_images, batch_size)
    return out


@contextmanager
def means_follow_trunk(learner: "MetaLearner", source: Any) -> Iterator[None]:
    """Around a ``fit`` on ``source``: the learner's :attr:`~metamtl.MetaLearner.feature_means`
    (if any) are set aside, so that checkpoints written while training hold none of the old trunk,
    and put back unless training changed the trunk (an iteration or a resume), in which case they
    are recomputed from ``source`` (:func:`refresh_means`)."""
    means = learner.inference.feature_means
    before, start, finished = dict(means), learner.iteration, False
    means.clear()
    try:
        yield
        finished = True
    finally:
        means.update(before)
        if before and learner.iteration != start:
            refresh_means(learner, source if finished else None)


def refresh_means(learner: "MetaLearner", source: Any) -> None:
    """The learner's feature means recomputed for its new trunk from ``source`` (default
    ``max_images`` and ``batch_size``); those it cannot recompute (``source`` ``None``: a fit that
    failed; a source without those datasets' images) are dropped with a warning saying to call
    ``compute_feature_mean``."""
    new: dict[str, torch.Tensor] = {}
    if source is not None:  # (training tasks without stored images, e.g. a task source of the user's: skipped)
        new = feature_means(learner.model, source, learner.placement, strict=False)
    inference = learner.inference
    old = {k: v for k, v in inference.feature_means.items() if k not in new}
    inference.feature_means.clear()
    inference.feature_means.update(old)
    inference.drop_means("fit changed the trunk" + (" and stopped" if source is None else ""))  # warns about old
    inference.feature_means.update(new)


def scorer(algorithm: Any, model: nn.Module, steps: int, head: FeatureHead | None, bn_stats: str,
           mean_for: Callable[[Episode], torch.Tensor | None]) -> Callable[[list[Episode]], list[dict[str, float]]]:
    """Query metrics of a chunk of episodes: the algorithm adapts them with ``steps`` inner steps
    (several at once on its fast path), or a feature ``head`` classifies their trunk features."""
    if head is None:
        return lambda eps: algorithm.evaluate_episodes(model, eps, steps)
    return lambda eps: episode_metrics(head, model.trunk, eps, bn_stats, mean_for)
