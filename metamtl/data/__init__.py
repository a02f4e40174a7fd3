"""Class-indexed datasets decoded once into uint8 tensors, and the sinusoid task family."""
from .base import ClassDataset, Preprocessing, split_names, stable_order
from .cache import cached_decode, clear_memo, default_cache_dir
from .download import check_integrity, download_url, md5sum, safe_extract, verify_md5
from .folder import ClassFolder, CSVClassDataset
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .registry import DATASETS, TASK_FAMILIES, load_dataset, load_tasks
from .sinusoid import Sinusoid

__all__ = [
    "ClassDataset", "Preprocessing", "split_names", "stable_order",
    "cached_decode", "clear_memo", "default_cache_dir",
    "check_integrity", "download_url", "md5sum", "safe_extract", "verify_md5",
    "ClassFolder", "CSVClassDataset", "MiniImageNet", "Omniglot", "Sinusoid",
    "DATASETS", "TASK_FAMILIES", "load_dataset", "load_tasks",
]
