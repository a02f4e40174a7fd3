"""Task sampler: shapes, label remapping, seeding, disjoint splits, DataLoader workers."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from metamtl.data import ClassDataset
from metamtl.errors import TaskError
from metamtl.tasks import EpisodeSampler, MixedTasks, fixed_episodes, mixture_weights, task_batches


def make_dataset(classes=30, per_class=12, name="toy", size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 1, size, size), dtype=torch.uint8, generator=g)
    # encode the class in the first pixel so tests can check labels against images
    labels = torch.arange(classes).repeat_interleave(per_class)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    return ClassDataset(images, labels, [f"{name}{i}" for i in range(classes)], name=name)


def test_episode_shapes_and_label_remapping():
    s = EpisodeSampler(make_dataset(), ways=5, shots=2, queries=3, seed=0)
    ep = s[4]
    assert ep.support_x.shape == (10, 1, 8, 8) and ep.query_x.shape == (15, 1, 8, 8)
    assert ep.support_x.dtype == torch.uint8
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == sum([[k] * 3 for k in range(5)], [])
    # label k really is dataset class ep.classes[k], for support and query
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        original = x[:, 0, 0, 0].long()
        assert torch.equal(original, torch.tensor(ep.classes)[y])
    # no image appears twice in one episode
    rows = torch.cat([ep.support_x, ep.query_x]).flatten(1)
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]


def test_label_order_is_random_per_episode():
    s = EpisodeSampler(make_dataset(), ways=5, shots=1, queries=1, seed=0)
    orders = {tuple(s[i].classes) for i in range(20)}
    assert len(orders) == 20
    # the same class gets different labels in different episodes
    assert not all(sorted(o) == list(o) for o in orders)


def test_same_seed_same_episodes_different_seed_different():
    ds = make_dataset()
    a, b, c = (EpisodeSampler(ds, 5, 1, 5, seed=s) for s in (7, 7, 8))
    for i in (0, 3, 1000):
        assert torch.equal(a[i].query_x, b[i].query_x) and a[i].classes == b[i].classes
    assert any(a[i].classes != c[i].classes for i in range(5))
    assert a[0].classes != a[1].classes


def test_episodes_identical_in_another_process():
    ds_code = (
        "import torch,sys; sys.path.insert(0, 'tests/core');"
        "from test_sampler import make_dataset; from metamtl.tasks import EpisodeSampler;"
        "s=EpisodeSampler(make_dataset(),5,1,5,seed=3); e=s[11];"
        "print(list(e.classes), int(e.query_x.long().sum()))"
    )
    out = subprocess.run([sys.executable, "-c", ds_code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    e = EpisodeSampler(make_dataset(), 5, 1, 5, seed=3)[11]
    assert out == f"{list(e.classes)} {int(e.query_x.long().sum())}"


class EpisodesOnly:
    """A user's task source: ``episode(i)`` and ways/shots/queries/name (the TaskSource protocol), no ``__getitem__``."""

    def __init__(self, sampler):
        self.sampler, self.ways, self.shots, self.queries, self.name = sampler, 5, 1, 2, "user"

    def episode(self, i):
        return self.sampler.episode(i)


@pytest.mark.parametrize("user_source", [False, True])
def test_dataloader_workers_give_the_same_batches(user_source):
    s = EpisodeSampler(make_dataset(), 5, 1, 2, seed=1)
    s = EpisodesOnly(s) if user_source else s
    plain = list(task_batches(s, 4, num_batches=3))
    workers = list(task_batches(s, 4, num_batches=3, num_workers=2))
    assert [b.indices for b in plain] == [b.indices for b in workers] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for p, w in zip(plain, workers):
        for ep, ew in zip(p, w):
            assert torch.equal(ep.support_x, ew.support_x) and torch.equal(ep.query_y, ew.query_y)


def test_ranks_split_each_meta_batch():
    s = EpisodeSampler(make_dataset(), 5, 1, 1, seed=1)
    full = [b.indices for b in task_batches(s, 6, start_batch=2, num_batches=2)]
    r0 = [b.indices for b in task_batches(s, 6, start_batch=2, num_batches=2, rank=0, world_size=2)]
    r1 = [b.indices for b in task_batches(s, 6, start_batch=2, num_batches=2, rank=1, world_size=2)]
    for f, a, b in zip(full, r0, r1):
        assert sorted(a + b) == f and not set(a) & set(b)


def test_bad_arguments_raise_task_errors():
    ds = make_dataset(classes=4, per_class=5)
    with pytest.raises(TaskError, match="5-way tasks need 5 classes"):
        EpisodeSampler(ds, ways=5, shots=1, queries=1)
    with pytest.raises(TaskError, match="shots \\+ queries = 6"):
        EpisodeSampler(ds, ways=2, shots=1, queries=5)
    with pytest.raises(TaskError, match="ways must be an integer"):
        EpisodeSampler(ds, ways=0)
    with pytest.raises(TaskError, match="no classes"):
        EpisodeSampler(ds.subset([]), ways=1, queries=1)


def test_mixed_tasks_follow_weights_and_are_deterministic():
    a, b = make_dataset(name="a"), make_dataset(classes=90, name="b")
    mix = MixedTasks([EpisodeSampler(a, 5, 1, 1), EpisodeSampler(b, 5, 1, 1)], weights=[3, 1], seed=0)
    names = [mix[i].dataset for i in range(2000)]
    assert abs(names.count("a") / 2000 - 0.75) < 0.04
    assert [mix[i].dataset for i in range(50)] == names[:50]
    assert mixture_weights([30, 90], "size") == pytest.approx([0.25, 0.75])
    flat = mixture_weights([30, 90], "size", temperature=1e6)
    assert flat == pytest.approx([0.5, 0.5], abs=1e-4)
    with pytest.raises(TaskError):
        mixture_weights([1, 2], [1, -1])
    # numpy weights raised a bare "truth value of an array is ambiguous" ValueError
    assert mixture_weights([3, 4], np.array([1.0, 2.0])) == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(TaskError, match="got 1 weights for 2"):
        mixture_weights([3, 4], np.array([1.0]))
    # np.float32 is no float: "temperature must be > 0, got 0.5"
    assert mixture_weights([1, 2], None, np.float32(0.5)) == pytest.approx(mixture_weights([1, 2], None, 0.5))
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(TaskError, match=r"temperature must be > 0 \(a finite number\)"):
            mixture_weights([1, 2], None, bad)


def test_an_episode_index_that_is_no_integer_is_a_task_error():
    """A float or multi-element tensor has __index__ but raises a bare TypeError from it."""
    from metamtl.tasks import check_index

    s = EpisodeSampler(make_dataset(), 5, 1, 1, seed=2)
    assert check_index(torch.tensor(3)) == 3 and s.episode(np.int64(2)).index == 2
    for bad in (torch.tensor(2.0), torch.tensor([1, 2]), 2.0, -1, True):
        with pytest.raises(TaskError, match="episode index must be an integer >= 0"):
            check_index(bad)
    with pytest.raises(TaskError, match=r"episode index must be an integer >= 0, got tensor\(2\.\)"):
        s.episode(torch.tensor(2.0))


def test_fixed_episodes_are_the_first_indices():
    s = EpisodeSampler(make_dataset(), 5, 1, 1, seed=2)
    eps = fixed_episodes(s, 3, start=5)
    assert [e.index for e in eps] == [5, 6, 7]
    assert fixed_episodes(s, 0) == []
    for count, start, what in ((-1, 0, "count"), (2.5, 0, "count"), (2, -1, "start"), (2, "1", "start")):
        with pytest.raises(TaskError, match=f"{what} must be an integer >= 0"):  # [] or a bare TypeError
            fixed_episodes(s, count, start)
    # integer tensors and numpy integers count as integers (as for s.episode), a bool tensor does not
    assert [e.index for e in fixed_episodes(s, torch.tensor(2), torch.tensor(1))] == [1, 2]
    assert [e.index for e in fixed_episodes(s, np.int64(1))] == [0]
    for bad in (torch.tensor(2.0), torch.tensor(True), torch.tensor([1, 2])):
        with pytest.raises(TaskError, match="count must be an integer >= 0"):
            fixed_episodes(s, bad)


def test_threads_sharing_a_sampler_get_the_sequential_episodes():
    """The sampler reuses one Generator per thread: concurrent threads must not share draws."""
    from concurrent.futures import ThreadPoolExecutor

    sampler = EpisodeSampler(make_dataset(), ways=5, shots=2, queries=3, seed=4)
    indices = list(range(200))
    expected = [sampler.episode(i) for i in indices]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(sampler.episode, indices))
    for a, b in zip(expected, got):
        assert a.classes == b.classes
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_episode_rows_follow_the_documented_draws():
    """Episode i = randperm of classes, then the k smallest random keys per class, from
    episode_generator(seed, i): recomputed here independently of the sampler's code."""
    from metamtl.tasks.sampler import episode_generator

    ds = make_dataset(classes=12, per_class=9)
    sampler = EpisodeSampler(ds, ways=4, shots=1, queries=2, seed=11)
    for i in (0, 5, 1234):
        g = episode_generator(11, i)
        classes = torch.randperm(12, generator=g)[:4]
        keys = torch.rand(4, 9, generator=g)
        pos = keys.argsort(dim=1)[:, :3]
        rows = [int(ds.class_offsets[c]) + pos[j] for j, c in enumerate(classes.tolist())]
        ep = sampler.episode(i)
        assert ep.classes == tuple(classes.tolist())
        assert torch.equal(ep.support_x, ds.images[torch.stack([r[0] for r in rows])])
        assert torch.equal(ep.query_x, ds.images[torch.cat([r[1:] for r in rows])])
