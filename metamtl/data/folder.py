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

import collections
import csv
import hashlib
import io
import os
import posixpath
import stat
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, DataError, DataNotFoundError, InputError, IntegrityError, decode_text
from ..progress_bars import progress_bar
from .base import ClassDataset, Preprocessing, draft_jpeg, image_size_or_none, is_grey, rgb16_keyed, shown_size
from .cache import Decoded, cached_decode
from .download import md5sum, verify_md5

_CHUNK = 256  # images per thread-pool task


def image_extensions() -> tuple[str, ...]:
    """File name endings of every image format PIL can open here (``.png``, ``.tif``, ``.ppm``, ...).

    Formats PIL only identifies but cannot decode (stubs needing an external handler) are left out.
    """
    from PIL import Image, ImageFile

    Image.init()
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    readable -= {"MPEG", "PDF"}  # identified only: no pixel decoder
    from PIL import EpsImagePlugin

    if not EpsImagePlugin.has_ghostscript():
        readable.discard("EPS")  # PIL renders PostScript through Ghostscript only
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in readable))


class SkippedFilesWarning(UserWarning):
    """Files under a dataset folder were not read (not images, or links leaving the folder)."""


#: the reason :class:`DirectoryTree` gives for a link it did not follow out of the dataset folder
OUTSIDE_LINKS = "link(s) leading outside the folder"


def skipped_summary(skipped: Sequence[tuple[str, str]]) -> str:
    """``skipped N file(s): ...``, grouped by reason with a few names each (and how to follow links out)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for rel, reason in skipped:
        groups[reason].append(rel)
    parts = [f"{len(rels)} {reason} ({', '.join(rels[:3])}{', ...' if len(rels) > 3 else ''})"
             for reason, rels in groups.items()]
    hint = ("; to read them pass follow_outside_links=True (config: data.follow_outside_links: true)"
            if OUTSIDE_LINKS in groups else "")
    return f"skipped {len(skipped)} file(s): {'; '.join(parts)}{hint}"


def report_skipped(name: str, skipped: Sequence[tuple[str, str]]) -> None:
    """One warning line summarising the files a dataset did not read, grouped by reason."""
    if not skipped:
        return
    warnings.warn(f"{name}: {skipped_summary(skipped)}", SkippedFilesWarning, stacklevel=3)


def resolve_root(root: str | os.PathLike | None, what: str) -> Path:
    """``root``, else ``$METAMTL_DATA``; raise :class:`DataNotFoundError` when neither is set."""
    root = root if root is not None else os.environ.get("METAMTL_DATA")
    if not root:
        raise DataNotFoundError(
            f"no data folder given for {what}: pass root=<folder> or set the METAMTL_DATA "
            "environment variable to the folder that holds your datasets"
        )
    return Path(root).expanduser()


def fs_bytes(name: str) -> bytes:
    """``name`` (a path as Python reads it) as the bytes it names on disk: a name that is not valid UTF-8
    (``caf\\xe9`` written on a Latin-1 system) holds surrogates that a plain ``.encode()`` refuses."""
    return name.encode("utf-8", "surrogateescape")


def printable(name: str) -> str:
    """``name`` with the bytes of a file name that are not UTF-8 written ``\\xe9`` (printable, and
    storable as text), e.g. to name a class after a folder."""
    return fs_bytes(name).decode("utf-8", "backslashreplace")


def cannot_read(path: Any, exc: OSError) -> DataError:
    """:class:`DataError` naming the file or folder ``path`` the system refused to read: no permission (on it
    or a folder above it), a name longer than the system allows, ..."""
    fix = ("give the user running metamtl read access to it and the folders above it (chmod)" if isinstance(exc, PermissionError)
           else "rename, move or remove it")
    return DataError(f"cannot read {path} ({exc.strerror or exc}); {fix}")


def os_probe(path: Path, probe: Callable[[Path], Any]) -> Any:
    """``probe(path)`` (``Path.is_file``, ``Path.read_bytes``, ...), an :class:`OSError` it raises (a
    permission refused, a name too long) re-raised as :func:`cannot_read`'s :class:`DataError`."""
    try:
        return probe(path)
    except OSError as exc:
        raise cannot_read(path, exc) from exc


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


class DirectoryTree:
    """Files under the folder ``root``, addressed by posix paths relative to it.

    The walk is cycle-safe and stays inside ``root``: every directory is entered at most once
    (a symlink to a directory already seen, e.g. a loop, is skipped), and symlinks whose target
    lies outside ``root`` are skipped unless ``follow_outside_links=True``.  Paths read later
    (e.g. listed in a CSV file) obey the same rule.  What was skipped and why is in
    :attr:`skipped` after :meth:`files`.
    """

    def __init__(self, root: str | os.PathLike, follow_outside_links: bool = False) -> None:
        self.root = Path(root)
        if os_probe(self.root, Path.exists) and not os_probe(self.root, Path.is_dir):
            raise DataNotFoundError(f"{self.root} is a file, not a folder: give the folder that holds the images "
                                    "(one sub-folder per class for a folder dataset)")
        if not os_probe(self.root, Path.is_dir):
            raise DataNotFoundError(f"folder {self.root} does not exist")
        self.real_root = self.root.resolve()
        self.follow_outside_links = follow_outside_links
        self.skipped: list[tuple[str, str]] = []

    def __enter__(self) -> "DirectoryTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (present for symmetry with :class:`ZipTree`)."""

    def _inside(self, real: str) -> bool:
        return real == str(self.real_root) or real.startswith(str(self.real_root) + os.sep)

    def files(self) -> list[str]:
        """Sorted relative paths of all files, hidden files and folders excluded.

        Real folders are walked first, symlinks to folders after them: a link to a folder that is
        also there for real is the one skipped as a copy (the class keeps the folder's own name),
        whatever the names' sort order.
        """
        out: list[str] = []
        self.skipped = []
        seen = {(st.st_dev, st.st_ino) for st in [os.stat(self.real_root)]}
        pending = [(str(self.real_root), "")]
        links: list[tuple[str, str, tuple[int, int]]] = []  # symlinked folders: (path, rel, (dev, inode))
        while pending or links:
            if pending:
                self._scan(*pending.pop(), seen, pending, links, out)
                continue
            links.sort(key=lambda link: link[1], reverse=True)
            path, rel, key = links.pop()
            if key in seen:
                self.skipped.append((rel, "link(s) to a folder already read (a cycle or a copy)"))
            else:
                seen.add(key)
                pending.append((path, rel))
        return sorted(out)

    def _scan(self, folder: str, rel: str, seen: set, pending: list, links: list, out: list[str]) -> None:
        """One folder of :meth:`files`: its files into ``out``, its real sub-folders onto ``pending``,
        its symlinked ones onto ``links``."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append((rel or ".", f"unreadable folder(s) ({exc.strerror})"))
            return
        for entry in entries:
            if _hidden(entry.name):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                link = entry.is_symlink()
                if link and not self._inside(os.path.realpath(entry.path)) and not self.follow_outside_links:
                    self.skipped.append((child, OUTSIDE_LINKS))
                    continue
                st = os.stat(entry.path)  # follows links
            except OSError:
                self.skipped.append((child, "broken link(s) or unreadable file(s)"))
                continue
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode) and link:
                links.append((entry.path, child, key))
            elif stat.S_ISDIR(st.st_mode):
                if key in seen:  # a bind mount of a folder already read
                    self.skipped.append((child, "link(s) to a folder already read (a cycle or a copy)"))
                    continue
                seen.add(key)
                pending.append((entry.path, child))
            elif stat.S_ISREG(st.st_mode):
                out.append(child)

    def path(self, rel: str) -> Path:
        """``root/rel``, refused (:class:`DataError`) if it leads outside ``root``."""
        path = self.root / rel
        if not self.follow_outside_links and not self._inside(os.path.realpath(path)):
            raise DataError(
                f"{path} leads outside the dataset folder {self.root} (via '..', an absolute path or a "
                "symlink); keep the images inside it or pass follow_outside_links=True (config: data.follow_outside_links: true)"
            )
        return path

    def exists(self, rel: str) -> bool:
        return os_probe(self.path(rel), Path.is_file)

    def identity(self, rel: str) -> str:
        """The file ``rel`` names, by device and inode: two paths naming one file share it, whether
        through a symlink or a hard link (the real path when it cannot be read)."""
        try:
            st = os.stat(self.root / rel)
        except OSError:
            return os.path.realpath(self.root / rel)
        return f"{st.st_dev}:{st.st_ino}"

    def describe(self, rel: str) -> str:
        return str(self.root / rel)

    def read(self, rel: str) -> bytes:
        try:
            return self.path(rel).read_bytes()
        except OSError as exc:
            raise self._unreadable(rel, exc) from exc

    def _unreadable(self, rel: str, exc: OSError) -> DataError:
        """The error for file ``rel`` that could not be read: missing, or refused (:func:`cannot_read`)."""
        if isinstance(exc, FileNotFoundError):
            return DataNotFoundError(f"image file {self.describe(rel)} is missing")
        return cannot_read(self.describe(rel), exc)

    def fingerprint(self, paths: Sequence[str]) -> str:
        """Hash of the relative paths, sizes, modification times, inodes and change times of ``paths``.

        Size and mtime alone miss a file moved between classes (``mv`` and tar extraction keep the
        mtime, and fixed-size formats such as BMP or PGM keep the size): the inode says which file
        a path names, and the change time (set by the system on every write or rename, never by
        the user) moves whenever a file is rewritten or renamed in place."""
        h = hashlib.sha1()
        for rel in paths:
            try:
                st = os.stat(self.root / rel)
            except OSError as exc:
                raise self._unreadable(rel, exc) from exc
            h.update(fs_bytes(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_dev}:{st.st_ino}\0{st.st_ctime_ns}\n"))
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
        self.skipped: list[tuple[str, str]] = []  # members are never links: nothing to skip

    def __enter__(self) -> "ZipTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def files(self) -> list[str]:
        return sorted(n for n in self._names if not _hidden(n))

    def exists(self, rel: str) -> bool:
        return posixpath.normpath(rel) in self._names

    def identity(self, rel: str) -> str:
        return posixpath.normpath(rel)

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}"

    def read(self, rel: str) -> bytes:
        try:
            return self._zip.read(self.prefix + posixpath.normpath(rel))
        except KeyError as exc:
            raise DataNotFoundError(f"image file {self.describe(rel)} is missing") from exc
        except (zipfile.BadZipFile, zlib.error, OSError) as exc:
            raise DataError(f"cannot read {self.describe(rel)} ({exc}); the archive is corrupt") from exc

    def fingerprint(self, paths: Sequence[str]) -> str:
        """The archive's md5 (it covers every member)."""
        return f"{md5sum(self.path)}:{self.prefix}"


Tree = DirectoryTree | ZipTree


def _open_image(tree: Tree, rel: str, size: tuple[int, int] | None = None, load: bool = True):
    """``rel`` as a PIL image; with ``size`` (height, width), a large JPEG is decoded at a reduced
    scale that is still at least ``size`` (memory and time bounded by the target, not the file)."""
    from PIL import Image

    data = tree.read(rel)
    if not data:
        raise DataError(f"image {tree.describe(rel)} is an empty file (0 bytes): replace or delete it")
    try:
        im = Image.open(io.BytesIO(data))
        if size is not None:
            draft_jpeg(im, size)
        if load:
            im = rgb16_keyed(im)  # read while its stream is open: a 16-bit RGB PNG's exact colour key
            im.load()
        return im
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"image {tree.describe(rel)} is too large to decode safely ({exc}); shrink it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot decode image {tree.describe(rel)} ({exc}); the file is corrupt or truncated: "
            "replace or delete it"
        ) from exc


def _pool_map(fn: Callable[[range], int], n: int, desc: str) -> None:
    """Run ``fn`` over chunks of ``range(n)`` in a thread pool, with a progress bar."""
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    chunks = [range(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    with ThreadPoolExecutor(workers) as pool, progress_bar(None, total=n, desc=desc, unit="img", leave=False) as bar:
        try:
            for done in pool.map(fn, chunks):
                bar.update(done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def infer_preprocessing(tree: Tree, paths: Sequence[str], name: str = "",
                        image_size: int | Sequence[int] | None = None) -> Preprocessing:
    """Preprocessing decided from every image's header, never from one file.

    Channels: 1 when every image is grey (grey modes, 16-bit grey, grey palettes), else 3 (grey
    images are then stored as grey RGB).  Size: ``image_size`` when given, else the most common
    ``height x width`` as shown (EXIF orientation applied; ties: the larger), so one odd-sized image never sets the size of the
    others; images of other sizes are resized to it (one warning line says how many).  No
    normalisation.  Only headers are read (no pixels are decoded).
    """
    heads: list[tuple[bool, tuple[int, int]]] = [(True, (0, 0))] * len(paths)

    def work(rows: range) -> int:
        for i in rows:
            im = _open_image(tree, paths[i], load=False)
            heads[i] = (is_grey(im), shown_size(im))
        return len(rows)

    _pool_map(work, len(paths), f"reading headers {name}")
    channels = 1 if all(grey for grey, _ in heads) else 3
    sizes = collections.Counter(size for _, size in heads)
    if image_size is not None:
        image_size = checked_image_size(image_size)
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
    else:
        size = max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1]))
        if len(sizes) > 1:
            others = len(paths) - sizes[size]
            warnings.warn(
                f"{name}: images have {len(sizes)} different sizes; all are stored at {size[0]}x{size[1]} "
                f"(height x width, the most common: {sizes[size]} of {len(paths)} images), {others} resized; "
                "pass image_size= (config: data.image_size) or preprocessing= to choose", stacklevel=3,
            )
    return Preprocessing(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)


def decode_images(tree: Tree, paths: Sequence[str], preprocessing: Preprocessing, desc: str = "") -> torch.Tensor:
    """Decode ``paths`` from ``tree`` into ``uint8 [N, C, H, W]`` with a thread pool."""
    out = torch.empty((len(paths), *preprocessing.input_shape), dtype=torch.uint8)

    def work(rows: range) -> int:
        for i in rows:
            try:
                out[i] = preprocessing.decode(_open_image(tree, paths[i], preprocessing.size))
            except InputError as exc:  # pixel values it cannot read faithfully
                raise DataError(f"cannot read image {tree.describe(paths[i])}: {exc}") from exc
        return len(rows)

    _pool_map(work, len(paths), f"decoding {desc}")
    return out


def decode_classes(
    tree: Tree,
    paths: Sequence[str],
    labels: Sequence[str],
    preprocessing: Preprocessing | None,
    name: str,
    cache_dir: str | os.PathLike | bool | None = None,
    image_size: int | Sequence[int] | None = None,
) -> Decoded:
    """Decode images ``paths`` of classes ``labels`` (names) through the decode cache.

    Classes are numbered in sorted name order; the cache key covers the tree's content
    fingerprint, the ``(path, label)`` list and the preprocessing.  ``preprocessing=None``:
    inferred from all the images (:func:`infer_preprocessing`, ``image_size`` fixing the size)
    on a cache miss, and stored with them (``Decoded.preprocessing``).  A file listed under two
    classes is refused (:class:`DataError`).
    """
    if not paths:
        raise DataError(f"{name}: no images to decode in {tree.describe('')}")
    image_size = checked_image_size(image_size)
    _refuse_files_in_two_classes(tree, paths, labels, name)
    class_names = sorted(set(labels))

    def build() -> Decoded:
        prep = preprocessing or infer_preprocessing(tree, paths, name, image_size)
        index = {c: i for i, c in enumerate(class_names)}
        return Decoded(
            decode_images(tree, paths, prep, desc=name),
            torch.tensor([index[c] for c in labels], dtype=torch.long),
            class_names,
            list(paths),
            None if preprocessing is not None else prep.to_dict(),
        )

    listing = hashlib.sha1(fs_bytes("\n".join(f"{p}\t{c}" for p, c in zip(paths, labels)))).hexdigest()
    how = preprocessing.key() if preprocessing is not None else ["inferred", image_size]
    return cached_decode(name, [tree.fingerprint(paths), listing, how], build, cache_dir)


def checked_image_size(image_size) -> int | tuple[int, int] | None:
    """``image_size`` as a Python ``int`` (square side) or ``(height, width)`` pair of ints >= 1 (numpy
    integers accepted), ``None`` left as is; anything else (a string, a bool, a float) is a :class:`ConfigError`."""
    if image_size is None:
        return None
    size = image_size_or_none(image_size)
    if size is None:
        raise ConfigError(f"image_size must be an integer side >= 1 (square images) or a (height, width) pair of "
                          f"them, got {image_size!r} (config: data.image_size: one integer side, e.g. 28)")
    return size


def stored_size(image_size) -> tuple[int, int]:
    """The ``(height, width)`` images are stored at: :func:`checked_image_size` of a given size (a side
    or a pair; :class:`ConfigError` for anything else)."""
    size = checked_image_size(image_size)
    if size is None:
        raise ConfigError("image_size must be given (an integer side or a (height, width) pair), got None")
    return size if isinstance(size, tuple) else (size, size)


def _refuse_files_in_two_classes(tree: Tree, paths: Sequence[str], labels: Sequence[str], name: str) -> None:
    owner: dict[str, tuple[str, str]] = {}
    for path, label in zip(paths, labels):
        real = tree.identity(path)
        first = owner.setdefault(real, (path, label))
        if first[1] != label:
            raise DataError(
                f"{name}: {tree.describe(path)} is listed under class {label!r} but the same file "
                f"({tree.describe(first[0])}) is also under class {first[1]!r}; an image belongs to one class: "
                "remove one of the entries"
            )


def image_suffixes(extensions: str | Sequence[str] | None) -> tuple[str, ...]:
    """``extensions`` (one ``".png"``, a list of them, or ``None`` for :func:`image_extensions`) as
    lower-case suffixes; a suffix without its leading dot (``"png"``) is a :class:`ConfigError`."""
    if extensions is None:
        return image_extensions()
    extensions = [extensions] if isinstance(extensions, str) else list(extensions)
    bad = [e for e in extensions if not isinstance(e, str) or not e.startswith(".") or len(e) < 2]
    if bad or not extensions:
        raise ConfigError(f"extensions must be file name endings with their dot, e.g. ['.png', '.jpg'], "
                          f"got {extensions!r}")
    return tuple(e.lower() for e in extensions)


def scan_class_folders(tree: Tree, extensions: Sequence[str] | None = None, name: str = "") -> tuple[list[str], list[str]]:
    """``(paths, classes)`` of the images in ``tree``: each image's class is its folder's path.

    ``extensions``: file name endings counted as images (default: every format PIL can open,
    :func:`image_extensions`).  Other files, and what the walk skipped (links leaving the folder,
    cycles), are reported in one warning line.
    """
    exts = image_suffixes(extensions)
    files = tree.files()
    paths = [p for p in files if p.lower().endswith(exts)]
    skipped = list(tree.skipped) + [(p, "not image file(s)") for p in files if not p.lower().endswith(exts)]
    if not paths:
        which = "images (files in any format PIL reads)" if extensions is None else f"images with extensions {', '.join(exts)}"
        raise DataError(
            f"no {which} under {tree.describe('')}; expected one sub-folder of images per class"
            + (f"; {skipped_summary(skipped)}" if skipped else "")
        )
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise DataError(
            f"{tree.describe(loose[0])} (and {len(loose) - 1} more) lie directly in the dataset "
            "folder; put every image in a sub-folder named after its class"
        )
    report_skipped(name or tree.describe(""), skipped)
    return paths, [printable(posixpath.dirname(p)) for p in paths]


def _init_decoded(ds: ClassDataset, decoded: Decoded, tree: Tree, name: str, preprocessing: Preprocessing | None) -> None:
    if preprocessing is None:
        preprocessing = Preprocessing.from_dict(decoded.preprocessing)
    ClassDataset.__init__(ds, decoded.images, decoded.labels, decoded.class_names, name=name,
                          preprocessing=preprocessing, sources=[tree.describe(s) for s in decoded.sources])


class ClassFolder(ClassDataset):
    """Images stored one folder per class, e.g. ``root/cat/001.png`` (ImageFolder layout).

    Folders may be nested: every folder that directly holds images is one class, named by its
    path relative to ``root`` with ``/`` separators (``cat``, or ``Greek/character01`` for an
    extracted Omniglot archive).  Hidden files and folders are skipped; other files, links
    leading outside ``root`` and links to folders already read (cycles) are skipped and reported
    in one warning line.  Every image format PIL can open is read.

    Args:
        root: the dataset folder.
        preprocessing: how files become stored tensors.  Default: decided from all the images
            (:func:`infer_preprocessing`): 1 channel if every image is grey, else 3; the most
            common size (or ``image_size``); 16-bit images scaled to 8 bits, transparency
            composited over black; no normalisation.
        name: dataset name (default: the folder's name).
        extensions: file name endings (case-insensitive) that count as images (default: all
            formats PIL reads).
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).
        image_size: store images at this size (an int for square, or ``(height, width)``)
            instead of the most common one; ignored with ``preprocessing``.
        follow_outside_links: follow symlinks whose target lies outside ``root``.

    Identical images within a class are kept once (with a warning; see :class:`ClassDataset`).

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
        extensions: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
        image_size: int | Sequence[int] | None = None,
        follow_outside_links: bool = False,
    ) -> None:
        with DirectoryTree(root, follow_outside_links=follow_outside_links) as tree:
            name = name or printable(tree.root.resolve().name)
            paths, labels = scan_class_folders(tree, extensions, f"folder-{name}")
            decoded = decode_classes(tree, paths, labels, preprocessing, f"folder-{name}", cache_dir, image_size)
            _init_decoded(self, decoded, tree, name, preprocessing)


def refuse_shared(root: Any, what: str, mine: str, other: str, shared: set, fix: str) -> None:
    """:class:`DataError` when ``shared`` (classes or images of split ``mine`` also in split ``other``) is not empty."""
    if shared:
        shared = sorted(shared)
        raise DataError(
            f"{root}: {len(shared)} {what} are in both {mine} and {other} ({', '.join(shared[:5])}"
            f"{', ...' if len(shared) > 5 else ''}); the splits' classes must be disjoint, or held-out "
            f"episodes test classes the model was trained on: {fix}"
        )


def refuse_shared_csv_splits(root: Any, split: str, splits: Sequence[str], columns: tuple[str, str],
                             read: Callable[[str], bytes | None], describe: Callable[[str], str],
                             identity: Callable[[str], str] = posixpath.normpath) -> None:
    """:class:`DataError` when a class, or an image file, of ``<split>.csv`` is also listed in another of
    ``splits``' CSV files (``read(name)``: its bytes, ``None`` when there is none; only CSVs are read).
    ``identity(filename)`` says which file a listed name is (default: the normalised name; for a folder,
    :func:`csv_file_identity`, so an absolute path or a link to a file listed elsewhere is caught too)."""
    mine = read(f"{split}.csv")
    if mine is None:
        return
    with warnings.catch_warnings():  # each file's own repeated rows are reported when it is loaded
        warnings.simplefilter("ignore")
        files, labels = read_class_csv(mine, describe(f"{split}.csv"), *columns)
        names = {identity(f): f for f in files}
        for other in splits:
            data = None if other == split else read(f"{other}.csv")
            if data is None:
                continue
            their_files, their_labels = read_class_csv(data, describe(f"{other}.csv"), *columns)
            fix = f"edit {split}.csv or {other}.csv so that each class and image is listed in one split only"
            refuse_shared(root, "class(es)", f"{split}.csv", f"{other}.csv", set(labels) & set(their_labels), fix)
            refuse_shared(root, "image file(s)", f"{split}.csv", f"{other}.csv",
                          {names[i] for i in names.keys() & set(map(identity, their_files))}, fix)


def csv_file_identity(tree: Tree) -> Callable[[str], str]:
    """Which file of ``tree`` a CSV file name is (:meth:`DirectoryTree.identity`, Windows separators read
    as the CSV is), for :func:`refuse_shared_csv_splits`."""
    return lambda filename: tree.identity(_posix_separators(tree, filename))


def read_class_csv(data: bytes, where: str, filename_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Parse ``(filenames, labels)`` from CSV bytes with a header row; ``where`` names the file.

    Rows repeating an earlier ``(filename, label)`` row are dropped with a warning; a file
    listed under two labels is refused.
    """
    filenames, labels = [], []
    rows: dict[str, tuple[int, str]] = {}
    repeated: list[int] = []
    for line, filename, label in _csv_rows(decode_text(data, where, DataError), where, filename_column, label_column):
        key = posixpath.normpath(filename)
        first = rows.setdefault(key, (line, label))
        if first[0] != line:
            if first[1] != label:
                raise DataError(
                    f"{where}, line {line}: {filename} is labelled {label!r} but line {first[0]} labels it "
                    f"{first[1]!r}; an image belongs to one class: remove one of the rows"
                )
            repeated.append(line)
            continue
        filenames.append(filename)
        labels.append(label)
    if not filenames:
        raise DataError(f"{where} lists no images")
    if repeated:
        warnings.warn(
            f"{where}: dropped {len(repeated)} row(s) repeating an earlier row (lines "
            f"{', '.join(map(str, repeated[:5]))}{', ...' if len(repeated) > 5 else ''}); a repeated image could be "
            "both support and query of an episode", DuplicateRowsWarning, stacklevel=3,
        )
    return filenames, labels


def _csv_rows(text: str, where: str, filename_column: str, label_column: str):
    """``(line, filename, label)`` of each record after the header row, ``line`` the file line the record
    starts on (blank lines and quoted fields spanning lines counted); a column missing, or named twice in
    the header, is refused (:class:`DataError`)."""
    records = _csv_records(text, where)
    header_row, header_end = next(records, ([], 0))
    header = [h.strip() for h in header_row]
    for column in (filename_column, label_column):
        if column not in header:
            raise DataError(
                f"{where} has no column {column!r} (its header is {','.join(header) or 'empty'}); "
                "pass filename_column=/label_column= to name the right columns"
            )
        if header.count(column) > 1:
            raise DataError(f"{where} names column {column!r} {header.count(column)} times in its header "
                            f"({','.join(header)}); rename or remove the extra ones so it is clear which one is read")
    at = (header.index(filename_column), header.index(label_column))
    start = header_end + 1
    for row, end in records:
        line, start = start, end + 1
        if not row:  # a blank line
            continue
        filename, label = ((row[i] if i < len(row) else "").strip() for i in at)
        if not filename or not label:
            raise DataError(f"{where}, line {line}: empty {filename_column!r} or {label_column!r}")
        if "\x00" in filename or "\x00" in label:  # no file name or class holds one (the OS refuses it)
            raise DataError(f"{where}, line {line}: a NUL character in {filename_column!r} or {label_column!r} "
                            f"({(filename + ',' + label)!r}); the file is damaged or not a text CSV: fix that line")
        yield line, filename, label


def _csv_records(text: str, where: str):
    """``(row, line)`` of each CSV record of ``text``, ``line`` the file line it ends on; lines may end
    in ``\n``, ``\r\n`` or a lone ``\r`` (classic Mac, Excel's "CSV (Macintosh)").  What the csv
    module refuses (e.g. a field over its size limit) is a :class:`DataError` naming file and line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            yield row, reader.line_num
    except csv.Error as exc:
        raise DataError(f"{where}, line {reader.line_num}: {exc}; fix that line of the CSV file") from exc


def _posix_separators(tree: Tree, path: str) -> str:
    """``path`` with Windows separators (``train\\cat\\1.jpg``, from a CSV written on Windows) read as
    ``/`` when no file has the name as written (``\\`` is an ordinary character in POSIX file names)."""
    if "\\" not in path or tree.exists(path):
        return path
    return path.replace("\\", "/")


class DuplicateRowsWarning(UserWarning):
    """A CSV file listed the same image more than once; the repeats were dropped."""


class CSVClassDataset(ClassDataset):
    """Images listed in a CSV file of ``filename,label`` rows (with a header), e.g. mini-ImageNet.

    Args:
        csv_path: the CSV file (UTF-8; UTF-16/32 with a byte-order mark are read too).
        image_root: folder the file names are relative to; names leading outside it (``..``,
            absolute paths, links) are refused unless ``follow_outside_links=True``.
        preprocessing: how files become stored tensors (default: as :class:`ClassFolder`).
        filename_column, label_column: header names of the two columns used.
        name: dataset name (default: the CSV file's stem).
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).
        image_size: as for :class:`ClassFolder`.

    Classes are numbered in sorted label order; images keep their CSV order within a class.
    Repeated rows are dropped with a warning, identical images within a class are kept once.

    Raises:
        DataNotFoundError: the CSV or a listed image does not exist.
        DataError: the CSV is not UTF-8, a column is missing, a row is empty, a file is listed
            under two labels, or an image cannot be decoded (the message names the file).
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
        image_size: int | Sequence[int] | None = None,
        follow_outside_links: bool = False,
    ) -> None:
        csv_path = Path(csv_path)
        if not os_probe(csv_path, Path.is_file):
            raise DataNotFoundError(f"CSV file {csv_path} does not exist")
        with DirectoryTree(image_root, follow_outside_links=follow_outside_links) as tree:
            self._load(tree, os_probe(csv_path, Path.read_bytes), str(csv_path), "", preprocessing,
                       filename_column, label_column, name or csv_path.stem, cache_dir, image_size)

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
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        """Decode the images listed in ``csv_data`` from ``image_dir`` of ``tree`` into ``self``."""
        filenames, labels = read_class_csv(csv_data, csv_where, filename_column, label_column)
        paths = [_posix_separators(tree, posixpath.join(image_dir, f)) for f in filenames]
        missing = [p for p in paths if not tree.exists(p)]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} image(s) listed in {csv_where} are missing, e.g. "
                f"{tree.describe(missing[0])}"
            )
        decoded = decode_classes(tree, paths, labels, preprocessing, f"csv-{name}", cache_dir, image_size)
        _init_decoded(self, decoded, tree, name, preprocessing)
