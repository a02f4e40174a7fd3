"""Fixtures for the data-layer tests: a private decode cache and generated image trees."""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Decode cache for tests that build throwaway data (keeps ~/.cache/metamtl clean)."""
    return tmp_path_factory.mktemp("decode-cache")


def _write_image(path: Path, value, size=(6, 5), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _mini_folder(archive: Path, root: Path, rows: list[int]) -> list[list[str]]:
    """A mini-ImageNet folder layout at ``root`` (``images/`` + ``train.csv``) with the archive's
    train rows at the indices ``rows``; returns those ``[filename, label]`` rows."""
    with zipfile.ZipFile(archive) as zf:
        every = list(csv.reader(io.StringIO(zf.read("mini-imagenet/train.csv").decode())))[1:]
        picked = [every[i] for i in rows]
        (root / "images").mkdir(parents=True)
        for filename, _ in picked:
            (root / "images" / filename).write_bytes(zf.read(f"mini-imagenet/images/{filename}"))
    (root / "train.csv").write_text("filename,label\n" + "".join(f"{f},{c}\n" for f, c in picked))
    return picked


@pytest.fixture(scope="session")
def mini_folder():
    """``mini_folder(archive, root, rows)``: a mini-ImageNet folder layout from the archive's train rows."""
    return _mini_folder


@pytest.fixture(scope="session")
def write_image():
    """``write_image(path, value, size=(w, h), mode="RGB")``: save a solid-colour image."""
    return _write_image


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """``cat`` (3 red 6x5 PNGs), ``dog`` (2 green 12x10 JPEGs), nested ``birds/owl`` (2 blue),
    plus a text file and a hidden folder that must be ignored.  Images of a class differ in their
    green (cat), blue (dog) or green (owl) level ``10 * i``: no two are identical."""
    root = tmp_path / "animals"
    for i in range(3):
        _write_image(root / "cat" / f"{i}.png", (200, 10 * i, 0))
    for i in range(2):
        _write_image(root / "dog" / f"{i}.jpg", (0, 200, 10 * i), size=(12, 10))
        _write_image(root / "birds" / "owl" / f"{i}.PNG", (0, 10 * i, 200))
    (root / "cat" / "README.txt").write_text("not an image")
    _write_image(root / ".hidden" / "x.png", (1, 2, 3))
    return root
