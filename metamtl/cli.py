"""Command line: ``metamtl fit CONFIG [key=value ...]``, ``metamtl evaluate CHECKPOINT``,
``metamtl report RUN_DIR [RUN_DIR ...]``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, DistributedError, FitInterrupted, MetamtlError, TaskError
from .progress_bars import silenced


def _fit(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distributed import launch_env
    from .experiment import check_output_dir, run

    cfg = load_config(args.config, args.overrides)
    check_output_dir(cfg)
    results = run(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if launch_env().is_main_process:
        print(f"[metamtl] saved learner to {results['checkpoint']}")
    return 0


def check_counts(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Refuse a numeric option below its minimum before any work (never fall back to a default)."""
    for name, minimum in minimums.items():
        values = getattr(args, name)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < minimum:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be an integer >= {minimum}, got {value}")


def _evaluation_config(saved: dict[str, Any], data_root: str | None) -> dict[str, Any]:
    """A checkpoint's training config as evaluation reads it: its data under ``data_root``
    (``--data-root``; one split on disk keeps its split, without the saved ``split_fractions`` /
    ``split_seed`` of the training data) without a validation split, and without the training-only callbacks
    (``train.early_stopping``, ``train.scheduler``: a plateau schedule or early stopping needs the
    validation split) and ``eval.checkpoint`` (the weights were selected when the learner was saved),
    which never block evaluation."""
    from .data.registry import USER_DATASETS, split_on_disk

    _check_one_data_root(saved.get("datasets") or [], data_root)
    for data in [saved["data"], *saved.get("datasets", [])]:  # several for multi-dataset learners
        if data_root:
            data["root"] = data_root
            if data.get("name") in USER_DATASETS and split_on_disk(data["name"], data_root):
                data["split_fractions"] = data["split_seed"] = None  # the training data's split options: not its
        data["val_split"] = None
    tasks = dict(saved.get("tasks") or {})
    if saved["data"].get("name") == "sinusoid":  # older regression runs saved the unused default, 5 ways
        tasks.pop("ways", None)
    evaluation = {**(saved.get("eval") or {}), "checkpoint": "last"}  # which weights training selected: done already
    return {**saved, "tasks": tasks, "eval": evaluation,
            "train": {**(saved.get("train") or {}), "early_stopping": None, "scheduler": None}}


def _check_one_data_root(datasets: list[dict[str, Any]], data_root: str | None) -> None:
    """:class:`ConfigError` for a ``--data-root`` that would point several datasets read from
    different folders (a folder or csv dataset's root is its own folder) at one folder: each would
    be scored on the other's images, under its own label."""
    from .data.registry import USER_DATASETS

    roots = {d.get("label") or d.get("name"): d.get("root") for d in datasets}
    if data_root and len(set(roots.values())) > 1 and any(d.get("name") in USER_DATASETS for d in datasets):
        raise ConfigError(f"--data-root {data_root} would be the folder of every dataset of this learner, but they "
                          f"were read from different folders ({', '.join(f'{k}: {v}' for k, v in roots.items())}) "
                          "and a folder or csv dataset's root is its own folder: leave --data-root out to read "
                          "each from its saved root")


def _check_steps(steps: int | None, members: list[Any], labels: list[str], head: Any) -> None:
    """``--steps`` refused where it would be silently ignored: no member has an inner loop, or every
    member classifies with a feature head (given as ``head``, else its own default)."""
    from .heads import check_no_steps

    if steps is not None and not any(m.algorithm.has_inner_loop for m in members):
        raise ConfigError(f"--steps: {labels[0]} uses algorithm {members[0].algorithm.name!r}, which has no inner "
                          "loop (its results take 0 steps): evaluate without --steps")
    check_no_steps(steps, [m.inference.classifier(head if m.task == "classification" else None) for m in members],
                   "--steps")


def _evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import ensure_writable_file
    from .config import config_from_dict
    from .experiment import build_test_tasks, head_steps
    from .ensemble import load_members
    from .heads import build_head

    # --steps 0 is a real setting (no adaptation: the meta-learned initialisation itself)
    check_counts(args, {"episodes": 1, "ways": 1, "shots": 1, "queries": 1, "steps": 0})
    if args.json:
        ensure_writable_file(args.json, "--json file")
    support_augment = _yaml_option("--support-augment", args.support_augment)
    head = _yaml_option("--head", args.head)  # None: the learner's own default head
    if head is not None:
        build_head(head)  # a bad --head fails here, before the checkpoint and data are loaded
    members, labels = load_members(args.checkpoints, device=args.device)  # ensemble files: their members
    learner = members[0]
    saved = learner.metadata.get("config")
    if saved is None:
        raise MetamtlError(f"{labels[0]} has no data config; evaluate it from Python with MetaLearner.evaluate")
    check_same_data(members, labels)
    _check_task_options(args, learner, labels[0])
    _check_steps(args.steps, members, labels, head)
    # without --split: the saved test split, as fit's held-out rows (several datasets: each one's own)
    configs = {lb: m.metadata["config"] for m, lb in zip(members, labels)}
    split = args.split or _default_split(configs)
    _check_held_out_split(split, configs, args.data_root, given=bool(args.split))
    cfg = config_from_dict(_evaluation_config(saved, args.data_root))
    for d in [cfg.data, *cfg.datasets] if split else ():  # set after validation: checked against every member
        d.test_split = split  # above ('all' of another --data-root holds no training class)
    splits = {d.label or d.name: d.test_split for d in cfg.datasets}
    # the evaluated split alone, its images stored as the checkpoint's model reads them (the training
    # split only for a centring head's mean feature)
    tasks = build_test_tasks(cfg, _saved_preprocessing(learner))
    _center_features(members, head, cfg)
    if len(members) > 1:
        from .ensemble import Ensemble

        learner = Ensemble(members, labels=labels)
        print(f"[metamtl] {learner}: {learner.averages} averaged")
    first = cfg.eval.settings[0]  # without --ways/--shots: the setting the run evaluated first
    setting = {"ways": _given(args.ways, first.ways), "shots": _given(args.shots, first.shots),
               "queries": _given(args.queries, cfg.eval.queries)}
    if args.hierarchy is not None:  # given: its value ('null': classes drawn from the whole split)
        hierarchy = _yaml_option("--hierarchy", args.hierarchy)
    else:
        hierarchy = first.hierarchy if args.ways is None and args.shots is None else None
    sources, out = _episode_sources(tasks, setting, hierarchy, learner.task)
    steps = args.steps if args.steps is not None else head_steps(cfg, head, learner)  # as fit's test rows
    for label, source in sources:
        options = dict(support_augment=support_augment, head=head) if learner.task == "classification" else {}
        result = learner.evaluate(source, args.episodes, steps=steps, progress=not args.no_progress, **options)
        where = f"{label} " if label else ""
        print(f"[metamtl] {where}{splits.get(label, split)} split: {result}")
        out[label] = result.to_dict()
    if args.json:
        from .files import atomic_write_json

        atomic_write_json(args.json, out[None] if None in out else out, indent=2)  # several datasets: by label
    return 0


def _episode_sources(tasks: Any, setting: dict[str, int], hierarchy: Any, task: str) -> tuple[list, dict]:
    """``(label, source)`` of each dataset's episodes in ``setting``, all drawn before any is scored
    (a TaskError: nothing evaluated yet), and the skipped datasets' rows by label: ``--ways`` above a
    dataset's held-out classes skips it, as ``fit`` does with several datasets."""
    from .experiment import skipped_setting

    sources, skipped = [], {}
    for label, source in (tasks.items() if isinstance(tasks, dict) else [(None, tasks)]):
        if task == "classification" and hasattr(source, "with_settings"):
            row = skipped_setting(label, source, setting["ways"], setting["shots"]) if label is not None else None
            if row is not None:
                skipped[label] = row
                continue
            source = source.with_settings(**setting, hierarchy=hierarchy)
        elif hasattr(source, "with_settings"):  # regression: the saved first setting's shots, eval.queries
            source = source.with_settings(shots=setting["shots"], queries=setting["queries"])
        sources.append((label, source))
    if not sources:
        why = ", ".join(f"{k}: {v['skipped']}" for k, v in skipped.items())
        raise TaskError(f"--ways {setting['ways']}: no dataset has that many held-out classes ({why}); ask for fewer ways")
    return sources, skipped


def _saved_preprocessing(learner: Any) -> dict[str | None, Any]:
    """A learner's preprocessing by dataset label (``None``: a one-dataset learner's), as saved."""
    from .inputs import Unchosen, preprocessing_for

    chosen = preprocessing_for(learner.preprocessing, learner.metadata)  # all of them, several datasets
    return dict(chosen) if isinstance(chosen, Unchosen) else {None: chosen}


def _check_task_options(args: argparse.Namespace, learner: Any, label: str) -> None:
    """Refuse the classification options for a regression learner (never a silent fallback to the saved settings)."""
    given = [f"--{k.replace('_', '-')}" for k in ("ways", "shots", "queries", "support_augment", "hierarchy")
             if getattr(args, k) is not None]
    if given and learner.task != "classification":
        raise ConfigError(f"{', '.join(given)}: {label} does {learner.task}; its episodes keep the saved config's "
                          "tasks.shots and eval.queries and hold no images to augment: evaluate without "
                          f"{', '.join(given)}")


def _center_features(members: Sequence[Any], head: Any, cfg: Any) -> None:
    """The training split's mean feature for each member whose head (``head``, else its own) centres
    features and whose checkpoint holds none; a feature head is refused for a regression learner."""
    from .experiment import build_tasks

    train = None
    for member in members:
        used = member.inference.classifier(head, member.task)
        if used is not None and used.center and not member.feature_means:
            train = build_tasks(cfg)["train"] if train is None else train  # loaded only here
            member.compute_feature_mean(train)
            print(f"[metamtl] head {used.name!r} centres features: mean feature of the training split computed")


def _default_split(configs: dict[str, dict]) -> str | None:
    """The split evaluated without ``--split``: the members' (``configs``: saved configs by label) saved
    test split (several datasets: ``None``, each one's own); :class:`ConfigError` when members were
    tested on different splits, or when it holds the classes a member selected its weights on."""
    if next(iter(configs.values())).get("datasets"):
        return None
    splits = {lb: c["data"].get("test_split") or "test" for lb, c in configs.items()}
    if len(set(splits.values())) > 1:
        raise ConfigError("the members were tested on different splits ("
                          f"{', '.join(f'{lb}: {s}' for lb, s in splits.items())}); pass --split to choose one")
    split = next(iter(splits.values()))
    for lb, c in configs.items():
        ev, tr, val = c.get("eval") or {}, c.get("train") or {}, c["data"].get("val_split")
        plateau = isinstance(tr.get("scheduler"), dict) and tr["scheduler"].get("name") == "plateau"
        if val and (ev.get("checkpoint") == "best" or tr.get("early_stopping") or plateau) \
                and set(split.split("+")) & set(str(val).split("+")):
            raise ConfigError(f"the saved data.test_split {split!r} (no --split given) holds the classes {lb} selected "
                              f"its weights on (its data.val_split {val!r}, with eval.checkpoint: best, early stopping "
                              "or a plateau scheduler); pass --split with a split no member validated on")
    return split


def _check_held_out_split(split: str | None, configs: dict[str, dict], data_root: str | None,
                          given: bool = True) -> None:
    """``--split`` (``given=False``: the members' saved test split, evaluated without it) must
    name classes no member (``configs``: each one's saved config, by label) was trained on: its
    training split (or ``all`` of the data it was trained on) would score training classes as if
    they were held out."""
    if split is None:
        return
    trained = {label: {str(d.get("train_split") or "train") for d in [saved["data"], *saved.get("datasets", [])]}
               for label, saved in configs.items()}
    used = {s for splits in trained.values() for t in splits for s in t.split("+")}
    asked = set(split.split("+"))
    for label, splits in trained.items():
        overlap = asked & {s for t in splits for s in t.split("+")}
        if overlap or ("all" in asked and not other_data(configs[label], data_root)):
            hints = [f"--split {s}" for s in ("test", "val") if s not in used]  # held out by every member
            if not data_root or "all" in asked or not hints:
                hints.append("--data-root with another dataset (then --split all scores all its classes)")
            asked_for = f"--split {split!r}" if given else f"the saved data.test_split {split!r} (no --split given)"
            raise ConfigError(
                f"{asked_for} holds classes {label} was trained on (its training split: "
                f"{' / '.join(sorted(splits))}); evaluate scores held-out classes: use {' or '.join(hints)}")


def other_data(saved: dict, data_root: str | None) -> bool:
    """Whether ``data_root`` holds other data than every dataset of the saved config (only a
    folder or csv dataset's root is its data: a built-in dataset elsewhere is the same data; a
    folder that holds the saved root, or lies inside it other than in a held-out split folder such
    as ``val/``, holds some of its training classes)."""
    return bool(data_root) and all(data_identity({**d, "root": data_root}) != data_identity(d)
                                   and not _inside_training_data(data_root, d)
                                   for d in saved.get("datasets") or [saved["data"]])


def _inside_training_data(data_root: str, saved: dict) -> bool:
    """Whether folder ``data_root`` holds, or lies among, the training images of a saved folder/csv
    dataset: the saved root itself, a folder above it, or a folder inside it that is not one of the
    held-out split folders (``val``/``test``, in any case)."""
    mine, theirs = data_identity({**saved, "root": data_root}).get("root"), data_identity(saved).get("root")
    if mine is None or theirs is None:
        return False
    mine, theirs = Path(mine), Path(theirs)
    if mine == theirs or theirs.is_relative_to(mine):
        return True
    if not mine.is_relative_to(theirs):
        return False
    trained = {s.lower() for s in str(saved.get("train_split") or "train").split("+")}
    return mine.relative_to(theirs).parts[0].lower() not in {"val", "test"} - trained


def check_same_data(members: Sequence[Any], paths: Sequence[str]) -> None:
    """Refuse an ensemble whose members were trained on other data than the first (the episodes
    come from the first member's config, so another dataset or image size would be a wrong answer)."""
    def data_of(member: Any) -> list[dict]:
        cfg = member.metadata.get("config") or {}
        entries = cfg.get("datasets") or [cfg.get("data", {})]  # a multi-dataset run's data: is unused
        return [data_identity(d) for d in entries]

    reference = data_of(members[0])
    for member, path in zip(members[1:], paths[1:]):
        if data_of(member) != reference:
            raise ConfigError(f"{path} was trained on other data than {paths[0]} ({data_of(member)} vs "
                              f"{reference}); an ensemble's members must share dataset, sources, image size and split "
                              "(and the folder of a folder or csv dataset)")


def data_identity(data: dict) -> dict:
    """What identifies the data of a saved ``data`` config: dataset, sources, image size and split,
    and the resolved root of the user's own (folder, csv) datasets; a built-in dataset's root only
    says where its files are (another machine's copy is the same data)."""
    from .data.registry import USER_DATASETS

    out = {k: data.get(k) for k in ("name", "sources", "image_size", "split_seed", "split_fractions", "split_by")}
    if data.get("name") in USER_DATASETS:
        root = data.get("root") or os.environ.get("METAMTL_DATA")
        out["root"] = str(Path(root).expanduser().resolve()) if root else None
    return out


def _yaml_option(flag: str, text: str | None):
    """The value of a YAML-valued command-line option (``None`` when not given)."""
    if text is None:
        return None
    import yaml

    from . import yaml_io

    try:
        return yaml_io.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} is not valid YAML: {exc}") from None


def _given(value: int | None, default: int | None) -> int | None:
    """The option's value when given (validated before), else the learner's default."""
    return default if value is None else value


def _report(args: argparse.Namespace) -> int:
    from .checkpoint import ensure_writable_file
    from .experiment import check_steps_request, refresh_steps_curve
    from .reporting.report import check_comparison_out, write_comparison, write_report

    check_counts(args, {"steps_episodes": 0, "steps": 0})
    if args.out and Path(args.out).is_dir():  # the command line's own mistake first (nothing created)
        ensure_writable_file(args.out, "--out file")
    for run_dir in args.run_dirs:  # every folder a run's, before any page is rewritten or curve computed
        check_steps_request(run_dir, args.steps_episodes, args.steps)  # a run's, and the curve asked possible
    out = Path(args.out or Path(args.run_dirs[0]).resolve().parent / "comparison.html")
    if len(args.run_dirs) > 1 or args.out:  # a comparison: refused before any page is rewritten
        check_comparison_out(out, args.run_dirs)
    if args.out:  # creates its folder: after every check
        ensure_writable_file(args.out, "--out file")
    for run_dir in args.run_dirs:  # the curve a run did not write (or with other steps) first
        refresh_steps_curve(run_dir, args.steps_episodes, args.steps, args.device, progress=not args.no_progress)
        print(f"[metamtl] report: {write_report(run_dir, embed=args.embed)}")
    if len(args.run_dirs) > 1 or args.out:
        print(f"[metamtl] comparison: {write_comparison(args.run_dirs, out, embed=args.embed)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metamtl", description="Meta-learning and multi-task learning for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser(
        "fit", help="meta-train from a YAML config, evaluate on held-out classes, save",
        epilog="Several processes/GPUs/nodes: torchrun --nproc_per_node=N -m metamtl fit CONFIG (see README).",
    )
    f.add_argument("config", help="YAML config file (see configs/)")
    f.add_argument("overrides", nargs="*", default=[], help="overrides such as train.iterations=500 data.root=/data")
    f.add_argument("--resume", help="checkpoint with training state (e.g. runs/NAME/last.pt)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the run folder (its checkpoints, metrics and results are deleted)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=_fit)

    e = sub.add_parser("evaluate", help="evaluate a saved learner (or an ensemble of several) on held-out tasks")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a saved learner; several: an ensemble averaging their class probabilities, "
                        "evaluated on the first one's data, splits and settings")
    e.add_argument("--episodes", type=int, default=600, help="test episodes (default: 600)")
    e.add_argument("--ways", type=int, help="classes per episode (default: the first of the run config's "
                   "eval.settings; with neither --ways nor --shots, that setting's hierarchy too)")
    e.add_argument("--shots", type=int, help="support images per class (default: as --ways)")
    e.add_argument("--queries", type=int, help="query images per class (default: the run config's eval.queries)")
    e.add_argument("--steps", type=int, help="inner steps at evaluation (default: the run's eval.steps, else the "
                                             "algorithm's)")
    e.add_argument("--split", help="split to evaluate (default: the run's configured data.test_split, 'test' "
                   "if it is null; each dataset's configured test split for multi-dataset learners; 'all': every "
                   "class of another folder/csv dataset, --data-root)")
    e.add_argument("--data-root", help="dataset root (default: as saved, or $METAMTL_DATA)")
    e.add_argument("--support-augment", metavar="YAML",
                   help="test-time support augmentation, e.g. '{copies: 5, augment: {name: affine}}' "
                        "('false': none; default: as saved with the learner)")
    e.add_argument("--head", metavar="YAML",
                   help="what classifies the queries: algorithm, simpleshot, logreg, or transductive bdcspn, "
                        "laplacianshot, softkmeans, sinkhorn; a name or '{name: logreg, C: 10}' "
                        "(default: as saved with the learner)")
    e.add_argument("--hierarchy", metavar="YAML",
                   help="draw each episode's classes within one superclass: a class-name path depth (1: an "
                        "Omniglot alphabet) or 'null' for none (default: the saved first setting's, unless "
                        "--ways or --shots is given)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the result to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("report", help="write HTML reports of run directories (and a comparison of several)")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `metamtl fit`")
    r.add_argument("--out", help="comparison page to write (default with several runs: "
                                 "<parent of the first run>/comparison.html)")
    r.add_argument("--steps-episodes", type=int, help="test episodes per point of the accuracy-vs-inner-steps "
                                                      "plot (default: the run config's, 100; 0 disables it)")
    r.add_argument("--steps", type=int, nargs="+", help="inner-step counts of that plot (default 0..max(2x, +2) eval steps; a run "
                   "whose config sets logging.report_steps_episodes: 0 needs --steps-episodes too)")
    r.add_argument("--device", help="device for that evaluation (default: the run's)")
    r.add_argument("--embed", action="store_true", help="inline the PNGs into the HTML")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_report)
    return p


def _on_main_process(record: logging.LogRecord) -> bool:
    """Whether a record is printed: on torchrun's rank 0 (or a plain process) only."""
    from .distributed import launch_env

    try:
        return launch_env().is_main_process
    except DistributedError:  # a broken launch environment: fit reports it
        return True


def _show_library_messages() -> None:
    """Print the library's informational messages (e.g. the memory planner's choice) as ``[metamtl] ...``,
    under torchrun from rank 0 alone."""
    logger = logging.getLogger("metamtl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[metamtl] %(message)s"))
        handler.addFilter(_on_main_process)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


#: each command's list of positional words, which may also follow its options
_TRAILING = {"fit": "overrides", "evaluate": "checkpoints", "report": "run_dirs"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with a command's list of positional words accepted after its options too
    (``metamtl fit CONFIG --overwrite train.iterations=5``, ``metamtl evaluate A.pt --ways 5 B.pt``),
    in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    where = _TRAILING.get(getattr(args, "command", None))
    if extra and where and not any(e.startswith("-") for e in extra):
        setattr(args, where, [*getattr(args, where), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _show_library_messages()
    try:
        with silenced(getattr(args, "no_progress", False)):  # every bar, the data layer's too
            return args.func(args)
    except MetamtlError as exc:
        from .distributed import rank_tag

        print(f"metamtl: error{rank_tag()}: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"metamtl: {note}", file=sys.stderr)
        return 2
    except FitInterrupted as exc:  # SIGINT/SIGTERM during fit: a resumable checkpoint was saved
        print(f"metamtl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("metamtl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
