"""Datasets and task families by name."""
from __future__ import annotations

import pytest
import torch

from metamtl.data import DATASETS, ClassFolder, Omniglot, load_dataset
from metamtl.tasks import Sinusoid, load_tasks
from metamtl.errors import ConfigError, DataNotFoundError


def test_registry_names():
    assert set(DATASETS) == {"omniglot", "miniimagenet", "folder", "csv"}


def test_load_dataset_builds_the_named_dataset(omniglot_root, data_root):
    ds = load_dataset("omniglot", "val", root=data_root, rotations=(0, 180))
    ref = Omniglot(omniglot_root, split="val", rotations=(0, 180))
    assert isinstance(ds, Omniglot) and ds.class_names == ref.class_names
    assert torch.equal(ds.images, ref.images)


def test_unknown_names_and_options_are_config_errors(data_root):
    with pytest.raises(ConfigError, match="Did you mean 'omniglot'") as err:
        load_dataset("omniglott", "train", root=data_root)
    assert "miniimagenet" in str(err.value)
    with pytest.raises(ConfigError, match="'img_size'") as err:
        load_dataset("omniglot", "train", root=data_root, img_size=28)
    assert "image_size" in str(err.value) and "rotations" in str(err.value)
    with pytest.raises(ConfigError, match="task family"):
        load_tasks("cosine")
    with pytest.raises(ConfigError, match="'way'"):
        load_tasks("sinusoid", way=1)


def test_folder_dataset_splits(image_tree, tmp_path, write_image, cache_dir, monkeypatch):
    full = load_dataset("folder", "all", root=image_tree, cache_dir=cache_dir)
    assert isinstance(full, ClassFolder) and full.num_classes == 3
    parts = [load_dataset("folder", s, root=image_tree, split_fractions=(0.4, 0.3, 0.3), cache_dir=cache_dir)
             for s in ("train", "val", "test")]
    names = [c for p in parts for c in p.class_names]
    assert sorted(names) == full.class_names and all(p.num_classes == 1 for p in parts)
    write_image(tmp_path / "split" / "val" / "x" / "0.png", (5, 5, 5))
    val = load_dataset("folder", "val", root=tmp_path / "split", cache_dir=cache_dir)
    assert val.class_names == ["x"]
    monkeypatch.delenv("METAMTL_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="METAMTL_DATA"):
        load_dataset("folder", "train")


def test_csv_dataset_by_name(tmp_path, write_image, cache_dir):
    write_image(tmp_path / "images" / "a.png", 3, size=(2, 2), mode="L")
    (tmp_path / "train.csv").write_text("filename,label\na.png,k\n")
    ds = load_dataset("csv", "train", root=tmp_path, cache_dir=cache_dir)
    assert ds.class_names == ["k"] and ds.images.shape == (1, 1, 2, 2)


def test_load_tasks():
    tasks = load_tasks("sinusoid", shots=5, seed=3)
    assert isinstance(tasks, Sinusoid) and tasks.shots == 5 and tasks.seed == 3


def test_joined_splits_hold_every_class_of_their_parts(image_tree, cache_dir):
    opts = dict(root=image_tree, split_fractions=(0.4, 0.3, 0.3), cache_dir=cache_dir)
    train, val = (load_dataset("folder", s, **opts) for s in ("train", "val"))
    both = load_dataset("folder", "train+val", **opts)
    assert both.class_names == train.class_names + val.class_names
    assert len(both) == len(train) + len(val)
    for part in (train, val):
        for c, name in enumerate(part.class_names):
            joined = both.class_indices(both.class_names.index(name))
            assert torch.equal(both.images[joined], part.images[part.class_indices(c)])
    test = load_dataset("folder", "test", **opts)
    assert not set(test.class_names) & set(both.class_names)
    with pytest.raises(ConfigError, match="join distinct split names"):
        load_dataset("folder", "train+train", **opts)
    with pytest.raises(ConfigError, match="join distinct split names"):
        load_dataset("folder", "train+", **opts)


def test_join_classes_refuses_shared_classes_and_mixed_preprocessing(image_tree, cache_dir):
    from metamtl.data import join_classes
    from metamtl.data.base import Preprocessing
    from metamtl.errors import DataError

    full = load_dataset("folder", "all", root=image_tree, cache_dir=cache_dir)
    with pytest.raises(DataError, match="share classes"):
        join_classes([full, full.subset([0])])
    other = full.subset([1])
    other.preprocessing = Preprocessing(size=(3, 3), channels=3, mean=(0.5,) * 3, std=(1.0,) * 3)
    with pytest.raises(DataError, match="preprocessing differs"):
        join_classes([full.subset([0]), other])


def test_a_split_left_without_classes_is_refused_naming_it(image_tree, cache_dir):
    """3 classes cut 0.6/0.2/0.2 leave val without classes: refused when loaded, not a bare error later."""
    from metamtl.errors import DataError

    with pytest.raises(DataError, match=r"split 'val' of dataset 'folder' holds no classes") as err:
        load_dataset("folder", "val", root=image_tree, cache_dir=cache_dir)
    assert "data.split_fractions" in str(err.value) and "data.val_split" in str(err.value)
    assert load_dataset("folder", "train", root=image_tree, cache_dir=cache_dir).num_classes == 2


def test_one_csv_path_is_split_by_class_like_a_folder(image_tree, tmp_path, cache_dir):
    """load_dataset("csv", split, csv_path=one file) gives each split its own classes (was: every class in each)."""
    rows = [f"{p.relative_to(image_tree).as_posix()},{p.parent.name}" for p in sorted(image_tree.rglob("*.*"))
            if p.suffix.lower() in (".png", ".jpg") and not p.parent.name.startswith(".")]
    (tmp_path / "all.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    kw = dict(csv_path=tmp_path / "all.csv", image_root=image_tree, cache_dir=cache_dir, split_fractions=(0.4, 0.3, 0.3))
    parts = [load_dataset("csv", s, tmp_path, **kw).class_names for s in ("train", "val", "test")]
    assert sorted(c for p in parts for c in p) == ["cat", "dog", "owl"] and all(len(p) == 1 for p in parts)
    assert load_dataset("csv", "all", tmp_path, **kw).class_names == ["cat", "dog", "owl"]


def test_a_class_in_two_split_folders_is_refused_naming_it(tmp_path, write_image, cache_dir):
    """root/train/t0 and root/test/t0: held-out classes must be disjoint, refused naming the class and splits."""
    from metamtl.errors import DataError

    for split, classes in (("train", ["t0", "t1"]), ("test", ["t0", "x1"])):
        for c in classes:
            for i in range(2):
                write_image(tmp_path / split / c / f"{i}.png", (10 * i, len(c), 7 if split == "test" else 3))
    for split, other in (("train", "test"), ("test", "train")):
        with pytest.raises(DataError, match=rf"1 class\(es\) are in both {split}/ and {other}/ \(t0\)"):
            load_dataset("folder", split, root=tmp_path, cache_dir=cache_dir)


def test_a_class_or_image_in_two_split_csv_files_is_refused_naming_it(tmp_path, write_image, cache_dir):
    """train.csv and val.csv sharing a class (or an image file) are refused as shared split folders are."""
    from metamtl.errors import DataError

    for i in range(12):
        write_image(tmp_path / "images" / f"{i}.png", (10 * i, 3, 7))
    (tmp_path / "train.csv").write_text("filename,label\n" + "".join(f"{i}.png,{'ab'[i // 3]}\n" for i in range(6)))
    (tmp_path / "val.csv").write_text("filename,label\n" + "".join(f"{i}.png,{'bc'[(i - 6) // 3]}\n" for i in range(6, 12)))
    for split, other in (("train", "val"), ("val", "train")):
        with pytest.raises(DataError, match=rf"1 class\(es\) are in both {split}.csv and {other}.csv \(b\)"):
            load_dataset("csv", split, root=tmp_path, cache_dir=cache_dir)
    (tmp_path / "val.csv").write_text("filename,label\n" + "".join(f"{i}.png,{'cd'[(i - 6) // 3]}\n" for i in range(6, 12)))
    assert load_dataset("csv", "val", root=tmp_path, cache_dir=cache_dir).class_names == ["c", "d"]
    (tmp_path / "test.csv").write_text("filename,label\n0.png,e\n1.png,e\n")
    with pytest.raises(DataError, match=r"2 image file\(s\) are in both test.csv and train.csv \(0.png, 1.png\)"):
        load_dataset("csv", "test", root=tmp_path, cache_dir=cache_dir)


@pytest.mark.parametrize("fractions", [(float("nan"), 0.5, 0.5), (0.5, float("inf"), 0.5), (0.6, 0.5, -0.1),
                                       0.6, None, "1"])  # not a sequence: a bare TypeError before
def test_split_fractions_that_are_not_finite_or_negative_are_refused(fractions):
    """NaN fractions passed both checks and put every class in the last split; now a DataError."""
    from metamtl.data import split_names
    from metamtl.errors import DataError

    with pytest.raises(DataError, match="split fractions must be finite"):
        split_names([f"c{i}" for i in range(10)], fractions)


def test_subset_refuses_unknown_classes_and_indices_out_of_range():
    """Unknown names / indices raised bare ValueError/IndexError, and -1 or 1.7 silently picked other classes."""
    import numpy as np
    import torch

    from metamtl.data import ClassDataset
    from metamtl.errors import DataError

    ds = ClassDataset(torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2]),
                      ["cat", "dog", "owl"], name="pets")
    with pytest.raises(DataError, match="no class named 'dgo'. Did you mean 'dog'"):
        ds.subset(["dgo"])
    for bad in ([5], [-1], ["cat", 1.7], [True]):
        with pytest.raises(DataError, match=r"is not a class: pass class names or integer indices 0\.\.2"):
            ds.subset(bad)
    assert ds.subset(["owl", np.int64(0), torch.tensor(1)]).class_names == ["owl", "cat", "dog"]
    assert ds.subset(range(2)).class_names == ["cat", "dog"]


def test_names_and_splits_that_are_not_text_are_config_errors_not_type_errors(tmp_path):
    """load_dataset('folder', None/1, root) and load_dataset(['folder']) / load_tasks(['sinusoid'])
    gave bare TypeErrors (PosixPath / NoneType, unhashable list)."""
    from metamtl.tasks.families import load_tasks

    for split in (None, 1):
        with pytest.raises(ConfigError, match=rf"split must be a split name .* got {split!r}"):
            load_dataset("folder", split, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown dataset \['folder'\]. Did you mean 'folder'\?"):
        load_dataset(["folder"], "train", tmp_path)
    with pytest.raises(ConfigError, match=r"unknown task family \['sinusoid'\]"):
        load_tasks(["sinusoid"])


def test_split_options_for_data_already_split_on_disk_are_refused_not_ignored(tmp_path, write_image, cache_dir):
    """Before: data.split_fractions / data.split_seed on a folder with train/ val/ folders (or <split>.csv
    files) were silently ignored: the user believed they had chosen the split."""
    write_image(tmp_path / "f" / "train" / "a" / "0.png", (5, 5, 5))
    write_image(tmp_path / "c" / "images" / "0.png", (5, 5, 5))
    (tmp_path / "c" / "train.csv").write_text("filename,label\n0.png,k\n")
    for name, root, where in (("folder", tmp_path / "f", r"train/ holds"), ("csv", tmp_path / "c", r"train.csv lists")):
        assert load_dataset(name, "train", root=root, cache_dir=cache_dir).num_classes == 1
        with pytest.raises(ConfigError, match=rf"split_fractions only split data .*{where}.*remove data.split_fractions"):
            load_dataset(name, "train", root=root, cache_dir=cache_dir, split_fractions=(0.5, 0.25, 0.25))
        with pytest.raises(ConfigError, match=r"split_fractions and split_seed .*remove data.split_fractions and "
                                              r"data.split_seed"):
            load_dataset(name, "train", root=root, cache_dir=cache_dir, split_fractions=(0.5, 0.25, 0.25), split_seed=1)
        with pytest.raises(ConfigError, match="split_seed only split"):
            load_dataset(name, "train", root=root, cache_dir=cache_dir, split_seed=3)


def test_split_folders_are_matched_case_insensitively_and_other_spellings_refused(tmp_path, write_image, cache_dir):
    """Train/Val/Test (Windows, Kaggle exports) are the split on disk, not classes to merge and re-split;
    training/validation/... are refused naming the rename, since re-splitting would train on held-out classes."""
    from metamtl.errors import DataError

    for split, n in (("Train", 3), ("Val", 1), ("Test", 1)):
        for c in range(n):
            for i in range(2):
                write_image(tmp_path / "a" / split / f"{split.lower()}{c}" / f"{i}.png", (10 * i, c, len(split)))
    assert load_dataset("folder", "train", root=tmp_path / "a", cache_dir=cache_dir).class_names == [
        "train0", "train1", "train2"]
    assert load_dataset("folder", "test", root=tmp_path / "a", cache_dir=cache_dir).class_names == ["test0"]
    for split in ("training", "Validation"):
        write_image(tmp_path / "b" / split / "c0" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"Validation/, training/.*rename them to train/, val/, test/"):
        load_dataset("folder", "train", root=tmp_path / "b", cache_dir=cache_dir)


def test_an_image_in_two_split_csv_files_is_refused_however_its_name_is_spelled(tmp_path, write_image, cache_dir):
    """train.csv's 0.png written as an absolute path in val.csv, or reached through a link: the same file."""
    from metamtl.errors import DataError

    for i in range(8):
        write_image(tmp_path / "images" / f"{i}.png", (10 * i, 3, 7))
    (tmp_path / "images" / "all").symlink_to(".")
    (tmp_path / "train.csv").write_text("filename,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\n")
    for first in (tmp_path / "images" / "0.png", "all/0.png"):
        (tmp_path / "val.csv").write_text(f"filename,label\n{first},c\n4.png,c\n5.png,d\n6.png,d\n")
        with pytest.raises(DataError, match=r"1 image file\(s\) are in both val.csv and train.csv"):
            load_dataset("csv", "val", root=tmp_path, cache_dir=cache_dir)


def test_all_of_a_csv_root_split_on_disk_is_every_split_csv_joined(tmp_path, write_image, cache_dir):
    """split "all" (evaluate --split all --data-root <csv root>) takes every class of train/val/test.csv, as for
    a folder split on disk, instead of looking for an all.csv that is not there."""
    for i in range(8):
        write_image(tmp_path / "images" / f"{i}.png", (10 * i, 3, 7))
    (tmp_path / "train.csv").write_text("filename,label\n0.png,a\n1.png,a\n2.png,b\n3.png,b\n")
    (tmp_path / "test.csv").write_text("filename,label\n4.png,c\n5.png,c\n6.png,d\n7.png,d\n")
    full = load_dataset("csv", "all", root=tmp_path, cache_dir=cache_dir)
    assert full.class_names == ["a", "b", "c", "d"] and len(full) == 8


def test_classes_named_like_split_folders_in_a_flat_dataset_are_classes(tmp_path, write_image, cache_dir):
    """Regression of the case-insensitive split folders: a flat dataset whose classes include Train,
    Test, dev or Validation (folders of images) failed to load ("lie directly in the dataset folder",
    "rename them to train/"); a folder holding images itself is a class, whatever its name."""
    classes = ["a", "b", "c", "Train", "Test", "dev", "Validation", "d", "e", "f"]
    for i, c in enumerate(classes):
        for k in range(2):
            write_image(tmp_path / "flat" / c / f"{k}.png", (10 * i, k, 3))
    parts = [load_dataset("folder", s, root=tmp_path / "flat", cache_dir=cache_dir) for s in ("train", "val", "test")]
    assert sorted(c for p in parts for c in p.class_names) == sorted(classes)


def test_split_folders_holding_a_stray_non_image_file_are_still_split_folders(tmp_path, write_image, cache_dir):
    """Train/ and Test/ each holding a desktop.ini (or a README) were read as classes and split anew, so held-out
    classes were trained on; a stray file in only one of them gave a misleading "no 'train' folder" error.
    Whether a folder holds classes is judged by its image files only."""
    for split, n in (("Train", 3), ("Test", 2)):
        for c in range(n):
            for i in range(2):
                write_image(tmp_path / "a" / split / f"{split.lower()}{c}" / f"{i}.png", (10 * i, c, len(split)))
    (tmp_path / "a" / "Train" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    assert load_dataset("folder", "train", root=tmp_path / "a", cache_dir=cache_dir).class_names == [
        "train0", "train1", "train2"]
    (tmp_path / "a" / "Test" / "README.txt").write_text("held-out classes\n")
    assert load_dataset("folder", "train", root=tmp_path / "a", cache_dir=cache_dir).class_names == [
        "train0", "train1", "train2"]
    assert load_dataset("folder", "test", root=tmp_path / "a", cache_dir=cache_dir).class_names == ["test0", "test1"]



def test_split_folders_are_judged_by_the_images_of_the_given_extensions(tmp_path, write_image, cache_dir):
    """With extensions=['.png'], a stray preview.jpg in train/ (not one of the dataset's images, skipped with a
    warning) made train/ a class: "split folders (test) but no 'train' folder" although train/ existed."""
    for split, n in (("train", 4), ("test", 3)):
        for c in range(n):
            for k in range(2):
                write_image(tmp_path / split / f"{split}{c}" / f"{k}.png", (10 * c, k, len(split)))
    write_image(tmp_path / "train" / "preview.jpg", (1, 2, 3))
    ds = load_dataset("folder", "train", root=tmp_path, extensions=[".png"], cache_dir=cache_dir)
    assert ds.class_names == ["train0", "train1", "train2", "train3"]
    assert load_dataset("folder", "test", root=tmp_path, extensions=[".png"], cache_dir=cache_dir).class_names == [
        "test0", "test1", "test2"]


def test_a_lowercase_class_named_like_a_split_folder_is_a_class(tmp_path, write_image, cache_dir):
    """A top folder holding images is a class whatever its name (README): `test/` of images was refused ("split
    folders (test) but no 'train' folder") while `Test/` was a class.  A real split folder test/ of class folders
    (with a stray non-image file) is still the split on disk."""
    classes = ["cat", "dog", "bird", "fish", "cow", "test"]
    for i, c in enumerate(classes):
        for k in range(2):
            write_image(tmp_path / "flat" / c / f"{k}.png", (10 * i, k, 3))
    parts = [load_dataset("folder", s, root=tmp_path / "flat", cache_dir=cache_dir) for s in ("train", "val", "test")]
    assert sorted(c for p in parts for c in p.class_names) == sorted(classes)
    for split, n in (("train", 3), ("test", 2)):
        for c in range(n):
            write_image(tmp_path / "split" / split / f"{split}{c}" / "0.png", (c, 5, len(split)))
    (tmp_path / "split" / "test" / "notes.txt").write_text("x\n")
    assert load_dataset("folder", "test", root=tmp_path / "split", cache_dir=cache_dir).class_names == [
        "test0", "test1"]
