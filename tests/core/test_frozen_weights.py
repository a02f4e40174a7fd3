"""Frozen weights (``requires_grad=False``) are neither adapted nor meta-learned.

A layer a user freezes still takes part in every forward pass, with its own values: the inner
loop does not fine-tune it (core and ``higher`` engines), the meta-gradients equal a hand-written
unrolled MAML (``torch.autograd.grad`` through an explicit loop) that keeps it fixed, and the
learned inner rates of Meta-SGD and MAML++ do not include it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.models import TrunkHead
from metamtl.tasks import Episode, TaskBatch

pytestmark = pytest.mark.usefixtures("float64", "single_thread")


class Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(64, 8)
        self.l2 = nn.Linear(8, 6)
        self.out_features = 6

    def forward(self, x):
        return F.relu(self.l2(torch.tanh(self.l1(x.flatten(1)))))


def frozen_model(**kw) -> TrunkHead:
    torch.manual_seed(0)
    model = TrunkHead(Trunk(), nn.Linear(6, 3), **kw)
    model.trunk.l1.requires_grad_(False)
    return model


def episode(seed, ways=3, shots=2, queries=2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ways * (shots + queries), 1, 8, 8, generator=g)
    labels = torch.arange(ways)
    return Episode(images[: ways * shots], labels.repeat_interleave(shots), images[ways * shots:],
                   labels.repeat_interleave(queries), ways, shots, queries)


FROZEN = ("trunk.l1.weight", "trunk.l1.bias")


def reference_maml(episodes, steps, lr):
    """Unrolled second-order MAML written out: ``l1`` stays fixed, the rest adapts by SGD."""
    model = frozen_model()
    model.train()
    base = dict(model.named_parameters())
    names = [n for n, p in base.items() if p.requires_grad]
    total = 0
    for e in episodes:
        params = {n: base[n] for n in names}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, params, (e.support_x,)), e.support_y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, params, (e.query_x,)), e.query_y) / len(episodes)
    return dict(zip(names, torch.autograd.grad(total, [base[n] for n in names])))


@pytest.mark.parametrize("backend", ["core", "higher"])
def test_frozen_weights_are_not_adapted_and_meta_gradients_keep_them_fixed(backend):
    episodes = [episode(s) for s in range(2)]
    model = frozen_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in FROZEN}
    alg = build_algorithm("maml", steps=2, lr=0.3, backend=backend)
    learner = MetaLearner(model, alg, device="cpu", channels_last=False)
    assert not any(p is model.trunk.l1.weight for p in learner.meta_parameters())

    adapted = learner.adapt(episodes[0].support_x, episodes[0].support_y).adapted
    assert not set(adapted.problem.model_names) & set(FROZEN)
    assert "trunk.l2.weight" in adapted.problem.model_names
    for n, p in model.named_parameters():
        if n in FROZEN:
            assert torch.equal(p, frozen[n]) and p.grad is None

    model.train()
    model.zero_grad()
    alg.meta_step(model, TaskBatch(episodes), 0)
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    reference = reference_maml(episodes, 2, 0.3)
    assert sorted(ours) == sorted(reference)
    for n in reference:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-6, atol=1e-10, msg=n)
    for n, p in model.named_parameters():
        if n in FROZEN:
            assert torch.equal(p, frozen[n])


@pytest.mark.parametrize("backend", ["core", "higher"])
@pytest.mark.parametrize("name,settings", [
    ("metasgd", dict(steps=2, lr=0.2)),
    ("mamlpp", dict(steps=2, lr=0.2, first_order_iterations=0)),
])
def test_learned_inner_rates_leave_out_frozen_weights(name, settings, backend):
    model = frozen_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in FROZEN}
    alg = build_algorithm(name, backend=backend, **settings)
    alg.setup(model)
    keys = set(alg.lrs.keys())
    assert keys and not keys & {"trunk-l1-weight", "trunk-l1-bias"}
    assert "trunk-l2-weight" in keys
    model.train()
    model.zero_grad()
    alg.meta_step(model, TaskBatch([episode(s) for s in range(2)]), 0)
    assert all(alg.lrs[k].grad is not None for k in keys)
    for n, p in model.named_parameters():
        if n in FROZEN:
            assert torch.equal(p, frozen[n]) and p.grad is None


def tasks():
    from metamtl.data import ClassDataset
    from metamtl.tasks import EpisodeSampler

    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return EpisodeSampler(ClassDataset(images, torch.arange(3).repeat_interleave(4), ["a", "b", "c"]), 3, 2, 2)


def test_no_weights_to_adapt_or_meta_learn_is_said_not_a_raw_torch_error():
    """ANIL with a frozen head has nothing to adapt; a model frozen before or after the learner is
    built has nothing to meta-learn: metamtl errors naming requires_grad and the fix."""
    from metamtl.errors import ConfigError

    e = episode(0)
    anil = MetaLearner(frozen_model(), build_algorithm("anil", steps=1, lr=0.1), device="cpu")
    anil.model.head.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"nothing to adapt: .*\(the head\) has requires_grad=False.*steps=0"):
        anil.predict(e.support_x, e.support_y, e.query_x)
    assert anil.evaluate([e], episodes=1, steps=0, progress=False).accuracy is not None  # no steps: nothing to adapt
    model = frozen_model().requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to meta-learn: every weight .* requires_grad=False"):
        MetaLearner(model, build_algorithm("maml", steps=1, lr=0.1), device="cpu")
    learner = MetaLearner(frozen_model(), build_algorithm("protonet"), device="cpu")
    learner.model.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to meta-learn"):
        learner.fit(tasks(), iterations=1, meta_batch_size=1, progress=False)
    assert learner.iteration == 0


def test_per_step_batchnorm_of_frozen_layers_is_not_meta_learned_and_still_round_trips(tmp_path):
    from metamtl.models import build_model
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3)
    model.trunk.blocks[0].requires_grad_(False)  # the first block (conv + its BatchNorm) is frozen
    learner = MetaLearner(model, build_algorithm("mamlpp", steps=1, lr=0.1), device="cpu", meta_lr=0.1)
    norms = learner.algorithm.norms
    assert [p.requires_grad for p in norms.weight] == [False, True]
    assert [p.requires_grad for p in norms.bias] == [False, True]
    assert not any(p is norms.weight[0] or p is norms.bias[0] for p in learner.meta_parameters())
    before = [p.detach().clone() for p in (*norms.weight, *norms.bias)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.arange(3).repeat(2)
    for i in range(2):
        learner.meta_optimizer.zero_grad()
        learner.algorithm.meta_step(learner.model, TaskBatch([Episode(x, y, x, y, 3, 2, 2)]), i)
        learner.meta_optimizer.step()
    after = [p.detach() for p in (*norms.weight, *norms.bias)]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])  # frozen layer: unchanged
    assert not torch.equal(after[1], before[1])  # the trainable layer's are meta-learned
    torch.manual_seed(0)
    again = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3)
    again.trunk.blocks[0].requires_grad_(False)  # a frozen model is loaded into a model frozen alike
    loaded = MetaLearner.load(learner.save(tmp_path / "m.pt"), device="cpu", model=again)
    assert [p.requires_grad for p in loaded.algorithm.norms.weight] == [False, True]
    torch.testing.assert_close(loaded.predict(x, y, x), learner.predict(x, y, x), rtol=0, atol=0)


def test_weights_unfrozen_or_replaced_after_the_learner_is_built_are_refused_not_silently_kept():
    """The meta-optimizer is built with the learner: a weight unfrozen or a module replaced later
    would get meta-gradients and never be updated; fit says so instead."""
    from metamtl.errors import ConfigError

    learner = MetaLearner(frozen_model(), build_algorithm("maml", steps=1, lr=0.1), device="cpu")
    learner.model.trunk.l1.requires_grad_(True)
    with pytest.raises(ConfigError, match=r"meta-optimizer does not know: \['model.trunk.l1.weight'"):
        learner.fit(tasks(), iterations=1, meta_batch_size=1, progress=False)
    learner.model.trunk.l1.requires_grad_(False)
    learner.model.head = nn.Linear(6, 3).double()
    with pytest.raises(ConfigError, match=r"'model.head.weight'.*replaced after the MetaLearner was built"):
        learner.fit(tasks(), iterations=1, meta_batch_size=1, progress=False)
    assert learner.iteration == 0
    fresh = MetaLearner(learner.model, build_algorithm("maml", steps=1, lr=0.1), device="cpu")
    fresh.fit(tasks(), iterations=1, meta_batch_size=1, progress=False)
    assert fresh.iteration == 1


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_rates_serve_a_learner_frozen_after_it_was_built(name, tmp_path):
    """Before: freezing a trained Meta-SGD / MAML++ learner (e.g. to serve it, or to fine-tune only
    its head) made evaluate/predict/fit refuse it: "learned learning rates were made for another
    model". The frozen weights' rates stay (unused) and the learner adapts like a learner built
    frozen; a weight unfrozen later, which has no rate, is still refused."""
    from metamtl.errors import ConfigError

    learner = MetaLearner(frozen_model(config={"name": "frozen"}), build_algorithm(name, steps=1, lr=0.1),
                          device="cpu")
    learner.fit(tasks(), iterations=1, meta_batch_size=1, progress=False)
    learner.model.trunk.l2.requires_grad_(False)
    ep = episode(5)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    out = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    assert out.shape == (6, 3) and torch.isfinite(out).all()
    # the reference: the inner step adapts the head only, with its learned rate(s)
    alg, model = learner.algorithm, learner.model
    params = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    loss = F.cross_entropy(functional_call(model, params, (ep.support_x,)), ep.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    rates = alg.inner_lrs(list(params), 0)
    adapted = {n: p - r * g for (n, p), r, g in zip(params.items(), rates, grads)}
    with torch.no_grad():
        expected = functional_call(model, adapted, (ep.query_x,))
    torch.testing.assert_close(out, expected)
    assert learner.evaluate(tasks(), episodes=2, progress=False).episodes == 2
    learner.fit(tasks(), iterations=2, meta_batch_size=1, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("trunk."))
    learner.save(tmp_path / "l.pt")
    again = frozen_model(config={"name": "frozen"})
    again.trunk.l2.requires_grad_(False)
    loaded = MetaLearner.load(tmp_path / "l.pt", model=again, device="cpu")
    torch.testing.assert_close(loaded.predict(ep.support_x, ep.support_y, ep.query_x),
                               learner.predict(ep.support_x, ep.support_y, ep.query_x))
    learner.model.trunk.l1.requires_grad_(True)  # never had a rate
    with pytest.raises(ConfigError, match="trunk-l1-weight"):
        learner.predict(ep.support_x, ep.support_y, ep.query_x)
