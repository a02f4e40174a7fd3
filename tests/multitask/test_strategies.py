"""Multi-task strategies against closed forms and independent computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metamtl.errors import ConfigError, InputError
from metamtl.multitask import CAGrad, GradNorm, PCGrad, Uncertainty, apply_strategy, build_strategy

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pcgrad_removes_exactly_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    s = PCGrad(["a", "b"])
    d, w = s.combine(torch.ones(2), torch.stack([g1, g2]), [0, 1])
    # g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5);  g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    torch.testing.assert_close(d, (torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0])) / 2)
    torch.testing.assert_close(w, torch.ones(2))
    assert s.last_metrics["mtl/conflicts"] == 2


def test_pcgrad_leaves_agreeing_gradients_alone_and_projections_are_orthogonal():
    s = PCGrad(["a", "b", "c"])
    g = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 2.0]])  # no conflicts
    d, _ = s.combine(torch.ones(3), g, [0, 1, 2])
    torch.testing.assert_close(d, g.mean(0))
    torch.manual_seed(0)
    g = torch.randn(2, 50)
    g[1] = -g[0] + 0.1 * torch.randn(50)  # strongly conflicting pair
    d, _ = s.combine(torch.ones(2), g, [0, 2])
    p0 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
    p1 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
    torch.testing.assert_close(d, (p0 + p1) / 2)
    assert abs(float(p0 @ g[1])) < 1e-4 and abs(float(p1 @ g[0])) < 1e-4


def test_uncertainty_weights_reach_their_closed_form():
    # Minimising sum_i exp(-s_i) L_i + s_i gives exp(s_i) = L_i, i.e. weights 1 / L_i.
    losses = torch.tensor([0.25, 2.0, 5.0])
    s = Uncertainty(["a", "b", "c"])
    opt = torch.optim.Adam(s.parameters(), lr=0.05)
    grads = torch.eye(3)
    for _ in range(1500):
        opt.zero_grad()
        s.combine(losses, grads, [0, 1, 2])
        opt.step()
    torch.testing.assert_close(s.log_var.detach().exp(), losses, rtol=1e-3, atol=1e-4)
    _, w = s.combine(losses, grads, [0, 1, 2])
    torch.testing.assert_close(w, 1 / losses, rtol=1e-3, atol=1e-4)


def test_uncertainty_gradient_matches_autograd_of_its_objective():
    s = Uncertainty(["a", "b"], init=0.3)
    losses = torch.tensor([0.7, 1.9])
    s.combine(losses, torch.eye(2), [0, 1])
    lv = torch.full((2,), 0.3, requires_grad=True)
    ((torch.exp(-lv) * losses + lv).sum() / 2).backward()
    torch.testing.assert_close(s.log_var.grad, lv.grad)


def test_gradnorm_drives_gradient_norm_ratios_to_their_targets():
    alpha = 1.0
    s = GradNorm(["a", "b", "c"], alpha=alpha)
    grads = torch.diag(torch.tensor([1.0, 4.0, 10.0]))  # gradient norms 1, 4, 10
    s.combine(torch.ones(3), grads, [0, 1, 2])  # records L(0) = 1
    losses = torch.tensor([0.4, 0.8, 1.2])  # task c trains slowest -> should get the largest G
    opt = torch.optim.SGD(s.parameters(), lr=0.002)
    for _ in range(3000):
        opt.zero_grad()
        s.combine(losses, grads, [0, 1, 2])
        opt.step()
    with torch.no_grad():
        s.weight.mul_(3 / s.weight.sum())
    g = s.weight.detach() * torch.tensor([1.0, 4.0, 10.0])
    rate = losses / losses.mean()
    torch.testing.assert_close(g / g.mean(), rate ** alpha, rtol=0.03, atol=0.03)
    assert abs(float(s.weight.sum()) - 3) < 1e-5


def test_dwa_weights_follow_loss_ratios_per_period():
    s = build_strategy({"name": "dwa", "temperature": 2.0, "period": 2}, ["a", "b"])
    g = torch.eye(2)
    for losses in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]):  # two periods
        _, w = s.combine(torch.tensor(losses), g, [0, 1])
        torch.testing.assert_close(w, torch.ones(2))
    _, w = s.combine(torch.tensor([0.5, 1.0]), g, [0, 1])
    r = torch.tensor([0.5, 1.0])
    torch.testing.assert_close(w, 2 * torch.softmax(r / 2.0, 0))


def test_dwa_weights_the_tasks_with_known_ratios_while_another_is_unseen():
    """Before: one task without two seen periods (never in the batch, or a constant loss) kept every
    task at weight 1, permanently if it never appeared."""
    p = torch.nn.Parameter(torch.ones(()))
    weights = {}
    for tasks in (["a", "b", "c"], ["a", "b"]):
        s = build_strategy({"name": "dwa", "period": 1}, tasks)
        for step in range(6):
            m = s.backward({"a": p * 1.0 / (step + 1), "b": p * 2.0}, [p])  # c never has a loss
        weights[len(tasks)] = (m["mtl/weight/a"], m["mtl/weight/b"])
        if len(tasks) == 3:
            assert s.current_weights()[2] == 1.0 and float(s.current_weights().sum()) == pytest.approx(3.0)
    assert weights[3] == pytest.approx(weights[2]) and weights[3][0] < 1.0 < weights[3][1]


@pytest.mark.parametrize("name", ["equal", "pcgrad", "uncertainty"])
def test_backward_given_one_tensor_as_params_is_an_input_error(name):
    """Before: it iterated over the tensor's rows (non-leaf slices), so no gradient was computed and
    only the strategy's own state moved."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(3)
    s = build_strategy(name, ["a", "b"])
    with pytest.raises(InputError, match=r"iterable of parameters, e.g. model.parameters\(\) or \[w\]"):
        s.backward([(w @ x).sum(), (w @ x).pow(2).sum()], w)


@pytest.mark.parametrize("name", ["equal", "pcgrad"])
def test_backward_counts_a_parameter_listed_twice_once(name):
    """Before: each listing got its own gradient, doubling the parameter's."""
    torch.manual_seed(0)
    shared, ha, hb = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
    x = torch.randn(5, 3)

    def losses():
        h = shared(x).mean()
        return {"a": (ha.weight * h).sum(), "b": (hb.weight * h).sum() ** 2}

    params = [*shared.parameters(), *ha.parameters(), *hb.parameters()]
    build_strategy(name, ["a", "b"]).backward(losses(), params)
    once = [p.grad for p in params]
    for p in params:
        p.grad = None
    build_strategy(name, ["a", "b"]).backward(losses(), params + list(shared.parameters()))
    for a, p in zip(once, params):
        assert (a is None and p.grad is None) or torch.allclose(p.grad, a)


def test_cagrad_maximises_the_worst_improvement_within_its_ball():
    torch.manual_seed(1)
    g = torch.randn(3, 8)
    g[1] = -0.8 * g[0] + 0.3 * torch.randn(8)
    c = 0.5
    s = CAGrad(["a", "b", "c"], c=c, rescale=0)
    d, _ = s.combine(torch.ones(3), g, [0, 1, 2])
    g0 = g.mean(0)
    radius = c * g0.norm()
    assert float((d - g0).norm()) == pytest.approx(float(radius), rel=1e-4)
    worst = float((g @ d).min())
    # no direction in the ball does better than d on the worst task (dual optimality)
    u = torch.randn(20000, 8)
    cand = g0 + radius * u / u.norm(dim=1, keepdim=True)
    assert worst >= float((cand @ g.T).min(1).values.max()) - 1e-4
    assert worst > float((g @ g0).min())  # better than the plain average on the worst task


def test_apply_strategy_weights_shared_and_task_specific_parameters():
    trunk = nn.Linear(3, 2)
    heads = nn.ModuleList([nn.Linear(2, 1), nn.Linear(2, 1)])
    x = torch.randn(5, 3)
    losses = [heads[i](trunk(x)).pow(2).mean() * (i + 1) for i in range(2)]
    params = list(trunk.parameters()) + list(heads.parameters())
    s = Uncertainty(["a", "b"], init=math.log(2.0))  # weights 1/2
    s.backward(losses, params)
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.autograd.backward([(0.5 * losses[0] + 0.5 * losses[1]) / 2])
    for r, p in zip(ref, params):
        torch.testing.assert_close(r, p.grad)


def test_ordinary_multitask_training_with_two_heads_learns_both_tasks():
    """Strategies work outside meta-learning: a shared trunk with two regression heads."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    ya, yb = x[:, :1] * 2.0, 10.0 * (x[:, 1:2] - x[:, 2:3])  # very different loss scales
    for name in ("equal", "uncertainty", "gradnorm", "dwa", "pcgrad", "cagrad"):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 32), nn.ReLU())
        heads = nn.ModuleDict({"a": nn.Linear(32, 1), "b": nn.Linear(32, 1)})
        strategy = build_strategy(name, ["a", "b"])
        opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters(), *strategy.parameters()], lr=0.01)
        params = [*trunk.parameters(), *heads.parameters()]
        for _ in range(300):
            h = trunk(x)
            losses = {"a": (heads["a"](h) - ya).pow(2).mean(), "b": (heads["b"](h) - yb).pow(2).mean()}
            opt.zero_grad()
            metrics = strategy.backward(losses, params)
            opt.step()
        assert losses["a"] < 0.1 * ya.var() and losses["b"] < 0.1 * yb.var(), (name, losses)
        assert "mtl/weight/a" in metrics


def test_grad_cosine_is_over_the_tasks_with_a_gradient():
    """Before: a task with no gradient (a constant loss) counted as cosine 0 with every other task
    (0.333 here instead of 1)."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    s = build_strategy("equal", ["a", "b", "c"])
    e = torch.tensor([1.0, 0.0])
    m = s.backward({"a": (p * e).sum(), "b": (p * e).sum(), "c": 0.0}, [p])
    assert m["mtl/grad_cosine"] == pytest.approx(1.0)
    assert "mtl/grad_cosine" not in s.backward({"a": (p * e).sum(), "c": 0.0}, [p])


@pytest.mark.parametrize("name", [["pcgrad"], {"a": 1}, 3])
def test_a_strategy_name_that_is_no_string_is_a_config_error(name):
    """Before: a bare TypeError (unhashable type: 'list')."""
    with pytest.raises(ConfigError, match=r"strategy name is a string \(one of cagrad, dwa, .*got"):
        build_strategy({"name": name}, ["a", "b"])


@pytest.mark.parametrize("name", ["pcgrad", "cagrad"])
def test_strategies_combine_in_full_precision_under_autocast(name):
    """Before: inside the learner's bf16 autocast, PCGrad's and CAGrad's dot products ran in bfloat16
    (relative error ~1e-3 on conflicting gradients)."""
    torch.manual_seed(0)
    g1 = torch.randn(20000)
    g2 = -0.5 * g1 + torch.randn(20000)
    p = torch.nn.Parameter(torch.zeros(20000))

    def combined(autocast):
        p.grad = None
        losses = {"a": p @ g1, "b": p @ g2}  # fp32 gradients; only the combination runs under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            build_strategy(name, ["a", "b"]).backward(losses, [p])
        return p.grad.clone()

    torch.manual_seed(1)
    reference = combined(False)
    torch.manual_seed(1)
    got = combined(True)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match="unknown multi-task strategy 'pcgard'.*pcgrad"):
        build_strategy("pcgard", ["a"])
    with pytest.raises(ConfigError, match=r"strategy .gradnorm. does not take \[.beta.\]. It accepts \[.alpha.\]"):
        build_strategy({"name": "gradnorm", "beta": 1}, ["a"])
    with pytest.raises(ConfigError, match="distinct"):
        build_strategy("equal", ["a", "a"])
    s = build_strategy("equal", ["a", "b"])
    with pytest.raises(InputError, match="not one of"):
        apply_strategy(s, torch.ones(1), [[torch.ones(1)]], [torch.ones(1, requires_grad=True)], ["c"])
    with pytest.raises(InputError, match="one per task"):
        s.backward([torch.ones((), requires_grad=True)], [torch.ones(1, requires_grad=True)])


def test_cagrad_two_task_solver_matches_the_general_solver():
    torch.manual_seed(3)
    g = torch.randn(2, 6)
    g[1] = -0.5 * g[0] + 0.5 * torch.randn(6)
    s = CAGrad(["a", "b"], c=0.6)
    gram = (g @ g.T).double()
    w2 = s.simplex_weights(gram)
    # brute force on a fine grid of the simplex
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    W = torch.stack([t, 1 - t], 1)
    radius = 0.6 * gram.mean().sqrt()
    f = W @ gram.mean(1) + radius * torch.sqrt((W @ gram * W).sum(1))
    torch.testing.assert_close(w2, W[f.argmin()], atol=1e-3, rtol=0)


def test_dwa_loads_state_saved_with_the_old_nan_marker():
    s = build_strategy({"name": "dwa", "period": 2}, ["a", "b"])
    old = {k: v.clone() for k, v in s.state_dict().items()}
    old["history"] = torch.tensor([[float("nan")] * 2, [0.7, 0.4]], dtype=torch.float64)
    s.load_state_dict(old)
    assert torch.isfinite(s.history).all()  # the meta-step's buffer check would skip every step
    torch.testing.assert_close(s.current_weights(), torch.ones(2, dtype=torch.float64))  # one period seen


@pytest.mark.parametrize("name", sorted(__import__("metamtl.multitask.strategies", fromlist=["STRATEGIES"]).STRATEGIES))
def test_a_constant_task_loss_contributes_no_gradient(name):
    """A task loss without a graph (e.g. a task with no labelled example in this batch) is a task
    that uses no parameter: the other task's gradient trains the model, as if it were alone."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    strategy = build_strategy(name, ["depth", "segmentation"])
    metrics = strategy.backward({"depth": model(x).pow(2).mean(), "segmentation": torch.zeros(())},
                                model.parameters())
    assert {"mtl/weight/depth", "mtl/weight/segmentation"} <= set(metrics)
    alone = nn.Linear(3, 2)
    alone.load_state_dict(model.state_dict())
    alone.zero_grad()
    alone(x).pow(2).mean().backward()
    scale = metrics["mtl/weight/depth"] / 2  # weight / number of tasks, as for a task's own parameters
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad * scale)
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "dwa"])
def test_a_constant_task_loss_leaves_the_strategy_state_of_that_task_alone(name):
    """A graph-less loss is an absent task: uncertainty's log-variance gets no gradient (it grew
    without bound on loss 0), GradNorm's weight stays, DWA's period mean is over real losses only."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    strategy = build_strategy({"name": name, "period": 3} if name == "dwa" else name, ["a", "b"])
    first_b = model(x).sum().pow(2)
    strategy.backward({"a": model(x).pow(2).mean(), "b": first_b}, model.parameters())
    strategy.zero_grad()
    for _ in range(2):
        strategy.backward({"a": model(x).pow(2).mean(), "b": torch.zeros(())}, model.parameters())
    for p in strategy.parameters():
        assert p.grad is not None and p.grad[1] == 0
    if name == "uncertainty":
        assert strategy.log_var.grad[0] != 0
    if name == "gradnorm":
        assert float(strategy.initial_loss[1]) == pytest.approx(float(first_b))
    if name == "dwa":
        assert float(strategy.history[1, 1]) == pytest.approx(float(first_b))  # not a third of it


@pytest.mark.parametrize("spec,message", [
    ({"name": "uncertainty", "init": "abc"}, "uncertainty init must be a finite number, got 'abc'"),
    ({"name": "uncertainty", "init": float("nan")}, "uncertainty init must be a finite number, got nan"),
    ({"name": "dwa", "period": "x"}, "dwa period must be an integer >= 1, got 'x'"),
    ({"name": "dwa", "temperature": 0}, "dwa temperature must be a finite number > 0, got 0"),
    ({"name": "cagrad", "iterations": "many"}, "cagrad iterations must be an integer >= 1, got 'many'"),
    ({"name": "cagrad", "iterations": 0}, "cagrad iterations must be an integer >= 1, got 0"),
    ({"name": "gradnorm", "alpha": -1}, "gradnorm alpha must be a finite number >= 0, got -1"),
])
def test_bad_strategy_settings_are_config_errors_saying_what_they_must_be(spec, message):
    """Strings gave bare ValueErrors; a NaN init poisoned the weights and 0 solver steps silently
    turned CAGrad into plain averaging."""
    with pytest.raises(ConfigError, match=message):
        build_strategy(spec, ["a", "b"])
    assert build_strategy({"name": "cagrad", "iterations": 1}, ["a", "b"]).iterations == 1


def test_backward_refuses_no_losses_and_takes_a_number_as_a_constant_loss():
    """An empty dict gave torch's bare 'stack expects a non-empty TensorList', a float loss an
    AttributeError; a number is now a graph-less loss like torch.zeros(())."""
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    s = build_strategy("equal", ["a", "b"])
    with pytest.raises(InputError, match="no task losses"):
        s.backward({}, [p])
    with pytest.raises(InputError, match="scalar tensor .* got str for task 'b'"):
        s.backward({"a": p.sum(), "b": "0"}, [p])
    with pytest.raises(InputError, match=r"got shape \[2\] for task 'a'"):
        s.backward([p * 1, 0.0], [p])
    for losses in ({"a": (p ** 2).sum(), "b": 0.0}, [(p ** 2).sum(), 0]):
        p.grad = None
        s.backward(losses, [p])
        torch.testing.assert_close(p.grad, p.detach())  # 2p / 2 tasks: b contributes nothing


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "gradnorm", "equal"])
def test_a_gradient_strategy_with_no_shared_parameter_warns_once(name):
    """Two heads and no shared trunk (as with sharing: soft and per-task heads): pcgrad, cagrad and
    gradnorm have nothing to act on and silently trained like equal."""
    import warnings

    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    x = torch.randn(4, 3)
    s = build_strategy(name, ["a", "b"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            s.backward({"a": a(x).pow(2).mean(), "b": b(x).pow(2).mean()}, [*a.parameters(), *b.parameters()])
        s.backward({"a": a(x).pow(2).mean(), "b": torch.zeros(())}, [*a.parameters(), *b.parameters()])
    found = [w for w in caught if "no parameter shared" in str(w.message)]
    assert len(found) == (name != "equal")
    if found:
        assert found[0].category is RuntimeWarning and "model.sharing: hard" in str(found[0].message)


def test_gradnorm_refuses_a_negative_task_loss_before_changing_its_state():
    """A negative loss was re-recorded as 'first loss' every step (0 marks 'not seen'), giving rates
    of about -1e12, NaN targets and a frozen weight."""
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    s = build_strategy("gradnorm", ["a", "b"])
    with torch.no_grad():
        s.weight.copy_(torch.tensor([0.5, 3.0]))
    with pytest.raises(InputError, match="gradnorm needs task losses >= 0.*got -1 for task 'b'"):
        s.backward({"a": (p ** 2).sum(), "b": p.sum() - 4.0}, [p])
    assert s.weight.tolist() == [0.5, 3.0] and s.weight.grad is None and s.initial_loss.tolist() == [0, 0]


def test_backward_with_no_trainable_parameter_is_an_input_error():
    """A frozen model (or an empty list) gave torch's bare 'inputs argument to grad() cannot be empty'."""
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    live = torch.ones((), requires_grad=True)
    s = build_strategy("equal", ["a", "b"])
    for params in ([frozen], []):
        with pytest.raises(InputError, match="no parameter that requires grad"):
            s.backward([(frozen * 2).sum() * live, (frozen * 3).sum() * live], params)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "dwa"])
def test_a_non_finite_task_loss_is_absent_from_the_strategy_state(name, bad):
    """One inf loss (an fp16 overflow whose step is skipped) became GradNorm's initial loss for good
    (task a's weight pushed to the clamp, or frozen for NaN), and gave DWA NaN weights a period later."""
    x = nn.Parameter(torch.tensor([1.0, 2.0]))
    s = build_strategy({"name": name, "period": 1} if name == "dwa" else name, ["a", "b"])

    def step(scale_a):
        x.grad = None
        s.zero_grad()
        return s.backward({"a": scale_a * x[0] ** 2, "b": x.sum() ** 2}, [x])

    step(1.0)
    step(bad)
    for p in s.parameters():
        assert p.grad[0] == 0 and torch.isfinite(p.grad).all()
    if name == "gradnorm":
        assert s.initial_loss.tolist() == [1.0, 9.0]
    metrics = step(1.0)
    assert torch.isfinite(x.grad).all() and all(math.isfinite(v) for v in metrics.values())
    for p in s.parameters():
        assert torch.isfinite(p.grad).all()
    if name == "gradnorm":  # as if the bad step had not happened
        reference = build_strategy(name, ["a", "b"])
        for _ in range(2):
            reference.zero_grad()
            reference.backward({"a": x[0] ** 2, "b": x.sum() ** 2}, [x])
        torch.testing.assert_close(s.weight.grad, reference.weight.grad)
    if name == "dwa":
        assert torch.isfinite(s.history).all() and torch.isfinite(s.current_weights()).all()


def test_build_strategy_takes_settings_as_keywords_as_its_module_docstring_shows():
    """build_strategy("dwa", tasks, period=5) was a bare TypeError."""
    assert build_strategy("dwa", ["a", "b"], period=5).config() == build_strategy({"name": "dwa", "period": 5},
                                                                                 ["a", "b"]).config()
    with pytest.raises(ConfigError, match=r"multi-task strategy 'dwa' does not take \['perod'\]"):
        build_strategy("dwa", ["a", "b"], perod=5)
    with pytest.raises(ConfigError, match=r"keyword settings \['period'\] only with a strategy name, got a dict"):
        build_strategy({"name": "dwa"}, ["a", "b"], period=5)
    with pytest.raises(ConfigError, match=r"strategy name twice \('dwa' and name='pcgrad'\)"):
        build_strategy("dwa", ["a", "b"], name="pcgrad")  # was silently PCGrad


def test_cagrad_reports_no_stale_weights_when_fewer_than_two_tasks_take_part():
    """A step of one live task returned the mtl/cagrad_w/* weights of the previous two-task step."""
    torch.manual_seed(0)
    trunk, ha, hb = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    x, params = torch.randn(5, 3), [*trunk.parameters(), *ha.parameters(), *hb.parameters()]
    st = build_strategy("cagrad", ["a", "b"])
    h = trunk(x)
    assert "mtl/cagrad_w/b" in st.backward([ha(h).pow(2).mean(), hb(h).abs().mean()], params)
    h = trunk(x)
    assert not any(k.startswith("mtl/cagrad_w/") for k in st.backward({"a": ha(h).pow(2).mean()}, params))


def test_cagrad_leaves_absent_tasks_out_of_its_solve_and_drops_a_vanishing_gw():
    """A constant task loss kept its zero row in the Gram matrix and took all the weight; the
    vanishing g_w was then normalised, pointing the extra term along the solver's residual."""
    gb, gc = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-0.5, 1.0, 0.3])

    def run(names, extra=None):
        s = build_strategy({"name": "cagrad", "c": 0.4}, names)
        y = nn.Parameter(torch.zeros(3))
        losses = {"b": (gb * y).sum() + 1, "c": (gc * y).sum() + 1}
        metrics = s.backward({**({"a": extra(y)} if extra else {}), **losses}, [y])
        return y.grad, metrics

    live, _ = run(["b", "c"])
    absent, metrics = run(["a", "b", "c"], lambda y: 0.0)  # README: a task with no labels in the batch
    torch.testing.assert_close(absent, live * 2 / 3)  # the live tasks' CAGrad, as a mean over 3 tasks
    assert metrics["mtl/cagrad_w/a"] == 0
    # a task with a graph but a zero gradient: the exact minimiser is g_w = 0, so d = g0 / (1 + c^2)
    zero, _ = run(["a", "b", "c"], lambda y: (0 * y).sum())
    torch.testing.assert_close(zero, (gb + gc) / 3 / 1.16)
