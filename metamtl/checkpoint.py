"""Checkpoint files: atomic writes, safe loading, and config comparison.

Checkpoints contain only tensors and plain Python containers, and are always read with
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so
a crash or a killed process leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import math
import os
import pickle
import re
import socket
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .files import atomic_write, remove_temporaries

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

FORMAT = "metamtl-checkpoint"
FORMAT_VERSION = 1


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create folder ``path`` if needed and check a file can be written in it (before training)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint folder {path} is not writable ({exc.strerror or exc}); choose another output directory"
        ) from exc
    return path


class _TrackedFile:
    """Write-only file wrapper that remembers the ``OSError`` a write raised.

    ``torch.save`` reports a failed write (disk full, file too large) as a vague
    ``RuntimeError("... unexpected pos ...")``; this keeps the real cause for the message.
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`: temp file + fsync + rename).

    Raises :class:`CheckpointError` when the folder cannot be created or written (read-only,
    disk full, file size limit); then no file was replaced and no temporary file is left.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a folder; give a file path such as "
                              f"{path / 'learner.pt'}")
    tracked: list[_TrackedFile] = []  # empty while the temporary file is not open yet

    def fill(fh: Any) -> None:
        tracked.append(_TrackedFile(fh))
        torch.save(obj, tracked[0])

    try:
        return atomic_write(path, fill)
    except BaseException as exc:
        if not tracked and isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}; choose another "
                                  "output directory or fix its permissions") from exc
        cause = exc if isinstance(exc, OSError) else tracked[0].error if tracked else None
        if cause is not None and isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(
                f"could not write checkpoint {path}: {cause.strerror or cause}. Nothing was replaced: "
                f"{'the previous checkpoint there is intact' if path.exists() else 'no file was left behind'}; "
                "free disk space or choose another output directory"
            ) from exc
        raise


def _check_crcs(path: Path) -> None:
    """Refuse a zip checkpoint whose stored bytes no longer match their CRC-32 (bit rot, a bad copy).

    ``torch.load`` does not check them, so a flipped byte in a weight tensor loads silently as a
    different number.  Members written without a CRC (``torch.serialization.set_crc32_options(False)``
    stores 0) are not checked.
    """
    if not zipfile.is_zipfile(path):
        return  # not a zip (legacy or foreign format): torch.load says what it is
    name = ""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                name = info.filename
                with zf.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError) as exc:
        # ValueError: a damaged member name zipfile cannot decode (UnicodeDecodeError), and the like
        raise CheckpointError(
            f"{path} is corrupt{f' (member {name})' if name else ''}: {exc}; its bytes changed after it was "
            "written (a damaged disk or an incomplete copy), so its weights cannot be trusted: copy it again "
            "or use another checkpoint"
        ) from exc


def check_saveable(model: Any, config: Any = None, **entries: Any) -> None:
    """:class:`CheckpointError` unless ``model`` (a ``TrunkHead``) can be written to a checkpoint:
    it has a config name, which says what to rebuild on load, and the learner ``config`` and the
    other ``entries`` (``metadata``, ``task_defaults``) hold plain values only, which the
    weights-only loader can read back (no class or function, no ``Path`` or numpy number)."""
    for name, value in {"config": config, **entries}.items():
        check_plain(value, name)
    if not model.config.get("name"):
        raise CheckpointError(
            "the model has no config name, so a checkpoint could not say what to rebuild: build it with "
            "metamtl.models.build_model, or name your own network, TrunkHead(trunk, head, config={'name': "
            "'mynet'}), and load its checkpoints with MetaLearner.load(path, model=<the same network>)"
        )


#: the values ``torch.load(weights_only=True)`` reads back (exact types: a numpy float is a float subclass
#: that pickles as a numpy scalar, which the loader refuses)
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def check_plain(value: Any, where: str) -> None:
    """:class:`CheckpointError` naming the entry of ``value`` (``where``: what it is) that the
    weights-only loader could not read back from a checkpoint."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            check_plain(k, f"{where} key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    elif isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES:
        return
    elif not (isinstance(value, type) or callable(value)):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise CheckpointError(
            f"{where} is {value!r:.80} (a {kind}), which a checkpoint cannot hold: its weights-only loader reads "
            "back plain values only (None, bool, int, float, str, lists, tuples and dicts of them, tensors), so "
            "the file could never be loaded; convert it first (str(path), int(n) or float(x) for numpy numbers)"
        )
    else:
        name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
        raise CheckpointError(
            f"{where} is {name}, which a checkpoint cannot name (its weights-only loader reads back plain "
            "values only): a torch.optim class is saved by name, a class of your own (e.g. registered "
            "with higher.register_optim) is not - use a torch.optim class or a core optimizer by name "
            "('sgd', 'adam', ...) to save or checkpoint this learner"
        )


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a metamtl checkpoint with ``weights_only=True`` and check its bytes and format."""
    path = Path(path)
    if path.is_dir():
        inside = [f.name for f in (path / "learner.pt", path / "ensemble.pt", path / "last.pt", path / "best.pt") if f.is_file()]
        hint = f": give one of its checkpoints, e.g. {path / inside[0]}" if inside else " with no checkpoint in it"
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a legacy pickle
        what = f"it starts with {head!r}" if head else "it is empty"
        raise CheckpointError(f"{path} is not a readable checkpoint: {what}, not a torch checkpoint's bytes; give "
                              "the learner.pt, last.pt or best.pt a run wrote")
    _check_crcs(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|$)", str(exc), re.S)
        detail = (found.group(1).strip() if found else "") or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint, so it is corrupt or "
            f"unpickling it would run code; only load checkpoints written by metamtl ({detail})"
        ) from exc
    except Exception as exc:  # arbitrary bytes make the unpickler raise almost anything
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metamtl checkpoint (no '{FORMAT}' header)")
    version = obj.get("format_version", -1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: damaged checkpoint: its format_version must be an integer, got {version!r}; "
                              "use another checkpoint (or the run's best.pt / learner.pt)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer metamtl (checkpoint format {obj.get('format_version')}, "
            f"this version reads <= {FORMAT_VERSION}); upgrade metamtl"
        )
    return obj


def _same(a: Any, b: Any) -> bool:
    """``a == b``, also for NaN floats (a one-episode validation's CI, a skipped step's loss) and
    containers of them: a history read back from a checkpoint holds new NaN objects."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def history_continues(history: Any, saved: Any) -> bool:
    """Whether ``saved`` (a checkpoint's history) is a prefix of ``history`` (a learner's), so the
    checkpoint belongs to the learner's run; rows are compared NaN-aware (see :func:`_same`)."""
    return (isinstance(saved, list) and isinstance(history, list) and len(saved) <= len(history)
            and all(_same(mine, theirs) for mine, theirs in zip(history, saved)))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two nested configs (``key: a != b``)."""
    fa, fb = flatten(a), flatten(b)
    return [
        f"{k}: {fa.get(k, '<missing>')!r} != {fb.get(k, '<missing>')!r}"
        for k in sorted(set(fa) | set(fb))
        if fa.get(k, "<missing>") != fb.get(k, "<missing>")
    ]


# -- run folders: one writer at a time, no silent overwrite -------------------------------------

#: files a run folder holds that a new run would overwrite (``metamtl fit``, ``experiment.run``)
RUN_FILES = ("last.pt", "best.pt", "learner.pt", "ensemble.pt", "results.json", "history.json", "metrics.csv", "metrics.jsonl")
#: files derived from those (rebuilt by a run; removed with them on overwrite so none is stale)
DERIVED_FILES = ("report.html", "steps_curve.json")
#: the lock file inside a run folder
LOCK_FILE = ".metamtl.lock"

_held: dict[str, list[Any]] = {}  # real folder path -> [fd, depth, holding thread's ident, its name]
_held_guard = threading.Lock()


class RunFolderLock:
    """The right to write a run folder, held by one process at a time.

    An advisory ``flock`` on ``<folder>/.metamtl.lock``, a file holding the holder's pid, host and
    start time for the message a second process gets.  The kernel drops the lock when the
    holding process ends, however it ends, so a crashed or killed run never leaves the folder
    locked (its file stays, unlocked, until the next run takes it).  A clean release deletes the
    file; a process that locked a file just deleted notices (other inode) and tries again.  Taking
    the lock removes the temporary files a killed writer left in the folder
    (:func:`~metamtl.files.remove_temporaries`).
    Re-entrant within the thread that holds it (``metamtl fit`` holds it for the whole run, the
    checkpoint callback again inside ``fit``); another thread of the process is refused like another
    process (two fits in two threads would overwrite each other's ``last.pt``).  Without ``fcntl``
    (Windows) it does nothing.

    Raises:
        CheckpointError: another process, or another thread of this one, holds the folder.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._key = os.path.realpath(self.folder)
        self.held = False

    def acquire(self) -> "RunFolderLock":
        if self.held:
            return self
        with _held_guard:
            entry = _held.get(self._key)
            if entry is not None and entry[2] != threading.get_ident():
                raise CheckpointError(
                    f"run folder {self.folder} is being written by another run of this process (thread "
                    f"{entry[3]!r}); two runs writing one folder would overwrite each other's checkpoints. Wait "
                    "for it to finish, or write elsewhere (another checkpoint_dir, name=... or output_dir=...)")
            if entry is not None:
                entry[1] += 1
            elif fcntl is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = self._lock_file()
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
                _held[self._key] = [fd, 1, threading.get_ident(), threading.current_thread().name]
                remove_temporaries(self.folder)  # only this process writes here now: left by a killed one
        self.held = True
        return self

    def _lock_file(self) -> int:
        """An open, exclusively locked descriptor of the folder's lock file (which still exists)."""
        path = self.folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(f"cannot lock run folder {self.folder}: {exc}") from exc
                raise CheckpointError(
                    f"run folder {self.folder} is being written by another process ({holder}); two runs "
                    "writing one folder would overwrite each other's checkpoints. Wait for it to finish or "
                    "stop it, or write elsewhere (name=... or output_dir=...). A crashed run holds nothing: "
                    "its lock went with its process"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # its holder deleted it while releasing: lock the new one

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _held_guard:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                try:
                    os.unlink(self.folder / LOCK_FILE)  # still locked: nobody holds it meanwhile
                except OSError:
                    pass
                os.close(entry[0])  # drops the flock

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check (before any work) that ``path`` can be written: not a folder, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; give a file name")
    try:
        ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    except CheckpointError as exc:
        raise CheckpointError(f"{what} {path} cannot be written: {exc}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise CheckpointError(f"{what} {path} exists and is not writable; choose another path or fix its permissions")
    return path
