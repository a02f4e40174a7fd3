"""Datasets by name, for configs and the command line.

``load_dataset("omniglot", "train", root, image_size=28)`` builds a class-indexed dataset.  Task
families that are not made of classes (the sinusoid) are in :mod:`metamtl.tasks.families`.
"""
from __future__ import annotations

import inspect
import os
import posixpath
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError, DataError, DataNotFoundError, unknown_name, unknown_settings
from .base import ClassDataset, join_classes, split_names
from .folder import (ClassFolder, CSVClassDataset, DirectoryTree, csv_file_identity, image_suffixes, os_probe,
                     printable, refuse_shared, refuse_shared_csv_splits, resolve_root)
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot

#: split folder names of a folder dataset already split on disk (``root/train/<class>/...``)
SPLIT_FOLDERS = ("train", "val", "test")
#: other spellings of split folders, refused at the top of a folder dataset (to be renamed to SPLIT_FOLDERS)
SPLIT_ALIASES = ("training", "validation", "valid", "dev", "testing")

DATASETS = {"omniglot": Omniglot, "miniimagenet": MiniImageNet, "folder": ClassFolder, "csv": CSVClassDataset}


def _split_classes(ds: ClassDataset, split: str, fractions: Sequence[float] | None, seed: int | None) -> ClassDataset:
    """``split`` of ``ds``'s classes by :func:`~metamtl.data.split_names` (``"all"``: every class;
    ``None``: the default fractions 0.6/0.2/0.2 and seed 0)."""
    if split == "all":
        return ds
    fractions = (0.6, 0.2, 0.2) if fractions is None else fractions
    parts = dict(zip(("train", "val", "test"), split_names(ds.class_names, fractions, 0 if seed is None else seed)))
    if split not in parts:
        raise unknown_name("split", split, [*parts, "all"])
    return ds.subset(parts[split], name=ds.name)


def _load_folder(split: str, root: Path, split_fractions: Sequence[float] | None = None,
                 split_seed: int | None = None, **kwargs) -> ClassDataset:
    """``root/<split>/`` (any case: ``Train/``) if that folder exists, else ``split`` of ``root``'s classes (a
    root with other split folders but not this one is refused: its classes would be drawn from those splits)."""
    folders = split_folders(root, image_suffixes(kwargs.get("extensions")))
    if split in folders:
        _refuse_split_options(f"{root} is split on disk ({folders[split].name}/ holds the {split!r} classes)",
                              split_fractions, split_seed)
        train = folders.get("train")
        kwargs = _stored_like_train(split, kwargs, train is not None, lambda kw: ClassFolder(train, **kw))
        ds = ClassFolder(folders[split], **kwargs)
        _refuse_shared_classes(folders, split, ds.class_names, kwargs)
        return ds
    if folders and split != "all":
        raise DataNotFoundError(
            f"{root} has split folders ({', '.join(p.name for p in folders.values())}) but no {split!r} folder; "
            f"splitting its classes instead would draw {split!r} classes from "
            f"{', '.join(f'{p.name}/' for p in folders.values())} (the same images in two splits): add "
            f"{root / split}, or leave this split out (config: data.val_split / data.test_split: null)"
        )
    return _split_classes(ClassFolder(root, **kwargs), split, split_fractions, split_seed)


def split_folders(root: Path, exts: tuple[str, ...] | None = None) -> dict[str, Path]:
    """``root``'s split folders by split name (:data:`SPLIT_FOLDERS`), names matched in any case (``Train/``,
    Windows and Kaggle exports) for folders of class folders.  Top-level folders of class folders spelled
    like other split names (:data:`SPLIT_ALIASES`) are refused (:class:`DataError`): read as classes and
    split anew, they would put held-out classes into training.  A folder holding images itself is a
    class, whatever its name (a class ``Train`` or ``dev`` of a flat dataset).  ``exts``: the file name
    endings of the dataset's images (default: :func:`image_extensions`); other files never make a folder a class."""
    folders = os_probe(root, lambda r: sorted(p for p in r.iterdir() if p.is_dir()) if r.is_dir() else [])
    folders = [p for p in folders if _holds_classes(p, p.name in SPLIT_FOLDERS, exts)]  # `Train/`, `test/` of images: a class
    found: dict[str, list[Path]] = {}
    for p in folders:
        if p.name.lower() in SPLIT_FOLDERS:
            found.setdefault(p.name.lower(), []).append(p)
    twice = [f"{', '.join(f'{p.name}/' for p in ps)}" for ps in found.values() if len(ps) > 1]
    if twice:
        raise DataError(f"{root} has two folders for one split ({'; '.join(twice)}): merge them into one")
    aliases = [p.name for p in folders if p.name.lower() in SPLIT_ALIASES]
    if aliases:
        raise DataError(
            f"{root} has folder(s) {', '.join(f'{a}/' for a in aliases)} named like split folders: rename them to "
            "train/, val/, test/ so the split on disk is used (read as classes and split anew, they would put "
            "held-out classes into training)"
        )
    return {s: found[s][0] for s in SPLIT_FOLDERS if s in found}


def split_on_disk(name: str, root: str | os.PathLike) -> bool:
    """Whether dataset ``name`` (``folder`` or ``csv``) at ``root`` keeps its split on disk (split
    folders, ``<split>.csv`` files), which ``split_fractions``/``split_seed`` cannot change."""
    root = Path(root)
    if name == "folder":
        return bool(split_folders(root))
    return name == "csv" and any(os_probe(root / f"{s}.csv", Path.is_file) for s in SPLIT_FOLDERS)


def _holds_classes(folder: Path, split_name: bool = False, exts: tuple[str, ...] | None = None) -> bool:
    """Whether ``folder`` looks like a split folder: sub-folders (its classes; not needed for a ``split_name``,
    ``train``/``val``/``test`` spelled exactly) and no image file of its own (a class folder, e.g. a class named
    ``Train``, ``test`` or ``dev``, holds its images directly); other files (``desktop.ini``, ``Thumbs.db``, a
    README, an image file of a kind outside ``exts``, the dataset's image endings) are not its images and do not
    make it a class."""
    exts = exts or image_suffixes(None)

    def look(f: Path) -> bool:
        entries = [e for e in f.iterdir() if not e.name.startswith(".")]
        images = any(e.name.lower().endswith(exts) and e.is_file() for e in entries)
        return (split_name or any(e.is_dir() for e in entries)) and not images
    return os_probe(folder, look)


def _refuse_split_options(why: str, split_fractions: Sequence[float] | None, split_seed: int | None) -> None:
    """:class:`ConfigError` when split options are given for data whose split is fixed (split folders,
    ``<split>.csv`` files): they would change nothing, and the user believes they chose the split."""
    given = [n for n, v in (("split_fractions", split_fractions), ("split_seed", split_seed)) if v is not None]
    if given:
        raise ConfigError(
            f"{' and '.join(given)} only split data whose classes are not split yet, but {why}: they would be "
            f"ignored; remove {' and '.join(f'data.{n}' for n in given)}, or give one folder (or csv_path) of "
            "all classes to split")


def _refuse_shared_classes(folders: dict[str, Path], split: str, classes: Sequence[str], kwargs: dict) -> None:
    """:class:`DataError` naming the classes of split folder ``folders[split]`` that another split folder also
    holds (held-out classes must be new to the model); only file names are read, no image is decoded."""
    exts = image_suffixes(kwargs.get("extensions"))
    for other, folder in folders.items():
        if other == split:
            continue
        tree = DirectoryTree(folder, follow_outside_links=bool(kwargs.get("follow_outside_links")))
        theirs = {printable(posixpath.dirname(p)) for p in tree.files() if p.lower().endswith(exts)}
        refuse_shared(folder.parent, "class(es)", f"{folders[split].name}/", f"{folder.name}/",
                      set(classes) & theirs, "move or rename those class folders")


def _refuse_shared_csv_classes(root: Path, image_root: Path, split: str, kwargs: dict) -> None:
    """As :func:`_refuse_shared_classes`, for ``root/<split>.csv`` and the other ``<split>.csv`` files: a
    class, or an image file (the same file however its name is spelled), listed in two of them is refused;
    only the CSV files are read (the files they list are only stat'ed)."""
    columns = (kwargs.get("filename_column", "filename"), kwargs.get("label_column", "label"))
    with DirectoryTree(image_root, follow_outside_links=bool(kwargs.get("follow_outside_links"))) as tree:
        refuse_shared_csv_splits(root, split, SPLIT_FOLDERS, columns,
                                 lambda name: os_probe(root / name, lambda p: p.read_bytes() if p.is_file() else None),
                                 lambda name: str(root / name), csv_file_identity(tree))


def _load_csv(split: str, root: Path, csv_path: str | os.PathLike | None = None,
              image_root: str | os.PathLike | None = None, split_fractions: Sequence[float] | None = None,
              split_seed: int | None = None, **kwargs) -> ClassDataset:
    """``root/<split>.csv`` with images under ``image_root`` (default ``root/images`` if it exists, else
    ``root``; ``"all"`` without an ``all.csv``: every ``<split>.csv``'s classes); or, given one ``csv_path`` for every split, ``split`` of its classes (as a folder without
    split folders is split: ``split_fractions``/``split_seed``; ``"all"``: every class)."""
    if image_root is None:
        image_root = root / "images" if os_probe(root / "images", Path.is_dir) else root
    if csv_path is not None:
        return _split_classes(CSVClassDataset(csv_path, image_root, **kwargs), split, split_fractions, split_seed)
    if split == "all" and not os_probe(root / "all.csv", Path.is_file):
        present = [s for s in SPLIT_FOLDERS if os_probe(root / f"{s}.csv", Path.is_file)]
        if present:  # every split's classes (disjoint, each stored like train), as a folder split on disk
            return join_classes([_load_csv(s, root, None, image_root, split_fractions, split_seed, **kwargs)
                                 for s in present], name="csv")
    _refuse_split_options(f"{root} is split on disk ({split}.csv lists the {split!r} classes)", split_fractions,
                          split_seed)
    kwargs = _stored_like_train(split, kwargs, os_probe(root / "train.csv", Path.is_file),
                                lambda kw: CSVClassDataset(root / "train.csv", image_root, **kw))
    ds = CSVClassDataset(root / f"{split}.csv", image_root, **kwargs)
    _refuse_shared_csv_classes(root, Path(image_root), split, kwargs)
    return ds


def _stored_like_train(split: str, kwargs: dict, has_train: bool, load_train: Callable[[dict], ClassDataset]) -> dict:
    """The options of a held-out split stored on its own (``root/val/``, ``val.csv``): unless
    ``preprocessing`` is given, its images are stored as the training split's are (channels and size
    decided from the *training* images), so a model trained on one split reads the others: grey 24x24
    test images beside RGB 32x32 training images become RGB 32x32, as ``predict`` reads them."""
    if split == "train" or not has_train or kwargs.get("preprocessing") is not None:
        return kwargs
    with warnings.catch_warnings():  # the training split's own warnings were shown when it was loaded
        warnings.simplefilter("ignore")
        return {**kwargs, "preprocessing": load_train(kwargs).preprocessing}


_ADAPTERS: dict[str, Callable[..., ClassDataset]] = {"folder": _load_folder, "csv": _load_csv}
#: datasets read from the user's own files: their root is the data (a built-in dataset's root only
#: says where its files are stored)
USER_DATASETS = tuple(_ADAPTERS)


def accepted_options(*functions: Callable) -> list[str]:
    """The keyword options ``functions`` (constructors) take, besides ``self``, ``split`` and ``root``."""
    names = []
    for fn in functions:
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "split", "root"):
                names.append(p.name)
    return sorted(set(names))


def check_options(kind: str, name: str, kwargs: dict, accepted: list[str]) -> None:
    """:class:`ConfigError` naming every key of ``kwargs`` not in ``accepted`` (and the accepted ones)."""
    error = unknown_settings(f"{kind} {name!r}", kwargs, accepted)
    if error is not None:
        raise error


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **kwargs) -> ClassDataset:
    """Build dataset ``name`` (a key of :data:`DATASETS`) for ``split``.

    ``root`` defaults to ``$METAMTL_DATA``.  ``kwargs`` go to the dataset's constructor; for
    ``"folder"`` and ``"csv"``, whose constructors have no split, ``split`` picks ``root/<split>/``
    (or ``root/<split>.csv``), and a folder without split sub-folders, or the one CSV file given as
    ``csv_path=``, is split by class with ``split_fractions``/``split_seed`` (``split="all"``: every class).

    ``split="train+val"`` (any splits joined by ``+``) loads each split and joins their classes
    (:func:`~metamtl.data.base.join_classes`): the usual last step after choosing settings on
    validation classes is to retrain on train and validation classes together.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if not isinstance(split, str):
        raise ConfigError(f"split must be a split name such as 'train', 'val' or 'test' (or several joined with "
                          f"'+', e.g. 'train+val'), got {split!r}")
    parts = split.split("+")
    if len(parts) > 1:
        if any(not p.strip() for p in parts) or len(set(parts)) != len(parts):
            raise ConfigError(f"split {split!r}: join distinct split names with '+', e.g. 'train+val'")
        return join_classes([load_dataset(name, p.strip(), root, **kwargs) for p in parts], name=name)
    adapter = _ADAPTERS.get(name)
    accepted = accepted_options(adapter, DATASETS[name]) if adapter else accepted_options(DATASETS[name])
    check_options("dataset", name, kwargs, accepted)
    if adapter is None:
        return _refuse_empty(DATASETS[name](root=root, split=split, **kwargs), name, split, kwargs)
    return _refuse_empty(adapter(split, resolve_root(root, f"dataset {name!r}"), **kwargs), name, split, kwargs)


def _refuse_empty(ds: ClassDataset, name: str, split: str, kwargs: dict) -> ClassDataset:
    """``ds``, or a :class:`DataError` when split fractions left split ``split`` without classes (e.g.
    3 classes cut 0.6/0.2/0.2 give train 2, val 0, test 1): no episode could be drawn from it."""
    if ds.num_classes > 0:
        return ds
    fractions = list(kwargs.get("split_fractions") or (0.6, 0.2, 0.2))
    raise DataError(
        f"split {split!r} of dataset {name!r} holds no classes: split_fractions {fractions} (train, val, test) "
        f"of its classes give it none; give the split classes (more class folders or characters, or a larger "
        "fraction in data.split_fractions) or leave it out (config: data.val_split / data.test_split: null)"
    )
