"""Models: a shared trunk plus a (meta-learned or per-task) head."""
from .backbones import MLP, MODELS, Conv4, ConvBlock, TrunkHead, build_model
from .heads import HEAD_INITS, LinearHead, class_means, initial_head_params
from .norm import BN_EVAL_STATS, BN_MODES, EpisodicBatchNorm, StepNorms, stats_from_first

__all__ = [
    "MLP", "MODELS", "Conv4", "ConvBlock", "TrunkHead", "build_model", "HEAD_INITS", "LinearHead",
    "class_means", "initial_head_params", "BN_EVAL_STATS", "BN_MODES", "EpisodicBatchNorm", "StepNorms",
    "stats_from_first",
]
