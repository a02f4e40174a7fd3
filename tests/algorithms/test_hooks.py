"""The declarations algorithms make on the core: trajectory, learned rates, per-step tensors, rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl.adaptation import FirstOrder, InnerLoop, build_problem, task_loss
from metamtl.errors import ConfigError, InputError
from metamtl.models import EpisodicBatchNorm, StepNorms, build_model

from algo_utils import episode, tiny


pytestmark = pytest.mark.usefixtures("float64")


def problem(model, ep, inner, **declarations):
    return build_problem(inner, model, ep.support_x[None], ep.support_y[None], ep.ways, **declarations)


def test_trajectory_holds_every_step_and_call_uses_it():
    model, ep = tiny(), episode()
    inner = InnerLoop(steps=3, lr=0.2)
    p = problem(model, ep, inner)
    full = p.unroll(p.leaves(), tape=False, create_graph=False)
    assert full.steps == 3 and len(full.inner_losses) == 3
    for k in range(4):
        part = p.unroll(p.leaves(), k, tape=False, create_graph=False)
        torch.testing.assert_close(full(ep.query_x[None], updates=k), part(ep.query_x[None]))
    torch.testing.assert_close(full(ep.query_x[None]), full(ep.query_x[None], updates=3))


@pytest.mark.parametrize("updates", [4, -1, 1.5, True])
def test_weights_after_more_updates_than_were_made_are_an_input_error(updates):
    model, ep = tiny(), episode()
    p = problem(model, ep, InnerLoop(steps=3, lr=0.2))
    adapted = p.unroll(p.leaves(), tape=False, create_graph=False)
    with pytest.raises(InputError, match=rf"updates must be an integer in 0..3 \(the inner steps made\), got {updates!r}"):
        adapted(ep.query_x[None], updates=updates)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "momentum", "rmsprop"])
@pytest.mark.parametrize("rates", [[0.1], [0.1] * 20])
def test_inner_lrs_with_a_rate_count_other_than_the_adapted_weights_is_an_input_error(optimizer, rates):
    """One rate per adapted weight: a shorter list is not broadcast (nor truncates the update)."""
    model, ep = tiny(), episode()
    p = problem(model, ep, InnerLoop(steps=2, lr=0.1, optimizer=optimizer), lrs=lambda names, k: rates)
    with pytest.raises(InputError, match=rf"inner_lrs returned {len(rates)} rate\(s\) at step 0 for 10 adapted weights"):
        p.unroll(p.leaves(), tape=False, create_graph=False)


@pytest.mark.parametrize("head_init,adapt", [("learned", "all"), ("proto", "all"), ("proto", "head")])
def test_first_order_rule_equals_the_query_gradient_at_the_adapted_weights(head_init, adapt):
    """Detached inner gradients on the tape give exactly the first-order meta-gradient."""
    model = tiny(None if head_init != "learned" else 3)
    ep = episode(seed=1)
    inner = InnerLoop(steps=2, lr=0.3, head_init=head_init, adapt=adapt)
    model.zero_grad()
    p = problem(model, ep, inner)
    FirstOrder().backward(p, lambda a: ((task_loss(a(ep.query_x[None])[0], ep.query_y))[None], a(ep.query_x[None])), 1.0)
    ours = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    # reference: leaves at the adapted weights, query gradient pushed into the initial weights
    model.zero_grad()
    p = problem(model, ep, inner)
    adapted = p.unroll(p.leaves(), tape=False, create_graph=False)
    leaves = [q.detach().requires_grad_() for q in adapted.params]
    adapted.trajectory[-1] = leaves
    task_loss(adapted(ep.query_x[None])[0], ep.query_y).backward()
    p.push([q.grad for q in leaves])
    ref = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_learned_rates_and_step_tensors_are_asked_for_with_model_names_and_explicit_steps():
    model, ep = tiny(None), episode()
    calls = []

    def lrs(names, step):
        calls.append((list(names), step))
        return [torch.tensor(0.1 * (step + 1))] * len(names)

    seen = []

    def tensors(step, training):
        seen.append(step)
        return {}

    p = problem(model, ep, InnerLoop(steps=2, lr=5.0, head_init="zero", adapt="head"), lrs=lrs, tensors=tensors)
    a = p.unroll(p.leaves(), tape=False, create_graph=False)
    assert calls == [(["head.weight", "head.bias"], 0), (["head.weight", "head.bias"], 1)]
    seen.clear()
    a(ep.query_x[None])
    assert seen == [2]  # the forward pass of the weights after 2 updates asks for step 2's tensors
    # the rate replaced lr=5: a zero head after one step of lr 0.1 is -0.1 * grad
    feats = model.trunk(ep.support_x).detach()
    w = torch.zeros(3, feats.shape[1], requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(feats, w, b), ep.support_y), [w, b])
    torch.testing.assert_close(a.trajectory[1][0][0], -0.1 * gw)
    torch.testing.assert_close(a.trajectory[1][1][0], -0.1 * gb)


def test_step_norms_hand_over_set_k_and_track_running_statistics():
    model = tiny(None)
    layers = list(model.trunk.modules())
    layer = next(m for m in layers if isinstance(m, EpisodicBatchNorm))
    norms = StepNorms(model, sets=3, momentum=0.5)
    norms.bind(tiny(None))  # same architecture: fine
    with pytest.raises(ConfigError, match="channels"):
        norms.bind(build_model("conv4", in_channels=1, hidden=5, image_size=8, blocks=2, out_features=None))
    norms.bind(model)
    with torch.no_grad():
        norms.weight[0][2].fill_(2.0)
        norms.bias[0][2].fill_(-1.0)
    x = torch.randn(6, 4, 8, 8)
    plain = layer(x)
    handed = norms.tensors(5, training=True)  # clamped to the last set
    own = {k[len("trunk.blocks.0.1."):]: v for k, v in handed.items() if k.startswith("trunk.blocks.0.1.")}
    assert sorted(own) == ["bias", "running_mean", "running_var", "weight"]
    out = torch.func.functional_call(layer, own, (x,))
    torch.testing.assert_close(out, 2.0 * plain - 1.0)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(norms.running_mean_0[2], 0.5 * mean)
    torch.testing.assert_close(norms.running_var_0[2], 0.5 + 0.5 * var)
    assert torch.equal(norms.running_mean_0[:2], torch.zeros(2, 4))
    layer.eval()
    own = {k[len("trunk.blocks.0.1."):]: v for k, v in norms.tensors(2, training=False).items()
           if k.startswith("trunk.blocks.0.1.")}
    ev = torch.func.functional_call(layer, own, (x[:1],))
    rm, rv = norms.running_mean_0[2], norms.running_var_0[2]
    expected = (x[:1] - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + layer.eps) * 2.0 - 1.0
    torch.testing.assert_close(ev, expected)
    norms.eval_stats = "batch"  # eval mode with batch statistics: no running statistics handed over
    assert not any("running" in k for k in norms.tensors(2, training=False))
    # without anything handed over, the layer is untouched
    layer.train()
    torch.testing.assert_close(layer(x), plain)


def test_an_inner_loop_object_gets_the_algorithms_fixed_settings_or_a_config_error():
    from metamtl.algorithms import ANIL, FOMAML, IMAML, Reptile, Transfer, build_algorithm
    fomaml = FOMAML(InnerLoop(steps=1))
    assert fomaml.inner.first_order and fomaml.meta_gradient(0).name == "first_order"
    imaml = IMAML(InnerLoop(steps=1, lr=0.2))
    assert imaml.inner.memory == "implicit" and imaml.meta_gradient(0).name == "implicit" and imaml.inner.lr == 0.2
    assert Reptile(InnerLoop(steps=2)).inner.first_order
    transfer = Transfer(InnerLoop(steps=3, head_init="zero"), num_classes=5)
    assert transfer.inner.adapt == "head" and transfer.inner.first_order and transfer.inner.steps == 3
    inner = InnerLoop(steps=2, head_init="zero")
    inner.loss_terms.append(lambda ctx: None)
    anil = ANIL(inner)
    assert anil.inner.adapt == "head" and anil.inner.head_init == "zero" and anil.inner.loss_terms == inner.loss_terms
    assert build_algorithm(**anil.config()).config() == anil.config()  # the config round trip holds
    assert ANIL(InnerLoop(adapt="head")).inner.adapt == "head"
    for alg, inner, clash in [(FOMAML, InnerLoop(first_order=False), "first_order"),
                              (ANIL, InnerLoop(steps=1, adapt="all"), "adapt"),
                              (IMAML, InnerLoop(memory="checkpoint"), "memory")]:
        with pytest.raises(ConfigError, match=rf"fixes .*the InnerLoop passed sets \{{'{clash}'"):
            alg(inner)


def test_keyword_settings_that_contradict_an_algorithms_fixed_ones_are_refused_not_replaced():
    """ANIL(adapt="all") adapted only the head, FOMAML(first_order=False) ran first order, IMAML(memory=
    "full") ran implicit, Transfer(adapt="all") head-only: the class silently replaced the keyword that
    build_algorithm and an explicit InnerLoop refuse."""
    from metamtl.algorithms import ANIL, FOMAML, IMAML, Reptile, Transfer

    for make, clash in [(lambda: ANIL(adapt="all"), "adapt"), (lambda: FOMAML(first_order=False), "first_order"),
                        (lambda: Reptile(first_order=False), "first_order"), (lambda: IMAML(memory="full"), "memory"),
                        (lambda: Transfer(num_classes=5, adapt="all"), "adapt")]:
        with pytest.raises(ConfigError, match=rf"fixes .*drop the contradictory setting\(s\) \{{'{clash}'"):
            make()
    assert ANIL(adapt="head").inner.adapt == "head" and FOMAML(first_order=True, steps=2).inner.steps == 2


BAD_DECLARATIONS = {
    "outer_objective": (lambda s, a, qx, qy, it: F.cross_entropy(a(qx)[0], qy[0]),
                        r"outer_objective must return \(objective \[T\], logits\).*got a tensor of shape \[\]"),
    "meta_gradient": (lambda s, it: FirstOrder, r"meta_gradient must return a rule object with backward"),
    "inner_lrs": (lambda s, names, k: 0.1, "inner_lrs must return a list of rates.*returned float"),
    "step_tensors": (lambda s, k, training: None, r"step_tensors must return a dict \{name: tensor\}.*NoneType"),
    "inner_objective": (lambda s, view: 1.0, r"inner_objective must return a tensor of shape \[1\].*got float"),
}


@pytest.mark.parametrize("method", list(BAD_DECLARATIONS))
def test_a_declaration_returning_the_wrong_type_is_an_input_error_naming_it(method):
    from metamtl.algorithms import MAML
    from metamtl.tasks import TaskBatch

    fn, match = BAD_DECLARATIONS[method]
    alg = type("Bad", (MAML,), {"name": "test_bad", method: fn})(steps=1, lr=0.1)
    with pytest.raises(InputError, match=match):
        alg.meta_step(tiny(), TaskBatch([episode()]), 0)
    if method == "meta_gradient":
        alg = type("Bad", (MAML,), {"name": "test_bad", method: lambda s, it: "first_order"})(steps=1, lr=0.1)
        with pytest.raises(InputError, match="got 'first_order'"):
            alg.meta_step(tiny(), TaskBatch([episode()]), 0)


def test_a_rule_without_name_or_second_order_is_an_input_error_in_fit_not_an_attribute_error():
    """A duck-typed rule with only backward() passed the check, then fit's layout key read its
    .name (AttributeError) and the memory planner its .second_order."""
    from metamtl import MetaLearner
    from metamtl.algorithms import MAML

    class Duck:
        def backward(self, problem, outer, weight):
            return FirstOrder().backward(problem, outer, weight)

    alg = type("DuckRule", (MAML,), {"name": "test_duck", "meta_gradient": lambda s, it: Duck()})(steps=1, lr=0.1)
    class Source:
        ways, shots, queries, name = 3, 2, 2, "mine"

        def episode(self, i):
            return episode(seed=i)

    learner = MetaLearner(tiny(), alg, device="cpu")
    with pytest.raises(InputError, match=r"returned a rule without name and second_order.*subclass"):
        learner.fit(Source(), iterations=1, meta_batch_size=1, progress=False)
    ok = type("NamedDuck", (Duck,), {"name": "duck", "second_order": False})
    alg = type("DuckRule2", (MAML,), {"name": "test_duck2", "meta_gradient": lambda s, it: ok()})(steps=1, lr=0.1)
    MetaLearner(tiny(), alg, device="cpu").fit(Source(), iterations=1, meta_batch_size=1, progress=False)
