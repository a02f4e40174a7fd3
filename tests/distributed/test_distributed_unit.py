"""In-process pieces of distributed training: launch environment, task shares, single-process no-op."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import dist_worker
from metamtl import distributed
from metamtl.errors import DistributedError, FitInterrupted, MetamtlError
from metamtl.interrupt import StopOnSignal
from metamtl.learner import resolve_device
from metamtl.tasks import EpisodeSampler, task_batches
from metamtl.tasks.sampler import MetaBatchIndexSampler

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "METAMTL_DIST_TIMEOUT")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return set_env


def test_plain_process_is_rank_0_of_1(env):
    e = distributed.launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.distributed, e.is_main_process) == (0, 1, 0, False, True)
    assert distributed.rank_tag() == ""
    assert distributed.init_distributed("cpu") == e and not dist.is_initialized()


def test_torchrun_variables_are_read(env):
    env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4)
    e = distributed.launch_env()
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (5, 8, 1, 4)
    assert not e.is_main_process and e.distributed
    assert distributed.rank_tag() == " (rank 5/8)"
    # an unindexed CUDA device means this process's GPU; CPU and explicit indices are kept
    assert distributed.process_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.process_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("values, message", [
    ({"WORLD_SIZE": 2}, "RANK is not"),
    ({"WORLD_SIZE": 2, "RANK": 2}, "RANK=2 must be in 0..WORLD_SIZE-1"),
    ({"WORLD_SIZE": "two", "RANK": 0}, "WORLD_SIZE='two' must be an integer"),
    ({"WORLD_SIZE": 0, "RANK": 0}, "WORLD_SIZE=0 must be >= 1"),
])
def test_bad_launch_environment_is_a_clear_error(env, values, message):
    env(**values)
    with pytest.raises(DistributedError, match=message) as info:
        distributed.launch_env()
    assert isinstance(info.value, MetamtlError)


def test_collective_timeout_setting(env):
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT
    assert distributed.timeout_seconds(5) == 5.0
    env(METAMTL_DIST_TIMEOUT="12.5")
    assert distributed.timeout_seconds() == 12.5
    env(METAMTL_DIST_TIMEOUT="soon")
    with pytest.raises(DistributedError, match="METAMTL_DIST_TIMEOUT='soon'"):
        distributed.timeout_seconds()
    with pytest.raises(DistributedError, match="> 0"):
        distributed.timeout_seconds(0)


def test_world_size_1_launch_trains_without_a_process_group(env):
    env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0)
    job = {"name": "one", "algorithm": "reptile", "iterations": 2, "meta_batch_size": 2, "val_every": 2}
    result = dist_worker.run_job(job)
    assert result["world_size"] == 1 and result["iteration"] == 2 and not dist.is_initialized()


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 12), world=st.integers(1, 12), start=st.integers(0, 50))
def test_rank_shares_are_disjoint_and_their_union_is_the_meta_batch(batch, world, start):
    if world > batch:
        return
    full = list(MetaBatchIndexSampler(batch, start, 2))
    shares = [list(MetaBatchIndexSampler(batch, start, 2, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == full == list(range(start * batch, (start + 2) * batch))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 2 and min(sizes) >= 2  # every rank gets >= 1 task per batch


def test_ranks_draw_the_same_episodes_as_one_process():
    sampler = EpisodeSampler(dist_worker.toy_dataset(), 5, 1, 2, seed=7)
    single = next(task_batches(sampler, 5, start_batch=3, num_batches=1))
    parts = [next(task_batches(sampler, 5, start_batch=3, num_batches=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(p) for p in parts] == [3, 2]
    by_index = {ep.index: ep for p in parts for ep in p}
    assert sorted(by_index) == single.indices
    for ep in single:
        assert torch.equal(by_index[ep.index].support_x, ep.support_x)
        assert by_index[ep.index].classes == ep.classes


def test_more_ranks_than_tasks_is_refused():
    sampler = EpisodeSampler(dist_worker.toy_dataset(), 5, 1, 2)
    with pytest.raises(MetamtlError, match="meta batch size 2 is smaller than the number of ranks 3"):
        next(task_batches(sampler, 2, rank=0, world_size=3))


@pytest.mark.parametrize("rank, printed", [(0, True), (1, False)])
def test_library_messages_are_printed_by_rank_0_alone(env, monkeypatch, capsys, rank, printed):
    """``metamtl`` CLI under torchrun: "[metamtl] resumed from ..." (and the planners' messages) once, not per rank."""
    import logging

    from metamtl import cli

    logger = logging.getLogger("metamtl")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank)
    cli._show_library_messages()
    logging.getLogger("metamtl.fit").info("resumed from last.pt")
    assert ("[metamtl] resumed from last.pt" in capsys.readouterr().out) == printed


@pytest.mark.parametrize("world, grace, second, aborts", [
    (2, None, signal.SIGTERM, False),  # torchrun's agent passing the stop on: still saves
    (2, None, signal.SIGINT, True),  # the same signal again: abort at once
    (2, 0.0, signal.SIGTERM, True),  # another signal after the grace period: abort
    (1, None, signal.SIGTERM, True),  # one process: any second signal aborts, as before
])
def test_a_second_signal_of_another_kind_under_torchrun_is_the_launchers(env, world, grace, second, aborts):
    """Before: under torchrun the launcher's SIGTERM right after the workers' SIGINT (a wrapped
    ``torchrun``) aborted every rank without saving, like a second Ctrl-C."""
    env(RANK=0, WORLD_SIZE=world, LOCAL_RANK=0)
    stop = StopOnSignal(lambda: 4) if grace is None else StopOnSignal(lambda: 4, grace=grace)
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        if aborts:
            with pytest.raises(FitInterrupted, match=f"second {signal.Signals(second).name}: aborted during iteration 5"):
                os.kill(os.getpid(), second)
        else:
            try:
                os.kill(os.getpid(), second)
            except FitInterrupted as exc:  # a KeyboardInterrupt: would end the test session
                pytest.fail(f"the launcher's {second.name} aborted the fit: {exc}")
            assert stop.signum == signal.SIGINT  # the stop request stands: finish the iteration and save
            with pytest.raises(FitInterrupted, match="second SIGINT"):
                os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("flags", [["--threads", "1"], ["--procs", "1", "--threads", "2"]])
def test_distributed_benchmark_measures_each_process_thread_pair_once(benchmark_script, monkeypatch, capsys, flags):
    """With --threads 1 (the default on one core) or --procs 1, two runs had the same tag and
    the second `metamtl fit` into the first one's run folder failed the script."""
    import sys

    bench = benchmark_script("distributed")
    tags = []

    def fake_fit(tag, procs, threads, args, out):
        tags.append(tag)
        return {"tag": tag, "its": 1.0, "train": 1.0, "eval": 1.0, "wall": 1.0, "weights": {"w": torch.zeros(1)},
                "accuracy": 0.5}

    monkeypatch.setattr(bench, "fit", fake_fit)
    monkeypatch.setattr(sys, "argv", ["distributed.py", *flags])
    bench.main()
    assert len(tags) == len(set(tags)) == 2
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0][2:] for line in table] == tags
