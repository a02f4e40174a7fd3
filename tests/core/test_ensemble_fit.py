"""`ensemble: {members: N}` in a config: N members trained side by side (one process each), then
their ensemble evaluated, saved and reported; `metamtl evaluate` reads the ensemble file."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_stages import staged

from metamtl import MetaLearner
from metamtl.callbacks import EarlyStopping
from metamtl.checkpoint import safe_load
from metamtl.cli import main
from metamtl.config import config_from_dict, load_config
from metamtl.ensemble import Ensemble
from metamtl.ensemble_fit import member_configs
from metamtl.errors import ConfigError, MetamtlError
from metamtl.experiment import build_test_tasks, run, setting_tasks


def plain(tmp_path, **extra):
    """test_stages' tiny config without stages, with two heads and an offline W&B run."""
    cfg = staged(tmp_path, **{"name": "ens", "stages": [], **extra})
    cfg["train"]["iterations"] = 4
    cfg["eval"].update(episodes=6, heads=["algorithm", "simpleshot"])
    cfg["logging"].update(report=True, metrics="csv", report_steps_episodes=0, wandb=True, mode="offline")
    return cfg


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ensfit")
    cfg = config_from_dict(plain(tmp, ensemble={"members": 2}))
    return cfg, run(cfg, progress=False, quiet=True)


def test_members_train_with_their_own_seeds_and_the_rows_are_their_averaged_probabilities(ensemble_run):
    cfg, results = ensemble_run
    members = results["ensemble"]["members"]
    assert [(m["name"], m["seed"], m["tasks_seed"]) for m in members] == [("member0", 0, 0), ("member1", 1, 1)]
    assert results["ensemble"]["threads"] >= 1 and results["iterations"] == 8
    learners = [MetaLearner.load(cfg.run_dir / "members" / f"member{i}" / "learner.pt", device="cpu") for i in (0, 1)]
    p0, p1 = (next(iter(m.model.parameters())) for m in learners)
    assert not torch.equal(p0, p1)  # other seeds: other members
    saved = Ensemble.load(results["checkpoint"], device="cpu")
    assert len(saved) == 2 and torch.equal(next(iter(saved.members[1].model.parameters())), p1)
    # the held-out row is the ensemble of the members' saved learners on the test episodes (not one
    # member's row); Ensemble's own averaging is checked against hand-averaged probabilities in
    # tests/evaluation/test_ensemble.py
    tasks = setting_tasks(build_test_tasks(cfg), cfg.eval.settings[0], cfg)
    by_hand = Ensemble(learners).evaluate(tasks, cfg.eval.episodes, progress=False).to_dict()
    assert results["test"][0]["per_episode_loss"] == pytest.approx(by_hand["per_episode_loss"], abs=1e-6)
    assert all(len(m["test"]) == 2 for m in members)  # each member alone, for comparison
    page = (cfg.run_dir / "report.html").read_text()
    assert "Ensemble of <b>2</b> members" in page and "Member <b>member1</b> (seed 1)" in page
    assert "<b>8</b> meta-iterations in total over its 2 members" in page  # 4 each, not 8 each
    assert 'href="members/member1/report.html"' in page  # the members' accuracy-vs-steps curves
    assert json.loads((cfg.run_dir / "results.json").read_text())["checkpoint"] == results["checkpoint"]


def test_wandb_records_the_ensemble_rows_and_each_member_its_own_run(ensemble_run):
    pytest.importorskip("wandb")
    from metamtl.reporting.wandb_offline import read_offline_run

    cfg, results = ensemble_run
    rows = {r["head"]: r for r in results["test"]}
    run = read_offline_run(cfg.run_dir)  # the ensemble's run: its rows, one key per head
    assert run.exit_code == 0 and run.config["ensemble"]["members"] == 2
    assert run.summary["test/3w1s/accuracy"] == pytest.approx(rows["algorithm"]["accuracy"])
    assert run.summary["test/3w1s/simpleshot/accuracy"] == pytest.approx(rows["simpleshot"]["accuracy"])
    alone = results["ensemble"]["members"][1]["test"][0]
    assert run.summary["members/member1/test/3w1s/accuracy"] == pytest.approx(alone["accuracy"])
    member = read_offline_run(cfg.run_dir / "members" / "member0")  # each member logged its training
    assert member.metric("train/loss") and member.config["logging"]["tags"] == ["ensemble:ens"]


def test_metamtl_report_rebuilds_an_ensemble_runs_page(ensemble_run):
    cfg, _ = ensemble_run
    (cfg.run_dir / "report.html").unlink()
    assert main(["report", str(cfg.run_dir), "--no-progress"]) == 0
    assert "Ensemble of <b>2</b> members" in (cfg.run_dir / "report.html").read_text()
    assert not (cfg.run_dir / "steps_curve.json").exists()  # no learner.pt to compute one from


def test_each_member_is_an_ordinary_config_file(ensemble_run):
    cfg, _ = ensemble_run
    member = load_config(cfg.run_dir / "members" / "member1.yaml")
    assert (member.seed, member.tasks.seed, member.ensemble.members) == (1, 1, 1)
    assert member.run_dir == cfg.run_dir / "members" / "member1"
    assert (cfg.run_dir / "members" / "member1.log").read_text().count("held-out test") == 2  # one per head


def test_metamtl_evaluate_reads_an_ensemble_file(ensemble_run, tmp_path, capsys):
    cfg, results = ensemble_run
    out = tmp_path / "e.json"
    assert main(["evaluate", results["checkpoint"], "--episodes", "6", "--queries", "2", "--no-progress",
                 "--json", str(out)]) == 0
    assert "Ensemble(2 members" in capsys.readouterr().out
    assert json.loads(out.read_text())["per_episode_loss"] == pytest.approx(results["test"][0]["per_episode_loss"],
                                                                           abs=1e-6)
    # an ensemble file and a learner file together: three members
    assert main(["evaluate", results["checkpoint"], str(cfg.run_dir / "members" / "member0" / "learner.pt"),
                 "--episodes", "2", "--no-progress"]) == 0
    assert "Ensemble(3 members" in capsys.readouterr().out


def test_the_ensemble_is_evaluated_on_train_device(ensemble_run, tmp_path, monkeypatch):
    """The members were loaded on device "auto" (a GPU when there is one) whatever train.device said."""
    import metamtl.run_state as run_state
    from metamtl.experiment import _evaluate_ensemble

    cfg, _ = ensemble_run
    seen, load = [], run_state.learner_from_state
    monkeypatch.setattr(run_state, "learner_from_state",
                        lambda *a, device="auto", **k: (seen.append(device), load(*a, device=device, **k))[1])
    data = cfg.to_dict()
    data.update(output_dir=str(tmp_path), logging={"report": False, "wandb": False})
    data["train"]["device"] = "cpu"
    other = config_from_dict(data)  # its members: the fixture's
    _evaluate_ensemble(other, other, member_configs(cfg), None, {"commit": None, "date": "", "train_seconds": 0.0},
                       False, lambda *a: None)
    assert seen == ["cpu", "cpu"]


def test_a_staged_config_trains_every_stage_in_every_member(tmp_path):
    cfg = config_from_dict(staged(tmp_path, ensemble={"members": 2, "threads": 1}))
    results = run(cfg, progress=False, quiet=True)
    assert [[s["stage"] for s in m["stages"]] for m in results["ensemble"]["members"]] == [["pretrain", "meta"]] * 2
    assert results["ensemble"]["threads"] == 1 and len(results["test"]) == 1


def test_member_seeds_and_task_seeds(tmp_path):
    cfg = config_from_dict(plain(tmp_path, seed=3, tasks={"ways": 3, "seed": 10}, ensemble={"members": 2, "seeds": [5, 9]}))
    assert [(n, c.seed, c.tasks.seed) for n, c in member_configs(cfg)] == [("member0", 5, 12), ("member1", 9, 16)]


def test_one_member_with_a_seed_trains_with_that_seed(tmp_path):
    """``{members: 1, seeds: [7]}`` is the config with seed 7 (its task seed moved by as much), not seed 3."""
    cfg = config_from_dict(plain(tmp_path, seed=3, tasks={"ways": 3, "seed": 10}, ensemble={"members": 1, "seeds": [7]}))
    assert (cfg.seed, cfg.tasks.seed, cfg.ensemble.seeds) == (7, 14, None)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_member_seeds_below_the_seed_keep_a_valid_task_seed(tmp_path):
    """``seed: 5, ensemble.seeds: [0]``: tasks.seed 0 moved by -5 wraps modulo 2**63 (it was -5, which a
    run trained with and saved, and which its saved config, ``metamtl evaluate`` and the members refused)."""
    one = config_from_dict(plain(tmp_path / "one", seed=5, tasks={"ways": 3}, ensemble={"members": 1, "seeds": [0]}))
    assert (one.seed, one.tasks.seed) == (0, 2**63 - 5)
    assert config_from_dict(one.to_dict()).to_dict() == one.to_dict()  # what a saved learner reloads
    two = config_from_dict(plain(tmp_path / "two", seed=5, tasks={"ways": 3}, ensemble={"members": 2, "seeds": [0, 6]}))
    assert [(c.seed, c.tasks.seed) for _, c in member_configs(two)] == [(0, 2**63 - 5), (6, 1)]


def test_a_stages_own_task_seed_moves_with_the_member_seed(tmp_path):
    """Stage ``pre`` sets tasks.seed 7: each member draws its own episodes there too (both drew seed 7)."""
    from metamtl.config import stage_configs

    data = staged(tmp_path, seed=3, ensemble={"members": 2})
    data["stages"][0]["tasks"]["seed"] = 7
    seeds = [[(c.seed, c.tasks.seed) for _, c in stage_configs(m)] for _, m in member_configs(config_from_dict(data))]
    assert seeds == [[(3, 7), (3, 0)], [(4, 8), (4, 1)]]
    one = config_from_dict({**data, "ensemble": {"members": 1, "seeds": [5]}})
    assert [(c.seed, c.tasks.seed) for _, c in stage_configs(one)] == [(5, 9), (5, 2)]


@pytest.mark.parametrize("ensemble, message", [
    ({"members": 2, "seeds": [-1, 1]}, r"ensemble.seeds entries must be integers in 0..2\*\*63-1, got -1"),
    ({"members": 0}, "ensemble.members must be >= 1"),
    ({"members": 2, "threads": 0}, "ensemble.threads must be >= 1"),
    ({"members": 2, "seeds": [1]}, "ensemble.seeds has 1 entries for 2 members"),
    ({"members": 2, "seeds": [1, 1]}, "ensemble.seeds must differ"),
    ({"member": 2}, "Did you mean 'members'"),
])
def test_bad_ensemble_settings_are_refused(tmp_path, ensemble, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(plain(tmp_path, ensemble=ensemble))


def test_resume_and_callbacks_are_refused_with_the_way_to_do_it(tmp_path):
    cfg = config_from_dict(plain(tmp_path, ensemble={"members": 2}))
    last = tmp_path / "last.pt"
    last.write_bytes(b"x")
    with pytest.raises(ConfigError, match="resume each unfinished member"):
        run(cfg, resume=last, progress=False, quiet=True)
    with pytest.raises(ConfigError, match="callbacks cannot reach"):
        run(cfg, progress=False, quiet=True, callbacks=[EarlyStopping()])
    with pytest.raises(ConfigError, match="must hold Callback instances"):  # not a callback at all: said first
        run(cfg, progress=False, quiet=True, callbacks=[object()])


def test_members_holding_a_run_are_refused_before_their_config_and_log_are_written(tmp_path):
    """Rerunning a stopped ensemble: it was refused only by each member, after every member's yaml and
    log had been rewritten (the stopped run's logs lost, its resume command pointing at a new config)."""
    cfg = config_from_dict(plain(tmp_path, ensemble={"members": 2}))
    members = cfg.run_dir / "members"
    (members / "member1").mkdir(parents=True)
    (members / "member1" / "last.pt").write_bytes(b"x")
    for i in (0, 1):
        (members / f"member{i}.yaml").write_text("the stopped run's config")
        (members / f"member{i}.log").write_text("the stopped run's log")
    with pytest.raises(ConfigError, match=r"ensemble member member1: .*member1 already holds a run \(last.pt\)"
                                          r"(.|\n)*--resume .*member1/last.pt(.|\n)*--overwrite"):
        run(cfg, progress=False, quiet=True)
    assert [(members / f"member{i}.{ext}").read_text() for i in (0, 1) for ext in ("yaml", "log")] == [
        "the stopped run's config", "the stopped run's log"] * 2


def test_a_failing_member_stops_the_run_and_shows_its_log(tmp_path):
    data = plain(tmp_path, ensemble={"members": 2})
    data["data"]["train_split"] = "no_such_split"  # the members fail loading it; the test split is fine
    with pytest.raises(MetamtlError, match=r"ensemble member member\d failed(.|\n)*no_such_split"):
        run(config_from_dict(data), progress=False, quiet=True)


def test_ctrl_c_stops_every_member_with_a_resumable_checkpoint(tmp_path):
    data = plain(tmp_path, ensemble={"members": 2})
    data["train"].update(iterations=100_000, checkpoint_every=100_000)  # runs until interrupted
    data["logging"].update(wandb=False, report=False)
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(data))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "metamtl", "fit", str(path), "--no-progress"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    members = tmp_path / "runs" / "ens" / "members"
    deadline = time.monotonic() + 120
    while not all((members / f"member{i}" / "metrics.csv").is_file() and
                  (members / f"member{i}" / "metrics.csv").stat().st_size > 200 for i in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None, "the members did not start training"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (to the ensemble's process only)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 128 + signal.SIGINT, out
    assert f"metamtl fit {members}/memberI.yaml --resume {members}/memberI/last.pt" in out
    for i in (0, 1):  # each member finished its iteration and saved where it stood
        state = safe_load(members / f"member{i}" / "last.pt")
        assert 0 < state["iteration"] < 100_000
        assert "SIGTERM received" in (members / f"member{i}.log").read_text()
