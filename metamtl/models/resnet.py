"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): the standard few-shot backbone beside conv4.

Four residual blocks of three 3x3 conv -> BatchNorm -> LeakyReLU(0.1) layers (the last without
its activation before the residual sum), a 1x1 conv + BatchNorm shortcut, LeakyReLU after the
sum, then 2x2 max-pooling; global average pooling at the end (as in MetaOptNet, RFS and
Meta-Baseline), so features are ``widths[-1]``-dimensional (640 with the usual widths
64-160-320-640, about 12.4 M parameters).  BatchNorm layers are :class:`EpisodicBatchNorm`, like
conv4's: statistics of each forward pass, so every algorithm, the fast path and the
``bn_stats`` settings work unchanged.  Built for GPUs; on a CPU it is ~40x conv4-64's cost
at 84x84 (a short CPU run is what the tests do).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .backbones import TrunkHead, block_widths, check_feature_norm, check_image_input, scaled_unit
from .heads import LinearHead
from .norm import EpisodicBatchNorm

POOLS = ("avg", "flatten")


class ResBlock(nn.Module):
    """conv-BN-LeakyReLU x2, conv-BN, + (1x1 conv-BN shortcut), LeakyReLU, 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, slope: float = 0.1) -> None:
        super().__init__()
        self.slope = slope
        self.convs = nn.ModuleList([
            nn.Conv2d(c, out_channels, 3, padding=1, bias=False) for c in (in_channels, out_channels, out_channels)])
        self.norms = nn.ModuleList([EpisodicBatchNorm(out_channels) for _ in range(3)])
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), EpisodicBatchNorm(out_channels))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out = norm(conv(out))
            if i < 2:
                out = F.leaky_relu(out, self.slope)
        return self.pool(F.leaky_relu(out + self.shortcut(x), self.slope))


class ResNet12(nn.Module):
    """ResNet-12 trunk.

    Args:
        in_channels: 3 for mini-ImageNet, 1 for Omniglot.
        widths: filters of the four blocks (64-160-320-640 is the usual; 64-128-256-512 the
            narrower variant of TADAM/Meta-Baseline).
        image_size: input height/width (at least 16: four 2x2 poolings).
        pool: ``"avg"`` (global average pooling, ``widths[-1]`` features) or ``"flatten"``.
        slope: LeakyReLU negative slope.
        feature_norm: if set, features are L2-normalised and multiplied by it (as :class:`Conv4`'s).
    """

    def __init__(self, in_channels: int = 3, widths: list[int] | tuple[int, ...] = (64, 160, 320, 640),
                 image_size: int = 84, pool: str = "avg", slope: float = 0.1,
                 feature_norm: float | None = None) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ResNet12 needs {key} to be an integer >= 1, got {value!r}")
        widths = block_widths("ResNet12 widths", list(widths) if isinstance(widths, tuple) else widths, 4)
        if image_size < 16:
            raise ConfigError(f"ResNet12 needs image_size >= 16 (four 2x2 poolings), got {image_size}")
        if pool not in POOLS:
            raise ConfigError(f"ResNet12 pool must be one of {', '.join(POOLS)}, got {pool!r}")
        chans = [in_channels] + widths
        self.blocks = nn.Sequential(*[ResBlock(chans[i], chans[i + 1], slope) for i in range(4)])
        self.in_channels, self.image_size, self.pool = in_channels, int(image_size), pool
        side = int(image_size) // 16
        self.out_features = widths[-1] if pool == "avg" else widths[-1] * side * side
        self.feature_norm = check_feature_norm(feature_norm)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(x)
        return scaled_unit(out.mean((2, 3)) if self.pool == "avg" else out.flatten(1), self.feature_norm)

    def check_input(self, x: torch.Tensor) -> None:
        check_image_input(x, self.in_channels, self.image_size)


def resnet12_model(in_channels: int = 3, widths: list[int] | tuple[int, ...] = (64, 160, 320, 640),
                   image_size: int = 84, pool: str = "avg", out_features: int | None = 5,
                   feature_norm: float | None = None) -> TrunkHead:
    """``build_model("resnet12", ...)``: a ResNet-12 trunk plus an optional meta-learned head."""
    trunk = ResNet12(in_channels, widths, image_size, pool, feature_norm=feature_norm)
    head = LinearHead(trunk.out_features, out_features) if out_features else None
    return TrunkHead(trunk, head)


__all__: Any = ["ResBlock", "ResNet12", "resnet12_model", "POOLS"]
