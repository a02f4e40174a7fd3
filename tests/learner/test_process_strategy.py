"""The distributed strategy sees only tensors, metrics and fingerprints."""
from __future__ import annotations

import pytest
import torch

from metamtl import distributed
from metamtl.distributed import ProcessStrategy, TorchDistributed
from metamtl.errors import DistributedError

from .conftest import sine_learner


def test_one_process_keeps_everything_and_shares_nothing():
    s = ProcessStrategy()
    assert s.shard(5) == [0, 1, 2, 3, 4] and s.is_main_process
    assert s.gather_ordered([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    assert s.any_rank(True, False) == (True, False)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert s.reduce_gradients([p], {"loss": 1.0}, 4) == {"loss": 1.0} and p.grad.tolist() == [3.0, 3.0]
    t = torch.ones(2)
    s.all_reduce_sum([t], "test")
    assert s.all_gather({"a": 1}, "test") == [{"a": 1}] and t.tolist() == [1.0, 1.0]


def test_ranks_take_interleaved_shares():
    assert [TorchDistributed(r, 3).shard(7) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_a_rank_with_another_fingerprint_is_refused_before_any_weight_moves(monkeypatch):
    mine = {"config": {"algorithm": {"steps": 1}}, "iteration": 4}
    theirs = {"config": {"algorithm": {"steps": 2}}, "iteration": 4}
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, what: [mine, theirs])
    monkeypatch.setattr(distributed.dist, "broadcast", lambda *a, **k: pytest.fail("broadcast after a mismatch"))
    with pytest.raises(DistributedError, match=r"rank 1 does not run the same fit as rank 0.*\n  config.algorithm.steps: 1 != 2"):
        TorchDistributed(0, 2).sync_start(mine, [torch.zeros(1)])


def test_the_learner_hands_the_strategy_its_fingerprint_and_weights(monkeypatch):
    seen = {}

    class Spy(ProcessStrategy):
        def sync_start(self, fingerprint, tensors):
            seen.update(fingerprint=fingerprint, tensors=list(tensors))

    from metamtl.tasks import Sinusoid

    monkeypatch.setattr(distributed, "process_strategy", lambda device: Spy())
    learner = sine_learner()
    learner.fit(Sinusoid(shots=3, queries=3), iterations=1, meta_batch_size=2, progress=False)
    fp = seen["fingerprint"]
    assert fp["config"] == learner.config() and fp["iteration"] == 0 and fp["fit"]["meta_batch_size"] == 2
    assert len(seen["tensors"]) == len(learner.model.state_dict()) + len(learner.algorithm.state_dict())
    assert all(isinstance(t, torch.Tensor) for t in seen["tensors"])
