"""The head interface, the feature transform heads share, and evaluation of heads on episodes."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, did_you_mean
from ..tasks.episode import Episode
from ..models.multidataset import dataset_scope, routed_dataset
from ..models.heads import label_counts
from ..models.norm import support_rows

#: the name of "no feature head": the algorithm's own adaptation
ALGORITHM = "algorithm"


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32, or as it is when it is float64: features computed in bf16/fp16 (autocast) are
    compared and averaged in float32, those of a float64 model keep their precision."""
    return t if t.dtype == torch.float64 else t.float()


def transform(features: torch.Tensor, mean: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """``features - mean`` (when a mean is given), then L2-normalised rows (when ``normalize``)."""
    out = full_precision(features)
    if mean is not None:
        out = out - mean.to(out)
    return F.normalize(out, dim=-1) if normalize else out


def query_features(trunk: nn.Module, query_x: torch.Tensor, support_x: torch.Tensor, bn_stats: str) -> torch.Tensor:
    """Trunk features of the queries; ``bn_stats="support"``: BatchNorm statistics of the support set
    (each query independent of the others), else of the query batch (see :mod:`metamtl.models.norm`)."""
    if bn_stats == "support":
        rows = support_x.shape[0]
        return torch.func.functional_call(trunk, support_rows(trunk, rows), (torch.cat([support_x, query_x]),))[rows:]
    return trunk(query_x)


def _check(name: str, value: Any, kind: type, minimum: float | None = None) -> Any:
    """``value`` checked (:class:`ConfigError` unless of ``kind``, finite and ``>= minimum``), a float
    setting as a ``float`` (so ``C: 10`` and ``C: 10.0`` are one setting, with one label)."""
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if ok and kind is float:  # YAML .inf would pass a minimum, then overflow in the head's maths
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int too large for a float (10**400)
            ok = False
    if not ok or (minimum is not None and not value >= minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        what = "true or false" if kind is bool else ("a finite float" if kind is float else kind.__name__) + bound
        raise ConfigError(f"head setting {name} must be {what}, got {value!r}")
    return float(value) if kind is float else value


def _fitting_mean(head: str, mean: torch.Tensor, dim: int) -> torch.Tensor:
    """``mean`` unless it is not ``dim`` finite numbers (a mean of another trunk, an edited
    checkpoint): :class:`InputError` saying how to recompute it."""
    shape = tuple(mean.shape)
    if shape != (dim,) or not bool(torch.isfinite(mean).all()):
        what = f"has shape {list(shape)}" if shape != (dim,) else "is not finite"
        raise InputError(
            f"head {head!r} centres features with the learner's feature mean, which {what} (the trunk's features "
            f"have {dim} numbers): it belongs to other weights or was edited; call "
            "learner.compute_feature_mean(train_tasks) to recompute it")
    return mean


def _check_shapes(head: str, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor) -> None:
    """:class:`InputError` naming the shapes unless support and query features are ``[S, D]`` and ``[Q, D]``
    (one width) and ``support_y`` holds one label per support row."""
    if support.dim() != 2 or query.dim() != 2 or support.shape[1] != query.shape[1]:
        raise InputError(f"head {head!r} takes support features [S, D] and query features [Q, D] of one width D, "
                         f"got {list(support.shape)} and {list(query.shape)}: pass the trunk's flat features")
    if support_y.dim() != 1 or support_y.shape[0] != support.shape[0]:
        raise InputError(f"head {head!r} takes one support label per support row: labels of shape [{support.shape[0]}] "
                         f"for support features {list(support.shape)}, got labels of shape {list(support_y.shape)}")


@dataclasses.dataclass
class FeatureHead:
    """Base class: settings are dataclass fields; subclasses implement :meth:`classify`.

    Args:
        center: subtract the training split's mean feature first (needs the learner's
            ``feature_means``, see :meth:`MetaLearner.compute_feature_mean
            <metamtl.MetaLearner.compute_feature_mean>`).
        normalize: L2-normalise features (after centring).
    """

    name: ClassVar[str] = ""
    transductive: ClassVar[bool] = False
    #: field -> (type, minimum) checked on construction
    checks: ClassVar[dict[str, tuple[type, float | None]]] = {}

    center: bool = False
    normalize: bool = True

    def __post_init__(self) -> None:
        for field, (kind, minimum) in {"center": (bool, None), "normalize": (bool, None), **self.checks}.items():
            setattr(self, field, _check(field, getattr(self, field), kind, minimum))

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "FeatureHead":
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(fields))
        if unknown:
            raise ConfigError(f"head {cls.name!r} has no setting {unknown[0]!r}.{did_you_mean(unknown[0], fields)} "
                              f"Its settings: {', '.join(fields)}.")
        return cls(**settings)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @property
    def label(self) -> str:
        """The name, with the settings that differ from the defaults (``logreg(C=0.01)``): what result
        rows, reports and W&B keys call this head, so two settings of one head stay apart."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def __call__(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int,
                 mean: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[queries, ways]`` from support features ``[S, D]`` (labels ``0..ways-1``) and
        query features ``[Q, D]``; ``mean``: the training split's mean feature."""
        if self.center and mean is None:
            raise InputError(
                f"head {self.name!r} centres features with the training split's mean feature, and this learner "
                "has none: call learner.compute_feature_mean(train_tasks) first (metamtl fit does), or set the "
                "head's center: false"
            )
        if self.transductive:
            needed = ways if getattr(self, "balanced", False) else 2
            if query.shape[0] < needed:
                why = (f"balances its assignments over the {ways} classes" if needed == ways
                       else "classifies the queries of one call together")
                raise InputError(
                    f"transductive head {self.name!r} {why}: it needs at least {needed} queries, got "
                    f"{query.shape[0]}; pass the queries together, or use an inductive head (e.g. simpleshot)")
        support_y = torch.as_tensor(support_y, device=support.device)
        _check_shapes(self.name, support, support_y, query)
        label_counts(support_y, ways)  # every head (custom ones too): the same InputError for bad labels
        support_y = support_y.long()
        used = _fitting_mean(self.name, mean, support.shape[-1]) if self.center else None
        with torch.autocast(support.device.type, enabled=False):  # small float32 problems
            return self.classify(transform(support, used, self.normalize), support_y,
                                 transform(query, used, self.normalize), ways)

    def classify(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
        raise NotImplementedError


def episode_metrics(head: FeatureHead, trunk: nn.Module, episodes: Sequence[Episode], bn_stats: str,
                    mean_for: Callable[[Episode], torch.Tensor | None]) -> list[dict[str, float]]:
    """Query loss and accuracy of ``head`` on each episode (features under ``no_grad``; a
    multi-dataset trunk runs ``ep.dataset``'s branches, else those its shape fits)."""
    out = []
    for ep in episodes:
        with torch.no_grad(), dataset_scope(routed_dataset(trunk, ep.dataset, ep.support_x)):
            support = trunk(ep.support_x)
            query = query_features(trunk, ep.query_x, ep.support_x, bn_stats)
        logits = head(support, ep.support_y, query, ep.ways, mean_for(ep)).detach()
        out.append({"loss": float(F.cross_entropy(logits, ep.query_y)),
                    "accuracy": float((logits.argmax(-1) == ep.query_y).float().mean())})
    return out
