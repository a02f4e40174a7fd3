"""A tiny real run (Omniglot small1, conv4 with 8 filters, MAML with a zero head) shared by the
reporting tests: experiment.run with W&B offline logging and the HTML report on."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metamtl.config import config_from_dict
from metamtl.data.base import ClassDataset
from metamtl.tasks import EpisodeSampler

TINY = {
    "name": "tiny",
    "data": {"name": "omniglot", "sources": ["images_background_small1"], "image_size": 28},
    "tasks": {"ways": 5, "shots": 1, "queries": 2},
    "model": {"name": "conv4", "hidden": 8},
    "algorithm": {"name": "maml", "steps": 2, "lr": 0.4, "head_init": "zero"},
    "train": {"iterations": 6, "meta_batch_size": 2, "val_every": 3, "val_episodes": 4, "device": "cpu"},
    "eval": {"episodes": 12, "queries": 3, "settings": [{"ways": 5, "shots": 1}, {"ways": 5, "shots": 2}]},
    "logging": {"wandb": True, "report": True, "report_steps_episodes": 6, "report_steps": [0, 1, 2],
                "tags": ["test"]},
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_root):
    """``(run_dir, results)`` of one short experiment.run with W&B (offline) and the report."""
    from metamtl.experiment import run

    out = tmp_path_factory.mktemp("runs")
    cfg = config_from_dict({**TINY, "output_dir": str(out), "data": {**TINY["data"], "root": str(data_root)}})
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        results = run(cfg, progress=False, quiet=True)
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = old
    return Path(out) / "tiny", results


@pytest.fixture()
def synthetic_tasks():
    """5-way 1-shot tasks over 10 random 16x16 classes (no files needed)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * 4, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(10).repeat_interleave(4)
    ds = ClassDataset(images, labels, [f"c{i}" for i in range(10)], name="synthetic")
    return EpisodeSampler(ds, ways=5, shots=1, queries=2, seed=0)


@pytest.fixture()
def tiny_config(tmp_path, data_root, monkeypatch):
    """``make(**sections)``: a config of a shorter :data:`TINY` run in ``tmp_path`` (W&B offline, no
    report unless a section asks), each given section merged over TINY's."""
    monkeypatch.setenv("WANDB_MODE", "offline")

    def make(**sections):
        base = {**TINY, "output_dir": str(tmp_path), "data": {**TINY["data"], "root": str(data_root)},
                "train": {**TINY["train"], "iterations": 3}, "eval": {**TINY["eval"], "episodes": 4},
                "logging": {**TINY["logging"], "report": False, "report_steps_episodes": 0}}
        for key, value in sections.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return config_from_dict(base)
    return make
