"""GPU readiness in one command: every GPU row, measured and written to benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py              # on a machine with one CUDA GPU: at most ~8 minutes
    python benchmarks/gpu_check.py --smoke      # the same code paths, tiny sizes, on CPU (CI runs it)

Rows (section "GPU check" of RESULTS.md, between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->``):

* speed, conv4-64 on 28x28 Omniglot, 5-way 1-shot, 15 queries (as benchmarks/speed.py), seconds per
  meta-iteration (median of 5 after one warm-up, ``torch.cuda.synchronize`` around each) and peak
  GPU memory: MAML 32 tasks x 1 step with the core adapting all 32 tasks in one ``vmap`` call
  (``task_chunk: 32``), one task per call, the same in bf16 autocast, the ``higher`` engine, a
  plain ``higher`` loop; ANIL 32x1 in one call; MAML 16 tasks x 5 steps in one call;
* a 5-minute mini-ImageNet training with configs/benchmarks/miniimagenet_5w1s.yaml (bf16, the
  64-way cosine pre-training) and its 5-way 1-shot accuracy on the 16 val classes (600 episodes).

``--smoke`` runs every row on CPU with 4 tasks, 8 filters, one timed iteration and a few seconds
of training, writes to ``--results`` (not RESULTS.md unless asked), so the script cannot rot.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import speed  # noqa: E402
from common import check_section, data_root, provenance, write_section  # noqa: E402


def speed_rows(smoke: bool) -> dict[str, tuple[str, object]]:
    """name -> (description, factory(device) -> step)."""
    t32, t16 = (4, 4) if smoke else (32, 16)
    step = speed.metamtl_step
    return {
        "gpu_maml_32x1_vmap32": (f"MAML {t32}x1, core, all tasks in one vmap call",
                                 lambda d: step("maml", t32, 1, d, task_chunk=t32)[0]),
        "gpu_maml_32x1_chunk1": (f"MAML {t32}x1, core, one task per call",
                                 lambda d: step("maml", t32, 1, d, task_chunk=1)[0]),
        "gpu_maml_32x1_vmap32_bf16": (f"MAML {t32}x1, core, one vmap call, bf16 autocast",
                                      lambda d: step("maml", t32, 1, d, task_chunk=t32, precision="bf16")[0]),
        "gpu_maml_32x1_higher": (f"MAML {t32}x1, higher engine", lambda d: step("maml", t32, 1, d, backend="higher")[0]),
        "gpu_higher_32x1": (f"plain higher loop, {t32}x1", lambda d: speed.plain_higher_step(t32, 1, d)[0]),
        "gpu_anil_32x1_vmap32": (f"ANIL {t32}x1, core, one vmap call",
                                 lambda d: step("anil", t32, 1, d, task_chunk=t32)[0]),
        "gpu_maml_16x5_vmap16": (f"MAML {t16}x5, core, one vmap call",
                                 lambda d: step("maml", t16, 5, d, task_chunk=t16)[0]),
    }


def time_row(factory, device: str, iters: int) -> dict[str, float]:
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn = factory(device)
    fn()  # warm-up (and vmap/cuDNN autotuning)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times)}
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def train_row(device: str, smoke: bool, root: Path, output_dir: str) -> dict[str, object]:
    """The mini-ImageNet config for 5 minutes (smoke: seconds), evaluated on the val classes."""
    from metamtl.config import load_config
    from metamtl.experiment import run

    overrides = [f"data.root={root}", f"train.device={device}", "data.test_split=val", "eval.checkpoint=last",
                 "logging.report=false", f"output_dir={output_dir}", "name=gpu_check_miniimagenet",
                 "train.val_every=1000000", "train.checkpoint_every=1000000"]
    if smoke:
        overrides += ["train.budget_minutes=0.05", "train.iterations=3", "train.val_episodes=4", "eval.episodes=10",
                      "model.hidden=8",
                      "train.precision=fp32"]
    else:
        overrides += ["train.budget_minutes=5", "eval.episodes=600"]
    cfg = load_config(REPO / "configs" / "benchmarks" / "miniimagenet_5w1s.yaml", overrides)
    t0 = time.perf_counter()
    results = run(cfg, progress=False)
    r = results["test"][0]
    return {"iterations": results["iterations"], "train_minutes": results["train_seconds"] / 60,
            "accuracy": r["accuracy"], "ci95": r["ci95"], "episodes": r["episodes"],
            "wall_minutes": (time.perf_counter() - t0) / 60, "precision": results.get("precision", cfg.train.precision)}


def write(path: Path, lines: list[str]) -> None:
    write_section("gpu", "GPU check (`benchmarks/gpu_check.py`)", lines, path=path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--results", type=Path, default=None,
                        help="file to write the rows to (default: benchmarks/RESULTS.md; with --smoke: none)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output-dir", default="runs/gpu_check")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a machine with a GPU, or with --smoke on CPU")
    if args.smoke:
        speed.FILTERS = 8  # tiny conv4 for the code-path check
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = data_root(args.data_root)
    target = args.results if args.results is not None else (None if args.smoke else REPO / "benchmarks" / "RESULTS.md")
    if target is not None:
        check_section("gpu", target)  # a hand-edited file fails now, not after the run
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none (CPU smoke run)"
    header = [f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`, {provenance()}, "
              f"device {device}, GPU {gpu}."]
    lines = ["| row | what | s/iter (median) | peak GPU MB |", "|---|---|---|---|"]
    results = {}
    for name, (desc, factory) in speed_rows(args.smoke).items():
        res = results[name] = time_row(factory, device, 1 if args.smoke else 5)
        mb = f"{res['peak_mb']:.0f}" if "peak_mb" in res else "-"
        lines.append(f"| {name} | {desc} | {res['seconds']:.3f} | {mb} |")
        print(lines[-1], flush=True)
    ratios = [("core one vmap call / one task per call", "gpu_maml_32x1_vmap32", "gpu_maml_32x1_chunk1"),
              ("core bf16 / fp32 (one vmap call)", "gpu_maml_32x1_vmap32_bf16", "gpu_maml_32x1_vmap32"),
              ("core (one vmap call) / higher engine", "gpu_maml_32x1_vmap32", "gpu_maml_32x1_higher"),
              ("core (one vmap call) / plain higher loop", "gpu_maml_32x1_vmap32", "gpu_higher_32x1")]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {label} | {results[a]['seconds'] / results[b]['seconds']:.2f}x |" for label, a, b in ratios]
    train = train_row(device, args.smoke, root, args.output_dir)
    lines += ["", "| training | iterations | minutes | 5-way 1-shot val accuracy (95% CI) |", "|---|---|---|---|",
              f"| mini-ImageNet, configs/benchmarks/miniimagenet_5w1s.yaml ({train['precision']}), "
              f"{'smoke budget' if args.smoke else '5-minute budget'} | {train['iterations']} | "
              f"{train['train_minutes']:.1f} | {100 * train['accuracy']:.2f} ± {100 * train['ci95']:.2f} "
              f"({train['episodes']} episodes) |"]
    total = (time.perf_counter() - t_start) / 60
    lines += ["", f"Whole check: {total:.1f} minutes."]
    print("\n".join(lines[-5:]), flush=True)
    if target is not None:
        write(target, header + [""] + lines)
        print(f"gpu_check: rows written to {target}")


if __name__ == "__main__":
    main()
