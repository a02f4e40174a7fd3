"""Generic image datasets: one folder per class, or a CSV of ``filename,label`` rows.

The building blocks here are shared by every image dataset in metamtl:

* :class:`DirectoryTree` / :class:`ZipTree` - read-only views of the files under a folder or
  inside a zip archive (read in place, never extracted), by relative posix path;
* :func:`decode_classes` - decode a list of ``(file, class)`` pairs from a tree with a thread pool
  (PIL releases the GIL while decoding) through the decode cache (:mod:`metamtl.data.cache`);
* :class:`ClassFolder` and :class:`CSVClassDataset` - the user-facing generic datasets, on which
  :class:`~metamtl.data.Omniglot` and :class:`~metamtl.data.MiniImageNet` are built.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ..errors import DataError, DataNotFoundError, IntegrityError
from .base import ClassDataset, Preprocessing
from .cache import Decoded, cached_decode
from .download import md5sum, verify_md5

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_CHUNK = 256  # images per thread-pool task


def resolve_root(root: str | os.PathLike | None, what: str) -> Path:
    """``root``, else ``$METAMTL_DATA``; raise :class:`DataNotFoundError` when neither is set."""
    root = root if root is not None else os.environ.get("METAMTL_DATA")
    if not root:
        raise DataNotFoundError(
            f"no data folder given for {what}: pass root=<folder> or set the METAMTL_DATA "
            "environment variable to the folder that holds your datasets"
        )
    return Path(root).expanduser()


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


class DirectoryTree:
    """Files under the folder ``root``, addressed by posix paths relative to it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"folder {self.root} does not exist")

    def __enter__(self) -> "DirectoryTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (present for symmetry with :class:`ZipTree`)."""

    def files(self) -> list[str]:
        """Sorted relative paths of all files, hidden files and folders excluded."""
        out = []
        for folder, dirs, names in os.walk(self.root, followlinks=True):
            dirs[:] = [d for d in dirs if not _hidden(d)]
            rel = Path(folder).relative_to(self.root).as_posix()
            out.extend(n if rel == "." else f"{rel}/{n}" for n in names if not _hidden(n))
        return sorted(out)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError as exc:
            raise DataNotFoundError(f"image file {self.describe(rel)} is missing") from exc

    def fingerprint(self, paths: Sequence[str]) -> str:
        """Hash of the relative paths, sizes and modification times of ``paths``."""
        h = hashlib.sha1()
        for rel in paths:
            try:
                st = os.stat(self.root / rel)
            except FileNotFoundError as exc:
                raise DataNotFoundError(f"image file {self.describe(rel)} is missing") from exc
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


class ZipTree:
    """Files inside the zip archive ``path`` under the folder ``prefix``, read without extracting.

    ``md5``, when given, is checked first (:class:`IntegrityError` on a mismatch).  One open
    ``ZipFile`` serves all threads: CPython's zipfile seeks and reads members under a lock.
    """

    def __init__(self, path: str | os.PathLike, prefix: str = "", md5: str | None = None) -> None:
        self.path = Path(path)
        self.prefix = prefix
        if md5 is not None:
            verify_md5(self.path, md5)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise IntegrityError(f"{self.path} is not a readable zip archive ({exc})") from exc
        self._names = {
            info.filename[len(prefix):]
            for info in self._zip.infolist()
            if info.filename.startswith(prefix) and not info.is_dir()
        }

    def __enter__(self) -> "ZipTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def files(self) -> list[str]:
        return sorted(n for n in self._names if not _hidden(n))

    def exists(self, rel: str) -> bool:
        return rel in self._names

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}"

    def read(self, rel: str) -> bytes:
        try:
            return self._zip.read(self.prefix + rel)
        except KeyError as exc:
            raise DataNotFoundError(f"image file {self.describe(rel)} is missing") from exc
        except (zipfile.BadZipFile, zlib.error, OSError) as exc:
            raise DataError(f"cannot read {self.describe(rel)} ({exc}); the archive is corrupt") from exc

    def fingerprint(self, paths: Sequence[str]) -> str:
        """The archive's md5 (it covers every member)."""
        return f"{md5sum(self.path)}:{self.prefix}"


Tree = DirectoryTree | ZipTree


def _open_image(tree: Tree, rel: str):
    from PIL import Image

    data = tree.read(rel)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image {tree.describe(rel)} ({exc}); the file is corrupt or truncated: "
            "replace or delete it"
        ) from exc


def infer_preprocessing(tree: Tree, rel: str) -> Preprocessing:
    """Preprocessing keeping the size and channel count (1 for grayscale modes, else 3) of ``rel``."""
    im = _open_image(tree, rel)
    channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return Preprocessing(size=(im.height, im.width), channels=channels,
                         mean=(0.0,) * channels, std=(1.0,) * channels)


def decode_images(tree: Tree, paths: Sequence[str], preprocessing: Preprocessing, desc: str = "") -> torch.Tensor:
    """Decode ``paths`` from ``tree`` into ``uint8 [N, C, H, W]`` with a thread pool."""
    from tqdm.auto import tqdm

    out = torch.empty((len(paths), *preprocessing.input_shape), dtype=torch.uint8)

    def work(rows: range) -> int:
        for i in rows:
            out[i] = preprocessing.decode(_open_image(tree, paths[i]))
        return len(rows)

    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    chunks = [range(s, min(s + _CHUNK, len(paths))) for s in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=f"decoding {desc}",
                                                    unit="img", disable=None, leave=False) as bar:
        try:
            for done in pool.map(work, chunks):
                bar.update(done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out


def decode_classes(
    tree: Tree,
    paths: Sequence[str],
    labels: Sequence[str],
    preprocessing: Preprocessing,
    name: str,
    cache_dir: str | os.PathLike | bool | None = None,
) -> Decoded:
    """Decode images ``paths`` of classes ``labels`` (names) through the decode cache.

    Classes are numbered in sorted name order; the cache key covers the tree's content
    fingerprint, the ``(path, label)`` list and the preprocessing.
    """
    if not paths:
        raise DataError(f"{name}: no images to decode in {tree.describe('')}")
    class_names = sorted(set(labels))

    def build() -> Decoded:
        index = {c: i for i, c in enumerate(class_names)}
        return Decoded(
            decode_images(tree, paths, preprocessing, desc=name),
            torch.tensor([index[c] for c in labels], dtype=torch.long),
            class_names,
            list(paths),
        )

    listing = hashlib.sha1("\n".join(f"{p}\t{c}" for p, c in zip(paths, labels)).encode()).hexdigest()
    return cached_decode(name, [tree.fingerprint(paths), listing, preprocessing.key()], build, cache_dir)


def scan_class_folders(tree: Tree, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], list[str]]:
    """``(paths, classes)`` of the images in ``tree``: each image's class is its folder's path."""
    exts = tuple(e.lower() for e in extensions)
    paths = [p for p in tree.files() if p.lower().endswith(exts)]
    if not paths:
        raise DataError(
            f"no images with extensions {', '.join(exts)} under {tree.describe('')}; expected one "
            "sub-folder of images per class"
        )
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise DataError(
            f"{tree.describe(loose[0])} (and {len(loose) - 1} more) lie directly in the dataset "
            "folder; put every image in a sub-folder named after its class"
        )
    return paths, [posixpath.dirname(p) for p in paths]


def _init_decoded(ds: ClassDataset, decoded: Decoded, tree: Tree, name: str, preprocessing: Preprocessing) -> None:
    ClassDataset.__init__(ds, decoded.images, decoded.labels, decoded.class_names, name=name,
                          preprocessing=preprocessing, sources=[tree.describe(s) for s in decoded.sources])


class ClassFolder(ClassDataset):
    """Images stored one folder per class, e.g. ``root/cat/001.png`` (ImageFolder layout).

    Folders may be nested: every folder that directly holds images is one class, named by its
    path relative to ``root`` with ``/`` separators (``cat``, or ``Greek/character01`` for an
    extracted Omniglot archive).  Hidden files and folders are skipped; other files are ignored
    unless their extension is in ``extensions``.

    Args:
        root: the dataset folder.
        preprocessing: how files become stored tensors.  Default: keep the first image's size
            and channel count (1 for grayscale modes, else 3), no normalisation; images of other
            sizes are resized to it.
        name: dataset name (default: the folder's name).
        extensions: file name endings (case-insensitive) that count as images.
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).

    Raises:
        DataNotFoundError: ``root`` does not exist.
        DataError: no images / images outside class folders / a file that cannot be decoded
            (the message names it).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        preprocessing: Preprocessing | None = None,
        name: str | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cache_dir: str | os.PathLike | bool | None = None,
    ) -> None:
        with DirectoryTree(root) as tree:
            name = name or tree.root.resolve().name
            paths, labels = scan_class_folders(tree, extensions)
            preprocessing = preprocessing or infer_preprocessing(tree, paths[0])
            decoded = decode_classes(tree, paths, labels, preprocessing, f"folder-{name}", cache_dir)
            _init_decoded(self, decoded, tree, name, preprocessing)


def read_class_csv(data: bytes, where: str, filename_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Parse ``(filenames, labels)`` from CSV bytes with a header row; ``where`` names the file."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    for column in (filename_column, label_column):
        if column not in header:
            raise DataError(
                f"{where} has no column {column!r} (its header is {','.join(header) or 'empty'}); "
                "pass filename_column=/label_column= to name the right columns"
            )
    filenames, labels = [], []
    for line, row in enumerate(reader, start=2):
        filename, label = (row.get(filename_column) or "").strip(), (row.get(label_column) or "").strip()
        if not filename or not label:
            raise DataError(f"{where}, line {line}: empty {filename_column!r} or {label_column!r}")
        filenames.append(filename)
        labels.append(label)
    if not filenames:
        raise DataError(f"{where} lists no images")
    return filenames, labels


class CSVClassDataset(ClassDataset):
    """Images listed in a CSV file of ``filename,label`` rows (with a header), e.g. mini-ImageNet.

    Args:
        csv_path: the CSV file.
        image_root: folder the file names are relative to.
        preprocessing: how files become stored tensors (default: as :class:`ClassFolder`).
        filename_column, label_column: header names of the two columns used.
        name: dataset name (default: the CSV file's stem).
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).

    Classes are numbered in sorted label order; images keep their CSV order within a class.

    Raises:
        DataNotFoundError: the CSV or a listed image does not exist.
        DataError: a column is missing, a row is empty, or an image cannot be decoded (the
            message names the file).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_root: str | os.PathLike,
        preprocessing: Preprocessing | None = None,
        filename_column: str = "filename",
        label_column: str = "label",
        name: str | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataNotFoundError(f"CSV file {csv_path} does not exist")
        with DirectoryTree(image_root) as tree:
            self._load(tree, csv_path.read_bytes(), str(csv_path), "", preprocessing,
                       filename_column, label_column, name or csv_path.stem, cache_dir)

    def _load(
        self,
        tree: Tree,
        csv_data: bytes,
        csv_where: str,
        image_dir: str,
        preprocessing: Preprocessing | None,
        filename_column: str,
        label_column: str,
        name: str,
        cache_dir: str | os.PathLike | bool | None,
    ) -> None:
        """Decode the images listed in ``csv_data`` from ``image_dir`` of ``tree`` into ``self``."""
        filenames, labels = read_class_csv(csv_data, csv_where, filename_column, label_column)
        paths = [posixpath.join(image_dir, f) for f in filenames]
        missing = [p for p in paths if not tree.exists(p)]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} image(s) listed in {csv_where} are missing, e.g. "
                f"{tree.describe(missing[0])}"
            )
        preprocessing = preprocessing or infer_preprocessing(tree, paths[0])
        decoded = decode_classes(tree, paths, labels, preprocessing, f"csv-{name}", cache_dir)
        _init_decoded(self, decoded, tree, name, preprocessing)
