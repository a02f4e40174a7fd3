"""Side-by-side speed benchmark: metamtl's inner loop against a plain higher loop, learn2learn and
the hardware floor, on conv4 (64 filters) with 28x28 Omniglot images, 5-way 1-shot, 15 queries.

    flock -x /tmp/metamtl-cpu.lock python benchmarks/speed.py --write

Every measurement runs in a fresh subprocess, one after the other in this one run: a warm-up
iteration (excluded), then ``--iters`` timed iterations, reporting the median.  Memory is the
peak resident set size of that subprocess (``getrusage`` max RSS) above what it held once data
and model were loaded, i.e. what one iteration needs on top of the model and data (on CUDA:
``torch.cuda.max_memory_allocated``).  Images are real Omniglot characters (small1+small2
background sets) when $METAMTL_DATA has them, random images of the same shape otherwise; the
output says which.

The references are written as a user of each library would write them, on the textbook conv4
(conv -> BatchNorm -> ReLU -> max-pool, batch statistics) with the same initial weights:

* ``higher``: ``higher.innerloop_ctx`` per task, SGD inner optimizer, query loss ``backward()``;
* ``learn2learn``: ``l2l.algorithms.MAML(model, lr).clone()`` / ``.adapt(loss)`` per task;
* ``floor``: plain forward + backward of the same images (32 tasks x 80 images) in chunks of 80:
  what one pass over the images costs without any meta-learning.

metamtl rows run a ``MetaLearner``'s model and layout (by default automatic: timed in both layouts
on the row's meta-batch before the warm-up, as ``fit`` does (``metamtl.fit_loop.choose_layout``); the notes give the probe's channels_last /
NCHW CPU-time ratio) and pass the meta-iteration on, as ``fit`` does; ``*_higher`` rows are the
same settings with ``backend: higher`` (the oracle engine).  Meta-iterations include zeroing
gradients and one Adam meta-step, for every row alike.
``--write`` records the table in benchmarks/RESULTS.md (section "Speed"), with the command,
date, machine and commit.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_section, provenance, run_conditions, write_section  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from metamtl.memory import PeakMemory  # noqa: E402

WAYS, SHOTS, QUERIES, SIZE, FILTERS, LR = 5, 1, 15, 28, 64, 0.4
#: how to get learn2learn (also the hint of benchmarks/learn2learn_side_by_side.py, which needs it)
L2L_BUILD = ("`pip install learn2learn` (0.2.0) fails on Python 3.11; `make learn2learn` builds it from its sdist "
             "with a current Cython (tools/build_learn2learn.sh).")
L2L_INSTALL = "learn2learn is not installed: its rows are skipped. " + L2L_BUILD


# -- shared setup (children) ------------------------------------------------------------------------
def load_images() -> tuple[object, str]:
    """The Omniglot training split (small1+small2, 28x28) or ``None`` and why."""
    from metamtl.data.registry import load_dataset

    root = os.environ.get("METAMTL_DATA") or str(REPO.parent / "shared" / "data")
    try:
        ds = load_dataset("omniglot", split="train", root=root, image_size=SIZE,
                          sources=("images_background_small1", "images_background_small2"))
        return ds, f"Omniglot small1+small2 train split ({ds.num_classes} characters)"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to synthetic images
        return None, f"synthetic uniform images (Omniglot not loaded: {type(exc).__name__})"


def episodes(count: int, queries: int = QUERIES, device: str = "cpu"):
    """``count`` float episodes on ``device`` (the same ones in every child)."""
    from metamtl.tasks import EpisodeSampler, TaskBatch

    ds, _ = load_images()
    if ds is not None:
        sampler = EpisodeSampler(ds, WAYS, SHOTS, queries, seed=0)
        return TaskBatch([sampler.episode(i) for i in range(count)]).to(device)
    return synthetic_episodes(count, WAYS, SHOTS, queries, 1, SIZE, device)


def synthetic_episodes(count: int, ways: int, shots: int, queries: int, channels: int, size: int,
                       device: str = "cpu"):
    """``count`` episodes of uniform-noise images (seeded: the same in every child)."""
    from metamtl.tasks import Episode, TaskBatch

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch([
        Episode(torch.rand(ways * shots, channels, size, size, generator=g), labels.repeat_interleave(shots),
                torch.rand(ways * queries, channels, size, size, generator=g), labels.repeat_interleave(queries),
                ways, shots, queries) for _ in range(count)
    ]).to(device)


def metamtl_model(device: str, head: bool = True):
    from metamtl.models import build_model

    torch.manual_seed(0)
    return build_model("conv4", hidden=FILTERS, image_size=SIZE, out_features=WAYS if head else None).to(device)


def textbook_conv4(device: str, ref: nn.Module | None = None) -> nn.Module:
    """conv -> BatchNorm -> ReLU -> max-pool x4 + linear, with the initial weights of ``ref``, a
    metamtl conv4 with a head (default: this benchmark's Omniglot model)."""
    ref = metamtl_model(device) if ref is None else ref
    layers: list[nn.Module] = []
    for block in ref.trunk.blocks:
        conv, norm = block[0], block[1]
        layers += [nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1),
                   nn.BatchNorm2d(norm.num_features, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        layers[-4].load_state_dict(conv.state_dict())
        layers[-3].load_state_dict(norm.state_dict())
    head = nn.Linear(ref.num_features, ref.head.out_features)
    head.load_state_dict(ref.head.state_dict())
    return nn.Sequential(*layers, nn.Flatten(), head).to(device)


def import_learn2learn():
    """learn2learn's MAML and data pipeline, without its package __init__ (which needs gym etc.)."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        return None
    for name in ("learn2learn", "learn2learn.algorithms", "learn2learn.data"):
        if name not in sys.modules:
            found = spec if name == "learn2learn" else importlib.util.find_spec(name)
            module = types.ModuleType(name)
            module.__path__ = list(found.submodule_search_locations)
            sys.modules[name] = module
    pkg, data = sys.modules["learn2learn"], sys.modules["learn2learn.data"]
    pkg.data, pkg.algorithms = data, sys.modules["learn2learn.algorithms"]
    data.MetaDataset = importlib.import_module("learn2learn.data.meta_dataset").MetaDataset
    data.TaskDataset = importlib.import_module("learn2learn.data.task_dataset").TaskDataset
    data.transforms = importlib.import_module("learn2learn.data.transforms")
    maml = importlib.import_module("learn2learn.algorithms.maml").MAML
    return types.SimpleNamespace(MAML=maml, MetaDataset=data.MetaDataset, TaskDataset=data.TaskDataset,
                                 transforms=data.transforms)


# -- what one iteration of each row does ------------------------------------------------------------
def nhwc(model: nn.Module, batch, on: bool):
    """``model`` and ``batch`` in channels_last layout (as MetaLearner(channels_last=True) has them)."""
    if not on:
        return model, batch
    return model.to(memory_format=torch.channels_last), batch.to(memory_format=torch.channels_last)


def metamtl_step(algorithm: str, tasks: int, steps: int, device: str, queries: int = QUERIES,
                 channels_last: bool | None = None, start_iteration: int = 0, precision: str = "fp32", **settings):
    """One meta-iteration of metamtl as ``MetaLearner.fit`` runs it: the learner's layout (by default
    automatic: timed in both layouts on this meta-batch by ``choose_layout`` before the
    warm-up, as ``fit`` does before its first meta-step), its meta-iteration passed on."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.fit_loop import choose_layout

    per_task_head = settings.get("head_init", "learned") != "learned"
    alg = build_algorithm(algorithm, steps=steps, lr=settings.pop("lr", LR), **settings)
    learner = MetaLearner(metamtl_model(device, head=not per_task_head), alg, device=device,
                          channels_last=channels_last, precision=precision)
    learner.run.iteration = start_iteration  # the meta-gradient rule the layout is chosen for
    batch = choose_layout(learner, episodes(tasks, queries, device).to(memory_format=learner.memory_format))
    model = learner.model
    opt = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
    iteration = [start_iteration]

    def step():
        opt.zero_grad(set_to_none=True)
        with learner.autocast():
            alg.meta_step(model, batch, iteration[0])
        opt.step()
        iteration[0] += 1

    layout = "channels_last" if learner.channels_last else "NCHW"
    probe = learner.layout_probe.last
    if learner.placement.automatic and probe is not None and probe.seconds:
        layout += f" (probe {probe.seconds[True] / probe.seconds[False]:.2f}x)"
    workers = alg.task_workers(model, batch, len(alg.chunks(batch, training=True)))
    threads = f", {workers} task threads" if workers > 1 else ""
    return step, {"path": f"{alg.inner.backend}, {layout}{threads}"}


def higher_iteration(model: nn.Module, batch, steps: int, lr: float = LR):
    """One meta-iteration as a user of higher writes it: ``innerloop_ctx`` per task, SGD inner
    loop, query loss ``backward()``, an Adam meta-step."""
    import higher

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
        for ep in batch:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fmodel(ep.support_x), ep.support_y))
                (F.cross_entropy(fmodel(ep.query_x), ep.query_y) / len(batch)).backward()
        opt.step()

    return step


def learn2learn_iteration(model: nn.Module, batch, steps: int, lr: float = LR):
    """One meta-iteration with learn2learn's ``MAML(model, lr).clone()/.adapt()`` per task (``None``
    when learn2learn is not importable)."""
    l2l = import_learn2learn()
    if l2l is None:
        return None
    maml = l2l.MAML(model, lr=lr, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        for ep in batch:
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(ep.support_x), ep.support_y))
            (F.cross_entropy(learner(ep.query_x), ep.query_y) / len(batch)).backward()
        opt.step()

    return step


def plain_higher_step(tasks: int, steps: int, device: str, channels_last: bool = False):
    model, batch = nhwc(textbook_conv4(device), episodes(tasks, device=device), channels_last)
    return higher_iteration(model, batch, steps), {}


def learn2learn_step(tasks: int, steps: int, device: str, channels_last: bool = False):
    model, batch = nhwc(textbook_conv4(device), episodes(tasks, device=device), channels_last)
    step = learn2learn_iteration(model, batch, steps)
    return (step, {}) if step is not None else (None, {"skipped": L2L_INSTALL})


def floor_step(tasks: int, device: str, model_kind: str = "textbook", memory_format: str = "nchw",
               compiled: bool = False):
    """Forward + backward of the meta-batch's images (``tasks`` x 80) in chunks of 80."""
    model = textbook_conv4(device) if model_kind == "textbook" else metamtl_model(device)
    if memory_format == "channels_last":  # after the first conv: 1-channel inputs are ambiguous
        first = model[0]
        model[0] = nn.Sequential(first, _ChannelsLast())
    model, batch = nhwc(model, episodes(tasks, device=device), memory_format == "nhwc")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.cat([torch.cat([e.support_x, e.query_x]) for e in batch])
    if memory_format == "nhwc":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.cat([torch.cat([e.support_y, e.query_y]) for e in batch])
    forward = torch.compile(model) if compiled else model
    extra = {}
    if compiled:
        t0 = time.perf_counter()
        F.cross_entropy(forward(images[:80]), labels[:80]).backward()
        extra["compile_s"] = round(time.perf_counter() - t0, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        for x, y in zip(images.split(80), labels.split(80)):
            F.cross_entropy(forward(x), y).backward()
        opt.step()

    return step, extra


class _ChannelsLast(nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def fresh_episodes(per_step: int, use):
    """A step that draws the next ``per_step`` Omniglot training episodes (new ones every call)
    and hands them to ``use``."""
    from metamtl.tasks import EpisodeSampler

    ds, _ = load_images()
    if ds is None:
        return None, {"skipped": "needs the Omniglot images"}
    sampler = EpisodeSampler(ds, WAYS, SHOTS, QUERIES, seed=0)
    offset = [0]

    def step():
        use([sampler.episode(offset[0] + i) for i in range(per_step)])
        offset[0] += per_step

    return step, {}


def sampler_rate(count: int = 2000):
    """metamtl EpisodeSampler: episodes per second (uint8 episodes, no conversion)."""
    step, info = fresh_episodes(count, lambda eps: None)
    return step, info if step is None else {"episodes": count}


def batch_prep(tasks: int, device: str):
    """Build one meta-batch of ``tasks`` episodes and move/convert it (what ``fit`` does per step)."""
    from metamtl.tasks import TaskBatch

    return fresh_episodes(tasks, lambda eps: TaskBatch(eps).to(device))


def l2l_taskdataset_rate(count: int = 200):
    """learn2learn TaskDataset (NWays, KShots, LoadData, RemapLabels) on the same uint8 images."""
    l2l = import_learn2learn()
    if l2l is None:
        return None, {"skipped": L2L_INSTALL}
    ds, _ = load_images()
    if ds is None:
        return None, {"skipped": "needs the Omniglot images"}
    data = torch.utils.data.TensorDataset(ds.images, ds.labels)
    labels_to_indices = {}
    for i, y in enumerate(ds.labels.tolist()):
        labels_to_indices.setdefault(y, []).append(i)
    meta = l2l.MetaDataset(data, labels_to_indices=labels_to_indices)
    t = l2l.transforms
    taskset = l2l.TaskDataset(meta, task_transforms=[
        t.NWays(meta, WAYS), t.KShots(meta, SHOTS + QUERIES), t.LoadData(meta), t.RemapLabels(meta)])

    def step():
        for _ in range(count):
            taskset.sample()

    return step, {"episodes": count}


def evaluate_rows(algorithm: str, backend: str, count: int, device: str):
    """``MetaLearner.evaluate`` of ``count`` episodes (the demo's ANIL/proto/3-step setting)."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm

    model = metamtl_model(device, head=False)
    alg = build_algorithm(algorithm, steps=3, lr=0.1, head_init="proto", backend=backend)
    learner = MetaLearner(model, alg, device=device)
    eps = list(episodes(count, device=device).to(memory_format=learner.memory_format))

    def step():
        learner.evaluate(eps, progress=False)

    return step, {}


#: name -> (description, factory(device) -> (step | None, extra))
ROWS = {
    "floor": ("floor: textbook conv4 forward+backward, 32x80 images in chunks of 80",
              lambda d: floor_step(32, d)),
    "floor_metamtl": ("floor with metamtl's Conv4 (max-pool before ReLU)", lambda d: floor_step(32, d, "metamtl")),
    "floor_channels_last": ("floor, textbook conv4, channels_last feature maps",
                            lambda d: floor_step(32, d, memory_format="channels_last")),
    "floor_nhwc": ("floor, textbook conv4, channels_last weights and images",
                   lambda d: floor_step(32, d, memory_format="nhwc")),
    "floor_metamtl_nhwc": ("floor, metamtl Conv4, channels_last weights and images",
                           lambda d: floor_step(32, d, "metamtl", memory_format="nhwc")),
    "floor_compiled": ("floor, textbook conv4 under torch.compile (compile time excluded)",
                       lambda d: floor_step(32, d, compiled=True)),
    "maml_32x1": ("metamtl MAML 2nd order, 32 tasks x 1 step (defaults: core engine, automatic layout)", lambda d: metamtl_step("maml", 32, 1, d)),
    "maml_32x1_higher": ("metamtl MAML, backend higher (the oracle engine)",
                         lambda d: metamtl_step("maml", 32, 1, d, backend="higher")),
    "maml_32x1_vmap": ("metamtl MAML, core with torch.func.vmap over chunks of 8 tasks",
                       lambda d: metamtl_step("maml", 32, 1, d, task_chunk=8)),
    "maml_32x1_nchw": ("metamtl MAML 32x1, NCHW forced (MetaLearner channels_last=False)",
                       lambda d: metamtl_step("maml", 32, 1, d, channels_last=False)),
    "maml_32x1_serial": ("metamtl MAML 32x1, one task after another (task_threads=1: all threads on each op)",
                         lambda d: metamtl_step("maml", 32, 1, d, task_threads=1)),
    "higher_32x1": ("plain higher loop, 32 tasks x 1 step", lambda d: plain_higher_step(32, 1, d)),
    "higher_32x1_nhwc": ("plain higher loop, channels_last model and images",
                         lambda d: plain_higher_step(32, 1, d, channels_last=True)),
    "l2l_32x1": ("learn2learn MAML, 32 tasks x 1 step", lambda d: learn2learn_step(32, 1, d)),
    "l2l_32x1_nhwc": ("learn2learn MAML, channels_last model and images",
                      lambda d: learn2learn_step(32, 1, d, channels_last=True)),
    "maml_16x5": ("metamtl MAML 2nd order, 16 tasks x 5 steps", lambda d: metamtl_step("maml", 16, 5, d)),
    "maml_16x5_nchw": ("metamtl MAML 16x5, NCHW forced",
                       lambda d: metamtl_step("maml", 16, 5, d, channels_last=False)),
    "maml_16x5_serial": ("metamtl MAML 16x5, one task after another (task_threads=1)",
                         lambda d: metamtl_step("maml", 16, 5, d, task_threads=1)),
    "maml_16x5_higher": ("metamtl MAML 16x5, backend higher",
                         lambda d: metamtl_step("maml", 16, 5, d, backend="higher")),
    "higher_16x5": ("plain higher loop, 16 tasks x 5 steps", lambda d: plain_higher_step(16, 5, d)),
    "l2l_16x5": ("learn2learn MAML, 16 tasks x 5 steps", lambda d: learn2learn_step(16, 5, d)),
    "fomaml_32x1": ("metamtl FOMAML, 32 tasks x 1 step", lambda d: metamtl_step("fomaml", 32, 1, d)),
    "fomaml_32x1_nchw": ("metamtl FOMAML 32x1, NCHW forced",
                         lambda d: metamtl_step("fomaml", 32, 1, d, channels_last=False)),
    "fomaml_32x1_higher": ("metamtl FOMAML, backend higher",
                           lambda d: metamtl_step("fomaml", 32, 1, d, backend="higher")),
    "anil_32x1": ("metamtl ANIL (head-only), 32 tasks x 1 step", lambda d: metamtl_step("anil", 32, 1, d)),
    "anil_32x1_nchw": ("metamtl ANIL 32x1, NCHW forced",
                       lambda d: metamtl_step("anil", 32, 1, d, channels_last=False)),
    "anil_32x1_higher": ("metamtl ANIL, backend higher",
                         lambda d: metamtl_step("anil", 32, 1, d, backend="higher")),
    "anil_demo": ("metamtl ANIL as in `make demo`: 16 tasks, proto head, 3 steps, 5 queries",
                  lambda d: metamtl_step("anil", 16, 3, d, queries=5, head_init="proto", lr=0.1)),
    "anil_demo_higher": ("the same, backend higher",
                         lambda d: metamtl_step("anil", 16, 3, d, queries=5, head_init="proto", lr=0.1,
                                                backend="higher")),
    "metasgd_32x1": ("metamtl Meta-SGD, 32 tasks x 1 step (learned per-weight rates)",
                     lambda d: metamtl_step("metasgd", 32, 1, d)),
    "metasgd_32x1_higher": ("the same, backend higher", lambda d: metamtl_step("metasgd", 32, 1, d, backend="higher")),
    "mamlpp_16x5": ("metamtl MAML++ defaults (per-step BN, learned rates, multi-step loss), 16 tasks x 5 steps, "
                    "from meta-iteration 0 (first order)", lambda d: metamtl_step("mamlpp", 16, 5, d, lr=0.1)),
    "mamlpp_16x5_higher": ("the same, backend higher",
                           lambda d: metamtl_step("mamlpp", 16, 5, d, lr=0.1, backend="higher")),
    "mamlpp_16x5_so": ("metamtl MAML++ 16x5 from meta-iteration 500 (second order, final-step loss)",
                       lambda d: metamtl_step("mamlpp", 16, 5, d, lr=0.1, start_iteration=500)),
    "mamlpp_16x5_so_higher": ("the same, backend higher",
                              lambda d: metamtl_step("mamlpp", 16, 5, d, lr=0.1, start_iteration=500,
                                                     backend="higher")),
    "reptile_16x5": ("metamtl Reptile, 16 tasks x 5 steps", lambda d: metamtl_step("reptile", 16, 5, d)),
    "reptile_16x5_higher": ("the same, backend higher", lambda d: metamtl_step("reptile", 16, 5, d, backend="higher")),
    "maml_adam_16x5": ("metamtl MAML 2nd order with an Adam inner loop (lr 0.001), 16 tasks x 5 steps",
                       lambda d: metamtl_step("maml", 16, 5, d, optimizer="adam", lr=0.001)),
    "maml_adam_16x5_higher": ("the same, backend higher",
                              lambda d: metamtl_step("maml", 16, 5, d, optimizer="adam", lr=0.001, backend="higher")),
    "eval_100": ("MetaLearner.evaluate, 100 episodes (ANIL proto, 3 steps)",
                 lambda d: evaluate_rows("anil", "core", 100, d)),
    "eval_100_higher": ("the same, backend higher", lambda d: evaluate_rows("anil", "higher", 100, d)),
    "batch_prep": ("sample + convert one 32-task meta-batch", lambda d: batch_prep(32, d)),
    "sampler": ("metamtl EpisodeSampler, 2000 episodes", lambda d: sampler_rate()),
    "l2l_taskdataset": ("learn2learn TaskDataset, 200 episodes", lambda d: l2l_taskdataset_rate()),
}

#: (label, numerator row, denominator row, target or None): ratios of seconds per iteration
RATIOS = [
    ("MAML 32x1 / plain higher", "maml_32x1", "higher_32x1", 0.65),
    ("MAML 32x1 / learn2learn", "maml_32x1", "l2l_32x1", 0.8),
    ("MAML 16x5 / plain higher", "maml_16x5", "higher_16x5", 0.8),
    ("MAML 16x5 / learn2learn", "maml_16x5", "l2l_16x5", 0.8),
    ("Meta-SGD 32x1: core / higher engine", "metasgd_32x1", "metasgd_32x1_higher", 0.7),
    ("MAML++ 16x5: core / higher engine", "mamlpp_16x5", "mamlpp_16x5_higher", 0.7),
    ("MAML++ 16x5 second order: core / higher engine", "mamlpp_16x5_so", "mamlpp_16x5_so_higher", None),
    ("Reptile 16x5: core / higher engine", "reptile_16x5", "reptile_16x5_higher", 0.7),
    ("MAML Adam-inner 16x5: core / higher engine", "maml_adam_16x5", "maml_adam_16x5_higher", 0.7),
    ("MAML 32x1: core / higher engine", "maml_32x1", "maml_32x1_higher", None),
    ("MAML 32x1: task threads (default) / one task after another", "maml_32x1", "maml_32x1_serial", None),
    ("MAML 16x5: task threads (default) / one task after another", "maml_16x5", "maml_16x5_serial", None),
    ("MAML 32x1: automatic layout (default) / NCHW forced", "maml_32x1", "maml_32x1_nchw", None),
    ("MAML 16x5: automatic layout (default) / NCHW forced", "maml_16x5", "maml_16x5_nchw", None),
    ("FOMAML 32x1: automatic layout (default) / NCHW forced", "fomaml_32x1", "fomaml_32x1_nchw", None),
    ("ANIL 32x1: automatic layout (default) / NCHW forced", "anil_32x1", "anil_32x1_nchw", None),
    ("MAML 32x1 / plain higher, channels_last too", "maml_32x1", "higher_32x1_nhwc", None),
    ("MAML 32x1 / learn2learn, channels_last too", "maml_32x1", "l2l_32x1_nhwc", None),
    ("MAML 32x1 / floor channels_last (metamtl Conv4)", "maml_32x1", "floor_metamtl_nhwc", None),
    ("MAML 32x1 vmap(8 tasks) / one task per call", "maml_32x1_vmap", "maml_32x1", None),
    ("plain higher 32x1 / floor", "higher_32x1", "floor", None),
    ("FOMAML 32x1: core / higher engine", "fomaml_32x1", "fomaml_32x1_higher", None),
    ("ANIL 32x1 / floor channels_last (textbook)", "anil_32x1", "floor_nhwc", 1.3),
    ("ANIL 32x1: core / higher engine", "anil_32x1", "anil_32x1_higher", None),
    ("demo ANIL: core / higher engine", "anil_demo", "anil_demo_higher", None),
    ("evaluate: core / higher engine", "eval_100", "eval_100_higher", None),
    ("floor: metamtl Conv4 / textbook", "floor_metamtl", "floor", None),
    ("floor: channels_last feature maps / NCHW", "floor_channels_last", "floor", None),
    ("floor: channels_last weights+images / NCHW", "floor_nhwc", "floor", None),
    ("floor, metamtl Conv4: channels_last / NCHW", "floor_metamtl_nhwc", "floor_metamtl", None),
    ("floor: torch.compile / eager", "floor_compiled", "floor", None),
    ("meta-batch sampling / MAML 32x1 step", "batch_prep", "maml_32x1", 0.05),
]


# -- running -------------------------------------------------------------------------------------
def step_meter(device: str) -> PeakMemory:
    """A :class:`PeakMemory` started once a row is set up, the same way for every row: the setup
    (data, model and, with the automatic layout, the layout probe's own meta-steps) already raised
    the high-water mark and may have left freed memory in the allocator (a MetaLearner keeps it:
    :func:`~metamtl.allocator.tune_cpu_allocator`), so that memory is handed back and the mark
    reset first; the meter then sees the warm-up and timed steps only."""
    import gc

    from metamtl.allocator import release_free_memory

    gc.collect()
    if not device.startswith("cuda"):
        release_free_memory()
    return PeakMemory(device).start()


def child(name: str, iters: int, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    factory = ROWS[name][1]
    step, extra = factory(device)
    if step is None:
        return {"name": name, **extra}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    meter = step_meter(device)
    step()  # warm-up (excluded from the times)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"name": name, "seconds": statistics.median(times), "all": times, "peak_mb": meter.added_mb,
            "resettable": meter.resettable, **extra}


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--iters", str(args.iters), "--device", args.device,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def rate(result: dict) -> str:
    n = result.get("episodes")
    return f"{n / result['seconds']:,.0f} episodes/s" if n and "seconds" in result else ""


def combine(runs: list[dict]) -> dict:
    """One row's result over ``--rounds`` fresh processes: seconds = the median of the rounds'
    medians, ``rounds`` = each round's median (for paired ratios), peak MB = the largest."""
    failed = [r for r in runs if "seconds" not in r]
    if len(runs) == 1 or failed:  # a failed or skipped round: say so rather than use fewer rounds
        return failed[0] if failed else runs[0]
    paths = [r.get("path", "") for r in runs]
    return {**runs[0], "seconds": statistics.median(r["seconds"] for r in runs), "rounds": [r["seconds"] for r in runs],
            "peak_mb": max(r["peak_mb"] for r in runs),
            "path": paths[0] if len(set(paths)) == 1 else " / ".join(paths)}


def ratio(a: dict, b: dict) -> tuple[float, str]:
    """``a / b`` seconds: the median of the per-round ratios when both rows ran in the same rounds
    (each round's processes ran minutes apart, not hours), with their range; else the plain ratio."""
    ra, rb = a.get("rounds"), b.get("rounds")
    if ra and rb and len(ra) == len(rb):
        per_round = sorted(x / y for x, y in zip(ra, rb))
        return statistics.median(per_round), f" ({per_round[0]:.2f}-{per_round[-1]:.2f})"
    return a["seconds"] / b["seconds"], ""


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| row | what | s/iter (median) | peak MB | notes |", "|---|---|---|---|---|"]
    for name, res in results.items():
        desc = ROWS[name][0]
        if "seconds" not in res:
            lines.append(f"| {name} | {desc} | - | - | {res.get('skipped') or res.get('error')} |")
            continue
        rounds = "rounds " + " / ".join(f"{x:.3f}" for x in res["rounds"]) if res.get("rounds") else ""
        notes = ", ".join(x for x in (rate(res), res.get("path", ""),
                                      f"compile {res['compile_s']} s" if "compile_s" in res else "", rounds) if x)
        lines.append(f"| {name} | {desc} | {res['seconds']:.3f} | {res['peak_mb']:.0f} | {notes} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for label, num, den, target in RATIOS:
        a, b = results.get(num, {}), results.get(den, {})
        if "seconds" in a and "seconds" in b:
            value, spread = ratio(a, b)
            verdict = "" if target is None else (f"<= {target}: " + ("met" if value <= target else "MISSED"))
            lines.append(f"| {label} | {value:.2f}x{spread} | {verdict} |")
    s, l2l = results.get("sampler", {}), results.get("l2l_taskdataset", {})
    if "seconds" in s and "seconds" in l2l:
        value = (s["episodes"] / s["seconds"]) / (l2l["episodes"] / l2l["seconds"])
        lines.append(f"| sampler episodes/s / learn2learn TaskDataset | {value:.0f}x | >= 10: "
                     f"{'met' if value >= 10 else 'MISSED'} |")
    return lines


def section(selected: bool) -> tuple[str, str]:
    """RESULTS.md section (key, title): "Speed", or for an ``--only`` subset its own section."""
    return (("speed-selected", "Speed: selected rows (`benchmarks/speed.py --only`)") if selected else
            ("speed", "Speed (`benchmarks/speed.py`)"))


def write_results(lines: list[str], header: list[str], selected: bool = False) -> None:
    """The table into its RESULTS.md section (:func:`section`)."""
    write_section(*section(selected), [*header, "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per row (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the rows this many times, round-robin (a fresh process each): s/iter is the "
                             "median over rounds and each ratio the median of its per-round ratios, with their range")
    parser.add_argument("--write", action="store_true",
                        help="record the table in benchmarks/RESULTS.md (section 'Speed'; with --only, its own "
                             "section 'Speed: selected rows', leaving the full table)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters, args.device, args.threads)))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.write:
        check_section(section(bool(args.only))[0])  # a hand-edited RESULTS.md fails now, not after the run
    if import_learn2learn() is None:
        print(L2L_INSTALL, file=sys.stderr)
    _, data = load_images()
    header = [
        f"Command: `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}` ({run_conditions()}), "
        f"{provenance()}, {args.threads} torch threads, device {args.device}.",
        f"Images: {data}. {args.iters} timed iterations per row after one warm-up, median; "
        "peak MB = max RSS of the row's own process over its warm-up and timed steps, above its RSS once data, "
        "model and (automatic layout) the layout probe were set up."
        + (f" Rows run in {args.rounds} rounds, round-robin, a fresh process per row and round: s/iter is the "
           "median of the rounds' medians (each round's in the notes), a ratio is the median of its "
           "per-round ratios (range in brackets), so both rows of a ratio are timed minutes apart in each "
           "round." if args.rounds > 1 else ""),
    ]
    print("\n".join(header), flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            runs[name].append(res := run_child(name, args))
            shown = f"{res['seconds']:.3f} s" if "seconds" in res else (res.get("skipped") or res.get("error"))
            print(f"  {'' if args.rounds == 1 else f'round {r + 1}: '}{name:22s} {shown}", flush=True)
    lines = table({name: combine(done) for name, done in runs.items()})
    print("\n".join(lines))
    if args.write:
        write_results(lines, header, selected=bool(args.only))


if __name__ == "__main__":
    main()
