"""Shared pieces of the benchmark scripts: command line, data root, running one config through
the public API (:func:`metamtl.experiment.run`), and recording result rows in RESULTS.md.

Rows are inserted just above a marker line ``<!-- rows:KEY -->`` that ends each results table of
benchmarks/RESULTS.md, so the file stays plain readable markdown; a missing table is created at
the end of the file.
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from metamtl.config import Config, load_config  # noqa: E402
from metamtl.reporting.report import references  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADER = ("| date | commit | machine | data | setting | method, training | held-out accuracy (95% CI) "
          "| published MAML / MAML++ | command |\n|---|---|---|---|---|---|---|---|---|\n")


def parser(description: str, settings: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--settings", nargs="+", default=list(settings), choices=list(settings),
                   help="benchmark settings to run (N-way K-shot; default: all)")
    p.add_argument("--budget-minutes", type=float,
                   help="stop meta-training of each run after this many minutes (default: the config's; "
                        "0: no budget, run all iterations, a learning rate annealed over the budget then "
                        "annealed over the iterations)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    p.add_argument("--data-root", help="folder with the datasets (default: $METAMTL_DATA, else ../shared/data)")
    p.add_argument("--episodes", type=int, default=600, help="test episodes per setting (default 600)")
    p.add_argument("--output-dir", default="runs/benchmarks", help="where run folders are written (default runs/benchmarks)")
    p.add_argument("--no-record", action="store_true", help="do not add rows to benchmarks/RESULTS.md")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without an API key)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.meta_lr=0.001 algorithm.name=maml")
    return p


def data_root(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("METAMTL_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    sys.exit("benchmark: no data folder: pass --data-root or set METAMTL_DATA")


def banner(*lines: str) -> None:
    width = max(len(line) for line in lines) + 4
    print("\n" + "#" * width)
    for line in lines:
        print(f"# {line.ljust(width - 4)} #")
    print("#" * width + "\n", flush=True)


def setting_eval(setting: str) -> str:
    """``"20w1s"`` -> ``{ways: 20, shots: 1}``; a ``_alphabet`` suffix adds ``hierarchy: 1``
    (episodes within one alphabet)."""
    base, _, kind = setting.partition("_")
    ways, shots = base.split("w")
    extra = ", hierarchy: 1" if kind == "alphabet" else ""
    return f"{{ways: {ways}, shots: {shots.rstrip('s')}{extra}}}"


def run_settings(args: argparse.Namespace, prefix: str, overrides: Sequence[str], data_desc: str,
                 dataset: str, title: str) -> None:
    """One run per setting (config ``configs/benchmarks/<prefix>_<setting>.yaml``), or with
    ``args.one_learner`` one run per config family: settings whose configs train the same way (the
    same file, or files that only ``extends`` it) share one learner, trained with the family's base
    config when it is among them, whatever the order of ``args.settings``."""
    from metamtl.errors import MetamtlError

    groups: dict[str, list[str]] = {}
    for s in args.settings:
        groups.setdefault(training_root(prefix, s) if args.one_learner else s, []).append(s)
    for root, members in groups.items():
        group = sorted(dict.fromkeys(members), key=lambda s: (s != root, *setting_order(s)))
        evals = "[" + ",".join(setting_eval(g) for g in group) + "]"
        name = f"{prefix}_{'_'.join(group)}" + ("_shared" if len(group) > 1 else "")
        try:
            run_and_record(REPO / "configs" / "benchmarks" / f"{prefix}_{group[0]}.yaml", args,
                           [*overrides, f"eval.settings={evals}", f"name={name}"], data_desc, dataset, title)
        except MetamtlError as exc:  # a user mistake (config, data): its message, not a traceback
            print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
            sys.exit(2)


def setting_order(setting: str) -> tuple[int, int, str]:
    """Sort key of a setting: ways, shots, then its suffix (``20w1s_alphabet`` after ``20w1s``)."""
    base, _, kind = setting.partition("_")
    ways, shots = base.split("w")
    return int(ways), int(shots.rstrip("s")), kind


def training_root(prefix: str, setting: str) -> str:
    """The setting whose config ``<prefix>_<setting>.yaml`` trains like: the setting its file
    ``extends`` (followed up the chain) when it changes nothing but ``name`` and ``eval``, else itself."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "benchmarks" / f"{prefix}_{setting}.yaml").read_text()) or {}
    parent = data.get("extends")
    if not (isinstance(parent, str) and set(data) <= {"extends", "name", "eval"}
            and parent.startswith(f"{prefix}_") and parent.endswith(".yaml")):
        return setting
    parent_setting = parent[len(prefix) + 1:-len(".yaml")]
    if not (REPO / "configs" / "benchmarks" / parent).is_file() or parent_setting == setting:
        return setting
    return training_root(prefix, parent_setting)


def build_config(path: Path, args: argparse.Namespace, overrides: Sequence[str]) -> Config:
    """The benchmark config with the script's options applied (user overrides last)."""
    extra = [f"train.device={args.device}", f"eval.episodes={args.episodes}", f"output_dir={args.output_dir}"]
    if args.budget_minutes is not None:
        extra.append(f"train.budget_minutes={args.budget_minutes if args.budget_minutes > 0 else 'null'}")
    if args.wandb:
        extra.append("logging.wandb=true")
    if args.budget_minutes is not None and args.budget_minutes <= 0 \
            and anneals_over_budget(path, [*overrides, *extra, *args.overrides]):
        extra.append("train.scheduler.over=iterations")  # no budget to anneal over: the iterations instead
    return load_config(path, [*overrides, *extra, *args.overrides])


def anneals_over_budget(path: Path, overrides: Sequence[str]) -> bool:
    """Whether the config at ``path`` with ``overrides`` anneals its learning rate over the budget
    (``train.scheduler.over: budget``)."""
    from metamtl.config import apply_overrides, read_yaml

    train = apply_overrides(read_yaml(path), list(overrides)).get("train") or {}
    scheduler = train.get("scheduler") if isinstance(train, dict) else None
    return isinstance(scheduler, dict) and scheduler.get("over") == "budget"


def run_and_record(config: Path, args: argparse.Namespace, overrides: Sequence[str], data_desc: str,
                   dataset: str, title: str) -> dict[str, Any]:
    """Run one benchmark config through :func:`metamtl.experiment.run`; print and record its rows."""
    from metamtl.experiment import check_output_dir, run

    cfg = build_config(config, args, overrides)
    settings = ", ".join(f"{s.ways}w{s.shots}s" for s in cfg.eval.settings)
    print(f"[benchmark] {cfg.name}: training on {cfg.tasks.ways}-way {cfg.tasks.shots}-shot tasks, evaluating "
          f"{settings}; data: {data_desc}; budget {cfg.train.budget_minutes} min; device {cfg.train.device}",
          flush=True)
    check_output_dir(cfg)
    results = run(cfg, overwrite=True)  # a benchmark rerun replaces its own run folder
    for transductive in (False, True):  # transductive heads get their own table, never mixed
        rows = result_rows(results, data_desc, dataset, transductive)
        for row in rows:
            print(row)
        if rows and not args.no_record:
            record(f"{dataset}-transductive" if transductive else dataset,
                   f"{title}, TRANSDUCTIVE heads (not comparable with the inductive rows)" if transductive else title,
                   rows)
    return results


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files (other than RESULTS.md and
    benchmarks/figures/, which the scripts write) differ from it.  Cached: call it at start-up."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/RESULTS.md", ":!benchmarks/figures"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def provenance() -> str:
    """``date D, commit C, machine M N cores, torch T, Python P``: where a figure was measured."""
    import platform

    import torch

    return (f"date {time.strftime('%Y-%m-%d')}, commit {commit()}, machine {platform.machine()} "
            f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")


def _ancestors() -> set[int]:
    """This process and its parents (from ``/proc``; just this process where that cannot be read)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def exclusive_lock_held(locks: str = "/proc/locks") -> bool:
    """Whether this process or a parent (``flock -x FILE python ...``) holds an exclusive flock."""
    try:
        lines = Path(locks).read_text().splitlines()
    except OSError:
        return False
    owners = _ancestors()
    for line in lines:
        parts = line.split()
        if "->" not in parts and len(parts) > 4 and parts[1:4] == ["FLOCK", "ADVISORY", "WRITE"]:
            if parts[4].isdigit() and int(parts[4]) in owners:
                return True
    return False


def run_conditions() -> str:
    """What a timed run can tell about how it shared the machine, at start-up: whether it runs
    under an exclusive flock (the bench lock) and the 1-minute load average."""
    lock = "under an exclusive flock" if exclusive_lock_held() else "no exclusive flock held"
    return f"{lock}, load average {os.getloadavg()[0]:.2f} at start"


#: (vendor, CPU family, model) -> the name RESULTS.md's machine definitions give that CPU
CPU_GENERATIONS = {("AuthenticAMD", "25", "1"): "zen3", ("AuthenticAMD", "25", "17"): "zen4"}


def cpu_label(cpu_count: int | None = None, cpu: str | None = None, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU machine label of RESULTS.md: ``CPU-<cores>c`` plus the CPU generation read from
    ``cpuinfo`` (``CPU-2c-zen4``), or the model name, family and model when RESULTS.md names no
    machine with that CPU.  ``cpu`` (a run's recorded model name): no generation is added when it
    is not this machine's, as the run was measured elsewhere."""
    from metamtl.environment import cpuinfo_field

    base = f"CPU-{cpu_count if cpu_count is not None else os.cpu_count()}c"
    name = cpuinfo_field("model name", cpuinfo=cpuinfo)
    if name is None or (cpu is not None and cpu != name):
        return base
    key = tuple(cpuinfo_field(k, cpuinfo=cpuinfo) for k in ("vendor_id", "cpu family", "model"))
    if key in CPU_GENERATIONS:
        return f"{base}-{CPU_GENERATIONS[key]}"
    return f"{base} ({name}, family {key[1]} model {key[2]})"


def machine(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    if m.get("cuda") and results.get("config", {}).get("train", {}).get("device") != "cpu":
        return f"GPU {m['cuda']}"
    return cpu_label(m.get("cpu_count", "?"), m.get("cpu"))


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def published_cell(dataset: str, r: dict[str, Any]) -> str:
    """``MAML / MAML++`` published figures a result row can be read against, as the report's
    :func:`~metamtl.reporting.report.references` decides (none for within-superclass or
    transductive rows: published few-shot numbers are neither)."""
    refs = {p.method: f"{p.accuracy:.2f}" for p in references(r, dataset)}
    return f"{refs.get('MAML', '–')} / {refs.get('MAML++', '–')}"


def inner_steps(alg: dict[str, Any]) -> int:
    """The inner steps an algorithm config takes (0: none, e.g. ProtoNet: it has no inner loop)."""
    from metamtl.algorithms import build_algorithm

    base = alg.get("base", alg) if alg.get("name") == "multitask" else alg  # multitask: its base's inner loop
    try:
        return build_algorithm(**base).inner.steps
    except Exception:  # a config this version cannot build: what it says, else the default
        return int(base.get("steps", 1))


def training_cell(results: dict[str, Any]) -> str:
    cfg = results["config"]
    alg, t, tr = cfg["algorithm"], cfg["tasks"], cfg["train"]
    head = f", {alg['head_init']} head" if alg.get("head_init", "learned") != "learned" else ""
    steps = inner_steps(alg)
    evaluated = "" if results.get("selected_iteration", results["iterations"]) == results["iterations"] else \
        f", best val at it. {results['selected_iteration']}"
    precision = results.get("precision", tr.get("precision", "fp32"))  # as chosen (train.precision: auto)
    flags = [precision] if precision != "fp32" else []
    flags += ["channels_last"] if results.get("layout", "channels_last" if tr.get("channels_last") else "") == "channels_last" else []
    fast = f" ({', '.join(flags)})" if flags else ""
    inner = f", {steps} inner steps" if steps else ""  # none without an inner loop (ProtoNet)
    return (f"{alg['name']}{head}, {cfg['model'].get('name')}-{cfg['model'].get('hidden', '')}{fast}{inner}; "
            f"trained {t['ways']}w{t['shots']}s x{tr['meta_batch_size']} tasks, {results['iterations']} it. in "
            f"{results['train_seconds'] / 60:.1f} min ({results['stopped_by']}){evaluated}")


def setting_cell(r: dict[str, Any]) -> str:
    """``5-way 1-shot``, plus ``within-superclass`` episodes and the head that classified them."""
    text = f"{r['ways']}-way {r['shots']}-shot"
    if r.get("hierarchy") is not None:
        text += f" within-superclass (depth {r['hierarchy']})" if isinstance(r["hierarchy"], int) else " within-superclass"
    head = r.get("head", "algorithm")
    return text + f", head: {head}" + (" (transductive)" if r.get("transductive") else "")


def result_rows(results: dict[str, Any], data_desc: str, dataset: str, transductive: bool = False) -> list[str]:
    """Markdown rows of a run's inductive (or, with ``transductive``, transductive) results."""
    date = time.strftime("%Y-%m-%d")
    rows = []
    for r in results["test"]:
        if "skipped" in r or bool(r.get("transductive")) != transductive:
            continue
        acc = f"**{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}** ({r['episodes']} ep.)"
        rows.append(f"| {date} | {commit()} | {machine(results)} | {data_desc} | {setting_cell(r)} "
                    f"| {training_cell(results)} | {acc} | {published_cell(dataset, r)} "
                    f"| `{command()}` |")
    return rows


def record(key: str, title: str, rows: Sequence[str], path: Path = RESULTS) -> None:
    """Insert ``rows`` at the end of the table marked ``<!-- rows:key -->`` (created if missing)."""
    marker = f"<!-- rows:{key} -->"
    text = path.read_text() if path.is_file() else "# metamtl results\n"
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n### {title}\n\n{HEADER}{marker}\n"
    head, tail = text.split(marker, 1)
    from metamtl.files import atomic_write_text

    atomic_write_text(path, head + "".join(r + "\n" for r in rows) + marker + tail)
    print(f"[benchmark] recorded {len(rows)} row(s) in {path}")


def check_section(key: str, path: Path = RESULTS) -> str:
    """The text of ``path`` (a new results file's heading when there is none), after checking that
    its ``<!-- key:start -->`` / ``<!-- key:end -->`` markers can be replaced: both or neither, once
    each, start first.  Call it before a long run, so that a hand-edited file is found then and not
    after the measurements.  Raises :class:`~metamtl.errors.InputError` saying what to fix."""
    from metamtl.errors import InputError

    text = path.read_text() if path.is_file() else "# metamtl results\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    counts = (text.count(start), text.count(end))
    if counts == (0, 0) or (counts == (1, 1) and text.index(start) < text.index(end)):
        return text
    raise InputError(
        f"{path} has {counts[0]} `{start}` and {counts[1]} `{end}` marker(s)" + (", the end first" if counts == (1, 1) else "")
        + f": the block to replace must be marked by one `{start}` followed by one `{end}`. Fix the markers "
        "by hand (or remove both to have the section appended at the end of the file), then run again.")


def write_section(key: str, title: str, lines: Sequence[str], path: Path = RESULTS, heading: str = "##") -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` with
    ``lines`` (the block, under a ``<heading> title`` heading, is appended when missing; the file is
    created when there is none).  The markers are checked first (:func:`check_section`) and the
    file is replaced atomically, so an interrupted write leaves the previous file."""
    from metamtl.files import atomic_write_text

    text = check_section(key, path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = "\n".join([start, *lines, end])
    if start in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n{heading} {title}\n\n" + block + "\n"
    atomic_write_text(path, text)
