"""Distillation that pays: born-again generations and a wider teacher, on mini-ImageNet val classes.

RFS protocol (Tian et al. 2020): a student is trained like its teacher (the ``transfer`` pre-training
of configs/benchmarks/miniimagenet_5w1s.yaml: a 64-way cosine classifier, here on conv4-32 as in
every row recorded, whatever trunk the config names) with the loss
``0.5 * CE + 0.5 * T^2 KL(teacher || student)`` over all 64 training classes' logits, T = 4
(``distill: {phases: [classes], weight: 0.5, ce_weight: 0.5, temperature: 4}``).  Its *twin* is
the same training (same seed: same initial weights and batches, same iterations) without the
teacher, so ``student - twin`` is what distillation pays.  Steps, one process each (each several
minutes; run them under the benchmark lock)::

    B="flock /tmp/metamtl-bench.lock python benchmarks/born_again.py"
    for seed in 0 1; do
        $B teacher --seed $seed --minutes 20       # generation 0 (its own seed)
        $B twin --seed $seed                       # no teacher, the teacher's iterations
        $B student --seed $seed                    # born-again generation 1, the same iterations
        $B student --seed $seed --equal-time       # ... or the twin's training time instead
    done
    $B teacher --seed 0 --minutes 30 --hidden 64 --name wide   # a wider teacher (conv4-64) ...
    $B student --seed 0 --teacher wide                         # ... into conv4-32, the twin's iterations
    $B twin --seed 0 --iterations 4371                         # a stated iteration count instead of the teacher's
    $B student --seed 1 --teacher wide --teacher-seed 0 --iterations 4371   # another student seed, the same teacher
    # a teacher trained elsewhere with the same recipe (e.g. the 60-minute conv4-64 benchmark run):
    mkdir -p OUT/wide60_seed1000 && cp RUN/learner.pt RUN/results.json OUT/wide60_seed1000/
    $B student --seed 0 --teacher wide60 --teacher-seed 0 --iterations 4371
    python benchmarks/born_again.py table

``table`` prints, per seed, teacher / twin / student accuracy (5-way 1-shot and 5-shot, 600
val-class episodes, 95% CI), the gain ``student - twin`` with its CI, and the mean gain over seeds.
A wider teacher is only useful if it beats the twin: the table shows both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
CONFIG = REPO / "configs/benchmarks/miniimagenet_5w1s.yaml"
KD = {"temperature": 4.0, "weight": 0.5, "ce_weight": 0.5, "phases": ["classes"]}
SETTINGS = "[{ways: 5, shots: 1}, {ways: 5, shots: 5}]"


def run_dir(args: argparse.Namespace, role: str, seed: int) -> Path:
    return Path(args.out) / f"{role}_seed{seed}"


def results(path: Path) -> dict:
    file = path / "results.json"
    if not file.is_file():
        raise SystemExit(f"{file} not found: run that step first (see --help)")
    return json.loads(file.read_text())


def train(args: argparse.Namespace, role: str, seed: int, extra: list[str]) -> None:
    from metamtl.config import load_config
    from metamtl.experiment import run

    # conv4-32 students and twins whatever the benchmark config's trunk (teachers may widen it: --hidden)
    overrides = [f"name={role}_seed{seed}", f"output_dir={args.out}", f"seed={seed}", f"tasks.seed={seed}",
                 "model.hidden=32", "data.test_split=val", "eval.checkpoint=last",
                 f"eval.episodes={args.episodes}",
                 f"eval.settings={SETTINGS}", *extra, *args.overrides]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    run(load_config(CONFIG, overrides), progress=not args.no_progress)


def teacher(args: argparse.Namespace) -> None:
    """Generation 0 (or a wider model): the plain recipe for ``--minutes``, its own seed."""
    extra = [f"train.budget_minutes={args.minutes}", "train.iterations=100000000"]
    if args.hidden:
        extra.append(f"model.hidden={args.hidden}")
    train(args, args.name, 1000 + args.seed, extra)


def twin_or_student(args: argparse.Namespace, kd: bool) -> None:
    if args.equal_time:  # the twin's training time, whatever number of iterations that is
        minutes = results(run_dir(args, "twin", args.seed))["train_seconds"] / 60
        length = [f"train.budget_minutes={minutes:.3f}", "train.iterations=100000000"]
    else:  # the teacher's number of iterations (the cosine schedule spans them)
        if args.iterations:  # stated: e.g. a run whose generation-0 teacher is not on this machine
            gen0 = {"iterations": args.iterations}
        else:
            gen0 = results(run_dir(args, "teacher", 1000 + args.seed))
        length = [f"train.iterations={gen0['iterations']}", "train.budget_minutes=null",
                  "train.scheduler={name: cosine, over: iterations}"]
    extra = list(length)
    role = "twin"
    if kd:
        teacher_seed = args.seed if args.teacher_seed is None else args.teacher_seed
        source = run_dir(args, args.teacher, 1000 + teacher_seed) / "learner.pt"
        if not source.is_file():
            name = "" if args.teacher == "teacher" else f" --name {args.teacher}"
            raise SystemExit(f"{source} not found: train that teacher first (`teacher --seed {teacher_seed}{name}`, "
                             "with --hidden for a wider one) or name another with --teacher / --teacher-seed")
        extra.append("distill=" + json.dumps({**KD, "teacher": str(source)}))
        role = f"student-{args.teacher}" + ("-time" if args.equal_time else "")
    train(args, role, args.seed, extra)


def algorithm_rows(result: dict) -> list[dict]:
    """The test rows of the algorithm's own head (a teacher trained elsewhere may carry feature-head
    and transductive rows too: ``eval.heads``), 1-shot first."""
    rows = [t for t in result["test"] if t.get("head", "algorithm") == "algorithm"]
    return sorted(rows, key=lambda t: (t["ways"], t["shots"]))


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    names = sorted(p.name for p in out.glob("*_seed*") if (p / "results.json").is_file())
    rows = {n: json.loads((out / n / "results.json").read_text()) for n in names}
    print("| run | seed | iterations | train min | 5-way 1-shot | 5-way 5-shot |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        acc = {t["shots"]: t for t in algorithm_rows(r)}
        cells = [f"{100 * acc[k]['accuracy']:.2f} ± {100 * acc[k]['ci95']:.2f}" for k in (1, 5)]
        role, seed = name.rsplit("_seed", 1)
        print(f"| {role} | {seed} | {r['iterations']} | {r['train_seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    gains: dict[str, list[float]] = {}
    for name, r in rows.items():
        role, seed = name.rsplit("_seed", 1)
        twin = rows.get(f"twin_seed{seed}")
        if not role.startswith("student") or twin is None:
            continue
        s1, t1 = algorithm_rows(r)[0], algorithm_rows(twin)[0]
        gain, ci = s1["accuracy"] - t1["accuracy"], (s1["ci95"] ** 2 + t1["ci95"] ** 2) ** 0.5
        gains.setdefault(role, []).append(gain)
        paired = ""
        a, b = s1.get("per_episode_accuracy"), t1.get("per_episode_accuracy")
        if a and b and len(a) == len(b) > 1:  # the same episodes for both: the paired CI is the fair one
            from metamtl.evaluation import mean_ci95

            paired = f" (paired over the same {len(a)} episodes: ± {100 * mean_ci95([x - y for x, y in zip(a, b)])[1]:.2f})"
        print(f"{role} seed {seed}: 5-way 1-shot gain over its twin {100 * gain:+.2f} ± {100 * ci:.2f}{paired}")
    for role, g in gains.items():
        print(f"{role}: mean gain over {len(g)} seed(s) {100 * sum(g) / len(g):+.2f} points (target >= +1.0)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/born_again")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--data-root", help="dataset root (default: $METAMTL_DATA)")
    p.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="train a teacher: generation 0 (or --hidden wider)")
    t.add_argument("--minutes", type=float, default=20.0)
    t.add_argument("--hidden", type=int, help="conv4 width of the teacher (default 32, as the students)")
    t.add_argument("--name", default="teacher", help="run name prefix (e.g. 'wide')")
    for name, helptext in (("twin", "the no-distillation twin: the teacher's iterations"),
                           ("student", "born-again student: the teacher's iterations, 0.5 CE + 0.5 KL")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--equal-time", action="store_true", help="train for the twin's time instead of its iterations")
        s.add_argument("--iterations", type=int,
                       help="train this many iterations instead of the generation-0 teacher's (twin and student alike)")
        if name == "student":
            s.add_argument("--teacher", default="teacher", help="teacher run name prefix ('teacher' or e.g. 'wide')")
            s.add_argument("--teacher-seed", type=int,
                           help="the teacher run's --seed (default: the student's own): one wide teacher for "
                                "students of several seeds")
    for s in sub.choices.values():
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    sub.add_parser("table", help="markdown table and gains")
    args = p.parse_args()
    if args.command == "teacher":
        teacher(args)
    elif args.command in ("twin", "student"):
        args.teacher = getattr(args, "teacher", "teacher")
        twin_or_student(args, kd=args.command == "student")
    else:
        table(args)


if __name__ == "__main__":
    main()
