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


def class_means(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean feature vector of each class ``0..ways-1``: ``[ways, D]``."""
    counts = torch.bincount(labels, minlength=ways)
    if counts.numel() > ways or bool((counts[:ways] == 0).any()):
        missing = torch.nonzero(counts[:ways] == 0).flatten().tolist()
        raise InputError(
            f"support labels must cover every class 0..{ways - 1} at least once; "
            f"missing {missing}, labels seen {sorted(set(labels.tolist()))}"
        )
    sums = torch.zeros(ways, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)
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
