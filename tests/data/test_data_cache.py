"""The decode cache: memo, disk files, keys, corrupt files."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from metamtl.data import ClassFolder, Omniglot, Preprocessing, cache, clear_memo
from metamtl.data.cache import Decoded, cached_decode, default_cache_dir, resolve_cache_dir

SMALL2 = "images_background_small2"


def test_disk_cache_hit_decodes_nothing_and_is_identical(omniglot_root, tmp_path, monkeypatch):
    clear_memo()
    t0 = time.perf_counter()
    cold = Omniglot(omniglot_root, split="all", sources=[SMALL2], cache_dir=tmp_path)
    t_cold = time.perf_counter() - t0
    files = list(tmp_path.glob("omniglot-images_background_small2-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob(".*"))  # no temporary file left behind
    clear_memo()
    # A cache hit must not open a single image (a timing comparison would fail on a busy machine).
    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded although the disk cache holds the dataset")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    t0 = time.perf_counter()
    warm = Omniglot(omniglot_root, split="all", sources=[SMALL2], cache_dir=tmp_path)
    t_disk = time.perf_counter() - t0
    t0 = time.perf_counter()
    memo = Omniglot(omniglot_root, split="all", sources=[SMALL2], cache_dir=tmp_path)
    t_memo = time.perf_counter() - t0
    print(f"omniglot small2: cold {t_cold:.3f}s, disk cache {t_disk:.3f}s, memo {t_memo:.3f}s")
    for ds in (warm, memo):
        assert ds.class_names == cold.class_names and ds.sources == cold.sources
        assert torch.equal(ds.images, cold.images) and torch.equal(ds.labels, cold.labels)


def test_corrupt_cache_file_is_rebuilt_with_a_warning(image_tree, tmp_path):
    first = ClassFolder(image_tree, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    clear_memo()
    with pytest.warns(RuntimeWarning, match="unreadable decode cache"):
        again = ClassFolder(image_tree, cache_dir=tmp_path)
    assert torch.equal(again.images, first.images)
    clear_memo()
    with np.load(path, allow_pickle=False) as f:  # rewritten as a valid file
        assert f["images"].shape == tuple(first.images.shape)


def test_cache_file_with_another_key_is_not_trusted(tmp_path):
    decoded = Decoded(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"], ["x"])
    cached_decode("t", ["one"], lambda: decoded, tmp_path)
    (path,) = tmp_path.glob("t-*.npz")
    os.replace(path, path.with_name("t-moved.npz"))
    clear_memo()
    other = Decoded(torch.ones(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"], ["x"])
    # Same name, other key: ``build`` runs instead of loading the unrelated file.
    assert cached_decode("t", ["two"], lambda: other, tmp_path) is other


def test_folder_changes_invalidate_the_cache(image_tree, write_image, tmp_path):
    before = ClassFolder(image_tree, cache_dir=tmp_path)
    clear_memo()
    time.sleep(0.01)
    write_image(image_tree / "cat" / "0.png", (0, 0, 77))
    after = ClassFolder(image_tree, cache_dir=tmp_path)
    assert after.images[after.class_indices(1)][0, 2].eq(77).all()
    assert not torch.equal(after.images, before.images)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_preprocessing_is_part_of_the_key(image_tree, tmp_path):
    a = ClassFolder(image_tree, preprocessing=Preprocessing(size=(2, 2), channels=3, mean=(0,) * 3, std=(1,) * 3),
                    cache_dir=tmp_path)
    b = ClassFolder(image_tree, preprocessing=Preprocessing(size=(3, 3), channels=3, mean=(0,) * 3, std=(1,) * 3),
                    cache_dir=tmp_path)
    assert a.images.shape[-1] == 2 and b.images.shape[-1] == 3


def test_cache_dir_false_keeps_it_in_memory_only(image_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("METAMTL_CACHE", str(tmp_path / "env-cache"))
    ClassFolder(image_tree, cache_dir=False)
    assert not (tmp_path / "env-cache").exists()
    assert default_cache_dir() == tmp_path / "env-cache" == resolve_cache_dir(None)
    assert resolve_cache_dir(False) is None
    ClassFolder(image_tree, name="again")
    assert list((tmp_path / "env-cache").glob("folder-again-*.npz"))


def test_empty_cache_dir_means_the_default_and_a_config_can_turn_the_cache_off(image_tree, tmp_path, monkeypatch):
    """``data.cache_dir: ''`` is the default cache (never the current directory); ``false`` in a
    config means no disk cache, as ``cache_dir=False`` does in Python."""
    from metamtl.config import load_config

    monkeypatch.setenv("METAMTL_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.chdir(tmp_path)
    assert resolve_cache_dir("") == resolve_cache_dir(None) == tmp_path / "env-cache"
    ClassFolder(image_tree, name="empty", cache_dir="")
    assert list((tmp_path / "env-cache").glob("folder-empty-*.npz")) and not list(tmp_path.glob("*.npz"))
    assert load_config(None, ["data.cache_dir=false"]).data.cache_dir is False
    (tmp_path / "c.yaml").write_text("data: {cache_dir: ''}\n")
    assert load_config(tmp_path / "c.yaml").data.cache_dir == ""


def test_memo_is_bounded(monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "MEMO_MAX_BYTES", 10)
    clear_memo()

    def make(v):
        return Decoded(torch.full((1, 1, 2, 2), v, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"], ["x"])

    for v in range(3):
        cached_decode("m", [v], lambda: make(v), False)
    assert len(cache._MEMO) == 2  # 4 bytes each: the oldest was dropped
    clear_memo()


def test_swapping_same_sized_files_between_classes_invalidates_the_cache(tmp_path, monkeypatch):
    # BMP files of one size have one byte count, and ``mv`` (or a tar extraction) keeps the mtime:
    # only the files' identity (inode) and change time show that the two images changed class.
    from PIL import Image

    root, cache_dir = tmp_path / "pets", tmp_path / "cache"
    for cls, value in (("cat", 0), ("dog", 255)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            path = root / cls / f"{i}.bmp"
            Image.fromarray(np.full((8, 8), abs(value - 10 * i), np.uint8)).save(path)
            os.utime(path, (1_700_000_000, 1_700_000_000))

    def first_pixels(ds):
        return {n: ds.images[ds.class_indices(c)].flatten(1)[:, 0].tolist() for c, n in enumerate(ds.class_names)}

    clear_memo()
    assert first_pixels(ClassFolder(root, cache_dir=cache_dir)) == {"cat": [0, 10, 20], "dog": [255, 245, 235]}
    clear_memo()
    calls = []
    monkeypatch.setattr(cache, "_save", lambda *a: calls.append(a))
    ClassFolder(root, cache_dir=cache_dir)  # nothing changed: a disk cache hit, nothing rebuilt
    assert calls == []
    os.rename(root / "cat" / "1.bmp", root / "tmp.bmp")
    os.rename(root / "dog" / "1.bmp", root / "cat" / "1.bmp")
    os.rename(root / "tmp.bmp", root / "dog" / "1.bmp")
    swapped = {"cat": [0, 245, 20], "dog": [255, 10, 235]}
    assert first_pixels(ClassFolder(root, cache_dir=cache_dir)) == swapped  # the in-process memo
    clear_memo()
    monkeypatch.undo()
    assert first_pixels(ClassFolder(root, cache_dir=cache_dir)) == swapped  # the disk cache


def test_a_long_dataset_name_still_gets_a_cache_file(tmp_path, recwarn):
    """A ~250-character name made a file name over 255 bytes: the cache was never written, and the warning
    blamed the folder's permissions; the readable prefix of the file name is now shortened."""
    decoded = Decoded(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), ["a"], ["x"])
    clear_memo()
    cached_decode("folder-" + "x" * 250, ["one"], lambda: decoded, tmp_path)
    assert not [w for w in recwarn if "decode cache" in str(w.message)]
    (path,) = tmp_path.glob("folder-x*.npz")
    assert len(path.name) <= 255
    clear_memo()
    other = cached_decode("folder-" + "x" * 251, ["one"], lambda: decoded, tmp_path)  # another name, another key
    assert other is decoded and len(list(tmp_path.glob("*.npz"))) == 2


def test_a_cache_folder_this_user_cannot_read_decodes_in_memory_with_a_warning(image_tree, tmp_path, monkeypatch):
    """A cache folder of another user (mode 700) made loading a bare PermissionError from Path.exists();
    unreadable files and unwritable folders already gave a warning and a rebuild."""
    from pathlib import Path

    locked = tmp_path / "locked"
    locked.mkdir()
    real_exists = Path.exists

    def exists(self, *args, **kwargs):  # as for a non-root user: the folder's entries cannot be looked up
        if locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(cache, "_save", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    clear_memo()
    with pytest.warns(RuntimeWarning, match="cannot read the decode cache folder"):
        ds = ClassFolder(image_tree, cache_dir=locked)
    clear_memo()
    assert torch.equal(ds.images, ClassFolder(image_tree, cache_dir=False).images)
