"""The inner loop, in one place: how a model adapts to a task and how meta-gradients leave it.

Data flow (one chunk of ``T`` tasks of the same shape; every tensor has a leading task dimension):

1. **Problem** (:func:`build_problem` -> :class:`InnerProblem`, in ``problem.py``).  From the
   model, the support set ``[T, S, ...]`` and the inner-loop settings (:class:`InnerLoop`,
   ``settings.py``) it fixes *what adapts*: the module called (the model, its head, or the trunk
   with a fresh per-task head), the names of the adapted weights, their initial values ``[T, ...]``
   (meta-weights expanded over tasks, or ``zero``/``proto`` heads computed from the support set),
   and what the forward passes read (support images, or support features computed once per
   chunk when only the head adapts).  An algorithm adds its declarations: learning rates per
   weight and step (``lrs``; tensors that may require grad), tensors handed to the forward pass
   of the weights after ``k`` updates (``tensors``: per-step BatchNorm sets, selected by the
   explicit step index ``k``), and the inner objective (task loss plus loss terms, which receive
   the adapted weights and the outputs of the layers they tap).

2. **Inner loop** (:meth:`InnerProblem.step` / :meth:`InnerProblem.unroll`).  One step is a pure
   function ``step(state, k, context, create_graph) -> state`` of the weights and the inner
   optimizer's state (``state``: a flat list of tensors), the step index and the support inputs
   (``context``); nothing is read from global or context state.  The inner optimizers are
   functional and differentiable (``optim.py``: SGD, momentum/Nesterov, Adam/AdamW, RMSprop,
   Adagrad, Adadelta, Adamax, each equal to its ``torch.optim`` class).  :meth:`unroll` keeps the
   weights after every step (:class:`Adapted`; call it on query inputs, optionally with
   ``updates=k``).

3. **Engines** execute a problem: :class:`CoreEngine` (default, ``backend: core``) runs the model
   through ``torch.func.functional_call`` and ``vmap`` over a chunk of tasks (``task_chunk``;
   one task per call on CPU, where that is fastest), keeps channels_last conv weights NHWC after
   every update, and runs the trunk once per chunk for head-only adaptation.
   :class:`HigherEngine` (``backend: higher``) runs the same problem on ``higher``'s patched
   module and differentiable optimizers, one task at a time: any ``torch.optim`` class higher
   knows, on any module.  Tests check that both give the same meta-gradients (1e-5, float64)
   for every built-in algorithm.

4. **Meta-gradient rules** (``metagrad.py``) turn an outer objective into ``.grad`` of the
   meta-parameters: :class:`SecondOrder` (backpropagate through the unrolled loop),
   :class:`FirstOrder` (inner gradients as constants, updates on the tape: learned rates still
   learn), :class:`Difference` (Reptile: ``start - adapted``).

Meta-gradient rule contract (for new rules such as checkpointed or implicit differentiation)
    A rule is an object with ``backward(problem, outer, weight) -> (adapted, objective, logits)``:

    * ``problem`` is an :class:`InnerProblem`.  ``problem.leaves()`` gives fresh leaf copies of
      the initial weights; ``problem.init_state(params)`` the optimizer's initial state;
      ``problem.step(state, k, [problem.inputs], create_graph)`` one inner step, a pure function
      (it may be recomputed, e.g. under checkpointing; gradients reach learned rates and per-step
      BatchNorm parameters through it as closed-over leaves); ``problem.unroll(start, tape=...,
      create_graph=...)`` all steps; ``problem.objective`` / :class:`InnerView` the inner objective
      (for implicit differentiation's optimality condition ``d objective / d params = 0``);
      ``problem.push(grads)`` sends gradients with respect to the start leaves into the
      meta-parameters (through the expand of the meta-weights or the prototype computation).
    * ``outer(adapted) -> (objective [T], logits [T, Q, ...])`` is the algorithm's outer
      objective evaluated on an :class:`Adapted` (build one with ``Adapted(problem, trajectory,
      inner_losses)`` if the rule computes the adapted weights itself; ``trajectory[-1]`` must
      hold the final weights, ``trajectory[k]`` those after ``k`` steps where ``outer`` reads them).
    * It must accumulate the gradient of ``weight * objective.sum()`` (or the rule's
      approximation of it) into ``.grad`` of every meta-parameter it reaches, and return the
      ``Adapted``, the detached objective and the detached final logits (for metrics).

    Algorithms choose a rule per meta-iteration in ``Algorithm.meta_gradient(iteration)``.
"""
from .gradients import checkpointed_unroll, conjugate_gradient, implicit_solution
from .metagrad import (
    RULES, Checkpointed, Difference, FirstOrder, Implicit, MetaGradient, Outer, SecondOrder, kept_buffers,
    proximal_term, second_order_rule,
)
from .optim import INNER_OPTIMIZERS, InnerOptimizer, build_optimizer
from .problem import (
    ENGINES, Adapted, CoreEngine, Engine, HigherEngine, InnerProblem, InnerView, add_loss_terms, build_problem,
    default_objective, map_tasks, tap_outputs, task_module,
)
from .settings import (
    ADAPT_MODES, BACKENDS, MEMORY_MODES, InnerLoop, LossContext, LossTerm, batched_task_loss, check_positive,
    task_loss, term_taps,
)

__all__ = [
    "checkpointed_unroll", "conjugate_gradient", "implicit_solution", "RULES", "Checkpointed", "Implicit",
    "proximal_term", "second_order_rule", "Difference", "FirstOrder", "MetaGradient", "Outer", "SecondOrder",
    "INNER_OPTIMIZERS", "kept_buffers",
    "InnerOptimizer", "build_optimizer", "ENGINES", "Adapted", "CoreEngine", "Engine", "HigherEngine",
    "InnerProblem", "InnerView", "add_loss_terms", "build_problem", "default_objective", "map_tasks", "tap_outputs",
    "task_module", "ADAPT_MODES", "BACKENDS", "MEMORY_MODES", "InnerLoop", "LossContext", "LossTerm",
    "batched_task_loss",
    "check_positive", "task_loss", "term_taps",
]
