"""Callbacks: behaviour added to ``MetaLearner.fit`` through named hooks (Lightning style).

Hooks receive the learner; ``learner.iteration`` is the number of completed meta-iterations.
One iteration calls, in order::

    on_iteration_start -> (meta-step) -> on_after_backward -> on_iteration_end(train metrics)
    -> [validation, when due -> on_validation_end(val metrics)] -> on_iteration_complete

``on_fit_start`` / ``on_fit_end`` / ``on_exception`` frame the whole call.  A callback with state
to resume implements ``state_dict`` / ``load_state_dict``; it is saved in checkpoints under its
:attr:`Callback.key` and restored *before* ``on_fit_start`` of the resumed call.
:class:`ModelCheckpoint` runs after all other callbacks and writes ``last.pt`` in
``on_iteration_complete``, so a checkpoint holds every callback's state for a finished iteration
(including its validation) and a resumed run is bit-identical to an uninterrupted one.

Provided: :class:`History`, :class:`ProgressBar`, :class:`ModelCheckpoint` (last/best),
:class:`EarlyStopping`, :class:`LRScheduler` (cosine with warm-up, step, exponential, plateau)
and :class:`MetricsLogger` (CSV or JSON lines).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .checkpoint import ensure_writable_dir
from .errors import CheckpointError, ConfigError, TrainingError, unknown_name

if TYPE_CHECKING:
    from .learner import MetaLearner


class Callback:
    """Base class; override the hooks you need."""

    @property
    def key(self) -> str:
        return type(self).__name__

    def on_fit_start(self, learner: "MetaLearner") -> None: ...
    def on_iteration_start(self, learner: "MetaLearner") -> None: ...
    def on_after_backward(self, learner: "MetaLearner") -> None: ...
    def on_iteration_end(self, learner: "MetaLearner", metrics: dict[str, float]) -> None: ...
    def on_validation_end(self, learner: "MetaLearner", metrics: dict[str, float]) -> None: ...
    def on_iteration_complete(self, learner: "MetaLearner") -> None: ...
    def on_fit_end(self, learner: "MetaLearner") -> None: ...
    def on_exception(self, learner: "MetaLearner", exc: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList(Callback):
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __iter__(self):
        return iter(self.callbacks)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_fit_start(self, learner): self._call("on_fit_start", learner)
    def on_iteration_start(self, learner): self._call("on_iteration_start", learner)
    def on_after_backward(self, learner): self._call("on_after_backward", learner)
    def on_iteration_end(self, learner, metrics): self._call("on_iteration_end", learner, metrics)
    def on_validation_end(self, learner, metrics): self._call("on_validation_end", learner, metrics)
    def on_iteration_complete(self, learner): self._call("on_iteration_complete", learner)
    def on_fit_end(self, learner): self._call("on_fit_end", learner)
    def on_exception(self, learner, exc): self._call("on_exception", learner, exc)

    def state_dict(self) -> dict[str, Any]:
        return {cb.key: cb.state_dict() for cb in self.callbacks if cb.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.key in state:
                cb.load_state_dict(state[cb.key])


class ProgressBar(Callback):
    """A tqdm bar over meta-iterations showing smoothed train loss/accuracy and validation accuracy."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self.bar = None
        self.avg: dict[str, float] = {}
        self.val: dict[str, float] = {}

    def on_fit_start(self, learner):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=learner.fit_state["iterations"], initial=learner.iteration, desc="meta-train",
            dynamic_ncols=True, disable=not learner.is_main_process,
        )

    def on_iteration_end(self, learner, metrics):
        for k in ("loss", "accuracy"):
            if k in metrics and math.isfinite(metrics[k]):
                old = self.avg.get(k)
                self.avg[k] = metrics[k] if old is None else self.smoothing * old + (1 - self.smoothing) * metrics[k]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self._postfix(), refresh=False)

    def on_validation_end(self, learner, metrics):
        self.val = {k: v for k, v in metrics.items() if k in ("val/accuracy", "val/loss")}
        if self.bar is not None:
            self.bar.set_postfix(self._postfix())

    def _postfix(self) -> dict[str, str]:
        out = {k: f"{v:.3f}" for k, v in self.avg.items()}
        out.update({k: f"{v:.3f}" for k, v in self.val.items()})
        return out

    def on_fit_end(self, learner):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, learner, exc):
        self.on_fit_end(learner)


class History(Callback):
    """Keeps every train/validation row in ``learner.history`` (saved in checkpoints)."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, int(every))

    def on_fit_start(self, learner):
        self._t0 = time.perf_counter() - learner.fit_state.get("elapsed", 0.0)

    def on_iteration_end(self, learner, metrics):
        if learner.iteration % self.every == 0 or learner.iteration == learner.fit_state["iterations"]:
            learner.history.append({"iteration": learner.iteration, "time": learner.elapsed,
                                    **{f"train/{k}": v for k, v in metrics.items()}})

    def on_validation_end(self, learner, metrics):
        learner.history.append({"iteration": learner.iteration, "time": learner.elapsed, **metrics})


class ModelCheckpoint(Callback):
    """Write ``last.pt`` every ``every`` iterations (and at the end) and ``best.pt`` on improvement.

    Args:
        dirpath: folder for the checkpoints.
        every: iterations between ``last.pt`` writes (0: only at the end).
        monitor: validation metric deciding ``best.pt`` (``None`` disables it).
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, dirpath: str | Path, every: int = 100, monitor: str | None = "val/accuracy", mode: str = "max") -> None:
        self.dirpath = Path(dirpath)
        self.every = int(every)
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.pt"

    def on_fit_start(self, learner):
        if learner.is_main_process:
            ensure_writable_dir(self.dirpath)

    def on_iteration_complete(self, learner):
        if self.every and learner.iteration % self.every == 0 and learner.is_main_process:
            learner.save(self.last_path, training_state=True)

    def on_validation_end(self, learner, metrics):
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None or not math.isfinite(value):
            return
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = float(value)
            if learner.is_main_process:
                learner.save(self.best_path, training_state=False)

    def on_fit_end(self, learner):
        if learner.is_main_process:
            learner.save(self.last_path, training_state=True)

    def on_exception(self, learner, exc):
        """After too many non-finite steps, keep the last good parameters in ``last.pt``."""
        if isinstance(exc, TrainingError) and learner.is_main_process:
            try:
                learner.save(self.last_path, training_state=True)
                note = f"the last good parameters are saved in {self.last_path}"
            except CheckpointError as err:
                note = f"the last good parameters could not be saved: {err}"
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(note)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state.get("best")


def _improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _check_mode(mode: str) -> str:
    if mode not in ("max", "min"):
        raise unknown_name("mode", mode, ("max", "min"))
    return mode


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
        monitor: validation metric (``"val/accuracy"``, ``"val/loss"``, ...).
        mode: ``"max"`` (higher is better) or ``"min"``.
        patience: validations without improvement before stopping.
        min_delta: smallest change that counts as an improvement.

    Sets ``learner.should_stop`` and ``learner.fit_state["stopped_by"] = "early_stopping"``;
    :class:`ModelCheckpoint` keeps the best weights in ``best.pt``.
    """

    def __init__(self, monitor: str = "val/accuracy", mode: str = "max", patience: int = 5,
                 min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"early stopping patience must be an integer >= 1, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ConfigError(f"early stopping min_delta must be a finite number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, _check_mode(mode), patience, float(min_delta)
        self.best: float | None = None
        self.wait = 0

    def on_fit_start(self, learner):
        if learner.fit_state.get("val_every") is None:
            raise ConfigError("EarlyStopping needs validation: pass val_tasks to fit (data.val_split in configs)")

    def on_validation_end(self, learner, metrics):
        value = _monitored(metrics, self.monitor, "EarlyStopping")
        if math.isfinite(value) and _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            learner.should_stop = True
            learner.fit_state["stopped_by"] = "early_stopping"

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


SCHEDULERS = ("cosine", "step", "exponential", "plateau")


class LRScheduler(Callback):
    """Set the meta-optimizer's learning rate every iteration (closed-form, so resumes are exact).

    ``base`` is each param group's learning rate when training starts; the rate used by
    iteration ``t`` (0-based) is:

    * ``"cosine"``: linear warm-up ``base * (t + 1) / warmup`` for ``t < warmup``, then cosine
      annealing ``min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2`` with
      ``p = (t - warmup) / (total - warmup)`` clipped to 1 (MAML++ anneals the meta-optimizer so);
    * ``"step"``: ``base * gamma ** (t // step_size)``;
    * ``"exponential"``: ``base * gamma ** t``;
    * ``"plateau"``: ``base * gamma ** r`` where ``r`` counts the times ``monitor`` went
      ``patience`` validations without improving.

    Rates never go below ``min_lr``.

    Args:
        total: iterations of the cosine schedule (default: the ``iterations`` of the fit).
        over: ``"iterations"``, or ``"budget"`` to anneal the cosine over the fit's
            ``budget_minutes`` of wall-clock time (``p = elapsed / budget``; for time-budgeted
            comparisons, where the number of iterations is not known in advance; not
            reproducible bit for bit, since it depends on the clock).
    """

    def __init__(self, name: str = "cosine", *, warmup: int = 0, min_lr: float = 0.0, total: int | None = None,
                 step_size: int = 1000, gamma: float = 0.1, patience: int = 3, monitor: str = "val/accuracy",
                 mode: str = "max", over: str = "iterations") -> None:
        if name not in SCHEDULERS:
            raise unknown_name("scheduler", name, SCHEDULERS)
        if over not in ("iterations", "budget"):
            raise unknown_name("scheduler horizon ('over')", over, ("iterations", "budget"))
        for key, value, low in (("warmup", warmup, 0), ("step_size", step_size, 1), ("patience", patience, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"scheduler {key} must be an integer >= {low}, got {value!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ConfigError(f"scheduler total must be an integer >= 1, got {total!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0 < gamma <= 1):
            raise ConfigError(f"scheduler gamma must be in (0, 1], got {gamma!r}")
        if not (isinstance(min_lr, (int, float)) and math.isfinite(min_lr) and min_lr >= 0):
            raise ConfigError(f"scheduler min_lr must be a finite number >= 0, got {min_lr!r}")
        self.name, self.warmup, self.min_lr, self.total = name, warmup, float(min_lr), total
        self.step_size, self.gamma, self.patience = step_size, float(gamma), patience
        self.monitor, self.mode, self.over = monitor, _check_mode(mode), over
        self.base: list[float] | None = None
        self.reductions, self.best, self.wait = 0, None, 0

    @property
    def key(self) -> str:
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

    def _apply(self, learner) -> None:
        total = self.total or int(learner.fit_state.get("iterations") or 1)
        progress = learner.elapsed / (60.0 * learner.fit_state["budget_minutes"]) if self.over == "budget" else None
        for group, base in zip(learner.meta_optimizer.param_groups, self.base):
            group["lr"] = self.factor_lr(base, learner.iteration, total, progress)

    def on_fit_start(self, learner):
        if self.base is None:
            self.base = [float(g["lr"]) for g in learner.meta_optimizer.param_groups]
        if self.over == "budget" and not learner.fit_state.get("budget_minutes"):
            raise ConfigError("a scheduler with over='budget' needs a time budget (fit budget_minutes)")
        if self.name == "plateau" and learner.fit_state.get("val_every") is None:
            raise ConfigError("the 'plateau' scheduler needs validation: pass val_tasks to fit")
        self._apply(learner)

    def on_iteration_end(self, learner, metrics):
        self._apply(learner)

    def on_validation_end(self, learner, metrics):
        if self.name != "plateau":
            return
        value = _monitored(metrics, self.monitor, "the plateau scheduler")
        if math.isfinite(value) and _improved(value, self.best, self.mode):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.reductions, self.wait = self.reductions + 1, 0
            self._apply(learner)

    def state_dict(self):
        return {"base": self.base, "reductions": self.reductions, "best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.base = state.get("base")
        self.reductions, self.best, self.wait = int(state.get("reductions", 0)), state.get("best"), int(state.get("wait", 0))


class MetricsLogger(Callback):
    """Write training and validation metrics to a CSV or JSON-lines file as training goes.

    ``.csv`` files are in long format (``iteration,time,metric,value``: one row per number, so
    new metrics never change the columns); ``.jsonl`` files hold one JSON object per train or
    validation row.  Training rows are written every ``every`` iterations, validation rows
    always.  On resume the file is cut back to what the checkpoint had seen, then appended to.
    """

    FORMATS = ("csv", "jsonl")

    def __init__(self, path: str | Path, every: int = 1) -> None:
        self.path = Path(path)
        fmt = self.path.suffix.lstrip(".")
        if fmt not in self.FORMATS:
            raise ConfigError(f"metrics file {self.path} must end in .csv or .jsonl")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"MetricsLogger every must be an integer >= 1, got {every!r}")
        self.format, self.every = fmt, every
        self.size: int | None = None  # bytes written so far (restored on resume)
        self._fh = None

    @property
    def key(self) -> str:
        return f"MetricsLogger:{self.path.name}"

    def on_fit_start(self, learner):
        if not learner.is_main_process:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "r+b" if self.size is not None and self.path.exists() else "wb")
        except OSError as exc:
            raise ConfigError(f"cannot write metrics file {self.path}: {exc.strerror}") from exc
        fh.truncate(self.size or 0)
        fh.seek(self.size or 0)
        if not self.size and self.format == "csv":
            fh.write(b"iteration,time,metric,value\n")
        self._fh = fh
        self._flush()

    def _flush(self) -> None:
        self._fh.flush()
        self.size = self._fh.tell()

    def _write(self, learner, metrics: dict[str, float]) -> None:
        if self._fh is None:
            return
        it, t = learner.iteration, round(learner.elapsed, 3)
        if self.format == "csv":
            text = "".join(f"{it},{t},{k},{v!r}\n" for k, v in metrics.items())
        else:
            text = json.dumps({"iteration": it, "time": t, **metrics}) + "\n"
        self._fh.write(text.encode())
        self._flush()

    def on_iteration_end(self, learner, metrics):
        if learner.iteration % self.every == 0:
            self._write(learner, {f"train/{k}": v for k, v in metrics.items()})

    def on_validation_end(self, learner, metrics):
        self._write(learner, metrics)

    def on_fit_end(self, learner):
        if self._fh is not None:
            self._flush()
            self._fh.close()
            self._fh = None

    def on_exception(self, learner, exc):
        self.on_fit_end(learner)

    def state_dict(self):
        return {"size": self.size}

    def load_state_dict(self, state):
        self.size = state.get("size")
