"""Train an ensemble from one config: ``ensemble: {members: 2}`` in a ``metamtl fit`` config.

The members are the config's learner with other seeds, each trained in its own process with a
share of the CPU (``ensemble.threads`` torch threads; by default this process's cores split
evenly), all at the same time, so the run takes the wall time of one training.  On 2 cores this
trade paid on Omniglot and mini-ImageNet (benchmarks/RESULTS.md, "Ensembles at equal CPU"): one
torch thread per process uses a core better on small batches than two threads in one process,
and averaging two models' probabilities gained more than the halved iterations lost.

Layout of the run folder ``<output_dir>/<name>/``::

    ensemble.pt          every member (metamtl.ensemble.Ensemble.load, metamtl evaluate)
    results.json         the ensemble's held-out rows ("test"), each member's ("ensemble.members")
    report.html          the report, with one line per member
    members/memberI.yaml the config member I trained with (a plain metamtl fit config)
    members/memberI.log  its output
    members/memberI/     its run folder (learner.pt, results.json, its own report, ...)

A member is an ordinary run: resume or rerun one with ``metamtl fit members/memberI.yaml``, and
evaluate any set of members with ``metamtl evaluate A.pt B.pt``.  This module starts and watches
the member processes; :func:`metamtl.experiment.run_ensemble` (what ``metamtl.experiment.run``
calls for such a config) evaluates, saves and reports their ensemble.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict, with_member_seed
from .errors import FitInterrupted, MetamtlError
from .interrupt import StopOnSignal, signal_name
from .progress_bars import progress_bar


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def member_threads(cfg: Config) -> int:
    """Torch threads of each member: ``ensemble.threads``, else the cores split evenly (at least 1)."""
    return cfg.ensemble.threads or max(1, available_cores() // cfg.ensemble.members)


def member_configs(cfg: Config) -> list[tuple[str, Config]]:
    """``(name, config)`` of every member: the config with its own seed (and ``tasks.seed``, a stage's own too, moved
    by as much), written to ``<run_dir>/members/<name>/``, without an ensemble of its own."""
    seeds = cfg.ensemble.seeds or [cfg.seed + i for i in range(cfg.ensemble.members)]
    out = []
    for i, seed in enumerate(seeds):
        data = cfg.to_dict()
        data.update(name=f"member{i}", output_dir=str(cfg.run_dir / "members"), ensemble={"members": 1})
        data["logging"]["tags"] = [*cfg.logging.tags, f"ensemble:{cfg.name}"]  # W&B: the members of one run
        out.append((f"member{i}", config_from_dict(with_member_seed(data, seed))))
    return out


def train_members(cfg: Config, members: list[tuple[str, Config]], progress: bool, overwrite: bool,
                  say: Any = print) -> None:
    """Run ``metamtl fit`` on every member's config at once, one process each, and wait for all.

    The members run in their own process groups, so a Ctrl-C reaches them once, through this
    process: SIGINT / SIGTERM is passed on to every member (as SIGTERM), and each saves a
    resumable ``last.pt`` as a single ``metamtl fit`` would, and :class:`~metamtl.errors.FitInterrupted` says how to
    resume them; a second signal stops them at once."""
    from . import yaml_io

    folder = cfg.run_dir / "members"
    folder.mkdir(parents=True, exist_ok=True)
    threads = member_threads(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cores = available_cores()
    shared = (f" (more threads than the {cores} cores this process may use: the members share them, each "
              "training slower)") if threads * len(members) > cores else ""
    say(f"[metamtl] ensemble: training {len(members)} members side by side, {threads} torch thread(s) each{shared}; "
        f"their output: {folder}/member*.log")
    procs: list[tuple[str, subprocess.Popen]] = []
    with StopOnSignal() as stop:
        try:
            for name, mcfg in members:
                path = folder / f"{name}.yaml"
                path.write_text(yaml_io.dump(json.loads(json.dumps(mcfg.to_dict())), sort_keys=False))
                cmd = [sys.executable, "-m", "metamtl", "fit", str(path), "--no-progress"] + (["--overwrite"] if overwrite else [])
                with open(folder / f"{name}.log", "wb") as log:
                    procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                         start_new_session=True)))
            _wait(procs, folder, progress, stop)
        except MetamtlError:  # a member failed: the others stop as on SIGTERM, saving last.pt
            _stop(procs, signal.SIGTERM, wait=600)
            raise
        except BaseException:  # a second signal, or an error here: at once
            _stop(procs, signal.SIGKILL, wait=0)
            raise
    if stop.requested:
        raise FitInterrupted(f"{signal_name(stop.signum)}: the ensemble's members stopped, each that had started "
                             f"training saving a resumable checkpoint; resume one with metamtl fit {folder}/memberI.yaml --resume "
                             f"{folder}/memberI/last.pt, then metamtl evaluate their learner.pt files together",
                             stop.signum, 0)


def _wait(procs: list[tuple[str, subprocess.Popen]], folder: Path, progress: bool, stop: StopOnSignal) -> None:
    """Wait for every member; the first that fails stops the others and raises with its log's end.
    On a stop request every member gets SIGTERM and time to checkpoint."""
    bar = progress_bar(progress, total=len(procs), desc="ensemble members trained", dynamic_ncols=True)
    done: set[str] = set()
    try:
        while len(done) < len(procs):
            if stop.requested:  # SIGTERM to the members (a background job may ignore SIGINT)
                _stop(procs, signal.SIGTERM, wait=600)
                return
            time.sleep(1.0)
            for name, proc in procs:
                if name in done or proc.poll() is None:
                    continue
                if proc.returncode != 0:
                    tail = (folder / f"{name}.log").read_bytes()[-3000:].decode(errors="replace")
                    raise MetamtlError(f"ensemble member {name} failed (exit code {proc.returncode}); the other "
                                       f"members are stopped (saving a resumable last.pt). The end of {folder / (name + '.log')}:\n{tail}")
                done.add(name)
                bar.update(1)
            bar.set_postfix({name: _iteration(folder / name) for name, _ in procs}, refresh=True)
    finally:
        bar.close()


def _iteration(run_dir: Path) -> str:
    """The last meta-iteration a member's metrics file shows (its current stage's), for the bar."""
    files = [p for p in run_dir.rglob("metrics.*") if p.suffix in (".csv", ".jsonl")] if run_dir.is_dir() else []
    if not files:
        return "-"
    path = max(files, key=lambda p: p.stat().st_mtime)
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 400))
        lines = fh.read().decode(errors="replace").strip().splitlines()
    line = lines[-1] if lines else ""
    if path.suffix == ".jsonl":
        try:
            return str(json.loads(line).get("iteration", "-"))
        except ValueError:
            return "-"
    head = line.split(",", 1)[0]
    return head if head.isdigit() else "-"


def _stop(procs: list[tuple[str, subprocess.Popen]], signum: int, wait: float) -> None:
    """Send ``signum`` to the members still running and wait up to ``wait`` seconds for them to
    exit (a member checkpoints on SIGINT / SIGTERM), then kill what is left."""
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + wait
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
