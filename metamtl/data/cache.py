"""Decode cache: decode each image source once, then reuse the uint8 tensors.

Decoding thousands of PNG/JPEG files takes seconds to minutes; the result (``uint8`` images,
labels, class names and per-image source paths) is small enough to keep.  :func:`cached_decode`
looks a decoded source up, in order, in

1. an in-process memo (least recently used entries dropped beyond :data:`MEMO_MAX_BYTES`), so the
   train/val/test splits of one dataset share a single decode;
2. an ``.npz`` file in the cache folder (``cache_dir`` argument, else ``$METAMTL_CACHE``, else
   ``~/.cache/metamtl``; ``cache_dir=False`` disables the disk cache), so later processes skip the
   decode entirely.

The cache key is a hash of what determines the result: the source's content fingerprint (an
archive's md5, or a folder listing's relative paths, sizes, mtimes, inodes and change times), the exact list of files
and labels, ``Preprocessing.key()`` and :data:`CACHE_FORMAT`.  Files are written atomically
(:func:`metamtl.files.atomic_write`: temporary file, fsync, rename) and loaded with ``allow_pickle=False``; an unreadable or
inconsistent cache file is ignored with a warning and rebuilt.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..files import atomic_write

#: Bump when decoding changes in a way that invalidates existing cache files.
#: 2: alpha composited, 16-bit images scaled, inferred preprocessing stored with the images.
#: 3: images turned as their EXIF orientation says they are shown.
#: 4: the colour key of 16-bit grey images composited.
#: 5: the colour key of 16-bit RGB PNGs composited.
CACHE_FORMAT = 5
#: Upper bound on the bytes of decoded images kept by the in-process memo.
MEMO_MAX_BYTES = 2 << 30

#: characters of a source's name kept at the start of its cache file name
_NAME_CHARS = 120

_MEMO: "collections.OrderedDict[str, Decoded]" = collections.OrderedDict()


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One decoded source.

    Attributes:
        images: ``uint8 [N, C, H, W]``.
        labels: ``long [N]``, indices into ``class_names``.
        class_names: unique class names.
        sources: path of each image relative to the source's root (location independent, so a
            cache entry stays valid when the data moves).
        preprocessing: ``Preprocessing.to_dict()`` the images were decoded with, when it was
            inferred from the images themselves (``None`` when the caller fixed it).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    sources: list[str]
    preprocessing: dict | None = None

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


def default_cache_dir() -> Path:
    """``$METAMTL_CACHE`` if set, else ``~/.cache/metamtl``."""
    return Path(os.environ.get("METAMTL_CACHE") or Path.home() / ".cache" / "metamtl").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """``None``/``True``/``""`` -> :func:`default_cache_dir`, ``False`` -> ``None`` (no disk cache).

    An empty string means the default (as an empty ``data.cache_dir=`` override does), never the
    current directory."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True or (isinstance(cache_dir, str) and not cache_dir.strip()):
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def cache_key(*parts) -> str:
    """sha1 of the JSON encoding of ``parts`` (strings, numbers and lists of them)."""
    return hashlib.sha1(json.dumps([CACHE_FORMAT, *parts], sort_keys=True).encode()).hexdigest()


def clear_memo() -> None:
    """Forget every decoded source held in memory (the disk cache is left alone)."""
    _MEMO.clear()


def _remember(key: str, decoded: Decoded) -> None:
    if decoded.nbytes > MEMO_MAX_BYTES:
        return
    _MEMO[key] = decoded
    while sum(d.nbytes for d in _MEMO.values()) > MEMO_MAX_BYTES:
        _MEMO.popitem(last=False)


def _load(path: Path, key: str) -> Decoded:
    with np.load(path, allow_pickle=False) as f:
        if str(f["key"]) != key:
            raise ValueError("its key does not match its name")
        decoded = Decoded(
            torch.from_numpy(f["images"]),
            torch.from_numpy(f["labels"]).long(),
            [str(c) for c in f["class_names"]],
            [str(s) for s in f["sources"]],
            json.loads(str(f["preprocessing"])) if "preprocessing" in f.files else None,
        )
    n = decoded.images.shape[0]
    if (decoded.images.dtype != torch.uint8 or decoded.images.ndim != 4
            or decoded.labels.shape != (n,) or len(decoded.sources) != n
            or (n and not 0 <= int(decoded.labels.min()) <= int(decoded.labels.max()) < len(decoded.class_names))):
        raise ValueError("its arrays are inconsistent")
    return decoded


def _save(path: Path, key: str, decoded: Decoded) -> None:
    atomic_write(path, lambda f: np.savez(
        f,
        key=np.array(key),
        images=decoded.images.numpy(),
        labels=decoded.labels.numpy(),
        class_names=np.array(decoded.class_names, dtype=str),
        sources=np.array(decoded.sources, dtype=str),
        **({"preprocessing": np.array(json.dumps(decoded.preprocessing))} if decoded.preprocessing else {}),
    ))


def cached_decode(
    name: str,
    key_parts: Sequence,
    build: Callable[[], Decoded],
    cache_dir: str | os.PathLike | bool | None = None,
) -> Decoded:
    """Return ``build()``, from the memo or the disk cache when an entry for ``key_parts`` exists.

    Args:
        name: readable prefix of the cache file name (e.g. ``"omniglot-images_background"``).
        key_parts: JSON-serialisable values that together determine ``build()``'s result.
        build: decodes the source; called only on a cache miss.
        cache_dir: cache folder, ``None`` for the default, ``False`` for no disk cache.

    The returned tensors are shared with the memo: treat them as read-only.
    """
    key = cache_key(name, *key_parts)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    directory = resolve_cache_dir(cache_dir)
    # the readable prefix is cut to keep the file name within 255 bytes: the key covers the whole name
    path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:_NAME_CHARS]}-{key[:20]}.npz" if directory else None
    decoded = None
    try:  # a folder this user cannot read (another user's cache) is a miss too: exists() raises there
        present = path is not None and path.exists()
    except OSError as exc:
        present, path = False, None  # nor written: one warning says it all
        warnings.warn(f"cannot read the decode cache folder {directory} ({exc}); decoding in memory (set "
                      "cache_dir= or $METAMTL_CACHE to a folder of yours, or cache_dir=False)", RuntimeWarning, stacklevel=2)
    if present:
        try:
            decoded = _load(path, key)
        except Exception as exc:  # any unreadable file is rebuilt, whatever numpy raises
            warnings.warn(f"ignoring unreadable decode cache file {path} ({exc}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
    if decoded is None:
        decoded = build()
        if path is not None:
            try:
                _save(path, key, decoded)
            except OSError as exc:
                warnings.warn(f"could not write decode cache file {path} ({exc}); the next run "
                              "will decode again (set cache_dir= or $METAMTL_CACHE to a writable "
                              "folder, or cache_dir=False)", RuntimeWarning, stacklevel=2)
    _remember(key, decoded)
    return decoded
