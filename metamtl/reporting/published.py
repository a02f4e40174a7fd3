"""Published few-shot accuracies (%, 95% CI where the paper gives one) used as references.

Omniglot numbers are on the official evaluation alphabets (659 characters); mini-ImageNet numbers
on the Ravi & Larochelle test classes. They are references for the full protocols: results on
other class splits (e.g. the small Omniglot subsets) are not directly comparable.
"""
from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    method: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    ci95: float | None
    source: str


MAML = "Finn et al. 2017, MAML (Table 1 and 2)"
MAMLPP = "Antoniou et al. 2019, MAML++ (Table 1 and 2)"

PUBLISHED: list[Published] = [
    Published("MAML", "omniglot", 5, 1, 98.7, 0.4, MAML),
    Published("MAML", "omniglot", 5, 5, 99.9, 0.1, MAML),
    Published("MAML", "omniglot", 20, 1, 95.8, 0.3, MAML),
    Published("MAML", "omniglot", 20, 5, 98.9, 0.2, MAML),
    Published("MAML", "miniimagenet", 5, 1, 48.70, 1.84, MAML),
    Published("MAML", "miniimagenet", 5, 5, 63.11, 0.92, MAML),
    Published("MAML++", "omniglot", 5, 1, 99.47, None, MAMLPP),
    Published("MAML++", "omniglot", 5, 5, 99.85, None, MAMLPP),
    Published("MAML++", "omniglot", 20, 1, 97.65, None, MAMLPP),
    Published("MAML++", "omniglot", 20, 5, 99.33, None, MAMLPP),
    Published("MAML++", "miniimagenet", 5, 1, 52.15, 0.26, MAMLPP),
    Published("MAML++", "miniimagenet", 5, 5, 68.32, 0.44, MAMLPP),
]


def published(dataset: str, ways: int, shots: int) -> list[Published]:
    """References for one dataset/setting (empty when none is known)."""
    return [p for p in PUBLISHED if p.dataset == dataset and p.ways == ways and p.shots == shots]
