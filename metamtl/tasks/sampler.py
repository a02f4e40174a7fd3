"""Seeded, reproducible N-way K-shot task sampling.

A *task source* maps an integer episode index to an :class:`~metamtl.tasks.Episode`, as a pure
function of ``(seed, index)``: the same index gives the same episode in every run, process and
DataLoader worker, and resuming at iteration ``i`` simply continues at index ``i * batch_size``.
Distributed ranks take disjoint slices of each meta-batch (see :func:`task_batches`).

Sources:

* :class:`EpisodeSampler` - N-way K-shot episodes with Q queries per class from a
  :class:`~metamtl.data.ClassDataset` (vectorised: one gather per episode, no per-image Python).
* :class:`MixedTasks` - several sources mixed with weights (fixed, proportional to size, or
  temperature-scaled); each episode comes from one source.
* :class:`~metamtl.tasks.Sinusoid` - the MAML sinusoid regression family (:mod:`metamtl.tasks.sinusoid`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
import threading
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.augment import build_augment, check_fits
from ..data.base import ClassDataset
from ..errors import TaskError
from .episode import Episode, TaskBatch

_MASK64 = (1 << 64) - 1


def episode_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for episode ``index`` of a source seeded with ``seed`` (splitmix64)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) & _MASK64
    for mult in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):
        z = ((z ^ (z >> 31)) * mult) & _MASK64
    return (z ^ (z >> 29)) & ((1 << 63) - 1)


def episode_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(episode_seed(seed, index, stream))


@runtime_checkable
class TaskSource(Protocol):
    """Anything that turns an index into an episode deterministically."""

    ways: int
    shots: int
    queries: int
    name: str

    def episode(self, index: int) -> Episode: ...


def _integral(value) -> bool:
    """An integer (numpy's, a 0-d integer tensor's too: anything with ``__index__``) or an integral
    float, not a bool."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return False
    if isinstance(value, float):
        return value.is_integer()
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (or integral float) >= ``minimum``, else :class:`TaskError`."""
    if not _integral(value):
        raise TaskError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise TaskError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_seed(seed) -> int:
    """Any integer (or integral float) is a seed."""
    if not _integral(seed):
        raise TaskError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_index(index) -> int:
    """An episode index: any integer >= 0 (anything with ``__index__``), else :class:`TaskError`."""
    if hasattr(index, "__index__") and not isinstance(index, bool):
        try:
            index = index.__index__()
        except TypeError:  # a float or multi-element tensor has the method but no integer
            pass
        else:
            if index >= 0:
                return index
    raise TaskError(f"episode index must be an integer >= 0, got {index!r}")


def _check_fits(dataset: ClassDataset, ways: int, shots: int, queries: int) -> None:
    """:class:`TaskError` unless ``dataset`` can serve ``ways``-way episodes of ``shots + queries``
    images per class (and ``ways`` >= 2: a 1-way episode measures nothing)."""
    if dataset.num_classes == 0:
        raise TaskError(f"dataset {dataset.name!r} has no classes; check its root and split")
    if ways < 2:
        raise TaskError(
            f"ways must be >= 2, got {ways}: a 1-way episode of {dataset.name!r} has a single class, so "
            "every query is trivially right (loss 0, accuracy 100%) and nothing is learned or measured; "
            "use 2 or more ways (a split needs at least 2 classes)"
        )
    need = shots + queries
    limit = min(need, torch.iinfo(torch.long).max)
    eligible = torch.nonzero(dataset.class_counts >= limit).flatten()
    if len(eligible) < dataset.num_classes:
        small = [
            f"{dataset.class_names[c]} ({int(dataset.class_counts[c])})"
            for c in torch.nonzero(dataset.class_counts < limit).flatten()[:5].tolist()
        ]
        raise TaskError(
            f"{dataset.name!r}: shots + queries = {need} but {dataset.num_classes - len(eligible)} "
            f"class(es) have fewer images, e.g. {', '.join(small)}; lower shots/queries or "
            f"drop those classes (move their folders or CSV rows out of the dataset; in Python: dataset.subset)"
        )
    if ways > dataset.num_classes:
        raise TaskError(
            f"{ways}-way tasks need {ways} classes but {dataset.name!r} has only "
            f"{dataset.num_classes}; lower ways or use a larger split"
        )


FINGERPRINT_ATTRS = ("ways", "shots", "queries", "name", "seed")


def source_fingerprint(source: object) -> str:
    """What identifies a task source across processes (a resume, the ranks of a torchrun): its
    ``repr`` when its class defines one (metamtl's sources do), else its class's qualified name and
    its ``ways/shots/queries/name/seed`` attributes, never ``object.__repr__``'s memory address,
    which differs in every process; an address inside a repr of a class's own is left out too."""
    if type(source).__repr__ is not object.__repr__:
        return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(source))
    attrs = ", ".join(f"{k}={getattr(source, k)!r}" for k in FINGERPRINT_ATTRS if hasattr(source, k))
    return f"{type(source).__qualname__}({attrs})"


class EpisodeSampler(Dataset):
    """N-way K-shot episodes from a class-indexed dataset.

    Args:
        dataset: the classes to draw from (e.g. the train split).
        ways: classes per episode (N).
        shots: support examples per class (K).
        queries: query examples per class (Q).
        seed: episode ``i`` is a pure function of ``(seed, i)``.
        name: name used in logs (default: the dataset's name).
        augment: optional training augmentation applied to every support and query image
            (e.g. :class:`~metamtl.data.augment.RandomCropFlip`), drawn from a separate seeded
            stream: the classes and images of episode ``i`` are the same with or without it,
            and the augmented episode is still a pure function of ``(seed, i)``.
        hierarchy: draw every episode's classes from one superclass (hierarchical sampling,
            e.g. Lake et al.'s within-alphabet Omniglot episodes): ``None`` (classes drawn from
            the whole dataset), an integer depth ``d`` (a class's superclass is the first ``d``
            ``/``-separated parts of its name: depth 1 maps ``Greek/character03@90`` to
            ``Greek``) or a mapping ``{class name: superclass}`` covering every class.  An
            episode first draws a superclass uniformly among those with at least ``ways``
            classes (:attr:`superclasses`), then ``ways`` classes of it.

    ``sampler[i]`` (or ``sampler.episode(i)``) returns episode ``i``. Labels are remapped to
    ``0..ways-1`` in a random order per episode; ``episode.classes`` holds the dataset class
    index of each label.  Works as a map-style Dataset inside a ``DataLoader`` with workers.
    """

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        seed: int = 0,
        name: str | None = None,
        augment=None,
        hierarchy: int | dict | None = None,
    ) -> None:
        if not isinstance(dataset, ClassDataset):
            raise TaskError(
                f"EpisodeSampler needs a ClassDataset, got {type(dataset).__name__}; "
                "build one with metamtl.data (Omniglot, MiniImageNet, ClassFolder, ...)"
            )
        self.dataset = dataset
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries, minimum=0)
        self.seed = check_seed(seed)
        self.name = str(name or dataset.name)
        self.task = "classification"
        self.augment = build_augment(augment)
        if self.augment is not None and dataset.images.dim() != 4:
            raise TaskError(f"augment needs an image dataset; {dataset.name!r} stores shape {list(dataset.images.shape[1:])}")
        check_fits(self.augment, dataset.images, dataset.name)
        _check_fits(dataset, self.ways, self.shots, self.queries)
        self._max_count = int(dataset.class_counts.max())
        # Per-episode constants, computed once (episodes get clones): with equal class sizes no
        # padding mask is needed; the random draws are the same either way.
        self._equal_counts = bool((dataset.class_counts == self._max_count).all())
        self._positions = torch.arange(self._max_count).unsqueeze(0)
        labels = torch.arange(self.ways)
        self._support_y = labels.repeat_interleave(self.shots)
        self._query_y = labels.repeat_interleave(self.queries)
        self._local = threading.local()  # one reusable Generator per thread (re-seeded per episode)
        self.hierarchy = hierarchy
        #: superclass name -> dataset class indices, for the superclasses episodes are drawn from
        self.superclasses = _superclasses(dataset, hierarchy, self.ways) if hierarchy is not None else None
        self._groups = list(self.superclasses.values()) if self.superclasses is not None else None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local", None)  # DataLoader workers get a fresh one
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _generator(self, index: int, stream: int = 0) -> torch.Generator:
        """``episode_generator(seed, index, stream)``, without allocating a Generator per episode."""
        gens = getattr(self._local, "gens", None)
        if gens is None:
            gens = self._local.gens = {}
        g = gens.get(stream)
        if g is None:
            g = gens[stream] = torch.Generator()
        return g.manual_seed(episode_seed(self.seed, index, stream))

    def __len__(self) -> int:
        # Episodes are indexed by any non-negative integer; a DataLoader needs a length only
        # when no sampler is given, so report a large but finite number.
        return 2**62

    def __getitem__(self, index: int) -> Episode:
        return self.episode(index)

    def __repr__(self) -> str:
        aug = f", augment={self.augment!r}" if self.augment is not None else ""
        if isinstance(self.hierarchy, dict):
            aug += f", hierarchy=<mapping of {len(self.hierarchy)} classes>, superclasses={len(self._groups)}"
        elif self.hierarchy is not None:
            aug += f", hierarchy={self.hierarchy!r}, superclasses={len(self._groups)}"
        return (
            f"EpisodeSampler({self.name!r}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, seed={self.seed}, classes={self.dataset.num_classes}{aug})"
        )

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def episode(self, index: int) -> Episode:
        index = check_index(index)
        g = self._generator(index)
        ds = self.dataset
        if self._groups is None:
            classes = torch.randperm(ds.num_classes, generator=g)[: self.ways]
        else:  # one superclass, then ways of its classes
            group = self._groups[int(torch.randint(len(self._groups), (1,), generator=g))]
            classes = group[torch.randperm(len(group), generator=g)[: self.ways]]
        k = self.shots + self.queries
        # Sample k distinct rows per class without replacement, all classes at once: random keys,
        # positions past a class's count pushed to the end, keep the k smallest.
        if self._equal_counts:
            keys = torch.rand(self.ways, self._max_count, generator=g, dtype=torch.float32)
        else:
            counts = ds.class_counts[classes]
            width = int(counts.max())
            keys = torch.rand(self.ways, width, generator=g, dtype=torch.float32)
            keys.masked_fill_(self._positions[:, :width] >= counts.unsqueeze(1), 2.0)
        rows = keys.topk(k, dim=1, largest=False, sorted=True).indices  # [ways, k] positions
        rows.add_(ds.class_offsets[classes].unsqueeze(1))  # -> dataset rows
        # index_select: the cheapest gather for a 1-D index
        support_x = ds.images.index_select(0, rows[:, : self.shots].flatten())
        query_x = ds.images.index_select(0, rows[:, self.shots:].flatten())
        if self.augment is not None:
            ga = self._generator(index, stream=2)
            support_x, query_x = self.augment(support_x, ga), self.augment(query_x, ga)
        return Episode(
            support_x=support_x,
            support_y=self._support_y.clone(),
            query_x=query_x,
            query_y=self._query_y.clone(),
            ways=self.ways,
            shots=self.shots,
            queries=self.queries,
            dataset=self.name,
            classes=tuple(classes.tolist()),
            index=index,
            preprocessing=ds.preprocessing,
        )

    def with_settings(self, **kwargs) -> "EpisodeSampler":
        """The same dataset with other ``ways``/``shots``/``queries``/``seed``."""
        args = dict(ways=self.ways, shots=self.shots, queries=self.queries, seed=self.seed, name=self.name,
                    augment=self.augment, hierarchy=self.hierarchy)
        unknown = sorted(set(kwargs) - set(args))
        if unknown:
            raise TaskError(f"with_settings accepts {', '.join(args)}; got {', '.join(unknown)}")
        args.update(kwargs)
        return EpisodeSampler(self.dataset, **args)


def superclass_names(class_names: Sequence[str], hierarchy: int | dict) -> list[str]:
    """The superclass of every class name under ``hierarchy`` (a path depth or a mapping)."""
    if isinstance(hierarchy, dict):
        missing = [n for n in class_names if n not in hierarchy]
        if missing:
            raise TaskError(
                f"the hierarchy mapping gives no superclass for {len(missing)} class(es), e.g. "
                f"{', '.join(map(repr, missing[:5]))}; map every class name to its superclass"
            )
        bad = [n for n in class_names if isinstance(hierarchy[n], bool) or not isinstance(hierarchy[n], (str, int))]
        if bad:
            raise TaskError(
                f"the hierarchy mapping's superclasses must be names (strings or integers), but "
                f"{bad[0]!r} maps to {hierarchy[bad[0]]!r}"
                f"{f' ({len(bad)} classes like it)' if len(bad) > 1 else ''}; map every class name to its superclass's name"
            )
        return [str(hierarchy[n]) for n in class_names]
    if isinstance(hierarchy, bool) or not isinstance(hierarchy, int) or hierarchy < 1:
        raise TaskError(
            f"hierarchy must be a path depth >= 1 (superclass = the first parts of 'a/b/c' class names), "
            f"a mapping {{class name: superclass}} or null; got {hierarchy!r}"
        )
    shallow = [n for n in class_names if n.count("/") < hierarchy]
    if shallow:
        raise TaskError(
            f"hierarchy depth {hierarchy} needs class names with more than {hierarchy} '/'-separated "
            f"parts, but e.g. {shallow[0]!r} has {shallow[0].count('/') + 1}; use a smaller depth or a mapping"
        )
    return ["/".join(n.split("/")[:hierarchy]) for n in class_names]


def _superclasses(dataset: ClassDataset, hierarchy: int | dict, ways: int) -> dict[str, torch.Tensor]:
    """Superclass -> its class indices, keeping those with at least ``ways`` classes."""
    groups: dict[str, list[int]] = {}
    for c, sup in enumerate(superclass_names(dataset.class_names, hierarchy)):
        groups.setdefault(sup, []).append(c)
    eligible = {k: torch.tensor(v) for k, v in sorted(groups.items()) if len(v) >= ways}
    if not eligible:
        largest = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:5]
        raise TaskError(
            f"{ways}-way episodes within one superclass need a superclass with >= {ways} classes, but "
            f"{dataset.name!r} has at most {len(largest[0][1])} "
            f"({', '.join(f'{k}: {len(v)}' for k, v in largest)}); lower ways or use a split with more "
            "classes per superclass"
        )
    return eligible


def mixture_weights(
    sizes: Sequence[float], weights: Sequence[float] | str | None = None, temperature: float = 1.0
) -> list[float]:
    """Probabilities of drawing each source.

    ``weights`` is a list of non-negative numbers, ``"equal"``, or ``"size"`` (proportional to
    ``sizes``).  ``temperature`` T rescales them as ``p_i ** (1/T)`` (T > 1 flattens towards
    uniform, T < 1 sharpens), as in multilingual-model sampling.
    """
    n = len(sizes)
    name = weights if isinstance(weights, str) else None  # an array compared with "equal" has no truth value
    if weights is None or name == "equal":
        w = [1.0] * n
    elif name == "size":
        w = [float(s) for s in sizes]
    elif name is not None:
        raise TaskError(f"unknown mixture weights {weights!r}; use 'equal', 'size' or a list of numbers")
    else:
        try:
            w = [float(x) for x in weights]
        except (TypeError, ValueError):
            raise TaskError(f"mixture weights must be 'equal', 'size' or a list of numbers, got {weights!r}") from None
        if len(w) != n:
            raise TaskError(f"got {len(w)} weights for {n} task sources")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise TaskError(f"mixture weights must be finite, >= 0 and not all zero, got {w}")
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real) or not (
        math.isfinite(temperature) and temperature > 0  # numpy floats too (np.float32 is no float)
    ):
        raise TaskError(f"temperature must be > 0 (a finite number), got {temperature!r}")
    total = sum(w)
    # p_i ** (1/T), normalised, computed in log space: no underflow to all-zero for tiny T
    logs = [math.log(x / total) / temperature if x > 0 else -math.inf for x in w]
    top = max(logs)
    p = [math.exp(v - top) for v in logs]
    total = sum(p)
    return [x / total for x in p]


class MixedTasks(Dataset):
    """Mix several task sources; each episode comes from one source drawn with ``weights``.

    Args:
        sources: task sources (e.g. one :class:`EpisodeSampler` per dataset).
        weights: list of numbers, ``"equal"`` or ``"size"`` (number of classes of each source; a
            source without ``num_classes`` is a :class:`TaskError`).

    ``num_classes`` (when every source has one) is the sum of the sources' classes, and each
    episode's ``classes`` (dataset class ids) are offset by the classes of the sources before its
    own, so they are ids among the mixture's classes (transfer pre-training's global labels).
        temperature: see :func:`mixture_weights`.
        seed: which source serves episode ``i`` is a pure function of ``(seed, i)``; the
            episode itself is ``source.episode(i)``.
    """

    def __init__(
        self,
        sources: Sequence[TaskSource],
        weights: Sequence[float] | str | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not sources:
            raise TaskError("MixedTasks needs at least one task source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise TaskError(f"task sources need distinct names, got {names}")
        self.sources = list(sources)
        sizes = [getattr(s, "num_classes", None) for s in sources]
        if isinstance(weights, str) and weights == "size" and None in sizes:
            raise TaskError(f"mixture weights 'size' need each source's number of classes, but source "
                            f"{names[sizes.index(None)]!r} has no num_classes; give the weights as a list of "
                            "numbers or 'equal'")
        # the mixture's classes: every source's, one after the other (``episode.classes`` are offset
        # by the classes of the sources before, so two sources' class 0 stay different classes)
        self._offsets: list[int] | None = None
        if None not in sizes:
            self.num_classes = sum(sizes)
            self._offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.probs = mixture_weights([1 if s is None else s for s in sizes], weights, temperature)
        self._cum = torch.tensor(self.probs, dtype=torch.float64).cumsum(0)
        self.seed = check_seed(seed)
        self.name = "+".join(names)
        first = self.sources[0]
        self.ways, self.shots, self.queries = first.ways, first.shots, first.queries
        self.task = getattr(first, "task", "classification")

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> Episode:
        return self.episode(index)

    def source_of(self, index: int) -> int:
        index = check_index(index)
        u = torch.rand(1, generator=episode_generator(self.seed, index, stream=1), dtype=torch.float64)
        return min(int(torch.searchsorted(self._cum, u).item()), len(self.sources) - 1)

    def episode(self, index: int) -> Episode:
        which = self.source_of(index)
        episode = self.sources[which].episode(index)
        offset = self._offsets[which] if self._offsets else 0
        if offset and episode.classes:
            episode = dataclasses.replace(episode, classes=tuple(int(c) + offset for c in episode.classes))
        return episode

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}:{p:.2f}" for s, p in zip(self.sources, self.probs))
        return f"MixedTasks({parts})"


class MetaBatchIndexSampler(Sampler[int]):
    """Episode indices of meta-batches ``start, start+1, ...`` for one rank of ``world_size``.

    Meta-batch ``b`` is episodes ``b*B .. b*B+B-1``; rank ``r`` takes positions ``r, r+W, ...``
    of it, so the ranks' union is exactly the single-process meta-batch.
    """

    def __init__(
        self, batch_size: int, start_batch: int = 0, num_batches: int | None = None,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.num_batches = num_batches
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        b = self.start_batch
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            base = b * self.batch_size
            yield from range(base + self.rank, base + self.batch_size, self.world_size)
            b += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("infinite sampler has no length")
        return self.num_batches * len(range(self.rank, self.batch_size, self.world_size))


def task_batches(
    source: TaskSource,
    batch_size: int,
    start_batch: int = 0,
    num_batches: int | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[TaskBatch]:
    """Iterate meta-batches of ``batch_size`` episodes (this rank's share of each).

    With ``num_workers > 0`` episodes are built in DataLoader worker processes; the result is
    identical to ``num_workers=0`` because each episode depends only on its index.
    """
    batch_size = check_positive_int("meta batch size", batch_size)
    start_batch = check_positive_int("start_batch", start_batch, minimum=0)
    if num_batches is not None:
        num_batches = check_positive_int("num_batches", num_batches, minimum=0)
    num_workers = check_positive_int("num_workers", num_workers, minimum=0)
    world_size = check_positive_int("world_size", world_size)
    rank = check_positive_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise TaskError(f"rank {rank} must be below world_size {world_size}")
    if world_size > batch_size:
        raise TaskError(f"meta batch size {batch_size} is smaller than the number of ranks {world_size}")
    per_rank = len(range(rank, batch_size, world_size))
    sampler = MetaBatchIndexSampler(batch_size, start_batch, num_batches, rank, world_size)
    if num_workers <= 0:
        it = iter(sampler)
        b = 0
        while num_batches is None or b < num_batches:
            yield TaskBatch([source.episode(next(it)) for _ in range(per_rank)])
            b += 1
        return
    loader = DataLoader(
        SourceEpisodes(source),  # any TaskSource, also one with no __getitem__ (only .episode)
        batch_size=per_rank,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=TaskBatch.collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2,
        worker_init_fn=_ignore_stop_signals,
    )
    yield from loader


class SourceEpisodes(Dataset):
    """A task source as the map-style Dataset a ``DataLoader`` indexes: item ``i`` is
    ``source.episode(i)`` (the TaskSource protocol asks for ``episode``, not ``__getitem__``)."""

    def __init__(self, source: TaskSource) -> None:
        self.source = source

    def __getitem__(self, index: int) -> Episode:
        return self.source.episode(index)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM to the main process, which stops cleanly."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def fixed_episodes(source: TaskSource, count: int, start: int = 0) -> list[Episode]:
    """``count`` episodes ``start .. start+count-1`` (e.g. a fixed evaluation set); :class:`TaskError` unless
    both are integers >= 0."""
    count, start = check_positive_int("fixed_episodes count", count, 0), check_positive_int("start", start, 0)
    return [source.episode(start + i) for i in range(count)]
