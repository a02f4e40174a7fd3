"""Faults during a run lose nothing: killed writers, Ctrl-C/SIGTERM, non-finite steps, full or
read-only disks.  Real processes are killed and real signals sent where it matters.

Related tests elsewhere: ``tests/core/test_learner.py::test_non_finite_steps_are_skipped_then_stop``
(parameters unchanged after skipped steps) and ``::test_resume_is_bit_exact``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from metamtl import MetaLearner
from metamtl.callbacks import Callback
from metamtl.checkpoint import atomic_save, safe_load
from metamtl.config import config_from_dict
from metamtl.errors import CheckpointError, ConfigError, FitInterrupted, TrainingError
from metamtl.experiment import run
from metamtl.tasks import EpisodeSampler

from .conftest import PYTHON, REPO, cli_env, sinusoid_config, tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("fault")


def wait_for(condition, timeout: float = 60.0, every: float = 0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting for the subprocess")


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# -- atomic checkpoints: SIGKILL a real writer in the middle of a write ----------------------------

WRITER = """
import sys, torch
from metamtl.checkpoint import atomic_save
i = 0
while True:
    i += 1
    atomic_save({"format": "metamtl-checkpoint", "format_version": 1, "step": i,
                 "weights": torch.full((4_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.parametrize("moment", ["while-the-temp-file-is-written", "just-after-a-completed-write"])
def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, moment):
    """A 16 MB checkpoint is rewritten in a loop; the writer is SIGKILLed mid-write."""
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([PYTHON, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=cli_env())
    done: list[int] = []
    reader = threading.Thread(target=lambda: done.extend(int(line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: len(done) >= 2)
        if moment == "while-the-temp-file-is-written":
            wait_for(lambda: temp_files(tmp_path), every=0.001)
        else:
            n = len(done)
            wait_for(lambda: len(done) > n, every=0.001)
        proc.kill()
    finally:
        proc.kill()
        proc.wait(30)
    reader.join(5)
    obj = safe_load(path)  # loadable, and a complete write: every value is its step
    assert done[-1] <= obj["step"] <= done[-1] + 1
    assert torch.equal(obj["weights"], torch.full((4_000_000,), float(obj["step"])))
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.pt"] == [p.name for p in temp_files(tmp_path)]
    atomic_save({"format": "metamtl-checkpoint", "step": 0}, path)  # the folder is still usable
    assert safe_load(path)["step"] == 0


# -- SIGINT / SIGTERM during `metamtl fit`: resumable checkpoint, exit 130/143, resume completes ---


def write_config(tmp_path: Path, out: Path, **overrides) -> Path:
    cfg = sinusoid_config(out, **{"train.val_every": 10**6, "train.checkpoint_every": 25, **overrides})
    path = tmp_path / f"sine-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metamtl(*args, limit_file_size: int | None = None, **popen) -> subprocess.Popen:
    def child_setup():  # default Ctrl-C behaviour even if our parent ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_file_size is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.Popen([PYTHON, "-m", "metamtl", *map(str, args), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO,
                            preexec_fn=child_setup, start_new_session=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def interrupt_when_training(proc: subprocess.Popen, run_dir: Path, signum: int, group: bool = False) -> None:
    """Send ``signum`` once the run has written its first periodic checkpoint (so fit is running)."""
    wait_for(lambda: (run_dir / "last.pt").exists() or proc.poll() is not None, timeout=120)
    assert proc.poll() is None, proc.communicate()
    (os.killpg if group else os.kill)(proc.pid, signum)


def test_sigint_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "a", **{"train.iterations": 5000})
    proc = metamtl("fit", cfg)
    interrupt_when_training(proc, tmp_path / "a" / "sine", signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err
    assert "Traceback" not in err
    stopped = int(re.search(r"SIGINT received: meta-training stopped after iteration (\d+); resumable checkpoint: (\S+)", err).group(1))
    ckpt = tmp_path / "a" / "sine" / "last.pt"
    assert 25 <= stopped < 5000 and safe_load(ckpt)["iteration"] == stopped
    assert not (tmp_path / "a" / "sine" / "results.json").exists()  # no evaluation after the stop

    total = stopped + 12
    resumed = write_config(tmp_path, tmp_path / "a", **{"train.iterations": total})
    code, _, err = finish(metamtl("fit", resumed, "--resume", ckpt))
    assert code == 0, err
    fresh = write_config(tmp_path, tmp_path / "b", **{"train.iterations": total})
    code, _, err = finish(metamtl("fit", fresh))
    assert code == 0, err

    a, b = (safe_load(tmp_path / d / "sine" / "learner.pt") for d in ("a", "b"))
    assert a["iteration"] == b["iteration"] == total
    for key, value in b["model_state"].items():
        assert torch.equal(a["model_state"][key], value), key
    losses = lambda obj: [r["train/loss"] for r in obj["history"] if "train/loss" in r]  # noqa: E731
    assert losses(a) == losses(b) and len(losses(a)) == total
    # the resumed run's training time is the whole run's, the interrupted part included
    before = next(r["time"] for r in a["history"] if r.get("iteration") == stopped)
    seconds = json.loads((tmp_path / "a" / "sine" / "results.json").read_text())["train_seconds"]
    assert seconds >= a["history"][-1]["time"] > before > 0


def test_sigterm_to_the_process_group_with_workers_then_disk_full_then_resume(tmp_path):
    """SIGTERM to every process (as a batch scheduler sends it) with DataLoader workers; the resumed
    run then hits a file-size limit (a full disk) at its first checkpoint; a last resume completes."""
    run_dir = tmp_path / "out" / "sine"
    cfg = write_config(tmp_path, tmp_path / "out", **{"train.iterations": 5000, "tasks.num_workers": 1})
    proc = metamtl("fit", cfg)
    interrupt_when_training(proc, run_dir, signal.SIGTERM, group=True)
    code, _, err = finish(proc)
    assert code == 143, err
    assert "SIGTERM received: meta-training stopped after iteration" in err and "Traceback" not in err
    stopped = safe_load(run_dir / "last.pt")["iteration"]
    before = (run_dir / "last.pt").read_bytes()

    longer = write_config(tmp_path, tmp_path / "out", **{"train.iterations": stopped + 60})
    code, _, err = finish(metamtl("fit", longer, "--resume", run_dir / "last.pt", limit_file_size=16_000))
    assert code == 2, err
    assert re.search(r"metamtl: error: could not write checkpoint .*last.pt: File too large. Nothing was "
                     r"replaced: the previous checkpoint there is intact", err), err
    assert "Traceback" not in err
    assert (run_dir / "last.pt").read_bytes() == before and not temp_files(run_dir)

    code, _, err = finish(metamtl("fit", longer, "--resume", run_dir / "last.pt"))
    assert code == 0, err
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == stopped + 60


# -- signals inside Python: second signal, handler restore, threads, default checkpoint path ------


class SendSignal(Callback):
    def __init__(self, at: int, *signums: int) -> None:
        self.at, self.signums = at, signums

    def on_iteration_end(self, state, metrics):
        if state.iteration == self.at:
            for signum in self.signums:
                os.kill(os.getpid(), signum)


@pytest.fixture
def tasks():
    return EpisodeSampler(toy_dataset(), 5, 1, 2, seed=0)


def test_sigterm_in_python_saves_last_pt_and_resume_is_exact(tmp_path, tasks):
    reference = tiny_learner()
    reference.fit(tasks, iterations=6, meta_batch_size=2, progress=False)
    learner = tiny_learner()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(FitInterrupted) as info:
        learner.fit(tasks, iterations=6, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path,
                    callbacks=[SendSignal(3, signal.SIGTERM)])
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    exc = info.value
    assert exc.exit_code == 143 and exc.iteration == 3 and exc.checkpoint == tmp_path / "last.pt"
    assert not isinstance(exc, Exception)  # `except Exception` cannot swallow a stop request
    resumed = tiny_learner()
    before = [p.detach().clone() for p in resumed.model.parameters()]
    with pytest.raises(ConfigError, match=r"last.pt is at iteration 3, past iterations=2: on resume, iterations is the total"):
        resumed.fit(tasks, iterations=2, meta_batch_size=2, progress=False, resume=exc.checkpoint)  # would train nothing
    assert resumed.iteration == 0 and all(torch.equal(a, b) for a, b in zip(before, resumed.model.parameters()))
    resumed.fit(tasks, iterations=6, meta_batch_size=2, progress=False, resume=exc.checkpoint)
    for a, b in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.fit_state.stopped_by == "iterations"  # not the interrupted fit's SIGTERM


def test_fit_interrupted_copies_and_pickles_with_its_signal_iteration_and_checkpoint(tmp_path):
    """Regression: FitInterrupted could not be copied or unpickled (its __init__ needs signum and iteration),
    so a fit interrupted in a worker process broke the whole process pool."""
    import copy
    import pickle

    exc = FitInterrupted("SIGTERM received: stopped", signal.SIGTERM, 3, tmp_path / "last.pt")
    for back in (copy.copy(exc), copy.deepcopy(exc), pickle.loads(pickle.dumps(exc))):
        assert type(back) is FitInterrupted and str(back) == "SIGTERM received: stopped"
        assert (back.signum, back.iteration, back.checkpoint, back.exit_code) == (signal.SIGTERM, 3, tmp_path / "last.pt", 143)
    assert str(exc) == "SIGTERM received: stopped" and exc.args == ("SIGTERM received: stopped",)


def test_without_checkpoint_dir_the_interrupt_checkpoint_goes_to_the_working_folder(tmp_path, tasks, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learner = tiny_learner()
    with pytest.raises(FitInterrupted, match=rf"SIGINT received: meta-training stopped after iteration 2; resumable checkpoint: {re.escape(str(tmp_path))}/metamtl-interrupted.pt") as info:
        learner.fit(tasks, iterations=5, meta_batch_size=1, progress=False, callbacks=[SendSignal(2, signal.SIGINT)])
    assert info.value.exit_code == 130
    assert info.value.checkpoint == tmp_path / "metamtl-interrupted.pt"  # absolute: right after a chdir too
    assert MetaLearner.load(tmp_path / "metamtl-interrupted.pt").iteration == 2


def test_an_interrupt_without_checkpoint_dir_never_overwrites_another_runs_checkpoint(tmp_path, tasks, monkeypatch):
    """Regression: a second, different run interrupted in the same folder silently replaced the first one's
    metamtl-interrupted.pt, losing its iterations."""
    monkeypatch.chdir(tmp_path)
    first, other = tiny_learner(), tiny_learner(meta_lr=0.01)
    with pytest.raises(FitInterrupted):
        first.fit(tasks, iterations=9, meta_batch_size=1, progress=False, callbacks=[SendSignal(3, signal.SIGINT)])
    with pytest.raises(FitInterrupted) as info:
        other.fit(tasks, iterations=9, meta_batch_size=1, progress=False, callbacks=[SendSignal(1, signal.SIGINT)])
    path = info.value.checkpoint
    assert path.parent == tmp_path and path.name.startswith("metamtl-interrupted-") and path.suffix == ".pt"
    assert str(path) in str(info.value) and safe_load(path)["iteration"] == 1
    assert safe_load(tmp_path / "metamtl-interrupted.pt")["iteration"] == 3  # the first run's, kept
    with pytest.raises(FitInterrupted) as again:  # the first run interrupted again: its own file is updated
        first.fit(tasks, iterations=9, meta_batch_size=1, progress=False, callbacks=[SendSignal(5, signal.SIGINT)])
    assert again.value.checkpoint == tmp_path / "metamtl-interrupted.pt"
    assert safe_load(tmp_path / "metamtl-interrupted.pt")["iteration"] == 5


def test_a_second_signal_aborts_at_once_without_a_new_checkpoint(tmp_path, tasks):
    learner = tiny_learner()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(FitInterrupted, match="second SIGINT: aborted during iteration 3") as info:
        learner.fit(tasks, iterations=5, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path,
                    checkpoint_every=1, callbacks=[SendSignal(2, signal.SIGINT, signal.SIGINT)])
    assert info.value.checkpoint is None and info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is previous
    # the abort came before iteration 2's periodic checkpoint: the one of iteration 1 is intact
    assert safe_load(tmp_path / "last.pt")["iteration"] == 1


class SignalInCleanUp(Callback):
    """A clean-up slow enough (wandb.finish()) for the user to press Ctrl-C again during it."""

    def on_exception(self, state, exc):
        os.kill(os.getpid(), signal.SIGINT)


class RecordCleanUp(Callback):
    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def on_exception(self, state, exc):
        self.seen.append(exc)


def test_a_second_signal_during_the_clean_up_keeps_the_saved_checkpoint_and_every_clean_up(tmp_path, tasks):
    """Regression: a second Ctrl-C in a callback's on_exception (after the first one's checkpoint was written)
    raised 'aborted ... without saving it' with checkpoint None, skipped the later callbacks' clean-up and left
    the run folder locked."""
    record = RecordCleanUp()
    with pytest.raises(FitInterrupted, match="SIGINT received: meta-training stopped after iteration 2; resumable checkpoint") as info:
        tiny_learner().fit(tasks, iterations=5, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path,
                           callbacks=[SendSignal(2, signal.SIGINT), SignalInCleanUp(), record])
    assert info.value.checkpoint == tmp_path / "last.pt" and info.value.iteration == 2
    assert safe_load(tmp_path / "last.pt")["iteration"] == 2
    assert record.seen == [info.value]  # the clean-up after the interrupted one ran
    assert not (tmp_path / ".metamtl.lock").exists()  # ModelCheckpoint's clean-up released the folder


class TrainHelper(Callback):
    """Trains a small helper learner at iteration 2 of the outer fit; Ctrl-C arrives during it."""

    def __init__(self, tasks) -> None:
        self.tasks, self.helper = tasks, None

    def on_iteration_end(self, state, metrics):
        if state.iteration == 2:
            self.helper = tiny_learner()
            self.helper.fit(self.tasks, iterations=3, meta_batch_size=1, progress=False,
                            callbacks=[SendSignal(1, signal.SIGINT)])


def test_a_signal_during_a_fit_nested_in_a_callback_stops_and_saves_the_outer_run(tmp_path, tasks, monkeypatch):
    """Regression: the nested fit took over the outer one's handler: it raised its own FitInterrupted (naming
    its metamtl-interrupted.pt) through the outer fit, which saved nothing of its own run."""
    monkeypatch.chdir(tmp_path)
    helper = TrainHelper(tasks)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(FitInterrupted, match="SIGINT received: meta-training stopped after iteration 2") as info:
        tiny_learner().fit(tasks, iterations=5, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path / "run",
                           callbacks=[helper])
    assert info.value.checkpoint == tmp_path / "run" / "last.pt" and safe_load(info.value.checkpoint)["iteration"] == 2
    assert helper.helper.iteration == 3  # the nested fit is part of the outer iteration: it completes
    assert not (tmp_path / "metamtl-interrupted.pt").exists()
    assert signal.getsignal(signal.SIGINT) is previous


def test_ignored_signals_stay_ignored_and_threads_leave_handlers_alone(tasks):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. nohup'ed / background jobs
    try:
        learner = tiny_learner()
        learner.fit(tasks, iterations=3, meta_batch_size=1, progress=False, callbacks=[SendSignal(1, signal.SIGTERM)])
        assert learner.iteration == 3 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    errors = []

    def train():
        try:
            tiny_learner().fit(tasks, iterations=2, meta_batch_size=1, progress=False)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(120)
    assert not errors and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# -- non-finite loss or gradient -------------------------------------------------------------------


def test_non_finite_steps_stop_after_the_configured_count_keeping_the_last_good_parameters(tmp_path):
    """An inner learning rate of 1e30 makes every loss non-finite; train.max_bad_steps comes from YAML."""
    cfg = config_from_dict(sinusoid_config(tmp_path, **{"algorithm.lr": 1e30, "train.max_bad_steps": 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingError, match="3 consecutive non-finite meta-gradients; stopping with the last good parameters") as info:
            run(cfg, progress=False, quiet=True)
    skipped = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert skipped == [f"iteration {i}: non-finite loss or meta-gradient; step skipped ({i}/3 consecutive)" for i in (1, 2, 3)]
    assert f"the last good parameters are saved in {tmp_path / 'sine' / 'last.pt'}" in info.value.__notes__
    saved = MetaLearner.load(tmp_path / "sine" / "last.pt")
    torch.manual_seed(0)  # run() seeds with cfg.seed = 0 before building the model: the initial weights
    from metamtl.models import build_model

    initial = build_model("mlp", hidden=[16, 16], in_features=1, out_features=1)
    for a, b in zip(initial.parameters(), saved.model.parameters()):
        assert torch.equal(a, b)


class PoisonGradients(Callback):
    """NaN meta-gradients at the given iterations (1-based), as a numerical blow-up would give."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def on_after_backward(self, state):
        if state.iteration + 1 in self.bad:
            next(iter(state.learner.model.parameters())).grad.fill_(float("nan"))


def test_isolated_non_finite_steps_are_skipped_and_training_goes_on(tasks):
    learner = tiny_learner(max_bad_steps=3)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        learner.fit(tasks, iterations=8, meta_batch_size=1, progress=False, callbacks=[PoisonGradients({3, 6, 7})])
    assert learner.iteration == 8
    skipped = [r["iteration"] for r in learner.history if r.get("train/skipped")]
    assert skipped == [3, 6, 7]
    steps = {int(s["step"]) for s in learner.meta_optimizer.state_dict()["state"].values()}
    assert steps == {5}  # Adam stepped on the 5 good iterations only
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())


# -- disk full and read-only output ----------------------------------------------------------------


def test_disk_full_while_checkpointing_keeps_the_previous_file_and_the_state_in_memory(tmp_path, tasks, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def fill_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint write runs out of space half-way
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_disk)
    learner = tiny_learner()
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last.pt: No space left on device. Nothing was replaced: the previous checkpoint there is intact"):
        learner.fit(tasks, iterations=6, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert safe_load(tmp_path / "last.pt")["iteration"] == 2 and not temp_files(tmp_path)
    # in memory: exactly the state after iteration 4, which can be saved elsewhere and resumed
    reference = tiny_learner()
    reference.fit(tasks, iterations=4, meta_batch_size=2, progress=False)
    assert learner.iteration == 4
    for a, b in zip(reference.model.parameters(), learner.model.parameters()):
        assert torch.equal(a, b)
    learner.save(tmp_path / "elsewhere.pt", training_state=True)
    reference.fit(tasks, iterations=6, meta_batch_size=2, progress=False, resume=None)
    resumed = tiny_learner()
    resumed.fit(tasks, iterations=6, meta_batch_size=2, progress=False, resume=tmp_path / "elsewhere.pt")
    full = tiny_learner()
    full.fit(tasks, iterations=6, meta_batch_size=2, progress=False)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def without_permission_override() -> list[str]:
    """Command prefix making a child obey file permissions: root normally ignores them, so as root
    the child runs without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (util-linux ``setpriv``)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only for a child")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_read_only_output_directory_is_a_clear_error_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cfg = tmp_path / "sine.yaml"
    cfg.write_text(yaml.safe_dump(sinusoid_config(ro)))
    out = subprocess.run([*without_permission_override(), PYTHON, "-m", "metamtl", "fit", str(cfg), "--no-progress"],
                         capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr
    assert re.search(r"metamtl: error: cannot (write to|create) the output directory .*ro/sine .*(Permission denied|Read-only)", out.stderr), out.stderr
    assert "Traceback" not in out.stderr and list(ro.iterdir()) == []


def test_checkpoint_folder_that_turns_read_only_mid_run(tmp_path, tasks, monkeypatch):
    """Permissions change under a running fit: the write is refused with a clear error, the old
    checkpoint stays and the learner in memory is intact (simulated: root ignores chmod)."""
    learner = tiny_learner()
    learner.fit(tasks, iterations=2, meta_batch_size=1, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*last.pt: Read-only file system"):
        learner.save(tmp_path / "last.pt", training_state=True)
    monkeypatch.setattr(os, "open", real_open)
    assert safe_load(tmp_path / "last.pt")["iteration"] == 2
    learner.fit(tasks, iterations=3, meta_batch_size=1, progress=False, resume=tmp_path / "last.pt")
    assert learner.iteration == 3


def _small_run_dir(path: Path) -> Path:
    path.mkdir()
    config = {"data": {"name": "omniglot"}, "algorithm": {"name": "maml"}, "model": {"name": "conv4"},
              "tasks": {}, "train": {}}
    (path / "results.json").write_text(json.dumps({"name": "r", "config": config, "test": []}))
    (path / "history.json").write_text("[]")
    return path


def test_results_curves_and_reports_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails midway (here: the file size limit, as a full disk would) leaves the
    previous report.html, comparison page and steps_curve.json intact, and no temporary file: every
    one goes through checkpoint.atomic_write (temp file, fsync, rename), as results.json and
    history.json do (atomic_write_json, below)."""
    import resource

    from metamtl.reporting.report import write_comparison, write_report
    from metamtl.steps_curve import write_failure

    run = _small_run_dir(tmp_path / "r")
    other = tmp_path / "other"
    writes = {run / "report.html": lambda: write_report(run),
              other / "cmp.html": lambda: write_comparison([run], other / "cmp.html"),
              run / "steps_curve.json": lambda: write_failure(run, ValueError("x" * 20000))}
    monkeypatch.setattr("metamtl.reporting.plots.plot_comparison", lambda *a, **k: None)  # no PNGs: text only
    other.mkdir()
    for path in writes:
        path.write_text('{"error": "the previous file"}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        for write in writes.values():
            with pytest.raises(OSError, match="File too large"):
                write()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing replaced, no temp file left


def test_a_serializer_failing_after_partial_output_leaves_the_previous_file(tmp_path, monkeypatch):
    from metamtl.files import atomic_write_json

    path = tmp_path / "history.json"
    path.write_text("[1, 2]")

    def partial_dump(obj, fh, **kw):
        fh.write('[{"iteration": 1, "train/lo')
        raise TypeError("Object of type Tensor is not JSON serializable")

    monkeypatch.setattr(json, "dump", partial_dump)
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, [{"iteration": 1}])
    assert path.read_text() == "[1, 2]" and [p.name for p in tmp_path.iterdir()] == ["history.json"]
