"""The inner loop's loss-term hook: support terms change the inner steps, query terms the meta-loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl.algorithms import build_algorithm
from metamtl.models import build_model
from metamtl.tasks import Episode, TaskBatch

pytestmark = pytest.mark.usefixtures("single_thread")


def episode(seed=0, ways=3, shots=2, queries=2, size=8):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(ways * shots, 1, size, size, generator=g)
    qx = torch.randn(ways * queries, 1, size, size, generator=g)
    return Episode(sx, torch.arange(ways).repeat_interleave(shots), qx,
                   torch.arange(ways).repeat_interleave(queries), ways, shots, queries, dataset="toy")


def model(seed=0):
    torch.manual_seed(seed)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3)


def test_support_term_enters_every_inner_step():
    ep, m = episode(), model()
    alg = build_algorithm("maml", steps=1, lr=0.5)
    seen = []

    def term(ctx):
        seen.append((ctx.phase, ctx.step))
        return 0.3 * ctx.logits.sum() if ctx.phase == "support" else None

    alg.inner.loss_terms.append(term)
    adapted = alg.adapt(m, ep.support_x, ep.support_y, 3)  # the model is in training mode: terms apply
    assert seen == [("support", 0)]
    params = list(m.parameters())
    loss = F.cross_entropy(m(ep.support_x), ep.support_y) + 0.3 * m(ep.support_x).sum()
    grads = torch.autograd.grad(loss, params)
    for p, g, a in zip(params, grads, adapted.params):
        torch.testing.assert_close(a[0], p - 0.5 * g)


def test_query_term_adds_to_meta_gradient_and_not_to_reported_loss():
    ep = episode()
    ref_model, m = model(), model()
    alg = build_algorithm("maml", steps=1, lr=0.5)
    term = lambda ctx: 0.7 * ctx.logits.pow(2).mean() if ctx.phase == "query" else None  # noqa: E731
    alg.inner.loss_terms.append(term)
    metrics = alg.meta_step(m, TaskBatch([ep]))
    params = dict(ref_model.named_parameters())  # reference: one second-order SGD step written out
    grads = torch.autograd.grad(F.cross_entropy(ref_model(ep.support_x), ep.support_y), list(params.values()),
                                create_graph=True)
    logits = torch.func.functional_call(ref_model, {n: p - 0.5 * g for (n, p), g in zip(params.items(), grads)},
                                        (ep.query_x,))
    plain = F.cross_entropy(logits, ep.query_y)
    (plain + 0.7 * logits.pow(2).mean()).backward()
    for a, b in zip(m.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert abs(metrics["loss"] - float(plain.detach())) < 1e-5


def test_terms_are_skipped_in_eval_mode():
    ep, m = episode(), model()
    alg = build_algorithm("maml", steps=1, lr=0.5)
    calls = []
    alg.inner.loss_terms.append(lambda ctx: calls.append(ctx.phase))
    m.eval()
    alg.evaluate_episode(m, ep)
    assert calls == []
    m.train()
    alg.meta_step(m, TaskBatch([ep]))
    assert calls == ["support", "query"]
