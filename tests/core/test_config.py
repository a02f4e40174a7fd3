"""Config files and overrides: validation with helpful messages."""
from __future__ import annotations

from pathlib import Path

import pytest

from metamtl.config import apply_overrides, config_from_dict, load_config, stage_configs
from metamtl.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# every shipped config, the benchmark ones included (base.yaml files only serve as `extends` bases)
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "base.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.iterations >= 1
    for _, stage in stage_configs(cfg) if cfg.stages else ():  # every stage is a valid config too
        assert stage.train.iterations >= 1


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown key 'iteratons'. Did you mean 'iterations'"):
        config_from_dict({"train": {"iteratons": 5}})
    with pytest.raises(ConfigError, match="config: unknown key 'trian'. Did you mean 'train'"):
        config_from_dict({"trian": {}})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="config.train.meta_lr: expected a number, got 'fast'"):
        config_from_dict({"train": {"meta_lr": "fast"}})
    with pytest.raises(ConfigError, match="config.tasks.ways: expected an integer"):
        config_from_dict({"tasks": {"ways": 2.5}})
    with pytest.raises(ConfigError, match="finite"):
        config_from_dict({"train": {"meta_lr": float("nan")}})
    with pytest.raises(ConfigError, match="meta_lr must be > 0"):
        config_from_dict({"train": {"meta_lr": -0.1}})


def test_contradictory_settings_are_explained():
    with pytest.raises(ConfigError, match="head_init"):
        config_from_dict({"algorithm": {"name": "maml"}, "eval": {"settings": [{"ways": 20, "shots": 1}]}})


def test_overrides_parse_yaml_values():
    data = apply_overrides({"train": {"iterations": 1}}, ["train.iterations=7", "data.sources=[a, b]", "data.root=/x"])
    assert data == {"train": {"iterations": 7}, "data": {"sources": ["a", "b"], "root": "/x"}}
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["train.iterations"])


def test_overrides_reach_list_entries_by_index_or_name():
    """stages (and datasets) are lists: ``stages.anil.train.iterations=3`` or ``stages.1...`` sets one stage."""
    data = {"stages": [{"name": "protonet", "train": {"iterations": 10}}, {"name": "anil"}],
            "datasets": [{"name": "omniglot", "label": "o"}], "data": {"train_rotations": [0, 90]}}
    apply_overrides(data, ["stages.1.train.iterations=5", "stages.protonet.train.iterations=3",
                           "datasets.o.image_size=32", "data.train_rotations.1=180"])
    assert data["stages"] == [{"name": "protonet", "train": {"iterations": 3}}, {"name": "anil", "train": {"iterations": 5}}]
    assert data["datasets"][0]["image_size"] == 32 and data["data"]["train_rotations"] == [0, 180]
    with pytest.raises(ConfigError, match=r"'foo' is neither an index \(0..1\) nor the name of one entry of the list "
                                          r"\(protonet, anil\)"):
        apply_overrides(data, ["stages.foo.train.iterations=1"])
    with pytest.raises(ConfigError, match="'0' is not a section"):
        apply_overrides(data, ["data.train_rotations.0.x=1"])
    cfg = load_config(CONFIG_DIR / "benchmarks" / "omniglot_5w1s_anil.yaml",
                      ["stages.anil.train.budget_minutes=null", "stages.anil.train.iterations=3",
                       "stages.anil.train.scheduler.over=iterations"])
    (_, first), (_, second) = stage_configs(cfg)
    assert second.train.iterations == 3 and second.train.budget_minutes is None and first.train.budget_minutes == 7.5


def test_cli_overrides_may_follow_options(tmp_path, capsys):
    """``metamtl fit CONFIG --overwrite key=value``: overrides after an option are overrides, in order,
    not an argparse "unrecognized arguments" error (so are evaluate's checkpoints and report's run
    folders); unknown options still are."""
    from metamtl.cli import main, parse_args

    args = parse_args(["fit", "c.yaml", "a.b=1", "--overwrite", "--resume", "r.pt", "c.d=2", "a.b=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "a.b=3"] and args.overwrite and args.resume == "r.pt"
    assert parse_args(["fit", "--no-progress", "c.yaml", "x=1"]).overrides == ["x=1"]
    with pytest.raises(SystemExit):
        parse_args(["fit", "c.yaml", "--bogus", "x=1"])
    assert "unrecognized arguments: --bogus x=1" in capsys.readouterr().err
    assert parse_args(["evaluate", "a.pt", "--ways", "5", "b.pt"]).checkpoints == ["a.pt", "b.pt"]
    assert parse_args(["report", "r1", "--embed", "r2"]).run_dirs == ["r1", "r2"]
    with pytest.raises(SystemExit):
        parse_args(["evaluate", "learner.pt", "--ways", "5", "--bogus"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # overrides are optional: only the config is missing
        parse_args(["fit"])
    assert capsys.readouterr().err.endswith("the following arguments are required: config\n")
    (tmp_path / "c.yaml").write_text("name: x\n")
    assert main(["fit", str(tmp_path / "c.yaml"), "--no-progress", "tasks.ways=five"]) == 2
    assert "config.tasks.ways: expected an integer, got 'five'" in capsys.readouterr().err


def test_numbers_are_read_by_yaml_1_2_rules(tmp_path):
    """``1e-3`` is a float and ``010`` the decimal 10 (never octal 8), in overrides, config files
    and YAML-valued CLI options alike."""
    from metamtl.cli import _yaml_option

    cfg = load_config(None, ["train.meta_lr=1e-3", "tasks.seed=010", "data.split_seed=0123"])
    assert cfg.train.meta_lr == pytest.approx(1e-3) and cfg.tasks.seed == 10 and cfg.data.split_seed == 123
    (tmp_path / "c.yaml").write_text("train:\n  meta_lr: 1e-3\n  iterations: 0500\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.meta_lr == pytest.approx(1e-3) and cfg.train.iterations == 500
    assert _yaml_option("--support-augment", "{copies: 2, augment: {shear: 3e-1}}") == {
        "copies": 2, "augment": {"shear": 0.3}}
    assert apply_overrides({}, ["a=0o17", "b=1:30", "c=.5"]) == {"a": 15, "b": "1:30", "c": 0.5}


def test_switching_a_registry_entry_by_override_starts_the_section_afresh():
    """``algorithm.name=protonet`` over MAML drops MAML's settings, as ``extends`` does; settings
    given by earlier overrides on the same command line are kept."""
    cfg = load_config(CONFIG_DIR / "compare" / "maml.yaml", ["algorithm.name=protonet"])
    assert cfg.algorithm == {"name": "protonet"}
    data = apply_overrides({"model": {"name": "conv4", "hidden": 64}, "algorithm": {"name": "maml", "lr": 0.4}},
                           ["algorithm.steps=3", "algorithm.name=anil", "model.name=conv4", "model.name=resnet12"])
    assert data == {"model": {"name": "resnet12"}, "algorithm": {"name": "anil", "steps": 3}}
    multi = load_config(CONFIG_DIR / "multi" / "omniglot_miniimagenet.yaml", ["algorithm.base.name=protonet"])
    assert multi.algorithm["base"] == {"name": "protonet"}  # not ANIL's head_init, steps, lr, eval_steps
    # the demo's scheduler is cosine over the budget: switching it to step dropped nothing, and step
    # schedules refuse cosine-only settings such as over
    demo = load_config(CONFIG_DIR / "omniglot_5w1s.yaml", ["train.scheduler.name=step", "train.scheduler.step_size=100"])
    assert (demo.train.scheduler.name, demo.train.scheduler.over, demo.train.scheduler.step_size) == ("step", "iterations", 100)


def test_text_settings_take_number_and_boolean_looking_overrides_as_typed():
    """``name=2024``, ``name=010``, ``name=no``, ``logging.tags=[v, 2024]``: a setting that can only
    be text takes the override as written, never a YAML number or boolean."""
    cfg = load_config(None, ["name=2024", "logging.tags=[baseline, 2024, 010]", "data.train_split=1"])
    assert cfg.name == "2024" and cfg.logging.tags == ["baseline", "2024", "010"] and cfg.data.train_split == "1"
    assert load_config(None, ["name=010"]).name == "010" and load_config(None, ["name=no"]).name == "no"
    assert load_config(None, ["init_from=null"]).init_from is None
    assert load_config(None, ["name=null"]).name == "null"  # was refused as None (name can only be text)
    anil = load_config(CONFIG_DIR / "benchmarks" / "omniglot_5w1s_anil.yaml",
                       ["stages.anil.data.root=2024", "stages.1.data.train_split=010"])
    assert [(s.data.root, s.data.train_split) for _, s in stage_configs(anil)][1] == ("2024", "010")  # as at the top level


def test_a_folder_given_as_the_config_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is a folder; give a YAML file in it"):
        load_config(tmp_path, [])
    assert load_config(None, ["tasks.seed=010"]).tasks.seed == 10  # numbers stay numbers


def test_the_readme_names_as_registry_switches_only_sections_that_have_a_name():
    """Each ``section.name=...`` override the README lists as switching a registry entry is one:
    an unknown entry is refused as an unknown name, never as an unknown key ``name``."""
    import re

    text = " ".join((CONFIG_DIR.parent / "README.md").read_text().split())
    listed = re.search(r"An override that switches a registry entry \((.*?)\) starts", text).group(1)
    paths = re.findall(r"`([\w.]+)\.name=", listed)
    assert paths
    for path in paths:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG_DIR / "multi" / "omniglot_miniimagenet.yaml", [f"{path}.name=no_such_entry"])
        assert "'no_such_entry'" in str(err.value) and "unknown key" not in str(err.value), path


def test_an_override_of_a_stage_sharing_a_yaml_anchor_changes_that_stage_only(tmp_path):
    """``&tr`` / ``*tr`` make two stages share one mapping in the parsed file; an override of one
    stage must not change the other (the file is copied before overrides apply)."""
    (tmp_path / "c.yaml").write_text("name: demo\nalgorithm: {name: protonet}\nstages:\n"
                                     "  - {name: pre, train: &tr {iterations: 50, meta_batch_size: 2}}\n"
                                     "  - {name: meta, train: *tr}\n")
    cfg = load_config(tmp_path / "c.yaml", ["stages.pre.train.iterations=7"])
    assert [(n, s.train.iterations) for n, s in stage_configs(cfg)] == [("pre", 7), ("meta", 50)]


MULTI = CONFIG_DIR / "multi" / "omniglot_miniimagenet.yaml"


def test_a_data_section_beside_datasets_is_refused_rather_than_ignored():
    """With ``datasets:``, ``data:`` (top level or a stage's) would never be read: refused, naming
    the datasets entries as the place for those settings."""
    with pytest.raises(ConfigError, match=r"datasets.*data.*image_size.*datasets\.0\.image_size"):
        load_config(MULTI, ["data.image_size=32"])
    stages = "stages=[{name: pre, data: {image_size: 32}}, {name: meta}]"
    with pytest.raises(ConfigError, match=r"stages\[0\] \(pre\): .*datasets.*data"):
        load_config(MULTI, [stages])
    assert [d.image_size for d in load_config(MULTI, ["datasets.0.image_size=32"]).datasets] == [32, 84]


def test_validation_settings_of_a_several_dataset_config_are_checked_on_its_datasets():
    """Early stopping needs a validation split of a dataset actually used, and each dataset's
    split_seed is range-checked as data.split_seed is."""
    with pytest.raises(ConfigError, match="need validation"):
        load_config(MULTI, ["train.early_stopping={patience: 2}"])  # both datasets have val_split: null
    cfg = load_config(MULTI, ["datasets.0.val_split=val", "train.early_stopping={patience: 2}"])
    assert cfg.train.early_stopping.patience == 2
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.split_seed must be an integer in 0..2\*\*63-1"):
        load_config(MULTI, ["datasets.0.split_seed=-5"])


def test_text_overrides_keep_what_follows_a_hash_and_take_dates_as_typed():
    """``name=run #2`` names the run 'run #2' (YAML would drop `` #2`` as a comment) and dates are
    text where a setting can only be text; elsewhere a value cut by a comment is refused."""
    assert load_config(None, ["name=run #2"]).name == "run #2"
    assert load_config(None, ["data.root=/data/omniglot #2"]).data.root == "/data/omniglot #2"
    assert load_config(None, ["name=2024-06-01"]).name == "2024-06-01"
    assert load_config(None, ["logging.tags=[baseline, 2024-06-01]"]).logging.tags == ["baseline", "2024-06-01"]
    assert load_config(None, ["name='quoted #1'"]).name == "quoted #1"
    assert load_config(None, ["data.root=null"]).data.root is None
    with pytest.raises(ConfigError, match="' #' starts a YAML comment"):
        load_config(None, ["train.iterations=5 #was 50"])


def test_a_key_given_twice_in_a_config_file_is_refused_naming_it_and_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently; a config file's first ``train:`` section
    must not vanish: the file is refused, naming the key and both lines."""
    (tmp_path / "c.yaml").write_text("train:\n  iterations: 50\n  meta_lr: 0.01\ntasks: {ways: 5}\n"
                                     "train:\n  budget_minutes: 2\n")
    with pytest.raises(ConfigError, match=r"(?s)c.yaml is not valid YAML.*key 'train' twice \(first on line 1\).*line 5"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("train: &t {iterations: 50}\nstages:\n  - {name: a, train: {<<: *t, iterations: 5}}\n")
    assert load_config(tmp_path / "d.yaml").stages[0]["train"] == {"iterations": 5}  # merge keys may be overridden


def test_overrides_reach_list_entries_and_registry_settings_left_at_their_defaults(tmp_path):
    """``eval.settings.0.ways=20`` edits the default setting, ``algorithm.head_init=proto`` the default
    algorithm (maml), when the file does not give those sections."""
    (tmp_path / "c.yaml").write_text("name: demo\nalgorithm: {name: protonet}\n")
    cfg = load_config(tmp_path / "c.yaml", ["eval.settings.0.ways=20", "eval.heads.0=simpleshot"])
    assert [(s.ways, s.shots) for s in cfg.eval.settings] == [(20, 1)] and cfg.eval.heads == ["simpleshot"]
    (tmp_path / "d.yaml").write_text("name: demo\n")
    assert load_config(tmp_path / "d.yaml", ["algorithm.head_init=proto"]).algorithm == {"name": "maml", "head_init": "proto"}
    assert load_config(None, ["model.hidden=32"]).model == {"name": "conv4", "hidden": 32}
    staged = load_config(tmp_path / "c.yaml", ["stages=[{name: a}, {name: b}]", "stages.b.algorithm.scale=2.0"])
    assert stage_configs(staged)[1][1].algorithm == {"name": "protonet", "scale": 2.0}  # merged over the config's
    with pytest.raises(ConfigError, match=r"data.train_rotations is not set.*give the whole list"):
        load_config(None, ["data.train_rotations.0=90"])
    with pytest.raises(ConfigError, match=r"the list is empty, so it has no entry '0'; give the whole list \(logging.tags=\[...\]\)"):
        load_config(None, ["logging.tags.0=x"])


def test_the_out_features_check_applies_to_learned_heads_only():
    """ProtoNet (proto heads) and transfer (zero heads) take any model.out_features; a learned head
    needs tasks.ways outputs, in a stage too."""
    config_from_dict({"model": {"name": "conv4", "out_features": 64}, "algorithm": {"name": "protonet"}})
    config_from_dict({"model": {"name": "conv4", "out_features": 64}, "algorithm": {"name": "maml"},
                      "tasks": {"ways": 64}, "eval": {"settings": [{"ways": 64}]},
                      "stages": [{"name": "proto", "algorithm": {"name": "protonet"}, "tasks": {"ways": 5}},
                                 {"name": "maml"}]})
    with pytest.raises(ConfigError, match="model.out_features is 64 but tasks.ways is 5"):
        config_from_dict({"model": {"name": "conv4", "out_features": 64}, "algorithm": {"name": "maml"}})


def test_a_home_relative_output_dir_is_under_home_not_a_folder_named_tilde(tmp_path, monkeypatch):
    from metamtl.experiment import check_output_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_dir=~/runs"])
    check_output_dir(cfg)
    assert cfg.run_dir == tmp_path / "home" / "runs" / "experiment" and cfg.run_dir.is_dir()
    assert not (tmp_path / "~").exists()


def test_eval_checkpoint_best_without_validation_is_refused_not_silently_the_last_weights():
    """Before: eval.checkpoint: best with data.val_split: null trained, wrote no best.pt, evaluated the
    last weights without a word and recorded 'best' in results.json."""
    with pytest.raises(ConfigError, match=r"eval.checkpoint: 'best' .* no validation; set data.val_split"):
        load_config(None, ["data.val_split=null", "eval.checkpoint=best"])
    with pytest.raises(ConfigError, match=r"eval.checkpoint: 'best' .*datasets\[i\].val_split"):
        load_config(MULTI, ["eval.checkpoint=best"])  # both datasets have val_split: null
    assert load_config(None, ["eval.checkpoint=best"]).eval.checkpoint == "best"


def test_eval_checkpoint_best_is_checked_on_the_evaluated_stage_only():
    """Regression: a staged config pre-training without validation, then a validated last stage with
    eval.checkpoint: best, was refused at its first stage (which is never evaluated)."""
    stages = "stages=[{name: pre, data: {val_split: null}}, {name: meta}]"
    cfg = load_config(None, ["eval.checkpoint=best", stages])
    assert len(cfg.stages) == 2
    with pytest.raises(ConfigError, match=r"stages\[1\] \(meta\): eval.checkpoint: 'best'"):
        load_config(None, ["eval.checkpoint=best", "stages=[{name: pre}, {name: meta, data: {val_split: null}}]"])


@pytest.mark.parametrize("selects", [["eval.checkpoint=best"], ["train.early_stopping={patience: 2}"],
                                     ["train.scheduler={name: plateau}"]],
                         ids=["checkpoint-best", "early-stopping", "plateau-scheduler"])
def test_a_test_split_overlapping_the_validation_split_is_refused_while_validation_selects(selects):
    """Before: data.test_split=val with eval.checkpoint: best (or early stopping / a plateau scheduler)
    was accepted, and the 'held-out test' numbers were of the val classes the weights were chosen on."""
    with pytest.raises(ConfigError, match=r"data.test_split \('val'\) shares classes with data.val_split \('val'\)"
                                          r".*set eval.checkpoint: last .*or data.val_split: null together "
                                          r"with eval.checkpoint: last"):
        load_config(None, ["data.test_split=val", *selects])
    with pytest.raises(ConfigError, match=r"data.test_split \('test\+val'\) shares classes"):
        load_config(None, ["data.test_split=test+val", *selects])  # compared after splitting on '+'
    with pytest.raises(ConfigError, match=r"datasets\[0\].test_split \('val'\) shares classes with "
                                          r"datasets\[0\].val_split"):  # per dataset of a several-dataset config
        load_config(MULTI, ["datasets.0.val_split=val", "datasets.0.test_split=val", *selects])
    first = 1 if selects == ["eval.checkpoint=best"] else 0  # the evaluated stage; every stage that trains on val
    with pytest.raises(ConfigError, match=rf"stages\[{first}\] \((pre|meta)\): data.test_split \('val'\) shares"):
        load_config(None, ["data.test_split=val", *selects, "stages=[{name: pre}, {name: meta}]"])
    # nothing selects on the overlapping split: accepted
    assert load_config(MULTI, ["datasets.0.val_split=val", *selects]).datasets[1].test_split == "val"
    assert load_config(None, ["data.test_split=val", "data.val_split=null"]).data.test_split == "val"


def test_the_readme_recipe_without_test_images_still_loads():
    """README: mini-ImageNet without test images runs with data.test_split=val eval.checkpoint=last."""
    for name in ("miniimagenet_5w1s", "miniimagenet_5w1s_anil", "miniimagenet_5w1s_ensemble", "miniimagenet_5w5s"):
        path = CONFIG_DIR / "benchmarks" / f"{name}.yaml"
        cfg = load_config(path, ["data.test_split=val", "eval.checkpoint=last"])
        assert cfg.data.test_split == "val"
        with pytest.raises(ConfigError, match=r"data.test_split \('val'\) shares classes with data.val_split"):
            load_config(path, ["data.test_split=val"])  # their eval.checkpoint: best
        # every fix the message offers loads (data.val_split: null alone is refused with checkpoint best)
        assert load_config(path, ["data.test_split=val", "data.val_split=null", "eval.checkpoint=last"]).data.val_split is None
