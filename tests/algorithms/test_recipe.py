"""The README's "write your own algorithm" recipe, run exactly as printed there."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import ALGORITHMS, build_algorithm
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler, TaskBatch

from algo_utils import episode, tiny, toy_dataset

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The recipe file, written out and imported like a user's own module."""
    text = README.read_text()
    match = re.search(r"<!-- recipe:(\S+) -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its recipe block"
    path = tmp_path_factory.mktemp("recipe") / match.group(1)
    path.write_text(match.group(2))
    spec = importlib.util.spec_from_file_location("my_algorithm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    ALGORITHMS.pop("proximal_proto", None)


def test_recipe_trains_saves_and_loads(recipe, tmp_path):
    ds = toy_dataset(noise=0.6)  # hard enough that prototypes alone are not perfect
    train = EpisodeSampler(ds.subset(range(30)), 5, 1, 3, seed=0)
    val = EpisodeSampler(ds.subset(range(30, 40)), 5, 1, 3, seed=1)
    alg = build_algorithm("proximal_proto", steps=3, lr=0.1, prox=1.0)
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=16, image_size=12, blocks=2, out_features=None)
    learner = MetaLearner(model, alg, device="cpu", meta_lr=0.01)
    before = learner.evaluate(val, 30, progress=False)
    history = learner.fit(train, iterations=30, meta_batch_size=4, progress=False)
    assert learner.algorithm.log_scale.grad is not None and float(learner.algorithm.log_scale.detach()) != 0.0
    after = learner.evaluate(val, 30, progress=False)
    assert after.accuracy > 0.5 and after.loss < before.loss, (before, after)  # 5-way: chance is 0.2
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    learner.save(tmp_path / "mine.pt")
    loaded = MetaLearner.load(tmp_path / "mine.pt", device="cpu")
    assert loaded.algorithm.config() == alg.config() and float(loaded.algorithm.log_scale.detach()) == float(alg.log_scale.detach())


def test_recipe_proximal_term_pulls_the_head_towards_the_prototypes(recipe, float64):
    model, ep = tiny(None), episode(seed=4)
    moved = []
    for prox in (0.0, 10.0):
        alg = build_algorithm("proximal_proto", steps=3, lr=0.2, prox=prox)
        a = alg.adapt(model, ep.support_x, ep.support_y, ep.ways)
        moved.append(sum(float((p - p0).detach().norm()) for p, p0 in zip(a.params, a.problem.initial)))
    assert moved[1] < 0.5 * moved[0]


def test_recipe_meta_gradients_equal_the_higher_engine(recipe, float64):
    batch = TaskBatch([episode(seed=s) for s in range(3)])
    grads = []
    for backend in ("higher", "core"):
        model = tiny(None)
        alg = build_algorithm("proximal_proto", steps=2, lr=0.2, prox=0.5, backend=backend)
        model.zero_grad()
        alg.meta_step(model, batch, 0)
        grads.append([p.grad for p in list(model.parameters()) + [alg.log_scale] if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)
