"""Class-indexed datasets decoded once into uint8 tensors (imports nothing from the layers above)."""
from .base import ClassDataset, Preprocessing, join_classes, split_names, stable_order
from .cache import cached_decode, clear_memo, default_cache_dir
from .download import check_integrity, download_url, md5sum, safe_extract, verify_md5
from .folder import ClassFolder, CSVClassDataset
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .registry import DATASETS, load_dataset

__all__ = [
    "ClassDataset", "Preprocessing", "join_classes", "split_names", "stable_order",
    "cached_decode", "clear_memo", "default_cache_dir",
    "check_integrity", "download_url", "md5sum", "safe_extract", "verify_md5",
    "ClassFolder", "CSVClassDataset", "MiniImageNet", "Omniglot",
    "DATASETS", "load_dataset",
]
