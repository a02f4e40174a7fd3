"""How the meta-gradient of an inner solve is computed, separately from the solve itself.

An inner loop is a function: parameters (and inner-optimizer state) in, adapted parameters out.
How its gradient is obtained is a separate, swappable choice (as in TorchOpt's
``torchopt.diff.implicit``); this module holds the two choices whose memory does not grow with
the number of inner steps.  Both are ``torch.autograd.Function``\\ s: their outputs are ordinary
tensors on the caller's autograd tape, so a query loss computed from them backpropagates with a
plain ``loss.backward()`` into whatever produced their inputs (meta-weights, a prototype head,
trunk features...).

:func:`checkpointed_unroll` (``memory: checkpoint``)
    Exactly the unrolled (second-order MAML) meta-gradient.  The forward pass runs the ``K``
    inner steps without an autograd graph and keeps only each step's input state (parameters and
    optimizer state: ``K`` copies of the weights, no activations).  The backward pass walks the
    steps in reverse: it recomputes step ``k`` from its saved input *with* a graph
    (``create_graph=True`` inside the step), takes the vector-Jacobian product with the
    cotangent of step ``k``'s output, and frees that graph before step ``k - 1``.  Peak memory:
    one step's second-order graph plus ``K`` weight copies, instead of ``K`` second-order
    graphs; time: one extra support forward + first-order backward per step.  Each step's
    random-number state (CPU, and CUDA for CUDA tensors) is saved in the forward and replayed,
    on a fork of the generators, in the recomputation: a dropout layer draws the same masks, and
    the caller's generators end where they would without the recomputation.  The recomputation
    also runs under the forward's autocast settings (a backward outside ``torch.autocast``
    recomputes in bfloat16 / float16 as the forward did, not in float32).
    (``torch.utils.checkpoint`` is not used: its reentrant variant does not support
    ``torch.autograd.grad`` inside the checkpointed function and the non-reentrant one does not
    free the recomputed double-backward graphs step by step; the recomputation is written out
    here and tested against the full unroll to 1e-6 in float64.)

:func:`implicit_solution` (``memory: implicit``, iMAML, Rajeswaran et al. 2019)
    The inner problem is ``phi* = argmin_phi objective(phi, anchor, context)``, with iMAML's
    objective ``L_support(phi) + lam/2 ||phi - anchor||^2``.  By the implicit function theorem on
    the optimality condition ``F = d objective / d phi = 0``:
    ``d phi*/d(anchor, context)^T g = -(dF/d(anchor, context))^T u`` with ``(dF/dphi) u = g``,
    ``dF/dphi = H + lam I`` (the Hessian of the objective).  For the anchor this is ``lam u``, which
    is iMAML's ``(I + H/lam)^{-1} g``.  ``u`` comes from conjugate gradient on Hessian-vector
    products at ``phi*``, so memory is one Hessian-vector-product graph, whatever the number of
    inner steps (the forward solve keeps no graph at all).  The gradient assumes ``phi*`` is the
    minimiser; with a finite number of inner steps it is the implicit approximation.

Both take the meta-dependent tensors they need explicitly (``context``: e.g. the trunk features
a head-only inner loop adapts on).  Leaf tensors a step or objective closes over (an
``nn.Parameter`` such as a learned inner learning rate) receive their gradient by accumulation
into ``.grad``, as ``loss.backward()`` would; a closed-over *non-leaf* tensor is not supported
(pass it in ``context``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch

#: ``step(state, k, context, create_graph) -> next state``: one inner step, a pure function of its
#: arguments.  ``state`` holds the adapted weights (and any inner-optimizer state); its floating
#: tensors are leaves that require grad when the step is called.  With ``create_graph=False``
#: the returned tensors may be detached; with ``True`` they must be differentiable functions of
#: ``state`` and ``context`` (``torch.autograd.grad(..., create_graph=True)`` inside).
Step = Callable[[list[torch.Tensor], int, list[torch.Tensor], bool], Sequence[torch.Tensor]]
#: ``objective(phi, anchor, context) -> scalar``: the inner objective (iMAML: support loss plus
#: the proximal term ``lam/2 ||phi - anchor||^2``).
Objective = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
#: ``solve(anchor, context) -> phi``: approximately minimise the objective from ``anchor``
#: (called without a graph; gradients never flow through it).
Solve = Callable[[list[torch.Tensor], list[torch.Tensor]], Sequence[torch.Tensor]]


def _leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` (sharing storage), floating ones requiring grad."""
    return [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in tensors]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def cuda_devices(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The CUDA devices ``tensors`` live on (whose generators a step may draw from)."""
    return sorted({t.device.index for t in tensors if t.is_cuda})


def _rng_state(devices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU generator's state and that of each CUDA device in ``devices``."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(devices: Sequence[int], state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def _autocast_state() -> list[tuple[str, bool, torch.dtype, bool]]:
    """The autocast settings in force (CPU, and CUDA where there is one)."""
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cache = torch.is_autocast_cache_enabled()
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), cache) for kind in kinds]


@contextlib.contextmanager
def _autocast(state: Sequence[tuple[str, bool, torch.dtype, bool]]) -> Iterator[None]:
    """Run under the autocast settings ``state`` (from :func:`_autocast_state`), whatever is in force."""
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype, cache in state:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache))
        yield


class _Checkpointed(torch.autograd.Function):
    """See :func:`checkpointed_unroll`.  Inputs: ``*state0, *context``; outputs: states 1..K."""

    @staticmethod
    def forward(ctx, step: Step, steps: int, n_state: int, *tensors: torch.Tensor):  # type: ignore[override]
        state = [t.detach() for t in tensors[:n_state]]
        context = [t.detach() for t in tensors[n_state:]]
        saved = [state]
        # every step's state goes into storage taken before the loop: kept tensors allocated
        # between the steps' freed activations would fragment the heap (metamtl.allocator)
        store = [torch.empty((steps, *t.shape), dtype=t.dtype, device=t.device) for t in state]
        # the random-number state each step starts from (dropout masks, noise): the backward's
        # recomputation replays it, as torch.utils.checkpoint's preserve_rng_state does
        devices = cuda_devices(tensors)
        rng_states = []
        with torch.enable_grad():
            for k in range(steps):
                rng_states.append(_rng_state(devices))
                new = step(_leaves(state), k, context, False)
                if len(new) != n_state:
                    raise RuntimeError(f"inner step returned {len(new)} tensors for a state of {n_state}")
                state = [buf[k].copy_(t.detach()) for buf, t in zip(store, new)]
                del new
                saved.append(state)
        ctx.step, ctx.steps, ctx.n_state = step, steps, n_state
        ctx.devices, ctx.rng_states = devices, rng_states
        # the backward may run outside the forward's torch.autocast (and on CUDA, on autograd's own
        # thread): the recomputation re-enters its autocast settings, as torch.utils.checkpoint does
        ctx.autocast = _autocast_state()
        # inputs of every step (state 0 .. K-1) and the context: all the backward needs
        ctx.save_for_backward(*[t for s in saved[:-1] for t in s], *context)
        ctx.set_materialize_grads(False)
        outputs = [t for s in saved[1:] for t in s]
        ctx.mark_non_differentiable(*[t for t in outputs if not (t.is_floating_point() or t.is_complex())])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        n, steps = ctx.n_state, ctx.steps
        saved = ctx.saved_tensors
        states = [list(saved[k * n:(k + 1) * n]) for k in range(steps)]
        context = _leaves(saved[steps * n:])
        context_grads: list[torch.Tensor | None] = [None] * len(context)
        cotangent: list[torch.Tensor | None] = [None] * n
        for k in reversed(range(steps)):
            # cotangent of state k+1: from later steps and from the loss on state k+1 itself
            cotangent = [_add(c, g) for c, g in zip(cotangent, grads[k * n:(k + 1) * n])]
            if all(c is None for c in cotangent):
                continue
            state = _leaves(states[k])
            # step k's own random numbers, on a fork: the caller's generator stream is left where
            # it was (as if nothing were recomputed)
            with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
                _set_rng_state(ctx.devices, ctx.rng_states[k])
                with _autocast(ctx.autocast):  # the forward's precision, as the full unroll's graph has
                    out = ctx.step(state, k, context, True)
                pairs = [(o, c) for o, c in zip(out, cotangent) if c is not None and o.requires_grad]
                for t in state + context:
                    t.grad = None
                if pairs:
                    # backward (not autograd.grad) so closed-over leaves (learned rates) accumulate too
                    torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
            cotangent = [t.grad for t in state]
            context_grads = [_add(a, t.grad) for a, t in zip(context_grads, context)]
            del out, pairs, state
        return (None, None, None, *cotangent, *context_grads)


def checkpointed_unroll(
    step: Step, state: Sequence[torch.Tensor], steps: int, context: Sequence[torch.Tensor] = (),
) -> list[list[torch.Tensor]]:
    """Run ``steps`` inner steps from ``state``; backward by per-step recomputation.

    Returns the trajectory ``[state_0, state_1, ..., state_K]`` (``state_0`` is ``state`` itself),
    every later state differentiable with respect to ``state`` and ``context`` with exactly the
    unrolled (second-order) derivative, at the memory cost of one step.  See the module docstring.
    """
    state = list(state)
    if steps == 0:
        return [state]
    n = len(state)
    flat = _Checkpointed.apply(step, steps, n, *state, *context)
    return [state] + [list(flat[k * n:(k + 1) * n]) for k in range(steps)]


def conjugate_gradient(
    matvec: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]], b: Sequence[torch.Tensor], steps: int,
    batched: bool = False, tol: float = 0.0,
) -> list[torch.Tensor]:
    """Solve ``A x = b`` for symmetric positive definite ``A`` given as ``matvec`` (``steps`` iterations).

    ``b`` is a list of tensors (one vector split across them).  With ``batched=True`` their first
    dimension indexes independent systems (tasks): dot products and step sizes are per task, so
    a chunk of tasks is solved exactly as each task alone.  Starts from ``x = 0`` (as iMAML);
    stops early when every system's squared residual is ``<= tol``.

    An ``A`` that is not positive definite (iMAML's ``I + H/lam`` with Hessian eigenvalues below
    ``-lam``) shows as a direction of non-positive curvature ``p.Ap <= 0``: that system stops there
    (truncated CG), keeping its last iterate, or ``b`` itself if it meets one at the first step (as
    if ``A`` were the identity), with a :class:`RuntimeWarning`; stepping on would blow the solution
    up as ``steps`` grows.
    """
    b = [t.detach() for t in b]

    def dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
        if batched:
            return sum((x * y).flatten(1).sum(1) for x, y in zip(u, v))
        return sum((x * y).sum() for x, y in zip(u, v))

    def scale(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (c.view(-1, *[1] * (v.dim() - 1)) if batched else c) * v

    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rr = dot(r, r)
    active = torch.ones_like(rr, dtype=torch.bool)
    for k in range(steps):
        if bool((rr <= tol).all()) or not bool(active.any()):
            break
        ap = [t.detach() for t in matvec(p)]
        pap = dot(p, ap)
        curved = pap > 0
        if not bool(curved[active].all()):
            _warn_indefinite()
            if k == 0:  # no positive-curvature step yet: the identity's solution, b
                x = [xi + scale((~curved).to(xi.dtype), bi) for xi, bi in zip(x, b)]
        active = active & curved
        alpha = torch.where(active, rr / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(rr))
        x = [xi + scale(alpha, pi) for xi, pi in zip(x, p)]
        r = [ri - scale(alpha, ai) for ri, ai in zip(r, ap)]
        rr_new = dot(r, r)
        beta = torch.where(rr != 0, rr_new / torch.where(rr != 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = [ri + scale(beta, pi) for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def _warn_indefinite() -> None:
    warnings.warn("conjugate gradient met non-positive curvature: the implicit system I + H/lam is not positive "
                  "definite for some task (support-loss Hessian eigenvalues below -lam), so its solve stopped at the "
                  "last positive-curvature step; a larger lam (algorithm.lam) makes it definite", RuntimeWarning,
                  stacklevel=3)


class _Implicit(torch.autograd.Function):
    """See :func:`implicit_solution`.  Inputs: ``*anchor, *context``; outputs: ``phi*``."""

    @staticmethod
    def forward(ctx, solve: Solve, objective: Objective, cg_steps: int, batched: bool, n: int,  # type: ignore[override]
                *tensors: torch.Tensor):
        anchor = [t.detach() for t in tensors[:n]]
        context = [t.detach() for t in tensors[n:]]
        with torch.enable_grad():
            phi = [t.detach() for t in solve(anchor, context)]
        if len(phi) != n:
            raise RuntimeError(f"inner solve returned {len(phi)} tensors for {n} parameters")
        ctx.objective, ctx.cg_steps, ctx.batched, ctx.n = objective, cg_steps, batched, n
        ctx.save_for_backward(*phi, *anchor, *context)
        ctx.set_materialize_grads(False)
        return tuple(phi)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        n = ctx.n
        saved = ctx.saved_tensors
        wanted = ctx.needs_input_grad[5:]  # which of anchor, context the caller needs a gradient for
        phi = _leaves(saved[:n])
        anchor, context = _wanted_leaves(saved[n:2 * n], wanted[:n]), _wanted_leaves(saved[2 * n:], wanted[n:])
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(phi, grads)]
        with torch.enable_grad():
            objective = ctx.objective(phi, anchor, context)
            # F = d objective / d phi, kept differentiable: dF/dphi v is a Hessian-vector product
            optimality = torch.autograd.grad(objective, phi, create_graph=True, allow_unused=True)
            live = [i for i, f in enumerate(optimality) if f is not None and f.requires_grad]
            outputs = [optimality[i] for i in live]

            def matvec(v: list[torch.Tensor]) -> list[torch.Tensor]:
                if not live:
                    return [torch.zeros_like(x) for x in v]
                hv = torch.autograd.grad(outputs, phi, [v[i] for i in live], retain_graph=True, allow_unused=True)
                return [torch.zeros_like(x) if h is None else h for x, h in zip(v, hv)]

            u = conjugate_gradient(matvec, g, ctx.cg_steps, batched=ctx.batched)
            # -(dF/d(anchor, context))^T u, into exactly the tensors that need it: the wanted anchor
            # and context leaves and the leaves the objective closes over.  Restricting the backward
            # to them skips the rest of the double-backward graph (for iMAML's full-model objective
            # the anchor's gradient is lam u, one step away from the output; without ``inputs`` the
            # pass would walk the whole Hessian graph into phi and the support images).
            targets = [t for t in anchor + context if t.requires_grad]
            for t in targets:
                t.grad = None
            targets += _closed_over_leaves(outputs, phi + anchor + context)  # (their .grad accumulates)
            if live and targets:
                torch.autograd.backward(outputs, [-u[i] for i in live], inputs=targets)
        return (None, None, None, None, None, *[t.grad for t in anchor], *[t.grad for t in context])


def _wanted_leaves(tensors: Sequence[torch.Tensor], wanted: Sequence[bool]) -> list[torch.Tensor]:
    """Detached copies of ``tensors``; those the caller needs a gradient for (floating) require grad."""
    return [t.detach().requires_grad_(bool(w) and (t.is_floating_point() or t.is_complex()))
            for t, w in zip(tensors, wanted)]


def _closed_over_leaves(outputs: Sequence[torch.Tensor], own: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``outputs``' graph reaches, other than ``own``: what a
    function closes over (an ``nn.Parameter`` such as a loss term's weight)."""
    own_ids = {id(t) for t in own}
    found: dict[int, torch.Tensor] = {}
    seen: set = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: the node of a leaf
        if leaf is not None:
            if id(leaf) not in own_ids:
                found[id(leaf)] = leaf
            continue
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return list(found.values())


def implicit_solution(
    solve: Solve, objective: Objective, anchor: Sequence[torch.Tensor], context: Sequence[torch.Tensor] = (),
    cg_steps: int = 5, batched: bool = False,
) -> list[torch.Tensor]:
    """``phi* = solve(anchor, context)``, differentiable by the implicit function theorem.

    Args:
        solve: runs the inner optimisation (no graph is kept).
        objective: the inner objective whose minimiser ``phi*`` is; its gradient in ``phi`` is
            the optimality condition (iMAML: support loss + ``lam/2 ||phi - anchor||^2``).
        anchor: the meta-learned starting point / proximal centre (gradient: iMAML's
            ``(I + H/lam)^{-1} g`` for the proximal objective).
        context: other meta-dependent inputs of the objective (trunk features...).
        cg_steps: conjugate-gradient iterations of the backward linear solve.
        batched: every tensor has a leading task dimension and each task's system is solved on
            its own (the objective must then be a sum over tasks).
    """
    anchor = list(anchor)
    return list(_Implicit.apply(solve, objective, cg_steps, batched, len(anchor), *anchor, *context))
