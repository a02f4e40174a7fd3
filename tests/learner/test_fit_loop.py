"""The fit loop (iteration, validation cadence, budget, stops, signals, hooks) and the guarded meta-step."""
from __future__ import annotations

import pytest
import torch

from metamtl.callbacks import Callback, CallbackList, FitState
from metamtl.distributed import ProcessStrategy
from metamtl.errors import FitInterrupted, TrainingError
from metamtl.fit_loop import FitLoop, MetaStep
from metamtl.tasks import Sinusoid, TaskBatch

from .conftest import sine_learner


class Log(Callback):
    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_fit_start(self, state):
        self.calls.append(("start", state.iteration))

    def on_iteration_end(self, state, metrics):
        self.calls.append(("end", state.iteration))
        if state.iteration == self.stop_at:
            state.should_stop, state.stopped_by = True, "log"

    def on_validation_end(self, state, metrics):
        self.calls.append(("val", state.iteration, sorted(metrics)))

    def on_fit_end(self, state):
        self.calls.append(("fit_end", state.iteration, state.stopped_by))


def run_loop(learner, tasks, iterations, *, val_every=None, val=None, budget=None, callbacks=()):
    cbs = CallbackList(callbacks)
    state = FitState(learner, iterations, 2, val_every=val_every, budget_minutes=budget, callbacks=cbs)
    learner.fit_state = state
    FitLoop(learner, state, tasks, val, val_episodes=2).run()
    return state


def test_validation_runs_every_val_every_iterations_and_after_the_last(sine):
    learner, log = sine_learner(), Log()
    state = run_loop(learner, sine, 7, val_every=3, val=sine, callbacks=[log])
    vals = [c[1] for c in log.calls if c[0] == "val"]
    assert vals == [3, 6, 7] and learner.iteration == 7 and state.stopped_by == "iterations"
    assert log.calls[0] == ("start", 0) and log.calls[-1] == ("fit_end", 7, "iterations")
    assert log.calls[-2][2] == ["val/loss", "val/loss_ci95"]  # regression: no accuracy


def test_a_callback_stop_request_ends_fit_after_that_iteration(sine):
    learner, log = sine_learner(), Log(stop_at=2)
    state = run_loop(learner, sine, 10, callbacks=[log])
    assert learner.iteration == 2 and state.stopped_by == "log" and state.should_stop


@pytest.mark.parametrize("stop_at", [0, 3])  # 0: in on_fit_start, before the first iteration
def test_another_process_voting_stop_stops_this_one(sine, stop_at):
    class Voter(ProcessStrategy):  # a second process asks to stop at iteration stop_at, saying why
        def all_gather(self, obj, what):
            if not what.startswith("stop check"):
                return [obj]
            stop = learner.iteration == stop_at
            return [obj, (stop, "other_rank" if stop else None, False, False)]

    learner = sine_learner()
    learner.strategy = Voter()
    state = run_loop(learner, sine, 10)
    # this process records the other's reason (it writes results.json and the checkpoint's stop record)
    assert learner.iteration == stop_at and state.should_stop and state.stopped_by == "other_rank"


def test_the_time_budget_stops_fit(sine, monkeypatch):
    learner = sine_learner()
    monkeypatch.setattr(type(learner), "elapsed", property(lambda self: 30.0 * self.iteration))
    state = run_loop(learner, sine, 100, budget=1.0)  # 30 s per iteration, one minute
    assert learner.iteration == 2 and state.stopped_by == "budget"


def test_validation_also_runs_after_the_last_iteration_when_the_budget_or_a_callback_stops(sine, monkeypatch):
    log = Log(stop_at=2)
    run_loop(sine_learner(), sine, 10, val_every=4, val=sine, callbacks=[log])
    assert [c[1] for c in log.calls if c[0] == "val"] == [2]
    learner, log = sine_learner(), Log()
    monkeypatch.setattr(type(learner), "elapsed", property(lambda self: 30.0 * self.iteration))
    state = run_loop(learner, sine, 100, val_every=4, val=sine, budget=2.5, callbacks=[log])
    assert learner.iteration == 5 and state.stopped_by == "budget"
    assert [c[1] for c in log.calls if c[0] == "val"] == [4, 5] and log.calls[-1][0] == "fit_end"
    log.calls.clear()
    state = run_loop(learner, sine, 100, val_every=4, val=sine, budget=2.5, callbacks=[log])  # spent: no iteration
    assert learner.iteration == 5 and [c[0] for c in log.calls] == ["start", "fit_end"]


def test_a_budget_spent_before_the_first_iteration_trains_none(sine, monkeypatch):
    """A run stopped by its budget and resumed with the same budget trains no further iteration."""
    learner = sine_learner()
    monkeypatch.setattr(type(learner), "elapsed", property(lambda self: 60.0 + self.iteration))
    state = run_loop(learner, sine, 100, budget=1.0)
    assert learner.iteration == 0 and state.stopped_by == "budget"


def test_a_signal_saves_a_resumable_checkpoint_where_the_state_says(sine, tmp_path):
    import os
    import signal

    class Kill(Callback):
        def on_fit_start(self, state):
            state.resume_checkpoint = tmp_path / "here.pt"

        def on_iteration_end(self, state, metrics):
            if state.iteration == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    learner = sine_learner()
    with pytest.raises(FitInterrupted) as info:
        run_loop(learner, sine, 5, callbacks=[Kill()])
    assert info.value.checkpoint == tmp_path / "here.pt" and info.value.iteration == 2
    assert learner.fit_state.stopped_by == "SIGTERM" and (tmp_path / "here.pt").is_file()


def test_a_second_signal_aborts_at_once_and_the_state_names_it(sine):
    """Two signals in a row aborted fit with FitInterrupted but left fit_state.stopped_by None."""
    import os
    import signal

    class Twice(Callback):
        def on_iteration_end(self, state, metrics):
            if state.iteration == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    learner = sine_learner()
    with pytest.raises(FitInterrupted) as info:
        run_loop(learner, sine, 5, callbacks=[Twice()])
    assert info.value.checkpoint is None and info.value.iteration == 2
    assert learner.fit_state.stopped_by == "SIGINT"


def test_meta_step_applies_clipped_gradients_and_skips_non_finite_ones(sine):
    learner = sine_learner(grad_clip=1e-3, max_bad_steps=2)
    batch = learner.placement.batch(TaskBatch([sine.episode(i) for i in range(2)]))
    before = [p.detach().clone() for p in learner.meta_parameters()]
    metrics = MetaStep(learner)(batch)
    assert metrics["grad_norm"] > 1e-3 and "skipped" not in metrics
    # Adam's first step moves each weight by ~lr whatever the norm; clipping shows in the optimizer state
    grads = [learner.meta_optimizer.state[p]["exp_avg"] / 0.1 for p in learner.meta_parameters()]
    assert float(torch.nn.utils.get_total_norm(grads)) == pytest.approx(1e-3, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.meta_parameters()))

    def poison():
        next(iter(learner.model.parameters())).grad.fill_(float("nan"))

    after = [p.detach().clone() for p in learner.meta_parameters()]
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert MetaStep(learner, after_backward=poison)(batch)["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(after, learner.meta_parameters()))
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError, match="2 consecutive non-finite"):
        MetaStep(learner, after_backward=poison)(batch)


def test_regression_runs_watch_the_validation_loss_and_an_unreported_metric_fails_before_training(sine, tmp_path):
    """Regression validation reports no accuracy: early stopping, the plateau scheduler and best.pt
    watch val/loss (lower is better) by default, and a metric validation never reports is a
    ConfigError before the first iteration, naming the ones it does."""
    from metamtl.callbacks import EarlyStopping, LRScheduler
    from metamtl.checkpoint import safe_load
    from metamtl.errors import ConfigError

    learner = sine_learner()
    stop, plateau = EarlyStopping(patience=50), LRScheduler("plateau", patience=50)
    learner.fit(sine, sine, iterations=4, meta_batch_size=2, val_every=2, val_episodes=2, callbacks=[stop, plateau],
                checkpoint_dir=tmp_path, progress=False)
    assert stop.watched == plateau.watched == ("val/loss", "min") and stop.best is not None
    assert safe_load(tmp_path / "best.pt")["iteration"] in (2, 4)
    for bad in (EarlyStopping("val/accuracy"), EarlyStopping("val/acc"), LRScheduler("plateau", monitor="val/acc")):
        other = sine_learner()
        with pytest.raises(ConfigError, match=r"monitors 'val/acc.*never reports; it reports val/loss, val/loss_ci95"):
            other.fit(sine, sine, iterations=4, meta_batch_size=2, val_every=2, val_episodes=2, callbacks=[bad],
                      progress=False)
        assert other.iteration == 0


def test_model_checkpoint_resolves_its_monitor_and_mode_like_early_stopping(sine, tmp_path):
    """ModelCheckpoint's monitor defaults to the learner's (val/loss for regression), a loss is
    watched lower-is-better, and a monitor validation never reports (a typo, val/accuracy on a
    regression learner) or an unknown mode is a ConfigError, not a best.pt that is never written."""
    from metamtl.callbacks import ModelCheckpoint
    from metamtl.checkpoint import safe_load
    from metamtl.errors import ConfigError

    class Scored:  # validation losses 2.0, 1.0, 3.0 at iterations 2, 4, 6
        def __init__(self, losses):
            self.loss = next(losses)

        def metrics(self, prefix):
            return {f"{prefix}loss": self.loss, f"{prefix}loss_ci95": 0.0}

    fit = dict(meta_batch_size=2, val_every=2, val_episodes=2, progress=False)
    for i, make in enumerate((lambda d: ModelCheckpoint(d, monitor="val/loss"), lambda d: ModelCheckpoint(d))):
        learner, losses = sine_learner(), iter([2.0, 1.0, 3.0])
        learner.evaluate = lambda *args, **kwargs: Scored(losses)
        checkpoint = make(tmp_path / str(i))
        learner.fit(sine, sine, iterations=6, callbacks=[checkpoint], **fit)
        assert checkpoint.watched == ("val/loss", "min") and checkpoint.best == 1.0
        assert safe_load(tmp_path / str(i) / "best.pt")["iteration"] == 4
    for bad in (ModelCheckpoint(tmp_path / "a", monitor="val/acc"), ModelCheckpoint(tmp_path / "b", monitor="val/accuracy")):
        other = sine_learner()
        with pytest.raises(ConfigError, match=r"ModelCheckpoint monitors 'val/acc.*never reports; it reports val/loss"):
            other.fit(sine, sine, iterations=4, callbacks=[bad], **fit)
        assert other.iteration == 0
    with pytest.raises(ConfigError, match="mode"):
        ModelCheckpoint(tmp_path, monitor="val/loss", mode="lowest")
    quiet = ModelCheckpoint(tmp_path / "c", save_best=False)
    sine_learner().fit(sine, sine, iterations=2, callbacks=[quiet], **fit)
    assert (tmp_path / "c" / "last.pt").is_file() and not (tmp_path / "c" / "best.pt").exists()


def test_a_second_fit_continues_the_run_clock_and_its_budget_adds_to_it(sine, tmp_path):
    """fit called again continues the run: elapsed (history time, checkpoints) counts the earlier
    calls, its budget is that much more time, and a budget-annealed cosine continues instead of
    restarting at meta_lr; a resume's budget is the run's total."""
    from metamtl.callbacks import LRScheduler
    from metamtl.checkpoint import safe_load

    learner = sine_learner(callbacks=[LRScheduler("cosine", over="budget")])
    learner.fit(sine, iterations=10**6, meta_batch_size=2, budget_minutes=0.002, progress=False)
    first, seconds = learner.iteration, learner.elapsed
    assert seconds >= 0.12
    learner.fit(sine, iterations=10**6, meta_batch_size=2, budget_minutes=0.002, progress=False)
    times = [r["time"] for r in learner.history]
    assert times == sorted(times) and learner.elapsed >= seconds + 0.12 and learner.iteration > first
    assert learner.fit_state.start_seconds == seconds and learner.fit_state.stopped_by == "budget"
    assert learner.history[first]["train/lr"] <= 0.51 * learner.meta_lr  # annealing goes on (was back at meta_lr)
    path = learner.save(tmp_path / "last.pt", training_state=True)
    assert safe_load(path)["training"]["elapsed"] == pytest.approx(learner.elapsed, abs=0.05)


def test_callbacks_of_one_kind_keep_their_own_state_in_checkpoints(sine, tmp_path):
    """Two early stoppings (other monitors) and two metrics files of one name in two folders each
    keep their own state through a resume; callbacks with state sharing a key are refused."""
    from metamtl.callbacks import EarlyStopping, MetricsLogger
    from metamtl.errors import ConfigError

    def callbacks():
        return [EarlyStopping("val/loss", patience=50), EarlyStopping("val/loss_ci95", patience=50),
                MetricsLogger(tmp_path / "x" / "m.csv"), MetricsLogger(tmp_path / "y" / "m.csv", every=2)]

    fit = dict(iterations=4, meta_batch_size=2, val_every=2, val_episodes=3, progress=False)
    first = callbacks()
    sine_learner().fit(sine, sine, callbacks=first, checkpoint_dir=tmp_path / "ck", **fit)
    files = {p: p.read_bytes() for p in (tmp_path / "x" / "m.csv", tmp_path / "y" / "m.csv")}
    again = callbacks()
    sine_learner().fit(sine, sine, callbacks=again, resume=tmp_path / "ck" / "last.pt", progress=False,
                       **{k: v for k, v in fit.items() if k != "progress"})
    assert [cb.best for cb in again[:2]] == [cb.best for cb in first[:2]] and first[0].best != first[1].best
    assert {p: p.read_bytes() for p in files} == files  # neither file cut to the other's size
    twins = [EarlyStopping(patience=3), EarlyStopping(patience=5)]
    with pytest.raises(ConfigError, match=r"2 callbacks \(EarlyStopping, EarlyStopping\) share the checkpoint key "
                                          r"'EarlyStopping:default:default'.*distinct key"):
        sine_learner().fit(sine, sine, callbacks=twins, **fit)
    twins[1].key = "EarlyStopping:patient"
    sine_learner().fit(sine, sine, callbacks=twins, **fit)


@pytest.mark.parametrize("hook", ["on_validation_end", "on_fit_end"])
def test_a_signal_after_the_last_iteration_still_ends_fit_interrupted(sine, tmp_path, hook):
    """SIGTERM in the final validation (after a callback's stop) or in on_fit_end: fit saves
    last.pt, then raises FitInterrupted (exit code 143) instead of returning normally."""
    import os
    import signal

    from metamtl.checkpoint import safe_load

    class Term(Callback):
        def on_iteration_end(self, state, metrics):
            if state.iteration == 3:
                state.should_stop, state.stopped_by = True, "mine"

    def term(self, state, *args):
        if state.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    setattr(Term, hook, term)
    previous = signal.getsignal(signal.SIGTERM)
    learner = sine_learner()
    with pytest.raises(FitInterrupted) as info:
        learner.fit(sine, sine, iterations=4, meta_batch_size=2, val_every=2, val_episodes=2, callbacks=[Term()],
                    checkpoint_dir=tmp_path, progress=False)
    assert info.value.exit_code == 143 and info.value.iteration == 3 and info.value.checkpoint == tmp_path / "last.pt"
    assert safe_load(tmp_path / "last.pt")["iteration"] == 3 and learner.fit_state.stopped_by == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_callback_set_up_in_on_fit_start_is_not_meta_training_time(sine):
    """A slow on_fit_start (W&B start-up, reading last.pt) neither counts in elapsed (train
    seconds, history times) nor eats the time budget."""
    import time

    class SlowStart(Callback):
        def on_fit_start(self, state):
            time.sleep(0.5)

        def on_iteration_start(self, state):
            if state.iteration == 0:
                self.first = state.elapsed

    slow, learner = SlowStart(), sine_learner()
    state = run_loop(learner, sine, 10**6, budget=0.5 / 60, callbacks=[slow])
    assert learner.iteration > 1 and state.stopped_by == "budget"  # the set-up spent no budget
    assert slow.first < 0.2


def test_callbacks_argument_takes_one_callback_and_refuses_classes_and_other_objects(sine):
    """A single callback is taken as a list of one; a class, a function, None or a duck-typed object
    in the list is a ConfigError saying what to pass (not a bare TypeError/AttributeError)."""
    from metamtl.callbacks import EarlyStopping
    from metamtl.errors import ConfigError

    log = Log()
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, callbacks=log, progress=False)
    assert log.calls[-1] == ("fit_end", 2, "iterations")

    class Mine:
        def on_fit_start(self, state): ...

    for bad, message in ((EarlyStopping, r"got the class EarlyStopping: instantiate it, EarlyStopping\(...\)"),
                         ([EarlyStopping], "got the class EarlyStopping: instantiate it"),
                         ([print], "got builtin_function_or_method .*make it a Callback subclass"),
                         ([None], "got NoneType None"), ([Mine()], "got Mine .*Callback subclass")):
        with pytest.raises(ConfigError, match=message):
            learner.fit(sine, iterations=1, meta_batch_size=2, callbacks=bad, progress=False)
        with pytest.raises(ConfigError, match=r"MetaLearner\(callbacks=...\) must hold Callback instances"):
            sine_learner(callbacks=bad)
    assert learner.iteration == 2
    assert sine_learner(callbacks=log).callbacks == [log]
    from metamtl.experiment import run
    with pytest.raises(ConfigError, match=r"run\(callbacks=...\) must hold Callback instances; got the class"):
        run(None, callbacks=EarlyStopping)  # refused before the config is read


def test_a_continued_fit_appends_to_the_metrics_file_and_a_new_learner_starts_it_afresh(sine, tmp_path):
    from metamtl.callbacks import MetricsLogger

    path = tmp_path / "m.csv"
    iterations = lambda: sorted({int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]})  # noqa: E731
    learner = sine_learner()
    learner.fit(sine, iterations=3, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    learner.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    assert iterations() == [1, 2, 3, 4, 5] and path.read_text().count("iteration,time") == 1
    sine_learner().fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    assert iterations() == [1, 2]


def test_a_learner_loaded_from_a_training_state_save_appends_to_the_metrics_file(sine, tmp_path):
    """MetaLearner.load of a training_state=True save continues the run (its iteration, its history), yet its
    next fit truncated the metrics file to that fit's rows: the saved callback states are now loaded too."""
    from metamtl import MetaLearner
    from metamtl.callbacks import MetricsLogger

    path = tmp_path / "m.csv"
    iterations = lambda: sorted({int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]})  # noqa: E731
    learner = sine_learner()
    learner.fit(sine, iterations=3, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    learner.save(tmp_path / "l.pt", training_state=True)
    learner.fit(sine, iterations=1, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)  # not saved
    again = MetaLearner.load(tmp_path / "l.pt", device="cpu")
    again.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    assert iterations() == [1, 2, 3, 4, 5] and path.read_text().count("iteration,time") == 1
    assert len(again.history) == 5


def test_a_loaded_learner_does_not_cut_and_continue_another_runs_metrics_file_of_the_same_name(sine, tmp_path):
    """A learner loaded from a training_state save, fitted with a MetricsLogger of another run's file of the same
    name, cut that file to the saved byte count (mid-row at times) and appended: two runs mixed in one file.
    The file now continues only when it starts with the bytes the save had written (their CRC-32)."""
    from metamtl import MetaLearner
    from metamtl.callbacks import MetricsLogger

    a_path, b_path = tmp_path / "a" / "m.csv", tmp_path / "b" / "m.csv"
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(a_path)], progress=False)
    learner.save(tmp_path / "a.pt", training_state=True)
    other = sine_learner()  # other tasks (3 a batch): rows that differ from A's, whatever the timings
    other.fit(sine, iterations=6, meta_batch_size=3, callbacks=[MetricsLogger(b_path)], progress=False)
    again = MetaLearner.load(tmp_path / "a.pt", device="cpu")
    again.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(b_path)], progress=False)
    lines = b_path.read_text().splitlines()
    assert lines[0] == "iteration,time,metric,value" and lines.count(lines[0]) == 1
    assert sorted({int(line.split(",")[0]) for line in lines[1:]}) == [3, 4]  # this fit's rows, no other run's
    assert all(len(line.split(",")) == 4 for line in lines)


def test_a_fit_without_a_callback_in_between_keeps_what_the_next_fit_with_it_continues(sine, tmp_path):
    """The state a metrics file or a checkpoint folder carries to the learner's next fit survives a
    fit without them in between (it used to be replaced by that fit's callbacks' state only:
    the metrics file then restarted, and best.pt was overwritten by a worse model)."""
    from metamtl import MetaLearner
    from metamtl.callbacks import MetricsLogger

    path = tmp_path / "m.csv"
    iterations = lambda: sorted({int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]})  # noqa: E731
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    learner.fit(sine, iterations=2, meta_batch_size=2, callbacks=[MetricsLogger(path)], progress=False)
    assert iterations() == [1, 2, 5, 6]
    val = Sinusoid(shots=5, queries=5, seed=1)
    fit = dict(meta_batch_size=2, val_episodes=10, progress=False)
    learner = sine_learner()
    learner.fit(sine, val, iterations=4, val_every=4, checkpoint_dir=tmp_path / "run", **fit)
    best = [r["val/loss"] for r in learner.history if "val/loss" in r][-1]
    learner.fit(sine, iterations=1, **fit)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(torch.randn_like(p) * 3.0)  # much worse weights
    learner.fit(sine, val, iterations=1, val_every=1, checkpoint_dir=tmp_path / "run", **fit)
    assert [r["val/loss"] for r in learner.history if "val/loss" in r][-1] > best
    assert MetaLearner.load(tmp_path / "run" / "best.pt").iteration == 4


def test_a_moved_run_folder_resumes_its_metrics_file_instead_of_starting_it_afresh(sine, tmp_path):
    """Metrics files are keyed by their whole path; a run folder moved (or copied) elsewhere and
    resumed there still finds its file's state by name, so the rows before the checkpoint stay."""
    import shutil

    from metamtl.callbacks import MetricsLogger

    fit = dict(iterations=4, meta_batch_size=2, checkpoint_every=2, progress=False)
    sine_learner().fit(sine, callbacks=[MetricsLogger(tmp_path / "a" / "m.csv")], checkpoint_dir=tmp_path / "a", **fit)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rows = (tmp_path / "b" / "m.csv").read_text().splitlines()
    sine_learner().fit(sine, callbacks=[MetricsLogger(tmp_path / "b" / "m.csv")], checkpoint_dir=tmp_path / "b",
                       resume=tmp_path / "b" / "last.pt", **{**fit, "iterations": 6})
    after = (tmp_path / "b" / "m.csv").read_text().splitlines()
    assert after[:len(rows)] == rows and after.count("iteration,time,metric,value") == 1
    assert {int(line.split(",")[0]) for line in after[1:]} == set(range(1, 7))


def _early_stopped(tmp_path, iterations=40):
    from metamtl.callbacks import EarlyStopping
    learner = sine_learner()
    learner.fit(Sinusoid(shots=5, queries=5, seed=0), Sinusoid(shots=5, queries=5, seed=1), iterations=iterations,
                meta_batch_size=2, val_every=2, val_episodes=2, checkpoint_dir=tmp_path, progress=False,
                callbacks=[EarlyStopping(patience=1, min_delta=10.0)],
                resume=tmp_path / "last.pt" if (tmp_path / "last.pt").exists() else None)
    return learner


def test_a_resumed_early_stopped_run_trains_no_more_unless_it_asks_for_more_iterations(tmp_path):
    """The checkpoint says early stopping ended the run: resuming it (the final last.pt, or one an
    interruption in the held-out evaluation left) stops at once with that reason, like a spent
    budget; a resume asking for more iterations than the run had extends it."""
    a = _early_stopped(tmp_path)
    assert (a.iteration, a.fit_state.stopped_by) == (4, "early_stopping")
    b = _early_stopped(tmp_path)
    assert (b.iteration, b.fit_state.stopped_by) == (4, "early_stopping") and b.history == a.history
    c = _early_stopped(tmp_path, iterations=50)
    assert c.iteration > 4
    c.fit(Sinusoid(shots=5, queries=5, seed=0), iterations=2, meta_batch_size=2, progress=False)
    assert c.fit_state.stopped_by == "iterations"  # a continued fit trains its iterations more


def _budget_fit(learner, tmp_path, monkeypatch, callbacks=(), resume=None):
    monkeypatch.setattr(type(learner), "elapsed", property(lambda self: 30.0 * self.iteration))
    learner.fit(Sinusoid(shots=5, queries=5, seed=0), Sinusoid(shots=5, queries=5, seed=1), iterations=100,
                meta_batch_size=2, val_every=50, val_episodes=2, budget_minutes=1.5, checkpoint_dir=tmp_path,
                progress=False, callbacks=list(callbacks), resume=resume)
    return [r["iteration"] for r in learner.history if "val/loss" in r]


def test_a_signal_in_the_iteration_that_spends_the_budget_keeps_the_final_validation(tmp_path, monkeypatch):
    import os
    import signal

    class Kill(Callback):
        def on_iteration_end(self, state, metrics):
            if state.iteration == 3:
                os.kill(os.getpid(), signal.SIGINT)

    assert _budget_fit(sine_learner(), tmp_path / "ref", monkeypatch) == [3]
    with pytest.raises(FitInterrupted):
        _budget_fit(sine_learner(), tmp_path / "run", monkeypatch, [Kill()])
    b = sine_learner()
    assert _budget_fit(b, tmp_path / "run", monkeypatch, resume=tmp_path / "run" / "last.pt") == [3]
    assert b.fit_state.stopped_by == "budget" and (tmp_path / "run" / "best.pt").is_file()


def test_the_budget_stays_the_reason_when_early_stopping_reacts_to_the_final_validation(tmp_path, monkeypatch):
    from metamtl.callbacks import EarlyStopping

    learner = sine_learner()
    monkeypatch.setattr(type(learner), "elapsed", property(lambda self: 30.0 * self.iteration))
    learner.fit(Sinusoid(shots=5, queries=5, seed=0), Sinusoid(shots=5, queries=5, seed=1), iterations=100,
                meta_batch_size=2, val_every=2, val_episodes=2, budget_minutes=1.5, progress=False,
                callbacks=[EarlyStopping(patience=1, min_delta=10.0)])
    assert learner.iteration == 3 and learner.fit_state.stopped_by == "budget"


def test_callbacks_reused_by_a_new_learner_start_afresh_and_a_continued_fit_keeps_their_state(sine):
    """The same callback objects passed to a second learner (a sweep) used to keep the first
    learner's state: its scheduler's base rate (10x the new meta_lr) and its early-stopping best
    (stopping the new run after 2 iterations)."""
    from metamtl.callbacks import EarlyStopping, LRScheduler

    stopper = EarlyStopping(patience=2)
    cbs = [LRScheduler("cosine"), stopper]
    fit = dict(iterations=6, meta_batch_size=2, val_every=1, val_episodes=2, callbacks=cbs, progress=False)
    first = sine_learner()
    first.fit(sine, sine, **fit)
    second = sine_learner()
    for g in second.meta_optimizer.param_groups:
        g["lr"] = 1e-3
    second.fit(sine, sine, **fit)
    rates = [r["train/lr"] for r in second.history if "train/lr" in r]
    assert rates[0] == pytest.approx(1e-3) and second.iteration == 6 and second.fit_state.stopped_by == "iterations"
    kept = stopper.best
    second.fit(sine, sine, **{**fit, "iterations": 1})  # continued: the same run, early stopping goes on
    assert stopper.best <= kept
    stopper.best, stopper.wait = -1e9, 1  # nothing beats it: a continued fit stops at once
    second.fit(sine, sine, **{**fit, "iterations": 3})
    assert second.fit_state.stopped_by == "early_stopping" and second.iteration == 8


def test_callbacks_reused_by_a_learner_past_its_first_fit_start_afresh_too(sine):
    """Reused for a learner already trained (or loaded), a callback used to keep the state of the
    learner it ran with before: the scheduler's base rate (the other learner's meta_lr) and the
    early-stopping best (stopping the new run at its second validation)."""
    from metamtl.callbacks import EarlyStopping, LRScheduler

    scheduler, stopper = LRScheduler("step", step_size=1000), EarlyStopping(patience=2)
    fit = dict(meta_batch_size=2, val_every=1, val_episodes=2, callbacks=[scheduler, stopper], progress=False)
    first = sine_learner()
    for g in first.meta_optimizer.param_groups:
        g["lr"] = g["initial_lr"] = 1e-3
    first.fit(sine, sine, iterations=3, **fit)
    stopper.best, stopper.wait = -1e9, 1  # as if the first run had a validation nothing beats
    second = sine_learner()
    second.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    second.fit(sine, sine, iterations=3, **fit)
    rates = [r["train/lr"] for r in second.history if "train/lr" in r]
    assert rates[-1] == pytest.approx(1e-2)  # its own meta_lr
    assert second.iteration == 4 and second.fit_state.stopped_by == "iterations"
    import pickle

    assert pickle.loads(pickle.dumps(stopper)).patience == 2  # the learner it ran with is not pickled


def _resumed_past_its_best(sine, first_dir, resume_dir, copy=False):
    """A run trained into ``first_dir`` until its best validation (iteration 3), resumed into
    ``resume_dir`` (a copy of ``first_dir`` when ``copy``) for 4 worse iterations."""
    import shutil

    fit = dict(meta_batch_size=2, val_every=1, val_episodes=2, progress=False, checkpoint_every=1)
    first = sine_learner()
    for g in first.meta_optimizer.param_groups:
        g["lr"] = 0.3  # too high: after its best at iteration 3 the run gets worse
    first.fit(sine, sine, iterations=3, checkpoint_dir=first_dir, **fit)
    if copy:
        shutil.copytree(first_dir, resume_dir)
    before = (resume_dir / "best.pt").read_bytes() if copy else None
    resumed = sine_learner()
    resumed.fit(sine, sine, iterations=7, checkpoint_dir=resume_dir, resume=first_dir / "last.pt", **fit)
    losses = [r["val/loss"] for r in resumed.history if "val/loss" in r]
    assert min(losses[3:]) > min(losses[:3])  # nothing after the resume beat the first best
    return before


def test_a_run_resumed_into_another_folder_writes_its_own_best_checkpoint(sine, tmp_path):
    """The checkpoint's best value was taken for the new folder's: a run resumed elsewhere that never
    beat the old folder's best wrote no best.pt there (evaluation then fell back to the last weights)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _resumed_past_its_best(sine, a, b)
    assert (b / "best.pt").is_file() and (a / "best.pt").is_file()


def test_a_stop_requested_in_on_fit_start_trains_no_iteration(sine):
    """should_stop set in on_fit_start was only read after an iteration: one iteration was trained
    (and validated) anyway."""
    class NoTrain(Log):
        def on_fit_start(self, state):
            super().on_fit_start(state)
            state.should_stop, state.stopped_by = True, "mine"

    learner, log = sine_learner(), NoTrain()
    state = run_loop(learner, sine, 3, val_every=2, val=sine, callbacks=[log])
    assert learner.iteration == 0 and state.stopped_by == "mine" and state.should_stop
    assert [c[0] for c in log.calls] == ["start", "fit_end"]


def test_a_run_folder_moved_with_its_best_checkpoint_keeps_its_best(sine, tmp_path):
    """A run folder copied elsewhere with its best.pt, then resumed there: the copied best.pt is this
    run's best, so later worse validations must not overwrite it."""
    a, b = tmp_path / "a", tmp_path / "b"
    before = _resumed_past_its_best(sine, a, b, copy=True)
    assert (b / "best.pt").read_bytes() == before


def test_setting_meta_lr_between_fits_changes_the_rate_trained_at_and_is_checked(sine):
    """learner.meta_lr was a plain attribute: set between fits it changed config() and checkpoints
    but the meta-optimizer kept training at the old rate."""
    from metamtl.callbacks import LRScheduler
    from metamtl.errors import ConfigError

    learner = sine_learner()
    learner.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    learner.meta_lr = 0.5
    learner.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    assert learner.history[-1]["train/lr"] == 0.5 == learner.config()["learner"]["meta_lr"]
    learner.fit(sine, iterations=1, meta_batch_size=2, progress=False, callbacks=[LRScheduler("step", step_size=100)])
    assert learner.history[-1]["train/lr"] == 0.5  # a new schedule starts from it
    for bad in (0, -1.0, "fast", float("nan")):
        with pytest.raises(ConfigError, match="meta_lr"):
            learner.meta_lr = bad
    assert learner.meta_lr == 0.5 and learner.meta_optimizer.param_groups[0]["lr"] == 0.5


def test_a_budget_given_as_a_numeric_string_is_taken_as_its_number(sine):
    """budget_minutes="0.002" passed fit's check and then failed with a bare TypeError."""
    learner = sine_learner()
    learner.fit(sine, iterations=10**6, meta_batch_size=2, budget_minutes="0.002", progress=False)
    assert learner.fit_state.budget_minutes == 0.002 and learner.fit_state.stopped_by == "budget"


def test_validation_and_checkpoint_settings_that_would_do_nothing_are_warned_about(sine, recwarn):
    """val_every / val_episodes without val_tasks and checkpoint_every without checkpoint_dir
    were silently ignored; the defaults (what configs pass) stay quiet."""
    learner = sine_learner()
    with pytest.warns(UserWarning, match=r"val_every=1, val_episodes=5 without val_tasks \(no validation runs\); "
                                         r"checkpoint_every=1 without checkpoint_dir"):
        learner.fit(sine, iterations=1, meta_batch_size=2, val_every=1, val_episodes=5, checkpoint_every=1, progress=False)
    recwarn.clear()
    learner.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    learner.fit(sine, sine, iterations=1, meta_batch_size=2, val_every=1, val_episodes=2, progress=False)
    assert not [w for w in recwarn if "does nothing" in str(w.message) or "without val_tasks" in str(w.message)]
    assert learner.iteration == 3


def test_a_continued_fit_with_another_meta_batch_size_is_refused_instead_of_repeating_episodes():
    """fit(mbs=4) then fit(mbs=2) trained on episodes 4-7 again (8-31 skipped with mbs=8)."""
    from metamtl.errors import ConfigError

    seen = []

    class Spy:
        def __init__(self, source):
            self.source, self.ways, self.shots, self.queries, self.name = source, source.ways, source.shots, source.queries, "spy"

        def episode(self, i):
            seen.append(i)
            return self.source.episode(i)

    spy = Spy(Sinusoid(shots=5, queries=5, seed=0))
    learner = sine_learner()
    learner.fit(spy, iterations=2, meta_batch_size=4, progress=False)
    for size in (2, 8):
        with pytest.raises(ConfigError, match=rf"meta_batch_size={size} but this learner's previous fit used 4: .* "
                                              r"Continue with meta_batch_size=4"):
            learner.fit(spy, iterations=1, meta_batch_size=size, progress=False)
    learner.fit(spy, iterations=0, progress=False)  # trains nothing: any size (the default 32)
    learner.fit(spy, iterations=1, meta_batch_size=4, progress=False)
    assert seen == list(range(12)) and learner.iteration == 3


def test_a_loaded_learner_keeps_the_meta_batch_size_a_continued_fit_must_use(tmp_path):
    """MetaLearner.load forgot the meta_batch_size of the saved learner's latest fit, so a continued fit
    after a load could repeat or skip episodes of the task stream unnoticed."""
    from metamtl import MetaLearner
    from metamtl.errors import CheckpointError, ConfigError

    sine = Sinusoid(shots=5, queries=5, seed=0)
    learner = sine_learner()
    learner.fit(sine, iterations=2, meta_batch_size=4, progress=False)
    path = learner.save(tmp_path / "l.pt")
    loaded = MetaLearner.load(path)
    with pytest.raises(ConfigError, match=r"meta_batch_size=2 but this learner's previous fit used 4"):
        loaded.fit(sine, iterations=1, meta_batch_size=2, progress=False)
    loaded.fit(sine, iterations=1, meta_batch_size=4, progress=False)
    assert loaded.iteration == 3
    fine_tuned = MetaLearner.load(path)  # other training tasks (fine-tuning): nothing repeated or skipped
    fine_tuned.fit(Sinusoid(shots=10, queries=10, seed=3), iterations=1, meta_batch_size=2, progress=False)
    with pytest.raises(ConfigError, match=r"meta_batch_size=4 but this learner's previous fit used 2"):
        fine_tuned.fit(Sinusoid(shots=10, queries=10, seed=3), iterations=1, meta_batch_size=4, progress=False)
    fresh = sine_learner().save(tmp_path / "fresh.pt")  # never trained: any size
    MetaLearner.load(fresh).fit(sine, iterations=1, meta_batch_size=2, progress=False)
    obj = torch.load(path, weights_only=True)
    obj["meta_batch_size"] = 0
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="meta_batch_size must be an integer >= 1"):
        MetaLearner.load(tmp_path / "bad.pt")


def test_meta_lr_set_between_fits_is_the_base_of_the_learners_own_schedule(sine):
    """A learner built with callbacks=[LRScheduler(...)] kept the base rate of its first fit: after
    learner.meta_lr = 0.5 it trained at 0.01 while config() said 0.5."""
    from metamtl.callbacks import LRScheduler

    learner = sine_learner(callbacks=[LRScheduler("step", step_size=1000)])
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    learner.meta_lr = 0.5
    learner.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    assert [r["train/lr"] for r in learner.history] == [0.01, 0.01, 0.5, 0.5]
    assert learner.meta_optimizer.param_groups[0]["lr"] == 0.5 == learner.config()["learner"]["meta_lr"]


def test_a_callback_shared_by_two_learners_gives_each_its_own_state_back(sine):
    """EarlyStopping passed to learner A, then B, then A again started A's third fit afresh (best None):
    the reset for B dropped A's best and patience count."""
    from metamtl.callbacks import Callback, EarlyStopping

    es, seen = EarlyStopping(patience=3), []
    kw = dict(iterations=2, meta_batch_size=2, val_every=1, val_episodes=2, progress=False)
    val = Sinusoid(shots=5, queries=5, seed=1)
    a, b = sine_learner(), sine_learner()
    a.fit(sine, val, callbacks=[es], **kw)
    a_best = es.state_dict()["best"]

    class Spy(Callback):
        def on_fit_start(self, state):
            seen.append(es.best)

    b.fit(sine, val, callbacks=[es, Spy()], **kw)
    a.fit(sine, val, callbacks=[es, Spy()], **kw)
    assert a_best is not None and seen[0] is None and seen[1] == a_best


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_fit_called_under_no_grad_or_inference_mode_trains_as_outside(sine, mode):
    """Before: fit under torch.no_grad() / inference_mode() failed with torch's bare "element 0 of
    tensors does not require grad" (evaluate and predict already worked under both)."""
    outside, inside = sine_learner(), sine_learner()
    outside.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    with mode():
        inside.fit(sine, iterations=2, meta_batch_size=2, progress=False)
    for a, b in zip(outside.model.parameters(), inside.model.parameters()):
        assert torch.equal(a, b) and not b.is_inference()
    inside.fit(sine, iterations=3, meta_batch_size=2, progress=False)  # and it trains on afterwards
