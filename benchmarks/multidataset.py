"""Two-dataset meta-training: equal weighting vs each multi-task strategy, equal time budgets.

Omniglot (small1+small2) + mini-ImageNet (64 train classes) mixed 50/50 with
configs/multi/omniglot_miniimagenet.yaml (ANIL, proto heads, per-dataset conv stems, shared
trunk); the per-dataset meta-gradients are combined by each strategy.  Held-out evaluation per
dataset: Omniglot test characters, mini-ImageNet *val* classes (the test images are absent).

Run one strategy per process under the benchmark lock, so other work can run in between; a
second seed (``--seed 1``: other training episodes and initial weights) for equal weighting and the
best strategies tells a real difference from seed noise::

    for s in equal uncertainty gradnorm dwa pcgrad cagrad; do
        flock /tmp/metamtl-bench.lock python benchmarks/multidataset.py run --strategy $s --budget 10 --no-progress
    done
    for s in equal BEST BEST2; do
        flock /tmp/metamtl-bench.lock python benchmarks/multidataset.py run --strategy $s --budget 10 --seed 1 --no-progress
    done
    python benchmarks/multidataset.py table          # markdown rows + benchmarks/figures/multidataset.png

``table`` prints one row per run, then each strategy's mean over seeds against equal weighting:
a difference is called real only when it exceeds both the 95% CIs of the two evaluations combined
and the seed-to-seed spread of equal weighting.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
CONFIG = REPO / "configs/multi/omniglot_miniimagenet.yaml"
STRATEGIES = ("equal", "uncertainty", "gradnorm", "dwa", "pcgrad", "cagrad")


def run_one(args: argparse.Namespace) -> None:
    from metamtl.config import load_config
    from metamtl.experiment import run

    overrides = [f"name={run_name(args.strategy, args.seed)}", f"output_dir={args.out}", f"seed={args.seed}",
                 f"tasks.seed={args.seed}",
                 f"algorithm.strategy.name={args.strategy}", f"train.budget_minutes={args.budget}",
                 f"eval.episodes={args.episodes}", *args.overrides]
    cfg = load_config(CONFIG, overrides)
    results = run(cfg, progress=not args.no_progress, overwrite=True)  # reruns replace their run folder
    for row in results["test"]:
        print(row["dataset"], row.get("accuracy"), row.get("ci95"))


def run_name(strategy: str, seed: int) -> str:
    return f"multi_{strategy}" + (f"_seed{seed}" if seed else "")


def load(out: Path) -> dict[tuple[str, int], dict]:
    """Finished runs by ``(strategy, seed)``."""
    runs = {}
    for s in STRATEGIES:
        for seed in range(10):
            path = out / run_name(s, seed) / "results.json"
            if path.is_file():
                r = json.loads(path.read_text())
                r["history"] = json.loads((path.parent / "history.json").read_text())
                runs[(s, seed)] = r
    return runs


def scores(r: dict, datasets: list[str]) -> tuple[float, float]:
    """Mean accuracy over the datasets and its 95% CI (the per-dataset CIs combined)."""
    rows = {row["dataset"]: row for row in r["test"] if "accuracy" in row}
    mean = sum(rows[d]["accuracy"] for d in datasets) / len(datasets)
    ci = sum(rows[d]["ci95"] ** 2 for d in datasets) ** 0.5 / len(datasets)
    return mean, ci


def table(args: argparse.Namespace) -> None:
    runs = load(Path(args.out))
    if not runs:
        raise SystemExit(f"no results under {args.out}; run `benchmarks/multidataset.py run` first")
    datasets = [row["dataset"] for row in next(iter(runs.values()))["test"] if "accuracy" in row]
    head = "| strategy | seed | meta-iterations (train s) | " + " | ".join(f"{d} 5-way 1-shot" for d in datasets) + " | mean |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (s, seed), r in runs.items():
        accs = {row["dataset"]: row for row in r["test"] if "accuracy" in row}
        cells = [f"{100 * accs[d]['accuracy']:.2f} ± {100 * accs[d]['ci95']:.2f}" for d in datasets]
        mean, ci = scores(r, datasets)
        print(f"| {s} | {seed} | {r['iterations']} ({r['train_seconds']:.0f}) | " + " | ".join(cells)
              + f" | {100 * mean:.2f} ± {100 * ci:.2f} |")
    verdicts(runs, datasets)
    first = {s: r for (s, seed), r in runs.items() if seed == 0}
    if first:
        plot(first, datasets, REPO / "benchmarks/figures/multidataset.png")
    else:  # (an empty figure would replace the tracked one)
        print("plot: skipped, no seed-0 runs here (the figure shows seed 0 of each strategy)")


def verdicts(runs: dict[tuple[str, int], dict], datasets: list[str]) -> None:
    """Each strategy's seed-mean against equal weighting: real difference or within noise."""
    by = {}
    for (s, _), r in runs.items():
        by.setdefault(s, []).append(scores(r, datasets))
    if "equal" not in by:
        return
    eq = [m for m, _ in by["equal"]]
    spread = max(eq) - min(eq)
    eq_mean, eq_ci = sum(eq) / len(eq), max(c for _, c in by["equal"])
    print(f"\nequal weighting: mean {100 * eq_mean:.2f} over {len(eq)} seed(s), seed-to-seed spread {100 * spread:.2f}")
    for s, vals in by.items():
        if s == "equal":
            continue
        mean = sum(m for m, _ in vals) / len(vals)
        noise = max((eq_ci ** 2 + max(c for _, c in vals) ** 2) ** 0.5, spread)
        verdict = "real" if abs(mean - eq_mean) > noise else "within noise"
        print(f"{s}: {100 * mean:.2f} over {len(vals)} seed(s), {100 * (mean - eq_mean):+.2f} vs equal; "
              f"noise bound {100 * noise:.2f} -> {verdict}")


def plot(runs: dict[str, dict], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(runs)
    width = 0.8 / len(datasets)
    for j, d in enumerate(datasets):
        rows = [next(x for x in runs[s]["test"] if x["dataset"] == d) for s in names]
        xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, [100 * r["accuracy"] for r in rows], width, yerr=[100 * r["ci95"] for r in rows],
                    capsize=3, label=d)
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_ylabel("held-out 5-way 1-shot accuracy (%)")
    axes[0].legend()
    axes[0].grid(axis="y", alpha=0.3)
    for k, s in enumerate(names):
        hist = [h for h in runs[s]["history"] if f"train/mtl/weight/{datasets[-1]}" in h]
        if not hist:
            continue
        xs = [h["iteration"] for h in hist]
        ratio = [h[f"train/mtl/weight/{datasets[-1]}"] / max(h[f"train/mtl/weight/{datasets[0]}"], 1e-12)
                 for h in hist]
        axes[1].plot(xs, ratio, color=f"C{k}", label=s)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("meta-iteration")
    axes[1].set_ylabel(f"weight {datasets[-1]} / weight {datasets[0]}")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.suptitle("Omniglot + mini-ImageNet: per-dataset held-out accuracy and dataset weights")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train + evaluate one strategy")
    r.add_argument("--strategy", choices=STRATEGIES, required=True)
    r.add_argument("--budget", type=float, default=7.0, help="training minutes")
    r.add_argument("--episodes", type=int, default=600)
    r.add_argument("--seed", type=int, default=0, help="seed of the initial weights and training episodes "
                   "(evaluation episodes stay the same); runs other than 0 are named multi_<strategy>_seed<N>")
    r.add_argument("--out", default="runs/multi")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    r.set_defaults(func=run_one)
    t = sub.add_parser("table", help="markdown table and plot of the finished runs")
    t.add_argument("--out", default="runs/multi")
    t.set_defaults(func=table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
