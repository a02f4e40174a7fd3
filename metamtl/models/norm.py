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

Per-step parameters and running statistics (MAML++ "BNWB" and "BNRS")
    :class:`StepNorms` holds, for every :class:`EpisodicBatchNorm` layer of a model, ``sets``
    copies of the affine weight/bias and of the running mean/variance.  Inside
    ``with norms.use(k):`` each layer uses set ``min(k, sets - 1)`` instead of its own affine
    parameters, and

    * in training mode (``layer.training``) normalises with batch statistics as above and
      folds them into set ``k``'s running statistics (momentum update, unbiased variance, as
      ``nn.BatchNorm2d``);
    * in eval mode normalises with set ``k``'s running statistics when ``norms.eval_stats`` is
      ``"running"`` (every image independently: no transduction), or with batch statistics as
      in training when it is ``"batch"``.

    Outside such a block, or for layers of another model, nothing changes.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

BN_MODES = ("transductive", "support")
BN_EVAL_STATS = ("running", "batch")
_REFERENCE_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("bn_reference_rows", default=None)
_STEP_NORMS: contextvars.ContextVar[tuple["StepNorms", int] | None] = contextvars.ContextVar("bn_step", default=None)
_LAYER_IDS = itertools.count()


@contextlib.contextmanager
def stats_from_first(rows: int | None) -> Iterator[None]:
    """Inside this block, :class:`EpisodicBatchNorm` layers use statistics of the first ``rows`` rows."""
    token = _REFERENCE_ROWS.set(rows)
    try:
        yield
    finally:
        _REFERENCE_ROWS.reset(token)


def _normalise(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    running: tuple[torch.Tensor, torch.Tensor] | None = None, momentum: float = 0.0,
) -> torch.Tensor:
    """Batch-statistics normalisation (over the reference rows, if set); updates ``running``."""
    rows = _REFERENCE_ROWS.get()
    if rows is None or rows >= x.shape[0]:
        mean, var = running if running is not None else (None, None)
        return F.batch_norm(x, mean, var, weight, bias, True, momentum, eps)
    ref = x[:rows]
    dims = [0] + list(range(2, x.dim()))
    mean = ref.mean(dims, keepdim=True)
    var = ref.var(dims, unbiased=False, keepdim=True)
    if running is not None:
        with torch.no_grad():
            n = ref.numel() / ref.shape[1]
            running[0].lerp_(mean.flatten(), momentum)
            running[1].lerp_(var.flatten() * n / max(n - 1, 1), momentum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = out * weight.view(shape) + bias.view(shape)
    return out


class EpisodicBatchNorm(nn.BatchNorm2d):
    """BatchNorm without running statistics whose statistics can come from a reference subset.

    Per-step parameters and statistics can be swapped in with :meth:`StepNorms.use`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)
        self.layer_id = next(_LAYER_IDS)  # stable across higher's functional copies and deepcopy

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        step = _STEP_NORMS.get()
        if step is not None:
            norms, k = step
            slot = norms.slots.get(getattr(self, "layer_id", None))
            if slot is not None:
                return norms.normalise(slot, k, x, self.training, self.eps, self.weight, self.bias)
        return _normalise(x, self.weight, self.bias, self.eps)


class StepNorms(nn.Module):
    """Per-step affine parameters and running statistics for a model's EpisodicBatchNorm layers.

    Args:
        model: the model whose :class:`EpisodicBatchNorm` layers get per-step copies; the
            affine parameters start as copies of the layers' own.
        sets: number of per-step sets (MAML++: inner steps + 1, set ``k`` for weights after
            ``k`` updates).
        momentum: running-statistics momentum.
        eval_stats: ``"running"`` or ``"batch"``: statistics used in eval mode.
        affine: learn per-step weights and biases (otherwise the layers' own are used).
    """

    def __init__(self, model: nn.Module, sets: int, momentum: float = 0.1, eval_stats: str = "running",
                 affine: bool = True) -> None:
        super().__init__()
        layers = [m for m in model.modules() if isinstance(m, EpisodicBatchNorm)]
        self.sets, self.momentum, self.eval_stats, self.affine = int(sets), float(momentum), eval_stats, affine
        self.features = [layer.num_features for layer in layers]
        self.slots: dict[int, int] = {}
        self.bind(model)
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for i, layer in enumerate(layers):
            if affine:
                self.weight.append(nn.Parameter(layer.weight.detach().repeat(self.sets, 1)))
                self.bias.append(nn.Parameter(layer.bias.detach().repeat(self.sets, 1)))
            self.register_buffer(f"running_mean_{i}", layer.weight.new_zeros(self.sets, layer.num_features))
            self.register_buffer(f"running_var_{i}", layer.weight.new_ones(self.sets, layer.num_features))

    def bind(self, model: nn.Module) -> None:
        """Serve ``model``'s layers (e.g. the same architecture rebuilt on load), in module order."""
        layers = [m for m in model.modules() if isinstance(m, EpisodicBatchNorm)]
        if [layer.num_features for layer in layers] != self.features:
            raise ConfigError(
                f"per-step BatchNorm sets were made for layers of {self.features} channels, this model has "
                f"{[layer.num_features for layer in layers]}; build a new algorithm for it"
            )
        self.slots = {layer.layer_id: i for i, layer in enumerate(layers)}

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator[None]:
        """Inside this block the model's layers use set ``min(k, sets - 1)``."""
        token = _STEP_NORMS.set((self, min(int(k), self.sets - 1)))
        try:
            yield
        finally:
            _STEP_NORMS.reset(token)

    def normalise(self, slot: int, k: int, x: torch.Tensor, training: bool, eps: float,
                  weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """Layer ``slot`` with set ``k`` (``weight``/``bias``: the layer's own, used if not affine)."""
        if self.affine:
            weight, bias = self.weight[slot][k], self.bias[slot][k]
        mean, var = getattr(self, f"running_mean_{slot}")[k], getattr(self, f"running_var_{slot}")[k]
        if training:
            return _normalise(x, weight, bias, eps, (mean, var), self.momentum)
        if self.eval_stats == "running":
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        return _normalise(x, weight, bias, eps)
