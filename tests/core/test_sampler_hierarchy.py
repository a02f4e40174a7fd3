"""Hierarchical task sampling: every episode's classes share one superclass (path depth or mapping)."""
from __future__ import annotations

import re

import pytest
import torch

from metamtl.config import config_from_dict
from metamtl.data import ClassDataset, Omniglot
from metamtl.errors import ConfigError, TaskError
from metamtl.experiment import build_tasks, setting_tasks
from metamtl.tasks import EpisodeSampler, superclass_names

SMALL = ["images_background_small1", "images_background_small2"]


def grouped_dataset(sizes=(6, 3, 8, 5), per_class=4):
    """Superclass g{i} with sizes[i] classes named 'g{i}/c{j}'; the class index is in pixel 0, the
    image's index within its class in pixel 1 (a class's images differ: identical ones are dropped)."""
    names = [f"g{i}/c{j}" for i, n in enumerate(sizes) for j in range(n)]
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(per_class, dtype=torch.uint8).repeat(len(names))
    return ClassDataset(images, labels, names, name="grouped")


def test_every_episode_stays_in_one_eligible_superclass():
    ds = grouped_dataset()
    sampler = EpisodeSampler(ds, ways=5, shots=1, queries=2, seed=0, hierarchy=1)
    assert list(sampler.superclasses) == ["g0", "g2", "g3"]  # g1 has only 3 classes
    seen = set()
    for i in range(60):
        ep = sampler.episode(i)
        groups = {ds.class_names[c].split("/")[0] for c in ep.classes}
        assert len(groups) == 1 and len(set(ep.classes)) == 5
        assert torch.equal(ep.support_x[:, 0, 0, 0].long(), torch.tensor(ep.classes)[ep.support_y])
        seen |= groups
    assert seen == {"g0", "g2", "g3"}
    assert sampler.episode(7).classes == EpisodeSampler(ds, 5, 1, 2, seed=0, hierarchy=1).episode(7).classes
    # a mapping giving the same superclasses draws the very same episodes
    mapping = {n: n.split("/")[0] for n in ds.class_names}
    by_map = EpisodeSampler(ds, 5, 1, 2, seed=0, hierarchy=mapping)
    assert [by_map.episode(i).classes for i in range(10)] == [sampler.episode(i).classes for i in range(10)]
    # other ways: eligibility follows; random-class sampling is unchanged by the option's absence
    three = sampler.with_settings(ways=3)
    assert list(three.superclasses) == ["g0", "g1", "g2", "g3"] and three.hierarchy == 1
    assert "hierarchy=1, superclasses=3" in repr(sampler)
    mixed = EpisodeSampler(ds, 5, 1, 2, seed=0)
    assert any(len({ds.class_names[c][:2] for c in mixed.episode(i).classes}) > 1 for i in range(10))


def test_superclass_names_and_errors():
    assert superclass_names(["a/b/c", "a/x/y"], 2) == ["a/b", "a/x"]
    assert superclass_names(["Greek/character03@90"], 1) == ["Greek"]
    ds = grouped_dataset()
    with pytest.raises(TaskError, match="need a superclass with >= 9 classes.*at most 8 \\(g2: 8"):
        EpisodeSampler(ds, 9, 1, 1, hierarchy=1)
    with pytest.raises(TaskError, match="depth 2 needs class names with more than 2"):
        EpisodeSampler(ds, 2, 1, 1, hierarchy=2)
    with pytest.raises(TaskError, match="mapping gives no superclass for 21 class"):
        EpisodeSampler(ds, 2, 1, 1, hierarchy={"g0/c0": "x"})
    with pytest.raises(TaskError, match="hierarchy must be a path depth >= 1"):
        EpisodeSampler(ds, 2, 1, 1, hierarchy="alphabet")
    for value in (None, ["g0"], 1.5, True):  # one superclass called 'None' would sample as if flat
        with pytest.raises(TaskError, match=f"superclasses must be names .* maps to {re.escape(repr(value))} \\(22 classes"):
            EpisodeSampler(ds, 2, 1, 1, hierarchy={n: value for n in ds.class_names})
    assert superclass_names(["a", "b"], {"a": 3, "b": "x"}) == ["3", "x"]  # integer names are names


def test_omniglot_alphabet_split_holds_out_whole_alphabets(omniglot_root):
    splits = {s: Omniglot(omniglot_root, split=s, sources=SMALL, split_by="alphabet") for s in ("train", "val", "test")}
    alphabets = {s: {n.split("/")[0] for n in d.class_names} for s, d in splits.items()}
    assert not (alphabets["train"] & alphabets["test"]) and not (alphabets["val"] & alphabets["test"])
    assert not (alphabets["train"] & alphabets["val"])
    assert sum(d.num_classes for d in splits.values()) == 242
    assert alphabets["test"] == {"Korean", "Sanskrit"}  # sha1 order of the 8 alphabet names, seed 0
    with pytest.raises(ConfigError, match="unknown Omniglot split_by 'drawer'"):
        Omniglot(omniglot_root, sources=SMALL, split_by="drawer")


def test_config_draws_within_alphabet_episodes_for_training_and_evaluation(omniglot_root):
    cfg = config_from_dict({
        "data": {"name": "omniglot", "root": str(omniglot_root.parent), "sources": SMALL, "split_by": "alphabet"},
        "tasks": {"ways": 5, "shots": 1, "queries": 1, "hierarchy": 1},
        "algorithm": {"name": "protonet"},
        "eval": {"settings": [{"ways": 20, "shots": 1, "hierarchy": 1}, {"ways": 20, "shots": 1}]},
    })
    tasks = build_tasks(cfg)
    assert tasks["train"].hierarchy == 1 and tasks["val"].hierarchy == 1 and tasks["test"].hierarchy is None
    within = setting_tasks(tasks["test"], cfg.eval.settings[0], cfg)
    assert within.ways == 20 and set(within.superclasses) == {"Korean", "Sanskrit"}
    names = within.dataset.class_names
    for i in range(5):
        assert len({names[c].split("/")[0] for c in within.episode(i).classes}) == 1
    assert setting_tasks(tasks["test"], cfg.eval.settings[1], cfg).superclasses is None
    with pytest.raises(ConfigError, match="tasks.hierarchy applies to a single dataset"):
        config_from_dict({"datasets": [{"name": "omniglot"}], "tasks": {"hierarchy": 1}})


def test_evaluation_results_say_the_episodes_were_within_superclasses():
    from metamtl import MetaLearner
    from metamtl.models import build_model

    model = build_model("conv4", in_channels=1, hidden=4, image_size=4, blocks=2, out_features=None)
    learner = MetaLearner(model, "protonet", device="cpu")
    sampler = EpisodeSampler(grouped_dataset(), 5, 1, 2, seed=0, hierarchy=1)
    res = learner.evaluate(sampler, 4, progress=False)
    assert res.hierarchy == 1 and "5-way 1-shot within one superclass (depth 1)" in str(res)
    assert learner.evaluate(sampler.with_settings(hierarchy=None), 4, progress=False).hierarchy is None


def test_a_run_prints_the_test_tasks_it_evaluates_not_the_training_ways():
    """``metamtl fit`` printed the test split's base sampler (the training ways, no hierarchy) while
    it evaluated each ``eval.settings`` entry: it now prints one line per evaluated setting."""
    from metamtl.experiment import _shown_tasks

    cfg = config_from_dict({"algorithm": {"name": "protonet"}, "tasks": {"ways": 60}, "eval": {"queries": 2, "settings": [
        {"ways": 5, "shots": 1}, {"ways": 4, "shots": 2, "hierarchy": 1}]}})
    test = EpisodeSampler(grouped_dataset(), ways=8, shots=1, queries=2, seed=0)
    shown = [repr(t) for t in _shown_tasks(cfg, "test", test)]
    assert len(shown) == 2
    assert "ways=5, shots=1" in shown[0] and "hierarchy" not in shown[0]
    assert "ways=4, shots=2" in shown[1] and "hierarchy=1" in shown[1]
    assert _shown_tasks(cfg, "train", test) == [test] and _shown_tasks(cfg, "val", None) == []
