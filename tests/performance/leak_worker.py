"""Run meta-iterations of a small second-order MAML in a fresh process and print its RSS after each.

    python tests/performance/leak_worker.py --iterations 1300 [--memory checkpoint] [--leak]

Used by tests/performance/test_memory_leak.py.  One meta-iteration is what ``MetaLearner.fit``
does per step through the public API: build a meta-batch, zero the gradients,
``algorithm.meta_step(model, batch)``, an Adam step.  ``--leak`` runs a deliberately leaking
variant: an algorithm that keeps a query loss of every meta-batch, autograd graph included (the
classic ``self.losses.append(loss)`` instead of ``loss.item()`` bug, a few kB per iteration).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from metamtl.algorithms import MAML, build_algorithm  # noqa: E402
from metamtl.allocator import tune_cpu_allocator  # noqa: E402
from metamtl.memory import rss_mb  # noqa: E402
from metamtl.models import build_model  # noqa: E402
from metamtl.tasks import Episode, TaskBatch  # noqa: E402


class LeakyMAML(MAML):
    """MAML that keeps every meta-batch's pre-adaptation query loss, autograd graph included."""

    name = "leaky_maml"

    def __init__(self, **settings):
        super().__init__(**settings)
        self.kept: list[torch.Tensor] = []

    def meta_step(self, model, batch, *args, **kwargs):
        metrics = super().meta_step(model, batch, *args, **kwargs)
        episode = batch[0]
        self.kept.append(((model(episode.query_x) - episode.query_y) ** 2).mean())  # the leak
        return metrics


def sinusoid_batch(i: int, tasks: int, g: torch.Generator) -> TaskBatch:
    """``tasks`` sinusoid regression tasks (10 support, 10 query points each)."""
    episodes = []
    for _ in range(tasks):
        amp, phase = 0.1 + 4.9 * torch.rand((), generator=g), torch.pi * torch.rand((), generator=g)
        x = 10 * torch.rand(20, 1, generator=g) - 5
        y = amp * torch.sin(x - phase)
        episodes.append(Episode(x[:10], y[:10], x[10:], y[10:], ways=1, shots=10, queries=10, task="regression"))
    return TaskBatch(episodes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=1300)
    parser.add_argument("--memory", default=None, help="algorithm.memory (default: the algorithm's default)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-memory-mb", type=float, default=None, help="algorithm.max_memory_mb (memory auto)")
    parser.add_argument("--leak", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_cpu_allocator()  # as a CPU MetaLearner does
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[40, 40], out_features=1)
    settings = {"steps": args.steps, "lr": 0.01}
    if args.memory:
        settings["memory"] = args.memory
    if args.max_memory_mb is not None:
        settings["max_memory_mb"] = args.max_memory_mb
    algorithm = LeakyMAML(**settings) if args.leak else build_algorithm("maml", **settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    rss = []
    for i in range(args.iterations):
        batch = sinusoid_batch(i, 2, g)
        optimizer.zero_grad(set_to_none=True)
        algorithm.meta_step(model, batch)
        optimizer.step()
        rss.append(rss_mb())
    print(json.dumps({"rss_mb": rss}))


if __name__ == "__main__":
    main()
