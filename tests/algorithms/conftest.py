"""Fixtures for the algorithm and training-loop tests (helpers live in algo_utils.py)."""
from __future__ import annotations

import pytest
import torch

from metamtl.tasks import EpisodeSampler

from algo_utils import toy_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and far faster when the CPU is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64():
    """Double precision, so references and metamtl agree to tight tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def toy_tasks():
    """(train, val) 5-way 1-shot samplers with 3 queries over disjoint toy classes."""
    ds = toy_dataset()
    return (EpisodeSampler(ds.subset(range(30)), 5, 1, 3, seed=0),
            EpisodeSampler(ds.subset(range(30, 40)), 5, 1, 3, seed=1))
