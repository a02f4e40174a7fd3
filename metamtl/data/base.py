"""Class-indexed datasets held in memory as one uint8 tensor.

Every image dataset in metamtl decodes its files once into a :class:`ClassDataset`: a single
``uint8`` tensor ``[N, C, H, W]`` sorted by class, with per-class offsets and counts.  Sampling an
episode is then a vectorised gather on that tensor; PIL is never touched in the hot path.

:class:`Preprocessing` is the one place that says how a raw image (PIL image or array, in the
dataset's native form) becomes a stored ``uint8`` tensor and how a stored tensor becomes model
input.  The same object is saved inside checkpoints so ``MetaLearner.preprocess`` reproduces the
training pipeline exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import DataError, InputError

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw images become stored uint8 tensors, and stored tensors become model input.

    Args:
        size: ``(height, width)`` images are resized to when decoded.
        channels: 1 (grayscale, PIL mode ``L``) or 3 (RGB).
        mean, std: per-channel normalisation applied to ``x / 255`` when making model input.
        invert: store ``255 - pixel`` (Omniglot: strokes bright on a dark background).
        resample: PIL resampling filter name used when resizing.
    """

    size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: bool = False
    resample: str = "lanczos"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.size) != 2 or min(self.size) < 1:
            raise DataError(f"Preprocessing.size must be (height, width) > 0, got {self.size}")
        if self.channels not in (1, 3):
            raise DataError(f"Preprocessing.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(
                f"Preprocessing.mean/std need one value per channel ({self.channels}), "
                f"got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"Preprocessing.std must be positive, got {self.std}")
        if self.resample not in _RESAMPLE:
            raise DataError(
                f"unknown resample filter {self.resample!r}; choose one of {sorted(_RESAMPLE)}"
            )

    # -- raw -> stored -------------------------------------------------------------------
    def decode(self, image: Any) -> torch.Tensor:
        """Turn one PIL image or array (H x W, H x W x C, or C x H x W) into ``uint8 [C, H, W]``."""
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
                arr = np.moveaxis(arr, 0, -1)  # C,H,W -> H,W,C
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3):
                raise InputError(
                    f"expected an image array of shape HxW, HxWxC or CxHxW, got {tuple(image.shape)}"
                )
            if arr.dtype == np.bool_:
                arr = arr.astype(np.uint8) * 255
            elif arr.dtype != np.uint8:
                a = arr.astype(np.float64)
                if np.nanmax(a) <= 1.0:
                    a = a * 255.0
                arr = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
            image = Image.fromarray(arr)
        if not isinstance(image, Image.Image):
            raise InputError(
                f"cannot preprocess an object of type {type(image).__name__}; "
                "pass PIL images, numpy arrays or tensors"
            )
        image = image.convert("L" if self.channels == 1 else "RGB")
        h, w = self.size
        if image.size != (w, h):
            image = image.resize((w, h), resample=_RESAMPLE[self.resample])
        arr = np.asarray(image, dtype=np.uint8)
        if self.invert:
            arr = 255 - arr
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()

    def decode_many(self, images: Iterable[Any]) -> torch.Tensor:
        """Decode a sequence of raw images into ``uint8 [N, C, H, W]``."""
        decoded = [self.decode(im) for im in images]
        if not decoded:
            raise InputError("no images to preprocess")
        return torch.stack(decoded)

    # -- stored -> model input -----------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 [..., C, H, W]`` -> float model input (``(x/255 - mean) / std``)."""
        if x.dtype != torch.uint8:
            return x.float()
        out = x.float().div_(255.0)
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(shape)
        std = torch.tensor(self.std, device=x.device).view(shape)
        if any(self.mean) or any(s != 1.0 for s in self.std):
            out = out.sub_(mean).div_(std)
        return out

    def __call__(self, images: Any) -> torch.Tensor:
        """Raw images (one or a list) -> float model input ``[N, C, H, W]``."""
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4:
            if tuple(images.shape[1:]) != (self.channels, *self.size):
                images = list(images)
            else:
                return self.normalize(images)
        if not isinstance(images, (list, tuple)):
            if isinstance(images, (np.ndarray, torch.Tensor)) and np.ndim(images) == 4:
                images = list(images)
            else:
                images = [images]
        return self.normalize(self.decode_many(images))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**d)

    def key(self) -> str:
        """Short stable hash used in decode-cache file names."""
        return hashlib.sha1(repr(sorted(self.to_dict().items())).encode()).hexdigest()[:12]


class ClassDataset:
    """Images of several classes, stored as one uint8 tensor sorted by class.

    Args:
        images: ``uint8 [N, C, H, W]`` (or float for non-image features).
        labels: ``long [N]`` class index of each image, in ``0..len(class_names)-1``.
        class_names: a unique, stable name per class (e.g. ``"Greek/character03"``).
        name: dataset name, used in logs and multi-dataset sampling.
        preprocessing: how raw images were decoded and how to make model input.
        sources: file names of every image (optional, used in error messages).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        name: str = "dataset",
        preprocessing: Preprocessing | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.ndim < 2 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{name}: images and labels disagree: {tuple(images.shape)} vs {tuple(labels.shape)}"
            )
        class_names = [str(c) for c in class_names]
        if len(set(class_names)) != len(class_names):
            raise DataError(f"{name}: class names must be unique")
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{name}: labels must lie in 0..{len(class_names) - 1}")
        order = torch.argsort(labels, stable=True)
        self.images = images[order].contiguous()
        self.labels = labels[order].contiguous()
        self.class_names = class_names
        self.name = name
        if preprocessing is None and images.ndim == 4 and images.dtype == torch.uint8:
            c = int(images.shape[1])
            preprocessing = Preprocessing(
                size=tuple(images.shape[-2:]), channels=c, mean=(0.0,) * c, std=(1.0,) * c
            )
        self.preprocessing = preprocessing
        self.sources = [sources[i] for i in order.tolist()] if sources is not None else None
        self.class_counts = torch.bincount(self.labels, minlength=len(class_names))
        self.class_offsets = torch.cumsum(self.class_counts, 0) - self.class_counts

    # -- basic protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return (
            f"{type(self).__name__}(name={self.name!r}, classes={self.num_classes}, "
            f"images={len(self)}, shape={shape}, dtype={self.images.dtype})"
        )

    def class_indices(self, c: int) -> torch.Tensor:
        """Row indices of class ``c`` in :attr:`images`."""
        start = int(self.class_offsets[c])
        return torch.arange(start, start + int(self.class_counts[c]))

    def subset(self, classes: Sequence[int] | Sequence[str], name: str | None = None) -> "ClassDataset":
        """A new dataset with only ``classes`` (indices or names), relabelled ``0..len-1``."""
        idx = [self.class_names.index(c) if isinstance(c, str) else int(c) for c in classes]
        if len(set(idx)) != len(idx):
            raise DataError(f"{self.name}: subset classes must be unique")
        rows = [self.class_indices(c) for c in idx]
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        new_labels = torch.cat(
            [torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(rows)]
        ) if rows else torch.zeros(0, dtype=torch.long)
        return ClassDataset(
            self.images[rows_t],
            new_labels,
            [self.class_names[i] for i in idx],
            name=name or self.name,
            preprocessing=self.preprocessing,
            sources=[self.sources[i] for i in rows_t.tolist()] if self.sources else None,
        )

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored tensor -> float model input, using this dataset's preprocessing."""
        if self.preprocessing is None:
            return x.float()
        return self.preprocessing.normalize(x)


def stable_order(names: Iterable[str], seed: int = 0) -> list[str]:
    """Order names by a hash of ``(seed, name)``: the same on every machine and library version."""
    return sorted(names, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).hexdigest())


def split_names(
    names: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[list[str], ...]:
    """Split class names deterministically into disjoint groups of the given fractions.

    The names are ordered by ``sha1(f"{seed}:{name}")`` and cut at the cumulative fractions, so
    the split depends only on the names and the seed (not on file order, numpy or torch).
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    ordered = stable_order(sorted(set(names)), seed)
    n = len(ordered)
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    bounds[-1] = n
    return tuple(sorted(ordered[bounds[i]:bounds[i + 1]]) for i in range(len(fractions)))
