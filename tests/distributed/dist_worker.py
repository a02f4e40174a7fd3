"""Training jobs for the distributed tests, run under torchrun (or in-process as one rank).

``python -m torch.distributed.run --standalone --nproc_per_node=2 dist_worker.py SPEC.json`` runs
every job of the spec on every rank and writes ``OUT/<job>.rank<r>.pt`` (weights, history,
per-episode validation/test accuracies; a job with a ``config`` runs ``experiment.run`` on it and
writes its results).  The tests call :func:`run_job` in-process for the
single-process reference.  Faults (``kill``, ``hang``, ``stop``, ``nan``, ``signals``: ``[rank, iteration]``)
are injected at the end of (or, for ``nan``, inside) the given 1-based iteration on that rank
(``stop`` gives the reason ``"fault"``); ``slow: [rank, seconds]`` sleeps at the end of every
iteration on that rank (rank-0-only work such as logging, before the other callbacks).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.callbacks import Callback, FitState, LRScheduler
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import DistributedError, FitInterrupted
from metamtl.models import build_model
from metamtl.tasks import EpisodeSampler, MixedTasks


def toy_dataset(classes: int = 40, per_class: int = 10, size: int = 12) -> ClassDataset:
    """Class ``c``: a fixed random binary pattern (bright pixels) plus per-image noise."""
    g = torch.Generator().manual_seed(0)
    patterns = (torch.rand(classes, 1, 1, size, size, generator=g) > 0.7).to(torch.int64)
    noise = torch.randint(0, 60, (classes, per_class, 1, size, size), generator=g)
    images = (patterns * 180 + noise).to(torch.uint8).flatten(0, 1)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name="toy",
                        preprocessing=Preprocessing(size=(size, size), channels=1, mean=(0.3,), std=(0.3,)))


def toy_source(seed: int = 0) -> MixedTasks:
    """Two datasets of other image shapes (grey 12x12 and rgb 12x12), mixed 1:1, 3-way 1-shot."""
    sources = []
    for name, channels in (("grey", 1), ("rgb", 3)):
        g = torch.Generator().manual_seed(channels)
        protos = torch.rand(12, channels, 12, 12, generator=g)
        noise = torch.rand(12 * 6, channels, 12, 12, generator=g)
        images = ((protos.repeat_interleave(6, 0) * 0.8 + 0.2 * noise) * 255).to(torch.uint8)
        prep = Preprocessing(size=(12, 12), channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
        ds = ClassDataset(images, torch.arange(12).repeat_interleave(6), [f"c{i}" for i in range(12)],
                          name=name, preprocessing=prep)
        sources.append(EpisodeSampler(ds, 3, 1, 2, seed=seed))
    return MixedTasks(sources, "equal", seed=seed)


def make_multitask_learner(job: dict[str, Any]) -> MetaLearner:
    """The multitask algorithm (``job["base"]``, default MAML, per dataset, ``job["strategy"]``) on
    dataset stems and a conv trunk."""
    torch.manual_seed(job.get("seed", 0))
    model = build_model("multidataset", inputs={"grey": [1, 12, 12], "rgb": [3, 12, 12]}, width=4, size=6,
                        hidden=4, blocks=2, out_features=None)
    base = job.get("base", {"name": "maml", "head_init": "zero", "steps": 1, "lr": 0.3})
    algorithm = build_algorithm("multitask", base=base, strategy=job["strategy"], datasets=["grey", "rgb"])
    return MetaLearner(model, algorithm, device="cpu", meta_optimizer="sgd", meta_lr=0.05)


def make_learner(job: dict[str, Any]) -> MetaLearner:
    if job["algorithm"] == "multitask":
        return make_multitask_learner(job)
    torch.manual_seed(job.get("seed", 0))
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=5)
    reptile = job["algorithm"] == "reptile"
    algorithm = build_algorithm(job["algorithm"], steps=2 if reptile else 1, lr=0.3)
    optimizer = job.get("meta_optimizer", "sgd")
    lr = 0.01 if optimizer == "adam" else 0.5 if reptile else 0.05
    return MetaLearner(model, algorithm, preprocessing=toy_dataset().preprocessing, device="cpu",
                       meta_optimizer=optimizer, meta_lr=lr)


class Faults(Callback):
    """Misbehave on one rank at one iteration, as the job's ``faults`` say."""

    def __init__(self, faults: dict[str, list[int]]) -> None:
        self.faults = faults

    def _due(self, state: FitState, kind: str) -> bool:
        f = self.faults.get(kind)
        return f is not None and state.rank == f[0] and state.iteration == f[1]

    def on_iteration_end(self, state, metrics):
        if self._due(state, "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due(state, "hang"):
            print(f"rank {state.rank}: hanging at iteration {state.iteration}", file=sys.stderr, flush=True)
            time.sleep(600)
        if self._due(state, "stop"):
            state.should_stop, state.stopped_by = True, "fault"
        if self._due(state, "signals"):  # a wrapped launcher's stop: SIGINT, then its own SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        slow = self.faults.get("slow")
        if slow is not None and state.rank == slow[0]:
            time.sleep(slow[1])


def poison_gradients(learner: MetaLearner, rank: int, iteration: int) -> None:
    """Make one rank's local meta-gradient NaN in the given (1-based) iteration."""
    meta_step = learner.algorithm.meta_step

    def poisoned(model, batch, it=0):
        metrics = meta_step(model, batch, it)
        if learner.rank == rank and learner.iteration + 1 == iteration:
            learner.meta_parameters()[0].grad.fill_(float("nan"))
        return metrics

    learner.algorithm.meta_step = poisoned


def run_experiment(job: dict[str, Any]) -> dict[str, Any]:
    """``experiment.run`` on the config ``job["config"]`` (what ``metamtl fit`` runs: stages,
    ``eval.checkpoint`` ...); ``slow_save: [rank, seconds]`` delays that rank's learner saves (a
    slow shared file system)."""
    from metamtl import experiment
    from metamtl.config import config_from_dict

    save, slow = MetaLearner.save, job.get("slow_save")
    if slow is not None and int(os.environ.get("RANK", "0")) == slow[0]:
        def slow_save(self, *args, **kwargs):
            time.sleep(slow[1])
            return save(self, *args, **kwargs)

        MetaLearner.save = slow_save
    try:
        results = experiment.run(config_from_dict(job["config"]), progress=False, quiet=True, overwrite=True)
    finally:
        MetaLearner.save = save
    return {"results": json.loads(json.dumps(results, default=str))}  # plain data (no TorchVersion)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    if "config" in job:
        return run_experiment(job)
    ds = toy_dataset()
    rank = int(os.environ.get("RANK", "0"))
    train = EpisodeSampler(ds.subset(range(30)), 5, 1, 3, seed=rank if job.get("seed_per_rank") else 0)
    val = EpisodeSampler(ds.subset(range(30, 40)), 5, 1, 3, seed=1 + rank if job.get("val_seed_per_rank") else 1)
    if job.get("no_val_on_rank") == rank:
        val = None
    if job["algorithm"] == "multitask":
        train, val = toy_source(0), toy_source(1)
    learner = make_learner(job)
    faults = job.get("faults", {})
    if "nan" in faults:
        poison_gradients(learner, *faults["nan"])
    callbacks = [Faults(faults)]
    if job.get("budget_minutes"):  # a cosine meta-lr annealed over the time budget
        callbacks.append(LRScheduler("cosine", over="budget"))
    try:
        learner.fit(
            train, val, iterations=job["iterations"], meta_batch_size=job["meta_batch_size"],
            val_every=job.get("val_every"), val_episodes=job.get("val_episodes", 5),
            checkpoint_dir=job.get("checkpoint_dir"), checkpoint_every=job.get("checkpoint_every", 100),
            resume=job.get("resume"), callbacks=callbacks, progress=False, budget_minutes=job.get("budget_minutes"),
        )
    except DistributedError as exc:
        if not job.get("expect_error"):
            raise
        return {"error": str(exc), "iteration": learner.iteration}
    except FitInterrupted as exc:
        if not job.get("expect_interrupt"):
            raise
        return {"error": str(exc), "iteration": learner.iteration, "checkpoint": str(exc.checkpoint)}
    test = learner.evaluate(val or train, job.get("test_episodes", 7), start=1000, progress=False)
    return {
        "params": {k: v.detach().clone() for k, v in learner.model.state_dict().items()},
        "algorithm_state": {k: v.detach().clone() for k, v in learner.algorithm.state_dict().items()},
        "iteration": learner.iteration,
        "world_size": learner.world_size,
        "stopped_by": learner.fit_state.stopped_by,
        "history": learner.history,
        "test_accuracy": test.per_episode_accuracy,
        "test_loss": test.per_episode_loss,
    }


def main(spec_path: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for job in spec["jobs"]:
        result = run_job(job)
        rank = int(os.environ.get("RANK", "0"))
        torch.save(result, out / f"{job['name']}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
