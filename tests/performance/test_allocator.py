"""CPU allocator tuning: freed tensor memory is reused instead of being handed back to the OS."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHURN = """
import resource, torch
import metamtl, metamtl.learner  # a training process: `import metamtl` alone loads nothing (lazy)
from metamtl.allocator import tune_cpu_allocator
torch.set_num_threads(1)
if {learner}:
    from metamtl.models import build_model
    metamtl.MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=2), "maml", device="cpu")
else:
    tune_cpu_allocator()
def churn(rounds={rounds}):
    for _ in range(rounds):  # the allocation pattern of a training step: several large tensors
        xs = [torch.ones({mib} * 262144) for _ in range(3)]
        del xs
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(tune: bool, learner: bool = False, mib: int = 4, rounds: int = 20) -> int:
    # glibc's start-up thresholds, pinned: left alone, glibc raises them by itself after the first
    # large free and, depending on what the heap held before (imports), may stop trimming after a
    # few rounds, so the untuned baseline could fault 0 pages on one machine and 60k on another.
    # Pinned, every untuned round maps and faults its 12 MiB; metamtl's mallopt overrides the pin.
    env = {**os.environ, "METAMTL_TUNE_MALLOC": "1" if tune else "0",
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", CHURN.format(learner=learner, mib=mib, rounds=rounds)], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_memory_instead_of_faulting_in_new_pages():
    from metamtl.allocator import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    untuned = page_faults(False)
    assert untuned > 10_000  # glibc trims the heap and faults 3 x 4 MiB in again every round
    assert page_faults(True) < untuned / 20
    # a CPU MetaLearner tunes it by itself
    assert page_faults(True, learner=True) < untuned / 20


def test_opt_out_and_idempotence(monkeypatch):
    from metamtl import allocator

    monkeypatch.setitem(allocator._state, "tuned", None)
    monkeypatch.setenv("METAMTL_TUNE_MALLOC", "0")
    assert allocator.tune_cpu_allocator() is False
    assert allocator.tune_cpu_allocator() is False  # remembered
    monkeypatch.setenv("METAMTL_TUNE_MALLOC", "1")
    assert allocator.tune_cpu_allocator(force=True) is (allocator._libc() is not None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_blocks_above_the_largest_mmap_threshold_are_reused_too():
    """Tensors over 32 MiB (glibc's cap on the mmap threshold), such as one 84x84 feature map of a
    128-image batch, are mapped and unmapped at every allocation unless malloc's mmap is off."""
    from metamtl.allocator import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    untuned = page_faults(False, mib=40, rounds=4)
    assert untuned > 4 * 3 * 10_000  # every 40 MiB tensor faults its ~10,240 pages in again
    assert page_faults(True, mib=40, rounds=4) < untuned / 20


FRAGMENTED = """
import re, time, torch
from metamtl.allocator import trim_above, tune_cpu_allocator
tune_cpu_allocator()
torch.set_num_threads(1)
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
kept, big = [], []
for _ in range(40):  # large blocks with a small long-lived one after each: freed, they stay in the heap
    big.append(torch.ones(2 * 262144))
    kept.append(torch.ones(16))
del big
high = rss()
time.sleep(0.2)
untouched = rss()  # nothing gives the free blocks back by itself
with trim_above(high - 40) as guard:
    time.sleep(0.2)
    low = rss()
print(guard.active, guard.trims, high, untouched, low)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_trim_above_gives_free_heap_memory_back_past_the_limit():
    """``memory: auto``'s guard: 80 MB of freed blocks kept by the tuned heap (held in place by
    small live blocks) leave the resident set once it passes the limit."""
    from metamtl.allocator import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    env = {**os.environ, "METAMTL_TUNE_MALLOC": "1"}
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], env=env, capture_output=True, text=True, check=True)
    active, trims, high, untouched, low = out.stdout.split()
    high, untouched, low = float(high), float(untouched), float(low)
    assert active == "True" and int(trims) >= 1
    assert untouched > high - 5  # the heap kept the freed 80 MB
    assert low < high - 60  # the guard gave them back


def test_trim_above_is_inactive_without_glibc(monkeypatch):
    from metamtl import allocator

    monkeypatch.setattr(allocator, "_libc", lambda: None)
    with allocator.trim_above(1.0) as guard:
        assert guard.active is False and guard.trims == 0


@pytest.mark.parametrize("memory", ["full", "checkpoint", "implicit", "auto"])
def test_only_memory_auto_guards_its_budget(monkeypatch, memory):
    import contextlib

    import torch

    import metamtl.algorithms.base as base
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model
    from metamtl.tasks import Episode, TaskBatch

    limits = []

    @contextlib.contextmanager
    def record(limit_mb):
        limits.append(limit_mb)
        yield None

    monkeypatch.setattr(base, "trim_above", record)
    monkeypatch.setattr(base, "rss_mb", lambda: 1000.0)
    torch.manual_seed(0)
    net = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=2)
    settings = {"max_memory_mb": 500} if memory == "auto" else {}
    alg = build_algorithm("imaml" if memory == "implicit" else "maml", steps=2, lr=0.1, memory=memory, **settings)
    ep = Episode(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]),
                 ways=2, shots=2, queries=2)
    alg.meta_step(net, TaskBatch([ep, ep]))
    assert limits == ([1500.0] if memory == "auto" else [])
    assert all(p.grad is not None for p in net.parameters())


def test_cpu_per_iteration_takes_overrides_after_config(benchmark_script, monkeypatch, capsys, tmp_path):
    """`cpu_per_iteration.py 1 3 --config X model.hidden=8`, as its usage line writes it, failed with
    "unrecognized arguments: model.hidden=8"."""
    import json
    from types import SimpleNamespace

    import metamtl.experiment

    bench = benchmark_script("cpu_per_iteration")
    seen = []

    def fake_run(cfg, callbacks, **kwargs):
        seen.append(cfg)
        for i in range(1, cfg.train.iterations + 1):
            callbacks[0].on_iteration_end(SimpleNamespace(iteration=i), {})

    monkeypatch.setattr(metamtl.experiment, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["cpu_per_iteration.py", "1", "3", "--config", "configs/omniglot_5w1s.yaml",
                                      "model.hidden=8", "--data-root", str(tmp_path), "tasks.ways=4"])
    bench.main()
    assert seen[0].model["hidden"] == 8 and seen[0].tasks.ways == 4 and seen[0].train.iterations == 4
    assert "user_ms" in json.loads(capsys.readouterr().out)
