"""Helpers for the algorithm tests: tiny models, random episodes, a learnable toy dataset."""
from __future__ import annotations

import torch

from metamtl.data import ClassDataset, Preprocessing
from metamtl.models import build_model
from metamtl.tasks import Episode


def tiny(out_features=3, hidden=4, seed=0):
    torch.manual_seed(seed)
    return build_model("conv4", in_channels=1, hidden=hidden, image_size=8, blocks=2, out_features=out_features)


def episode(ways=3, shots=2, queries=2, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(ways * shots, 1, size, size, generator=g), torch.arange(ways).repeat_interleave(shots),
                   torch.randn(ways * queries, 1, size, size, generator=g), torch.arange(ways).repeat_interleave(queries),
                   ways, shots, queries, classes=tuple(range(ways)))


def toy_dataset(classes=40, per_class=10, size=12, noise=0.2):
    """Class prototypes plus noise: learnable in a few iterations."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(classes, 1, size, size, generator=g)
    pixels = torch.rand(classes * per_class, 1, size, size, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * (1 - noise) + noise * pixels) * 255).to(torch.uint8)
    prep = Preprocessing(size=(size, size), channels=1, mean=(0.5,), std=(0.25,))
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name="toy", preprocessing=prep)
