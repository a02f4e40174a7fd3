"""Read an offline W&B run (``run-<id>.wandb``) back without syncing it.

The ``.wandb`` file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version) then
LevelDB-log framed records (32 KiB blocks; each chunk has a 7-byte header: checksum, length,
type FULL/FIRST/MIDDLE/LAST), each record a ``wandb_internal_pb2.Record`` protobuf.  This module
decodes them with W&B's own protobuf schema, to check what a run logged (tests, debugging) on a
machine with no network.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, DataNotFoundError

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclasses.dataclass
class OfflineRun:
    """What an offline run recorded."""

    path: Path
    run_id: str = ""
    project: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` of every history row that has ``key``."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def find_run_file(path: str | Path) -> Path:
    """The ``.wandb`` file of ``path``: the file itself, an ``offline-run-*`` folder, or a folder
    with ``wandb/`` inside (the most recent run there: W&B's ``latest-run`` link, else the run file
    written last; folder names tell only the second a run started)."""
    path = Path(path)
    if path.is_file():
        return path
    latest = [f.resolve() for folder in (path / "wandb", path) for f in sorted((folder / "latest-run").glob("run-*.wandb"))]
    candidates = sorted(path.glob("run-*.wandb")) or latest[:1] or sorted(path.glob("wandb/*run-*/run-*.wandb")) \
        or sorted(path.glob("*run-*/run-*.wandb"))
    if not candidates:
        raise DataNotFoundError(f"no W&B run file (run-*.wandb) in {path} or {path / 'wandb'}")
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.parent.name))


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every ``Record`` protobuf in a ``.wandb`` file, in order."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise DataError(f"{path} is not a W&B transaction log (bad header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        start, pos = pos, pos + _HEADER
        if pos + length > len(data):  # a record still being written
            break
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - _HEADER
            continue
        chunk = data[pos:pos + length]
        pos += length
        if zlib.crc32(bytes([kind]) + chunk) != crc or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise _corrupt(path, start, "checksum mismatch")
        if kind == _FIRST:
            pending = chunk
            continue
        if kind == _MIDDLE:
            pending += chunk
            continue
        payload = pending + chunk if kind == _LAST else chunk
        pending = b""
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            raise _corrupt(path, start, str(exc)) from None
        yield record


def runs_with_history(run_dir: str | Path) -> list[Path]:
    """The offline runs under ``<run_dir>/wandb`` that logged at least one history row (a run that
    crashed during training, whose only record they may be); a file that cannot be read (wandb not
    installed, damaged) counts as one, so nothing is deleted unseen."""
    found = []
    for file in sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb")):
        try:
            logged = any(rec.WhichOneof("record_type") == "history" for rec in iter_records(file))
        except (ImportError, DataError, OSError):
            logged = True
        if logged:
            found.append(file.parent)
    return found


def _corrupt(path: str | Path, pos: int, why: str) -> DataError:
    return DataError(f"{path}: corrupt W&B record at byte {pos} ({why}); the file is damaged (a disk or copy "
                     "error) and is not read past that record: read an intact copy of the run")


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(path: str | Path, wait: float = 10.0) -> OfflineRun:
    """Decode config, history rows, summary, artifacts and exit code of an offline run.

    W&B's service writes the file asynchronously, even for a moment after ``run.finish()``
    returns: this waits up to ``wait`` seconds for the run's exit record (a run still in progress,
    or one that crashed, is returned as found, with ``exit_code=None``).
    """
    file = find_run_file(path)
    deadline = time.monotonic() + wait
    while True:
        run = _decode(file)
        if run.exit_code is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _decode(file: Path) -> OfflineRun:
    run = OfflineRun(path=file)
    for rec in iter_records(file):
        try:
            _add_record(run, rec)
        except ValueError as exc:  # a value that is not JSON (or not UTF-8) in a record with a valid checksum
            raise DataError(f"{file}: corrupt W&B {rec.WhichOneof('record_type')} record ({exc})") from None
    return run


def _add_record(run: OfflineRun, rec: Any) -> None:
    """Add what one record holds to ``run``."""
    kind = rec.WhichOneof("record_type")
    if kind == "run":
        run.run_id, run.project = rec.run.run_id, rec.run.project
        run.config.update({_key(u): json.loads(u.value_json) for u in rec.run.config.update})
    elif kind == "config":
        run.config.update({_key(u): json.loads(u.value_json) for u in rec.config.update})
    elif kind == "history":
        run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
    elif kind == "summary":
        run.summary.update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
    elif kind == "artifact":
        a = rec.artifact
        run.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                              "files": [e.path for e in a.manifest.contents],
                              "metadata": json.loads(a.metadata) if a.metadata else {}})
    elif kind == "environment":
        from google.protobuf.json_format import MessageToDict

        run.environment.update(MessageToDict(rec.environment))
    elif kind == "exit":
        run.exit_code = rec.exit.exit_code
