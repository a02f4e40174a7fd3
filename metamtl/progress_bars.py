"""Progress bars: every bar metamtl draws comes from :func:`progress_bar`, so one switch silences all.

A bar is drawn unless its caller turns it off (``show=False``: ``fit(progress=False)``, a process
other than rank 0) or it is made inside :func:`silenced` (``metamtl ... --no-progress``,
:func:`metamtl.experiment.run` with ``progress=False``), which also reaches the bars that no
argument reaches: the data layer's image decoding and downloads.  ``show=None`` draws only on a
terminal.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

_silenced = 0  # depth of nested silenced(True) blocks


@contextmanager
def silenced(on: bool = True) -> Iterator[None]:
    """No progress bar is drawn inside (``on=False``: no change)."""
    global _silenced
    _silenced += bool(on)
    try:
        yield
    finally:
        _silenced -= bool(on)


def progress_bar(show: bool | None = True, **kwargs: Any) -> Any:
    """A ``tqdm`` bar (``kwargs``: tqdm's), disabled by ``show=False`` or inside :func:`silenced`."""
    from tqdm.auto import tqdm

    disable = True if _silenced or show is False else (None if show is None else False)  # None: tqdm asks isatty
    return tqdm(disable=disable, **kwargs)
