"""CPU allocator tuning, side by side: training speed with and without ``metamtl.allocator``.

    python benchmarks/allocator.py --write

For each config, alternately (``--rounds`` times) runs ``metamtl fit`` in a fresh process with
``METAMTL_TUNE_MALLOC=0`` and ``=1`` for ``--iterations`` meta-training iterations (no validation,
no budget, no report) and reads the training time from the run's results.json.  Reports the
median iterations per second of each, their ratio, and the share of the child processes' CPU time
spent in the kernel (page faults from mmap/munmap and heap trimming).  Default configs: the
mini-ImageNet benchmark (84x84 conv4-32, 128-image batches, bf16 + channels_last) and the
Omniglot demo (28x28 conv4-64 ANIL, 16 tasks).  ``--write`` records the table in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, command, data_root, provenance

CONFIGS = {
    "mini-ImageNet transfer (84x84, 128 img/it.)": ("configs/benchmarks/miniimagenet_5w1s.yaml",
                                                    ["data.test_split=val", "model.hidden=32"]),
    "Omniglot demo config (28x28)": ("configs/omniglot_5w1s.yaml", []),
}
COMMON = ["train.budget_minutes=null", "train.scheduler=null", "data.val_split=null", "eval.episodes=5",
          "eval.checkpoint=last", "logging.report=false", "logging.report_steps_episodes=0", "logging.metrics=null"]


def one_run(config: str, overrides: list[str], iterations: int, tune: bool, root: Path, out: Path) -> dict:
    name = f"alloc_{int(tune)}_{time.monotonic_ns()}"
    env = {**os.environ, "METAMTL_TUNE_MALLOC": "1" if tune else "0", "METAMTL_DATA": str(root)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "metamtl", "fit", str(REPO / config), *COMMON, *overrides,
                    f"train.iterations={iterations}", f"output_dir={out}", f"name={name}"],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = json.loads((out / name / "results.json").read_text())
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"it_s": results["iterations"] / results["train_seconds"], "sys_share": system / (user + system)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-root")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args()
    root = data_root(args.data_root)
    where = provenance()  # commit read before RESULTS.md is touched
    lines = ["| config | untuned it/s | tuned it/s | speed-up | kernel share of CPU time (untuned -> tuned) |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, (config, overrides) in CONFIGS.items():
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for r in range(args.rounds):
                for tune in (False, True):
                    res = one_run(config, overrides, args.iterations, tune, root, Path(tmp))
                    runs[tune].append(res)
                    print(f"{label} round {r + 1} {'tuned' if tune else 'untuned'}: {res['it_s']:.2f} it/s, "
                          f"kernel {100 * res['sys_share']:.0f}% of CPU time", flush=True)
            med = {t: statistics.median(x["it_s"] for x in v) for t, v in runs.items()}
            sys_share = {t: statistics.median(x["sys_share"] for x in v) for t, v in runs.items()}
            lines.append(f"| {label} | {med[False]:.2f} | {med[True]:.2f} | **{med[True] / med[False]:.2f}x** | "
                         f"{100 * sys_share[False]:.0f}% -> {100 * sys_share[True]:.0f}% |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = REPO / "benchmarks" / "RESULTS.md"
        text = path.read_text().rstrip("\n")
        path.write_text(f"{text}\n\n### CPU allocator tuning ({where})\n\n`{command()}` ({args.rounds} alternating "
                        f"rounds of {args.iterations} iterations, median; each run a fresh process)\n\n{table}\n")
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
