"""``MetaLearner(channels_last=..., precision=...)``: NHWC layout and bfloat16 autocast.

channels_last changes only the memory layout, so a training step must give the NCHW step's
meta-gradients (up to float32 summation order); bf16 must keep weights, gradients and outputs
float32 while computing in bfloat16, with gradients close to (not equal to) the float32 ones.
"""
from __future__ import annotations

import pytest
import torch

from metamtl import MetaLearner
from metamtl.config import load_config
from metamtl.errors import ConfigError
from metamtl.fit_loop import choose_layout
from metamtl.models import build_model
from metamtl.tasks import Episode, TaskBatch

pytestmark = pytest.mark.usefixtures("single_thread")


def model(head=True):
    torch.manual_seed(0)
    return build_model("conv4", in_channels=3, hidden=8, image_size=16, blocks=2,
                       out_features=4 if head else None)


def batch(tasks=3, ways=4, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return TaskBatch([
        Episode(torch.rand(ways * shots, 3, 16, 16, generator=g), labels.repeat_interleave(shots),
                torch.rand(ways * queries, 3, 16, 16, generator=g), labels.repeat_interleave(queries),
                ways, shots, queries)
        for _ in range(tasks)
    ])


def step_grads(learner, b):
    learner.meta_optimizer.zero_grad(set_to_none=True)
    with learner.autocast():
        metrics = learner.algorithm.meta_step(learner.model, learner.placement.batch(b))
    return [p.grad.detach().clone() for p in learner.meta_parameters()], metrics


ALGOS = [
    ("maml", {"steps": 2, "lr": 0.1, "backend": "higher"}),
    ("maml", {"steps": 2, "lr": 0.1, "backend": "func"}),
    ("anil", {"steps": 2, "lr": 0.1, "head_init": "proto"}),
    ("protonet", {}),
]


@pytest.mark.parametrize("name,settings", ALGOS, ids=[f"{n}-{s.get('backend', '')}" for n, s in ALGOS])
def test_channels_last_gives_the_nchw_meta_gradients(name, settings, float64):
    """Compared in float64: in float32 the two layouts sum in different orders (~1e-5 apart)."""
    from metamtl.algorithms import build_algorithm

    head = name not in ("protonet", "anil")
    ref = MetaLearner(model(head), build_algorithm(name, **settings), device="cpu")
    nhwc = MetaLearner(model(head), build_algorithm(name, **settings), device="cpu", channels_last=True)
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really NHWC, not a no-op
    moved = nhwc.placement.batch(batch())
    assert moved[0].query_x.is_contiguous(memory_format=torch.channels_last)
    rg, rm = step_grads(ref, batch())
    og, om = step_grads(nhwc, batch())
    for a, b in zip(rg, og):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert om["loss"] == pytest.approx(rm["loss"], rel=1e-10)


def test_bf16_trains_in_float32_weights_close_to_fp32():
    ref = MetaLearner(model(False), "protonet", device="cpu")
    bf = MetaLearner(model(False), "protonet", device="cpu", precision="bf16")
    rg, rm = step_grads(ref, batch())
    og, om = step_grads(bf, batch())
    assert all(g.dtype == torch.float32 for g in og)
    flat_r, flat_o = torch.cat([g.flatten() for g in rg]), torch.cat([g.flatten() for g in og])
    cos = torch.nn.functional.cosine_similarity(flat_r, flat_o, dim=0)
    assert cos > 0.98, f"bf16 meta-gradient direction differs from fp32 (cosine {cos:.4f})"
    assert flat_r.ne(flat_o).any()  # bf16 really computed in lower precision
    assert om["loss"] == pytest.approx(rm["loss"], rel=0.02)

    history = bf.fit(iter_tasks(), iterations=3, meta_batch_size=2, progress=False)
    assert all(p.dtype == torch.float32 for p in bf.model.parameters())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history if "loss" in r)
    ep = batch(tasks=1, seed=5)[0]
    logits = bf.predict(ep.support_x, ep.support_y, ep.query_x)
    assert logits.dtype == torch.float32 and logits.shape == (ep.query_x.shape[0], ep.ways)


class iter_tasks:
    """A tiny task source: a fresh random episode per index."""

    ways, shots, queries, name = 4, 2, 3, "random"

    def episode(self, index):
        return batch(tasks=1, seed=100 + index)[0]


def test_layout_and_precision_survive_save_and_load(tmp_path):
    learner = MetaLearner(model(False), "protonet", device="cpu", channels_last=True, precision="bf16")
    path = learner.save(tmp_path / "l.pt")
    back = MetaLearner.load(path, device="cpu")
    assert back.channels_last and back.precision == "bf16"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in back.model.parameters() if p.dim() == 4)
    for a, b in zip(learner.model.parameters(), back.model.parameters()):
        assert torch.equal(a, b)
    plain = MetaLearner(model(False), "protonet", device="cpu")  # the weights load into NCHW too
    plain.model.load_state_dict(back.model.state_dict())
    ep = batch(tasks=1, seed=3)[0]
    torch.testing.assert_close(plain.predict(ep.support_x, ep.support_y, ep.query_x),
                               MetaLearner(back.model, "protonet", device="cpu").predict(
                                   ep.support_x, ep.support_y, ep.query_x), rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="precision.*fp16.*bf16"):
        MetaLearner(model(False), "protonet", device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="channels_last must be true, false or null"):
        MetaLearner(model(False), "protonet", device="cpu", channels_last="yes")


def test_config_keys_reach_the_learner(tmp_path):
    from metamtl.experiment import build_learner, build_tasks

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: sinusoid}\nmodel: {name: mlp}\nalgorithm: {name: maml}\n"
                   "train: {precision: bf16, channels_last: true}\n")
    config = load_config(cfg)
    assert config.train.precision == "bf16" and config.train.channels_last is True
    with pytest.raises(ConfigError):
        load_config(cfg, ["train.channels_last=maybe"])
    with pytest.raises(ConfigError, match="precision"):
        build_learner(load_config(cfg, ["train.precision=half"]), build_tasks(config)["train"])
    learner = build_learner(config, build_tasks(config)["train"])
    assert learner.precision == "bf16" and learner.channels_last
    # the meta optimizer's other settings (weight decay) come from train.meta_optimizer_kwargs
    wd = load_config(cfg, ["train.meta_optimizer=adamw", "train.meta_optimizer_kwargs={weight_decay: 0.05}"])
    opt = build_learner(wd, build_tasks(wd)["train"]).meta_optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    assert learner.meta_optimizer.param_groups[0]["weight_decay"] == 0  # Adam's default
    for bad, match in [("{weight_decay: -1}", "Invalid weight_decay value"), ("{wd: 1}", "unexpected keyword argument 'wd'"),
                       ("{lr: 0.1}", "train.meta_lr"), ("0.05", "mapping")]:
        with pytest.raises(ConfigError, match=match):
            load_config(cfg, [f"train.meta_optimizer_kwargs={bad}"])


@pytest.mark.parametrize("in_channels", [1, 3])
def test_core_keeps_adapted_conv_weights_channels_last(in_channels):
    """An SGD step would return NCHW weights (and NCHW feature maps, whose max-pool is ~8x slower
    on CPU); the core keeps every task's adapted conv weights NHWC, one input channel too."""
    from metamtl.algorithms import build_algorithm

    torch.manual_seed(0)
    net = build_model("conv4", in_channels=in_channels, hidden=8, image_size=16, blocks=2, out_features=4)
    learner = MetaLearner(net, build_algorithm("maml", steps=2, lr=0.1), device="cpu",
                          channels_last=True)
    g = torch.Generator().manual_seed(0)
    eps = TaskBatch([Episode(torch.rand(8, in_channels, 16, 16, generator=g), torch.arange(4).repeat(2),
                             torch.rand(8, in_channels, 16, 16, generator=g), torch.arange(4).repeat(2), 4, 2, 2)
                     for _ in range(2)])
    sx, sy, qx, qy = learner.placement.batch(eps).stack()
    problem = learner.algorithm.problem(learner.model, sx, sy, 4)
    adapted = problem.unroll(problem.leaves(), tape=True, create_graph=True)
    for params in adapted.trajectory:
        for p in params:
            if p.dim() == 5:
                assert all(p[t].stride(1) == 1 for t in range(p.shape[0])), p.stride()


def test_an_automatic_layout_starts_channels_last_for_conv_models_on_cpu_and_can_be_forced():
    from metamtl.algorithms import build_algorithm

    conv = MetaLearner(model(True), "maml", device="cpu")
    assert conv.channels_last and conv.placement.automatic
    assert conv.config()["learner"]["channels_last"] is None  # the setting, not the layout of the moment
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv.model.parameters() if p.dim() == 4)
    forced = MetaLearner(model(True), "maml", device="cpu", channels_last=False)
    assert not forced.channels_last and not forced.placement.automatic
    assert forced.config()["learner"]["channels_last"] is False
    mlp = MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=1),
                      build_algorithm("maml", steps=1, lr=0.01), device="cpu", task="regression")
    assert not mlp.channels_last and not mlp.placement.automatic


def test_a_forced_nchw_layout_converts_nhwc_inputs():
    """channels_last=False left NHWC input tensors (and episodes) as they were, so the convolutions
    ran in NHWC and the predictions depended on the input's strides (~1e-5 apart)."""
    from metamtl.algorithms import build_algorithm

    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", in_channels=3, hidden=8, image_size=12, blocks=2, out_features=5),
                          build_algorithm("maml", lr=0.3, steps=2), device="cpu", channels_last=False)
    assert learner.memory_format == torch.contiguous_format
    sx, sy, qx = torch.randn(10, 3, 12, 12), torch.arange(5).repeat(2), torch.randn(15, 3, 12, 12)
    nhwc = [x.contiguous(memory_format=torch.channels_last) for x in (sx, qx)]
    assert learner.model_input(nhwc[0], "x").is_contiguous()
    assert torch.equal(learner.predict(sx, sy, qx), learner.predict(nhwc[0], sy, nhwc[1]))
    episode = Episode(nhwc[0], sy, nhwc[1], torch.arange(5).repeat(3), 5, 2, 3)
    assert learner.placement.batch(TaskBatch([episode]))[0].query_x.is_contiguous()


# -- the layout probe ------------------------------------------------------------------------------
def timed_learner(costs, channels_last=None, **settings):
    """A learner whose meta-steps advance a fake clock by ``costs[channels_last]`` seconds (the
    layout the step runs in), read by its layout probe: the probe's decision is deterministic."""
    from metamtl.algorithms import build_algorithm
    from metamtl.placement import LayoutProbe

    learner = MetaLearner(model(True), build_algorithm("maml", steps=2, lr=0.1, **settings), device="cpu",
                          channels_last=channels_last)
    clock, calls = [0.0], []
    real = learner.algorithm.meta_step

    def meta_step(m, b, iteration=0):
        layout = b[0].query_x.is_contiguous(memory_format=torch.channels_last) and not b[0].query_x.is_contiguous()
        assert layout == learner.channels_last  # the batch is in the model's layout
        calls.append(layout)
        clock[0] += costs[layout]
        return real(m, b, iteration)

    learner.algorithm.meta_step = meta_step
    learner.layout_probe = LayoutProbe(timer=lambda: clock[0], min_seconds=0.5, min_iterations=0)
    return learner, calls


@pytest.mark.parametrize("faster", [True, False], ids=["nhwc-faster", "nchw-faster"])
def test_the_probe_keeps_the_layout_its_timer_finds_faster(faster):
    learner, calls = timed_learner({faster: 1.0, not faster: 2.0})
    b = choose_layout(learner, learner.placement.batch(batch(tasks=3)))
    assert learner.channels_last is faster
    # initial: a warm-up and the short-step check; then 2 warm-up rounds and 3 timed rounds of both
    assert sorted(set(calls)) == [False, True] and len(calls) == 2 + 2 * 2 + 2 * 3
    convs = [p for p in learner.model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) != p.is_contiguous() or not faster
               for p in convs)
    assert all(p.is_contiguous() for p in convs) is (not faster)
    assert b[2].support_x.is_contiguous() is (not faster)  # the whole batch re-placed, not only probed tasks
    assert list(learner.run.layouts.values()) == [faster]
    # cached per workload: the same shapes again are not timed again
    calls.clear()
    choose_layout(learner, learner.placement.batch(batch(tasks=3, seed=1)))
    assert calls == [] and learner.channels_last is faster
    # another workload (more shots) is probed on its own
    choose_layout(learner, learner.placement.batch(batch(tasks=3, shots=3)))
    assert len(calls) == 12 and len(learner.run.layouts) == 2


def test_a_step_too_short_to_matter_keeps_the_initial_layout_untimed():
    learner, calls = timed_learner({True: 0.2, False: 0.01})  # below min_seconds=0.5
    choose_layout(learner, learner.placement.batch(batch()))
    assert calls == [True, True] and learner.channels_last  # warm-up and one timed step


@pytest.mark.parametrize("forced", [True, False])
def test_a_forced_layout_is_never_probed(forced):
    learner, calls = timed_learner({forced: 9.0, not forced: 1.0}, channels_last=forced)
    history = learner.fit(iter_tasks(), iterations=2, meta_batch_size=2, progress=False)
    assert learner.channels_last is forced and learner.run.layouts == {}
    assert calls == [forced, forced] and len(history) == 2  # the two real meta-steps only


def test_probing_leaves_no_trace_and_training_in_either_layout_is_the_same_maths(float64):
    """Grads, BatchNorm statistics and the RNG are as before the probe; the next meta-step in the
    chosen layout gives the meta-gradients of a learner forced to the other one."""
    learner, calls = timed_learner({True: 2.0, False: 1.0})
    learner.model.trunk.register_buffer("passes", torch.zeros(()))  # a buffer forward passes change
    learner.model.trunk.register_forward_hook(lambda m, i, o: m.passes.add_(1) and None)
    for p in learner.meta_parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in learner.meta_parameters()]
    buffers = [b.clone() for b in learner.model.buffers()]
    rng = torch.get_rng_state()
    b = choose_layout(learner, learner.placement.batch(batch()))
    assert not learner.channels_last and len(calls) == 12
    assert all(torch.equal(p.grad, g) for p, g in zip(learner.meta_parameters(), grads))
    assert buffers and all(torch.equal(x, y) for x, y in zip(learner.model.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)
    from metamtl.algorithms import build_algorithm

    nhwc = MetaLearner(model(True), build_algorithm("maml", steps=2, lr=0.1), device="cpu", channels_last=True)
    og, om = step_grads(nhwc, batch())
    learner.meta_optimizer.zero_grad(set_to_none=True)
    metrics = learner.algorithm.meta_step(learner.model, b)
    for a, g in zip(og, [p.grad for p in learner.meta_parameters()]):
        torch.testing.assert_close(g, a, rtol=1e-9, atol=1e-12)
    assert metrics["loss"] == pytest.approx(om["loss"], rel=1e-10)


def test_a_short_fit_is_not_probed():
    learner, calls = timed_learner({True: 2.0, False: 1.0})
    learner.layout_probe.min_iterations = 3
    learner.fit(iter_tasks(), iterations=2, meta_batch_size=2, progress=False)
    assert calls == [True, True] and learner.run.layouts == {}  # the two meta-steps, in the initial layout


def test_the_chosen_layout_is_saved_and_a_resumed_run_keeps_it(tmp_path):
    tasks = iter_tasks()
    learner, calls = timed_learner({True: 2.0, False: 1.0})
    learner.fit(tasks, iterations=2, meta_batch_size=2, progress=False)
    assert not learner.channels_last and len(calls) == 12 + 2  # one probe, then two meta-steps
    path = learner.save(tmp_path / "last.pt", training_state=True)
    resumed, calls = timed_learner({True: 1.0, False: 2.0})  # this machine would choose otherwise
    resumed.fit(tasks, iterations=3, meta_batch_size=2, progress=False, resume=path)
    assert resumed.run.layouts == learner.run.layouts and not resumed.channels_last
    assert calls == [False]  # no probe: the interrupted run's layout
    back = MetaLearner.load(path, device="cpu")
    assert back.placement.automatic  # an automatic layout stays automatic


def test_precision_auto_follows_native_bf16(tmp_path, monkeypatch):
    """``precision="auto"``: bf16 where the CPU has AVX512-BF16 or AMX, fp32 where bf16 would be
    emulated; the setting (not the choice) is saved, so a checkpoint chooses again where it is loaded."""
    from metamtl import placement as pl

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert pl.cpu_flags(str(cpuinfo)) >= {"avx2", "avx512_bf16"}
    assert pl.cpu_flags(str(tmp_path / "missing")) == set()
    cpu = torch.device("cpu")
    assert pl.native_bf16(cpu, {"avx2", "avx512_bf16"}) == torch.backends.mkldnn.is_available()
    assert pl.native_bf16(cpu, {"avx2", "amx_bf16"}) == torch.backends.mkldnn.is_available()
    assert not pl.native_bf16(cpu, {"avx2", "avx512f"})

    monkeypatch.setattr(pl, "cpu_flags", lambda: {"avx2"})
    learner = MetaLearner(model(False), "protonet", device="cpu", precision="auto")
    assert learner.precision == "fp32" and learner.config()["learner"]["precision"] == "auto"
    with learner.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    path = learner.save(tmp_path / "l.pt")

    monkeypatch.setattr(pl, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    back = MetaLearner.load(path, device="cpu")
    assert back.precision == "bf16" and back.config()["learner"]["precision"] == "auto"
    with back.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision.*fp16.*auto"):
        MetaLearner(model(False), "protonet", device="cpu", precision="fp16")


def test_the_probe_times_each_layout_after_its_warm_up_steps():
    """The first steps in a layout are slow (kernels built, heap grown: measured 0.65-1.9 s for the
    first three channels_last steps of the mini-ImageNet transfer config, 0.25 s after, NCHW 0.44 s);
    timed after one warm-up step each, the probe chose NCHW there, 2x slower in training."""
    from metamtl.placement import LayoutProbe

    clock, steps = [0.0], {True: 0, False: 0}

    def run(channels_last):
        steps[channels_last] += 1
        clock[0] += (1.9 if steps[True] <= 3 else 0.25) if channels_last else 0.44

    probe = LayoutProbe(timer=lambda: clock[0])
    choice = probe.choose(run, initial=True)
    assert choice.channels_last and choice.seconds == pytest.approx({True: 0.25, False: 0.44})
    assert "channels_last / NCHW 0.57x" in choice.describe()
    hasty = LayoutProbe(timer=lambda: clock[0], warmup=0, repeats=1)  # no warm-up of the other layout
    steps.update({True: 0, False: 0})
    assert not hasty.choose(run, initial=True).channels_last


class _TwoRanks:
    """Process strategy of one of two ranks whose peer's share of each meta-batch has the shapes
    ``peer`` (a list of repr'd group keys per call), collectives answered locally."""

    world_size = 2

    def __init__(self, rank, peer):
        self.rank, self.peer, self.gathers = rank, list(peer), 0

    def all_gather(self, obj, what):
        self.gathers += 1
        other = self.peer.pop(0)
        return [obj, other] if self.rank == 0 else [other, obj]

    def any_rank(self, *flags, what=""):
        return tuple(bool(f) for f in flags)


def test_ranks_with_different_shares_of_a_mixed_meta_batch_probe_in_the_same_iteration():
    """Under torchrun a mixed meta-batch gives each rank different shapes; the workload key is the
    whole meta-batch's, so every rank probes (a collective) in the same iteration, never one alone."""
    from metamtl.fit_loop import layout_workload

    small, big = batch(tasks=1), batch(tasks=1, shots=3)
    key = lambda b: sorted(map(repr, b.groups()))  # noqa: E731
    both = TaskBatch([small[0], big[0]])
    # iteration 1: rank 0 holds a small episode, rank 1 a big one; iteration 2: both hold both
    rank0, calls0 = timed_learner({True: 1.0, False: 2.0})
    rank1, calls1 = timed_learner({True: 1.0, False: 2.0})
    rank0.strategy = _TwoRanks(0, [key(big), key(both)])
    rank1.strategy = _TwoRanks(1, [key(small), key(both)])
    keys = [layout_workload(rank0, small), layout_workload(rank1, big)]
    assert keys[0] == keys[1]
    rank0.strategy.peer, rank1.strategy.peer = [key(big), key(both)], [key(small), key(both)]
    choose_layout(rank0, rank0.placement.batch(small))
    choose_layout(rank1, rank1.placement.batch(big))
    assert calls0 and calls1 and list(rank0.run.layouts) == list(rank1.run.layouts) == keys[:1]
    calls0.clear(), calls1.clear()
    choose_layout(rank0, rank0.placement.batch(both))
    choose_layout(rank1, rank1.placement.batch(both))
    assert calls0 == calls1 == [] and rank0.run.layouts == rank1.run.layouts


class _Tasks:
    """A task source that serves the episodes of a batch in turn."""

    def __init__(self, b):
        self.b, self.ways, self.shots, self.queries, self.name = b, b[0].ways, b[0].shots, b[0].queries, "toy"

    def episode(self, i):
        return self.b[i % len(self.b)]


class _ViewTrunk(torch.nn.Module):
    """A hand-written CNN that flattens with ``.view``, which only works on NCHW tensors."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.out_features = 4 * 16 * 16

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y.view(y.size(0), -1)


def test_the_automatic_layout_never_breaks_a_user_trunk_that_works_in_nchw(caplog):
    """channels_last=None started every conv model NHWC on the CPU: a user trunk flattening with
    .view failed in fit/predict with torch's 'view size is not compatible' RuntimeError."""
    import logging

    from metamtl.algorithms import build_algorithm
    from metamtl.models import TrunkHead

    b = batch(tasks=2)
    with caplog.at_level(logging.INFO, logger="metamtl.placement"):
        learner = MetaLearner(TrunkHead(_ViewTrunk(), torch.nn.Linear(4 * 16 * 16, 4)),
                              build_algorithm("maml", steps=1, lr=0.1), device="cpu")
    assert not learner.channels_last and not learner.placement.automatic
    assert any("_ViewTrunk" in r.getMessage() and "NCHW" in r.getMessage() for r in caplog.records)
    learner.fit(_Tasks(b), iterations=1, meta_batch_size=2, progress=False)
    ep = b[0]
    assert learner.predict(ep.support_x, ep.support_y, ep.query_x).shape == (12, 4)
    forced = MetaLearner(TrunkHead(_ViewTrunk(), torch.nn.Linear(4 * 16 * 16, 4)),
                         build_algorithm("maml", steps=1, lr=0.1), device="cpu", channels_last=True)
    with pytest.raises(ConfigError, match="channels_last"):  # forced: a clear error naming the setting
        forced.predict(ep.support_x, ep.support_y, ep.query_x)


@pytest.mark.parametrize("name", ["mamlpp", "maml"])
def test_bf16_with_support_batchnorm_statistics_trains_close_to_fp32(name):
    """Before: MAML++ with precision bf16 and bn_stats='support' crashed in its first step (bare
    "expected dtype float for 'end' but got BFloat16": bf16 support statistics lerped into float32
    running statistics); support statistics are now computed in float32, as F.batch_norm's are."""
    from metamtl.algorithms import build_algorithm

    grads = {}
    for precision in ("fp32", "bf16"):
        learner = MetaLearner(model(), build_algorithm(name, steps=1, lr=0.1, bn_stats="support"), device="cpu",
                              precision=precision, channels_last=False)
        learner.meta_optimizer.zero_grad(set_to_none=True)
        with learner.autocast():
            learner.algorithm.meta_step(learner.model, learner.placement.batch(batch()))
        grads[precision] = [p.grad if p.grad is not None else torch.zeros_like(p) for p in learner.meta_parameters()]
        assert all(torch.isfinite(g).all() for g in grads[precision])
    flat = [torch.cat([g.flatten().float() for g in grads[p]]) for p in ("fp32", "bf16")]
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.98
