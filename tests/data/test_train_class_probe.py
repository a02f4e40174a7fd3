"""benchmarks/train_class_probe.py: a probe split made of training classes only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metamtl.data import MiniImageNet

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_class_probe.py"


@pytest.fixture
def eight_classes(tmp_path, miniimagenet_root, mini_folder):
    """A folder layout with 2 images of each of the first 8 training classes (from the archive)."""
    root = tmp_path / "src"
    rows = [300 * k + i for k in range(8) for i in (0, 1)]
    return root, mini_folder(miniimagenet_root / MiniImageNet.ZIP, root, rows)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_probe_classes_are_every_fourth_training_class_and_load(eight_classes, tmp_path, cache_dir):
    root, picked = eight_classes
    proc = run(tmp_path / "probe", "--data-root", root)
    assert proc.returncode == 0, proc.stderr
    labels = sorted({c for _, c in picked})
    train = MiniImageNet(tmp_path / "probe", split="train", cache_dir=cache_dir)
    probe = MiniImageNet(tmp_path / "probe", split="val", cache_dir=cache_dir)
    assert probe.class_names == [labels[3], labels[7]]
    assert train.class_names == [c for i, c in enumerate(labels) if i not in (3, 7)]
    assert not set(train.class_names) & set(probe.class_names)
    assert train.class_counts.tolist() == [2] * 6 and probe.class_counts.tolist() == [2] * 2
    # the images are the source's, byte for byte
    filename = picked[0][0]
    assert (tmp_path / "probe/mini-imagenet/images" / filename).read_bytes() == (root / "images" / filename).read_bytes()


def test_bad_settings_are_clear_errors(eight_classes, tmp_path):
    root, _ = eight_classes
    proc = run(tmp_path / "a", "--data-root", root, "--every", "9")
    assert proc.returncode != 0 and "--every must be between 2 and the number of training classes (8), got 9" in proc.stderr
    assert run(tmp_path / "b", "--data-root", root).returncode == 0
    again = run(tmp_path / "b", "--data-root", root)
    assert again.returncode != 0 and "already exists" in again.stderr
    missing = run(tmp_path / "c", "--data-root", tmp_path / "nowhere")
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_a_csv_naming_files_outside_images_is_refused(eight_classes, tmp_path):
    root, picked = eight_classes
    (root / "train.csv").write_text("filename,label\n../escape.jpg,n0\n" + "".join(f"{f},{c}\n" for f, c in picked))
    proc = run(tmp_path / "d", "--data-root", root)
    assert proc.returncode != 0 and "outside images/" in proc.stderr and "'../escape.jpg'" in proc.stderr
    assert not (tmp_path / "d" / "mini-imagenet").exists()
