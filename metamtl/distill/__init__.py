"""Knowledge distillation for meta-learning, as loss terms of the shared inner loop.

* :mod:`~metamtl.distill.teachers` - teachers: any ``nn.Module``, or a saved
  :class:`~metamtl.MetaLearner` adapted to each episode (its logits are in the episode's label order).
* :mod:`~metamtl.distill.hooks` - :class:`SoftTargets` (temperature-scaled soft targets) and
  :class:`FeatureDistillation` (named layers through a learned adapter), acting on the inner-loop
  (support) loss, the outer-loop (query) loss or both, attached by the :class:`Distillation` callback.
* :mod:`~metamtl.distill.taps` - forward taps on named layers that also see ``higher``'s functional copies.
"""
from .hooks import (
    PHASES, Distillation, DistillationTerm, FeatureDistillation, SoftTargets, distillation, from_config,
    soft_target_loss,
)
from .taps import FeatureTap, named_layer
from .teachers import LearnerTeacher, ModuleTeacher, Teacher, as_teacher

__all__ = [
    "PHASES", "Distillation", "DistillationTerm", "FeatureDistillation", "SoftTargets", "distillation",
    "from_config", "soft_target_loss", "FeatureTap", "named_layer", "LearnerTeacher", "ModuleTeacher", "Teacher", "as_teacher",
]
