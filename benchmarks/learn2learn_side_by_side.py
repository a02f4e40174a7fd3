"""learn2learn's ``examples/vision/maml_omniglot.py`` and its metamtl rewrite, on the same Omniglot-small tasks.

    flock /tmp/metamtl-bench.lock nice -n 0 .venv/bin/python benchmarks/learn2learn_side_by_side.py --write

Needs learn2learn (``make learn2learn``). The learn2learn side is the example's training loop
(``OmniglotFC`` MLP, ``MAML(model, lr=0.5)``, ``.clone()`` / ``.adapt(loss)``, one adaptation
step, Adam with meta-lr 0.003, 32 tasks per meta-batch, 5-way 1-shot); the metamtl side is the
same training written with ``MetaLearner`` (README, "Coming from learn2learn"). Both use:

* the same tasks: the Tasksets that ``get_tasksets('omniglot', train_samples=2*shots, ...)``
  builds (``FusedNWaysKShots``, ``LoadData``, ``RemapLabels``, ``ConsecutiveLabels``,
  ``RandomClassRotation``), on the Omniglot small1+small2 characters split by metamtl
  (train 145 / test 48 characters; ``get_tasksets('omniglot')`` itself needs the full download);
  the images are metamtl's 28x28 decoding as floats in [0, 1], strokes bright on black, like
  get_tasksets' ``1 - ToTensor()``. learn2learn draws training tasks with ``.sample()``, metamtl
  through ``from_learn2learn`` (same distribution); the test is the same 600 episodes for both;
* the same network and initial weights (``OmniglotFC(28 ** 2, 5)`` built under the same seed;
  metamtl wraps it as ``TrunkHead(net.features, net.classifier)``);
* the same number of meta-iterations, each run in a fresh subprocess, one after the other.

The example's per-iteration validation tasks are left out of both loops (they cost time and change
nothing in training). Reported: held-out accuracy (mean and 95% CI over the 600 episodes) and
meta-training wall time. ``--write`` adds the rows to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import provenance  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

WAYS, SHOTS, FAST_LR, META_LR, META_BATCH, STEPS, SEED, TEST_EPISODES = 5, 1, 0.5, 0.003, 32, 1, 42, 600
SOURCES = ("images_background_small1", "images_background_small2")


def omniglot_small_tasksets(root: str):
    """What get_tasksets('omniglot', train_ways=5, train_samples=2*shots, ...) builds, on Omniglot-small."""
    import learn2learn as l2l
    from metamtl.data import Omniglot

    def taskset(split: str, num_tasks: int):
        ds = Omniglot(root, split, sources=SOURCES)
        meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(ds.images.float() / 255, ds.labels))
        t = l2l.data.transforms
        return l2l.data.Taskset(meta, num_tasks=num_tasks, task_transforms=[
            t.FusedNWaysKShots(meta, n=WAYS, k=2 * SHOTS), t.LoadData(meta), t.RemapLabels(meta),
            t.ConsecutiveLabels(meta), l2l.vision.transforms.RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0]),
        ])

    return taskset("train", -1), taskset("test", TEST_EPISODES)


def test_episodes(test_taskset):
    """The 600 test episodes both sides are scored on (support/query: partition_task's rule)."""
    from metamtl.tasks import fixed_episodes, from_learn2learn

    return fixed_episodes(from_learn2learn(test_taskset, shots=SHOTS, seed=2), TEST_EPISODES)


def seeded_model():
    import learn2learn as l2l

    random.seed(SEED)
    np.random.seed(SEED)  # OmniglotFC draws its truncated-normal init from NumPy
    torch.manual_seed(SEED)
    return l2l.vision.models.OmniglotFC(28 ** 2, WAYS)


def mean_ci(values):
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std(ddof=1) / np.sqrt(len(a)))


# -- the learn2learn example --------------------------------------------------------------------------
def run_learn2learn(root: str, iterations: int) -> dict:
    import learn2learn as l2l

    train, test = omniglot_small_tasksets(root)
    episodes = test_episodes(test)
    model = seeded_model()
    maml = l2l.algorithms.MAML(model, lr=FAST_LR, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), META_LR)
    loss = nn.CrossEntropyLoss(reduction="mean")

    def fast_adapt(data, labels, learner):  # the example's split: every other example is support
        support = torch.zeros(data.size(0), dtype=torch.bool)
        support[torch.arange(SHOTS * WAYS) * 2] = True
        for _ in range(STEPS):
            learner.adapt(loss(learner(data[support]), labels[support]))
        predictions = learner(data[~support])
        return loss(predictions, labels[~support]), (predictions.argmax(1) == labels[~support]).float().mean()

    start = time.perf_counter()
    for _ in range(iterations):
        opt.zero_grad()
        for _ in range(META_BATCH):
            error, _ = fast_adapt(*train.sample(), maml.clone())
            error.backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / META_BATCH)
        opt.step()
    seconds = time.perf_counter() - start

    accuracies = []
    for ep in episodes:  # learn2learn's evaluation: clone, adapt on the support set, score the queries
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(loss(learner(ep.support_x), ep.support_y))
        accuracies.append(float((learner(ep.query_x).argmax(1) == ep.query_y).float().mean()))
    acc, ci = mean_ci(accuracies)
    return {"accuracy": acc, "ci95": ci, "train_seconds": seconds}


# -- the metamtl rewrite ------------------------------------------------------------------------------
def run_metamtl(root: str, iterations: int) -> dict:
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import TrunkHead
    from metamtl.tasks import from_learn2learn

    train, test = omniglot_small_tasksets(root)
    episodes = test_episodes(test)
    net = seeded_model()
    learner = MetaLearner(TrunkHead(net.features, net.classifier),
                          build_algorithm("maml", steps=STEPS, lr=FAST_LR), meta_lr=META_LR, device="cpu")
    start = time.perf_counter()
    learner.fit(from_learn2learn(train, shots=SHOTS), iterations=iterations, meta_batch_size=META_BATCH,
                progress=False)
    seconds = time.perf_counter() - start
    result = learner.evaluate(episodes, progress=False)
    return {"accuracy": result.accuracy, "ci95": result.ci95, "train_seconds": seconds}


RUNS = {"learn2learn": run_learn2learn, "metamtl": run_metamtl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=300, help="meta-iterations of each run (default 300)")
    p.add_argument("--data-root", default=os.environ.get("METAMTL_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each run (default 1: on a shared 2-core machine 2 threads spin-wait)")
    p.add_argument("--write", action="store_true", help="add the rows to benchmarks/RESULTS.md")
    p.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(RUNS[args.child](args.data_root, args.iterations)), flush=True)
        return
    try:  # before any child runs: its raw ModuleNotFoundError would be the only message
        importlib.import_module("learn2learn")
    except ImportError:
        from speed import L2L_BUILD

        sys.exit(f"learn2learn is not installed: this side-by-side runs its example. {L2L_BUILD}")
    rows = {}
    for name in RUNS:  # each in a fresh process (metamtl tunes the process's allocator)
        out = subprocess.run([sys.executable, __file__, "--child", name, "--iterations", str(args.iterations),
                              "--threads", str(args.threads), "--data-root", args.data_root],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not result:
            sys.exit(f"{name} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        rows[name] = json.loads(result[-1][len("RESULT "):])
        r = rows[name]
        print(f"{name:12s} {100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}%  "
              f"train {r['train_seconds']:.1f} s ({args.iterations} iterations)", flush=True)
    if args.write:
        write(rows, args.iterations, args.threads)


def write(rows: dict, iterations: int, threads: int) -> None:
    results = REPO / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    marker = "<!-- rows:learn2learn_side_by_side -->"
    command = "flock /tmp/metamtl-bench.lock nice -n 0 .venv/bin/python benchmarks/learn2learn_side_by_side.py " \
              f"--iterations {iterations} --threads {threads} --write"
    new = "".join(
        f"| {name} | {iterations} | {100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}% | {r['train_seconds']:.0f} s "
        f"| {r['train_seconds'] / iterations:.3f} s |\n" for name, r in rows.items())
    block = f"{provenance()}, {threads} torch thread(s) per run; `{command}`\n\n| library | meta-iterations | 5-way 1-shot test accuracy (600 episodes, 95% CI) " \
            f"| meta-training time | per iteration |\n|---|---|---|---|---|\n{new}{marker}\n"
    if marker not in text:
        sys.exit(f"benchmarks/RESULTS.md has no {marker} line: add the section first")
    results.write_text(text.replace(marker + "\n", block, 1))
    print(f"recorded in {results}")


if __name__ == "__main__":
    main()
