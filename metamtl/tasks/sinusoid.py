"""The sinusoid regression task family of MAML (Finn et al., 2017)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import TaskError
from .episode import Episode
from .sampler import check_index, check_positive_int, check_seed, episode_generator


def _interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        if isinstance(value, (str, bytes)):  # "12" would be read character by character: (1.0, 2.0)
            raise TypeError(name)
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TaskError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise TaskError(f"{name} must be a finite (low, high) range with low <= high, got {tuple(value)}")
    return lo, hi


#: the random stream of each split's tasks (training: the stream of a Sinusoid built without a split)
SPLIT_STREAMS = {None: 0, "train": 0, "val": 5, "test": 6}


class Sinusoid(Dataset):
    """Regression tasks ``y = A sin(x - phase)`` with ``A``, ``phase`` and ``x`` drawn uniformly.

    Args:
        shots: support points per task.
        queries: query points per task.
        amplitude: range of ``A`` (MAML: 0.1 to 5).
        phase: range of the phase (MAML: 0 to pi).
        x_range: range of the inputs ``x`` (MAML: -5 to 5).
        seed: episode ``i`` is a pure function of ``(seed, i)`` (and ``split``).
        name: task-source name used in logs and mixtures.
        split: ``"val"`` or ``"test"`` draws from a random stream of its own, so held-out tasks never
            equal training tasks (``None`` or ``"train"``) whatever the seeds: runs pass it, as an
            ensemble member's training seed may equal another split's.

    A task source (see :mod:`metamtl.tasks.sampler`): ``source.episode(i)`` (or ``source[i]``)
    returns an :class:`~metamtl.tasks.Episode` with ``task="regression"``, float32 ``x``/``y`` of
    shape ``[shots, 1]`` (support) and ``[queries, 1]`` (query), and ``classes=(A, phase)``.
    """

    ways = 1
    task = "regression"

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        seed: int = 0,
        name: str = "sinusoid",
        split: str | None = None,
    ) -> None:
        if split is not None and (not isinstance(split, str) or split not in SPLIT_STREAMS):
            raise TaskError(f"split must be one of {sorted(k for k in SPLIT_STREAMS if k)} or None, got {split!r}")
        self.split = split
        self.shots = check_positive_int("shots", shots)
        self.queries = check_positive_int("queries", queries, minimum=0)
        self.amplitude = _interval("amplitude", amplitude)
        self.phase = _interval("phase", phase)
        self.x_range = _interval("x_range", x_range)
        self.seed = check_seed(seed)
        self.name = str(name)

    def __len__(self) -> int:
        return 2**62  # indexed by any non-negative integer, like EpisodeSampler

    def __getitem__(self, index: int) -> Episode:
        return self.episode(index)

    def __repr__(self) -> str:
        return (f"Sinusoid(shots={self.shots}, queries={self.queries}, amplitude={self.amplitude}, "
                f"phase={self.phase}, x_range={self.x_range}, seed={self.seed}"
                + (f", split={self.split!r})" if self.split not in (None, "train") else ")"))

    def with_settings(self, **kwargs) -> "Sinusoid":
        """The same task family with other ``shots``/``queries``/``seed``/``name`` (``ways`` is 1:
        other values, and a ``hierarchy``, are a :class:`TaskError`)."""
        if kwargs.pop("ways", 1) != 1:
            raise TaskError("sinusoid regression tasks have ways 1 (one function per task)")
        if kwargs.pop("hierarchy", None) is not None:
            raise TaskError("sinusoid regression tasks have no classes to draw within a hierarchy")
        args = dict(shots=self.shots, queries=self.queries, amplitude=self.amplitude, phase=self.phase,
                    x_range=self.x_range, seed=self.seed, name=self.name, split=self.split)
        unknown = sorted(set(kwargs) - {"shots", "queries", "seed", "name"})
        if unknown:
            raise TaskError(f"with_settings accepts ways, shots, queries, seed, name, hierarchy; got {', '.join(unknown)}")
        args.update(kwargs)
        return Sinusoid(**args)

    def episode(self, index: int) -> Episode:
        index = check_index(index)
        g = episode_generator(self.seed, index, SPLIT_STREAMS[self.split])
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        amplitude = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(self.shots + self.queries, 1, generator=g, dtype=torch.float32)
        y = amplitude * torch.sin(x - phase)
        return Episode(
            support_x=x[: self.shots],
            support_y=y[: self.shots],
            query_x=x[self.shots:],
            query_y=y[self.shots:],
            ways=1,
            shots=self.shots,
            queries=self.queries,
            dataset=self.name,
            classes=(amplitude, phase),
            index=index,
            task="regression",
        )
