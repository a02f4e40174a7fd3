"""A self-contained HTML report of a run directory (results.json + history.json + PNG plots)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _load(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no results.json); run `metamtl fit` first")
    results = json.loads(results_path.read_text())
    hist_path = run_dir / "history.json"
    history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
    return results, history


def plot_learning_curves(history: list[dict[str, float]], path: Path) -> Path | None:
    """Train (smoothed) and validation accuracy/loss against meta-iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "train/loss" in r]
    val = [r for r in history if "val/loss" in r]
    if not train and not val:
        return None
    has_acc = any("train/accuracy" in r for r in train)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    metrics = [("loss", axes[0][0])] + ([("accuracy", axes[0][1])] if has_acc else [])
    for name, ax in metrics:
        if train:
            xs = [r["iteration"] for r in train]
            ys = [r.get(f"train/{name}", float("nan")) for r in train]
            ax.plot(xs, ys, alpha=0.25, color="C0")
            ax.plot(xs, _ema(ys), color="C0", label="train (EMA)")
        if val:
            xs = [r["iteration"] for r in val]
            ys = [r.get(f"val/{name}", float("nan")) for r in val]
            ci = [r.get(f"val/{name}_ci95", 0.0) for r in val]
            ax.errorbar(xs, ys, yerr=ci, color="C1", marker="o", capsize=3, label="validation (95% CI)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` (and its PNGs) into ``run_dir``; returns the HTML path."""
    run_dir = Path(run_dir)
    results, history = _load(run_dir)
    images = []
    curve = plot_learning_curves(history, run_dir / "learning_curves.png")
    if curve is not None:
        images.append(("Learning curves", curve.name))
    rows = []
    for r in results.get("test", []):
        where = f"{html.escape(str(r['dataset']))}: " if r.get("dataset") else ""  # multi-dataset runs
        if "skipped" in r:
            rows.append(f"<tr><td>{where}{r['ways']}-way {r['shots']}-shot</td><td>skipped: {html.escape(r['skipped'])}</td><td>0</td></tr>")
        elif r.get("accuracy") is None:
            rows.append(f"<tr><td>{where}{r['shots']}-shot regression</td><td>MSE {r['loss']:.4f} ± {r['loss_ci95']:.4f}</td><td>{r['episodes']}</td></tr>")
        else:
            rows.append(
                f"<tr><td>{where}{r['ways']}-way {r['shots']}-shot</td><td><b>{100 * r['accuracy']:.2f}%</b> ± "
                f"{100 * r['ci95']:.2f}%</td><td>{r['episodes']}</td></tr>"
            )
    cfg = results.get("config", {})
    machine = results.get("machine", {})
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>metamtl report: {html.escape(results.get('name', ''))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}img{{max-width:100%}}</style></head><body>
<h1>metamtl report: {html.escape(results.get('name', ''))}</h1>
<p>Algorithm <b>{html.escape(str(cfg.get('algorithm', {}).get('name')))}</b>, model
<b>{html.escape(str(cfg.get('model', {}).get('name')))}</b>, dataset <b>{html.escape(str(cfg.get('data', {}).get('name')))}</b>;
{results.get('iterations')} meta-iterations in {results.get('train_seconds', 0):.0f} s
(stopped by {html.escape(str(results.get('stopped_by')))}). Commit {html.escape(str(results.get('commit')))}, {html.escape(str(results.get('date')))}.</p>
<h2>Held-out test accuracy</h2>
<table><tr><th>setting</th><th>accuracy (95% CI)</th><th>episodes</th></tr>{''.join(rows)}</table>
{''.join(f'<h2>{html.escape(t)}</h2><img src="{html.escape(src)}" alt="{html.escape(t)}">' for t, src in images)}
<h2>Machine</h2><pre>{html.escape(json.dumps(machine, indent=2))}</pre>
<h2>Configuration</h2><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(body)
    return out
