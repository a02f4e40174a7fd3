"""Multi-dataset meta-training and multi-task tools.

* :mod:`~metamtl.multitask.strategies` - loss weighting (equal, uncertainty, GradNorm, DWA) and
  gradient surgery (PCGrad, CAGrad) as small strategy objects, for meta-learning and for ordinary
  multi-task training (:meth:`Strategy.backward`).
* :mod:`~metamtl.multitask.algorithm` - the ``multitask`` algorithm: one meta-gradient per
  dataset of the meta-batch, combined by a strategy.
* :mod:`~metamtl.multitask.models` - the ``multidataset`` model: per-dataset stems into a shared
  (or softly shared) trunk, shared or per-dataset heads.
"""
from .algorithm import MultiTask
from .models import (
    DatasetHeads, MultiDatasetModel, MultiDatasetTrunk, Resize, current_dataset, dataset_scope, make_stem,
    multidataset_model,
)
from .strategies import (
    DWA, STRATEGIES, CAGrad, Equal, GradNorm, PCGrad, Strategy, Uncertainty, apply_strategy, build_strategy,
)

__all__ = [
    "MultiTask", "DatasetHeads", "MultiDatasetModel", "MultiDatasetTrunk", "Resize", "current_dataset",
    "dataset_scope", "make_stem", "multidataset_model", "DWA", "STRATEGIES", "CAGrad", "Equal", "GradNorm",
    "PCGrad", "Strategy", "Uncertainty", "apply_strategy", "build_strategy",
]
