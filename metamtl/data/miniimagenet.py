"""mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle split: 100 classes, 84x84 RGB."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataNotFoundError, unknown_name
from .base import Preprocessing
from .folder import (CSVClassDataset, DirectoryTree, Tree, ZipTree, refuse_shared_csv_splits, resolve_root,
                     stored_size)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MiniImageNet(CSVClassDataset):
    """mini-ImageNet in the Ravi & Larochelle layout: ``images/`` plus ``{train,val,test}.csv``.

    Args:
        root: folder holding the data (default: ``$METAMTL_DATA``).  Looked for in ``root`` and
            ``root/mini-imagenet``, either as a folder with ``images/`` and ``<split>.csv``
            (``filename,label`` rows, file names relative to ``images/``) or as the archive
            :attr:`ZIP` (``mini-imagenet/images/...`` + ``mini-imagenet/<split>.csv``, read in
            place and md5-checked).  The CSV lists what exists, so the full 600-images-per-class
            release and smaller subsets load with the same code.
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        image_size: side of the stored square RGB images (84 keeps the originals), or a
            ``(height, width)`` pair.
        download: mini-ImageNet has no official download URL; ``True`` only changes the error
            raised when the files are missing.
        cache_dir: decode-cache folder (``None``: default, ``False``: memory only).

    Images are normalised with the ImageNet mean/std.  Classes are the WordNet ids, in sorted
    order.

    Raises:
        DataNotFoundError: no root, or the split's CSV/images are not present (the message lists
            what was looked for), or a listed image is missing.
        IntegrityError: :attr:`ZIP`'s md5 differs from the known one.
        DataError: a CSV column is missing, or an image cannot be decoded (named in the message).
    """

    ZIP = "mini-imagenet-train-val.zip"
    MD5 = {ZIP: "d78d692e1b9ae10807ac515c6ae6c653"}
    SPLITS = ("train", "val", "test")

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int | tuple[int, int] = 84,
        download: bool = False,
        cache_dir: str | os.PathLike | bool | None = None,
    ) -> None:
        if split not in self.SPLITS:
            raise unknown_name("mini-ImageNet split", split, self.SPLITS)
        self.split = split
        preprocessing = Preprocessing(size=stored_size(image_size), channels=3,
                                      mean=IMAGENET_MEAN, std=IMAGENET_STD)
        with self._find(resolve_root(root, "mini-ImageNet"), split, download) as tree:
            csv_name = f"{split}.csv"
            self._load(tree, tree.read(csv_name), tree.describe(csv_name), "images", preprocessing,
                       "filename", "label", "miniimagenet", cache_dir)
            refuse_shared_csv_splits(tree.describe(""), split, self.SPLITS, ("filename", "label"),
                                     lambda name: tree.read(name) if tree.exists(name) else None, tree.describe)

    @classmethod
    def has_split(cls, root: str | os.PathLike | None, split: str) -> bool:
        """Whether ``split``'s CSV (and images) are present under ``root`` (nothing is decoded)."""
        try:
            cls.source(root, split).close()
        except DataNotFoundError:
            return False
        return True

    @classmethod
    def source(cls, root: str | os.PathLike | None, split: str) -> Tree:
        """The folder or archive under ``root`` (else ``$METAMTL_DATA``) that holds ``split``: a tree
        whose ``read("<split>.csv")`` and ``read("images/<filename>")`` give the raw bytes (close it,
        or use it in a ``with`` block).  :class:`DataNotFoundError` when it is not there."""
        return cls._find(resolve_root(root, "mini-ImageNet"), split, False)

    @classmethod
    def _find(cls, root: Path, split: str, download: bool) -> Tree:
        """The first folder or archive under ``root`` that has ``<split>.csv``."""
        looked = []
        for folder in (root, root / "mini-imagenet"):
            if (folder / f"{split}.csv").is_file() and (folder / "images").is_dir():
                return DirectoryTree(folder)
            looked.append(f"{folder}/{split}.csv with {folder}/images/")
            if (folder / cls.ZIP).is_file():
                tree = ZipTree(folder / cls.ZIP, "mini-imagenet/", md5=cls.MD5[cls.ZIP])
                if tree.exists(f"{split}.csv"):
                    return tree
                tree.close()
                looked.append(f"{tree.describe(f'{split}.csv')} (the archive has no {split} split)")
        why = (
            "it cannot be downloaded automatically (there is no official URL)" if download
            else f"the {split} images and CSV are not present"
        )
        raise DataNotFoundError(
            f"mini-ImageNet split {split!r} not found: {why}. Looked for: {'; '.join(looked)}. "
            f"Put images/ and {split}.csv (Ravi & Larochelle split, filename,label rows) in "
            f"{root / 'mini-imagenet'}, or the archive {cls.ZIP} there"
        )
