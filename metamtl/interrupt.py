"""Graceful stop of :meth:`MetaLearner.fit` on SIGINT (Ctrl-C) and SIGTERM.

While ``fit`` runs on the main thread, :class:`StopOnSignal` replaces the SIGINT and SIGTERM
handlers.  The first signal only records a stop request: ``fit`` finishes the iteration in
progress (and its validation, if one is due), writes a resumable checkpoint and raises
:class:`~metamtl.errors.FitInterrupted`.  A second signal raises it at once, without a new
checkpoint (the last periodic one, written atomically, is intact).  The previous handlers come
back when ``fit`` returns or raises; a signal that was ignored (``SIG_IGN``, e.g. SIGINT of a
background job started by a non-interactive shell) stays ignored.  A fit run inside another fit (in
a callback) leaves the handlers to the outer one: the nested fit is part of the outer iteration,
which completes, and the outer run stops and saves its own checkpoint.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

from .errors import FitInterrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    """

    def __init__(self, iteration: Callable[[], int] = lambda: 0, signals=STOP_SIGNALS) -> None:
        self.iteration = iteration
        self.signals = tuple(signals)
        self.signum: int | None = None
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
            self.signum = signum
            sys.stderr.write(
                f"\nmetamtl: {name} received: stopping after the current iteration and saving a "
                f"resumable checkpoint (send {name} again to abort at once)\n"
            )
            sys.stderr.flush()
            return
        self.restore()
        it = self.iteration()
        raise FitInterrupted(
            f"second {name}: aborted during iteration {it + 1} without saving it; the last periodic "
            "checkpoint (if any) is intact", signum, it, None,
        )
