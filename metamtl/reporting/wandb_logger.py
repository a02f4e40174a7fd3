"""Weights & Biases logging as a callback.

``wandb`` is imported lazily, inside the callback, so it is only needed when logging is on.
Logging never stops training: if W&B fails at any point (not installed, no network, bad key,
disk full, ...) the logger warns once, switches itself off for the rest of the run, and the
local history, checkpoints and HTML report carry on as if it had never been there.

What is logged (at ``step = state.iteration``):

* ``wandb.init`` config: the full resolved experiment config, the learner's model/algorithm/
  optimizer settings and system info (platform, Python, torch, CPU/GPU, commit);
* every iteration: ``train/loss``, ``train/accuracy``, ``train/inner_loss/step_k`` (support loss
  before inner step k), ``train/grad_norm``, the meta-optimizer learning rate ``train/lr`` (``lr/meta/group_i`` for
  each of several parameter groups) and
  every algorithm parameter whose name contains ``lr`` (learned inner learning rates of
  Meta-SGD / MAML++ style algorithms): ``lr/<name>`` for scalars, ``lr/<name>/<i>`` for small
  tensors (MAML++: one per inner step), ``/mean``, ``/min``, ``/max`` for large ones (Meta-SGD);
* every validation: ``val/loss``, ``val/accuracy`` and their 95% confidence intervals;
* after the test evaluation (:meth:`WandbLogger.on_results`, called by
  :func:`metamtl.experiment.run`): a table ``test/episodes`` with one row per test episode,
  summary metrics ``test/<N>w<K>s/accuracy`` and ``.../accuracy_ci95``, and the final
  checkpoint as a ``model`` artifact.

Mode: ``mode=None`` uses ``$WANDB_MODE`` if set, else ``"online"`` when an API key is configured
(``$WANDB_API_KEY`` or a ``.netrc`` entry for the W&B host) and ``"offline"`` otherwise; offline
runs are written under ``<run_dir>/wandb/`` and can be uploaded later with ``wandb sync``.  A fit
resumed from a checkpoint continues the checkpoint's W&B run (``id``, ``resume="allow"``), offline
too: one folder per part under one run id (a ``wandb`` that cannot resume offline: a new run, with a warning).
"""
from __future__ import annotations

import atexit
import functools
import math
import netrc
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..callbacks import Callback, FitState
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..learner import MetaLearner

MODES = ("online", "offline", "disabled")


def has_api_key() -> bool:
    """Whether W&B credentials are configured ($WANDB_API_KEY or a .netrc entry for the host); a
    .netrc that cannot be read or parsed (missing, not UTF-8, malformed) holds none: never raises."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except Exception:  # noqa: BLE001 - OSError, NetrcParseError, UnicodeDecodeError...: W&B must not stop a run
        return False


def resolve_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``$WANDB_MODE``, else online with an API key and offline without.

    A ``mode`` argument W&B does not know is a :class:`ConfigError`; an unknown ``$WANDB_MODE``
    (the environment, not this run's settings) warns and turns W&B off: it must not stop training.
    """
    if mode is None and os.environ.get("WANDB_MODE"):
        env = os.environ["WANDB_MODE"]
        if (env if env != "dryrun" else "offline") not in MODES:
            warnings.warn(f"WANDB_MODE={env!r} is not a W&B mode ({', '.join(MODES)}): W&B logging is off for this "
                          "run. Training, checkpoints, history.json and the HTML report are unaffected.",
                          RuntimeWarning, stacklevel=3)
            return "disabled"
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in MODES:
        raise ConfigError(f"unknown W&B mode {mode!r}; use one of {', '.join(MODES)} (or leave it unset)")
    return mode


def learned_rates(module: Any, small: int = 16) -> dict[str, float]:
    """Scalars describing every parameter whose name contains ``lr`` (learned learning rates):
    the value itself, each element of tensors up to ``small`` elements (``lr/<name>/<i>``), or the
    mean/min/max of larger ones."""
    out: dict[str, float] = {}
    named = getattr(module, "named_parameters", None)
    for name, p in (named() if named else ()):
        if "lr" not in name.lower():
            continue
        v = p.detach().float().flatten()
        if v.numel() == 1:
            out[f"lr/{name}"] = float(v)
        elif v.numel() <= small:  # e.g. MAML++: one rate per inner step
            out.update({f"lr/{name}/{i}": float(x) for i, x in enumerate(v.tolist())})
        elif v.numel() > small:  # e.g. Meta-SGD: one rate per weight
            out.update({f"lr/{name}/mean": float(v.mean()), f"lr/{name}/min": float(v.min()),
                        f"lr/{name}/max": float(v.max())})
    return out


def _finite(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _setting(r: Mapping[str, Any], n: int = 1) -> str:
    """``5w1s`` (``<dataset>/5w1s`` in multi-dataset runs; ``5shot`` for regression), with
    ``-within`` for episodes drawn within one superclass (depth 1; ``-within2`` at depth 2,
    ``-withinmap`` for a hierarchy mapping, ``-withinmap<n>`` for the ``n``-th mapping of one setting)
    and ``/<head>`` for a head other than the algorithm's own (``5w1s/simpleshot``)."""
    setting = f"{r['ways']}w{r['shots']}s" if r.get("accuracy") is not None else f"{r['shots']}shot"
    hierarchy = r.get("hierarchy")
    if hierarchy is not None:
        setting += "-within" + ("map" if not isinstance(hierarchy, int) else "" if hierarchy == 1 else str(hierarchy))
    if n > 1:  # rows carry a mapping's size only ("mapping of 964 classes"): two mappings look alike
        setting += str(n) if hierarchy is not None and not isinstance(hierarchy, int) else f"-{n}"
    if r.get("head") not in (None, "algorithm"):
        setting += f"/{r['head']}"
    return f"{r['dataset']}/{setting}" if r.get("dataset") else setting


def _settings(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """:func:`_setting` of each row, a label already taken numbered by its order (two hierarchy mappings
    of one setting: ``-withinmap``, ``-withinmap2``), so the rows of one run never share a key."""
    labels, seen = [], {}
    for r in rows:
        label = _setting(r)
        seen[label] = n = seen.get(label, 0) + 1
        labels.append(label if n == 1 else _setting(r, n))
    return labels


def _tags(tags: Iterable[str] | None) -> list[str]:
    """``tags`` as a list of strings; one string (which ``list`` would split into letters) or a value
    that is not text is a :class:`ConfigError`, as in a config's ``logging.tags``."""
    if isinstance(tags, (str, bytes)):
        raise ConfigError(f"WandbLogger tags must be a list of strings, got the string {tags!r}: write "
                          f"tags=[{tags!r}] for one tag")
    try:
        out = list(tags or [])
    except TypeError:
        raise ConfigError(f"WandbLogger tags must be a list of strings, got {tags!r}") from None
    bad = [t for t in out if not isinstance(t, str)]
    if bad:
        raise ConfigError(f"WandbLogger tags must be strings, got {bad[0]!r} in {out!r}: write {str(bad[0])!r}")
    return out


class WandbLogger(Callback):
    """Log a :meth:`~metamtl.MetaLearner.fit` run to Weights & Biases.

    Args:
        project, entity, tags, name: passed to ``wandb.init`` (``name`` defaults to the config's).
        mode: ``"online"``, ``"offline"``, ``"disabled"`` or ``None`` (see the module docstring).
        config: the experiment config to record (``metamtl.experiment.run`` passes the resolved one).
        run_dir: folder for W&B's files (``<run_dir>/wandb/``); default: W&B's own (``./wandb``).
        log_every: log training metrics every this many iterations.
        log_model: upload the final checkpoint as a ``model`` artifact in :meth:`on_results`.
        settings: extra ``wandb.Settings`` fields (e.g. ``{"console": "off"}``); ``init_timeout``
            defaults to 30 s, so an unreachable server delays training by at most that much.

    With :func:`metamtl.experiment.run` everything is automatic.  With ``MetaLearner.fit`` directly,
    call :meth:`log_results` and :meth:`finish` after your evaluation (or just :meth:`finish`);
    an unfinished run is finished when the interpreter exits.
    """

    def __init__(
        self,
        project: str = "metamtl",
        entity: str | None = None,
        mode: str | None = None,
        tags: Iterable[str] = (),
        config: Mapping[str, Any] | None = None,
        run_dir: str | os.PathLike | None = None,
        name: str | None = None,
        log_every: int = 1,
        log_model: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ConfigError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.project = project
        self.entity = entity
        self.tags = _tags(tags)
        self.config = dict(config or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.name = name or self.config.get("name")
        self.log_every = log_every
        self.log_model = log_model
        self.settings = {"init_timeout": 30.0, **dict(settings or {})}
        self.run: Any = None
        self.failed = False
        self._resume_id: str | None = None  # the W&B run a resumed fit continues (online)
        self._run_id: str | None = None  # this run's W&B id, kept for checkpoints after finish()
        self._atexit = False

    #: a reused logger's next learner (a sweep) starts a new W&B run, not the last learner's
    resets_by_loading = True

    # -- failure handling -------------------------------------------------------------------
    def _safe(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one W&B call; on any failure warn once and switch W&B off for this run."""
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except (Exception, SystemExit) as exc:  # W&B must never stop training
            if not self.failed:  # nested calls: warn about the first failure only
                self.failed = True
                hint = " (install it with `pip install wandb`)" if isinstance(exc, ImportError) else ""
                warnings.warn(
                    f"W&B {what} failed ({type(exc).__name__}: {exc}){hint}; W&B logging is off for the rest "
                    "of this run. Training, checkpoints, history.json and the HTML report are unaffected.",
                    RuntimeWarning, stacklevel=3,
                )
                run, self.run = self.run, None
                if run is not None:
                    try:
                        run.finish(exit_code=1)
                    except (Exception, SystemExit):
                        pass
            return None

    @property
    def active(self) -> bool:
        return self.run is not None and not self.failed

    # -- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, state: FitState) -> None:
        if self.run is None and not self.failed and state.is_main_process:
            self._safe("init", self._init, state.learner)

    def _init(self, learner: "MetaLearner | None", job_type: str = "meta-train") -> None:
        import wandb

        from ..environment import git_commit, machine_info

        config = dict(self.config or (learner.metadata.get("config") if learner is not None else None) or {})
        if learner is not None:
            config["learner"] = learner.config()
        config["system"] = {**machine_info(), "commit": git_commit()}
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        init = functools.partial(
            wandb.init, project=self.project, entity=self.entity, mode=self.mode, tags=self.tags, name=self.name,
            config=config, dir=str(self.run_dir) if self.run_dir is not None else None,
            job_type=job_type, settings=wandb.Settings(reinit="create_new", **self.settings))
        if not self._resume_id or self.mode == "disabled":
            self.run = init()
        elif self.mode == "online":
            self.run = init(id=self._resume_id, resume="allow")
        else:  # offline: a folder per part under one run id; `wandb sync` of them all uploads one run
            try:
                self.run = init(id=self._resume_id, resume="allow")
            except Exception as exc:  # noqa: BLE001 - a wandb that cannot resume offline: a new run, said
                warnings.warn(f"W&B offline: this wandb ({getattr(wandb, '__version__', '?')}) cannot continue run "
                              f"{self._resume_id} offline ({type(exc).__name__}: {exc}); the resumed part logs to a new "
                              f"W&B run, the part before it stays in run {self._resume_id}", RuntimeWarning, stacklevel=4)
                self.run = init()
        self._run_id, self._resume_id = getattr(self.run, "id", None) or None, None
        if not self._atexit:
            atexit.register(self.finish)
            self._atexit = True

    def on_iteration_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if not self.active or state.iteration % self.log_every:
            return
        learner = state.learner
        row = {f"train/{k}": v for k, v in metrics.items()}
        groups = learner.meta_optimizer.param_groups
        if len(groups) > 1:  # one group's rate is train/lr already (the fit loop's metrics)
            row.update({f"lr/meta/group_{i}": g["lr"] for i, g in enumerate(groups)})
        row.update(learned_rates(learner.algorithm))
        self._safe("log", self.run.log, _finite(row), step=learner.iteration)

    def on_validation_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if self.active:
            self._safe("log", self.run.log, _finite(metrics), step=state.iteration)

    def on_fit_end(self, state: FitState) -> None:
        if self.active:
            summary = {"fit/iterations": state.iteration, "fit/seconds": state.elapsed,
                       "fit/stopped_by": state.stopped_by or "iterations",
                       "fit/peak_memory_mb": state.learner.run.peak_memory_mb}
            self._safe("summary", self.run.summary.update, summary)

    def on_exception(self, state: FitState, exc: BaseException) -> None:
        self.finish(exit_code=1)

    def on_results(self, state: FitState, results: Mapping[str, Any]) -> None:
        """Called by :func:`metamtl.experiment.run` after the test evaluation: log and finish."""
        self.log_results(results.get("test", []), checkpoint=results.get("checkpoint"))
        self.finish()

    def log_evaluation(self, results: Mapping[str, Any]) -> None:
        """Log a run that evaluated without training in this process (an ensemble of members
        trained in their own processes, ``ensemble:`` configs): a W&B run of job type
        ``evaluate`` with the held-out rows, each member's own loss (a regression member's mean
        squared error) and accuracy in the summary (``members/<name>/test/<setting>/loss``,
        ``.../accuracy``) and the checkpoint; then finish it."""
        if self.run is None and not self.failed:
            self._safe("init", self._init, None, "evaluate")
        self.log_results(results.get("test", []), checkpoint=results.get("checkpoint"))
        summary = {f"members/{m.get('name')}/test/{label}/{key}": r[key]
                   for m in (results.get("ensemble") or {}).get("members", [])
                   for rows in [[r for r in m.get("test") or [] if "skipped" not in r]]
                   for r, label in zip(rows, _settings(rows))
                   for key in ("accuracy", "loss") if r.get(key) is not None}
        summary = _finite(summary)  # a one-episode setting has no CI (nan): left out, not logged as 0
        if summary and self.active:
            self._safe("summary", self.run.summary.update, summary)
        self.finish()

    # -- results ------------------------------------------------------------------------------
    def log_results(self, test: Iterable[Any], checkpoint: str | os.PathLike | None = None) -> None:
        """Per-episode table, summary metrics with CI and (optionally) the checkpoint artifact.

        ``test``: :class:`~metamtl.EvalResult` objects or their ``to_dict()``.
        """
        if self.active:
            self._safe("results", self._log_results, test, checkpoint)

    def _log_results(self, test: Iterable[Any], checkpoint: str | os.PathLike | None) -> None:
        rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in test]
        rows = [r for r in rows if "skipped" not in r]  # settings a dataset could not serve
        self._safe("table", self._log_table, rows)
        summary: dict[str, Any] = {}
        for r, label in zip(rows, _settings(rows)):
            key = f"test/{label}"
            if r.get("accuracy") is not None:
                summary.update({f"{key}/accuracy": r["accuracy"], f"{key}/accuracy_ci95": r["ci95"]})
            summary.update({f"{key}/loss": r["loss"], f"{key}/loss_ci95": r["loss_ci95"],
                            f"{key}/episodes": r["episodes"], f"{key}/steps": r["steps"]})
        summary = _finite(summary)  # a one-episode setting has no CI (nan): left out, not logged as 0
        if summary and self.active:
            self._safe("summary", self.run.summary.update, summary)
        if checkpoint is not None and self.log_model and self.active and Path(checkpoint).is_file():
            self._safe("artifact", self._log_artifact, Path(checkpoint), summary)

    def _log_table(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        import wandb

        table = wandb.Table(columns=["setting", "episode", "accuracy", "loss"])
        for r, label in zip(rows, _settings(rows)):
            accs = r.get("per_episode_accuracy") or [None] * len(r.get("per_episode_loss", []))
            for i, (acc, loss) in enumerate(zip(accs, r.get("per_episode_loss", []))):
                table.add_data(label, i, acc, loss)
        self.run.log({"test/episodes": table})

    def _log_artifact(self, path: Path, metadata: dict[str, Any]) -> None:
        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.name or self.run.name or 'metamtl'}-model")
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=["latest", "final"])

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run (idempotent; failures only warn)."""
        if self.run is not None and not self.failed:
            run = self.run
            self._safe("finish", run.finish, exit_code=exit_code)
        self.run = None

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The W&B run id (also once the run is finished: a ``TrainingError`` finishes it before
        ``last.pt`` is rewritten); none after a W&B failure."""
        return {"run_id": self._run_id} if self._run_id and not self.failed else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_id = self._run_id = state.get("run_id")
