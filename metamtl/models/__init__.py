"""Models: a shared trunk plus a (meta-learned or per-task) head; the multi-dataset model."""
from .backbones import MLP, Conv4, ConvBlock, TrunkHead, conv4_model, mlp_model
from .heads import HEAD_INITS, LinearHead, class_means, initial_head_params
from .multidataset import (
    DatasetHeads, MultiDatasetModel, MultiDatasetTrunk, Resize, current_dataset, dataset_scope, make_stem,
    multidataset_model,
)
from .norm import BN_EVAL_STATS, BN_MODES, EpisodicBatchNorm, StepNorms, norm_layers, support_rows
from .registry import MODELS, build_model, check_model_config
from .resnet import ResNet12, resnet12_model

__all__ = [
    "MLP", "MODELS", "Conv4", "ConvBlock", "TrunkHead", "build_model", "check_model_config", "conv4_model",
    "mlp_model", "HEAD_INITS", "LinearHead", "class_means", "initial_head_params", "DatasetHeads",
    "MultiDatasetModel", "MultiDatasetTrunk", "Resize", "current_dataset", "dataset_scope", "make_stem",
    "multidataset_model", "ResNet12", "resnet12_model", "BN_EVAL_STATS", "BN_MODES", "EpisodicBatchNorm", "StepNorms",
    "norm_layers", "support_rows",
]
