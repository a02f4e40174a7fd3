"""Knowledge-distillation loss terms and the callback that attaches them to a learner.

Terms are :data:`~metamtl.adaptation.LossTerm` objects for the shared inner loop's
``loss_terms``; each says in which ``phases`` it acts: ``"support"`` (every inner step, so the
adaptation itself is distilled), ``"query"`` (the outer, meta loss) or both.

* :class:`SoftTargets` - Hinton et al. (2015): ``weight * T^2 * KL(softmax(t/T) || softmax(s/T))``
  between the teacher's logits ``t`` and the student's ``s`` on the same inputs.
* :class:`FeatureDistillation` - ``weight * MSE(adapter(student layer), teacher layer)`` (FitNets,
  Romero et al. 2015) with a learned adapter: a 1x1 convolution for feature maps of the same
  height/width, a linear map for flat features, or any module you pass.

:class:`Distillation` is the :class:`~metamtl.callbacks.Callback` that attaches terms for a
``fit`` call, detaches them afterwards (the saved student holds no teacher), trains the adapters
with its own optimizer and saves their state in training checkpoints::

    teacher = MetaLearner.load("runs/teacher/learner.pt")
    kd = Distillation(SoftTargets(teacher, temperature=4.0, phases=("support", "query")),
                      FeatureDistillation(teacher, "trunk.blocks.3", "trunk.blocks.3"))
    student.fit(train_tasks, iterations=2000, callbacks=[kd])
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptation import LossContext
from ..callbacks import Callback, FitState
from ..checkpoint import safe_load
from ..errors import CheckpointError, ConfigError, InputError
from .taps import named_layer, take_rows
from .teachers import Teacher, as_teacher

if TYPE_CHECKING:
    from ..learner import MetaLearner

PHASES = ("support", "query", "classes")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over rows (Hinton et al. 2015).

    The ``T^2`` factor keeps the gradient's scale independent of ``T``: it is
    ``T * (softmax(s/T) - softmax(t/T)) / N`` with respect to the student logits.
    """
    t = check_number("soft_target_loss temperature", temperature, 0, strict=True)  # 0: NaN, as SoftTargets refuses
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def check_number(name: str, value: Any, minimum: float, strict: bool = False) -> float:
    """``value`` as a float: a finite number (not a bool) ``>= minimum`` (``> minimum`` if ``strict``),
    else a :class:`ConfigError` naming ``name``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _check_phases(phases: Sequence[str] | str, name: str = "distillation phases") -> tuple[str, ...]:
    if not isinstance(phases, (str, list, tuple)):
        raise ConfigError(f"{name} must be a phase name or a list of them from {PHASES}, got {phases!r}")
    phases = (phases,) if isinstance(phases, str) else tuple(phases)
    bad = [p for p in phases if not isinstance(p, str) or p not in PHASES]
    if bad or not phases:
        raise ConfigError(f"{name} must be a non-empty subset of {PHASES}, got {phases}")
    return phases


class DistillationTerm(nn.Module):
    """Base of distillation loss terms (an ``nn.Module`` so learned adapters are its parameters)."""

    def __init__(self, teacher: Any, weight: float, phases: Sequence[str] | str) -> None:
        super().__init__()
        self.weight = check_number("distillation weight", weight, 0)
        self.teacher: Teacher = as_teacher(teacher)
        self.phases = _check_phases(phases)
        self.last_value: float | None = None

    def bind(self, student: nn.Module) -> None:
        """Prepare for training ``student`` (taps on named layers)."""

    def release(self) -> None:
        self.teacher.release()

    def forward(self, ctx: LossContext) -> torch.Tensor | None:
        if ctx.phase not in self.phases or self.weight == 0:
            return None
        value = self.loss(ctx)
        self.last_value = float(value.detach())
        return self.weight * value

    def loss(self, ctx: LossContext) -> torch.Tensor:
        raise NotImplementedError


class SoftTargets(DistillationTerm):
    """Soft-target distillation of the teacher's logits into the student's.

    Args:
        teacher: an ``nn.Module``, a :class:`~metamtl.MetaLearner` (adapted to each episode, see
            :mod:`metamtl.distill.teachers`) or a saved learner's path.
        temperature: softmax temperature ``T``.
        weight: multiplies ``T^2 * KL``; the task's own cross-entropy keeps weight 1.
        phases: ``"support"``, ``"query"`` or both.
    """

    def __init__(self, teacher: Any, temperature: float = 4.0, weight: float = 1.0,
                 phases: Sequence[str] | str = ("query",)) -> None:
        super().__init__(teacher, weight, phases)
        self.temperature = check_number("distillation temperature", temperature, 0, strict=True)

    def loss(self, ctx: LossContext) -> torch.Tensor:
        return soft_target_loss(ctx.logits, self.teacher.logits(ctx), self.temperature)


class FeatureDistillation(DistillationTerm):
    """Match a student layer's output, through a learned adapter, to a teacher layer's output.

    Args:
        teacher: as for :class:`SoftTargets`.
        student_layer, teacher_layer: layer names (``model.named_modules()``), e.g.
            ``"trunk.blocks.3"``, or ``"trunk"`` for the trunk's flat output (the features).
        adapter: maps student features to the teacher's shape; default: built on first use
            (1x1 convolution, or linear for flat features), initialised from ``seed``.
        weight, phases: as for :class:`SoftTargets`.
    """

    def __init__(self, teacher: Any, student_layer: str, teacher_layer: str, weight: float = 1.0,
                 phases: Sequence[str] | str = ("query",), adapter: nn.Module | None = None,
                 seed: int = 0) -> None:
        super().__init__(teacher, weight, phases)
        for what, name in (("student_layer", student_layer), ("teacher_layer", teacher_layer)):
            if not isinstance(name, str):
                raise ConfigError(f"FeatureDistillation {what} must be a layer name (e.g. 'trunk.blocks.3'), got {name!r}")
        self.seed = int(seed)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.adapter, self._given = adapter, adapter is not None
        # a given adapter's weights at the term's first use (as the user left them after building the term),
        # which reset() restores (a built one is dropped, rebuilt from seed)
        self._initial: dict[str, torch.Tensor] | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._bound = False

    def _first_use(self) -> None:
        """Keep a given adapter's weights the first time the term is used (reset or bound for a fit)."""
        if self._given and self._initial is None:
            self._initial = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}

    def reset(self) -> None:
        """Back to the adapter of a new run: a given adapter's weights at the term's first use, else none
        (built again, from ``seed``, at first use)."""
        self._first_use()
        self._pending = None
        if not self._given:
            self.adapter = None
        else:
            self.adapter.load_state_dict(self._initial)

    @property
    def taps(self) -> tuple[str, ...]:
        """The student layer whose output the inner loop hands over (``LossContext.features``)."""
        return (self.student_layer,)

    def bind(self, student: nn.Module) -> None:
        # no release here: the teacher (and its taps) may be shared with terms bound before this one
        named_layer(student, self.student_layer, "student")
        self.teacher.tap(self.teacher_layer)
        self._first_use()
        self._bound = True

    def release(self) -> None:
        super().release()
        self._bound = False

    def _build_adapter(self, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        # Built on first use, from its own seed: neither depends on nor disturbs the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
                adapter: nn.Module = nn.Conv2d(s.shape[1], t.shape[1], 1)
            elif s.dim() == 2 and t.dim() == 2:
                adapter = nn.Linear(s.shape[1], t.shape[1])
            else:
                adapter = None
        if adapter is None:
            raise InputError(
                f"cannot map student layer {self.student_layer!r} features {list(s.shape[1:])} to teacher layer "
                f"{self.teacher_layer!r} features {list(t.shape[1:])}: the default adapter maps channels of "
                "feature maps with the same height and width (1x1 conv) or flat features (linear); choose "
                "layers of matching resolution or pass an adapter module"
            )
        # the student's weight dtype (a float64 student); float32 for features computed in bf16 (autocast)
        return adapter.to(device=s.device, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)

    def loss(self, ctx: LossContext) -> torch.Tensor:
        if not self._bound:
            raise ConfigError("FeatureDistillation is not bound to a student; attach it with the Distillation callback")
        t = self.teacher.outputs(ctx)[self.teacher_layer]
        s = take_rows(ctx.features.get(self.student_layer), self.student_layer, ctx.inputs.shape[0])
        if self.adapter is None:
            self.adapter = self._build_adapter(s, t)
            if self._pending is not None:
                self.adapter.load_state_dict(self._pending)
                self._pending = None
        mapped = self.adapter(s)
        if mapped.shape != t.shape:
            raise InputError(
                f"the adapter maps student layer {self.student_layer!r} features {list(s.shape[1:])} to "
                f"{list(mapped.shape[1:])}, but teacher layer {self.teacher_layer!r} gives {list(t.shape[1:])}"
            )
        return F.mse_loss(mapped, t)

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        if self.adapter is None:
            return self._pending
        return {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return
        if self.adapter is None:
            self._pending = state  # loaded when the adapter is built (first use)
        else:
            self.adapter.load_state_dict(state)


class Distillation(Callback):
    """Attach distillation terms to a learner's inner loop for the duration of ``fit``.

    Args:
        terms: :class:`SoftTargets` / :class:`FeatureDistillation` (or any loss term).
        lr: learning rate of the adapters' Adam optimizer (default: the learner's ``meta_lr``).
        ce_weight: weight of the task's own loss in the phases where a term acts (born-again
            distillation, RFS: ``0.5 * CE + 0.5 * KL`` is ``ce_weight=0.5`` with a
            ``SoftTargets(weight=0.5)``; query-only terms leave the inner support loss at weight 1,
            and evaluation always adapts on the plain loss); restored after ``fit``.
    """

    def __init__(self, *terms: Any, lr: float | None = None, ce_weight: float = 1.0) -> None:
        if not terms:
            raise ConfigError("Distillation needs at least one loss term (e.g. SoftTargets(teacher))")
        self.terms = list(terms)
        self.lr = None if lr is None else check_number("distillation lr", lr, 0, strict=True)
        self.ce_weight = check_number("distillation ce_weight", ce_weight, 0)
        self._task_weight: float | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_opt: dict[str, Any] | None = None
        self._attached: list[Any] = []

    def reset(self) -> None:
        """Forget an earlier learner's training (a callback reused for another learner, e.g. students of
        several seeds): the adapters start afresh and their optimizer is built anew."""
        self.optimizer, self._pending_opt = None, None
        for term in self.terms:
            if isinstance(term, FeatureDistillation):
                term.reset()

    def run_settings(self) -> dict[str, Any]:
        """The distillation a resume must repeat: each term's kind, teacher (kind, weights' digest),
        weight, phases and settings, ``ce_weight`` and ``lr`` (resuming with another distillation,
        or without one, is refused listing the keys that differ)."""
        terms = {str(i): _term_settings(t) for i, t in enumerate(self.terms)}
        return {"distillation": {"ce_weight": self.ce_weight, "lr": self.lr, "terms": terms}}

    def _parameters(self) -> list[nn.Parameter]:
        """Learned parameters of the terms (adapters; the teacher is not a sub-module)."""
        return [p for t in self.terms if isinstance(t, nn.Module) for p in t.parameters() if p.requires_grad]

    def on_fit_start(self, state: FitState) -> None:
        learner = state.learner
        check_phases_apply(self.terms, learner.algorithm)
        check_soft_targets_apply(self.terms, learner.task)
        for term in self.terms:
            teacher = getattr(term, "teacher", None)
            if teacher is not None:
                _check_compatible(teacher, learner)
                teacher.to(learner.device)
            if isinstance(term, DistillationTerm):
                term.bind(learner.model)
            if isinstance(term, nn.Module):
                term.to(learner.device)
        learner.algorithm.inner.loss_terms.extend(self.terms)
        self._attached = list(self.terms)
        self._task_weight, learner.algorithm.inner.task_weight = learner.algorithm.inner.task_weight, self.ce_weight
        self._lr = self.lr if self.lr is not None else learner.meta_lr

    def on_iteration_start(self, state: FitState) -> None:
        for p in self._parameters():
            p.grad = None

    def on_after_backward(self, state: FitState) -> None:
        # under torchrun, the adapters' gradients are averaged over processes like the meta-gradient
        # (weighted by each one's tasks), so every process takes the same adapter step
        strategy = state.learner.strategy
        params = self._parameters()
        if params and strategy.world_size > 1:
            strategy.reduce_gradients(params, {}, len(strategy.shard(state.meta_batch_size)),
                                      iteration=state.learner.iteration)

    def on_iteration_end(self, state: FitState, metrics: dict[str, float]) -> None:
        # After the meta-step, so a skipped (non-finite) step leaves the adapters as they were too;
        # before on_iteration_complete, where checkpoints are written.
        params = [p for p in self._parameters() if p.grad is not None]
        if not params or metrics.get("skipped") or not all(bool(torch.isfinite(p.grad).all()) for p in params):
            return
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self._parameters(), lr=self._lr)
            if self._pending_opt is not None:
                self.optimizer.load_state_dict(self._pending_opt)
                self._pending_opt = None
        self.optimizer.step()

    def on_fit_end(self, state: FitState) -> None:
        if self._task_weight is not None:
            state.learner.algorithm.inner.task_weight, self._task_weight = self._task_weight, None
        terms = state.learner.algorithm.inner.loss_terms
        for term in self._attached:
            if term in terms:
                terms.remove(term)
            if isinstance(term, DistillationTerm):
                term.release()
        self._attached = []

    def on_exception(self, state: FitState, exc: BaseException) -> None:
        self.on_fit_end(state)

    def state_dict(self) -> dict[str, Any]:
        adapters = {str(i): t.adapter_state() for i, t in enumerate(self.terms)
                    if isinstance(t, FeatureDistillation) and t.adapter_state() is not None}
        if not adapters:
            return {}
        opt = self.optimizer.state_dict() if self.optimizer is not None else self._pending_opt
        return {"adapters": adapters, "optimizer": opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()  # the checkpoint's adapters and optimizer state, not those of an earlier use of this callback
        for i, s in state.get("adapters", {}).items():
            self.terms[int(i)].load_adapter_state(s)
        self._pending_opt = state.get("optimizer")


def _term_settings(term: Any) -> dict[str, Any]:
    """What of a loss term shapes training: see :meth:`Distillation.run_settings`."""
    out: dict[str, Any] = {"term": type(term).__name__}
    for key in ("weight", "phases", "temperature", "student_layer", "teacher_layer", "seed"):
        if hasattr(term, key):
            value = getattr(term, key)
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    identity = getattr(getattr(term, "teacher", None), "identity", None)
    if callable(identity):
        out.update(identity())
    return out


def check_phases_apply(terms: Sequence[Any], algorithm: Any) -> None:
    """Refuse a term that can never act in the algorithm's training (it would be silently ignored):
    its phases are never called, or it acts only in the ``support`` phase where it cannot matter
    (see :func:`_support_only_refusal`)."""
    applied = tuple(getattr(algorithm, "loss_term_phases", PHASES))
    for term in terms:
        phases = getattr(term, "phases", None)
        if phases is None:
            continue
        acting = set(phases) & set(applied)
        if not acting:
            why = (" (the 'classes' phase, the supervised loss over all training classes, exists only for the "
                   "'transfer' algorithm)" if "classes" in phases else "")
            raise ConfigError(
                f"distillation phases {list(phases)} never apply to algorithm {getattr(algorithm, 'name', algorithm)!r}"
                f"{why}: its training applies loss terms in phase(s) {list(applied)}; set distill.phases to one of them"
            )
        why = _support_only_refusal(term, algorithm) if acting == {"support"} else None
        if why is not None:
            raise ConfigError(why)


def _support_only_refusal(term: Any, algorithm: Any) -> str | None:
    """Why a feature term acting only in the inner (support) loss never acts, or ``None``: the
    student layers are trunk layers and the algorithm adapts only the head (their features do not
    depend on the adapted weights), or its learned adapter gets no gradient under a first-order rule."""
    taps = tuple(getattr(term, "taps", ()))
    if not taps:
        return None
    inner, name = getattr(algorithm, "inner", None), getattr(algorithm, "name", algorithm)
    what = f"feature distillation of student layer(s) {list(taps)} in phase 'support' only"
    if getattr(inner, "adapt", "all") == "head" and all(t == "trunk" or t.startswith("trunk.") for t in taps):
        return (f"{what} has no effect under algorithm {name!r}: it adapts only the head (adapt: head), so the "
                "inner loss's trunk features do not depend on the adapted weights; put the term in phase 'query' "
                "(the meta loss, which trains the trunk)")
    adapter = getattr(term, "adapter", False)
    learned = adapter is None or (isinstance(adapter, nn.Module) and any(p.requires_grad for p in adapter.parameters()))
    if hasattr(term, "adapter") and learned and getattr(inner, "first_order", False):
        return (f"{what}: its learned adapter gets no gradient under the first-order rule of algorithm {name!r} (the "
                "inner steps are not differentiated), so it would stay a random projection; add phase 'query' if "
                "the algorithm applies it, use a second-order rule, or pass a fixed adapter (requires_grad False)")
    return None


def check_soft_targets_apply(terms: Sequence[Any], task: str) -> None:
    """:class:`ConfigError` for :class:`SoftTargets` on a learner that does not classify: a softmax
    over regression outputs has no classes (one output: always 1), so the term would be 0."""
    if task != "classification" and any(isinstance(t, SoftTargets) for t in terms):
        raise ConfigError(f"SoftTargets distil class probabilities (a softmax over class logits); this learner does "
                          f"{task}, whose outputs are no class logits, so the term would always be 0: leave it out "
                          "(distillation(..., weight=0); config: distill.weight: 0) and distil features instead")


def check_config_applies(cfg: dict[str, Any], algorithm: Any) -> None:
    """:func:`check_phases_apply` for a ``distill`` config section, without loading its teacher (a
    staged run checks every stage's section before the first stage trains)."""
    c = check_config(cfg)
    terms = [SimpleNamespace(phases=c["phases"])]
    terms += [SimpleNamespace(phases=c["phases"], taps=(s,), adapter=None) for s, _ in c["features"]]
    check_phases_apply(terms, algorithm)


def _check_compatible(teacher: Teacher, learner: "MetaLearner") -> None:
    prep = getattr(teacher, "preprocessing", None)
    if prep is not None and learner.preprocessing is not None and prep != learner.preprocessing:
        raise ConfigError(
            f"the teacher was trained on inputs preprocessed as {prep} but the student uses "
            f"{learner.preprocessing}; distil between learners that see the same inputs"
        )


def distillation(teacher: Any, temperature: float = 4.0, weight: float = 1.0,
                 phases: Sequence[str] | str = ("query",), features: Iterable[tuple[str, str]] = (),
                 feature_weight: float = 1.0, lr: float | None = None, ce_weight: float = 1.0) -> Distillation:
    """A :class:`Distillation` callback: soft targets plus optional ``(student, teacher)`` layer pairs.

    Born-again distillation (RFS, Tian et al. 2020) of a ``transfer`` student over all training
    classes: ``distillation(teacher, 4.0, 0.5, phases=["classes"], ce_weight=0.5)``.
    """
    weight = check_number("distillation weight", weight, 0)
    teacher = as_teacher(teacher)
    # weight 0 without features: a term that never acts (the run equals one without distillation)
    terms: list[Any] = [SoftTargets(teacher, temperature, weight, phases)] if weight > 0 or not features else []
    terms += [FeatureDistillation(teacher, s, t, feature_weight, phases) for s, t in features]
    return Distillation(*terms, lr=lr, ce_weight=ce_weight)


def _number(cfg: dict[str, Any], key: str, default: float | None, minimum: float, strict: bool = False) -> float | None:
    value = cfg.get(key, default)
    if value is None and default is None:
        return None
    return check_number(f"distill.{key}", value, minimum, strict)


def _check_features(features: Any) -> list[tuple[str, str]]:
    """``distill.features``: a list of ``[student_layer, teacher_layer]`` name pairs."""
    if features is None:
        return []
    if not isinstance(features, (list, tuple)):
        raise ConfigError(f"distill.features must be a list of [student_layer, teacher_layer] pairs, got {features!r}")
    for pair in features:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(n, str) and n for n in pair)):
            raise ConfigError(f"distill.features entries are [student_layer, teacher_layer] (layer names), got {pair!r}")
    return [(s, t) for s, t in features]


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``distill`` section's keys and values checked (a :class:`ConfigError` naming the key),
    without loading the teacher: config files are checked when read, before any data loads.
    Returns the values with their defaults."""
    known = {"teacher", "temperature", "weight", "phases", "features", "feature_weight", "lr", "teacher_steps",
             "ce_weight"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"distill: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    if not cfg.get("teacher") or not isinstance(cfg["teacher"], str):
        raise ConfigError("distill.teacher must be the path of a saved learner (e.g. runs/teacher/learner.pt)")
    features = _check_features(cfg.get("features"))
    steps = cfg.get("teacher_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"distill.teacher_steps must be an integer >= 0 (null: the teacher's eval steps), got {steps!r}")
    return {"teacher": str(Path(cfg["teacher"]).expanduser()), "temperature": _number(cfg, "temperature", 4.0, 0, strict=True),
            "weight": _number(cfg, "weight", 1.0, 0), "phases": _check_phases(cfg.get("phases", ("query",)), "distill.phases"),
            "features": features, "feature_weight": _number(cfg, "feature_weight", 1.0, 0),
            "lr": _number(cfg, "lr", None, 0, strict=True), "teacher_steps": steps,
            "ce_weight": _number(cfg, "ce_weight", 1.0, 0)}


def check_teacher_file(cfg: dict[str, Any]) -> None:
    """A ``distill.teacher`` path that is no file: a :class:`ConfigError` naming the key."""
    path = Path(cfg["teacher"]).expanduser()
    if path.is_dir():  # the loader's message, naming a checkpoint in the folder
        try:
            safe_load(path)
        except CheckpointError as exc:
            raise ConfigError(f"distill.teacher: {exc}") from None
    if not path.is_file():
        raise ConfigError(f"distill.teacher: {path} does not exist (it must be the path of a saved learner, e.g. "
                          "runs/teacher/learner.pt; train the teacher first)")


def from_config(cfg: dict[str, Any]) -> Distillation:
    """The ``distill`` section of an experiment config -> a :class:`Distillation` callback.

    Keys: ``teacher`` (path of a saved learner, required), ``temperature`` (4), ``weight`` (1),
    ``phases`` (``[query]``; ``[classes]``: the supervised loss over all training classes of the
    ``transfer`` algorithm, i.e. born-again distillation), ``ce_weight`` (1: weight of the task's
    own loss), ``features`` (``[[student_layer, teacher_layer], ...]``), ``feature_weight`` (1),
    ``lr`` (the learner's meta_lr), ``teacher_steps`` (its eval steps).  RFS born-again:
    ``{teacher: PATH, temperature: 4, weight: 0.5, ce_weight: 0.5, phases: [classes]}``.
    """
    c = check_config(cfg)
    check_teacher_file(c)
    from .teachers import LearnerTeacher

    teacher = LearnerTeacher(c["teacher"], c["teacher_steps"])
    return distillation(teacher, c["temperature"], c["weight"], c["phases"], c["features"], c["feature_weight"],
                        c["lr"], c["ce_weight"])
