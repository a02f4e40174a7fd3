"""Count what the reliability suite tries: bad inputs, untrusted files, faults and fuzzed inputs.

Runs ``tests/reliability`` (and the bad-input tests of the core suite it points to) under pytest,
counts every executed case by the category of its ``pytest.mark.reliability(...)`` mark (a
parametrised case counts once per parameter set; cases of the core suite count as ``bad_input``),
and reads the fuzzing tally (how many generated inputs worked, how many were refused with a
``MetamtlError`` and how many raised anything else, which also fails the test).  A case counts as *handled* when its test passed:
the error was the library's own with the expected message, or the fault left the run intact.

    python benchmarks/reliability_counts.py                # the default (derandomized) fuzz profile
    python benchmarks/reliability_counts.py -k fuzz -x     # other arguments are passed on to pytest
    HYPOTHESIS_PROFILE=deep python benchmarks/reliability_counts.py --write

``--write`` records the table in benchmarks/RESULTS.md (section "Reliability").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import pytest  # noqa: E402

from common import cpu_label  # noqa: E402

#: core-suite tests that check bad inputs (see tests/reliability/test_bad_inputs.py)
CORE_BAD_INPUT = [
    "tests/core/test_sampler.py::test_bad_arguments_raise_task_errors",
    "tests/core/test_learner.py::test_bad_inputs_get_clear_errors",
    "tests/core/test_learner.py::test_bad_settings_raise_config_errors",
    "tests/core/test_config.py",
    "tests/data/test_data_folder.py::test_corrupt_or_truncated_image_error_names_the_file",
]
CATEGORIES = {
    "bad_input": "bad inputs (sampler, models/learner, config/CLI)",
    "untrusted_file": "untrusted files (pickles, damaged/foreign checkpoints, archives, images)",
    "fault": "faults injected (SIGKILL mid-write, SIGINT/SIGTERM, non-finite steps, disk full, read-only)",
    "fuzz": "property-based fuzz tests (hypothesis)",
    "data_fidelity": "data decoded faithfully (bit depth, alpha, modes, sizes, formats, walks, duplicates, encodings)",
    "run_folder": "run folders (no silent overwrite, one writer at a time, fit called again)",
}
SECTION = "## Reliability (issue 9)"


class Tally:
    """pytest plugin: outcome of every executed case, by reliability category."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        mark = item.get_closest_marker("reliability")
        category = mark.args[0] if mark else "bad_input"
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "handled" if report.passed else ("skipped" if report.skipped else "failed")
            self.outcomes.setdefault(category, Counter())[outcome] += 1


def run(extra: list[str]) -> tuple[dict, dict, int, float]:
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        fuzz_file = Path(tmp) / "fuzz.json"
        os.environ["METAMTL_RELIABILITY_COUNTS"] = str(fuzz_file)
        os.environ.setdefault("WANDB_MODE", "offline")
        start = time.perf_counter()
        code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/reliability", *CORE_BAD_INPUT, *extra],
                           plugins=[tally])
        seconds = time.perf_counter() - start
        fuzz = json.loads(fuzz_file.read_text()) if fuzz_file.exists() else {}
    return tally.outcomes, fuzz, int(code), seconds


def table(outcomes: dict, fuzz: dict) -> list[str]:
    lines = ["| category | cases run | handled (test passed) | failed |", "|---|---|---|---|"]
    for key, label in CATEGORIES.items():
        c = outcomes.get(key, Counter())
        lines.append(f"| {label} | {sum(c.values())} | {c['handled']} | {c['failed'] + c['skipped']} |")
    lines += ["", "| fuzz target | generated inputs | worked | refused with a MetamtlError | anything else |",
              "|---|---|---|---|---|"]
    kinds = ("worked", "library_error", "other")
    for name, c in sorted(fuzz.items()):
        counts = [c.get(k, 0) for k in kinds]
        lines.append(f"| {name} | {sum(counts)} | " + " | ".join(map(str, counts)) + " |")
    totals = [sum(c.get(k, 0) for c in fuzz.values()) for k in kinds]
    lines.append(f"| **all** | **{sum(totals)}** | " + " | ".join(map(str, totals)) + " |")
    return lines


def write(lines: list[str]) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text()
    block = "\n".join(lines) + "\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + block + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    from metamtl.files import atomic_write_text

    atomic_write_text(path, text)  # an interrupted write leaves the previous file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                usage="%(prog)s [-h] [--write] [PYTEST_ARG ...]",
                                epilog="Any other argument (-k EXPR, -x, a test id...) is passed on to pytest.")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args, pytest_args = p.parse_known_args()
    if "--" in pytest_args:  # the separator that used to be needed: not an argument of pytest's
        pytest_args.remove("--")
    outcomes, fuzz, code, seconds = run(pytest_args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    profile = os.environ.get("HYPOTHESIS_PROFILE", "default")
    lines = [
        SECTION, "",
        f"Command: `{'HYPOTHESIS_PROFILE=deep ' if profile == 'deep' else ''}python benchmarks/reliability_counts.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`, date {time.strftime('%Y-%m-%d')}, "
        f"commit {commit}, machine {cpu_label()}, fuzz profile {profile}, pytest exit {code}, {seconds:.0f} s. "
        "Every case is a test that passed only if the library raised its own error type with a message "
        "saying what to fix, or the injected fault left the previous checkpoint loadable, the state in "
        "memory intact and the run resumable (see README, \"What each failure does\").", "",
        *table(outcomes, fuzz), "",
    ]
    print("\n".join(lines))
    if args.write:
        write(lines)
    sys.exit(code)


if __name__ == "__main__":
    main()
