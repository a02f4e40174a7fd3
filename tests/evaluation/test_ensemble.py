"""Ensembles: averaged probabilities against a hand computation, one member = the learner itself,
save/load, and the errors a user gets for a wrong ensemble."""
from __future__ import annotations

import math

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.ensemble import Ensemble
from metamtl.errors import CheckpointError, ConfigError
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler, Sinusoid

SIZE = 12


def images(classes=10, per_class=8):
    g = torch.Generator().manual_seed(1)
    base = torch.rand(classes, 1, SIZE, SIZE, generator=g).repeat_interleave(per_class, 0)
    x = ((0.7 * base + 0.3 * torch.rand(classes * per_class, 1, SIZE, SIZE, generator=g)) * 255).to(torch.uint8)
    return ClassDataset(x, torch.arange(classes).repeat_interleave(per_class), [f"k{i}" for i in range(classes)],
                        name="tiny", preprocessing=Preprocessing(size=(SIZE, SIZE), channels=1))


def member(seed, algorithm="protonet", head=None, **kw):
    torch.manual_seed(seed)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=SIZE, blocks=2,
                        out_features=None if algorithm in ("protonet", "anil") else 5)
    return MetaLearner(model, build_algorithm(algorithm, **kw), preprocessing=images().preprocessing, device="cpu",
                       head=head)


@pytest.fixture(scope="module")
def tasks():
    return EpisodeSampler(images(), 5, 2, 3, seed=4)


def test_one_member_is_the_learner_itself(tasks):
    for lr in (member(0), member(1, "maml", steps=2, lr=0.1)):
        alone = lr.evaluate(tasks, 12, progress=False)
        ens = Ensemble([lr]).evaluate(tasks, 12, progress=False)
        assert ens.per_episode_accuracy == pytest.approx(alone.per_episode_accuracy)
        assert ens.loss == pytest.approx(alone.loss, rel=1e-4)
        assert (ens.ways, ens.shots, ens.queries, ens.steps) == (alone.ways, alone.shots, alone.queries, alone.steps)


def test_a_list_of_episodes_is_read_as_by_a_learner(tasks):
    """Ensemble.evaluate(list) takes list[start:start+episodes] and refuses ways/shots/queries and
    mixed settings, as MetaLearner.evaluate does."""
    ens = Ensemble([member(0), member(1)])
    eps = [tasks.episode(i) for i in range(4)]
    full = ens.evaluate(eps, progress=False)
    part = ens.evaluate(eps, episodes=2, start=2, progress=False)
    assert part.episodes == 2 and part.per_episode_loss == pytest.approx(full.per_episode_loss[2:])
    with pytest.raises(ConfigError, match=r"list of episodes and ways=10"):
        ens.evaluate(eps, ways=10, progress=False)
    with pytest.raises(ConfigError, match=r"mixing episodes of different settings"):
        ens.evaluate([eps[0], EpisodeSampler(images(), 3, 1, 3, seed=4).episode(0)], progress=False)


def test_output_is_the_log_of_the_mean_probability(tasks):
    members = [member(0), member(1), member(2, "maml", steps=1, lr=0.2)]
    ens = Ensemble(members)
    accs = []
    for i in range(6):
        ep = tasks.episode(i)
        probs = torch.stack([m.predict(ep.support_x, ep.support_y, ep.query_x).softmax(-1) for m in members])
        out = ens.predict(ep.support_x, ep.support_y, ep.query_x)
        torch.testing.assert_close(out, probs.mean(0).log(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ens.adapt(ep.support_x, ep.support_y)(ep.query_x), out)
        accs.append((probs.mean(0).argmax(-1) == ep.query_y).float().mean().item())
    result = ens.evaluate(tasks, 6, progress=False)
    assert result.per_episode_accuracy == pytest.approx(accs)
    assert result.accuracy == pytest.approx(sum(accs) / 6) and result.head == "algorithm" and not result.transductive


def test_regression_members_are_averaged():
    source = Sinusoid(shots=5, queries=5, seed=0)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(MetaLearner(build_model("mlp", in_features=1, out_features=1, hidden=(8, 8)),
                                   build_algorithm("maml", steps=1, lr=0.01), device="cpu", task="regression"))
    ep = source.episode(0)
    out = Ensemble(members).predict(ep.support_x, ep.support_y, ep.query_x)
    torch.testing.assert_close(out, torch.stack([m.predict(ep.support_x, ep.support_y, ep.query_x)
                                                 for m in members]).mean(0))
    result = Ensemble(members).evaluate(source, 3, progress=False)
    assert result.accuracy is None and math.isfinite(result.loss)
    assert Ensemble(members).averages == "predictions"  # what the messages say (not "class probabilities")


def test_save_and_load_round_trip(tmp_path, tasks):
    ens = Ensemble([member(0), member(1, "maml", steps=1, lr=0.1)])
    path = ens.save(tmp_path / "ens.pt")
    back = Ensemble.load(path)
    ep = tasks.episode(0)
    torch.testing.assert_close(back.predict(ep.support_x, ep.support_y, ep.query_x),
                               ens.predict(ep.support_x, ep.support_y, ep.query_x))
    with pytest.raises(CheckpointError, match="Ensemble.load"):
        MetaLearner.load(path)
    member(0).save(tmp_path / "one.pt")
    with pytest.raises(CheckpointError, match="one learner, not an ensemble"):
        Ensemble.load(tmp_path / "one.pt")
    two = Ensemble([tmp_path / "one.pt", str(tmp_path / "one.pt")])  # paths are loaded
    assert len(two) == 2


def test_bad_ensembles_are_refused(tmp_path, tasks):
    with pytest.raises(ConfigError, match="at least one"):
        Ensemble([])
    with pytest.raises(ConfigError, match="list of learners"):
        Ensemble("runs/a/learner.pt")
    with pytest.raises(ConfigError, match="MetaLearner objects or checkpoint paths"):
        Ensemble([member(0), 3])
    torch.manual_seed(0)
    reg = MetaLearner(build_model("mlp", in_features=1, out_features=1, hidden=(4,)), "maml", device="cpu", task="regression")
    with pytest.raises(ConfigError, match="one kind of task"):
        Ensemble([member(0), reg])
    mixed = Ensemble([member(0), member(1, head="bdcspn")])
    with pytest.raises(ConfigError, match="inductive and transductive"):
        mixed.evaluate(tasks, 2, progress=False)
    assert mixed.evaluate(tasks, 2, progress=False, head="algorithm").head == "algorithm"
    episode = tasks.episode(0)
    with pytest.raises(ConfigError, match="inductive and transductive"):  # every entry point, not evaluate alone
        mixed.predict(episode.support_x, episode.support_y, episode.query_x)
    with pytest.raises(ConfigError, match="inductive and transductive"):
        mixed.adapt(episode.support_x, episode.support_y)
    inductive = Ensemble([member(0, bn_stats="support"), member(1, head="bdcspn", bn_stats="support")])
    assert not inductive.adapt(episode.support_x, episode.support_y, head="algorithm").transductive
    assert mixed.adapt(episode.support_x, episode.support_y, head="algorithm").transductive  # query BatchNorm statistics
    assert Ensemble([member(0, head="bdcspn"), member(1, head="bdcspn")]).adapt(episode.support_x, episode.support_y).transductive



def test_steps_reach_the_members_adapting_with_their_algorithm_not_those_with_a_feature_head(tasks):
    """A member with a feature head refuses inner steps; in an ensemble mixing heads, they go to the others."""
    adapting = member(0, "maml", steps=1, lr=0.1)
    mixed, episode = Ensemble([adapting, member(1, head={"name": "simpleshot", "center": False})]), tasks.episode(0)
    with pytest.raises(ConfigError, match="takes no inner steps"):
        mixed.members[1].predict(episode.support_x, episode.support_y, episode.query_x, steps=3)
    out = mixed.predict(episode.support_x, episode.support_y, episode.query_x, steps=3)
    torch.testing.assert_close(out, mixed.adapt(episode.support_x, episode.support_y, steps=3)(episode.query_x))
    assert not torch.allclose(out, mixed.predict(episode.support_x, episode.support_y, episode.query_x, steps=0))
    assert mixed.evaluate(tasks, 2, steps=3, progress=False).steps == 3

def test_members_trained_on_other_data_are_refused_naming_only_the_data_they_used():
    from types import SimpleNamespace

    from metamtl.cli import check_same_data

    def trained_on(*datasets):
        cfg = {"data": {"name": "omniglot"}, "datasets": [{"name": n, "image_size": 28} for n in datasets]}
        return SimpleNamespace(metadata={"config": cfg})

    check_same_data([trained_on("omniglot", "miniimagenet")] * 2, ["a.pt", "b.pt"])
    with pytest.raises(ConfigError) as info:
        check_same_data([trained_on("omniglot", "miniimagenet"), trained_on("omniglot")], ["a.pt", "b.pt"])
    message = str(info.value)
    assert message.startswith("b.pt was trained on other data than a.pt ([{'name': 'omniglot'")
    assert message.count("'name'") == 3  # the datasets entries only, not the unused default data: section


def test_a_member_that_cannot_serve_the_episode_is_named(tasks, tmp_path):
    """``metamtl evaluate A.pt maml5.pt --ways 8``: the fixed-head error did not say which member."""
    from metamtl.errors import InputError

    fixed = member(1, "maml", steps=1, lr=0.1)  # a 5-way head
    with pytest.raises(InputError, match=r"ensemble member member 1: .*head has 5 outputs but the task has 8"):
        Ensemble([member(0), fixed]).evaluate(tasks, 1, ways=8, progress=False)
    path = fixed.save(tmp_path / "maml5.pt")
    with pytest.raises(InputError, match=r"ensemble member .*maml5.pt: .*head has 5 outputs"):
        Ensemble([member(0), path], device="cpu").evaluate(tasks, 1, ways=8, progress=False)
    with pytest.raises(InputError, match=r"ensemble member B.pt: "):
        Ensemble([member(0), fixed], labels=["A.pt", "B.pt"]).evaluate(tasks, 1, ways=8, progress=False)


def test_every_error_of_a_member_names_it(tasks):
    """Non-finite weights (``metamtl evaluate good.pt diverged.pt``) and every error of predict / adapt
    did not say which member raised it."""
    from metamtl.errors import InputError, TrainingError

    diverged = member(1)
    with torch.no_grad():
        next(diverged.model.parameters()).fill_(float("nan"))
    ens = Ensemble([member(0), diverged], labels=["good.pt", "diverged.pt"])
    episode = tasks.episode(0)
    with pytest.raises(TrainingError, match=r"^ensemble member diverged.pt: evaluate: .*not finite"):
        ens.evaluate(tasks, 1, progress=False)
    with pytest.raises(TrainingError, match=r"^ensemble member diverged.pt: "):
        ens.predict(episode.support_x, episode.support_y, episode.query_x)
    fixed = Ensemble([member(0), member(1, "maml", steps=1, lr=0.1)], labels=["A.pt", "B.pt"])  # a 5-way head
    eight = EpisodeSampler(images(), 8, 2, 3, seed=4).episode(0)
    with pytest.raises(InputError, match=r"^ensemble member B.pt: "):
        fixed.predict(eight.support_x, eight.support_y, eight.query_x)
    with pytest.raises(InputError, match=r"^ensemble member B.pt: "):
        fixed.adapt(eight.support_x, eight.support_y)


def test_reported_steps_are_the_steps_the_members_took(tasks):
    """``steps=5`` with ProtoNet members took no inner step: the result said 5 (a member alone says 0)."""
    from metamtl.errors import ConfigError

    a, b = member(0), member(1)
    assert a.evaluate(tasks, 2, progress=False).steps == 0 == Ensemble([a, b]).evaluate(tasks, 2, progress=False).steps
    for who in (a, Ensemble([a, b])):  # steps nothing takes are refused, not reported as 0
        with pytest.raises(ConfigError, match="steps=5: .*no member adapts with an inner loop|steps=5: algorithm"):
            who.evaluate(tasks, 2, steps=5, progress=False)
    assert Ensemble([a, member(2, "maml", steps=1, lr=0.1)]).evaluate(tasks, 2, steps=3, progress=False).steps == 3


def test_float64_members_give_float64_predictions_and_their_exact_mse():
    """Before: the ensemble cast its members' outputs and targets to float32: a float64 member's
    predictions were rounded, and a one-member ensemble's MSE differed from its member's."""
    source = Sinusoid(shots=5, queries=5, seed=0, split="test")
    torch.manual_seed(0)
    member = MetaLearner(build_model("mlp", in_features=1, out_features=1, hidden=(8,)).double(),
                         build_algorithm("maml", steps=1, lr=0.01), device="cpu", task="regression")
    ep = source.episode(0)
    out = Ensemble([member]).predict(ep.support_x, ep.support_y, ep.query_x)
    assert out.dtype == torch.float64
    assert torch.equal(out, member.predict(ep.support_x, ep.support_y, ep.query_x))
    assert Ensemble([member]).evaluate(source, 3, progress=False).loss == member.evaluate(source, 3, progress=False).loss
