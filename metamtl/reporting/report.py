"""Self-contained HTML reports of run directories (``results.json`` + ``history.json`` +
``steps_curve.json`` -> HTML + PNGs).  Reports only read what a run wrote; they evaluate nothing.

* :func:`write_report` - one run: held-out accuracy table (with published references for the
  standard protocols), accuracy bars with 95% CI, learning curves, inner-loop losses during
  meta-training, and test accuracy against the number of inner steps.
* :func:`write_comparison` - several runs (methods) side by side: accuracy bars with 95% CI per
  setting, validation curves and inner-step curves overlaid, a summary table.
* :class:`HTMLReport` - the callback that writes a run's report when its results are in.

The HTML needs no network: plots are PNG files next to it (or inlined with ``embed=True``).
"""
from __future__ import annotations

import base64
import html
import json
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

from ..callbacks import Callback, FitState
from ..checkpoint import DERIVED_FILES, RUN_FILES
from ..config_merge import evaluated_config
from ..files import atomic_write_text
from ..errors import ConfigError
from ..evaluation import plus_minus
from ..evaluation import within_superclass
from ..steps_curve import cache_key, read_steps_curve
from . import plots
from .published import published

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1060px;margin:2em auto;
padding:0 1.2em;color:#1d1d1f;line-height:1.45}h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;
margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}.meta{color:#555}table{border-collapse:collapse;
margin:.6em 0}td,th{border:1px solid #d0d0d0;padding:5px 11px;text-align:left;vertical-align:top}
th{background:#f3f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}.big{font-size:1.15em;
font-weight:600}figure{margin:1em 0}figcaption{color:#555;font-size:.92em;max-width:900px}img{max-width:100%;
border:1px solid #eee}pre{background:#f6f6f8;padding:1em;overflow:auto;font-size:.85em}.note{background:#fff8e1;
border-left:4px solid #f0b400;padding:.5em .9em}details{margin:.6em 0}code{background:#f3f3f5;padding:0 .25em}.nowrap,td.big{white-space:nowrap}"""


def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(results, history)`` of a run directory written by :func:`metamtl.experiment.run`."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no results.json); run `metamtl fit CONFIG` first")
    try:
        results = json.loads(results_path.read_text())
        hist_path = run_dir / "history.json"
        history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
    except ValueError as exc:
        raise ConfigError(f"{run_dir}: results.json or history.json is not valid JSON ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise ConfigError(f"{results_path} is not a metamtl run's results (expected an object with a 'config' "
                          "object); pass the folder of a run written by `metamtl fit`")
    if not isinstance(history, list):
        raise ConfigError(f"{hist_path} is not a metamtl run's history (expected a list of rows); delete it or "
                          "pass the folder of a run written by `metamtl fit`")
    _check_shape(results, results_path)
    return results, history


#: the numbers a report formats, in results.json, its rows and its stages' and members' entries
_NUMBERS = ("iterations", "train_seconds", "selected_iteration", "peak_memory_mb", "accuracy", "ci95", "loss",
            "loss_ci95")


def _check_shape(results: Mapping[str, Any], path: Path) -> None:
    """:class:`ConfigError` naming ``path`` and the field when ``results`` has a part the report reads
    in another shape than a run writes (a list that is not one, a number that is text ...)."""
    def wrong(field: str, expected: str) -> ConfigError:
        return ConfigError(f"{path}: {field} is not {expected} as a metamtl run writes it; restore the file "
                           "or pass the folder of a run written by `metamtl fit`")

    def entries(field: str, value: Any) -> list:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise wrong(field, "a list of objects")
        return value

    def numbers(field: str, obj: Mapping[str, Any]) -> None:
        for k in _NUMBERS:
            if not isinstance(obj.get(k), (int, float, type(None))) or isinstance(obj.get(k), bool):
                raise wrong(f"{field}[{k!r}]" if field else repr(k), "a number (or null)")

    for k in ("tasks", "train", "model", "algorithm", "data", "logging", "ensemble"):
        if not isinstance(results["config"].get(k, {}), dict):
            raise wrong(f"config[{k!r}]", "an object")
    if not isinstance(results.get("ensemble", {}), dict):
        raise wrong("'ensemble'", "an object")
    for k in ("machine", "memory", "data_sources"):  # read with .get: an object, or null for none
        if not isinstance(results.get(k) or {}, dict):
            raise wrong(repr(k), "an object (or null)")
    if not all(isinstance(v, list) for v in (results.get("data_sources") or {}).values()):
        raise wrong("'data_sources'", "an object of lists of archive names")
    checked = [("", results)] + [(f"'test'[{i}]", r) for i, r in enumerate(entries("'test'", results.get("test", [])))]
    checked += [(f"'stages'[{i}]", s) for i, s in enumerate(entries("'stages'", results.get("stages") or []))]
    for i, m in enumerate(entries("'ensemble'['members']", results.get("ensemble", {}).get("members", []))):
        checked += [(f"'ensemble'['members'][{i}]", m)]
        checked += [(f"'ensemble'['members'][{i}]['test'][{j}]", r) for j, r in
                    enumerate(entries(f"'ensemble'['members'][{i}]['test']", m.get("test") or []))]
    for field, obj in checked:
        numbers(field, obj)


# -- small pieces ---------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def scaled(ci: float | None, scale: float) -> float | None:
    """``scale * ci``; ``None`` stays ``None`` (a CI of one episode, ``null`` in results files)."""
    return None if ci is None else scale * ci


def _setting(r: Mapping[str, Any]) -> str:
    """``5-way 1-shot`` (prefixed ``dataset:`` in multi-dataset runs)."""
    if r.get("accuracy") is None and "skipped" not in r:
        setting = f"{r['shots']}-shot regression"
    else:
        setting = f"{r['ways']}-way {r['shots']}-shot"
        setting += within_superclass(r.get("hierarchy"))
        if r.get("head", "algorithm") != "algorithm":
            setting += f", head {r['head']}" + (" (TRANSDUCTIVE)" if r.get("transductive") else "")
    return f"{r['dataset']}: {setting}" if r.get("dataset") else setting


def _regression(results: Mapping[str, Any]) -> bool:
    """Whether a run reports mean squared errors (sinusoid regression) rather than accuracies."""
    rows = [r for r in results.get("test", []) if "skipped" not in r]
    name = evaluated_config(results.get("config") or {}).get("data", {}).get("name")
    return name == "sinusoid" or (bool(rows) and all(r.get("accuracy") is None for r in rows))


def _stages(results: Mapping[str, Any]) -> str:
    """One line per stage of a staged run (``stages`` config), empty otherwise."""
    stages = results.get("stages") or []
    return "".join(f"<br>Stage {i + 1}, <b>{_e(s.get('stage'))}</b>: {_e(s.get('algorithm'))}, "
                   f"{s.get('iterations')} meta-iterations in {s.get('train_seconds', 0):.0f} s "
                   f"(stopped by {_e(s.get('stopped_by'))})" for i, s in enumerate(stages))


def _members(results: Mapping[str, Any]) -> str:
    """One line per member of an ensemble run (``ensemble.members`` config), empty otherwise."""
    ens = results.get("ensemble") or {}
    if not ens.get("members"):
        return ""
    averaged = "predictions" if _regression(results) else "class probabilities"
    lines = [f"<br>Ensemble of <b>{len(ens['members'])}</b> members trained side by side, {ens.get('threads')} "
             f"torch thread(s) each; the held-out rows average their {averaged}."]
    for m in ens["members"]:
        alone = ", ".join(f"{_setting(r)} {_value(r)}" for r in m.get("test") or [])
        lines.append(f"<br>Member <b>{_e(m.get('name'))}</b> (seed {m.get('seed')}): {m.get('iterations')} "
                     f"meta-iterations in {m.get('train_seconds', 0):.0f} s" + (f"; alone: {_e(alone)}" if alone else ""))
    return "".join(lines)


def _value(r: Mapping[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if r.get("accuracy") is None:
        return f"MSE {r['loss']:.4f}{plus_minus(r['loss_ci95'], digits=4)}"
    return f"{100 * r['accuracy']:.2f}%{plus_minus(r['ci95'], 100, unit='%')}"


def _href(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` as a URL (``#``, ``%``, spaces quoted): a link to that very file."""
    return quote(Path(os.path.relpath(path, base)).as_posix())


def _img(path: Path, alt: str, embed: bool, base: Path) -> str:
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    else:
        src = _href(path, base)
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _figure(path: Path | None, alt: str, caption: str, embed: bool, base: Path) -> str:
    if path is None:
        return ""
    return f"<figure>{_img(path, alt, embed, base)}<figcaption>{caption}</figcaption></figure>"


def protocol(cfg: Mapping[str, Any], resolved: Mapping[str, Sequence[str]] | None = None) -> tuple[str, bool]:
    """(Human description of the data protocol, whether published numbers apply to it).

    ``resolved``: the archives each Omniglot dataset read, by label (a run's ``results["data_sources"]``,
    see :func:`run_protocol`); without it (older runs) the configured ``sources`` are judged."""
    if cfg.get("datasets"):
        parts = [f"{d.get('label') or d.get('name')}: {protocol({'data': d}, resolved)[0]}" for d in cfg["datasets"]]
        return "several datasets (" + "; ".join(parts) + ")", False
    data = cfg.get("data", {})
    name = data.get("name")
    if name == "omniglot":
        sources = (resolved or {}).get(data.get("label") or name, data.get("sources")) or []
        full = "images_evaluation" in sources and "images_background" in sources
        test = data.get("test_split", "test")
        if full and test == "test":
            return "Omniglot, official protocol: background alphabets for training, evaluation alphabets for testing", True
        if full:  # held-out evaluation on background characters (the val split), not the evaluation alphabets
            return (f"Omniglot, background alphabets for training, held-out evaluation on the "
                    f"{test or data.get('val_split')!r} split (background characters; not the official evaluation "
                    "alphabets)", False)
        return (f"Omniglot from {', '.join(sources) or 'the archives found'}: characters split "
                f"{data.get('split_fractions') or [0.6, 0.2, 0.2]} into train/val/test (held-out characters; "
                "not the official evaluation alphabets)", False)
    if name == "miniimagenet":
        test = data.get("test_split")
        if test == "test":
            return "mini-ImageNet, Ravi & Larochelle split: train classes for training, test classes for testing", True
        return (f"mini-ImageNet, Ravi & Larochelle split, held-out evaluation on the {test or data.get('val_split')!r} "
                "classes (test images not available)", False)
    return str(name), False


def run_protocol(results: Mapping[str, Any]) -> tuple[str, bool]:
    """:func:`protocol` of a run, judged on the archives it recorded reading (``data_sources``) and on
    the data its evaluated learner was tested on (a staged run's last stage's)."""
    return protocol(evaluated_config(results.get("config", {})), results.get("data_sources"))


def references(r: Mapping[str, Any], dataset: str) -> list[Any]:
    """The published results a held-out row of ``dataset`` (a dataset's name, e.g. from
    :func:`row_dataset`) can be read against: only inductive rows of random classes (published
    few-shot numbers are neither transductive nor drawn within superclasses)."""
    if r.get("accuracy") is None or r.get("transductive") or r.get("hierarchy") is not None:
        return []
    return published(dataset, r.get("ways"), r.get("shots"))


def row_dataset(r: Mapping[str, Any], cfg: Mapping[str, Any]) -> str:
    """The name of the dataset (``omniglot``, ...) a held-out row of a run with config ``cfg`` is of:
    a multi-dataset run's row carries its dataset's label (free text, ``label`` or ``name``)."""
    label = r.get("dataset")
    for d in cfg.get("datasets") or []:
        if (d.get("label") or d.get("name")) == label:
            return str(d.get("name"))
    return label or cfg.get("data", {}).get("name", "")


def reference_bars(rows: Iterable[tuple[Mapping[str, Any], str]]) -> list[dict[str, Any]]:
    """The published bars of held-out rows, given as ``(row, its dataset's name)``."""
    bars = []
    for r, dataset in rows:
        for p in references(r, dataset):
            bars.append({"group": _setting(r), "label": f"{p.method} (published)", "value": p.accuracy,
                         "ci95": p.ci95, "reference": True})
    return bars


def published_sources(rows: Iterable[tuple[Mapping[str, Any], str]]) -> str:
    """``Published: MAML: Finn et al. 2017, ...; MAML++: ...`` for the references of held-out rows
    (given as ``(row, its dataset's name)``), empty when none applies."""
    sources = dict.fromkeys(f"{p.method}: {p.source}" for r, dataset in rows for p in references(r, dataset))
    return f"Published numbers: {'; '.join(sources)}." if sources else ""


def _run_label(results: Mapping[str, Any]) -> str:
    alg = evaluated_config(results.get("config", {})).get("algorithm", {})
    return f"{results.get('name', '?')} ({alg.get('name', '?')})"


# -- one run --------------------------------------------------------------------------------------
def _in_total(results: dict[str, Any]) -> str:
    """An ensemble's iterations are its members' sum, a staged run's its stages': say so (each
    member's or stage's count follows; the header's algorithm and tasks are the last stage's)."""
    members = results.get("ensemble", {}).get("members", [])
    if members:
        return f" in total over its {len(members)} members"
    stages = results.get("stages") or []
    if len(stages) > 1:
        return (f" in total over its {len(stages)} stages (algorithm and tasks above: the last stage's;"
                " each stage below)")
    return ""


def _selected_line(results: Mapping[str, Any]) -> str:
    """Which iteration's weights the held-out results are of, when not the last (``eval.checkpoint: best``)."""
    selected = results.get("selected_iteration")
    if selected is None or selected == results.get("iterations"):
        return ""
    return (f"; held-out results use the weights of iteration <b>{selected}</b> (best validation, "
            "<code>eval.checkpoint: best</code>)")


def _memory_line(results: dict) -> str:
    """``; peak memory N MB (how), mode`` for the report's header (empty for runs without it)."""
    peak = results.get("peak_memory_mb")
    if not peak:
        return ""
    mem = results.get("memory") or {}
    how = "CUDA max allocated" if mem.get("measure") == "cuda_max_allocated" else "process resident set"
    mode = f", meta-gradient memory mode {_e(mem['mode'])}" if mem.get("mode") else ""
    plan = f" ({_e(mem['plan'])})" if mem.get("plan") else ""
    return f"; peak memory <b>{peak:.0f} MB</b> ({how}){mode}{plan}"


def write_report(run_dir: str | os.PathLike, *, embed: bool = False) -> Path:
    """Write ``<run_dir>/report.html`` and its PNGs from what the run wrote; returns the HTML path.

    Reads ``results.json``, ``history.json`` and ``steps_curve.json`` (the accuracy-vs-inner-steps
    curve the run computed, see :mod:`metamtl.steps_curve`; ``metamtl report`` computes it for runs
    without one) and evaluates nothing.  ``embed``: inline the PNGs (one file to send around).
    """
    run_dir = Path(run_dir)
    results, history = load_run(run_dir)
    cfg = results.get("config", {})
    builders = [("Accuracy with 95% CI", lambda: _accuracy_figure(run_dir, results, embed)),
                ("Learning curves", lambda: _figure(
                    plots.plot_learning_curves(history, run_dir / "learning_curves.png"), "learning curves",
                    ("Query loss (mean squared error)" if _regression(results) else "Query loss and accuracy")
                    + " after adaptation on meta-training tasks (faint: per iteration; solid: moving average)"
                    + (" and on fixed validation episodes (95% CI)" if _validated(history) else "") + ".",
                    embed, run_dir)),
                ("Inner loop during meta-training", lambda: _figure(
                    plots.plot_inner_losses(history, run_dir / "inner_loss.png"), "inner losses",
                    "Support-set loss before each inner step (lighter = later step) and the query loss after "
                    "adaptation, averaged over the tasks of each meta-batch (moving average).", embed, run_dir)),
                (f"{'MSE' if _regression(results) else 'Accuracy'} vs number of inner steps at test time",
                 lambda: _steps_section(run_dir, cfg, embed))]
    figures = [(title, _drawn(title, run_dir, build, _not_drawn)) for title, build in builders]
    out = run_dir / "report.html"
    atomic_write_text(out, _report_page(run_dir, results, figures))
    return out


def _validated(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a run's history holds validation rows (``val/...``; none for a run without ``data.val_split``)."""
    return any(isinstance(r, dict) and any(str(k).startswith("val/") for k in r) for r in history)


def _drawn(title: str, where: Path, build: Callable[[], Any], failed: Any = None) -> Any:
    """``build()``, or ``failed`` (called with the reason when callable) with a warning naming the
    figure when drawing it fails: one bad figure (a value matplotlib refuses, a damaged file) never
    costs the page.  A missing matplotlib (``ImportError``) is the caller's to handle."""
    try:
        return build()
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of one figure: the page goes on without it
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"{where}: the figure {title!r} was skipped: it could not be drawn ({reason})",
                      RuntimeWarning, stacklevel=3)
        return failed(reason) if callable(failed) else failed


def _not_drawn(reason: str) -> str:
    return f'<p class="note">{_e(f"Not drawn: {reason}")}</p>'


def _accuracy_figure(run_dir: Path, results: Mapping[str, Any], embed: bool) -> str:
    """Held-out accuracy bars with 95% CI, next to published numbers where they apply."""
    test, cfg = results.get("test", []), evaluated_config(results.get("config", {}))
    comparable = run_protocol(results)[1]
    bars = [{"group": _setting(r), "label": _run_label(results), "value": 100 * r["accuracy"],
             "ci95": scaled(r["ci95"], 100), "reference": False} for r in test if r.get("accuracy") is not None]
    refs = reference_bars((r, row_dataset(r, cfg)) for r in test)
    bars += refs
    caption = ("Held-out accuracy of this run (mean over test episodes, whiskers: 95% CI)"
               + (" next to published numbers (grey, hatched)" if refs else "") + ".")
    if refs and not comparable:
        caption += (" <b>The published numbers are on the official test classes; this run's held-out "
                    "classes differ, so the comparison is indicative only.</b>")
    return _figure(plots.plot_comparison(bars, run_dir / "accuracy.png"), "accuracy bars", caption, embed, run_dir)


def current_steps_curve(run_dir: Path) -> dict[str, Any] | None:
    """:func:`read_steps_curve`, or ``{"error": ...}`` for a curve computed from another ``learner.pt``
    than the run's, told by the file's size (its ``key``; a learner holds its history, so one trained on has
    another size): e.g. a resumed run that did not compute its curve again keeps the one of the learner it
    continued, which is not this learner's.  Not by the file's time, which a copied run folder changes."""
    data = read_steps_curve(run_dir)
    key = (data or {}).get("key")
    if not isinstance(key, dict) or "error" in data:  # an older curve without a key: nothing to check
        return data
    learner = run_dir / str(key.get("learner", "learner.pt"))
    if not learner.is_file():  # deleted (to save space, say): the run's own curve, which nothing can check
        return {**data, "note": f"{learner.name} is missing: this is the curve the run saved, which can be neither "
                                "checked against its learner nor computed again"}
    fields = ("learner", "size")
    now = cache_key(learner, data["episodes"], data["steps"])
    if all(now.get(f) == key.get(f) for f in fields):
        return data
    return {"error": f"the saved {learner.name} is not the one the curve in steps_curve.json was computed from "
                     f"(that was an earlier {learner.name}, e.g. before the run was resumed); `metamtl report "
                     f"RUN_DIR` computes it for the current one (--steps-episodes N where the run's config sets "
                     "logging.report_steps_episodes: 0)"}


def _steps_section(run_dir: Path, cfg: Mapping[str, Any], embed: bool) -> str:
    """The accuracy-vs-inner-steps plot and table from ``steps_curve.json`` (or why there is none)."""
    data = current_steps_curve(run_dir)
    members = int((cfg.get("ensemble") or {}).get("members", 1))
    if data is None and members > 1:
        links = ", ".join(f'<a href="members/member{i}/report.html">member{i}</a>' for i in range(members))
        return f'<p class="note">An ensemble: each member\'s report has its own curve ({links}).</p>'
    if data is None or "error" in data:
        disabled = int(cfg.get("logging", {}).get("report_steps_episodes", 100)) == 0
        note = ("Not computed (disabled)." if disabled and data is None else
                f"Not computed: {data['error']}" if data is not None else
                "Not computed: this run wrote no steps_curve.json (`metamtl report RUN_DIR` computes it).")
        return f'<p class="note">{_e(note)}</p>'
    scale = 1.0 if data["curves"] and data["curves"][0]["metric"] == "loss" else 100.0
    curves = [{"label": c["setting"], "x": data["steps"], "y": [scale * m for m in c["mean"]],
               "ci95": [scaled(e, scale) for e in c["ci95"]]} for c in data["curves"]]
    metric = "MSE" if scale == 1.0 else "accuracy (%)"
    png = plots.plot_curves(curves, run_dir / "steps_curve.png", "inner steps at test time",
                            f"{data['split'].split(' (')[0]} {metric}",  # 'held-out (a: test, b: val)' -> 'held-out'
                            vline=(data["trained_steps"], f"steps in meta-training ({data['trained_steps']})"),
                            integer_x=True)
    html_ = _figure(png, f"{'MSE' if scale == 1.0 else 'accuracy'} vs inner steps",
                    f"The saved learner adapted with 0..{max(data['steps'])} inner steps on "
                    f"{data['episodes']} fixed {_e(data['split'])} episodes per point "
                    "(95% CI). Step 0 is the meta-learned initialisation without any adaptation.", embed, run_dir)
    digits = 4 if scale == 1.0 else 2  # MSE as the held-out table writes it (_value); accuracy in %
    rows = "".join(
        f"<tr><td>{_e(c['setting'])}</td>" + "".join(
            f"<td class=num>{scale * m:.{digits}f}{plus_minus(e, scale, digits)}</td>"
            for m, e in zip(c["mean"], c["ci95"]))
        + "</tr>" for c in data["curves"])
    note = data.get("note") or (data.get("refresh_error") and "This is the curve saved before; computing it again "
                                f"(other steps or episodes) failed: {data['refresh_error']}")
    if note:
        html_ = f'<p class="note">{_e(note)}</p>' + html_
    return html_ + ("<table><tr><th>setting \\ steps</th>" + "".join(f"<th>{s}</th>" for s in data["steps"])
                    + f"</tr>{rows}</table>")


def _test_rows(results: Mapping[str, Any]) -> str:
    """One table row per held-out result, with the published references of its setting."""
    cfg = evaluated_config(results.get("config", {}))
    rows = []
    for r in results.get("test", []):
        refs = "; ".join(f"{p.method} {p.accuracy:.2f}%" + (f" ± {p.ci95:.2f}%" if p.ci95 else "")
                         for p in references(r, row_dataset(r, cfg)))
        rows.append(f"<tr><td>{_e(_setting(r))}</td><td class='num big'>{_e(_value(r))}</td>"
                    + "".join(f"<td class=num>{r.get(k, '–')}</td>" for k in ("episodes", "queries", "steps"))
                    + f"<td>{_e(refs) or '&ndash;'}</td></tr>")
    return "".join(rows) or "<tr><td colspan=6>no test evaluation in this run</td></tr>"


def wandb_folders(results: Mapping[str, Any]) -> list[str]:
    """Where a run's W&B runs are written, relative to its folder: its own, its earlier stages' and its
    ensemble members' (staged too), as ``results`` names them: the stage or member folders of a run
    that ``--overwrite`` replaced (stages renamed, fewer members) are not this run's."""
    def stages(r: Mapping[str, Any]) -> list[str]:  # the last stage trains in the run folder itself
        return [f"stages/{s.get('stage')}/wandb" for s in (r.get("stages") or [])[:-1]]

    folders = ["wandb", *stages(results)]
    for m in (results.get("ensemble") or {}).get("members") or []:
        folders += [f"members/{m.get('name')}/{f}" for f in ["wandb", *stages(m)]]
    return folders


def _wandb_note(run_dir: Path, results: Mapping[str, Any]) -> str:
    """Where the run's offline W&B runs are and one command, to paste into a shell from any folder,
    that uploads all of them (a resumed run has one per part; a staged run one per stage, an ensemble
    one per member and one for the ensemble; see :func:`wandb_folders`)."""
    root = run_dir.resolve()
    offline = sorted(p for folder in wandb_folders(results) for p in (root / folder).glob("offline-run-*") if p.is_dir())
    if not offline:
        return ""
    command = "wandb sync " + " ".join(shlex.quote(str(p)) for p in offline)
    names = ", ".join(p.relative_to(root).as_posix() for p in offline)
    return (f"<p>W&amp;B offline run(s): <code>{_e(names)}</code> in "
            f"<code>{_e(root)}</code>; upload with <code>{_e(command)}</code>.</p>")


def _report_page(run_dir: Path, results: Mapping[str, Any], figures: list[tuple[str, str]]) -> str:
    cfg = results.get("config", {})
    t, tr, alg, model = (evaluated_config(cfg).get(k, {}) for k in ("tasks", "train", "algorithm", "model"))
    files = [f for f in ("results.json", "history.json", "learner.pt", "ensemble.pt", "best.pt", "last.pt") if (run_dir / f).is_file()]
    machine = results.get("machine") or {}
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>metamtl report: {_e(results.get('name', ''))}</title><style>{CSS}</style></head><body>
<h1>metamtl report: {_e(results.get('name', ''))}</h1>
<p class="meta"><b>{_e(alg.get('name'))}</b> on <b>{_e(model.get('name'))}</b>
({_e(', '.join(f'{k}={v}' for k, v in model.items() if k != 'name'))}),
meta-trained on {t.get('ways')}-way {t.get('shots')}-shot tasks ({t.get('queries')} queries per class,
{tr.get('meta_batch_size')} tasks per meta-batch) for <b>{results.get('iterations')}</b> meta-iterations{_in_total(results)} in
{results.get('train_seconds') or 0:.0f} s (stopped by {_e(results.get('stopped_by'))}){_selected_line(results)}{_memory_line(results)}.{_stages(results)}{_members(results)}<br>
Data: {_e(run_protocol(results)[0])}.<br>
Commit <code>{_e(results.get('commit'))}</code>, {_e(results.get('date'))},
{_e(machine.get('cpu') or machine.get('platform', ''))}.</p>
<h2>Held-out test results</h2>
<table><tr><th>setting</th><th>{_metric_columns(results)}</th><th>inner steps</th>
<th>published (official test classes)</th></tr>{_test_rows(results)}</table>{_sources_note(results)}
{''.join(f'<h2>{_e(title)}</h2>{fig}' for title, fig in figures if fig)}
<h2>Files</h2><p>{' · '.join(f'<a href="{_e(quote(f))}">{_e(f)}</a>' for f in files)}</p>{_wandb_note(run_dir, results)}
<details><summary>Configuration</summary><pre>{_e(json.dumps(cfg, indent=2))}</pre></details>
<details><summary>Machine</summary><pre>{_e(json.dumps(machine, indent=2))}</pre></details>
</body></html>"""


def _sources_note(results: Mapping[str, Any]) -> str:
    """Where the held-out table's published numbers are from (a paragraph; empty without any)."""
    cfg = evaluated_config(results.get("config", {}))
    sources = published_sources((r, row_dataset(r, cfg)) for r in results.get("test", []))
    return f'<p class="meta">{_e(sources)}</p>' if sources else ""


def _metric_columns(results: Mapping[str, Any]) -> str:
    """The held-out table's metric, episodes and queries headers: MSE for regression runs."""
    if _regression(results):
        return "MSE (95% CI)</th><th>episodes</th><th>queries"
    return "accuracy (95% CI)</th><th>episodes</th><th>queries / class"


class HTMLReport(Callback):
    """Write the run's ``report.html`` once its results are written (``on_results``, rank 0).

    Added by :func:`metamtl.experiment.run` when ``logging.report`` is on; sets
    ``results["report"]`` to the page's path.
    """

    def __init__(self, run_dir: str | os.PathLike, embed: bool = False) -> None:
        self.run_dir, self.embed = Path(run_dir), embed

    def on_results(self, state: FitState, results: dict[str, Any]) -> None:
        if not state.is_main_process:
            return
        path = write_report_safely(self.run_dir, embed=self.embed)
        if path is not None:
            results["report"] = str(path)


def write_report_safely(run_dir: str | os.PathLike, *, embed: bool = False) -> Path | None:
    """:func:`write_report` at the end of a run: a report that cannot be written is a warning,
    never an error, since the run's results (``results.json``, ``learner.pt``) are already saved.
    ``None`` when no page was written (also without matplotlib)."""
    try:
        return write_report(run_dir, embed=embed)
    except ImportError:  # plotting unavailable: the run's files are all there
        return None
    except Exception as exc:  # noqa: BLE001 - the results are saved; only the page is lost
        warnings.warn(f"{run_dir}: report.html could not be written ({type(exc).__name__}: {exc}); the run's "
                      "results are saved: rebuild the page with `metamtl report RUN_DIR`", RuntimeWarning, stacklevel=2)
        return None


# -- several runs ---------------------------------------------------------------------------------
#: the PNGs :func:`write_report` draws into a run folder
REPORT_PNGS = ("accuracy.png", "learning_curves.png", "inner_loss.png", "steps_curve.png")


def _run_file(path: Path) -> bool:
    """Whether ``path`` is named like one of a run folder's own files (results, history, checkpoints,
    metrics, its report and that report's PNGs, its steps curve)."""
    name = path.name
    return (name in RUN_FILES or name in DERIVED_FILES or name in REPORT_PNGS or path.suffix == ".pt"
            or name.startswith("metrics."))


def check_comparison_out(out: str | os.PathLike, run_dirs: Sequence[str | os.PathLike]) -> None:
    """:class:`ConfigError` when the comparison page ``out`` would replace one of a compared run's own
    files (results.json, learner.pt, report.html, its PNGs ...): in a compared run folder or in a stage's
    or member's run folder below it.  Any other file, inside a run folder or not, is fine."""
    target = Path(out).resolve()
    for d in run_dirs:
        run = Path(d).resolve()
        own_folder = target.parent == run or (run in target.parents and (target.parent / "results.json").exists())
        if own_folder and _run_file(target):
            raise ConfigError(f"--out {out} would replace the run's own file {target.name} in {target.parent} "
                              f"(a run compared: {d}); write the comparison to another file, e.g. --out "
                              "comparison.html")


def write_comparison(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, embed: bool = False) -> Path:
    """Compare runs (e.g. one per method) on one page: ``out`` is the HTML file to write.

    Uses each run's ``results.json``/``history.json`` and, when present, its ``steps_curve.json``.
    """
    if not run_dirs:
        raise ConfigError("write_comparison needs at least one run directory")
    check_comparison_out(out, run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for d in run_dirs:
        results, history = load_run(d)
        steps = current_steps_curve(Path(d))
        runs.append((Path(d), results, history, steps if steps is not None and "error" not in steps else None))
    runs = [(*run, label) for run, label in zip(runs, _unique_labels(runs))]
    stem = out.with_suffix("")
    figs = []
    for metric, (what, suffix) in COMPARED.items():  # classification runs' accuracies, regression runs' MSEs
        picked = [run for run in runs if _regression(run[1]) == (metric == "loss")]
        if picked:
            figs += _comparison_figures(picked, out, Path(f"{stem}{suffix}"), metric, what)
    return _comparison_page(out, runs, figs, embed)


#: a comparison's figures: per metric of the held-out rows, its name and the suffix of its PNG files
COMPARED = {"accuracy": ("accuracy", ""), "loss": ("MSE", "_mse")}


def _comparison_figures(runs: list[tuple], out: Path, stem: Path, metric: str, what: str) -> list[tuple]:
    """``(title, png or None, caption)`` of a comparison's bars, validation and inner-step curves of ``metric``."""
    title, name = f"Held-out {what} (95% CI)", f"{stem}_{'accuracy' if metric == 'accuracy' else 'bars'}.png"
    return [_drawn(title, out, lambda: _comparison_bars(runs, Path(name), metric), (title, None, "")),
            (f"Validation {what} during meta-training",
             _drawn(f"Validation {what}", out, lambda: _validation_curves(runs, Path(f"{stem}_val.png"), metric)),
             f"{what[0].upper()}{what[1:]} on the fixed validation episodes (95% CI) against meta-iterations."),
            (f"{what[0].upper()}{what[1:]} vs number of inner steps at test time",
             _drawn(f"{what} vs inner steps", out, lambda: _step_curves(runs, Path(f"{stem}_steps.png"), metric)),
             "Each run's saved learner adapted with k inner steps (from its run's steps_curve.json).")]


def _unique_labels(runs: list[tuple]) -> list[str]:
    """Each run's :func:`_run_label`, followed where another run has the same label (one config run
    in two output folders) by the shortest end of its folder's path that tells them apart."""
    labels = [_run_label(results) for _, results, *_ in runs]
    parts = [d.resolve().parts for d, *_ in runs]
    unique = []
    for label, mine in zip(labels, parts):
        twins = [p for p, other in zip(parts, labels) if other == label and p is not mine]
        n = next((n for n in range(1, len(mine)) if all(p[-n:] != mine[-n:] for p in twins)), len(mine))
        unique.append(f"{label}, {Path(*mine[-n:])}" if twins else label)
    return unique


def _comparison_bars(runs: list[tuple], path: Path, metric: str = "accuracy") -> tuple[str, Path | None, str]:
    if metric == "loss":  # regression runs: MSE bars on their own axis, no published numbers
        bars = [{"group": _setting(r), "label": label, "value": r["loss"], "ci95": r.get("loss_ci95"),
                 "reference": False} for _, results, _, _, label in runs for r in results.get("test", [])
                if r.get("accuracy") is None and r.get("loss") is not None]
        return ("Held-out MSE (95% CI)", plots.plot_comparison(bars, path, ylabel="MSE, 95% CI"),
                "Mean squared error over test episodes per setting; whiskers are 95% confidence intervals.")
    bars = []
    for _, results, _, _, label in runs:
        bars += [{"group": _setting(r), "label": label, "value": 100 * r["accuracy"],
                  "ci95": scaled(r["ci95"], 100), "reference": False}
                 for r in results.get("test", []) if r.get("accuracy") is not None]
    caption = "Mean accuracy over test episodes per setting; whiskers are 95% confidence intervals."
    named = [(r, row_dataset(r, evaluated_config(res.get("config", {})))) for _, res, *_ in runs for r in res.get("test", [])
             if r.get("accuracy") is not None]
    datasets: dict[str, set[str]] = {}
    for r, name in named:
        datasets.setdefault(_setting(r), set()).add(name)
    # one set of references per bar group (setting, dataset, head, superclass draw), not per (ways, shots),
    # and none for a group of rows of several datasets (runs on different data)
    seen = {_setting(r): (r, name) for r, name in named if len(datasets[_setting(r)]) == 1}
    refs = reference_bars(seen.values())
    if refs:
        bars += refs
        caption += (" Grey hatched bars: published numbers on the official test classes. "
                    + _e(published_sources(seen.values())))
        if not all(run_protocol(res)[1] for _, res, *_ in runs):
            caption += (" <b>Some runs here are evaluated on other held-out classes, so comparing them "
                        "with the published numbers is indicative only.</b>")
    return "Held-out accuracy (95% CI)", plots.plot_comparison(bars, path), caption


def _axis(metric: str) -> tuple[float, str]:
    """(scale, axis label) of a comparison's curves of ``metric`` (``accuracy`` in %, ``loss``: the MSE)."""
    return (100.0, "accuracy (%)") if metric == "accuracy" else (1.0, "MSE")


def _validation_curves(runs: list[tuple], path: Path, metric: str = "accuracy") -> Path | None:
    curves, (scale, axis) = [], _axis(metric)
    for _, _, history, _, label in runs:
        val = [r for r in history if f"val/{metric}" in r]
        if val:
            curves.append({"label": label, "x": [r["iteration"] for r in val],
                           "y": [scale * r[f"val/{metric}"] for r in val],
                           "ci95": [scaled(r.get(f"val/{metric}_ci95"), scale) for r in val]})
    return plots.plot_curves(curves, path, "meta-iteration", f"validation {axis}")


def _step_curves(runs: list[tuple], path: Path, metric: str = "accuracy") -> Path | None:
    curves, (scale, axis) = [], _axis(metric)
    for _, _, _, steps, label in runs:
        for c in (steps or {}).get("curves", []):
            if c["metric"] == metric:
                curves.append({"label": f"{label}, {c['setting']}", "x": steps["steps"],
                               "y": [scale * m for m in c["mean"]], "ci95": [scaled(e, scale) for e in c["ci95"]]})
    return plots.plot_curves(curves, path, "inner steps at test time", axis, integer_x=True)


def _held_out_header(runs: list[tuple]) -> str:
    """The comparison table's result column: accuracy, MSE (regression runs) or both kinds."""
    kinds = {_regression(results) for _, results, *_ in runs}
    if kinds == {True}:
        return "held-out MSE (95% CI)"
    return "held-out result (95% CI)" if kinds == {True, False} else "held-out accuracy (95% CI)"


def _comparison_page(out: Path, runs: list[tuple], figs: list[tuple], embed: bool) -> Path:
    rows = []
    for d, results, *_ in runs:
        cfg = evaluated_config(results.get("config", {}))
        link = _href(d / "report.html", out.parent)
        tests = "<br>".join(f"{_e(_setting(r))}: <b class=nowrap>{_e(_value(r))}</b>" for r in results.get("test", []))
        rows.append(f"<tr><td><a href='{_e(link)}'>{_e(results.get('name'))}</a></td>"
                    f"<td>{_e(cfg.get('algorithm', {}).get('name'))}</td><td>{_e(run_protocol(results)[0])}</td>"
                    f"<td class=num>{results.get('iterations')}</td><td class=num>{results.get('train_seconds') or 0:.0f}</td>"
                    f"<td>{tests or '&ndash;'}</td><td><code>{_e(results.get('commit'))}</code></td></tr>")
    body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>metamtl comparison ({len(runs)} runs)</title><style>{CSS}</style></head><body>
<h1>metamtl comparison: {len(runs)} runs</h1>
<table><tr><th>run</th><th>algorithm</th><th>data</th><th>iterations</th><th>training time (s)</th>
<th>{_held_out_header(runs)}</th><th>commit</th></tr>{''.join(rows)}</table>
{''.join(f'<h2>{_e(t)}</h2>' + _figure(p, t, c, embed, out.parent) for t, p, c in figs if p is not None)}
</body></html>"""
    atomic_write_text(out, body)
    return out
