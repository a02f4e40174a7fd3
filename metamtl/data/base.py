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
import io
import math
import numbers
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError, InputError, did_you_mean

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def image_size_or_none(value) -> int | tuple[int, int] | None:
    """``value`` as a Python ``int`` >= 1 or a ``(height, width)`` pair of them (numpy integers
    accepted); ``None`` when it is neither (a string, a bool, a float, a pair with either)."""
    def side(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) and v >= 1

    if side(value):
        return int(value)
    if isinstance(value, (Sequence, np.ndarray, torch.Size)) and not isinstance(value, (str, bytes)) \
            and len(value) == 2 and all(map(side, value)):
        return tuple(int(v) for v in value)
    return None


def _finite_floats(what: str, values: Iterable) -> tuple[float, ...]:
    """``values`` as finite floats, else :class:`DataError` (a NaN mean or std makes every model input NaN)."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise DataError(f"Preprocessing.{what} must be numbers, one per channel, got {values!r}") from exc
    if not all(map(math.isfinite, out)):
        raise DataError(f"Preprocessing.{what} must be finite numbers, got {out}")
    return out


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw images become stored uint8 tensors, and stored tensors become model input.

    Args:
        size: ``(height, width)`` images are resized to when decoded (one int: square).
        channels: 1 (grayscale, PIL mode ``L``) or 3 (RGB).
        mean, std: per-channel normalisation applied to ``x / 255`` when making model input.
        invert: store ``255 - pixel`` (Omniglot: strokes bright on a dark background).
        resample: PIL resampling filter name used when resizing.
        background: grey level 0..255 that transparent pixels (alpha) are composited over.
    """

    size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    invert: bool = False
    resample: str = "lanczos"
    background: int = 0

    def __post_init__(self) -> None:
        size = image_size_or_none(self.size)
        if size is None:
            raise DataError(f"Preprocessing.size must be (height, width), integers >= 1 (or one int for square "
                            f"images), got {self.size!r}")
        object.__setattr__(self, "size", (size, size) if isinstance(size, int) else size)
        object.__setattr__(self, "mean", _finite_floats("mean", self.mean))
        object.__setattr__(self, "std", _finite_floats("std", self.std))
        if not isinstance(self.invert, (bool, np.bool_)):
            raise DataError(f"Preprocessing.invert must be True or False, got {self.invert!r}")
        object.__setattr__(self, "invert", bool(self.invert))
        if self.channels not in (1, 3):
            raise DataError(f"Preprocessing.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(
                f"Preprocessing.mean/std need one value per channel ({self.channels}), "
                f"got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"Preprocessing.std must be positive, got {self.std}")
        if isinstance(self.background, bool) or not isinstance(self.background, (int, np.integer)) \
                or not 0 <= self.background <= 255:
            raise DataError(f"Preprocessing.background must be a grey level 0..255, got {self.background!r}")
        if self.resample not in _RESAMPLE:
            raise DataError(
                f"unknown resample filter {self.resample!r}; choose one of {sorted(_RESAMPLE)}"
            )

    # -- raw -> stored -------------------------------------------------------------------
    def decode(self, image: Any) -> torch.Tensor:
        """Turn one PIL image or array (H x W, H x W x C, or C x H x W) into ``uint8 [C, H, W]``.

        A JPEG opened but not yet loaded (``Image.open(path)``) is decoded as a dataset's files are,
        at a reduced scale still at least :attr:`size` (:func:`draft_jpeg`), so the same file gives the
        same tensor in training and in ``predict``; one opened from a path is re-opened for that (left
        as it is), one opened from bytes is drafted in place.

        Pixel values are read by type, never clipped: ``uint8`` as is; other unsigned integer
        types (16-bit images) scaled by their range (65535 -> 255); PIL's 32-bit ``I`` mode as
        16-bit data; ``bool`` as 0/255; floats in 0..1 scaled by 255, floats in 0..255 as they
        are.  NaN/inf, negative or out-of-range floats and signed integer arrays are refused
        (:class:`~metamtl.errors.InputError`).  Alpha (RGBA, LA, palette or colour-key
        transparency) is composited over :attr:`background`.
        """
        from PIL import Image

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            return self._finish(pixels_to_uint8(_one_image_array(image)))
        if not isinstance(image, Image.Image):
            raise InputError(
                f"cannot preprocess an object of type {type(image).__name__}; "
                "pass PIL images, numpy arrays or tensors"
            )
        if image.format == "JPEG" and image.tile and getattr(image, "filename", ""):
            with Image.open(image.filename) as fresh:  # draft a copy: the caller's image is left as it is
                return self._finish(pil_pixels(draft_jpeg(fresh, self.size)))
        return self._finish(pil_pixels(draft_jpeg(image, self.size)))

    def _finish(self, arr: np.ndarray) -> torch.Tensor:
        """``uint8`` pixels ``H x W`` or ``H x W x {1,2,3,4}`` -> stored ``uint8 [C, H, W]``."""
        from PIL import Image

        arr = _composite(arr, self.background)
        image = Image.fromarray(arr)
        if self.channels == 1 and image.mode != "L":
            image = image.convert("L")
        elif self.channels == 3 and image.mode != "RGB":
            image = image.convert("RGB")
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
        return self.from_pixels(x.float().div_(255.0))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel ``mean`` and ``std`` shaped for ``x [..., C, H, W]`` (``None``: identity)."""
        if not any(self.mean) and all(s == 1.0 for s in self.std):
            return None
        return tuple(torch.tensor(v, device=x.device, dtype=x.dtype).view(-1, 1, 1)  # type: ignore[return-value]
                     for v in (self.mean, self.std))

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels in ``[0, 1]`` -> model input ``(x - mean) / std`` (in place)."""
        stats = self._stats(x)
        return x if stats is None else x.sub_(stats[0]).div_(stats[1])

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> float pixels in ``[0, 1]`` (a new tensor): the inverse of :meth:`from_pixels`."""
        stats = self._stats(x)
        return x.clone() if stats is None else x * stats[1] + stats[0]

    def __call__(self, images: Any) -> torch.Tensor:
        """Raw images -> float model input ``[N, C, H, W]``.

        ``images``: one PIL image or 2-D array (one image), a list of images, or a batch array or
        tensor read by its number of dimensions alone: ``(N, H, W)`` is N grey images;
        ``(N, C, H, W)`` and ``(N, H, W, C)`` (C in 1, 3, 4) are told apart by which axis holds
        1, 3 or 4 values (both or neither: refused as ambiguous).  A 3-D array is never read as
        one colour image: pass that as ``[image]`` or with a batch axis.  A batch's pixel values
        are scaled by one rule for the whole batch (see :meth:`decode`).

        A ``uint8`` tensor of the stored shape, ``[N, C, H, W]`` (a dataset's stored images, e.g. an
        Episode's ``support_x``), is only normalised; so is a grey dataset's ``[N, H, W]`` at the stored
        size (the same pixels with the channel squeezed), so an inverting dataset's (Omniglot's) stored
        images are never inverted a second time.  Other tensors are decoded like raw images, with a
        warning when that inverts a tensor of the stored size (e.g. ``[N, H, W, 1]``).  Arrays are
        always raw images: a uint8 array of exactly the stored shape (``support_x.numpy()``) is
        inverted with the same warning.
        """
        if isinstance(images, torch.Tensor):
            if images.dtype == torch.uint8 and images.ndim == 3 and self.channels == 1 \
                    and tuple(images.shape[1:]) == self.size:
                images = images.unsqueeze(1)  # stored grey pixels with the channel squeezed
            if images.dtype == torch.uint8 and tuple(images.shape[1:]) == self.input_shape and images.ndim == 4:
                return self.normalize(images)
            if images.dtype == torch.uint8 and self.invert and images.ndim == 4 \
                    and self.size in (tuple(images.shape[2:]), tuple(images.shape[1:3])):
                self._warn_inverted("tensor", images.shape, f"stored images are taken as they are only as [N, "
                                    f"{self.channels}, {self.size[0]}, {self.size[1]}] (or [N, H, W] when grey): "
                                    "reshape them to that")
            images = images.detach().cpu().numpy()
        elif isinstance(images, np.ndarray) and images.dtype == np.uint8 and self.invert and images.ndim == 4 \
                and tuple(images.shape[1:]) == self.input_shape:
            self._warn_inverted("array", images.shape, "stored images (e.g. an Episode's support_x) are taken as "
                                "they are only as a tensor: pass torch.from_numpy(images) for those")
        if isinstance(images, np.ndarray):
            if images.ndim == 2:
                images = [images]
            else:
                batch = pixels_to_uint8(batch_array(images))
                return self.normalize(self.decode_many(batch))
        elif not isinstance(images, (list, tuple)):
            images = [images]
        return self.normalize(self.decode_many(images))

    @staticmethod
    def _warn_inverted(kind: str, shape: Sequence[int], fix: str) -> None:
        """Warn that a uint8 ``kind`` of the stored size is decoded and inverted like image files (a
        dataset's stored pixels would be inverted a second time); ``fix``: how to pass stored ones."""
        warnings.warn(f"a uint8 {kind} of shape {list(shape)} is decoded as raw images and inverted (invert=True), "
                      f"like image files on disk; {fix}, or pass float model input", UserWarning, stacklevel=3)

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


# -- raw pixels -> uint8 ------------------------------------------------------------------------
#: PIL modes whose pixels are grey levels (with alpha for LA/La/PA-less grey); everything else is colour
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
#: colour spaces PIL converts to RGB on the way in
_TO_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})


def pixels_to_uint8(arr: np.ndarray, what: str = "image") -> np.ndarray:
    """Pixel values of any numeric type -> ``uint8``, by one rule for the whole array.

    ``uint8`` as is; ``bool`` -> 0/255; other unsigned integers scaled by their type's range
    (``uint16``: 65535 -> 255, so 16-bit images are not clipped at 255); floats: all values in
    0..1 -> scaled by 255, else values in 0..255 kept.  Refused with
    :class:`~metamtl.errors.InputError`: NaN/inf, floats outside 0..255 (normalised model input
    belongs in a float tensor), and signed integers (ambiguous: ``np.array`` of Python ints is
    int64 whatever the pixels' range).
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        raise InputError(f"{what} has no pixels (shape {list(arr.shape)})")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        scale = 255.0 / float(np.iinfo(arr.dtype).max)
        return np.rint(arr.astype(np.float64) * scale).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.signedinteger):
        raise InputError(
            f"{what} holds signed integers ({arr.dtype}), whose pixel range is ambiguous; convert it: "
            "arr.astype(np.uint8) for 0..255 values, np.uint16 for 16-bit images, or float in 0..1"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{what} has dtype {arr.dtype}; pass uint8/uint16/bool/float pixel values")
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"{what} contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 255.0:
        raise InputError(
            f"{what} holds float values in [{lo:.4g}, {hi:.4g}], outside the pixel ranges 0..1 and 0..255; "
            "raw images are 0..1 or 0..255 (model-ready, normalised input goes in as a float torch tensor)"
        )
    if hi <= 1.0:
        a = a * 255.0
    return np.rint(a).astype(np.uint8)


def draft_jpeg(image: Any, size: Sequence[int]) -> Any:
    """``image``, set to decode at the smallest JPEG scale (1/2, 1/4, 1/8) still at least ``size``
    (height, width): the one way a JPEG is decoded, for a dataset's files and the PIL images given to
    ``preprocess``/``predict`` alike (memory and time bounded by the target, not the file).  No effect
    on other formats or on an image already loaded (PIL drafts only before decoding)."""
    if getattr(image, "format", None) == "JPEG" and getattr(image, "tile", None):
        height, width = size[::-1] if exif_orientation(image) >= 5 else size  # stored turned by 90 degrees
        image.draft(None, (int(width), int(height)))
    return image


def exif_orientation(image: Any) -> int:
    """A PIL image's EXIF orientation (1: stored as shown; 2-8: stored flipped or turned, 5-8 by 90 degrees),
    1 when it has none or its EXIF block cannot be read."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block (PIL raises many kinds): the pixels are shown as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image as it is shown, its EXIF orientation applied (read from the header)."""
    return (image.width, image.height) if exif_orientation(image) >= 5 else (image.height, image.width)


def pil_pixels(image: Any) -> np.ndarray:
    """A PIL image's pixels as ``uint8`` ``H x W`` (grey), ``H x W x 2`` (grey + alpha),
    ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA), whatever its mode or bit depth, turned as its EXIF
    orientation says it is shown (a camera photo stored landscape but shown portrait is portrait)."""
    image = rgb16_keyed(image)
    if exif_orientation(image) != 1:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)
    mode = image.mode
    transparent = "transparency" in image.info
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif mode in ("1", "L") and transparent:
        image = image.convert("LA")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "RGB" and transparent:
        image = image.convert("RGBA")
    elif mode in ("RGBa", "La"):
        image = image.convert("RGBA" if mode == "RGBa" else "LA")
    elif mode in _TO_RGB:
        image = image.convert("RGB")
    elif mode == "I":  # 32-bit integer mode: PIL's container for 16-bit data
        arr = np.asarray(image)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise InputError(
                f"32-bit integer image (PIL mode I) holds values {int(arr.min())}..{int(arr.max())}, outside "
                "the 16-bit range 0..65535 it is read as; convert it to 8 or 16 bits"
            )
        arr = arr.astype(np.uint16)
        return _colour_keyed(pixels_to_uint8(arr), arr, image.info)
    arr = np.asarray(image)
    grey = pixels_to_uint8(arr, f"{mode} image")
    return _colour_keyed(grey, arr, image.info) if mode.startswith("I;16") else grey


def rgb16_keyed(image: Any) -> Any:
    """A 16-bit RGB PNG with a colour key (tRNS) as an RGBA image whose alpha clears exactly the pixels of that
    16-bit colour (PIL reads the samples' high bytes and compared them with the 16-bit key: none ever matched),
    its other info (EXIF) kept; any other image as it is.  The file is decoded again for the samples' low bytes,
    whether or not the image was loaded, and used only where its high bytes are the image's pixels: an image
    changed after it was opened (thumbnail, paste, drawn on) is taken as it is, its edits kept."""
    key = image.info.get("transparency")
    if image.format != "PNG" or image.mode != "RGB" or not isinstance(key, tuple) or len(key) != 3:
        return image
    data = _file_bytes(image)
    if data is None or data[24:26] != b"\x10\x02":  # IHDR bit depth 16, colour type 2 (RGB)
        return image
    from PIL import Image

    samples = []
    for rawmode in ("RGB;16B", "RGB;16L"):  # high bytes, then (read as little-endian) low bytes: same filtering
        with Image.open(io.BytesIO(data)) as part:
            part.tile = [t._replace(args=rawmode) for t in part.tile]
            samples.append(np.asarray(part))
    if not np.array_equal(samples[0], np.asarray(image)):  # changed in place since it was opened: as given
        return image
    value = (samples[0].astype(np.uint16) << 8) | samples[1]
    alpha = np.where((value == np.asarray(key, np.uint16)).all(-1), 0, 255).astype(np.uint8)
    out = Image.fromarray(np.dstack([samples[0], alpha]))
    out.info = {k: v for k, v in image.info.items() if k != "transparency"}
    return out


def _file_bytes(image: Any) -> bytes | None:
    """The bytes of the file a PIL image was opened from (a path or a stream), ``None`` if they cannot be read.
    A stream is found once the image is loaded too (PIL then drops ``fp`` but keeps it as ``_fp``)."""
    try:
        if getattr(image, "filename", ""):
            with open(image.filename, "rb") as f:
                return f.read()
        fp = getattr(image, "fp", None) or getattr(image, "_fp", None)
        if not (hasattr(fp, "seek") and hasattr(fp, "read")):
            return None
        where = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(where)
        return data
    except (OSError, ValueError):  # moved away, a closed stream
        return None


def _colour_keyed(grey: np.ndarray, raw: np.ndarray, info: dict) -> np.ndarray:
    """``grey`` (``H x W``), with an alpha channel (``H x W x 2``) clearing the pixels whose 16-bit value
    ``raw`` is the colour key ``info["transparency"]`` (a 16-bit grey PNG's tRNS chunk), if there is one."""
    key = info.get("transparency")
    if not isinstance(key, int) or isinstance(key, bool):
        return grey
    return np.stack([grey, np.where(raw == key, 0, 255).astype(np.uint8)], axis=-1)


def _composite(arr: np.ndarray, background: int) -> np.ndarray:
    """Drop an alpha channel (last axis of 2 or 4) by compositing over a grey ``background``."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return arr[..., 0]
    if arr.ndim != 3 or arr.shape[-1] not in (2, 4):
        return arr
    alpha = arr[..., -1:].astype(np.float32) / 255.0
    colour = arr[..., :-1].astype(np.float32)
    out = colour * alpha + float(background) * (1.0 - alpha)
    out = np.rint(out).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


_CHANNELS = (1, 3, 4)


def _one_image_array(arr: np.ndarray) -> np.ndarray:
    """One image as an array: ``H x W``, ``H x W x C`` or ``C x H x W`` (C in 1, 3, 4) -> ``H x W [x C]``."""
    if arr.ndim == 3 and arr.shape[0] in _CHANNELS and arr.shape[-1] not in _CHANNELS:
        arr = np.moveaxis(arr, 0, -1)  # C,H,W -> H,W,C
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in _CHANNELS):
        return arr
    raise InputError(
        f"expected one image as an array of shape HxW, HxWxC or CxHxW (C = 1, 3 or 4), got {list(arr.shape)}"
    )


def batch_array(arr: np.ndarray) -> np.ndarray:
    """A batch of images as an array -> ``N x H x W`` or ``N x H x W x C``, read by dimensions alone.

    ``(N, H, W)``: N grey images.  ``(N, C, H, W)`` / ``(N, H, W, C)``: the axis holding 1, 3 or 4
    values is the channel axis; an array where both or neither of axes 1 and 3 could be it is
    refused as ambiguous.
    """
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4:
        first, last = arr.shape[1] in _CHANNELS, arr.shape[3] in _CHANNELS
        if first and not last:
            return np.moveaxis(arr, 1, -1)
        if last and not first:
            return arr
        raise InputError(
            f"cannot tell the channel axis of an image batch of shape {list(arr.shape)}: "
            f"{'both axis 1 and axis 3' if first else 'neither axis 1 nor axis 3'} could hold "
            "1, 3 or 4 channels; pass (N, C, H, W) or (N, H, W, C) with C = 1, 3 or 4, or a list of images"
        )
    raise InputError(
        f"an image batch must be an array of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got "
        f"{list(arr.shape)}; pass one image as a 2-D array or a list [image]"
    )


def is_grey(image: Any) -> bool:
    """Whether an (unloaded) PIL image holds grey levels only, judged from its mode and palette."""
    if image.mode in GREY_MODES:
        return True
    if image.mode in ("P", "PA") and image.palette is not None:
        rawmode, data = image.palette.getdata()
        step = len(rawmode) if rawmode in ("RGB", "RGBA", "BGR", "RGBX") else 0
        if step:
            return all(data[i] == data[i + 1] == data[i + 2] for i in range(0, len(data) - 2, step))
    return False


class ClassDataset:
    """Images of several classes, stored as one uint8 tensor sorted by class.

    Args:
        images: ``uint8 [N, C, H, W]`` (or float for non-image features).
        labels: ``long [N]`` class index of each image, in ``0..len(class_names)-1``.
        class_names: a unique, stable name per class (e.g. ``"Greek/character03"``).
        name: dataset name, used in logs and multi-dataset sampling.
        preprocessing: how raw images were decoded and how to make model input.
        sources: file names of every image (optional, used in error messages).
        deduplicate: drop every image identical (same pixels) to an earlier one of the same class,
            with one warning naming them, so an episode can never hold the same image in its
            support and query sets (duplicate CSV rows, a file listed twice, byte-identical
            copies).  Subsets of a checked dataset skip the check.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        name: str = "dataset",
        preprocessing: Preprocessing | None = None,
        sources: Sequence[str] | None = None,
        *,
        deduplicate: bool = True,
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
        if sources is not None and len(sources) != labels.shape[0]:
            raise DataError(f"{name}: {len(sources)} sources for {labels.shape[0]} images")
        if deduplicate:
            keep = _unique_within_class(images, labels, class_names, sources, name)
            if keep is not None:
                images, labels = images[keep], labels[keep]
                sources = [sources[i] for i in keep.tolist()] if sources is not None else None
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
        index_of = {n: i for i, n in enumerate(self.class_names)}
        idx = [self._class_index(c, index_of) for c in classes]
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
            deduplicate=False,  # rows of a checked dataset
        )

    def _class_index(self, c, index_of: dict[str, int]) -> int:
        """The index of class ``c`` (a name, or an index ``0 <= c < num_classes``), else :class:`DataError`."""
        if isinstance(c, str):
            if c not in index_of:
                raise DataError(f"{self.name}: no class named {c!r}.{did_you_mean(c, self.class_names)} "
                                f"Pass names among its {self.num_classes} classes or indices 0..{self.num_classes - 1}")
            return index_of[c]
        if isinstance(c, torch.Tensor) and c.ndim == 0 and not c.is_floating_point() and c.dtype != torch.bool:
            c = int(c)
        if not isinstance(c, numbers.Integral) or isinstance(c, bool) or not 0 <= c < self.num_classes:
            raise DataError(f"{self.name}: {c!r} is not a class: pass class names or integer indices "
                            f"0..{self.num_classes - 1} (negative indices are not counted from the end)")
        return int(c)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored tensor -> float model input, using this dataset's preprocessing."""
        if self.preprocessing is None:
            return x.float()
        return self.preprocessing.normalize(x)


def _unique_within_class(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                         sources: Sequence[str] | None, name: str) -> torch.Tensor | None:
    """Indices of the images to keep (first of each identical group per class), or ``None`` if all.

    Warns once, naming a few duplicates, when any are dropped.
    """
    if images.shape[0] < 2:
        return None
    flat = images.reshape(images.shape[0], -1).contiguous()
    raw = flat.numpy() if flat.device.type == "cpu" else flat.cpu().numpy()
    first: dict[tuple[int, bytes], int] = {}
    dropped: list[tuple[int, int]] = []
    for i, (label, row) in enumerate(zip(labels.tolist(), raw)):
        key = (label, hashlib.blake2b(row.tobytes(), digest_size=16).digest())
        j = first.setdefault(key, i)
        if j != i and np.array_equal(raw[j], row):
            dropped.append((i, j))
    if not dropped:
        return None
    def what(i: int) -> str:
        return sources[i] if sources is not None else f"image {i}"
    examples = "; ".join(f"{class_names[int(labels[i])]}: {what(i)} = {what(j)}" for i, j in dropped[:3])
    warnings.warn(
        f"{name}: dropped {len(dropped)} duplicate image(s), identical to another image of the same class "
        f"(one image could otherwise be both support and query of an episode), e.g. {examples}"
        f"{' ...' if len(dropped) > 3 else ''}", DuplicateImagesWarning, stacklevel=3,
    )
    gone = {i for i, _ in dropped}
    return torch.tensor([i for i in range(images.shape[0]) if i not in gone], dtype=torch.long)


class DuplicateImagesWarning(UserWarning):
    """A dataset held identical images within a class; the copies were dropped."""


def join_classes(parts: Sequence[ClassDataset], name: str | None = None) -> ClassDataset:
    """One dataset with the classes of every part (e.g. the train and validation splits).

    The parts must hold disjoint class names and share their preprocessing (the same dataset's
    splits do); images are not checked again for duplicates.
    """
    if not parts:
        raise DataError("join_classes needs at least one dataset")
    names = [c for p in parts for c in p.class_names]
    if len(set(names)) != len(names):
        shared = sorted({c for c in names if names.count(c) > 1})
        raise DataError(f"cannot join datasets that share classes ({', '.join(shared[:5])}...): "
                        "splits of one dataset are disjoint; join distinct splits")
    first = parts[0].preprocessing
    for p in parts[1:]:
        if (p.preprocessing is None) != (first is None) or (first is not None and p.preprocessing.key() != first.key()):
            raise DataError(f"cannot join {parts[0].name!r} and {p.name!r}: their preprocessing differs "
                            f"({first} vs {p.preprocessing}); load them with the same options")
    offsets = np.cumsum([0] + [p.num_classes for p in parts[:-1]])
    sources = None
    if all(p.sources is not None for p in parts):
        sources = [s for p in parts for s in p.sources]
    return ClassDataset(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels + int(o) for p, o in zip(parts, offsets)]),
        names, name=name or parts[0].name, preprocessing=first, sources=sources, deduplicate=False,
    )


def check_split_seed(seed: Any) -> int:
    """``seed`` as an int: an integer or an integral float (a YAML ``1.0`` is ``1``, not another
    split), else :class:`ConfigError` (``None``, ``True``, ``"abc"``, ``1.5``)."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    raise ConfigError(f"split_seed must be an integer, got {seed!r} (config: data.split_seed)")


def stable_order(names: Iterable[str], seed: int = 0) -> list[str]:
    """Order names by a hash of ``(seed, name)``: the same on every machine and library version
    (``seed`` is checked by :func:`check_split_seed`: ``1.0`` orders as ``1``)."""
    seed = check_split_seed(seed)
    return sorted(names, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode("utf-8", "surrogateescape")).hexdigest())


def split_names(
    names: Sequence[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[list[str], ...]:
    """Split class names deterministically into disjoint groups of the given fractions.

    The names are ordered by ``sha1(f"{seed}:{name}")`` and cut at the cumulative fractions, so
    the split depends only on the names and the seed (not on file order, numpy or torch).

    The split is a function of the *whole* list, not of each name alone: the cuts fall at
    cumulative counts, so adding, removing or renaming any name shifts the cut points and can move
    unchanged names near them to a neighbouring group (a class trained on before may become a
    validation or test class).  Keep the list of names fixed for comparable results, or store the
    split explicitly (split folders or one CSV file per split).
    """
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__") or not all(
            isinstance(f, numbers.Real) and not isinstance(f, bool) and math.isfinite(f) and f >= 0
            for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be finite, >= 0 and sum to 1, got {fractions!r} "
                        "(config: data.split_fractions, e.g. [0.6, 0.2, 0.2] for train, val, test)")
    ordered = stable_order(sorted(set(names)), seed)
    n = len(ordered)
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    bounds[-1] = n
    return tuple(sorted(ordered[bounds[i]:bounds[i + 1]]) for i in range(len(fractions)))
