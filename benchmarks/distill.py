"""Knowledge distillation: a wide conv4 teacher (128 filters) into a conv4 student (32 filters).

Omniglot small1+small2, ANIL with prototype heads (configs/distill/).  The teacher's logits for an
episode are those of the teacher adapted to the same episode's support set (so they follow the
episode's random label order).  Students train for the same number of meta-iterations with and
without distillation, one after the other in one process, so their time ratio is side by side::

    flock -x /tmp/metamtl-cpu.lock python benchmarks/distill.py teacher
    flock -x /tmp/metamtl-cpu.lock python benchmarks/distill.py students --budget 5
    python benchmarks/distill.py table

Student variants: ``none`` (baseline, trained for ``--budget`` minutes), then with the baseline's
number of meta-iterations: ``kd-query`` (soft targets on the query/outer loss), ``kd-both`` (soft
targets on the support/inner and query losses), ``kd-feat`` (query soft targets plus feature
distillation of trunk block 3 through a learned 1x1-conv adapter); ``kd-query-time``: ``kd-query``
with the baseline's time budget instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
TEACHER = REPO / "configs/distill/omniglot_teacher.yaml"
STUDENT = REPO / "configs/distill/omniglot_student.yaml"
BASE_KD = {"temperature": 4.0, "weight": 1.0}
VARIANTS = {
    "none": {},
    "kd-query": {**BASE_KD, "phases": ["query"]},
    "kd-both": {**BASE_KD, "phases": ["support", "query"]},
    "kd-feat": {**BASE_KD, "phases": ["query"], "features": [["trunk.blocks.2", "trunk.blocks.2"]],
                "feature_weight": 1.0},
}


def teacher(args: argparse.Namespace) -> None:
    from metamtl.config import load_config
    from metamtl.experiment import run

    cfg = load_config(TEACHER, [f"output_dir={args.out}", f"train.budget_minutes={args.budget}",
                                f"eval.episodes={args.episodes}"])
    run(cfg, progress=not args.no_progress, overwrite=True)  # reruns replace their run folders


def students(args: argparse.Namespace) -> None:
    from metamtl.config import load_config
    from metamtl.experiment import run

    teacher_path = Path(args.out) / "kd_teacher" / "learner.pt"
    if not teacher_path.is_file():
        raise SystemExit(f"{teacher_path} not found: run `benchmarks/distill.py teacher` first")
    base_iterations = None
    for name in args.variants:
        kd = VARIANTS[name.removesuffix("-time")]
        distill = dict(kd, teacher=str(teacher_path)) if kd else {}
        if name == "none" or name.endswith("-time"):  # the time budget
            length = ["train.iterations=1000000", f"train.budget_minutes={args.budget}"]
        else:  # as many meta-iterations as the baseline
            if base_iterations is None:
                raise SystemExit("run the 'none' variant first: the others take its number of iterations")
            length = [f"train.iterations={base_iterations}", "train.budget_minutes=null"]
        cfg = load_config(STUDENT, [f"name=kd_student_{name}", f"output_dir={args.out}", *length,
                                    f"eval.episodes={args.episodes}", f"distill={json.dumps(distill)}"])
        results = run(cfg, progress=not args.no_progress, overwrite=True)
        if name == "none":
            base_iterations = results["iterations"]


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = []
    t_path = out / "kd_teacher" / "results.json"
    if t_path.is_file():
        rows.append(("teacher (conv4-128)", json.loads(t_path.read_text())))
    base = None
    for name in [*VARIANTS, *(f"{v}-time" for v in VARIANTS if v != "none")]:
        path = out / f"kd_student_{name}" / "results.json"
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append((f"student conv4-32, {name}", r))
            if name == "none":
                base = r["train_seconds"] / max(r["iterations"], 1)
    print("| model | meta-iterations | train s | time / iteration vs baseline | 5-way 1-shot | 20-way 1-shot |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        acc = {row["ways"]: f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f}" for row in r["test"]}
        per = r["train_seconds"] / max(r["iterations"], 1)
        ratio = f"{per / base:.2f}x" if base and label.startswith("student") else "-"
        print(f"| {label} | {r['iterations']} | {r['train_seconds']:.0f} | {ratio} | {acc.get(5, '-')} | {acc.get(20, '-')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="meta-train and evaluate the conv4-128 teacher")
    t.add_argument("--budget", type=float, default=8.0, help="training minutes")
    t.set_defaults(func=teacher)
    s = sub.add_parser("students", help="conv4-32 students with and without distillation")
    s.add_argument("--budget", type=float, default=5.0,
                   help="training minutes of the baseline (and of '-time' variants); the others run "
                        "as many meta-iterations as the baseline")
    s.add_argument("--variants", nargs="+", choices=[*VARIANTS, *(f"{v}-time" for v in VARIANTS if v != "none")],
                   default=[*VARIANTS, "kd-query-time"])
    s.set_defaults(func=students)
    sub.add_parser("table", help="markdown table of the finished runs").set_defaults(func=table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
