"""Models for several datasets: per-dataset stems, a shared (or softly shared) trunk, heads.

Datasets with different image sizes or channels reach one trunk through a per-dataset *stem*:

* ``"conv"`` - a learned conv block (strided conv-BN-ReLU-pool, see :func:`make_stem`) from the
  dataset's channels to ``width`` channels of ``size x size``;
* ``"resize"`` - a fixed input transform: grey <-> RGB (repeat or average the channels) and a
  bilinear resize to ``width`` channels of ``size x size``.

Sharing of the trunk (the conv blocks after the stem):

* ``"hard"`` - one trunk for every dataset (hard parameter sharing);
* ``"soft"`` - one trunk per dataset, tied by the penalty :meth:`MultiDatasetModel.penalty`
  ``= soft_weight * sum_k ||theta_k - mean_k theta||^2`` (added by the ``multitask`` algorithm).

Heads: ``"shared"`` (one head), ``"per_dataset"`` (one head per dataset) or none
(``out_features=None``: per-task heads, ``head_init`` ``"zero"``/``"proto"``).

Which dataset an input comes from is taken from :func:`dataset_scope` (the ``multitask``
algorithm opens one per dataset group and per evaluated episode) and otherwise inferred from the
input's shape, which works whenever the datasets' shapes differ.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, unknown_name
from .backbones import Conv4, TrunkHead
from .heads import LinearHead
from .norm import EpisodicBatchNorm

_DATASET: contextvars.ContextVar[str | None] = contextvars.ContextVar("metamtl_dataset", default=None)
STEMS = ("conv", "resize")
SHARING = ("hard", "soft")
HEADS = ("shared", "per_dataset")


@contextlib.contextmanager
def dataset_scope(name: str | None) -> Iterator[None]:
    """Inside this block, multi-dataset models route inputs to dataset ``name``."""
    token = _DATASET.set(name)
    try:
        yield
    finally:
        _DATASET.reset(token)


def current_dataset() -> str | None:
    return _DATASET.get()


def _routed(model: nn.Module) -> "DatasetRouted | None":
    """The part of ``model`` that routes inputs by dataset: the model itself or its trunk, if either does."""
    routed = model if isinstance(model, DatasetRouted) else getattr(model, "trunk", None)
    return routed if isinstance(routed, DatasetRouted) else None


def dataset_inputs(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Each dataset's input shape ``(channels, height, width)`` in a multi-dataset ``model`` (or
    trunk); empty for other models."""
    routed = _routed(model)
    return dict(routed.inputs) if routed is not None else {}


def routed_dataset(model: nn.Module, dataset: str | None = None, x: torch.Tensor | None = None) -> str | None:
    """The dataset whose branches inputs ``x`` of ``dataset`` (``None``: not known) take in ``model``
    (a multi-dataset model or trunk), to open a :func:`dataset_scope` with: ``dataset`` if it is one
    of the model's datasets, else the open scope's, else the one ``x``'s shape fits (an
    :class:`InputError` if several do); ``None`` for other models."""
    routed = _routed(model)
    if routed is None:
        return None
    if dataset is not None and dataset in routed.inputs:
        return dataset
    return routed.route(x) if x is not None else current_dataset()


def routed_scope(model: nn.Module, dataset: str | None = None, x: torch.Tensor | None = None):
    """The :func:`dataset_scope` an episode of ``dataset`` with support inputs ``x`` runs in on
    ``model`` (see :func:`routed_dataset`): the algorithms' per-episode code opens it, so parts
    called on features alone (per-dataset heads under head-only adaptation) know their dataset;
    for other models no scope (the open one stays)."""
    name = routed_dataset(model, dataset, x)
    return contextlib.nullcontext() if name is None else dataset_scope(name)


def _check_inputs(inputs: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int, int]]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise ConfigError("a multi-dataset model needs 'inputs': {dataset: [channels, height, width]}")
    out = {}
    for name, shape in inputs.items():
        name = str(name)
        if not name or "." in name or hasattr(nn.ModuleDict(), name):
            why, fix = (("is empty", "data") if not name else ("contains '.'", name.replace(".", "_")) if "." in name
                        else ("is the name of a torch module attribute", name + "_data"))
            raise ConfigError(f"dataset label {name!r} {why}: labels name the per-dataset stems, trunks and heads; "
                              f"use a non-empty label without '.' that is no module attribute, e.g. {fix!r}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"inputs[{name!r}] must be [channels, height, width], got {list(shape)}")
        out[str(name)] = shape
    return out


class Resize(nn.Module):
    """Fixed input transform to ``channels x size x size`` (grey <-> RGB, bilinear resize)."""

    def __init__(self, in_channels: int, channels: int, size: int) -> None:
        super().__init__()
        if in_channels != channels and 1 not in (in_channels, channels):
            raise ConfigError(f"resize stem cannot map {in_channels} channels to {channels}; use the conv stem")
        self.in_channels, self.channels, self.size = in_channels, channels, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


def make_stem(kind: str, shape: tuple[int, int, int], width: int, size: int) -> nn.Module:
    """A stem from a dataset's ``(C, H, W)`` to ``(width, size, size)``.

    The conv stem is a 3x3 convolution with stride ``min(H, W) // (2 size)`` (1 for 28-pixel
    Omniglot, 3 - non-overlapping patches - for 84-pixel mini-ImageNet, so large images cost
    about as much as small ones), BatchNorm, ReLU and 2x2 max-pooling, then adaptive average
    pooling to ``size`` when the side is not yet ``size``.
    """
    channels, h, w = shape
    for name, value in (("width", width), ("size", size)):  # size 0 divided by zero below
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"a multidataset stem's {name} must be an integer >= 1, got {value!r} "
                              f"(model.{name}: the stems' output {'channels' if name == 'width' else 'side'})")
    if kind == "resize":
        return Resize(channels, width, size)
    if kind != "conv":
        raise unknown_name("stem", kind, STEMS)
    stride = max(1, min(h, w) // (2 * size))
    conv = nn.Conv2d(channels, width, 3, stride=stride, padding=1)
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv, EpisodicBatchNorm(width), nn.ReLU(), nn.MaxPool2d(2)]
    out_h, out_w = ((h - 1) // stride + 1) // 2, ((w - 1) // stride + 1) // 2
    if min(out_h, out_w) < size:
        raise ConfigError(f"a conv stem turns {h}x{w} inputs into {out_h}x{out_w}, smaller than size={size}")
    if (out_h, out_w) != (size, size):
        layers.append(nn.AdaptiveAvgPool2d(size))
    return nn.Sequential(*layers)


class DatasetRouted(nn.Module):
    """Base of modules that pick a per-dataset branch for each input."""

    def __init__(self, inputs: Mapping[str, Sequence[int]]) -> None:
        super().__init__()
        self.inputs = _check_inputs(inputs)

    def route(self, x: torch.Tensor | None = None) -> str:
        """The dataset of this forward pass: the open :func:`dataset_scope`, else by input shape."""
        name = current_dataset()
        if name is not None:
            if name not in self.inputs:
                raise InputError(f"dataset {name!r} is not one of this model's datasets {list(self.inputs)}")
            if x is not None and tuple(x.shape[1:]) != self.inputs[name]:
                raise InputError(
                    f"inputs of shape {list(x.shape[1:])} run as dataset {name!r}, which takes "
                    f"{list(self.inputs[name])}: name each task source (episode.dataset) and dataset= after the "
                    "dataset its images belong to, or preprocess them as that dataset's training data")
            return name
        if x is None:
            raise InputError(
                f"this model has one branch per dataset ({list(self.inputs)}) and cannot tell which one to "
                "use; run it under metamtl.models.dataset_scope(name) (the multitask algorithm does)"
            )
        matches = [n for n, s in self.inputs.items() if tuple(x.shape[1:]) == s]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InputError(
                f"inputs of shape {list(x.shape[1:])} match none of this model's datasets "
                f"{ {n: list(s) for n, s in self.inputs.items()} }; preprocess them like the training data"
            )
        raise InputError(
            f"inputs of shape {list(x.shape[1:])} fit several datasets {matches}; say which with "
            "metamtl.models.dataset_scope(name)"
        )


class MultiDatasetTrunk(DatasetRouted):
    """Per-dataset stems into one shared trunk (``sharing="hard"``) or per-dataset trunks (``"soft"``)."""

    def __init__(self, inputs: Mapping[str, Sequence[int]], stems: Mapping[str, nn.Module],
                 trunks: Mapping[str, nn.Module] | nn.Module) -> None:
        super().__init__(inputs)
        self.stems = nn.ModuleDict(dict(stems))
        if isinstance(trunks, nn.Module):
            self.shared = trunks
            self.trunks = None
        else:
            self.shared = None
            self.trunks = nn.ModuleDict(dict(trunks))
        body = self.shared if self.shared is not None else next(iter(self.trunks.values()))
        self.out_features = int(body.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.route(x)
        x = self.stems[name](x)
        return (self.shared if self.shared is not None else self.trunks[name])(x)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) not in set(self.inputs.values()):
            raise InputError(
                f"model expects images of shape [batch, C, H, W] with (C, H, W) one of "
                f"{ {n: list(s) for n, s in self.inputs.items()} }, got {list(x.shape)}"
            )


class DatasetHeads(DatasetRouted):
    """One linear head per dataset on shared features (hard parameter sharing).

    Features carry no dataset, so the dataset comes from :func:`dataset_scope`;
    :class:`MultiDatasetModel` opens one from the input shape when called directly.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]], in_features: int, out_features: int) -> None:
        super().__init__(inputs)
        self.heads = nn.ModuleDict({n: LinearHead(in_features, out_features) for n in self.inputs})
        self.out_features = int(out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.heads[self.route()](features)


class MultiDatasetModel(TrunkHead):
    """A :class:`~metamtl.models.TrunkHead` whose trunk and head route inputs per dataset."""

    def __init__(self, trunk: MultiDatasetTrunk, head: nn.Module | None, soft_weight: float = 0.0,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(trunk, head, config)
        self.soft_weight = float(soft_weight)

    @property
    def datasets(self) -> list[str]:
        return list(self.trunk.inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise InputError("this model has no head of its own (per-task heads); use a MetaLearner to adapt it")
        with dataset_scope(self.trunk.route(x)):
            return self.head(self.trunk(x))

    def penalty(self) -> torch.Tensor | None:
        """Soft-sharing penalty ``soft_weight * sum_k ||theta_k - mean_k theta||^2`` (``None``: hard sharing)."""
        trunks = self.trunk.trunks
        if trunks is None or self.soft_weight == 0:
            return None
        total = None
        for tied in zip(*(t.parameters() for t in trunks.values())):
            stacked = torch.stack(tied)
            term = (stacked - stacked.mean(0, keepdim=True)).pow(2).sum()
            total = term if total is None else total + term
        return self.soft_weight * total


def multidataset_model(
    inputs: Mapping[str, Sequence[int]],
    stem: str = "conv",
    width: int = 64,
    size: int = 14,
    hidden: int = 64,
    blocks: int = 3,
    sharing: str = "hard",
    soft_weight: float = 1e-3,
    heads: str = "shared",
    out_features: int | None = 5,
) -> MultiDatasetModel:
    """Build a :class:`MultiDatasetModel` (registered as model ``"multidataset"``).

    Args:
        inputs: ``{dataset: [channels, height, width]}`` (filled in from the data by the CLI).
        stem: ``"conv"`` or ``"resize"`` (see the module docstring); ``width``/``size``: the
            stems' output channels and side.
        hidden, blocks: conv blocks of the trunk after the stem (a Conv4 with ``blocks`` blocks).
        sharing: ``"hard"`` (one trunk) or ``"soft"`` (one per dataset, L2-tied with ``soft_weight``).
        heads: ``"shared"`` or ``"per_dataset"``; ``out_features=None`` for per-task heads.
    """
    shapes = _check_inputs(inputs)
    if sharing not in SHARING:
        raise unknown_name("sharing mode", sharing, SHARING)
    if heads not in HEADS:
        raise unknown_name("head sharing", heads, HEADS)
    if not (math.isfinite(soft_weight) and soft_weight >= 0):
        raise ConfigError(f"soft_weight must be >= 0, got {soft_weight}")
    if heads == "per_dataset" and not out_features:  # a warning: such models were built and saved before
        warnings.warn(
            "model.heads: per_dataset has no effect without out_features: the heads are per-task (the "
            "algorithm's head_init zero or proto) and not per dataset; drop heads: per_dataset, or set "
            "head_init: learned for learned per-dataset heads", UserWarning, stacklevel=2)
    stems = {n: make_stem(stem, s, width, size) for n, s in shapes.items()}
    make_trunk = lambda: Conv4(width, hidden, size, blocks)  # noqa: E731
    body = make_trunk() if sharing == "hard" else {n: make_trunk() for n in shapes}
    if sharing == "soft":  # tied trunks start equal
        first = next(iter(body.values()))
        for t in body.values():
            t.load_state_dict(first.state_dict())
    trunk = MultiDatasetTrunk(shapes, stems, body)
    head: nn.Module | None = None
    if out_features:
        head = (LinearHead(trunk.out_features, out_features) if heads == "shared"
                else DatasetHeads(shapes, trunk.out_features, out_features))
    return MultiDatasetModel(trunk, head, soft_weight if sharing == "soft" else 0.0)
