"""The core against the ``higher`` engine (the oracle): every built-in algorithm, same meta-gradients.

Each case builds the same model and algorithm twice, runs one meta-step with ``backend="higher"``
and with the core (one task per call and, where the algorithm allows it, three tasks per
``vmap`` call), and compares every meta-gradient (model weights, learned rates, per-step
BatchNorm sets, multi-task strategy weights, distillation adapters) and every buffer the
meta-step leaves (running statistics) within 1e-5 in float64, on conv4 with BatchNorm and on a
small user-defined module (plain ``nn.BatchNorm2d`` with running statistics, ``nn.Linear`` head).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.distill import FeatureDistillation, SoftTargets
from metamtl.errors import ConfigError
from metamtl.models import TrunkHead, build_model
from metamtl.tasks import Episode, TaskBatch

pytestmark = pytest.mark.usefixtures("float64", "single_thread")


class UserTrunk(nn.Module):
    """A user's own trunk: conv, BatchNorm with running statistics, tanh, average pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 6)
        self.out_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(F.avg_pool2d(torch.tanh(self.norm(self.conv(x))), 2).flatten(1)))


def conv4(out_features):
    torch.manual_seed(0)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=out_features)


def user_model(out_features):
    torch.manual_seed(0)
    return TrunkHead(UserTrunk(), nn.Linear(6, out_features) if out_features else None)


MODELS = {"conv4": conv4, "user": user_model}


def episode(seed, ways=3, shots=2, queries=2, dataset=""):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ways * (shots + queries), 1, 8, 8, generator=g)
    labels = torch.arange(ways)
    return Episode(images[: ways * shots], labels.repeat_interleave(shots), images[ways * shots:],
                   labels.repeat_interleave(queries), ways, shots, queries, dataset=dataset,
                   classes=tuple(range(seed, seed + ways)))


def randomise_rates(alg):
    """Learned inner rates away from their common start (so a wrong pairing shows)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in alg.named_parameters():
            if "lrs" in name:
                p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=g))


def run(model_name, alg_name, backend, batch, iteration=0, chunk=0, terms=None, **settings):
    per_task_head = settings.get("head_init", "learned") != "learned"
    model = MODELS[model_name](None if per_task_head else 3)
    if alg_name == "multitask":
        alg = build_algorithm("multitask", base={"name": "maml", "backend": backend, "task_chunk": chunk,
                                                 **settings.pop("base")}, **settings)
    else:
        alg = build_algorithm(alg_name, backend=backend, task_chunk=chunk, **settings)
    alg.setup(model)
    randomise_rates(alg)
    extra = []
    if terms is not None:
        for term in terms():
            term.bind(model)
            alg.inner.loss_terms.append(term)
            extra.append(term)
    model.train()
    model.zero_grad()
    torch.manual_seed(3)  # PCGrad's random order
    metrics = alg.meta_step(model, batch, iteration)
    params = list(model.named_parameters()) + list(alg.named_parameters())
    params += [(f"term.{n}", p) for t in extra for n, p in t.named_parameters()]
    grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    # the running statistics the inner loops left (a user's nn.BatchNorm2d, MAML++'s per-step sets)
    grads.update({f"buffer.{n}": b.detach().clone() for n, b in [*model.named_buffers(), *alg.named_buffers()]})
    return grads, metrics


def assert_same(ref, ours):
    (rg, rm), (og, om) = ref, ours
    assert sorted(rg) == sorted(og)
    assert any(not n.startswith("buffer.") for n in rg), "no meta-gradient at all"
    for name in rg:
        torch.testing.assert_close(og[name], rg[name], rtol=1e-5, atol=1e-8, msg=name)
    assert sorted(rm) == sorted(om)
    for k in rm:
        assert om[k] == pytest.approx(rm[k], rel=1e-5, abs=1e-7), k


CASES = [
    ("maml", dict(steps=2, lr=0.3)),
    ("maml", dict(steps=1, lr=0.3, head_init="proto")),
    ("maml", dict(steps=2, lr=0.2, head_init="zero", bn_stats="support")),
    ("fomaml", dict(steps=2, lr=0.3)),
    ("reptile", dict(steps=3, lr=0.2)),
    ("reptile", dict(steps=2, lr=0.2, head_init="zero")),
    ("anil", dict(steps=2, lr=0.5)),
    ("anil", dict(steps=2, lr=0.3, head_init="proto", bn_stats="support")),
    ("metasgd", dict(steps=2, lr=0.2)),
    ("metasgd", dict(steps=2, lr=0.2, head_init="proto", first_order=True)),
    ("mamlpp", dict(steps=2, lr=0.1, first_order_iterations=1, multi_step_iterations=10)),  # first order
    ("mamlpp", dict(steps=3, lr=0.1, first_order_iterations=1, multi_step_iterations=10, iteration=4)),
    ("mamlpp", dict(steps=2, lr=0.1, head_init="zero", bn_eval="batch", iteration=2, first_order_iterations=0)),
    ("mamlpp", dict(steps=2, lr=0.1, bn_stats="support", iteration=1, first_order_iterations=0)),  # second order
] + [("maml", dict(steps=2, lr=0.05, optimizer=o))
     for o in ("momentum", "nesterov", "adam", "adamw", "adagrad", "adadelta", "adamax")]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in s.items())}"
                                                        for n, s in CASES])
def test_core_meta_gradients_equal_the_higher_engine(model_name, name, settings):
    settings = dict(settings)
    iteration = settings.pop("iteration", 0)
    if model_name == "user" and settings.get("bn_stats") == "support":
        pytest.skip("bn_stats='support' is a feature of metamtl's EpisodicBatchNorm layers")
    batch = TaskBatch([episode(s) for s in range(3)])
    ref = run(model_name, name, "higher", batch, iteration, **settings)
    for chunk in (1, 3):  # the user's BatchNorm with running statistics: task_chunk 3 adapts one task per call
        assert_same(ref, run(model_name, name, "core", batch, iteration, chunk, **settings))


@pytest.mark.parametrize("strategy", ["equal", "uncertainty", "gradnorm", "dwa", "pcgrad", "cagrad"])
def test_multitask_every_strategy_equals_the_higher_engine(strategy):
    batch = TaskBatch([episode(0, dataset="a"), episode(1, dataset="b"), episode(2, dataset="a"),
                       episode(3, dataset="b")])
    settings = dict(strategy=strategy, datasets=["a", "b"], base=dict(steps=2, lr=0.3))
    ref = run("conv4", "multitask", "higher", batch, **{**settings, "base": dict(settings["base"])})
    ours = run("conv4", "multitask", "core", batch, **{**settings, "base": dict(settings["base"])})
    assert_same(ref, ours)


def distillation_terms():
    torch.manual_seed(5)
    teacher = build_model("conv4", in_channels=1, hidden=5, image_size=8, blocks=2, out_features=3)
    return [SoftTargets(teacher, temperature=2.0, weight=0.5, phases=("support", "query")),
            FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", weight=0.3, phases=("support", "query"))]


@pytest.mark.parametrize("name,settings", [("maml", dict(steps=2, lr=0.3)),
                                           ("anil", dict(steps=2, lr=0.3, head_init="proto")),
                                           ("mamlpp", dict(steps=2, lr=0.1, first_order_iterations=0))])
def test_distillation_equals_the_higher_engine(name, settings):
    batch = TaskBatch([episode(s) for s in range(2)])
    ref = run("conv4", name, "higher", batch, terms=distillation_terms, **settings)
    ours = run("conv4", name, "core", batch, terms=distillation_terms, **settings)
    assert any(n.startswith("term.") for n in ref[0])  # the adapter learns
    assert_same(ref, ours)


@pytest.mark.parametrize("settings", [dict(), dict(classifier="cosine", head_init="proto", optimizer="sgd", lr=0.5)])
def test_transfer_fine_tuning_equals_the_higher_engine(settings):
    eps = [episode(s) for s in range(4)]
    results = []
    for backend in ("higher", "core"):
        model = conv4(None)
        alg = build_algorithm("transfer", num_classes=10, steps=5, backend=backend, **settings)
        learner = MetaLearner(model, alg, device="cpu", channels_last=False)
        results.append(learner.evaluate(eps, progress=False))
    torch.testing.assert_close(torch.tensor(results[1].per_episode_loss), torch.tensor(results[0].per_episode_loss),
                               rtol=1e-5, atol=1e-8)
    assert results[1].per_episode_accuracy == results[0].per_episode_accuracy


def test_higher_engine_takes_any_torch_optimizer_class_higher_knows():
    batch = TaskBatch([episode(0)])
    grads, _ = run("user", "maml", "higher", batch, steps=2, lr=0.05, optimizer=torch.optim.Rprop)
    assert all(torch.isfinite(g).all() for g in grads.values())
    with pytest.raises(ConfigError, match="backend 'higher'"):
        build_algorithm("maml", optimizer=torch.optim.Rprop)


def conv4_unit_features(out_features):
    torch.manual_seed(0)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=out_features,
                       feature_norm=2.0)


@pytest.mark.parametrize("name,settings", [("anil", dict(steps=2, lr=0.3, head_init="proto")),
                                           ("maml", dict(steps=2, lr=0.3, head_init="proto"))])
def test_normalised_features_equal_the_higher_engine(name, settings, monkeypatch):
    """``model.feature_norm`` (cosine features, the mini-ImageNet ANIL recipe) in both engines."""
    monkeypatch.setitem(MODELS, "conv4", conv4_unit_features)
    batch = TaskBatch([episode(s) for s in range(3)])
    ref = run("conv4", name, "higher", batch, **settings)
    for chunk in (1, 3):
        assert_same(ref, run("conv4", name, "core", batch, 0, chunk, **settings))


class RunningNormaliser(nn.Module):
    """A user's trunk that updates a buffer in its forward pass (an EMA of its features) and
    draws dropout masks: neither can run several tasks in one ``vmap`` call."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 6)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("mu", torch.zeros(6))
        self.out_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.drop(x.flatten(1)))
        if self.training:
            with torch.no_grad():
                self.mu.mul_(0.5).add_(0.5 * h.mean(0))
        return torch.tanh(h - self.mu)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("name,settings", [("maml", dict(steps=2, lr=0.3)), ("anil", dict(steps=2, lr=0.5))])
def test_task_chunks_of_a_model_that_writes_buffers_equal_one_task_per_call(name, settings, dropout, monkeypatch):
    """Several tasks per vmap call (``task_chunk`` > 1, the GPU default) on a model that updates a
    buffer or draws dropout masks in its forward pass adapts one task per call: task_chunk 1's result."""
    def model(out_features):
        torch.manual_seed(0)
        return TrunkHead(RunningNormaliser(dropout), nn.Linear(6, out_features))

    monkeypatch.setitem(MODELS, "user", model)
    batch = TaskBatch([episode(s) for s in range(3)])
    ref = run("user", name, "core", batch, 0, 1, **settings)
    assert ref[0]["buffer.trunk.mu"].abs().sum() > 0
    assert_same(ref, run("user", name, "core", batch, 0, 3, **settings))


def mlp_model(out_features):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh())
    trunk.out_features = 6
    return TrunkHead(trunk, nn.Linear(6, out_features) if out_features else None)


@pytest.mark.parametrize("name,settings", [("anil", dict(steps=2, lr=0.5)),
                                           ("anil", dict(steps=2, lr=0.3, head_init="proto")),
                                           ("maml", dict(steps=2, lr=0.3))])
def test_support_statistics_on_a_model_without_norm_layers_change_nothing(name, settings, monkeypatch):
    """``bn_stats="support"`` on a model with no metamtl norm layer: nothing reads the support
    rows, so predictions have one row per query and meta-gradients equal ``"transductive"``'s."""
    monkeypatch.setitem(MODELS, "user", mlp_model)
    batch = TaskBatch([episode(s) for s in range(2)])
    for backend in ("core", "higher"):
        ref = run("user", name, backend, batch, **settings)
        assert_same(ref, run("user", name, backend, batch, bn_stats="support", **settings))
    ep = episode(0)
    per_task_head = settings.get("head_init", "learned") != "learned"
    learner = MetaLearner(mlp_model(None if per_task_head else 3),
                          build_algorithm(name, bn_stats="support", **settings), device="cpu")
    out = learner.predict(ep.support_x, ep.support_y, ep.query_x[:4])
    assert tuple(out.shape) == (4, 3)


def twice_registered_model(out_features):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), block, block)  # one block, two names
    trunk.out_features = 6
    return TrunkHead(trunk, nn.Linear(6, out_features))


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "metasgd", "mamlpp"])
def test_a_module_registered_twice_is_refused_by_the_core_and_never_changes_the_model(name, monkeypatch):
    """``nn.Sequential(block, block)``: the core's ``functional_call`` cannot adapt the block's
    weights under both names; it refuses up front (the model untouched), the higher engine runs it."""
    monkeypatch.setitem(MODELS, "user", twice_registered_model)
    batch = TaskBatch([episode(s) for s in range(2)])
    model = twice_registered_model(3)
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    learner = MetaLearner(model, build_algorithm(name, steps=2, lr=0.5), device="cpu")
    ep = episode(0)
    with pytest.raises(ConfigError, match=r"'trunk.2.0'.*backend: higher"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
    with pytest.raises(ConfigError, match="registers one Linear"):
        run("user", name, "core", batch, steps=2, lr=0.5)
    for n, p in model.named_parameters():
        assert p is before[n] and isinstance(p, nn.Parameter) and torch.equal(p, values[n])
    grads, _ = run("user", name, "higher", batch, steps=2, lr=0.5)
    assert grads["trunk.2.0.weight"].abs().sum() > 0
    # head-only adaptation never swaps the trunk's weights; a shared module without weights is fine
    run("user", "anil", "core", batch, steps=2, lr=0.5)
    act = nn.Tanh()
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), act, nn.Linear(6, 6), act)
    trunk.out_features = 6
    assert MetaLearner(TrunkHead(trunk, nn.Linear(6, 3)), build_algorithm(name, steps=1, lr=0.5),
                       device="cpu").predict(ep.support_x, ep.support_y, ep.query_x).shape == (6, 3)


@pytest.mark.parametrize("backend", ["core", "higher"])
def test_support_statistics_refuse_a_torch_batchnorm_normalising_with_batch_statistics(backend):
    """``bn_stats="support"`` reaches only EpisodicBatchNorm: a torch BatchNorm using batch
    statistics (training mode, or no running statistics) would normalise the query with its own."""
    batch = TaskBatch([episode(s) for s in range(2)])
    with pytest.raises(ConfigError, match=r"BatchNorm layer\(s\) trunk.norm .*bn_stats: transductive"):
        run("user", "maml", backend, batch, steps=1, lr=0.1, bn_stats="support")
    ep = episode(0)
    # eval mode: the running statistics normalise every image on its own, as documented
    learner = MetaLearner(user_model(3), build_algorithm("maml", steps=1, lr=0.1, bn_stats="support", backend=backend),
                          device="cpu")
    full, one = learner.predict(ep.support_x, ep.support_y, ep.query_x), learner.predict(ep.support_x, ep.support_y,
                                                                                       ep.query_x[:1])
    torch.testing.assert_close(full[:1], one)
    model = user_model(3)
    model.trunk.norm = nn.BatchNorm2d(3, track_running_stats=False)
    learner = MetaLearner(model, build_algorithm("maml", steps=1, lr=0.1, bn_stats="support", backend=backend),
                          device="cpu")
    with pytest.raises(ConfigError, match="trunk.norm"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
