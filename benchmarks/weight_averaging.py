"""Does averaging the last iterations' weights lift a trained recipe?  One run, every average at once.

Trains one config (``metamtl fit`` semantics, overrides as on the command line) with a callback
that keeps, after every meta-iteration, exponential moving averages of the model's floating-point
state at several decays (warmed up as ``min(decay, (1 + t) / (10 + t))``) and uniform
(SWA-style) averages over the last fractions of the run (of its time budget, else of its
iterations).  Then the final weights and each average are evaluated on the same held-out
episodes, and each average's accuracy is printed with its CI paired against the final weights::

    python benchmarks/weight_averaging.py configs/omniglot_5w1s.yaml --out /tmp/wa.json \\
        output_dir=/tmp/runs/wa train.budget_minutes=5 data.val_split=null data.test_split=val \\
        eval.episodes=300 'eval.settings=[{ways: 5, shots: 1}, {ways: 20, shots: 1}]' logging.report=false

(``data.test_split=val``: choose on validation classes, never on the test split).  Results in
benchmarks/RESULTS.md, "Weight averaging of the trained weights".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from metamtl import experiment  # noqa: E402
from metamtl.callbacks import Callback, FitState  # noqa: E402
from metamtl.config import load_config  # noqa: E402
from metamtl.evaluation import mean_ci95  # noqa: E402

State = dict[str, torch.Tensor]


class WeightAverages(Callback):
    """EMAs at ``decays`` and uniform averages over the last ``tails`` (fractions) of the fit."""

    def __init__(self, decays: list[float], tails: list[float]) -> None:
        self.decays, self.tails = decays, tails
        self.ema: dict[float, State] = {}
        self.uniform: dict[float, State] = {}
        self.counts: dict[float, int] = {}

    def weights(self, state: FitState) -> State:
        return {k: v.detach().float() for k, v in state.learner.model.state_dict().items() if v.is_floating_point()}

    def on_fit_start(self, state):
        """Every average starts afresh with each fit (a staged run's stages: the last one's weights alone)."""
        self.learner = state.learner
        current = self.weights(state)
        self.ema = {d: {k: v.clone() for k, v in current.items()} for d in self.decays}
        self.uniform, self.counts = {}, {}

    def on_iteration_complete(self, state):
        current = self.weights(state)
        t = state.iteration
        for d, avg in self.ema.items():
            torch._foreach_lerp_(list(avg.values()), [current[k] for k in avg], 1 - min(d, (1 + t) / (10 + t)))
        # the fit ends at its iteration count or its time budget, whichever comes first
        done = t / max(1, state.iterations)
        if state.budget_minutes:
            done = max(done, state.elapsed / state.budget_end)
        for tail in self.tails:
            if done < 1 - tail:
                continue
            self.counts[tail] = self.counts.get(tail, 0) + 1
            if tail not in self.uniform:
                self.uniform[tail] = {k: v.clone() for k, v in current.items()}
            else:
                avg = self.uniform[tail]
                torch._foreach_lerp_(list(avg.values()), [current[k] for k in avg], 1 / self.counts[tail])

    def candidates(self) -> dict[str, State]:
        return {**{f"ema {d}": a for d, a in self.ema.items()},
                **{f"uniform, last {tail:.0%}": a for tail, a in self.uniform.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value settings, as for metamtl fit")
    ap.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.995, 0.998, 0.999])
    ap.add_argument("--tails", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--out", type=Path, help="JSON file for every evaluation's rows")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.eval.checkpoint != "last":
        raise SystemExit("averages are compared with the final weights: set eval.checkpoint=last")
    averages = WeightAverages(args.decays, args.tails)
    experiment.run(cfg, callbacks=[averages], progress=False, overwrite=True)
    learner = averages.learner  # its final weights (eval.checkpoint: best would restore others)
    test = experiment.build_tasks(cfg)["test"]
    final = {k: v.clone() for k, v in learner.model.state_dict().items()}
    rows = {"final": evaluate(learner, cfg, test, "final weights", None)}
    for name, avg in averages.candidates().items():
        learner.model.load_state_dict({**final, **{k: v.to(final[k].dtype) for k, v in avg.items()}})
        rows[name] = evaluate(learner, cfg, test, name, rows["final"])
    if args.out:
        args.out.write_text(json.dumps({"iterations": learner.iteration, "rows": rows}, indent=1))


def evaluate(learner, cfg, test, name: str, reference: list[dict] | None) -> list[dict]:
    rows = [r.to_dict() for r in experiment.evaluate_settings(learner, cfg, test, progress=False)]
    cells = []
    for i, r in enumerate(rows):
        cell = f"{r['ways']}-way {r['shots']}-shot {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}"
        if reference is not None:  # the same episodes: the paired CI is the fair one
            diff = [b - a for a, b in zip(reference[i]["per_episode_accuracy"], r["per_episode_accuracy"])]
            mean, ci = mean_ci95(diff)
            cell += f" (paired {100 * mean:+.2f} ± {100 * ci:.2f})"
        cells.append(cell)
    print(f"{name}: " + " | ".join(cells), flush=True)
    return rows


if __name__ == "__main__":
    main()
