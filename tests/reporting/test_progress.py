"""``--no-progress`` silences every progress bar of a run: the accuracy-vs-inner-steps curve's, and
the data layer's image decoding (drawn only on a terminal) too."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
import yaml
from PIL import Image

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
BARS = ("meta-train", "evaluate", "MSE vs inner steps")  # a regression run: its curve is MSE


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


class Terminal(io.StringIO):
    """stderr as a terminal: tqdm draws the bars it draws only there (image decoding, downloads)."""

    def isatty(self) -> bool:
        return True


def folder_config(tmp_path, cache: str) -> Path:
    g = torch.Generator().manual_seed(0)
    for split, classes in (("train", 4), ("test", 3)):
        for c in range(classes):
            folder = tmp_path / "data" / split / f"{split}{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                pixels = (torch.rand(12, 12, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    path = tmp_path / f"folder-{cache}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "folder", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "data": {"name": "folder", "root": str(tmp_path / "data"), "cache_dir": str(tmp_path / cache),
                 "val_split": None},
        "tasks": {"ways": 3, "shots": 1, "queries": 1},
        "model": {"name": "conv4", "hidden": 4, "blocks": 2},
        "algorithm": {"name": "protonet"},
        "train": {"iterations": 2, "meta_batch_size": 1, "device": "cpu"},
        "eval": {"episodes": 2, "queries": 1, "settings": [{"ways": 3, "shots": 1}]},
        "logging": {"wandb": False, "report": False, "metrics": None},
    }))
    return path


def test_no_progress_on_a_terminal_silences_the_data_layers_decoding_bar_too(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["fit", str(folder_config(tmp_path, "cache-a")), "--no-progress"]) == 0
    assert "%|" not in terminal.getvalue(), terminal.getvalue()  # no tqdm bar at all
    # the same run on a fresh decode cache, with bars: the decoding bar is drawn, so the check can fail
    assert main(["fit", str(folder_config(tmp_path, "cache-b")), "--overwrite"]) == 0
    assert "img" in terminal.getvalue() and "meta-train" in terminal.getvalue(), terminal.getvalue()
