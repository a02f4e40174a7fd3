"""How a learner treats new tasks by default: its inference settings, saved with it.

:class:`InferenceSettings` holds what :meth:`~metamtl.MetaLearner.evaluate`,
:meth:`~metamtl.MetaLearner.adapt` and :meth:`~metamtl.MetaLearner.predict` use unless a call
says otherwise: test-time support augmentation (augmented copies of every support image), the
feature head that classifies queries (``None``: the algorithm's own adaptation; see
:mod:`metamtl.heads`) and the training features' means that centring heads use.  In a
checkpoint it is the ``evaluation`` entry.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Collection

import torch

from .data.augment import SupportAugment
from .errors import ConfigError, InputError
from .heads import FeatureHead, build_head, check_no_steps, registered
from .inputs import as_support_augment


def classifying_head(head: FeatureHead | None, task: str) -> FeatureHead | None:
    """``head``, refused with a :class:`ConfigError` when the learner does not classify."""
    if head is not None and task != "classification":
        raise ConfigError(f"feature head {head.name!r} classifies; this learner does {task}: "
                          "use the algorithm's adaptation (head None or 'algorithm')")
    return head


def augmenting(tta: SupportAugment | None, task: str) -> SupportAugment | None:
    """``tta``, refused with a :class:`ConfigError` when the learner does not classify: its copies
    are augmented images, and a regression learner's inputs are no images."""
    if tta is not None and task != "classification":
        raise ConfigError(f"support_augment makes augmented copies of support images; this learner does {task}, "
                          "whose inputs are no images: leave support_augment out (or False)")
    return tta


@dataclasses.dataclass
class InferenceSettings:
    """The defaults of ``evaluate``/``adapt``/``predict`` (see the module docstring)."""

    support_augment: SupportAugment | None = None
    head: FeatureHead | None = None
    #: mean trunk feature of each training dataset (by name), for heads that centre features
    feature_means: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, support_augment: Any = None, head: Any = None,
               feature_means: dict[str, torch.Tensor] | None = None, task: str = "classification") -> "InferenceSettings":
        """From specs: a :class:`SupportAugment` or its settings, a head or its name/settings."""
        head = registered(classifying_head(build_head(head), task))  # saved with the learner: rebuilt by name
        return cls(augmenting(as_support_augment(support_augment), task), head, dict(feature_means or {}))

    def augment(self, spec: Any = None, task: str = "classification") -> SupportAugment | None:
        """The support augmentation of a call: ``spec`` (``False``: none), or the default when ``None``;
        refused for a learner that does not classify (as in :meth:`create`)."""
        return augmenting(self.support_augment if spec is None else as_support_augment(spec), task)

    def classifier(self, spec: Any = None, task: str = "classification", steps: int | None = None,
                   algorithm: Any = None) -> FeatureHead | None:
        """The head of a call: ``spec`` (``"algorithm"``: the algorithm's adaptation), or the default;
        a feature head only for a learner that does ``classification``, and :class:`ConfigError` for
        inner ``steps`` (other than 0) given with a feature head, or for an ``algorithm`` without an
        inner loop (neither takes any)."""
        head = self.head if spec is None else classifying_head(build_head(spec), task)
        check_no_steps(steps, [head])
        if head is None and steps and algorithm is not None and not algorithm.has_inner_loop:
            raise ConfigError(f"steps={steps}: algorithm {algorithm.name!r} has no inner loop (its results take 0 "
                              "steps), so the steps would be ignored: leave steps out (or pass 0)")
        return head

    def feature_mean(self, dataset: str | None = None, device: Any = "cpu",
                     datasets: Collection[str] = ()) -> torch.Tensor | None:
        """The training split's mean trunk feature for ``dataset``: its own, else the only one if there
        is one, unless the learner was trained on several ``datasets`` (then another dataset's mean,
        of another stem's features, is no stand-in: ``None``)."""
        if dataset in self.feature_means:
            return self.feature_means[dataset].to(device)
        if len(self.feature_means) == 1 and (dataset is None or len(datasets) < 2):
            return next(iter(self.feature_means.values())).to(device)
        return None

    def centring_mean(self, head: FeatureHead | None, dataset: str | None = None,
                      device: Any = "cpu", datasets: Collection[str] = ()) -> torch.Tensor | None:
        """The mean ``head`` centres features with (``None`` for a head that does not centre):
        :meth:`feature_mean`; :class:`InputError` when there are some and none is ``dataset``'s."""
        if head is None or not head.center:
            return None
        mean = self.feature_mean(dataset, device, datasets)
        if mean is None and self.feature_means:
            none_for, fix = ("", "pass dataset=NAME, one of them, to adapt/predict (evaluate uses each episode's "
                             "dataset)") if dataset is None else (
                f" and none for {dataset!r}", f"call learner.compute_feature_mean(tasks) with {dataset!r}'s training "
                "tasks (a fit on other datasets recomputes only theirs), or name one of those datasets")
            raise InputError(f"head {head.name!r} centres features with the training split's mean feature; this learner "
                             f"has one per dataset {sorted(self.feature_means)}{none_for}: {fix}")
        return mean

    def drop_means(self, why: str) -> dict[str, torch.Tensor]:
        """Forget :attr:`feature_means` (they belong to a trunk that ``why`` replaced), with a warning
        when there were any; returns them."""
        dropped = dict(self.feature_means)
        self.feature_means.clear()
        if dropped:
            warnings.warn(f"{why}: the feature means {sorted(dropped)} of the old trunk are dropped; call "
                          "learner.compute_feature_mean(train_tasks) before using a centring head (simpleshot, "
                          "laplacianshot)", RuntimeWarning, stacklevel=3)
        return dropped

    def state(self) -> dict[str, Any]:
        """The checkpoint's ``evaluation`` entry (plain containers and tensors)."""
        return {"support_augment": self.support_augment.config() if self.support_augment else None,
                "head": registered(self.head).config() if self.head is not None else None,
                "feature_means": {k: v.detach().cpu() for k, v in self.feature_means.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "InferenceSettings":
        state = state or {}
        head = state.get("head")
        try:
            build_head(head)
        except ConfigError as exc:  # e.g. a setting a newer version bounds: the weights still load
            warnings.warn(f"the saved default head {head!r} is refused by this version ({exc}); the learner "
                          "loads with the algorithm's own adaptation as its default (pass head= to choose one)",
                          UserWarning, stacklevel=2)
            head = None
        return cls.create(state.get("support_augment"), head, state.get("feature_means"))
