"""``algorithm.memory``: checkpoint equals full, implicit equals iMAML's formula, the planner, errors.

* ``checkpoint`` gives the meta-gradients of ``full`` (1e-6, float64) for every second-order
  algorithm: MAML with learned / proto / zero heads, ANIL, Meta-SGD's learned rates, MAML++ with
  per-step BatchNorm and the multi-step loss, Adam and momentum inner optimizers, multi-task, and
  distillation loss terms, one task per call and three per ``vmap`` call;
* ``implicit`` (``imaml``) equals ``(I + H/lam)^{-1} g`` computed with the explicit Hessian of a
  reference proximal inner loop written with ``torch.func`` (no metamtl code);
* the planner picks full / checkpoint / implicit and the task chunk against the budget, and says
  why; bad settings are clear errors.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.distill import FeatureDistillation, SoftTargets
from metamtl.errors import ConfigError
from metamtl.experiment import memory_summary
from metamtl.memory import Footprint, estimate_mb, graph_mb, plan_memory
from metamtl.models import TrunkHead, build_model
from metamtl.tasks import Episode, TaskBatch

pytestmark = pytest.mark.usefixtures("float64", "single_thread")


def conv4(out_features):
    torch.manual_seed(0)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=out_features)


def episode(seed, ways=3, shots=2, queries=2, dataset=""):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(ways * (shots + queries), 1, 8, 8, generator=g)
    labels = torch.arange(ways)
    return Episode(images[: ways * shots], labels.repeat_interleave(shots), images[ways * shots:],
                   labels.repeat_interleave(queries), ways, shots, queries, dataset=dataset)


def meta_gradients(name, memory, batch, iteration=0, chunk=0, terms=None, **settings):
    per_task_head = settings.get("head_init", "learned") != "learned"
    model = conv4(None if per_task_head else 3)
    if name == "multitask":
        alg = build_algorithm("multitask", base={**settings.pop("base"), "memory": memory, "task_chunk": chunk},
                              **settings)
    else:
        alg = build_algorithm(name, memory=memory, task_chunk=chunk, **settings)
    alg.setup(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # learned rates away from their common start
        for n, p in alg.named_parameters():
            if "lrs" in n:
                p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=g))
    extra = []
    for term in (terms() if terms else []):
        term.bind(model)
        alg.inner.loss_terms.append(term)
        extra += [(f"term.{n}", p) for n, p in term.named_parameters()]
    model.train()
    model.zero_grad()
    metrics = alg.meta_step(model, batch, iteration)
    params = list(model.named_parameters()) + list(alg.named_parameters()) + extra
    return {n: p.grad.clone() for n, p in params if p.grad is not None}, metrics


def distillation():
    torch.manual_seed(5)
    teacher = build_model("conv4", in_channels=1, hidden=5, image_size=8, blocks=2, out_features=3)
    return [SoftTargets(teacher, temperature=2.0, weight=0.5, phases=("support", "query")),
            FeatureDistillation(teacher, "trunk.blocks.1", "trunk.blocks.1", weight=0.3, phases=("support", "query"))]


CASES = [
    ("maml", dict(steps=3, lr=0.3)),
    ("maml", dict(steps=2, lr=0.3, head_init="proto")),
    ("maml", dict(steps=2, lr=0.2, head_init="zero", bn_stats="support")),
    ("maml", dict(steps=3, lr=0.05, optimizer="adam")),
    ("maml", dict(steps=3, lr=0.1, optimizer="nesterov")),
    ("anil", dict(steps=3, lr=0.5)),
    ("anil", dict(steps=2, lr=0.3, head_init="proto")),
    ("metasgd", dict(steps=2, lr=0.2)),
    ("mamlpp", dict(steps=3, lr=0.1, first_order_iterations=1, multi_step_iterations=10, iteration=4)),
    ("mamlpp", dict(steps=2, lr=0.1, head_init="zero", bn_eval="batch", iteration=2, first_order_iterations=0)),
    ("multitask", dict(strategy="pcgrad", datasets=["a", "b"], base=dict(name="maml", steps=2, lr=0.3))),
    ("maml", dict(steps=2, lr=0.3, terms=distillation)),
]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_checkpoint_gives_the_full_meta_gradient(name, settings):
    settings = dict(settings)
    iteration = settings.pop("iteration", 0)
    datasets = "ab" if name == "multitask" else ""
    batch = TaskBatch([episode(s, dataset=datasets[s % 2] if datasets else "") for s in range(4 if datasets else 3)])
    base = settings.get("base")
    full, full_metrics = meta_gradients(name, "full", batch, iteration,
                                        **{**settings, **({"base": dict(base)} if base else {})})
    assert full and max(float(g.abs().max()) for g in full.values()) > 1e-4
    chunks = [1] if name == "multitask" or "terms" in settings else [1, 3]
    for chunk in chunks:
        torch.manual_seed(3)  # PCGrad's random order
        ours, metrics = meta_gradients(name, "checkpoint", batch, iteration, chunk,
                                       **{**settings, **({"base": dict(base)} if base else {})})
        assert sorted(ours) == sorted(full)
        for n in full:
            torch.testing.assert_close(ours[n], full[n], rtol=1e-6, atol=1e-9, msg=n)
        assert metrics == pytest.approx(full_metrics, rel=1e-6)


def test_implicit_meta_gradient_is_imamls_formula_against_an_explicit_hessian():
    """iMAML on a small regression MLP: metamtl's meta-gradient equals ``(I + H/lam)^{-1} g``
    with the explicit Hessian ``H`` of the support loss at the adapted weights of a reference
    proximal inner loop (torch.func + autograd only), one task after the other."""
    lam, lr, steps = 2.0, 0.05, 30
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[6], out_features=1)
    names = [n for n, _ in model.named_parameters()]
    numel = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    episodes = []
    for _ in range(2):
        x = torch.rand(16, 1, generator=g) * 6 - 3
        y = 2 * torch.sin(x + torch.rand(1, generator=g))
        episodes.append(Episode(x[:8], y[:8], x[8:], y[8:], ways=1, shots=8, queries=8, task="regression"))
    alg = build_algorithm("imaml", steps=steps, lr=lr, lam=lam, cg_steps=numel)  # CG exact in numel steps
    model.zero_grad()
    alg.meta_step(model, TaskBatch(episodes))
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, p in model.named_parameters():
            out[n] = v[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return out

    def loss(v, x, y):
        return F.mse_loss(functional_call(model, unflat(v), (x,)), y)

    reference = torch.zeros(numel)
    for ep in episodes:
        w = theta.clone()
        for _ in range(steps):  # gradient descent on the proximal objective
            w = w.requires_grad_()
            (grad,) = torch.autograd.grad(loss(w, ep.support_x, ep.support_y) + lam / 2 * (w - theta).pow(2).sum(), w)
            w = (w - lr * grad).detach()
        hessian = torch.autograd.functional.hessian(lambda v: loss(v, ep.support_x, ep.support_y), w)
        query_grad = torch.autograd.functional.jacobian(lambda v: loss(v, ep.query_x, ep.query_y), w)
        reference += torch.linalg.solve(torch.eye(numel) + hessian / lam, query_grad) / len(episodes)
    assert len(names) == 4 and float(reference.abs().max()) > 1e-3
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)


def implicit_reference(model, episodes, adapt, steps, lr, lam):
    """iMAML's meta-gradient for the trunk of a proto-head conv model, by the implicit function
    theorem with explicit Jacobians (torch.func + autograd, no metamtl code): with the proximal
    objective ``O(phi, theta)`` (anchor: the trunk and the prototype head computed from ``theta``;
    head-only: the prototype head, support features from ``theta``) and the query loss ``Lq``,
    ``dLq/dtheta = dLq/dtheta|_phi - (d2O/dphi dtheta)^T (d2O/dphi2)^{-1} dLq/dphi`` per task."""
    trunk = model.trunk
    shapes = {n: p.shape for n, p in trunk.named_parameters()}
    theta = torch.cat([p.detach().flatten() for p in trunk.parameters()])

    def unflat(v):
        out, i = {}, 0
        for n, s in shapes.items():
            out[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def features(th, x):
        return functional_call(trunk, unflat(th), (x,)).flatten(1)

    reference = torch.zeros_like(theta)
    for ep in episodes:
        ways, sx, sy, qx, qy = ep.ways, ep.support_x, ep.support_y, ep.query_x, ep.query_y

        def anchor(th):
            f = features(th, sx)
            protos = torch.stack([f[sy == c].mean(0) for c in range(ways)])
            head = torch.cat([2 * protos.flatten(), -(protos * protos).sum(1)])
            return torch.cat([th, head]) if adapt == "all" else head

        def loss(phi, th, x, y):
            body, head = (phi[:theta.numel()], phi[theta.numel():]) if adapt == "all" else (th, phi)
            d = head.numel() // ways - 1
            return F.cross_entropy(features(body, x) @ head[:ways * d].view(ways, d).T + head[ways * d:], y)

        def inner(phi, th):
            return loss(phi, th, sx, sy) + lam / 2 * (phi - anchor(th)).pow(2).sum()

        phi = anchor(theta).detach()
        for _ in range(steps):  # gradient descent on the proximal objective
            phi = phi.requires_grad_()
            (grad,) = torch.autograd.grad(inner(phi, theta), phi)
            phi = (phi - lr * grad).detach()
        hessian = torch.autograd.functional.hessian(lambda v: inner(v, theta), phi)
        mixed = torch.autograd.functional.jacobian(  # d/dtheta of dO/dphi: [phi, theta]
            lambda th: torch.autograd.grad(inner(phi.requires_grad_(), th), phi, create_graph=True)[0], theta)
        g_phi, g_theta = torch.autograd.functional.jacobian(lambda v, th: loss(v, th, qx, qy), (phi, theta))
        reference += (g_theta - mixed.T @ torch.linalg.solve(hessian, g_phi)) / len(episodes)
    return reference


@pytest.mark.parametrize("adapt", ["all", "head"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_implicit_meta_gradient_reaches_the_trunk_through_the_proto_head_and_features(adapt, chunk):
    """iMAML with a prototype head (its anchor computed from trunk features) and ANIL-style
    head-only adaptation (the support features are the context): the trunk's meta-gradient equals
    the implicit-function-theorem reference computed with explicit Jacobians; one task per call and
    two per ``vmap`` call.  (Catches a backward that drops the anchor's or the context's gradient.)"""
    lam, lr, steps = 2.0, 0.3, 4
    model = conv4(None)
    episodes = [episode(s) for s in range(2)]
    numel = sum(p.numel() for p in model.parameters()) * (adapt == "all") + 3 * (model.num_features + 1)
    alg = build_algorithm("imaml", adapt=adapt, head_init="proto", steps=steps, lr=lr, lam=lam, cg_steps=numel,
                          task_chunk=chunk)
    model.train()
    model.zero_grad()
    alg.meta_step(model, TaskBatch(episodes))
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = implicit_reference(model, episodes, adapt, steps, lr, lam)
    assert float(reference.abs().max()) > 1e-3
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)


def test_imaml_is_maml_with_implicit_memory_and_adapts_with_the_proximal_objective():
    batch = TaskBatch([episode(s) for s in range(2)])
    a, _ = meta_gradients("imaml", "implicit", batch, steps=3, lr=0.3, lam=0.5)
    b, _ = meta_gradients("maml", "implicit", batch, steps=3, lr=0.3, lam=0.5)
    c, _ = meta_gradients("maml", "full", batch, steps=3, lr=0.3)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    assert any(not torch.allclose(a[n], c[n], atol=1e-4) for n in a)  # a different meta-objective
    alg = build_algorithm("imaml", steps=3, lr=0.3, lam=0.5)
    assert build_algorithm(**alg.config()).config() == alg.config()
    model, ep = conv4(3), episode(5)
    adapted = alg.adapt(model, ep.support_x, ep.support_y, 3)
    plain = build_algorithm("maml", steps=3, lr=0.3).adapt(model, ep.support_x, ep.support_y, 3)
    start = [p.detach() for p in model.parameters()]
    dist = [sum(float((p[0].detach() - s).pow(2).sum()) for p, s in zip(a.params, start)) for a in (adapted, plain)]
    assert dist[0] < dist[1]  # the proximal term keeps the adapted weights nearer the start


def test_planner_picks_the_fastest_mode_that_fits_and_says_why():
    fp = Footprint(step_mb=100.0, query_mb=200.0, state_mb=1.0)
    steps, tasks = 25, 4
    full1 = estimate_mb("full", fp, steps, 1)
    assert estimate_mb("full", fp, steps, 4) == pytest.approx(4 * full1)
    assert estimate_mb("checkpoint", fp, 50, 1) < estimate_mb("checkpoint", fp, 50, 2) < full1
    assert estimate_mb("implicit", fp, 5, 1) == estimate_mb("implicit", fp, 50, 1)

    plan = plan_memory(fp, steps, tasks, budget_mb=4 * full1 + 1, preferred_chunk=4)
    assert (plan.mode, plan.chunk) == ("full", 4) and "fastest" in plan.reason
    plan = plan_memory(fp, steps, tasks, budget_mb=2 * full1 + 1, preferred_chunk=4)
    assert (plan.mode, plan.chunk) == ("full", 2)
    plan = plan_memory(fp, steps, tasks, budget_mb=full1 - 1, preferred_chunk=4)
    assert plan.mode == "checkpoint" and "full needs" in plan.reason and plan.estimate_mb <= full1 - 1
    tight = estimate_mb("implicit", fp, steps, 1) + 1
    assert tight < estimate_mb("checkpoint", fp, steps, 1)
    plan = plan_memory(fp, steps, tasks, tight, 1)
    assert plan.mode == "implicit" and plan.estimate_mb <= tight and "checkpoint needs" in plan.reason
    with pytest.raises(ConfigError, match="no memory mode fits"):  # an algorithm without implicit
        plan_memory(fp, steps, tasks, tight, 1, modes=("full", "checkpoint"))
    with pytest.raises(ConfigError, match="no memory mode fits max_memory_mb=10.*Raise max_memory_mb to at least"):
        plan_memory(fp, steps, tasks, 10, 1)


@pytest.mark.parametrize("step_mb", [0.4, 0.11, 25.6, 0.003])
def test_the_advised_max_memory_mb_fits(step_mb):
    fp = Footprint(step_mb=step_mb, query_mb=step_mb / 2, state_mb=step_mb)  # the smallest: implicit 2.4 * 1.5 S
    with pytest.raises(ConfigError, match="Raise max_memory_mb to at least") as err:
        plan_memory(fp, 5, 1, 1e-6, 1)
    advised = float(str(err.value).split("at least ")[1].split(",")[0])
    assert plan_memory(fp, 5, 1, advised, 1).mode == "implicit"  # rounded up, not to the nearest


def test_auto_measures_plans_logs_and_trains(caplog):
    batch = TaskBatch([episode(s) for s in range(3)])
    model = conv4(3)
    probe = build_algorithm("maml", steps=4, lr=0.3)
    fp = probe.memory_footprint(model, batch)
    assert fp.step_mb > 0 and fp.query_mb > 0 and fp.state_mb > 0
    need_full = estimate_mb("full", fp, 4, 1)
    alg = build_algorithm("maml", steps=4, lr=0.3, memory="auto", max_memory_mb=need_full * 0.99)
    with caplog.at_level(logging.INFO, logger="metamtl.memory"):
        alg.meta_step(model, batch)
    assert alg.memory_plan.mode == "checkpoint" and alg.memory_mode == "checkpoint"
    assert "memory plan: checkpoint" in caplog.text and "full needs" in caplog.text
    logged = next(r.getMessage() for r in caplog.records if "memory plan:" in r.getMessage())
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    example = re.search(r"`\[metamtl\] (maml: [^`(]*memory plan: [^`(]*)", readme).group(1)
    numbers = lambda text: re.sub(r"\d[\d.x]*", "N", text)  # noqa: E731 (shapes, sizes, budgets)
    assert numbers(logged).startswith(numbers(example)), "the README's example log line is not what is logged"
    grads_auto = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    build_algorithm("maml", steps=4, lr=0.3).meta_step(model, batch)
    for a, b in zip(grads_auto, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=1e-9)  # checkpoint: the same meta-gradient


def probed(model, episodes, **settings):
    """A planner that has probed every shape of ``episodes`` and their footprints by support size
    (probes are slow: the tests below hand them to the learners they check)."""
    alg = build_algorithm("maml", memory="auto", max_memory_mb=1e9, **settings)
    alg.plan_memory(model, TaskBatch(episodes))
    return alg._footprints, {shape[1][0]: fp for shape, fp in alg._footprints.items()}


def test_auto_plans_every_episode_shape_of_a_mixed_batch_whatever_the_order():
    small, big = episode(0, ways=2, shots=1, queries=1), episode(1, ways=2, shots=8, queries=8)
    model = conv4(None)
    model.train()
    cache, fp = probed(model, [small, big], steps=6, lr=0.1, head_init="zero")  # big probed at position 1
    budget = (estimate_mb("full", fp[16], 6, 1) + estimate_mb("checkpoint", fp[16], 6, 1)) / 2
    assert estimate_mb("full", fp[2], 6, 1) < budget  # small alone: full; big: checkpoint
    for order in ([small, big], [big, small]):
        alg = build_algorithm("maml", steps=6, lr=0.1, head_init="zero", memory="auto", max_memory_mb=budget)
        alg._footprints.update(cache)
        plan = alg.plan_memory(model, TaskBatch(order))
        assert plan.mode == "checkpoint" and plan.estimate_mb <= budget and "full needs" in plan.reason
        assert alg.plan_memory(model, TaskBatch([small, small])).mode == "checkpoint"  # one mode per learner
        assert alg.chunks(TaskBatch([small, big, small]), True, alg.meta_gradient(0)) == [[0], [2], [1]]


def test_auto_keeps_one_meta_objective_once_a_shape_needs_implicit(caplog):
    small = [episode(10 + s, ways=3, shots=1, queries=1, dataset="small") for s in range(2)]
    big = [episode(s, ways=3, shots=6, queries=6, dataset="big") for s in range(2)]
    model = conv4(None)
    model.train()
    settings = dict(name="maml", steps=5, lr=0.1, head_init="zero", optimizer="adam")
    cache, fp = probed(model, small[:1] + big[:1], **{k: v for k, v in settings.items() if k != "name"})
    ck, im = (estimate_mb(m, fp[18], 5, 1) for m in ("checkpoint", "implicit"))
    assert estimate_mb("full", fp[3], 5, 2) < (ck + im) / 2 < ck  # big needs implicit, small fits full
    alg = build_algorithm("multitask", base={**settings, "memory": "auto", "max_memory_mb": (ck + im) / 2},
                          datasets=["small", "big"])
    alg.base._footprints.update(cache)
    with caplog.at_level(logging.INFO, logger="metamtl.memory"):
        alg.meta_step(model, TaskBatch(small), 0)
        assert alg.memory_mode == "full"
        alg.meta_step(model, TaskBatch(small + big), 1)
    assert "memory mode full -> implicit for every episode shape" in caplog.text
    for batch in (small + big, small):  # small is now trained, reported, saved and adapted with iMAML too
        alg.meta_step(model, TaskBatch(batch), 2)
        assert alg.memory_mode == alg.base.memory_mode == "implicit"
        assert memory_summary(MetaLearner(model, alg, device="cpu", channels_last=False))["mode"] == "implicit"
    assert alg.base.memory_planned.tolist()[0] == 2  # implicit, saved with the learner


@pytest.mark.parametrize("settings,match", [
    (dict(name="maml", memory="lazy"), "unknown memory mode 'lazy'"),
    (dict(name="maml", memory="auto"), "set max_memory_mb"),
    (dict(name="maml", memory="auto", max_memory_mb=-5), "max_memory_mb must be"),
    (dict(name="maml", memory="auto", max_memory_mb=True), "max_memory_mb must be a number > 0, got True"),
    (dict(name="imaml", lam=True), "lam .* must be a number > 0, got True"),
    (dict(name="maml", lr=False), "inner lr must be a number > 0, got False"),
    (dict(name="maml", memory="checkpoint", backend="higher"), "needs the core engine"),
    (dict(name="metasgd", memory="implicit"), "cannot use memory 'implicit'"),
    (dict(name="mamlpp", memory="implicit"), "use memory 'checkpoint'"),
    (dict(name="imaml", lam=0), "lam"),
    (dict(name="imaml", cg_steps=0), "cg_steps must be an integer >= 1"),
    (dict(name="imaml", memory="full"), "fixes"),
])
def test_bad_memory_settings_are_clear_errors(settings, match):
    with pytest.raises(ConfigError, match=match):
        build_algorithm(**settings)


@pytest.mark.parametrize("name", ["maml", "anil"])
def test_auto_plans_prototype_heads_in_one_shot_episodes(name):
    # the probe runs on a part of the episode: it must keep a support image of every class
    batch = TaskBatch([episode(s, ways=5, shots=1, queries=5) for s in range(2)])
    auto, _ = meta_gradients(name, "auto", batch, steps=2, lr=0.3, head_init="proto", max_memory_mb=10_000)
    full, _ = meta_gradients(name, "full", batch, steps=2, lr=0.3, head_init="proto")
    assert auto.keys() == full.keys()
    for n in full:
        torch.testing.assert_close(auto[n], full[n], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,head,shots", [("anil", "learned", 8), ("maml", "proto", 2), ("anil", "proto", 4)])
def test_the_footprint_counts_the_support_trunk_pass_and_proto_heads(name, head, shots):
    # head-only adaptation runs the trunk on the support set once, a proto head is built from the
    # support features: that graph lives until the backward in every mode
    batch = TaskBatch([episode(0, ways=3, shots=shots, queries=1)])
    model = conv4(3 if head == "learned" else None)
    model.train()
    alg = build_algorithm(name, steps=3, lr=0.3, head_init=head)
    alg.setup(model)
    fp = alg.memory_footprint(model, batch)
    sx, sy, qx, qy = batch.stack([0])

    def meta_objective():
        problem = alg.problem(model, sx, sy, 3)
        return alg.outer_objective(problem.unroll(problem.leaves(), tape=True, create_graph=True), qx, qy, 0)

    kept, _ = graph_mb(meta_objective, [sx, sy, qx, qy, *model.parameters(), *alg.parameters()])
    assert fp.context_mb > 0
    assert 3 * fp.step_mb + fp.query_mb + fp.context_mb == pytest.approx(kept, rel=0.1)
    assert estimate_mb("implicit", fp, 3, 1) > fp.context_mb * (1 + 1.4)  # in every mode


def test_auto_plans_mamlpp_whose_outer_objective_reads_every_step():
    batch = TaskBatch([episode(s) for s in range(2)])
    settings = dict(steps=3, lr=0.1, first_order_iterations=0, multi_step_iterations=10, iteration=2)
    auto, _ = meta_gradients("mamlpp", "auto", batch, max_memory_mb=10_000, **settings)
    full, _ = meta_gradients("mamlpp", "full", batch, **settings)
    for n in full:
        torch.testing.assert_close(auto[n], full[n], rtol=1e-6, atol=1e-9)


def test_auto_plans_only_second_order_iterations():
    # MAML++'s first-order iterations ignore memory: no probe, no plan, no 'nothing fits' error
    batch = TaskBatch([episode(s) for s in range(2)])
    alg = build_algorithm("mamlpp", steps=3, lr=0.1, first_order_iterations=2, memory="auto", max_memory_mb=1e-4)
    model = conv4(3)
    model.train()
    assert alg.meta_step(model, batch, 0)["loss"] > 0
    assert alg.memory_plan is None
    with pytest.raises(ConfigError, match="no memory mode fits"):  # the second-order ones are planned
        alg.meta_step(model, batch, 2)


class UserTrunk(torch.nn.Module):
    """A user's own trunk with a plain ``nn.BatchNorm2d`` (running statistics in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3 * 4 * 4, 6)
        self.out_features = 6

    def forward(self, x):
        return self.fc(F.avg_pool2d(torch.tanh(self.norm(self.conv(x))), 2).flatten(1))


def running_statistics(name, memory, batch, **settings):
    torch.manual_seed(0)
    model = TrunkHead(UserTrunk(), torch.nn.Linear(6, 3)) if name == "user" else conv4(3)
    alg = build_algorithm("maml" if name == "user" else name, memory=memory, **settings)
    model.train()
    alg.meta_step(model, batch, 1)
    return {n: b.clone() for n, b in [*model.named_buffers(), *alg.named_buffers()]}


@pytest.mark.parametrize("name,settings", [
    ("mamlpp", dict(steps=2, lr=0.1, first_order_iterations=0)),
    ("user", dict(steps=2, lr=0.1)),
], ids=["mamlpp-per-step-bn", "user-batchnorm2d"])
def test_checkpoint_and_the_planner_leave_running_statistics_as_full_does(name, settings):
    batch = TaskBatch([episode(s) for s in range(2)])
    full = running_statistics(name, "full", batch, **settings)
    assert full and any(b.abs().sum() > 0 for n, b in full.items() if "mean" in n)
    for memory in ("checkpoint", "auto"):
        other = running_statistics(name, memory, batch, max_memory_mb=10_000 if memory == "auto" else None,
                                   **settings)
        assert full.keys() <= other.keys()  # auto also saves its plan
        for n in full:
            torch.testing.assert_close(other[n], full[n], rtol=1e-12, atol=1e-12, msg=f"{memory}: {n}")


def test_a_saved_auto_learner_adapts_with_the_planned_mode(tmp_path):
    batch = TaskBatch([episode(s) for s in range(2)])
    model = conv4(3)
    fp = build_algorithm("maml", steps=10, lr=0.3).memory_footprint(model, batch)
    budget = estimate_mb("implicit", fp, 10, 1) * 1.05  # below checkpoint's: the planner picks implicit (iMAML)
    assert budget < estimate_mb("checkpoint", fp, 10, 1)
    alg = build_algorithm("maml", steps=10, lr=0.3, lam=5.0, memory="auto", max_memory_mb=budget)
    alg.meta_step(model, batch)
    assert alg.memory_mode == "implicit"
    learner = MetaLearner(model, alg, device="cpu", channels_last=False)
    learner.model.eval()
    episodes = [episode(s) for s in range(5, 8)]
    before = learner.algorithm.evaluate_episodes(learner.model, episodes)
    loaded = MetaLearner.load(learner.save(tmp_path / "learner.pt"), device="cpu")
    loaded.model.eval()
    assert loaded.algorithm.memory_mode == "implicit"
    assert loaded.algorithm.evaluate_episodes(loaded.model, episodes) == before
    older = build_algorithm(**alg.config())  # a state saved before plans were saved: no plan yet
    older.load_state_dict({k: v for k, v in alg.state_dict().items() if k != "memory_planned"})
    assert older.memory_plan is None and older.memory_mode == "full"


def test_results_report_the_memory_mode_actually_used():
    batch = TaskBatch([episode(0, dataset="a"), episode(1, dataset="b")])
    alg = build_algorithm("multitask", base=dict(name="maml", steps=2, lr=0.3, memory="auto", max_memory_mb=10_000),
                          datasets=["a", "b"])
    model = conv4(3)
    alg.meta_step(model, batch)
    plan = alg.base.memory_plan
    assert alg.memory_plan is plan and alg.memory_mode == plan.mode == "full"
    summary = memory_summary(MetaLearner(model, alg, device="cpu", channels_last=False))
    assert (summary["mode"], summary["plan"]) == (plan.mode, plan.describe())
    for name in ("reptile", "fomaml"):  # first order: no second-order meta-gradient, memory does not apply
        learner = MetaLearner(conv4(3), build_algorithm(name, steps=2, lr=0.3, memory="implicit"), device="cpu",
                              channels_last=False)
        assert memory_summary(learner)["mode"] is None
    # no inner loop at all (ProtoNet refuses a memory setting): results.json said mode 'full'
    protonet = MetaLearner(build_model("conv4", hidden=4, image_size=12, blocks=2, out_features=None),
                           build_algorithm("protonet"), device="cpu", channels_last=False)
    assert memory_summary(protonet) == {"measure": "rss", "mode": None, "plan": None}


def test_implicit_gradient_support_pass_leaves_running_statistics_alone():
    """iMAML's backward evaluates the support objective once more at the solution (for the
    Hessian-vector products); before, that pass folded one extra batch per task chunk into a plain
    nn.BatchNorm2d's running statistics: 10 batches counted against the trajectory's 8."""
    batch = TaskBatch([episode(s) for s in range(2)])
    settings = dict(steps=3, lr=0.1)
    full = running_statistics("user", "full", batch, **settings)
    implicit = running_statistics("user", "implicit", batch, **settings)
    n = "trunk.norm.num_batches_tracked"
    assert int(full[n]) == 8 and int(implicit[n]) == int(full[n])  # per task: 3 support steps + the query pass


class DropoutTrunk(torch.nn.Module):
    """A trunk drawing dropout masks from the global generator: an ``nn.Dropout`` layer, or
    ``F.dropout`` and additive ``torch.randn`` noise in ``forward`` (no random module at all)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.l1 = torch.nn.Linear(64, 8)
        self.l2 = torch.nn.Linear(8, 6)
        self.drop = torch.nn.Identity() if functional else torch.nn.Dropout(0.3)
        self.out_features = 6

    def forward(self, x):
        h = torch.tanh(self.l1(x.flatten(1)))
        if self.functional:
            h = F.dropout(h, 0.3, self.training) + 0.1 * torch.randn_like(h) * self.training
        else:
            h = self.drop(h)
        return F.relu(self.l2(h))


@pytest.mark.parametrize("functional", [False, True], ids=["nn-dropout", "functional-dropout"])
@pytest.mark.parametrize("name,settings", [
    ("maml", dict(steps=2, lr=0.2)),
    ("maml", dict(steps=3, lr=0.2)),
    ("maml", dict(steps=3, lr=0.05, optimizer="adam")),
    ("metasgd", dict(steps=2, lr=0.2)),
], ids=["maml-2", "maml-3", "maml-adam-3", "metasgd-2"])
def test_checkpoint_replays_each_steps_random_numbers(name, settings, functional):
    """The recomputed step draws the dropout masks its forward drew (full's meta-gradient, learned
    rates included), and the global generator ends where full's does."""
    batch = TaskBatch([episode(s) for s in range(2)])

    def run(memory):
        torch.manual_seed(0)
        model = TrunkHead(DropoutTrunk(functional), torch.nn.Linear(6, 3))
        alg = build_algorithm(name, memory=memory, **settings)
        alg.setup(model)
        model.train()
        torch.manual_seed(3)
        alg.meta_step(model, batch, 0)
        params = [*model.named_parameters(), *alg.named_parameters()]
        return {n: p.grad.clone() for n, p in params if p.grad is not None}, torch.get_rng_state()

    full, full_rng = run("full")
    ours, rng = run("checkpoint")
    assert sorted(ours) == sorted(full)
    for n in full:
        torch.testing.assert_close(ours[n], full[n], rtol=1e-6, atol=1e-9, msg=n)
    assert torch.equal(rng, full_rng)


@pytest.mark.parametrize("functional", [False, True], ids=["nn-dropout", "functional-dropout"])
def test_the_auto_probe_leaves_the_random_number_generator_alone(functional):
    """The planner's probe runs the model (dropout, noise) on a fork of the generators: an ``auto``
    run that plans ``full`` is ``full``, bitwise, and a resumed ``auto`` run, which probes again,
    draws the numbers the uninterrupted one drew."""
    batch = TaskBatch([episode(s) for s in range(2)])

    def run(memory):
        torch.manual_seed(0)
        model = TrunkHead(DropoutTrunk(functional), torch.nn.Linear(6, 3))
        alg = build_algorithm("maml", steps=2, lr=0.2, memory=memory,
                              max_memory_mb=10_000 if memory == "auto" else None)
        alg.setup(model)
        model.train()
        torch.manual_seed(3)
        alg.meta_step(model, batch, 0)
        assert alg.memory_mode == "full"
        return {n: p.grad.clone() for n, p in model.named_parameters()}, torch.get_rng_state()

    full, full_rng = run("full")
    auto, auto_rng = run("auto")
    assert torch.equal(auto_rng, full_rng)
    for n in full:
        assert torch.equal(auto[n], full[n]), n


@pytest.mark.parametrize("order", ["big-first", "small-first"])
def test_multitask_auto_reports_the_whole_batchs_plan(order, tmp_path):
    """The per-dataset meta-steps plan their own sub-batches; the multitask learner's plan (its
    ``memory_plan``, results.json, the saved learner) is the batch's: the largest estimate and the
    smallest chunk of its datasets, as its base algorithm planning the same batch, not the last
    dataset's."""
    big = [episode(s, ways=3, shots=8, queries=8, dataset="big") for s in range(2)]
    small = [episode(10 + s, ways=3, shots=1, queries=1, dataset="small") for s in range(3)]
    batch = TaskBatch(big + small if order == "big-first" else small + big)
    base = dict(name="maml", steps=3, lr=0.3, memory="auto", max_memory_mb=10_000, task_chunk=3)
    model = conv4(3)
    model.train()
    expected = build_algorithm(**base).plan_memory(model, batch)
    assert expected.chunk == 2  # the big dataset's 2 tasks; the small one's 3 go in one chunk
    alg = build_algorithm("multitask", base=base, datasets=["big", "small"])
    alg.meta_step(model, batch)
    assert alg.memory_plan == expected
    loaded = build_algorithm(**alg.config())
    loaded.load_state_dict(alg.state_dict())
    assert (loaded.memory_plan.mode, loaded.memory_plan.chunk) == (expected.mode, expected.chunk)
    assert loaded.memory_plan.estimate_mb == pytest.approx(expected.estimate_mb, abs=1e-3)
