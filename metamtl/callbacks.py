"""Callbacks: behaviour added to ``MetaLearner.fit`` through named hooks (Lightning style).

Every hook receives the fit's :class:`FitState`, a typed object that says where training is
(``state.iteration``, ``state.elapsed``, ``state.iterations``, ``state.val_every``...), gives
the learner (``state.learner``: model, algorithm, meta-optimizer, ``save``) and takes requests
(``state.should_stop``, ``state.stopped_by``, ``state.resume_checkpoint``).  One iteration calls,
in order::

    on_iteration_start -> (meta-step) -> on_after_backward -> on_iteration_end(train metrics)
    -> [validation, when due -> on_validation_end(val metrics)] -> on_iteration_complete

``on_fit_start`` / ``on_fit_end`` / ``on_exception`` frame the whole call, and
``on_results(state, results)`` is called by :func:`metamtl.experiment.run` once the run's
held-out results are written (reports and loggers hook in there).  A callback with state to
resume implements ``state_dict`` / ``load_state_dict``; it is saved in checkpoints under its
:attr:`Callback.key` and restored *before* ``on_fit_start`` of the resumed call.  Callbacks run
in the order given, except that a higher :attr:`Callback.order` runs later:
:class:`ModelCheckpoint` (``order = 100``) writes ``last.pt`` in ``on_iteration_complete`` after
every other callback, so a checkpoint holds every callback's state for a finished iteration
(including its validation) and a resumed run is bit-identical to an uninterrupted one.

Provided: :class:`History`, :class:`ProgressBar`, :class:`ModelCheckpoint` (last/best),
:class:`EarlyStopping`, :class:`LRScheduler` (cosine with warm-up, step, exponential, plateau)
and :class:`MetricsLogger` (CSV or JSON lines).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import weakref
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .checkpoint import RunFolderLock, check_saveable, ensure_writable_dir, history_continues, safe_load
from .errors import CheckpointError, ConfigError, TrainingError, unknown_name
from .evaluation import defined_cis
from .files import json_nulls
from .inputs import check_int
from .progress_bars import progress_bar

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .learner import MetaLearner


@dataclasses.dataclass(eq=False)
class FitState:
    """What every callback hook receives: one object per :meth:`MetaLearner.fit` call.

    Read:
        learner: the :class:`~metamtl.MetaLearner` being trained (model, algorithm,
            meta-optimizer, ``history``, ``save``).
        iterations: the iteration ``fit`` trains up to; ``meta_batch_size``: tasks per iteration.
        val_every: iterations between validations (``None``: no validation in this fit).
        budget_minutes: the fit's time budget (``None``: none), in minutes more than the
            ``start_seconds`` of meta-training done by earlier fit calls of the learner (0 when
            resuming: then, like ``iterations``, it is the total of the run).
        rank, world_size: this process among those training together (0 and 1 without torchrun).
        iteration, elapsed, is_main_process: completed meta-iterations, seconds of meta-training
            (across resumes), whether this is rank 0 (which alone prints and writes files).
        callbacks: the fit's callbacks, in call order.

    Write:
        should_stop: set to ``True`` to stop after the current iteration (every rank stops at the
            same one); set in ``on_fit_start``, no iteration is trained.
        stopped_by: why ``fit`` stopped (``"iterations"``, ``"early_stopping"``, ``"budget"``,
            ``"SIGINT"``, ...); set it with ``should_stop``.
        resume_checkpoint: where a resumable checkpoint of this fit goes (set by
            :class:`ModelCheckpoint`); ``fit`` saves there when it is interrupted by a signal.
    """

    learner: "MetaLearner"
    iterations: int
    meta_batch_size: int
    val_every: int | None = None
    budget_minutes: float | None = None
    start_seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    callbacks: "CallbackList" = dataclasses.field(default_factory=lambda: CallbackList())
    should_stop: bool = False
    stopped_by: str | None = None
    resume_checkpoint: Path | None = None

    @property
    def iteration(self) -> int:
        return self.learner.iteration

    @property
    def elapsed(self) -> float:
        return self.learner.elapsed

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def budget_end(self) -> float | None:
        """The seconds of meta-training (:attr:`elapsed`) at which the budget is spent (``None``: no budget)."""
        return None if self.budget_minutes is None else self.start_seconds + 60.0 * self.budget_minutes


class Callback:
    """Base class; override the hooks you need (each receives the fit's :class:`FitState`)."""

    #: callbacks with a higher order run later in every hook (stable among equals)
    order = 0
    #: whether the state of this callback carries into the learner's next (not resumed) ``fit``
    #: call, which continues the same run (:class:`ModelCheckpoint`'s best value)
    continues_run = False

    #: keys this callback's state had in checkpoints of earlier metamtl versions (read on resume
    #: when its :attr:`key` is absent)
    former_keys: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The name of this callback's state in checkpoints (:meth:`default_key` unless set), which
        must differ between a fit's callbacks with state; set it to tell two apart
        (``stopper.key = "EarlyStopping:slow"``)."""
        return self.__dict__.get("_key") or self.default_key()

    @key.setter
    def key(self, value: str) -> None:
        self._key = str(value)

    def default_key(self) -> str:
        return type(self).__name__

    def saved_key(self, state: Mapping[str, Any]) -> str | None:
        """Which entry of a checkpoint's callback ``state`` is this callback's (``None``: none):
        its :attr:`key`, else one of its :attr:`former_keys`."""
        return next((k for k in (self.key, *self.former_keys) if k in state), None)

    def on_fit_start(self, state: FitState) -> None: ...
    def on_iteration_start(self, state: FitState) -> None: ...
    def on_after_backward(self, state: FitState) -> None: ...
    def on_iteration_end(self, state: FitState, metrics: dict[str, float]) -> None: ...
    def on_validation_end(self, state: FitState, metrics: dict[str, float]) -> None: ...
    def on_iteration_complete(self, state: FitState) -> None: ...
    def on_fit_end(self, state: FitState) -> None: ...
    def on_exception(self, state: FitState, exc: BaseException) -> None: ...

    def on_results(self, state: FitState, results: dict[str, Any]) -> None:
        """After :func:`metamtl.experiment.run` wrote the run's results (``results.json``,
        held-out accuracy, the accuracy-vs-inner-steps curve); may add entries to ``results``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    #: whether ``load_state_dict({})`` is the state of a new run, which :meth:`reset` then loads
    #: (the provided callbacks with state)
    resets_by_loading = False

    def reset(self) -> None:
        """Forget the state of an earlier run: called before a learner's first ``fit``, or a ``fit``
        of another learner than the one this callback last ran with (nothing resumed or carried for
        this callback), so one callback object reused by several learners (a sweep) starts each afresh.  Default: ``load_state_dict({})`` with :attr:`resets_by_loading`,
        else nothing (override it for a callback of your own whose state must not outlive a run)."""
        if self.resets_by_loading:
            self.load_state_dict({})

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the (weak) reference to the learner it last ran with (:meth:`reset`)."""
        return {k: v for k, v in self.__dict__.items() if k != "_last_learner"}

    def continued_state(self) -> dict[str, Any]:
        """What the learner's next ``fit`` call hands to :meth:`load_state_dict` (only with
        :attr:`continues_run`; default: :meth:`state_dict`)."""
        return self.state_dict()

    def run_settings(self) -> dict[str, Any]:
        """Settings of this callback that change the training trajectory, saved with the fit's
        settings: resuming with others is refused, listing the keys that differ."""
        return {}


class CallbackList(Callback):
    """Calls each hook on every callback, in :attr:`Callback.order` (stable)."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        check_distinct_keys(self.callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_fit_start(self, state): self._call("on_fit_start", state)
    def on_iteration_start(self, state): self._call("on_iteration_start", state)
    def on_after_backward(self, state): self._call("on_after_backward", state)
    def on_iteration_end(self, state, metrics): self._call("on_iteration_end", state, metrics)
    def on_validation_end(self, state, metrics): self._call("on_validation_end", state, metrics)
    def on_iteration_complete(self, state): self._call("on_iteration_complete", state)
    def on_fit_end(self, state): self._call("on_fit_end", state)
    def on_exception(self, state, exc): self._call_all("on_exception", state, exc)

    def _call_all(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback even when one raises (a user error, or a further Ctrl-C during
        a slow clean-up such as ``wandb.finish()``), so that every clean-up runs, the run folder's
        lock release last; then raise the first error."""
        error: BaseException | None = None
        for cb in self.callbacks:
            try:
                getattr(cb, hook)(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others' clean-up
                error = error or exc
        if error is not None:
            raise error
    def on_results(self, state, results): self._call("on_results", state, results)

    def state_dict(self) -> dict[str, Any]:
        return {cb.key: cb.state_dict() for cb in self.callbacks if cb.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], fresh: bool = False, learner: Any = None) -> None:
        """Hand each callback its entry of ``state``; one without an entry is :meth:`~Callback.reset`
        with ``fresh`` (a learner's first fit) or when it last ran with another ``learner`` than this
        one (a callback object reused for a loaded or already trained learner)."""
        for cb in self.callbacks:
            key = cb.saved_key(state)
            last = cb.__dict__.get("_last_learner")
            if key is not None:
                cb.load_state_dict(state[key])
            elif fresh or (learner is not None and last is not None and last() is not learner):
                before = last() if last is not None else None
                kept = cb.continued_state() if before is not None and before is not learner else None
                if kept:  # the learner it ran with finds its own state again at its next fit (A, B, then A)
                    before.run.callbacks = {**before.run.callbacks, cb.key: kept}
                cb.reset()
            if learner is not None:
                cb.__dict__["_last_learner"] = weakref.ref(learner)

    def continued_state(self) -> dict[str, Any]:
        """The states the learner's next ``fit`` call starts from (:attr:`Callback.continues_run`)."""
        return {cb.key: cb.continued_state() for cb in self.callbacks if cb.continues_run and cb.continued_state()}


def check_callbacks(callbacks: Any, what: str = "callbacks") -> list[Callback]:
    """``callbacks`` (one :class:`Callback`, an iterable of them, or ``None``) as a list;
    :class:`ConfigError` saying how to fix anything else (a class instead of an instance, a function)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, (str, bytes, Mapping, type)) or not isinstance(callbacks, Iterable):
        return [_checked_callback(callbacks, what)]  # raises: a list is what was meant
    return [_checked_callback(cb, what) for cb in callbacks]


def _checked_callback(cb: Any, what: str) -> Callback:
    if isinstance(cb, Callback):
        return cb
    if isinstance(cb, type) and issubclass(cb, Callback):
        raise ConfigError(f"{what} must hold Callback instances; got the class {cb.__name__}: instantiate it, "
                          f"{cb.__name__}(...)")
    kind = f"the class {cb.__name__}" if isinstance(cb, type) else f"{type(cb).__name__} {cb!r:.60}"
    raise ConfigError(f"{what} must hold Callback instances (of subclasses of metamtl.callbacks.Callback, which "
                      f"override the hooks they need); got {kind}: make it a Callback subclass and pass an instance, "
                      "e.g. callbacks=[EarlyStopping()]")


def _has_state(cb: Callback) -> bool:
    return any(getattr(type(cb), name) is not getattr(Callback, name) for name in ("state_dict", "continued_state"))


def check_distinct_keys(callbacks: Iterable[Callback]) -> None:
    """:class:`ConfigError` naming the callbacks with state that share a :attr:`Callback.key`:
    checkpoints would keep one state for both, and a resume would hand it to each."""
    seen: dict[str, list[Callback]] = {}
    for cb in callbacks:
        if _has_state(cb):
            seen.setdefault(cb.key, []).append(cb)
    clashes = {key: cbs for key, cbs in seen.items() if len(cbs) > 1}
    if clashes:
        key, cbs = next(iter(clashes.items()))
        raise ConfigError(
            f"{len(cbs)} callbacks ({', '.join(type(cb).__name__ for cb in cbs)}) share the checkpoint key {key!r}, "
            "so their states would overwrite each other in checkpoints; give each a distinct key "
            f"(e.g. callback.key = '{key}#2') or pass one of them only")


def standard_callbacks(progress: bool = True, checkpoint_dir: str | Path | None = None,
                       checkpoint_every: int = 100, task: str = "classification",
                       given: Iterable[Callback] = ()) -> list[Callback]:
    """What every ``fit`` call uses: :class:`History`, a :class:`ProgressBar` (``progress``) and,
    with a ``checkpoint_dir``, a :class:`ModelCheckpoint` writing there every ``checkpoint_every``
    (``best.pt`` by the :func:`default_monitor` of the learner's ``task``), followed by the ``given``
    callbacks (the learner's and the fit's).  A :class:`History` or :class:`ProgressBar` among them
    replaces the standard one (``History(every=10)``); two :class:`History` are a :class:`ConfigError`
    (each would add every row)."""
    given = list(given)
    histories = [cb for cb in given if isinstance(cb, History)]
    if len(histories) > 1:
        raise ConfigError(f"{len(histories)} History callbacks were given (the learner's and the fit's callbacks), so "
                          "every history row would be kept more than once: pass one (fit always keeps a History)")
    cbs: list[Callback] = [] if histories else [History()]
    if progress and not any(isinstance(cb, ProgressBar) for cb in given):
        cbs.append(ProgressBar())
    if checkpoint_dir is not None:
        monitor, mode = default_monitor(task)
        cbs.append(ModelCheckpoint(checkpoint_dir, every=checkpoint_every, monitor=monitor, mode=mode))
    return cbs + given


class ProgressBar(Callback):
    """A tqdm bar over meta-iterations showing smoothed train loss/accuracy and validation accuracy."""

    def __init__(self, smoothing: float = 0.9) -> None:
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise ConfigError(f"ProgressBar smoothing must be a number in [0, 1), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.bar = None
        self.avg: dict[str, float] = {}
        self.val: dict[str, float] = {}

    def on_fit_start(self, state):
        self.bar = progress_bar(state.is_main_process, total=state.iterations, initial=state.iteration,
                                desc="meta-train", dynamic_ncols=True)

    def on_iteration_end(self, state, metrics):
        for k in ("loss", "accuracy"):
            if k in metrics and math.isfinite(metrics[k]):
                old = self.avg.get(k)
                self.avg[k] = metrics[k] if old is None else self.smoothing * old + (1 - self.smoothing) * metrics[k]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self._postfix(), refresh=False)

    def on_validation_end(self, state, metrics):
        self.val = {k: v for k, v in metrics.items() if k in ("val/accuracy", "val/loss")}
        if self.bar is not None:
            self.bar.set_postfix(self._postfix())

    def _postfix(self) -> dict[str, str]:
        out = {k: f"{v:.3f}" for k, v in self.avg.items()}
        out.update({k: f"{v:.3f}" for k, v in self.val.items()})
        return out

    def on_fit_end(self, state):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, state, exc):
        self.on_fit_end(state)


class History(Callback):
    """Keeps every train/validation row in ``learner.history`` (saved in checkpoints)."""

    def __init__(self, every: int = 1) -> None:
        self.every = check_int("History every", every, 1)

    def on_iteration_end(self, state, metrics):
        if state.iteration % self.every == 0 or state.iteration == state.iterations:
            state.learner.history.append({"iteration": state.iteration, "time": state.elapsed,
                                          **{f"train/{k}": v for k, v in metrics.items()}})

    def on_validation_end(self, state, metrics):  # an undefined CI (one episode) as None: null in history.json
        state.learner.history.append({"iteration": state.iteration, "time": state.elapsed, **defined_cis(metrics)})


class ModelCheckpoint(Callback):
    """Write ``last.pt`` every ``every`` iterations (and at the end) and ``best.pt`` on improvement.

    Args:
        dirpath: folder for the checkpoints.
        every: iterations between ``last.pt`` writes (0: only at the end).
        monitor: validation metric deciding ``best.pt`` (default: :func:`default_monitor` of the
            learner's task, ``val/loss`` for regression); one validation never reports is a
            :class:`ConfigError` when ``fit`` starts, as for :class:`EarlyStopping`.
        mode: ``"max"`` (higher is better) or ``"min"`` (default: ``"min"`` for a loss).
        save_best: ``False`` writes no ``best.pt``.
    """

    order = 100  # after every other callback: its checkpoints hold their states for the iteration
    continues_run = True  # a second fit into the same folder keeps best.pt the best of the whole run
    resets_by_loading = True

    def __init__(self, dirpath: str | Path, every: int = 100, monitor: str | None = None,
                 mode: str | None = None, save_best: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every = check_int("ModelCheckpoint every", every, 0)
        self.monitor, self.mode, self.save_best = monitor, mode and _check_mode(mode), bool(save_best)
        self.watched = _fallback_monitor(monitor, mode)  # (monitor, mode), resolved for the learner at fit start
        self.best: float | None = None
        self._loaded: Mapping[str, Any] | None = None  # the state load_state_dict got, applied at fit start
        self._lock = RunFolderLock(self.dirpath)

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.pt"

    def on_fit_start(self, state):
        """Lock the folder for this process and refuse to overwrite another run's ``last.pt``.

        ``last.pt`` belongs to this run when its history is a prefix of the learner's (the same
        learner fitting again, or resumed from it); any other is refused with a
        :class:`CheckpointError` (resume it, delete it, or pick another folder).
        """
        self.watched = resolve_monitor(self.monitor, self.mode, state.learner.task, "ModelCheckpoint")
        self._continue_best()
        state.resume_checkpoint = self.last_path
        if not state.is_main_process:
            return
        learner = state.learner  # refuse before training, not at the first checkpoint
        check_saveable(learner.model, learner.config(), metadata=learner.metadata, task_defaults=learner.task_defaults)
        ensure_writable_dir(self.dirpath)
        self._lock.acquire()
        if self.last_path.is_file():
            try:
                theirs = safe_load(self.last_path)
            except CheckpointError:
                return  # unreadable: nothing a new checkpoint could lose
            if not history_continues(state.learner.history, theirs.get("history", [])):
                self._lock.release()
                raise CheckpointError(
                    f"{self.last_path} holds another training run (iteration {theirs.get('iteration', '?')}) that "
                    f"this fit would overwrite; continue it with fit(..., resume='{self.last_path}') (CLI: --resume), "
                    "delete it, or give another checkpoint_dir"
                )

    def on_iteration_complete(self, state):
        if self.every and state.iteration % self.every == 0 and state.is_main_process:
            state.learner.save(self.last_path, training_state=True)

    def on_validation_end(self, state, metrics):
        if not self.save_best:
            return
        monitor, mode = self.watched
        value = _monitored(metrics, monitor, "ModelCheckpoint")
        if math.isfinite(value) and _improved(value, self.best, mode):
            self.best = float(value)
            if state.is_main_process:
                state.learner.save(self.best_path, training_state=False)

    def on_fit_end(self, state):
        if state.is_main_process:
            try:
                state.learner.save(self.last_path, training_state=True)
            finally:
                self._lock.release()

    def on_exception(self, state, exc):
        """After too many non-finite steps, keep the last good parameters in ``last.pt``."""
        try:
            if isinstance(exc, TrainingError) and state.is_main_process and self._lock.held:
                note = self._keep_last_good(state)
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(note)
        finally:
            self._lock.release()

    def _keep_last_good(self, state) -> str:
        """Save the learner in ``last.pt`` unless its weights are not finite; what was kept, for the error."""
        from .numerics import nonfinite_tensors

        if nonfinite_tensors([("", state.learner.model), ("", state.learner.algorithm)]):
            return f"{self.last_path} keeps the last finite weights it was written with"
        try:
            state.learner.save(self.last_path, training_state=True)
            return f"the last good parameters are saved in {self.last_path}"
        except CheckpointError as err:
            return f"the last good parameters could not be saved: {err}"

    def state_dict(self):
        """The best value so far, with the folder, monitor and mode it was watched in (a resume into
        another folder, or with another metric, starts its own best)."""
        monitor, mode = self.watched
        return {"best": self.best, "dirpath": str(self.dirpath.resolve()), "monitor": monitor, "mode": mode}

    def continued_state(self):
        if self._loaded is not None:  # the fit stopped before on_fit_start: what it was given carries on
            return dict(self._loaded)
        return self.state_dict()

    def load_state_dict(self, state):
        """Keep the best value so far, used from :meth:`on_fit_start` (once the monitor is
        resolved for the learner)."""
        self._loaded, self.best = dict(state), None

    def _continue_best(self) -> None:
        """The loaded best value, when it was watched with this monitor and mode in this folder, or in a
        folder copied or moved here with its ``best.pt`` (another folder's ``best.pt`` is not this
        empty one's, nor is the best of another metric)."""
        loaded, self._loaded = self._loaded or {}, None
        monitor, mode = self.watched
        here = loaded.get("dirpath", str(self.dirpath.resolve())) == str(self.dirpath.resolve()) or self.best_path.is_file()
        same = here and all(loaded.get(k, mine) == mine for k, mine in (("monitor", monitor), ("mode", mode)))
        self.best = loaded.get("best") if same else None


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float; a boolean is none (a YAML ``yes`` is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _got(value: Any) -> str:
    """``value`` as an error message shows what was given, with the fix for a boolean."""
    return f"{value!r} (a boolean: write the number itself)" if isinstance(value, bool) else repr(value)


def _check_mode(mode: str) -> str:
    if mode not in ("max", "min"):
        raise unknown_name("mode", mode, ("max", "min"))
    return mode


#: the metrics validation reports, by the learner's task (``val/`` + these)
VALIDATION_METRICS = {"classification": ("val/accuracy", "val/accuracy_ci95", "val/loss", "val/loss_ci95"),
                      "regression": ("val/loss", "val/loss_ci95")}


def default_monitor(task: str) -> tuple[str, str]:
    """``(monitor, mode)`` watched when none is given: validation accuracy (higher is better) for
    classification, validation loss (lower is better) for regression, which reports no accuracy."""
    return ("val/loss", "min") if task == "regression" else ("val/accuracy", "max")


def resolve_monitor(monitor: str | None, mode: str | None, task: str, who: str) -> tuple[str, str]:
    """``(monitor, mode)`` for a learner of ``task``: the defaults of :func:`default_monitor` for
    ``None`` (a given monitor's mode: ``"min"`` for a loss, else ``"max"``); :class:`ConfigError`
    naming the metrics validation reports when ``monitor`` is none of them."""
    monitor, default_mode = default_monitor(task) if monitor is None else _fallback_monitor(monitor, None)
    reported = VALIDATION_METRICS.get(task, VALIDATION_METRICS["classification"])
    if monitor not in reported:
        raise ConfigError(f"{who} monitors {monitor!r}, which validation of a {task} learner never reports; "
                          f"it reports {', '.join(reported)}")
    return monitor, _check_mode(mode or default_mode)


def _fallback_monitor(monitor: str | None, mode: str | None) -> tuple[str, str]:
    """``(monitor, mode)`` before a fit resolved them for its learner (a classifier's defaults)."""
    monitor = monitor or "val/accuracy"
    return monitor, mode or ("min" if monitor.endswith("loss") else "max")


def _monitored(metrics: dict[str, float], monitor: str, who: str) -> float:
    if monitor not in metrics:
        raise ConfigError(
            f"{who} monitors {monitor!r} but validation reports only {sorted(metrics)}; "
            "set its monitor to one of those"
        )
    return float(metrics[monitor])


class EarlyStopping(Callback):
    """Stop ``fit`` when a validation metric has not improved for ``patience`` validations.

    Args:
        monitor: validation metric (``"val/accuracy"``, ``"val/loss"``, ...; default: the
            learner's :func:`default_monitor`, ``val/loss`` for regression).
        mode: ``"max"`` (higher is better) or ``"min"`` (default: ``"min"`` for a loss).
        patience: validations without improvement before stopping.
        min_delta: smallest change that counts as an improvement.

    Sets ``state.should_stop`` and ``state.stopped_by = "early_stopping"``;
    :class:`ModelCheckpoint` keeps the best weights in ``best.pt``.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, patience: int = 5,
                 min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"early stopping patience must be an integer >= 1, got {patience!r}")
        if not (_finite_number(min_delta) and min_delta >= 0):
            raise ConfigError(f"early stopping min_delta must be a finite number >= 0, got {_got(min_delta)}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode and _check_mode(mode), patience, float(min_delta)
        self.watched = _fallback_monitor(monitor, mode)  # (monitor, mode), resolved for the learner at fit start
        self.best: float | None = None
        self.wait = 0

    former_keys = ("EarlyStopping",)
    resets_by_loading = True

    def default_key(self) -> str:
        return f"EarlyStopping:{self.monitor or 'default'}:{self.mode or 'default'}"

    def on_fit_start(self, state):
        if state.val_every is None:
            raise ConfigError("EarlyStopping needs validation: pass val_tasks to fit (data.val_split in configs)")
        self.watched = resolve_monitor(self.monitor, self.mode, state.learner.task, "EarlyStopping")

    def on_validation_end(self, state, metrics):
        monitor, mode = self.watched
        value = _monitored(metrics, monitor, "EarlyStopping")
        if math.isfinite(value) and _improved(value, self.best, mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            state.should_stop = True
            state.stopped_by = "early_stopping"

    def run_settings(self):
        return {"early_stopping": {"monitor": self.monitor, "mode": self.mode, "patience": self.patience,
                                   "min_delta": self.min_delta}}

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


SCHEDULERS = ("cosine", "step", "exponential", "plateau")


class LRScheduler(Callback):
    """Set the meta-optimizer's learning rate every iteration (closed-form, so resumes are exact).

    ``base`` is each param group's learning rate before any schedule changed it (its
    ``initial_lr``, set by the first scheduler of the optimizer); the rate used by
    iteration ``t`` (0-based) is:

    * ``"cosine"``: linear warm-up ``base * (t + 1) / warmup`` for ``t < warmup``, then cosine
      annealing ``min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = (t - warmup) / (total - warmup)`` clipped to 1 (MAML++ anneals the meta-optimizer so);
    * ``"step"``: ``base * gamma ** (t // step_size)``;
    * ``"exponential"``: ``base * gamma ** t``;
    * ``"plateau"``: ``base * gamma ** r`` where ``r`` counts the times ``monitor`` went
      ``patience`` validations without improving.

    ``warmup``, ``total`` and ``over`` belong to the cosine: given for another schedule, they are a
    :class:`ConfigError`, as is ``total`` with ``over="budget"``.  Rates never go below ``min_lr``.  When the fit ends, each group gets ``base`` back, so a later
    fit without a scheduler trains at ``meta_lr``.

    Args:
        total: iterations of the cosine schedule (default: the ``iterations`` of the fit).
        over: ``"iterations"``, or ``"budget"`` to anneal the cosine over the fit's
            ``budget_minutes`` of wall-clock time (``p = (elapsed - e) / (budget_end - e)`` with ``e``
            the time warm-up ended, 0 without warm-up, so the cosine starts at ``base`` after warm-up as
            over iterations; a continued fit's budget is added to the time of the earlier calls, as
            ``total`` adds iterations; for time-budgeted
            comparisons, where the number of iterations is not known in advance; not
            reproducible bit for bit, since it depends on the clock).
    """

    def __init__(self, name: str = "cosine", *, warmup: int = 0, min_lr: float = 0.0, total: int | None = None,
                 step_size: int = 1000, gamma: float = 0.1, patience: int = 3, monitor: str | None = None,
                 mode: str | None = None, over: str = "iterations") -> None:
        if name not in SCHEDULERS:
            raise unknown_name("scheduler", name, SCHEDULERS)
        if over not in ("iterations", "budget"):
            raise unknown_name("scheduler horizon ('over')", over, ("iterations", "budget"))
        for key, value, low in (("warmup", warmup, 0), ("step_size", step_size, 1), ("patience", patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"scheduler {key} must be an integer >= {low}, got {value!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ConfigError(f"scheduler total must be an integer >= 1, got {total!r}")
        if not (_finite_number(gamma) and 0 < gamma <= 1):
            raise ConfigError(f"scheduler gamma must be in (0, 1], got {_got(gamma)}")
        if not (_finite_number(min_lr) and min_lr >= 0):
            raise ConfigError(f"scheduler min_lr must be a finite number >= 0, got {_got(min_lr)}")
        cosine_only = [k for k, given in (("warmup", warmup != 0), ("total", total is not None),
                                          ("over", over != "iterations")) if given]
        if name != "cosine" and cosine_only:
            raise ConfigError(f"scheduler {', '.join(cosine_only)} appl{'ies' if len(cosine_only) == 1 else 'y'} to the "
                              f"cosine schedule only, not {name!r}: drop {' and '.join(cosine_only)} or use name='cosine'")
        if total is not None and over == "budget":
            raise ConfigError(f"scheduler total={total} applies to over='iterations' (the cosine's length in iterations), "
                              "not over='budget', which anneals over the fit's time budget: drop total or over='budget'")
        self.name, self.warmup, self.min_lr, self.total = name, warmup, float(min_lr), total
        self.step_size, self.gamma, self.patience = step_size, float(gamma), patience
        self.monitor, self.mode, self.over = monitor, mode and _check_mode(mode), over
        self.watched = _fallback_monitor(monitor, mode)  # (monitor, mode), resolved for the learner at fit start
        self.base: list[float] | None = None
        self.reductions, self.best, self.wait = 0, None, 0
        self.warmed_at: float | None = None  # over="budget": the elapsed seconds when warm-up ended

    resets_by_loading = True

    def default_key(self) -> str:
        return f"LRScheduler:{self.name}"

    def factor_lr(self, base: float, t: int, total: int, progress: float | None = None) -> float:
        """The learning rate of iteration ``t`` for a group whose initial rate is ``base``.

        ``progress`` (0..1) replaces the cosine's iteration-based progress when given.
        """
        if self.name == "cosine":
            if t < self.warmup:
                lr = base * (t + 1) / self.warmup
            else:
                p = progress if progress is not None else (t - self.warmup) / max(1, total - self.warmup)
                lr = self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
        elif self.name == "step":
            lr = base * self.gamma ** (t // self.step_size)
        elif self.name == "exponential":
            lr = base * self.gamma ** t
        else:
            lr = base * self.gamma ** self.reductions
        return max(lr, self.min_lr)

    def _budget_progress(self, state: FitState) -> float:
        """The cosine's progress over the time budget: from the end of warm-up (:attr:`warmed_at`,
        the time iteration ``warmup`` starts; 0 without warm-up) to the budget's end."""
        if self.warmup and state.iteration == self.warmup and self.warmed_at is None:
            self.warmed_at = state.elapsed
        start = self.warmed_at or 0.0
        span = state.budget_end - start
        return 1.0 if span <= 0 else (state.elapsed - start) / span

    def _apply(self, state: FitState) -> None:
        total = self.total or state.iterations or 1
        progress = self._budget_progress(state) if self.over == "budget" else None
        for group, base in zip(state.learner.meta_optimizer.param_groups, self.base):
            group["lr"] = self.factor_lr(base, state.iteration, total, progress)

    def on_fit_start(self, state):
        # each group's rate before any schedule touched it (torch's ``initial_lr``; a resumed optimizer's as saved):
        # a continued fit (fit(3) then fit(2)) anneals from meta_lr, not from the rate reached, and from a rate
        # set in between (learner.meta_lr = x sets initial_lr too)
        self.base = [float(g.setdefault("initial_lr", g["lr"])) for g in state.learner.meta_optimizer.param_groups]
        if self.over == "budget" and not state.budget_minutes:
            raise ConfigError("a scheduler with over='budget' needs a time budget (fit budget_minutes)")
        if self.name == "plateau" and state.val_every is None:
            raise ConfigError("the 'plateau' scheduler needs validation: pass val_tasks to fit")
        if self.name == "plateau":
            self.watched = resolve_monitor(self.monitor, self.mode, state.learner.task, "the plateau scheduler")
        self._apply(state)

    def on_iteration_end(self, state, metrics):
        self._apply(state)

    def on_fit_end(self, state):
        """Put back each group's initial rate (``meta_lr``): a later fit without this scheduler
        trains at it, not at the rate the schedule reached (0.0 at the end of a cosine).  Read from the
        group (``initial_lr``), not :attr:`base`: a fit failing before this scheduler's ``on_fit_start``
        would otherwise put back the rate of an earlier fit, not a ``meta_lr`` set since."""
        for group in state.learner.meta_optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])

    def on_exception(self, state, exc):
        self.on_fit_end(state)

    def on_validation_end(self, state, metrics):
        if self.name != "plateau":
            return
        monitor, mode = self.watched
        value = _monitored(metrics, monitor, "the plateau scheduler")
        if math.isfinite(value) and _improved(value, self.best, mode):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.reductions, self.wait = self.reductions + 1, 0
            self._apply(state)

    def run_settings(self):
        keys = ("name", "warmup", "min_lr", "total", "step_size", "gamma", "patience", "monitor", "mode", "over")
        return {"scheduler": {k: getattr(self, k) for k in keys}}

    def state_dict(self):
        return {"base": self.base, "reductions": self.reductions, "best": self.best, "wait": self.wait,
                "warmed_at": self.warmed_at}

    def load_state_dict(self, state):
        self.base, self.warmed_at = state.get("base"), state.get("warmed_at")
        self.reductions, self.best, self.wait = int(state.get("reductions", 0)), state.get("best"), int(state.get("wait", 0))


class MetricsLogger(Callback):
    """Write training and validation metrics to a CSV or JSON-lines file as training goes.

    ``.csv`` files are in long format (``iteration,time,metric,value``: one row per number, so
    new metrics never change the columns); ``.jsonl`` files hold one JSON object per train or
    validation row.  Training rows are written every ``every`` iterations, validation rows
    always.  On resume the file is cut back to what the checkpoint had seen, then appended to (a file that does
    not start with those bytes, e.g. another run's of the same name, is started afresh, with a warning); the
    learner's next ``fit`` call (which continues its run; also that of a learner loaded from its
    ``save(path, training_state=True)``) appends to the same file, even through a new ``MetricsLogger`` of that path.  A learner's first ``fit`` starts the file afresh.
    """

    FORMATS = ("csv", "jsonl")
    continues_run = True  # the learner's next fit call appends to the file instead of truncating it
    resets_by_loading = True

    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path = Path(path)
        fmt = self.path.suffix.lstrip(".")
        if fmt not in self.FORMATS:
            raise ConfigError(f"metrics file {self.path} must end in .csv or .jsonl")
        self.format, self.every = fmt, check_int("MetricsLogger every", every, 1)
        self.size: int | None = None  # bytes written so far (restored on resume)
        self.crc: int | None = None  # their CRC-32: a file of the same name but another run's is not cut and appended to
        self._fh = None

    def default_key(self) -> str:
        return f"MetricsLogger:{self.path.resolve()}"  # the whole path: two folders' metrics.csv are two files

    def saved_key(self, state: Mapping[str, Any]) -> str | None:
        """Its whole path's entry; else the one metrics file of the same name (a run folder moved
        or copied elsewhere since, or a checkpoint of a metamtl that keyed files by name)."""
        if self.key in state:
            return self.key
        same = [k for k in state if k.startswith("MetricsLogger:") and Path(k.partition(":")[2]).name == self.path.name]
        return same[0] if len(same) == 1 else None

    def on_fit_start(self, state):
        if not state.is_main_process:
            return
        if self.size and not self._holds_written_rows():
            # resumed from a checkpoint of another folder (the file lost, or another run's of the same name):
            # a fresh file, not one padded with zero bytes, nor another run's rows continued with this one's
            log.warning("metrics file %s does not start with the %d bytes the checkpoint had written: starting it "
                        "afresh (the rows before iteration %d are in the checkpoint's own run folder)",
                        self.path, self.size, state.iteration)
            self.size = 0
        if not self.size:
            self.crc = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "r+b" if self.size is not None and self.path.exists() else "wb")
        except OSError as exc:
            raise ConfigError(f"cannot write metrics file {self.path}: {exc.strerror}") from exc
        fh.truncate(self.size or 0)
        fh.seek(self.size or 0)
        self._fh = fh
        if not self.size and self.format == "csv":
            self._emit(b"iteration,time,metric,value\n")
        self._flush()

    def _holds_written_rows(self) -> bool:
        """Whether the file starts with the bytes the checkpoint had written (by their CRC-32, when the
        checkpoint has one)."""
        if not (self.path.is_file() and self.path.stat().st_size >= self.size):
            return False
        if self.crc is None:  # a checkpoint of a metamtl that kept the byte count only
            return True
        crc, left = 0, self.size
        with open(self.path, "rb") as fh:
            while left:
                chunk = fh.read(min(left, 1 << 20))
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        return crc == self.crc

    def _emit(self, data: bytes) -> None:
        self._fh.write(data)
        if self.crc is not None:
            self.crc = zlib.crc32(data, self.crc)

    def _flush(self) -> None:
        self._fh.flush()
        self.size = self._fh.tell()

    def _write(self, state: FitState, metrics: dict[str, float]) -> None:
        if self._fh is None:
            return
        it, t = state.iteration, round(state.elapsed, 3)
        if self.format == "csv":
            text = "".join(f"{it},{t},{k},{v!r}\n" for k, v in metrics.items())
        else:
            text = json.dumps(json_nulls({"iteration": it, "time": t, **metrics})) + "\n"  # nan, inf: null
        self._emit(text.encode())
        self._flush()

    def on_iteration_end(self, state, metrics):
        if state.iteration % self.every == 0:
            self._write(state, {f"train/{k}": v for k, v in metrics.items()})

    def on_validation_end(self, state, metrics):
        self._write(state, metrics)

    def on_fit_end(self, state):
        if self._fh is not None:
            self._flush()
            self._fh.close()
            self._fh = None

    def on_exception(self, state, exc):
        self.on_fit_end(state)

    def state_dict(self):
        return {"size": self.size, "crc": self.crc}

    def load_state_dict(self, state):
        self.size, self.crc = state.get("size"), state.get("crc")
