"""Image folders and CSV lists decode faithfully whatever their first file is, and never leak.

Each case builds a small dataset on disk whose *first file in sort order* is the odd one out
(16-bit, transparent, tiny, huge, another format...) and checks, through ``ClassFolder`` /
``CSVClassDataset`` / ``EpisodeSampler``, that every image is stored as it looks: the colour mode,
bit depth, alpha and size are decided from all the images, every format PIL reads is read,
skipped files are reported in one line, walks stay inside the root and terminate, and an image
can never be both support and query of an episode.
"""
from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metamtl.config import load_config
from metamtl.data import ClassFolder, CSVClassDataset, Preprocessing
from metamtl.data.base import DuplicateImagesWarning
from metamtl.data.folder import DuplicateRowsWarning, image_extensions
from metamtl.errors import ConfigError, DataError
from metamtl.tasks import EpisodeSampler

from .conftest import PYTHON, cli_env

pytestmark = pytest.mark.reliability("data_fidelity")


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)).save(path)
    return path


def ramp(h=8, w=8, scale=3, offset=0) -> np.ndarray:
    """A distinct 8-bit grey image per ``offset``."""
    return ((np.arange(h * w).reshape(h, w) * scale + offset) % 256).astype(np.uint8)


def load(root: Path, **kw) -> tuple[ClassFolder, list[str]]:
    """The folder as a dataset, and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ClassFolder(root, cache_dir=False, **kw)
    return ds, [str(w.message) for w in caught]


def stored(ds: ClassFolder, source_suffix: str) -> torch.Tensor:
    """The stored image whose file name ends with ``source_suffix``."""
    (i,) = [i for i, s in enumerate(ds.sources) if s.endswith(source_suffix)]
    return ds.images[i]


# -- bit depth: 16-bit images are scaled, never clipped at 255 -------------------------------------

@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16_bit_first_file_is_scaled_and_the_8_bit_ones_are_untouched(tmp_path, fmt):
    deep = (np.arange(64).reshape(8, 8) * 1024 + 255).astype(np.uint16)  # 255 .. 64767
    save(tmp_path / "a" / f"0.{fmt}", deep)  # first in sort order
    save(tmp_path / "a" / "1.png", ramp(offset=1))
    save(tmp_path / "b" / "0.png", ramp(offset=2))
    ds, _ = load(tmp_path)
    assert ds.images.shape == (3, 1, 8, 8)
    got = stored(ds, f"a/0.{fmt}")[0].numpy().astype(int)
    assert np.array_equal(got, np.rint(deep / 257.0).astype(int))  # 65535 -> 255, 256 levels kept
    assert len(np.unique(got)) == 64 and got.max() < 255  # not clipped to 255 everywhere
    assert np.array_equal(stored(ds, "a/1.png")[0].numpy(), ramp(offset=1))


def test_32_bit_integer_images_outside_16_bits_are_refused_with_the_file_named(tmp_path):
    save(tmp_path / "a" / "0.tif", np.full((4, 4), 70000, dtype=np.int32), mode="I")
    save(tmp_path / "a" / "1.png", ramp(4, 4))
    with pytest.raises(DataError, match=r"a/0\.tif.*outside the 16-bit range"):
        load(tmp_path)


# -- colour mode and alpha, decided from every image --------------------------------------------

def test_grey_first_file_does_not_make_colour_images_grey(tmp_path):
    save(tmp_path / "a" / "0.png", ramp(offset=5))  # grey, first
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    save(tmp_path / "a" / "1.png", rgb)
    ds, _ = load(tmp_path)
    assert ds.preprocessing.channels == 3
    assert stored(ds, "1.png")[:, 0, 0].tolist() == [200, 0, 0]  # red stays red
    grey = stored(ds, "0.png")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey replicated
    assert np.array_equal(grey[0].numpy(), ramp(offset=5))


def test_colour_first_file_keeps_an_all_grey_dataset_grey_only_if_every_file_is_grey(tmp_path):
    for i in range(3):
        save(tmp_path / "a" / f"{i}.png", ramp(offset=i))
    save(tmp_path / "b" / "0.png", ramp(offset=9))
    ds, _ = load(tmp_path)
    assert ds.preprocessing.channels == 1
    palette = Image.fromarray(ramp(offset=7)).convert("P")  # a grey palette image: still grey
    palette.save(tmp_path / "a" / "00.png")
    ds, _ = load(tmp_path)
    assert ds.preprocessing.channels == 1 and ds.images.shape[1] == 1


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+tRNS"])
def test_transparency_is_composited_over_the_background_not_dropped(tmp_path, kind):
    """Transparent pixels whose hidden colour is garbage (white) come out as the background."""
    h = w = 8
    if kind == "RGBA":
        arr = np.full((h, w, 4), 255, np.uint8)
        arr[..., 3] = 0
        arr[:4, :, :3] = (0, 0, 250)
        arr[:4, :, 3] = 255
        image = Image.fromarray(arr, "RGBA")
    elif kind == "LA":
        arr = np.full((h, w, 2), 255, np.uint8)
        arr[..., 1] = 0
        arr[:4, :, 0], arr[:4, :, 1] = 250, 255
        image = Image.fromarray(arr, "LA")
    else:
        index = np.ones((h, w), np.uint8)  # colour 1: white, transparent
        index[:4] = 0  # colour 0: (250, 250, 250), opaque
        image = Image.fromarray(index, "P")
        image.putpalette([250, 250, 250, 255, 255, 255] + [0] * 762)
        image.info["transparency"] = 1
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / "0.png", **({"transparency": 1} if kind == "P+tRNS" else {}))
    save(tmp_path / "a" / "1.png", np.full((h, w, 3), 9, np.uint8))
    ds, _ = load(tmp_path)
    img = stored(ds, "0.png").float()
    opaque = 250.0 if kind != "RGBA" else None
    if kind == "RGBA":
        assert img[:, :4].mean((1, 2)).tolist() == [0.0, 0.0, 250.0]
    else:
        assert img[:, :4].eq(opaque).all()
    assert img[:, 4:].eq(0).all(), "transparent pixels must show the background (black), not the hidden white"
    white = ClassFolder(tmp_path, cache_dir=False, preprocessing=Preprocessing(size=(h, w), channels=3, mean=(0,) * 3,
                                                                             std=(1,) * 3, background=255))
    assert stored(white, "0.png")[:, 4:].eq(255).all()


# -- size: from all images (or configured), so one odd file changes nothing -------------------

@pytest.mark.parametrize("odd", [(1, 1), (3, 40), (200, 300)], ids=["tiny", "thin", "large"])
def test_one_odd_sized_first_image_does_not_set_the_size_of_the_others(tmp_path, odd):
    save(tmp_path / "a" / "0.png", np.full((odd[0], odd[1]), 77, np.uint8))  # first in sort order
    for i in range(1, 4):
        save(tmp_path / "a" / f"{i}.png", ramp(12, 10, offset=i))
    save(tmp_path / "b" / "0.png", ramp(12, 10, offset=9))
    ds, messages = load(tmp_path)
    assert ds.images.shape == (5, 1, 12, 10)
    for i in range(1, 4):  # the others are stored exactly, not resampled through the odd size
        assert np.array_equal(stored(ds, f"a/{i}.png")[0].numpy(), ramp(12, 10, offset=i))
    assert sum("different sizes" in m and "12x10" in m and "1 resized" in m for m in messages) == 1


def test_configured_image_size_decides_the_size(tmp_path):
    save(tmp_path / "a" / "0.png", ramp(12, 12, offset=1))
    save(tmp_path / "b" / "0.png", ramp(12, 12, offset=2))
    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=folder", "data.image_size=6"])
    from metamtl.experiment import load_split

    ds = load_split(cfg, "all")
    assert ds.images.shape[-2:] == (6, 6) and ds.preprocessing.size == (6, 6)


HUGE = """
import resource, sys, warnings
warnings.simplefilter("ignore")
from metamtl.data import ClassFolder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = ClassFolder(sys.argv[1], cache_dir=False)
print(tuple(ds.images.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale_without_blowing_up_memory(tmp_path):
    """A 6000x6000 JPEG (108 MB of RGB pixels) among 16x16 images: peak memory grows by a few MB."""
    (tmp_path / "a").mkdir()
    Image.new("RGB", (6000, 6000), (10, 200, 30)).save(tmp_path / "a" / "0.jpg")
    for i in range(1, 4):
        save(tmp_path / "a" / f"{i}.png", np.full((16, 16, 3), 20 * i, np.uint8))
    save(tmp_path / "b" / "0.png", np.full((16, 16, 3), 99, np.uint8))
    out = subprocess.run([PYTHON, "-c", HUGE, str(tmp_path)], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    shape, grown_mb = out.stdout.split(")")[0] + ")", int(out.stdout.split(")")[1])
    assert shape == "(5, 3, 16, 16)"
    assert grown_mb < 50, f"peak memory grew by {grown_mb} MB decoding one large JPEG"


def test_a_jpeg_gives_the_same_tensor_in_training_and_predict(tmp_path):
    """A 64x64 JPEG stored at 16x16 is decoded at a reduced scale; the same file opened with PIL and
    given to the preprocessing (what predict does) is decoded the same way, the caller's image untouched."""
    import io

    rng = np.random.default_rng(0)
    for c in "ab":
        for i in range(2):
            (tmp_path / c).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.jpg", quality=95)
    ds = ClassFolder(tmp_path, image_size=16, cache_dir=False)
    for j, source in enumerate(ds.sources):
        with Image.open(source) as im:
            assert torch.equal(ds.preprocessing.decode(im), ds.images[j])
            assert im.size == (64, 64)  # left as the caller opened it
        with Image.open(io.BytesIO(Path(source).read_bytes())) as im:
            assert torch.equal(ds.preprocessing(im)[0].mul(255).round().to(torch.uint8), ds.images[j])


# -- formats: every format PIL can open is read; skipped files reported in one line ------------

FORMATS = [("bmp", "RGB"), ("gif", "P"), ("jpg", "RGB"), ("png", "RGB"), ("ppm", "RGB"), ("pgm", "L"),
           ("tif", "RGB"), ("tga", "RGB"), ("webp", "RGB"), ("pcx", "RGB"), ("sgi", "RGB"), ("qoi", "RGB"),
           ("im", "RGB"), ("ico", "RGB"), ("jp2", "RGB")]


def test_every_format_pil_opens_is_read(tmp_path):
    written = []
    (tmp_path / "a").mkdir()
    for i, (ext, mode) in enumerate(FORMATS):
        img = Image.new("RGB", (16, 16), (40 + 10 * i, 60, 80)).convert(mode)
        try:
            img.save(tmp_path / "a" / f"{i:02d}.{ext}")
        except (OSError, KeyError):  # no encoder for it in this PIL build
            continue
        written.append(ext)
    save(tmp_path / "b" / "0.png", np.full((16, 16, 3), 1, np.uint8))
    assert len(written) >= 12, written
    assert {f".{e}" for e in written} <= set(image_extensions())
    ds, messages = load(tmp_path)
    assert int(ds.class_counts[0]) == len(written)
    assert not any("skipped" in m for m in messages)


def test_skipped_files_are_reported_in_one_summary_line(tmp_path):
    for i in range(2):
        save(tmp_path / "a" / f"{i}.png", ramp(offset=i))
        save(tmp_path / "b" / f"{i}.png", ramp(offset=10 + i))
    for name in ("notes.txt", "labels.csv", "model.pt"):
        (tmp_path / "a" / name).write_text("not an image")
    (tmp_path / ".DS_Store").write_text("hidden: ignored silently")
    ds, messages = load(tmp_path)
    assert len(ds) == 4
    lines = [m for m in messages if "skipped" in m]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "skipped 3 file(s): 3 not image file(s)" in lines[0] and "a/notes.txt" in lines[0]


# -- walks: cycle-safe, inside the root unless asked -------------------------------------------

def test_a_symlink_cycle_terminates_and_images_are_read_once(tmp_path):
    root = tmp_path / "data"
    for i in range(2):
        save(root / "a" / f"{i}.png", ramp(offset=i))
        save(root / "b" / f"{i}.png", ramp(offset=5 + i))
    os.symlink("..", root / "a" / "up")  # a -> data -> a -> ...
    os.symlink(root / "b", root / "b_again")
    ds, messages = load(root)
    assert sorted(ds.class_names) == ["a", "b"] and len(ds) == 4
    assert any("already read" in m and "a/up" in m and "b_again" in m for m in messages)


def test_links_leading_outside_the_root_are_not_followed_unless_asked(tmp_path):
    outside = tmp_path / "private"
    save(outside / "folder" / "secret.png", ramp(offset=3))
    save(outside / "other.png", ramp(offset=4))
    root = tmp_path / "data"
    for i in range(2):
        save(root / "a" / f"{i}.png", ramp(offset=i))
    os.symlink(outside / "folder", root / "b")
    os.symlink(outside / "other.png", root / "a" / "2.png")
    ds, messages = load(root)
    assert ds.class_names == ["a"] and len(ds) == 2
    assert any("2 link(s) leading outside the folder" in m for m in messages)
    followed, _ = load(root, follow_outside_links=True)
    assert followed.class_names == ["a", "b"] and len(followed) == 4


def test_a_folder_whose_classes_are_all_links_out_says_so_and_the_config_can_follow_them(tmp_path, capsys):
    """Class folders symlinked from elsewhere (a common way to assemble a dataset): the error named
    only the 57 image extensions, as if the folder were empty, and configs could not follow links."""
    from metamtl.cli import main
    from metamtl.data import load_dataset

    outside = tmp_path / "store"
    for c in range(10):
        for i in range(3):
            save(outside / f"c{c}" / f"{i}.png", ramp(offset=10 * c + i))
    root = tmp_path / "data"
    root.mkdir()
    for c in range(10):
        os.symlink(outside / f"c{c}", root / f"c{c}")
    with pytest.raises(DataError, match=r"^no images \(files in any format PIL reads\) under .*data; expected one sub-folder of "
                                        r"images per class; skipped 10 file\(s\): 10 link\(s\) leading outside the folder "
                                        r"\(c0, c1, c2, \.\.\.\); to read them pass follow_outside_links=True "
                                        r"\(config: data.follow_outside_links: true\)$"):
        load(root)
    assert load_dataset("folder", "all", root, follow_outside_links=True, cache_dir=False).num_classes == 10
    config = tmp_path / "c.yaml"
    config.write_text(f"name: links\noutput_dir: {tmp_path / 'runs'}\ndata: {{name: folder, root: {root}, cache_dir: {tmp_path / 'cache'},"
                      " val_split: null}\ntasks: {ways: 2, shots: 1, queries: 1}\nmodel: {name: conv4, hidden: 4, blocks: 2}\n"
                      "algorithm: {name: protonet}\ntrain: {iterations: 1, meta_batch_size: 1, device: cpu}\n"
                      "eval: {episodes: 2, queries: 1, settings: [{ways: 2, shots: 1}]}\nlogging: {report: false}\n")
    assert main(["fit", str(config), "--no-progress"]) == 2
    assert "to read them pass follow_outside_links=True" in capsys.readouterr().err
    assert main(["fit", str(config), "--no-progress", "data.follow_outside_links=true"]) == 0
    assert (tmp_path / "runs" / "links" / "learner.pt").is_file()


def test_a_csv_written_on_windows_with_backslashes_is_read(tmp_path):
    """``train\\cat\\0.png`` rows (CRLF lines too) name the files under train/cat/; a backslash that
    is part of an existing file's name is kept; ``..\\`` is still refused."""
    for c in ("cat", "dog"):
        for i in range(2):
            save(tmp_path / "img" / "train" / c / f"{i}.png", ramp(offset=10 * (c == "dog") + i))
    save(tmp_path / "img" / "odd\\name.png", ramp(offset=30))
    save(tmp_path / "secret.png", ramp(offset=40))
    rows = [f"train\\{c}\\{i}.png,{c}" for c in ("cat", "dog") for i in range(2)] + ["odd\\name.png,odd"]
    (tmp_path / "l.csv").write_bytes(("filename,label\r\n" + "\r\n".join(rows) + "\r\n").encode())
    ds = CSVClassDataset(tmp_path / "l.csv", tmp_path / "img", cache_dir=False)
    assert ds.class_counts.tolist() == [2, 2, 1]
    assert ds.sources[0].endswith("img/train/cat/0.png") and ds.sources[-1].endswith("img/odd\\name.png")
    (tmp_path / "up.csv").write_text("filename,label\n..\\secret.png,a\n")
    with pytest.raises(DataError, match=r"secret\.png leads outside the dataset folder"):
        CSVClassDataset(tmp_path / "up.csv", tmp_path / "img", cache_dir=False)


def test_csv_names_leading_outside_the_image_root_are_refused(tmp_path):
    save(tmp_path / "secret.png", ramp(offset=1))
    save(tmp_path / "images" / "0.png", ramp(offset=2))
    csv = tmp_path / "list.csv"
    csv.write_text("filename,label\n0.png,a\n../secret.png,b\n")
    with pytest.raises(DataError, match=r"secret\.png leads outside the dataset folder"):
        CSVClassDataset(csv, tmp_path / "images", cache_dir=False)
    ds = CSVClassDataset(csv, tmp_path / "images", cache_dir=False, follow_outside_links=True)
    assert ds.class_names == ["a", "b"]


# -- duplicates never leak support into query -----------------------------------------------------

def assert_no_leak(ds, shots: int, queries: int, episodes: int = 40) -> None:
    sampler = EpisodeSampler(ds, ways=ds.num_classes, shots=shots, queries=queries, seed=0)
    for i in range(episodes):
        ep = sampler.episode(i)
        s = ep.support_x.flatten(1)
        q = ep.query_x.flatten(1)
        assert not (s[:, None, :] == q[None, :, :]).all(-1).any(), f"episode {i}: a support image is also a query"


def test_a_split_folder_missing_beside_others_is_refused_not_drawn_from_them(tmp_path):
    """root/train/ and root/test/ without root/val/: 'val' used to split root's classes, i.e. draw
    validation classes from train/ and test/ (training images validated on, test classes selected on)."""
    from metamtl.data import load_dataset
    from metamtl.errors import DataNotFoundError

    for split, classes in (("train", range(6)), ("test", range(6, 10))):
        for c in classes:
            for i in range(2):
                save(tmp_path / split / f"c{c}" / f"{i}.png", ramp(offset=10 * c + i))
    assert load_dataset("folder", "train", tmp_path, cache_dir=False).num_classes == 6
    with pytest.raises(DataNotFoundError, match=r"has split folders \(train, test\) but no 'val' folder; splitting its "
                                                r"classes instead would draw 'val' classes from train/, test/ .*: add .*val, "
                                                r"or leave this split out \(config: data.val_split / data.test_split: null\)"):
        load_dataset("folder", "val", tmp_path, cache_dir=False)
    assert load_dataset("folder", "all", tmp_path, cache_dir=False).num_classes == 10


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_held_out_splits_on_disk_are_stored_like_the_training_split(tmp_path, layout):
    """root/train RGB 8x8 beside root/val and root/test grey 6x6 (or train.csv / val.csv / test.csv):
    every split is stored at the training split's channels and size, so a model trained on one reads
    the others (they used to be decided per split: training worked, validation then failed)."""
    from metamtl.data import load_dataset

    rows = {}
    for split, classes, grey in (("train", range(4), False), ("val", range(4, 7), True), ("test", range(7, 10), True)):
        for c in classes:
            for i in range(2):
                img = ramp(6, 6, offset=10 * c + i) if grey else np.stack([ramp(offset=10 * c + i + k) for k in range(3)], -1)
                name = f"{split}/c{c}/{i}.png"
                save(tmp_path / "images" / name, img)
                rows.setdefault(split, []).append(f"{name},c{c}")
    root = tmp_path / "images"
    if layout == "csv":
        root = tmp_path
        for split, lines in rows.items():
            (tmp_path / f"{split}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    name = "folder" if layout == "folders" else "csv"
    splits = {s: load_dataset(name, s, root, cache_dir=False) for s in ("train", "val", "test", "train+val")}
    for split, ds in splits.items():
        assert ds.preprocessing.channels == 3 and tuple(ds.preprocessing.size) == (8, 8), split
        assert ds.images.shape[1:] == (3, 8, 8), split
    grey = splits["val"].images[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])  # grey images replicated, not coloured
    explicit = Preprocessing(size=(6, 6), channels=1, mean=(0.0,), std=(1.0,))
    assert load_dataset(name, "val", root, cache_dir=False, preprocessing=explicit).images.shape[1:] == (1, 6, 6)


def test_duplicate_csv_rows_are_dropped_with_a_warning(tmp_path):
    for i in range(3):
        save(tmp_path / "img" / f"a{i}.png", ramp(offset=i))
        save(tmp_path / "img" / f"b{i}.png", ramp(offset=20 + i))
    rows = [f"a{i}.png,a" for i in range(3)] + [f"b{i}.png,b" for i in range(3)]
    (tmp_path / "l.csv").write_text("filename,label\n" + "\n".join(rows + rows[:2] + ["./a0.png,a"]) + "\n")
    with pytest.warns(DuplicateRowsWarning, match=r"dropped 3 row\(s\) repeating an earlier row \(lines 8, 9, 10\)"):
        ds = CSVClassDataset(tmp_path / "l.csv", tmp_path / "img", cache_dir=False)
    assert ds.class_counts.tolist() == [3, 3]
    assert_no_leak(ds, shots=1, queries=2)


@pytest.mark.parametrize("link", ["a_link", "zz_link"])
def test_a_link_to_a_class_folder_is_the_copy_skipped_not_the_folder(tmp_path, link):
    """root/z_real + root/<link> -> z_real: the class is z_real and the link is reported, whatever sorts first."""
    for c, folder in enumerate(["z_real", "b"]):
        for i in range(2):
            save(tmp_path / folder / f"{i}.png", ramp(offset=10 * c + i))
    os.symlink("z_real", tmp_path / link)
    ds, messages = load(tmp_path)
    assert ds.class_names == ["b", "z_real"]
    assert any("already read" in m and link in m and "z_real," not in m for m in messages), messages


def test_a_file_listed_under_two_labels_is_refused(tmp_path):
    save(tmp_path / "img" / "x.png", ramp())
    (tmp_path / "l.csv").write_text("filename,label\nx.png,cat\nx.png,dog\n")
    with pytest.raises(DataError, match=r"line 3: x\.png is labelled 'dog' but line 2 labels it 'cat'"):
        CSVClassDataset(tmp_path / "l.csv", tmp_path / "img", cache_dir=False)


def test_a_file_linked_into_two_class_folders_is_refused(tmp_path):
    save(tmp_path / "a" / "0.png", ramp(offset=1))
    save(tmp_path / "b" / "1.png", ramp(offset=2))
    os.symlink(tmp_path / "a" / "0.png", tmp_path / "b" / "0.png")
    with pytest.raises(DataError, match=r"b/0\.png is listed under class 'b' but the same file .*a/0\.png.* class 'a'"):
        load(tmp_path)


def test_a_file_hard_linked_into_two_class_folders_is_refused(tmp_path):
    save(tmp_path / "a" / "0.png", ramp(offset=1))
    save(tmp_path / "b" / "1.png", ramp(offset=2))
    os.link(tmp_path / "a" / "0.png", tmp_path / "b" / "0.png")
    with pytest.raises(DataError, match=r"b/0\.png is listed under class 'b' but the same file .*a/0\.png.* class 'a'"):
        load(tmp_path)


@pytest.mark.parametrize("how", ["byte-identical copy", "symlink in the class", "same pixels, other format"])
def test_duplicate_images_within_a_class_are_dropped_with_a_warning(tmp_path, how):
    for i in range(3):
        save(tmp_path / "a" / f"{i}.png", ramp(offset=i))
        save(tmp_path / "b" / f"{i}.png", ramp(offset=10 + i))
    copy = tmp_path / "a" / ("3.png" if how != "same pixels, other format" else "3.bmp")
    if how == "byte-identical copy":
        copy.write_bytes((tmp_path / "a" / "0.png").read_bytes())
    elif how == "symlink in the class":
        os.symlink(tmp_path / "a" / "0.png", copy)
    else:
        save(copy, ramp(offset=0))
    ds, messages = load(tmp_path)
    assert ds.class_counts.tolist() == [3, 3]
    assert any("dropped 1 duplicate image(s)" in m and copy.name in m for m in messages)
    assert_no_leak(ds, shots=1, queries=2)


def test_episodes_of_a_dataset_built_from_tensors_never_repeat_an_image(tmp_path):
    from metamtl.data import ClassDataset

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    images = torch.cat([base, base[:3]])  # class 0 holds images 0..2 twice
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0])
    with pytest.warns(DuplicateImagesWarning, match="dropped 3 duplicate"):
        ds = ClassDataset(images, labels, ["x", "y"])
    assert ds.class_counts.tolist() == [3, 3]
    assert_no_leak(ds, shots=1, queries=2)


# -- text files that are not UTF-8 ----------------------------------------------------------------

def test_a_latin1_csv_gets_a_clear_encoding_error(tmp_path):
    save(tmp_path / "img" / "caf\u00e9.png", ramp())
    (tmp_path / "l.csv").write_bytes("filename,label\ncaf\u00e9.png,boisson\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l\.csv is not UTF-8 text: line 2, byte offset \d+ holds b'\\xe9.*Latin-1.*save the file as UTF-8"):
        CSVClassDataset(tmp_path / "l.csv", tmp_path / "img", cache_dir=False)


def test_a_utf16_csv_with_a_byte_order_mark_is_read(tmp_path):
    save(tmp_path / "img" / "caf\u00e9.png", ramp())
    (tmp_path / "l.csv").write_bytes("filename,label\ncaf\u00e9.png,boisson\n".encode("utf-16"))
    assert CSVClassDataset(tmp_path / "l.csv", tmp_path / "img", cache_dir=False).class_names == ["boisson"]


def test_a_non_utf8_config_gets_a_clear_config_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes("name: caf\u00e9\n".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text: line 1.*save the file as UTF-8"):
        load_config(tmp_path / "c.yaml")


def test_the_cli_reports_a_non_utf8_config_without_a_traceback(tmp_path, capsys):
    from metamtl.cli import main

    (tmp_path / "c.yaml").write_bytes(b"name: \xff\xfe\xfa\n")
    assert main(["fit", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err
