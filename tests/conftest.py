"""Shared fixtures: where the real data lives, offline W&B, small thread counts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _data_root() -> Path | None:
    env = os.environ.get("METAMTL_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real datasets (../shared/data or $METAMTL_DATA)."""
    root = _data_root()
    if root is None:
        pytest.fail("real data not found: set METAMTL_DATA or place ../shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def omniglot_root(data_root: Path) -> Path:
    return data_root / "omniglot"


@pytest.fixture(scope="session")
def miniimagenet_root(data_root: Path) -> Path:
    return data_root / "mini-imagenet"


@pytest.fixture
def single_thread():
    """Run a test of tiny models on one thread (faster, and no spin-waiting against other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
