"""Batch normalisation for episodic learning.

Meta-learning models normalise with the statistics of the batch they are given and keep no
running statistics (as in the MAML paper): every task is normalised with its own statistics, at
training and at test time.  Two modes decide which images make up "the batch" for query images:

* ``"transductive"`` (default, the MAML protocol): query images are forwarded as one batch and
  normalised with the query batch's own statistics.
* ``"support"``: query images are normalised with the *support set's* statistics, so each query
  prediction is independent of the other query images (a single image can be predicted).  The
  learner forwards ``cat([support, query])`` inside :func:`stats_from_first` and the layers
  compute mean/variance over the first ``n_support`` rows only.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

BN_MODES = ("transductive", "support")
_REFERENCE_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("bn_reference_rows", default=None)


@contextlib.contextmanager
def stats_from_first(rows: int | None) -> Iterator[None]:
    """Inside this block, :class:`EpisodicBatchNorm` layers use statistics of the first ``rows`` rows."""
    token = _REFERENCE_ROWS.set(rows)
    try:
        yield
    finally:
        _REFERENCE_ROWS.reset(token)


class EpisodicBatchNorm(nn.BatchNorm2d):
    """BatchNorm without running statistics whose statistics can come from a reference subset."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        rows = _REFERENCE_ROWS.get()
        if rows is None or rows >= x.shape[0]:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        ref = x[:rows]
        dims = [0] + list(range(2, x.dim()))
        mean = ref.mean(dims, keepdim=True)
        var = ref.var(dims, unbiased=False, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out
