"""The two-dataset config end to end on the real data (Omniglot small1+small2 + mini-ImageNet)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_fits_and_evaluates_each_dataset_on_held_out_classes(tmp_path, data_root):
    env = {**os.environ, "METAMTL_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "metamtl", "fit", str(REPO / "configs/multi/omniglot_miniimagenet.yaml"),
           f"output_dir={tmp_path}", "name=mix", "train.iterations=3", "train.meta_batch_size=4",
           "train.budget_minutes=null", "eval.episodes=5", "algorithm.strategy.name=uncertainty",
           "eval.settings=[{ways: 5, shots: 1}, {ways: 20, shots: 1}]", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "mix" / "results.json").read_text())
    rows = {(r["dataset"], r["ways"]): r for r in results["test"]}
    assert set(rows) == {("omniglot", 5), ("omniglot", 20), ("miniimagenet", 5), ("miniimagenet", 20)}
    assert "skipped" in rows[("miniimagenet", 20)]  # 16 held-out (val) classes
    assert rows[("omniglot", 5)]["episodes"] == 5 and 0 <= rows[("miniimagenet", 5)]["accuracy"] <= 1
    assert "omniglot: 5-way 1-shot" in (tmp_path / "mix" / "report.html").read_text()
    ev = subprocess.run([sys.executable, "-m", "metamtl", "evaluate", str(tmp_path / "mix" / "learner.pt"),
                         "--episodes", "3", "--no-progress"], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "omniglot test split" in ev.stdout and "miniimagenet val split" in ev.stdout
