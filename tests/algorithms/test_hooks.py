"""The inner-loop hooks algorithms build on: trajectory, track_updates, lr_override, StepNorms."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from metamtl.adaptation import InnerHooks, InnerLoop, task_loss
from metamtl.errors import ConfigError
from metamtl.models import EpisodicBatchNorm, StepNorms, build_model

from algo_utils import episode, tiny


pytestmark = pytest.mark.usefixtures("float64")


def test_trajectory_holds_every_step_and_call_uses_it():
    model, ep = tiny(), episode()
    inner = InnerLoop(steps=3, lr=0.2)
    full = inner.adapt_task(model, ep.support_x, ep.support_y, 3, create_graph=False)
    assert full.steps == 3 and len(full.inner_losses) == 3
    for k in range(4):
        part = inner.adapt_task(model, ep.support_x, ep.support_y, 3, create_graph=False, steps=k)
        torch.testing.assert_close(full(ep.query_x, updates=k), part(ep.query_x))
    torch.testing.assert_close(full(ep.query_x), full(ep.query_x, updates=3))


@pytest.mark.parametrize("head_init,adapt", [("learned", "all"), ("proto", "all"), ("proto", "head")])
def test_track_updates_first_order_equals_backward_first_order(head_init, adapt):
    """Detached inner gradients on the tape give exactly the first-order meta-gradient."""
    model = tiny(None if head_init != "learned" else 3)
    ep = episode(seed=1)
    inner = InnerLoop(steps=2, lr=0.3, head_init=head_init, adapt=adapt)
    grads = []
    for track in (False, True):
        model.zero_grad()
        a = inner.adapt_task(model, ep.support_x, ep.support_y, 3, create_graph=False, track_updates=track)
        assert a.on_tape == track
        loss = task_loss(a(ep.query_x), ep.query_y)
        a.backward(loss)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


class ScaledLR(InnerHooks):
    def __init__(self):
        self.calls = []
        self.contexts = []

    def lr_override(self, names, step):
        self.calls.append((list(names), step))
        return {"lr": [torch.tensor(0.1 * (step + 1))] * len(names)}

    def step_context(self, updates):
        self.contexts.append(updates)
        return contextlib.nullcontext()


def test_lr_override_and_step_context_are_called_per_step_with_model_names():
    model, ep = tiny(None), episode()
    hooks = ScaledLR()
    inner = InnerLoop(steps=2, lr=5.0, head_init="zero", adapt="head")
    a = inner.adapt_task(model, ep.support_x, ep.support_y, 3, create_graph=False, hooks=hooks)
    assert hooks.calls == [(["head.weight", "head.bias"], 0), (["head.weight", "head.bias"], 1)]
    a(ep.query_x)
    assert hooks.contexts == [0, 1, 2]
    # the override replaced lr=5: a zero head after one step of lr 0.1 is -0.1 * grad
    feats = model.trunk(ep.support_x).detach()
    w = torch.zeros(3, feats.shape[1], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(feats, w, b), ep.support_y), [w, b])
    torch.testing.assert_close(a.trajectory[1][0], -0.1 * gw)
    torch.testing.assert_close(a.trajectory[1][1], -0.1 * gb)


def test_step_norms_swap_parameters_and_track_running_statistics():
    model = tiny(None)
    layers = [m for m in model.modules() if isinstance(m, EpisodicBatchNorm)]
    norms = StepNorms(model, sets=3, momentum=0.5)
    norms.bind(tiny(None))  # same architecture: fine
    with pytest.raises(ConfigError, match="channels"):
        norms.bind(build_model("conv4", in_channels=1, hidden=5, image_size=8, blocks=2, out_features=None))
    norms.bind(model)
    with torch.no_grad():
        norms.weight[0][2].fill_(2.0)
        norms.bias[0][2].fill_(-1.0)
    x = torch.randn(6, 4, 8, 8)
    layer = layers[0]
    plain = layer(x)
    with norms.use(5):  # clamped to the last set
        out = layer(x)
    torch.testing.assert_close(out, 2.0 * plain - 1.0)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(norms.running_mean_0[2], 0.5 * mean)
    torch.testing.assert_close(norms.running_var_0[2], 0.5 + 0.5 * var)
    assert torch.equal(norms.running_mean_0[:2], torch.zeros(2, 4))
    layer.eval()
    with norms.use(2):
        ev = layer(x[:1])
    rm, rv = norms.running_mean_0[2], norms.running_var_0[2]
    expected = (x[:1] - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + layer.eps) * 2.0 - 1.0
    torch.testing.assert_close(ev, expected)
    # outside the context, the layer is untouched
    layer.train()
    torch.testing.assert_close(layer(x), plain)
