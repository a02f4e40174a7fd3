"""benchmarks/common.py and reliability_counts.py: what the records of RESULTS.md say."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def common(benchmark_script):
    return benchmark_script("common")


def _cpuinfo(tmp_path, family: str, model: str, name: str = "AMD EPYC") -> str:
    path = tmp_path / f"cpuinfo-{family}-{model}"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                    f"model name\t: {name}\n")
    return str(path)


def test_the_machine_label_names_the_cpu_generation_as_results_md_does(common, tmp_path):
    """Every 2-core CPU was stamped "CPU-2c", which RESULTS.md defines as another machine than
    CPU-2c-zen4 / CPU-2c-zen3."""
    assert common.cpu_label(2, cpuinfo=_cpuinfo(tmp_path, "25", "17")) == "CPU-2c-zen4"
    assert common.cpu_label(2, cpuinfo=_cpuinfo(tmp_path, "25", "1")) == "CPU-2c-zen3"
    unknown = common.cpu_label(2, cpuinfo=_cpuinfo(tmp_path, "23", "49"))
    assert unknown == "CPU-2c (AMD EPYC, family 23 model 49)"
    # a run recorded on another CPU model: no generation read from this machine
    assert common.cpu_label(2, "Intel Xeon", cpuinfo=_cpuinfo(tmp_path, "25", "17")) == "CPU-2c"


def test_fuzz_table_counts_anything_else(benchmark_script):
    rc = benchmark_script("reliability_counts")
    lines = rc.table({}, {"config": {"worked": 8, "library_error": 139, "other": 2}, "cli": {"worked": 1}})
    assert "| config | 149 | 8 | 139 | 2 |" in lines
    assert "| cli | 1 | 1 | 0 | 0 |" in lines
    assert "| **all** | **150** | 9 | 139 | 2 |" in lines


def test_a_section_without_its_end_marker_is_refused_up_front_and_the_file_kept(common, tmp_path):
    """A start marker without its end marker crashed the section writer with a bare IndexError
    after the whole run (the measured table lost)."""
    from metamtl.errors import InputError

    path = tmp_path / "RESULTS.md"
    text = "# r\n\n## Speed\n\n<!-- speed:start -->\nold table\n\n## Memory\n\nkeep me\n"
    path.write_text(text)
    with pytest.raises(InputError, match="<!-- speed:end -->"):
        common.check_section("speed", path)
    with pytest.raises(InputError, match="<!-- speed:end -->"):
        common.write_section("speed", "Speed", ["new table"], path=path)
    path.write_text(text + "<!-- speed:end -->\n<!-- speed:end -->\n")
    with pytest.raises(InputError, match="2 `<!-- speed:end -->`"):
        common.write_section("speed", "Speed", ["new table"], path=path)
    assert path.read_text() == text + "<!-- speed:end -->\n<!-- speed:end -->\n"


def test_write_section_replaces_only_its_block_leaving_no_temporary_file(common, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# r\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\nkeep me\n")
    common.write_section("speed", "Speed", ["new"], path=path)
    assert path.read_text() == "# r\n\n<!-- speed:start -->\nnew\n<!-- speed:end -->\n\nkeep me\n"
    common.write_section("tta", "Time", ["t"], path=path, heading="###")
    assert path.read_text().endswith("keep me\n\n### Time\n\n<!-- tta:start -->\nt\n<!-- tta:end -->\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]
    fresh = tmp_path / "new" / "R.md"  # gpu_check --results to a file not there yet
    common.write_section("gpu", "GPU check", ["row"], path=fresh)
    assert fresh.read_text().startswith("# metamtl results\n\n## GPU check\n\n<!-- gpu:start -->\nrow\n")


def test_run_conditions_say_whether_an_exclusive_flock_is_actually_held(common, tmp_path):
    """speed.py wrote "(under `flock -x`)" and memory.py "(under the bench lock; ...)" whatever ran."""
    import shutil
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "print(common.exclusive_lock_held(), common.run_conditions())")
    bench = str(common.REPO / "benchmarks")
    plain = subprocess.run([sys.executable, "-c", code, bench], capture_output=True, text=True, check=True).stdout
    if common.exclusive_lock_held():  # this test run itself is under `flock -x` (e.g. a timed make test)
        assert plain.startswith("True under an exclusive flock, load average ")
    else:
        assert plain.startswith("False no exclusive flock held, load average ")
    if shutil.which("flock") is None or not (common.Path("/proc/locks")).is_file():
        pytest.skip("needs flock(1) and /proc/locks")
    locked = subprocess.run(["flock", "-x", str(tmp_path / "lock"), sys.executable, "-c", code, bench],
                            capture_output=True, text=True, check=True).stdout
    assert locked.startswith("True under an exclusive flock, load average ")


def test_compare_plot_title_comes_from_the_runs_budget_and_episodes(benchmark_script):
    """The title was always "Same 10-minute CPU training budget per method (600 test episodes each)"."""
    compare = benchmark_script("compare_algorithms")

    def row(label, budget, episodes):
        return {"label": label, "budget_minutes": budget, "results": {"5-way 1-shot": (0.9, 0.01, episodes, 1)}}

    assert compare.plot_title([row("A", 1, 100), row("B", 1.0, 100)]) == \
        "Same 1-minute training budget per method (100 test episodes each)"
    assert compare.plot_title([row("A", 10, 600), row("B", None, 200)]) == \
        "Training budgets: A 10 min, B no budget (200-600 test episodes)"


def _bench_args(**kw):
    import argparse

    base = dict(budget_minutes=None, device="cpu", episodes=10, output_dir="/tmp/bench-out", wandb=False,
                overrides=[], settings=["20w1s"], one_learner=False)
    return argparse.Namespace(**{**base, **kw})


def test_budget_minutes_0_anneals_a_budget_schedule_over_the_iterations(common):
    """The documented `omniglot.py --budget-minutes 0 train.iterations=20000` failed with a
    ConfigError traceback: the configs anneal `over: budget`, and no budget was left."""
    path = common.REPO / "configs" / "benchmarks" / "omniglot_20w1s.yaml"
    cfg = common.build_config(path, _bench_args(budget_minutes=0, overrides=["train.iterations=20000"]), [])
    assert cfg.train.budget_minutes is None and cfg.train.iterations == 20000
    assert cfg.train.scheduler.over == "iterations" and cfg.train.scheduler.name == "cosine"
    kept = common.build_config(path, _bench_args(budget_minutes=3), [])
    assert kept.train.scheduler.over == "budget" and kept.train.budget_minutes == 3
    plain = common.build_config(path, _bench_args(budget_minutes=0, overrides=["train.scheduler=null"]), [])
    assert plain.train.scheduler is None


def test_run_settings_prints_a_config_mistake_without_a_traceback(common, capsys):
    args = _bench_args(budget_minutes=0, overrides=["train.scheduler.over=budget"])
    with pytest.raises(SystemExit) as exc:
        common.run_settings(args, "omniglot", [], "d", "omniglot", "t")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: train.scheduler.over: 'budget' needs train.budget_minutes" in err and "Traceback" not in err


@pytest.mark.parametrize("prefix, orders", [("omniglot", (["5w1s", "20w1s"], ["20w1s", "5w1s"])),
                                            ("miniimagenet", (["5w1s", "5w5s"], ["5w5s", "5w1s"]))])
def test_one_learner_trains_one_shared_learner_whatever_the_settings_order(common, monkeypatch, prefix, orders):
    """`--settings 20w1s 5w1s --one-learner` trained two learners (only a later setting extending
    the first one was grouped), doubling the CPU time."""
    calls = []
    monkeypatch.setattr(common, "run_and_record", lambda cfg, args, ov, *rest: calls.append((cfg.name, ov)))
    for order in orders:
        common.run_settings(_bench_args(settings=order, one_learner=True), prefix, [], "d", prefix, "t")
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0][0] == f"{prefix}_5w1s.yaml" and calls[0][1][-1] == f"name={prefix}_{'_'.join(orders[0])}_shared"
    calls.clear()
    common.run_settings(_bench_args(settings=["20w1s", "20w1s_alphabet"], one_learner=True), "omniglot", [], "d",
                        "omniglot", "t")
    assert [c[0] for c in calls] == ["omniglot_20w1s.yaml", "omniglot_20w1s_alphabet.yaml"]  # other data split


@pytest.mark.parametrize("argv, forwarded", [(["-k", "nomatch", "-x"], ["-k", "nomatch", "-x"]),
                                             (["--", "-k", "a or b"], ["-k", "a or b"]),
                                             (["tests/reliability/test_fuzz.py", "-q"], ["tests/reliability/test_fuzz.py", "-q"])])
def test_reliability_counts_passes_pytest_options_on(benchmark_script, monkeypatch, capsys, argv, forwarded):
    """`reliability_counts.py -k nomatch` failed with "unrecognized arguments: -k", though its help
    offers extra pytest arguments."""
    import sys

    rc = benchmark_script("reliability_counts")
    given = []
    monkeypatch.setattr(rc, "run", lambda extra: given.append(extra) or ({}, {}, 0, 0.0))
    monkeypatch.setattr(rc, "write", lambda lines: pytest.fail("no --write given: nothing to record"))
    monkeypatch.setattr(sys, "argv", ["reliability_counts.py", *argv])
    with pytest.raises(SystemExit) as exc:
        rc.main()
    assert exc.value.code == 0 and given == [forwarded]
