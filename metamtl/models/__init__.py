"""Models: a shared trunk plus a (meta-learned or per-task) head."""
from .backbones import MLP, MODELS, Conv4, ConvBlock, TrunkHead, build_model
from .heads import HEAD_INITS, LinearHead, class_means, initial_head_params
from .norm import BN_MODES, EpisodicBatchNorm, stats_from_first

__all__ = [
    "MLP", "MODELS", "Conv4", "ConvBlock", "TrunkHead", "build_model", "HEAD_INITS", "LinearHead",
    "class_means", "initial_head_params", "BN_MODES", "EpisodicBatchNorm", "stats_from_first",
]
