"""Teachers: soft targets and features for the inputs a student is learning on.

What are "teacher logits" for an episode whose labels ``0..N-1`` are assigned in a random order?
A teacher trained on other classes has no output that means "label 2 of this episode".  The
natural choice, used by :class:`LearnerTeacher`, is the teacher *adapted to the same episode*:
a saved :class:`~metamtl.MetaLearner` (MAML/ANIL with any head, or a prototype classifier)
adapts to the episode's support set, so its logits are in the episode's label order.  Its
adaptation runs once per episode (cached) and its outputs carry no gradient.

A plain ``nn.Module`` (:class:`ModuleTeacher`) is used as is: its outputs must already be
logits over the episode's ``N`` labels (e.g. a classifier for a fixed label set); anything else
is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..adaptation import LossContext, tap_outputs
from ..errors import ConfigError, InputError, MetamtlError
from ..models.backbones import TrunkHead
from .taps import named_layer, take_rows


class Teacher:
    """Base class: :meth:`outputs` gives logits (and tapped features) for a loss context."""

    def __init__(self) -> None:
        self._taps: list[str] = []
        #: (weak references to the inputs and support set, their address and shape, the outputs)
        self._cache: tuple[weakref.ref, weakref.ref, tuple, dict[str, Any]] | None = None
        #: (student support set, it in the teacher's dtype): the same tensor for the same support set
        self._support: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- subclasses ---------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    def _forward(self, ctx: LossContext, layers: list[str]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``(logits or None, {layer: output})`` of the teacher on ``ctx.inputs``."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What tells this teacher from another in a fit's settings (a resume must use the same):
        its kind and a digest of its weights."""
        return {"teacher": type(self).__name__, "weights": weights_digest(self.module)}

    # -- shared -------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "Teacher":
        self.module.to(device)
        return self

    def tap(self, layer: str) -> None:
        """Record layer ``layer`` of the teacher (for feature distillation)."""
        named_layer(self.module, layer, "teacher")
        if layer not in self._taps:
            self._taps.append(layer)
            self._cache = None  # cached outputs lack the new layer

    def release(self) -> None:
        self._taps.clear()
        self._cache = None
        self._support = None

    def _in_teacher_dtype(self, ctx: LossContext) -> LossContext:
        """``ctx`` with inputs and support set in the dtype of the teacher's weights (a float32
        teacher of a float64 student); ``ctx`` itself when they already are."""
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
        if dtype is None or not ctx.inputs.is_floating_point() or ctx.inputs.dtype == dtype:
            return ctx
        if self._support is None or self._support[0] is not ctx.support_x:
            self._support = (ctx.support_x, ctx.support_x.to(dtype))
        return dataclasses.replace(ctx, inputs=ctx.inputs.to(dtype), support_x=self._support[1])

    def _run(self, ctx: LossContext) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """:meth:`_forward` on ``ctx`` in the teacher's dtype; a teacher that cannot take the
        student's inputs is an :class:`InputError` naming it."""
        try:
            return self._forward(self._in_teacher_dtype(ctx), self._taps)
        except (MetamtlError, torch.OutOfMemoryError):
            raise
        except RuntimeError as exc:
            raise InputError(
                f"the distillation TEACHER ({type(self.module).__name__}) failed on the student's inputs "
                f"{list(ctx.inputs.shape)} ({str(ctx.inputs.dtype).replace('torch.', '')}): {exc}. A teacher must "
                "take the student's inputs: the same preprocessing, channels and image size"
            ) from exc

    def outputs(self, ctx: LossContext) -> dict[str, Any]:
        """``{"logits": [N, C], layer: features...}`` for ``ctx.inputs`` (cached per input tensor).

        The cache answers for the very tensors it was computed on (weak references: a freed
        tensor's ``id`` and address, which the next task's tensors may reuse, never match)."""
        key = (ctx.inputs.data_ptr(), tuple(ctx.inputs.shape))
        cache = self._cache
        if cache is not None and cache[0]() is ctx.inputs and cache[1]() is ctx.support_x and cache[2] == key:
            return cache[3]
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                logits, feats = self._run(ctx)
                back = ctx.inputs.dtype if ctx.inputs.is_floating_point() else None  # the student's dtype
                out = {"logits": None if logits is None else _as(logits.detach(), back)}
                for layer in self._taps:
                    out[layer] = _as(take_rows(feats.get(layer), layer, ctx.inputs.shape[0]).detach(), back)
        finally:
            self.module.train(was_training)
        self._cache = (weakref.ref(ctx.inputs), _ref(ctx.support_x), key, out)
        return out

    def logits(self, ctx: LossContext) -> torch.Tensor:
        """Teacher logits for ``ctx.inputs``; error unless they are over the task's ``ways`` labels
        (phase ``"classes"``: over the student's training classes)."""
        logits = self.outputs(ctx)["logits"]
        if logits is None:
            raise InputError("this teacher has no head of its own: it can give features, not soft targets; "
                             "use a MetaLearner teacher (adapted per episode) or a module with a head")
        if getattr(ctx, "phase", None) == "classes" and logits.shape != ctx.logits.shape:
            raise InputError(
                f"the teacher gives logits of shape {list(logits.shape)} but the student classifies "
                f"{ctx.ways} training classes ({list(ctx.logits.shape)}): distillation over all training "
                "classes needs a teacher trained on the same classes (a transfer learner, or a module with "
                f"{ctx.ways} outputs)"
            )
        if logits.shape != ctx.logits.shape:
            raise InputError(
                f"the teacher gives logits of shape {list(logits.shape)} but the student's are "
                f"{list(ctx.logits.shape)} ({ctx.ways}-way task): a teacher must score exactly the task's "
                f"{ctx.ways} labels in the episode's order; use a MetaLearner teacher, which adapts to each "
                "episode's support set, or a module with that many outputs"
            )
        return logits


def _ref(t: torch.Tensor | None) -> Any:
    """A weak reference to ``t`` (to no tensor: one that gives ``None``)."""
    return (lambda: None) if t is None else weakref.ref(t)


def _as(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` where it is a floating tensor of another floating dtype (else ``t``)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def weights_digest(*modules: nn.Module) -> str:
    """A short digest of the modules' state (names and values, whatever their device or layout)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ModuleTeacher(Teacher):
    """Any ``nn.Module`` mapping inputs to logits over the task's labels (used in eval mode).

    A :class:`~metamtl.models.TrunkHead` without a head serves feature distillation only.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"a teacher module must be an nn.Module, got {type(module).__name__}")
        self._module = module

    @property
    def module(self) -> nn.Module:
        return self._module

    def _forward(self, ctx: LossContext, layers: list[str]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        m = self._module
        with tap_outputs(m, layers) as feats:
            if isinstance(m, TrunkHead) and m.head is None:  # features only
                m.trunk(ctx.inputs)
                return None, feats
            return m(ctx.inputs), feats


class LearnerTeacher(Teacher):
    """A meta-learner that adapts to each episode's support set before giving soft targets.

    Args:
        learner: a :class:`~metamtl.MetaLearner` or the path of one saved with ``save``.
        steps: inner steps of the teacher's adaptation (default: its ``eval_steps``).
    """

    def __init__(self, learner: Any, steps: int | None = None) -> None:
        super().__init__()
        from ..learner import MetaLearner

        if isinstance(learner, (str, Path)):
            learner = MetaLearner.load(learner, device="cpu")
        if not isinstance(learner, MetaLearner):
            raise ConfigError(f"LearnerTeacher needs a MetaLearner or a saved learner's path, got {type(learner).__name__}")
        self.learner = learner
        self.steps = steps
        self._adapted: tuple[Any, Any] | None = None

    @property
    def module(self) -> nn.Module:
        return self.learner.model

    @property
    def preprocessing(self):
        return self.learner.preprocessing

    def identity(self) -> dict[str, Any]:
        return {"teacher": type(self).__name__, "weights": weights_digest(self.learner.model, self.learner.algorithm),
                "steps": self.steps}

    def to(self, device: torch.device | str) -> "LearnerTeacher":
        self.learner.model.to(device)
        self.learner.algorithm.to(device)
        self.learner.placement = dataclasses.replace(self.learner.placement, device=torch.device(device))
        return self

    def _forward(self, ctx: LossContext, layers: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if getattr(ctx, "phase", None) == "classes":
            return self.class_logits(ctx.inputs, layers)
        key = (id(ctx.support_x), ctx.support_x.data_ptr(), tuple(ctx.support_x.shape), ctx.ways)
        if self._adapted is None or self._adapted[0] != key:
            try:
                adapted = self.learner.algorithm.adapt(self.learner.model, ctx.support_x, ctx.support_y, ctx.ways,
                                                       self.steps)
            except InputError as exc:
                raise InputError(f"the distillation TEACHER (not the student) cannot adapt to this {ctx.ways}-way "
                                 f"task: {str(exc).replace('this model', 'the teacher')}") from None
            self._adapted = (key, adapted)
        names = self._adapted_names(layers)
        logits, feats = self._adapted[1].forward(ctx.inputs, taps=list(names))
        return logits, {names[n]: f for n, f in feats.items() if n in names}

    def _adapted_names(self, layers: Sequence[str]) -> dict[str, str]:
        """``{name in the adapted model: layer name in the teacher's model}``: an algorithm that adapts
        on a feature model wrapping the trunk (transfer's cosine classifier: ``scale * trunk(x) /
        ||trunk(x)||``) holds the model's trunk under another name there."""
        algorithm, model = self.learner.algorithm, self.learner.model
        adapted = algorithm.feature_model(model) if hasattr(algorithm, "feature_model") else model
        prefix = next((n for n, m in adapted.named_modules() if m is model.trunk), "trunk")
        return {(prefix + n[len("trunk"):] if n == "trunk" or n.startswith("trunk.") else n): n for n in layers}

    def class_logits(self, x: torch.Tensor, layers: list[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits over all the teacher's training classes (its ``transfer`` classifier), and the
        outputs of ``layers``."""
        algorithm = self.learner.algorithm
        if not hasattr(algorithm, "global_logits"):
            raise InputError(
                f"distillation over all training classes (phase 'classes') needs a teacher with a classifier "
                f"over them: a learner trained with the transfer algorithm, not {algorithm.name!r}"
            )
        with tap_outputs(self.learner.model, list(layers)) as feats:
            return algorithm.global_logits(self.learner.model.trunk(x)), feats

    def release(self) -> None:
        super().release()
        self._adapted = None


def as_teacher(teacher: Any, steps: int | None = None) -> Teacher:
    """A :class:`Teacher` from a Teacher, a MetaLearner (or its saved path), or an ``nn.Module``."""
    from ..learner import MetaLearner

    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, (MetaLearner, str, Path)):
        return LearnerTeacher(teacher, steps)
    if isinstance(teacher, nn.Module):
        return ModuleTeacher(teacher)
    raise ConfigError(f"cannot use a {type(teacher).__name__} as a teacher: pass an nn.Module, a MetaLearner "
                      "or the path of a saved learner")


__all__: Sequence[str] = ["Teacher", "ModuleTeacher", "LearnerTeacher", "as_teacher"]
