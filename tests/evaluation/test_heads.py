"""Feature-space heads: each one against a reference computed another way, flags, means, configs."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.config import config_from_dict
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import ConfigError, InputError
from metamtl.heads import HEADS, FeatureHead, LaplacianShot, LogisticRegression, NearestCentroid, SoftKMeans, build_head
from metamtl.heads.transductive import rectified_prototypes, sinkhorn
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler


def toy(classes=20, per_class=10, size=12):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, size, size, generator=g)
    x = ((protos.repeat_interleave(per_class, 0) * 0.6 + 0.4 * torch.rand(classes * per_class, 1, size, size,
                                                                             generator=g)) * 255).to(torch.uint8)
    return ClassDataset(x, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(classes)],
                        name="toy", preprocessing=Preprocessing(size=(size, size), channels=1))


def learner(bn_stats="transductive", **kw):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=None)
    return MetaLearner(model, build_algorithm("protonet", bn_stats=bn_stats), preprocessing=toy().preprocessing,
                       device="cpu", **kw)


@pytest.fixture(scope="module")
def splits():
    ds = toy()
    return EpisodeSampler(ds.subset(range(10)), 5, 1, 3, seed=0), EpisodeSampler(ds.subset(range(10, 20)), 5, 2, 4, seed=1)


def features(n=10, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_simpleshot_is_nearest_mean_of_centred_normalised_features():
    s, q, mean = features(10), features(15, seed=1), features(1, seed=2)[0]
    y = torch.arange(5).repeat(2)
    logits = NearestCentroid()(s, y, q, 5, mean)
    ts, tq = F.normalize(s - mean, dim=1), F.normalize(q - mean, dim=1)
    protos = torch.stack([ts[y == k].mean(0) for k in range(5)])
    expected = -((tq[:, None, :] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(InputError, match="compute_feature_mean"):
        NearestCentroid()(s, y, q, 5, None)


def test_simpleshot_without_transforms_is_exactly_protonet(splits):
    _, test = splits
    lr = learner()
    plain = build_head({"name": "simpleshot", "center": False, "normalize": False})
    a = lr.evaluate(test, 6, progress=False)
    b = lr.evaluate(test, 6, progress=False, head=plain)
    assert a.per_episode_accuracy == b.per_episode_accuracy
    torch.testing.assert_close(torch.tensor(a.per_episode_loss), torch.tensor(b.per_episode_loss))
    assert (a.head, b.head, b.transductive) == ("algorithm", "simpleshot(center=False, normalize=False)", False)


def test_logreg_reaches_the_regularised_optimum():
    s, y = features(20, 8), torch.arange(4).repeat(5)
    head = LogisticRegression(C=2.0, steps=200)
    weight, bias = head.fit(F.normalize(s, dim=1), y, 4)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = 2.0 * F.cross_entropy(F.normalize(s, dim=1) @ w.T + b, y, reduction="sum") + 0.5 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-3 and gb.abs().max() < 1e-3  # stationary point of a convex objective
    clustered = F.one_hot(y, 8).float() * 3 + 0.3 * s  # four clusters: fitted and classified right
    assert (head(clustered, y, clustered, 4).argmax(1) == y).all()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_called_directly_checks_support_labels_the_same_way(name):
    """logreg fitted a missing class silently (never predicting it), and logreg/softkmeans raised bare
    IndexError/RuntimeError for labels >= ways or int32 labels; every head now converts integer labels
    and raises one InputError."""
    s, q = features(6, 8), features(6, 8, seed=1)
    head = build_head({"name": name, "center": False})
    y = torch.arange(3).repeat_interleave(2)
    torch.testing.assert_close(head(s, y.int(), q, 3), head(s, y, q, 3))
    for bad in ([0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 3, 3], [0, -1, 1, 1, 2, 2]):
        with pytest.raises(InputError, match="support labels must cover every class 0..2"):
            head(s, torch.tensor(bad), q, 3)
    with pytest.raises(InputError, match="integer class ids"):
        head(s, y.float(), q, 3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_called_directly_names_the_shapes_of_malformed_features_or_labels(name):
    """Labels [6, 1], fewer labels than support rows, or queries of another width were bare torch errors."""
    s, q, y = features(6, 8), features(6, 8, seed=1), torch.arange(3).repeat_interleave(2)
    head = build_head({"name": name, "center": False})
    for args, shapes in [((s, y.view(6, 1), q), r"\[6\].*got labels of shape \[6, 1\]"),
                         ((s, y[:5], q), r"\[6\].*\[6, 8\], got labels of shape \[5\]"),
                         ((s, y, features(6, 7)), r"\[6, 8\] and \[6, 7\]"),
                         ((s[None], y, q), r"\[1, 6, 8\] and \[6, 8\]")]:
        with pytest.raises(InputError, match=shapes):
            head(*args, 3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_takes_features_that_require_grad_and_leaves_them_without_grad(name):
    """logreg fitted through the caller's autograd graph: features a trunk computed with grad on were a bare
    RuntimeError (backward through the graph a second time), and leaf features got a .grad written into them."""
    trunk = torch.nn.Linear(8, 8)
    s, q, y = features(6, 8), features(6, 8, seed=1), torch.arange(3).repeat_interleave(2)
    head = build_head({"name": name, "center": False})
    torch.testing.assert_close(head(trunk(s), y, trunk(q), 3), head(trunk(s).detach(), y, trunk(q).detach(), 3))
    leaf = s.clone().requires_grad_()
    head(leaf, y, q, 3)
    assert leaf.grad is None and trunk.weight.grad is None


@pytest.mark.parametrize("C", [1e-5, 1.0, 1e30])
def test_logreg_fits_small_and_huge_c_instead_of_stopping_at_zero(C):
    """C=1e-5 on 640-d 1-shot features stopped L-BFGS at its zero start (the gradient of
    C * sum(CE) was below its tolerance): all-zero logits, every query class 0, chance accuracy;
    C=1e30 gave NaN blamed on the inner learning rate.  The objective divided by C * n fits both."""
    torch.manual_seed(0)
    centers = torch.randn(5, 640)
    support, y = centers + 0.5 * torch.randn(5, 640), torch.arange(5)
    qy = torch.arange(5).repeat(4)
    logits = build_head({"name": "logreg", "C": C})(support, y, centers[qy] + 0.5 * torch.randn(20, 640), 5)
    assert torch.isfinite(logits).all() and logits.abs().max() > 0
    assert (logits.argmax(1) == qy).float().mean() > 0.9
    with pytest.raises(ConfigError, match="head setting C must be a finite float >= 1e-05"):
        build_head({"name": "logreg", "C": 1e-6})  # too small to separate the logits in float32


def test_a_diverged_feature_head_is_not_blamed_on_inner_steps():
    from metamtl.numerics import check_finite_episodes
    from metamtl.errors import TrainingError

    with pytest.raises(TrainingError, match="episode 1: the query loss is nan from finite weights with feature head "
                                            r"logreg\(C=10.0\).*takes no inner steps") as err:
        check_finite_episodes([1.0, float("nan")], 0, "logreg(C=10.0)")
    assert "algorithm.lr" not in str(err.value)


def test_bdcspn_prototypes_follow_the_paper():
    s, q = features(6, 4), features(9, 4, seed=3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    protos, shifted = rectified_prototypes(s, y, q, 3, epsilon=10.0, shift=True)
    torch.testing.assert_close(shifted.mean(0), s.mean(0))
    basic = torch.stack([s[y == k].mean(0) for k in range(3)])
    pseudo = torch.stack([F.cosine_similarity(x[None], basic).argmax() for x in shifted])
    for k in range(3):
        members = torch.cat([s[y == k], shifted[pseudo == k]])
        w = torch.exp(10 * F.cosine_similarity(members, basic[k][None]))
        torch.testing.assert_close(protos[k], (w[:, None] * members).sum(0) / w.sum())


def test_laplacianshot_without_the_graph_is_nearest_prototype_and_the_graph_corrects_an_outlier():
    s = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1])
    # class-0 queries along a chain toward class 1; the chain's end is nearer class 1's prototype
    q = torch.tensor([[0.0, 1.0], [0.2, 0.8], [0.35, 0.65], [0.45, 0.55], [0.58, 0.42], [1.0, 0.0], [0.95, 0.05]])
    plain = dict(center=False, normalize=False, rectify=False, knn=2)
    alone = LaplacianShot(lam=0.0, **plain)(s, y, q, 2)
    torch.testing.assert_close(alone, -torch.cdist(q, s).pow(2))
    assert alone.argmax(1).tolist() == [0, 0, 0, 0, 1, 1, 1]
    smooth = LaplacianShot(lam=1.0, **plain)(s, y, q, 2)  # its two nearest queries are class 0
    assert smooth.argmax(1).tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_sinkhorn_balances_assignments_where_soft_kmeans_does_not():
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [2.5, 0.5], [1.0, 0.0]])
    plan = sinkhorn(logits, 200)
    torch.testing.assert_close(plan.sum(1), torch.ones(4))
    torch.testing.assert_close(plan.sum(0), torch.full((2,), 2.0))
    s, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    q = torch.tensor([[1.0, 0.0], [0.9, 0.45], [0.8, 0.6], [0.75, 0.66]])  # all nearer class 0
    free = SoftKMeans(iterations=0, scale=10.0)(s, y, q, 2).argmax(1)
    balanced = build_head({"name": "sinkhorn", "iterations": 0, "scale": 10.0})(s, y, q, 2).argmax(1)
    assert free.tolist() == [0, 0, 0, 0] and sorted(balanced.tolist()) == [0, 0, 1, 1]
    assert balanced.tolist() == [0, 0, 1, 1]  # the two queries least like class 0 go to class 1


@pytest.fixture(scope="module")
def trained(splits):
    train, _ = splits
    lr = learner()
    lr.fit(train, iterations=5, meta_batch_size=2, progress=False)
    lr.compute_feature_mean(train)
    return lr


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_beats_chance_through_the_learner_and_says_what_it_is(name, splits, trained):
    res = trained.evaluate(splits[1], 10, progress=False, head=name)
    assert res.accuracy > 0.4 and res.head == name and res.steps == 0  # 5-way: chance 0.2; no inner steps
    assert res.transductive == HEADS[name].transductive == (name in ("bdcspn", "laplacianshot", "softkmeans", "sinkhorn"))


def test_two_settings_of_one_head_are_told_apart_in_rows_and_wandb_keys(splits, trained):
    """eval.heads [logreg C=0.01, logreg C=100] used to give two rows both called "logreg" (and one W&B
    key): a head's label carries the settings that differ from its defaults."""
    from metamtl.heads import build_head, head_name
    from metamtl.reporting.wandb_logger import _setting

    assert head_name(build_head("logreg")) == "logreg" and head_name(None) == "algorithm"
    assert head_name(build_head({"name": "simpleshot", "center": False})) == "simpleshot(center=False)"
    rows = [trained.evaluate(splits[1], 4, progress=False, head={"name": "logreg", "C": c}) for c in (0.01, 100.0)]
    assert [r.head for r in rows] == ["logreg(C=0.01)", "logreg(C=100.0)"]
    w, k = rows[0].ways, rows[0].shots
    assert [_setting(r.to_dict()) for r in rows] == [f"{w}w{k}s/logreg(C=0.01)", f"{w}w{k}s/logreg(C=100.0)"]  # W&B


def test_steps_with_a_feature_head_are_refused_not_ignored(splits, trained):
    """evaluate(head="logreg", steps=50) gave the result of a run without steps (a head takes none)."""
    from metamtl.ensemble import Ensemble

    for who in (trained, Ensemble([trained, trained])):
        with pytest.raises(ConfigError, match="steps: feature head logreg takes no inner steps.*head='algorithm'"):
            who.evaluate(splits[1], 2, progress=False, head="logreg", steps=50)
        with pytest.raises(ConfigError, match="inner loop"):  # nor by ProtoNet's own adaptation (no inner loop)
            who.evaluate(splits[1], 2, progress=False, head="algorithm", steps=50)
        assert who.evaluate(splits[1], 2, progress=False, head="logreg", steps=0).steps == 0  # what it takes



def test_steps_with_a_feature_head_are_refused_by_adapt_and_predict_as_by_evaluate(splits, trained):
    """adapt/predict(steps=50, head="logreg") ignored the steps silently where evaluate refused them."""
    from metamtl.ensemble import Ensemble

    ep = splits[1].episode(0).to("cpu")
    by_default = learner(head="simpleshot")
    calls = [(who, kw) for who in (trained, Ensemble([trained, trained])) for kw in ({"head": "logreg"},)]
    for who, kw in calls + [(by_default, {}), (Ensemble([by_default]), {})]:
        with pytest.raises(ConfigError, match="steps: feature head .* takes no inner steps"):
            who.predict(ep.support_x, ep.support_y, ep.query_x, steps=50, **kw)
        with pytest.raises(ConfigError, match="steps: feature head .* takes no inner steps"):
            who.adapt(ep.support_x, ep.support_y, steps=50, **kw)
    assert trained.predict(ep.support_x, ep.support_y, ep.query_x, steps=0, head="algorithm").shape == (20, 5)

def test_inductive_heads_classify_each_query_alone(splits):
    _, test = splits
    lr = learner(bn_stats="support")  # query features independent of the other queries
    lr.compute_feature_mean(test)
    ep = test.episode(0).to("cpu")
    for name in ("simpleshot", "logreg"):
        together = lr.predict(ep.support_x, ep.support_y, ep.query_x, head=name)
        alone = torch.cat([lr.predict(ep.support_x, ep.support_y, ep.query_x[i:i + 1], head=name)
                           for i in range(len(ep.query_x))])
        torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    predictor = lr.adapt(ep.support_x, ep.support_y, head="bdcspn")
    assert predictor.transductive and predictor(ep.query_x).shape == (20, 5)


def test_transductive_heads_refuse_fewer_queries_than_they_classify_together(splits):
    _, test = splits
    lr = learner(bn_stats="support")
    ep = test.episode(0).to("cpu")  # 5-way
    for name in ("bdcspn", "laplacianshot", "softkmeans"):  # one query: every query "alone" got one answer
        with pytest.raises(InputError, match=f"transductive head '{name}' classifies the queries of one call "
                                             "together: it needs at least 2 queries, got 1"):
            lr.predict(ep.support_x, ep.support_y, ep.query_x[:1], head={"name": name, "center": False})
        assert lr.predict(ep.support_x, ep.support_y, ep.query_x[:2], head={"name": name, "center": False}).shape == (2, 5)
    with pytest.raises(InputError, match="'sinkhorn' balances its assignments over the 5 classes: it needs at least 5"):
        lr.predict(ep.support_x, ep.support_y, ep.query_x[:4], head={"name": "sinkhorn", "center": False})
    assert lr.predict(ep.support_x, ep.support_y, ep.query_x[:5], head={"name": "sinkhorn", "center": False}).shape == (5, 5)


def test_predictors_say_transductive_when_query_batchnorm_statistics_use_the_other_queries(splits):
    _, test = splits
    ep = test.episode(0).to("cpu")
    for bn_stats in ("transductive", "support"):
        lr = learner(bn_stats=bn_stats)
        for head in (None, {"name": "simpleshot", "center": False}):
            predictor = lr.adapt(ep.support_x, ep.support_y, head=head)
            together, alone = predictor(ep.query_x)[:1], predictor(ep.query_x[:1])
            depends = not torch.allclose(together, alone, atol=1e-4, rtol=1e-4)
            assert predictor.transductive == depends == (bn_stats == "transductive"), (bn_stats, head)



def test_a_feature_head_on_mamlpp_says_transductive_as_its_trunk_uses_the_query_batch(splits):
    """MAML++'s per-step running statistics (``bn_eval="running"``) serve its own adaptation only: a
    feature head runs the trunk, whose BatchNorm uses the queries' batch statistics, and said
    ``transductive=False`` while its logits depended on the other queries."""
    _, test = splits
    ep = test.episode(0).to("cpu")
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=5)
    lr = MetaLearner(model, build_algorithm("mamlpp"), preprocessing=toy().preprocessing, device="cpu")
    for head in (None, {"name": "simpleshot", "center": False}):
        predictor = lr.adapt(ep.support_x, ep.support_y, head=head)
        together, alone = predictor(ep.query_x)[:1], predictor(ep.query_x[:1])
        depends = not torch.allclose(together, alone, atol=1e-4, rtol=1e-4)
        assert predictor.transductive == depends == (head is not None), head

def test_a_learner_with_several_feature_means_centres_each_dataset_with_its_own(splits):
    """A multi-dataset learner holds one training mean per dataset: evaluate takes the episode's,
    adapt/predict take ``dataset=`` (without it: an error saying so), and so does an ensemble."""
    from metamtl.ensemble import Ensemble

    train, test = splits
    lr, alone = learner(), learner()
    lr.compute_feature_mean(train)
    alone.compute_feature_mean(train)
    lr.feature_means["other"] = lr.feature_means["toy"] + 5.0
    ep = test.episode(0).to("cpu")
    args = (ep.support_x, ep.support_y, ep.query_x)
    with pytest.raises(InputError, match=r"one per dataset \['other', 'toy'\].*dataset="):
        lr.predict(*args, head="simpleshot")
    with pytest.raises(InputError, match=r"\['other', 'toy'\] and none for 'nowhere'"):
        lr.adapt(ep.support_x, ep.support_y, head="simpleshot", dataset="nowhere")
    logits = lr.predict(*args, head="simpleshot", dataset="toy")
    torch.testing.assert_close(logits, alone.predict(*args, head="simpleshot"))
    assert not torch.allclose(logits, lr.predict(*args, head="simpleshot", dataset="other"))
    assert torch.equal(lr.predict(*args, head="logreg"), alone.predict(*args, head="logreg"))  # no centring
    torch.testing.assert_close(Ensemble([lr]).predict(*args, head="simpleshot", dataset="toy"), logits.log_softmax(-1))
    single = lr.evaluate(test, 4, progress=False, head="simpleshot")
    assert Ensemble([lr]).evaluate(test, 4, progress=False, head="simpleshot").accuracy == single.accuracy


def test_feature_mean_is_the_training_mean_and_is_saved_with_the_head(tmp_path, splits):
    train, _ = splits
    lr = learner(head="simpleshot")
    means = lr.compute_feature_mean(train, max_images=10_000)
    x = train.dataset.preprocessing.normalize(train.dataset.images)
    with torch.no_grad():
        torch.testing.assert_close(means["toy"], lr.model.trunk(x).mean(0), atol=1e-5, rtol=1e-4)
    loaded = MetaLearner.load(lr.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.head == NearestCentroid() and torch.equal(loaded.feature_means["toy"], means["toy"])
    assert "head" not in loaded.config()["learner"]
    ep = train.episode(0).to("cpu")
    torch.testing.assert_close(loaded.predict(ep.support_x, ep.support_y, ep.query_x),
                               lr.predict(ep.support_x, ep.support_y, ep.query_x))


def test_head_settings_are_checked():
    assert build_head("algorithm") is None and build_head(None) is None
    assert build_head({"name": "logreg", "C": 10}) == LogisticRegression(C=10.0)
    with pytest.raises(ConfigError, match="unknown head 'simpleshoot'. Did you mean 'simpleshot'"):
        build_head("simpleshoot")
    with pytest.raises(ConfigError, match="head 'laplacianshot' has no setting 'lambda'"):
        build_head({"name": "laplacianshot", "lambda": 1})
    with pytest.raises(ConfigError, match="head setting knn must be int >= 1"):
        build_head({"name": "laplacianshot", "knn": 0})
    with pytest.raises(ConfigError, match="eval.heads\\[1\\]: unknown head 'knn'"):
        config_from_dict({"algorithm": {"name": "protonet"}, "eval": {"heads": ["algorithm", "knn"]}})
    cfg = config_from_dict({"algorithm": {"name": "protonet"}, "eval": {"heads": ["simpleshot", {"name": "bdcspn"}]}})
    assert cfg.eval.heads == ["simpleshot", {"name": "bdcspn"}]


def test_a_run_reports_one_row_per_setting_and_head_and_saves_the_mean(tmp_path):
    from PIL import Image

    from metamtl.experiment import run

    g = torch.Generator().manual_seed(0)
    for split, classes in (("train", 6), ("val", 5), ("test", 5)):
        for c in range(classes):
            d = tmp_path / "data" / split / f"{split}{c}"
            d.mkdir(parents=True)
            base = torch.rand(12, 12, generator=g)
            for i in range(4):
                pixels = ((0.7 * base + 0.3 * torch.rand(12, 12, generator=g)) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    cfg = config_from_dict({
        "name": "heads", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "folder", "root": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
        "tasks": {"ways": 3, "shots": 1, "queries": 2},
        "model": {"name": "conv4", "hidden": 4, "blocks": 2}, "algorithm": {"name": "protonet"},
        "train": {"iterations": 2, "meta_batch_size": 2, "device": "cpu"},
        "eval": {"episodes": 3, "queries": 2, "heads": ["simpleshot", "algorithm", "laplacianshot"], "steps": 2,
                 "settings": [{"ways": 3, "shots": 1}, {"ways": 5, "shots": 1}]},  # steps: the algorithm's rows
        "logging": {"report": False, "metrics": None},
    })
    results = run(cfg, progress=False, quiet=True)
    rows = [(r["ways"], r["head"], r["transductive"]) for r in results["test"]]
    assert rows == [(3, "simpleshot", False), (3, "algorithm", False), (3, "laplacianshot", True),
                    (5, "simpleshot", False), (5, "algorithm", False), (5, "laplacianshot", True)]
    saved = MetaLearner.load(results["checkpoint"], device="cpu")
    assert saved.head == NearestCentroid() and len(saved.feature_means) == 1  # the training split's mean


@pytest.mark.parametrize("epsilon", [88.0, 89.0, 500.0])
def test_bdcspn_weights_stay_finite_and_exact_for_a_large_epsilon(epsilon):
    """exp(epsilon * cos) overflowed float32 from epsilon ~89 (NaN prototypes, blamed on the inner
    learning rate): the weights are normalised within each class in log space."""
    s, q = features(6, 4), features(9, 4, seed=3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    protos, shifted = rectified_prototypes(s, y, q, 3, epsilon=epsilon, shift=True)
    ref, _ = rectified_prototypes(s.double(), y, q.double(), 3, epsilon=epsilon, shift=True)
    assert torch.isfinite(protos).all()
    torch.testing.assert_close(protos, ref.float())
    for spec in ({"name": "bdcspn", "epsilon": epsilon}, {"name": "laplacianshot", "center": False, "epsilon": epsilon}):
        assert torch.isfinite(build_head(spec)(s, y, q, 3)).all()


def test_balanced_assignments_work_for_unnormalised_features():
    """Sinkhorn on logits of unnormalised features (squared distances in the thousands) underflowed
    whole rows to 1e-30 (every logit log(1e-30): chance); the iterations now run in log space."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 64, generator=g) * 10
    s = centers + torch.randn(5, 64, generator=g)
    qy = torch.arange(5).repeat(3)
    q = centers[qy] + torch.randn(15, 64, generator=g)
    for spec in ({"name": "sinkhorn", "normalize": False}, {"name": "softkmeans", "balanced": True, "normalize": False}):
        out = build_head(spec)(s, torch.arange(5), q, 5)
        assert torch.isfinite(out).all() and out.argmax(1).tolist() == qy.tolist()
        torch.testing.assert_close(out.exp().sum(0), torch.full((5,), 3.0))  # balanced: 3 queries per class
    plan = sinkhorn(torch.tensor([[-5000.0, -9000.0], [-7000.0, -6000.0]]), 50)
    torch.testing.assert_close(plan, torch.eye(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sources", [None, "file names"])
def test_feature_mean_of_a_class_dataset_with_or_without_file_names(sources, splits):
    """A ClassDataset's ``sources`` (its images' file names, or None) was taken for the task
    sources of a MixedTasks: a bare TypeError, or "got str"."""
    train, _ = splits
    data = train.dataset
    names = [f"img{i}.png" for i in range(len(data))] if sources else None
    data = ClassDataset(data.images, data.labels, data.class_names, name="toy", preprocessing=data.preprocessing,
                        sources=names)
    expected = learner().compute_feature_mean(train)
    torch.testing.assert_close(learner().compute_feature_mean(data), expected)


@pytest.mark.parametrize("spec", [{"name": "logreg", "C": float("inf")}, {"name": "bdcspn", "epsilon": float("inf")},
                                  {"name": "softkmeans", "scale": float("inf")},
                                  {"name": "laplacianshot", "lam": float("inf")}])
def test_infinite_head_settings_are_refused_when_the_head_is_built(spec):
    """YAML ``.inf`` passed the minimum check, then crashed with a bare RuntimeError or an
    "adaptation diverged" TrainingError about an inner loop that never ran."""
    field = next(k for k in spec if k != "name")
    with pytest.raises(ConfigError, match=f"head setting {field} must be a finite float.*got inf"):
        build_head(spec)
    with pytest.raises(ConfigError, match=f"head setting {field} must be a finite float"):
        config_from_dict({"algorithm": {"name": "protonet"}, "eval": {"heads": [spec]}})


@pytest.mark.parametrize("spec", [{"name": "logreg", "C": 10**400}, {"name": "bdcspn", "epsilon": 10**309}])
def test_huge_integer_head_settings_are_refused_when_the_head_is_built(spec):
    """An int too large for a float (YAML ``C: 1000...000``) raised a bare OverflowError."""
    field = next(k for k in spec if k != "name")
    with pytest.raises(ConfigError, match=f"head setting {field} must be a finite float"):
        build_head(spec)
    with pytest.raises(ConfigError, match=f"head setting {field} must be a finite float"):
        config_from_dict({"algorithm": {"name": "protonet"}, "eval": {"heads": [spec]}})


def test_equal_settings_spelled_as_int_or_float_get_one_label():
    """``C: 10`` and ``C: 10.0`` are one setting: one row, one report group, one W&B key."""
    from metamtl.heads import head_name

    for name, field in (("logreg", "C"), ("bdcspn", "epsilon")):
        a, b = build_head({"name": name, field: 3}), build_head({"name": name, field: 3.0})
        assert a == b and head_name(a) == head_name(b) == f"{name}({field}=3.0)"
        assert a.config() == b.config() and isinstance(a.config()[field], float)


def test_logreg_and_the_algorithm_work_under_inference_mode_as_under_no_grad(splits):
    """torch.enable_grad() does not leave inference mode: logreg's fit (and MAML's adaptation)
    raised a bare "element 0 of tensors does not require grad"."""
    _, test = splits
    ep = test.episode(0).to("cpu")
    torch.manual_seed(0)
    maml = MetaLearner(build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=5),
                       build_algorithm("maml", steps=2), device="cpu")
    for lr, head in ((learner(), "logreg"), (maml, None)):
        with torch.no_grad():
            expected = lr.predict(ep.support_x, ep.support_y, ep.query_x, head=head)
        with torch.inference_mode():
            got = lr.predict(ep.support_x, ep.support_y, ep.query_x, head=head)
            result = lr.evaluate(test, 2, progress=False, head=head)
        torch.testing.assert_close(got, expected)
        assert result.per_episode_loss == lr.evaluate(test, 2, progress=False, head=head).per_episode_loss


@pytest.mark.parametrize("bad", [torch.zeros(7), torch.full((72,), float("nan"))])
def test_a_feature_mean_that_does_not_fit_the_trunk_is_refused_with_the_fix(bad, tmp_path, splits):
    """A saved (or assigned) mean of another size gave a bare "size of tensor a (72) must match",
    a NaN one NaN logits blamed on the adaptation."""
    train, test = splits
    lr = learner(head="simpleshot")
    assert lr.compute_feature_mean(train)["toy"].shape == (72,)
    lr.feature_means["toy"] = bad
    loaded = MetaLearner.load(lr.save(tmp_path / "l.pt"), device="cpu")
    ep = test.episode(0).to("cpu")
    for use in (lambda: loaded.predict(ep.support_x, ep.support_y, ep.query_x),
                lambda: loaded.evaluate(test, 2, progress=False)):
        with pytest.raises(InputError, match=r"feature mean, which (has shape \[7\]|is not finite) "
                                             r"\(the trunk's features have 72.*compute_feature_mean"):
            use()


@dataclasses.dataclass
class Cosine(FeatureHead):
    """A user's head (not in HEADS unless a test registers it)."""

    name: ClassVar[str] = "cosine"
    checks: ClassVar[dict] = {"scale": (float, 0.0)}
    scale: float = 1.0

    def classify(self, support, support_y, query, ways):
        protos = torch.stack([support[support_y == k].mean(0) for k in range(ways)])
        return self.scale * query @ F.normalize(protos, dim=-1).T


def test_a_custom_head_is_registered_to_be_saved_and_round_trips(tmp_path, splits, monkeypatch):
    """A learner with an unregistered head of the user's saved fine, and then could not be loaded at
    all ("unknown head 'cosine'"): it is refused up front (construction, save), and a head
    registered in HEADS round-trips; per-call heads need no registration."""
    ep = splits[1].episode(0).to("cpu")
    args = (ep.support_x, ep.support_y, ep.query_x)
    fix = r"register it first: metamtl.heads.HEADS\['cosine'\] = Cosine"
    with pytest.raises(ConfigError, match=r"head Cosine \('cosine'\) is not registered.*" + fix):
        learner(head=Cosine())
    lr = learner()
    expected = lr.predict(*args, head=Cosine(scale=2))  # per call: no registration needed
    lr.inference.head = Cosine()
    with pytest.raises(ConfigError, match=fix):
        lr.save(tmp_path / "l.pt")
    monkeypatch.setitem(HEADS, "cosine", Cosine)
    lr = learner(head={"name": "cosine", "scale": 2})
    loaded = MetaLearner.load(lr.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.head == Cosine(scale=2.0)
    torch.testing.assert_close(loaded.predict(*args), expected)


def test_feature_means_follow_the_trunk_through_fit_and_init_from(splits):
    """fit and init_from changed the trunk and kept the old trunk's feature mean, which centring
    heads (and ``metamtl evaluate``, which trusts a saved one) went on using silently."""
    import warnings

    from metamtl.evaluation import feature_means

    train, test = splits
    lr = learner(head="simpleshot")
    old = lr.compute_feature_mean(train)["toy"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr.fit(train, iterations=0, meta_batch_size=2, progress=False)  # no new weights: the same mean
        assert torch.equal(lr.feature_means["toy"], old)
        lr.fit(train, iterations=3, meta_batch_size=2, progress=False)
    assert not torch.allclose(lr.feature_means["toy"], old)
    assert torch.equal(lr.feature_means["toy"], feature_means(lr.model, train, lr.placement)["toy"])
    with pytest.warns(RuntimeWarning, match=r"init_from replaced the trunk: the feature means \['toy'\] of the old "
                                            r"trunk are dropped; call learner.compute_feature_mean"):
        lr.init_from(learner())
    assert lr.feature_means == {}
    ep = test.episode(0).to("cpu")
    with pytest.raises(InputError, match="compute_feature_mean"):
        lr.predict(ep.support_x, ep.support_y, ep.query_x)
    lr.init_from(learner())  # no means: nothing to say


def test_a_saved_default_head_this_version_refuses_does_not_stop_the_learner_loading():
    """C's minimum rose to 1e-5: a learner saved with head logreg C=1e-6 as its default failed to load
    at all (weights included). It loads with the algorithm's adaptation as default, with a warning."""
    from metamtl.inference import InferenceSettings

    with pytest.warns(UserWarning, match=r"saved default head .*logreg.* refused by this version"):
        settings = InferenceSettings.from_state({"head": {"name": "logreg", "C": 1e-6}})
    assert settings.head is None
    assert InferenceSettings.from_state({"head": {"name": "logreg", "C": 0.1}}).head.label == "logreg(C=0.1)"


def test_steps_for_an_algorithm_without_an_inner_loop_are_refused_not_ignored(splits, tmp_path):
    """ProtoNet's evaluate/adapt/predict(steps=3) ran 0 steps silently (the CLI's --steps refused it),
    and its run drew an 'accuracy vs inner steps' curve at 0, 1, 2 steps that were never taken."""
    from metamtl.ensemble import Ensemble
    from metamtl.steps_curve import write_steps_curve

    _, test = splits
    pn = learner()
    ep = test.episode(0).to("cpu")
    calls = (lambda who: who.evaluate(test, 2, steps=3, progress=False),
             lambda who: who.adapt(ep.support_x, ep.support_y, steps=3),
             lambda who: who.predict(ep.support_x, ep.support_y, ep.query_x, steps=3))
    for call in calls:
        with pytest.raises(ConfigError, match="steps=3: algorithm 'protonet' has no inner loop"):
            call(pn)
        with pytest.raises(ConfigError, match="steps=3: no member adapts with an inner loop"):
            call(Ensemble([pn, pn]))
    assert pn.evaluate(test, 2, steps=0, progress=False).steps == 0
    pn.save(tmp_path / "learner.pt")
    curve = write_steps_curve(tmp_path, pn, {None: test}, "test", [{"ways": 5, "shots": 2}], episodes=2, progress=False)
    assert curve["steps"] == [0] and len(curve["curves"][0]["mean"]) == 1


def test_a_mixture_of_within_superclass_sources_says_so_in_its_result():
    """evaluate(MixedTasks([a, b])) with both samplers drawing within one superclass said hierarchy=None
    (random classes), so the row was compared with published random-class numbers."""
    from metamtl.evaluation import hierarchy_of
    from metamtl.tasks import MixedTasks

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(80, 1, 12, 12, generator=g) * 255).to(torch.uint8)
    ds = ClassDataset(x, torch.arange(20).repeat_interleave(4), [f"a{i % 4}/c{i}" for i in range(20)], name="sup",
                      preprocessing=Preprocessing(size=(12, 12), channels=1))
    a, b = (EpisodeSampler(ds.subset(r), 2, 1, 2, seed=s, hierarchy=1, name=n)
            for r, s, n in ((range(10), 0, "a"), (range(10, 20), 1, "b")))
    result = learner().evaluate(MixedTasks([a, b]), 3, progress=False)
    assert result.hierarchy == 1 and "within one superclass (depth 1)" in str(result)
    mixed = hierarchy_of(MixedTasks([a, b.with_settings(hierarchy=None)]))
    assert mixed == "mixed: depth 1, random classes"
    from metamtl.reporting.report import references

    assert references({"accuracy": 0.5, "ways": 5, "shots": 1, "hierarchy": mixed}, "omniglot") == []


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_float64_learner_computes_heads_and_its_feature_mean_in_float64(name, splits):
    """Before: every feature head and the training feature mean cast features to float32, so a float64
    learner's head logits were float32 (rounded at ~1e-7) while its own adaptation kept float64."""
    train, test = splits
    torch.manual_seed(0)
    net = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=None).double()
    model = MetaLearner(net, build_algorithm("protonet"), preprocessing=toy().preprocessing, device="cpu")
    model.compute_feature_mean(train)
    trunk = model.model.trunk
    with torch.no_grad():
        images = train.dataset.preprocessing.normalize(train.dataset.images).double()
        expected_mean = torch.cat([trunk(images[lo:lo + 256]) for lo in range(0, len(images), 256)]).mean(0)
    (stored,) = model.feature_means.values()
    assert stored.dtype == torch.float64
    torch.testing.assert_close(stored, expected_mean, rtol=1e-12, atol=1e-12)
    ep = test.episode(0)
    logits = model.predict(ep.support_x, ep.support_y, ep.query_x, head=name)
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all() and logits.shape[0] == len(ep.query_y)


def test_feature_means_are_recomputed_for_the_datasets_a_mixture_with_a_user_source_stores(splits):
    """Before: after fit on MixedTasks([sampler, a task source of the user's]), every feature mean was
    dropped (the user source has no stored images, and that error discarded the sampler's mean too)."""
    from metamtl.evaluation import feature_means
    from metamtl.tasks import MixedTasks

    train, _ = splits

    class Custom:
        name, ways, shots, queries = "custom", 5, 1, 3

        def episode(self, index):
            return train.episode(index + 1000)

    lr = learner(head="simpleshot")
    lr.compute_feature_mean(train)
    lr.fit(MixedTasks([train, Custom()]), iterations=2, meta_batch_size=2, progress=False)
    assert set(lr.feature_means) == {"toy"}
    assert torch.equal(lr.feature_means["toy"], feature_means(lr.model, train, lr.placement)["toy"])
