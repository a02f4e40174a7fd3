"""ClassFolder and CSVClassDataset on generated trees of tiny images."""
from __future__ import annotations

import pytest
import torch

from metamtl.data import ClassFolder, CSVClassDataset, Preprocessing
from metamtl.errors import DataError, DataNotFoundError


def test_class_folder_reads_nested_classes(image_tree, cache_dir):
    ds = ClassFolder(image_tree, cache_dir=cache_dir)
    assert ds.name == "animals"
    assert ds.class_names == ["birds/owl", "cat", "dog"]  # hidden folder and .txt ignored
    assert ds.class_counts.tolist() == [2, 3, 2]
    # Inferred from all images: RGB, 5 high x 6 wide (5 of 7); the 12x10 JPEGs are resized to it.
    assert ds.images.shape == (7, 3, 5, 6) and ds.images.dtype == torch.uint8
    assert ds.preprocessing == Preprocessing(size=(5, 6), channels=3, mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.images[ds.class_indices(1)][:, 0].eq(200).all()  # cat: red
    owl = ds.images[ds.class_indices(0)]
    assert owl[:, 2].eq(200).all() and owl[:, 0].eq(0).all() and owl[:, 1].unique().tolist() == [0, 10]
    dog = ds.images[ds.class_indices(2)].float()
    assert (dog[:, 1] - 200).abs().max() <= 3 and dog[:, 0].max() <= 3  # JPEG is lossy
    assert ds.sources[0] == str(image_tree / "birds" / "owl" / "0.PNG")


def test_explicit_preprocessing_and_grayscale_inference(image_tree, write_image, tmp_path, cache_dir):
    p = Preprocessing(size=(4, 4), channels=1)
    ds = ClassFolder(image_tree, preprocessing=p, extensions=(".png",), cache_dir=cache_dir)
    assert ds.class_names == ["birds/owl", "cat"] and ds.images.shape == (5, 1, 4, 4)
    for i in range(2):
        write_image(tmp_path / "gray" / "a" / f"{i}.png", 7 + i, size=(3, 2), mode="L")
    gray = ClassFolder(tmp_path / "gray", name="g", cache_dir=cache_dir)
    assert gray.name == "g" and gray.images.shape == (2, 1, 2, 3)
    assert gray.images[0].eq(7).all() and gray.images[1].eq(8).all()


def test_bad_folders_raise_clear_errors(tmp_path, write_image):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        ClassFolder(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ClassFolder(tmp_path / "empty")
    write_image(tmp_path / "loose" / "x.png", (1, 1, 1))
    with pytest.raises(DataError, match="sub-folder"):
        ClassFolder(tmp_path / "loose")


def test_corrupt_or_truncated_image_error_names_the_file(image_tree, cache_dir):
    good = (image_tree / "cat" / "1.png").read_bytes()
    (image_tree / "cat" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="1.png") as err:
        ClassFolder(image_tree, cache_dir=cache_dir)
    assert str(image_tree / "cat" / "1.png") in str(err.value)
    (image_tree / "cat" / "1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cat/1\.png"):
        ClassFolder(image_tree, cache_dir=cache_dir)
    (image_tree / "cat" / "1.png").write_bytes(b"")  # was: "cannot identify image file <_io.BytesIO object at 0x...>"
    with pytest.raises(DataError, match=r"^image .*cat/1\.png is an empty file \(0 bytes\): replace or delete it$"):
        ClassFolder(image_tree, cache_dir=cache_dir)


def test_a_root_that_is_a_file_is_not_called_missing(image_tree, tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(DataNotFoundError, match=r"images.zip is a file, not a folder: give the folder that holds the images"):
        ClassFolder(tmp_path / "images.zip")  # was: "folder .../images.zip does not exist"


@pytest.fixture
def csv_tree(tmp_path, write_image):
    for name, value in [("a0.png", 10), ("a1.png", 11), ("b0.png", 20)]:
        write_image(tmp_path / "img" / name, value, size=(3, 3), mode="L")
    csv = tmp_path / "list.csv"
    csv.write_text("path,cls,extra\nb0.png,b,x\na1.png,a,y\na0.png,a,z\n")
    return csv, tmp_path / "img"


def test_csv_dataset_reads_listed_images(csv_tree, cache_dir):
    csv, images = csv_tree
    ds = CSVClassDataset(csv, images, filename_column="path", label_column="cls", cache_dir=cache_dir)
    assert ds.name == "list" and ds.class_names == ["a", "b"] and ds.class_counts.tolist() == [2, 1]
    assert ds.images[:, 0, 0, 0].tolist() == [11, 10, 20]  # CSV order kept within a class
    assert ds.images.shape == (3, 1, 3, 3)


def test_csv_errors(csv_tree, tmp_path, cache_dir):
    csv, images = csv_tree
    with pytest.raises(DataError, match="'filename'") as err:
        CSVClassDataset(csv, images, cache_dir=cache_dir)
    assert "path,cls,extra" in str(err.value)
    with pytest.raises(DataNotFoundError, match="nope.csv"):
        CSVClassDataset(tmp_path / "nope.csv", images)
    csv.write_text("filename,label\n")
    with pytest.raises(DataError, match="no images"):
        CSVClassDataset(csv, images)
    csv.write_text("filename,label\na0.png,\n")
    with pytest.raises(DataError, match="line 2"):
        CSVClassDataset(csv, images)
    csv.write_text("filename,label\na0.png,a\nghost.png,a\n")
    with pytest.raises(DataNotFoundError, match="ghost.png"):
        CSVClassDataset(csv, images)


def test_csv_errors_cite_file_lines_and_refuse_a_repeated_column(csv_tree):
    """Line numbers count blank lines and quoted fields spanning lines; two 'label' columns are refused."""
    csv, images = csv_tree
    csv.write_text("filename,label\n\na0.png,a\n\n\nb0.png,\n")
    with pytest.raises(DataError, match="line 6: empty"):
        CSVClassDataset(csv, images, cache_dir=False)
    csv.write_text('filename,label\na0.png,"two\nlines"\nb0.png,\n')
    with pytest.raises(DataError, match="line 4: empty"):
        CSVClassDataset(csv, images, cache_dir=False)
    csv.write_text("filename,label,label\na0.png,a,z\n")
    with pytest.raises(DataError, match="names column 'label' 2 times"):
        CSVClassDataset(csv, images, cache_dir=False)
    csv.write_bytes(b"filename,label\na0.png,a\nb\x000.png,b\n")  # was a bare ValueError: embedded null byte
    with pytest.raises(DataError, match="line 3: a NUL character in 'filename' or 'label'"):
        CSVClassDataset(csv, images, cache_dir=False)


def test_file_and_folder_names_that_are_not_utf8_are_read(tmp_path, write_image, cache_dir):
    """A folder b'caf\\xe9' and a file b'ok/\\xff.png' (Latin-1 names): read, the class named printably."""
    import os

    root = os.fsencode(tmp_path / "latin")
    for i, (folder, file) in enumerate([(b"caf\xe9", b"0.png"), (b"caf\xe9", b"1.png"), (b"ok", b"\xff.png"),
                                        (b"ok", b"2.png")]):
        write_image(tmp_path / os.fsdecode(root + b"/" + folder + b"/" + file), (10 * i, 0, 0))
    for cache in (cache_dir, cache_dir):  # written, then read back from the decode cache
        ds = ClassFolder(os.fsdecode(root), cache_dir=cache)
        assert ds.class_names == ["caf\\xe9", "ok"] and ds.class_counts.tolist() == [2, 2]
        print(ds.class_names, repr(ds))  # printable: no surrogates left
        "".join(ds.class_names).encode("utf-8")


def test_csv_with_classic_mac_line_endings_is_read_and_csv_errors_name_the_file(csv_tree):
    """CR-only line endings (Excel's "CSV (Macintosh)") raised a bare _csv.Error; now read as lines.
    What the csv module still refuses (a field over its size limit) is a DataError naming file and line."""
    csv, images = csv_tree
    csv.write_bytes(b"filename,label\ra0.png,a\ra1.png,a\rb0.png,b\r")
    ds = CSVClassDataset(csv, images, cache_dir=False)
    assert ds.class_names == ["a", "b"] and len(ds) == 3
    csv.write_bytes(b"filename,label\ra0.png,a\rb0.png,\r")
    with pytest.raises(DataError, match="line 3: empty"):
        CSVClassDataset(csv, images, cache_dir=False)
    csv.write_text("filename,label\na0.png,a\nb0.png," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=rf"{csv.name}, line 3: .*field larger than field limit"):
        CSVClassDataset(csv, images, cache_dir=False)


def test_image_size_must_be_a_positive_int_or_a_pair_of_them(image_tree):
    """'28' stored images at 2x8, True at 1x1, and np.int64/28.0 crashed with bare TypeErrors."""
    import numpy as np

    from metamtl.errors import ConfigError

    for bad in ("28", True, 28.0, 0, (28,), (28, "28"), (3, 4, 5)):
        with pytest.raises(ConfigError, match="image_size must be an integer side >= 1"):
            ClassFolder(image_tree, cache_dir=False, image_size=bad)
    assert ClassFolder(image_tree, cache_dir=False, image_size=np.int64(4)).images.shape[-2:] == (4, 4)
    assert ClassFolder(image_tree, cache_dir=False, image_size=[np.int32(3), 5]).images.shape[-2:] == (3, 5)


def test_preprocessing_refuses_non_finite_normalisation_and_a_non_bool_invert():
    """std=nan/inf and mean=nan were accepted (every model input NaN or 0), invert='no' inverted the
    images, and size=28 raised a bare TypeError; now size=28 means 28x28 and the rest is a DataError."""
    nan, inf = float("nan"), float("inf")
    for kwargs, match in [({"std": (nan,)}, "std must be finite"), ({"std": (inf,)}, "std must be finite"),
                          ({"mean": (nan,)}, "mean must be finite"), ({"mean": ("x",)}, "mean must be numbers"),
                          ({"invert": "no"}, "invert must be True or False"), ({"size": "28"}, "size must be"),
                          ({"size": (28, 2.5)}, "size must be"), ({"size": True}, "size must be")]:
        with pytest.raises(DataError, match=match):
            Preprocessing(**kwargs)
    assert Preprocessing(size=28).size == (28, 28) and Preprocessing(size=[3, 4]).size == (3, 4)
    assert Preprocessing(size=(3, 4)) == Preprocessing.from_dict(Preprocessing(size=(3, 4)).to_dict())


def test_extensions_given_as_one_string_reads_only_that_format(image_tree):
    """extensions='.png' was split into '.', 'p', 'n', 'g': every file ending in g (.jpg too) was read."""
    from metamtl.errors import ConfigError

    ds = ClassFolder(image_tree, cache_dir=False, extensions=".png")
    assert sorted(ds.class_names) == ["birds/owl", "cat"]
    assert all(s.lower().endswith(".png") for s in ds.sources)
    for bad in ("png", ["png"], [], [".png", 3]):
        with pytest.raises(ConfigError, match="extensions must be file name endings with their dot"):
            ClassFolder(image_tree, cache_dir=False, extensions=bad)


def test_unreadable_files_and_overlong_names_are_data_errors_naming_the_file(tmp_path, write_image, monkeypatch):
    """A file the system refuses to read (permissions) or a CSV name longer than it allows: a DataError naming
    the path, not a bare OSError from a worker thread (tests run as root, so permissions are simulated)."""
    import errno
    from pathlib import Path

    from metamtl.data import load_dataset

    for c in "ab":
        for k in range(2):
            write_image(tmp_path / "data" / c / f"{k}.png", (10 * k, 3, 5))
    (tmp_path / "l.csv").write_text("filename,label\na/0.png,a\na/1.png,a\nb/0.png,b\n" + "x" * 300 + ".png,b\n")
    with pytest.raises(DataError, match=r"cannot read .*xxx\.png \(File name too long\)"):
        CSVClassDataset(tmp_path / "l.csv", tmp_path / "data", cache_dir=False)
    read_bytes, is_dir = Path.read_bytes, Path.is_dir

    def refused(real, name):
        def probe(self):
            if self.name == name:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)
        return probe

    monkeypatch.setattr(Path, "read_bytes", refused(read_bytes, "1.png"))
    with pytest.raises(DataError, match=r"cannot read .*a/1\.png \(Permission denied\); give the user running"):
        ClassFolder(tmp_path / "data", cache_dir=False)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "is_dir", refused(is_dir, "data"))
    with pytest.raises(DataError, match=r"cannot read .*data \(Permission denied\)"):
        load_dataset("folder", "train", tmp_path / "data", cache_dir=False)


def test_exif_rotated_photos_are_stored_as_shown_and_sized_by_their_shown_size(tmp_path):
    """A camera JPEG stored landscape with EXIF orientation 6 is shown portrait: stored (and its size inferred)
    portrait, as predict decodes the same file."""
    import numpy as np
    from PIL import Image, ImageOps

    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255
    for c in "ab":
        (tmp_path / c).mkdir()
        for k in range(2):
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(arr).save(tmp_path / c / f"{k}.jpg", exif=exif, quality=95)
    ds = ClassFolder(tmp_path, cache_dir=False)
    assert tuple(ds.images.shape[1:]) == (3, 16, 8)
    with Image.open(tmp_path / "a" / "0.jpg") as im:
        shown = torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(ds.preprocessing.decode(im), ds.images[0])
    assert (ds.images[0].int() - shown.int()).abs().max() <= 8  # JPEG noise only: the same orientation


def test_the_colour_key_of_16_bit_grey_pngs_is_composited_like_8_bit_ones(tmp_path):
    """A 16-bit grey PNG's tRNS colour key makes those pixels transparent (composited over the black
    background), as for an 8-bit grey PNG, not kept at their grey level."""
    import numpy as np
    from PIL import Image

    g16 = np.full((4, 4), 60000, np.uint16)
    g16[0, 0] = 1000
    g8 = (g16 // 257).astype(np.uint8)
    for c in "ab":
        (tmp_path / c).mkdir()
        Image.fromarray(g16).save(tmp_path / c / "sixteen.png", transparency=60000)
        Image.fromarray(g8).save(tmp_path / c / "eight.png", transparency=int(g8[1, 1]))
    ds = ClassFolder(tmp_path, cache_dir=False)
    rows = {s.rsplit("/", 1)[-1]: ds.images[i, 0, 0].tolist() for i, s in enumerate(ds.sources[:2])}
    assert rows == {"eight.png": [3, 0, 0, 0], "sixteen.png": [4, 0, 0, 0]}
    with Image.open(tmp_path / "a" / "sixteen.png") as im:
        assert ds.preprocessing.decode(im)[0, 0].tolist() == [4, 0, 0, 0]


def _png_rgb16(path, pixels, key):
    """A 16-bit RGB PNG of ``pixels`` (``H x W x 3`` uint16) with the tRNS colour key ``key`` (PIL cannot write one)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("key", [(1000, 2000, 3000), (100, 200, 50)])
def test_the_colour_key_of_16_bit_rgb_pngs_clears_exactly_the_keyed_pixels(tmp_path, key):
    """PIL reads a 16-bit RGB PNG's high bytes but compares them with the 16-bit key: the keyed pixels kept
    their colour (alpha 255) instead of being composited over the background, as in an 8-bit RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    from metamtl.data.base import pil_pixels

    pixels = np.full((4, 6, 3), 40000, np.uint16)
    pixels[0, 0] = key
    pixels[1, 1] = (key[0] + 1, key[1], key[2])  # the same high bytes: not the key
    for c in "ab":
        _png_rgb16(tmp_path / c / "0.png", pixels, key)
    expected = np.full((4, 6), 255, np.uint8)
    expected[0, 0] = 0
    with Image.open(tmp_path / "a" / "0.png") as im:
        assert (pil_pixels(im)[..., 3] == expected).all()
    with Image.open(io.BytesIO((tmp_path / "a" / "0.png").read_bytes())) as im:
        rgba = pil_pixels(im)
    assert (rgba[..., 3] == expected).all() and rgba[0, 1].tolist() == [156, 156, 156, 255]
    ds = ClassFolder(tmp_path, cache_dir=False)
    assert ds.images[0, :, 0, 0].tolist() == [0, 0, 0] and ds.images[0, :, 1, 1].tolist() == list(pixels[1, 1] // 257)


def test_a_16_bit_rgb_png_is_keyed_as_given_loaded_or_not_and_keeps_its_edits(tmp_path):
    """The colour key decoded the file again: an image edited after opening (thumbnail, drawn on) lost its
    edits, and a stream's image was keyed before .load() but not after it.  The pixels are now the image's,
    keyed the same way loaded or not."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from metamtl.data.base import pil_pixels

    pixels = np.full((4, 4, 3), 0x1234, np.uint16)
    pixels[0, 0] = (0xABCD, 0x0102, 0x0304)
    path = tmp_path / "k16.png"
    _png_rgb16(path, pixels, (0xABCD, 0x0102, 0x0304))
    with Image.open(path) as im:
        im.thumbnail((2, 2))
        assert pil_pixels(im).shape[:2] == (2, 2)
    with Image.open(path) as im:
        ImageDraw.Draw(im).rectangle([0, 0, 3, 3], fill=(255, 0, 0))
        assert pil_pixels(im)[1, 1].tolist()[:3] == [255, 0, 0] and pil_pixels(im)[0, 0, -1] == 255
    for load in (False, True):
        for source in (path, io.BytesIO(path.read_bytes())):
            with Image.open(source) as im:
                if load:
                    im.load()
                rgba = pil_pixels(im)
            assert rgba[0, 0, 3] == 0 and rgba[1, 1].tolist() == [0x12, 0x12, 0x12, 255], (load, source)


def test_the_image_size_error_suggests_a_config_value_the_config_accepts(tmp_path, write_image):
    """It suggested data.image_size: [32, 48], which the config refuses (data.image_size is one side)."""
    from metamtl.config import load_config
    from metamtl.errors import ConfigError

    write_image(tmp_path / "a" / "0.png", (1, 2, 3))
    with pytest.raises(ConfigError, match=r"config: data.image_size: one integer side, e.g. 28\)") as err:
        ClassFolder(tmp_path, image_size="32x48", cache_dir=False)
    assert "[32, 48]" not in str(err.value)
    assert load_config(None, ["data.image_size=28"]).data.image_size == 28
