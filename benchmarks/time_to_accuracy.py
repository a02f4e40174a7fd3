"""Time to accuracy: held-out accuracy against meta-training wall-clock, one curve per backend.

    flock -x /tmp/metamtl-cpu.lock python benchmarks/time_to_accuracy.py train --minutes 5
    flock -s /tmp/metamtl-cpu.lock python benchmarks/time_to_accuracy.py evaluate --write

``train`` meta-trains the config (default: configs/compare/anil.yaml, ANIL on Omniglot 5-way 1-shot,
the inner-loop recipe the demo held when the RESULTS.md curves were measured; the demo,
configs/omniglot_5w1s.yaml, is now ProtoNet, which has no inner loop and so no backends) once per
backend (``--backends``) or per named variant (``--variant LABEL="key=value key=value"``, e.g.
``--variant nhwc+bf16="train.channels_last=true train.precision=bf16"``; quote values with spaces
as in a shell: ``--variant proto="'algorithm={name: protonet}'"``) for ``--minutes`` of
training time, snapshotting the weights every ``--every`` seconds of
training (the snapshot copies are not counted); it must own the CPU, the clock is the result.
``evaluate`` then measures every snapshot on the held-out test split with each run's own config
(its ``eval.episodes`` and ``eval.queries``; evaluation time is not training time), plots accuracy against
training minutes (benchmarks/figures/time_to_accuracy.png) and prints when each curve first reaches the
target (95%); ``--write`` records it in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from common import check_section, commit, data_root, provenance, write_section  # noqa: E402
from metamtl.callbacks import Callback  # noqa: E402
from metamtl.config import load_config  # noqa: E402
from metamtl.callbacks import LRScheduler  # noqa: E402
from metamtl.experiment import (build_callbacks, build_learner, build_tasks, head_steps, seed_everything,  # noqa: E402
                                setting_tasks)

OUT = REPO / "runs" / "time_to_accuracy"
LABELS = {"core": "core (default)", "higher": "backend higher"}


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def restore(learner, snap: dict) -> None:
    """Load a snapshot into ``learner``: the model's weights and the algorithm's own meta-learned
    state (Meta-SGD's per-weight rates, MAML++'s per-step rates and BN parameters)."""
    learner.model.load_state_dict(snap["state"])
    if "algorithm_state" in snap:  # snapshots written before it was saved hold the model only
        learner.algorithm.load_state_dict(snap["algorithm_state"])


class Snapshots(Callback):
    """Copy the learner's state (model and algorithm) every ``every`` seconds of training; the
    copying time is not counted."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.overhead = 0.0
        self.rows: list[dict] = []

    def on_iteration_end(self, state, metrics) -> None:
        trained = state.elapsed - self.overhead
        if trained >= self.every * (len(self.rows) + 1):
            t0 = time.perf_counter()
            self.rows.append({"seconds": trained, "iteration": state.iteration,
                              "state": copy_state(state.learner.model),
                              "algorithm_state": copy_state(state.learner.algorithm)})
            self.overhead += time.perf_counter() - t0


def variants(args) -> dict[str, list[str]]:
    """Label -> config overrides of every curve to train (backends: only for an algorithm with an inner
    loop, which is what a backend runs)."""
    if not args.variant:
        from metamtl.algorithms import build_algorithm

        cfg = load_config(args.config, [])
        if not build_algorithm(**cfg.algorithm).has_inner_loop:
            raise SystemExit(f"{args.config}: algorithm {cfg.algorithm.get('name')!r} has no inner loop, so no "
                             "backends to compare: pass --variant LABEL=\"key=value ...\" curves (e.g. --variant "
                             "wide=\"model.hidden=96\"), or --config of an inner-loop algorithm")
        return {b: [f"algorithm.backend={b}"] for b in args.backends.split(",")}
    out = {}
    for spec in args.variant:
        label, sep, overrides = spec.partition("=")
        if not sep or not label:
            raise SystemExit(f"--variant needs LABEL=\"key=value ...\", got {spec!r}")
        out[label] = shlex.split(overrides)
    return out


def train(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    commit()  # the checkout as training starts (cached)
    for backend, overrides in variants(args).items():
        cfg = load_config(args.config, [*overrides, "train.val_every=1000000"])
        seed_everything(cfg.seed)
        tasks = build_tasks(cfg)
        snaps = Snapshots(args.every)
        schedule = [c for c in build_callbacks(cfg) if isinstance(c, LRScheduler)]  # the config's recipe (no validation)
        learner = build_learner(cfg, tasks["train"], callbacks=[*schedule, snaps])
        learner.fit(tasks["train"], None, iterations=10**7, meta_batch_size=cfg.train.meta_batch_size,
                    budget_minutes=args.minutes, progress=True)
        torch.save({"backend": backend, "overrides": overrides, "config": str(args.config),
                    "threads": torch.get_num_threads(), "snapshots": snaps.rows, "commit": commit(),
                    "date": time.strftime("%Y-%m-%d"), "command": command()},
                   OUT / f"{backend}.pt")
        print(f"{backend}: {learner.iteration} iterations, {len(snaps.rows)} snapshots", flush=True)


def command() -> str:
    """The command as run (``python benchmarks/time_to_accuracy.py train ...``)."""
    return shlex.join(["python", "benchmarks/time_to_accuracy.py", *sys.argv[1:]])


def run_info(run: dict, cfg) -> dict:
    """What a RESULTS.md record says about one evaluated run: the config it was trained with
    (relative to the repository where it lies inside), its evaluation and its training's
    provenance (``unknown`` for snapshot files written before it was saved)."""
    config = Path(run["config"])
    if config.is_absolute() and config.is_relative_to(REPO):
        config = config.relative_to(REPO)
    return {"config": str(config), "episodes": cfg.eval.episodes, "queries": cfg.eval.queries,
            "commit": run.get("commit", "unknown"), "date": run.get("date", "unknown"),
            "command": run.get("command", "unknown")}


def evaluate(args) -> None:
    if args.write:
        check_section("tta", results_path())  # a hand-edited file fails now, not after the evaluation
    curves, runs, infos = {}, {}, {}
    for path in sorted(OUT.glob("*.pt")):
        run = torch.load(path, weights_only=False)
        overrides = runs[run["backend"]] = run.get("overrides", [f"algorithm.backend={run['backend']}"])
        cfg = load_config(run["config"], overrides)
        infos[run["backend"]] = run_info(run, cfg)
        tasks = build_tasks(cfg)
        learner = build_learner(cfg, tasks["train"])
        setting = cfg.eval.settings[0]  # the run's first test setting (the demo: 5-way 1-shot), not its training ways
        infos[run["backend"]]["setting"] = f"{setting.ways}-way {setting.shots}-shot"
        points = []
        for snap in run["snapshots"]:
            restore(learner, snap)
            res = learner.evaluate(setting_tasks(tasks["test"], setting, cfg), cfg.eval.episodes, progress=False,
                                   steps=head_steps(cfg, None, learner))
            points.append({"minutes": snap["seconds"] / 60, "iteration": snap["iteration"],
                           "accuracy": res.accuracy, "ci95": res.ci95})
            print(f"{run['backend']:7s} {snap['seconds'] / 60:5.2f} min  it {snap['iteration']:5d}  "
                  f"{100 * res.accuracy:.2f}% ± {100 * res.ci95:.2f}%", flush=True)
        curves[run["backend"]] = points
    (OUT / "curves.json").write_text(json.dumps(curves, indent=1))
    reached = {b: next((p for p in pts if p["accuracy"] >= args.target), None) for b, pts in curves.items()}
    plot(curves, args.target, REPO / "benchmarks" / "figures" / "time_to_accuracy.png",
         "/".join(sorted({i["setting"] for i in infos.values()})))
    lines = []
    for backend, point in reached.items():
        last = curves[backend][-1]
        when = (f"{point['minutes']:.2f} min (iteration {point['iteration']}, {100 * point['accuracy']:.2f}% "
                f"± {100 * point['ci95']:.2f}%)" if point else "not reached")
        settings = " ".join(f"`{o}`" for o in runs[backend])
        lines.append(f"| {backend} | {settings} | {when} | {100 * last['accuracy']:.2f}% ± {100 * last['ci95']:.2f}% after "
                     f"{last['minutes']:.2f} min ({last['iteration']} iterations) |")
    print("\n".join(lines))
    if args.write:
        write_results(lines, args, infos)


def plot(curves: dict, target: float, path: Path, setting: str = "5-way 1-shot") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend, pts in curves.items():
        ax.errorbar([p["minutes"] for p in pts], [100 * p["accuracy"] for p in pts],
                    yerr=[100 * p["ci95"] for p in pts], marker="o", ms=3, capsize=2,
                    label=LABELS.get(backend, backend))
    ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"{100 * target:.0f}% target")
    ax.set_xlabel("meta-training wall-clock (minutes, 2 CPU cores)")
    ax.set_ylabel(f"held-out {setting} accuracy (%)")
    ax.set_title(f"held-out {setting}, one curve per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def runs_cell(infos: dict[str, dict]) -> str:
    """The runs' training and evaluation, once when they all share it, else per run."""
    def text(i: dict) -> str:
        return (f"trained with `{i['command']}` (commit {i['commit']}, date {i['date']}), config {i['config']}, "
                f"evaluated on the test split ({i.get('setting', '5-way 1-shot')}): {i['episodes']} episodes, {i['queries']} queries per class")

    if len({text(i) for i in infos.values()}) == 1:
        return "All runs " + text(next(iter(infos.values())))
    return "; ".join(f"{label}: {text(i)}" for label, i in infos.items())


def results_path() -> Path:
    return REPO / "benchmarks" / "RESULTS.md"


def write_results(lines: list[str], args, infos: dict[str, dict]) -> None:
    path = results_path()
    header = [
        f"{runs_cell(infos)}. Evaluation: `{command()}`; {provenance()}; evaluation time excluded. "
        "Curve: [benchmarks/figures/time_to_accuracy.png](figures/time_to_accuracy.png).",
        "",
        f"| run | settings | first snapshot >= {100 * args.target:.0f}% | last snapshot |",
        "|---|---|---|---|",
    ]
    write_section("tta", "Time to accuracy (`benchmarks/time_to_accuracy.py`)", [*header, *lines], path, heading="###")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--config", default=str(REPO / "configs" / "compare" / "anil.yaml"),
                   help="config to train (default: configs/compare/anil.yaml, an inner-loop algorithm, whose "
                        "backends the default --backends compare)")
    t.add_argument("--minutes", type=float, default=5.0)
    t.add_argument("--every", type=float, default=20.0, help="seconds of training between snapshots")
    t.add_argument("--backends", default="core,higher")
    t.add_argument("--variant", action="append", metavar='LABEL="key=value ..."',
                   help="a curve with these config overrides (repeatable; replaces --backends)")
    e = sub.add_parser("evaluate")
    e.add_argument("--target", type=float, default=0.95)
    e.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ["METAMTL_DATA"] = str(data_root(None))  # $METAMTL_DATA, else ../shared/data
    train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    main()
