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


RELEASE = """
import re, torch
from metamtl.allocator import mapped_large_blocks, tune_cpu_allocator
tune_cpu_allocator()
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def released(mib):  # MiB the process gives back when a freshly written block of `mib` MiB is freed
    x = torch.ones(mib * 262144)
    held = rss()
    del x
    return held - rss()
with mapped_large_blocks() as on:
    out = [released(64), released(6), released(1)]
out += [released(64), released(6)]
print(on, *out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_memory_bounded_steps_give_freed_large_blocks_back():
    """Inside ``mapped_large_blocks`` (memory-bounded meta-steps) a freed block of 4 MiB or more
    leaves the resident set at once instead of growing the heap, so RSS follows the memory held
    (glibc still serves such a block from free heap memory when it has some); the tuned settings
    come back on exit: the heap keeps freed blocks for reuse."""
    from metamtl.allocator import _libc

    if _libc() is None:
        pytest.skip("not glibc")
    env = {**os.environ, "METAMTL_TUNE_MALLOC": "1"}
    out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, check=True)
    on, *mib = out.stdout.split()
    in64, in6, in1, after64, after6 = map(float, mib)
    assert on == "True"
    assert in64 > 56 and in6 > 5  # mapped: given back
    assert in1 < 1  # small blocks still come from the heap
    assert after64 < 8 and after6 < 2  # tuned settings restored


def test_mapped_large_blocks_leaves_an_untuned_allocator_alone(monkeypatch):
    from metamtl import allocator

    monkeypatch.setitem(allocator._state, "tuned", False)
    calls = []
    monkeypatch.setattr(allocator, "_libc", lambda: calls.append(1))
    with allocator.mapped_large_blocks() as on:
        assert on is False
    assert calls == []


@pytest.mark.parametrize("memory, bounded", [("full", False), ("checkpoint", True), ("implicit", True), ("auto", True)])
def test_memory_bounded_meta_steps_map_large_blocks(monkeypatch, memory, bounded):
    import contextlib

    import torch

    import metamtl.algorithms.base as base
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model
    from metamtl.tasks import Episode, TaskBatch

    entered = []

    @contextlib.contextmanager
    def record():
        entered.append(True)
        yield True

    monkeypatch.setattr(base, "mapped_large_blocks", record)
    torch.manual_seed(0)
    net = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=2)
    settings = {"max_memory_mb": 10_000} if memory == "auto" else {}
    alg = build_algorithm("imaml" if memory == "implicit" else "maml", steps=2, lr=0.1, memory=memory, **settings)
    ep = Episode(torch.randn(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]),
                 ways=2, shots=2, queries=2)
    alg.meta_step(net, TaskBatch([ep, ep]))
    assert entered == ([True] if bounded else [])
    assert all(p.grad is not None for p in net.parameters())
