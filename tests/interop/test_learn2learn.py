"""learn2learn interop: ``metamtl.tasks.from_learn2learn`` and MAML meta-gradients against learn2learn's.

learn2learn is optional (``make learn2learn`` builds it; CI does not have it): the tests that
need it skip without it, the others check that metamtl never needs it and says how to get it.
"""
from __future__ import annotations

import copy
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.callbacks import Callback
from metamtl.data import Omniglot
from metamtl.errors import MissingDependencyError, TaskError
from metamtl.models import build_model
from metamtl.tasks import Learn2LearnTasks, Learn2LearnTasksets, from_learn2learn

from . import fake_learn2learn

SOURCES = ("images_background_small1", "images_background_small2")


# -- without learn2learn -----------------------------------------------------------------------------
def test_metamtl_never_imports_learn2learn():
    code = ("import sys, metamtl, metamtl.tasks, metamtl.learner, metamtl.cli, metamtl.experiment; "
            "print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('learn2learn', 'gym')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_learn2learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` raises ImportError
    with pytest.raises(MissingDependencyError, match="make learn2learn") as err:
        from_learn2learn(object(), shots=1)
    assert isinstance(err.value, ImportError)
    assert "tools/build_learn2learn.sh" in str(err.value) and "Python 3.11" in str(err.value)


def test_side_by_side_benchmark_without_learn2learn_says_how_to_install(tmp_path):
    """benchmarks/learn2learn_side_by_side.py showed its child's raw ModuleNotFoundError."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "learn2learn_side_by_side.py"
    code = ("import runpy, sys; sys.modules['learn2learn'] = None; "  # as if not installed
            f"sys.argv = [{str(script)!r}, '--iterations', '1', '--data-root', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "learn2learn is not installed" in out.stderr and "make learn2learn" in out.stderr
    assert "ModuleNotFoundError" not in out.stderr and "run failed" not in out.stderr


def test_one_way_tasks_are_refused_from_learn2learn_and_any_task_source():
    """A 1-way task scores 100% and trains nothing (loss 0): a learn2learn taskset drawing one class
    is a TaskError naming NWays; a custom task source's 1-way episodes fail fit and evaluate."""
    from metamtl.tasks import Episode

    class OneWay:  # learn2learn's taskset interface: task i -> [images, labels]
        num_tasks = -1

        def __getitem__(self, i):
            return [torch.rand(4, 1, 8, 8), torch.tensor([7, 7, 7, 7])]

    learner = MetaLearner(build_model("conv4", hidden=4, blocks=2, out_features=None, image_size=8),
                          build_algorithm("protonet"), device="cpu")
    with pytest.raises(TaskError, match=r"1 class \(\[7\]\).*NWays\(dataset, n\) with n >= 2"):
        learner.fit(Learn2LearnTasks(OneWay(), shots=1), iterations=1, meta_batch_size=1, progress=False)

    class Custom:  # any other task source
        ways, shots, queries, name = 1, 1, 2, "custom"

        def episode(self, index):
            return Episode(torch.rand(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.rand(2, 1, 8, 8),
                           torch.zeros(2, dtype=torch.long), ways=1, shots=1, queries=2, index=index)

    for run in (lambda: learner.fit(Custom(), iterations=1, meta_batch_size=1, progress=False),
                lambda: learner.evaluate(Custom(), episodes=2, progress=False)):
        with pytest.raises(TaskError, match="episode 0 is 1-way: .*accuracy 100%.*2 or more classes per task"):
            run()
    assert learner.iteration == 0


@pytest.fixture
def fake_l2l(monkeypatch):
    """learn2learn's TaskDataset behaviour (fake_learn2learn.py), without learn2learn installed."""
    return fake_learn2learn.install(monkeypatch)


def test_fixed_taskset_evaluates_each_task_once(fake_l2l):
    """evaluate(episodes=100) on a taskset of num_tasks=10 scored the 10 tasks 10 times each and
    counted 100 episodes (a CI too narrow by ~sqrt(10)); like a list of episodes, it is capped."""
    test = from_learn2learn(fake_learn2learn.toy_taskset(num_tasks=10), shots=2)
    assert len(test) == 10 and len(from_learn2learn(fake_learn2learn.toy_taskset(), shots=2)) > 10**9
    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3),
                          build_algorithm("maml", lr=0.1, steps=1), device="cpu")
    ten, many = (learner.evaluate(test, episodes=n, progress=False) for n in (10, 100))
    assert ten.episodes == many.episodes == 10
    assert ten.accuracy == many.accuracy and ten.ci95 == many.ci95
    assert learner.evaluate(test, episodes=100, start=7, progress=False).episodes == 10  # tasks 7..9, 0..6


def test_fixed_taskset_episodes_ignore_the_taskset_history(fake_l2l):
    """learn2learn caches task i's description the first time it is drawn: a second seed on the same
    taskset (or a taskset.sample() before wrapping it) gave the first seed's (or a random) episodes."""
    def supports(src):
        return [src.episode(i).support_x for i in range(5)]

    shared = fake_learn2learn.toy_taskset(num_tasks=5)
    a, b = supports(from_learn2learn(shared, shots=2, seed=0)), supports(from_learn2learn(shared, shots=2, seed=1))
    fresh = supports(from_learn2learn(fake_learn2learn.toy_taskset(num_tasks=5), shots=2, seed=1))
    used = fake_learn2learn.toy_taskset(num_tasks=5)
    random.seed(123)
    for _ in range(20):
        used.sample()
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(b, fresh))
    assert all(torch.equal(x, y) for x, y in zip(fresh, supports(from_learn2learn(used, shots=2, seed=1))))
    src = from_learn2learn(shared, shots=2, seed=1)
    assert torch.equal(src.episode(7).support_x, b[2])  # still task i mod N


# -- with learn2learn --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def l2l():
    return pytest.importorskip("learn2learn", reason="learn2learn not installed (make learn2learn)")


@pytest.fixture(scope="module")
def omniglot(data_root):
    """Omniglot small1+small2 train characters, without the Greek and Latin ones: both zips hold the
    same files for those, so the merged characters hold every drawing twice."""
    ds = Omniglot(data_root, "train", sources=SOURCES)
    return ds.subset([c for c in range(ds.num_classes) if int(ds.class_counts[c]) == 20])


def taskset(l2l, images, labels, ways=5, k=2, num_tasks=-1, load=True, remap=True):
    """The pipeline of learn2learn's Omniglot example, on a metamtl dataset's tensors."""
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    t = l2l.data.transforms
    transforms = [t.NWays(meta, ways), t.KShots(meta, k)]
    transforms += [t.LoadData(meta)] if load else []
    transforms += [t.RemapLabels(meta), t.ConsecutiveLabels(meta)] if remap else []
    return l2l.data.Taskset(meta, task_transforms=transforms, num_tasks=num_tasks)


def row_classes(ds):
    """Image bytes -> dataset class, to trace episode images back to their characters."""
    return {bytes(img.flatten().tolist()): int(y) for img, y in zip(ds.images, ds.labels)}


def test_taskdataset_episodes_hold_real_classes(l2l, omniglot):
    src = from_learn2learn(taskset(l2l, omniglot.images, omniglot.labels, k=4), shots=1,
                           preprocessing=omniglot.preprocessing, name="omni")
    assert isinstance(src, Learn2LearnTasks)
    assert (src.ways, src.shots, src.queries) == (5, 1, 3) and src.num_classes == omniglot.num_classes
    lookup = row_classes(omniglot)
    for i in range(10):
        ep = src.episode(i)
        assert ep.support_x.shape == (5, 1, 28, 28) and ep.query_x.shape == (15, 1, 28, 28)
        assert ep.support_x.dtype == torch.uint8 and ep.dataset == "omni" and ep.index == i
        assert ep.support_y.tolist() == list(range(5)) and ep.query_y.tolist() == sorted(list(range(5)) * 3)
        chars = []
        for c in range(5):
            rows = torch.cat([ep.support_x[ep.support_y == c], ep.query_x[ep.query_y == c]])
            owners = {lookup[bytes(r.flatten().tolist())] for r in rows}
            assert len(owners) == 1  # one character per label, support and query alike
            assert len({bytes(r.flatten().tolist()) for r in rows}) == 4  # 4 distinct drawings
            chars += owners
        assert len(set(chars)) == 5
        # float model input through the dataset's preprocessing, as EpisodeSampler episodes
        assert ep.to("cpu").support_x.dtype == torch.float32


def test_episodes_are_seeded_and_leave_global_random_state_alone(l2l, omniglot):
    ts = taskset(l2l, omniglot.images, omniglot.labels)
    a, b = from_learn2learn(ts, seed=3), from_learn2learn(ts, seed=3)
    random.seed(0)
    torch.manual_seed(0)
    expected = (random.random(), torch.rand(1))
    random.seed(0)
    torch.manual_seed(0)
    eps = [a.episode(i) for i in (5, 6, 5)]
    assert (random.random(), torch.rand(1)) == expected
    assert torch.equal(eps[0].support_x, eps[2].support_x) and torch.equal(eps[0].query_x, eps[2].query_x)
    assert torch.equal(b.episode(6).query_x, eps[1].query_x)
    assert not torch.equal(eps[0].support_x, eps[1].support_x)
    assert not torch.equal(from_learn2learn(ts, seed=4).episode(5).support_x, eps[0].support_x)
    assert torch.equal(a[7].support_x, a.episode(7).support_x)


def test_fixed_num_tasks_cycle(l2l, omniglot):
    src = from_learn2learn(taskset(l2l, omniglot.images, omniglot.labels, num_tasks=4))
    assert torch.equal(src.episode(1).support_x, src.episode(5).support_x)
    assert not torch.equal(src.episode(1).support_x, src.episode(2).support_x)


def test_shots_rule_and_custom_split(l2l, omniglot):
    ts = taskset(l2l, omniglot.images, omniglot.labels, ways=3, k=5)
    half = from_learn2learn(ts)  # shots=None: half of each class, rounded down
    assert (half.ways, half.shots, half.queries) == (3, 2, 3)
    # partition_task's rule: per class, the first `shots` examples of the task are the support set
    fixed = taskset(l2l, omniglot.images, omniglot.labels, ways=3, k=5, num_tasks=2)
    ep = from_learn2learn(fixed, shots=2, seed=1).episode(1)
    ref_x, ref_y = fixed[1]  # learn2learn caches a fixed taskset's task descriptions: the same task
    for c in range(3):
        rows = ref_x[ref_y == c]
        assert torch.equal(ep.support_x[ep.support_y == c], rows[:2])
        assert torch.equal(ep.query_x[ep.query_y == c], rows[2:])

    def every_other(data, labels):  # learn2learn's maml_omniglot.py convention
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[::2] = True
        return (data[mask], labels[mask]), (data[~mask], labels[~mask])

    alt = from_learn2learn(taskset(l2l, omniglot.images, omniglot.labels, ways=3, k=4), split=every_other)
    assert (alt.ways, alt.shots, alt.queries) == (3, 2, 2)


def test_renumbers_labels_without_remaplabels(l2l, omniglot):
    src = from_learn2learn(taskset(l2l, omniglot.images, omniglot.labels, remap=False), shots=1)
    ep = src.episode(2)
    assert ep.support_y.tolist() == list(range(5))
    assert len(ep.classes) == 5 and list(ep.classes) == sorted(ep.classes)  # the dataset's class ids
    lookup = row_classes(omniglot)
    assert [lookup[bytes(r.flatten().tolist())] for r in ep.support_x] == list(ep.classes)


def test_malformed_tasks_raise_task_errors(l2l, omniglot):
    images, labels = omniglot.images, omniglot.labels
    with pytest.raises(TaskError, match="KShots"):
        from_learn2learn(taskset(l2l, images, labels, k=1))  # no query example
    with pytest.raises(TaskError, match="more than shots=3"):
        from_learn2learn(taskset(l2l, images, labels, k=3), shots=3)
    with pytest.raises(TaskError, match="LoadData"):
        from_learn2learn(taskset(l2l, images, labels, load=False, remap=False))
    with pytest.raises(TaskError, match="integer class ids"):
        from_learn2learn(taskset(l2l, images, labels.double(), remap=False))
    with pytest.raises(TaskError, match="query examples per class differ"):
        from_learn2learn(taskset(l2l, images, labels, k=3),
                         split=lambda x, y: ((x, y), (x[1:], y[1:])))  # one class loses a query
    with pytest.raises(TaskError, match="every class needs support and query"):
        from_learn2learn(taskset(l2l, images, labels, k=3),
                         split=lambda x, y: ((x, y), (x[y == y[0]], y[y == y[0]])))
    with pytest.raises(TaskError, match="split must return"):
        from_learn2learn(taskset(l2l, images, labels), split=lambda x, y: x)
    with pytest.raises(TaskError, match="not both"):
        from_learn2learn(taskset(l2l, images, labels), shots=1, split=lambda x, y: ((x, y), (x, y)))
    with pytest.raises(TaskError, match="Taskset/TaskDataset"):
        from_learn2learn([1, 2, 3])
    with pytest.raises(TaskError, match="Taskset/TaskDataset"):
        from_learn2learn(torch.utils.data.TensorDataset(images, labels))


def test_get_tasksets_triple_trains_and_evaluates(l2l, data_root):
    """The (train, validation, test) triple of get_tasksets, here built from metamtl's splits (the real
    get_tasksets('omniglot') needs the full Omniglot download), drives fit/evaluate."""
    splits = [Omniglot(data_root, s, sources=SOURCES) for s in ("train", "val", "test")]
    triple = l2l.vision.benchmarks.BenchmarkTasksets(*(
        taskset(l2l, ds.images, ds.labels, k=2, num_tasks=-1 if i == 0 else 20) for i, ds in enumerate(splits)))
    tasks = from_learn2learn(triple, shots=1, name="omni", preprocessing=splits[0].preprocessing)
    assert isinstance(tasks, Learn2LearnTasksets)
    assert [t.name for t in tasks] == ["omni/train", "omni/validation", "omni/test"]
    assert [t.num_classes for t in tasks] == [ds.num_classes for ds in splits]

    def fit():
        torch.manual_seed(0)
        learner = MetaLearner(build_model("conv4", hidden=16, out_features=None),
                              build_algorithm("anil", steps=2, lr=0.1, head_init="proto"),
                              meta_lr=2e-3, device="cpu", preprocessing=splits[0].preprocessing)
        learner.fit(tasks.train, tasks.validation, iterations=4, meta_batch_size=4, val_every=2, val_episodes=5,
                    progress=False)
        return learner

    learner = fit()
    assert [r["iteration"] for r in learner.history if "val/accuracy" in r] == [2, 4]
    result = learner.evaluate(tasks.test, episodes=20, progress=False)
    assert result.episodes == 20 and result.accuracy > 0.4  # chance: 0.2 (prototypes on conv features)
    # seeded episodes: the same run twice gives the same weights
    again = fit()
    for a, b in zip(learner.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


class GradCapture(Callback):
    def on_after_backward(self, state):
        self.grads = {n: p.grad.detach().clone() for n, p in state.learner.model.named_parameters()}


@pytest.mark.parametrize("name,first_order", [("maml", False), ("fomaml", True)])
def test_maml_meta_gradient_matches_learn2learn(l2l, omniglot, float64, name, first_order):
    """Same model, same tasks: metamtl's MAML meta-gradient equals learn2learn's (float64, 1e-5)."""
    images = omniglot.preprocessing.normalize(omniglot.images).double()
    src = from_learn2learn(taskset(l2l, images, omniglot.labels, k=4), shots=2)
    tasks, steps, lr = [src.episode(i) for i in range(3)], 2, 0.4
    torch.manual_seed(0)
    model = build_model("conv4", hidden=8, out_features=5)
    ref_model = copy.deepcopy(model)

    capture = GradCapture()
    learner = MetaLearner(model, build_algorithm(name, steps=steps, lr=lr), device="cpu")
    learner.fit(src, iterations=1, meta_batch_size=len(tasks), callbacks=[capture], progress=False)

    maml = l2l.algorithms.MAML(ref_model, lr=lr, first_order=first_order)
    for ep in tasks:  # learn2learn's training loop: clone, adapt on support, backward the query loss
        learner_l2l = maml.clone()
        for _ in range(steps):
            learner_l2l.adapt(F.cross_entropy(learner_l2l(ep.support_x), ep.support_y))
        (F.cross_entropy(learner_l2l(ep.query_x), ep.query_y) / len(tasks)).backward()
    ref = {n: p.grad for n, p in maml.module.named_parameters()}
    assert capture.grads.keys() == ref.keys()
    for n in ref:
        assert capture.grads[n].dtype == torch.float64
        torch.testing.assert_close(capture.grads[n], ref[n], rtol=0, atol=1e-5, msg=n)
    assert max(g.abs().max() for g in ref.values()) > 1e-3  # a real gradient, not zeros


def test_learn2learn_network_as_trunk_head(l2l, omniglot):
    """The README's rewrite: learn2learn's OmniglotFC wrapped as TrunkHead(features, classifier)."""
    from metamtl.models import TrunkHead

    images = omniglot.images.float() / 255
    train = from_learn2learn(taskset(l2l, images, omniglot.labels), shots=1)
    val = from_learn2learn(taskset(l2l, images, omniglot.labels, num_tasks=5), shots=1)
    torch.manual_seed(0)
    net = l2l.vision.models.OmniglotFC(28 ** 2, 5)
    before = copy.deepcopy(net.state_dict())
    learner = MetaLearner(TrunkHead(net.features, net.classifier), build_algorithm("maml", steps=1, lr=0.5),
                          meta_lr=0.003, device="cpu")
    learner.fit(train, val, iterations=2, meta_batch_size=4, val_every=2, val_episodes=5, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # trained in place
    result = learner.evaluate(val, episodes=5, progress=False)
    assert result.episodes == 5 and 0.0 <= result.accuracy <= 1.0
    assert torch.isfinite(torch.tensor([r.get("val/loss", 0.0) for r in learner.history])).all()
