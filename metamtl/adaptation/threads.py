"""Chunks of a meta-batch on several CPU threads at once, with a reproducible meta-gradient.

On a CPU one task's tensors are small (a 5-way 1-shot support set is 5 images), so spreading each
operation over the cores (torch's intra-op threads) spends much of the time waiting for the
threads at the end of each parallel region.  Running whole chunks of tasks side by side instead,
each worker thread on its own core with one intra-op thread, keeps every core on useful work.

Two things make that safe and reproducible:

* **A model per worker.**  ``torch.func.functional_call`` swaps a module's parameters in place
  for the duration of a call, so two threads must not call it on one module.  Each worker gets
  :func:`shared_clone` of the model: its own module objects holding the *same* parameter and
  buffer tensors, so gradients still reach the real meta-parameters.
* **Gradients added in chunk order.**  While a worker runs, a tensor hook on each
  meta-parameter takes the gradient that would be accumulated into ``.grad`` and keeps it for
  the worker's chunk (``.grad`` receives zeros instead, which adds nothing in any order).  When
  every chunk is done, the calling thread adds the kept gradients to ``.grad`` in chunk order.
  The result does not depend on which thread finished first, so a seeded run repeats exactly; it
  is not bitwise the serial loop's (one intra-op thread sums in another order than two).

What cannot run this way stays on the serial loop: models whose training forward pass writes
shared state (:func:`threadable`: BatchNorm running statistics, dropout's draws from the global
generator, parametrized modules) and, as the algorithm decides
(:meth:`~metamtl.algorithms.base.Algorithm.task_workers`), devices other than the CPU, the
``higher`` engine, loss terms, MAML++'s per-step running statistics and the memory modes that
promise one chunk's graph at a time.  Peak memory is then that of ``workers`` chunks at once.

Random numbers drawn from the global generator by code no module type reveals (``F.dropout``
in a ``forward``, ``torch.randn`` noise, stochastic depth) would be drawn in thread-dependent
order, and buffers a user's module writes in its forward pass (an EMA or running normaliser, a
counter) would be updated by the tasks in thread-dependent order (or, assigned a new tensor, in
a worker's clone only).  :func:`map_chunks` therefore compares the generator's state and every
buffer's version counter (and, in the clones, identity) before and after the threaded run: when
one moved, the run is discarded (no gradient reaches ``.grad``, the generator and the buffers
are put back), the model is remembered (:func:`threadable` then says so, for its training or
evaluation mode) and :class:`DrewRandomNumbers` tells the caller to run the chunks serially, as
the serial loop would have from the same state.  Models that draw and write nothing pay one
state comparison and a copy of their buffers per call.
"""
from __future__ import annotations

import collections
import contextvars
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()
#: per model: one shared clone per worker thread (built once, reused every meta-step)
_clones: "weakref.WeakKeyDictionary[nn.Module, dict[int, nn.Module]]" = weakref.WeakKeyDictionary()
#: per model: the modes (``model.training``) whose forward pass was seen drawing global random numbers
#: or writing the model's buffers in a threaded run, and why
_serial: "weakref.WeakKeyDictionary[nn.Module, dict[bool, str]]" = weakref.WeakKeyDictionary()
log = logging.getLogger(__name__)


class DrewRandomNumbers(RuntimeError):
    """A threaded :func:`map_chunks` drew from the global generator or wrote the model's buffers;
    its work was discarded, the generator and the buffers restored: run the chunks serially."""


def in_worker() -> bool:
    """Whether the calling thread is one of this module's workers (no nested parallel sections)."""
    return getattr(_local, "capture", None) is not None


def shared_clone(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module``'s module tree that holds the same parameter and buffer tensors.

    Its module objects (and their hook tables) are its own, so ``functional_call`` on the clone
    never touches ``module``; gradients of the clone's parameters are gradients of ``module``'s.
    A sub-module that appears twice in ``module`` appears twice in the clone as one object.
    """
    memo = {} if memo is None else memo
    for m in module.modules():
        if id(m) not in memo:
            memo[id(m)] = nn.Module.__new__(type(m))
    for m in module.modules():
        _sync(m, memo[id(m)], memo)
    return memo[id(module)]


def _sync(original: nn.Module, copied: nn.Module, memo: dict[int, nn.Module]) -> None:
    """Make ``copied`` ``original``'s twin: every attribute as ``original`` has it now (a flag or
    tensor set since the last sync included), its own hook tables and sub-module copies."""
    state = dict(original.__dict__)
    for key, value in state.items():
        if key.endswith("hooks") and isinstance(value, dict):
            state[key] = collections.OrderedDict(value)
    state["_parameters"] = dict(original._parameters)
    state["_buffers"] = dict(original._buffers)
    state["_modules"] = {k: None if m is None else memo[id(m)] for k, m in original._modules.items()}
    copied.__dict__.clear()
    copied.__dict__.update(state)


def threadable(model: nn.Module) -> str | None:
    """``None`` when ``model``'s training forward pass may run in several threads at once, else why not."""
    seen = _serial.get(model, {}).get(model.training)
    if seen is not None:
        return f"{seen} (seen in a threaded run)"
    for name, m in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        if getattr(m, "parametrizations", None):
            return f"{where} is parametrized"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{where} draws dropout masks from the global generator"
        if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "running_mean", None) is not None:
            return f"{where} updates BatchNorm running statistics"
    return None


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pool_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metamtl-task")
        return pool


def _clone_for_worker(model: nn.Module) -> nn.Module:
    """This worker's :func:`shared_clone` of ``model``, re-synced with ``model`` (its current
    tensors, flags and attributes; rebuilt when the module tree changed)."""
    modules = list(model.modules())
    signature = tuple(id(m) for m in modules)
    per_thread = _clones.setdefault(model, {})
    entry = per_thread.get(threading.get_ident())
    if entry is None or entry[0] != signature:
        memo: dict[int, nn.Module] = {}
        entry = per_thread[threading.get_ident()] = (signature, shared_clone(model, memo), memo)
    else:
        for m in modules:
            _sync(m, entry[2][id(m)], entry[2])
    return entry[1]


def _hook(i: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """The tensor hook of meta-parameter ``i``: in a worker, keep its gradient for the worker's chunk."""
    def keep(grad: torch.Tensor) -> torch.Tensor | None:
        capture = getattr(_local, "capture", None)
        if capture is None:  # a backward pass of the calling thread: accumulate as usual
            return None
        capture[i] = grad if i not in capture else capture[i] + grad
        return torch.zeros_like(grad)
    return keep


def map_chunks(fn: Callable[[nn.Module, T], R], chunks: Sequence[T], model: nn.Module,
               meta_parameters: Iterable[torch.Tensor], workers: int) -> list[R]:
    """``[fn(model_copy, chunk) for chunk in chunks]`` on ``workers`` threads, each with one intra-op thread.

    ``fn`` runs a chunk's forward and backward passes; the gradients it produces for
    ``meta_parameters`` are added to their ``.grad`` in chunk order once every chunk is done
    (see the module docstring).  ``fn`` gets a :func:`shared_clone` of ``model`` to compute with.
    Grad mode and autocast are thread-local in torch, and a new thread starts with fresh context
    variables: the caller's are entered in each worker.  With no ``meta_parameters`` nothing is
    captured (evaluation).

    Raises :class:`DrewRandomNumbers` when the chunks drew from the global generator (see the
    module docstring): nothing was then added to ``.grad`` and the generator is as before.
    """
    params = [p for p in meta_parameters if p.requires_grad]
    captures: list[dict[int, torch.Tensor]] = [{} for _ in chunks]
    autocast = [(dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)]
    grad_mode = torch.is_grad_enabled()

    clones: dict[int, nn.Module] = {}  # this call's model copy per worker thread, synced once

    def run(index: int) -> R:
        _local.capture = captures[index]
        try:
            clone = clones.get(threading.get_ident())
            if clone is None:
                with _pool_lock:
                    clone = clones[threading.get_ident()] = _clone_for_worker(model)
            with torch.set_grad_enabled(grad_mode), _autocast(autocast):
                return fn(clone, chunks[index])
        finally:
            _local.capture = None

    context = contextvars.copy_context()  # the caller's context variables (e.g. dataset_scope)

    rng = torch.get_rng_state()
    buffers = [(name, b, b._version, b.clone()) for name, b in model.named_buffers()]
    no_grad = [p for p in params if p.grad is None]
    threads = torch.get_num_threads()
    handles = [p.register_hook(_hook(i)) for i, p in enumerate(params)]
    torch.set_num_threads(1)  # each worker computes on its own core
    futures = []
    try:
        pool = _pool(workers)
        futures = [pool.submit(context.copy().run, run, i) for i in range(len(chunks))]
        results = [f.result() for f in futures]
    finally:
        # on an error (or Ctrl-C) in the caller: no chunk may still be writing gradients afterwards
        for f in futures:
            f.cancel()
        wait(futures)
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    _check_shared_state(model, rng, buffers, no_grad, list(clones.values()))
    _accumulate(params, captures)
    return results


def _written_buffer(model: nn.Module, buffers: Sequence[tuple[str, torch.Tensor, int, torch.Tensor]],
                    clones: Sequence[nn.Module]) -> str | None:
    """The name of a buffer of ``model`` the threaded run wrote: updated in place (its version
    moved) or replaced by a new tensor in a worker's clone (where the model never sees it)."""
    for name, tensor, version, _ in buffers:
        if tensor._version != version:
            return name
    before = {name: tensor for name, tensor, _, _ in buffers}
    for clone in clones:
        now = dict(clone.named_buffers())
        changed = sorted(n for n in before.keys() | now.keys() if now.get(n) is not before.get(n))
        if changed:
            return changed[0]
    return None


def _check_shared_state(model: nn.Module, rng: torch.Tensor, buffers: Sequence[tuple[str, torch.Tensor, int, torch.Tensor]],
                        no_grad: Sequence[torch.Tensor], clones: Sequence[nn.Module]) -> None:
    """Raise :class:`DrewRandomNumbers` when the threaded run moved the global generator since
    ``rng`` or wrote one of ``model``'s ``buffers`` (``(name, tensor, version, copy)`` before it):
    the generator and the buffers put back, the hooks' zero gradients of ``no_grad`` removed and
    ``model`` remembered (for its mode), so the serial loop gives what it would have given alone."""
    drew = not torch.equal(torch.get_rng_state(), rng)
    written = _written_buffer(model, buffers, clones)
    if not drew and written is None:
        return
    torch.set_rng_state(rng)
    with torch.no_grad():
        for _, tensor, version, copy in buffers:
            if tensor._version != version:
                tensor.copy_(copy)
    for p in no_grad:
        p.grad = None
    reason = ("its forward pass draws from the global random-number generator" if drew
              else f"its forward pass writes its buffer {written!r}, which all tasks share")
    reasons = _serial.setdefault(model, {})
    if reason not in reasons.values():
        log.info("%s: %s: its tasks are adapted one chunk at a time, not on threads (seeded runs repeat)",
                 type(model).__name__, reason)
    reasons[model.training] = reason
    raise DrewRandomNumbers(reason)


def _accumulate(params: Sequence[torch.Tensor], captures: Sequence[dict[int, torch.Tensor]]) -> None:
    """Add each chunk's kept gradients to ``.grad``, chunk after chunk (the serial loop's order)."""
    with torch.no_grad():
        for capture in captures:
            for i in sorted(capture):
                p, g = params[i], capture[i]
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad += g


class _autocast:
    """Re-enter the caller's autocast settings in a worker thread (autocast state is per thread)."""

    def __init__(self, settings: list[tuple[str, torch.dtype]]) -> None:
        self.contexts = [torch.autocast(dev, dtype=dtype) for dev, dtype in settings]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)
