"""Fixtures for the algorithm and training-loop tests (helpers live in algo_utils.py)."""
from __future__ import annotations

import pytest

from metamtl.tasks import EpisodeSampler

from algo_utils import toy_dataset


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """These models are tiny: every test here runs on one thread (root conftest's single_thread);
    ``float64`` also comes from the root conftest."""
    yield


@pytest.fixture(scope="module")
def toy_tasks():
    """(train, val) 5-way 1-shot samplers with 3 queries over disjoint toy classes."""
    ds = toy_dataset()
    return (EpisodeSampler(ds.subset(range(30)), 5, 1, 3, seed=0),
            EpisodeSampler(ds.subset(range(30, 40)), 5, 1, 3, seed=1))
