"""Algorithms declare what they take from the training data (``Algorithm.from_data``): a run fills
in exactly the declared settings the config leaves out, whatever the constructor's signature."""
from __future__ import annotations

import pytest
import torch

from metamtl.algorithms import ALGORITHMS, DATA_SETTINGS, MAML, Algorithm, register_algorithm, with_data_settings
from metamtl.config import config_from_dict
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import ConfigError
from metamtl.experiment import build_learner
from metamtl.models.registry import MODEL_FROM_DATA, MODELS
from metamtl.tasks import EpisodeSampler


class Counting(MAML):
    """A MAML that takes the number of training classes, and says so."""

    name = "test_counting"
    from_data = ("num_classes",)

    def __init__(self, num_classes: int | None = None, **settings) -> None:
        super().__init__(**settings)
        self.num_classes = num_classes

    def config(self):
        return {**super().config(), "num_classes": self.num_classes}


class Silent(Counting):
    """The same constructor, nothing declared: a run gives it nothing."""

    name = "test_silent"
    from_data = ()


@pytest.fixture
def registered():
    for cls in (Counting, Silent):
        register_algorithm(cls)
    yield
    for cls in (Counting, Silent):
        ALGORITHMS.pop(cls.name)


def toy_tasks(classes: int = 9) -> EpisodeSampler:
    images = torch.randint(0, 256, (classes * 3, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prep = Preprocessing(size=(16, 16), channels=1, mean=(0.5,), std=(0.25,))
    ds = ClassDataset(images, torch.arange(classes).repeat_interleave(3), [f"c{i}" for i in range(classes)],
                      name="toy", preprocessing=prep)
    return EpisodeSampler(ds, 3, 1, 2, seed=0)


def learner_for(algorithm: dict) -> object:
    cfg = config_from_dict({"data": {"name": "omniglot"}, "tasks": {"ways": 3, "shots": 1, "queries": 2},
                            "model": {"name": "conv4", "hidden": 4}, "algorithm": algorithm,
                            "train": {"device": "cpu"}, "eval": {"settings": [{"ways": 3, "shots": 1}]}})
    return build_learner(cfg, toy_tasks())


def test_the_built_in_declarations():
    declared = {name: cls.from_data for name, cls in ALGORITHMS.items() if cls.from_data}
    assert declared == {"transfer": ("num_classes",), "multitask": ("datasets", "num_classes")}
    assert MODEL_FROM_DATA == {"multidataset": ("inputs",)} and set(MODEL_FROM_DATA) <= set(MODELS)


@pytest.mark.usefixtures("registered")
def test_a_run_fills_in_what_is_declared_and_nothing_else():
    assert learner_for({"name": "test_counting", "steps": 1}).algorithm.num_classes == 9
    assert learner_for({"name": "test_counting", "steps": 1, "num_classes": 20}).algorithm.num_classes == 20
    assert learner_for({"name": "test_silent", "steps": 1}).algorithm.num_classes is None  # same signature
    assert learner_for({"name": "transfer", "steps": 1}).algorithm.num_classes == 9


def test_only_declared_settings_are_asked_of_the_data():
    def never():
        raise AssertionError("asked the data for a setting nobody declared")

    data = {"num_classes": lambda: 9, "datasets": never}
    assert with_data_settings({"name": "transfer"}, data) == {"name": "transfer", "num_classes": 9}
    assert with_data_settings({"name": "maml", "steps": 2}, {"num_classes": never}) == {"name": "maml", "steps": 2}
    assert with_data_settings({"name": "multitask"}, {"datasets": lambda: None}) == {"name": "multitask"}
    assert with_data_settings({"name": "no_such"}, {"num_classes": never}) == {"name": "no_such"}


def test_config_checks_give_multitask_the_dataset_labels_it_declares():
    data = {"datasets": [{"name": "omniglot", "label": "a"}, {"name": "omniglot", "label": "b", "sources": ["images_background_small1"]}],
            "model": {"name": "conv4", "hidden": 4}, "algorithm": {"name": "multitask", "base": "maml"}}
    assert config_from_dict(data).algorithm == {"name": "multitask", "base": "maml"}  # checked, not rewritten
    with pytest.raises(ConfigError, match="datasets"):  # nothing to fill in from
        config_from_dict({"model": {"name": "conv4"}, "algorithm": {"name": "multitask", "base": "maml"}})


def test_declaring_what_the_data_cannot_give_is_a_clear_error():
    class Greedy(MAML):
        name = "test_greedy"
        from_data = ("num_classes", "image_size")

    with pytest.raises(ConfigError, match=r"\['image_size'\].*can take num_classes, datasets"):
        register_algorithm(Greedy)
    assert "test_greedy" not in ALGORITHMS and set(DATA_SETTINGS) == {"num_classes", "datasets"}


def test_registering_a_taken_name_or_no_name_of_its_own_is_a_config_error():
    class MyMAML(MAML):  # forgot its own name: would take over "maml"
        pass

    class MyProto(MAML):
        name = "protonet"

    class NoName(Algorithm):
        pass

    with pytest.raises(ConfigError, match="MyMAML sets no name of its own.*'maml'"):
        register_algorithm(MyMAML)
    with pytest.raises(ConfigError, match="'protonet' is already registered by metamtl.*replace=True"):
        register_algorithm(MyProto)
    with pytest.raises(ConfigError, match="NoName sets no name"):
        register_algorithm(NoName)
    assert ALGORITHMS["maml"] is MAML and ALGORITHMS["protonet"].__name__ == "ProtoNet" and "base" not in ALGORITHMS
    assert register_algorithm(MAML) is MAML  # the same class again: fine

    def define():
        class Mine(MAML):
            name = "test_mine"
        return Mine

    try:
        first, again = register_algorithm(define()), define()
        assert register_algorithm(again) is again and ALGORITHMS["test_mine"] is again  # a re-run definition
        replaced = register_algorithm(replace=True)(type("Other", (MAML,), {"name": "test_mine"}))
        assert ALGORITHMS["test_mine"] is replaced is not first
    finally:
        ALGORITHMS.pop("test_mine", None)


def test_a_single_dataset_run_fills_in_the_inputs_of_a_multidataset_model_and_refuses_a_vector_model():
    images = torch.randint(0, 256, (18, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = ClassDataset(images, torch.arange(6).repeat_interleave(3), [f"c{i}" for i in range(6)], name="omniglot",
                      preprocessing=Preprocessing(size=(28, 28), channels=1))

    def build(model):
        cfg = config_from_dict({"data": {"name": "omniglot"}, "tasks": {"ways": 3, "shots": 1, "queries": 1},
                                "model": model, "algorithm": {"name": "protonet"}, "train": {"device": "cpu"},
                                "eval": {"settings": [{"ways": 3, "shots": 1}]}})
        return build_learner(cfg, EpisodeSampler(ds, 3, 1, 1, seed=0))

    learner = build({"name": "multidataset", "width": 4, "hidden": 4, "blocks": 1})
    assert learner.model.config["inputs"] == {"omniglot": [1, 28, 28]}
    assert "in_channels" not in learner.model.config and "image_size" not in learner.model.config
    assert build({"name": "conv4", "hidden": 4}).model.config["image_size"] == 28
    with pytest.raises(ConfigError, match=r"model 'mlp' takes vectors \[batch, in_features\], not images.*conv4"):
        build({"name": "mlp"})
