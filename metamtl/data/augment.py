"""Seeded, vectorised image augmentation for training episodes and support sets.

Augmentations act on whole image batches ``[N, C, H, W]`` (stored ``uint8`` images before
normalisation, or float model input), draw every random number from a ``torch.Generator`` the
caller seeds, and handle a batch with one gather / one ``grid_sample``: no per-image Python.
:class:`~metamtl.tasks.EpisodeSampler` applies one to its episodes with a generator derived from
``(seed, index)``, so augmented episodes stay a pure function of their index.

* :class:`RandomCropFlip` - random shift (mirror padding) and left-right flip, for natural images
  (about 1.4 ms for 128 84x84 images on one CPU core).
* :class:`RandomAffine` - random rotation, shear, scale and shift, each applied with probability
  ``p``, for characters and other small images.
* :class:`ColorJitter` - random brightness, contrast and saturation per image, for natural
  (colour) images, as torchvision's ``ColorJitter`` without hue.
* :class:`Compose` - several of them in order.
* :class:`SupportAugment` - test-time support augmentation: each support image plus augmented
  copies of it, all with its label (averaged into its prototype, or fed to the head).

:func:`build_augment` turns a config value into one of these.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, did_you_mean


class RandomCropFlip:
    """Random crop of a reflect-padded image and random horizontal flip, per image.

    Args:
        padding: the image is padded by ``padding`` pixels on every side (mirror padding, so no
            black borders) and a crop of the original size is taken at a uniform random offset:
            a shift of up to ``padding`` pixels in each direction. 0: no crop.
        flip: mirror each image left-right with probability 1/2.

    ``augment(images, generator)`` returns a new tensor of the same shape and dtype.  The usual
    few-shot setting for 84x84 natural images is ``padding=8, flip=True``; leave flips off for
    data whose classes are not mirror-symmetric (handwritten characters).
    """

    def __init__(self, padding: int = 8, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"augment padding must be an integer >= 0 (pixels), got {padding!r}")
        if not isinstance(flip, bool):
            raise ConfigError(f"augment flip must be true or false, got {flip!r}")
        self.padding = padding
        self.flip = flip

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandomCropFlip) and (self.padding, self.flip) == (other.padding, other.flip)

    def config(self) -> dict:
        return {"name": "crop_flip", "padding": self.padding, "flip": self.flip}

    @property
    def is_identity(self) -> bool:
        return self.padding == 0 and not self.flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = _check_batch(images)
        if self.padding >= min(h, w):
            raise ConfigError(
                f"augment padding {self.padding} must be smaller than the image size {h}x{w}"
            )
        if n == 0 or self.is_identity:
            return images.clone()
        p = self.padding
        # Source row/column of every output pixel: offset in [0, 2p], minus the padding,
        # mirrored at the borders (reflect padding without materialising the padded image).
        shift = (torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator) - p).to(images.device)
        rows = _reflect(shift[0] + torch.arange(h, device=images.device), h)  # [n, h]
        cols = _reflect(shift[1] + torch.arange(w, device=images.device), w)  # [n, w]
        if self.flip:
            mirrored = (torch.rand(n, generator=generator, dtype=torch.float32) < 0.5).to(images.device)
            cols = torch.where(mirrored.unsqueeze(1), cols.flip(1), cols)
        # one gather over the flattened pixels (~7x faster than 4-D advanced indexing)
        flat = (rows.unsqueeze(2) * w + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
        return images.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror out-of-range indices back into ``0..size-1`` (like ``F.pad(mode='reflect')``)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)




def check_fits(augment: Any, images: torch.Tensor, name: str) -> None:
    """Apply ``augment`` to the first of ``images`` (dataset ``name``'s): a setting that does not fit
    these images (crop padding as large as the image) fails when it is set up, not mid-run."""
    if augment is None or not len(images):
        return
    try:
        augment(images[:1], torch.Generator().manual_seed(0))
    except ConfigError as exc:
        raise ConfigError(f"augment of {name!r} (images {list(images.shape[1:])}): {exc}") from None


def _check_batch(images: torch.Tensor) -> tuple[int, int, int, int]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(
            f"image augmentation needs a batch of images [N, C, H, W], got {shape}; "
            "turn augmentation off for non-image datasets"
        )
    return tuple(images.shape)  # type: ignore[return-value]


def _number(name: str, value: Any, lo: float, hi: float = math.inf, what: str = "affine") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= float(value) <= hi:
        bound = f"in [{lo}, {hi}]" if math.isfinite(hi) else f">= {lo}"
        raise ConfigError(f"{what} {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class _Configured:
    """``repr`` and equality of an augmentation from its :meth:`config` mapping."""

    def config(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.config() == other.config()

    #: uniform numbers drawn per image, whatever the settings
    DRAWS = 0

    def _unchanged(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A copy of ``images`` (identity settings), after drawing the :attr:`DRAWS` numbers per image a
        transform would have drawn: later augmentations on the stream see the same numbers whatever ``p``."""
        torch.rand(images.shape[0], self.DRAWS, generator=generator, dtype=torch.float64)
        return images.clone()


class RandomAffine(_Configured):
    """Random affine transform of each image (rotation, shear, scale, shift), one ``grid_sample``.

    Each of the four parts is applied to an image with probability ``p``, independently:

    Args:
        rotation: angle drawn uniformly in ``[-rotation, rotation]`` degrees.
        shear: horizontal shear factor drawn in ``[-shear, shear]`` (``x' = x + shear * y``).
        scale: ``(low, high)`` isotropic zoom factor drawn uniformly (``> 1`` enlarges).
        shift: translation drawn in ``[-shift, shift]`` pixels along each axis.
        p: probability of each part (the default 0.5 leaves 1/16 of the images untouched).
        fill: what appears where the transformed image uncovers the frame: ``"zeros"`` (black:
            the background of Omniglot's inverted characters), ``"border"`` (edge pixels
            repeated) or ``"reflection"``.

    The transform is about the image centre, in pixel units (so rotations stay rotations for
    non-square images); images are resampled bilinearly.  ``uint8`` input gives ``uint8`` output
    (rounded), float input float output.  Draws ``9 * N`` uniform numbers from the generator
    whatever the settings, so changing ``p`` or a range changes the transforms, not which
    numbers later augmentations on the same stream see.  The defaults are the usual setting for
    handwritten characters (rotation <= 10 degrees, shear <= 0.3, scale 0.8-1.2, shift <= 2 px).
    """

    FILLS = ("zeros", "border", "reflection")
    DRAWS = 9

    def __init__(self, rotation: float = 10.0, shear: float = 0.3, scale: Sequence[float] = (0.8, 1.2),
                 shift: float = 2.0, p: float = 0.5, fill: str = "zeros") -> None:
        self.rotation = _number("rotation (degrees)", rotation, 0.0, 180.0)
        self.shear = _number("shear", shear, 0.0)
        if isinstance(scale, (str, bytes)) or not isinstance(scale, Sequence) or len(scale) != 2:
            raise ConfigError(f"affine scale must be [low, high] zoom factors, got {scale!r}")
        lo, hi = (_number("scale", s, 1e-3) for s in scale)
        if lo > hi:
            raise ConfigError(f"affine scale must be [low, high] with low <= high, got {list(scale)}")
        self.scale = (lo, hi)
        self.shift = _number("shift (pixels)", shift, 0.0)
        self.p = _number("p (probability of each part)", p, 0.0, 1.0)
        if fill not in self.FILLS:
            raise ConfigError(f"affine fill must be one of {', '.join(self.FILLS)}, got {fill!r}")
        self.fill = fill

    def config(self) -> dict:
        return {"name": "affine", "rotation": self.rotation, "shear": self.shear, "scale": list(self.scale),
                "shift": self.shift, "p": self.p, "fill": self.fill}

    @property
    def is_identity(self) -> bool:
        return self.p == 0 or (self.rotation == 0 and self.shear == 0 and self.scale == (1.0, 1.0)
                               and self.shift == 0)

    def matrices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, 2, 3]`` forward transforms in pixel units about the image centre: ``x' = A x + t``."""
        u = torch.rand(n, self.DRAWS, generator=generator, dtype=torch.float64)
        on = u[:, :4] < self.p
        angle = torch.where(on[:, 0], (2 * u[:, 4] - 1) * math.radians(self.rotation), 0.0)
        shear = torch.where(on[:, 1], (2 * u[:, 5] - 1) * self.shear, 0.0)
        lo, hi = self.scale
        zoom = torch.where(on[:, 2], lo + (hi - lo) * u[:, 6], 1.0)
        shift = torch.where(on[:, 3:4], (2 * u[:, 7:9] - 1) * self.shift, 0.0)  # [n, 2]: x, y
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
        shr[:, 0, 1] = shear
        a = rot @ shr * zoom.view(n, 1, 1)
        return torch.cat([a, shift.unsqueeze(2)], 2)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = _check_batch(images)
        if n == 0 or self.is_identity:
            return self._unchanged(images, generator)
        m = self.matrices(n, generator)
        a, t = m[:, :, :2], m[:, :, 2:]
        moved = (a != torch.eye(2, dtype=a.dtype)).flatten(1).any(1) | (t != 0).flatten(1).any(1)
        # grid_sample maps output to input coordinates, normalised to [-1, 1] per axis:
        # source = D^-1 A^-1 (D x' - t) with D = diag(w/2, h/2).
        d = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
        inv = torch.linalg.inv(a)
        theta = torch.cat([inv * d.view(1, 1, 2) / d.view(1, 2, 1), -(inv @ t) / d.view(1, 2, 1)], 2)
        x = images if images.is_floating_point() else images.float()
        grid = F.affine_grid(theta.to(device=images.device, dtype=x.dtype), [n, c, h, w], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.fill, align_corners=False)
        if not images.is_floating_point():
            out = out.round_().clamp_(0, 255).to(images.dtype)
        keep = ~moved.to(images.device).view(n, 1, 1, 1)
        return torch.where(keep, images, out)


def _factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"color_jitter {name} must be a number in [0, 1] (the factor is drawn in "
                          f"[1 - {name}, 1 + {name}]; 0 turns it off), got {value!r}")
    return float(value)


class ColorJitter(_Configured):
    """Random brightness, contrast and saturation of each image, in one pass over the batch.

    Each part draws its factor per image uniformly in ``[1 - x, 1 + x]`` and is applied, in this
    order, as torchvision's ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_saturation``
    (values clamped to the valid range after each):

    Args:
        brightness: ``img * f``.
        contrast: ``mean + f * (img - mean)``, ``mean`` the image's mean grey level.
        saturation: ``grey + f * (img - grey)`` per pixel, ``grey`` the ITU-R 601 luma
            (``0.2989 R + 0.587 G + 0.114 B``, as torchvision); nothing for one-channel images.
        p: probability that an image is jittered at all (the others are returned unchanged).

    The defaults (0.4 each, every image) are the usual setting for 84x84 natural images in
    few-shot training (with :class:`RandomCropFlip`: ``[{padding: 8, flip: true}, {name:
    color_jitter}]``).  Unlike torchvision the order of the three parts is fixed (torchvision
    shuffles it per call, i.e. once for the whole batch).  ``uint8`` input gives ``uint8`` output
    (rounded once at the end), float input (values in ``[0, 1]``) float output.  Draws ``4 * N``
    uniform numbers from the generator whatever the settings.
    """

    DRAWS = 4

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 p: float = 1.0) -> None:
        self.brightness = _factor("brightness", brightness)
        self.contrast = _factor("contrast", contrast)
        self.saturation = _factor("saturation", saturation)
        self.p = _number("p (probability of jittering an image)", p, 0.0, 1.0, what="color_jitter")

    def config(self) -> dict:
        return {"name": "color_jitter", "brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "p": self.p}

    @property
    def is_identity(self) -> bool:
        return self.p == 0 or self.brightness == self.contrast == self.saturation == 0

    def factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, 3]`` brightness, contrast and saturation factors (all 1 for an image left alone)."""
        u = torch.rand(n, self.DRAWS, generator=generator, dtype=torch.float64)
        width = torch.tensor([self.brightness, self.contrast, self.saturation], dtype=torch.float64)
        f = 1 + (2 * u[:, 1:] - 1) * width
        return torch.where((u[:, :1] < self.p), f, torch.ones_like(f))

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, _, _ = _check_batch(images)
        if c not in (1, 3):
            raise ConfigError(f"color_jitter needs grey (1-channel) or RGB (3-channel) images, got {c} channels")
        if n == 0 or self.is_identity:
            return self._unchanged(images, generator)
        factors = self.factors(n, generator)
        keep = (factors == 1).all(1).to(images.device).view(n, 1, 1, 1)
        f = factors.to(device=images.device, dtype=torch.float32).view(n, 3, 1, 1, 1).unbind(1)
        top = 1.0 if images.is_floating_point() else 255.0
        x = images.to(torch.float32, copy=True)
        weights = torch.tensor([0.2989, 0.587, 0.114], device=images.device)

        def grey(t: torch.Tensor) -> torch.Tensor:
            return t if c == 1 else torch.einsum("nchw,c->nhw", t, weights).unsqueeze(1)

        x.mul_(f[0]).clamp_(0, top)
        mean = grey(x).mean((1, 2, 3), keepdim=True)
        x.sub_(mean).mul_(f[1]).add_(mean).clamp_(0, top)
        if c == 3:
            g = grey(x)
            x.sub_(g).mul_(f[2]).add_(g).clamp_(0, top)
        out = x.to(images.dtype) if images.is_floating_point() else x.round_().to(images.dtype)
        return torch.where(keep, images, out)  # images drawn to stay as they are: bit for bit


class Compose:
    """Several augmentations applied in order, drawing from the same generator."""

    def __init__(self, augments: Sequence[Any]) -> None:
        self.augments = list(augments)

    def config(self) -> list:
        return [a.config() for a in self.augments]

    def __repr__(self) -> str:
        return f"Compose({self.augments!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compose) and self.augments == other.augments

    @property
    def is_identity(self) -> bool:
        return all(a.is_identity for a in self.augments)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_batch(images)
        out = images
        for a in self.augments:
            out = a(out, generator)
        return out if self.augments else images.clone()


class SupportAugment:
    """Test-time support augmentation: ``copies - 1`` augmented copies of every support image.

    ``expand(x, y, generator)`` returns the support images followed by ``copies - 1`` augmented
    versions of them, with their labels repeated: a prototype head then averages every copy into
    its class mean, a fine-tuned or logistic-regression head trains on all of them.

    Args:
        augment: the augmentation of the copies (anything :func:`build_augment` accepts);
            default :class:`RandomAffine` with its defaults (characters, small images).
        copies: images per support image, the original included (1: no augmentation).
        seed: base seed of the copies' random stream (evaluation derives one generator per
            episode from it and the episode's index, so results are reproducible).
    """

    def __init__(self, augment: Any = None, copies: int = 5, seed: int = 0) -> None:
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ConfigError(f"support_augment copies must be an integer >= 1 (the original included), got {copies!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"support_augment seed must be an integer, got {seed!r}")
        self.augment = build_augment(augment if augment is not None else {"name": "affine"})
        if self.augment is None:
            raise ConfigError("support_augment needs an augmentation (e.g. {name: affine}); set it to null to turn it off")
        self.copies, self.seed = copies, seed

    def config(self) -> dict:
        return {"augment": self.augment.config(), "copies": self.copies, "seed": self.seed}

    def __repr__(self) -> str:
        return f"SupportAugment({self.augment!r}, copies={self.copies}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SupportAugment) and self.config() == other.config()

    def expand(self, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.copies == 1:
            return x, y
        extra = self.augment(x.repeat(self.copies - 1, *([1] * (x.dim() - 1))), generator)
        out = torch.cat([x, extra])
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)  # keep the caller's layout
        return out, y.repeat(self.copies)


#: augmentation name (the ``name`` key of a config mapping) -> class
AUGMENTS: dict[str, type] = {"crop_flip": RandomCropFlip, "affine": RandomAffine, "color_jitter": ColorJitter}


def build_augment(spec: Any) -> Any:
    """An augmentation from a config value.

    * ``null`` / ``false``: none; ``true``: :class:`RandomCropFlip` with ``padding=8, flip=true``;
    * a mapping: ``{name: affine, rotation: 10, ...}`` (:class:`RandomAffine`),
      ``{name: color_jitter, brightness: 0.4, ...}`` (:class:`ColorJitter`) or
      ``{name: crop_flip, padding: 8, flip: true}`` (:class:`RandomCropFlip`, also the meaning of
      a mapping without ``name``);
    * a list of those: applied in order (:class:`Compose`);
    * an augmentation object, returned as is.
    """
    if spec is None or spec is False:
        return None
    if spec is True:
        return RandomCropFlip()
    if isinstance(spec, (RandomCropFlip, RandomAffine, ColorJitter, Compose)):
        return spec
    if isinstance(spec, (list, tuple)):
        parts = [build_augment(s) for s in spec]
        parts = [p for p in parts if p is not None]
        return Compose(parts) if len(parts) > 1 else (parts[0] if parts else None)
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", "crop_flip")
        if not isinstance(name, str) or name not in AUGMENTS:  # a list (YAML name: [affine]) is unhashable
            raise ConfigError(f"unknown augmentation {name!r}.{did_you_mean(name, AUGMENTS)} "
                              f"Valid augmentations: {', '.join(AUGMENTS)}.")
        import inspect

        valid = [k for k in inspect.signature(AUGMENTS[name]).parameters]
        unknown = sorted(set(spec) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} for augmentation {name!r}."
                              f"{did_you_mean(unknown[0], valid)} Valid keys: name, {', '.join(valid)}.")
        return AUGMENTS[name](**spec)
    raise ConfigError(
        f"augment must be null, true, a mapping such as {{name: affine}}, {{name: color_jitter}} or {{padding: 8, flip: true}}, "
        f"or a list of them; got {spec!r}"
    )
