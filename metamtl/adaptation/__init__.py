"""The shared inner loop (adaptation of a model copy to one task)."""
from .gradients import checkpointed_unroll, conjugate_gradient, implicit_solution
from .functional import FunctionalInnerLoop, TaskBatchAdapted, batched_task_loss, select_engine
from .inner_loop import (
    ADAPT_MODES, BACKENDS, INNER_OPTIMIZERS, NO_HOOKS, Adapted, InnerHooks, InnerLoop, LossContext, LossTerm,
    check_positive, task_loss,
)

__all__ = [
    "checkpointed_unroll", "conjugate_gradient", "implicit_solution",
    "ADAPT_MODES", "BACKENDS", "FunctionalInnerLoop", "TaskBatchAdapted", "batched_task_loss", "select_engine",
    "INNER_OPTIMIZERS", "NO_HOOKS", "Adapted", "InnerHooks", "InnerLoop", "LossContext",
    "LossTerm", "check_positive", "task_loss",
]
