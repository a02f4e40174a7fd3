"""Classification heads and their per-task initialisation.

A head maps trunk features ``[B, D]`` to ``[B, ways]`` logits.  Meta-learned heads have a fixed
number of outputs; *per-task* heads are created for each episode, for any number of ways:

* ``"learned"``: the model's own meta-learned head (fixed ``ways``, as in the MAML paper).
* ``"zero"``: weights and bias start at zero; one SGD step on them is a centroid classifier.
* ``"proto"``: weights ``2 c_k`` and bias ``-||c_k||^2`` from the class means ``c_k`` of the
  support features, so the initial logits are negative squared distances to the class means up
  to a per-example constant (Proto-MAML, Triantafillou et al. 2020).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError, unknown_name

HEAD_INITS = ("learned", "zero", "proto")


def label_counts(labels: torch.Tensor, ways: int) -> torch.Tensor:
    """How many of ``labels`` (integer) are each class ``0..ways-1``: ``[ways]``; :class:`InputError`
    unless they cover every class and stay in ``0..ways-1``."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InputError(f"support labels must be integer class ids 0..{ways - 1}, got dtype {labels.dtype}")
    labels = labels.long()
    outside = (labels < 0) | (labels >= ways)
    counts = torch.bincount(labels.clamp(0, ways), minlength=ways + 1)[:ways]  # ways: the bin of labels >= ways
    if bool(outside.any() | (counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        outside = sorted(set(labels[outside].tolist()))
        raise InputError(
            f"support labels must cover every class 0..{ways - 1} at least once, and be no other value; "
            f"missing {missing}, outside 0..{ways - 1} {outside}, labels seen {sorted(set(labels.tolist()))}"
        )
    return counts


def class_means(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean feature vector of each class ``0..ways-1``: ``[ways, D]``."""
    counts = label_counts(labels, ways)
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels.long(), features)
    return sums / counts.to(features.dtype).unsqueeze(1)


def initial_head_params(
    init: str, features: torch.Tensor | None, labels: torch.Tensor | None, ways: int, dim: int,
    like: torch.Tensor,
) -> list[torch.Tensor]:
    """``[weight [ways, dim], bias [ways]]`` for a fresh per-task head."""
    if init == "zero":
        return [like.new_zeros(ways, dim), like.new_zeros(ways)]
    if init == "proto":
        if features is None or labels is None:
            raise InputError("proto head initialisation needs support features and labels")
        protos = class_means(features, labels, ways)
        return [2.0 * protos, -(protos * protos).sum(1)]
    raise unknown_name("head initialisation", init, HEAD_INITS)


class LinearHead(nn.Linear):
    """A linear classifier on trunk features."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
