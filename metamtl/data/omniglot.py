"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015): 1,623 handwritten characters, 20 drawers each."""
from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError, DataNotFoundError, unknown_name
from .base import ClassDataset, Preprocessing, check_split_seed, split_names
from .cache import Decoded
from .download import check_integrity, download_url
from .folder import DirectoryTree, Tree, ZipTree, decode_classes, resolve_root, scan_class_folders, stored_size

_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
BACKGROUND, EVALUATION = "images_background", "images_evaluation"


class Omniglot(ClassDataset):
    """Omniglot characters as classes, decoded once into ``uint8 [N, 1, S, S]``.

    Args:
        root: folder holding the data (default: ``$METAMTL_DATA``).  Sources are looked for in
            ``root``, ``root/omniglot`` and ``root/omniglot-py`` (torchvision's layout), each as
            the official zip (``images_background.zip``, read in place) or its extracted folder
            (``images_background/<Alphabet>/<characterNN>/<NNNN_NN>.png``); a zip in any of these
            folders is preferred to an extracted folder in any of them.  Zips of known sources are md5-checked.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        sources: names of the official archives to use (see :attr:`MD5`), default: all found.
        image_size: side of the stored square images (Lanczos resampling; strokes bright on black), or
            a ``(height, width)`` pair.
        rotations: an angle or angles in {0, 90, 180, 270}; each makes one copy of every character as its own
            class, ``Alphabet/characterNN@90`` (counter-clockwise; angle 0 keeps the plain name).
        split_fractions: ``(train, val, test)`` fractions of characters, see below.
        split_seed: seed of the character split (an integer; an integral float such as ``1.0`` is
            that integer).
        split_by: ``"character"`` (default: every split has characters of every alphabet) or
            ``"alphabet"`` (whole alphabets are held out, as in the official background /
            evaluation protocol: the names cut by ``split_fractions`` are alphabets, so test
            alphabets keep all their characters and within-alphabet 20-way episodes can be
            drawn from them).
        download: fetch missing official zips from :attr:`URLS` into ``root`` (md5-checked), and
            fetch again a known zip whose md5 is wrong (corrupt or incompletely downloaded).
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).

    Classes are characters ``Alphabet/characterNN``.  A character present in several sources
    (Greek and Latin are in both ``images_background_small1`` and ``..._small2``) is one class
    with all its drawers' images; an image several sources hold identically (the two small sets
    share Greek and Latin byte for byte) is kept once.

    Split: when both full official sets (``images_background`` and ``images_evaluation``) are
    among the sources, the test split is every evaluation character, and the background
    characters are split into train/val with ``split_names`` in proportions
    ``split_fractions[0] : split_fractions[1]``.  Otherwise all characters are split with
    ``split_names(characters, split_fractions, split_seed)``.  Either way the split depends only
    on character names and the seed, and rotations are applied afterwards, so every rotated copy
    of a character is in that character's split.

    Raises:
        DataNotFoundError: no root, or the requested sources are not found (and ``download`` is
            off).
        IntegrityError: a known zip's md5 differs from the published one.
        ConfigError: unknown split, source or rotation, ``split_fractions`` not three numbers, or a
            ``split_seed`` that is not an integer.
        DataError: split_fractions that are not finite, >= 0 and summing to 1 (from
            ``split_names``, once the characters are read).
    """

    #: md5 of the official archives (https://github.com/brendenlake/omniglot, folder ``python``).
    MD5 = {
        BACKGROUND: "68d2efa1b9178cc56df9314c21c6e718",
        EVALUATION: "6b91aef0f799c5bb55b94e3f2daec811",
        "images_background_small1": "e704a628b5459e08445c13499850abc4",
        "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
    }
    #: Where ``download=True`` fetches each archive.
    URLS = {name: f"{_URL}/{name}.zip" for name in MD5}
    SPLITS = ("train", "val", "test", "all")
    ROTATIONS = (0, 90, 180, 270)
    SPLIT_BY = ("character", "alphabet")

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        sources: Sequence[str] | None = None,
        image_size: int | tuple[int, int] = 28,
        rotations: int | Sequence[int] = (0,),
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
        split_by: str = "character",
        download: bool = False,
        cache_dir: str | os.PathLike | bool | None = None,
    ) -> None:
        if split not in self.SPLITS:
            raise unknown_name("Omniglot split", split, self.SPLITS)
        if sources is not None and not sources:
            raise ConfigError(f"sources must name at least one Omniglot archive ({', '.join(self.MD5)}), or be None")
        for s in sources or ():
            if s not in self.MD5:
                raise unknown_name("Omniglot source", s, self.MD5)
        rotations = _angles(rotations, self.ROTATIONS)
        if not rotations or len(set(rotations)) != len(rotations) or not set(rotations) <= set(self.ROTATIONS):
            raise ConfigError(f"rotations must be distinct angles among {self.ROTATIONS}, got {rotations}")
        if split_by not in self.SPLIT_BY:
            raise unknown_name("Omniglot split_by", split_by, self.SPLIT_BY)
        if isinstance(split_fractions, (str, bytes)) or not hasattr(split_fractions, "__len__") \
                or len(split_fractions) != 3:
            raise ConfigError(f"split_fractions must be (train, val, test) fractions of the characters, e.g. "
                              f"(0.6, 0.2, 0.2), got {split_fractions!r}")
        split_seed = check_split_seed(split_seed)
        root = resolve_root(root, "Omniglot")
        self.split = split
        self.rotations = rotations
        preprocessing = Preprocessing(size=stored_size(image_size), channels=1, invert=True, resample="lanczos")
        found = self._find_sources(root, sources, download)
        decoded = {name: self._decode(name, path, preprocessing, cache_dir) for name, path in found.items()}
        images, labels, class_names, files = _merge(list(decoded.values()))
        chars = self._split_characters(decoded, split, split_fractions, split_seed, split_by)
        full = ClassDataset(images, labels, class_names, preprocessing=preprocessing, sources=files)
        part = full.subset(chars)
        n = part.num_classes
        super().__init__(
            torch.cat([torch.rot90(part.images, r // 90, dims=(-2, -1)) for r in rotations]),
            torch.cat([part.labels + i * n for i in range(len(rotations))]),
            [c if r == 0 else f"{c}@{r}" for r in rotations for c in part.class_names],
            name="omniglot",
            preprocessing=preprocessing,
            sources=part.sources * len(rotations),
            deduplicate=False,  # rotated copies of a checked subset stay distinct within each class
        )

    # -- locating and decoding -------------------------------------------------------------
    @staticmethod
    def _folders(root: Path) -> list[Path]:
        return [root, root / "omniglot", root / "omniglot-py"]

    @classmethod
    def available_sources(cls, root: str | os.PathLike | None = None) -> dict[str, Path]:
        """The official archives present under ``root`` (zip or extracted folder), by name.

        A zip (md5-checked when read) in any of the folders looked in is preferred to an extracted
        folder in any of them, which may be partial (an interrupted extraction).
        ``{"images_background", "images_evaluation"} <= available_sources(root).keys()`` means the
        full official protocol (background for training, evaluation for testing) can run.
        """
        root = resolve_root(root, "Omniglot")
        found: dict[str, Path] = {}
        folders = cls._folders(root)
        for name in cls.MD5:
            candidates = [f / f"{name}.zip" for f in folders] + [f / name for f in folders]
            present = [c for c in candidates if c.exists()]
            if present:
                found[name] = present[0]
        return found

    @classmethod
    def _find_sources(cls, root: Path, sources: Sequence[str] | None, download: bool) -> dict[str, Path]:
        """Map each source to its zip or extracted folder, downloading missing ones if asked."""
        folders = cls._folders(root)
        found = cls.available_sources(root)
        if sources is None:
            wanted = list(found) or [BACKGROUND, EVALUATION]
        else:
            wanted = list(dict.fromkeys(sources))
        missing = [name for name in wanted if name not in found]
        if missing and not download:
            raise DataNotFoundError(
                f"Omniglot source(s) {', '.join(missing)} not found: looked for <source>.zip and "
                f"the extracted folder <source>/ in {', '.join(map(str, folders))}; pass "
                "download=True to fetch the official archives, or point root= at the folder "
                "holding them"
            )
        for name in missing:
            found[name] = download_url(cls.URLS[name], root, f"{name}.zip", md5=cls.MD5[name])
        if download:  # a corrupt or incomplete official zip (an interrupted download) is fetched again
            for name in wanted:
                path = found[name]
                if path.is_file() and not check_integrity(path, cls.MD5[name]):
                    found[name] = download_url(cls.URLS[name], path.parent, path.name, md5=cls.MD5[name])
        return {name: found[name] for name in wanted}

    @classmethod
    def _decode(cls, name: str, path: Path, preprocessing: Preprocessing, cache_dir) -> Decoded:
        """Decode one source (zip or folder); class names are ``Alphabet/characterNN``."""
        tree: Tree = ZipTree(path, f"{name}/", md5=cls.MD5[name]) if path.is_file() else DirectoryTree(path)
        with tree:
            paths, classes = scan_class_folders(tree, (".png",))
            odd = next((p for p, c in zip(paths, classes) if c.count("/") != 1), None)
            if odd is not None:
                raise DataError(
                    f"unexpected Omniglot layout: {tree.describe(odd)}; expected "
                    f"{name}/<Alphabet>/<characterNN>/<NNNN_NN>.png"
                )
            decoded = decode_classes(tree, paths, classes, preprocessing, f"omniglot-{name}", cache_dir)
            return Decoded(decoded.images, decoded.labels, decoded.class_names,
                           [tree.describe(s) for s in decoded.sources])

    @staticmethod
    def _split_characters(
        decoded: dict[str, Decoded], split: str, fractions: Sequence[float], seed: int,
        split_by: str = "character",
    ) -> list[str]:
        everything = sorted({c for d in decoded.values() for c in d.class_names})
        if split == "all":
            return everything
        unit = (lambda c: c.split("/")[0]) if split_by == "alphabet" else (lambda c: c)

        def cut(chars: list[str], fracs: Sequence[float]) -> tuple[list[str], ...]:
            groups = split_names(sorted({unit(c) for c in chars}), fracs, seed)
            return tuple(sorted(c for c in chars if unit(c) in set(g)) for g in groups)

        if BACKGROUND in decoded and EVALUATION in decoded:
            test = set(decoded[EVALUATION].class_names)
            background = [c for c in everything if c not in test]
            train_val = float(fractions[0]) + float(fractions[1])
            if train_val <= 0:
                raise ConfigError(f"split_fractions {list(fractions)} leave no train/val characters")
            train, val = cut(background, (fractions[0] / train_val, fractions[1] / train_val))
            return {"train": train, "val": val, "test": sorted(test)}[split]
        train, val, test = cut(everything, fractions)
        return {"train": train, "val": val, "test": test}[split]


def _angles(rotations: Any, allowed: Sequence[int]) -> tuple[int, ...]:
    """``rotations`` (one angle or a sequence of them) as a tuple of ints, a value that is not a whole
    number of degrees (``90.5``, ``True``, ``"90"``) refused (:class:`ConfigError`) rather than
    truncated to a neighbouring angle."""
    if isinstance(rotations, numbers.Real):  # one angle (a bool is refused below)
        rotations = (rotations,)
    if isinstance(rotations, (str, bytes)) or not isinstance(rotations, Iterable):
        raise ConfigError(f"rotations must be an angle or a sequence of angles among {tuple(allowed)} "
                          f"(e.g. 90 or (0, 90, 180, 270)), got {rotations!r}")
    out = []
    for r in rotations:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not float(r).is_integer():
            raise ConfigError(f"rotations must be whole multiples of 90 degrees among {tuple(allowed)}, got {r!r}")
        out.append(int(r))
    return tuple(out)


def _merge(parts: Sequence[Decoded]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Concatenate decoded sources, merging classes with the same name.

    An image that several archives hold under the same ``Alphabet/characterNN/file.png`` with the
    same pixels is kept once: the two small background sets share Greek and Latin byte for byte,
    and the full background set contains both small sets.
    """
    names = sorted({c for d in parts for c in d.class_names})
    index = {c: i for i, c in enumerate(names)}
    images, labels, sources = [], [], []
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for d in parts:
        keep = []
        merged = torch.tensor([index[c] for c in d.class_names], dtype=torch.long)[d.labels]
        for i, (label, source) in enumerate(zip(merged.tolist(), d.sources)):
            image = d.images[i]
            first = seen.setdefault((label, source.rsplit("/", 1)[-1]), image)
            if first is image or not torch.equal(first, image):
                keep.append(i)
        rows = torch.tensor(keep, dtype=torch.long)
        images.append(d.images[rows])
        labels.append(merged[rows])
        sources += [d.sources[i] for i in keep]
    return torch.cat(images), torch.cat(labels), names, sources
