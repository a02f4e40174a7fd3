"""HTML reports: files exist, images referenced exist, numbers match results.json, the
accuracy-vs-inner-steps evaluation is right, and several runs compare on one page."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from metamtl.cli import main
from metamtl.errors import ConfigError
from metamtl.reporting.report import write_comparison, write_report
from metamtl.steps_curve import accuracy_vs_steps, default_steps


def _images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def _check_images(html_path: Path) -> list[str]:
    srcs = _images(html_path.read_text())
    for src in srcs:
        png = html_path.parent / src
        assert png.is_file(), src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return srcs


def test_run_report_has_plots_and_final_accuracy(tiny_run):
    run_dir, results = tiny_run
    report = Path(results["report"])
    assert report == run_dir / "report.html" and report.is_file()
    text = report.read_text()
    srcs = _check_images(report)
    assert {"accuracy.png", "learning_curves.png", "inner_loss.png", "steps_curve.png"} <= set(srcs)
    for r in results["test"]:
        assert f"{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}%" in text
    assert "not the official evaluation alphabets" in text  # says which Omniglot protocol
    assert "MAML 98.70%" in text  # published reference next to the 5-way 1-shot row
    # peak memory of the run: the highest per-iteration peak, as measured, in results and report
    hist = json.loads((run_dir / "history.json").read_text())
    per_iteration = [r["train/memory_mb"] for r in hist if "train/memory_mb" in r]
    assert len(per_iteration) == results["iterations"] and min(per_iteration) > 50  # RSS of a torch process
    assert results["peak_memory_mb"] == pytest.approx(max(per_iteration))
    assert results["memory"] == {"measure": "rss", "mode": "full", "plan": None}
    assert results["precision"] == "fp32"  # as computed (a `precision: auto` run records its choice)
    assert f"peak memory <b>{results['peak_memory_mb']:.0f} MB</b> (process resident set)" in text
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched


def test_accuracy_vs_inner_steps_is_evaluated_correctly(tiny_run):
    run_dir, results = tiny_run
    curve = json.loads((run_dir / "steps_curve.json").read_text())
    assert curve["steps"] == [0, 1, 2] and curve["episodes"] == 6 and curve["split"] == "test"
    one_shot, two_shot = curve["curves"]
    assert one_shot["setting"] == "5-way 1-shot" and two_shot["setting"] == "5-way 2-shot"
    # zero head, no adaptation: all logits equal, argmax is class 0 -> exactly 1/5 (balanced queries)
    assert one_shot["mean"][0] == pytest.approx(0.2) and two_shot["mean"][0] == pytest.approx(0.2)
    assert one_shot["ci95"][0] == pytest.approx(0.0)
    # the point at the evaluation step count is the final test evaluation's first episodes
    for c, r in zip(curve["curves"], results["test"]):
        assert r["steps"] == 2
        assert c["mean"][2] == pytest.approx(sum(r["per_episode_accuracy"][:6]) / 6)
    assert curve["trained_steps"] == 2
    assert default_steps(3) == [0, 1, 2, 3, 4, 5, 6] and default_steps(1) == [0, 1, 2, 3]
    assert default_steps(10)[-1] == 20 and len(default_steps(10)) <= 12


def test_report_cli_compares_runs(tiny_run, tmp_path, capsys):
    run_dir, results = tiny_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("wandb", "*.png", "report.html"))
    res = json.loads((other / "results.json").read_text())
    res["name"] = "other"
    res["config"]["algorithm"]["name"] = "fomaml"
    (other / "results.json").write_text(json.dumps(res))
    out = tmp_path / "cmp" / "comparison.html"
    assert main(["report", str(run_dir), str(other), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {run_dir / 'report.html'}" in printed and f"comparison: {out}" in printed
    text = out.read_text()
    srcs = _check_images(out)
    assert len(srcs) == 3  # accuracy bars with CI, validation curves, inner-step curves
    assert ">tiny</a>" in text and ">other</a>" in text and "<td>fomaml</td>" in text
    assert f"{100 * results['test'][1]['accuracy']:.2f}%" in text
    assert (other / "report.html").is_file()


def test_comparison_tells_apart_runs_with_the_same_name_and_algorithm(tiny_run, tmp_path, monkeypatch):
    """Two runs of one config in other output folders: each gets its own bar, curve and legend entry,
    labelled with the end of its path that differs; a run whose label is unique keeps it plain."""
    from metamtl.reporting import report

    run_dir, _ = tiny_run
    dirs = [tmp_path / "lrA" / "tiny", tmp_path / "lrB" / "tiny", tmp_path / "other"]
    for d in dirs:
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("wandb", "*.png", "report.html"))
    res = json.loads((dirs[2] / "results.json").read_text())
    (dirs[2] / "results.json").write_text(json.dumps({**res, "name": "other"}))
    seen = {}
    for name in ("plot_comparison", "plot_curves"):
        def record(items, path, *args, _name=name, _plot=getattr(report.plots, name), **kw):
            seen.setdefault(_name, []).append({i["label"] for i in items if not i.get("reference")})
            return _plot(items, path, *args, **kw)
        monkeypatch.setattr(report.plots, name, record)
    write_comparison(dirs, tmp_path / "cmp.html")
    labels = {"tiny (maml), lrA/tiny", "tiny (maml), lrB/tiny", "other (maml)"}
    assert seen["plot_comparison"] == [labels]
    val, steps = seen["plot_curves"]
    assert val == labels and {label.rsplit(", 5-way", 1)[0] for label in steps} == labels


def test_report_without_data_still_written(tiny_run, tmp_path, monkeypatch):
    run_dir, _ = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("wandb", "steps_curve.json"))
    res = json.loads((moved / "results.json").read_text())
    res["config"]["data"]["root"] = str(tmp_path / "nowhere")
    (moved / "results.json").write_text(json.dumps(res))
    text = write_report(moved).read_text()  # reads only: the run's curve was not copied
    assert "Not computed: this run wrote no steps_curve.json" in text and "steps_curve.png" not in text
    assert main(["report", str(moved), "--no-progress"]) == 0  # computing it needs the data, gone
    path = moved / "report.html"
    text = path.read_text()
    assert "Not computed: DataNotFoundError" in text and "steps_curve.png" not in text
    _check_images(path)


def test_report_with_a_bad_device_is_a_user_error_that_keeps_the_runs_curve(tiny_run, tmp_path, capsys):
    """``--device`` is the user's argument, not the run's failure: exit 2 naming it, before the
    run's valid steps_curve.json (or anything else) is rewritten."""
    import torch

    run_dir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb"))
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    for device in ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"]):
        assert main(["report", str(copy), "--steps-episodes", "3", "--device", device, "--no-progress"]) == 2
        assert repr(device) in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_embedded_report_is_one_file(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb"))
    text = write_report(copy, embed=True).read_text()
    srcs = _images(text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="at least one run"):
        write_comparison([], tmp_path / "x.html")
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize("content", ["{}", "[]", '{"name": "x"}', '{"config": 3}'])
def test_report_of_results_json_that_is_not_a_runs_is_a_clear_error(content, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ConfigError, match="results.json is not a metamtl run's results"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "results.json" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm,kwargs", [("anil", {"head_init": "proto", "lr": 0.5}),
                                              ("maml", {"head_init": "zero", "lr": 0.5})])
def test_steps_curve_equals_scoring_each_episode_after_each_step_count(synthetic_tasks, algorithm, kwargs):
    """The curve (public evaluate, batched) == the algorithm's per-episode evaluation, step by step."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model

    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None)
    learner = MetaLearner(model, build_algorithm(algorithm, steps=1, **kwargs), device="cpu")
    steps = [0, 1, 3]
    (curve,) = accuracy_vs_steps(learner, {None: synthetic_tasks}, [{"ways": 5, "shots": 1}], 3, steps,
                                 queries=2, progress=False)
    eps = [synthetic_tasks.episode(i).to("cpu") for i in range(3)]
    for k, s in enumerate(steps):
        expected = [learner.algorithm.evaluate_episode(learner.model, ep, s)["accuracy"] for ep in eps]
        assert curve["mean"][k] == pytest.approx(sum(expected) / 3)
    assert curve["setting"] == "5-way 1-shot" and curve["metric"] == "accuracy"


def test_a_within_superclass_settings_curve_is_drawn_within_one_superclass():
    """A test row drawn within one superclass (eval.settings hierarchy, e.g. Omniglot within-alphabet
    20-way) used to get a curve of random-class episodes, labelled like one, that did not equal the
    row at its step count; it is now drawn as the row was, and says so."""
    import torch

    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.data import ClassDataset
    from metamtl.models import build_model
    from metamtl.steps_curve import curve_settings
    from metamtl.tasks import EpisodeSampler

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(12, 1, 16, 16, generator=g)
    images = ((protos.repeat_interleave(4, 0) * 0.2 + 0.8 * torch.rand(48, 1, 16, 16, generator=g)) * 255).to(torch.uint8)
    ds = ClassDataset(images, torch.arange(12).repeat_interleave(4), [f"a{i // 4}/c{i}" for i in range(12)], name="syn")
    source = EpisodeSampler(ds, ways=3, shots=1, queries=2, seed=0)
    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None),
                          build_algorithm("maml", steps=1, lr=0.5, head_init="proto"), device="cpu")
    rows = [learner.evaluate(source.with_settings(hierarchy=h), 6, progress=False).to_dict() for h in (1, None)]
    settings = curve_settings(rows, 3, 1)
    assert [s["hierarchy"] for s in settings] == [1, None]  # two settings, not one
    within, anywhere = accuracy_vs_steps(learner, {None: source}, settings, 6, [1], progress=False)
    assert within["setting"] == "3-way 1-shot within one superclass (depth 1)" and anywhere["setting"] == "3-way 1-shot"
    assert within["mean"] == [rows[0]["accuracy"]] and anywhere["mean"] == [rows[1]["accuracy"]]
    assert within["mean"] != anywhere["mean"]
    assert curve_settings([{**rows[0], "hierarchy": "mapping of 12 classes"}], 3, 1) == [{"ways": 3, "shots": 1}]


def _superclass_learner_and_source(ways: int):
    """A tiny conv4 MAML learner and a ``ways``-way sampler over 12 classes in 3 superclasses of 4."""
    import torch

    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.data import ClassDataset
    from metamtl.models import build_model
    from metamtl.tasks import EpisodeSampler

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(48, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    ds = ClassDataset(images, torch.arange(12).repeat_interleave(4), [f"a{i // 4}/c{i}" for i in range(12)], name="syn")
    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=2, out_features=None),
                          build_algorithm("maml", steps=1, lr=0.5, head_init="proto"), device="cpu")
    return learner, EpisodeSampler(ds, ways=ways, shots=1, queries=2, seed=0)


def test_a_within_superclass_curve_with_fewer_ways_than_training_is_drawn():
    """Training ways (5) larger than every superclass (4 classes) made the curve of a 2-way
    within-superclass row a TaskError (hierarchy was applied before the row's ways), while the
    row's own test evaluation worked."""
    learner, source = _superclass_learner_and_source(ways=5)
    row = learner.evaluate(source.with_settings(ways=2, hierarchy=1), 4, progress=False).to_dict()
    (curve,) = accuracy_vs_steps(learner, {None: source}, [row], 4, [1], progress=False)
    assert curve["setting"] == "2-way 1-shot within one superclass (depth 1)" and curve["mean"] == [row["accuracy"]]


def test_a_curve_of_a_source_without_with_settings_needs_no_change_of_its_own_setting():
    """A TaskSource without with_settings (e.g. a learn2learn taskset) got a ConfigError 'cannot change
    ways/shots/queries' from the curve and from evaluate(ways=<its own ways>), though nothing changes."""
    learner, source = _superclass_learner_and_source(ways=3)

    class Fixed:  # a user task source of one setting
        task, ways, shots, queries, name = "classification", 3, 1, 2, "fixed"

        def episode(self, i):
            return source.episode(i)

    (curve,) = accuracy_vs_steps(learner, {None: Fixed()}, [{"ways": 3, "shots": 1}], 2, [0, 1], progress=False)
    assert curve["mean"][1] == learner.evaluate(source, 2, progress=False).accuracy
    assert learner.evaluate(Fixed(), 2, ways=3, shots=1, progress=False).accuracy == curve["mean"][1]
    with pytest.raises(ConfigError, match=r"Fixed cannot change ways/shots/queries \(asked for ways=2; it draws ways=3\)"):
        learner.evaluate(Fixed(), 2, ways=2, progress=False)


def test_report_and_wandb_handle_multi_dataset_and_skipped_rows(tiny_run, tmp_path):
    """Rows of multi-dataset runs carry a dataset label; settings a dataset cannot serve are skipped."""
    from metamtl.reporting import WandbLogger, read_offline_run

    run_dir, results = tiny_run
    copy = tmp_path / "multi"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", "steps_curve.json"))
    res = json.loads((copy / "results.json").read_text())
    res["test"] = [{"dataset": "omniglot", **r} for r in res["test"]]
    res["test"].append({"dataset": "omniglot", "ways": 50, "shots": 1, "skipped": "only 27 held-out classes"})
    (copy / "results.json").write_text(json.dumps(res))
    from metamtl.experiment import refresh_steps_curve

    refresh_steps_curve(copy, episodes=3, progress=False)
    text = write_report(copy).read_text()
    assert "omniglot: 5-way 2-shot" in text and "skipped: only 27 held-out classes" in text
    _check_images(copy / "report.html")
    curve = json.loads((copy / "steps_curve.json").read_text())
    assert [c["setting"] for c in curve["curves"]] == ["omniglot: 5-way 1-shot", "omniglot: 5-way 2-shot"]

    logger = WandbLogger(mode="offline", run_dir=tmp_path / "wb", name="multi")
    from metamtl import MetaLearner

    from metamtl.callbacks import FitState

    state = FitState(MetaLearner.load(copy / "learner.pt", device="cpu"), iterations=0, meta_batch_size=1)
    logger.on_fit_start(state)
    logger.on_results(state, res)
    run = read_offline_run(tmp_path / "wb")
    assert run.summary["test/omniglot/5w2s/accuracy"] == pytest.approx(res["test"][1]["accuracy"])
    assert not any(k.startswith("test/omniglot/50w") for k in run.summary)


def test_steps_curve_when_training_ways_exceed_held_out_classes(tiny_run, tmp_path):
    """A run trained on more ways than the test split has classes (the demo: 60-way episodes, 48
    test characters) still gets its accuracy-vs-steps curve for the evaluated settings."""
    from metamtl.experiment import refresh_steps_curve

    run_dir, _ = tiny_run
    copy = tmp_path / "wide"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb", "steps_curve.json"))
    res = json.loads((copy / "results.json").read_text())
    res["config"]["tasks"]["ways"] = 500  # more than Omniglot small1's held-out characters
    (copy / "results.json").write_text(json.dumps(res))
    refresh_steps_curve(copy, episodes=3, progress=False)
    curve = json.loads((copy / "steps_curve.json").read_text())
    assert "error" not in curve
    assert [c["setting"] for c in curve["curves"]] == ["5-way 1-shot", "5-way 2-shot"]


def test_published_references_go_only_with_inductive_random_class_rows(tmp_path, monkeypatch):
    """Published few-shot numbers are inductive and drawn from random classes: a run's report and a
    comparison page put them beside such rows only, never beside a transductive head's row or a
    within-superclass row, and the comparison keeps them on every such row, not on the last one."""
    from metamtl.reporting import report

    def row(acc, **kw):
        return {"accuracy": acc, "ci95": 0.01, "loss": 0.1, "loss_ci95": 0.01, "episodes": 600, "ways": 5, "shots": 1,
                "queries": 15, "steps": 0, "hierarchy": None, "head": "algorithm", "transductive": False, **kw}

    results = {"name": "r", "iterations": 10, "train_seconds": 1.0, "stopped_by": "iterations",
               "config": {"data": {"name": "omniglot"}, "algorithm": {"name": "protonet"}, "model": {"name": "conv4"},
                          "tasks": {}, "train": {}},
               "test": [row(0.97), row(0.98, head="simpleshot"), row(0.99, head="bdcspn", transductive=True),
                        row(0.80, hierarchy=1)]}
    run = tmp_path / "r"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    (run / "history.json").write_text("[]")
    table = write_report(run).read_text().split("<h2>Held-out test results</h2>")[1].split("</table>")[0]
    cells = {re.sub(r"<[^>]+>", "", tr.split("</td>")[0]): tr for tr in re.findall(r"<tr><td>(.*?)</tr>", table)}
    assert "(published)" not in table and "MAML" in cells["5-way 1-shot"] and "MAML" in cells["5-way 1-shot, head simpleshot"]
    assert "MAML" not in cells["5-way 1-shot, head bdcspn (TRANSDUCTIVE)"] and "MAML" not in cells["5-way 1-shot within one superclass (depth 1)"]

    captured = []
    monkeypatch.setattr(report.plots, "plot_comparison", lambda bars, path: captured.append(bars))
    write_comparison([run], tmp_path / "cmp.html")
    groups = {b["group"] for b in captured[0] if b["reference"]}
    assert groups == {"5-way 1-shot", "5-way 1-shot, head simpleshot"}


def _small_run(path: Path, test: list[dict], history: list[dict] | None = None) -> Path:
    """A run folder as experiment.run writes it, without training: results.json and history.json."""
    path.mkdir(parents=True)
    results = {"name": path.name, "iterations": 2, "train_seconds": 1.0, "stopped_by": "iterations",
               "config": {"data": {"name": "omniglot"}, "algorithm": {"name": "maml"}, "model": {"name": "conv4"},
                          "tasks": {"ways": 5, "shots": 1}, "train": {}}, "test": test}
    (path / "results.json").write_text(json.dumps(results))
    rows = [{"iteration": i, "train/loss": 1.0 / i, "train/accuracy": 0.5, "train/inner_loss/step_0": 1.2}
            for i in (1, 2)]
    (path / "history.json").write_text(json.dumps(rows if history is None else history))
    return path


def _row(acc: float, ci: float, shots: int = 1) -> dict:
    return {"accuracy": acc, "ci95": ci, "loss": 0.5, "loss_ci95": 0.1, "episodes": 4, "ways": 5, "shots": shots,
            "queries": 2, "steps": 1, "hierarchy": None, "head": "algorithm", "transductive": False}


def test_non_finite_accuracies_are_drawn_as_missing(tmp_path, recwarn):
    """A NaN accuracy or CI (a diverged evaluation) is a missing bar / whisker, not a crashed report."""
    nan = float("nan")
    run = _small_run(tmp_path / "r", [_row(nan, nan), _row(0.6, nan, shots=2), _row(0.7, float("inf"), shots=3)],
                     history=[{"iteration": 1, "train/loss": float("inf"), "val/loss": nan, "val/accuracy": nan,
                               "val/accuracy_ci95": nan}, {"iteration": 2, "train/loss": 1.0},
                              {"iteration": 2, "val/loss": 0.5, "val/accuracy": 0.5, "val/accuracy_ci95": None,
                               "val/loss_ci95": None}])  # one validation episode: CIs are JSON null
    _check_images(write_report(run))
    assert (run / "accuracy.png").is_file() and (run / "learning_curves.png").is_file()
    assert not [w for w in recwarn if "skipped" in str(w.message)]
    _check_images(write_comparison([run], tmp_path / "cmp.html"))
    assert (tmp_path / "cmp_accuracy.png").is_file()


def test_a_figure_that_cannot_be_drawn_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from metamtl.reporting import report

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])

    def broken(*args, **kwargs):
        raise ValueError("cannot draw this")

    monkeypatch.setattr(report.plots, "plot_learning_curves", broken)
    with pytest.warns(RuntimeWarning, match="'Learning curves' was skipped.*ValueError: cannot draw this"):
        text = write_report(run).read_text()
    assert "Not drawn: ValueError: cannot draw this" in text and "inner_loss.png" in text
    assert "60.00% ± 10.00%" in text
    monkeypatch.setattr(report.plots, "plot_comparison", broken)
    with pytest.warns(RuntimeWarning, match="'Held-out accuracy \\(95% CI\\)' was skipped"):
        assert "60.00%" in write_comparison([run], tmp_path / "cmp.html").read_text()


@pytest.mark.parametrize("content,problem", [
    ("{}", "'steps' is missing"), ("[]", "expected a JSON object, found list"),
    ('{"steps": [0], "curves": []}', "'split' is missing"), ("{not json", "is not readable"),
    ('{"steps": [0, 1], "split": "test", "episodes": 2, "trained_steps": 1, "curves": '
     '[{"setting": "5-way 1-shot", "metric": "accuracy", "mean": [0.5], "ci95": [0.1, 0.1]}]}',
     "curve 0's 'mean' is not a list of 2 numbers")])
def test_malformed_steps_curve_is_reported_and_the_report_written(content, problem, tmp_path):
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    (run / "steps_curve.json").write_text(content)
    with pytest.warns(RuntimeWarning, match=f"{re.escape(str(run / 'steps_curve.json'))} .*{re.escape(problem)}"):
        text = write_report(run).read_text()
    assert "Not computed: steps_curve.json " in text and problem.replace("'", "&#x27;") in text
    assert "steps_curve.png" not in text and "accuracy.png" in text
    with pytest.warns(RuntimeWarning, match=re.escape(problem)):
        write_comparison([run], tmp_path / "cmp.html")


def test_a_report_that_fails_never_fails_the_run(tmp_path, monkeypatch):
    """The report is written after results.json: its failure is a warning, the results stand."""
    from types import SimpleNamespace

    from metamtl.experiment import _write_report
    from metamtl.reporting import report

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    monkeypatch.setattr(report, "_report_page", lambda *a: 1 / 0)
    results = {"test": []}
    with pytest.warns(RuntimeWarning, match="report.html could not be written \\(ZeroDivisionError"):
        report.HTMLReport(run).on_results(SimpleNamespace(is_main_process=True), results)
    with pytest.warns(RuntimeWarning, match="metamtl report RUN_DIR"):
        _write_report(run, results, print)
    assert "report" not in results and not (run / "report.html").exists()


def test_a_failed_recomputation_keeps_the_runs_valid_curve(tiny_run, tmp_path, capsys):
    """`metamtl report --steps ...` without the data: the run's own steps_curve.json stays (the
    failure beside it, shown on the page), never replaced by an error record."""
    from metamtl.steps_curve import write_failure

    run_dir, _ = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("wandb"))
    res = json.loads((moved / "results.json").read_text())
    res["config"]["data"]["root"] = str(tmp_path / "nowhere")
    (moved / "results.json").write_text(json.dumps(res))
    before = json.loads((moved / "steps_curve.json").read_text())
    with pytest.warns(RuntimeWarning, match="the one saved before is kept"):
        assert main(["report", str(moved), "--steps", "0", "1", "5", "--no-progress"]) == 0
    after = json.loads((moved / "steps_curve.json").read_text())
    assert after.pop("refresh_error").startswith("DataNotFoundError") and after == before
    text = (moved / "report.html").read_text()
    assert "steps_curve.png" in text and "computing it again (other steps or episodes) failed: DataNotFoundError" in text
    (moved / "steps_curve.json").write_text("{}")  # a malformed file is no curve to keep
    write_failure(moved, OSError("gone"))
    assert json.loads((moved / "steps_curve.json").read_text()) == {"error": "OSError: gone"}


def test_comparison_page_escapes_the_skipped_reason(tmp_path, monkeypatch):
    from metamtl.reporting import report

    monkeypatch.setattr(report.plots, "plot_comparison", lambda *a, **k: None)
    reason = "only 3 < 50 held-out classes & <b>no</b> episodes"
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1), {"ways": 50, "shots": 1, "skipped": reason}], history=[])
    text = write_comparison([run], tmp_path / "cmp.html").read_text()
    assert "skipped: only 3 &lt; 50 held-out classes &amp; &lt;b&gt;no&lt;/b&gt; episodes" in text
    assert reason not in text and "<b>no</b>" not in text


def test_a_staged_runs_header_says_its_iterations_are_over_every_stage(tmp_path):
    """The header names the last stage's algorithm and tasks; the iteration count is every stage's:
    it must say so, not read as the last stage's own count."""
    run = _small_run(tmp_path / "r", [_row(0.9, 0.01)])
    results = json.loads((run / "results.json").read_text())
    results["iterations"] = 12
    results["stages"] = [{"stage": "pre", "algorithm": "protonet", "iterations": 9, "train_seconds": 1.0,
                          "stopped_by": "iterations"},
                         {"stage": "meta", "algorithm": "maml", "iterations": 3, "train_seconds": 1.0,
                          "stopped_by": "iterations"}]
    (run / "results.json").write_text(json.dumps(results))
    header = write_report(run).read_text().split('<p class="meta">')[1].split("</p>")[0]
    assert "<b>12</b> meta-iterations in total over its 2 stages" in header
    assert "Stage 1, <b>pre</b>: protonet, 9 meta-iterations" in header


def _regression_report(tmp_path, test, episodes, curve):
    """The report page of a small sinusoid run: one held-out row with MSE ``test`` (mean, CI) and a
    0/1-step MSE curve ``(means, cis)`` over ``episodes`` episodes."""
    row = {"accuracy": None, "ci95": None, "loss": test[0], "loss_ci95": test[1], "episodes": 10, "ways": 1,
           "shots": 5, "queries": 5, "steps": 1, "hierarchy": None, "head": "algorithm", "transductive": False}
    run = _small_run(tmp_path / "r", [row])
    results = json.loads((run / "results.json").read_text())
    results["config"]["data"] = {"name": "sinusoid"}
    (run / "results.json").write_text(json.dumps(results))
    (run / "steps_curve.json").write_text(json.dumps(
        {"steps": [0, 1], "split": "test", "episodes": episodes, "trained_steps": 1,
         "curves": [{"setting": "5-shot regression", "metric": "loss", "mean": curve[0], "ci95": curve[1]}]}))
    return write_report(run).read_text()


def test_a_regression_runs_report_names_its_metric_mse(tmp_path):
    """A sinusoid run reports mean squared errors: its table column and steps-curve section say
    MSE, never accuracy."""
    text = _regression_report(tmp_path, (3.67, 2.73), episodes=2, curve=([4.0, 3.0], [0.5, 0.5]))
    table = text.split("<h2>Held-out test results</h2>")[1].split("</table>")[0]
    assert "<th>MSE (95% CI)</th>" in table and "accuracy" not in table.lower()
    assert "<h2>MSE vs number of inner steps at test time</h2>" in text
    assert "Accuracy vs number of inner steps" not in text and 'alt="MSE vs inner steps"' in text
    assert "Query loss (mean squared error) after adaptation" in text and "loss and accuracy" not in text


def test_a_comparison_of_regression_runs_heads_its_column_mse(tmp_path):
    """The comparison table's result column says MSE for regression runs ("result" when mixed)."""
    row = {"accuracy": None, "ci95": None, "loss": 3.67, "loss_ci95": 2.73, "episodes": 10, "ways": 1, "shots": 5,
           "queries": 5, "steps": 1, "hierarchy": None, "head": "algorithm", "transductive": False}
    runs = []
    for name in ("a", "b"):
        run = _small_run(tmp_path / name, [row])
        results = json.loads((run / "results.json").read_text())
        results["config"]["data"] = {"name": "sinusoid"}
        (run / "results.json").write_text(json.dumps(results))
        runs.append(run)
    table = write_comparison(runs, tmp_path / "cmp.html").read_text().split("</table>")[0]
    assert "<th>held-out MSE (95% CI)</th>" in table and "accuracy" not in table.lower()
    mixed = write_comparison([runs[0], _small_run(tmp_path / "c", [_row(0.9, 0.01)])], tmp_path / "mix.html")
    assert "<th>held-out result (95% CI)</th>" in mixed.read_text()


def test_one_episode_has_no_confidence_interval_rather_than_a_zero_one(synthetic_tasks):
    """One episode says nothing about the spread: its CI is undefined (nan, shown "± n/a", left out of
    W&B's summary), not 0 (which claimed a certain result)."""
    import math

    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.evaluation import mean_ci95
    from metamtl.models import build_model
    from metamtl.reporting.report import _value
    from metamtl.reporting.wandb_logger import _finite

    assert mean_ci95([0.4])[0] == 0.4 and math.isnan(mean_ci95([0.4])[1])
    assert mean_ci95([0.4, 0.6]) == pytest.approx((0.5, 1.96 * 0.1414213562 / 2 ** 0.5))
    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=1, out_features=None)
    result = MetaLearner(model, build_algorithm("protonet"), device="cpu").evaluate(
        synthetic_tasks, episodes=1, progress=False)
    assert math.isnan(result.ci95) and math.isnan(result.loss_ci95)
    assert "± n/a" in str(result) and "nan" not in str(result)
    assert _value(result.to_dict()).endswith("% ± n/a")
    assert "test/x/accuracy_ci95" not in _finite({"test/x/accuracy_ci95": result.ci95})
    row = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # the bare NaN token is no JSON
    assert row["ci95"] is None and row["loss_ci95"] is None and _value(row).endswith("% ± n/a")


def test_results_with_a_null_ci_are_reported(tmp_path, recwarn):
    """A one-episode CI is null in results.json and steps_curve.json (it was a bare NaN, which strict
    JSON parsers refuse); the report and the comparison draw it without a whisker, "± n/a"."""
    run = _small_run(tmp_path / "r", [_row(0.6, None)])
    (run / "steps_curve.json").write_text(json.dumps(
        {"steps": [0, 1], "split": "test", "episodes": 1, "trained_steps": 1,
         "curves": [{"setting": "5-way 1-shot", "metric": "accuracy", "mean": [0.5, 0.6], "ci95": [None, None]}]}))
    text = write_report(run).read_text()
    assert "60.00% ± n/a" in text and "50.00 ± n/a" in text
    assert "60.00%" in write_comparison([run, run], tmp_path / "cmp.html").read_text()
    assert not [w for w in recwarn if "steps_curve" in str(w.message)]


def test_the_default_steps_grid_holds_the_evaluated_step_count(synthetic_tasks, tmp_path):
    """eval.steps (the test rows' inner steps) other than the algorithm's eval_steps: the curve's
    default grid used to span only the algorithm's count, so the evaluated point could be missing."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model
    from metamtl.steps_curve import write_steps_curve

    model = build_model("conv4", in_channels=1, hidden=4, image_size=16, blocks=1, out_features=None)
    learner = MetaLearner(model, build_algorithm("maml", steps=1, head_init="zero"), device="cpu")
    learner.save(tmp_path / "learner.pt")
    out = write_steps_curve(tmp_path, learner, {None: synthetic_tasks}, "test", [{"ways": 5, "shots": 1}],
                            episodes=1, progress=False, write=False, eval_steps=7)
    assert 7 in out["steps"] and out["eval_steps"] == 7 and max(out["steps"]) == 14
    default = write_steps_curve(tmp_path, learner, {None: synthetic_tasks}, "test", [{"ways": 5, "shots": 1}],
                                episodes=1, progress=False, write=False)
    assert default["eval_steps"] == learner.algorithm.eval_steps and 7 not in default["steps"]


def test_links_and_images_open_their_own_files_whatever_the_folder_names(tmp_path):
    """A '#' or '%' in a run folder or the comparison file's name: every link and image of the pages
    is URL-quoted, so a browser opens that very file (not another run's, not a cut-off path)."""
    from urllib.parse import unquote

    runs = [_small_run(tmp_path / "sp ace" / name, [_row(0.6, 0.1)]) for name in ("run#1", "run%231")]
    out = tmp_path / "sp ace" / "cmp #2.html"
    text = write_comparison(runs, out).read_text()
    links = re.findall(r"<a href='([^']*)'>", text)
    assert [out.parent / unquote(link) for link in links] == [run / "report.html" for run in runs]
    srcs = _images(text)
    assert srcs and all("#" not in s and " " not in s and (out.parent / unquote(s)).is_file() for s in srcs)
    page = write_report(runs[1])
    hrefs = re.findall(r'<a href="([^"]*)">', page.read_text())
    assert hrefs and all((runs[1] / unquote(h)).is_file() for h in hrefs)
    assert all((runs[1] / unquote(s)).is_file() for s in _images(page.read_text()))


@pytest.mark.parametrize("test_split", [None, "val"])
def test_full_omniglot_evaluated_on_another_split_is_not_the_official_protocol(test_split, tmp_path):
    """Both Omniglot archives, but held-out evaluation on the val split (test_split null or 'val'):
    the held-out classes are background characters, so the report neither calls it the official
    protocol nor reads the published numbers without the 'indicative only' warning."""
    from metamtl.reporting.report import protocol

    data = {"name": "omniglot", "sources": ["images_background", "images_evaluation"], "val_split": "val"}
    assert protocol({"data": {**data, "test_split": "test"}}) == (
        "Omniglot, official protocol: background alphabets for training, evaluation alphabets for testing", True)
    text, comparable = protocol({"data": {**data, "test_split": test_split}})
    assert not comparable and "official protocol" not in text and "'val'" in text
    run = _small_run(tmp_path / "r", [_row(0.9, 0.01)])
    results = json.loads((run / "results.json").read_text())
    results["config"]["data"] = {**data, "test_split": test_split}
    (run / "results.json").write_text(json.dumps(results))
    assert "indicative only" in write_report(run).read_text()


@pytest.mark.parametrize("where", [".", "./"])
def test_report_of_the_current_folder_is_written(where, tmp_path, monkeypatch):
    """`cd runs/x && metamtl report .` failed with "name '' must be a plain folder name" (exit 2,
    no page): the run folder is now resolved before its config is rebuilt."""
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    monkeypatch.chdir(run)
    assert main(["report", where, "--no-progress"]) == 0
    assert "60.00% ± 10.00%" in (run / "report.html").read_text()


def test_a_run_whose_saved_config_no_longer_loads_still_gets_its_report(tmp_path):
    """An older run's config this version refuses (a key since removed): `metamtl report` stopped with
    exit 2 and wrote no page; the page is now written from what the run wrote, its steps curve
    marked as not computed with the reason."""
    run = _small_run(tmp_path / "old", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    results["config"]["train"] = {"legacy_option": 1}
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run), "--no-progress"]) == 0
    text = (run / "report.html").read_text()
    assert "60.00% ± 10.00%" in text
    note = text.split("inner steps at test time</h2>")[1]
    assert "Not computed: ConfigError" in note and "legacy_option" in note


def test_a_stale_recomputation_failure_leaves_the_page_once_the_saved_curve_is_the_one_asked_for(tmp_path):
    """`metamtl report --steps ...` without the data keeps the saved curve with the failure beside it;
    a later plain `metamtl report`, for which that saved curve is current, used to keep showing
    "computing it again ... failed" although nothing failed: the old failure is now dropped."""
    from metamtl.experiment import refresh_steps_curve
    from metamtl.steps_curve import cache_key

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    (run / "learner.pt").write_bytes(b"a learner")
    curve = {"key": cache_key(run / "learner.pt", 3, [0, 1]), "split": "test", "episodes": 3, "steps": [0, 1],
             "trained_steps": 1, "curves": [{"setting": "5-way 1-shot", "metric": "accuracy", "mean": [0.2, 0.5],
                                             "ci95": [0.1, 0.1]}]}
    (run / "steps_curve.json").write_text(json.dumps({**curve, "refresh_error": "DataNotFoundError: gone"}))
    refresh_steps_curve(run, episodes=3, progress=False)
    assert json.loads((run / "steps_curve.json").read_text()) == curve
    text = write_report(run).read_text()
    assert "steps_curve.png" in text and "computing it again" not in text


def test_the_accuracy_caption_names_the_published_bars_whenever_they_are_drawn(tmp_path):
    """Skipped rows (multi-dataset runs) add no bar but were counted as if they did, so the caption
    left out the published-numbers legend and the 'indicative only' warning beside drawn references."""
    skipped = [{"dataset": "birds", "ways": w, "shots": 1, "skipped": "only 4 held-out classes"} for w in (5, 20)]
    text = write_report(_small_run(tmp_path / "r", [{**_row(0.9, 0.01), "dataset": "omniglot"}, *skipped])).read_text()
    caption = re.search(r"<figcaption>Held-out accuracy.*?</figcaption>", text).group(0)
    assert "next to published numbers (grey, hatched)" in caption and "indicative only" in caption


def test_the_wandb_sync_command_can_be_pasted_and_uploads_every_offline_run(tmp_path, monkeypatch):
    """The suggested `wandb sync ...` was not shell-quoted (a space split the path), relative to the
    folder the report was built from, and named only the last offline run (a resumed run has two)."""
    import html
    import shlex

    run = _small_run(tmp_path / "my runs" / "x", [_row(0.6, 0.1)])
    offline = [run / "wandb" / f"offline-run-2026010{i}_000000-abc" for i in (1, 2)]
    for d in offline:
        d.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    text = write_report(Path("my runs") / "x").read_text()
    command = html.unescape(re.search(r"upload with <code>(.*?)</code>", text).group(1))
    assert shlex.split(command) == ["wandb", "sync", *(str(d.resolve()) for d in offline)]


def test_a_regression_ensembles_page_says_its_predictions_are_averaged():
    """A regression ensemble's page said its held-out rows "average their class probabilities"."""
    from metamtl.reporting.report import _members

    row = {"accuracy": None, "loss": 0.5, "loss_ci95": 0.1, "ways": 1, "shots": 5}
    ensemble = {"threads": 1, "members": [{"name": "member0", "seed": 0, "iterations": 3, "test": [row]}]}
    regression = _members({"config": {"data": {"name": "sinusoid"}}, "test": [row], "ensemble": ensemble})
    assert "average their predictions" in regression and "class probabilities" not in regression
    assert "average their class probabilities" in _members({"test": [{**row, "accuracy": 0.9, "ci95": 0.01}],
                                                            "ensemble": ensemble})


def test_the_mse_steps_table_has_the_held_out_rows_precision(tmp_path):
    """The MSE-vs-inner-steps table rounded to 2 decimals, so a well-trained sinusoid learner's small
    errors read "0.00 ± 0.00" beside "MSE 0.0042 ± 0.0011" in the held-out table: both have 4 digits."""
    text = _regression_report(tmp_path, (0.0042, 0.0011), episodes=10, curve=([0.9, 0.0042], [0.2, 0.0011]))
    assert "MSE 0.0042 ± 0.0011" in text
    steps_table = text.split("setting \\ steps")[1].split("</table>")[0]
    assert "0.9000 ± 0.2000" in steps_table and "0.0042 ± 0.0011" in steps_table and "0.00 ± 0.00" not in steps_table


def _run_with_saved_curve(tmp_path, learner_bytes):
    """A small run whose learner.pt holds ``learner_bytes`` and whose steps_curve.json was computed from it."""
    from metamtl.steps_curve import cache_key

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    (run / "learner.pt").write_bytes(learner_bytes)
    curve = {"key": cache_key(run / "learner.pt", 3, [0, 1]), "split": "test", "episodes": 3, "steps": [0, 1],
             "trained_steps": 1, "curves": [{"setting": "5-way 1-shot", "metric": "accuracy", "mean": [0.2, 0.5],
                                             "ci95": [0.1, 0.1]}]}
    (run / "steps_curve.json").write_text(json.dumps(curve))
    return run


def test_a_curve_of_an_earlier_learner_is_not_shown_as_the_runs(tmp_path, monkeypatch):
    """A resumed run that did not compute its curve again (logging.report_steps_episodes: 0) kept the
    steps_curve.json of the learner it continued, and its report drew that curve as the saved
    learner's: a curve whose key is not the current learner.pt's is now reported as not computed."""
    import os

    run = _run_with_saved_curve(tmp_path, b"the learner after 6 iterations")
    assert "steps_curve.png" in write_report(run).read_text()
    os.utime(run / "learner.pt", (1, 1))  # a copied run folder (cp -r, scp): the same learner, another time
    assert "steps_curve.png" in write_report(run).read_text()
    (run / "learner.pt").write_bytes(b"the learner after 12 iterations, resumed")
    (run / "steps_curve.png").unlink()
    text = write_report(run).read_text()
    assert "steps_curve.png" not in text and "The saved learner adapted" not in text
    assert "Not computed" in text and "earlier learner.pt" in text and "metamtl report" in text
    from metamtl.reporting import report

    captured = []
    monkeypatch.setattr(report.plots, "plot_curves", lambda curves, *a, **k: captured.append(curves))
    write_comparison([run], tmp_path / "cmp.html")
    assert captured[-1] == []  # the comparison overlays no stale curve either


def test_published_references_follow_each_datasets_name_not_its_label(tmp_path, monkeypatch):
    """A multi-dataset run's rows carry their dataset's label: references were looked up by it, so an
    Omniglot dataset labelled 'miniimagenet' got the mini-ImageNet numbers and one labelled 'omni' none.
    They now follow the dataset's name, in the report's table and bars and in comparisons."""
    from metamtl.reporting import report

    run = _small_run(tmp_path / "r", [{**_row(0.9, 0.01), "dataset": label} for label in ("omniglot", "omni", "miniimagenet")])
    results = json.loads((run / "results.json").read_text())
    results["config"]["datasets"] = [{"name": "omniglot"}, {"name": "omniglot", "label": "omni"},
                                     {"name": "omniglot", "label": "miniimagenet"}]
    (run / "results.json").write_text(json.dumps(results))
    captured = []
    monkeypatch.setattr(report.plots, "plot_comparison", lambda bars, path: captured.append(bars))
    table = write_report(run).read_text().split("<h2>Held-out test results</h2>")[1].split("</table>")[0]
    cells = {re.sub(r"<[^>]+>", "", tr.split("</td>")[0]): tr for tr in re.findall(r"<tr><td>(.*?)</tr>", table)}
    for label in ("omniglot", "omni", "miniimagenet"):
        assert "MAML 98.70%" in cells[f"{label}: 5-way 1-shot"] and "48.70" not in cells[f"{label}: 5-way 1-shot"]
    write_comparison([run], tmp_path / "cmp.html")
    for bars in captured:
        refs = {(b["group"], b["value"]) for b in bars if b["reference"] and b["label"] == "MAML (published)"}
        assert refs == {(f"{label}: 5-way 1-shot", 98.7) for label in ("omniglot", "omni", "miniimagenet")}


def test_the_wandb_sync_command_uploads_the_stages_and_members_runs_too(tmp_path):
    """A staged run's earlier stages and an ensemble's members log their own W&B runs in their own
    folders (stages/<name>/wandb, members/<member>/wandb): the "upload all" command left them out."""
    import html
    import shlex

    run = _small_run(tmp_path / "x", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    stages = [{"stage": "s1"}, {"stage": "s2"}]  # s2, the last, trains in the run folder itself
    results.update(stages=stages, ensemble={"members": [{"name": "member0"}, {"name": "member1", "stages": stages}]})
    (run / "results.json").write_text(json.dumps(results))
    offline = [run / where / "wandb" / f"offline-run-2026010{i}_000000-abc"
               for i, where in enumerate(("members/member0", "members/member1/stages/s1", "stages/s1", "."))]
    for d in offline:
        d.mkdir(parents=True)
    text = write_report(run).read_text()
    command = html.unescape(re.search(r"upload with <code>(.*?)</code>", text).group(1))
    assert sorted(shlex.split(command)[2:]) == sorted(str(d.resolve()) for d in offline)
    assert "stages/s1/wandb/offline-run-20260102_000000-abc" in text


def test_the_wandb_sync_command_leaves_out_the_stages_and_members_of_a_replaced_run(tmp_path):
    """--overwrite of a staged run (or an ensemble) by a run without those stages (fewer members)
    left the replaced run's stages/<name>/ and members/<member>/ folders, and the new run's report
    listed their W&B runs for upload as its own."""
    import html
    import shlex

    run = _small_run(tmp_path / "x", [_row(0.6, 0.1)])
    own = run / "wandb" / "offline-run-20260102_000000-new"
    for d in (own, run / "stages" / "pre" / "wandb" / "offline-run-20260101_000000-old",
              run / "members" / "member2" / "wandb" / "offline-run-20260101_000000-old"):
        d.mkdir(parents=True)
    text = write_report(run).read_text()
    command = html.unescape(re.search(r"upload with <code>(.*?)</code>", text).group(1))
    assert shlex.split(command) == ["wandb", "sync", str(own.resolve())]


def test_official_omniglot_read_with_sources_null_is_reported_as_the_official_protocol(tiny_run, tmp_path):
    """`data.sources: null` reads every archive found: with both official ones, the official protocol.
    The report judged the configured `null` as "the archives found: characters split ..., not the official
    evaluation alphabets" and marked published numbers "indicative only".  A run now records the
    archives it read (results["data_sources"]) and the report describes those; an older run without
    the record keeps the configured wording."""
    from PIL import Image

    from metamtl.config import config_from_dict
    from metamtl.experiment import data_sources
    from metamtl.reporting.report import protocol

    run_dir, results = tiny_run
    assert results["data_sources"] == {"omniglot": ["images_background_small1"]}
    assert json.loads((run_dir / "results.json").read_text())["data_sources"] == results["data_sources"]
    root = tmp_path / "data"
    for source in ("images_background", "images_evaluation"):
        (root / source / "A" / "character01").mkdir(parents=True)
        Image.new("1", (105, 105), 1).save(root / source / "A" / "character01" / "0001_01.png")
    cfg = config_from_dict({**{k: v for k, v in json.loads((run_dir / "results.json").read_text())["config"].items()
                               if k not in ("name", "output_dir")},
                            "data": {"name": "omniglot", "root": str(root), "sources": None}})
    resolved = data_sources(cfg)
    assert resolved == {"omniglot": ["images_background", "images_evaluation"]}
    data = {"name": "omniglot", "sources": None, "test_split": "test"}
    assert protocol({"data": data}, resolved)[1] and "official protocol" in protocol({"data": data}, resolved)[0]
    assert "the archives found" in protocol({"data": data})[0] and not protocol({"data": data})[1]
    run = _small_run(tmp_path / "r", [_row(0.99, 0.01)])
    saved = json.loads((run / "results.json").read_text())
    saved["config"]["data"], saved["data_sources"] = data, resolved
    (run / "results.json").write_text(json.dumps(saved))
    text = write_report(run).read_text()
    assert "Omniglot, official protocol" in text and "indicative only" not in text
    assert "Omniglot, official protocol" in write_comparison([run], tmp_path / "cmp.html").read_text()


def test_a_regression_curves_progress_bar_says_mse(monkeypatch):
    """Before: the bar of a sinusoid run's curve read "accuracy vs inner steps"."""
    import metamtl.steps_curve as steps_curve
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import build_model
    from metamtl.tasks import Sinusoid

    seen = []

    def spy(enabled, **kw):
        seen.append(kw["desc"])
        return real(False, **kw)

    real = steps_curve.progress_bar
    monkeypatch.setattr(steps_curve, "progress_bar", spy)
    learner = MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=1),
                          build_algorithm("maml", steps=1, lr=0.01), device="cpu", task="regression")
    accuracy_vs_steps(learner, {None: Sinusoid(shots=5, queries=5, split="test")}, [{"ways": 1, "shots": 5}], 2, [0, 1])
    assert seen == ["MSE vs inner steps"]


def test_a_comparison_is_never_written_inside_a_compared_run_folder(tmp_path, capsys):
    """`--out a/results.json` (or a/learner.pt, b/report.html) replaced the run's own file with the
    comparison page, leaving the run unusable: --out inside a compared run folder is refused, exit 2,
    before anything is written."""
    runs = [_small_run(tmp_path / name, [_row(0.6, 0.1)]) for name in ("a", "b")]
    (runs[0] / "learner.pt").write_bytes(b"a learner")
    before = {p: p.read_bytes() for run in runs for p in run.iterdir()}
    for out in (runs[0] / "results.json", runs[0] / "learner.pt", runs[1] / "report.html",
                runs[0] / "accuracy.png", runs[1] / "metrics.csv", runs[0] / "steps_curve.json"):
        assert main(["report", *map(str, runs), "--out", str(out), "--no-progress"]) == 2
        assert "would replace the run's own file" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="would replace the run's own file"):
            write_comparison(runs, out)
    assert {p: p.read_bytes() for run in runs for p in run.iterdir()} == before
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cmp.html"), "--no-progress"]) == 0
    assert main(["report", *map(str, runs), "--out", str(runs[0] / "sub" / "c.html"), "--no-progress"]) == 0


def test_a_stage_compared_with_its_run_gets_the_default_comparison(tmp_path, capsys):
    """`metamtl report RUN/stages/first RUN` (no --out) rewrote both pages, then exited 2 over the default
    RUN/stages/comparison.html, a file of no run's: the comparison is written; a stage's own file is refused
    before any page is written."""
    run = _small_run(tmp_path / "st", [_row(0.6, 0.1)])
    stages = [_small_run(run / "stages" / name, [_row(0.5, 0.1)]) for name in ("first", "second")]
    assert main(["report", str(stages[0]), str(run), "--no-progress"]) == 0
    assert (run / "stages" / "comparison.html").is_file()
    assert main(["report", str(run), "--out", str(stages[1] / "report.html"), "--no-progress"]) == 2
    assert "would replace the run's own file" in capsys.readouterr().err
    assert not (stages[1] / "report.html").exists()


def test_every_run_folder_is_checked_before_any_report_is_rewritten(tmp_path, capsys):
    """`metamtl report a b typo` rewrote a's and b's pages (and could recompute their curves) before
    failing on the typo: every RUN_DIR is now read first, exit 2 with nothing written."""
    runs = [_small_run(tmp_path / name, [_row(0.6, 0.1)]) for name in ("a", "b")]
    assert main(["report", *map(str, runs), str(tmp_path / "nope"), "--out", str(tmp_path / "c.html"),
                 "--no-progress"]) == 2
    assert "nope is not a run directory" in capsys.readouterr().err
    assert not any((run / "report.html").exists() for run in runs) and not (tmp_path / "c.html").exists()
    assert main(["report", str(runs[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "new" / "sub" / "c.html"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "new").exists()  # --out's folder was created before the run folders were checked


def _staged_run(tmp_path: Path, last_stage: dict, data: dict | None = None) -> Path:
    """A two-stage run folder (no training): top level ProtoNet 5-way 1-shot, ``last_stage`` merged over it."""
    from metamtl.config import config_from_dict

    run = _small_run(tmp_path / "staged", [_row(0.9, 0.01)])
    config = {"name": "staged", "output_dir": str(tmp_path), "data": data or {"name": "omniglot"},
              "tasks": {"ways": 5, "shots": 1, "queries": 2}, "model": {"name": "conv4", "hidden": 8},
              "algorithm": {"name": "protonet"}, "train": {"iterations": 2, "meta_batch_size": 1, "device": "cpu"},
              "stages": [{"name": "pre"}, {"name": "meta", **last_stage}]}
    results = json.loads((run / "results.json").read_text())
    results["config"] = config_from_dict(config).to_dict()
    results["stages"] = [{"stage": s["name"], "algorithm": s.get("algorithm", {"name": "protonet"})["name"],
                          "iterations": 1, "train_seconds": 1.0, "stopped_by": "iterations"} for s in config["stages"]]
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_a_staged_runs_page_describes_the_last_stages_learner(tmp_path):
    """A staged run's header, bar legend and comparison named the top level's algorithm and tasks
    (while saying they were the last stage's), and its protocol was judged on the top-level data:
    a last stage testing on the val split was called the official protocol, next to published numbers."""
    from metamtl.reporting import report

    data = {"name": "omniglot", "sources": ["images_background", "images_evaluation"]}
    run = _staged_run(tmp_path, {"algorithm": {"name": "maml", "steps": 1, "head_init": "zero"},
                                 "tasks": {"ways": 3, "shots": 2}, "train": {"meta_batch_size": 2},
                                 "data": {"test_split": "val"}}, data)
    text = write_report(run).read_text()
    header = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", text.split('<p class="meta">')[1].split("Stage 1")[0]))
    assert header.startswith("maml on conv4") and "3-way 2-shot tasks" in header and "2 tasks per meta-batch" in header
    assert "official protocol" not in text and "indicative only" in text
    assert report._run_label(json.loads((run / "results.json").read_text())) == "staged (maml)"
    assert "<td>maml</td>" in write_comparison([run], tmp_path / "cmp.html").read_text()


def test_a_staged_runs_curve_is_computed_again_on_its_last_stages_config(tmp_path, monkeypatch):
    """`metamtl report RUN --steps ...` of a staged run evaluated its learner on the top-level data and
    tasks, not the last stage's, which trained and tested it."""
    from metamtl import experiment

    run = _staged_run(tmp_path, {"data": {"sources": ["images_background_small2"]}, "tasks": {"ways": 3}},
                      {"name": "omniglot", "sources": ["images_background_small1"]})
    (run / "learner.pt").write_bytes(b"a learner")
    seen = []
    monkeypatch.setattr(experiment.MetaLearner, "load", staticmethod(lambda *a, **k: "learner"))
    monkeypatch.setattr(experiment, "write_run_steps_curve", lambda learner, cfg, *a, **k: seen.append(cfg))
    experiment.refresh_steps_curve(run, episodes=3, steps=[0, 1], progress=False)
    assert seen[0].data.sources == ["images_background_small2"] and seen[0].tasks.ways == 3
    assert seen[0].run_dir.resolve() == run.resolve()


def test_a_copied_run_folders_curve_is_current_and_not_computed_again(tmp_path, monkeypatch):
    """A copied run folder (cp -r, scp: new file times) made `metamtl report` evaluate its learner
    again (minutes) or, without the data, mark the page with a failure: the curve's learner is now
    told by its name and size, not its time."""
    import os

    from metamtl import experiment
    from metamtl.steps_curve import cache_key

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    (run / "learner.pt").write_bytes(b"a learner")
    curve = {"key": cache_key(run / "learner.pt", 3, [0, 1]), "split": "test", "episodes": 3, "steps": [0, 1],
             "trained_steps": 1, "curves": [{"setting": "5-way 1-shot", "metric": "accuracy", "mean": [0.2, 0.5],
                                             "ci95": [0.1, 0.1]}]}
    (run / "steps_curve.json").write_text(json.dumps(curve))
    os.utime(run / "learner.pt", (1, 1))
    monkeypatch.setattr(experiment.MetaLearner, "load", staticmethod(lambda *a, **k: pytest.fail("evaluated again")))
    experiment.refresh_steps_curve(run, episodes=3, progress=False)
    assert json.loads((run / "steps_curve.json").read_text()) == curve
    assert "computing it again" not in write_report(run).read_text()


@pytest.mark.parametrize("edit,field", [
    (lambda r: r.update(test=None), "'test'"), (lambda r: r.update(test=["oops"]), "'test'"),
    (lambda r: r.update(ensemble=None), "'ensemble'"), (lambda r: r["config"].update(tasks=None), "config['tasks']"),
    (lambda r: r.update(train_seconds="12"), "'train_seconds'"),
    (lambda r: r["test"][0].update(accuracy="0.6"), "'test'[0]['accuracy']"),
    (lambda r: r.update(stages=[{"stage": "a", "train_seconds": "1"}]), "'stages'[0]['train_seconds']"),
    (lambda r: r.update(ensemble={"members": [{"test": 3}]}), "'ensemble'['members'][0]['test']"),
    (lambda r: r.update(machine="x", peak_memory_mb=10), "'machine'"),
    (lambda r: r.update(memory="x", peak_memory_mb=10), "'memory'"),
    (lambda r: r.update(data_sources="x"), "'data_sources'"),
    (lambda r: r.update(data_sources={"omniglot": 3}), "'data_sources'")])
def test_a_results_json_of_the_wrong_shape_is_a_clear_error(edit, field, tmp_path, capsys):
    """Valid JSON of another shape than a run writes (a null list, a number written as text) crashed
    `metamtl report` with a bare TypeError/AttributeError/ValueError (exit 1): a ConfigError naming
    results.json and the field, exit 2."""
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    edit(results)
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(ConfigError, match=re.escape(f"results.json: {field} is not")):
        write_comparison([run], tmp_path / "cmp.html")
    assert main(["report", str(run), "--no-progress"]) == 2
    assert f"results.json: {field} is not" in capsys.readouterr().err


def test_a_run_without_its_learner_shows_the_curve_it_saved_and_says_the_learner_is_missing(tmp_path):
    """With learner.pt deleted, the run's own curve was dropped and the page claimed it was an earlier
    learner's, advising a command that then failed: the saved curve is shown, noted as unverifiable."""
    run = _run_with_saved_curve(tmp_path, b"a learner")
    (run / "learner.pt").unlink()
    text = write_report(run).read_text()
    assert "steps_curve.png" in text and "learner.pt is missing: this is the curve the run saved" in text
    assert "earlier learner.pt" not in text
    assert main(["report", str(run), "--no-progress"]) == 0
    text = (run / "report.html").read_text()
    assert "steps_curve.png" in text and "learner.pt is missing" in text and "earlier learner.pt" not in text


def test_steps_for_a_run_whose_config_turned_the_curve_off_asks_for_steps_episodes(tmp_path, capsys):
    """`metamtl report RUN --steps 0 1 2` of a run with logging.report_steps_episodes: 0 did nothing,
    exit 0, the page saying "Not computed (disabled)": a ConfigError now says to add --steps-episodes."""
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    results["config"]["logging"] = {"report_steps_episodes": 0}
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run), "--steps", "0", "1", "2", "--no-progress"]) == 2
    assert "--steps-episodes N" in capsys.readouterr().err and not (run / "report.html").exists()
    assert main(["report", str(run), "--no-progress"]) == 0  # without --steps: off, as configured
    assert "Not computed (disabled)." in (run / "report.html").read_text()


def test_a_steps_request_one_run_cannot_honour_is_refused_before_any_run_is_touched(tmp_path, capsys):
    """`metamtl report A B --steps 0 5` with B's config turning the curve off recomputed A's curve and
    rewrote A's page, then exited 2 because of B: B's refusal now comes before anything is computed or
    written (exit 2, A untouched)."""
    runs = [_small_run(tmp_path / name, [_row(0.6, 0.1)]) for name in ("a", "b")]
    results = json.loads((runs[1] / "results.json").read_text())
    results["config"]["logging"] = {"report_steps_episodes": 0}
    (runs[1] / "results.json").write_text(json.dumps(results))
    assert main(["report", *map(str, runs), "--steps", "0", "5", "--out", str(tmp_path / "c.html"),
                 "--no-progress"]) == 2
    assert "--steps-episodes N" in capsys.readouterr().err
    assert sorted(p.name for p in runs[0].iterdir()) == ["history.json", "results.json"]
    assert not (tmp_path / "c.html").exists()


def test_steps_for_an_ensemble_run_point_to_its_members(tmp_path, capsys):
    """`metamtl report ENSEMBLE_RUN --steps 0 7 --steps-episodes 3` did nothing, exit 0 (the members' curves
    kept their steps and episodes): a ConfigError now says the ensemble has no curve of its own and to report
    a member's run folder; without --steps/--steps-episodes its page is written as before."""
    run = _small_run(tmp_path / "e", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "ensemble": {"members": []}}))
    for extra in (["--steps", "0", "7", "--steps-episodes", "3"], ["--steps", "0", "7"], ["--steps-episodes", "3"]):
        assert main(["report", str(run), *extra, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is an ensemble run" in err and str(run / "members" / "member0") in err
        assert not (run / "report.html").exists()
    assert main(["report", str(run), "--no-progress"]) == 0


def test_a_run_evaluated_on_its_best_validation_weights_says_which_iteration(tmp_path):
    """With eval.checkpoint: best, results.json records the selected iteration but the page read as if
    the last weights were evaluated; the header now names the iteration (and says nothing otherwise)."""
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "iterations": 6, "selected_iteration": 4}))
    header = write_report(run).read_text().split('<p class="meta">')[1].split("</p>")[0]
    assert "held-out results use the weights of iteration <b>4</b> (best validation" in header
    (run / "results.json").write_text(json.dumps({**results, "iterations": 6, "selected_iteration": 6}))
    assert "weights of iteration" not in write_report(run).read_text()


def test_published_numbers_name_their_source_and_captions_only_the_episodes_a_run_has(tmp_path):
    """The published numbers were shown without their paper and table, and a run without validation
    rows was captioned as evaluated "on fixed validation episodes (95% CI)"."""
    run = _small_run(tmp_path / "r", [_row(0.9, 0.01)])
    text = write_report(run).read_text()
    assert "Published numbers: MAML: Finn et al. 2017, MAML (Table 1 and 2); MAML++: Antoniou et al. 2019" in text
    assert "validation episodes" not in text  # history without val/ rows
    assert "Finn et al. 2017" in write_comparison([run], tmp_path / "cmp.html").read_text()
    history = json.loads((run / "history.json").read_text())
    history.append({"iteration": 2, "val/loss": 1.0, "val/accuracy": 0.5, "val/accuracy_ci95": 0.1})
    (run / "history.json").write_text(json.dumps(history))
    assert "and on fixed validation episodes (95% CI)." in write_report(run).read_text()


def test_a_comparison_of_regression_runs_draws_their_mse(tmp_path):
    """A comparison of sinusoid runs drew no figure at all (only accuracies were plotted): their MSE
    bars, validation MSE and MSE-vs-steps curves are now drawn, beside any classification run's accuracies."""
    row = {"accuracy": None, "ci95": None, "loss": 3.67, "loss_ci95": 2.73, "episodes": 10, "ways": 1, "shots": 5,
           "queries": 5, "steps": 1, "hierarchy": None, "head": "algorithm", "transductive": False}
    history = [{"iteration": i, "train/loss": 1.0 / i, "val/loss": 2.0 / i, "val/loss_ci95": 0.1} for i in (1, 2)]
    runs = []
    for name in ("a", "b"):
        run = _small_run(tmp_path / name, [row], history)
        results = json.loads((run / "results.json").read_text())
        results["config"]["data"] = {"name": "sinusoid"}
        (run / "results.json").write_text(json.dumps(results))
        (run / "steps_curve.json").write_text(json.dumps(
            {"steps": [0, 1], "split": "test", "episodes": 3, "trained_steps": 1,
             "curves": [{"setting": "5-shot regression", "metric": "loss", "mean": [4.0, 3.0], "ci95": [0.5, 0.5]}]}))
        runs.append(run)
    page = write_comparison(runs, tmp_path / "cmp.html")
    assert sorted(_check_images(page)) == ["cmp_mse_bars.png", "cmp_mse_steps.png", "cmp_mse_val.png"]
    text = page.read_text()
    assert "<h2>Held-out MSE (95% CI)</h2>" in text and "<h2>Validation MSE during meta-training</h2>" in text
    mixed = write_comparison([runs[0], _small_run(tmp_path / "c", [_row(0.9, 0.01)])], tmp_path / "mix.html")
    assert {"mix_accuracy.png", "mix_mse_bars.png"} <= set(_check_images(mixed))


def test_a_results_json_without_machine_memory_or_data_sources_is_reported(tmp_path):
    """`"machine": null` (or memory, data_sources) crashed the report with a bare AttributeError (exit 1):
    null is a run that recorded none, and the page is written."""
    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    results.update(machine=None, memory=None, data_sources=None, peak_memory_mb=10)
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run), "--no-progress"]) == 0
    assert "peak memory <b>10 MB</b>" in (run / "report.html").read_text()


def test_a_run_saved_before_the_test_validation_overlap_check_still_loads_to_evaluate_again(tmp_path):
    """A run saved with data.test_split: val and eval.checkpoint: best (accepted before the overlap check)
    recorded 'the saved config does not load' instead of its steps curve: the weights were selected when it
    was saved, so the selection settings (checkpoint, early stopping, scheduler; every stage's) are set aside."""
    from metamtl.experiment import check_steps_request

    run = _small_run(tmp_path / "r", [_row(0.6, 0.1)])
    results = json.loads((run / "results.json").read_text())
    results["config"].update(data={"name": "omniglot", "val_split": "val", "test_split": "val"},
                             eval={"checkpoint": "best"}, train={"early_stopping": {"patience": 2}},
                             stages=[{"name": "pre", "train": {"scheduler": {"name": "plateau"}}}, {"name": "meta"}])
    (run / "results.json").write_text(json.dumps(results))
    _, cfg, failure, _ = check_steps_request(run)
    assert failure is None and cfg.data.test_split == "val" and cfg.eval.checkpoint == "last"
