"""The MAML sinusoid task family."""
from __future__ import annotations

import math

import pytest
import torch

from metamtl.errors import TaskError
from metamtl.tasks import Sinusoid, TaskSource, fixed_episodes


def test_episode_shapes_and_protocol():
    source = Sinusoid(shots=5, queries=7)
    assert isinstance(source, TaskSource)
    assert (source.ways, source.task, source.name) == (1, "regression", "sinusoid")
    ep = source.episode(3)
    assert ep.support_x.shape == ep.support_y.shape == (5, 1)
    assert ep.query_x.shape == ep.query_y.shape == (7, 1)
    assert all(t.dtype == torch.float32 for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y))
    assert (ep.task, ep.ways, ep.shots, ep.queries, ep.index, ep.dataset) == ("regression", 1, 5, 7, 3, "sinusoid")
    assert not ep.is_classification
    moved = ep.to("cpu")
    assert torch.equal(moved.support_x, ep.support_x)  # floats pass through unchanged


def test_episodes_are_a_pure_function_of_seed_and_index():
    a, b = Sinusoid(seed=4), Sinusoid(seed=4)
    for i in (0, 1, 1000, 2**40):
        ea, eb = a.episode(i), b[i]
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_y, eb.query_y)
        assert ea.classes == eb.classes
    assert not torch.equal(a.episode(0).support_x, a.episode(1).support_x)
    assert a.episode(0).classes != Sinusoid(seed=5).episode(0).classes
    assert [e.classes for e in fixed_episodes(a, 3, start=10)] == [a.episode(i).classes for i in range(10, 13)]


def test_targets_follow_the_formula_within_the_ranges():
    source = Sinusoid(shots=10, queries=10)
    amplitudes, phases = [], []
    for i in range(300):
        ep = source.episode(i)
        amplitude, phase = ep.classes
        amplitudes.append(amplitude)
        phases.append(phase)
        x = torch.cat([ep.support_x, ep.query_x])
        y = torch.cat([ep.support_y, ep.query_y])
        assert torch.allclose(y, amplitude * torch.sin(x - phase), atol=1e-5)
        assert x.min() >= -5.0 and x.max() <= 5.0
    assert 0.1 <= min(amplitudes) < 0.5 and 4.6 < max(amplitudes) <= 5.0
    assert 0.0 <= min(phases) < 0.2 and 2.9 < max(phases) <= math.pi


def test_custom_ranges_and_zero_queries():
    ep = Sinusoid(shots=3, queries=0, amplitude=(2.0, 2.0), phase=(0.5, 0.5), x_range=(0.0, 1.0)).episode(0)
    assert ep.classes == (2.0, 0.5) and ep.query_x.shape == (0, 1)
    assert ep.support_x.min() >= 0.0 and ep.support_x.max() <= 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"shots": 0}, {"queries": -1}, {"shots": 2.5}, {"amplitude": (5.0, 0.1)}, {"x_range": (0, math.inf)},
     {"amplitude": "12"}, {"phase": b"01"}],
)
def test_invalid_arguments_raise_task_errors(kwargs):
    with pytest.raises(TaskError):
        Sinusoid(**kwargs)


def test_negative_index_is_rejected():
    with pytest.raises(TaskError, match="index"):
        Sinusoid().episode(-1)


def sine_config(**eval_section):
    from metamtl.config import config_from_dict

    return config_from_dict({
        "name": "sine", "data": {"name": "sinusoid", "val_split": None},
        "tasks": {"ways": 1, "shots": 5, "queries": 5}, "model": {"name": "mlp", "hidden": [8]},
        "algorithm": {"name": "maml", "steps": 1, "lr": 0.01}, "train": {"device": "cpu"},
        "eval": {"episodes": 2, "queries": 4, **eval_section}})


@pytest.mark.parametrize("model", [{"name": "conv4", "hidden": 8}, {"name": "resnet12"}, {"name": "multidataset"}])
def test_an_image_model_on_sinusoid_tasks_is_a_clear_config_error(model):
    """A sinusoid config with an image model failed with "model 'conv4' does not take ['in_features']", a
    setting the user never wrote: a ConfigError now says sinusoid tasks are vectors and to use model mlp."""
    from metamtl.errors import ConfigError
    from metamtl.experiment import build_learner, build_tasks

    cfg = sine_config()
    cfg.model = model
    with pytest.raises(ConfigError, match=rf"model '{model['name']}' takes images, but sinusoid tasks are vectors "
                                          r"\[batch, 1\]; use model mlp") as err:
        build_learner(cfg, build_tasks(cfg)["train"])
    assert "in_features" not in str(err.value)
    assert build_learner(sine_config(), build_tasks(sine_config())["train"]).model.config["in_features"] == 1


def test_every_eval_setting_of_a_regression_run_is_evaluated_with_its_shots():
    from metamtl.experiment import build_learner, build_tasks, evaluate_held_out

    cfg = sine_config(settings=[{"ways": 1, "shots": 5}, {"ways": 1, "shots": 20}])
    tasks = build_tasks(cfg)
    learner = build_learner(cfg, tasks["train"])
    rows = evaluate_held_out(learner, cfg, tasks["test"], progress=False, say=lambda *_: None)
    assert [(r["shots"], r["queries"]) for r in rows] == [(5, 4), (20, 4)]
    assert rows[0]["loss"] != rows[1]["loss"]


def test_with_settings_keeps_the_family_and_refuses_other_ways():
    source = Sinusoid(shots=5, queries=3, amplitude=(1.0, 2.0), seed=4).with_settings(shots=8)
    assert (source.shots, source.queries, source.amplitude, source.seed) == (8, 3, (1.0, 2.0), 4)
    with pytest.raises(TaskError, match="ways 1"):
        source.with_settings(ways=5)


def test_a_regression_run_is_evaluated_with_its_training_shots_by_default():
    assert [(s.ways, s.shots) for s in sine_config().eval.settings] == [(1, 5)]


@pytest.mark.parametrize("setting, got", [({"ways": 5, "shots": 5}, "got 5 ways"),
                                          ({"ways": 1, "shots": 5, "hierarchy": 1}, "hierarchy 1")])
def test_a_regression_setting_needs_one_way_and_no_hierarchy(setting, got):
    from metamtl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.settings\[1\]: regression tasks .* have ways 1") as info:
        sine_config(settings=[{"ways": 1, "shots": 5}, setting])
    assert got in str(info.value) and "head_init" not in str(info.value)


def test_input_errors_of_a_regression_learner_do_not_mention_images():
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.errors import InputError
    from metamtl.models import build_model

    learner = MetaLearner(build_model("mlp", hidden=[8], in_features=1, out_features=1),
                          build_algorithm("maml", steps=1, lr=0.01), task="regression", device="cpu")
    ep = Sinusoid(shots=5, queries=3).episode(0)
    for support_x, query_x, match in [(ep.support_x.repeat(1, 2), ep.query_x, r"support_x: model expects inputs of shape"),
                                      (ep.support_x, ep.query_x.repeat(1, 2), r"query_x: model expects inputs of shape"),
                                      (ep.support_x.long(), ep.query_x, r"support_x must be float regression inputs"),
                                      (ep.support_x, [[0.5]], r"query_x must be float regression inputs")]:
        with pytest.raises(InputError, match=match) as info:
            learner.predict(support_x, ep.support_y, query_x)
        assert "image" not in str(info.value)
    assert learner.predict(ep.support_x.numpy(), ep.support_y, ep.query_x.numpy().astype("float64")).shape == (3, 1)


class Listed:
    """A task source serving the given episodes in turn."""

    ways, task, name = 1, "regression", "listed"

    def __init__(self, episodes):
        self.episodes, self.shots, self.queries = episodes, episodes[0].shots, episodes[0].queries

    def episode(self, index):
        return self.episodes[index % len(self.episodes)]


def regressor(algorithm="maml", out_features=1, in_features=1, **inner):
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", hidden=[8], in_features=in_features, out_features=out_features)
    return MetaLearner(model, build_algorithm(algorithm, **({"steps": 1, "lr": 0.01} | inner)), task="regression",
                       device="cpu")


def test_targets_of_shape_n_give_the_losses_of_shape_n_by_1():
    """[n] targets are [n, 1] targets: the same evaluation losses and the same training (no broadcasting)."""
    import dataclasses

    eps = [Sinusoid(shots=5, queries=5).episode(i) for i in range(3)]
    flat = [dataclasses.replace(e, support_y=e.support_y.view(-1), query_y=e.query_y.view(-1)) for e in eps]
    learner = regressor()
    column = learner.evaluate(eps, episodes=3, progress=False).per_episode_loss
    assert learner.evaluate(flat, episodes=3, progress=False).per_episode_loss == column
    trained = []
    for episodes in (eps, flat):
        learner = regressor()
        learner.fit(Listed(episodes), iterations=2, meta_batch_size=3, progress=False)
        trained.append(learner.model.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def multi_output_episodes(count=2, d=3):
    """Linear tasks with 2 inputs and ``d``-dimensional targets."""
    from metamtl.tasks import Episode

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        x, w = torch.randn(10, 2, generator=g), torch.randn(2, d, generator=g)
        y = x @ w
        out.append(Episode(x[:4], y[:4], x[4:], y[4:], ways=1, shots=4, queries=6, index=i, task="regression"))
    return out


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "mamlpp", "anil", "imaml"])
@pytest.mark.parametrize("head_init", ["learned", "zero"])
def test_multi_output_regression_fits_evaluates_and_predicts(algorithm, head_init):
    if algorithm == "anil" and head_init == "learned":
        inner = {}
    else:
        inner = {"head_init": head_init}
    learner = regressor(algorithm, out_features=3, in_features=2, **inner)
    eps = multi_output_episodes()
    learner.fit(Listed(eps), iterations=1, meta_batch_size=2, progress=False)
    assert math.isfinite(learner.evaluate(eps, episodes=2, progress=False).loss)
    ep = eps[0]
    out = learner.predict(ep.support_x, ep.support_y, ep.query_x)
    assert out.shape == (6, 3)
    loss = float(((out - ep.query_y) ** 2).mean())
    assert learner.evaluate([ep], episodes=1, progress=False).per_episode_loss[0] == pytest.approx(loss, rel=1e-4)


def test_a_regression_run_without_val_split_has_no_validation_tasks():
    from metamtl.experiment import build_tasks

    assert build_tasks(sine_config())["val"] is None
    cfg = sine_config()
    cfg.data.val_split = "val"
    assert build_tasks(cfg)["val"].seed == cfg.tasks.val_seed


def test_a_regression_learner_is_evaluated_on_the_split_asked_for():
    from metamtl.errors import ConfigError
    from metamtl.experiment import build_test_tasks

    cfg = sine_config()
    assert build_test_tasks(cfg).seed == cfg.tasks.test_seed
    cfg.data.test_split = "val"
    assert build_test_tasks(cfg).seed == cfg.tasks.val_seed
    cfg.data.test_split = "bogus"
    with pytest.raises(ConfigError, match=r"'bogus'.*sinusoid.*'test' or 'val'"):
        build_test_tasks(cfg)


def test_regression_training_tasks_never_equal_validation_or_test_tasks_whatever_the_seeds():
    """A sinusoid 'split' was only its seed: ensemble member 1 (tasks.seed 0 + 1 = val_seed) trained on
    exactly the validation tasks and member 2 on the test tasks, episode for episode."""
    from metamtl.config import config_from_dict
    from metamtl.ensemble_fit import member_configs
    from metamtl.experiment import build_tasks

    cfg = config_from_dict({"name": "sine", "seed": 0, "data": {"name": "sinusoid"}, "tasks": {"ways": 1, "shots": 5, "queries": 5},
                            "model": {"name": "mlp", "hidden": [8]}, "algorithm": {"name": "maml", "steps": 1, "lr": 0.01},
                            "train": {"iterations": 1, "meta_batch_size": 1, "device": "cpu"}, "eval": {"episodes": 2},
                            "ensemble": {"members": 3}})
    for _, member in member_configs(cfg):
        tasks = build_tasks(member)
        train = [tasks["train"].episode(i).support_x for i in range(3)]
        for split in ("val", "test"):
            assert not any(torch.equal(t, tasks[split].episode(i).support_x) for t in train for i in range(3)), split
    assert Sinusoid(seed=3).episode(0).support_x.equal(Sinusoid(seed=3, split="train").episode(0).support_x)
    assert repr(Sinusoid(seed=1, split="val")).endswith("seed=1, split='val')")
    assert Sinusoid(seed=1, split="val").with_settings(shots=2).split == "val"
    with pytest.raises(TaskError, match="split must be one of"):
        Sinusoid(split="validation")


def test_numpy_integers_are_integers_for_seed_shots_and_queries():
    """Sinusoid(seed=np.int64(3)) / shots=np.int64(5) / queries=np.int32(3) were TaskErrors while
    np.float64(3.0) was accepted."""
    import numpy as np

    s = Sinusoid(seed=np.int64(3), shots=np.int64(5), queries=np.int32(3))
    assert (s.seed, s.shots, s.queries) == (3, 5, 3) and type(s.seed) is int
    assert s.episode(0).support_x.equal(Sinusoid(seed=3, shots=5, queries=3).episode(0).support_x)
    for bad in (np.bool_(True), True, 2.5):
        with pytest.raises(TaskError, match="seed must be an integer"):
            Sinusoid(seed=bad)


def test_a_regression_run_without_test_split_and_earlier_stages_are_not_scored_on_test_tasks(tmp_path):
    """Before: test_split null (which run_stages sets for every stage but the last) became 'test' for
    sinusoid, so earlier stages, and runs asking for no test evaluation, were scored on the test tasks."""
    import json

    from metamtl.config import config_from_dict
    from metamtl.experiment import build_test_tasks, run

    cfg = sine_config()
    cfg.data.test_split = None
    assert build_test_tasks(cfg) is None
    base = {"output_dir": str(tmp_path), "data": {"name": "sinusoid", "val_split": None},
            "tasks": {"ways": 1, "shots": 5, "queries": 5}, "model": {"name": "mlp", "hidden": [8]},
            "algorithm": {"name": "maml", "steps": 1, "lr": 0.01},
            "train": {"device": "cpu", "iterations": 2, "meta_batch_size": 1},
            "eval": {"episodes": 2, "queries": 4}, "logging": {"report": False, "metrics": None}}
    staged = run(config_from_dict({**base, "name": "st", "stages": [{"name": "a"}, {"name": "b"}]}),
                 progress=False, quiet=True)
    first = json.loads((tmp_path / "st" / "stages" / "a" / "results.json").read_text())
    assert not first["test"] and len(staged["test"]) == 1
    untested = run(config_from_dict({**base, "name": "nt", "data": {**base["data"], "test_split": None}}),
                   progress=False, quiet=True)
    assert not untested["test"]


def test_a_class_based_algorithm_is_refused_for_a_regression_learner_as_for_a_regression_config():
    """Before: MetaLearner(task='regression') with 'transfer' was built, evaluated and saved, and only
    fit failed ("needs classification episodes"); the README promises a ConfigError when it is built."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.errors import ConfigError
    from metamtl.models import build_model

    with pytest.raises(ConfigError, match=r"'transfer' trains over the training classes .* regression"):
        MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=1),
                    build_algorithm("transfer", num_classes=5), task="regression", device="cpu")


def test_a_regression_eval_setting_without_ways_has_one_way():
    """Before: {shots: 10} in a sinusoid config's eval.settings took the default 5 ways and was refused
    ("got 5 ways") although the user wrote no ways; tasks.ways already defaulted to 1."""
    cfg = sine_config(settings=[{"shots": 10}, {"ways": 1, "shots": 5}])
    assert [(s.ways, s.shots) for s in cfg.eval.settings] == [(1, 10), (1, 5)]


@pytest.mark.parametrize("key, value", [("train_rotations", [0, 90]), ("image_size", 28), ("sources", ["x"]),
                                        ("root", "/tmp/data"), ("split_fractions", [0.5, 0.25, 0.25])])
def test_image_data_settings_of_a_regression_config_are_refused_not_ignored(key, value):
    """Before: data.train_rotations, image_size, sources, root... on a sinusoid config were accepted and
    did nothing (train_augment alone was refused)."""
    from metamtl.config import config_from_dict
    from metamtl.errors import ConfigError

    base = {"data": {"name": "sinusoid", key: value}, "tasks": {"shots": 5, "queries": 5},
            "model": {"name": "mlp", "hidden": [8]}, "algorithm": {"name": "maml", "steps": 1, "lr": 0.01}}
    with pytest.raises(ConfigError, match=rf"data.{key} is .*sinusoid tasks are generated.*remove it"):
        config_from_dict(base)


def test_a_regression_run_without_test_split_draws_its_held_out_tasks_from_val_else_says_why_not():
    """data.test_split: null handed None to the steps curve (its file recorded an internal ConfigError about
    NoneType); as for image data, the validation split is used, and with neither split a clear ConfigError."""
    from metamtl.errors import ConfigError
    from metamtl.experiment import held_out_sources

    cfg = sine_config()
    cfg.data.test_split, cfg.data.val_split = None, "val"
    sources, split = held_out_sources(cfg)
    assert split == "val" and sources[None].seed == cfg.tasks.val_seed
    assert sources[None].queries == cfg.eval.queries
    cfg.data.test_split = "test"
    sources, split = held_out_sources(cfg)
    assert split == "test" and sources[None].seed == cfg.tasks.test_seed
    cfg.data.test_split = cfg.data.val_split = None
    with pytest.raises(ConfigError, match=r"no dataset of this run \(sinusoid\) has a test or a validation split"):
        held_out_sources(cfg)


def test_multitask_regression_is_judged_by_its_base_algorithm():
    """Before: every multitask learner or config was refused for regression ("'multitask' trains over
    the training classes"), whatever its base, since it declares num_classes to hand on to 'transfer'."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.config import config_from_dict
    from metamtl.errors import ConfigError
    from metamtl.models import build_model

    def learner(base):
        mt = build_algorithm("multitask", base=base, strategy="uncertainty", datasets=["small", "big"])
        return MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=1), mt, task="regression",
                           device="cpu")

    assert learner({"name": "maml", "steps": 1, "lr": 0.01}).algorithm.base.name == "maml"
    with pytest.raises(ConfigError, match="trains over the training classes .* regression"):
        learner({"name": "transfer", "num_classes": 5})

    def config(base):
        return config_from_dict({"data": {"name": "sinusoid"}, "tasks": {"shots": 5, "queries": 5},
                                 "model": {"name": "mlp", "hidden": [8]},
                                 "algorithm": {"name": "multitask", "base": base, "datasets": ["sine"]}})

    assert config({"name": "maml", "steps": 1}).algorithm["base"]["name"] == "maml"
    assert config("reptile").algorithm["base"] == "reptile"
    with pytest.raises(ConfigError, match="trains over the training classes .* regression"):
        config({"name": "transfer"})


def test_algorithm_datasets_of_a_one_dataset_run_must_name_its_episodes_label():
    """algorithm.datasets: [sine] on a sinusoid run (episodes labelled 'sinusoid') was checked only for
    runs of several datasets: it passed every check and failed at the first step with an InputError."""
    from metamtl.errors import ConfigError
    from metamtl.experiment import build_learner, build_tasks

    def cfg(names):
        c = sine_config()
        c.algorithm = {"name": "multitask", "base": {"name": "maml", "steps": 1, "lr": 0.01}, "datasets": names}
        return c

    tasks = build_tasks(cfg(["sinusoid"]))["train"]
    assert build_learner(cfg(["sinusoid"]), tasks).algorithm.strategy.tasks == ["sinusoid"]
    with pytest.raises(ConfigError, match=r"algorithm.datasets must list the run's dataset labels \['sinusoid'\] "
                                          r"\(each once\) \(a one-dataset run's episodes carry its data.name"):
        build_learner(cfg(["sine"]), tasks)
