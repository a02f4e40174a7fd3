"""The shared inner loop (adaptation of a model copy to one task)."""
from .inner_loop import (
    ADAPT_MODES, INNER_OPTIMIZERS, NO_HOOKS, Adapted, InnerHooks, InnerLoop, LossContext, LossTerm,
    check_positive, task_loss,
)

__all__ = [
    "ADAPT_MODES", "INNER_OPTIMIZERS", "NO_HOOKS", "Adapted", "InnerHooks", "InnerLoop", "LossContext",
    "LossTerm", "check_positive", "task_loss",
]
