"""Experiment configuration: YAML files in configs/ are data, validated here.

A config has fixed sections (``data``, ``tasks``, ``model``, ``algorithm``, ``train``, ``eval``,
``logging``).  Multi-dataset runs list their datasets under ``datasets`` (each entry has the keys
of ``data`` plus a ``label``) instead of ``data``; ``tasks.mixture``/``tasks.temperature`` say how
often each one serves an episode.  Typed sections reject unknown keys (suggesting the closest one) and values of the
wrong type; ``model`` and ``algorithm`` are passed to their registries, which validate them
against the chosen model/algorithm.  Command-line overrides are ``dotted.key=value`` with the
value parsed as YAML (``train.iterations=500``, ``data.sources=[small1]``).  A file can build on
another with ``extends: base.yaml`` (see :func:`load_config`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import yaml_io
from .config_merge import STAGE_KEYS, stage_dict
from .config_merge import merge as _merge
from .errors import ConfigError, decode_text, did_you_mean


@dataclasses.dataclass
class DataConfig:
    """Which dataset, where it is, and how it is split/augmented.

    ``label`` names the dataset in logs, results and multi-dataset sampling (default: ``name``).
    """

    name: str = "omniglot"
    label: str | None = None
    root: str | None = None
    download: bool = False
    cache_dir: str | bool | None = None  # decode-cache folder; null/true/'': the default, false: none
    sources: list[str] | None = None
    image_size: int | None = None
    split_fractions: list[float] | None = None
    split_seed: int | None = None
    split_by: str | None = None  # Omniglot: "character" (default) or "alphabet" (held-out alphabets)
    train_rotations: list[int] | None = None
    #: augmentation of training episodes (:func:`metamtl.data.augment.build_augment`; null: none):
    #: ``{padding: 8, flip: true}`` (crop/flip, natural images; ``{}``: those defaults),
    #: ``{name: affine, rotation: 10, shear: 0.3, scale: [0.8, 1.2], shift: 2, p: 0.5}``
    #: (characters), or a list of such mappings applied in order
    train_augment: dict | list | None = None
    #: folder / csv datasets: follow symlinks whose target lies outside the dataset folder
    follow_outside_links: bool = False
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"


@dataclasses.dataclass
class TasksConfig:
    """Episode shape and sampling seeds (train, validation and test use different seeds)."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    seed: int = 0
    val_seed: int = 1
    test_seed: int = 2
    num_workers: int = 0
    mixture: str | list[float] = "equal"
    temperature: float = 1.0
    #: training and validation episodes within one superclass (EpisodeSampler hierarchy): a class
    #: name path depth (1: Omniglot alphabets) or a mapping {class name: superclass}; null: none
    hierarchy: int | dict | None = None


@dataclasses.dataclass
class SchedulerConfig:
    """Meta-learning-rate schedule (:class:`metamtl.callbacks.LRScheduler`)."""

    name: str = "cosine"
    warmup: int = 0
    min_lr: float = 0.0
    total: int | None = None
    step_size: int = 1000
    gamma: float = 0.1
    patience: int = 3
    monitor: str | None = None  # val/accuracy (max) for classification, val/loss (min) for regression
    mode: str | None = None  # default: min for a loss, else max
    over: str = "iterations"  # or "budget": cosine over train.budget_minutes


@dataclasses.dataclass
class EarlyStoppingConfig:
    """Stop when validation stops improving (:class:`metamtl.callbacks.EarlyStopping`)."""

    monitor: str | None = None  # val/accuracy (max) for classification, val/loss (min) for regression
    mode: str | None = None  # default: min for a loss, else max
    patience: int = 5
    min_delta: float = 0.0


@dataclasses.dataclass
class TrainConfig:
    """Outer loop settings (``scheduler`` / ``early_stopping``: callbacks, off when null)."""

    iterations: int = 1000
    meta_batch_size: int = 32
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    meta_optimizer_kwargs: dict | None = None  # other settings of the torch optimizer, e.g. {weight_decay: 0.05}
    grad_clip: float | None = None
    val_every: int | None = None
    val_episodes: int = 100
    budget_minutes: float | None = None
    checkpoint_every: int = 100
    device: str = "auto"
    precision: str = "fp32"  # "bf16": bfloat16 autocast; "auto": bf16 where native (MetaLearner precision)
    channels_last: bool | None = None  # NHWC weights and images; null: timed on CPU (MetaLearner channels_last)
    max_bad_steps: int = 10
    scheduler: SchedulerConfig | None = None
    early_stopping: EarlyStoppingConfig | None = None


@dataclasses.dataclass
class EvalSetting:
    """One evaluated setting; ``hierarchy`` draws its episodes within one superclass
    (e.g. ``{ways: 20, shots: 1, hierarchy: 1}``: Omniglot within-alphabet 20-way)."""

    ways: int = 5
    shots: int = 1
    hierarchy: int | dict | None = None


@dataclasses.dataclass
class EvalConfig:
    """Final evaluation on the test split: one row per setting."""

    episodes: int = 600
    queries: int = 15
    steps: int | None = None
    settings: list[EvalSetting] = dataclasses.field(default_factory=lambda: [EvalSetting()])
    checkpoint: str = "last"  # "last": final weights; "best": best validation accuracy (best.pt)
    #: test-time support augmentation (MetaLearner support_augment), e.g.
    #: ``{copies: 5, augment: {name: affine}}``; saved with the learner (null: none)
    support_augment: dict | None = None
    #: what classifies the queries, one results row per head and setting (metamtl.heads):
    #: "algorithm" (its own adaptation), "simpleshot", "logreg", or transductive "bdcspn",
    #: "laplacianshot", "softkmeans", "sinkhorn" (names or {name: ..., settings}); the first is
    #: the saved learner's default for evaluate/predict
    heads: list[str | dict] = dataclasses.field(default_factory=lambda: ["algorithm"])


@dataclasses.dataclass
class LoggingConfig:
    """Experiment reporting."""

    wandb: bool = False
    project: str = "metamtl"
    entity: str | None = None
    mode: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    report: bool = True
    metrics: str | None = "csv"  # metrics.csv / metrics.jsonl in the run folder (null: none)
    report_steps_episodes: int = 100     # test episodes per point of the accuracy-vs-inner-steps plot (0: off)
    report_steps: list[int] | None = None  # inner-step counts of that plot (default 0 .. max(2x, +2) eval steps)


@dataclasses.dataclass
class EnsembleConfig:
    """Train several learners of this config side by side and answer with their averaged class
    probabilities (:class:`metamtl.ensemble.Ensemble`); see :mod:`metamtl.ensemble_fit`."""

    members: int = 1  # 1: one learner, no ensemble
    #: torch threads of each member's process (null: this process's CPU cores split evenly)
    threads: int | None = None
    #: member i's ``seed`` (null: the config's seed + i); its ``tasks.seed`` (and a stage's own) moves by as much (modulo 2**63)
    seeds: list[int] | None = None


@dataclasses.dataclass
class Config:
    """A whole experiment."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    datasets: list[DataConfig] = dataclasses.field(default_factory=list)
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    model: dict = dataclasses.field(default_factory=lambda: {"name": "conv4"})
    algorithm: dict = dataclasses.field(default_factory=lambda: {"name": "maml"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    #: knowledge distillation during meta-training (see metamtl.distill.from_config); empty: none
    distill: dict = dataclasses.field(default_factory=dict)
    #: a saved learner whose trunk weights initialise the model before training (null: none)
    init_from: str | None = None
    #: several trainings in a row, each from the previous one's trunk (e.g. Meta-Baseline:
    #: classifier pre-training, then episodic meta-training); each entry has a ``name`` and the
    #: sections it changes (algorithm, tasks, train, data, model, distill), merged over this
    #: config's; see :func:`stage_configs`.  Empty: one training.
    stages: list[dict] = dataclasses.field(default_factory=list)
    #: several learners of this config trained side by side, their probabilities averaged
    #: (``members: 1``, the default: one learner)
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name  # output_dir: ~/runs is under $HOME

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- validation ---------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = " (in a YAML file, quote text that reads as a number or boolean: '2024', 'no')" \
                if isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{where}: expected a string, got {value!r}{hint}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {k!r}.{did_you_mean(k, fields)} Valid keys: {', '.join(fields)}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _at_least(where: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value}")


def _check_config(cfg: Config, evaluated: bool = True) -> Config:
    """Validate ``cfg``; ``evaluated=False`` for a stage before the last, which is never evaluated
    (its ``eval`` section is the config's, for the last stage)."""
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError(f"name {cfg.name!r} must be a plain folder name (the run goes to output_dir/name)")
    _check_tasks(cfg)
    _check_numbers(cfg)
    _check_data(cfg)
    if cfg.eval.checkpoint not in ("last", "best"):
        raise ConfigError(f"eval.checkpoint must be 'last' or 'best' (best validation accuracy), got {cfg.eval.checkpoint!r}")
    _check_eval(cfg.eval, is_regression(cfg))
    for s in cfg.eval.settings:
        if s.ways < 1 or s.shots < 1:
            raise ConfigError(f"eval.settings entries need ways >= 1 and shots >= 1, got {s}")
    if is_regression(cfg):
        _check_regression(cfg)
    lg = cfg.logging
    if lg.report_steps_episodes < 0 or any(s < 0 for s in lg.report_steps or ()):
        raise ConfigError("logging.report_steps_episodes and logging.report_steps entries must be >= 0")
    if "name" not in cfg.model or "name" not in cfg.algorithm:
        raise ConfigError("model and algorithm sections need a 'name'")
    _check_components(cfg)
    if cfg.distill:
        from .distill.hooks import check_config as check_distill

        check_distill(cfg.distill)
    if cfg.stages:
        stage_configs(cfg)  # every stage is a valid config
    _check_ensemble(cfg.ensemble)
    from .reporting.wandb_logger import MODES as WANDB_MODES

    if cfg.logging.mode is not None and cfg.logging.mode not in (*WANDB_MODES, "dryrun"):
        raise ConfigError(f"logging.mode must be one of {', '.join(WANDB_MODES)} or null (online with a W&B API "
                          f"key, offline without), got {cfg.logging.mode!r}")
    if cfg.logging.metrics not in (None, "csv", "jsonl"):
        raise ConfigError(f"logging.metrics must be 'csv', 'jsonl' or null, got {cfg.logging.metrics!r}")
    if not cfg.stages:  # a staged config's sections are defaults: each stage's merged config is checked above
        _check_train_callbacks(cfg, evaluated)
        _check_heads(cfg, evaluated)
    return cfg


def _check_heads(cfg: Config, evaluated: bool) -> None:
    """A learned (fixed-size) head has ``tasks.ways`` outputs and is evaluated with those ways."""
    from .algorithms import build_algorithm

    head_init = build_algorithm(**_algorithm_settings(cfg)).inner.head_init  # protonet / transfer: per-task heads
    out = cfg.model.get("out_features")
    if head_init == "learned" and isinstance(out, int) and out != cfg.tasks.ways:
        raise ConfigError(
            f"model.out_features is {out} but tasks.ways is {cfg.tasks.ways}, and algorithm.head_init is "
            "'learned' (a fixed-size head); drop model.out_features or make them equal"
        )
    if evaluated and head_init == "learned" and not is_regression(cfg) \
            and any(s.ways != cfg.tasks.ways for s in cfg.eval.settings):
        raise ConfigError(
            "eval.settings use a different number of ways than tasks.ways, but algorithm.head_init is "
            "'learned' (a fixed-size head); set algorithm.head_init to 'zero' or 'proto' to evaluate other ways"
        )


def _check_regression(cfg: Config) -> None:
    """What a regression run (data.name: sinusoid) cannot use: other ways than 1, a hierarchy, support
    augmentation, soft-target distillation, a class-based algorithm."""
    where = "regression tasks (data.name: sinusoid) have ways 1 and no classes for a hierarchy"
    read = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DataConfig)
            if f.name not in ("name", "label", "val_split", "test_split", "train_augment")}
    unused = {k: v for k, v in read.items() if getattr(DataConfig, k) != v}
    if unused:
        key = next(iter(unused))
        raise ConfigError(f"data.{key} is {unused[key]!r}, but the sinusoid tasks are generated, not read from files "
                          "or images, so it would be ignored: remove it"
                          + (" (metamtl evaluate: leave out --data-root)" if key == "root" else ""))
    if cfg.tasks.ways != 1:
        raise ConfigError(f"tasks.ways: regression tasks (data.name: sinusoid) have ways 1, got {cfg.tasks.ways}; "
                          "set tasks.ways: 1 or leave it out")
    if cfg.tasks.hierarchy is not None:
        raise ConfigError(f"tasks.hierarchy: {where}, got {cfg.tasks.hierarchy!r}; set tasks.hierarchy: null")
    if cfg.distill:
        from .distill.hooks import check_config as check_distill

        if check_distill(cfg.distill)["weight"] > 0:
            raise ConfigError("distill.weight: soft targets distil class probabilities; a regression run (data.name: "
                              "sinusoid) has no classes, so the term would always be 0: set distill.weight: 0 and "
                              "distil features (distill.features)")
    if cfg.eval.support_augment is not None:
        raise ConfigError("eval.support_augment makes augmented copies of support images; a regression run "
                          "(data.name: sinusoid) has none: set it to null")
    from .algorithms import ALGORITHMS

    name = cfg.algorithm.get("name")  # (an unknown or malformed name is refused with the components)
    algorithm = ALGORITHMS.get(name) if isinstance(name, str) else None
    if algorithm is not None and algorithm.trains_over_classes(cfg.algorithm):
        raise ConfigError(f"algorithm {cfg.algorithm['name']!r} trains over the training classes (it takes "
                          "num_classes from the data); regression tasks (data.name: sinusoid) have no classes: "
                          "use a gradient-based algorithm such as 'maml'")
    for i, s in enumerate(cfg.eval.settings):
        if s.ways != 1 or s.hierarchy is not None:
            got = f"{s.ways} ways" + (f", hierarchy {s.hierarchy!r}" if s.hierarchy is not None else "")
            raise ConfigError(f"eval.settings[{i}]: {where}, got {got}; give {{ways: 1, shots: N}} (without "
                              "eval.settings a regression run is evaluated with tasks.shots)")


def _check_ensemble(ens: EnsembleConfig) -> None:
    _at_least("ensemble.members", ens.members, 1)
    _at_least("ensemble.threads", ens.threads, 1)
    if ens.seeds is not None:
        if len(ens.seeds) != ens.members:
            raise ConfigError(f"ensemble.seeds has {len(ens.seeds)} entries for {ens.members} members "
                              "(one seed per member, or null for seed, seed + 1, ...)")
        if len(set(ens.seeds)) != len(ens.seeds):
            raise ConfigError(f"ensemble.seeds must differ (equal seeds train the same member twice), got {ens.seeds}")
        for seed in ens.seeds:
            if not 0 <= seed < 2**63:
                raise ConfigError(f"ensemble.seeds entries must be integers in 0..2**63-1, got {seed}")


def _check_tasks(cfg: Config) -> None:
    t = cfg.tasks
    for name, minimum in (("ways", 1), ("shots", 1), ("queries", 1), ("num_workers", 0)):
        _at_least(f"tasks.{name}", getattr(t, name), minimum)
    if not t.temperature > 0:
        raise ConfigError(f"tasks.temperature must be > 0, got {t.temperature}")
    if isinstance(t.mixture, str) and t.mixture not in ("equal", "size"):
        raise ConfigError(f"tasks.mixture must be 'equal', 'size' or a list of weights, got {t.mixture!r}")
    if cfg.datasets and t.hierarchy is not None:
        raise ConfigError("tasks.hierarchy applies to a single dataset (data:); multi-dataset configs cannot use it")
    if cfg.datasets:
        labels = [d.label or d.name for d in cfg.datasets]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"datasets need distinct labels (set 'label' on repeated names), got {labels}")
        for i, label in enumerate(labels):
            if "." in str(label):  # labels name the multi-dataset model's per-dataset modules
                raise ConfigError(f"datasets[{i}].label {label!r} must not contain '.' (it names the model's "
                                  f"per-dataset stem, trunk and head); use e.g. {str(label).replace('.', '_')!r}")
        if isinstance(t.mixture, list) and len(t.mixture) != len(labels):
            raise ConfigError(f"tasks.mixture has {len(t.mixture)} weights for {len(labels)} datasets")


def _check_numbers(cfg: Config) -> None:
    """Counts, rates and seeds of the train, eval and data sections."""
    tr, t = cfg.train, cfg.tasks
    for name, minimum in (("iterations", 0), ("meta_batch_size", 1), ("val_episodes", 1), ("val_every", 1),
                          ("checkpoint_every", 0), ("max_bad_steps", 1)):
        _at_least(f"train.{name}", getattr(tr, name), minimum)
    for name in ("meta_lr", "grad_clip", "budget_minutes"):
        v = getattr(tr, name)
        if v is not None and not v > 0:
            raise ConfigError(f"train.{name} must be > 0, got {v}")
    _at_least("eval.episodes", cfg.eval.episodes, 1)
    _at_least("eval.queries", cfg.eval.queries, 1)
    _at_least("eval.steps", cfg.eval.steps, 0)
    for where, data in _data_entries(cfg):
        _at_least(f"{where}.image_size", data.image_size, 1)
    seeds = [("seed", cfg.seed), ("tasks.seed", t.seed), ("tasks.val_seed", t.val_seed), ("tasks.test_seed", t.test_seed)]
    for where, seed in seeds + [(f"{where}.split_seed", d.split_seed) for where, d in _data_entries(cfg)]:
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigError(f"{where} must be an integer in 0..2**63-1, got {seed}")


def _check_data(cfg: Config) -> None:
    """Training augmentation of every dataset entry; held-out splits differ from the training one."""
    from .data.augment import build_augment

    for where, data in _data_entries(cfg):
        if data.train_augment is not None:
            try:
                build_augment(data.train_augment)
            except ConfigError as exc:
                raise ConfigError(f"{where}.train_augment: {exc}") from None
        trained = set(str(data.train_split).split("+"))
        for other in ("val_split", "test_split"):
            held_out = getattr(data, other)
            held = set(str(held_out).split("+"))
            if held_out is not None and (held & trained or "all" in held | trained):  # 'all' holds every split
                raise ConfigError(
                    f"{where}.{other} ({held_out!r}) shares classes with {where}.train_split ({data.train_split!r}): "
                    f"evaluation classes must be held out from training; choose another split or set {where}.{other}: null"
                )


def _data_entries(cfg: Config) -> list[tuple[str, DataConfig]]:
    """``(where, section)`` for every dataset a config trains on: ``datasets[i]`` entries, else ``data``."""
    if cfg.datasets:
        return [(f"datasets[{i}]", d) for i, d in enumerate(cfg.datasets)]
    return [("data", cfg.data)]


def _check_train_callbacks(cfg: Config, evaluated: bool = True) -> None:
    """The scheduler and early-stopping sections, validated now rather than mid-run; ``eval.checkpoint:
    best`` needs validation where the config is evaluated (not in a stage before the last, which hands
    its last weights on)."""
    tr = cfg.train
    if tr.scheduler and tr.scheduler.over == "budget" and not tr.budget_minutes:
        raise ConfigError("train.scheduler.over: 'budget' needs train.budget_minutes (or train.scheduler.over: iterations "
                          "to anneal over train.iterations)")
    if (tr.early_stopping or (tr.scheduler and tr.scheduler.name == "plateau")) \
            and not any(d.val_split for _, d in _data_entries(cfg)):
        where = "datasets[i].val_split of at least one dataset" if cfg.datasets else "data.val_split"
        raise ConfigError(f"train.early_stopping and the 'plateau' scheduler need validation; set {where}")
    if evaluated and cfg.eval.checkpoint == "best" and not any(d.val_split for _, d in _data_entries(cfg)):
        where = "datasets[i].val_split of at least one dataset" if cfg.datasets else "data.val_split"
        raise ConfigError(f"eval.checkpoint: 'best' evaluates the best-validation weights, and this run has no "
                          f"validation; set {where}, or eval.checkpoint: last")
    _check_test_not_selected_on(cfg, evaluated)
    from .callbacks import EarlyStopping, LRScheduler, resolve_monitor

    task = "regression" if is_regression(cfg) else "classification"
    for key, cls in (("scheduler", LRScheduler), ("early_stopping", EarlyStopping)):
        section = getattr(tr, key)
        try:
            if section is not None:
                cls(**dataclasses.asdict(section))
                if key == "early_stopping" or section.name == "plateau":  # by a metric validation reports
                    who = "early stopping" if key == "early_stopping" else "the plateau scheduler"
                    resolve_monitor(section.monitor, section.mode, task, who)
        except ConfigError as exc:
            raise ConfigError(f"train.{key}: {exc}") from None


def _check_test_not_selected_on(cfg: Config, evaluated: bool = True) -> None:
    """A dataset's ``test_split`` sharing classes with its ``val_split`` (split names compared after
    splitting on ``+``) while validation selects the weights (``eval.checkpoint: best`` where the
    config is evaluated, early stopping, the plateau scheduler): its held-out test numbers would be of
    the classes the weights were chosen on."""
    tr = cfg.train
    selectors = [name for name, on in (("eval.checkpoint: best", evaluated and cfg.eval.checkpoint == "best"),
                                       ("train.early_stopping", tr.early_stopping is not None),
                                       ("the 'plateau' train.scheduler", tr.scheduler and tr.scheduler.name == "plateau"))
                 if on]
    for where, data in _data_entries(cfg) if selectors else ():
        if data.val_split and data.test_split \
                and set(str(data.test_split).split("+")) & set(str(data.val_split).split("+")):
            raise ConfigError(
                f"{where}.test_split ({data.test_split!r}) shares classes with {where}.val_split ({data.val_split!r}), "
                f"and {' and '.join(selectors)} select{'s' * (len(selectors) == 1)} on validation: the held-out "
                f"test numbers would be of the classes the weights were chosen on; set eval.checkpoint: last "
                f"(without train.early_stopping or a 'plateau' scheduler), or {where}.val_split: null together "
                f"with eval.checkpoint: last (no validation), or another {where}.test_split")


def is_regression(cfg: Config) -> bool:
    return cfg.data.name == "sinusoid"


def _check_eval(ev: EvalConfig, regression: bool = False) -> None:
    """Test-time support augmentation and heads of the ``eval`` section."""
    from .heads import build_head
    from .inputs import as_support_augment

    if ev.support_augment is not None:
        try:
            as_support_augment(ev.support_augment)
        except ConfigError as exc:
            raise ConfigError(f"eval.support_augment: {exc}") from None
    if not ev.heads:
        raise ConfigError("eval.heads must list at least one head (e.g. [algorithm])")
    for i, spec in enumerate(ev.heads):
        try:
            head = build_head(spec)
        except ConfigError as exc:
            raise ConfigError(f"eval.heads[{i}]: {exc}") from None
        if regression and head is not None:
            raise ConfigError(f"eval.heads[{i}]: feature head {head.name!r} classifies; a regression run "
                              "(data.name: sinusoid) is evaluated by its algorithm: eval.heads: [algorithm]")




def stage_configs(cfg: Config) -> list[tuple[str, Config]]:
    """``(name, config)`` of every entry of ``cfg.stages``: the config's sections with the stage's
    merged over them (an ``algorithm`` naming another algorithm replaces the section), validated.

    The stages' name, seed and output folder are the config's; :func:`metamtl.experiment.run`
    trains them in order, each from the previous stage's trunk.  A stage's ``distill: {}`` (or
    ``null``) turns the config's distillation off for that stage.
    """
    base = cfg.to_dict()
    base["stages"] = []
    out, names = [], set()
    for i, stage in enumerate(cfg.stages):
        stage = dict(stage)
        name = stage.pop("name", None)
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"stages[{i}] needs a 'name' (a plain folder name), got {name!r}")
        if name in names:
            raise ConfigError(f"stages[{i}]: stage name {name!r} is used twice")
        names.add(name)
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"stages[{i}] ({name}): unknown key {unknown[0]!r}.{did_you_mean(unknown[0], STAGE_KEYS)} "
                              f"A stage may set: name, {', '.join(STAGE_KEYS)}.")
        if _merge(base, stage).get("datasets"):
            _check_no_data_section(stage.get("data"), f"stages[{i}] ({name}): ")
        try:
            out.append((name, config_from_dict(stage_dict(base, stage), evaluated=i == len(cfg.stages) - 1)))
        except ConfigError as exc:
            raise ConfigError(f"stages[{i}] ({name}): {exc}") from None
    return out


def _algorithm_settings(cfg: Config) -> dict[str, Any]:
    """``cfg.algorithm``, plus the dataset labels for algorithms that declare they take them
    (:attr:`Algorithm.from_data <metamtl.algorithms.Algorithm.from_data>`, as the experiment does)."""
    from .algorithms import with_data_settings

    return with_data_settings(cfg.algorithm, {"datasets": lambda: [d.label or d.name for d in cfg.datasets] or None})


def _check_components(cfg: Config) -> None:
    """Validate the model, algorithm, meta-optimizer and device settings without loading data."""
    import torch

    from .algorithms import build_algorithm
    from .data.registry import DATASETS
    from .tasks.families import TASK_FAMILIES
    from .errors import unknown_name
    from .fit_loop import META_OPTIMIZERS, build_meta_optimizer
    from .models.registry import check_model_config

    for where, d in [("data", cfg.data)] + [(f"datasets[{i}]", d) for i, d in enumerate(cfg.datasets)]:
        if d.name not in {**DATASETS, **TASK_FAMILIES}:
            raise ConfigError(f"config.{where}.name: {unknown_name('dataset', d.name, {**DATASETS, **TASK_FAMILIES})}")
    model = dict(cfg.model)
    try:
        check_model_config(model.pop("name"), model)
        build_algorithm(**_algorithm_settings(cfg))
    except ConfigError as exc:
        raise ConfigError(f"config: {exc}") from None
    if cfg.train.meta_optimizer not in META_OPTIMIZERS:
        raise ConfigError(f"config.train.meta_optimizer: unknown meta optimizer {cfg.train.meta_optimizer!r}."
                          f"{did_you_mean(cfg.train.meta_optimizer, META_OPTIMIZERS)} Valid: {', '.join(META_OPTIMIZERS)}.")
    kwargs = cfg.train.meta_optimizer_kwargs
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"config.train.meta_optimizer_kwargs must be a mapping of settings of the "
                              f"{cfg.train.meta_optimizer} optimizer (e.g. {{weight_decay: 0.05}}), got {kwargs!r}")
        if "lr" in kwargs:
            raise ConfigError("config.train.meta_optimizer_kwargs: set the learning rate with train.meta_lr, not lr")
        try:
            build_meta_optimizer(cfg.train.meta_optimizer, [torch.nn.Parameter(torch.zeros(1))], cfg.train.meta_lr, dict(kwargs))
        except ConfigError as exc:
            why = str(exc).split(": ", 1)[-1]
            raise ConfigError(f"config.train.meta_optimizer_kwargs {dict(kwargs)} do not fit the "
                              f"{cfg.train.meta_optimizer!r} meta optimizer: {why}") from None
    if cfg.train.device != "auto":
        try:
            torch.device(cfg.train.device)
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"config.train.device: unknown device {cfg.train.device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None


def config_from_dict(data: Mapping[str, Any], *, evaluated: bool = True) -> Config:
    """Validate a nested mapping into a :class:`Config` (``evaluated=False``: a stage before the last,
    whose learner is not evaluated with ``eval.settings``)."""
    if isinstance(data, Mapping) and "distill" in data and data["distill"] is None:
        data = {**data, "distill": {}}  # distill: null is no distillation, as in a stage
    cfg = from_dict(Config, data, "config")
    if is_regression(cfg) and "ways" not in (data.get("tasks") or {}):  # not 5-way: regression tasks have 1
        cfg.tasks.ways = 1
    if is_regression(cfg) and "settings" not in (data.get("eval") or {}):  # not 5-way 1-shot: the training shots
        cfg.eval.settings = [EvalSetting(ways=1, shots=cfg.tasks.shots)]
    elif is_regression(cfg):  # an entry without ways: 1 (regression tasks have 1), as tasks.ways
        given = (data.get("eval") or {}).get("settings")
        for setting, entry in zip(cfg.eval.settings, given if isinstance(given, list) else []):
            if isinstance(entry, Mapping) and "ways" not in entry:
                setting.ways = 1
    return _single_member_seed(_check_config(cfg, evaluated), evaluated)


def _single_member_seed(cfg: Config, evaluated: bool = True) -> Config:
    """``ensemble: {members: 1, seeds: [s]}``: the one learner trains with seed ``s`` (and its
    ``tasks.seed`` moved by as much), as each member of a larger ensemble gets its entry of ``seeds``."""
    ens = cfg.ensemble
    if ens.members == 1 and ens.seeds:
        data = cfg.to_dict()
        data["ensemble"]["seeds"] = None
        return config_from_dict(with_member_seed(data, ens.seeds[0]), evaluated=evaluated)
    return cfg


def with_member_seed(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """A config's dict (``Config.to_dict()``, changed in place) trained with ``seed`` instead of its
    own: its ``tasks.seed``, and each stage's own ``tasks.seed``, move by as much, modulo 2**63 (so a
    seed below the config's still gives a valid task seed), as an ensemble member's do."""
    shift = seed - data["seed"]
    data["seed"] = seed
    for section in [data, *(data.get("stages") or [])]:
        tasks = section.get("tasks")
        if isinstance(tasks, dict) and isinstance(tasks.get("seed"), int):
            tasks["seed"] = (tasks["seed"] + shift) % 2**63
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml_io.load(raw) if raw != "" else None
        tp = _setting_type(key.split("."))
        if _optional_of(tp) is str and raw.strip() and not (isinstance(value, str) and raw.strip()[0] in "'\""):
            # name=2024, name=no, name=2024-06-01, name=run #2: the text as typed (quoted: YAML's string)
            return key.split("."), None if value is None and tp is not str else raw.strip()
        if _ends_before_a_comment(raw):
            raise ConfigError(f"override {text!r}: ' #' starts a YAML comment, which would drop the rest of the "
                              f"value; quote the value ({key}='...#...') or drop the comment")
        if _is_text(tp) and not _all_text(value):
            value = yaml_io.load_strings(raw)  # logging.tags=[v, 2024, 2024-06-01]: text as typed
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _ends_before_a_comment(raw: str) -> bool:
    """Whether YAML reads ``raw`` only up to a `` #`` comment (its last token ends before the text)."""
    skip = (yaml.StreamEndToken, yaml.BlockEndToken)
    end = max((t.end_mark.index for t in yaml.scan(raw, Loader=yaml_io.Loader) if not isinstance(t, skip)), default=0)
    return end < len(raw.rstrip())


def _all_text(value: Any) -> bool:
    """Whether ``value`` is ``None``, a string, or a list of strings (not numbers, booleans, dates)."""
    return all(v is None or isinstance(v, str) for v in (value if isinstance(value, list) else [value]))


def _optional_of(tp: Any) -> Any:
    """``X`` for an annotation ``X | None``, else ``tp``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) \
            and len(args) == 2 and type(None) in args:
        return args[0] if args[1] is type(None) else args[1]
    return tp


def _setting_type(path: list[str]) -> Any:
    """The annotation of the setting at ``path`` in :class:`Config` (``None`` inside free-form sections)."""
    if len(path) > 2 and path[0] == "stages":
        return _setting_type(path[2:])  # stages.<index or name>.data.root: a stage's sections are the config's
    tp: Any = Config
    for part in path:
        tp = _optional_of(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) is list and typing.get_args(tp):
            tp = typing.get_args(tp)[0]  # a list entry, by index or name
        else:
            return None
    return tp


def _is_text(tp: Any) -> bool:
    """Whether a setting annotated ``tp`` can only hold text (``str``, ``list[str]``, maybe ``None``)."""
    tp = _optional_of(tp)
    return tp is str or (typing.get_origin(tp) is list and typing.get_args(tp) == (str,))


#: Sections whose ``name`` picks a registry entry: an override switching the name starts the
#: section afresh (as ``extends`` does, see :func:`_merge`), since the old entry's settings
#: rarely fit the new one.
REGISTRY_SECTIONS = ("model", "algorithm", "distill", "strategy", "base", "scheduler")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (in place; also returned).  Inside a list
    (``stages``, ``datasets``) a part is an index or an entry's ``name`` / ``label``:
    ``stages.1.train.iterations=5`` or ``stages.anil.train.iterations=5``.

    ``model.name=X`` (likewise ``algorithm``, ``distill``, ``strategy``, ``base``) naming another entry than
    the section's resets the section to ``{name: X}``, keeping only keys that earlier overrides on
    the same command line set, as ``extends`` replaces a section whose ``name`` changes."""
    set_by_override: dict[int, set[str]] = {}  # id(section) -> keys earlier overrides set in it
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                nxt = node[_list_index(node, part, text)]
            else:
                set_by_override.setdefault(id(node), set()).add(part)
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = _default_section(path[:depth + 1], text)
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = nxt
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
            continue
        kept = set_by_override.setdefault(id(node), set())
        if len(path) > 1 and path[-2] in REGISTRY_SECTIONS and path[-1] == "name" and node.get("name", value) != value:
            for key in [k for k in node if k not in kept]:
                del node[key]
        kept.add(path[-1])
        node[path[-1]] = value
    return data


def _default_section(path: list[str], text: str) -> dict | list:
    """What an override reaching into the setting at ``path``, absent from the config, edits: a copy
    of the default list (``eval.settings``, ``logging.tags``) or registry section (``algorithm``:
    ``{name: maml}``), else an empty section whose settings take their defaults."""
    tp = _optional_of(_setting_type(path))
    if path[0] == "stages" or (tp is not dict and typing.get_origin(tp) is not list):
        return {}  # (a stage's section is merged over the config's: it starts empty)
    default: Any = Config().to_dict()
    for part in path:
        default = default.get(part) if isinstance(default, dict) else None
    if isinstance(default, (dict, list)):
        return _unshared(default)
    if typing.get_origin(tp) is list:
        raise ConfigError(f"override {text!r}: {'.'.join(path)} is not set, so it has no entries to change; "
                          f"give the whole list ({'.'.join(path)}=[...])")
    return {}


def _list_index(items: list, part: str, text: str) -> int:
    """The position ``part`` names in a config list: an index, or an entry's ``name`` / ``label``."""
    if part.isdigit() and int(part) < len(items):
        return int(part)
    if not items:
        raise ConfigError(f"override {text!r}: the list is empty, so it has no entry {part!r}; give the whole list "
                          f"({text.split('=', 1)[0].rsplit('.', 1)[0]}=[...])")
    named = [i for i, x in enumerate(items) if isinstance(x, dict) and part in (x.get("name"), x.get("label"))]
    if len(named) == 1:
        return named[0]
    names = [str(x.get("label") or x.get("name")) for x in items if isinstance(x, dict) and (x.get("name") or x.get("label"))]
    raise ConfigError(f"override {text!r}: {part!r} is neither an index (0..{len(items) - 1}) nor the name of one "
                      f"entry of the list" + (f" ({', '.join(names)})" if names else ""))


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict, with ``extends: other.yaml`` (relative to the file) merged in."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a YAML file in it (e.g. {path / 'omniglot_5w1s.yaml'})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config files extend each other in a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        data = yaml_io.load(decode_text(path.read_bytes(), f"config file {path}", ConfigError)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of sections at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be the path of another config file, got {parent!r}")
    return _merge(read_yaml(path.parent / parent, _seen + (path.resolve(),)), data)


def _unshared(data: Any) -> Any:
    """``data`` with every mapping and list copied, each once per place it occurs (unlike
    ``copy.deepcopy``, which keeps two YAML aliases of one anchor the same object)."""
    if isinstance(data, Mapping):
        return {k: _unshared(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_unshared(v) for v in data]
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults with ``path=None``) and apply overrides.

    A file may start from another with ``extends: base.yaml`` (path relative to the file): its
    sections are merged over the base's key by key.  The file's data is copied first, so a YAML
    alias (``*anchor``) is a section of its own that an override changes alone.
    """
    data: dict[str, Any] = _unshared(read_yaml(path)) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    if data.get("datasets"):
        _check_no_data_section(data.get("data"), "")
    return config_from_dict(data)


def _check_no_data_section(data: Any, where: str) -> None:
    """Refuse settings of a ``data`` section (``where``: the stage, or ``""`` for the config's)
    that a config with a ``datasets`` list would never read."""
    if not isinstance(data, Mapping):
        return  # (null: none; another value is refused as a wrong type)
    unused = {k: v for k, v in data.items() if getattr(DataConfig, k, v) != v}  # (unknown keys: refused later)
    if unused:
        key = next(iter(unused))
        raise ConfigError(f"{where}the config lists its datasets under 'datasets', so its 'data' section is not used "
                          f"(it sets {unused!r}); set these on each datasets entry instead "
                          f"(e.g. datasets.0.{key}=...) and remove 'data'")
