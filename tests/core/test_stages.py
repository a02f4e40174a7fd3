"""Two-stage training: init_from copies a trunk; stages run in order with one history and result."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from metamtl import MetaLearner
from metamtl.config import config_from_dict, stage_configs
from metamtl.errors import CheckpointError, ConfigError
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
    results = run(config_from_dict(zero), progress=False, quiet=True)
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
