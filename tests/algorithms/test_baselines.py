"""ProtoNet and the transfer baseline."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import Omniglot
from metamtl.errors import ConfigError, InputError
from metamtl.models import build_model, class_means
from metamtl.tasks import EpisodeSampler, TaskBatch

from algo_utils import episode, tiny, toy_dataset


def toy_learner(alg, **kw):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=None)
    return MetaLearner(model, alg, preprocessing=toy_dataset().preprocessing, device="cpu", meta_lr=3e-3, **kw)


def test_protonet_logits_are_negative_squared_distances_to_class_means(float64):
    model, ep = tiny(None), episode(ways=4, shots=3, seed=5)
    alg = build_algorithm("protonet")
    logits = alg.adapt(model, ep.support_x, ep.support_y, 4)(ep.query_x)
    feats, qfeats = model.trunk(ep.support_x), model.trunk(ep.query_x)
    means = torch.stack([feats[ep.support_y == k].mean(0) for k in range(4)])
    expected = -((qfeats[:, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected)
    # the training loss is the cross-entropy of these logits, backpropagated into the trunk
    model.zero_grad()
    alg.meta_step(model, TaskBatch([ep]))
    ref = torch.autograd.grad(F.cross_entropy(expected, ep.query_y), list(model.trunk.parameters()))
    for p, r in zip(model.trunk.parameters(), ref):
        torch.testing.assert_close(p.grad, r)


@pytest.fixture(scope="module")
def omniglot(data_root):
    """Omniglot small1+small2: train characters (rotated) and held-out test characters."""
    sources = ("images_background_small1", "images_background_small2")
    train = Omniglot(data_root, "train", sources=sources, rotations=(0, 90, 180, 270))
    return train, Omniglot(data_root, "test", sources=sources)


@pytest.mark.parametrize("name,classes,hidden,bound", [("protonet", None, 16, 0.6), ("transfer", 40, 32, 0.5)])
def test_baselines_learn_on_real_omniglot_well_above_chance(omniglot, name, classes, hidden, bound):
    train, test = omniglot
    train = train.subset(range(classes)) if classes else train
    torch.manual_seed(0)
    settings = {"num_classes": train.num_classes, "steps": 50} if name == "transfer" else {}
    learner = MetaLearner(build_model("conv4", hidden=hidden, out_features=None), build_algorithm(name, **settings),
                          meta_lr=3e-3, device="cpu", preprocessing=train.preprocessing)
    learner.fit(EpisodeSampler(train, 10, 1, 4, seed=0), iterations=30, meta_batch_size=4, progress=False)
    test_tasks = EpisodeSampler(test, 5, 1, 5, seed=1)
    result = learner.evaluate(test_tasks, 60, progress=False)
    assert result.accuracy - result.ci95 > bound, result  # chance is 0.2
    wide = learner.evaluate(test_tasks, 10, ways=20, progress=False)  # one trunk serves any ways
    assert wide.ways == 20 and wide.accuracy > 0.2  # chance is 0.05


def test_protonet_config_round_trip_and_errors():
    assert build_algorithm("protonet").config() == {"name": "protonet", "temperature": 1.0, "bn_stats": "transductive"}
    with pytest.raises(ConfigError, match="algorithm 'protonet' does not take \\['steps'\\]"):
        build_algorithm("protonet", steps=3)
    with pytest.raises(ConfigError, match="temperature"):
        build_algorithm("protonet", temperature=0)


def test_proto_head_initialiser_for_maml_starts_at_the_protonet_classifier(float64):
    """head_init='proto' gives MAML the ProtoNet decision rule before any inner step."""
    model, ep = tiny(None), episode(ways=4, shots=2, seed=6)
    proto = build_algorithm("protonet").adapt(model, ep.support_x, ep.support_y, 4)(ep.query_x)
    maml0 = build_algorithm("maml", head_init="proto", steps=0).adapt(model, ep.support_x, ep.support_y, 4)(ep.query_x)
    diff = maml0 - proto  # equal up to a per-query constant: same softmax, same predictions
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))
    torch.testing.assert_close(maml0.softmax(-1), proto.softmax(-1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_class_means_takes_labels_of_any_integer_dtype(dtype):
    features = torch.arange(12.0).view(4, 3)
    means = class_means(features, torch.tensor([0, 1, 0, 1], dtype=dtype), 2)
    torch.testing.assert_close(means, torch.stack([features[[0, 2]].mean(0), features[[1, 3]].mean(0)]))


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_transfer_pretrains_on_global_classes_and_fine_tunes_a_new_head(toy_tasks, classifier):
    train, val = toy_tasks
    alg = build_algorithm("transfer", num_classes=train.num_classes, classifier=classifier, steps=30)
    learner = toy_learner(alg)
    assert learner.model.head is None and learner.algorithm.head.out_features == 30
    history = learner.fit(train, iterations=25, meta_batch_size=4, progress=False)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    res = learner.evaluate(val, 20, progress=False)
    assert res.accuracy > 0.6 and res.steps == 30
    # the global-class loss is the cross-entropy over dataset class ids of support + query images
    ep = train.episode(0).to("cpu")
    alg.zero_grad()
    learner.model.zero_grad()
    metrics = alg.meta_step(learner.model, TaskBatch([ep]))
    y = torch.tensor(ep.classes)[torch.cat([ep.support_y, ep.query_y])]
    logits = alg.global_logits(learner.model.trunk(torch.cat([ep.support_x, ep.query_x])))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y).detach()), rel=1e-5)


def test_transfer_bad_settings(toy_tasks):
    train, _ = toy_tasks
    with pytest.raises(ConfigError, match="fresh head"):
        build_algorithm("transfer", num_classes=5, head_init="learned")
    with pytest.raises(ConfigError, match="unknown classifier 'cosin'"):
        build_algorithm("transfer", num_classes=5, classifier="cosin")
    with pytest.raises(ConfigError, match="needs num_classes"):
        toy_learner(build_algorithm("transfer"))
    learner = toy_learner(build_algorithm("transfer", num_classes=10))
    with pytest.raises(InputError, match="set it to the number of training classes"):
        learner.fit(train, iterations=3, meta_batch_size=4, progress=False)


@pytest.mark.parametrize("classes", [(0, 1), (0, -1, 2), (0.0, 1.0, 2.0), ("a", "b", "c"), (0, 1, 7)])
def test_transfer_refuses_malformed_episode_class_ids_with_a_clear_error(classes):
    """A user source whose episodes carried too few, negative, float or text class ids crashed transfer
    pre-training with a bare IndexError / RuntimeError / ValueError."""
    from metamtl.tasks.episode import Episode

    class Source:
        ways, shots, queries, name = 3, 2, 3, "mine"

        def episode(self, i):
            g = torch.Generator().manual_seed(i)
            return Episode(torch.randn(6, 3, generator=g), torch.arange(3).repeat_interleave(2),
                           torch.randn(9, 3, generator=g), torch.arange(3).repeat_interleave(3), 3, 2, 3, classes=classes)

    learner = MetaLearner(build_model("mlp", in_features=3, hidden=[8], out_features=None),
                          build_algorithm("transfer", num_classes=5), device="cpu")
    with pytest.raises(InputError, match="episode.classes must hold one integer|transfer num_classes is 5"):
        learner.fit(Source(), iterations=1, meta_batch_size=1, progress=False)
