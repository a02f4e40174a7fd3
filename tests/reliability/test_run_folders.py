"""Run folders never lose a run: no silent overwrite, one writer at a time, a crashed writer
never leaves a folder locked.  Through ``metamtl fit`` (real processes where it matters),
``metamtl.experiment.run`` and ``MetaLearner.fit(checkpoint_dir=...)``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from metamtl.checkpoint import RunFolderLock, safe_load
from metamtl.cli import main
from metamtl.config import config_from_dict
from metamtl.errors import CheckpointError, ConfigError
from metamtl.experiment import run
from metamtl.tasks import EpisodeSampler

from .conftest import PYTHON, cli_env, sinusoid_config, tiny_learner, toy_dataset

pytestmark = pytest.mark.reliability("run_folder")


def write_config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "sine.yaml"
    path.write_text(yaml.safe_dump(sinusoid_config(tmp_path / "runs", **overrides)))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".metamtl.lock"}


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished `metamtl fit` run (checkpoints, metrics, results) and its config."""
    cfg = write_config(tmp_path, **{"logging.metrics": "csv", "data.val_split": "val"})
    assert main(["fit", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "sine"
    assert {"last.pt", "learner.pt", "metrics.csv", "results.json"} <= set(snapshot(run_dir))
    return cfg, run_dir


def test_fit_into_a_folder_holding_a_run_refuses_and_names_resume_and_overwrite(finished, capsys):
    cfg, run_dir = finished
    before = snapshot(run_dir)
    assert main(["fit", str(cfg), "train.iterations=40", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} already holds a run (last.pt, best.pt, learner.pt, results.json, history.json, metrics.csv)" in err
    assert f"--resume {run_dir / 'last.pt'}" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(run_dir) == before  # not a byte changed


def test_a_run_that_failed_before_its_first_iteration_does_not_block_the_next(tmp_path, capsys):
    """A failure found when training starts leaves only a metrics header: not a run to protect."""
    cfg = write_config(tmp_path, **{"logging.metrics": "csv", "model.in_features": 2})  # sine inputs have 1
    assert main(["fit", str(cfg), "--no-progress"]) == 2
    run_dir = tmp_path / "runs" / "sine"
    assert (run_dir / "metrics.csv").read_text() == "iteration,time,metric,value\n"
    capsys.readouterr()
    cfg = write_config(tmp_path, **{"logging.metrics": "csv"})
    assert main(["fit", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    assert len((run_dir / "metrics.csv").read_text().splitlines()) > 1


def test_resuming_from_a_checkpoint_that_does_not_exist_says_so(finished, capsys):
    cfg, run_dir = finished
    before = snapshot(run_dir)
    assert main(["fit", str(cfg), "--no-progress", "--resume", str(run_dir.parent / "last.pt")]) == 2
    err = capsys.readouterr().err  # was: "already holds a run ...: continue it with --resume" (it was given)
    assert f"cannot resume: checkpoint {run_dir.parent / 'last.pt'} does not exist (a run folder's resumable " \
           f"checkpoint is {run_dir / 'last.pt'})" in err
    assert snapshot(run_dir) == before


def test_overwrite_replaces_the_run_and_resume_continues_it(finished, capsys, caplog):
    cfg, run_dir = finished
    done = safe_load(run_dir / "last.pt")["iteration"]
    with caplog.at_level(logging.INFO, logger="metamtl"):  # said once loaded (the learner line before says 0)
        assert main(["fit", str(cfg), "train.iterations=40", "--no-progress", "--resume", str(run_dir / "last.pt")]) == 0
    assert f"resumed from {run_dir / 'last.pt'}: iteration {done}, " in caplog.text and 0 < done < 40
    assert safe_load(run_dir / "last.pt")["iteration"] == 40
    assert main(["fit", str(cfg), "train.iterations=10", "--no-progress", "--overwrite"]) == 0
    assert safe_load(run_dir / "last.pt")["iteration"] == 10
    assert len((run_dir / "metrics.csv").read_text().splitlines()) > 1


def test_experiment_run_refuses_a_used_folder_too(tmp_path):
    cfg = config_from_dict(sinusoid_config(tmp_path, **{"train.iterations": 5}))
    run(cfg, progress=False, quiet=True)
    with pytest.raises(ConfigError, match=r"already holds a run .* overwrite=True"):
        run(cfg, progress=False, quiet=True)
    assert run(cfg, progress=False, quiet=True, overwrite=True)["iterations"] == 5
    with pytest.raises(ConfigError, match=r"resume \(--resume\) continues the run and overwrite \(--overwrite\) deletes"):
        run(cfg, resume=cfg.run_dir / "last.pt", progress=False, quiet=True, overwrite=True)  # overwrite was ignored
    assert run(cfg, resume=cfg.run_dir / "last.pt", progress=False, quiet=True)["iterations"] == 5


def test_resuming_from_another_folder_into_a_used_one_is_refused(finished, tmp_path, capsys):
    cfg, run_dir = finished
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
    before = snapshot(run_dir)
    assert main(["fit", str(cfg), "--no-progress", "--resume", str(other / "last.pt")]) == 2
    assert f"the checkpoint to resume ({other / 'last.pt'}) is not in this run's folder, and {run_dir} already holds a run" \
        in capsys.readouterr().err
    assert snapshot(run_dir) == before


HOLDER = """
import sys, time
from metamtl.checkpoint import RunFolderLock
RunFolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "sine"
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["fit", str(cfg), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run_dir} is being written by another process (pid {holder.pid} on " in err
        assert not (run_dir / "last.pt").exists()
        with pytest.raises(CheckpointError, match="being written by another process"):
            tiny_learner().fit(EpisodeSampler(toy_dataset(), 5, 1, 2), iterations=1, meta_batch_size=1,
                               checkpoint_dir=run_dir, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
        holder.wait(30)
    assert (run_dir / ".metamtl.lock").exists()  # the file stays, the lock went with the process
    assert main(["fit", str(cfg), "--no-progress"]) == 0
    assert safe_load(run_dir / "last.pt")["iteration"] == 30
    assert not (run_dir / ".metamtl.lock").exists()  # a clean run removes its lock file


def test_temporary_files_a_killed_writer_left_are_removed_when_a_run_takes_the_folder(tmp_path):
    """Regression: a SIGKILLed atomic write leaves `.<name>.<hex>.tmp` (as large as a checkpoint) that nothing
    ever removed, although atomic_write's docstring promised no temporary file behind."""
    import os
    import time

    from metamtl.files import STALE_SECONDS

    stale = [tmp_path / ".last.pt.69c5f7a342e4.tmp", tmp_path / ".metrics.jsonl.0123456789ab.tmp"]
    kept = [tmp_path / ".notes.tmp", tmp_path / "last.pt.tmp", tmp_path / "data.txt"]  # not atomic_write's names
    live = tmp_path / ".report.html.fedcba987654.tmp"  # a writer without the lock (metamtl report) at work
    for f in stale + kept + [live]:
        f.write_bytes(b"partial")
    old = time.time() - STALE_SECONDS - 60
    for f in stale + kept:
        os.utime(f, (old, old))
    with RunFolderLock(tmp_path):
        assert [f.exists() for f in stale + kept + [live]] == [False, False, True, True, True, True]
        (tmp_path / ".best.pt.aaaaaaaaaaaa.tmp").write_bytes(b"")  # a re-entrant acquire removes nothing
        with RunFolderLock(tmp_path):
            assert (tmp_path / ".best.pt.aaaaaaaaaaaa.tmp").exists()


def test_two_real_fits_into_one_folder_the_second_refuses(tmp_path):
    """Two `metamtl fit` processes started together: exactly one trains, the other exits 2."""
    cfg = write_config(tmp_path, **{"train.iterations": 400})
    procs = [subprocess.Popen([PYTHON, "-m", "metamtl", "fit", str(cfg), "--no-progress"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env()) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert "is being written by another process" in loser or "already holds a run" in loser
    assert safe_load(tmp_path / "runs" / "sine" / "last.pt")["iteration"] == 400


def test_the_lock_is_reentrant_in_one_process_and_released_after_fit(tmp_path):
    ds = toy_dataset()
    tasks = EpisodeSampler(ds, 5, 1, 2)
    with RunFolderLock(tmp_path):
        learner = tiny_learner()
        learner.fit(tasks, iterations=2, meta_batch_size=1, checkpoint_dir=tmp_path, progress=False)
    other = subprocess.run([PYTHON, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path)],
                           capture_output=True, text=True, env=cli_env(), timeout=120)
    assert other.stdout.strip() == "locked", other.stderr  # nothing held once fit and the block ended


def test_two_threads_of_one_process_cannot_write_one_folder_together(tmp_path):
    """Regression: the lock was re-entrant for the whole process, so two fits in two threads wrote one folder
    together, overwriting each other's last.pt at every iteration without any error."""
    import threading

    held, done = threading.Event(), threading.Event()

    def holder():
        with RunFolderLock(tmp_path):
            held.set()
            done.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(CheckpointError, match=r"is being written by another run of this process \(thread "):
            tiny_learner().fit(EpisodeSampler(toy_dataset(), 5, 1, 2), iterations=1, meta_batch_size=1,
                               checkpoint_dir=tmp_path, progress=False)
        assert not (tmp_path / "last.pt").exists()
    finally:
        done.set()
        thread.join(60)
    with RunFolderLock(tmp_path):  # free again once the other thread released it
        pass


def test_fit_refuses_to_overwrite_another_learners_checkpoint(tmp_path):
    tasks = EpisodeSampler(toy_dataset(), 5, 1, 2)
    first = tiny_learner()
    first.fit(tasks, iterations=3, meta_batch_size=1, checkpoint_dir=tmp_path, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"last\.pt holds another training run \(iteration 3\).*resume="):
        tiny_learner().fit(tasks, iterations=2, meta_batch_size=1, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    resumed = tiny_learner()
    resumed.fit(tasks, iterations=5, meta_batch_size=1, checkpoint_dir=tmp_path, resume=tmp_path / "last.pt",
                progress=False)
    assert safe_load(tmp_path / "last.pt")["iteration"] == 5


def test_fit_called_again_trains_the_requested_iterations_more(tmp_path):
    """`fit(iterations=3)` then `fit(iterations=2)` is `fit(iterations=5)`: same episodes, optimizer
    state and weights, bit for bit; it never silently does nothing."""
    tasks = EpisodeSampler(toy_dataset(), 5, 1, 2)
    once = tiny_learner()
    once.fit(tasks, iterations=5, meta_batch_size=2, progress=False)
    twice = tiny_learner()
    twice.fit(tasks, iterations=3, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path)
    assert twice.iteration == 3
    twice.fit(tasks, iterations=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path)  # its own last.pt
    assert twice.iteration == 5 and safe_load(tmp_path / "last.pt")["iteration"] == 5
    assert [r["iteration"] for r in twice.history] == [r["iteration"] for r in once.history] == [1, 2, 3, 4, 5]
    for a, b in zip(once.model.parameters(), twice.model.parameters()):
        assert torch.equal(a, b)
    twice.fit(tasks, iterations=0, progress=False)
    assert twice.iteration == 5


def test_a_second_fit_into_the_folder_keeps_best_pt_the_best_of_the_whole_run(tmp_path):
    """fit called again continues the same run: best.pt is replaced only by better weights than
    any validation of the earlier calls, not by the second call's first (worse) validation."""
    tasks = EpisodeSampler(toy_dataset(), 5, 1, 2)
    learner, scores = tiny_learner(), iter([0.8, 0.4, 0.3])

    class Scored:  # validation accuracies 0.8 (first call), then 0.4 (second call) and 0.3 (another folder)
        def __init__(self):
            self.accuracy = next(scores)

        def metrics(self, prefix):
            return {f"{prefix}accuracy": self.accuracy}

    learner.evaluate = lambda *args, **kwargs: Scored()
    fit = dict(meta_batch_size=1, val_every=2, val_episodes=2, progress=False)
    learner.fit(tasks, tasks, iterations=2, checkpoint_dir=tmp_path, **fit)
    learner.fit(tasks, tasks, iterations=2, checkpoint_dir=tmp_path, **fit)
    assert [r["val/accuracy"] for r in learner.history if "val/accuracy" in r] == [0.8, 0.4]
    assert safe_load(tmp_path / "best.pt")["iteration"] == 2
    learner.fit(tasks, tasks, iterations=2, checkpoint_dir=tmp_path / "other", **fit)
    assert safe_load(tmp_path / "other" / "best.pt")["iteration"] == 6  # another folder's best.pt is not this one's


def test_a_history_holding_nan_still_recognises_the_runs_own_checkpoints(tmp_path):
    """A one-episode validation records undefined CIs (None; a skipped step a nan loss): the run's own last.pt
    and best.pt are still its own (nan == nan when histories are compared), so a second fit
    continues the folder, a resume continues it and restore_best uses best.pt."""
    from metamtl.experiment import restore_best

    tasks = EpisodeSampler(toy_dataset(), 5, 1, 2)
    fit = dict(meta_batch_size=1, val_every=1, val_episodes=1, progress=False, checkpoint_dir=tmp_path)
    learner = tiny_learner()
    learner.fit(tasks, tasks, iterations=2, **fit)
    assert any(v is None for row in learner.history for v in row.values())  # an undefined CI (null) in the history
    best = safe_load(tmp_path / "best.pt")["iteration"]
    assert restore_best(learner, tmp_path) == best
    learner.fit(tasks, tasks, iterations=1, **fit)  # continues its own last.pt
    resumed = tiny_learner()
    resumed.fit(tasks, tasks, iterations=4, resume=tmp_path / "last.pt", **fit)
    assert resumed.iteration == 4 and safe_load(tmp_path / "last.pt")["iteration"] == 4


def test_a_regression_run_evaluating_best_pt_names_its_validation_loss(tmp_path, capsys):
    """best.pt of a regression run is the best validation loss (was: 'best validation accuracy')."""
    cfg = write_config(tmp_path, **{"data.val_split": "val", "eval.checkpoint": "best", "train.iterations": 4,
                                    "train.val_every": 2, "train.val_episodes": 2})
    assert main(["fit", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "evaluating best.pt (best validation loss, iteration" in out and "validation accuracy" not in out, out


def test_overwrite_discards_the_replaced_runs_wandb_runs_and_resume_keeps_them(tmp_path):
    """--overwrite deleted the replaced run's files but not its W&B runs (<run_dir>/wandb), so the new
    run's report listed them and its `wandb sync` command uploaded the deleted run as this one's."""
    from metamtl.experiment import claim_run_dir

    cfg = config_from_dict(sinusoid_config(tmp_path, **{"train.iterations": 3}))
    run_dir = cfg.run_dir
    old = run_dir / "wandb" / "offline-run-20260101_000000-old"
    old.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    (run_dir / "last.pt").write_bytes(b"a checkpoint")
    claim_run_dir(cfg, resume=run_dir / "last.pt").release()  # a resumed run's parts: all this run's
    assert old.is_dir()
    claim_run_dir(cfg, overwrite=True).release()
    assert not (run_dir / "wandb").exists() and not (run_dir / "results.json").exists()


def test_the_recorded_commit_is_metamtls_not_that_of_a_repository_holding_an_installed_copy(tmp_path):
    """git_commit ran `git rev-parse HEAD` in the package folder: a non-editable install in a
    virtual environment inside the user's project wrote the project's HEAD into results.json and
    W&B as metamtl's commit."""
    import shutil
    import sys

    import metamtl
    from metamtl.environment import git_commit

    package = Path(metamtl.__file__).resolve().parent
    source = package.parent
    if (source / ".git").exists():  # this checkout: its own commit
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True)
        assert git_commit() == head.stdout.strip()
    project = tmp_path / "project"
    site = project / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=u"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "user project"], cwd=project, check=True)
    shutil.copytree(package, site / "metamtl", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import metamtl.environment as e; print(e.git_commit())"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "unknown"
