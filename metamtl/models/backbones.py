"""Trunks (feature extractors) and the trunk + head model every algorithm works on."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .heads import LinearHead
from .norm import EpisodicBatchNorm


class ConvBlock(nn.Sequential):
    """3x3 conv -> episodic BatchNorm -> ReLU -> 2x2 max-pool (``pool=False``: no pooling).

    Computed as conv -> BatchNorm -> max-pool -> ReLU: ReLU is monotone, so it commutes with
    max-pooling exactly (same outputs and gradients, ties included) and then touches a quarter of
    the values.  Without pooling the fourth module is an identity, so parameter names are the same
    either way.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            EpisodicBatchNorm(out_channels),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=False) if pool else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        conv, norm, relu, pool = self
        return relu(pool(norm(conv(x))))


class Conv4(nn.Module):
    """The 4-block CNN of the MAML paper (Finn et al. 2017) and most few-shot work.

    Args:
        in_channels: 1 for Omniglot, 3 for mini-ImageNet.
        hidden: filters per block (64 for Omniglot, 32 for mini-ImageNet in the paper), or a
            list of ``blocks`` widths, one per block (e.g. ``[64, 96, 128, 256]``).
        image_size: input height/width, used to compute the feature size.
        blocks: number of conv blocks.
        pool: whether each block ends in 2x2 max-pooling: ``True`` (default, every block), or a
            list of ``blocks`` booleans, e.g. ``[true, true, true, false]`` keeps the last block's
            3x3 map on 28x28 Omniglot (576 features for 64 filters instead of 64).
        feature_norm: if set, the features are L2-normalised and multiplied by it (see
            :func:`scaled_unit`); ``None`` (default) leaves them as they are.
    """

    def __init__(self, in_channels: int = 1, hidden: int | list[int] = 64, image_size: int = 28,
                 blocks: int = 4, feature_norm: float | None = None, pool: bool | list[bool] = True) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size), ("blocks", blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Conv4 needs {key} to be an integer >= 1, got {value!r}")
        widths = block_widths("Conv4 hidden", hidden, blocks)
        pools = block_pools(pool, blocks)
        side = int(image_size) // 2 ** sum(pools)  # each 2x2 max-pool floors the side's half
        if side < 1:
            raise ConfigError(f"image_size {image_size} is too small for {sum(pools)} pooling blocks")
        chans = [in_channels] + widths
        self.blocks = nn.Sequential(*[ConvBlock(chans[i], chans[i + 1], pools[i]) for i in range(blocks)])
        self.in_channels = in_channels
        self.image_size = int(image_size)
        self.out_features = widths[-1] * side * side
        self.feature_norm = check_feature_norm(feature_norm)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_unit(self.blocks(x).flatten(1), self.feature_norm)

    def check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_channels, self.image_size)


def check_feature_norm(value: Any) -> float | None:
    """A trunk's ``feature_norm`` setting: ``None`` or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"feature_norm must be a number > 0 (the length of the normalised features) "
                          f"or null for raw features, got {value!r}")
    return float(value)


def scaled_unit(features: torch.Tensor, norm: float | None) -> torch.Tensor:
    """``norm * f / ||f||`` per row (cosine features of length ``norm``), or ``f`` when ``norm`` is None.

    Why: a linear or prototype head on raw features is as sharp as the features are long, so the
    inner learning rate that suits one trunk diverges on another (the 64-way cosine-classifier
    pre-trained conv4-64 of RESULTS.md gives mini-ImageNet features of length 5-25, mean 12: a
    prototype head over them is a cosine classifier of scale ~300). On features of length ``s``
    the prototype head's logits are ``2 s^2 cos(f, c) - s^2``: a cosine classifier with scale
    ``2 s^2`` (``s = 2.24``: scale 10, as Meta-Baseline), and an SGD step of the head at rate
    ``lr`` moves a logit by at most about ``lr * s^2``, whatever the trunk."""
    return features if norm is None else norm * F.normalize(features, dim=-1)


def check_image_input(x: torch.Tensor, channels: int, size: int) -> None:
    """:class:`InputError` unless ``x`` is a batch of ``channels x size x size`` images."""
    expected = (channels, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise InputError(
            f"model expects images of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {list(x.shape)}"
        )


def per_block(value: Any, blocks: int, valid: Callable[[Any], bool], message: str) -> list:
    """One setting per block from a single value (every block) or a list of ``blocks`` values, each
    ``valid``; otherwise :class:`ConfigError` with ``message`` and the value given."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * blocks
    if len(items) != blocks or not all(valid(v) for v in items):
        raise ConfigError(f"{message}, got {value!r}")
    return items


def block_widths(what: str, value: Any, blocks: int) -> list[int]:
    """One width per block from an integer (all blocks) or a list of ``blocks`` integers."""
    widths = per_block(value, blocks, lambda w: isinstance(w, int) and not isinstance(w, bool) and w >= 1,
                       f"{what} must be an integer >= 1 or a list of {blocks} of them (one per block)")
    return [int(w) for w in widths]


def block_pools(value: Any, blocks: int) -> list[bool]:
    """One pooling flag per block from a boolean (all blocks) or a list of ``blocks`` booleans."""
    return per_block(value, blocks, lambda p: isinstance(p, bool),
                     f"Conv4 pool must be true / false or a list of {blocks} of them (whether each block "
                     "ends in 2x2 max-pooling, e.g. [true, true, true, false])")


class MLP(nn.Module):
    """A ReLU MLP trunk (the MAML sinusoid regressor uses two hidden layers of 40)."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40)) -> None:
        super().__init__()
        if isinstance(hidden, (int, str)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ConfigError(f"MLP hidden must be a list of layer widths >= 1, got {hidden!r}")
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ConfigError(f"MLP in_features must be an integer >= 1, got {in_features!r}")
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU()]
            prev = int(h)
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise InputError(f"model expects inputs of shape [batch, {self.in_features}], got {list(x.shape)}")


def uncompiled(module: Any, role: str) -> Any:
    """``module`` without the wrapper ``torch.compile`` puts around it (with a warning).

    metamtl runs the model with per-task weights through ``torch.func`` and differentiates the
    meta-gradient through the inner loop (second order): compiled graphs refuse the second
    (``create_graph``) backward pass, and the wrapper would put ``_orig_mod.`` into every checkpoint
    key, so a learner saved from it would not load into the uncompiled model.
    """
    original = getattr(module, "_orig_mod", None)
    if isinstance(module, nn.Module) and isinstance(original, nn.Module):
        warnings.warn(f"the {role} was wrapped by torch.compile: metamtl runs the module itself (compiled graphs "
                      "cannot be differentiated twice, as second-order meta-gradients need, and would change the "
                      "checkpoint's parameter names); pass the module without torch.compile to silence this",
                      stacklevel=3)
        return original
    return module


class TrunkHead(nn.Module):
    """A shared trunk plus a head: ``logits = head(trunk(x))``.

    ``head`` may be ``None`` when heads are created per task (``head_init`` ``"zero"`` or
    ``"proto"``); then :attr:`out_features` is ``None`` and the model serves any number of ways.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module | None, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.trunk = uncompiled(trunk, "trunk")
        self.head = uncompiled(head, "head")
        self.config = dict(config or {})

    @property
    def num_features(self) -> int:
        """Features per example the trunk gives: its ``out_features`` or, failing that, the head's
        ``in_features``; :class:`ConfigError` when neither says."""
        n = getattr(self.trunk, "out_features", None)
        if n is None and self.head is not None:
            n = getattr(self.head, "in_features", None)
        if n is None:
            raise ConfigError(
                f"the trunk {type(self.trunk).__name__} does not say how many features it gives, and per-task "
                "heads are built on them: set trunk.out_features = <features per example> (e.g. in its "
                "__init__), or give the model a head with in_features"
            )
        return int(n)

    @property
    def out_features(self) -> int | None:
        """Outputs of the model's own head (``None``: no head, per-task heads): its ``out_features``
        or, failing that, its last ``nn.Linear``'s; :class:`ConfigError` when neither says."""
        if self.head is None:
            return None
        n = getattr(self.head, "out_features", None)
        if n is None:
            linear = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
            if not linear:
                raise ConfigError(
                    f"the head {type(self.head).__name__} does not say how many outputs it gives (the number of "
                    "ways, or regression outputs), and has no nn.Linear layer to tell: set head.out_features = "
                    "<outputs per example> (e.g. in its __init__)"
                )
            n = linear[-1].out_features
        return int(n)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise InputError("this model has no head of its own (per-task heads); use a MetaLearner to adapt it")
        return self.head(self.trunk(x))

    def check_input(self, x: torch.Tensor) -> None:
        check = getattr(self.trunk, "check_input", None)
        if check is not None:
            check(x)


def conv4_model(in_channels: int = 1, hidden: int | list[int] = 64, image_size: int = 28, blocks: int = 4,
           out_features: int | None = 5, feature_norm: float | None = None,
           pool: bool | list[bool] = True) -> TrunkHead:
    trunk = Conv4(in_channels, hidden, image_size, blocks, feature_norm, pool)
    head = LinearHead(trunk.out_features, out_features) if out_features else None
    return TrunkHead(trunk, head)


def mlp_model(in_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40), out_features: int | None = 1) -> TrunkHead:
    trunk = MLP(in_features, hidden)
    head = LinearHead(trunk.out_features, out_features) if out_features else None
    return TrunkHead(trunk, head)
