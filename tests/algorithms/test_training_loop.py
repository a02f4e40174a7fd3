"""Callbacks (LR schedules, early stopping, metrics files), bit-exact resume, bad training input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.callbacks import Callback, EarlyStopping, LRScheduler, MetricsLogger
from metamtl.config import config_from_dict
from metamtl.errors import CheckpointError, ConfigError
from metamtl.models import build_model

from algo_utils import toy_dataset


def make_learner(alg="maml", head_init="zero", callbacks=(), **alg_kw):
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2,
                        out_features=5 if head_init == "learned" else None)
    alg_kw = {"steps": 2, "lr": 0.3, "head_init": head_init, **alg_kw}
    return MetaLearner(model, build_algorithm(alg, **alg_kw), preprocessing=toy_dataset().preprocessing,
                       device="cpu", meta_lr=1e-2, callbacks=callbacks)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_iteration_end(self, state, metrics):
        self.calls.append(("end", state.iteration))

    def on_validation_end(self, state, metrics):
        self.calls.append(("val", state.iteration))

    def on_iteration_complete(self, state):
        self.calls.append(("complete", state.iteration))


def test_hook_order_and_cosine_schedule_with_warmup(toy_tasks):
    train, val = toy_tasks
    rec = Recorder()
    sched = LRScheduler("cosine", warmup=2, min_lr=1e-3)
    learner = make_learner(callbacks=[rec, sched])
    learner.fit(train, val, iterations=6, meta_batch_size=2, val_every=3, val_episodes=2, progress=False)
    assert rec.calls[:4] == [("end", 1), ("complete", 1), ("end", 2), ("complete", 2)]
    assert rec.calls[4:7] == [("end", 3), ("val", 3), ("complete", 3)]
    lrs = [row["train/lr"] for row in learner.history if "train/lr" in row]
    expected = [1e-2 * 1 / 2, 1e-2 * 2 / 2] + [
        1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4)) for t in range(2, 6)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert learner.meta_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # meta_lr again after the fit


@pytest.mark.parametrize("name,kw,factors", [
    ("step", {"step_size": 2, "gamma": 0.5}, [1, 1, 0.5, 0.5, 0.25]),
    ("exponential", {"gamma": 0.5}, [1, 0.5, 0.25, 0.125, 0.0625]),
])
def test_step_and_exponential_schedules(toy_tasks, name, kw, factors):
    learner = make_learner(alg="fomaml", callbacks=[LRScheduler(name, **kw)])
    learner.fit(toy_tasks[0], iterations=5, meta_batch_size=1, progress=False)
    assert [r["train/lr"] for r in learner.history] == pytest.approx([1e-2 * f for f in factors])


def test_cosine_only_settings_on_another_schedule_are_refused():
    """warmup, total and over='budget' were silently ignored by the step, exponential and plateau
    schedules (a step schedule with warmup=4 had no warm-up)."""
    for name, kw in (("step", {"warmup": 4}), ("exponential", {"over": "budget"}), ("plateau", {"total": 5})):
        with pytest.raises(ConfigError, match=f"{next(iter(kw))} .*cosine schedule only.*not {name!r}"):
            LRScheduler(name, **kw)
    with pytest.raises(ConfigError, match="train.scheduler: scheduler warmup .*cosine schedule only"):
        config_from_dict({"train": {"scheduler": {"name": "step", "warmup": 100}}})
    assert LRScheduler("step", min_lr=1e-4).min_lr == 1e-4  # min_lr applies to every schedule


def test_booleans_are_refused_as_early_stopping_and_scheduler_numbers():
    """EarlyStopping(min_delta=True), LRScheduler(min_lr=True) and LRScheduler("step", gamma=True) took the
    boolean as 1.0 (every rate clamped up to 1.0, a schedule doing nothing), unlike grad_clip or patience."""
    for make, name in ((lambda: EarlyStopping(min_delta=True), "early stopping min_delta"),
                       (lambda: LRScheduler("cosine", min_lr=True), "scheduler min_lr"),
                       (lambda: LRScheduler("step", gamma=True), "scheduler gamma")):
        with pytest.raises(ConfigError, match=rf"{name} must be .*got True \(a boolean: write the number itself\)"):
            make()
    assert EarlyStopping(min_delta=1).min_delta == 1.0 and LRScheduler("step", gamma=1).gamma == 1.0


def test_a_cosine_total_over_the_time_budget_is_refused():
    """LRScheduler("cosine", over="budget", total=4) annealed over the budget and ignored total without a word."""
    with pytest.raises(ConfigError, match=r"total=4 applies to over='iterations'.*drop total or over='budget'"):
        LRScheduler("cosine", over="budget", total=4)
    with pytest.raises(ConfigError, match=r"train.scheduler: scheduler total=100 applies"):
        config_from_dict({"train": {"budget_minutes": 5, "scheduler": {"name": "cosine", "over": "budget", "total": 100}}})
    assert LRScheduler("cosine", over="budget", warmup=2).warmup == 2  # warm-up counts iterations either way


def test_a_continued_fit_with_a_new_schedule_anneals_from_meta_lr(toy_tasks):
    """fit(3) then fit(2), each with a fresh cosine over 5 iterations, follows fit(5)'s rates: the
    second scheduler starts from the optimizer's initial rate, not from the annealed one."""
    lrs = {}
    for parts in ((5,), (3, 2)):
        learner = make_learner(alg="fomaml")
        for n in parts:
            learner.fit(toy_tasks[0], iterations=n, meta_batch_size=1, progress=False,
                        callbacks=[LRScheduler("cosine", total=5)])
        lrs[parts] = [r["train/lr"] for r in learner.history]
    assert lrs[(3, 2)] == pytest.approx(lrs[(5,)], rel=1e-12)
    assert lrs[(5,)][3] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 5)))


def test_a_continued_fit_without_the_schedule_trains_at_meta_lr(toy_tasks):
    """After a cosine fit the optimizer kept the annealed rate (0.0 at the end), so a continued
    fit without a scheduler trained at that rate, changing nothing, without a word."""
    learner = make_learner(alg="fomaml")
    learner.fit(toy_tasks[0], iterations=3, meta_batch_size=1, progress=False, callbacks=[LRScheduler("cosine")])
    learner.fit(toy_tasks[0], iterations=2, meta_batch_size=1, progress=False)
    assert [r["train/lr"] for r in learner.history][3:] == pytest.approx([1e-2, 1e-2])


def test_a_fit_failing_before_the_schedule_started_leaves_the_rate_at_meta_lr(toy_tasks):
    """A scheduler kept from an earlier fit put that fit's rate back when a later fit failed before the
    scheduler's on_fit_start (another callback refusing to start): meta_lr said 0.5, the optimizer and
    the next fit trained at the old 0.01."""
    class FailsAtStart(Callback):
        def on_fit_start(self, state):
            raise ConfigError("cannot start")

    learner, schedule = make_learner(alg="fomaml"), LRScheduler("cosine")
    learner.fit(toy_tasks[0], iterations=2, meta_batch_size=1, progress=False, callbacks=[schedule])
    learner.meta_lr = 0.5
    with pytest.raises(ConfigError, match="cannot start"):
        learner.fit(toy_tasks[0], iterations=2, meta_batch_size=1, progress=False, callbacks=[FailsAtStart(), schedule])
    assert [g["lr"] for g in learner.meta_optimizer.param_groups] == [0.5]
    learner.fit(toy_tasks[0], iterations=1, meta_batch_size=1, progress=False)
    assert learner.history[-1]["train/lr"] == 0.5


class FakeValidation(Callback):
    """Replaces the validation metrics by a fixed sequence (runs before the tested callbacks)."""

    def __init__(self, values):
        self.values = list(values)

    def on_validation_end(self, state, metrics):
        metrics["val/accuracy"] = self.values.pop(0)


def test_early_stopping_and_plateau_schedule_follow_validation(toy_tasks):
    train, val = toy_tasks
    stop = EarlyStopping(patience=3, min_delta=0.01)
    plateau = LRScheduler("plateau", patience=2, gamma=0.5)
    learner = make_learner(alg="fomaml", callbacks=[FakeValidation([0.5, 0.6, 0.605, 0.6, 0.59, 0.9]), stop, plateau])
    learner.fit(train, val, iterations=20, meta_batch_size=1, val_every=1, val_episodes=1, progress=False)
    # best 0.6 at validation 2; 0.605 is within min_delta; three without improvement -> stop at 5
    assert learner.iteration == 5 and learner.fit_state.stopped_by == "early_stopping"
    assert stop.state_dict() == {"best": 0.6, "wait": 3}
    # the plateau scheduler (no min_delta) saw 0.605 as its best, then 2 worse -> one halving
    assert plateau.reductions == 1 and plateau.factor_lr(1e-2, learner.iteration, 20) == pytest.approx(5e-3)
    with pytest.raises(ConfigError, match="needs validation"):
        make_learner(alg="fomaml").fit(train, iterations=1, meta_batch_size=1, progress=False,
                                       callbacks=[EarlyStopping()])
    with pytest.raises(ConfigError, match="monitors 'val/acc'"):
        make_learner(alg="fomaml").fit(train, val, iterations=1, meta_batch_size=1, val_episodes=1,
                                       progress=False, callbacks=[EarlyStopping(monitor="val/acc")])


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_iteration_start(self, state):
        if state.iteration == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("alg,kw", [
    ("mamlpp", {"steps": 2, "multi_step_iterations": 6, "first_order_iterations": 5}),
    ("metasgd", {"head_init": "proto"}),
])
def test_resume_is_bit_exact_with_learned_rates_scheduler_and_callbacks(tmp_path, toy_tasks, alg, kw):
    """Killed after iteration 5 (last checkpoint at 4, before MAML++'s annealings switch), resumed
    to 8: parameters, learned rates, BatchNorm statistics, LR, history and metrics file all equal
    those of an uninterrupted run."""
    train, val = toy_tasks

    def fit(tag, extra_callbacks=(), **extra):
        learner = make_learner(alg, **kw)
        cbs = [LRScheduler("cosine", warmup=1), EarlyStopping(patience=50),
               MetricsLogger(tmp_path / tag / "metrics.jsonl"), *extra_callbacks]
        learner.fit(train, val, iterations=8, meta_batch_size=2, val_every=2, val_episodes=2, progress=False,
                    callbacks=cbs, **extra)
        return learner

    full = fit("full")
    with pytest.raises(KeyboardInterrupt):
        fit("part", [Crash(at=5)], checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    last = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert last["iteration"] == 4
    assert {"LRScheduler:cosine", "EarlyStopping:default:default",
            "MetricsLogger:" + str((tmp_path / 'part' / 'metrics.jsonl').resolve())} <= set(last["training"]["callbacks"])
    resumed = fit("part", resume=tmp_path / "ck" / "last.pt")
    assert resumed.iteration == 8
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(full.algorithm.state_dict().items(), resumed.algorithm.state_dict().values()):
        assert torch.equal(a, b), name  # learned rates, per-step BatchNorm, iteration counter
    assert full.meta_optimizer.param_groups[0]["lr"] == resumed.meta_optimizer.param_groups[0]["lr"]
    measured = ("time", "train/memory_mb")  # wall-clock time and peak memory are measurements, not state
    strip = lambda rows: [{k: v for k, v in r.items() if k not in measured} for r in rows]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    read = lambda tag: strip(json.loads(line) for line in (tmp_path / tag / "metrics.jsonl").read_text().splitlines())  # noqa: E731
    assert read("full") == read("part")  # the rows of iteration 5 written before the crash were cut


def test_metrics_logger_writes_long_csv(tmp_path, toy_tasks):
    train, val = toy_tasks
    learner = make_learner(alg="fomaml")
    learner.fit(train, val, iterations=2, meta_batch_size=1, val_every=2, val_episodes=1, progress=False,
                callbacks=[MetricsLogger(tmp_path / "m.csv")])
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "iteration,time,metric,value"
    metrics = {(int(line.split(",")[0]), line.split(",")[2]) for line in lines[1:]}
    assert {(1, "train/loss"), (2, "train/accuracy"), (2, "val/accuracy"), (2, "train/lr")} <= metrics
    with pytest.raises(ConfigError, match=".csv or .jsonl"):
        MetricsLogger(tmp_path / "m.txt")


def test_undefined_validation_cis_are_json_null_in_metrics_files_and_history(tmp_path, toy_tasks):
    """With val_episodes=1 the validation CIs (undefined) were written as bare NaN tokens into
    metrics.jsonl and history.json, which strict JSON parsers refuse; results.json writes null."""
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))

    train, val = toy_tasks
    learner = make_learner(alg="fomaml")
    learner.fit(train, val, iterations=2, meta_batch_size=1, val_every=2, val_episodes=1, progress=False,
                callbacks=[MetricsLogger(tmp_path / "m.jsonl")])
    rows = [strict(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    validation = [r for r in rows if "val/accuracy" in r]
    assert validation and validation[0]["val/accuracy_ci95"] is None and validation[0]["val/loss_ci95"] is None
    history = strict(json.dumps(learner.history))  # what experiment.run writes to history.json
    assert [r["val/loss_ci95"] for r in history if "val/loss" in r] == [None]
    assert math.isfinite([r for r in history if "val/loss" in r][0]["val/loss"])


def test_a_skipped_steps_non_finite_loss_is_json_null_in_metrics_jsonl_and_history_json(tmp_path, toy_tasks):
    """A skipped (non-finite) step's train/loss was written as a bare NaN token into metrics.jsonl and
    history.json, which strict JSON parsers refuse; it is now null there (the history in memory keeps nan)."""
    from metamtl.experiment import write_history

    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))

    train, _ = toy_tasks
    learner = make_learner(alg="fomaml")
    step = learner.algorithm.meta_step

    def nan_at_2(model, batch, it):
        return {**step(model, batch, it), **({"loss": float("nan")} if it == 1 else {})}

    learner.algorithm.meta_step = nan_at_2
    with pytest.warns(RuntimeWarning):
        learner.fit(train, iterations=3, meta_batch_size=1, progress=False, callbacks=[MetricsLogger(tmp_path / "m.jsonl")])
    rows = [strict(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["train/loss"] is None for r in rows] == [False, True, False]
    write_history(tmp_path / "history.json", learner.history)
    history = strict((tmp_path / "history.json").read_text())
    assert [r["train/loss"] is None for r in history] == [False, True, False]
    assert math.isnan(learner.history[1]["train/loss"])


def test_resuming_into_another_folder_starts_a_clean_metrics_file(tmp_path, toy_tasks):
    """A checkpoint copied to (or resumed into) another folder: that folder's metrics file starts
    afresh with its header, not padded with zero bytes up to where the first run's file had got."""
    train, _ = toy_tasks
    first = make_learner(alg="fomaml")
    first.fit(train, iterations=2, meta_batch_size=1, checkpoint_dir=tmp_path / "a", checkpoint_every=1,
              callbacks=[MetricsLogger(tmp_path / "a" / "m.csv")], progress=False)
    resumed = make_learner(alg="fomaml")
    resumed.fit(train, iterations=4, meta_batch_size=1, checkpoint_dir=tmp_path / "b", resume=tmp_path / "a" / "last.pt",
                callbacks=[MetricsLogger(tmp_path / "b" / "m.csv")], progress=False)
    data = (tmp_path / "b" / "m.csv").read_bytes()
    assert b"\0" not in data
    lines = data.decode().splitlines()
    assert lines[0] == "iteration,time,metric,value"
    assert {int(line.split(",")[0]) for line in lines[1:]} == {3, 4}


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, toy_tasks):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    learner = make_learner(alg="fomaml")
    before = [p.detach().clone() for p in learner.model.parameters()]
    with pytest.raises(CheckpointError, match="not writable"):
        learner.fit(toy_tasks[0], iterations=3, meta_batch_size=1, progress=False, checkpoint_dir=blocker / "ck")
    assert learner.iteration == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, toy_tasks, monkeypatch):
    learner = make_learner(alg="fomaml")
    learner.fit(toy_tasks[0], iterations=2, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path)
    good = (tmp_path / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="No space left"):
        learner.save(tmp_path / "last.pt", training_state=True)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_config_sections_for_callbacks_are_validated():
    cfg = config_from_dict({"train": {"scheduler": {"name": "cosine", "warmup": 10},
                                      "early_stopping": {"patience": 3}}, "logging": {"metrics": "jsonl"}})
    assert cfg.train.scheduler.warmup == 10 and cfg.train.early_stopping.monitor is None  # the task's default
    with pytest.raises(ConfigError, match="train.early_stopping: early stopping monitors 'val/acc', which validation "
                                          "of a classification learner never reports; it reports val/accuracy, "):
        config_from_dict({"train": {"early_stopping": {"patience": 2, "monitor": "val/acc"}}})
    sine = {"data": {"name": "sinusoid"}, "tasks": {"ways": 1}, "model": {"name": "mlp", "hidden": [8]},
            "eval": {"settings": [{"ways": 1, "shots": 5}]}}
    for section in ({"early_stopping": {"monitor": "val/accuracy"}},
                    {"scheduler": {"name": "plateau", "monitor": "val/accuracy"}}):
        with pytest.raises(ConfigError, match="'val/accuracy', which validation of a regression learner never "
                                              "reports; it reports val/loss, val/loss_ci95"):
            config_from_dict({**sine, "train": section})
    config_from_dict({**sine, "train": {"early_stopping": {}, "scheduler": {"name": "plateau"}}})  # val/loss
    with pytest.raises(ConfigError, match="train.scheduler: unknown scheduler 'cosin'. Did you mean 'cosine'"):
        config_from_dict({"train": {"scheduler": {"name": "cosin"}}})
    with pytest.raises(ConfigError, match="train.early_stopping: early stopping patience"):
        config_from_dict({"train": {"early_stopping": {"patience": 0}}})
    with pytest.raises(ConfigError, match="need validation"):
        config_from_dict({"data": {"val_split": None}, "train": {"early_stopping": {}}})
    with pytest.raises(ConfigError, match="logging.metrics"):
        config_from_dict({"logging": {"metrics": "xml"}})
    with pytest.raises(ConfigError, match="Valid algorithms: anil, fomaml, imaml, maml, mamlpp, metasgd, (multitask, )?protonet, reptile, transfer"):
        config_from_dict({"algorithm": {"name": "maml+"}})
    with pytest.raises(ConfigError, match="inner lr must be a finite number > 0"):
        config_from_dict({"algorithm": {"name": "metasgd", "lr": -1}})
    with pytest.raises(ConfigError, match="unknown inner optimizer 'adamm'. Did you mean 'adam'"):
        config_from_dict({"algorithm": {"name": "mamlpp", "optimizer": "adamm"}})


def test_callback_counts_and_rates_are_validated(tmp_path):
    """ModelCheckpoint(every=...) took -2 (a checkpoint whenever iteration % -2 == 0), truncated 2.7
    to 2 and raised a bare ValueError/TypeError for "x"/None; History and ProgressBar took anything."""
    from metamtl.callbacks import History, ModelCheckpoint, ProgressBar

    for every in (-2, 2.7, "x", None, True):
        with pytest.raises(ConfigError, match=r"ModelCheckpoint every must be an integer >= 0, got"):
            ModelCheckpoint(tmp_path, every=every)
    assert ModelCheckpoint(tmp_path, every=0).every == 0
    for every in (0, 1.5, "2"):
        with pytest.raises(ConfigError, match=r"History every must be an integer >= 1, got"):
            History(every)
    for smoothing in (-0.1, 1.0, float("nan"), "0.9", None):
        with pytest.raises(ConfigError, match=r"ProgressBar smoothing must be a number in \[0, 1\), got"):
            ProgressBar(smoothing)
    with pytest.raises(ConfigError, match=r"MetricsLogger every must be an integer >= 1, got 0"):
        MetricsLogger(tmp_path / "m.csv", every=0)


def test_a_history_callback_given_replaces_the_standard_one(toy_tasks):
    """fit(callbacks=[History(every=2)]) ran next to the built-in History: its every did nothing and
    the rows it kept were there twice (validation rows too). It now replaces the built-in one; two
    History callbacks are refused."""
    from metamtl.callbacks import History, ProgressBar

    train, val = toy_tasks
    learner = make_learner(alg="fomaml")
    learner.fit(train, val, iterations=4, meta_batch_size=1, val_every=2, val_episodes=2, progress=False,
                callbacks=[History(every=2)])
    assert [(r["iteration"], "val/loss" in r) for r in learner.history] == [(2, False), (2, True), (4, False), (4, True)]
    bar = ProgressBar()
    learner.fit(train, iterations=1, meta_batch_size=1, callbacks=[bar, Recorder()])
    kinds = [type(cb).__name__ for cb in learner.fit_state.callbacks]
    assert kinds.count("ProgressBar") == kinds.count("History") == 1 and bar in learner.fit_state.callbacks
    with pytest.raises(ConfigError, match=r"2 History callbacks.*pass one"):
        make_learner(alg="fomaml", callbacks=[History(every=2)]).fit(train, iterations=1, callbacks=[History(every=3)])


def test_config_files_extend_a_base_and_the_comparison_configs_are_valid(tmp_path):
    from pathlib import Path

    from metamtl.config import load_config

    compare = Path(__file__).resolve().parents[2] / "configs" / "compare"
    methods = sorted(p.stem for p in compare.glob("*.yaml") if p.stem != "base")
    assert methods == ["anil", "fomaml", "imaml", "maml", "mamlpp", "metasgd", "protonet", "reptile", "transfer"]
    for m in methods:
        cfg = load_config(compare / f"{m}.yaml")
        assert cfg.name == m and cfg.algorithm["name"] == m and cfg.train.budget_minutes == 10
        assert [(s.ways, s.shots) for s in cfg.eval.settings] == [(5, 1), (20, 1)]
        assert cfg.data.sources == ["images_background_small1", "images_background_small2"]
    (tmp_path / "base.yaml").write_text("train: {iterations: 7, meta_lr: 0.01}\nalgorithm: {name: maml, steps: 4}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {iterations: 9}\nalgorithm: {name: protonet}\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.meta_lr=0.5"])
    assert cfg.train.iterations == 9 and cfg.train.meta_lr == 0.5  # merged key by key, overrides last
    assert cfg.algorithm == {"name": "protonet"}  # another algorithm replaces the section
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cosine_over_the_time_budget(toy_tasks, monkeypatch):
    learner = make_learner(alg="fomaml", callbacks=[LRScheduler("cosine", over="budget")])
    monkeypatch.setattr(MetaLearner, "elapsed", property(lambda self: 15.0 * self.iteration))  # 15 s per iteration
    learner.fit(toy_tasks[0], iterations=100, meta_batch_size=1, progress=False, budget_minutes=1.0)
    lrs = [r["train/lr"] for r in learner.history]
    assert learner.fit_state.stopped_by == "budget" and len(lrs) < 10
    assert lrs[0] == pytest.approx(1e-2) and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-2
    with pytest.raises(ConfigError, match="needs a time budget"):
        make_learner(alg="fomaml").fit(toy_tasks[0], iterations=1, meta_batch_size=1, progress=False,
                                       callbacks=[LRScheduler(over="budget")])


def test_cosine_over_the_time_budget_starts_at_the_base_rate_when_warm_up_ends(toy_tasks, monkeypatch):
    """The time-based cosine counted the warm-up's time: the rate fell from base to 0.85 base at the
    first iteration after warm-up, instead of annealing from base as over iterations."""
    learner = make_learner(alg="fomaml", callbacks=[LRScheduler("cosine", warmup=2, over="budget")])
    monkeypatch.setattr(MetaLearner, "elapsed", property(lambda self: 15.0 * self.iteration))  # 15 s per iteration
    learner.fit(toy_tasks[0], iterations=100, meta_batch_size=1, progress=False, budget_minutes=2.0)
    cosine = [0.5 * (1 + math.cos(math.pi * (15.0 * t - 30.0) / 90.0)) for t in range(2, 8)]
    assert [r["train/lr"] for r in learner.history] == pytest.approx([1e-2 * f for f in [0.5, 1.0, *cosine]])


@pytest.mark.parametrize("name,settings", [
    ("metasgd", {"head_init": "proto"}), ("mamlpp", {"steps": 2, "head_init": "proto"}),
    ("protonet", {}), ("transfer", {"num_classes": 30, "classifier": "cosine", "steps": 5}),
])
def test_every_new_algorithm_saves_and_loads_to_identical_predictions(tmp_path, toy_tasks, name, settings):
    train, val = toy_tasks
    torch.manual_seed(0)
    model = build_model("conv4", in_channels=1, hidden=8, image_size=12, blocks=2, out_features=None)
    learner = MetaLearner(model, build_algorithm(name, **settings), preprocessing=train.dataset.preprocessing,
                          device="cpu")
    learner.fit(train, iterations=2, meta_batch_size=2, progress=False)
    loaded = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.algorithm.config() == learner.algorithm.config()
    for (k, a), b in zip(learner.algorithm.state_dict().items(), loaded.algorithm.state_dict().values()):
        assert torch.equal(a, b), k
    ep = val.episode(0)
    assert torch.equal(learner.predict(ep.support_x, ep.support_y, ep.query_x),
                       loaded.predict(ep.support_x, ep.support_y, ep.query_x))
