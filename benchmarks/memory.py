"""Peak memory and time per meta-iteration against the number of inner steps (second-order MAML).

    flock /tmp/metamtl-bench.lock nice -n 0 python benchmarks/memory.py --write

MAML's mini-ImageNet setting, where activations dominate: 5-way 5-shot tasks with 15 queries per
class, conv4 with 32 filters on 84x84 RGB images, 2 tasks per meta-batch, inner SGD with lr 0.01,
one Adam meta-step per iteration.  Images are synthetic (uniform noise of the right shape):
memory and time do not depend on pixel values.  Rows, for 1, 5, 10, 25 and 50 inner steps:

* ``metamtl full``: ``algorithm.memory: full`` (the whole unrolled graph is kept);
* ``metamtl checkpoint``: only each step's weights are kept; every step is recomputed in the
  backward pass (same meta-gradient);
* ``metamtl implicit``: iMAML (proximal inner objective, conjugate gradient on Hessian-vector
  products; ``lam`` 1, 5 CG steps);
* ``plain higher``: ``higher.innerloop_ctx`` per task, as a user of higher writes it;
* ``learn2learn``: ``l2l.algorithms.MAML(model, lr).clone()/.adapt()`` per task (skipped, with
  the install hint, when learn2learn is not importable);
* ``metamtl auto``: 50 inner steps with ``max_memory_mb`` set to what plain higher needed for
  5 steps in this run: the planner picks the mode and task chunk.

Every point runs in a fresh process: one warm-up iteration, then ``--iters`` timed ones (median);
when the first iteration takes 30 s or more it is the timed one (no warm-up: its one-time costs,
first-touch page faults and lazy initialisation, are then a small part of it), which keeps the
50-step rows affordable on a CPU.
Peak memory is how far the process's peak resident set rose above its resident set once model and
data were loaded (``/proc/self/clear_refs`` resets the high-water mark; on a GPU
``torch.cuda.max_memory_allocated`` above the allocation after loading), over the warm-up and
timed iterations.  ``--write`` records the table in benchmarks/RESULTS.md (section "Memory") and
the plot in benchmarks/figures/memory.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_section, provenance, run_conditions, write_section  # noqa: E402

import torch  # noqa: E402

WAYS, SHOTS, QUERIES, SIZE, FILTERS, TASKS, LR = 5, 5, 15, 84, 32, 2, 0.01
STEPS = (1, 5, 10, 25, 50)
METHODS = ("full", "checkpoint", "implicit", "higher", "l2l")
LABELS = {"full": "metamtl full", "checkpoint": "metamtl checkpoint", "implicit": "metamtl implicit (iMAML)",
          "higher": "plain higher", "l2l": "learn2learn", "auto": "metamtl auto"}
TARGETS = {("checkpoint", 25): (0.35, 1.6)}  # (memory, time) ratio to plain higher
IMPLICIT_TARGET = 0.15
AUTO_STEPS, AUTO_BUDGET_FROM = 50, 5
#: a first meta-iteration this long (seconds) is the measurement: no separate warm-up
LONG_S = 30.0


# -- one point (child process) --------------------------------------------------------------------
def tasks(device: str):
    from speed import synthetic_episodes

    return synthetic_episodes(TASKS, WAYS, SHOTS, QUERIES, 3, SIZE, device)


def model(device: str):
    from metamtl.models import build_model

    torch.manual_seed(0)
    return build_model("conv4", in_channels=3, hidden=FILTERS, image_size=SIZE, out_features=WAYS).to(device)


def metamtl_point(memory: str, steps: int, device: str, budget: float | None = None):
    from metamtl.algorithms import build_algorithm

    settings = {"max_memory_mb": budget} if budget is not None else {}
    net, batch = model(device), tasks(device)
    # task_threads=1: one task's graph at a time, as the plain higher and learn2learn loops hold (task
    # threads, the CPU default for memory 'full', hold two: README "Task threads")
    alg = build_algorithm("maml", steps=steps, lr=LR, memory=memory, task_threads=1, **settings)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    info: dict = {}

    def step():
        opt.zero_grad(set_to_none=True)
        alg.meta_step(net, batch)
        opt.step()
        plan = getattr(alg, "memory_plan", None)
        if plan is not None:
            info["plan"] = plan.describe()

    return step, info


def higher_point(steps: int, device: str):
    from speed import higher_iteration, textbook_conv4

    return higher_iteration(textbook_conv4(device, model(device)), tasks(device), steps, LR), {}


def l2l_point(steps: int, device: str):
    from speed import L2L_INSTALL, learn2learn_iteration, textbook_conv4

    step = learn2learn_iteration(textbook_conv4(device, model(device)), tasks(device), steps, LR)
    return (step, {}) if step is not None else (None, {"skipped": L2L_INSTALL})


def child(method: str, steps: int, iters: int, device: str, threads: int, budget: float | None) -> dict:
    from metamtl.allocator import tune_cpu_allocator
    from metamtl.memory import PeakMemory

    torch.set_num_threads(threads)
    if device == "cpu":
        tune_cpu_allocator()  # as a MetaLearner does, for every row alike
    if method == "higher":
        step, extra = higher_point(steps, device)
    elif method == "l2l":
        step, extra = l2l_point(steps, device)
    else:
        step, extra = metamtl_point("auto" if method == "auto" else method, steps, device, budget)
    if step is None:
        return {"method": method, "steps": steps, **extra}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    meter = PeakMemory(device).start()
    times = []
    while len(times) < iters + 1:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) == 1 and times[0] >= LONG_S:
            break  # long iterations: the first one is timed (its one-time costs are a small part of it)
    timed = times[1:] or times
    return {"method": method, "steps": steps, "seconds": statistics.median(timed), "all": times,
            "peak_mb": meter.added_mb, "base_mb": meter.start_mb, "resettable": meter.resettable,
            "budget_mb": budget, **extra}


def run_child(method: str, steps: int, args, budget: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--steps", str(steps), "--iters", str(args.iters),
           "--device", args.device, "--threads", str(args.threads)]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "steps": steps, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


# -- table, ratios, plot --------------------------------------------------------------------------
def ratio(results: dict, method: str, steps: int, key: str) -> float | None:
    a, b = results.get((method, steps), {}), results.get(("higher", steps), {})
    if key in a and key in b and b[key] > 0:
        return a[key] / b[key]
    return None


def table(results: dict, steps: tuple[int, ...]) -> list[str]:
    lines = ["| method | inner steps | peak MB | s / meta-iteration | memory / plain higher | time / plain higher |",
             "|---|---|---|---|---|---|"]
    for (method, k), res in results.items():
        if method == "auto":
            continue
        if "seconds" not in res:
            lines.append(f"| {LABELS[method]} | {k} | - | - | - | {res.get('skipped') or res.get('error')} |")
            continue
        mem, tim = ratio(results, method, k, "peak_mb"), ratio(results, method, k, "seconds")
        cells = [f"{x:.2f}x" if x is not None and method != "higher" else "" for x in (mem, tim)]
        lines.append(f"| {LABELS[method]} | {k} | {res['peak_mb']:.0f} | {res['seconds']:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", "| target | value | verdict |", "|---|---|---|"]
    for (method, k), (mem_target, time_target) in TARGETS.items():
        mem, tim = ratio(results, method, k, "peak_mb"), ratio(results, method, k, "seconds")
        if mem is not None and tim is not None:
            ok = mem <= mem_target and tim <= time_target
            lines.append(f"| {method} at {k} steps: memory <= {mem_target}x, time <= {time_target}x plain higher "
                         f"| {mem:.2f}x memory, {tim:.2f}x time | {'met' if ok else 'MISSED'} |")
    implicit = {k: ratio(results, "implicit", k, "peak_mb") for k in steps}
    implicit = {k: v for k, v in implicit.items() if v is not None}
    if implicit:
        worst = max(implicit.values())
        values = ", ".join(f"{k}: {v:.2f}x" for k, v in implicit.items())
        lines.append(f"| implicit <= {IMPLICIT_TARGET}x plain higher's memory at every step count | {values} | "
                     f"{'met' if worst <= IMPLICIT_TARGET else 'MISSED'} |")
    auto = results.get(("auto", AUTO_STEPS))
    if auto is not None:
        if "peak_mb" in auto:
            ok = auto["peak_mb"] <= auto["budget_mb"]
            lines.append(f"| planner: {AUTO_STEPS}-step second-order MAML within plain higher's {AUTO_BUDGET_FROM}-step "
                         f"peak ({auto['budget_mb']:.0f} MB) | {auto['peak_mb']:.0f} MB, {auto['seconds']:.2f} s/it; "
                         f"{auto.get('plan', '?')} | {'met' if ok else 'MISSED'} |")
        else:
            lines.append(f"| planner: {AUTO_STEPS}-step run within plain higher's {AUTO_BUDGET_FROM}-step peak | "
                         f"{auto.get('error') or auto.get('skipped')} | MISSED |")
    return lines


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        pts = sorted((k, r) for (m, k), r in results.items() if m == method and "seconds" in r)
        if not pts:
            continue
        ks = [k for k, _ in pts]
        axes[0].plot(ks, [r["peak_mb"] for _, r in pts], marker="o", label=LABELS[method])
        axes[1].plot(ks, [r["seconds"] for _, r in pts], marker="o", label=LABELS[method])
    auto = results.get(("auto", AUTO_STEPS), {})
    if "peak_mb" in auto:
        axes[0].scatter([AUTO_STEPS], [auto["peak_mb"]], marker="*", s=160, color="black", zorder=5,
                        label=f"metamtl auto (budget {auto['budget_mb']:.0f} MB)")
        axes[0].axhline(auto["budget_mb"], color="black", lw=0.8, ls=":")
    for ax, ylabel in zip(axes, ("peak memory above model + data (MB)", "seconds per meta-iteration")):
        ax.set_xlabel("inner steps")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--steps-list", default=",".join(map(str, STEPS)), help="inner step counts")
    parser.add_argument("--no-auto", action="store_true", help="skip the planner point")
    parser.add_argument("--iters", type=int, default=1, help="timed iterations per point (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--write", action="store_true", help="record the table and plot")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.iters, args.device, args.threads, args.budget)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    steps = tuple(int(s) for s in args.steps_list.split(","))
    if args.write:
        check_section("memory")  # a hand-edited RESULTS.md fails now, not after the run
    kind = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    header = [
        f"Command: `{' '.join(['python', 'benchmarks/memory.py', *sys.argv[1:]])}` ({run_conditions()}), "
        f"{provenance()}, {args.threads} torch threads, "
        f"device {args.device}.",
        f"Setting: MAML mini-ImageNet shape, {WAYS}-way {SHOTS}-shot, {QUERIES} queries per class, conv4-{FILTERS} on "
        f"{SIZE}x{SIZE} RGB (synthetic images), {TASKS} tasks per meta-batch, inner SGD lr {LR}, Adam meta-step. "
        f"Fresh process per point; {args.iters} timed iteration(s) after one warm-up (median), or the first "
        f"iteration alone when it took >= {LONG_S:.0f} s; peak MB = {kind} "
        "above the process's memory once model and data were loaded, over all its iterations.",
    ]
    print("\n".join(header), flush=True)
    results: dict = {}
    for k in steps:
        for method in methods:
            results[method, k] = res = run_child(method, k, args)
            shown = (f"{res['peak_mb']:.0f} MB, {res['seconds']:.2f} s" if "seconds" in res
                     else (res.get("skipped", "")[:60] or res.get("error")))
            print(f"  {LABELS[method]:26s} {k:3d} steps: {shown}", flush=True)
    budget = results.get(("higher", AUTO_BUDGET_FROM), {}).get("peak_mb")
    if not args.no_auto and budget is not None:
        results["auto", AUTO_STEPS] = res = run_child("auto", AUTO_STEPS, args, budget=round(budget, 1))
        print(f"  metamtl auto {AUTO_STEPS} steps, budget {budget:.0f} MB: "
              f"{res.get('peak_mb', float('nan')):.0f} MB ({res.get('plan') or res.get('error')})", flush=True)
    lines = table(results, steps)
    print("\n".join(lines))
    if args.write:
        figure = REPO / "benchmarks" / "figures" / "memory.png"
        plot(results, figure, header[1][:160])
        write_section("memory", "Memory against inner steps (`benchmarks/memory.py`, issue 16)",
                      [*header, "", *lines, "", "Plot: [benchmarks/figures/memory.png](figures/memory.png)."])
        print(f"wrote {figure} and benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
