"""PNG plots of runs (matplotlib, Agg backend): learning curves, inner-loop losses, accuracy
against inner steps, and comparisons with 95% CI bars."""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ema(values: Sequence[float], alpha: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (no lag towards the first value; NaNs skipped).

    ``alpha`` defaults to about 5 / len(values), within [0.005, 0.2], so long runs are smoothed
    over a proportionally longer window.
    """
    if alpha is None:
        alpha = min(0.2, max(0.005, 5.0 / max(1, len(values))))
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if v is not None and math.isfinite(v):
            acc = (1 - alpha) * acc + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(acc / weight if weight else float("nan"))
    return out


def finite(value: Any, default: float = float("nan")) -> float:
    """``value`` as a float when it is a finite number, else ``default`` (NaN, inf, None, text:
    drawn as missing, never a crash or an axis stretched to infinity)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _percent(metric: str) -> bool:
    return "accuracy" in metric


def _by_stage(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, list[Mapping[str, Any]]]]:
    """Consecutive rows of the same ``stage`` (one group without stages)."""
    groups: list[tuple[Any, list[Mapping[str, Any]]]] = []
    for r in rows:
        if not groups or groups[-1][0] != r.get("stage"):
            groups.append((r.get("stage"), []))
        groups[-1][1].append(r)
    return groups


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """Train (raw and smoothed) and validation (with 95% CI) loss and accuracy per meta-iteration.

    A staged run's rows (``stage`` key) are drawn stage by stage (smoothed separately: the losses of
    a classifier over all classes and of N-way episodes differ), with a dashed line where each
    stage starts."""
    train = [r for r in history if "train/loss" in r]
    val = [r for r in history if "val/loss" in r]
    if not train and not val:
        return None
    has_acc = any("train/accuracy" in r or "val/accuracy" in r for r in history)
    plt = _pyplot()
    names = ["loss"] + (["accuracy"] if has_acc else [])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for name, ax in zip(names, axes[0]):
        scale = 100.0 if _percent(name) else 1.0
        for k, (stage, rows) in enumerate(_by_stage(train)):
            xs = [r["iteration"] for r in rows]
            ys = [scale * finite(r.get(f"train/{name}")) for r in rows]
            ax.plot(xs, ys, alpha=0.2, color="C0", lw=0.8)
            ax.plot(xs, ema(ys), color="C0", label="train tasks (EMA)" if k == 0 else None)
            if stage is not None:
                ax.axvline(xs[0], color="grey", ls="--", lw=0.8)
                ax.annotate(str(stage), (xs[0], 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8)
        if val:
            xs = [r["iteration"] for r in val]
            ys = [scale * finite(r.get(f"val/{name}")) for r in val]
            ci = [scale * finite(r.get(f"val/{name}_ci95"), 0.0) for r in val]
            ax.errorbar(xs, ys, yerr=ci, color="C1", marker="o", ms=4, capsize=3, label="validation (95% CI)")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(f"query {name}" + (" (%)" if scale != 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_inner_losses(history: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """Support loss before each inner step, and query loss after adaptation, over meta-training."""
    train = [r for r in history if "train/loss" in r]
    keys = sorted({k for r in train for k in r if k.startswith("train/inner_loss/step_")},
                  key=lambda k: int(re.sub(r"\D", "", k) or 0))
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = [r["iteration"] for r in train]
    cmap = plt.get_cmap("viridis")
    for i, key in enumerate(keys):
        ys = [finite(r.get(key)) for r in train]
        ax.plot(xs, ema(ys), color=cmap(i / max(1, len(keys))), label=f"support, before step {key.rsplit('_', 1)[1]}")
    ax.plot(xs, ema([finite(r["train/loss"]) for r in train]), color="C3", ls="--", label="query, after adaptation")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("loss (EMA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(curves: Sequence[Mapping[str, Any]], path: Path, xlabel: str, ylabel: str,
                vline: tuple[float, str] | None = None, integer_x: bool = False) -> Path | None:
    """Lines with 95% CI error bars, one per curve ``{"label", "x", "y", "ci95"}``; values that
    are fractions (accuracies) should be scaled by the caller."""
    curves = [c for c in curves if c.get("x")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, c in enumerate(curves):
        ci = [finite(e, 0.0) for e in c["ci95"]] if c.get("ci95") is not None else None
        ax.errorbar(c["x"], [finite(y) for y in c["y"]], yerr=ci, marker="o", ms=4, capsize=3, color=f"C{i}",
                    label=c["label"])
    if vline is not None:
        ax.axvline(vline[0], color="C3", ls="--", lw=1.2, alpha=0.7, zorder=0, label=vline[1])
    if integer_x:
        ax.set_xticks(sorted({x for c in curves for x in c["x"]}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_comparison(bars: Sequence[Mapping[str, Any]], path: Path, title: str = "",
                    ylabel: str = "accuracy (%), 95% CI") -> Path | None:
    """Grouped bars with 95% CI whiskers.

    Each bar: ``{"group"`` (x-axis group, e.g. ``"5-way 1-shot"``), ``"label"`` (legend entry),
    ``"value"`` (%), ``"ci95"`` (% or ``None``), ``"reference"`` (bool: published number)``}``.
    ``ylabel`` other than the accuracy's (e.g. ``"MSE, 95% CI"``): values of any size, the axis from 0.
    A value that is not a finite number is drawn as a missing bar ("n/a"), a CI that is not as no whisker.
    """
    if not bars:
        return None
    plt = _pyplot()
    groups = list(dict.fromkeys(b["group"] for b in bars))
    labels = list(dict.fromkeys(b["label"] for b in bars))
    per_group = {g: [b for b in bars if b["group"] == g] for g in groups}
    width = 0.8 / max(len(v) for v in per_group.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.9 * len(bars), 1.6 * len(groups)), 4.6))
    colors, runs = {}, 0
    for label in labels:  # runs get colours in order; published references are grey and hatched
        if any(b["reference"] for b in bars if b["label"] == label):
            colors[label] = "0.75"
        else:
            colors[label], runs = f"C{runs}", runs + 1
    lows, highs, drawn, percent = [], [], set(), ylabel.startswith("accuracy (%)")
    for g, group in enumerate(groups):
        present = per_group[group]
        for j, b in enumerate(present):
            x = g + width * (j - (len(present) - 1) / 2)
            value, e = finite(b["value"]), finite(b["ci95"], 0.0)
            if math.isnan(value):  # missing: a mark at the foot of the axis, no bar
                ax.annotate("n/a", (x, 0.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
                continue
            ref = bool(b["reference"])
            ax.bar([x], [value], width * 0.92, yerr=[e], capsize=4, color=colors[b["label"]],
                   hatch="//" if ref else None, edgecolor="0.4" if ref else None,
                   label=None if b["label"] in drawn else b["label"])
            drawn.add(b["label"])
            ax.annotate(f"{value:.1f}" if percent else f"{value:.3g}", (x, value + e), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 1), textcoords="offset points")
            lows.append(value - e)
            highs.append(value + e)
    ax.set_xticks(range(len(groups)))
    wrapped = [textwrap.fill(g, 22) for g in groups]  # long settings wrap, never overlap
    ax.set_xticklabels(wrapped, fontsize=8)
    ax.set_ylabel(ylabel)
    if percent:
        lo = max(0.0, math.floor((min(lows) - 5) / 5) * 5) if lows else 0.0
        ax.set_ylim(lo, 101 if lo > 0 else 100)
    else:
        ax.set_ylim(0.0, 1.15 * max(highs) if highs and max(highs) > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    lines = max(w.count("\n") + 1 for w in wrapped)  # the legend goes below the wrapped labels
    if drawn:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.055 * lines),
                  ncol=min(3, len(labels)), frameon=False)
    return _save(fig, path)
