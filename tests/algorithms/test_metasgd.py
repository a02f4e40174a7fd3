"""Meta-SGD: learned per-weight inner learning rates and their meta-gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.errors import ConfigError
from metamtl.tasks import TaskBatch

from algo_utils import episode, tiny

pytestmark = pytest.mark.usefixtures("float64")


def reference(model, lrs, ep, steps, first_order=False):
    """Meta-SGD by hand: w <- w - lr_w * dL/dw, elementwise, with torch.func and autograd."""
    params = dict(model.named_parameters())
    cur = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, cur, (ep.support_x,)), ep.support_y)
        grads = torch.autograd.grad(loss, list(cur.values()), create_graph=not first_order)
        cur = {n: cur[n] - lrs[n] * g for n, g in zip(cur, grads)}
    qloss = F.cross_entropy(functional_call(model, cur, (ep.query_x,)), ep.query_y)
    return torch.autograd.grad(qloss, list(params.values()) + [lrs[n] for n in params])


@pytest.mark.parametrize("first_order", [False, True])
def test_learned_lr_meta_gradient_matches_autograd(first_order):
    model, ep = tiny(), episode()
    alg = build_algorithm("metasgd", steps=2, lr=0.1, first_order=first_order)
    alg.setup(model)
    with torch.no_grad():  # distinct rates per element, so a mix-up of rates would show
        for p in alg.lrs.values():
            p.uniform_(0.05, 0.3)
    lrs = {n: alg.lrs[n.replace(".", "-")].detach().clone().requires_grad_() for n, _ in model.named_parameters()}
    ref = reference(model, lrs, ep, 2, first_order)
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    n = len(lrs)
    ours = [p.grad for p in model.parameters()] + [alg.lrs[k.replace(".", "-")].grad for k in lrs]
    for name, a, b in zip(list(lrs) + [f"lr:{k}" for k in lrs], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
    assert all(g.abs().sum() > 0 for g in ours[n:])  # every rate is learned


def test_per_task_head_rates_are_shared_across_classes_and_serve_any_ways():
    model = tiny(None)
    alg = build_algorithm("metasgd", steps=1, lr=0.2, head_init="zero")
    alg.setup(model)
    assert tuple(alg.lrs["head-weight"].shape) == (1, model.num_features)
    assert tuple(alg.lrs["head-bias"].shape) == (1,)
    with torch.no_grad():
        alg.lrs["head-weight"].uniform_(0.1, 0.5)
    for ways in (3, 5):
        ep = episode(ways=ways, seed=ways)
        model.zero_grad()
        alg.zero_grad()
        alg.meta_step(model, TaskBatch([ep]))
        assert alg.lrs["head-weight"].grad.abs().sum() > 0
        # reference for the head: one step from zero with per-feature rates
        feats = model.trunk(ep.support_x)
        lr_w = alg.lrs["head-weight"].detach().clone().requires_grad_()
        lr_b = alg.lrs["head-bias"].detach().clone().requires_grad_()
        w, b = torch.zeros(ways, feats.shape[1], requires_grad=True), torch.zeros(ways, requires_grad=True)
        trunk = dict(model.trunk.named_parameters())
        loss = F.cross_entropy(F.linear(feats, w, b), ep.support_y)
        g = torch.autograd.grad(loss, list(trunk.values()) + [w, b], create_graph=True)
        lr_t = {n: alg.lrs["trunk-" + n.replace(".", "-")] for n in trunk}
        new = {n: trunk[n] - lr_t[n] * gg for n, gg in zip(trunk, g)}
        qf = functional_call(model.trunk, new, (ep.query_x,))
        qloss = F.cross_entropy(F.linear(qf, w - lr_w * g[-2], b - lr_b * g[-1]), ep.query_y)
        ref_w, ref_b = torch.autograd.grad(qloss, [lr_w, lr_b])
        torch.testing.assert_close(alg.lrs["head-weight"].grad, ref_w)
        torch.testing.assert_close(alg.lrs["head-bias"].grad, ref_b)


def test_rates_are_meta_parameters_saved_and_restored(tmp_path):
    model = tiny(None)
    learner = MetaLearner(model, build_algorithm("metasgd", steps=1, lr=0.2, head_init="proto"), device="cpu")
    ids = {id(p) for p in learner.meta_parameters()}
    assert all(id(p) in ids for p in learner.algorithm.lrs.values())
    with torch.no_grad():
        learner.algorithm.lrs["head-bias"].fill_(0.123)
    loaded = MetaLearner.load(learner.save(tmp_path / "m.pt"), device="cpu")
    assert float(loaded.algorithm.lrs["head-bias"].detach()) == pytest.approx(0.123)


def test_bad_learning_rates_are_refused():
    for bad in (0.0, -0.1, float("nan"), float("inf"), "fast"):
        with pytest.raises(ConfigError, match="inner lr"):
            build_algorithm("metasgd", lr=bad)
    alg = build_algorithm("metasgd", lr=0.1)
    alg.setup(tiny())
    with pytest.raises(ConfigError, match="another model"):
        alg.setup(tiny(hidden=5))


@pytest.mark.parametrize("optimizer", [torch.optim.Rprop, torch.optim.ASGD])
def test_learned_rates_with_a_torch_optimizer_taking_a_scalar_lr_on_higher_are_refused_when_built(optimizer):
    """higher's Rprop and ASGD read ``lr`` as one Python number: learned rates failed deep inside
    (Rprop) or silently stopped learning (ASGD turned them into floats)."""
    for name, kw in (("metasgd", {}), ("mamlpp", {})):
        with pytest.raises(ConfigError, match=f"{name} learns its inner learning rates.*{optimizer.__name__}"):
            build_algorithm(name, steps=1, lr=0.1, backend="higher", optimizer=optimizer, **kw)
    build_algorithm("mamlpp", steps=1, lr=0.1, backend="higher", optimizer=optimizer, learn_lr=False)
    build_algorithm("maml", steps=1, lr=0.1, backend="higher", optimizer=optimizer)
