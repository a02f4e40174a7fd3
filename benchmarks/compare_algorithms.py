"""Compare meta-learning algorithms on Omniglot under the same training time budget.

Each method is one YAML file in ``configs/compare/`` (extending ``base.yaml``).  For every method
this script runs the same public entry point as ``metamtl fit`` (:func:`metamtl.experiment.run`):
meta-train until the time budget is spent, then evaluate the one trained learner on 600 test
episodes of held-out characters for every ``eval.settings`` entry (5-way and 20-way 1-shot).
It writes ``<out>/results.json``, a Markdown table (``<out>/table.md``, also printed) and a plot of
accuracy with 95% confidence intervals per method (``<out>/accuracy.png``).

Time-budgeted training must not share the CPU: with ``--lock FILE`` the script re-runs itself for
each method, training under ``flock -x FILE`` and evaluating (whose result does not depend on
speed) under ``flock -s FILE``.  ``--phase train`` / ``--phase eval`` run one half only.

Usage (the numbers in benchmarks/RESULTS.md)::

    python benchmarks/compare_algorithms.py --lock /tmp/metamtl-cpu.lock
    python benchmarks/compare_algorithms.py --methods protonet maml --set train.budget_minutes=1
    python benchmarks/compare_algorithms.py --table-only

``--table-only`` rebuilds table and plot from the ``results.json`` files of earlier runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metamtl import MetaLearner  # noqa: E402
from metamtl.config import load_config  # noqa: E402
from metamtl.experiment import build_tasks, evaluate_settings, run  # noqa: E402

METHODS = ["maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "protonet", "transfer"]
LABELS = {"maml": "MAML", "imaml": "iMAML", "fomaml": "FOMAML", "reptile": "Reptile", "anil": "ANIL",
          "metasgd": "Meta-SGD",
          "mamlpp": "MAML++", "protonet": "ProtoNet", "transfer": "Transfer (Baseline++)"}


def train_method(cfg) -> None:
    """Meta-train within the budget and save ``learner.pt`` (no test evaluation)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_split=None))
    print(f"== {cfg.name}: {cfg.algorithm} | train {cfg.tasks.ways}-way {cfg.tasks.shots}-shot, "
          f"{cfg.train.budget_minutes} min budget", flush=True)
    res = run(cfg, progress=sys.stderr.isatty(), overwrite=True)  # reruns replace their run folders
    print(f"   {res['iterations']} meta-iterations in {res['train_seconds']:.0f} s", flush=True)


def evaluate_method(cfg) -> dict:
    """Evaluate the saved learner on every ``eval.settings`` entry; update its ``results.json``."""
    run_dir = cfg.run_dir
    results = json.loads((run_dir / "results.json").read_text())
    learner = MetaLearner.load(run_dir / "learner.pt", device=cfg.train.device)
    test_tasks = build_tasks(cfg)["test"]
    t0 = time.perf_counter()
    results["test"] = [r.to_dict() for r in evaluate_settings(learner, cfg, test_tasks, sys.stderr.isatty())]
    results["eval_seconds"] = time.perf_counter() - t0
    for r in results["test"]:
        print(f"   {cfg.name} {r['ways']}-way {r['shots']}-shot: {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}%")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def row(method: str, res: dict) -> dict:
    tests = {(t["ways"], t["shots"]): t for t in res["test"]}
    return {
        "method": method,
        "label": LABELS.get(method, method),
        "iterations": res["iterations"],
        "train_seconds": res["train_seconds"],
        "algorithm": res["config"]["algorithm"],
        "train_ways": res["config"]["tasks"]["ways"],
        "augment": res["config"].get("data", {}).get("train_augment"),
        "results": {f"{w}-way {s}-shot": (t["accuracy"], t["ci95"], t["episodes"], t["steps"])
                    for (w, s), t in sorted(tests.items())},
        "commit": res.get("commit"),
        "date": res.get("date"),
        "budget_minutes": res["config"].get("train", {}).get("budget_minutes"),
    }


def plot_title(rows: list[dict]) -> str:
    """What the plotted runs had in common, from their own configs and results."""
    def minutes(b) -> str:
        return "no budget" if b is None else f"{b:g} min"

    budgets = {r.get("budget_minutes") for r in rows}
    if len(budgets) > 1:
        budget = "Training budgets: " + ", ".join(f"{r['label']} {minutes(r.get('budget_minutes'))}" for r in rows)
    else:
        (only,) = budgets
        budget = "No training time budget" if only is None else f"Same {only:g}-minute training budget per method"
    episodes = sorted({v[2] for r in rows for v in r["results"].values()})
    counts = f"{episodes[0]}" if len(episodes) == 1 else f"{episodes[0]}-{episodes[-1]}"
    return f"{budget} ({counts} test episodes{' each' if len(episodes) == 1 else ''})"


def table(rows: list[dict]) -> str:
    settings = sorted({k for r in rows for k in r["results"]}, key=lambda k: int(k.split("-")[0]))
    head = "| method | " + " | ".join(settings) + " | meta-iterations | train min | algorithm settings |"
    lines = [head, "|" + "---|" * (len(settings) + 4)]
    best = {s: max((r["results"][s][0] for r in rows if s in r["results"]), default=None) for s in settings}
    for r in rows:
        cells = []
        for s in settings:
            if s not in r["results"]:
                cells.append("-")
                continue
            acc, ci, _, _ = r["results"][s]
            text = f"{100 * acc:.2f} ± {100 * ci:.2f}"
            cells.append(f"**{text}**" if acc == best[s] else text)
        alg = {k: v for k, v in r["algorithm"].items() if k != "name"}
        augment = f", augmentation `{json.dumps(r['augment'])}`" if r.get("augment") else ""
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['iterations']} | "
                     f"{r['train_seconds'] / 60:.1f} | train {r['train_ways']}-way{augment}; `{json.dumps(alg)}` |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({k for r in rows for k in r["results"]}, key=lambda k: int(k.split("-")[0]))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        rs = [r for r in rows if s in r["results"]]
        accs = [100 * r["results"][s][0] for r in rs]
        cis = [100 * r["results"][s][1] for r in rs]
        ax.barh(range(len(rs)), accs, xerr=cis, color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(rs)), [r["label"] for r in rs])
        ax.invert_yaxis()
        ax.set_xlim(max(0, min(accs) - 10), 100)
        ax.set_xlabel("test accuracy (%), 95% CI")
        ax.set_title(f"Omniglot {s}, held-out characters")
        for i, (a, c) in enumerate(zip(accs, cis)):
            ax.text(a + c + 0.3, i, f"{a:.1f}", va="center", fontsize=8)
    fig.suptitle(plot_title(rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _without(args: list[str], *options: str) -> list[str]:
    """``args`` minus the given options and their values (``--opt value ...`` and ``--opt=value``)."""
    out, skip = [], False
    for a in args:
        if a.startswith("--"):
            skip = a.split("=", 1)[0] in options
        if not skip:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"subset of {METHODS}")
    p.add_argument("--configs", type=Path, default=REPO / "configs" / "compare")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="config overrides, e.g. train.budget_minutes=1")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--phase", choices=("all", "train", "eval"), default="all")
    p.add_argument("--lock", type=Path, help="flock file: train under flock -x, evaluate under flock -s")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--table-only", action="store_true", help="only rebuild table and plot from earlier runs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for method in args.methods:
            cfg = load_config(args.configs / f"{method}.yaml", [f"output_dir={args.out / 'runs'}", *args.overrides])
            for phase, flag, work in (("train", "-x", train_method), ("eval", "-s", evaluate_method)):
                if args.phase not in ("all", phase):
                    continue
                if args.lock is None:
                    work(cfg)
                    continue
                again = [a for a in (argv if argv is not None else sys.argv[1:])]
                cmd = ["flock", flag, str(args.lock), sys.executable, __file__, *_without(again, "--lock", "--methods"),
                       "--methods", method, "--phase", phase, "--no-table"]
                if subprocess.run(cmd).returncode:
                    return 1
    if args.no_table or args.phase == "train":  # nothing evaluated yet: no table to make
        return 0
    rows = []
    for method in args.methods:
        path = args.out / "runs" / method / "results.json"
        if path.is_file():
            rows.append(row(method, json.loads(path.read_text())))
    if not rows:
        print("no results yet")
        return 1
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args.out / "accuracy.png")
    print(text)
    print(f"[compare] wrote {args.out / 'table.md'} and {args.out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
