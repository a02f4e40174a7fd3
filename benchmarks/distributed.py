"""Speed of `torchrun --nproc_per_node=P -m metamtl fit` against one process, side by side.

Runs the same CLI command (same config, seed, total meta-batch and iterations) as:

* ``1p x T``  one process with T threads (T = all cores: the fair single-process baseline),
* ``1p x 1``  one process with one thread,
* ``Pp x 1``  P torchrun processes (gloo on CPU) with ``T / P`` threads each (1 on 2 cores),

and prints a markdown table: steady meta-training speed (iterations/s from the history's
timestamps, first iteration excluded), test-evaluation time (episodes are split across ranks),
speed-ups against ``1p x T``, and the largest weight difference to ``1p x 1`` (same kernels, so
only the distribution differs; BatchNorm-fed conv biases, which affect no output, excluded).  Timings are only meaningful with the machine
to itself: hold the exclusive CPU lock (``flock -x /tmp/metamtl-cpu.lock python benchmarks/distributed.py``).

    python benchmarks/distributed.py --algorithm anil --iterations 40
    python benchmarks/distributed.py --algorithm maml --iterations 10 --procs 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEAD = re.compile(r"trunk\.blocks\.\d+\.0\.bias")  # conv bias followed by BatchNorm


def fit(tag: str, procs: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        f"algorithm.name={args.algorithm}", f"train.iterations={args.iterations}",
        f"train.meta_batch_size={args.meta_batch_size}", "train.budget_minutes=null", "data.val_split=null",
        "train.scheduler=null",  # the demo anneals over its time budget, which a fixed iteration count replaces
        "algorithm.head_init=proto",  # a per-task head: the demo trains 60-way and tests 5-way
        f"train.checkpoint_every={args.iterations}", f"eval.episodes={args.eval_episodes}",
        "logging.report=false", f"output_dir={out / tag}", *args.overrides,
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
    cmd = [*launcher, "-m", "metamtl", "fit", args.config, *overrides, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    print(f"[bench] {tag}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{tag} failed:\n{proc.stderr[-4000:]}")
    run_dir = next((out / tag).iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    times = [row["time"] for row in json.loads((run_dir / "history.json").read_text()) if "train/loss" in row]
    weights = torch.load(run_dir / "learner.pt", weights_only=True)["model_state"]
    return {"tag": tag, "its": (len(times) - 1) / (times[-1] - times[0]), "train": results["train_seconds"],
            "eval": results.get("eval_seconds", float("nan")), "wall": wall, "weights": weights,
            "accuracy": results["test"][0]["accuracy"] if results["test"] else None}


def measure(pairs: list[tuple[int, int]], args: argparse.Namespace, out: Path) -> dict[tuple[int, int], dict]:
    """One fit per distinct ``(procs, threads)`` pair, in order: a pair listed twice (``--threads 1``
    makes ``1p x T`` the ``1p x 1`` run) is measured once and its result reused."""
    runs: dict[tuple[int, int], dict] = {}
    for procs, threads in pairs:
        if (procs, threads) not in runs:
            runs[(procs, threads)] = fit(f"{procs}p x {threads}", procs, threads, args, out)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/omniglot_5w1s.yaml")
    p.add_argument("--algorithm", default="anil")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--meta-batch-size", type=int, default=16)
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the 1-process baseline")
    p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.hidden=32")
    args = p.parse_args()
    if args.iterations < 2:
        p.error("--iterations must be at least 2 (the speed is measured from the second iteration on)")
    with tempfile.TemporaryDirectory(prefix="metamtl-bench-dist-") as tmp:
        out = Path(tmp)
        measured = measure([(1, args.threads), (1, 1), (args.procs, max(1, args.threads // args.procs))], args, out)
    runs = list(measured.values())
    base, same_threads = measured[(1, args.threads)], measured[(1, 1)]
    print(f"\n{args.algorithm}, {args.iterations} iterations x {args.meta_batch_size} tasks, "
          f"{args.eval_episodes} test episodes ({args.config} {' '.join(args.overrides)})\n")
    print("| run | meta-train it/s | speed-up | test eval s | speed-up | wall s | test acc | max weight diff vs 1p x 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        diffs = {k: float((r["weights"][k] - same_threads["weights"][k]).abs().max())
                 for k in r["weights"] if not DEAD.fullmatch(k)}
        worst = max(diffs, key=diffs.get)
        acc = f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-"
        print(f"| {r['tag']} | {r['its']:.3f} | {r['its'] / base['its']:.2f}x | {r['eval']:.1f} | "
              f"{base['eval'] / r['eval']:.2f}x | {r['wall']:.0f} | {acc} | {diffs[worst]:.1e} ({worst}) |")


if __name__ == "__main__":
    main()
