"""Atomic file writes: the one temp-file-then-rename writer of every file metamtl saves (checkpoints,
decode caches, downloads, results, histories, curves, reports), so a crash, a full disk or a killed
process never leaves a truncated file under the final name.  The temporary file a killed process
leaves in a run folder is removed by the next run that takes the folder (:func:`remove_temporaries`)."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import IO, Any, Callable


_TOKEN_BYTES = 6
#: the name of :func:`atomic_write`'s temporary files: ``.<final name>.<12 hex digits>.tmp``
TEMPORARY_NAME = re.compile(rf"\..+\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")


#: seconds since its last change after which a temporary file counts as a killed writer's: writers that
#: take no lock (``learner.save``, ``metamtl report``) may be writing one into a run folder right now
STALE_SECONDS = 3600


def _stale(entry: os.DirEntry) -> bool:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
    except OSError:
        return False


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files of :func:`atomic_write` in ``folder`` (not below it) unchanged for
    :data:`STALE_SECONDS` and return their names: left over from a killed process (a live writer's,
    e.g. a ``learner.save`` into a run folder just locked, is kept)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) and _stale(entry):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, fill: Callable[[IO], Any], *, text: bool = False) -> Path:
    """Write file ``path`` atomically: ``fill(fh)`` writes a new temporary file in the same folder
    (``text``: opened as UTF-8 text, else binary), which is fsynced and renamed over ``path``.

    Whatever fails midway (``fill`` raising after partial output, a full disk, a killed process)
    leaves the previous file intact; the error is raised as it came.  No temporary file stays behind,
    except after a SIGKILL or power loss, which no code can clean up at that moment: such a
    ``.<name>.<hex>.tmp`` in a run folder is removed when a run next takes the folder
    (:func:`remove_temporaries`, called by :class:`~metamtl.checkpoint.RunFolderLock`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never reuse a file; mode 0o666 so the umask applies as for any other file
    tmp = path.parent / f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")) as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, content: str) -> Path:
    """``Path.write_text`` made atomic (:func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(content), text=True)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj, file, **dump_kwargs)`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda fh: json.dump(obj, fh, **dump_kwargs), text=True)


def json_nulls(obj: Any) -> Any:
    """``obj`` with every non-finite float (``nan``, ``inf``) ``None``, through mappings, lists and tuples:
    JSON ``null``, as strict JSON has no ``NaN`` or ``Infinity`` tokens (``json.dump`` writes them bare)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_nulls(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_nulls(v) for v in obj]
    return obj
