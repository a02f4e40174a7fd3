"""benchmarks/gpu_check.py --smoke: every GPU row's code path runs (on CPU, tiny sizes) and is written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_row_and_writes_them(tmp_path, data_root):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nkept\n")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--results",
                          str(results), "--data-root", str(data_root), "--output-dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# results\n\nkept") and "<!-- gpu:start -->" in text and "<!-- gpu:end -->" in text
    for row in ("gpu_maml_32x1_vmap32", "gpu_maml_32x1_chunk1", "gpu_maml_32x1_vmap32_bf16", "gpu_maml_32x1_higher",
                "gpu_higher_32x1", "gpu_anil_32x1_vmap32", "gpu_maml_16x5_vmap16", "mini-ImageNet"):
        assert row in text, row
    assert "val accuracy" in text and "Whole check" in text
