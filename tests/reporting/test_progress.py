"""``--no-progress`` silences every progress bar of a run, the accuracy-vs-inner-steps curve's too."""
from __future__ import annotations

import json

import yaml

from metamtl.cli import main

SINE = {
    "name": "sine", "seed": 0,
    "data": {"name": "sinusoid", "val_split": None},
    "tasks": {"ways": 1, "shots": 5, "queries": 5},
    "model": {"name": "mlp", "hidden": [8]},
    "algorithm": {"name": "maml", "steps": 1, "lr": 0.01},
    "train": {"iterations": 4, "meta_batch_size": 2, "device": "cpu"},
    "eval": {"episodes": 3, "queries": 5, "settings": [{"ways": 1, "shots": 5}]},
    "logging": {"wandb": False, "report": True, "report_steps_episodes": 3, "report_steps": [0, 1, 2]},
}
BARS = ("meta-train", "evaluate", "accuracy vs inner steps")


def test_no_progress_silences_every_bar_and_the_run_still_writes_its_curve(tmp_path, capfd):
    path = tmp_path / "sine.yaml"
    path.write_text(yaml.safe_dump({**SINE, "output_dir": str(tmp_path / "runs")}))
    assert main(["fit", str(path), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert not [bar for bar in BARS if bar in err], err
    run_dir = tmp_path / "runs" / "sine"
    curve = json.loads((run_dir / "steps_curve.json").read_text())
    assert curve["steps"] == [0, 1, 2] and curve["curves"][0]["metric"] == "loss"
    assert "steps_curve.png" in (run_dir / "report.html").read_text()
    # the same run with bars draws every one of them, so the check above can fail
    assert main(["fit", str(path), "--overwrite"]) == 0
    err = capfd.readouterr().err
    assert all(bar in err for bar in BARS), err
