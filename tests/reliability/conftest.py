"""Fixtures for the reliability suite: tiny datasets, learners and configs that run in milliseconds.

Every test module here carries ``pytest.mark.reliability(<category>)`` (``bad_input``,
``untrusted_file``, ``fault``, ``fuzz``, ``data_fidelity`` or ``run_folder``); ``benchmarks/reliability_counts.py`` counts the cases
by category from those marks.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler

REPO = Path(__file__).resolve().parents[2]


def toy_dataset(classes: int = 12, per_class: int = 6, size: int = 12, channels: int = 1, name: str = "toy") -> ClassDataset:
    """Random uint8 images, ``classes`` x ``per_class``, shape ``[channels, size, size]``."""
    g = torch.Generator().manual_seed(classes * 1000 + size)
    images = torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8, generator=g)
    prep = Preprocessing(size=(size, size), channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name=name, preprocessing=prep)


def tiny_learner(head_init: str = "learned", size: int = 12, channels: int = 1, **kwargs) -> MetaLearner:
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=channels, hidden=4, image_size=size, blocks=2,
                        out_features=5 if head_init == "learned" else None)
    return MetaLearner(model, build_algorithm("maml", steps=1, lr=0.3, head_init=head_init),
                       preprocessing=toy_dataset(size=size, channels=channels).preprocessing, device="cpu", **kwargs)


@pytest.fixture
def env():
    """A learner for 12x12 grey images, samplers that fit it and one episode."""
    ds = toy_dataset()
    sampler = EpisodeSampler(ds, 5, 1, 2, seed=0)
    return SimpleNamespace(
        ds=ds, sampler=sampler, learner=tiny_learner(), proto=tiny_learner("proto"),
        episode=sampler.episode(0).to("cpu"),
    )


def sinusoid_config(tmp_path: Path, **overrides) -> dict:
    """A complete config for a seconds-long sinusoid run writing to ``tmp_path``."""
    cfg = {
        "name": "sine", "seed": 0, "output_dir": str(tmp_path),
        "data": {"name": "sinusoid", "val_split": None},
        "tasks": {"ways": 1, "shots": 5, "queries": 5},
        "model": {"name": "mlp", "hidden": [16, 16]},
        "algorithm": {"name": "maml", "steps": 1, "lr": 0.01},
        "train": {"iterations": 30, "meta_batch_size": 4, "meta_lr": 0.001, "checkpoint_every": 10,
                  "device": "cpu"},
        "eval": {"episodes": 5, "queries": 5, "settings": [{"ways": 1, "shots": 5}]},
        "logging": {"wandb": False, "report": False},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def cli_env() -> dict[str, str]:
    """Environment for ``python -m metamtl`` subprocesses that import this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONWARNINGS", None)
    return env


PYTHON = sys.executable


#: fuzz outcomes: target -> Counter(worked=..., library_error=..., other=...)
TALLY: defaultdict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="session")
def tally() -> defaultdict[str, Counter]:
    return TALLY


def pytest_sessionfinish(session, exitstatus):
    """With ``METAMTL_RELIABILITY_COUNTS=<file>``, write the fuzz tally there (JSON)."""
    out = os.environ.get("METAMTL_RELIABILITY_COUNTS")
    if out and TALLY:
        Path(out).write_text(json.dumps({k: dict(v) for k, v in sorted(TALLY.items())}, indent=2))
