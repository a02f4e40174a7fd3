"""Accuracy against the number of inner steps at test time, for a saved run.

The saved learner (``learner.pt``) is evaluated on the run's held-out tasks (test split, else
validation) with 0, 1, 2, ... inner steps on a modest number of fixed episodes.  Results are
cached in ``<run_dir>/steps_curve.json`` (keyed by the learner file, episodes and step grid) so
rebuilding a report is instant; the point at the step count of the final test evaluation reuses
that evaluation's first episodes (same episodes, same model).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def _held_out_tasks(cfg: Any):
    """(task source, split name) of the run's held-out classes, built without the train split."""
    from ..experiment import build_tasks, is_regression, load_split
    from ..tasks.sampler import EpisodeSampler

    if is_regression(cfg):
        return build_tasks(cfg)["test"], "test"
    d, t = cfg.data, cfg.tasks
    split, seed = (d.test_split, t.test_seed) if d.test_split else (d.val_split, t.val_seed)
    if split is None:
        raise ValueError("the config has neither a test nor a validation split")
    return EpisodeSampler(load_split(cfg, split), t.ways, t.shots, cfg.eval.queries, seed=seed), split


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
    tasks, split = _held_out_tasks(cfg)
    settings = [(r.get("ways"), r.get("shots"), r) for r in results.get("test", [])] or \
        [(cfg.tasks.ways, cfg.tasks.shots, None)]
    regression = learner.task == "regression"
    from tqdm.auto import tqdm

    bar = tqdm(total=len(settings) * len(steps), desc="accuracy vs inner steps", leave=False,
               disable=not progress, dynamic_ncols=True)
    curves = []
    for ways, shots, final in settings:
        means, cis = [], []
        for s in steps:
            per_episode = None
            if final is not None and final.get("steps") == s:
                per_episode = (final.get("per_episode_loss") if regression else final.get("per_episode_accuracy")) or []
                per_episode = per_episode[:episodes] if len(per_episode) >= episodes else None
            if per_episode is None:
                kw = {} if regression else {"ways": ways, "shots": shots, "queries": cfg.eval.queries}
                r = learner.evaluate(tasks, episodes, steps=s, progress=False, **kw)
                per_episode = r.per_episode_loss if regression else r.per_episode_accuracy
            m, ci = mean_ci95(per_episode)
            means.append(m)
            cis.append(ci)
            bar.update(1)
        curves.append({"setting": f"{shots}-shot regression" if regression else f"{ways}-way {shots}-shot",
                       "metric": "loss" if regression else "accuracy", "mean": means, "ci95": cis})
    bar.close()
    out = {"key": key, "split": split, "episodes": episodes, "steps": steps, "trained_steps": trained,
           "eval_steps": eval_steps, "curves": curves}
    cache.write_text(json.dumps(out, indent=1))
    return out
