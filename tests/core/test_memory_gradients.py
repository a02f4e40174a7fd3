"""The memory-bounded meta-gradients (metamtl.adaptation.gradients) against references.

* checkpointed recomputation == the full unroll (plain autograd with ``create_graph=True``) to 1e-6
  in float64, on a conv model with batch-statistics BatchNorm, with head-only context, a learned
  inner rate closed over, momentum state and losses on intermediate steps;
* implicit (iMAML) == the closed-form derivative of a ridge-regression inner problem, == a direct
  solve with the explicit Hessian on a nonlinear model, == the unrolled derivative of a converged
  solve for the context (trunk) gradient;
* conjugate gradient == ``torch.linalg.solve``, per task when batched;
* what the graph retains after the forward: grows with steps for the full unroll, not for
  checkpointed (beyond one weight copy per step) or implicit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metamtl.adaptation import checkpointed_unroll, conjugate_gradient, implicit_solution
from metamtl.memory import graph_mb
from metamtl.models import build_model


pytestmark = pytest.mark.usefixtures("float64")


def tiny_conv(out_features=3, seed=0):
    torch.manual_seed(seed)
    return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=out_features)


def data(n, seed, ways=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.arange(ways).repeat(n // ways)


def sgd_step(model, names, x, y, lr):
    """One differentiable SGD step on ``model``'s functional form (the Step contract)."""

    def step(state, k, context, create_graph):
        loss = F.cross_entropy(functional_call(model, dict(zip(names, state)), (x,)), y)
        grads = torch.autograd.grad(loss, state, create_graph=create_graph)
        return [p - lr * g for p, g in zip(state, grads)]

    return step


def meta_grads(model, loss_fn):
    model.zero_grad()
    loss_fn().backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=tol, rtol=0), float((x - y).abs().max())


@pytest.mark.parametrize("steps", [1, 4])
def test_checkpointed_equals_full_unroll_conv_batchnorm(steps):
    model = tiny_conv()
    names = [n for n, _ in model.named_parameters()]
    sx, sy = data(6, 0)
    qx, qy = data(9, 1)
    step = sgd_step(model, names, sx, sy, lr=0.3)

    def full():
        state = list(model.parameters())
        for k in range(steps):
            state = step(state, k, [], True)
        return F.cross_entropy(functional_call(model, dict(zip(names, state)), (qx,)), qy)

    def checkpointed():
        final = checkpointed_unroll(step, list(model.parameters()), steps)[-1]
        return F.cross_entropy(functional_call(model, dict(zip(names, final)), (qx,)), qy)

    reference = meta_grads(model, full)
    ours = meta_grads(model, checkpointed)
    assert max(float(r.abs().max()) for r in reference) > 1e-3  # a real gradient, not zeros
    assert_close(ours, reference, 1e-6)


@pytest.mark.parametrize("inside", [True, False], ids=["backward-inside-autocast", "backward-outside-autocast"])
def test_checkpointed_recomputes_under_the_forwards_autocast(inside):
    """A forward under ``torch.autocast`` (bfloat16 on the CPU) and a backward called inside or
    outside it: the recomputation runs in the forward's precision, so the meta-gradient is the
    full unroll's (bitwise), not that of a float32 recomputation."""
    model = tiny_conv().float()
    names = [n for n, _ in model.named_parameters()]
    (sx, sy), (qx, qy) = data(6, 0), data(9, 1)
    step = sgd_step(model, names, sx.float(), sy, lr=0.3)

    def grads(unroll):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            final = unroll(list(model.parameters()))
            loss = F.cross_entropy(functional_call(model, dict(zip(names, final)), (qx.float(),)), qy)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    def full(state):
        for k in range(2):
            state = step(state, k, [], True)
        return state

    reference = grads(full)
    assert_close(grads(lambda state: checkpointed_unroll(step, state, 2)[-1]), reference, 0.0)
    assert not torch.is_autocast_enabled("cpu")


def test_checkpointed_context_learned_rate_momentum_and_every_step_loss():
    """Head-only adaptation on trunk features passed as context, a learned (closed-over) inner
    rate per tensor, heavy-ball momentum in the state, and a loss on every intermediate step."""
    model = tiny_conv()
    rates = torch.nn.Parameter(torch.tensor([0.5, 0.2]))
    sx, sy = data(6, 0)
    qx, qy = data(9, 1)
    steps, beta = 3, 0.7

    def step(state, k, context, create_graph):
        (feats,) = context
        w, b, mw, mb = state
        loss = F.cross_entropy(F.linear(feats, w, b), sy)
        gw, gb = torch.autograd.grad(loss, [w, b], create_graph=create_graph)
        mw, mb = beta * mw + gw, beta * mb + gb
        return [w - rates[0] * mw, b - rates[1] * mb, mw, mb]

    def objective(trajectory, qfeats):
        return sum((k + 1) * F.cross_entropy(F.linear(qfeats, s[0], s[1]), qy) for k, s in enumerate(trajectory[1:]))

    def run(checkpoint):
        feats = model.trunk(sx)
        start = [model.head.weight, model.head.bias, torch.zeros_like(model.head.weight),
                 torch.zeros_like(model.head.bias)]
        if checkpoint:
            trajectory = checkpointed_unroll(step, start, steps, [feats])
        else:
            trajectory = [start]
            for k in range(steps):
                trajectory.append(step(trajectory[-1], k, [feats], True))
        return objective(trajectory, model.trunk(qx))

    def grads(checkpoint):
        model.zero_grad()
        rates.grad = None
        run(checkpoint).backward()
        return [p.grad.clone() for p in model.parameters()] + [rates.grad.clone()]

    reference, ours = grads(False), grads(True)
    assert float(reference[0].abs().max()) > 1e-4 and float(reference[-1].abs().max()) > 1e-4
    assert_close(ours, reference, 1e-6)


def test_conjugate_gradient_matches_direct_solve_per_task():
    g = torch.Generator().manual_seed(0)
    mats = []
    for t in range(3):
        m = torch.randn(6, 6, generator=g)
        mats.append(m @ m.T + (t + 1) * torch.eye(6))
    a = torch.stack(mats)                                     # [T, 6, 6], very different spectra
    b = torch.randn(3, 6, generator=g)
    x = conjugate_gradient(lambda v: [torch.einsum("tij,tj->ti", a, v[0])], [b], steps=6, batched=True)[0]
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    # unbatched: one system over a list of tensors (the [6] vector split into 2 + 4)
    a0, b0 = a[0], b[0]
    split = lambda v: [v[:2], v[2:]]  # noqa: E731
    y = conjugate_gradient(lambda v: split(a0 @ torch.cat(v)), split(b0), steps=6)
    assert torch.allclose(torch.cat(y), torch.linalg.solve(a0, b0), atol=1e-8)


def test_conjugate_gradient_stops_each_indefinite_system_at_non_positive_curvature():
    """Before: CG stepped on through negative curvature (p.Ap < 0, iMAML's I + H/lam with Hessian
    eigenvalues below -lam): the solution blew up as steps grew and depended on which tasks were solved
    together. Now such a system keeps its last positive-curvature iterate (b at the first step), with a
    warning, and a definite system in the same chunk is solved as alone."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    definite = m @ m.T + torch.eye(6)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    indefinite = q @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, -0.5, -4.0])) @ q.T
    a, b = torch.stack([definite, indefinite]), torch.randn(2, 6, generator=g)
    solve = lambda steps: conjugate_gradient(  # noqa: E731
        lambda v: [torch.einsum("tij,tj->ti", a, v[0])], [b], steps=steps, batched=True)[0]
    with pytest.warns(RuntimeWarning, match="not positive definite .* a larger lam"):
        few, many = solve(6), solve(60)
    assert torch.allclose(few[0], torch.linalg.solve(definite, b[0]), atol=1e-8)  # the definite task: exact
    assert torch.equal(few[1], many[1])  # the indefinite one stops: more steps change nothing
    alone = conjugate_gradient(lambda v: [indefinite @ v[0]], [b[1]], steps=60)[0]
    assert torch.equal(alone, many[1]) or torch.allclose(alone, many[1], atol=1e-12)
    negative = -torch.eye(6)  # non-positive curvature at the first step: b itself
    with pytest.warns(RuntimeWarning):
        first = conjugate_gradient(lambda v: [negative @ v[0]], [b[0]], steps=5)[0]
    assert torch.equal(first, b[0])


def ridge_problem(seed=0, n=20, d=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, generator=g), torch.randn(n, d, generator=g),
            torch.randn(n, generator=g))


def test_implicit_equals_closed_form_ridge():
    """Inner: min_w ||Xw - y||^2/n + lam/2 ||w - theta||^2 (closed form); outer: a query loss."""
    x, y, qx, qy = ridge_problem()
    lam, n = 0.5, x.shape[0]
    theta = torch.randn(4, requires_grad=True)

    def objective(phi, anchor, context):
        return ((x @ phi[0] - y) ** 2).mean() + lam / 2 * ((phi[0] - anchor[0]) ** 2).sum()

    def solve(anchor, context):  # plain gradient descent to convergence
        w = anchor[0].clone().requires_grad_()
        for _ in range(2000):
            (grad,) = torch.autograd.grad(objective([w], anchor, context), [w])
            w = (w - 0.2 * grad).detach().requires_grad_()
        return [w]

    (phi,) = implicit_solution(solve, objective, [theta], cg_steps=4)
    ((qx @ phi - qy) ** 2).mean().backward()
    ours = theta.grad.clone()

    theta.grad = None
    closed = torch.linalg.solve(2 * x.T @ x / n + lam * torch.eye(4), 2 * x.T @ y / n + lam * theta)
    assert torch.allclose(phi.detach(), closed.detach(), atol=1e-10)
    ((qx @ closed - qy) ** 2).mean().backward()
    assert torch.allclose(ours, theta.grad, atol=1e-9)


def test_implicit_equals_explicit_hessian_solve_nonlinear():
    """iMAML's (I + H/lam)^{-1} g with H the explicit Hessian, on a small tanh network."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    qx, qy = torch.randn(10, 3), torch.randint(0, 2, (10,))
    shapes = [(5, 3), (5,), (2, 5), (2,)]
    theta = [torch.randn(*s).mul_(0.5).requires_grad_() for s in shapes]
    lam = 2.0

    def net(p, inp):
        return F.linear(torch.tanh(F.linear(inp, p[0], p[1])), p[2], p[3])

    def objective(phi, anchor, context):
        return F.cross_entropy(net(phi, x), y) + lam / 2 * sum(((a - b) ** 2).sum() for a, b in zip(phi, anchor))

    def solve(anchor, context):
        w = [a.clone().requires_grad_() for a in anchor]
        for _ in range(3000):
            grads = torch.autograd.grad(objective(w, anchor, context), w)
            w = [(p - 0.3 * g).detach().requires_grad_() for p, g in zip(w, grads)]
        return w

    numel = sum(t.numel() for t in theta)
    phi = implicit_solution(solve, objective, theta, cg_steps=numel)  # CG is exact in numel steps
    F.cross_entropy(net(phi, qx), qy).backward()
    ours = torch.cat([t.grad.flatten() for t in theta])

    flat_phi = torch.cat([p.detach().flatten() for p in phi])

    def unflat(v):
        out, i = [], 0
        for s in shapes:
            k = int(torch.tensor(s).prod())
            out.append(v[i:i + k].view(s))
            i += k
        return out

    hessian = torch.autograd.functional.hessian(lambda v: F.cross_entropy(net(unflat(v), x), y), flat_phi)
    qgrad = torch.autograd.functional.jacobian(lambda v: F.cross_entropy(net(unflat(v), qx), qy), flat_phi)
    reference = torch.linalg.solve(torch.eye(numel) + hessian / lam, qgrad)
    assert float(reference.abs().max()) > 1e-3
    assert torch.allclose(ours, reference, atol=1e-7)


def test_implicit_context_gradient_equals_unrolled_converged_solve():
    """The gradient reaching the context (trunk features, via a trunk weight) and a leaf the
    objective closes over (a logit scale) equals the unrolled derivative through a converged inner
    solve, as the implicit function theorem says."""
    torch.manual_seed(1)
    trunk = torch.nn.Linear(3, 4)
    x, y = torch.randn(9, 3), torch.arange(3).repeat(3)
    qx, qy = torch.randn(9, 3), torch.arange(3).repeat(3)
    head0 = torch.randn(3, 4, requires_grad=True)
    scale = torch.tensor(1.3, requires_grad=True)  # closed over by the objective
    lam, lr, steps = 1.0, 0.3, 400

    def objective(phi, anchor, context):
        return F.cross_entropy(scale * context[0] @ phi[0].T, y) + lam / 2 * ((phi[0] - anchor[0]) ** 2).sum()

    def solve(anchor, context):
        w = anchor[0].clone().requires_grad_()
        for _ in range(steps):
            (g,) = torch.autograd.grad(objective([w], anchor, context), [w])
            w = (w - lr * g).detach().requires_grad_()
        return [w]

    def outer(w):
        return F.cross_entropy(torch.tanh(trunk(qx)) @ w.T, qy)

    feats = torch.tanh(trunk(x))
    (phi,) = implicit_solution(solve, objective, [head0], [feats], cg_steps=12)
    outer(phi).backward()
    ours = [trunk.weight.grad.clone(), head0.grad.clone(), scale.grad.clone()]

    trunk.zero_grad()
    head0.grad = scale.grad = None
    feats = torch.tanh(trunk(x))
    w = head0
    for _ in range(steps):  # unrolled with the full graph
        (g,) = torch.autograd.grad(objective([w], [head0], [feats]), [w], create_graph=True)
        w = w - lr * g
    outer(w).backward()
    assert float(trunk.weight.grad.abs().max()) > 1e-4 and abs(float(scale.grad)) > 1e-4
    assert_close(ours, [trunk.weight.grad, head0.grad, scale.grad], 1e-7)


def retained_bytes(fn, exclude=()):
    mb, out = graph_mb(fn, exclude)
    return mb * 2**20, out


def test_checkpointed_steps_keep_their_weights_in_storage_taken_before_the_loop():
    """Each weight's copies for steps 1..K live in one block allocated before the inner loop, not
    in a block per step allocated between the steps' freed activations: those fragment the CPU
    heap (a 50-step mini-ImageNet meta-step grew it by 2.6 GB for 405 MB in use; metamtl.allocator)."""
    model = tiny_conv()
    names = [n for n, _ in model.named_parameters()]
    sx, sy = data(6, 0)
    trajectory = checkpointed_unroll(sgd_step(model, names, sx, sy, lr=0.3), list(model.parameters()), 5)
    for i, p in enumerate(model.parameters()):
        storages = {s[i].untyped_storage().data_ptr() for s in trajectory[1:]}
        assert len(storages) == 1
        assert trajectory[1][i].untyped_storage().nbytes() == 5 * p.numel() * p.element_size()
        assert all(not torch.equal(trajectory[k][i], trajectory[k + 1][i]) for k in range(5)) or p.dim() == 0


def test_retained_memory_does_not_grow_with_steps():
    model = tiny_conv()
    names = [n for n, _ in model.named_parameters()]
    sx, sy = data(12, 0)
    step = sgd_step(model, names, sx, sy, lr=0.1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = [sx, sy, *model.parameters()]
    sizes = {}
    for steps in (2, 8):
        sizes["full", steps] = retained_bytes(lambda: _full(step, model, steps), inputs)[0]
        sizes["checkpoint", steps] = retained_bytes(
            lambda: checkpointed_unroll(step, list(model.parameters()), steps), inputs)[0]
        sizes["implicit", steps] = retained_bytes(
            lambda: implicit_solution(lambda a, c: _solve(step, a, steps), lambda p, a, c: torch.zeros(()),
                                      list(model.parameters())), inputs)[0]
    assert sizes["full", 8] > 3 * sizes["full", 2]               # activations of every step
    assert sizes["checkpoint", 8] <= (8 + 1) * weights            # one weight copy per step, no activations
    assert sizes["checkpoint", 8] < sizes["full", 2] / 2
    assert sizes["implicit", 8] == sizes["implicit", 2] <= 3 * weights


def _full(step, model, steps):
    state = list(model.parameters())
    for k in range(steps):
        state = step(state, k, [], True)
    return state


def _solve(step, anchor, steps):
    state = anchor
    for k in range(steps):
        state = [t.detach() for t in step([a.detach().requires_grad_() for a in state], k, [], False)]
    return state
