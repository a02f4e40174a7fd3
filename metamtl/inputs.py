"""What a learner accepts: inputs and labels for ``adapt``/``predict``, episodes, argument checks.

Every function here raises a :mod:`metamtl.errors` error naming what was wrong and how to fix
it, before any parameter changes, so a learner stays usable after bad input.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
import weakref
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .algorithms import Algorithm, build_algorithm
from .algorithms.base import claim_algorithm
from .data.augment import SupportAugment
from .data.base import Preprocessing
from .errors import ConfigError, InputError, TaskError, unknown_name
from .models.backbones import TrunkHead, uncompiled
from .placement import Placement
from .tasks.episode import Episode, regression_targets
from .tasks.sampler import TaskSource, episode_generator

TASK_TYPES = ("classification", "regression")
#: models with a user's trunk or head whose output is not checked yet (:func:`check_trunk_features`), and
#: whether per-task heads or prototypes are built on it (then features must be ``[batch, features]``)
_UNCHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Unchosen(dict):
    """Several datasets' preprocessing, by label, none of them chosen (``asked``: the ``dataset=``
    given, which is none of them, or ``None``): :func:`preprocess` refuses images with it."""

    def __init__(self, saved: dict[str, Preprocessing], asked: str | None) -> None:
        super().__init__(saved)
        self.asked = asked

    def settled(self, dataset: str | None) -> "Preprocessing | Unchosen":
        """``dataset``'s preprocessing (e.g. the dataset a multi-dataset model routed the inputs to),
        the one all datasets share, else still unchosen."""
        if dataset in self:
            return self[dataset]
        first = next(iter(self.values()))
        return first if all(p == first for p in self.values()) else self


def preprocessing_for(preprocessing: Preprocessing | None, metadata: dict[str, Any],
                      dataset: str | None = None) -> Preprocessing | Unchosen | None:
    """How a learner decodes raw images of ``dataset``: its own preprocessing; for a learner trained
    on several datasets (``metamtl fit`` saves each one's, by label, in ``metadata["preprocessing"]``)
    ``dataset``'s, else all of them (:class:`Unchosen`: refused by :func:`preprocess` only if images
    need decoding, so float model input of any dataset still works)."""
    saved = metadata.get("preprocessing") if preprocessing is None else None
    if not isinstance(saved, dict) or not saved:
        return preprocessing
    if dataset in saved:
        return Preprocessing.from_dict(saved[dataset])
    return Unchosen({str(k): Preprocessing.from_dict(v) for k, v in saved.items()}, dataset)


def preprocess(images: Any, preprocessing: Preprocessing | Unchosen | None) -> torch.Tensor:
    """Raw images (PIL images or arrays, one or a list) -> model input ``[N, C, H, W]``
    (``preprocessing``: from :func:`preprocessing_for`)."""
    if isinstance(preprocessing, Unchosen):
        asked = f" none for dataset {preprocessing.asked!r}," if preprocessing.asked is not None else ""
        raise InputError(
            f"this learner was trained on several datasets, {sorted(preprocessing)}, each with its own "
            f"preprocessing,{asked} so images cannot be decoded: pass dataset=NAME (one of them) to "
            "adapt/predict/preprocess, or give model-ready float tensors"
        )
    if preprocessing is None:
        raise ConfigError(
            "this learner has no preprocessing: pass preprocessing=dataset.preprocessing when "
            "creating it (the CLI does), or give model-ready float tensors"
        )
    return preprocessing(images)


def refuse_meta(x: Any, what: str) -> None:
    """:class:`InputError` for a tensor on torch's ``meta`` device (shapes without values), which
    torch would only refuse to copy with a bare NotImplementedError further down."""
    if isinstance(x, torch.Tensor) and x.is_meta:
        raise InputError(f"{what} is a tensor on torch's 'meta' device: it has a shape but no values; "
                         "give a tensor with data (e.g. created on 'cpu' or the learner's device)")


def _array_input(x: np.ndarray) -> torch.Tensor:
    """A numeric array as a float tensor without rounding: float arrays keep their dtype, integers
    become float64; :meth:`Placement.model_input` then casts to the model's dtype (float64 stays exact)."""
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.double()


def _regression_input(x: Any, what: str) -> torch.Tensor:
    """A regression learner's input: a float tensor, or a numeric array (no images)."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return _array_input(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, (torch.Tensor, np.ndarray)) else type(x).__name__
        raise InputError(f"{what} must be float regression inputs (a float tensor or numeric array of shape "
                         f"[n, in_features]), got {got}")
    return x


def model_input(x: Any, what: str, *, model: TrunkHead, placement: Placement,
                preprocessing: Preprocessing | Unchosen | None, task: str = "classification") -> torch.Tensor:
    """``x`` as model input on the learner's device.

    ``x`` may be model input (a float tensor), stored ``uint8`` images, or raw images (PIL images
    or arrays), which are preprocessed; float arrays are taken as model input when there is no
    preprocessing.  For ``task="regression"`` only float tensors and numeric arrays are input.
    """
    refuse_meta(x, what)
    if task == "regression":
        x = _regression_input(x, what)
    elif not isinstance(x, torch.Tensor) or x.dtype == torch.uint8:
        if preprocessing is None and isinstance(x, np.ndarray) and x.dtype != np.uint8:
            x = _array_input(x)
        else:
            x = preprocess(x, preprocessing)
    elif not x.is_floating_point():
        raise InputError(f"{what} must be float model input, uint8 images or raw images; got {x.dtype}")
    x = placement.model_input(x)
    try:
        model.check_input(x)
    except InputError as exc:
        if task == "regression":
            raise InputError(f"{what}: {exc}; give the regression inputs shaped like the training tasks' "
                             "(one row per example)") from None
        raise InputError(
            f"{what}: {exc}; give raw images (PIL images or arrays, preprocessed like the training "
            "data) or the output of MetaLearner.preprocess()"
        ) from None
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contains NaN or infinite values")
    check_trunk_features(model, x)
    return x


def check_regression_targets(y: torch.Tensor, what: str, model: TrunkHead | None) -> None:
    """:class:`InputError` unless ``y`` are finite regression targets the model's outputs match:
    ``[n]`` or ``[n, d]`` with ``d`` the model's outputs (a per-task head, ``head_init='zero'``, gets ``d`` too)."""
    if not y.is_floating_point():
        raise InputError(f"{what} must be float regression targets, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise InputError(f"{what} contains NaN or infinite targets; drop or fill those examples first")
    width = 1 if y.dim() == 1 else int(y.shape[1])
    outputs = 1 if model is None or model.out_features is None else model.out_features
    if y.dim() > 2 or width != outputs:
        raise InputError(
            f"{what} has shape {list(y.shape)} but the model predicts {outputs} value(s) per example: "
            f"give targets of shape [n] or [n, {outputs}], or build the model with out_features={width}"
        )


def support_labels(y: Any, n: int, task: str, device: torch.device,
                   model: TrunkHead | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Support labels as a tensor on ``device`` and the number of ways (1 for regression).

    Classification labels must be the integers ``0..N-1``, N >= 2, every class with a support example;
    regression targets are finite ``[n]`` or ``[n, d]`` floats, ``d`` the outputs of ``model``, cast
    to ``dtype`` (the model's, as fit and evaluate cast episodes).
    """
    refuse_meta(y, "support_y")
    try:
        y = torch.as_tensor(y, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"support_y must be labels 0..N-1 (a list, array or tensor of integers), got {y!r:.80}: {exc}") from None
    if y.dim() != 1 and not (task == "regression" and y.dim() == 2):
        raise InputError(f"support_y must be a 1-D tensor of labels, got shape {list(y.shape)}")
    if y.shape[0] != n:
        raise InputError(f"support_x has {n} examples but support_y has {y.shape[0]} labels")
    if n == 0:
        raise InputError("the support set is empty: adapt/predict need at least one labelled example"
                         + (" of each of >= 2 classes" if task == "classification" else ""))
    if task == "regression":
        check_regression_targets(y, "support_y", model)  # the dtype given: int, bool or complex is no target
        return regression_targets(y.to(dtype)), 1
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise InputError("support_y must hold integer class labels 0..N-1")
    y = y.long()
    if int(y.min()) < 0:
        raise InputError(f"support labels must be integers in 0..N-1, got {sorted(set(y.tolist()))}")
    ways, classes = int(y.max()) + 1, torch.unique(y).tolist()
    if len(classes) < ways:  # missing classes: the first few listed, searched for in a bounded range
        present = set(classes)
        missing = [c for c in range(min(ways, len(classes) + 11)) if c not in present][:10]
        raise InputError(
            f"support labels must cover every class 0..{ways - 1}; class(es) {missing}"
            f"{' ...' if ways - len(classes) > len(missing) else ''} have no "
            "support example (relabel classes to 0..N-1)"
        )
    if ways < 2:  # one class: every query would win (fit and evaluate refuse 1-way tasks too)
        raise InputError(f"the support set has {ways} class (labels 0..{ways - 1}); adapt/predict need at least "
                         "2 classes to choose between: give support examples of >= 2 classes, labelled 0..N-1")
    return y, ways


def check_trunk_features(model: TrunkHead, x: torch.Tensor) -> None:
    """Once per learner, run a user's trunk (not one of metamtl's) on one example of model input
    ``x`` and refuse features that are not ``[batch, out_features]`` (:class:`ConfigError`):
    per-task heads, prototypes and Meta-SGD's rates are sized by ``out_features``, so a wrong
    number would fail deep inside, or train on the wrong shape silently."""
    if model not in _UNCHECKED:
        return
    trunk = model.trunk
    out = _first_output(trunk, x[:1])
    name = type(trunk).__name__
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    flat = ConfigError(
        f"the trunk {name} gives features of shape {shape} for one example; per-task heads and prototypes "
        "need one flat feature vector per example, [batch, features]: flatten them in the trunk (e.g. end "
        "it with nn.Flatten()) and set trunk.out_features to the number of features"
    )
    if not _UNCHECKED[model]:
        try:
            check_model_output(model, x)
        except InputError as exc:
            if isinstance(out, torch.Tensor):
                raise
            raise flat from exc  # (features, aux): the head cannot take them either
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        if not _UNCHECKED[model]:
            del _UNCHECKED[model]  # the model's own head takes the trunk's output, whatever its shape
            return
        raise flat
    declared = getattr(trunk, "out_features", None)
    said = "trunk.out_features" if declared is not None else "the head's in_features"
    if declared is None and model.head is not None:
        declared = getattr(model.head, "in_features", None)
    if declared is not None and int(declared) != out.shape[1]:
        raise ConfigError(
            f"{said} is {declared} but the trunk {name} gives {out.shape[1]} features per example (shape "
            f"{shape} for one example): set trunk.out_features = {out.shape[1]}"
            + ("" if said.startswith("trunk") else f" and build the head with in_features={out.shape[1]}")
        )
    del _UNCHECKED[model]


def check_model_output(model: TrunkHead, x: torch.Tensor) -> None:
    """:class:`InputError` unless the model (its own head on a user's trunk, or a user's head) gives
    ``[batch, out_features]`` for one example of ``x``: the loss would broadcast other shapes against the
    targets (every prediction against every target) and train on a wrong value silently."""
    try:
        out = _eval_run(model, x[:1])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"the model could not run on inputs of shape {list(x[:1].shape)}: {exc}") from exc
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != [1, model.out_features]:
        raise InputError(
            f"the model gives outputs of shape {shape} for one example; it must give [batch, out_features] = "
            f"[1, {model.out_features}] (one row of {model.out_features} outputs per example): make the trunk "
            "give [batch, features] (e.g. end it with nn.Flatten()) and the head [batch, out_features]")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, the mode of each of its modules (train or eval: a
    user's frozen BatchNorm in a training model) restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _eval_run(trunk: nn.Module, x: torch.Tensor) -> Any:
    """``trunk(x)`` in evaluation mode (no batch statistics, no running-statistics update) without
    gradients, the modes of its modules restored afterwards."""
    with eval_mode(trunk), torch.no_grad():
        return trunk(x)


def _first_output(trunk: nn.Module, x: torch.Tensor) -> Any:
    """A user trunk's output for one example ``x``; a trunk that cannot run on it is an
    :class:`InputError` naming the input's shape (torch's message attached)."""
    try:
        return _eval_run(trunk, x)
    except (RuntimeError, ValueError, TypeError) as exc:
        if _laid_out_nhwc(trunk) and _runs_in_nchw(trunk, x):
            raise ConfigError(
                f"the trunk {type(trunk).__name__} fails in the channels_last (NHWC) memory layout but runs in NCHW "
                f"(inputs of shape {list(x.shape)}): {exc}. channels_last=True (config: train.channels_last) "
                "forces that layout: set it to false, or null (automatic: NCHW for a trunk of your own), or "
                "flatten with .flatten()/.reshape() instead of .view() in the trunk"
            ) from exc
        raise InputError(
            f"the trunk {type(trunk).__name__} could not run on inputs of shape {list(x.shape)}: {exc}. Give it "
            "inputs of the kind it was built for (channels, image size, features), or build the trunk for this data"
        ) from exc


def _laid_out_nhwc(module: nn.Module) -> bool:
    """Whether a 4-D weight of ``module`` has channels_last strides (not NCHW's)."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and p.stride() != torch.empty(p.shape, device="meta").stride() for p in module.parameters())


def _runs_in_nchw(trunk: nn.Module, x: torch.Tensor) -> bool:
    """Whether a copy of ``trunk`` with NCHW weights runs on NCHW ``x`` (after it failed in NHWC)."""
    try:
        twin = copy.deepcopy(trunk)
        for p in twin.parameters():
            if p.dim() == 4:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        _eval_run(twin, x.clone(memory_format=torch.contiguous_format))
    except Exception:  # noqa: BLE001 - any failure: the layout is not (only) what is wrong
        return False
    return True


def _check_regression_inputs(x: torch.Tensor, what: str) -> None:
    """:class:`InputError` unless an episode's regression inputs ``x`` are finite floats (integer
    tensors are not read as image pixels: a regression model takes its inputs as they are)."""
    if not x.is_floating_point():
        raise InputError(f"{what} must be float regression inputs (a float tensor of shape [n, in_features]), "
                         f"got {x.dtype}: convert them with x.float() (regression inputs are never scaled as pixels)")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contains NaN or infinite inputs; drop or fill those examples first")


def _check_image_dtype(x: torch.Tensor, what: str) -> None:
    """A classification episode's inputs: stored ``uint8`` pixels (normalised by ``Episode.to``) or
    float model input; other integer (int64 from numpy, ...) or bool tensors are no model input."""
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise InputError(f"{what} is a {x.dtype} tensor: give uint8 pixels (0..255, normalised with the "
                         "preprocessing) or float model input, e.g. x.to(torch.uint8) for integer pixels "
                         "or x.float() for values already scaled")


def check_episode(episode: Any, what: str, *, task: str, model: TrunkHead) -> None:
    """Refuse, with a clear message, an episode a learner for ``task`` on ``model`` cannot use."""
    if not isinstance(episode, Episode):
        raise InputError(f"{what}: the task source returned {type(episode).__name__}, not an Episode")
    where = f"{what}: episode {episode.index}" + (f" of {episode.dataset!r}" if episode.dataset else "")
    episode.validate()
    if episode.task != task:
        raise InputError(f"{where} is a {episode.task} task but this learner does {task}")
    if task == "classification" and episode.ways < 2:  # whatever the task source (EpisodeSampler refuses earlier)
        raise TaskError(
            f"{where} is {episode.ways}-way: with a single class every query is trivially right (loss 0, "
            f"accuracy 100%), so {what} would learn or measure nothing; give the task source 2 or more classes per task")
    if task == "classification":
        for kind in ("support_x", "query_x"):
            _check_image_dtype(getattr(episode, kind), f"{where}: {kind}")
    if task == "regression":
        for kind in ("support_x", "query_x"):
            _check_regression_inputs(getattr(episode, kind), f"{where}: {kind}")
        for kind in ("support_y", "query_y"):
            check_regression_targets(getattr(episode, kind), f"{where}: {kind}", model)
    if episode.query_x.shape[0] == 0:
        raise InputError(f"{where} has no query examples; {what} needs queries >= 1 per class "
                         "(the query loss is what meta-training optimises and evaluation measures)")
    try:
        model.check_input(episode.support_x)
    except InputError as exc:
        raise InputError(
            f"{where}: the data does not fit the model: {exc}. Build the model for this data "
            "(e.g. conv4 in_channels/image_size) or load the data at the model's size (image_size=)"
        ) from None
    if model in _UNCHECKED:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        ready = episode.to(weight.device if weight is not None else None,
                           dtype=weight.dtype if weight is not None else None)
        check_trunk_features(model, ready.support_x)


def _refuse_inference_tensors(model: nn.Module) -> None:
    """:class:`ConfigError` for a model whose weights were made under ``torch.inference_mode()``: inference
    tensors can never be adapted or trained (torch refuses it, also outside the mode)."""
    names = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_inference()]
    if names:
        raise ConfigError(
            f"the model holds inference tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): it was "
            "built or converted under torch.inference_mode(), and such weights can never adapt or train; build "
            "the model outside it (MetaLearner itself may be created inside torch.inference_mode())")


def check_learner_parts(model: Any, algorithm: Any, task: str) -> tuple[TrunkHead, Algorithm]:
    """The model (a :class:`TrunkHead`, without a ``torch.compile`` wrapper) and the algorithm
    (built if given by name) of a new learner, after checking ``task`` is one of :data:`TASK_TYPES`."""
    model = uncompiled(model, "model")
    if not isinstance(model, TrunkHead):
        raise ConfigError(
            f"MetaLearner needs a metamtl.models.TrunkHead (trunk + head), got {type(model).__name__}; "
            "wrap your network as TrunkHead(trunk, head) or use metamtl.models.build_model"
        )
    _refuse_inference_tensors(model)
    algorithm = build_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    if not isinstance(algorithm, Algorithm):
        raise ConfigError(f"algorithm must be an Algorithm or a name, got {type(algorithm).__name__}")
    if task not in TASK_TYPES:
        raise unknown_name("task type", task, TASK_TYPES)
    if task == "regression" and algorithm.inner.head_init == "proto":
        raise ConfigError(
            f"algorithm {algorithm.name!r} builds its head from class prototypes (head_init='proto'), which "
            "needs class labels; for regression use a gradient-based algorithm with head_init 'learned' "
            "(e.g. 'maml') or 'zero'"
        )
    if task == "regression" and type(algorithm).trains_over_classes(algorithm.config()):
        raise ConfigError(f"algorithm {algorithm.name!r} trains over the training classes (num_classes); regression "
                          "tasks have no classes: use a gradient-based algorithm such as 'maml'")
    model.out_features  # the model's own head: its number of outputs must be known (ways, regression targets)
    per_task_heads = model.head is None or algorithm.inner.head_init != "learned"
    if per_task_heads:
        model.num_features  # a per-task head is built on the trunk's features: their number must be known
    if model.head is not None and per_task_heads:  # a warning: a user's network may come with its classifier
        warnings.warn(
            f"the model has its own head ({model.out_features} outputs), but algorithm {algorithm.name!r} builds a "
            f"fresh head for every task (head_init {algorithm.inner.head_init!r}): the model's head is never used, "
            "though it is listed in meta_parameters() and saved. Build the model with out_features=None "
            "(config: model.out_features: null), or use head_init: learned for a meta-learned head",
            UserWarning, stacklevel=3)
    if not all(type(m).__module__.startswith("metamtl.") for m in (model.trunk, model.head) if m is not None):
        _UNCHECKED[model] = per_task_heads  # a user's trunk or head: check its output on the first input
    claim_algorithm(algorithm, model)  # learned state of another learner's: ConfigError
    return model, algorithm


def check_mapping(name: str, value: Any) -> dict[str, Any]:
    """``value`` (``None``: empty) as a new dict; :class:`ConfigError` unless it is a mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a dict (names to values), got {type(value).__name__} {value!r:.60}")
    return dict(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum``, else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_steps(steps: Any) -> None:
    """Inner steps: ``None`` (the algorithm's default) or an integer >= 0."""
    if steps is not None:
        check_int("steps", steps, 0)


def check_task_source(name: str, tasks: Any) -> None:
    """:class:`ConfigError` unless ``tasks`` is a task source (``.episode(index)``, ways/shots/queries)."""
    if not isinstance(tasks, TaskSource):
        hint = " (wrap it: EpisodeSampler(dataset, ways, shots, queries))" if hasattr(tasks, "class_counts") else ""
        raise ConfigError(
            f"{name} must be a task source with .episode(index) and ways/shots/queries, such as "
            f"metamtl.tasks.EpisodeSampler; got {type(tasks).__name__}{hint}"
        )


def as_support_augment(spec: Any) -> SupportAugment | None:
    """A :class:`SupportAugment` from itself, its settings mapping, or ``None``/``False`` (none)."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, SupportAugment):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"support_augment must be a mapping such as {{copies: 5, augment: {{name: affine}}}}, "
                          f"a SupportAugment or null; got {spec!r}")
    unknown = sorted(set(spec) - {"augment", "copies", "seed"})
    if unknown:
        raise ConfigError(f"unknown support_augment key {unknown[0]!r}; valid keys: augment, copies, seed")
    return SupportAugment(**spec)


def support_copies(x: torch.Tensor, y: torch.Tensor, tta: SupportAugment | None, index: int = 0,
                   preprocessing: Preprocessing | Unchosen | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The support set with ``tta``'s augmented copies (drawn from its seed and ``index``).

    ``x`` is model input; with the ``preprocessing`` that normalised it, the copies are made from
    pixels in ``[0, 1]`` (as training augments stored images: colour jitter clamps to that range,
    affine ``fill: zeros`` is black) and normalised again."""
    if tta is None:
        return x, y
    if isinstance(preprocessing, Unchosen):  # copies are made from pixels: whose normalisation to undo?
        raise InputError(
            f"support augmentation makes its copies from pixels, and this learner was trained on several datasets "
            f"{sorted(preprocessing)} with different normalisation: pass dataset=NAME (one of them) so the support "
            "images are un-normalised as that dataset's, or support_augment=False")
    generator = episode_generator(tta.seed, max(index, 0), stream=3)
    if not isinstance(preprocessing, Preprocessing) or x.dim() != 4 or x.shape[1] != len(preprocessing.mean):
        return tta.expand(x, y, generator)
    out, y = tta.expand(preprocessing.to_pixels(x), y, generator)
    out = preprocessing.from_pixels(out)
    out[: x.shape[0]] = x  # the originals bit for bit
    return out, y


def with_support_copies(episode: Episode, tta: SupportAugment | None) -> Episode:
    """``episode`` (model input) with :class:`SupportAugment` copies in its support set."""
    if tta is None:
        return episode
    x, y = support_copies(episode.support_x, episode.support_y, tta, episode.index, episode.preprocessing)
    return dataclasses.replace(episode, support_x=x, support_y=y, shots=episode.shots * tta.copies)
