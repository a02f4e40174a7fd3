"""Accuracy against the number of inner steps at test time, for a saved run.

The saved learner (``learner.pt``) is evaluated on the run's held-out tasks (test split, else
validation) with 0, 1, 2, ... inner steps on a modest number of fixed episodes.  Results are
cached in ``<run_dir>/steps_curve.json`` (keyed by the learner file, episodes and step grid) so
rebuilding a report is instant.  Each episode is adapted once with the largest step count and
scored after every step (see :func:`episode_curve`); the episodes are the first ones of the final
test evaluation, so the point at its step count matches it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..adaptation import task_loss
from ..algorithms import accuracy
from ..learner import mean_ci95


def default_steps(eval_steps: int) -> list[int]:
    """0 .. max(2 * eval_steps, eval_steps + 2), thinned to about 9 points for long inner loops."""
    top = max(2 * eval_steps, eval_steps + 2)
    stride = max(1, top // 8)
    return sorted({0, 1, 2, eval_steps, top, *range(0, top + 1, stride)})


def _cache_key(learner_path: Path, episodes: int, steps: Sequence[int]) -> dict[str, Any]:
    st = learner_path.stat()
    return {"learner": learner_path.name, "size": st.st_size, "mtime": st.st_mtime_ns,
            "episodes": episodes, "steps": list(steps)}


def _held_out_sources(cfg: Any) -> tuple[dict[str | None, Any], str]:
    """Task sources of the run's held-out classes by dataset label (``None`` for one dataset) and
    the split's name; the training split is not loaded."""
    from ..experiment import build_tasks, is_regression, load_split
    from ..tasks.sampler import EpisodeSampler

    if is_regression(cfg):
        return {None: build_tasks(cfg)["test"]}, "test"
    t = cfg.tasks
    sources: dict[str | None, Any] = {}
    split = "test"
    for d in cfg.datasets or [cfg.data]:
        split, seed = (d.test_split, t.test_seed) if d.test_split else (d.val_split, t.val_seed)
        if split is None:
            raise ValueError(f"dataset {d.name!r} has neither a test nor a validation split")
        label = (d.label or d.name) if cfg.datasets else None
        sources[label] = EpisodeSampler(load_split(cfg, split, data=d), t.ways, t.shots, cfg.eval.queries,
                                        seed=seed, name=label)
    return sources, split


def episode_curve(learner: Any, episode: Any, steps: Sequence[int]) -> list[float]:
    """Query accuracy (loss for regression) of one episode after each number of inner steps.

    One adaptation with ``max(steps)`` steps; the query is then scored with the weights after
    each step count (``Adapted(x, updates=k)``), exactly as ``evaluate_episode`` would score an
    adaptation of ``k`` steps.
    """
    alg, model = learner.algorithm, learner.model
    ep = learner.placement.batch(episode)
    key = "loss" if learner.task == "regression" else "accuracy"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), learner.autocast():
            adapted = alg.adapt(model, ep.support_x, ep.support_y, ep.ways, max(steps))
            out = []
            for s in steps:  # (head-only adaptation runs the trunk on the queries once)
                logits = adapted(ep.query_x, updates=s)
                out.append(float(task_loss(logits, ep.query_y)) if key == "loss"
                           else accuracy(logits, ep.query_y))
            return out
    finally:
        model.train(was_training)


def steps_curve(
    run_dir: str | os.PathLike,
    results: Mapping[str, Any],
    episodes: int = 100,
    steps: Sequence[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the run's learner with each inner-step count; returns (and caches) the curves.

    Returns ``{"split", "episodes", "steps", "trained_steps", "curves": [{"setting", "metric",
    "mean", "ci95"}]}``.  Raises on missing data/checkpoint (the report shows why it skipped).
    """
    from ..algorithms import build_algorithm
    from ..config import config_from_dict
    from ..learner import MetaLearner

    run_dir = Path(run_dir)
    learner_path = run_dir / "learner.pt"
    if not learner_path.is_file():
        raise FileNotFoundError(f"no {learner_path.name} in {run_dir}")
    cfg = config_from_dict(results["config"])
    inner = build_algorithm(**cfg.algorithm).inner
    trained = inner.steps
    eval_steps = inner.steps if inner.eval_steps is None else inner.eval_steps
    steps = sorted({int(s) for s in steps}) if steps else default_steps(eval_steps)
    cache = run_dir / "steps_curve.json"
    key = _cache_key(learner_path, episodes, steps)
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        except (OSError, ValueError):
            pass

    learner = MetaLearner.load(learner_path, device=device)
    sources, split = _held_out_sources(cfg)
    rows = [r for r in results.get("test", []) if "skipped" not in r] or \
        [{"ways": cfg.tasks.ways, "shots": cfg.tasks.shots}]
    regression = learner.task == "regression"
    from tqdm.auto import tqdm

    curves = []
    for r in rows:
        ways, shots, label = r.get("ways"), r.get("shots"), r.get("dataset")
        tasks = sources[label] if label in sources else next(iter(sources.values()))
        source = tasks if regression else tasks.with_settings(ways=ways, shots=shots, queries=cfg.eval.queries)
        setting = f"{shots}-shot regression" if regression else f"{ways}-way {shots}-shot"
        setting = f"{label}: {setting}" if label else setting
        per_step: list[list[float]] = [[] for _ in steps]
        for i in tqdm(range(episodes), desc=f"accuracy vs inner steps ({setting})", leave=False,
                      disable=not progress, dynamic_ncols=True):
            for k, value in enumerate(episode_curve(learner, source.episode(i), steps)):
                per_step[k].append(value)
        stats = [mean_ci95(v) for v in per_step]
        curves.append({"setting": setting, "metric": "loss" if regression else "accuracy",
                       "mean": [m for m, _ in stats], "ci95": [c for _, c in stats]})
    out = {"key": key, "split": split, "episodes": episodes, "steps": steps, "trained_steps": trained,
           "eval_steps": eval_steps, "curves": curves}
    cache.write_text(json.dumps(out, indent=1))
    return out
