"""Multi-process meta-training on ``torch.distributed``, launched with ``torchrun``.

Run the same command under torchrun, one process per GPU (or a few per CPU machine)::

    torchrun --standalone --nproc_per_node=2 -m metamtl fit configs/omniglot_5w1s.yaml

:meth:`MetaLearner.fit <metamtl.MetaLearner.fit>` sees torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), starts the process group (NCCL on GPU, one device per local
rank; gloo on CPU) and trains so that the result equals a one-process run with the same config:

* **Tasks.** Meta-batch ``b`` is episodes ``b*B .. b*B+B-1`` and episode ``i`` is a pure function
  of ``(seed, i)``; rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of every meta-batch
  (:func:`~metamtl.tasks.task_batches`), so ranks draw disjoint tasks whose union is the
  single-process meta-batch.
* **Meta-gradients.** Each rank's ``algorithm.meta_step`` leaves the mean meta-gradient of its
  ``n_r`` tasks in ``.grad``; :func:`reduce_meta_gradients` all-reduces
  ``sum_r (n_r / B) * grad_r``, the mean over the whole meta-batch even when ``B`` is not
  divisible by ``W``.  An explicit all-reduce rather than ``DistributedDataParallel``: the inner
  loop runs on ``higher``'s functional copies of the model, so there is no single forward whose
  backward DDP could hook, and a meta-step may backpropagate several times.
  An algorithm whose meta-gradient is no mean over tasks (``multitask``: a strategy combines
  per-dataset meta-gradients) exchanges what it needs itself through
  :meth:`ProcessStrategy.all_gather` and :meth:`ProcessStrategy.all_reduce_sum` in its
  ``global_meta_step`` and leaves the same whole-meta-batch gradient on every rank, which is
  then not averaged again.
* **Agreement.** Every rank then sees bitwise the same gradients and metrics, so non-finite-step
  decisions agree; stop requests (early stopping, time budget, signals) are OR-ed across ranks
  every iteration by :func:`any_rank`, so all ranks stop at the same iteration.
* **Validation / evaluation** split episodes across ranks and gather the per-episode results in
  order (:func:`gather_ordered`): the same numbers as one process, ``W`` times faster.
* **Rank 0 alone** shows progress bars, logs and writes checkpoints.  Resuming: every rank loads
  the same checkpoint; :meth:`TorchDistributed.sync_start` checks the ranks agree (a fingerprint
  of config, fit settings and iteration) and broadcasts rank 0's weights.
* **Failures.** A rank that dies makes torchrun stop the others at once; a rank that hangs makes
  the others fail after ``METAMTL_DIST_TIMEOUT`` seconds (default 600) with a
  :class:`~metamtl.errors.DistributedError`.  Checkpoints are written atomically, so the last one
  stays loadable; continue with ``--resume RUN_DIR/last.pt``.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from .checkpoint import config_diff
from .errors import DistributedError

#: Seconds a collective may wait for the other ranks before failing (``METAMTL_DIST_TIMEOUT``).
DEFAULT_TIMEOUT = 600.0
_HINT = (
    "Another process probably failed or stopped responding (see its log; torchrun names the "
    "failed rank). Every rank must run the same fit/evaluate calls. The last checkpoint written "
    "is intact: continue with --resume RUN_DIR/last.pt"
)


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a launch: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} must be an integer") from None


def launch_env() -> LaunchEnv:
    """This process's place in a torchrun launch, read from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Without those variables (a plain ``python`` run) this is rank 0 of 1.
    """
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None:
        return LaunchEnv()
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    if rank is None:
        raise DistributedError(
            f"WORLD_SIZE={world} is set but RANK is not; start the processes with torchrun "
            "(torchrun --nproc_per_node=N -m metamtl fit CONFIG), which sets both"
        )
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} must be in 0..WORLD_SIZE-1 = 0..{world - 1}")
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE")
    return LaunchEnv(rank, world, rank if local_rank is None else local_rank,
                     world if local_world is None else local_world)


def process_device(device: torch.device) -> torch.device:
    """Under a multi-process launch, an unindexed ``cuda`` device means ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None:
        env = launch_env()
        if env.distributed:
            return torch.device("cuda", env.local_rank)
    return device


def timeout_seconds(timeout: float | None = None) -> float:
    if timeout is None:
        raw = os.environ.get("METAMTL_DIST_TIMEOUT")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise DistributedError(f"METAMTL_DIST_TIMEOUT={raw!r} must be a number of seconds") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise DistributedError(f"the collective timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def init_distributed(
    device: str | torch.device = "cpu", backend: str | None = None, timeout: float | None = None
) -> LaunchEnv:
    """Start the default process group from torchrun's environment (no-op for one process).

    Called by :meth:`MetaLearner.fit <metamtl.MetaLearner.fit>`; call it yourself only to use
    ``torch.distributed`` before ``fit``.  Idempotent.

    Args:
        device: where training runs; a CUDA device selects NCCL and this rank's GPU
            (``cuda:LOCAL_RANK``), anything else gloo.
        backend: force a backend (``"gloo"``, ``"nccl"``).
        timeout: seconds a collective waits for the other ranks before failing
            (default ``$METAMTL_DIST_TIMEOUT`` or 600).
    """
    env = launch_env()
    if not env.distributed:
        return env
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run a single process")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise DistributedError(
                f"a process group is already initialized as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but torchrun says rank {env.rank} of {env.world_size}"
            )
        return env
    device = torch.device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise DistributedError(
                f"rank {env.rank} (LOCAL_RANK={env.local_rank}) needs GPU {env.local_rank} but only "
                f"{visible} GPU(s) are visible; start at most {visible} processes per node "
                "(torchrun --nproc_per_node) or train on CPU (train.device=cpu)"
            )
        torch.cuda.set_device(env.local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds(timeout)))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {env.rank}: could not start the {backend} process group ({exc}); check that "
            "every node reaches the rendezvous endpoint and uses the same --nnodes/--nproc_per_node"
        ) from exc
    atexit.register(cleanup)
    return env


def cleanup() -> None:
    """Destroy the default process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_tag() -> str:
    """``" (rank r/W)"`` under a multi-process launch, else ``""`` (for messages)."""
    try:
        env = launch_env()
    except DistributedError:
        return ""
    return f" (rank {env.rank}/{env.world_size})" if env.distributed else ""


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a :class:`DistributedError` saying what to do."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:  # DistBackendError, gloo/NCCL timeouts, closed connections
        rank, size = world()
        raise DistributedError(f"rank {rank}/{size}: {what} failed: {exc}. {_HINT}") from exc


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    out: list[Any] = [None] * world()[1]
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def any_rank(*flags: bool, what: str = "stop-flag all-reduce") -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks (e.g. "stop now"), so every rank takes the same decision."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_comm_device())
    with collective(what):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def barrier(what: str) -> None:
    """Wait until every rank of the running process group gets here (no-op without one), e.g. until
    rank 0 has written the files the others read next."""
    if world()[1] > 1:
        any_rank(False, what=what)


def gather_ordered(rows: Sequence[tuple[int, Any]], what: str = "evaluation gather") -> list[Any]:
    """Gather ``(index, value)`` pairs from all ranks; values sorted by index."""
    merged = [row for part in all_gather_objects(list(rows), what) for row in part]
    return [value for _, value in sorted(merged, key=lambda r: r[0])]


def all_reduce_sum(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Replace each tensor by its sum over ranks, in place (one flat all-reduce per device and dtype)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with collective(what):
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            offset = 0
            for t in group:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def reduce_meta_gradients(
    params: Sequence[torch.Tensor], metrics: dict[str, float], weight: float, *, iteration: int = 0
) -> dict[str, float]:
    """Average meta-gradients and metrics over ranks, weighting each rank by ``weight``.

    ``weight`` is the number of tasks behind this rank's ``.grad`` (its share of the
    meta-batch).  Afterwards every rank holds ``sum_r weight_r * grad_r / sum_r weight_r`` in
    ``.grad`` (parameters no rank produced a gradient for keep ``grad=None``), and the returned
    metrics are averaged the same way (a metric only some ranks report is averaged over those).
    """
    infos = all_gather_objects(
        {"weight": float(weight), "has_grad": [p.grad is not None for p in params], "metrics": metrics},
        f"meta-gradient exchange (iteration {iteration + 1})",
    )
    if len({len(i["has_grad"]) for i in infos}) != 1:
        raise DistributedError("ranks have different numbers of meta-parameters; every rank must build the same model")
    total = sum(i["weight"] for i in infos)
    if not total > 0:
        raise DistributedError(f"no rank had tasks in iteration {iteration + 1} (weights {[i['weight'] for i in infos]})")
    share = float(weight) / total
    grads = []
    for k, p in enumerate(params):
        if not any(i["has_grad"][k] for i in infos):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.mul_(share)
        grads.append(p.grad)
    all_reduce_sum(grads, f"meta-gradient all-reduce (iteration {iteration + 1})")
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for info in infos:
        for key, value in info["metrics"].items():
            sums[key] = sums.get(key, 0.0) + info["weight"] * value
            weights[key] = weights.get(key, 0.0) + info["weight"]
    return {key: sums[key] / weights[key] for key in sums}


class ProcessStrategy:
    """How this process takes part in a fit or an evaluation; this base class: alone.

    The learner hands it only tensors, metrics and fingerprints (plain data describing what a
    process is about to run), never itself.  :class:`TorchDistributed` is the torchrun version.
    """

    rank = 0
    world_size = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This process's share of ``n`` items (episodes): positions ``rank, rank + W, ...``."""
        return list(range(self.rank, n, self.world_size))

    def sync_start(self, fingerprint: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """Check every process starts the same fit, then give all of them process 0's ``tensors``."""

    def reduce_gradients(self, params: Sequence[torch.Tensor], metrics: dict[str, float], weight: float,
                         iteration: int = 0) -> dict[str, float]:
        """Average ``.grad`` of ``params`` and ``metrics`` over processes (``weight``: this one's tasks)."""
        return metrics

    def any_rank(self, *flags: bool, what: str = "stop-flag all-reduce") -> tuple[bool, ...]:
        """Each flag OR-ed over all processes, so every process takes the same decision."""
        return tuple(bool(f) for f in flags)

    def all_gather(self, obj: Any, what: str) -> list[Any]:
        """Every process's ``obj`` (plain data), in rank order."""
        return [obj]

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Replace each of ``tensors`` by its sum over processes, in place (every process gets the
        same values, bitwise)."""

    def gather_ordered(self, rows: Sequence[tuple[int, Any]], what: str = "evaluation gather") -> list[Any]:
        """``(index, value)`` rows of every process; the values sorted by index."""
        return [value for _, value in sorted(rows, key=lambda r: r[0])]

    def broadcast_object(self, obj: Any, what: str) -> Any:
        """Process 0's ``obj`` (plain data), on every process: a decision all of them take alike."""
        return obj

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Give every process process 0's values of ``tensors``, in place."""


class TorchDistributed(ProcessStrategy):
    """One of ``world_size`` processes of a ``torch.distributed`` process group (see the module docstring)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def sync_start(self, fingerprint: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        prints = all_gather_objects(fingerprint, "start-of-fit check")
        for r, other in enumerate(prints):
            diff = config_diff(prints[0], other)
            if diff:
                raise DistributedError(
                    f"rank {r} does not run the same fit as rank 0 (every rank needs the same config, "
                    "data, seeds and --resume checkpoint):\n  " + "\n  ".join(diff)
                )
        self.broadcast_tensors(tensors, "start-of-fit weight broadcast")

    def reduce_gradients(self, params, metrics, weight, iteration=0):
        return reduce_meta_gradients(params, metrics, weight, iteration=iteration)

    def any_rank(self, *flags, what="stop-flag all-reduce"):
        return any_rank(*flags, what=what)

    def all_gather(self, obj, what):
        return all_gather_objects(obj, what)

    def all_reduce_sum(self, tensors, what):
        all_reduce_sum(tensors, what)

    def gather_ordered(self, rows, what="evaluation gather"):
        return gather_ordered(rows, what)

    def broadcast_object(self, obj, what):
        box = [obj]
        with collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors, what):
        with collective(what):
            for tensor in tensors:
                dist.broadcast(tensor, src=0)


def process_strategy(device: str | torch.device = "cpu") -> ProcessStrategy:
    """Start the process group when launched by torchrun (:func:`init_distributed`) and return
    this process's strategy: :class:`TorchDistributed`, or :class:`ProcessStrategy` alone."""
    init_distributed(device)
    rank, size = world()
    return TorchDistributed(rank, size) if size > 1 else ProcessStrategy()
