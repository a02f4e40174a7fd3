"""CPU time, minor page faults and peak RSS per meta-iteration of a config, in this process.

    python benchmarks/cpu_per_iteration.py 300 500                       # mini-ImageNet transfer
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0 python benchmarks/cpu_per_iteration.py 300 500
    python benchmarks/cpu_per_iteration.py 300 500 --config configs/omniglot_5w1s.yaml

Trains ``--config`` (default: configs/benchmarks/miniimagenet_5w1s.yaml, test on the val classes)
for ``B + 1`` iterations with no validation, no time budget and no report, and prints one JSON line:
process user and system milliseconds, minor page faults and wall milliseconds per iteration over
iterations ``[A, B)``, and the process's peak RSS.  CPU time, unlike wall time, stays comparable
when other processes share the machine.  Extra arguments are config overrides (key=value).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from allocator import COMMON  # the same training-only overrides as the allocator table
from common import REPO, data_root

sys.path.insert(0, str(REPO))  # run from a checkout without installing


def main() -> None:
    from metamtl.callbacks import Callback
    from metamtl.config import load_config
    from metamtl.experiment import run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("start", type=int, help="first iteration measured (after warm-up)")
    p.add_argument("end", type=int, help="last iteration measured")
    p.add_argument("--config", default=str(REPO / "configs/benchmarks/miniimagenet_5w1s.yaml"))
    p.add_argument("--data-root", help="dataset root (default: $METAMTL_DATA, else ../shared/data)")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), before or after the options")
    args = p.parse_intermixed_args()  # overrides after --config X too, as the usage line puts it
    if not 0 < args.start < args.end:
        raise SystemExit("need 0 < start < end")
    marks: dict[int, tuple[float, float, int, float]] = {}

    class Probe(Callback):
        def on_iteration_end(self, state, metrics):
            if state.iteration in (args.start, args.end):
                r = resource.getrusage(resource.RUSAGE_SELF)
                marks[state.iteration] = (r.ru_utime, r.ru_stime, r.ru_minflt, time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        overrides = [*COMMON, f"data.root={data_root(args.data_root)}", f"train.iterations={args.end + 1}",
                     f"output_dir={out}", "name=cpu"]
        if "miniimagenet" in Path(args.config).name:
            overrides.append("data.test_split=val")  # the test images are absent here
        run(load_config(args.config, overrides + args.overrides), progress=False, callbacks=[Probe()], quiet=True)
    n = args.end - args.start
    (u0, s0, f0, t0), (u1, s1, f1, t1) = marks[args.start], marks[args.end]
    print(json.dumps({"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                      "tune_malloc": os.environ.get("METAMTL_TUNE_MALLOC", "1"),
                      "user_ms": round(1000 * (u1 - u0) / n, 1), "sys_ms": round(1000 * (s1 - s0) / n, 1),
                      "minor_faults": round((f1 - f0) / n), "wall_ms": round(1000 * (t1 - t0) / n, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
