"""Two-stage training: init_from copies a trunk; stages run in order with one history and result."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.config import config_from_dict, stage_configs
from metamtl.errors import CheckpointError, ConfigError, MetamtlError
from metamtl.experiment import run
from metamtl.models import build_model


def folder_data(root, sizes=(("train", 8), ("val", 5), ("test", 5)), per_class=4):
    g = torch.Generator().manual_seed(0)
    for split, classes in sizes:
        for c in range(classes):
            d = root / split / f"{split}{c}"
            d.mkdir(parents=True)
            base = torch.rand(12, 12, generator=g)
            for i in range(per_class):
                pixels = ((0.7 * base + 0.3 * torch.rand(12, 12, generator=g)) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def staged(tmp_path, **extra):
    return {
        "name": "staged", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "folder", "root": str(folder_data(tmp_path / "data")), "cache_dir": str(tmp_path / "cache")},
        "tasks": {"ways": 3, "shots": 1, "queries": 2},
        "model": {"name": "conv4", "hidden": 4, "blocks": 2},
        "algorithm": {"name": "protonet"},
        "train": {"iterations": 3, "meta_batch_size": 2, "device": "cpu", "val_every": 2, "val_episodes": 2},
        "eval": {"episodes": 3, "queries": 2, "settings": [{"ways": 3, "shots": 1}]},
        "logging": {"report": False, "metrics": None},
        "stages": [
            {"name": "pretrain", "algorithm": {"name": "transfer", "classifier": "cosine", "steps": 0, "head_init": "proto"},
             "tasks": {"ways": 8, "queries": 1}, "train": {"iterations": 4, "meta_batch_size": 1}},
            {"name": "meta"},
        ],
        **extra,
    }


def test_init_from_copies_the_trunk_only(tmp_path):
    torch.manual_seed(0)
    a = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=3), "maml",
                    device="cpu")
    torch.manual_seed(1)
    b = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=3), "maml",
                    device="cpu")
    b.init_from(a.save(tmp_path / "a.pt"))
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb) == name.startswith("trunk."), name
    other = MetaLearner(build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2), "maml", device="cpu")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        other.init_from(a)


def test_a_home_relative_init_from_is_read_under_home(tmp_path, monkeypatch):
    """``init_from: ~/a.pt`` (as ``data.root`` and ``output_dir``) is a path under $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = staged(tmp_path)
    del cfg["stages"]
    cfg["train"]["iterations"] = 0
    first = run(config_from_dict(cfg), progress=False, quiet=True)
    source = MetaLearner.load(first["checkpoint"], device="cpu")
    source.save(tmp_path / "a.pt")
    cfg.update(name="second", init_from="~/a.pt")
    second = MetaLearner.load(run(config_from_dict(cfg), progress=False, quiet=True)["checkpoint"], device="cpu")
    for pa, pb in zip(source.model.trunk.parameters(), second.model.trunk.parameters()):
        assert torch.equal(pa, pb)


def test_init_from_gives_mamlpp_per_step_batchnorm_the_loaded_affine_weights(tmp_path):
    torch.manual_seed(0)
    a = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                    "protonet", device="cpu")
    with torch.no_grad():  # as pre-training would: BatchNorm weights and biases away from 1 / 0
        for name, p in a.model.trunk.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p))
    b = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                    build_algorithm("mamlpp", steps=2, lr=0.1, head_init="proto"), device="cpu")
    b.init_from(a)
    norms, layers = b.algorithm.norms, [m for m in a.model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(layers) == len(norms.weight) == 2
    for i, layer in enumerate(layers):  # every step's set: the loaded weights (the ones MAML++ uses)
        assert torch.equal(norms.weight[i], layer.weight.detach().expand(3, -1))
        assert torch.equal(norms.bias[i], layer.bias.detach().expand(3, -1))


def test_stages_run_in_order_from_the_previous_trunk_with_one_history(tmp_path):
    cfg = config_from_dict(staged(tmp_path))
    (pre_name, pre), (meta_name, meta) = stage_configs(cfg)
    assert (pre_name, pre.algorithm["name"], pre.tasks.ways, pre.tasks.shots) == ("pretrain", "transfer", 8, 1)
    assert (meta_name, meta.algorithm["name"], meta.tasks.ways, meta.train.iterations) == ("meta", "protonet", 3, 3)
    results = run(cfg, progress=False, quiet=True)
    assert [s["stage"] for s in results["stages"]] == ["pretrain", "meta"]
    assert [s["algorithm"] for s in results["stages"]] == ["transfer", "protonet"]
    assert results["iterations"] == 7 and len(results["test"]) == 1  # test evaluation: final stage only
    history = json.loads((cfg.run_dir / "history.json").read_text())
    stages = [h["stage"] for h in history]
    assert stages.index("meta") > 0 and set(stages) == {"pretrain", "meta"}
    its = [h["iteration"] for h in history if "train/loss" in h or "loss" in h]
    assert its == sorted(its) and max(its) == 7  # iterations counted across the stages
    first = MetaLearner.load(cfg.run_dir / "stages" / "pretrain" / "learner.pt", device="cpu")
    assert not (cfg.run_dir / "stages" / "pretrain" / "results.json").read_text().count('"accuracy"')
    # a zero-iteration last stage evaluates exactly the pre-trained trunk
    zero = staged(tmp_path / "z")
    zero["stages"][1] = {"name": "meta", "train": {"iterations": 0}}
    zero["logging"] = {"report": True, "report_steps_episodes": 0, "metrics": None}
    results = run(config_from_dict(zero), progress=False, quiet=True)
    report = (tmp_path / "z" / "runs" / "staged" / "report.html").read_text()
    assert "Stage 1, <b>pretrain</b>: transfer, 4 meta-iterations" in report and "Stage 2, <b>meta</b>" in report
    assert (tmp_path / "z" / "runs" / "staged" / "learning_curves.png").is_file()
    final = MetaLearner.load(results["checkpoint"], device="cpu")
    first = MetaLearner.load(tmp_path / "z" / "runs" / "staged" / "stages" / "pretrain" / "learner.pt", device="cpu")
    for pa, pb in zip(first.model.trunk.parameters(), final.model.trunk.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("stages,match", [
    ([{"algorithm": {"name": "protonet"}}], r"stages\[0\] needs a 'name'"),
    ([{"name": "a"}, {"name": "a"}], "used twice"),
    ([{"name": "a", "eval": {}}], r"unknown key 'eval'"),
    ([{"name": "a", "algorithm": {"name": "mamll"}}], r"stages\[0\] \(a\): .*unknown algorithm 'mamll'"),
    ([{"name": "a", "train": {"iterations": -1}}], r"stages\[0\] \(a\): train.iterations must be >= 0"),
])
def test_bad_stages_are_refused(stages, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"algorithm": {"name": "protonet"}, "stages": stages})


def test_the_head_and_eval_settings_check_applies_to_the_evaluated_last_stage_only():
    """A learned-head pre-training stage with other ways than eval.settings is never evaluated, and
    a staged config's own (unused) algorithm is not checked against eval.settings."""
    cfg = config_from_dict({"algorithm": {"name": "protonet"}, "tasks": {"ways": 5}, "stages": [
        {"name": "pre", "algorithm": {"name": "maml"}, "tasks": {"ways": 20}}, {"name": "meta"}]})
    assert [s.algorithm["name"] for _, s in stage_configs(cfg)] == ["maml", "protonet"]
    config_from_dict({"tasks": {"ways": 5}, "eval": {"settings": [{"ways": 20, "shots": 1}]}, "stages": [
        {"name": "pre", "algorithm": {"name": "protonet"}, "tasks": {"ways": 30}},
        {"name": "meta", "algorithm": {"name": "protonet"}}]})
    with pytest.raises(ConfigError, match=r"stages\[1\] \(meta\): eval.settings use a different number of ways"):
        config_from_dict({"algorithm": {"name": "protonet"}, "eval": {"settings": [{"ways": 20, "shots": 1}]},
                          "stages": [{"name": "pre"}, {"name": "meta", "algorithm": {"name": "maml"}}]})


def test_cosine_protonet_logits_and_learned_scale(tmp_path):
    from metamtl.algorithms import build_algorithm
    from metamtl.tasks import EpisodeSampler

    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None)
    alg = build_algorithm("protonet", distance="cosine", scale=5.0, learn_scale=True)
    learner = MetaLearner(model, alg, device="cpu")
    assert any(p is alg.scale for p in learner.meta_parameters())
    x, y = torch.randn(6, 1, 12, 12), torch.arange(3).repeat(2)
    q = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        protos = torch.stack([model.trunk(x)[y == k].mean(0) for k in range(3)])
        expected = 5.0 * torch.nn.functional.cosine_similarity(model.trunk(q)[:, None], protos[None], dim=-1)
        torch.testing.assert_close(alg.adapt(model, x, y, 3)(q), expected)
    from metamtl.data import ClassDataset

    ds = ClassDataset((torch.rand(60, 1, 12, 12) * 255).to(torch.uint8), torch.arange(10).repeat_interleave(6),
                      [f"c{i}" for i in range(10)])
    learner.fit(EpisodeSampler(ds, 3, 1, 2), iterations=3, meta_batch_size=2, progress=False)
    assert float(alg.scale) != 5.0  # meta-learned
    loaded = MetaLearner.load(learner.save(tmp_path / "c.pt"), device="cpu")
    assert float(loaded.algorithm.scale) == float(alg.scale) and loaded.algorithm.config()["scale"] == 5.0
    assert "scale" not in build_algorithm("protonet").state_dict()  # euclidean checkpoints unchanged
    with pytest.raises(ConfigError, match="unknown protonet distance 'cos'"):
        build_algorithm("protonet", distance="cos")


@pytest.mark.parametrize("change, error", [
    ({"eval": {"episodes": 3, "queries": 2, "settings": [{"ways": 9, "shots": 1}]}}, "eval.settings"),
    ({"data": {"test_split": "missing"}}, "missing"),
])
def test_last_stage_test_split_is_checked_before_the_first_stage_trains(tmp_path, change, error):
    """A test split the last stage cannot evaluate on fails at once, not after the earlier stages trained."""
    cfg_dict = staged(tmp_path)
    cfg_dict.update({k: {**cfg_dict[k], **v} for k, v in change.items()})
    cfg = config_from_dict(cfg_dict)
    with pytest.raises(MetamtlError, match=error):
        run(cfg, progress=False, quiet=True)
    assert not (tmp_path / "runs" / "staged" / "stages" / "pretrain" / "learner.pt").exists()


def test_a_stage_model_that_cannot_take_the_previous_trunk_is_refused_before_any_stage_trains(tmp_path):
    cfg_dict = staged(tmp_path)
    cfg_dict["stages"][1]["model"] = {"hidden": 8}  # stage 1 trains a hidden-4 trunk
    with pytest.raises(ConfigError, match="stage 'meta' cannot start from the previous stage's trunk: .*does not fit"):
        run(config_from_dict(cfg_dict), progress=False, quiet=True)
    assert not (tmp_path / "runs" / "staged" / "stages" / "pretrain" / "learner.pt").exists()


def test_a_staged_run_into_a_used_folder_is_refused_before_any_stage_trains(tmp_path):
    cfg_dict = staged(tmp_path)
    cfg = config_from_dict(cfg_dict)
    run(cfg, progress=False, quiet=True)
    first = tmp_path / "runs" / "staged" / "stages" / "pretrain" / "learner.pt"
    mtime = first.stat().st_mtime_ns
    again = json.loads(json.dumps(cfg_dict))
    again["stages"][0]["name"] = "pre"  # a renamed first stage: its own folder is new, the last stage's is not
    with pytest.raises(ConfigError, match=r"stage 'meta': .*already holds a run .*--resume .*staged.last\.pt"):
        run(config_from_dict(again), progress=False, quiet=True)
    assert not (tmp_path / "runs" / "staged" / "stages" / "pre").exists() and first.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"stage 'pretrain': .*already holds a run"):
        run(cfg, progress=False, quiet=True)
    assert run(cfg, progress=False, quiet=True, overwrite=True)["iterations"] == 7


def test_callbacks_given_to_a_staged_run_start_every_stage_as_given(tmp_path):
    from metamtl.callbacks import Callback, EarlyStopping

    stopper = EarlyStopping(monitor="val/accuracy", mode="max", patience=50)

    class Seen(Callback):
        def __init__(self):
            self.at_start = []

        def on_fit_start(self, state):
            self.at_start.append((stopper.best, stopper.wait))

    seen = Seen()
    cfg_dict = staged(tmp_path)
    cfg_dict["stages"][0]["train"]["val_every"] = 1  # stage 1 validates: the stopper holds a best value after it
    run(config_from_dict(cfg_dict), progress=False, quiet=True, callbacks=[seen, stopper])
    assert seen.at_start == [(None, 0), (None, 0)]  # stage 2 does not inherit stage 1's best (another task)
    assert stopper.best is not None


@pytest.mark.parametrize("stop_in", ["transfer", "protonet"])
def test_an_interrupted_staged_run_resumes_with_the_printed_command(tmp_path, stop_in):
    """``--resume RUN_DIR/last.pt`` (the hint of an interrupted ensemble member, whose file need not
    exist) or a stage's own ``last.pt`` continues a staged run: finished stages are skipped, the
    interrupted one resumes from its last.pt; the result equals the uninterrupted run's (was: "a
    staged run cannot be resumed as a whole")."""
    import os
    import signal

    from metamtl.callbacks import Callback
    from metamtl.errors import FitInterrupted

    class Stop(Callback):
        def on_iteration_end(self, state, metrics):
            if state.learner.algorithm.name == stop_in and state.iteration == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # as a user would: finish the step, save last.pt

    full = run(config_from_dict(staged(tmp_path / "full")), progress=False, quiet=True)
    cfg = config_from_dict(staged(tmp_path / "cut"))
    with pytest.raises(FitInterrupted):
        run(cfg, progress=False, quiet=True, callbacks=[Stop()])
    pretrain = cfg.run_dir / "stages" / "pretrain"
    assert (pretrain / "last.pt").is_file() and not (cfg.run_dir / "results.json").exists()
    mtime = (pretrain / "learner.pt").stat().st_mtime_ns if stop_in == "protonet" else None
    resume = cfg.run_dir / "last.pt" if stop_in == "transfer" else pretrain / "last.pt"
    results = run(cfg, resume=resume, progress=False, quiet=True)
    assert [s["stage"] for s in results["stages"]] == ["pretrain", "meta"] and results["iterations"] == 7
    assert results["test"] and [s["iterations"] for s in results["stages"]] == [4, 3]
    if mtime is not None:  # a finished stage is not trained again
        assert (pretrain / "learner.pt").stat().st_mtime_ns == mtime
    history = json.loads((cfg.run_dir / "history.json").read_text())
    assert {h["stage"] for h in history} == {"pretrain", "meta"}
    a = MetaLearner.load(full["checkpoint"], device="cpu")
    b = MetaLearner.load(results["checkpoint"], device="cpu")
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ConfigError, match="resumes from its own folder"):
        run(cfg, resume=full["checkpoint"], progress=False, quiet=True)


def test_init_from_an_ensemble_file_says_it_holds_an_ensemble(tmp_path):
    """init_from=.../ensemble.pt said "damaged or not a learner checkpoint: it lacks model_state"."""
    from metamtl.ensemble import Ensemble

    def one(seed):
        torch.manual_seed(seed)
        return MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=12, blocks=2, out_features=None),
                           "protonet", device="cpu")

    path = Ensemble([one(0), one(1)], device="cpu").save(tmp_path / "ensemble.pt")
    with pytest.raises(CheckpointError, match=r"ensemble.pt holds an ensemble of 2 learners: .*one learner's"):
        one(2).init_from(path)
    for bad in (123, Ensemble([one(0)], device="cpu"), None):  # were bare TypeErrors
        with pytest.raises(ConfigError, match=r"init_from takes a MetaLearner, the path of a saved one or a model state "):
            one(2).init_from(bad)


def test_earlier_stages_of_a_several_dataset_run_do_not_touch_the_test_classes(tmp_path):
    cfg_dict = staged(tmp_path)
    cfg_dict["datasets"] = [dict(cfg_dict["data"], label="a"), {
        "name": "folder", "root": str(folder_data(tmp_path / "b")), "cache_dir": str(tmp_path / "cb"), "label": "b"}]
    cfg_dict["stages"][0].update(tasks={"ways": 5, "queries": 1}, algorithm={"name": "protonet"})
    cfg = config_from_dict(cfg_dict)
    results = run(cfg, progress=False, quiet=True)
    assert not json.loads((cfg.run_dir / "stages" / "pretrain" / "results.json").read_text())["test"]
    assert {r.get("dataset") for r in results["test"]} == {"a", "b"}


def test_distillation_phases_a_later_stage_never_applies_are_refused_before_any_stage_trains(tmp_path):
    cfg_dict = staged(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"")  # read only when the stage trains: never here
    cfg_dict["stages"][1]["distill"] = {"teacher": str(tmp_path / "teacher.pt"), "phases": ["classes"]}
    with pytest.raises(ConfigError, match="stage 'meta': distillation phases \\['classes'\\] never apply to algorithm 'protonet'"):
        run(config_from_dict(cfg_dict), progress=False, quiet=True)
    assert not (tmp_path / "runs" / "staged" / "stages" / "pretrain" / "learner.pt").exists()


def test_shared_train_callbacks_are_checked_on_the_stage_configs_that_give_what_they_need(tmp_path):
    """``over: budget`` at the top with budgets in the stages (as the README's stages set them), and
    early stopping with the validation split set per stage, are valid; a stage lacking them is not."""
    cfg_dict = staged(tmp_path)
    cfg_dict["train"].update(scheduler={"name": "cosine", "over": "budget"}, early_stopping={"patience": 2})
    cfg_dict["data"]["val_split"] = None
    cfg_dict["stages"][0]["train"] = {"budget_minutes": 6, "meta_batch_size": 1}
    cfg_dict["stages"][0]["data"] = {"val_split": "val"}
    cfg_dict["stages"][1].update(train={"budget_minutes": 4}, data={"val_split": "val"})
    stages = stage_configs(config_from_dict(cfg_dict))
    assert [c.train.budget_minutes for _, c in stages] == [6, 4]
    cfg_dict["stages"][1]["train"] = {}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(meta\): train.scheduler.over: 'budget' needs train.budget_minutes"):
        config_from_dict(cfg_dict)


@pytest.mark.parametrize("off", [{}, None])
def test_a_stage_with_an_empty_or_null_distill_section_trains_without_distillation(off):
    """``distill: {}`` / ``null`` in a stage turns the config's distillation off there (was: ``{}``
    merged into the section, which carried on; ``null`` refused as 'expected a mapping')."""
    base = {"model": {"name": "conv4", "hidden": 4}, "algorithm": {"name": "protonet"},
            "distill": {"teacher": "runs/t/learner.pt", "phases": ["classes"], "weight": 0.5, "ce_weight": 0.5}}
    cfg = config_from_dict({**base, "stages": [{"name": "pre", "algorithm": {"name": "transfer", "num_classes": 10}},
                                               {"name": "meta", "distill": off}]})
    stages = dict(stage_configs(cfg))
    assert stages["pre"].distill == base["distill"] and stages["meta"].distill == {}


def test_an_earlier_stages_report_draws_its_steps_curve_in_the_first_test_setting(tmp_path):
    """`metamtl report RUN/stages/<stage>` recorded "TaskError: 8-way tasks need 8 classes": a stage has no
    test rows, and the curve fell back to the training setting (8-way pre-training batches) instead of
    the run's first test setting (3-way)."""
    from metamtl.cli import main

    cfg = staged(tmp_path)
    cfg["stages"][0]["algorithm"] = {"name": "maml", "steps": 1, "lr": 0.1, "head_init": "proto"}
    run(config_from_dict(cfg), progress=False, quiet=True)
    stage = tmp_path / "runs" / "staged" / "stages" / "pretrain"
    assert main(["report", str(stage), "--steps-episodes", "2"]) == 0
    curve = json.loads((stage / "steps_curve.json").read_text())
    assert "error" not in curve and curve["curves"][0]["setting"].startswith("3-way 1-shot"), curve
