"""W&B logging: what an offline run recorded (read back from its .wandb file), and failures that
must never stop training."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from torch import nn

from metamtl import MetaLearner
from metamtl.algorithms import MAML
from metamtl.errors import ConfigError
from metamtl.models import build_model
from metamtl.reporting.wandb_logger import WandbLogger, has_api_key, learned_rates, resolve_mode
from metamtl.reporting.wandb_offline import find_run_file, read_offline_run

wandb = pytest.importorskip("wandb")


def test_offline_run_holds_config_metrics_table_summary_and_model(tiny_run):
    run_dir, results = tiny_run
    run = read_offline_run(run_dir)  # decodes run_dir/wandb/offline-run-*/run-*.wandb
    assert run.exit_code == 0 and run.project == "metamtl"
    # full resolved config + learner settings + system info
    assert run.config["algorithm"]["name"] == "maml" and run.config["train"]["iterations"] == 6
    assert run.config["learner"]["algorithm"]["steps"] == 2
    assert run.config["system"]["torch"] == torch.__version__ and "commit" in run.config["system"]

    train = {step: row for row in run.history if "train/loss" in row for step in [row["_step"]]}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]  # one row per meta-iteration, step = iteration
    hist = json.loads((run_dir / "history.json").read_text())
    local = {r["iteration"]: r for r in hist if "train/loss" in r}
    for step, row in train.items():
        assert row["train/loss"] == pytest.approx(local[step]["train/loss"])
        assert row["train/inner_loss/step_0"] == pytest.approx(local[step]["train/inner_loss/step_0"])
        assert row["train/inner_loss/step_1"] == pytest.approx(local[step]["train/inner_loss/step_1"])
        assert row["train/lr"] == pytest.approx(1e-3) and "lr/meta" not in row  # logged once, not under two keys
    val = dict(run.metric("val/accuracy"))
    assert sorted(val) == [3, 6]
    assert val[6] == pytest.approx([r for r in hist if "val/accuracy" in r][-1]["val/accuracy"])
    assert all("val/accuracy_ci95" in r for r in run.history if "val/accuracy" in r)

    for r in results["test"]:
        key = f"test/{r['ways']}w{r['shots']}s"
        assert run.summary[f"{key}/accuracy"] == pytest.approx(r["accuracy"])
        assert run.summary[f"{key}/accuracy_ci95"] == pytest.approx(r["ci95"])
    assert run.summary["fit/iterations"] == 6
    assert run.summary["fit/peak_memory_mb"] == pytest.approx(results["peak_memory_mb"])
    assert all(row["train/memory_mb"] == pytest.approx(local[step]["train/memory_mb"]) for step, row in train.items())

    # per-episode test accuracies as a W&B Table, written in the offline run's files
    table_file = next(run.run_dir.glob("files/media/table/test/episodes_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["setting", "episode", "accuracy", "loss"]
    expected = [["5w1s", i, a] for i, a in enumerate(results["test"][0]["per_episode_accuracy"])]
    assert [row[:3] for row in table["data"][:12]] == [[s, i, pytest.approx(a)] for s, i, a in expected]
    assert len(table["data"]) == 24

    model = [a for a in run.artifacts if a["type"] == "model"]
    assert len(model) == 1 and model[0]["files"] == ["learner.pt"] and "final" in model[0]["aliases"]
    assert model[0]["metadata"]["test/5w1s/accuracy"] == pytest.approx(results["test"][0]["accuracy"])
    assert run.environment.get("cpuCount") or run.environment.get("cpu_count") or run.environment


class LearnedRateMAML(MAML):
    """MAML with learnable tensors named like learned inner learning rates (logging test only)."""

    name = "learned_rate_test"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner_lr = nn.Parameter(torch.tensor(0.4))
        self.layer_lrs = nn.Parameter(torch.tensor([0.1, 0.2, 0.3]))
        self.other = nn.Parameter(torch.tensor(1.0))


def test_learned_rates_are_logged_generically(tmp_path, synthetic_tasks):
    assert learned_rates(LearnedRateMAML()) == {
        "lr/inner_lr": pytest.approx(0.4), "lr/layer_lrs/0": pytest.approx(0.1),
        "lr/layer_lrs/1": pytest.approx(0.2), "lr/layer_lrs/2": pytest.approx(0.3)}
    assert learned_rates(LearnedRateMAML(), small=2)["lr/layer_lrs/max"] == pytest.approx(0.3)
    logger = WandbLogger(mode="offline", run_dir=tmp_path, name="rates", config={"name": "rates"})
    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None)
    learner = MetaLearner(model, LearnedRateMAML(steps=1, head_init="zero"), device="cpu", callbacks=[logger])
    learner.fit(synthetic_tasks, iterations=3, meta_batch_size=2, progress=False)
    result = learner.evaluate(synthetic_tasks, 4, progress=False)
    logger.log_results([result])
    logger.finish()
    run = read_offline_run(tmp_path)
    assert [v for _, v in run.metric("lr/inner_lr")] == [pytest.approx(0.4)] * 3
    assert len(run.metric("lr/layer_lrs/2")) == 3 and not run.metric("lr/other")
    assert run.summary["test/5w1s/accuracy"] == pytest.approx(result.accuracy)
    assert run.config["learner"]["algorithm"]["name"] == "learned_rate_test"


def _fit_with(logger, tasks, tmp_path, iterations=4):
    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None)
    learner = MetaLearner(model, MAML(steps=1, head_init="zero"), device="cpu", callbacks=[logger])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.fit(tasks, iterations=iterations, meta_batch_size=2, checkpoint_dir=tmp_path / "ckpt",
                    progress=False)
        logger.log_results([learner.evaluate(tasks, 3, progress=False)], checkpoint=tmp_path / "ckpt" / "last.pt")
        logger.finish()
    wb = [w for w in caught if "W&B" in str(w.message)]
    return learner, wb


def test_init_failure_warns_once_and_training_continues(tmp_path, synthetic_tasks, monkeypatch):
    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("network is unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    learner, warned = _fit_with(WandbLogger(mode="online", run_dir=tmp_path), synthetic_tasks, tmp_path)
    assert learner.iteration == 4 and len([r for r in learner.history if "train/loss" in r]) == 4
    assert len(warned) == 1 and "init failed" in str(warned[0].message)
    assert (tmp_path / "ckpt" / "last.pt").is_file()


def test_unreachable_server_with_bad_key_does_not_stop_training(tmp_path, synthetic_tasks, monkeypatch):
    """A real online init against a closed port with a made-up key (no mock)."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    logger = WandbLogger(mode="online", run_dir=tmp_path, settings={"init_timeout": 2})
    learner, warned = _fit_with(logger, synthetic_tasks, tmp_path, iterations=2)
    assert learner.iteration == 2 and len(warned) == 1 and not logger.active


def test_unwritable_wandb_dir_does_not_stop_training(tmp_path, synthetic_tasks):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where W&B wants a folder")
    learner, warned = _fit_with(WandbLogger(mode="offline", run_dir=blocker), synthetic_tasks, tmp_path)
    assert learner.iteration == 4 and len(warned) == 1


def test_failure_mid_run_warns_once_and_training_continues(tmp_path, synthetic_tasks, monkeypatch):
    real_log = wandb.sdk.wandb_run.Run.log
    calls = {"n": 0}

    def flaky_log(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(28, "No space left on device")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", flaky_log)
    logger = WandbLogger(mode="offline", run_dir=tmp_path / "wb")
    learner, warned = _fit_with(logger, synthetic_tasks, tmp_path, iterations=6)
    assert learner.iteration == 6 and len(learner.history) >= 6
    assert len(warned) == 1 and "log failed" in str(warned[0].message) and "No space left" in str(warned[0].message)
    assert calls["n"] == 3  # switched off after the failure: no more W&B calls
    run = read_offline_run(tmp_path / "wb")
    assert sorted(s for s, _ in run.metric("train/loss")) == [1, 2]


def test_missing_wandb_package_does_not_stop_training(tmp_path, synthetic_tasks, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    learner, warned = _fit_with(WandbLogger(mode="offline", run_dir=tmp_path), synthetic_tasks, tmp_path)
    assert learner.iteration == 4 and len(warned) == 1 and "pip install wandb" in str(warned[0].message)


def test_mode_defaults_to_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode(None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "1" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled" and resolve_mode("offline") == "offline"
    with pytest.raises(ConfigError, match="unknown W&B mode 'onlin'"):
        WandbLogger(mode="onlin")


def test_a_netrc_that_cannot_be_decoded_means_no_api_key(tmp_path, monkeypatch):
    """A ~/.netrc holding bytes that are not UTF-8 made WandbLogger() raise before training."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_bytes(b"machine api.wandb.ai login user password \xff\xfe\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert has_api_key() is False
    assert WandbLogger(run_dir=tmp_path).mode == "offline"


def test_an_unknown_wandb_mode_in_the_environment_turns_wandb_off_and_training_goes_on(tmp_path, monkeypatch, synthetic_tasks):
    """A typo in $WANDB_MODE is the machine's setting, not the run's: warn, log nothing, train."""
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.warns(RuntimeWarning, match="WANDB_MODE='ofline' is not a W&B mode .* W&B logging is off"):
        logger = WandbLogger(run_dir=tmp_path)
    assert logger.mode == "disabled"
    learner, _ = _fit_with(logger, synthetic_tasks, tmp_path)
    assert learner.iteration == 4


def test_an_unknown_logging_mode_in_a_config_is_refused_when_it_loads():
    from metamtl.config import config_from_dict

    with pytest.raises(ConfigError, match="logging.mode must be one of online, offline, disabled or null .* got 'ofline'"):
        config_from_dict({"logging": {"mode": "ofline"}})


def test_find_run_file_errors_clearly(tmp_path):
    from metamtl.errors import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="no W&B run file"):
        find_run_file(tmp_path)


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_inner_rates_of_real_algorithms_reach_wandb(tmp_path, synthetic_tasks, name):
    from metamtl.algorithms import build_algorithm

    logger = WandbLogger(mode="offline", run_dir=tmp_path, name=name)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None)
    learner = MetaLearner(model, build_algorithm(name, steps=2, head_init="zero"), device="cpu",
                          meta_lr=0.05, callbacks=[logger])
    learner.fit(synthetic_tasks, iterations=3, meta_batch_size=2, progress=False)
    logger.finish()
    run = read_offline_run(tmp_path)
    keys = sorted({k for row in run.history for k in row if k.startswith("lr/lrs.")})
    assert keys, f"no learned learning rates logged for {name}"
    first, last = run.history[0], run.history[-1]
    assert any(first[k] != last[k] for k in keys if k in first and k in last)  # they are learned


def test_a_regression_ensemble_logs_each_members_error(tmp_path):
    """The members' rows of a regression ensemble (no accuracy) were left out of the W&B summary."""
    def row(loss):
        return {"accuracy": None, "ci95": None, "loss": loss, "loss_ci95": 0.1, "episodes": 10, "ways": 1, "shots": 5,
                "queries": 5, "steps": 1, "hierarchy": None, "head": "algorithm", "transductive": False,
                "per_episode_loss": [loss] * 10}

    logger = WandbLogger(mode="offline", run_dir=tmp_path, name="r", log_model=False, settings={"console": "off"})
    logger.log_evaluation({"test": [row(0.5)], "ensemble": {"members": [{"name": "member0", "test": [row(0.7)]},
                                                                        {"name": "member1", "test": [row(0.9)]}]}})
    summary = read_offline_run(tmp_path).summary
    assert summary["test/5shot/loss"] == 0.5
    assert {k: v for k, v in summary.items() if k.startswith("members/")} == {
        "members/member0/test/5shot/loss": 0.7, "members/member1/test/5shot/loss": 0.9}


def test_settings_that_differ_only_in_hierarchy_keep_their_own_keys_and_labels(tmp_path):
    """eval.settings may hold one setting at several superclass depths (or a depth and a mapping):
    each row keeps its own W&B key (one used to overwrite the other) and its own report and curve
    label; depth 1, the shipped configs' form, keeps the key ``-within`` the README names."""
    from metamtl.reporting.report import _setting
    from metamtl.steps_curve import _setting as curve_setting

    def row(acc, hierarchy):
        return {"accuracy": acc, "ci95": 0.01, "loss": 1.0, "loss_ci95": 0.1, "episodes": 10, "ways": 5, "shots": 1,
                "queries": 15, "steps": 1, "hierarchy": hierarchy, "head": "algorithm", "transductive": False,
                "per_episode_accuracy": [acc] * 10, "per_episode_loss": [1.0] * 10}

    rows = [row(0.9, None), row(0.6, 1), row(0.4, 2), row(0.3, "mapping of 12 classes")]
    labels = [_setting(r) for r in rows]
    assert labels == ["5-way 1-shot", "5-way 1-shot within one superclass (depth 1)",
                      "5-way 1-shot within one superclass (depth 2)",
                      "5-way 1-shot within one superclass (mapping of 12 classes)"]
    assert [curve_setting(r, None, False) for r in rows[:3]] == labels[:3]
    logger = WandbLogger(mode="offline", run_dir=tmp_path, name="h", log_model=False, settings={"console": "off"})
    logger.log_evaluation({"test": rows})
    logger.finish()
    summary = read_offline_run(tmp_path).summary
    assert {k: v for k, v in summary.items() if k.endswith("/accuracy")} == {
        "test/5w1s/accuracy": 0.9, "test/5w1s-within/accuracy": 0.6, "test/5w1s-within2/accuracy": 0.4,
        "test/5w1s-withinmap/accuracy": 0.3}


def test_a_failure_during_the_test_evaluation_marks_the_wandb_run_failed(tiny_config, monkeypatch):
    """A Ctrl-C (or CUDA OOM, ...) after fit, in the held-out evaluation, left the W&B run to the
    atexit hook, which finished it as a success (exit code 0) with no test results."""
    import metamtl.experiment as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "evaluate_held_out", interrupted)
    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg, progress=False, quiet=True)
    assert read_offline_run(cfg.run_dir, wait=5).exit_code == 1


def test_two_hierarchy_mappings_of_one_setting_keep_their_own_keys(tmp_path):
    """Rows carry only a mapping's size ("mapping of 12 classes"): two mappings of one setting shared
    the key -withinmap, the second overwriting the first's accuracy and CI and table label."""
    def row(acc, hierarchy, head="algorithm"):
        return {"accuracy": acc, "ci95": 0.01, "loss": 1.0, "loss_ci95": 0.1, "episodes": 2, "ways": 5, "shots": 1,
                "queries": 15, "steps": 1, "hierarchy": hierarchy, "head": head, "transductive": False,
                "per_episode_accuracy": [acc] * 2, "per_episode_loss": [1.0] * 2}

    rows = [row(0.2, "mapping of 12 classes"), row(0.25, "mapping of 12 classes", "simpleshot"),
            row(0.3, "mapping of 12 classes"), row(0.35, "mapping of 12 classes", "simpleshot")]
    logger = WandbLogger(mode="offline", run_dir=tmp_path, name="m", log_model=False, settings={"console": "off"})
    logger.log_evaluation({"test": rows, "ensemble": {"members": [{"name": "member0", "test": rows[:3:2]}]}})
    summary = read_offline_run(tmp_path).summary
    assert {k: v for k, v in summary.items() if k.endswith("/accuracy")} == {
        "test/5w1s-withinmap/accuracy": 0.2, "test/5w1s-withinmap/simpleshot/accuracy": 0.25,
        "test/5w1s-withinmap2/accuracy": 0.3, "test/5w1s-withinmap2/simpleshot/accuracy": 0.35,
        "members/member0/test/5w1s-withinmap/accuracy": 0.2, "members/member0/test/5w1s-withinmap2/accuracy": 0.3}


def _tiny_learner(logger, *callbacks, **kwargs):
    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None)
    return MetaLearner(model, MAML(steps=1, head_init="zero"), device="cpu", callbacks=[logger, *callbacks], **kwargs)


def test_a_logger_reused_for_a_new_learner_starts_a_new_wandb_run(tmp_path, synthetic_tasks, monkeypatch):
    """A WandbLogger that had resumed a run kept that run's id: the next, unrelated learner of a sweep
    was sent to the old W&B run (online: id=<old>, resume="allow")."""
    real_init, sent = wandb.init, []

    def spy(**kwargs):  # what an online init would send; the run itself is written offline
        sent.append(kwargs.pop("id", None))
        kwargs.pop("resume", None)
        return real_init(**{**kwargs, "mode": "offline"})

    monkeypatch.setattr(wandb, "init", spy)
    first = WandbLogger(mode="online", run_dir=tmp_path)
    _tiny_learner(first).fit(synthetic_tasks, iterations=2, meta_batch_size=2, checkpoint_dir=tmp_path / "a", progress=False)
    first.finish()
    sweep = WandbLogger(mode="online", run_dir=tmp_path)
    _tiny_learner(sweep).fit(synthetic_tasks, iterations=3, meta_batch_size=2, checkpoint_dir=tmp_path / "a",
                             resume=tmp_path / "a" / "last.pt", progress=False)
    sweep.finish()
    _tiny_learner(sweep).fit(synthetic_tasks, iterations=2, meta_batch_size=2, progress=False)
    sweep.finish()
    assert sent[0] is None and sent[1] is not None and sent[2] is None


def test_a_training_error_keeps_the_wandb_run_id_in_last_pt(tmp_path, synthetic_tasks):
    """After too many non-finite steps the logger finished its run before ModelCheckpoint rewrote
    last.pt, which then had no W&B run id: resuming it started another W&B run."""
    from metamtl.callbacks import Callback
    from metamtl.errors import TrainingError

    class NaNGrads(Callback):
        def on_after_backward(self, state):
            if state.learner.iteration >= 2:
                for p in state.learner.model.parameters():
                    p.grad.fill_(float("nan"))

    learner = _tiny_learner(WandbLogger(mode="offline", run_dir=tmp_path), NaNGrads(), max_bad_steps=2)
    with pytest.raises(TrainingError):
        learner.fit(synthetic_tasks, iterations=10, meta_batch_size=2, checkpoint_dir=tmp_path / "ck",
                    checkpoint_every=1, progress=False)
    saved = torch.load(tmp_path / "ck" / "last.pt", weights_only=False)["training"]["callbacks"]
    assert saved.get("WandbLogger") == {"run_id": read_offline_run(tmp_path).run_id}


def test_a_run_that_failed_before_training_leaves_no_wandb_run_to_the_next(tiny_config):
    """The folder of a run that failed before its first iteration is taken without --overwrite; its
    W&B run stayed in wandb/, and the next run's report listed it for upload as that run's own."""
    from metamtl.callbacks import Callback
    from metamtl.experiment import run

    class Crash(Callback):
        def on_iteration_start(self, state):
            raise RuntimeError("failure before the first iteration")

    cfg = tiny_config()
    with pytest.raises(RuntimeError, match="before the first iteration"):
        run(cfg, progress=False, quiet=True, callbacks=[Crash()])
    assert len(list((cfg.run_dir / "wandb").glob("offline-run-*"))) == 1
    run(tiny_config(), progress=False, quiet=True)
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and read_offline_run(runs[0]).exit_code == 0


def test_an_offline_resume_continues_the_same_wandb_run(tiny_config):
    """A resumed offline run started a new W&B run (another id), silently: after `wandb sync` the two
    parts were unrelated runs.  Now each part has its own folder under the first part's id and the
    resumed part's steps continue the first's."""
    from metamtl.experiment import run

    cfg = tiny_config()
    run(cfg, progress=False, quiet=True)
    run(tiny_config(train={"iterations": 5}), resume=cfg.run_dir / "last.pt", progress=False, quiet=True)
    parts = [read_offline_run(f) for f in sorted((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(parts) == 2 and parts[0].run_id == parts[1].run_id
    assert [[s for s, _ in p.metric("train/loss")] for p in parts] == [[1, 2, 3], [4, 5]]


def test_a_wandb_that_cannot_resume_offline_starts_a_new_run_and_says_so(tmp_path, synthetic_tasks, monkeypatch):
    real_init, sent = wandb.init, []

    def no_offline_resume(**kwargs):
        sent.append(kwargs.get("id"))
        if "id" in kwargs:
            raise wandb.errors.UsageError("resume is not supported offline")
        return real_init(**kwargs)

    first = WandbLogger(mode="offline", run_dir=tmp_path)
    _tiny_learner(first).fit(synthetic_tasks, iterations=2, meta_batch_size=2, checkpoint_dir=tmp_path / "a", progress=False)
    first.finish()
    first_id = read_offline_run(tmp_path).run_id
    monkeypatch.setattr(wandb, "init", no_offline_resume)
    logger = WandbLogger(mode="offline", run_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match=f"cannot continue run {first_id} offline .*logs to a new W&B run"):
        _tiny_learner(logger).fit(synthetic_tasks, iterations=3, meta_batch_size=2, checkpoint_dir=tmp_path / "a",
                                  resume=tmp_path / "a" / "last.pt", progress=False)
    logger.finish()
    assert sent == [first_id, None] and logger.state_dict()["run_id"] != first_id


def test_find_run_file_takes_the_latest_run_not_the_last_folder_name(tmp_path):
    """Two runs started in the same second: their folder names differ only by the random run id, and
    find_run_file took the larger id, the older run."""
    import os

    files = []
    for i, rid in enumerate(("zzzz1111", "aaaa2222")):  # the older one first
        folder = tmp_path / "wandb" / f"offline-run-20260101_000000-{rid}"
        folder.mkdir(parents=True)
        files.append(folder / f"run-{rid}.wandb")
        files[-1].write_bytes(b":W&B")
        os.utime(files[-1], ns=(10**18 + i * 10**9,) * 2)
    (tmp_path / "wandb" / "latest-run").symlink_to(files[1].parent.name)
    assert find_run_file(tmp_path).parent.name == files[1].parent.name
    assert find_run_file(tmp_path / "wandb").parent.name == files[1].parent.name
    (tmp_path / "wandb" / "latest-run").unlink()  # no link (a copied folder): the file written last
    assert find_run_file(tmp_path) == files[1] and find_run_file(tmp_path / "wandb") == files[1]


@pytest.mark.parametrize("where", [20, 0.5])
def test_a_corrupt_wandb_file_is_a_data_error_naming_the_file(tmp_path, where):
    """A damaged .wandb file raised protobuf's bare DecodeError, or (flipped bytes elsewhere) was read
    with no error at all: each chunk's checksum is now checked."""
    from metamtl.errors import DataError

    logger = WandbLogger(mode="offline", run_dir=tmp_path / "run", log_model=False, settings={"console": "off"})
    logger.log_evaluation({"test": []})
    read_offline_run(tmp_path / "run")
    data = bytearray(find_run_file(tmp_path / "run").read_bytes())
    data[where if isinstance(where, int) else int(len(data) * where)] ^= 0xFF
    (tmp_path / "bad.wandb").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.wandb: corrupt W&B record at byte \d+"):
        read_offline_run(tmp_path / "bad.wandb", wait=0)


def test_tags_given_as_one_string_are_refused_not_split_into_letters():
    """WandbLogger(tags="baseline") sent eight one-letter tags to W&B (list("baseline"))."""
    assert WandbLogger(mode="offline", tags=["baseline", "v2"]).tags == ["baseline", "v2"]
    assert WandbLogger(mode="offline", tags=None).tags == []
    with pytest.raises(ConfigError, match=r"tags must be a list of strings, got the string 'baseline': write tags=\['baseline'\]"):
        WandbLogger(mode="offline", tags="baseline")
    with pytest.raises(ConfigError, match="tags must be strings, got 2024"):
        WandbLogger(mode="offline", tags=["baseline", 2024])


def test_a_run_that_crashed_during_training_keeps_its_wandb_runs_from_the_next(tiny_config):
    """A run with logging.metrics: null that crashed during training (before its first checkpoint)
    left only wandb/, its one record; the next run in the folder deleted it unasked. It now counts as a
    run in the folder: refused without --overwrite, replaced with it."""
    from metamtl.callbacks import Callback
    from metamtl.errors import ConfigError
    from metamtl.experiment import run

    class Crash(Callback):
        def on_iteration_start(self, state):
            if state.iteration >= 2:
                raise RuntimeError("failure during training")

    cfg = tiny_config(logging={"metrics": None})
    with pytest.raises(RuntimeError, match="during training"):
        run(cfg, progress=False, quiet=True, callbacks=[Crash()])
    crashed = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(crashed) == 1 and read_offline_run(crashed[0]).history
    with pytest.raises(ConfigError, match=rf"already holds a run \(wandb/{crashed[0].name}\).*--overwrite"):
        run(tiny_config(logging={"metrics": None}), progress=False, quiet=True)
    assert crashed[0].is_dir()
    staged = tiny_config(logging={"metrics": None}, stages=[{"name": "pre"}, {"name": "fine"}])
    with pytest.raises(ConfigError, match=r"stage 'fine': .* already holds a run \(wandb/"):
        run(staged, progress=False, quiet=True)  # refused before any stage trains
    assert not (cfg.run_dir / "stages").exists()
    run(tiny_config(logging={"metrics": None}), progress=False, quiet=True, overwrite=True)
    runs = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs != crashed and read_offline_run(runs[0]).exit_code == 0
