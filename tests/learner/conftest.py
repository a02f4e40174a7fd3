"""Tiny sinusoid-regression learners: the parts behind MetaLearner, tested one at a time."""
from __future__ import annotations

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.models import build_model
from metamtl.tasks import Sinusoid


def sine_learner(**kwargs) -> MetaLearner:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=1, hidden=[8], out_features=1)
    return MetaLearner(model, build_algorithm("maml", steps=1, lr=0.01, first_order=True), task="regression",
                       device="cpu", meta_lr=1e-2, **kwargs)


@pytest.fixture
def sine():
    return Sinusoid(shots=5, queries=5, seed=0)
