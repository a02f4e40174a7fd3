"""Where a run happened: the code's commit and the machine (recorded in results and W&B)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """The short commit hash of the metamtl checkout, or ``"unknown"`` outside a git checkout.

    Only a repository whose top level holds the ``metamtl`` package counts: an installed copy
    inside another repository (a virtual environment in the user's project) is not metamtl's checkout."""
    source = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=source / "metamtl", timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split("\n")
    if out.returncode != 0 or len(lines) < 2 or not lines[1].strip():
        return "unknown"
    try:
        same = Path(lines[0]).resolve() == source
    except OSError:
        return "unknown"
    return lines[1].strip() if same else "unknown"


def machine_info() -> dict[str, Any]:
    """Platform, Python, torch, CPU count and model, torch threads and the GPU (if any)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    model = cpuinfo_field("model name")
    if model is not None:
        info["cpu"] = model
    return info


def cpuinfo_field(*names: str, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The value of the first line of ``cpuinfo`` whose key is one of ``names`` (the first CPU's),
    or ``None`` (no such line, or no such file: not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in names:
                    return value.strip()
    except OSError:
        pass
    return None
