"""MAML++: multi-step loss weights, per-layer per-step learning rates, per-step BatchNorm, annealing."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm, multi_step_weights
from metamtl.errors import ConfigError
from metamtl.models import TrunkHead, build_model
from metamtl.tasks import TaskBatch

from algo_utils import episode, tiny


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_multi_step_weights_sum_to_one_and_anneal_as_documented(steps):
    horizon = 100
    rows = [multi_step_weights(steps, t, horizon) for t in range(0, 130, 5)]
    for w in rows:
        assert len(w) == steps and sum(w) == pytest.approx(1.0, abs=1e-12) and min(w) >= 0
    assert rows[0] == pytest.approx([1.0 / steps] * steps)  # uniform at the start
    if steps > 1:
        early = [w[0] for w in rows if w[-1] < 1]
        assert all(a > b for a, b in zip(early, early[1:]))  # non-final weights shrink linearly
        # halfway: 1/S - 0.5 (1/S - 0.03/S) for every non-final step
        half = multi_step_weights(steps, horizon // 2, horizon)
        assert half[:-1] == pytest.approx([1 / steps - 0.5 * (1 / steps - 0.03 / steps)] * (steps - 1))
        # just before the horizon the non-final weights approach 0.03 / S
        assert multi_step_weights(steps, horizon - 1, horizon)[0] == pytest.approx(0.03 / steps, abs=0.01 / steps)
    for t in (horizon, horizon + 1, 10 * horizon):  # then the final step only
        assert multi_step_weights(steps, t, horizon) == [0.0] * (steps - 1) + [1.0]


def test_lslr_and_multi_step_meta_gradient_match_autograd(float64):
    """Per-layer per-step rates, loss after each step weighted, second order, vs torch.func."""
    model, ep = tiny(), episode(seed=3)
    alg = build_algorithm("mamlpp", steps=2, lr=0.1, per_step_bn=False, multi_step_iterations=10,
                          first_order_iterations=0)
    alg.setup(model)
    with torch.no_grad():
        for p in alg.lrs.values():
            p.uniform_(0.05, 0.3)
    params = dict(model.named_parameters())
    lrs = {n: alg.lrs[n.replace(".", "-")].detach().clone().requires_grad_() for n in params}
    weights = multi_step_weights(2, 0, 10)
    cur, objective = dict(params), 0.0
    for k in range(2):
        loss = F.cross_entropy(functional_call(model, cur, (ep.support_x,)), ep.support_y)
        grads = torch.autograd.grad(loss, list(cur.values()), create_graph=True)
        cur = {n: cur[n] - lrs[n][k] * g for n, g in zip(cur, grads)}
        objective = objective + weights[k] * F.cross_entropy(functional_call(model, cur, (ep.query_x,)), ep.query_y)
    ref = torch.autograd.grad(objective, list(params.values()) + list(lrs.values()))
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]), 0)
    ours = [p.grad for p in model.parameters()] + [alg.lrs[n.replace(".", "-")].grad for n in params]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert all(float(g[1].abs()) > 0 and float(g[0].abs()) > 0 for g in ours[len(params):])


def test_derivative_order_annealing_switches_after_n_iterations():
    model, ep = tiny(), episode()
    alg = build_algorithm("mamlpp", steps=2, lr=0.1, first_order_iterations=2, per_step_bn=False)
    orders = []
    for it in range(4):
        orders.append(alg.meta_gradient(it).name)
        model.zero_grad()
        alg.meta_step(model, TaskBatch([ep]), it)
        assert all(p.grad.abs().sum() > 0 for p in alg.lrs.values())  # rates learn in first order too
    assert orders == ["first_order", "first_order", "second_order", "second_order"]
    assert build_algorithm("mamlpp", first_order=True, first_order_iterations=0).meta_gradient(9).name == "first_order"


def test_annealing_under_multitask_follows_the_meta_iteration(monkeypatch):
    """The multitask algorithm runs its base's meta-step once per dataset of a meta-batch: MAML++'s
    annealing must still follow the learner's meta-iteration count (it advanced G = 2 datasets
    per batch times too fast when MAML++ counted its own meta-steps)."""
    from metamtl.algorithms import mamlpp
    from metamtl.tasks import Episode

    class Mixed:  # two datasets, two episodes of each per meta-batch of 4
        ways, shots, queries, name = 3, 2, 2, "mixed"

        def episode(self, index):
            ep = episode(seed=index)
            return Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 3, 2, 2, dataset="ab"[index % 2])

    seen = []

    def spy(steps, iteration, anneal_iterations):
        seen.append(iteration)
        return multi_step_weights(steps, iteration, anneal_iterations)

    monkeypatch.setattr(mamlpp, "multi_step_weights", spy)
    settings = dict(steps=2, lr=0.1, per_step_bn=False, multi_step_iterations=6, first_order_iterations=3)
    learner = MetaLearner(tiny(), build_algorithm("multitask", base={"name": "mamlpp", **settings},
                                                  datasets=["a", "b"]), device="cpu", meta_lr=1e-3,
                          channels_last=False)  # a forced layout: no layout probe meta-steps in `seen`
    learner.fit(Mixed(), iterations=4, meta_batch_size=4, progress=False)
    assert sorted(set(seen)) == [0, 1, 2, 3]  # the schedule saw meta-iterations 0..3, not 0..7
    assert seen == sorted(seen) and seen.count(3) == seen.count(0) > 0
    base = learner.algorithm.base
    assert [base.meta_gradient(t).name for t in range(5)] == ["first_order"] * 3 + ["second_order"] * 2


def test_per_step_batchnorm_is_learned_tracks_statistics_and_predicts_without_transduction():
    model = tiny(None)
    learner = MetaLearner(model, build_algorithm("mamlpp", steps=2, lr=0.1, head_init="zero"), device="cpu")
    alg = learner.algorithm
    norms = alg.norms
    assert norms.sets == 3 and len(norms.weight) == 2
    ep = episode(ways=3, seed=1)
    model.train()
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]), 0)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in norms.weight)
    own_affine = [p for n, p in model.named_parameters() if re.search(r"blocks\.\d+\.1\.", n)]
    assert len(own_affine) == 4 and all(p.grad is None for p in own_affine)  # the layers' own are unused
    for k in range(3):  # every set saw batches: support at steps 0, 1 and queries after 1, 2 updates
        assert norms.running_mean_0[k].abs().sum() > 0
    # eval mode: running statistics, so a query's logits do not depend on the other queries
    full = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    single = learner.predict(ep.support_x, ep.support_y, ep.query_x[:1])
    torch.testing.assert_close(full[:1], single)
    before = norms.running_mean_0.clone()
    learner.evaluate([ep], progress=False)
    assert torch.equal(before, norms.running_mean_0)  # evaluation leaves the statistics alone
    alg.norms.eval_stats = "batch"
    assert not torch.allclose(learner.predict(ep.support_x, ep.support_y, ep.query_x)[:1],
                              learner.predict(ep.support_x, ep.support_y, ep.query_x[:1]))


def test_eval_with_more_steps_than_training_reuses_the_last_rates_and_norms():
    model = tiny(None)
    learner = MetaLearner(model, build_algorithm("mamlpp", steps=2, lr=0.1, head_init="proto", eval_steps=5),
                          device="cpu")
    ep = episode(ways=3, seed=2)
    res = learner.evaluate([ep], progress=False)
    assert res.steps == 5 and 0 <= res.accuracy <= 1
    assert learner.algorithm.inner_lrs(["head.weight"], 4)[0] is not None


@pytest.mark.parametrize("bn_eval", ["running", "batch"])
def test_proto_head_is_built_from_the_features_of_the_per_step_set_its_logits_use(bn_eval):
    model = tiny(None)
    alg = build_algorithm("mamlpp", steps=1, lr=0.1, head_init="proto", bn_eval=bn_eval)
    learner = MetaLearner(model, alg, device="cpu", channels_last=False)
    ep = episode(ways=3, seed=3)
    model.train()
    alg.meta_step(model, TaskBatch([ep]), 0)  # running statistics of set 0: the support pass of step 0 only
    zero = MetaLearner(tiny(None), build_algorithm("mamlpp", steps=1, lr=0.1, head_init="zero"), device="cpu",
                       channels_last=False)
    zero.model.train()
    zero.algorithm.meta_step(zero.model, TaskBatch([ep]), 0)
    torch.testing.assert_close(alg.norms.running_mean_0[0], zero.algorithm.norms.running_mean_0[0])
    with torch.no_grad():  # per-step affine weights that differ from the layers' own (unused) ones
        for w in alg.norms.weight:
            w.mul_(2.0)
    got = learner.predict(ep.support_x, ep.support_y, ep.query_x, steps=0)
    model.eval()
    set0 = {n[len("trunk."):]: t for n, t in alg.norms.tensors(0, False).items()}
    with torch.no_grad():
        fs, fq = (functional_call(model.trunk, set0, (x,)) for x in (ep.support_x, ep.query_x))
        c = torch.stack([fs[ep.support_y == k].mean(0) for k in range(3)])
    torch.testing.assert_close(got, fq @ (2 * c).T - (c * c).sum(1))


def test_bad_settings():
    with pytest.raises(ConfigError, match="adapt='all'"):
        build_algorithm("mamlpp", adapt="head")
    with pytest.raises(ConfigError, match="unknown bn_eval"):
        build_algorithm("mamlpp", bn_eval="runing")
    with pytest.raises(ConfigError, match="multi_step_iterations"):
        build_algorithm("mamlpp", multi_step_iterations=-1)
    with pytest.raises(ConfigError, match="inner lr"):
        build_algorithm("mamlpp", lr=float("nan"))
    for momentum, message in ((5, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (0, "> 0"), (-0.1, "> 0")):
        with pytest.raises(ConfigError, match="mamlpp bn_momentum must be a .*" + message):  # above 1 they diverge
            build_algorithm("mamlpp", bn_momentum=momentum)
    assert build_algorithm("mamlpp", bn_momentum=1).bn_momentum == 1.0
    for key in ("learn_lr", "per_step_bn"):  # a string "false" (an override left a string) is not false
        with pytest.raises(ConfigError, match=f"mamlpp {key} must be true or false, got 'false'"):
            build_algorithm("mamlpp", **{key: "false"})
    with pytest.raises(ConfigError, match=r"algorithm .mamlpp. does not take \[.multistep.\]. Did you mean .multi_step_iterations."):
        build_algorithm("mamlpp", multistep=3)


@pytest.mark.parametrize("head_init", ["learned", "zero"])
def test_second_order_with_support_statistics_trains_and_equals_the_checkpointed_meta_gradient(float64, head_init):
    """The support-only pass's batch norm must not save running statistics that the query pass updates."""
    grads = []
    for memory in ("full", "checkpoint"):
        model = tiny(None if head_init == "zero" else 3)
        alg = build_algorithm("mamlpp", steps=2, lr=0.1, bn_stats="support", head_init=head_init, memory=memory,
                              first_order_iterations=1, multi_step_iterations=10)
        alg.setup(model)
        model.train()
        for iteration in (0, 1):  # first order, then second order
            model.zero_grad()
            alg.zero_grad()
            metrics = alg.meta_step(model, TaskBatch([episode(seed=1), episode(seed=2)]), iteration)
            assert torch.isfinite(torch.tensor(metrics["loss"]))
        assert alg.meta_gradient(1).name != "first_order"
        params = list(model.named_parameters()) + list(alg.named_parameters())
        grads.append({n: p.grad.clone() for n, p in params if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and any("norms" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-10, msg=name)


def test_learned_rates_made_for_another_model_are_a_config_error_as_in_metasgd():
    alg = build_algorithm("mamlpp", steps=1, per_step_bn=False)
    model = tiny()
    model.trunk.blocks[0].requires_grad_(False)
    alg.setup(model)
    alg.setup(model)  # idempotent
    model.trunk.blocks[0].requires_grad_(True)  # unfrozen later: a weight with no learned rate
    with pytest.raises(ConfigError, match="mamlpp: this algorithm's learned learning rates were made for another"):
        alg.setup(model)
    other = build_algorithm("mamlpp", steps=1, per_step_bn=False, head_init="zero")
    other.setup(tiny(None))
    with pytest.raises(ConfigError, match="another model"):  # other weights (used to fail later, or not at all)
        other.setup(build_model("mlp", in_features=64, hidden=[6], out_features=None))


def test_per_step_batchnorm_warns_about_torch_batchnorm_layers_it_cannot_reach():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 6))
    trunk.out_features = 6
    alg = build_algorithm("mamlpp", steps=2, lr=0.1, per_step_bn=True)
    with pytest.warns(UserWarning, match=r"per_step_bn applies to metamtl's EpisodicBatchNorm.*layer\(s\) trunk.1 .*"
                                         r"per_step_bn: false"):
        alg.setup(TrunkHead(trunk, nn.Linear(6, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_algorithm("mamlpp", steps=2, lr=0.1, per_step_bn=False).setup(TrunkHead(trunk, nn.Linear(6, 3)))
        conv4 = build_algorithm("mamlpp", steps=2, lr=0.1)
        conv4.setup(tiny())
        assert len(conv4.norms.features) == 2


def test_per_step_batchnorm_keeps_running_statistics_of_non_affine_layers_and_affine_sets_of_the_others(tmp_path):
    from metamtl.models import EpisodicBatchNorm

    def model():
        trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), EpisodicBatchNorm(4, affine=False), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, padding=1), EpisodicBatchNorm(4), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
        trunk.out_features = 4
        return TrunkHead(trunk, None, config={"name": "mynet"})

    torch.manual_seed(0)
    learner = MetaLearner(model(),
                          build_algorithm("mamlpp", steps=1, lr=0.1, head_init="zero"), device="cpu")
    norms = learner.algorithm.norms
    assert norms.affine_layers == [False, True] and len(norms.weight) == 1 and norms.weight[0].shape == (2, 4)
    assert set(norms.tensors(0, True)) == {"trunk.1.running_mean", "trunk.1.running_var", "trunk.4.weight",
                                           "trunk.4.bias", "trunk.4.running_mean", "trunk.4.running_var"}
    ep = episode(ways=3, seed=4)
    learner.model.train()
    learner.algorithm.meta_step(learner.model, TaskBatch([ep]), 0)
    assert norms.running_mean_0[0].abs().sum() > 0 and norms.running_mean_1[0].abs().sum() > 0
    assert norms.weight[0].grad is not None and norms.weight[0].grad.abs().sum() > 0
    full = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    torch.testing.assert_close(full[:1], learner.predict(ep.support_x, ep.support_y, ep.query_x[:1]))
    back = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu", model=model())
    assert torch.equal(back.predict(ep.support_x, ep.support_y, ep.query_x), full)
    with pytest.raises(ConfigError, match=r"affine weights \[False, True\], this model's layers have \[True, True\]"):
        learner.algorithm.norms.bind(TrunkHead(nn.Sequential(EpisodicBatchNorm(4), EpisodicBatchNorm(4)), None))
