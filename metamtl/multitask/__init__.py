"""Multi-task strategies: loss weighting and gradient surgery for several losses.

:mod:`~metamtl.multitask.strategies` - equal, uncertainty (Kendall et al. 2018), GradNorm,
DWA, PCGrad and CAGrad as small strategy objects, for ordinary multi-task training
(:meth:`Strategy.backward`) and for meta-learning on several datasets: the ``multitask``
algorithm (:class:`metamtl.algorithms.MultiTask`) combines per-dataset meta-gradients with one, on
the ``multidataset`` model (:class:`metamtl.models.MultiDatasetModel`, re-exported here).
"""
from ..models.multidataset import (
    DatasetHeads, MultiDatasetModel, MultiDatasetTrunk, Resize, current_dataset, dataset_scope, make_stem,
    multidataset_model,
)
from .strategies import (
    DWA, STRATEGIES, CAGrad, Equal, GradNorm, PCGrad, Strategy, Uncertainty, apply_strategy, build_strategy,
)

__all__ = [
    "DatasetHeads", "MultiDatasetModel", "MultiDatasetTrunk", "Resize", "current_dataset",
    "dataset_scope", "make_stem", "multidataset_model", "DWA", "STRATEGIES", "CAGrad", "Equal", "GradNorm",
    "PCGrad", "Strategy", "Uncertainty", "apply_strategy", "build_strategy",
]
