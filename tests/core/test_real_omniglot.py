"""End to end on the real Omniglot files: CLI fit + evaluate, and a short run well above chance."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import Omniglot
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("images_background_small1", "images_background_small2")


def test_cli_fit_then_evaluate_end_to_end(tmp_path, data_root):
    env = {**os.environ, "METAMTL_DATA": str(data_root), "WANDB_MODE": "offline"}
    fit = subprocess.run(
        [sys.executable, "-m", "metamtl", "fit", str(REPO / "configs" / "omniglot_5w1s.yaml"),
         "train.iterations=8", "train.meta_batch_size=2", "train.val_every=4", "train.val_episodes=5",
         "eval.episodes=20", f"output_dir={tmp_path}", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert re.search(r"held-out test: accuracy \d+\.\d+% ± \d+\.\d+% \(5-way 1-shot, 20 episodes", fit.stdout)
    run_dir = tmp_path / "omniglot_5w1s"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["iterations"] == 8 and results["test"][0]["episodes"] == 20
    assert (run_dir / "report.html").is_file() and (run_dir / "learner.pt").is_file()

    ev = subprocess.run(
        [sys.executable, "-m", "metamtl", "evaluate", str(run_dir / "learner.pt"), "--episodes", "10",
         "--ways", "20", "--shots", "1", "--no-progress", "--json", str(tmp_path / "ev.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "test split: accuracy" in ev.stdout and "20-way 1-shot, 10 episodes" in ev.stdout
    single = json.loads((tmp_path / "ev.json").read_text())
    assert single["ways"] == 20

    # two checkpoints: an ensemble; of one learner twice, it must answer exactly as the learner
    ens = subprocess.run(
        [sys.executable, "-m", "metamtl", "evaluate", str(run_dir / "learner.pt"), str(run_dir / "learner.pt"),
         "--episodes", "10", "--ways", "20", "--shots", "1", "--no-progress", "--json", str(tmp_path / "ens.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ens.returncode == 0, ens.stderr[-3000:]
    assert "Ensemble(2 members" in ens.stdout and "20-way 1-shot, 10 episodes" in ens.stdout
    both = json.loads((tmp_path / "ens.json").read_text())
    assert both["per_episode_accuracy"] == pytest.approx(single["per_episode_accuracy"])

    # --hierarchy 1: every episode's characters from one alphabet (the within-alphabet protocol; the
    # small sets' test alphabets have at most 12 characters)
    ev = subprocess.run(
        [sys.executable, "-m", "metamtl", "evaluate", str(run_dir / "learner.pt"), "--episodes", "5", "--ways", "10",
         "--hierarchy", "1", "--no-progress", "--json", str(tmp_path / "alpha.json")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    within = json.loads((tmp_path / "alpha.json").read_text())
    assert within["hierarchy"] == 1 and within["ways"] == 10

    # no --ways/--shots: the setting the run evaluated (5-way 1-shot), not its 60-way training episodes
    ev = subprocess.run(
        [sys.executable, "-m", "metamtl", "evaluate", str(run_dir / "learner.pt"), "--episodes", "5", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "(5-way 1-shot, 5 episodes" in ev.stdout

    # the training classes are not held out: --split train / all are refused naming the split
    for split in ("train", "all", "train+val"):
        ev = subprocess.run([sys.executable, "-m", "metamtl", "evaluate", str(run_dir / "learner.pt"), "--split", split,
                             "--episodes", "5", "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
        assert ev.returncode == 2 and f"--split {split!r} holds classes {run_dir / 'learner.pt'} was trained on" in ev.stderr, ev.stderr


def test_cli_reports_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 3\n")
    out = subprocess.run([sys.executable, "-m", "metamtl", "fit", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Did you mean 'iterations'" in out.stderr and "Traceback" not in out.stderr


def test_short_real_training_is_well_above_chance(data_root):
    torch.manual_seed(0)
    train = Omniglot(data_root, "train", sources=SOURCES, rotations=(0, 90, 180, 270))
    test = Omniglot(data_root, "test", sources=SOURCES)
    base = lambda names: {n.split("@")[0] for n in names}  # noqa: E731
    assert not base(train.class_names) & base(test.class_names)  # held-out characters
    model = build_model("conv4", hidden=32, out_features=None)
    learner = MetaLearner(model, build_algorithm("anil", steps=2, lr=0.1, head_init="proto"),
                          meta_lr=2e-3, device="cpu", preprocessing=train.preprocessing)
    learner.fit(EpisodeSampler(train, 5, 1, 5, seed=0), iterations=40, meta_batch_size=8, progress=False)
    result = learner.evaluate(EpisodeSampler(test, 5, 1, 5, seed=1), 100, progress=False)
    assert result.accuracy - result.ci95 > 0.6, result  # chance is 0.2


def test_cli_evaluate_defaults_to_the_first_eval_setting_with_its_hierarchy(tmp_path, data_root, monkeypatch):
    """Without --ways/--shots, `metamtl evaluate` evaluates the run's first eval.settings entry: for the
    held-out-alphabets config, 20-way 1-shot episodes within one alphabet (its 60-way training episodes
    cannot even be drawn from the 82 test characters within one alphabet)."""
    from metamtl.cli import main
    from metamtl.config import load_config
    from metamtl.experiment import build_learner, build_tasks

    monkeypatch.setenv("METAMTL_DATA", str(data_root))
    cfg = load_config(REPO / "configs" / "benchmarks" / "omniglot_20w1s_alphabet.yaml",
                      ["model.hidden=4", f"output_dir={tmp_path}"])
    learner = build_learner(cfg, build_tasks(cfg)["train"])
    learner.save(tmp_path / "learner.pt")
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(tmp_path / "learner.pt"), "--episodes", "2", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["ways"], result["shots"], result["queries"], result["hierarchy"]) == (20, 1, 15, 1)
    assert main(["evaluate", str(tmp_path / "learner.pt"), "--episodes", "2", "--ways", "5", "--no-progress",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["ways"], result["shots"], result["hierarchy"]) == (5, 1, None)
