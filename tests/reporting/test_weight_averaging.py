"""benchmarks/weight_averaging.py: the averages its probe compares are what they say they are."""
from __future__ import annotations

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.callbacks import FitState
from metamtl.models import build_model


@pytest.fixture()
def averaging(benchmark_script):
    return benchmark_script("weight_averaging")


def test_ema_and_uniform_tail_averages_match_their_definitions(averaging):
    model = build_model("conv4", hidden=4, out_features=None)
    learner = MetaLearner(model, build_algorithm("protonet"), device="cpu", channels_last=False)
    state = FitState(learner, iterations=10, meta_batch_size=1)
    cb = averaging.WeightAverages([0.9], [0.3])
    cb.on_fit_start(state)
    start = {k: v.clone() for k, v in cb.weights(state).items()}
    snapshots = []
    for t in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        learner.run.iteration = t
        cb.on_iteration_complete(state)
        snapshots.append({k: v.clone() for k, v in cb.weights(state).items()})
    assert set(start) == {k for k, v in model.state_dict().items() if v.is_floating_point()}
    for k in start:
        ema = start[k]
        for t, snap in enumerate(snapshots, start=1):
            d = min(0.9, (1 + t) / (10 + t))
            ema = d * ema + (1 - d) * snap[k]
        torch.testing.assert_close(cb.ema[0.9][k], ema)
        # the last 30% of 10 iterations: those completed at t / 10 >= 0.7, i.e. t = 7..10
        torch.testing.assert_close(cb.uniform[0.3][k], torch.stack([s[k] for s in snapshots[6:]]).mean(0))
    assert cb.counts[0.3] == 4 and set(cb.candidates()) == {"ema 0.9", "uniform, last 30%"}


def test_tail_averages_follow_the_iteration_count_when_it_ends_the_fit_before_the_budget(averaging):
    model = build_model("conv4", hidden=4, out_features=None)
    learner = MetaLearner(model, build_algorithm("protonet"), device="cpu", channels_last=False)
    state = FitState(learner, iterations=10, meta_batch_size=1, budget_minutes=60.0)
    cb = averaging.WeightAverages([0.9], [0.3])
    cb.on_fit_start(state)
    for t in range(1, 11):  # 10 iterations in far less than the hour: the iterations end the fit
        learner.run.iteration = t
        cb.on_iteration_complete(state)
    assert cb.counts.get(0.3) == 4 and "uniform, last 30%" in cb.candidates()


def test_every_fit_of_a_staged_run_starts_the_averages_afresh(averaging):
    """run_stages reuses the callback for each stage: only the last stage's iterates are averaged."""
    cb = averaging.WeightAverages([0.9], [0.5])
    for stage, iterations in (("pretrain", 4), ("meta", 2)):
        model = build_model("conv4", hidden=4, out_features=None)
        learner = MetaLearner(model, build_algorithm("protonet"), device="cpu", channels_last=False)
        state = FitState(learner, iterations=iterations, meta_batch_size=1)
        cb.on_fit_start(state)
        for t in range(1, iterations + 1):
            learner.run.iteration = t
            cb.on_iteration_complete(state)
    assert cb.counts[0.5] == 2  # iterations 1 and 2 of the meta stage
    for k, v in cb.weights(state).items():
        torch.testing.assert_close(cb.uniform[0.5][k], v)
