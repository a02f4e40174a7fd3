"""The run state of a learner: what a checkpoint holds besides the weights, and resuming from one.

:class:`RunState` is what meta-training has done so far (completed iterations, history, seconds
spent, consecutive non-finite steps, the fit settings and the callbacks' states).  A checkpoint
saved with ``training_state=True`` adds the meta-optimizer and the four random number generators
(torch, CUDA, numpy, Python) to it (:func:`training_state_of`); :func:`resume` restores all of them
after checking the checkpoint belongs to the same learner and fit, and rolls everything back if
the file turns out to be damaged.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from .algorithms import build_algorithm
from .checkpoint import FORMAT, FORMAT_VERSION, check_plain, check_saveable, config_diff, safe_load
from .data.base import Preprocessing
from .errors import CheckpointError, ConfigError, MetamtlError
from .inference import InferenceSettings
from .models.backbones import TrunkHead, uncompiled
from .models.registry import build_model, normalized_config
from .placement import model_dtype, resolve_device, set_layout
from .version import __version__

if TYPE_CHECKING:
    from .learner import MetaLearner


@dataclasses.dataclass
class RunState:
    """Meta-training progress, saved in checkpoints and restored on resume.

    Attributes:
        iteration: completed meta-iterations.
        history: one row per logged iteration/validation (see :class:`~metamtl.callbacks.History`).
        seconds: meta-training time of earlier fit calls (and of the run a resume continues).
        bad_steps: consecutive non-finite meta-gradients so far.
        settings: the fit settings a resume must repeat (meta-batch size, training tasks).
        callbacks: callback states read from a checkpoint, handed to the callbacks at fit start.
        layouts: the memory layout chosen for each workload under an automatic layout
            (``{workload: channels_last}``, see :class:`~metamtl.placement.LayoutProbe`): kept
            so a resumed run computes in the layouts the interrupted one used.
        stop: why the run a resumed checkpoint belongs to was stopped by a callback (early
            stopping), ``{"by": stopped_by, "iterations": its fit's iterations}``, else ``None``:
            the resumed fit then trains no iteration unless it asks for more iterations.
        resumed: whether the fit in progress (or the latest) continues a checkpoint.
        val_every: the validation cadence of the fit in progress (or the latest; ``None``: no validation),
            its default computed from that fit's iterations; saved, so a resume validates as the
            interrupted fit did (its ``iterations`` is the run's total, not the fit's).
        meta_batch_size: that of the latest iteration trained (``None``: none yet), which a continued fit
            on the same task stream (``stream``) must keep; saved, so a loaded or resumed learner keeps it too.
        stream: the training tasks of that iteration (their ``train_tasks`` fit setting; saved too).
        peak_memory_mb: the highest per-iteration peak memory of the latest fit in this process
            (resident set on CPU, CUDA max allocated on a GPU; not saved: it belongs to the process).
        agreed: under torchrun, during a fit: the seconds of meta-training every process agreed
            on (the slowest process's clock after the latest meta-step), which :attr:`elapsed`
            returns so that callbacks (a schedule over the time budget, the history's times) and
            the budget check act on one clock; ``None``: this process's own clock.
    """

    iteration: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    bad_steps: int = 0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)
    layouts: dict[str, bool] = dataclasses.field(default_factory=dict)
    stop: dict[str, Any] | None = None
    resumed: bool = False
    val_every: int | None = None
    meta_batch_size: int | None = None
    stream: Any = None
    peak_memory_mb: float = 0.0
    agreed: float | None = dataclasses.field(default=None, repr=False)
    _clock: float | None = dataclasses.field(default=None, repr=False)

    @property
    def elapsed(self) -> float:
        """Seconds of meta-training so far, across fit calls and resumed runs (:attr:`agreed` when set)."""
        return self.measured if self.agreed is None else self.agreed

    @property
    def measured(self) -> float:
        """:attr:`elapsed` on this process's own clock."""
        return self.seconds + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def start_clock(self) -> None:
        self._clock, self.agreed = time.perf_counter(), None

    def stop_clock(self) -> None:  # the agreed seconds when set: every process continues from the same
        self.seconds, self._clock, self.agreed = self.elapsed, None, None


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python random states (tensors and plain containers only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [version, list(internal), gauss],
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    s = rng["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def training_state_of(run: RunState, optimizer: torch.optim.Optimizer, callbacks: dict[str, Any],
                      stop: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``training`` entry of a resumable checkpoint (its layout is the checkpoint format);
    ``stop``: see :attr:`RunState.stop`."""
    return {
        "meta_optimizer": optimizer.state_dict(),
        "fit_state": {"settings": dict(run.settings), "val_every": run.val_every,
                      **({"stop": stop} if stop is not None else {})},
        "callbacks": callbacks,
        "elapsed": run.elapsed,
        "bad_steps": run.bad_steps,
        "layouts": dict(run.layouts),
        "rng": rng_state(),
    }


def _restore(obj: dict[str, Any], modules: tuple[nn.Module, nn.Module], optimizer: torch.optim.Optimizer,
             run: RunState) -> None:
    """Load a checkpoint's weights, optimizer, progress and RNG states (the checkpoint layout)."""
    tr = obj["training"]
    model, algorithm = modules
    model.load_state_dict(obj["model_state"])
    algorithm.load_state_dict(obj["algorithm_state"])
    optimizer.load_state_dict(tr["meta_optimizer"])
    run.iteration = saved_iteration(obj["iteration"])
    run.history = list(obj.get("history", []))
    run.bad_steps = int(tr.get("bad_steps", 0))
    run.settings = dict(tr["fit_state"].get("settings", {}))
    run.meta_batch_size = saved_meta_batch_size(obj.get("meta_batch_size", run.settings.get("meta_batch_size")))
    run.stream = obj.get("stream", run.settings.get("train_tasks"))
    stop = tr["fit_state"].get("stop")
    run.stop = None if stop is None else {"by": None if stop.get("by") is None else str(stop["by"]),
                                          "iterations": int(stop["iterations"])}
    val_every = tr["fit_state"].get("val_every")  # absent: written before it was saved
    run.val_every = None if val_every is None else int(val_every)
    run.seconds = float(tr.get("elapsed", 0.0))
    run.callbacks = dict(tr.get("callbacks", {}))
    run.layouts = {str(k): bool(v) for k, v in dict(tr.get("layouts", {})).items()}
    set_rng_state(tr["rng"])


def saved_iteration(value: Any) -> int:
    """A checkpoint's ``iteration``: an integer >= 0 (ValueError for anything else, which :func:`resume`
    and :func:`learner_from_state` turn into :class:`CheckpointError`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"its iteration must be an integer >= 0, got {value!r}")
    return value


def saved_meta_batch_size(value: Any) -> int | None:
    """A saved learner's ``meta_batch_size`` (of its latest trained iteration): ``None`` (never trained, or
    saved before this entry existed) or an integer >= 1 (ValueError for anything else)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"its meta_batch_size must be an integer >= 1 or None, got {value!r}")
    return value


def _snapshot(modules: tuple[nn.Module, nn.Module], optimizer: torch.optim.Optimizer, run: RunState) -> dict[str, Any]:
    """A deep copy of everything :func:`_restore` changes, in the checkpoint layout."""
    model, algorithm = modules
    obj = {"model_state": model.state_dict(), "algorithm_state": algorithm.state_dict(), "iteration": run.iteration,
           "history": run.history, "meta_batch_size": run.meta_batch_size, "stream": run.stream,
           "training": {**training_state_of(run, optimizer, run.callbacks, run.stop), "elapsed": run.seconds}}
    return copy.deepcopy(obj)


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A learner config with its model config in one spelling per architecture (defaults filled in,
    per-block lists of one value as that value: :func:`~metamtl.models.registry.normalized_config`)."""
    model = config.get("model")
    return {**config, "model": normalized_config(model)} if isinstance(model, dict) else config


#: fit settings added to checkpoints later: compared only when the checkpoint has them (older ones resume)
LATER_SETTINGS = ("train_tasks_content", "val_tasks")


def _legacy_sinusoid_validation(saved: dict[str, Any], settings: dict[str, Any], path: Any) -> dict[str, Any]:
    """``settings``, taking a checkpoint's sinusoid validation tasks written before held-out sinusoid tasks
    had a random stream of their own (``split='val'``) as this run's, with a warning: such runs resume."""
    old, new = saved.get("val_tasks"), settings.get("val_tasks")
    if isinstance(old, str) and isinstance(new, str) and old.startswith("Sinusoid(") and old.endswith(")") \
            and new == old[:-1] + ", split='val')":
        warnings.warn(f"{path} was validated on sinusoid tasks of the training stream's kind (before this version "
                      "drew held-out sinusoid tasks from their own stream); the resumed run validates on the new "
                      "validation tasks, so its validation metrics change where it resumes", RuntimeWarning, stacklevel=3)
        return {**settings, "val_tasks": old}
    return settings


def check_resumable(obj: dict[str, Any], path: str | Path, config: dict[str, Any], settings: dict[str, Any]) -> None:
    """:class:`CheckpointError` unless ``obj`` holds a training state of this learner config and fit."""
    if "training" not in obj:
        raise CheckpointError(f"{path} holds no training state (saved without training_state=True); cannot resume")
    require(obj, path, "config", "model_state", "algorithm_state", "iteration")
    fit_state = obj["training"].get("fit_state") if isinstance(obj["training"], dict) else None
    if not isinstance(obj["config"], dict) or not isinstance(fit_state, dict) or not isinstance(
        fit_state.get("settings", {}), dict
    ):
        raise CheckpointError(f"{path}: damaged checkpoint (training state, its fit settings or config is not a "
                              "mapping); nothing was changed")
    diff = config_diff(comparable(obj["config"]), comparable(config))
    if diff:
        raise CheckpointError(f"cannot resume from {path}: its config differs from this learner's:\n  " + "\n  ".join(diff))
    saved = fit_state.get("settings", {})
    if "val_every" not in saved:  # written before validation, schedule and early
        settings = {k: v for k, v in settings.items() if k in saved}  # stopping were saved: what it has
    settings = {k: v for k, v in settings.items() if k in saved or k not in LATER_SETTINGS}
    settings = _legacy_sinusoid_validation(saved, settings, path)
    sdiff = config_diff(saved, settings)
    if sdiff:
        raise CheckpointError(f"cannot resume from {path}: fit settings differ:\n  " + "\n  ".join(sdiff))


def frozen_names(modules: tuple[nn.Module, nn.Module]) -> list[str]:
    """The names (``model.``/``algorithm.`` prefixed) of the parameters with ``requires_grad=False``."""
    return [f"{prefix}{n}" for prefix, module in zip(("model.", "algorithm."), modules)
            for n, p in module.named_parameters() if not p.requires_grad]


def optimized_names(modules: tuple[nn.Module, nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (``model.``/``algorithm.`` prefixed) of the parameters ``optimizer`` holds: those trainable
    when the learner was built (weights frozen later stay in it, without gradients)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [f"{prefix}{n}" for prefix, module in zip(("model.", "algorithm."), modules)
            for n, p in module.named_parameters() if id(p) in held]


def apply_built(obj: dict[str, Any], prefix: str, module: nn.Module) -> None:
    """Make trainable the parameters of ``module`` that were when the saved learner was built (its
    meta-optimizer's, ``optimized``), and only those, so learned rates and the meta-optimizer are built
    as they were; files older than that entry: as saved (:func:`apply_frozen`)."""
    held = obj.get("optimized")
    if not isinstance(held, list):
        apply_frozen(obj, prefix, module)
        return
    for n, p in module.named_parameters():
        p.requires_grad_(f"{prefix}{n}" in held)


def apply_frozen(obj: dict[str, Any], prefix: str, module: nn.Module) -> None:
    """Freeze the parameters of ``module`` (named with ``prefix``) a checkpoint saved frozen, and only
    those (checkpoints older than the ``frozen`` entry leave every weight as it is)."""
    frozen = obj.get("frozen")
    if isinstance(frozen, list):
        for n, p in module.named_parameters():
            p.requires_grad_(f"{prefix}{n}" not in frozen)


def check_trainable_set(obj: dict[str, Any], path: Any, modules: tuple[nn.Module, nn.Module],
                        optimizer: torch.optim.Optimizer) -> None:
    """:class:`CheckpointError` naming the difference when the checkpoint's meta-optimizer trained another set
    of weights than this learner's (weights frozen or unfrozen with ``requires_grad_``)."""
    frozen = obj.get("frozen")
    if isinstance(frozen, list):
        saved, have = set(frozen), set(frozen_names(modules))
        if saved != have:
            raise CheckpointError(
                f"cannot resume from {path}: it trained other weights than this learner does; frozen there and "
                f"trainable here: {sorted(saved - have)[:6]}, trainable there and frozen here: {sorted(have - saved)[:6]}. "
                "Freeze the same weights (requires_grad_(False)) before building the MetaLearner; nothing was changed")
        held, mine = obj.get("optimized"), set(optimized_names(modules, optimizer))
        if isinstance(held, list) and set(held) != mine:
            raise CheckpointError(
                f"cannot resume from {path}: its meta-optimizer held other weights than this learner's; held there only: "
                f"{sorted(set(held) - mine)[:6]}, held here only: {sorted(mine - set(held))[:6]}. Build the MetaLearner "
                "with the weights the saved run had trainable when it was built (freezing any later, as it did), or "
                "MetaLearner.load the checkpoint and resume from it; nothing was changed")
        return
    groups = obj["training"].get("meta_optimizer", {}).get("param_groups") if isinstance(obj["training"], dict) else None
    if isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        saved_n, have_n = sum(len(g["params"]) for g in groups), sum(len(g["params"]) for g in optimizer.param_groups)
        if saved_n != have_n:
            raise CheckpointError(
                f"cannot resume from {path}: its meta-optimizer trained {saved_n} weight tensors, this learner's "
                f"trains {have_n}: freeze the same weights (requires_grad_(False)) as the saved run before "
                "building the MetaLearner; nothing was changed")


def resume(path: str | Path, *, config: dict[str, Any], settings: dict[str, Any], modules: tuple[nn.Module, nn.Module],
           optimizer: torch.optim.Optimizer, run: RunState, iterations: int | None = None) -> None:
    """Continue from checkpoint ``path``: weights, optimizer, ``run`` and RNG states as saved.

    ``config`` (the learner's) and ``settings`` (the fit's) must equal the saved ones, and the run's
    total ``iterations`` (when given) must not be below the checkpoint's iteration.  If
    restoring fails half-way (a damaged file), everything is rolled back and
    :class:`CheckpointError` says nothing was changed; a Ctrl-C (``KeyboardInterrupt``) part-way
    through is rolled back as well and re-raised as it is.
    """
    obj = safe_load(path)
    check_resumable(obj, path, config, settings)
    done = obj.get("iteration", 0)  # not an integer: a damaged file, refused while restoring below
    if iterations is not None and isinstance(done, int) and iterations < done:
        raise ConfigError(
            f"{path} is at iteration {done}, past iterations={iterations}: on resume, iterations is the total of "
            f"the run the checkpoint belongs to, so give {done} or more (train.iterations in a config); nothing was changed"
        )
    check_trainable_set(obj, path, modules, optimizer)
    check_dtype(obj, path, modules[0], "this learner's are {}: build the learner's model in the checkpoint's dtype "
                "(model.double() for float64, model.float() for float32) to resume the run exactly")
    backup = _snapshot(modules, optimizer, run)
    try:
        _restore(obj, modules, optimizer, run)
        run.resumed = True
    except BaseException as exc:  # a damaged file (whatever torch/numpy raise) or Ctrl-C: roll back
        _restore(backup, modules, optimizer, run)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: re-raised as they are
            raise
        raise CheckpointError(
            f"{path}: damaged checkpoint or one from an incompatible metamtl version "
            f"({type(exc).__name__}: {exc}); nothing was changed"
        ) from exc


def refuse_ensemble(obj: dict[str, Any], path: Any, hint: str) -> None:
    """:class:`CheckpointError` if ``obj`` (read from ``path``) is an ensemble file, not one learner's."""
    if isinstance(obj, dict) and "ensemble" in obj:
        raise CheckpointError(f"{path} holds an ensemble of {len(obj['ensemble'])} learners: {hint}")


def require(obj: dict[str, Any], path: Any, *keys: str) -> dict[str, Any]:
    """``obj`` if it has every key, else :class:`CheckpointError` naming the missing ones."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is damaged or not a learner checkpoint: it lacks {', '.join(missing)}")
    return obj



def load_trunk(model: TrunkHead, source: Mapping[str, torch.Tensor] | str | Path, algorithm: Any = None) -> None:
    """Copy the ``trunk.*`` weights of a model's state dict, or of the learner saved at a path, into
    ``model``'s trunk (:class:`CheckpointError` if the trunks differ); ``algorithm`` is told
    (:meth:`~metamtl.algorithms.Algorithm.trunk_loaded`)."""
    if isinstance(source, Mapping):
        state, where = source, "the given learner"
    elif not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"init_from takes a MetaLearner, the path of a saved one or a model state dict, got "
                          f"{type(source).__name__} (an ensemble: pass one member, e.g. ensemble.members[0])")
    else:
        obj = safe_load(source)
        refuse_ensemble(obj, source, "a trunk is taken from one learner's checkpoint (e.g. one member's learner.pt, "
                                     "runs/<name>/members/member0/learner.pt)")
        state, where = require(obj, source, "model_state")["model_state"], str(source)
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    try:
        model.trunk.load_state_dict(trunk)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the trunk of {where} does not fit this model ({model.config}): {exc}; build the same "
            "trunk (model name, widths, channels, image size) for every stage"
        ) from None
    if algorithm is not None:
        algorithm.trunk_loaded(model)


def _plain(value: Any) -> Any:
    """``value`` with numpy numbers and 0-d arrays (e.g. ``np.float64(loss)``) as Python numbers."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def storable_callback_states(states: dict[str, Any]) -> dict[str, Any]:
    """The callback states a checkpoint can hold and read back: numpy numbers become Python numbers;
    a callback whose state holds anything else is left out with a warning (a resume starts it
    afresh) rather than written into a checkpoint that could never load, or stopping the run."""
    out = {}
    for name, state in states.items():
        state = _plain(state)
        try:
            check_plain(state, f"callback state[{name!r}]")
        except CheckpointError as exc:
            warnings.warn(f"{exc}; this checkpoint leaves that callback's state out (a resume starts it afresh)",
                          UserWarning, stacklevel=3)
            continue
        out[name] = state
    return out


def learner_state(learner: "MetaLearner", training_state: bool = False) -> dict[str, Any]:
    """What :meth:`MetaLearner.save <metamtl.MetaLearner.save>` writes: the checkpoint format."""
    config = learner.config()
    check_saveable(learner.model, config, metadata=learner.metadata, task_defaults=learner.task_defaults)
    obj: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "metamtl_version": __version__,
        "config": config,
        "model_state": {k: v.detach().cpu() for k, v in learner.model.state_dict().items()},
        "model_dtype": str(model_dtype(learner.model)).removeprefix("torch."),  # float64 learners load as float64
        "algorithm_state": {k: v.detach().cpu() for k, v in learner.algorithm.state_dict().items()},
        "preprocessing": learner.preprocessing.to_dict() if learner.preprocessing else None,
        "task_defaults": dict(learner.task_defaults), "metadata": dict(learner.metadata),
        "iteration": learner.iteration, "history": list(learner.history), "elapsed": float(learner.elapsed),
        "meta_batch_size": learner.run.meta_batch_size,  # a continued fit after load keeps it (None: never trained)
        "stream": learner.run.stream,  # on the same tasks (their fingerprint)
        "evaluation": learner.inference.state(),
        "frozen": frozen_names((learner.model, learner.algorithm)),  # requires_grad=False: loaded as saved
        "optimized": optimized_names((learner.model, learner.algorithm), learner.meta_optimizer),  # rebuilt alike
        # an automatic layout as chosen (on a GPU, or forced in the config: None; a GPU's NCHW is no CPU choice)
        "channels_last": learner.placement.channels_last if learner.placement.automatic else None,
    }
    if training_state:
        fit = learner.fit_state
        callbacks = storable_callback_states(fit.callbacks.state_dict() if fit is not None else {})
        stop = {"by": fit.stopped_by, "iterations": fit.iterations} if fit is not None and fit.should_stop else None
        obj["training"] = training_state_of(learner.run, learner.meta_optimizer, callbacks, stop)
    return obj


def learner_from_state(cls: type["MetaLearner"], obj: dict[str, Any], path: Any, *, device: Any = "auto",
                       model: TrunkHead | None = None) -> "MetaLearner":
    """Rebuild a learner of class ``cls`` from a checkpoint ``obj`` read from ``path``."""
    refuse_ensemble(obj, path, "load it with metamtl.ensemble.Ensemble.load")
    require(obj, path, "config", "model_state", "algorithm_state")
    cfg = obj["config"]
    resolve_device(device)  # a bad device is the caller's mistake, not the checkpoint's: say so first
    if model is not None:  # so is a model that is none (a torch.compile wrapper: the module inside it)
        model = uncompiled(model, "model")
        if not isinstance(model, TrunkHead):
            raise ConfigError(f"MetaLearner.load(model=...) takes the TrunkHead the checkpoint's weights go into, "
                              f"got {type(model).__name__}; build it as the saved learner's (or leave model out)")
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):  # weights that can adapt; every initial
            # value drawn here is overwritten: loading must not move the global RNG (a student built next)
            return _rebuild(cls, obj, path, cfg, device, model)
    except CheckpointError:
        raise
    except (MetamtlError, RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} does not match this metamtl version's models and settings "
            f"(written by metamtl {obj.get('metamtl_version', '?')}, this is {__version__}): {exc}"
        ) from exc


def _saved_dtype(obj: dict[str, Any], path: Any) -> torch.dtype:
    """The floating dtype a checkpoint's weights were saved in (float32 for checkpoints older than
    the ``model_dtype`` entry)."""
    name = obj.get("model_dtype", "float32")
    if name not in ("float32", "float64"):
        raise CheckpointError(f"{path}: model_dtype must be 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def check_dtype(obj: dict[str, Any], path: Any, model: nn.Module, mismatch: str) -> None:
    """:class:`CheckpointError` when ``model``'s weights are not in the dtype the checkpoint's were
    saved in (loading would cast them silently); ``mismatch`` says what to do, ``{}``: the model's dtype.
    Checkpoints older than the ``model_dtype`` entry are not checked."""
    if "model_dtype" not in obj:
        return
    saved, have = _saved_dtype(obj, path), model_dtype(model)
    if saved != have:
        name = str(saved).removeprefix("torch.")
        raise CheckpointError(f"{path}: its weights are {name}, " + mismatch.format(str(have).removeprefix("torch.")))


def _rebuild(cls: type["MetaLearner"], obj: dict[str, Any], path: Any, cfg: dict[str, Any], device: Any,
             model: TrunkHead | None) -> "MetaLearner":
    """The learner of a checkpoint (errors are translated by :func:`learner_from_state`)."""
    given = model is not None
    if model is None:
        model = build_model(**cfg["model"]).to(_saved_dtype(obj, path))
    elif model.config.get("name"):  # the same architecture however spelled (defaults, per-block lists)
        diff = config_diff(normalized_config(cfg["model"]), normalized_config(model.config))
        if diff:
            raise CheckpointError(f"{path} holds a different model than the one given:\n  " + "\n  ".join(diff))
    if given:
        check_dtype(obj, path, model, "the given model's are {}: convert it (model.double() or model.float()), "
                    "or leave model out to build it in the saved dtype")
    model.load_state_dict(obj["model_state"])
    apply_built(obj, "model.", model)  # before setup: learned inner rates are made for trainable weights only
    algorithm = build_algorithm(**cfg["algorithm"])
    algorithm.setup(model)
    algorithm.load_state_dict(obj["algorithm_state"])
    apply_built(obj, "algorithm.", algorithm)
    prep = obj.get("preprocessing")
    learner = cls(model, algorithm, preprocessing=Preprocessing.from_dict(prep) if prep else None,
                  device=device, task_defaults=obj.get("task_defaults"), metadata=obj.get("metadata"),
                  **dict(cfg["learner"]))
    apply_frozen(obj, "model.", model)  # then frozen as saved (weights frozen after the learner was built)
    apply_frozen(obj, "algorithm.", algorithm)
    learner.run.iteration = saved_iteration(obj.get("iteration", 0))
    learner.run.history = list(obj.get("history", []))
    learner.run.seconds = float(obj.get("elapsed", 0.0))  # so later fits' history times continue
    learner.run.meta_batch_size = saved_meta_batch_size(obj.get("meta_batch_size"))
    learner.run.stream = obj.get("stream")
    # a training_state save: the callback states its next fit continues (the metrics file it appends to)
    learner.run.callbacks = dict(obj.get("training", {}).get("callbacks", {}))
    learner.inference = InferenceSettings.from_state(obj.get("evaluation"))
    saved_layout = obj.get("channels_last")
    if learner.placement.automatic and isinstance(saved_layout, bool) and saved_layout != learner.channels_last:
        # an automatic layout as the saved learner had chosen it: the same sums, so the same predictions
        set_layout([learner.model, learner.algorithm], learner.meta_optimizer, saved_layout)
        learner.placement = learner.placement.with_layout(saved_layout)
    return learner
