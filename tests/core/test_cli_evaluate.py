"""`metamtl evaluate` of learners trained on tiny folder datasets: the held-out split of every
ensemble member, the data an ensemble's members must share, `--split all` on another dataset,
only the evaluated split loaded, and a regression learner's options."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from test_stages import folder_data

from metamtl.cli import main
from metamtl.config import config_from_dict
from metamtl.errors import ConfigError
from metamtl.experiment import run


def tiny(tmp, name, root, **data):
    return {
        "name": name, "output_dir": str(tmp / "runs"),
        "data": {"name": "folder", "root": str(root), "cache_dir": str(tmp / "cache"), **data},
        "tasks": {"ways": 3, "shots": 1, "queries": 2},
        "model": {"name": "conv4", "hidden": 4, "blocks": 2},
        "algorithm": {"name": "protonet"},
        "train": {"iterations": 2, "meta_batch_size": 1, "device": "cpu", "val_every": 2, "val_episodes": 2},
        "eval": {"episodes": 2, "queries": 2, "settings": [{"ways": 3, "shots": 1}]},
        "logging": {"report": False, "metrics": None},
    }


@pytest.fixture(scope="module")
def learners(tmp_path_factory):
    """``train``: trained on the training classes; ``trainval``: on train+val; ``testval``: tested on
    val; ``other``: on another
    folder dataset; ``stopped``: with early stopping and a plateau scheduler; ``sine``: a regression learner."""
    tmp = tmp_path_factory.mktemp("clieval")
    data, other = folder_data(tmp / "data"), folder_data(tmp / "other")
    configs = {
        "train": tiny(tmp, "train", data),
        "trainval": tiny(tmp, "trainval", data, train_split="train+val", val_split=None),
        "testval": tiny(tmp, "testval", data, val_split=None, test_split="val"),  # held-out: val
        "other": tiny(tmp, "other", other),
        "stopped": {**tiny(tmp, "stopped", data), "train": {  # training-only callbacks that need validation
            **tiny(tmp, "stopped", data)["train"], "early_stopping": {"patience": 3},
            "scheduler": {"name": "plateau", "patience": 1}}},
        "maml": {**tiny(tmp, "maml", data), "algorithm": {"name": "maml", "steps": 1, "lr": 0.01}},
        "maml3": {**tiny(tmp, "maml3", data), "algorithm": {"name": "maml", "steps": 1, "lr": 0.01, "head_init": "proto"},
                  "eval": {**tiny(tmp, "maml3", data)["eval"], "steps": 3}},
        "sine": {**tiny(tmp, "sine", data), "data": {"name": "sinusoid", "val_split": None},
                 "tasks": {"ways": 1, "shots": 5, "queries": 5}, "model": {"name": "mlp", "hidden": [8]},
                 "algorithm": {"name": "maml", "steps": 1, "lr": 0.01}, "eval": {"episodes": 2, "queries": 5,
                                                                                 "settings": [{"ways": 1, "shots": 5}]}},
    }
    paths = {name: run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"] for name, cfg in configs.items()}
    return paths, tmp


def evaluate(capsys, *args):
    code = main(["evaluate", *map(str, args), "--episodes", "2", "--no-progress"])
    return code, capsys.readouterr()


def test_every_ensemble_members_training_split_is_checked(learners, capsys):
    paths, _ = learners
    for order in ([paths["train"], paths["trainval"]], [paths["trainval"], paths["train"]]):
        code, out = evaluate(capsys, *order, "--split", "val")
        assert code == 2, out.out
        assert f"--split 'val' holds classes {paths['trainval']} was trained on (its training split: train+val)" \
            in out.err
        assert "use --split test or --data-root with another dataset" in out.err  # only the held-out splits
    assert evaluate(capsys, paths["train"], paths["trainval"], "--split", "test")[0] == 0


def test_a_run_trained_with_early_stopping_and_a_plateau_scheduler_is_evaluated(learners, capsys):
    """Training-only settings that need the validation split never block evaluation (which drops it)."""
    paths, _ = learners
    for args in ([paths["stopped"]], [paths["stopped"], paths["train"]]):  # alone and in an ensemble
        code, out = evaluate(capsys, *args)
        assert code == 0, out.err
        assert "accuracy" in out.out


def test_members_trained_on_another_folder_dataset_are_refused(learners, capsys):
    paths, tmp = learners
    code, out = evaluate(capsys, paths["train"], paths["other"])
    assert code == 2 and f"{paths['other']} was trained on other data than {paths['train']}" in out.err
    assert f"'root': '{tmp / 'other'}'" in out.err


def test_split_all_scores_every_class_of_another_dataset_only(learners, capsys):
    paths, tmp = learners
    code, out = evaluate(capsys, paths["train"], "--split", "all", "--data-root", tmp / "other")
    assert code == 0, out.err
    assert "all split: accuracy" in out.out
    for root in ([], ["--data-root", tmp / "data"]):  # the data it was trained on: its training classes too
        code, out = evaluate(capsys, paths["train"], "--split", "all", *root)
        assert code == 2 and "--split 'all' holds classes" in out.err and "--data-root with another dataset" in out.err


def test_only_the_evaluated_split_is_loaded(learners, capsys, tmp_path):
    paths, tmp = learners
    shutil.copytree(tmp / "other" / "test", tmp_path / "test")  # a root holding the test split alone
    code, out = evaluate(capsys, paths["train"], "--data-root", tmp_path)
    assert code == 0 and "test split: accuracy" in out.out, out.err


@pytest.mark.parametrize("option, message", [
    (["--shots", "10"], "--shots: "), (["--queries", "7", "--ways", "2"], "--ways, --queries: "),
    (["--support-augment", "{copies: 3}"], "--support-augment: "), (["--hierarchy", "1"], "--hierarchy: "),
    (["--head", "simpleshot"], "feature head 'simpleshot' classifies; this learner does regression"),
])
def test_a_regression_learner_refuses_classification_options(learners, capsys, option, message):
    paths, _ = learners
    code, out = evaluate(capsys, paths["sine"], *option)
    assert code == 2 and message in out.err, out
    if "--head" not in option:
        assert f"{paths['sine']} does regression" in out.err


def test_steps_for_an_algorithm_without_an_inner_loop_are_refused_and_never_recorded(learners, capsys):
    """--steps on a ProtoNet learner was silently ignored while its result said steps: N."""
    from metamtl import MetaLearner
    from metamtl.errors import ConfigError
    from metamtl.data import load_dataset
    from metamtl.tasks import EpisodeSampler

    paths, tmp = learners
    code, out = evaluate(capsys, paths["train"], "--steps", "5")
    assert code == 2 and "--steps: " in out.err and "'protonet', which has no inner loop" in out.err, out.err
    learner = MetaLearner.load(paths["train"], device="cpu")
    sampler = EpisodeSampler(load_dataset("folder", "test", tmp / "data", cache_dir=tmp / "cache"), 3, 1, 2, seed=0)
    with pytest.raises(ConfigError, match="steps=5: algorithm 'protonet' has no inner loop"):  # as the CLI
        learner.evaluate(sampler, 2, steps=5, progress=False)
    assert learner.evaluate(sampler, 2, steps=0, progress=False).steps == 0


def test_steps_with_a_feature_head_are_refused_and_never_ignored(learners, capsys):
    """--steps 25 --head logreg on a MAML learner exited 0 with the result of a run without --steps."""
    paths, _ = learners
    code, out = evaluate(capsys, paths["maml"], "--steps", "5", "--head", "logreg")
    assert code == 2 and "--steps: feature head logreg takes no inner steps" in out.err, out.err
    assert "--head algorithm" in out.err
    code, out = evaluate(capsys, paths["maml"], "--steps", "1")
    assert code == 0 and "test split: accuracy" in out.out, out.err


def test_hierarchy_option_reaches_the_episodes(learners, capsys):
    paths, _ = learners
    code, out = evaluate(capsys, paths["train"], "--hierarchy", "1")  # flat class names: no superclass
    assert code == 2 and "hierarchy depth 1 needs class names with more than 1 '/'-separated parts" in out.err, out.err
    code, out = evaluate(capsys, paths["train"], "--hierarchy", "null")
    assert code == 0 and "test split: accuracy" in out.out, out.err


def test_the_evaluated_split_is_stored_as_the_checkpoint_reads_it(learners, capsys, tmp_path):
    """The test split's images are stored with the checkpoint's preprocessing: a damaged training
    image does not block evaluating an intact test split, and a test split of RGB images of another
    size is read as the grey 12x12 images the model was trained on."""
    paths, tmp = learners
    shutil.copytree(tmp / "other", tmp_path / "damaged")
    next((tmp_path / "damaged" / "train").rglob("*.png")).write_bytes(b"not an image")
    code, out = evaluate(capsys, paths["train"], "--data-root", tmp_path / "damaged")
    assert code == 0 and "test split: accuracy" in out.out, out.err
    for png in (tmp / "other" / "test").rglob("*.png"):
        target = tmp_path / "rgb" / "test" / png.relative_to(tmp / "other" / "test")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").resize((20, 20)).save(target)
    code, out = evaluate(capsys, paths["train"], "--data-root", tmp_path / "rgb")
    assert code == 0 and "test split: accuracy" in out.out, out.err


def test_a_multi_dataset_learner_is_checked_on_every_dataset_before_any_is_evaluated(tmp_path, capsys):
    """`--ways` more than one dataset's held-out classes skips that dataset (as `fit` does) and
    scores the others, its JSON saying so; shots that no dataset can serve fail before any
    evaluation (the first dataset's result used to be printed, then lost with exit 2)."""
    big = folder_data(tmp_path / "big", sizes=(("train", 8), ("test", 6)))
    small = folder_data(tmp_path / "small", sizes=(("train", 8), ("test", 3)))
    cfg = tiny(tmp_path, "multi", big)
    cfg.pop("data")
    cfg["datasets"] = [{"name": "folder", "root": str(root), "label": label, "val_split": None,
                        "cache_dir": str(tmp_path / "cache")} for label, root in (("big", big), ("small", small))]
    cfg["algorithm"] = {"name": "multitask", "base": {"name": "protonet"}}
    cfg["train"]["val_every"] = None
    path = run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"]
    code, out = evaluate(capsys, path, "--ways", "5", "--json", tmp_path / "ev.json")
    assert code == 0, out.err
    assert "small: skipping 5-way evaluation (3 held-out classes)" in out.out and "big test split: accuracy" in out.out
    saved = json.loads((tmp_path / "ev.json").read_text())
    assert saved["small"]["skipped"] == "only 3 held-out classes" and saved["big"]["ways"] == 5
    code, out = evaluate(capsys, path, "--ways", "2", "--shots", "4")  # 4 images per class: none left for queries
    assert code == 2 and "accuracy" not in out.out, out.out
    code, out = evaluate(capsys, path, "--ways", "7")
    assert code == 2 and "no dataset has that many held-out classes" in out.err, out.err
    code, out = evaluate(capsys, path, "--data-root", small)  # big's test split scored on small's images
    assert code == 2 and "accuracy" not in out.out and "read from different folders (big: " in out.err, out.err
    # one dataset evaluated (the other training-only): the JSON still says whose result it is
    cfg["name"], cfg["datasets"][1]["test_split"] = "multi_aux", None
    path = run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"]
    code, out = evaluate(capsys, path, "--json", tmp_path / "aux.json")
    assert code == 0 and list(json.loads((tmp_path / "aux.json").read_text())) == ["big"], out.err


def test_a_regression_ensemble_and_its_splits_are_described_as_regression(learners, capsys):
    """An ensemble of regression learners averages predictions (was: 'class probabilities averaged');
    --split val evaluates the validation tasks, and an unknown split name is refused."""
    paths, _ = learners
    code, out = evaluate(capsys, paths["sine"], paths["sine"])
    assert code == 0 and "predictions averaged" in out.out and "class probabilities" not in out.out, out
    code, out = evaluate(capsys, paths["sine"], "--split", "bogus")
    assert code == 2 and "'bogus': the sinusoid tasks have the splits 'test' or 'val'" in out.err, out


def test_split_all_refuses_folders_holding_or_inside_the_training_data(learners, capsys):
    """Before: --data-root DATA/train (the training split's own folder) or a folder above DATA passed as
    "other data", so evaluate scored training classes as held-out; DATA/test is held out."""
    paths, tmp = learners
    for root in (tmp / "data" / "train", tmp / "data" / "train" / "train0", tmp):
        code, out = evaluate(capsys, paths["train"], "--split", "all", "--data-root", root)
        assert code == 2 and "--split 'all' holds classes" in out.err, root
    code, out = evaluate(capsys, paths["train"], "--split", "all", "--data-root", tmp / "data" / "test")
    assert code == 0 and "all split: accuracy" in out.out, out.err
    code, out = evaluate(capsys, paths["trainval"], "--split", "all", "--data-root", tmp / "data" / "val")
    assert code == 2 and "--split 'all' holds classes" in out.err  # val/ was its training data


def test_a_relative_data_root_is_saved_absolute_so_evaluate_works_from_any_folder(tmp_path, capsys, monkeypatch):
    """Before: data.root 'mydata' was saved as written and read against the evaluating shell's folder:
    from another folder evaluate failed ("folder mydata does not exist"), and the held-out check took
    the training folder for other data."""
    folder_data(tmp_path / "work" / "mydata")
    monkeypatch.chdir(tmp_path / "work")
    cfg = tiny(tmp_path, "rel", "mydata")
    path = run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"]
    saved = json.loads((tmp_path / "runs" / "rel" / "results.json").read_text())["config"]["data"]["root"]
    assert saved == str(tmp_path / "work" / "mydata")
    monkeypatch.chdir(tmp_path)
    code, out = evaluate(capsys, path)
    assert code == 0 and "test split: accuracy" in out.out, out.err
    code, out = evaluate(capsys, path, "--split", "all", "--data-root", tmp_path / "work" / "mydata")
    assert code == 2 and "--split 'all' holds classes" in out.err


def test_evaluate_without_steps_takes_the_runs_eval_steps_as_fit_did(learners, capsys):
    """Before: metamtl evaluate ignored the saved eval.steps (3) and adapted with the algorithm's 1 step,
    so re-evaluating a run measured another protocol than its own test row."""
    paths, tmp = learners
    row = json.loads((tmp / "runs" / "maml3" / "results.json").read_text())["test"][0]
    code, out = evaluate(capsys, paths["maml3"], "--json", tmp / "maml3.json")
    result = json.loads((tmp / "maml3.json").read_text())
    assert code == 0 and row["steps"] == result["steps"] == 3, out.err
    assert result["accuracy"] == row["accuracy"] and result["loss"] == row["loss"]
    code, out = evaluate(capsys, paths["maml3"], "--steps", "1", "--json", tmp / "maml1.json")
    assert code == 0 and json.loads((tmp / "maml1.json").read_text())["steps"] == 1
    code, out = evaluate(capsys, paths["maml3"], "--head", "simpleshot", "--json", tmp / "head.json")
    assert code == 0 and json.loads((tmp / "head.json").read_text())["steps"] == 0, out.err


def test_a_learner_trained_with_split_fractions_evaluates_on_another_dataset_split_on_disk(learners, capsys, tmp_path):
    """Regression of the split-option refusal: evaluate --data-root B (split on disk) of a learner trained on
    a flat folder with data.split_fractions / split_seed was refused ("remove data.split_fractions"), an
    option the user never gave for B and cannot remove from a saved learner."""
    paths, tmp = learners
    flat = tmp_path / "flat"
    for split in ("train", "val", "test"):  # the folder_data classes, moved into one flat folder
        shutil.copytree(tmp / "data" / split, flat, dirs_exist_ok=True)
    cfg = tiny(tmp_path, "fractions", flat, split_fractions=[0.5, 0.2, 0.3], split_seed=3)
    path = run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"]
    code, out = evaluate(capsys, path, "--data-root", tmp / "other")
    assert code == 0 and "test split: accuracy" in out.out, out.err


def test_a_run_without_validation_does_not_warn_about_its_validation_settings(tmp_path):
    """The documented train+val recipe (val_split: null; the configs' train.val_every left as it is) warned
    "fit: val_every=2 without val_tasks ... pass val_tasks", advice in Python terms for a config run."""
    import warnings

    folder_data(tmp_path / "data")
    cfg = tiny(tmp_path, "tv", tmp_path / "data", train_split="train+val", val_split=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(config_from_dict(cfg), progress=False, quiet=True)
    assert not [w for w in seen if "val_every" in str(w.message)], [str(w.message) for w in seen]


def test_a_single_dataset_learner_is_evaluated_on_its_saved_test_split_unless_split_is_given(learners, capsys, tmp_path):
    """Before: without --split a one-dataset learner was scored on 'test' whatever its data.test_split
    (another split than fit's held-out rows, or 'split not found' where only val is held out); a
    multi-dataset learner already kept each dataset's. Now both default to the saved test split."""
    paths, _ = learners
    code, out = evaluate(capsys, paths["testval"], "--json", tmp_path / "default.json")
    assert code == 0 and "val split: accuracy" in out.out and "test split" not in out.out, out
    code, out = evaluate(capsys, paths["testval"], "--split", "val", "--json", tmp_path / "val.json")
    assert code == 0 and "val split: accuracy" in out.out, out
    assert json.loads((tmp_path / "default.json").read_text()) == json.loads((tmp_path / "val.json").read_text())
    code, out = evaluate(capsys, paths["testval"], "--split", "test")  # --split still overrides
    assert code == 0 and "test split: accuracy" in out.out, out
    code, out = evaluate(capsys, paths["trainval"])  # train+val, test_split test: still scored on test
    assert code == 0 and "test split: accuracy" in out.out, out
    for order in ([paths["testval"], paths["trainval"]], [paths["trainval"], paths["testval"]]):
        code, out = evaluate(capsys, *order)  # members tested on 'val' and 'test': not the first one's, whichever
        assert code == 2 and "the members were tested on different splits" in out.err and "--split" in out.err, out.err
    code, out = evaluate(capsys, paths["testval"], paths["trainval"], "--split", "val")  # trainval trained on val
    assert code == 2 and "--split 'val' holds classes" in out.err and "use --split test" in out.err, out.err


def test_the_default_split_is_never_one_a_member_selected_its_weights_on():
    """An ensemble's default split was the first member's saved test split, even where another member had
    chosen its weights on those classes (val_split with eval.checkpoint: best, early stopping, plateau)."""
    from metamtl.cli import _default_split

    def saved(test, val, **sections):
        return {"data": {"test_split": test, "val_split": val}, **sections}

    assert _default_split({"a": saved("val", None), "b": saved("val", None)}) == "val"
    assert _default_split({"a": saved(None, "val")}) == "test"
    for selects in ({"eval": {"checkpoint": "best"}}, {"train": {"early_stopping": {"patience": 2}}},
                    {"train": {"scheduler": {"name": "plateau"}}}):
        with pytest.raises(ConfigError, match="holds the classes b selected its weights on"):
            _default_split({"a": saved("val", None), "b": saved("val", "val", **selects)})
        assert _default_split({"a": saved("test", None), "b": saved("test", "val", **selects)}) == "test"
