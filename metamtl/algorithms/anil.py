"""ANIL (Raghu et al. 2020): Almost No Inner Loop - only the head adapts per task."""
from __future__ import annotations

from .maml import MAML


class ANIL(MAML):
    """MAML where the inner loop adapts only the head on top of the shared trunk.

    The trunk runs once per task; the meta-gradient still reaches the trunk through the support
    features (second order) and the query features.
    """

    name = "anil"
    fixed = {"adapt": "head"}
