"""Meta-gradients of the shared inner loop against references computed independently.

References use ``torch.func.functional_call`` and ``torch.autograd.grad`` directly (no higher,
no metamtl inner loop), so a mistake in the adapter shows up as a mismatch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metamtl.algorithms import build_algorithm
from metamtl.models import build_model
from metamtl.tasks import Episode, TaskBatch



@pytest.fixture(autouse=True)
def float64():
    """Double precision, so references and metamtl agree to tight tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_conv(out_features=3):
    torch.manual_seed(0)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=out_features)


def episode(ways=3, shots=2, queries=2, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(ways * shots, 1, size, size, generator=g)
    qx = torch.randn(ways * queries, 1, size, size, generator=g)
    return Episode(sx, torch.arange(ways).repeat_interleave(shots), qx,
                   torch.arange(ways).repeat_interleave(queries), ways, shots, queries)


def reference_adapt(model, params, x, y, steps, lr, create_graph):
    """Plain SGD inner loop with torch.func: returns the adapted parameter dict."""
    names = list(params)
    cur = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, cur, (x,)), y)
        grads = torch.autograd.grad(loss, [cur[n] for n in names], create_graph=create_graph)
        cur = {n: cur[n] - lr * g for n, g in zip(names, grads)}
    return cur


def grads_of(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_maml_second_order_meta_gradient_matches_autograd():
    model = tiny_conv()
    ep = episode()
    alg = build_algorithm("maml", steps=3, lr=0.2)
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    ours = grads_of(model)

    params = dict(model.named_parameters())
    adapted = reference_adapt(model, params, ep.support_x, ep.support_y, 3, 0.2, create_graph=True)
    loss = F.cross_entropy(functional_call(model, adapted, (ep.query_x,)), ep.query_y)
    ref = torch.autograd.grad(loss, list(params.values()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and it really is second order: the first-order gradient differs
    fo = reference_adapt(model, {k: v.detach().requires_grad_() for k, v in params.items()},
                         ep.support_x, ep.support_y, 3, 0.2, create_graph=False)
    fo_loss = F.cross_entropy(functional_call(model, fo, (ep.query_x,)), ep.query_y)
    fo_grad = torch.autograd.grad(fo_loss, list(fo.values()))
    assert max((a - b).abs().max() for a, b in zip(ref, fo_grad)) > 1e-4


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    model = tiny_conv()
    ep = episode(seed=1)
    alg = build_algorithm("fomaml", steps=2, lr=0.3)
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    ours = grads_of(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    adapted = reference_adapt(model, params, ep.support_x, ep.support_y, 2, 0.3, create_graph=False)
    adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    loss = F.cross_entropy(functional_call(model, adapted, (ep.query_x,)), ep.query_y)
    ref = torch.autograd.grad(loss, list(adapted.values()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_reptile_update_is_meta_lr_times_weight_change():
    from metamtl import MetaLearner

    model = tiny_conv()
    ep = episode(seed=2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    adapted = reference_adapt(model, {k: v.detach().clone().requires_grad_() for k, v in before.items()},
                              ep.support_x, ep.support_y, 4, 0.1, create_graph=False)
    learner = MetaLearner(model, build_algorithm("reptile", steps=4, lr=0.1), meta_optimizer="sgd",
                          meta_lr=0.25, device="cpu")
    learner.fit(_OneTask(ep), iterations=1, meta_batch_size=1, progress=False)
    for k, v in model.named_parameters():
        expected = before[k] + 0.25 * (adapted[k].detach() - before[k])
        torch.testing.assert_close(v.detach(), expected, rtol=1e-5, atol=1e-7)


def test_head_only_reptile_with_a_proto_head_trains_the_trunk_through_the_prototypes():
    """The settings Reptile refuses are those that cannot train (see test_bad_inputs); a proto head
    adapted alone still sends its weight change into the trunk that computed the prototypes."""
    model = tiny_conv(out_features=None)
    model.zero_grad()
    build_algorithm("reptile", steps=2, lr=0.1, adapt="head", head_init="proto").meta_step(model, TaskBatch([episode(seed=2)]))
    assert all(p.grad is not None for p in model.trunk.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.trunk.parameters()) > 0


class _OneTask:
    """A task source that always returns the same episode."""

    ways, shots, queries, name = 3, 2, 2, "one"

    def __init__(self, ep):
        self.ep = ep

    def episode(self, index):
        return self.ep


def test_anil_meta_gradient_matches_autograd_and_trunk_gets_gradient():
    model = tiny_conv()
    ep = episode(seed=3)
    alg = build_algorithm("anil", steps=2, lr=0.5)
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    ours = grads_of(model)

    params = dict(model.named_parameters())
    head = {k: v for k, v in params.items() if k.startswith("head.")}
    feats_s = model.trunk(ep.support_x)
    cur = dict(head)
    for _ in range(2):
        loss = F.cross_entropy(F.linear(feats_s, cur["head.weight"], cur["head.bias"]), ep.support_y)
        g = torch.autograd.grad(loss, list(cur.values()), create_graph=True)
        cur = {k: v - 0.5 * gg for (k, v), gg in zip(cur.items(), g)}
    qloss = F.cross_entropy(F.linear(model.trunk(ep.query_x), cur["head.weight"], cur["head.bias"]), ep.query_y)
    ref = torch.autograd.grad(qloss, list(params.values()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ours[0].abs().sum() > 0  # the trunk's first conv is meta-learned too


@pytest.mark.parametrize("head_init", ["zero", "proto"])
def test_per_task_heads_second_order_gradient(head_init):
    model = tiny_conv(out_features=None)
    ep = episode(ways=4, seed=4)
    alg = build_algorithm("maml", steps=1, lr=0.3, head_init=head_init)
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    ours = grads_of(model)

    trunk = dict(model.trunk.named_parameters())
    feats = model.trunk(ep.support_x)
    if head_init == "zero":
        w0 = torch.zeros(4, feats.shape[1])
        b0 = torch.zeros(4)
    else:
        protos = torch.stack([feats[ep.support_y == k].mean(0) for k in range(4)])
        w0, b0 = 2 * protos, -(protos ** 2).sum(1)
    # The head is an independent variable of the inner loop (partial derivatives, as at test
    # time); its dependence on the trunk (prototypes) enters the meta-gradient by the chain rule.
    w, b = w0.detach().requires_grad_(), b0.detach().requires_grad_()

    def logits(p, w, b, x):
        return F.linear(functional_call(model.trunk, p, (x,)), w, b)

    names = list(trunk)
    loss = F.cross_entropy(logits(trunk, w, b, ep.support_x), ep.support_y)
    g = torch.autograd.grad(loss, [trunk[n] for n in names] + [w, b], create_graph=True)
    new = {n: trunk[n] - 0.3 * gg for n, gg in zip(names, g)}
    w2, b2 = w - 0.3 * g[-2], b - 0.3 * g[-1]
    qloss = F.cross_entropy(logits(new, w2, b2, ep.query_x), ep.query_y)
    *ref, gw, gb = torch.autograd.grad(qloss, [trunk[n] for n in names] + [w, b])
    if head_init == "proto":
        via_protos = torch.autograd.grad([w0, b0], [trunk[n] for n in names], [gw, gb])
        ref = [r + v for r, v in zip(ref, via_protos)]
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_meta_batch_gradient_is_mean_of_task_gradients():
    model = tiny_conv()
    eps = [episode(seed=s) for s in (5, 6)]
    alg = build_algorithm("maml", steps=1, lr=0.2)
    singles = []
    for ep in eps:
        model.zero_grad()
        alg.meta_step(model, TaskBatch([ep]))
        singles.append(grads_of(model))
    model.zero_grad()
    alg.meta_step(model, TaskBatch(eps))
    for a, s0, s1 in zip(grads_of(model), *singles):
        torch.testing.assert_close(a, (s0 + s1) / 2, rtol=1e-5, atol=1e-7)


def test_proto_head_logits_are_negative_squared_distances_up_to_a_constant():
    from metamtl.models import initial_head_params

    torch.manual_seed(0)
    feats, labels = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    w, b = initial_head_params("proto", feats, labels, 3, 5, feats)
    q = torch.randn(4, 5)
    logits = q @ w.T + b
    protos = torch.stack([feats[labels == k].mean(0) for k in range(3)])
    neg_d2 = -torch.cdist(q, protos) ** 2
    diff = logits - neg_d2
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))


def test_a_learner_saved_with_reptile_settings_that_cannot_train_still_loads_and_predicts(tmp_path):
    """Reptile's refusal of head-only settings with a learned head is a training-time check: such
    learners saved before it existed must still load, evaluate and predict, and only fit refuses."""
    from metamtl import MetaLearner
    from metamtl.errors import ConfigError

    ep = episode(seed=3)
    learner = MetaLearner(tiny_conv(out_features=3), build_algorithm("reptile", steps=2, lr=0.1, adapt="head"), device="cpu")
    path = learner.save(tmp_path / "reptile_head.pt")
    loaded = MetaLearner.load(path, device="cpu")
    assert loaded.predict(ep.support_x, ep.support_y, ep.query_x).shape == (len(ep.query_x), 3)
    with pytest.raises(ConfigError, match="never trains the trunk"):
        loaded.fit(_OneTask(ep), iterations=1, meta_batch_size=1, progress=False)
