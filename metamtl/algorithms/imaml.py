"""iMAML: implicit model-agnostic meta-learning (Rajeswaran, Finn, Kakade and Levine, 2019)."""
from __future__ import annotations

from .maml import MAML


class IMAML(MAML):
    """MAML with a proximal inner objective and an implicit meta-gradient.

    The inner loop minimises ``L_support(w) + lam/2 ||w - w_0||^2`` from the meta-learned start
    ``w_0`` (``steps`` steps of the inner optimizer, no autograd graph kept); the meta-gradient of
    the query loss ``g`` is ``(I + H/lam)^{-1} g`` with ``H`` the support-loss Hessian at the
    adapted weights, from ``cg_steps`` conjugate-gradient iterations on Hessian-vector products.
    Memory does not grow with ``steps``.  The same as ``maml`` with ``memory: implicit``; settings
    ``lam`` (default 1) and ``cg_steps`` (default 5) besides the inner-loop ones.  Adaptation at
    evaluation minimises the same proximal objective.
    """

    name = "imaml"
    fixed = {"memory": "implicit", "first_order": False}
