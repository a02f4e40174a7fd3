"""Accuracy against the number of inner steps at test time: computed by the run, read by reports.

:func:`accuracy_vs_steps` evaluates a learner through its public
:meth:`~metamtl.MetaLearner.evaluate` on held-out tasks with 0, 1, 2, ... inner steps on a few
fixed episodes: the first ones of the final test evaluation, so the point at its step count
equals that evaluation on those episodes.  :func:`write_steps_curve` saves it as
``<run_dir>/steps_curve.json`` (keyed by the learner file, episodes and step grid), which
:func:`metamtl.reporting.write_report` and ``write_comparison`` read.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from .evaluation import defined, within_superclass
from .files import atomic_write_json
from .progress_bars import progress_bar

STEPS_FILE = "steps_curve.json"


def default_steps(eval_steps: int) -> list[int]:
    """0 .. max(2 * eval_steps, eval_steps + 2), thinned to about 9 points for long inner loops."""
    top = max(2 * eval_steps, eval_steps + 2)
    stride = max(1, top // 8)
    return sorted({0, 1, 2, eval_steps, top, *range(0, top + 1, stride)})


def cache_key(learner_path: Path, episodes: int, steps: Sequence[int]) -> dict[str, Any]:
    """What a saved curve was computed from: the learner file (name, size, mtime), episodes, steps."""
    st = learner_path.stat()
    return {"learner": learner_path.name, "size": st.st_size, "mtime": st.st_mtime_ns,
            "episodes": episodes, "steps": list(steps)}


def curve_settings(test_rows: Sequence[Mapping[str, Any]], ways: int, shots: int) -> list[dict[str, Any]]:
    """The settings to draw curves for: the run's evaluated ones (each dataset, ways, shots and
    superclass ``hierarchy`` once; skipped ones, feature-head rows and rows of a hierarchy mapping,
    which a row records only by its size, left out), else ``ways``-way ``shots``-shot (the caller's
    fallback: a run's first test setting)."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in test_rows:
        hierarchy = r.get("hierarchy")
        if "skipped" not in r and r.get("head", "algorithm") == "algorithm" and not isinstance(hierarchy, str):
            seen.setdefault((r.get("dataset"), r.get("ways"), r.get("shots"), hierarchy), dict(r))
    return list(seen.values()) or [{"ways": ways, "shots": shots}]


def _setting(row: Mapping[str, Any], label: str | None, regression: bool) -> str:
    setting = f"{row.get('shots')}-shot regression" if regression else f"{row['ways']}-way {row['shots']}-shot"
    if not regression:
        setting += within_superclass(row.get("hierarchy"))
    return f"{label}: {setting}" if label else setting


def accuracy_vs_steps(learner: Any, sources: Mapping[str | None, Any], settings: Sequence[Mapping[str, Any]],
                      episodes: int, steps: Sequence[int], queries: int | None = None,
                      progress: bool = True) -> list[dict[str, Any]]:
    """One curve per setting: ``{"setting", "metric", "mean", "ci95"}`` over ``steps``.

    ``sources``: held-out task sources by dataset label (``None`` for a single dataset);
    ``settings``: rows with ``ways``/``shots`` (and ``dataset``; ``hierarchy``: episodes drawn within
    one superclass, as the test evaluation of that row drew them), e.g. the run's test results.
    Classification curves are accuracies, regression curves mean squared errors; the queries are
    always classified by the algorithm's own adaptation (feature heads have no inner steps).
    """
    regression = learner.task == "regression"
    curves = []
    bar = progress_bar(progress and learner.is_main_process, total=len(settings) * len(steps),
                       desc=f"{'MSE' if regression else 'accuracy'} vs inner steps", leave=False, dynamic_ncols=True)
    with bar:
        for row in settings:
            label = row.get("dataset")
            source = sources[label] if label in sources else next(iter(sources.values()))
            kwargs = {} if regression else {"ways": row["ways"], "shots": row["shots"], "queries": queries,
                                            "head": "algorithm"}
            if not regression and row.get("hierarchy") is not None:  # drawn as the row's test episodes were:
                change = {k: v for k, v in kwargs.items() if k != "head" and v is not None}
                source = source.with_settings(**change, hierarchy=row["hierarchy"])  # in one change: fewer
                kwargs = {"head": "algorithm"}  # ways may fit a superclass the source's ways do not
            if regression and row.get("shots") and hasattr(source, "with_settings"):  # the row's shots
                source = source.with_settings(shots=row["shots"], **({"queries": queries} if queries else {}))
            results = []
            for s in steps:
                results.append(learner.evaluate(source, episodes, steps=int(s), progress=False, **kwargs))
                bar.update(1)
            curves.append({"setting": _setting(row, label, regression), "metric": "loss" if regression else "accuracy",
                           "mean": [r.loss if regression else r.accuracy for r in results],
                           "ci95": [defined(r.loss_ci95 if regression else r.ci95) for r in results]})
    return curves


def write_steps_curve(run_dir: str | os.PathLike, learner: Any, sources: Mapping[str | None, Any], split: str,
                      settings: Sequence[Mapping[str, Any]], *, episodes: int = 100, steps: Sequence[int] | None = None,
                      queries: int | None = None, progress: bool = True, write: bool = True,
                      eval_steps: int | None = None) -> dict[str, Any]:
    """Compute the curves of the learner saved as ``run_dir/learner.pt`` and save ``steps_curve.json``.

    ``eval_steps``: the inner steps the run's test evaluation used (``eval.steps``; default the
    algorithm's ``eval_steps``): the default grid spans it, so the curve has the evaluated point.

    Returns ``{"key", "split", "episodes", "steps", "trained_steps", "eval_steps", "curves"}``.
    Under torchrun every rank calls it (the evaluations are shared); ``write`` on rank 0 only.
    """
    run_dir = Path(run_dir)
    eval_steps = learner.algorithm.eval_steps if eval_steps is None else int(eval_steps)
    steps = sorted({int(s) for s in steps}) if steps else default_steps(eval_steps)
    if not learner.algorithm.has_inner_loop:  # e.g. ProtoNet: every result takes 0 steps
        steps = [0]
    curves = accuracy_vs_steps(learner, sources, settings, episodes, steps, queries, progress)
    out = {"key": cache_key(run_dir / "learner.pt", episodes, steps), "split": split, "episodes": episodes,
           "steps": steps, "trained_steps": learner.algorithm.inner.steps, "eval_steps": eval_steps, "curves": curves}
    if write:
        atomic_write_json(run_dir / STEPS_FILE, out, indent=1)
    return out


def write_failure(run_dir: str | os.PathLike, exc: BaseException) -> None:
    """Record why the curve could not be computed (the report shows it instead of the plot).

    A valid curve already saved (e.g. the run's own, when ``metamtl report --steps ...`` cannot
    reach the data) is never replaced: it is kept with the failure under ``refresh_error``, and
    a warning says so; the report shows that curve and why it could not be recomputed."""
    path = Path(run_dir) / STEPS_FILE
    error = f"{type(exc).__name__}: {exc}"
    saved, _ = _load(path)
    if saved is None or "error" in saved:
        atomic_write_json(path, {"error": error})
        return
    warnings.warn(f"{path}: the curve could not be computed again ({error}); the one saved before is kept",
                  RuntimeWarning, stacklevel=2)
    atomic_write_json(path, {**saved, "refresh_error": error}, indent=1)


def clear_refresh_error(run_dir: str | os.PathLike) -> None:
    """Drop the ``refresh_error`` of a saved curve (:func:`write_failure`) once that curve is the
    one asked for: nothing needs computing again, so the report no longer says it failed."""
    path = Path(run_dir) / STEPS_FILE
    saved, _ = _load(path) if path.is_file() else (None, None)
    if saved is not None and "refresh_error" in saved:
        atomic_write_json(path, {k: v for k, v in saved.items() if k != "refresh_error"}, indent=1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_problem(data: Any) -> str | None:
    """What makes ``data`` not a steps curve as :func:`write_steps_curve` writes it (or an error
    record ``{"error": "..."}``); ``None`` when it is one.  NaN values are allowed (drawn as missing)."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    if "error" in data:
        return None if isinstance(data["error"], str) else "its 'error' is not a text"
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps or not all(_is_number(s) for s in steps):
        return "'steps' is missing or not a non-empty list of numbers"
    for key, kind in (("split", str), ("episodes", int), ("trained_steps", int), ("curves", list)):
        if not isinstance(data.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    for i, c in enumerate(data["curves"]):
        if not isinstance(c, dict) or not isinstance(c.get("setting"), str) or c.get("metric") not in ("accuracy", "loss"):
            return f"curve {i} is not an object with a 'setting' text and a 'metric' (accuracy or loss)"
        for key in ("mean", "ci95"):  # a CI of one episode is null
            ok = [_is_number(v) or (key == "ci95" and v is None) for v in c.get(key) or []]
            if not isinstance(c.get(key), list) or len(c[key]) != len(steps) or not all(ok):
                return f"curve {i}'s {key!r} is not a list of {len(steps)} numbers (one per step count)"
    return None


def _load(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(the saved curve or error record, None)``, or ``(None, what is wrong with the file)``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"is not readable ({exc})"
    problem = shape_problem(data)
    return (data, None) if problem is None else (None, f"is malformed: {problem}")


def read_steps_curve(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved curve (or ``{"error": ...}``), ``None`` if the run has none.

    A file that cannot be read, is not JSON or not shaped like a curve gives a warning naming it and
    what is wrong, and ``{"error": ...}`` saying so (a report shows that instead of the plot)."""
    path = Path(run_dir) / STEPS_FILE
    if not path.is_file():
        return None
    data, what = _load(path)
    if data is not None:
        return data
    warnings.warn(f"{path} {what}; the report goes on without its curve (`metamtl report RUN_DIR` recomputes it)",
                  RuntimeWarning, stacklevel=2)
    return {"error": f"{path.name} {what}"}
