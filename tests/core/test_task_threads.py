"""Chunks of tasks meta-trained side by side on CPU threads (metamtl.adaptation.threads).

* the meta-gradient equals the serial loop's (float64) for every meta-gradient rule and for
  head-only, per-task-head and learned-rate algorithms; metrics too;
* seeded runs repeat bitwise whichever thread finishes first;
* what is not safe falls back to the serial loop, and says why when threads were asked for;
* the caller's model, hooks, thread count, autocast and context variables are as before/seen.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from metamtl.adaptation.threads import map_chunks, shared_clone, threadable
from metamtl.algorithms import build_algorithm
from metamtl.errors import ConfigError
from metamtl.models import build_model, current_dataset, dataset_scope
from metamtl.tasks import Episode, TaskBatch


def batch(tasks=6, ways=3, shots=1, queries=2, size=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return TaskBatch([
        Episode(torch.rand(ways * shots, 1, size, size, generator=g, dtype=dtype), labels.repeat_interleave(shots),
                torch.rand(ways * queries, 1, size, size, generator=g, dtype=dtype), labels.repeat_interleave(queries),
                ways, shots, queries) for _ in range(tasks)
    ])


def learner(name, task_threads, dtype=torch.float64, **settings):
    torch.manual_seed(0)
    per_task_head = settings.get("head_init", "learned") != "learned"
    model = build_model("conv4", hidden=4, image_size=12, blocks=2, out_features=None if per_task_head else 3)
    alg = build_algorithm(name, task_threads=task_threads, **{"lr": 0.1, **settings})
    model, alg = model.to(dtype), alg.to(dtype)
    alg.setup(model)
    return model, alg


def meta_gradient(model, alg, b):
    params = [*model.parameters(), *alg.parameters()]
    for p in params:
        p.grad = None
    metrics = alg.meta_step(model, b, 0)
    return metrics, [None if p.grad is None else p.grad.clone() for p in params]


CASES = [
    ("maml", {}),
    ("maml", {"head_init": "proto", "steps": 2}),
    ("fomaml", {}),
    ("reptile", {"steps": 2}),
    ("anil", {"head_init": "proto"}),
    ("metasgd", {}),
    ("maml", {"optimizer": "adam", "lr": 0.01, "steps": 2}),
]


def threaded_runs_equal_serial(trunk, caplog, state, seed=None, iterations=2, **settings) -> str:
    """A float64 MAML learner (``settings``) on a ``trunk()`` whose draws or writes no module type
    reveals, trained ``iterations`` meta-steps (the global generator reseeded with ``seed`` first):
    three runs with automatic task threads equal the serial run exactly (meta-gradients and
    ``state(model)``), and each fell back to one worker (remembered: later meta-steps go straight to
    the serial loop); returns the threads module's log."""
    from metamtl.models import TrunkHead

    b = batch(tasks=8)

    def run(task_threads):
        torch.manual_seed(0)
        model = TrunkHead(trunk(), nn.Linear(6, 3)).to(torch.float64)
        alg = build_algorithm("maml", task_threads=task_threads, **settings)
        alg.setup(model)
        model.train()
        assert threadable(model) is None  # no module type reveals the draws or writes
        if seed is not None:
            torch.manual_seed(seed)
        out = [meta_gradient(model, alg, b) for _ in range(iterations)]
        return out, state(model), alg.task_workers(model, b, 8)

    serial, serial_state, _ = run(1)
    with caplog.at_level(logging.INFO, logger="metamtl.adaptation.threads"):
        runs = [run(0) for _ in range(3)]
    for threaded, state_after, workers in runs:
        for (m1, g1), (m2, g2) in zip(serial, threaded):
            assert all(torch.equal(x, y) for x, y in zip(g1, g2))
            assert m1 == m2
        assert torch.equal(state_after, serial_state)
        assert workers == 1
    return caplog.text


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(map(str, s.values()))}" for n, s in CASES])
def test_threads_give_the_serial_meta_gradient(two_threads, name, settings):
    b = batch()
    serial = learner(name, 1, **settings)
    threaded = learner(name, 0, **settings)
    assert serial[1].task_workers(serial[0], b, 6) == 1
    assert threaded[1].task_workers(threaded[0], b, 6) == 2
    m1, g1 = meta_gradient(*serial, b)
    m2, g2 = meta_gradient(*threaded, b)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-12, abs=1e-12)
    assert [g is None for g in g1] == [g is None for g in g2]
    assert any(g is not None for g in g1)
    for a, c in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


def test_threads_equal_the_serial_loop_on_one_thread_bitwise_in_float32(two_threads):
    """What differs from the serial loop in float32 is only that each op runs on one thread."""
    b = batch(tasks=4, dtype=torch.float32)
    threaded = meta_gradient(*learner("maml", 0, dtype=torch.float32), b)[1]
    torch.set_num_threads(1)
    serial = meta_gradient(*learner("maml", 1, dtype=torch.float32), b)[1]
    for a, c in zip(serial, threaded):
        assert torch.equal(a, c)


def test_threaded_training_repeats_bitwise(two_threads):
    """Gradients are added in chunk order, so which worker finishes first does not matter."""
    b = batch(tasks=8, dtype=torch.float32)
    finals = []
    for _ in range(2):
        model, alg = learner("maml", 2, dtype=torch.float32, head_init="proto")
        opt = torch.optim.Adam([*model.parameters(), *alg.parameters()], lr=1e-2)
        for it in range(3):
            opt.zero_grad(set_to_none=True)
            alg.meta_step(model, b, it)
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, c in zip(*finals):
        assert torch.equal(a, c)


def test_the_callers_model_threads_and_hooks_are_left_as_they_were(two_threads):
    model, alg = learner("maml", 0)
    params = list(model.parameters())
    hooks = [dict(p._backward_hooks or {}) for p in params]
    alg.meta_step(model, batch(), 0)
    assert list(model.parameters()) == params and all(p.grad is not None for p in params)
    assert [dict(p._backward_hooks or {}) for p in params] == hooks
    assert torch.get_num_threads() == 2


def test_an_error_in_a_worker_reaches_the_caller_and_cleans_up(two_threads):
    model, _ = learner("maml", 0)
    params = list(model.parameters())

    def fail(m, chunk):
        if chunk == 1:
            raise ValueError("bad chunk")
        return chunk

    with pytest.raises(ValueError, match="bad chunk"):
        map_chunks(fail, [0, 1, 2], model, params, 2)
    assert torch.get_num_threads() == 2
    assert all(not p._backward_hooks for p in params)


def test_workers_see_the_callers_context_variables_and_autocast(two_threads):
    model, _ = learner("maml", 0, dtype=torch.float32)

    def look(m, chunk):
        return current_dataset(), torch.is_autocast_enabled("cpu"), torch.get_num_threads(), m is not model

    with dataset_scope("omniglot"), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = map_chunks(look, [0, 1, 2, 3], model, [], 2)
    assert seen == [("omniglot", True, 1, True)] * 4


def test_a_clone_shares_tensors_but_not_modules():
    model, _ = learner("maml", 1)
    clone = shared_clone(model)
    assert [id(p) for p in clone.parameters()] == [id(p) for p in model.parameters()]
    assert all(a is not b for a, b in zip(clone.modules(), model.modules()))
    clone.eval()
    assert model.training
    out = torch.func.functional_call(clone, {n: torch.zeros_like(p) for n, p in clone.named_parameters()},
                                     (torch.rand(2, 1, 12, 12, dtype=torch.float64),))
    assert out.shape == (2, 3) and all(p.abs().sum() > 0 for p in model.parameters() if p.dim() > 1)


@pytest.mark.parametrize("layer,why", [
    (nn.Dropout(0.2), "dropout"),
    (nn.BatchNorm1d(3), "running statistics"),
])
def test_models_that_write_shared_state_train_one_chunk_at_a_time(two_threads, caplog, layer, why):
    model, alg = learner("maml", 2)
    model.head = nn.Sequential(model.head, layer.double())
    assert why in threadable(model)
    with caplog.at_level(logging.WARNING, logger="metamtl.algorithms.base"):
        assert alg.task_workers(model, batch(), 6) == 1
        assert alg.task_workers(model, batch(), 6) == 1
    assert [r.getMessage() for r in caplog.records].count(
        f"task_threads=2: adapting one chunk of tasks at a time because {threadable(model)}") == 1


def test_what_stays_serial(two_threads):
    b = batch()
    model, alg = learner("mamlpp", 0)
    assert alg.task_workers(model, b, 6) == 1
    assert "per-step running statistics" in alg.sequential_tasks(training=True)
    model, alg = learner("mamlpp", 0, per_step_bn=False)
    assert alg.task_workers(model, b, 6) == 2
    model, alg = learner("maml", 0, backend="higher")
    assert alg.task_workers(model, b, 6) == 1
    for memory in ("checkpoint", "implicit", "auto"):  # chosen to hold one chunk's graph at a time
        model, alg = learner("maml", 0, memory=memory, max_memory_mb=100)
        assert alg.task_workers(model, b, 6) == 1
    model, alg = learner("maml", 0)
    assert alg.task_workers(model, b, 1) == 1
    torch.set_num_threads(1)
    assert alg.task_workers(model, b, 6) == 1


def test_threaded_evaluation_equals_serial(two_threads):
    b = batch(tasks=5)
    out = {}
    for threads in (1, 0):
        model, alg = learner("maml", threads, head_init="proto", eval_steps=2)
        model.eval()
        assert alg.task_workers(model, b, 5, training=False) == (2 if threads == 0 else 1)
        out[threads] = alg.evaluate_episodes(model, list(b))
    for a, c in zip(out[1], out[0]):
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-10) and c["accuracy"] == a["accuracy"]
    # evaluation builds no meta-graph, so a memory mode does not keep it serial
    model, alg = learner("maml", 0, memory="checkpoint")
    assert alg.task_workers(model, b, 5, training=False) == 2


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_bad_task_threads_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="task_threads must be an integer >= 0"):
        build_algorithm("maml", task_threads=bad)


class FunctionalNoiseTrunk(nn.Module):
    """No random module: ``F.dropout`` and ``torch.randn_like`` noise in ``forward`` draw from the global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(144, 8)
        self.l2 = nn.Linear(8, 6)
        self.out_features = 6

    def forward(self, x):
        h = torch.tanh(self.l1(x.flatten(1)))
        h = torch.nn.functional.dropout(h, 0.3, self.training)
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        return torch.relu(self.l2(h))


def test_functional_randomness_is_detected_and_trains_serially_repeating_bitwise(two_threads, caplog):
    log = threaded_runs_equal_serial(FunctionalNoiseTrunk, caplog, lambda model: torch.get_rng_state(), seed=3,
                                     steps=3, lr=0.2)
    assert "global random-number generator" in log


@pytest.mark.parametrize("name,settings", [("maml", {}), ("maml", {"head_init": "proto"}), ("maml", {"head_init": "zero"}),
                                           ("metasgd", {"head_init": "zero"}), ("anil", {"head_init": "proto"})])
def test_models_that_draw_nothing_keep_their_threads(two_threads, monkeypatch, name, settings):
    """Per-task heads too: each worker's clone built its head template with nn.Linear's random
    init, so every per-task-head model fell back to serial for good, said to draw random numbers."""
    import metamtl.algorithms.base as base

    calls = []

    def counted(*args, **kwargs):
        out = map_chunks(*args, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr(base, "map_chunks", counted)
    model, alg = learner(name, 0, **settings)
    model.train()
    b = batch()
    for _ in range(2):
        meta_gradient(model, alg, b)
    assert calls == [6, 6]  # both meta-steps ran threaded, none fell back
    assert alg.task_workers(model, b, 6) == 2 and threadable(model) is None


class RunningMeanTrunk(nn.Module):
    """A hand-written running normaliser: an EMA buffer updated in place in the training forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(144, 6)
        self.register_buffer("mu", torch.zeros(6))
        self.out_features = 6

    def forward(self, x):
        h = self.l1(x.flatten(1))
        if self.training:
            with torch.no_grad():
                self.mu.mul_(0.5).add_(0.5 * h.mean(0))
        return torch.tanh(h - self.mu)


class ReassignedBufferTrunk(RunningMeanTrunk):
    """The same normaliser, assigning a new tensor to its buffer instead of updating it in place."""

    def forward(self, x):
        h = self.l1(x.flatten(1))
        if self.training:
            self.mu = (0.5 * self.mu + 0.5 * h.mean(0)).detach()
        return torch.tanh(h - self.mu)


@pytest.mark.parametrize("trunk", [RunningMeanTrunk, ReassignedBufferTrunk])
def test_buffers_written_in_the_forward_pass_are_detected_and_train_serially_repeating_bitwise(two_threads, caplog, trunk):
    """Threads ran the tasks over the model's shared buffers: a user module updating one in its
    forward pass (an EMA, a counter) interleaved nondeterministically, so seeded runs differed from the
    serial run and from each other (or, assigning a new tensor, the update was lost in a worker's clone)."""
    log = threaded_runs_equal_serial(trunk, caplog, lambda model: model.trunk.mu.clone(), steps=1, lr=0.1)
    assert "writes its buffer 'trunk.mu'" in log
