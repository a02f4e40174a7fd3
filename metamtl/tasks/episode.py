"""Episodes (one few-shot task: support + query) and batches of them."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch

from ..data.base import Preprocessing
from ..errors import InputError


def regression_targets(y: torch.Tensor) -> torch.Tensor:
    """Regression targets ``[n]`` or ``[n, d]`` as ``[n, d]`` (``[n]`` is one output, ``[n, 1]``), the
    shape of the model's predictions: the loss never broadcasts ``[n, 1]`` predictions against ``[n]``."""
    return y.view(y.shape[0], -1) if y.dim() == 1 else y


@dataclasses.dataclass
class Episode:
    """One N-way K-shot task.

    ``support_x``/``query_x`` hold stored tensors (``uint8`` images for image datasets, floats for
    regression) until :meth:`to` moves them to a device and applies ``preprocessing``.  Labels are
    ``0..ways-1`` for classification (remapped in a random order per episode) and float targets
    for regression.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    shots: int
    queries: int
    dataset: str = ""
    classes: tuple = ()
    index: int = -1
    preprocessing: Preprocessing | None = None
    task: str = "classification"

    def to(self, device: torch.device | str | None = None, non_blocking: bool = False,
           memory_format: torch.memory_format | None = None, dtype: torch.dtype | None = None) -> "Episode":
        """Move to ``device`` and turn stored tensors into float model input.

        ``memory_format`` (e.g. ``torch.channels_last``) applies to 4-D image batches; ``dtype``
        (the model's floating dtype, e.g. ``torch.float64``) to float inputs and regression targets.
        """

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

        def conv(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=non_blocking) if device is not None else x
            if x.dtype == torch.uint8 and self.is_classification:  # stored images; regression inputs stay as given
                x = self.preprocessing.normalize(x) if self.preprocessing else x.float().div_(255)
            x = cast(x)
            if memory_format is not None and x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            return x

        def labels(y: torch.Tensor) -> torch.Tensor:
            y = cast(y.to(device, non_blocking=non_blocking) if device is not None else y)
            if self.is_classification:  # any integer dtype (int32, uint8 from numpy, ...) as the losses' int64
                return y if y.dtype == torch.long else y.long()
            return regression_targets(y)

        return dataclasses.replace(self, support_x=conv(self.support_x), query_x=conv(self.query_x),
                                   support_y=labels(self.support_y), query_y=labels(self.query_y))

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    def validate(self) -> "Episode":
        """Check the episode is consistent; raise :class:`~metamtl.errors.InputError` if not.

        Inputs and labels must be tensors of matching lengths, support and query inputs must
        have the same shape per example, and classification labels must be integers in
        ``0..ways-1`` with every class present in the support set.  Returns ``self``.
        """
        where = f"episode {self.index}" + (f" of {self.dataset!r}" if self.dataset else "")
        parts = {"support_x": self.support_x, "support_y": self.support_y,
                 "query_x": self.query_x, "query_y": self.query_y}
        for name, t in parts.items():
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        for kind, x, y in (("support", self.support_x, self.support_y), ("query", self.query_x, self.query_y)):
            if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
                raise InputError(f"{where}: {kind} inputs {list(x.shape)} and labels {list(y.shape)} differ in length")
        if self.support_x.shape[1:] != self.query_x.shape[1:]:
            raise InputError(
                f"{where}: support inputs have shape {list(self.support_x.shape[1:])} but query inputs "
                f"{list(self.query_x.shape[1:])}; support and query must have the same size (decode both "
                "with the same Preprocessing)"
            )
        if not self.is_classification:
            return self
        ways = self.ways
        for kind, y in (("support", self.support_y), ("query", self.query_y)):
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
                raise InputError(f"{where}: {kind} labels must be a 1-D integer tensor, got {y.dtype} {list(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= ways):
                raise InputError(
                    f"{where}: {kind} labels must lie in 0..{ways - 1} for a {ways}-way task, got "
                    f"{sorted(set(y.tolist()))[:10]}; relabel classes to 0..N-1"
                )
        missing = sorted(set(range(ways)) - set(self.support_y.tolist()))
        if missing:
            raise InputError(f"{where}: class(es) {missing[:10]} of 0..{ways - 1} have no support example")
        return self

    def pin_memory(self) -> "Episode":
        return dataclasses.replace(
            self,
            support_x=self.support_x.pin_memory(),
            query_x=self.query_x.pin_memory(),
            support_y=self.support_y.pin_memory(),
            query_y=self.query_y.pin_memory(),
        )


class TaskBatch(Sequence[Episode]):
    """A meta-batch: a list of episodes, possibly from different datasets and shapes."""

    def __init__(self, episodes: Sequence[Episode]) -> None:
        self.episodes = list(episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i):  # type: ignore[override]
        return self.episodes[i]

    def __iter__(self) -> Iterator[Episode]:
        return iter(self.episodes)

    def __repr__(self) -> str:
        return f"TaskBatch({len(self)} episodes, datasets={sorted({e.dataset for e in self})})"

    def to(self, device: Any = None, non_blocking: bool = False,
           memory_format: torch.memory_format | None = None, dtype: torch.dtype | None = None) -> "TaskBatch":
        return TaskBatch([e.to(device, non_blocking=non_blocking, memory_format=memory_format, dtype=dtype)
                          for e in self.episodes])

    def pin_memory(self) -> "TaskBatch":
        return TaskBatch([e.pin_memory() for e in self.episodes])

    @property
    def indices(self) -> list[int]:
        return [e.index for e in self.episodes]

    def groups(self) -> dict[tuple, list[int]]:
        """Positions of episodes grouped by (dataset, ways, shots, queries, input shape) and their
        real support/query sizes, which a user's episode may hold apart from ``ways * shots`` /
        ``ways * queries`` (e.g. 2, 2 and 3 shots for its 3 classes).

        Episodes in one group can be stacked into ``[T, ...]`` tensors (see :meth:`stack`).
        """
        out: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.episodes):
            key: tuple = (e.dataset, e.ways, e.shots, e.queries, tuple(e.support_x.shape[1:]))
            sizes = (e.support_x.shape[0], e.query_x.shape[0])
            if sizes != (e.ways * e.shots, e.ways * e.queries):  # the declared sizes' keys stay as they were
                key += (("support, query", *sizes),)
            out.setdefault(key, []).append(i)
        return out

    def stack(self, positions: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """Stack episodes into ``(support_x [T,S,...], support_y [T,S], query_x, query_y)``."""
        eps = [self.episodes[i] for i in (positions if positions is not None else range(len(self)))]
        return (
            torch.stack([e.support_x for e in eps]),
            torch.stack([e.support_y for e in eps]),
            torch.stack([e.query_x for e in eps]),
            torch.stack([e.query_y for e in eps]),
        )

    @staticmethod
    def collate(episodes: Sequence[Episode]) -> "TaskBatch":
        """``collate_fn`` for a torch ``DataLoader`` over a task source."""
        return TaskBatch(episodes)
