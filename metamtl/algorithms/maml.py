"""MAML (Finn et al. 2017) and its first-order approximation (FOMAML)."""
from __future__ import annotations

from .base import Algorithm


class MAML(Algorithm):
    """Model-Agnostic Meta-Learning: backpropagate the query loss through the inner loop.

    With ``first_order=True`` this is FOMAML.  Defaults follow the paper's Omniglot setting
    (one step, inner lr 0.4).
    """

    name = "maml"


class FOMAML(MAML):
    """First-order MAML: the query gradient at the adapted weights is the meta-gradient."""

    name = "fomaml"
    fixed = {"first_order": True}
