"""A minimal stand-in for learn2learn 0.2.0's ``TaskDataset``, for the tests that must run without it.

As learn2learn does: with ``num_tasks=-1`` every ``taskset[i]`` draws a fresh task; with
``num_tasks=N`` the description of task ``i`` is cached in ``sampled_descriptions`` the first time
it is drawn (whatever the random state then), and ``sample()`` draws a random index.
"""
from __future__ import annotations

import random
import sys
import types

import torch


class CythonTaskDataset:
    pass


class TaskDataset(CythonTaskDataset):
    """``ways`` classes of ``k`` examples each, drawn with Python's ``random`` as learn2learn's NWays/KShots."""

    def __init__(self, xs, ys, ways, k, num_tasks=-1):
        self.xs, self.ys, self.ways, self.k, self.num_tasks = xs, ys, ways, k, num_tasks
        self.sampled_descriptions = {}
        self.by_label = {c: [i for i, y in enumerate(ys) if y == c] for c in sorted(set(ys))}

    def sample_task_description(self):
        classes = random.sample(list(self.by_label), self.ways)
        return [i for c in classes for i in random.sample(self.by_label[c], self.k)]

    def get_task(self, description):
        return [torch.stack([self.xs[i] for i in description]), torch.tensor([self.ys[i] for i in description])]

    def __getitem__(self, i):
        if self.num_tasks == -1:
            return self.get_task(self.sample_task_description())
        if i not in self.sampled_descriptions:
            self.sampled_descriptions[i] = self.sample_task_description()
        return self.get_task(self.sampled_descriptions[i])

    def sample(self):
        return self[random.randrange(self.num_tasks)] if self.num_tasks > 0 else self[0]


def install(monkeypatch) -> types.ModuleType:
    """Make ``import learn2learn`` give this stand-in for the rest of a test."""
    l2l = types.ModuleType("learn2learn")
    l2l.data = types.ModuleType("learn2learn.data")
    l2l.data.task_dataset = types.SimpleNamespace(CythonTaskDataset=CythonTaskDataset)
    l2l.data.TaskDataset = TaskDataset
    monkeypatch.setitem(sys.modules, "learn2learn", l2l)
    return l2l


def toy_taskset(ways=3, k=4, num_tasks=-1, classes=6, per_class=10, shape=(1, 8, 8), seed=0):
    """A taskset over ``classes * per_class`` random images, labels ``0..classes-1``."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    xs = [torch.rand(*shape, generator=g) for _ in range(n)]
    return TaskDataset(xs, [i // per_class for i in range(n)], ways=ways, k=k, num_tasks=num_tasks)
