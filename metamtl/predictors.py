"""Behind :meth:`MetaLearner.adapt <metamtl.MetaLearner.adapt>` and ``predict`` (:func:`adapt`,
:func:`predict`), and what ``adapt`` returns: a learner adapted to one support set, called on query
inputs to get logits (:class:`AdaptedPredictor`), or a feature head on that support set's trunk
features (:class:`HeadPredictor`)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import inputs
from .adaptation import Adapted
from .errors import InputError, TrainingError, did_you_mean
from .evaluation import model_lock, outside_inference_mode
from .heads import FeatureHead, head_name, query_features
from .inputs import eval_mode
from .models.multidataset import dataset_inputs, dataset_scope, routed_dataset
from .numerics import divergence

if TYPE_CHECKING:
    from .learner import MetaLearner


def batch_statistics(learner: "MetaLearner", algorithm: bool = True) -> bool:
    """Whether query features depend on the other queries of one call: ``bn_stats="transductive"``
    with a BatchNorm layer that normalises with batch statistics at test time. MAML++'s per-step
    sets with ``bn_eval="running"`` normalise every image on its own, but only in the algorithm's
    own adaptation (``algorithm``): a feature head runs ``model.trunk``, whose BatchNorm does not."""
    cfg = learner.algorithm.config()
    per_image = algorithm and cfg.get("per_step_bn") and cfg.get("bn_eval") == "running"
    if learner.bn_stats != "transductive" or per_image:
        return False
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in learner.model.modules())


def learner_datasets(learner: "MetaLearner") -> set[str]:
    """The datasets ``learner`` was trained on, when several: a multi-dataset model's branches and the
    labels of its saved preprocessings (empty for a learner of one dataset)."""
    saved = learner.metadata.get("preprocessing") if learner.preprocessing is None else None
    return set(dataset_inputs(learner.model)) | (set(saved) if isinstance(saved, dict) else set())


def episode_mean(learner: "MetaLearner", head: Any, episode: Any) -> torch.Tensor | None:
    """The mean ``head`` centres an evaluated ``episode``'s features with: its dataset's (an episode
    whose name is none of a multi-dataset model's datasets: the one its support images route to, as
    in :func:`adapt`)."""
    dataset = routed_dataset(learner.model, episode.dataset, episode.support_x) or episode.dataset
    return learner.inference.centring_mean(head, dataset, learner.device, learner_datasets(learner))


def check_dataset(learner: "MetaLearner", dataset: str | None, x: torch.Tensor) -> None:
    """:class:`InputError` for a ``dataset=`` that is none of a multi-dataset model's datasets (its
    branches, or the saved preprocessings), or whose branches take inputs of another shape than
    support images ``x`` (model input). Other models take model input of any dataset."""
    shapes = dataset_inputs(learner.model)
    if dataset is None or not shapes:
        return
    known = learner_datasets(learner)
    if dataset not in known:
        raise InputError(f"dataset {dataset!r} is none of this learner's datasets {sorted(known)}."
                         f"{did_you_mean(dataset, known)} Pass one of them as dataset=, or leave it out to "
                         "route model-ready inputs by their shape")
    if dataset in shapes and tuple(x.shape[1:]) != shapes[dataset]:
        raise InputError(f"support_x holds inputs of shape {list(x.shape[1:])} but dataset {dataset!r} takes "
                         f"{list(shapes[dataset])}: name the dataset the images belong to, or preprocess them as "
                         f"{dataset!r}'s training data were")


def finite_outputs(out: torch.Tensor, steps: int | None, head: str | None = None) -> torch.Tensor:
    """``out`` (query logits or values) unless it holds NaN or inf: the learner's weights were
    checked finite before adapting, so the adaptation (or the forward pass) diverged, and NaN
    logits would predict class 0 for every query: :class:`TrainingError`, as ``evaluate`` raises."""
    if not bool(torch.isfinite(out).all()):
        raise TrainingError(f"predict: the query outputs are not finite {divergence(steps, head)}, so no prediction "
                            "is returned")
    return out


def weights_stamp(learner: "MetaLearner") -> tuple[Any, ...]:
    """The weights ``learner`` holds now: each parameter and buffer of its model and algorithm, with the
    version counter that every in-place change bumps (a meta-optimizer step of ``fit``, ``init_from``,
    ``load_state_dict``, a user's edit) and its storage (``p.data = ...`` keeps the tensor but not its
    storage); a replaced module holds other tensors. An edit through ``p.data`` bumps no version counter
    that ``p`` sees, so the sum of each tensor's values is stamped too (one pass over the weights)."""
    tensors = [*learner.model.parameters(), *learner.model.buffers(), *learner.algorithm.parameters(),
               *learner.algorithm.buffers()]
    return (*((id(t), -1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors),
            weights_checksum(tensors))


def weights_checksum(tensors: list[torch.Tensor]) -> bytes:
    """The sum of each of ``tensors``' values, gathered once per device (one sync each)."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    with torch.no_grad():
        for t in tensors:
            if not t.is_complex() and t.device.type != "meta":
                sums.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float32))
        return b"".join(torch.stack(s).cpu().numpy().tobytes() for s in sums.values())


class AdaptedPredictor:
    """A learner adapted to one support set. Call it on query inputs to get logits.

    It answers with the weights the learner had at ``adapt``: once they change (``fit`` trains on,
    ``init_from``, a module replaced or edited in place, also through ``p.data``) calling it is an :class:`InputError` saying to
    adapt again, as no snapshot of the whole learner is kept (some algorithms read its live trunk).

    :attr:`transductive`: whether a prediction depends on the other queries passed in the same
    call: a transductive head, or query BatchNorm statistics of the queries themselves
    (``bn_stats="transductive"``; pass ``bn_stats="support"`` to predict images one at a time).
    """

    def __init__(self, learner: "MetaLearner", adapted: Adapted, ways: int, dataset: str | None = None) -> None:
        self.learner, self.adapted, self.ways = learner, adapted, ways
        self.dataset = dataset  # whose preprocessing raw query images get (a learner trained on several)
        self.route = routed_dataset(learner.model, dataset)  # whose branches of a multi-dataset model queries take
        self.transductive = batch_statistics(learner)
        self.stamp = weights_stamp(learner)  # the weights it was adapted with

    def check_current(self) -> None:
        """:class:`InputError` when the learner's weights changed since this predictor was made."""
        if self.stamp is None or weights_stamp(self.learner) != self.stamp:
            raise InputError(
                "this predictor was adapted with weights the learner no longer holds: since learner.adapt it trained "
                "on (fit), took other weights (init_from, load_state_dict) or a module was replaced or edited, and "
                "its support-set adaptation belongs to the old weights. Call learner.adapt(support_x, support_y) "
                "again for a predictor of the learner as it is now (or keep a copy.deepcopy(learner) to adapt later)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise InputError(f"a {type(self).__name__} (what learner.adapt returns) cannot be pickled or torch.save'd: "
                         "it holds the adapted state of a live learner. Save the learner (learner.save(path)) and, "
                         "where it is needed, MetaLearner.load(path).adapt(support_x, support_y) again")

    def __copy__(self) -> "AdaptedPredictor":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> "AdaptedPredictor":
        """A copy with its own copy of the learner, valid as long as this one is."""
        new = memo[id(self)] = object.__new__(type(self))
        current = self.stamp is not None and weights_stamp(self.learner) == self.stamp
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new.stamp = weights_stamp(new.learner) if current else None
        return new

    @property
    def support_x(self) -> torch.Tensor:
        return self.adapted.support_x

    def __call__(self, query_x: Any) -> torch.Tensor:
        with model_lock(self.learner.model):  # calls from several threads take turns (they swap weights, modes)
            self.check_current()
            return self._outputs(self.learner.model_input(query_x, "query_x", self.dataset))

    def _outputs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.learner.autocast(), eval_mode(self.learner.model), dataset_scope(self.route):
            out = self.adapted(x).detach().to(self.learner.placement.dtype)  # bf16 autocast: the weights' dtype
        return finite_outputs(out, getattr(self.adapted, "steps", None))

    def predict(self, query_x: Any) -> torch.Tensor:
        """Predicted labels ``0..ways-1`` (classification) or values (regression)."""
        out = self(query_x)
        return out.argmax(-1) if self.learner.task == "classification" else out


class HeadPredictor(AdaptedPredictor):
    """A :mod:`metamtl.heads` feature head on one support set's trunk features.

    With a transductive head (:attr:`transductive`), the queries given in one call are classified
    together.
    """

    def __init__(self, learner: "MetaLearner", head: FeatureHead, support_x: torch.Tensor,
                 support_y: torch.Tensor, ways: int, dataset: str | None = None) -> None:
        super().__init__(learner, None, ways, dataset)  # type: ignore[arg-type]
        self.head, self._support_x, self.support_y = head, support_x, support_y
        self.mean = learner.inference.centring_mean(head, dataset, learner.device, learner_datasets(learner))  # to centre
        self.transductive = head.transductive or batch_statistics(learner, algorithm=False)
        with torch.no_grad(), learner.autocast():
            self.features = learner.model.trunk(support_x)

    @property
    def support_x(self) -> torch.Tensor:
        return self._support_x

    def _outputs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.learner.autocast(), eval_mode(self.learner.model), dataset_scope(self.route):
            query = query_features(self.learner.model.trunk, x, self._support_x, self.learner.bn_stats)
        logits = self.head(self.features, self.support_y, query, self.ways, self.mean).detach()
        return finite_outputs(logits, None, head_name(self.head))


def adapt(learner: "MetaLearner", support_x: Any, support_y: Any, steps: int | None = None,
          support_augment: Any = None, head: Any = None, dataset: str | None = None) -> AdaptedPredictor:
    """``learner`` adapted to a support set (see :meth:`MetaLearner.adapt <metamtl.MetaLearner.adapt>`):
    inputs checked and coerced (raw images preprocessed as ``dataset``'s when the learner was trained on
    several datasets), support copies added, then the algorithm's adaptation or ``head``, run by a
    multi-dataset model in ``dataset``'s branches (stem, trunk, head); calls from several threads take turns
    (:func:`~metamtl.evaluation.model_lock`)."""
    with model_lock(learner.model):
        return _adapted(learner, support_x, support_y, steps, support_augment, head, dataset)


def _adapted(learner: "MetaLearner", support_x: Any, support_y: Any, steps: int | None, support_augment: Any,
             head: Any, dataset: str | None) -> AdaptedPredictor:
    inputs.check_steps(steps)
    learner.check_finite("adapt")
    preprocessing = inputs.preprocessing_for(learner.preprocessing, learner.metadata, dataset)
    x = inputs.model_input(support_x, "support_x", model=learner.model, placement=learner.placement,
                           preprocessing=preprocessing, task=learner.task)
    y, ways = inputs.support_labels(support_y, x.shape[0], learner.task, learner.device, learner.model,
                                    learner.placement.dtype)
    check_dataset(learner, dataset, x)
    # a multi-dataset model runs ``dataset``'s branches (else those the support images' shape fits)
    route = routed_dataset(learner.model, dataset, x)
    if isinstance(preprocessing, inputs.Unchosen):  # float input, no dataset=: the routed dataset's, if any
        preprocessing = preprocessing.settled(route)
    x, y = inputs.support_copies(x, y, learner.inference.augment(support_augment, learner.task), preprocessing=preprocessing)
    head = learner.inference.classifier(head, learner.task, steps, learner.algorithm)  # ConfigError: steps nothing takes
    with eval_mode(learner.model), dataset_scope(route):  # the learner's own mode (e.g. training) is left as it was
        if head is not None:
            return HeadPredictor(learner, head, x, y, ways, dataset if dataset is not None else route)
        with torch.inference_mode(False), torch.no_grad(), learner.autocast():  # an inner loop needs autograd
            adapted = learner.algorithm.adapt(learner.model, outside_inference_mode(x), outside_inference_mode(y),
                                              ways, steps)
        return AdaptedPredictor(learner, adapted, ways, dataset)


def predict(learner: "MetaLearner", support_x: Any, support_y: Any, query_x: Any, steps: int | None = None,
            support_augment: Any = None, head: Any = None, dataset: str | None = None) -> torch.Tensor:
    """Logits for ``query_x`` of ``learner`` adapted to ``(support_x, support_y)`` (see
    :meth:`MetaLearner.predict <metamtl.MetaLearner.predict>`)."""
    with model_lock(learner.model):  # adapted and called in one turn
        predictor = learner.adapt(support_x, support_y, steps, support_augment=support_augment, head=head, dataset=dataset)
        q = learner.model_input(query_x, "query_x", dataset)
        if q.shape[1:] != predictor.support_x.shape[1:]:
            raise InputError(f"query images have shape {list(q.shape[1:])} but support images "
                             f"{list(predictor.support_x.shape[1:])}")
        return predictor(q)
