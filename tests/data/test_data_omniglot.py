"""Omniglot on the real small1/small2 archives (default decode cache: decoded once per machine)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from metamtl.data import ClassFolder, Omniglot, safe_extract
from metamtl.data.omniglot import BACKGROUND, EVALUATION
from metamtl.errors import ConfigError, DataError, DataNotFoundError, IntegrityError

SMALL1, SMALL2 = "images_background_small1", "images_background_small2"
SPLITS = ("train", "val", "test")


def zip_characters(path: Path) -> dict[str, int]:
    """``Alphabet/characterNN`` -> number of PNGs, read straight from the archive listing."""
    counts: dict[str, int] = {}
    for name in zipfile.ZipFile(path).namelist():
        if name.endswith(".png"):
            _, alphabet, character, _ = name.split("/")
            counts[f"{alphabet}/{character}"] = counts.get(f"{alphabet}/{character}", 0) + 1
    return counts


@pytest.fixture(scope="module")
def omniglot(omniglot_root) -> dict[str, Omniglot]:
    return {s: Omniglot(omniglot_root, split=s) for s in (*SPLITS, "all")}


def test_small_sets_merge_into_242_distinct_characters(omniglot, omniglot_root):
    c1 = zip_characters(omniglot_root / f"{SMALL1}.zip")
    c2 = zip_characters(omniglot_root / f"{SMALL2}.zip")
    assert (len(c1), len(c2)) == (136, 156)
    full = omniglot["all"]
    assert full.num_classes == len(set(c1) | set(c2)) == 242
    assert sorted(full.class_names) == sorted(set(c1) | set(c2))
    assert len(set(full.class_names)) == len(full.class_names)
    # Greek and Latin are in both archives, byte for byte (the same 20 drawings per character):
    # one class each, every image once, so no episode can hold one image as support and query.
    assert {c.split("/")[0] for c in set(c1) & set(c2)} == {"Greek", "Latin"}
    expected = {c: max(c1.get(c, 0), c2.get(c, 0)) for c in set(c1) | set(c2)}
    assert dict(zip(full.class_names, full.class_counts.tolist())) == expected
    assert len(full) == 2720 + 3120 - 50 * 20
    greek = full.class_names.index("Greek/character01")
    assert int(full.class_counts[greek]) == 20
    assert len(set(full.sources)) == len(full)


def test_images_are_uint8_28x28_bright_strokes(omniglot):
    ds = omniglot["train"]
    assert ds.images.dtype == torch.uint8
    assert ds.images.shape == (len(ds), 1, 28, 28)
    assert ds.images.float().mean() < 60  # mostly black background, strokes bright
    assert ds.images.max() == 255
    assert ds.preprocessing.invert and ds.preprocessing.input_shape == (1, 28, 28)
    assert ds.labels.tolist() == sorted(ds.labels.tolist())
    assert ".zip:images_background_small" in ds.sources[0] and ds.sources[0].endswith(".png")


def test_splits_are_disjoint_and_cover_every_character(omniglot):
    sets = {s: set(omniglot[s].class_names) for s in SPLITS}
    assert all(sets.values())
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(omniglot["all"].class_names)
    assert 0.5 < len(sets["train"]) / 242 < 0.7
    assert sum(len(omniglot[s]) for s in SPLITS) == len(omniglot["all"])


def test_split_is_identical_across_constructions_and_follows_the_seed(omniglot, omniglot_root):
    again = Omniglot(omniglot_root, split="val")
    assert again.class_names == omniglot["val"].class_names
    assert torch.equal(again.images, omniglot["val"].images)
    other = Omniglot(omniglot_root, split="val", split_seed=1)
    assert set(other.class_names) != set(omniglot["val"].class_names)


def test_an_integral_float_split_seed_is_that_integer(omniglot_root):
    """split_seed=1.0 (a YAML ``1.0``) hashed as "1.0" and moved characters between splits."""
    from metamtl.data import split_names, stable_order

    names = [f"c{i}" for i in range(50)]
    assert split_names(names, seed=1.0) == split_names(names, seed=1) and stable_order(names, 2.0) == stable_order(names, 2)
    assert (Omniglot(omniglot_root, split="test", split_seed=1.0, sources=[SMALL1]).class_names
            == Omniglot(omniglot_root, split="test", split_seed=1, sources=[SMALL1]).class_names)
    with pytest.raises(ConfigError, match="split_seed must be an integer"):
        split_names(names, seed="abc")


def test_rotations_make_new_classes_in_the_same_split(omniglot, omniglot_root):
    base = omniglot["val"]
    rotated = Omniglot(omniglot_root, split="val", rotations=(0, 90, 180, 270))
    assert rotated.num_classes == 4 * base.num_classes
    assert len(rotated) == 4 * len(base)
    suffixes = ("", "@90", "@180", "@270")
    assert set(rotated.class_names) == {c + s for c in base.class_names for s in suffixes}
    c = base.class_names[0]
    original = base.images[base.class_indices(0)]
    for k, suffix in enumerate(suffixes):
        got = rotated.images[rotated.class_indices(rotated.class_names.index(c + suffix))]
        assert torch.equal(got, torch.rot90(original, k, dims=(-2, -1)))
    only_turned = Omniglot(omniglot_root, split="val", rotations=(90,))
    assert only_turned.class_names == [f"{c}@90" for c in base.class_names]
    assert Omniglot(omniglot_root, split="val", rotations=90).class_names == only_turned.class_names  # one angle


def test_md5_mismatch_raises_integrity_error(omniglot_root, tmp_path):
    bad = tmp_path / f"{SMALL1}.zip"
    data = bytearray((omniglot_root / bad.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        Omniglot(tmp_path, sources=[SMALL1], cache_dir=False)
    msg = str(err.value)
    assert bad.name in msg and Omniglot.MD5[SMALL1] in msg and "got" in msg


@pytest.mark.parametrize("layout", ["omniglot-py", "extracted"])
def test_folder_layouts_match_the_zip(layout, omniglot_root, tmp_path, cache_dir):
    """torchvision's ``root/omniglot-py/<set>/`` and a plain extracted ``root/<set>/`` folder."""
    root = tmp_path / "data"
    safe_extract(omniglot_root / f"{SMALL1}.zip", root / "omniglot-py" if layout == "omniglot-py" else root)
    from_zip = Omniglot(omniglot_root, split="all", sources=[SMALL1])
    from_folder = Omniglot(root, split="all", sources=[SMALL1], cache_dir=cache_dir)
    assert from_folder.class_names == from_zip.class_names
    assert torch.equal(from_folder.images, from_zip.images)
    assert from_folder.sources[0].startswith(str(root))
    if layout == "extracted":  # the generic loader reads the same tree into the same classes
        generic = ClassFolder(root / SMALL1, cache_dir=cache_dir)
        assert sorted(generic.class_names) == sorted(from_zip.class_names)


def test_a_complete_zip_beats_a_partial_extracted_folder(omniglot_root, tmp_path, cache_dir):
    """An interrupted extraction in root (Greek only) was used instead of the md5-checked zip in
    root/omniglot, silently: 24 characters instead of 136. The docstring prefers a zip."""
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / f"{SMALL1}.zip").symlink_to(omniglot_root / f"{SMALL1}.zip")
    with zipfile.ZipFile(omniglot_root / f"{SMALL1}.zip") as zf:
        zf.extractall(tmp_path, members=[n for n in zf.namelist() if "/Greek/" in n])
    assert Omniglot.available_sources(tmp_path) == {SMALL1: tmp_path / "omniglot" / f"{SMALL1}.zip"}
    ds = Omniglot(tmp_path, "all", sources=[SMALL1], cache_dir=cache_dir)
    assert ds.num_classes == len(zip_characters(omniglot_root / f"{SMALL1}.zip")) == 136


def test_root_comes_from_metamtl_data(monkeypatch, data_root, omniglot):
    monkeypatch.setenv("METAMTL_DATA", str(data_root))
    assert Omniglot(split="test").class_names == omniglot["test"].class_names
    monkeypatch.delenv("METAMTL_DATA")
    with pytest.raises(DataNotFoundError, match="METAMTL_DATA") as err:
        Omniglot()
    assert "root=" in str(err.value)


def test_missing_sources_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        Omniglot(tmp_path)
    msg = str(err.value)
    assert "download=True" in msg and str(tmp_path / "omniglot-py") in msg
    (tmp_path / f"{SMALL1}.zip").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=SMALL2):
        Omniglot(tmp_path, sources=[SMALL2])


def test_download_fetches_missing_archive_with_md5_check(omniglot_root, tmp_path, monkeypatch, cache_dir):
    monkeypatch.setattr(Omniglot, "URLS", {SMALL1: (omniglot_root / f"{SMALL1}.zip").as_uri()})
    ds = Omniglot(tmp_path, split="all", sources=[SMALL1], download=True, cache_dir=cache_dir)
    assert ds.num_classes == 136
    assert (tmp_path / f"{SMALL1}.zip").read_bytes() == (omniglot_root / f"{SMALL1}.zip").read_bytes()


def test_download_replaces_a_corrupt_official_zip(omniglot_root, tmp_path, monkeypatch, cache_dir):
    """A partial download left under the official name is fetched again with ``download=True``."""
    good = (omniglot_root / f"{SMALL1}.zip").read_bytes()
    (tmp_path / f"{SMALL1}.zip").write_bytes(good[:100000])
    monkeypatch.setattr(Omniglot, "URLS", {SMALL1: (omniglot_root / f"{SMALL1}.zip").as_uri()})
    ds = Omniglot(tmp_path, split="all", sources=[SMALL1], download=True, cache_dir=cache_dir)
    assert ds.num_classes == 136 and (tmp_path / f"{SMALL1}.zip").read_bytes() == good


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "split"),
        ({"sources": ["images_background_small3"]}, "images_background_small"),
        ({"sources": []}, "at least one"),
        ({"rotations": (45,)}, "rotations"),
        ({"rotations": ()}, "rotations"),
        ({"rotations": (90.5,)}, r"whole multiples of 90 .*got 90\.5"),
        ({"rotations": (0, True)}, "whole multiples of 90"),
        ({"rotations": "90"}, r"an angle or a sequence of angles .*got '90'"),
        ({"rotations": None}, r"an angle or a sequence of angles .*got None"),
        ({"rotations": True}, "whole multiples of 90"),
        ({"split_fractions": (0.5, 0.5)}, "split_fractions"),
        ({"split_fractions": 0.6}, r"split_fractions must be \(train, val, test\) .*got 0\.6"),
        ({"split_fractions": None}, r"split_fractions must be \(train, val, test\) .*got None"),
        ({"split_fractions": "622"}, r"split_fractions must be \(train, val, test\) .*got '622'"),
        ({"split_seed": None}, r"split_seed must be an integer, got None"),
        ({"split_seed": "abc"}, r"split_seed must be an integer, got 'abc'"),
        ({"split_seed": True}, r"split_seed must be an integer, got True"),
        ({"split_seed": 1.5}, r"split_seed must be an integer, got 1\.5"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, match, omniglot_root):
    with pytest.raises(ConfigError, match=match):
        Omniglot(omniglot_root, **kwargs)


def test_split_fractions_that_do_not_sum_to_one_are_the_documented_data_error(omniglot_root):
    with pytest.raises(DataError, match=r"split fractions must be finite, >= 0 and sum to 1"):
        Omniglot(omniglot_root, split="test", split_fractions=(0.5, 0.5, 0.5))
    assert "DataError: split_fractions" in " ".join(Omniglot.__doc__.split())


def test_unexpected_layout_is_reported(tmp_path, write_image):
    write_image(tmp_path / SMALL1 / "Greek" / "x.png", 0, mode="L")
    with pytest.raises(DataError, match="Alphabet"):
        Omniglot(tmp_path, sources=[SMALL1], cache_dir=False)


def test_official_sets_use_evaluation_as_test(tmp_path, write_image, cache_dir):
    """With the full background and evaluation sets, test = evaluation; train/val split background."""
    for a in range(2):
        for c in range(1, 11):
            for d in range(2):
                write_image(tmp_path / BACKGROUND / f"Back{a}" / f"character{c:02d}" / f"{d}.png", 255 - d, mode="L")
    for c in range(1, 6):
        write_image(tmp_path / EVALUATION / "Eval" / f"character{c:02d}" / "0.png", 0, mode="L")
    split = {s: Omniglot(tmp_path, split=s, cache_dir=cache_dir) for s in SPLITS}
    assert split["test"].class_names == [f"Eval/character{c:02d}" for c in range(1, 6)]
    assert len(split["val"].class_names) == 5  # 0.2 / (0.6 + 0.2) of 20 background characters
    assert set(split["train"].class_names) | set(split["val"].class_names) == {
        f"Back{a}/character{c:02d}" for a in range(2) for c in range(1, 11)
    }
    assert split["test"].images.min() == 255  # inverted: the all-black evaluation images turn white
