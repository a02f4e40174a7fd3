"""mini-ImageNet on the real train/val archive (default decode cache: decoded once per machine)."""
from __future__ import annotations

import csv
import io
import zipfile

import pytest
import torch

from metamtl.data import MiniImageNet
from metamtl.data.miniimagenet import IMAGENET_MEAN, IMAGENET_STD
from metamtl.errors import DataError, DataNotFoundError, IntegrityError

ZIP = MiniImageNet.ZIP


@pytest.fixture(scope="module")
def train(miniimagenet_root) -> MiniImageNet:
    return MiniImageNet(miniimagenet_root, split="train")


def csv_labels(data: bytes) -> list[str]:
    return [row["label"] for row in csv.DictReader(io.StringIO(data.decode()))]


def test_train_has_64_classes_of_300_rgb_84x84(train, miniimagenet_root):
    assert train.num_classes == 64
    assert train.class_counts.tolist() == [300] * 64
    assert train.images.shape == (64 * 300, 3, 84, 84) and train.images.dtype == torch.uint8
    with zipfile.ZipFile(miniimagenet_root / ZIP) as zf:
        assert train.class_names == sorted(set(csv_labels(zf.read("mini-imagenet/train.csv"))))
    # The subset's classes are the Ravi & Larochelle train classes.
    ravi = set(csv_labels((miniimagenet_root / "ravi_split" / "train.csv").read_bytes()))
    assert set(train.class_names) == ravi
    assert train.sources[0].endswith(".jpg") and ZIP in train.sources[0]


def test_normalisation_uses_imagenet_statistics(train):
    p = train.preprocessing
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD and p.channels == 3
    x = train.model_input(train.images[:64])
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.5


def test_val_has_16_classes_of_200(miniimagenet_root, train):
    val = MiniImageNet(miniimagenet_root, split="val")
    assert val.num_classes == 16 and val.class_counts.tolist() == [200] * 16
    assert val.images.shape == (3200, 3, 84, 84)
    assert not set(val.class_names) & set(train.class_names)


def test_missing_test_split_is_a_clear_error(miniimagenet_root):
    with pytest.raises(DataNotFoundError) as err:
        MiniImageNet(miniimagenet_root, split="test")
    msg = str(err.value)
    assert "'test'" in msg and "not present" in msg
    assert "test.csv" in msg and str(miniimagenet_root / "images") in msg


def test_download_explains_there_is_no_url(tmp_path):
    with pytest.raises(DataNotFoundError, match="no official URL"):
        MiniImageNet(tmp_path, download=True)


@pytest.fixture
def small_folder(tmp_path, miniimagenet_root, mini_folder):
    """A folder layout (``images/`` + ``train.csv``) with 3 images of 2 classes from the zip."""
    root = tmp_path / "folder"
    return root, mini_folder(miniimagenet_root / ZIP, root, [0, 1, 300])


def test_folder_layout_matches_the_archive(small_folder, train, cache_dir):
    root, picked = small_folder
    ds = MiniImageNet(root, split="train", cache_dir=cache_dir)
    assert ds.class_names == sorted({c for _, c in picked}) and ds.class_counts.tolist() == [2, 1]
    for i, (filename, _) in enumerate(picked):
        row = next(j for j, s in enumerate(train.sources) if s.endswith(filename))
        assert torch.equal(ds.images[i], train.images[row])


def test_csv_problems_name_the_column_or_file(small_folder, cache_dir):
    root, picked = small_folder
    (root / "train.csv").write_text("file,label\nx.jpg,a\n")
    with pytest.raises(DataError, match="'filename'") as err:
        MiniImageNet(root, cache_dir=cache_dir)
    assert "train.csv" in str(err.value)
    (root / "train.csv").write_text("filename,label\nmissing.jpg,a\n")
    with pytest.raises(DataNotFoundError, match="missing.jpg"):
        MiniImageNet(root, cache_dir=cache_dir)
    (root / "images" / picked[0][0]).write_bytes(b"\xff\xd8 not a jpeg")
    (root / "train.csv").write_text(f"filename,label\n{picked[0][0]},a\n")
    with pytest.raises(DataError, match=picked[0][0]):
        MiniImageNet(root, cache_dir=cache_dir)


def test_corrupt_archive_is_rejected_by_md5(tmp_path):
    (tmp_path / ZIP).write_bytes(b"PK not really")
    with pytest.raises(IntegrityError, match=MiniImageNet.MD5[ZIP]):
        MiniImageNet(tmp_path)


def test_split_csvs_that_share_classes_or_images_are_refused_as_by_the_csv_loader(tmp_path):
    """MiniImageNet loaded train/val/test CSVs listing one class (or image) in two splits, so held-out
    classes were trained on; the generic csv loader refused the same files."""
    from PIL import Image

    root = tmp_path / "mini-imagenet"
    (root / "images").mkdir(parents=True)
    for split, classes in {"train": ["n01", "n02"], "val": ["n01", "n03"], "test": ["n04"]}.items():
        rows = ["filename,label"]
        for c in classes:
            name = f"{split}_{c}.jpg"
            Image.new("RGB", (8, 8), (len(c), 0, 0)).save(root / "images" / name)
            rows.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    for split, other in (("train", "val"), ("val", "train")):
        with pytest.raises(DataError, match=rf"1 class\(es\) are in both {split}.csv and {other}.csv \(n01\)"):
            MiniImageNet(tmp_path, split=split, image_size=8, cache_dir=False)
    assert MiniImageNet(tmp_path, split="test", image_size=8, cache_dir=False).class_names == ["n04"]
    (root / "test.csv").write_text("filename,label\ntrain_n02.jpg,n09\n")  # an image of the training split
    with pytest.raises(DataError, match=r"1 image file\(s\) are in both test.csv and train.csv \(train_n02.jpg\)"):
        MiniImageNet(tmp_path, split="test", image_size=8, cache_dir=False)


@pytest.mark.parametrize("size, stored", [([32, 48], (32, 48)), ((16, 16), (16, 16)), (20, (20, 20))])
def test_image_size_takes_a_height_width_pair_as_other_loaders_do(tmp_path, size, stored):
    """MiniImageNet(image_size=[32, 48]) (data.image_size: [32, 48], as in the README) was a DataError
    'got ([32, 48], [32, 48])'; 0 or '32' gave one naming (0, 0) / ('32', '32')."""
    from PIL import Image

    from metamtl.data import Omniglot
    from metamtl.errors import ConfigError

    root = tmp_path / "mini-imagenet"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (84, 84)).save(root / "images" / "a.jpg")
    (root / "train.csv").write_text("filename,label\na.jpg,n1\n")
    assert tuple(MiniImageNet(tmp_path, image_size=size, cache_dir=False).images.shape[-2:]) == stored
    for bad in (0, "32", [32, 0]):
        for make in (lambda: MiniImageNet(tmp_path, image_size=bad, cache_dir=False),
                     lambda: Omniglot(tmp_path, image_size=bad, cache_dir=False)):
            with pytest.raises(ConfigError, match=rf"image_size must be an integer side >= 1 .* got {bad!r}".replace("[", r"\[")):
                make()
