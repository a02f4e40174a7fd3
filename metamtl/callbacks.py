"""Callbacks: behaviour added to ``MetaLearner.fit`` through named hooks (Lightning style).

Hooks receive the learner; ``learner.iteration`` is the number of completed meta-iterations.
A callback that has state to resume implements ``state_dict`` / ``load_state_dict``; it is saved
in checkpoints under its :attr:`Callback.key`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .checkpoint import atomic_save

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
            self.dirpath.mkdir(parents=True, exist_ok=True)
            probe = self.dirpath / ".write_test"
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                from .errors import CheckpointError

                raise CheckpointError(
                    f"checkpoint folder {self.dirpath} is not writable ({exc.strerror}); "
                    "choose another output directory"
                ) from exc

    def on_iteration_end(self, learner, metrics):
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

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state.get("best")
