"""Batch normalisation for episodic learning, with every choice made by explicit tensors.

Meta-learning models normalise with the statistics of the batch they are given and keep no
running statistics (as in the MAML paper): every task is normalised with its own statistics, at
training and at test time.

What an :class:`EpisodicBatchNorm` layer does in a forward pass depends only on the tensors it
holds for that pass, which the inner loop hands it explicitly (``torch.func.functional_call``
swaps them in by name, e.g. ``{"trunk.blocks.0.1.running_mean": ...}``); no global or context
state is read:

* ``weight``, ``bias``: the affine parameters (MAML++ passes the set of inner step ``k``);
* ``running_mean``, ``running_var`` (``None`` by default): a set of running statistics.  In
  training mode the layer normalises with batch statistics and folds them into this set
  (momentum :attr:`~torch.nn.BatchNorm2d.momentum`, unbiased variance, as ``nn.BatchNorm2d``);
  in eval mode it normalises with the set (every image independently of the others);
* ``support_rows`` (``None`` by default): a 0-d integer tensor ``n``; batch statistics are then
  computed over the first ``n`` rows only.  This is ``bn_stats="support"``: the inner loop
  forwards ``cat([support, query])`` so that query images are normalised with the support set's
  statistics and each query prediction is independent of the other queries.

:class:`StepNorms` (MAML++ "BNWB" + "BNRS") holds ``sets`` copies of the affine parameters and
running statistics of every such layer of a model and gives, for an explicit step index ``k``,
the tensors to hand in (:meth:`StepNorms.tensors`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError

BN_MODES = ("transductive", "support")
BN_EVAL_STATS = ("running", "batch")


def _normalise(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rows: int | None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None, momentum: float = 0.0,
) -> torch.Tensor:
    """Batch-statistics normalisation (over the first ``rows`` rows, if given); updates ``running``.

    ``running`` is used through ``.data``: ``F.batch_norm`` saves its running statistics for the
    (double) backward although training mode never reads them, and a later pass updating them
    in place (MAML++'s per-step sets are views of one buffer) would otherwise fail that backward.
    """
    running = None if running is None else (running[0].data, running[1].data)
    if rows is None or rows >= x.shape[0]:
        mean, var = running if running is not None else (None, None)
        return F.batch_norm(x, mean, var, weight, bias, True, momentum, eps)
    if x.dtype in (torch.bfloat16, torch.float16):  # statistics in float32, as F.batch_norm computes them under autocast
        x = x.float()
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
    """BatchNorm with batch statistics, steered by the tensors it is handed (module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)
        self.register_buffer("support_rows", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        running = None if self.running_mean is None else (self.running_mean, self.running_var)
        if running is not None and not self.training:
            return F.batch_norm(x, running[0], running[1], self.weight, self.bias, False, 0.0, self.eps)
        rows = None if self.support_rows is None else int(self.support_rows)
        if (rows is None or rows >= x.shape[0]) and x.numel() == x.shape[1]:
            raise InputError(
                f"EpisodicBatchNorm({self.num_features}) normalises with the statistics of its batch, which need more "
                f"than one value per channel; it got one ({list(x.shape)}: one image, a 1x1 map), e.g. a single "
                "query or a last chunk of one image with bn_stats: transductive. Use bn_stats: support (queries "
                "normalised with the support set's statistics), give more than one image at a time, or build the "
                "model with larger last maps (a larger image_size, or pooling less)")
        return _normalise(x, self.weight, self.bias, self.eps, rows, running, self.momentum or 0.0)


def norm_layers(model: nn.Module) -> dict[str, EpisodicBatchNorm]:
    """``{name: layer}`` of ``model``'s :class:`EpisodicBatchNorm` layers, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EpisodicBatchNorm)}


def torch_batch_norms(model: nn.Module, batch_statistics: bool = False) -> list[str]:
    """Names of ``model``'s torch BatchNorm layers that are not :class:`EpisodicBatchNorm` (which
    per-step sets and ``support_rows`` cannot reach); with ``batch_statistics`` only those that
    normalise with the statistics of their batch now (training mode, or no running statistics)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, EpisodicBatchNorm)
            and (not batch_statistics or m.training or m.running_mean is None)]


def support_rows(model: nn.Module, rows: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors that make ``model``'s norm layers use the statistics of the first ``rows`` rows."""
    value = torch.tensor(int(rows))
    return {f"{prefix}{n}.support_rows": value for n in norm_layers(model)}


class StepNorms(nn.Module):
    """Per-step affine parameters and running statistics for a model's EpisodicBatchNorm layers.

    Args:
        model: the model whose :class:`EpisodicBatchNorm` layers get per-step copies; the
            affine parameters start as copies of the layers' own.
        sets: number of per-step sets (MAML++: inner steps + 1, set ``k`` for weights after
            ``k`` updates).
        momentum: running-statistics momentum.
        eval_stats: ``"running"`` or ``"batch"``: statistics used in eval mode.
        affine: learn per-step weights and biases (otherwise the layers' own are used); those
            of a frozen layer are not learned (see :meth:`bind`).
    """

    def __init__(self, model: nn.Module, sets: int, momentum: float = 0.1, eval_stats: str = "running",
                 affine: bool = True) -> None:
        super().__init__()
        layers = list(norm_layers(model).values())
        self.sets, self.momentum, self.eval_stats, self.affine = int(sets), float(momentum), eval_stats, affine
        self.features = [layer.num_features for layer in layers]
        #: whether each layer has affine weights (``EpisodicBatchNorm(affine=False)``: none, so no per-step set)
        self.affine_layers = [layer.weight is not None for layer in layers]
        self.names: list[str] = []
        self.weight = nn.ParameterList()  # one per affine layer, in module order
        self.bias = nn.ParameterList()
        like = next(model.parameters(), None)
        kw = {"dtype": torch.get_default_dtype()} if like is None else {"dtype": like.dtype, "device": like.device}
        for i, layer in enumerate(layers):
            if affine and layer.weight is not None:
                self.weight.append(nn.Parameter(layer.weight.detach().repeat(self.sets, 1)))
                self.bias.append(nn.Parameter(layer.bias.detach().repeat(self.sets, 1)))
            self.register_buffer(f"running_mean_{i}", torch.zeros(self.sets, layer.num_features, **kw))
            self.register_buffer(f"running_var_{i}", torch.ones(self.sets, layer.num_features, **kw))
        self.bind(model)

    def _affine(self, layers) -> list[tuple[int, nn.Module]]:
        """``(index into weight/bias, layer)`` of the ``layers`` with per-step affine sets."""
        if not self.affine:
            return []
        return list(enumerate(layer for layer, has in zip(layers, self.affine_layers) if has))

    @torch.no_grad()
    def copy_affine(self, model: nn.Module) -> None:
        """Every set's affine parameters set to ``model``'s layers' own (e.g. after loading a trunk)."""
        for i, layer in self._affine(norm_layers(model).values()):
            self.weight[i].copy_(layer.weight.detach().expand_as(self.weight[i]))
            self.bias[i].copy_(layer.bias.detach().expand_as(self.bias[i]))

    def bind(self, model: nn.Module) -> None:
        """Serve ``model``'s layers (e.g. the same architecture rebuilt on load), in module order.

        Sets each layer's ``momentum`` (used when running statistics are handed to it), and
        gives each layer's per-step affine parameters its own ``requires_grad``: those of a
        frozen layer (``requires_grad=False``) are not meta-learned either.
        """
        layers = norm_layers(model)
        if [layer.num_features for layer in layers.values()] != self.features:
            raise ConfigError(
                f"per-step BatchNorm sets were made for layers of {self.features} channels, this model has "
                f"{[layer.num_features for layer in layers.values()]}; build a new algorithm for it"
            )
        if [layer.weight is not None for layer in layers.values()] != self.affine_layers:
            raise ConfigError(
                f"per-step BatchNorm sets were made for layers with affine weights {self.affine_layers}, this model's "
                f"layers have {[layer.weight is not None for layer in layers.values()]}; build a new algorithm for it"
            )
        self.names = list(layers)
        for layer in layers.values():
            layer.momentum = self.momentum
        for i, layer in self._affine(layers.values()):
            self.weight[i].requires_grad_(layer.weight.requires_grad)
            self.bias[i].requires_grad_(layer.bias.requires_grad)

    def tensors(self, k: int, training: bool, prefix: str = "") -> dict[str, torch.Tensor]:
        """What layer ``name`` is handed for a forward pass with weights after ``k`` updates.

        Set ``min(k, sets - 1)``: affine parameters (if ``affine``) and, in training mode or with
        ``eval_stats="running"``, the running statistics (updated in place in training mode).
        Keys are ``prefix + layer name + "." + tensor``.
        """
        k = min(int(k), self.sets - 1)
        out: dict[str, torch.Tensor] = {}
        for j, name in self._affine(self.names):
            out[f"{prefix}{name}.weight"], out[f"{prefix}{name}.bias"] = self.weight[j][k], self.bias[j][k]
        for i, name in enumerate(self.names):
            key = f"{prefix}{name}."
            if training or self.eval_stats == "running":
                out[key + "running_mean"] = getattr(self, f"running_mean_{i}")[k]
                out[key + "running_var"] = getattr(self, f"running_var_{i}")[k]
        return out
