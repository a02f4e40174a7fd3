"""Graceful stop of :meth:`MetaLearner.fit` on SIGINT (Ctrl-C) and SIGTERM.

While ``fit`` runs on the main thread, :class:`StopOnSignal` replaces the SIGINT and SIGTERM
handlers.  The first signal only records a stop request: ``fit`` finishes the iteration in
progress (and its validation, if one is due), writes a resumable checkpoint and raises
:class:`~metamtl.errors.FitInterrupted`.  A second signal raises it at once, without a new
checkpoint (the last periodic one, written atomically, is intact).  Under torchrun a second signal
of another kind within :data:`LAUNCHER_GRACE_SECONDS` of the first does not abort: it is the launcher
passing the stop on (torchrun's agent, told to stop by a wrapper such as ``timeout`` or a scheduler,
sends the workers its own SIGTERM right after their SIGINT), and torchrun's SIGKILL deadline still
bounds the wait; the same signal again, or any after the grace period, aborts.  The previous handlers come
back when ``fit`` returns or raises; a signal that was ignored (``SIG_IGN``, e.g. SIGINT of a
background job started by a non-interactive shell) stays ignored.  A fit run inside another fit (in
a callback) leaves the handlers to the outer one: the nested fit is part of the outer iteration,
which completes, and the outer run stops and saves its own checkpoint.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable

from . import distributed
from .errors import DistributedError, FitInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Under torchrun, seconds after the first stop signal in which one of another kind is the launcher's.
LAUNCHER_GRACE_SECONDS = 10.0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal:
    """Turn SIGINT/SIGTERM into a stop request while installed (main thread only).

    Args:
        iteration: returns the number of completed iterations (for messages).
        signals: the signals handled.
        grace: seconds after the first signal in which a second one of another kind does not abort
            (default: :data:`LAUNCHER_GRACE_SECONDS` under torchrun, 0 in a plain process).
    """

    def __init__(self, iteration: Callable[[], int] = lambda: 0, signals=STOP_SIGNALS,
                 grace: float | None = None) -> None:
        self.iteration = iteration
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.grace = _launched_grace() if grace is None else float(grace)
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.getsignal(sig)
                nested = isinstance(getattr(previous, "__self__", None), StopOnSignal)  # a fit in a fit's callback
                if previous is signal.SIG_IGN or previous is None or nested:
                    continue  # ignored stays ignored; the outer fit keeps the stop
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopOnSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        name = signal_name(signum)
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            self._say(f"{name} received: stopping after the current iteration and saving a resumable checkpoint "
                      f"(send {name} again to abort at once)")
            return
        if signum != self.signum and time.monotonic() - self._first_at < self.grace:
            first = signal_name(self.signum)
            self._say(f"{name} after {first}: the launcher passing the stop on; still stopping after the current "
                      f"iteration and saving (send {first} again to abort at once)")
            return
        self.restore()
        it = self.iteration()
        raise FitInterrupted(
            f"second {name}: aborted during iteration {it + 1} without saving it; the last periodic "
            "checkpoint (if any) is intact", signum, it, None,
        )

    @staticmethod
    def _say(message: str) -> None:
        sys.stderr.write(f"\nmetamtl: {message}\n")
        sys.stderr.flush()


def _launched_grace() -> float:
    """:data:`LAUNCHER_GRACE_SECONDS` in a process of a multi-process (torchrun) launch, else 0."""
    try:
        return LAUNCHER_GRACE_SECONDS if distributed.launch_env().distributed else 0.0
    except DistributedError:  # a malformed launch environment: fit reports it
        return 0.0
