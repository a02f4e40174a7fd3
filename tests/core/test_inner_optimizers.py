"""The functional inner optimizers step exactly like their torch.optim classes."""
from __future__ import annotations

import pytest
import torch

from metamtl.adaptation import INNER_OPTIMIZERS, build_optimizer
from metamtl.errors import ConfigError

pytestmark = pytest.mark.usefixtures("float64")

CASES = [(n, {}) for n in INNER_OPTIMIZERS] + [
    ("sgd", {"weight_decay": 0.1, "momentum": 0.5, "dampening": 0.2}),
    ("sgd", {"maximize": True, "momentum": 0.9, "nesterov": True}),
    ("adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("adamw", {"amsgrad": True, "weight_decay": 0.05}),
    ("rmsprop", {"centered": True, "momentum": 0.3, "weight_decay": 0.1}),
    ("adagrad", {"lr_decay": 0.1, "initial_accumulator_value": 0.2}),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_updates_equal_torch_optim(name, kwargs):
    if name in ("adam", "adamw"):
        # higher (and the core) add eps before Adam's bias correction, torch.optim after it: with
        # eps = 0 the two formulas are the same function
        kwargs = {**kwargs, "eps": 0.0}
    opt = build_optimizer(name, 0.1, kwargs)
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, generator=g)
    ref = p0.clone().requires_grad_()
    cls, defaults = INNER_OPTIMIZERS[name]
    torch_opt = cls.torch_class([ref], lr=0.1, **{**defaults, **kwargs})
    params, state = [p0.clone()], opt.init([p0])
    lr = torch.tensor(0.1)  # a tensor rate works like the float
    for k in range(4):
        grad = torch.randn(3, 4, generator=g)
        ref.grad = grad.clone()
        torch_opt.step()
        params, state = opt.update(params, [grad], state, [lr], k)
        torch.testing.assert_close(params[0], ref.detach(), rtol=1e-10, atol=1e-12)


def test_updates_are_differentiable_in_weights_rates_and_gradients():
    opt = build_optimizer("adam", 0.1, {})
    p = torch.randn(5, requires_grad=True)
    lr = torch.full((5,), 0.1, requires_grad=True)
    grad = (p * p).sum()
    (g,) = torch.autograd.grad(grad, [p], create_graph=True)
    new, _ = opt.update([p], [g], opt.init([p]), [lr], 0)
    d_p, d_lr = torch.autograd.grad(new[0].sum(), [p, lr])
    assert torch.isfinite(d_p).all() and d_lr.abs().sum() > 0


def test_zero_second_moment_has_a_finite_second_order_gradient():
    opt = build_optimizer("adam", 0.1, {})
    p = torch.zeros(3, requires_grad=True)
    (g,) = torch.autograd.grad((p[:2] * 2).sum() + 0 * p.sum(), [p], create_graph=True)  # g[2] == 0
    new, _ = opt.update([p], [g], opt.init([p]), [0.1], 0)
    (d,) = torch.autograd.grad(new[0].sum(), [p])
    assert torch.isfinite(d).all()


def test_unused_weights_and_bad_settings():
    opt = build_optimizer("momentum", 0.1, {})
    p = torch.ones(2)
    new, state = opt.update([p], [None], opt.init([p]), [0.1], 0)
    assert new[0] is p
    with pytest.raises(ConfigError, match="unknown inner optimizer"):
        build_optimizer("adamm", 0.1, {})
    with pytest.raises(ConfigError, match="bad inner optimizer_kwargs"):
        build_optimizer("adam", 0.1, {"betas": 3})


@pytest.mark.parametrize("name,rates", [("sgd", "float"), ("sgd", "tensor"), ("adam", "float"), ("adam", "tensor")])
def test_the_fused_update_of_all_weights_equals_the_per_weight_rule_to_second_order(name, rates, monkeypatch):
    """SGD and Adam update every weight at once with torch._foreach_* ops; the values and the
    second-order gradients (with respect to weights, gradients and learned rates) are the rule's."""
    from metamtl.adaptation.optim import InnerOptimizer, build_optimizer

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4), (2, 5), (2,)]

    def run(fused: bool):
        opt = build_optimizer(name, 0.1, {})
        if not fused:
            monkeypatch.setattr(type(opt), "fused", InnerOptimizer.fused)
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=torch.float64, generator=g.manual_seed(i), requires_grad=True)
                  for i, s in enumerate(shapes)]
        lrs = ([0.1] * 3 if rates == "float" else
               [torch.full(s[1:], 0.1 + 0.01 * i, dtype=torch.float64, requires_grad=True) for i, s in enumerate(shapes)])
        state = opt.init(params)
        cur = params
        for k in range(2):
            grads = [torch.sin(q) * q for q in cur]  # differentiable, like create_graph=True gradients
            cur, state = opt.update(cur, grads, state, lrs, k)
        loss = sum((c ** 2).sum() for c in cur) + sum(s.sum() for s in state)
        leaves = params + [lr for lr in lrs if isinstance(lr, torch.Tensor)]
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        second = torch.autograd.grad(sum(f.sum() for f in first), leaves)
        monkeypatch.undo()
        return [c.detach() for c in cur], first, second

    for a, b in zip(run(True), run(False)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_second_order_centered_rmsprop_on_the_higher_engine_is_refused_not_nan():
    """higher's centered RMSprop takes sqrt(square_avg - grad_avg^2) unmasked: its second-order
    meta-gradient is NaN wherever that is 0 (the core's safe_sqrt is finite there)."""
    from metamtl.algorithms import build_algorithm
    for optimizer in ("rmsprop", torch.optim.RMSprop):
        with pytest.raises(ConfigError, match="centered RMSprop.*backend 'higher'.*use backend 'core'"):
            build_algorithm("maml", backend="higher", optimizer=optimizer, optimizer_kwargs={"centered": True})
    # what stays finite is still allowed: first order, plain RMSprop, and the core
    build_algorithm("fomaml", backend="higher", optimizer="rmsprop", optimizer_kwargs={"centered": True})
    build_algorithm("maml", backend="higher", optimizer="rmsprop", optimizer_kwargs={"momentum": 0.5})
    build_algorithm("maml", optimizer="rmsprop", optimizer_kwargs={"centered": True})


def test_adam_with_decoupled_weight_decay_on_the_higher_engine_is_adamw_as_on_the_core():
    """higher's differentiable Adam never reads ``decoupled_weight_decay``: the higher engine runs
    it as AdamW (what torch.optim.Adam does with it), not as silent L2 weight decay."""
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model
    from metamtl.tasks import Episode
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(2)
    episode = Episode(x[:6], y, x[6:], y, 3, 2, 2)

    def loss(backend, optimizer, kwargs):
        torch.manual_seed(0)
        model = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3).eval()
        algorithm = build_algorithm("fomaml", steps=3, lr=0.05, optimizer=optimizer, optimizer_kwargs=kwargs, backend=backend)
        return algorithm.evaluate_episode(model, episode)["loss"]

    decoupled = {"decoupled_weight_decay": True, "weight_decay": 5.0}
    adamw = loss("core", "adamw", {"weight_decay": 5.0})
    assert loss("core", "adam", decoupled) == pytest.approx(adamw, rel=1e-12)
    assert loss("higher", "adamw", {"weight_decay": 5.0}) == pytest.approx(adamw, rel=1e-12)
    assert abs(loss("higher", "adam", {"weight_decay": 5.0}) - adamw) > 1e-4  # L2 decay differs visibly
    for optimizer in ("adam", torch.optim.Adam, "torch.optim.Adam"):
        assert loss("higher", optimizer, decoupled) == pytest.approx(adamw, rel=1e-12)
    # without weight decay it is plain Adam (AdamW's own default weight decay does not sneak in)
    plain = loss("core", "adam", {})
    assert loss("higher", "adam", {"decoupled_weight_decay": True}) == pytest.approx(plain, rel=1e-12)
