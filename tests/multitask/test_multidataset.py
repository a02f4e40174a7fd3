"""Multi-dataset sampling, stems/heads/soft sharing, the multitask algorithm and its resume."""
from __future__ import annotations

import pytest
import torch

from metamtl import MetaLearner
from metamtl.algorithms import build_algorithm
from metamtl.data import ClassDataset, Preprocessing
from metamtl.errors import ConfigError, InputError, TaskError
from metamtl.models import build_model
from metamtl.algorithms import MultiTask
from metamtl.models import dataset_scope, make_stem
from metamtl.tasks import EpisodeSampler, MixedTasks, TaskBatch

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = {"grey": [1, 12, 12], "rgb": [3, 24, 24]}


def toy(name, channels, size, classes=12, per_class=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(classes, channels, size, size, generator=g)
    noise = torch.rand(classes * per_class, channels, size, size, generator=g)
    images = ((protos.repeat_interleave(per_class, 0) * 0.8 + 0.2 * noise) * 255).to(torch.uint8)
    prep = Preprocessing(size=(size, size), channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class),
                        [f"c{i}" for i in range(classes)], name=name, preprocessing=prep)


def mixed(weights="equal", temperature=1.0, seed=0):
    return MixedTasks([EpisodeSampler(toy("grey", 1, 12), 3, 1, 2, seed=seed),
                       EpisodeSampler(toy("rgb", 3, 24, classes=30, seed=1), 3, 1, 2, seed=seed)],
                      weights, temperature, seed=seed)


def small_model(**kw):
    torch.manual_seed(0)
    args = dict(inputs=SHAPES, width=4, size=6, hidden=4, blocks=2, out_features=None)
    args.update(kw)
    return build_model("multidataset", **args)


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,temperature,expected", [
    ("equal", 1.0, [0.5, 0.5]),
    ([3, 1], 1.0, [0.75, 0.25]),
    ("size", 1.0, [12 / 42, 30 / 42]),            # by number of classes
    ([3, 1], 2.0, [3 ** 0.5 / (3 ** 0.5 + 1), 1 / (3 ** 0.5 + 1)]),  # p ** (1/T), renormalised
])
def test_mixture_frequencies_follow_the_weights(weights, temperature, expected):
    src = mixed(weights, temperature)
    assert src.probs == pytest.approx(expected)
    counts = torch.bincount(torch.tensor([src.source_of(i) for i in range(4000)]), minlength=2)
    assert (counts / 4000).tolist() == pytest.approx(expected, abs=0.03)


def test_each_episode_comes_from_one_dataset_deterministically():
    a, b = mixed(), mixed()
    for i in range(20):
        e1, e2 = a.episode(i), b.episode(i)
        assert e1.dataset == e2.dataset and torch.equal(e1.support_x, e2.support_x)
        shape = SHAPES[e1.dataset]
        assert list(e1.support_x.shape[1:]) == shape and list(e1.query_x.shape[1:]) == shape
    batch = TaskBatch([a.episode(i) for i in range(12)])
    assert {k[0] for k in batch.groups()} == {"grey", "rgb"}


# -- models -------------------------------------------------------------------------------------
def test_stems_map_every_dataset_to_the_trunk_input():
    omni = make_stem("conv", (1, 28, 28), 64, 14)
    mini = make_stem("conv", (3, 84, 84), 64, 14)
    assert omni(torch.randn(2, 1, 28, 28)).shape == (2, 64, 14, 14)
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 64, 14, 14)
    assert make_stem("conv", (3, 32, 32), 8, 5)(torch.randn(2, 3, 32, 32)).shape == (2, 8, 5, 5)
    resize = make_stem("resize", (1, 28, 28), 3, 84)
    x = torch.rand(2, 1, 28, 28)
    out = resize(x)
    assert out.shape == (2, 3, 84, 84) and torch.equal(out[:, 0], out[:, 2])
    with pytest.raises(ConfigError, match="smaller than size"):
        make_stem("conv", (1, 12, 12), 8, 14)
    with pytest.raises(ConfigError, match="unknown stem"):
        make_stem("patch", (1, 12, 12), 8, 6)


def test_model_routes_by_shape_or_scope_and_explains_ambiguity():
    m = small_model(out_features=3, heads="per_dataset")
    g, c = torch.randn(4, 1, 12, 12), torch.randn(4, 3, 24, 24)
    assert m(g).shape == (4, 3) and m(c).shape == (4, 3)
    with dataset_scope("grey"):  # the head of 'grey' on features of the grey stem
        expected = m.head.heads["grey"](m.trunk(g))
    torch.testing.assert_close(m(g), expected)
    with pytest.raises(InputError, match="match none"):
        m(torch.randn(2, 3, 12, 12))
    with pytest.raises(InputError, match="dataset_scope"):
        m.head(m.trunk.stems["grey"](g).mean())  # features alone carry no dataset
    twins = small_model(inputs={"a": [1, 12, 12], "b": [1, 12, 12]})
    with pytest.raises(InputError, match="fit several datasets"):
        twins.trunk(g)
    with dataset_scope("b"):
        assert twins.trunk(g).shape == (4, twins.num_features)


def test_soft_sharing_trunks_start_equal_and_penalty_matches_manual():
    m = small_model(sharing="soft", soft_weight=0.1)
    ta, tb = m.trunk.trunks["grey"], m.trunk.trunks["rgb"]
    assert all(torch.equal(p, q) for p, q in zip(ta.parameters(), tb.parameters()))
    assert float(m.penalty().detach()) == 0.0
    with torch.no_grad():
        for p in tb.parameters():
            p.add_(0.5)
    manual = sum(((p - q) ** 2).sum() / 2 for p, q in zip(ta.parameters(), tb.parameters()))
    torch.testing.assert_close(m.penalty(), 0.1 * manual)
    assert small_model().penalty() is None


# -- the multitask algorithm ---------------------------------------------------------------------
def base_cfg():
    return {"name": "maml", "head_init": "zero", "steps": 1, "lr": 0.3}


def balanced_batch(src, n_per=2):
    eps, i = {"grey": [], "rgb": []}, 0
    while min(len(v) for v in eps.values()) < n_per:
        e = src.episode(i)
        if len(eps[e.dataset]) < n_per:
            eps[e.dataset].append(e)
        i += 1
    return TaskBatch(eps["grey"] + eps["rgb"]).to("cpu")


def grads_of(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_equal_strategy_on_balanced_groups_equals_the_plain_meta_gradient():
    batch = balanced_batch(mixed())
    m1, m2 = small_model(), small_model()
    plain = build_algorithm(**base_cfg()).meta_step(m1, batch)
    mt = build_algorithm("multitask", base=base_cfg(), strategy="equal", datasets=["grey", "rgb"])
    metrics = mt.meta_step(m2, batch)
    for a, b in zip(grads_of(m1), grads_of(m2)):
        torch.testing.assert_close(a, b)
    assert metrics["loss"] == pytest.approx(plain["loss"])
    assert {"grey/loss", "rgb/accuracy", "mtl/weight/grey", "mtl/grad_cosine"} <= set(metrics)


def test_pcgrad_on_per_dataset_meta_gradients_matches_manual_surgery():
    batch = balanced_batch(mixed())
    base = build_algorithm(**base_cfg())
    ref = small_model()
    per = {}
    for name in ("grey", "rgb"):
        ref.zero_grad(set_to_none=True)
        base.meta_step(ref, TaskBatch([e for e in batch if e.dataset == name]))
        per[name] = grads_of(ref)
    shared = [i for i, (n, _) in enumerate(ref.named_parameters()) if not n.startswith("trunk.stems")]
    flat = {k: torch.cat([v[i].flatten() for i in shared]) for k, v in per.items()}
    g1, g2 = flat["grey"], flat["rgb"]
    p1 = g1 - min(0.0, float(g1 @ g2)) / float(g2 @ g2) * g2
    p2 = g2 - min(0.0, float(g1 @ g2)) / float(g1 @ g1) * g1
    expected_shared = (p1 + p2) / 2
    m = small_model()
    alg = MultiTask(base_cfg(), "pcgrad", ["grey", "rgb"])
    alg.meta_step(m, batch)
    got = grads_of(m)
    torch.testing.assert_close(torch.cat([got[i].flatten() for i in shared]), expected_shared)
    for i, (n, _) in enumerate(m.named_parameters()):  # stems are dataset-specific: g_k / 2
        if n.startswith("trunk.stems.grey"):
            torch.testing.assert_close(got[i], per["grey"][i] / 2)


def test_unknown_dataset_and_bad_base_are_clear_errors():
    alg = MultiTask(base_cfg(), "equal", ["grey"])
    with pytest.raises(InputError, match="'rgb' is not one of"):
        alg.meta_step(small_model(), balanced_batch(mixed(), 1))
    with pytest.raises(ConfigError, match="datasets"):
        MultiTask(base_cfg(), "equal")
    with pytest.raises(ConfigError, match="unknown algorithm"):
        MultiTask({"name": "mamal"}, "equal", ["a"])


def make_learner(strategy="uncertainty"):
    alg = build_algorithm("multitask", base=base_cfg(), strategy=strategy, datasets=["grey", "rgb"])
    return MetaLearner(small_model(), alg, device="cpu", meta_lr=0.05)


def test_learnable_weights_are_meta_parameters_saved_and_resumed_exactly(tmp_path):
    src = mixed()
    full = make_learner()
    full.fit(src, iterations=6, meta_batch_size=4, progress=False)
    assert not torch.equal(full.algorithm.strategy.log_var, torch.zeros(2))
    part = make_learner()
    part.fit(src, iterations=3, meta_batch_size=4, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    resumed = make_learner()
    resumed.fit(src, iterations=6, meta_batch_size=4, progress=False, resume=tmp_path / "last.pt")
    torch.testing.assert_close(resumed.algorithm.strategy.log_var, full.algorithm.strategy.log_var)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b)
    path = full.save(tmp_path / "final.pt")
    loaded = MetaLearner.load(path, device="cpu")
    assert loaded.algorithm.config() == full.algorithm.config()
    torch.testing.assert_close(loaded.algorithm.strategy.log_var, full.algorithm.strategy.log_var)
    ep = src.episode(100).to("cpu")
    assert loaded.evaluate([ep], progress=False).accuracy == full.evaluate([ep], progress=False).accuracy


@pytest.mark.parametrize("strategy", ["gradnorm", "dwa", "cagrad"])
def test_every_strategy_trains_through_the_learner(strategy):
    learner = make_learner({"name": strategy, "period": 2} if strategy == "dwa" else strategy)
    before = [p.detach().clone() for p in learner.model.parameters()]
    history = learner.fit(mixed(), iterations=4, meta_batch_size=4, progress=False)
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())
    assert any("train/mtl/weight/grey" in row for row in history)
    # every step taken: none skipped as non-finite (DWA's "not seen yet" marker once was NaN)
    assert not any(row.get("train/skipped") for row in history), history
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


@pytest.mark.parametrize("algorithm", ["maml", "anil", "protonet", "multitask"])
def test_soft_sharing_penalty_reaches_the_meta_gradient_once_whatever_the_algorithm(algorithm):
    """The learner's meta-step adds the soft-sharing tie for every algorithm (it was only multitask's,
    so under maml the "tied" trunks trained independently), once, and logs it as ``penalty``."""
    from metamtl.fit_loop import MetaStep

    batch = balanced_batch(mixed())
    spec = ({"name": "multitask", "base": base_cfg(), "strategy": "equal", "datasets": ["grey", "rgb"]}
            if algorithm == "multitask" else {**base_cfg(), "name": algorithm} if algorithm != "protonet"
            else {"name": "protonet"})
    grads, metrics = {}, {}
    for weight in (1.0, 0.0):
        m = small_model(sharing="soft", soft_weight=weight)
        with torch.no_grad():
            for p in m.trunk.trunks["rgb"].parameters():
                p.add_(0.1)
        start = {n: p.detach().clone() for n, p in m.named_parameters()}
        learner = MetaLearner(m, build_algorithm(**spec), device="cpu", meta_lr=0.05)
        metrics[weight] = MetaStep(learner)(learner.placement.batch(batch))
        grads[weight] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in m.named_parameters()}
    assert metrics[1.0]["penalty"] > 0 and "penalty" not in metrics[0.0]
    for n, p in start.items():
        if n.startswith("trunk.trunks.rgb"):
            mean = (p + start[n.replace("rgb", "grey")]) / 2
            torch.testing.assert_close(grads[1.0][n] - grads[0.0][n], 2 * (p - mean))


def test_mixture_with_unknown_source_gives_task_error():
    with pytest.raises(TaskError, match="distinct names"):
        MixedTasks([EpisodeSampler(toy("a", 1, 12), 3, 1, 2), EpisodeSampler(toy("a", 1, 12), 3, 1, 2)])


def test_held_out_episodes_of_each_dataset_take_at_most_its_classes(data_root):
    """Training ways above a dataset's held-out classes: its validation and test episodes use all
    of them (as with one dataset), instead of refusing the run before it starts."""
    from metamtl.config import config_from_dict
    from metamtl.experiment import build_tasks, held_out_sources

    small = {"name": "omniglot", "root": str(data_root), "sources": ["images_background_small1"], "image_size": 28}
    cfg = config_from_dict({
        "datasets": [{**small, "label": "a", "val_split": "val", "test_split": "test"},
                     {**small, "label": "b", "sources": ["images_background_small2"], "val_split": "val",
                      "test_split": "test"}],
        "tasks": {"ways": 40, "shots": 1, "queries": 1},
        "model": {"name": "multidataset", "hidden": 4, "out_features": None},
        "algorithm": {"name": "multitask", "base": {"name": "anil", "head_init": "proto"}},
        "eval": {"queries": 2, "settings": [{"ways": 5, "shots": 1}]},
    })
    tasks = build_tasks(cfg)
    for label, test in tasks["test"].items():
        assert test.ways == test.dataset.num_classes < 40 and test.queries == 2 and test.name == label
    assert all(v.ways == min(40, v.dataset.num_classes) and v.queries == 1 for v in tasks["val"].sources)
    sources, split = held_out_sources(cfg)
    assert split == "test" and {k: s.ways for k, s in sources.items()} == {k: s.ways for k, s in tasks["test"].items()}
    # datasets held out on different splits: each is named with its own, not the last one's
    cfg.datasets[1].test_split = None
    sources, split = held_out_sources(cfg)
    assert split == "held-out (a: test, b: val)"
    assert sources["b"].dataset.num_classes == tasks["val"].sources[1].dataset.num_classes
    # a training-only dataset (neither split) is left out of the held-out sources (the steps curve's),
    # as evaluation leaves it out; with none held out, the error names the labels
    cfg.datasets[1].val_split = None
    sources, split = held_out_sources(cfg)
    assert list(sources) == ["a"] and split == "test"
    cfg.datasets[0].test_split = cfg.datasets[0].val_split = None
    with pytest.raises(ConfigError, match=r"no dataset of this run \(a, b\) has a test or a validation split"):
        held_out_sources(cfg)


@pytest.mark.parametrize("strategy", ["gradnorm", "dwa", "uncertainty"])
def test_a_meta_batch_without_every_dataset_trains(strategy):
    """One task per meta-batch (one dataset each step): no step is skipped. GradNorm marked a task's
    unseen first loss with NaN, so the buffers' finiteness check skipped every such step (and
    restored the NaN): the weights never moved."""
    learner = make_learner(strategy)
    before = [p.detach().clone() for p in learner.model.parameters()]
    history = learner.fit(mixed(), iterations=6, meta_batch_size=1, progress=False)
    assert not any(r.get("train/skipped") for r in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    if strategy == "gradnorm":
        assert bool((learner.algorithm.strategy.initial_loss > 0).all())  # both datasets seen by now
        state = learner.algorithm.strategy.state_dict()
        state["initial_loss"] = torch.tensor([float("nan"), 1.0])  # a checkpoint written before the fix
        learner.algorithm.strategy.load_state_dict(state)
        assert learner.algorithm.strategy.initial_loss.tolist() == [0.0, 1.0]


def test_a_head_only_base_with_per_dataset_heads_adapts_and_predicts_outside_a_scope():
    """ANIL calls the per-dataset head on features, which carry no dataset: adapt and predict open
    the scope the support images' shape routes to, as evaluate does, and queries run in it."""
    torch.manual_seed(0)
    alg = build_algorithm("multitask", base={"name": "anil", "steps": 1, "lr": 0.3}, datasets=["grey", "rgb"])
    learner = MetaLearner(small_model(heads="per_dataset", out_features=3), alg, device="cpu")
    src = mixed()
    for name in ("grey", "rgb"):
        ep = next(e for e in map(src.episode, range(20)) if e.dataset == name)
        sx, qx = ep.support_x.float() / 255, ep.query_x.float() / 255
        out = learner.predict(sx, ep.support_y, qx)
        with dataset_scope(name):
            expected = alg.base.adapt(learner.model, sx, ep.support_y, 3)(qx)
        assert out.shape == (6, 3) and torch.allclose(out, expected)
        assert torch.allclose(alg.adapt(learner.model, sx, ep.support_y, 3)(qx), expected)


@pytest.mark.parametrize("name", ["anil", "maml"])
def test_a_plain_base_with_per_dataset_heads_trains_and_evaluates_each_dataset_with_its_head(name):
    """Before: plain ANIL (head-only adaptation calls the head on features, which carry no dataset)
    failed its first meta-step with "run it under dataset_scope" while MAML trained; each episode
    now runs in its dataset's scope, as under multitask."""
    batch = balanced_batch(mixed())
    m = small_model(heads="per_dataset", out_features=3)
    alg = build_algorithm(name, steps=1, lr=0.3)
    metrics = alg.meta_step(m, batch)
    scoped = MultiTask({"name": name, "steps": 1, "lr": 0.3}, "equal", ["grey", "rgb"])
    expected = scoped.meta_step(small_model(heads="per_dataset", out_features=3), batch)
    assert metrics["loss"] == pytest.approx(expected["loss"])
    for head in ("grey", "rgb"):
        assert m.head.heads[head].weight.grad.abs().sum() > 0
    assert [r["loss"] for r in alg.evaluate_episodes(m, list(batch))] == pytest.approx(
        [r["loss"] for r in scoped.evaluate_episodes(m, list(batch))])


def test_datasets_of_one_shape_are_routed_by_name_in_predict_feature_heads_and_feature_means():
    """Two 1x12x12 datasets with their own stems: shape cannot pick one, so ``predict(dataset=)``,
    a feature head's episodes (``ep.dataset``) and each source's feature mean use the name."""
    twins = {"a": [1, 12, 12], "b": [1, 12, 12]}
    src = MixedTasks([EpisodeSampler(toy(n, 1, 12, seed=i), 3, 1, 2) for i, n in enumerate(twins)], "equal")
    alg = build_algorithm("multitask", base=base_cfg(), datasets=list(twins))
    learner = MetaLearner(small_model(inputs=twins, out_features=3), alg, device="cpu")
    ep = next(e for e in map(src.episode, range(20)) if e.dataset == "b")
    sx, qx = ep.support_x.float() / 255, ep.query_x.float() / 255
    with dataset_scope("b"):
        expected = alg.base.adapt(learner.model, sx, ep.support_y, 3)(qx)
    assert torch.allclose(learner.predict(sx, ep.support_y, qx, dataset="b"), expected)
    with pytest.raises(InputError, match="fit several datasets"):
        learner.predict(sx, ep.support_y, qx)
    eps = [src.episode(i) for i in range(4)]
    assert {e.dataset for e in eps} == {"a", "b"}
    assert learner.evaluate(eps, head={"name": "simpleshot", "center": False}, progress=False).episodes == 4
    means = learner.compute_feature_mean(src)
    for s in src.sources:
        with dataset_scope(s.name):
            images = s.dataset.preprocessing.normalize(s.dataset.images)
            assert torch.allclose(means[s.name], learner.model.eval().trunk(images).mean(0), atol=1e-5)


@pytest.mark.parametrize("head", [None, {"name": "simpleshot", "center": False}])
def test_a_dataset_name_that_does_not_fit_the_inputs_or_the_model_is_an_input_error(head):
    """``dataset="rgb"`` for grey inputs failed in a convolution with a bare RuntimeError, and a
    misspelt ``dataset="gray"`` was silently ignored (routed by shape)."""
    alg = build_algorithm("multitask", base=base_cfg(), datasets=list(SHAPES))
    learner = MetaLearner(small_model(out_features=3), alg, device="cpu")
    sx, sy, qx = torch.rand(6, 1, 12, 12), torch.tensor([0, 0, 1, 1, 2, 2]), torch.rand(4, 1, 12, 12)
    expected = learner.predict(sx, sy, qx, head=head)
    torch.testing.assert_close(learner.predict(sx, sy, qx, head=head, dataset="grey"), expected)
    with pytest.raises(InputError, match=r"support_x .*\[1, 12, 12\].*dataset 'rgb' takes \[3, 24, 24\]"):
        learner.predict(sx, sy, qx, head=head, dataset="rgb")
    for call in (lambda: learner.predict(sx, sy, qx, head=head, dataset="gray"),
                 lambda: learner.adapt(sx, sy, head=head, dataset="gray")):
        with pytest.raises(InputError, match=r"dataset 'gray' is none of this learner's datasets.*'grey'"):
            call()

def test_multitask_forwards_trunk_loaded_and_the_meta_gradient_rule_to_its_base():
    """init_from refreshes MAML++'s per-step BatchNorm copies from the loaded trunk under multitask
    too, and the layout probe sees the base's meta-gradient schedule."""
    base = {"name": "mamlpp", "steps": 2, "lr": 0.3, "head_init": "zero", "per_step_bn": True,
            "first_order_iterations": 5}
    source = MetaLearner(small_model(), build_algorithm(**base), device="cpu")
    with torch.no_grad():
        for m in source.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.fill_(3.0)
    alg = build_algorithm("multitask", base=base, datasets=["grey", "rgb"])
    learner = MetaLearner(small_model(), alg, device="cpu")
    learner.init_from(source)
    copies = [v for k, v in alg.base.state_dict().items() if k.startswith("norms.weight")]
    assert copies and all(torch.all(v == 3.0) for v in copies)
    for it in (0, 10):
        assert alg.meta_gradient(it).name == alg.base.meta_gradient(it).name


@pytest.mark.parametrize("label,message", [
    ("omni.small1", "contains '.'.*e.g. 'omni_small1'"), ("", "is empty"),
    ("training", "is the name of a torch module attribute.*e.g. 'training_data'"),
])
def test_a_dataset_label_that_cannot_name_a_module_is_a_config_error(label, message):
    """Labels key the per-dataset ModuleDicts: '.' or '' gave torch's bare KeyError after loading data."""
    from metamtl.config import config_from_dict

    with pytest.raises(ConfigError, match=f"dataset label {label!r} {message}"):
        small_model(inputs={label: [1, 12, 12], "rgb": [3, 24, 24]})
    if "." in label:
        with pytest.raises(ConfigError, match=r"datasets\[0\].label 'omni.small1' must not contain '.'"):
            config_from_dict({"datasets": [{"name": "omniglot", "label": label}, {"name": "omniglot", "label": "b"}]})


@pytest.mark.parametrize("kind", ["conv", "resize"])
@pytest.mark.parametrize("setting", [{"size": 0}, {"width": 0}, {"size": "6"}])
def test_stem_width_and_size_below_1_are_config_errors(kind, setting):
    """size 0 gave a ZeroDivisionError traceback from the conv stem's stride."""
    name, value = next(iter(setting.items()))
    with pytest.raises(ConfigError, match=f"stem's {name} must be an integer >= 1, got {value!r}"):
        small_model(stem=kind, **setting)


def test_a_skipped_step_leaves_integer_buffers_such_as_dwa_steps_as_they_were():
    """Only float buffers were restored: DWA's step counter advanced on a skipped step, so a period
    of 3 closed after 2 real steps."""
    import warnings

    alg = build_algorithm("multitask", base=base_cfg(), strategy={"name": "dwa", "period": 3}, datasets=["grey", "rgb"])
    learner = MetaLearner(small_model(out_features=3), alg, device="cpu", channels_last=False)
    real = alg.meta_step

    def poisoned(model, batch, iteration=0):
        metrics = real(model, batch, iteration)
        if iteration == 1:  # a non-finite meta-gradient: the learner skips this step
            next(model.parameters()).grad.fill_(float("nan"))
        return metrics

    alg.meta_step = poisoned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = learner.fit(mixed(), iterations=3, meta_batch_size=4, progress=False)
    assert [h.get("train/skipped", 0.0) for h in history] == [0.0, 1.0, 0.0]
    assert int(alg.strategy.steps) == 2 and alg.strategy.loss_count.tolist() == [2.0, 2.0]  # no period closed


def test_per_dataset_heads_without_out_features_warn_and_build_per_task_heads():
    """heads='per_dataset' with out_features None (per-task heads, e.g. anil with head_init proto)
    was silently dropped: the model has no head at all. It says so, and still builds: models saved
    with the setting (it did no harm) must load."""
    with pytest.warns(UserWarning, match="per_dataset has no effect without out_features.*head_init: learned"):
        assert small_model(heads="per_dataset", out_features=None).head is None
    assert small_model(heads="shared", out_features=None).head is None  # per-task heads, as documented


def test_size_weights_count_a_nested_mixture_by_its_classes_and_refuse_an_unknown_size():
    """A source without num_classes (a nested MixedTasks) counted as 1 class: probabilities
    [0.024, 0.976] for a 60-class mixture against a 40-class source."""
    big = EpisodeSampler(toy("big", 1, 12, classes=40), 3, 1, 2)
    inner = MixedTasks([EpisodeSampler(toy("x", 1, 12, classes=30), 3, 1, 2),
                        EpisodeSampler(toy("y", 1, 12, classes=30, seed=1), 3, 1, 2)])
    assert inner.num_classes == 60
    assert MixedTasks([inner, big], "size").probs == pytest.approx([0.6, 0.4])

    class Sizeless:
        name, ways, shots, queries = "sizeless", 3, 1, 2

        def episode(self, index):
            return big.episode(index)

    with pytest.raises(TaskError, match="'size'.*'sizeless' has no num_classes"):
        MixedTasks([Sizeless(), big], "size")
    assert MixedTasks([Sizeless(), big]).probs == [0.5, 0.5]


def test_transfer_pretrains_on_a_mixture_with_each_sources_classes_on_their_own_logits(tmp_path):
    """A `datasets:` list with transfer crashed with AttributeError: 'MixedTasks' object has no
    attribute 'num_classes'; with num_classes set, class 8 of dataset a and class 8 of dataset b
    trained the same logit."""
    from metamtl.config import config_from_dict
    from metamtl.experiment import build_learner

    src = MixedTasks([EpisodeSampler(toy("a", 1, 16, classes=12), 3, 1, 2),
                      EpisodeSampler(toy("b", 1, 16, classes=30, seed=1), 3, 1, 2)])
    assert src.num_classes == 42
    for i in range(40):
        ep, which = src.episode(i), src.source_of(i)
        own = src.sources[which].episode(i).classes
        assert ep.classes == tuple(c + (12 if which else 0) for c in own)
        assert ep.dataset == ("b" if which else "a")
    cfg = config_from_dict({
        "datasets": [{"name": "omniglot", "label": "a"}, {"name": "omniglot", "label": "b"}],
        "tasks": {"ways": 3, "shots": 1, "queries": 2}, "output_dir": str(tmp_path),
        "model": {"name": "conv4", "hidden": 4}, "algorithm": {"name": "transfer"},
        "train": {"device": "cpu"}})
    learner = build_learner(cfg, src)
    assert learner.algorithm.num_classes == 42
    learner.algorithm.meta_step(learner.model, TaskBatch([src.episode(i).to("cpu") for i in range(4)]))


@pytest.mark.parametrize("datasets", [["a", "b", "c"], ["a"], ["b", "c"]])
def test_algorithm_datasets_other_than_the_runs_labels_are_a_config_error(tmp_path, datasets):
    """Before: an unknown label was accepted (DWA then kept equal weights for good) and a missing one
    failed only at the first step."""
    from metamtl.config import config_from_dict
    from metamtl.experiment import build_learner

    src = MixedTasks([EpisodeSampler(toy("a", 1, 16), 3, 1, 2), EpisodeSampler(toy("b", 1, 16, seed=1), 3, 1, 2)])

    def cfg(names):
        return config_from_dict({
            "datasets": [{"name": "omniglot", "label": "a"}, {"name": "omniglot", "label": "b"}],
            "tasks": {"ways": 3, "shots": 1, "queries": 2}, "output_dir": str(tmp_path),
            "model": {"name": "conv4", "hidden": 4},
            "algorithm": {"name": "multitask", "base": base_cfg(), "strategy": "dwa", "datasets": names},
            "train": {"device": "cpu"}})

    assert build_learner(cfg(["b", "a"]), src).algorithm.strategy.tasks == ["b", "a"]
    with pytest.raises(ConfigError, match=r"algorithm.datasets must list the run's dataset labels \['a', 'b'\]"):
        build_learner(cfg(datasets), src)


@pytest.mark.parametrize("base", ["maml", "reptile"])
def test_every_base_splits_shared_and_dataset_specific_parameters_alike(base):
    """Reptile's meta-gradient (initial - adapted) is zero, not None, for the parameters of the
    other datasets: every parameter counted as shared, PCGrad/CAGrad mixed the datasets' own heads
    and stems, and the 'nothing shared' warning never fired."""
    import warnings

    batch = balanced_batch(mixed())
    cfg = {"name": base, "steps": 1, "lr": 0.3}
    for strategy in ("pcgrad", "cagrad"):
        m = small_model(heads="per_dataset", out_features=3)
        alg = MultiTask(cfg, strategy, ["grey", "rgb"])
        own = {}
        for name in ("grey", "rgb"):
            m.zero_grad(set_to_none=True)
            with dataset_scope(name):
                alg.base.meta_step(m, TaskBatch([e for e in batch if e.dataset == name]))
            own[name] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and p.grad.any()}
        m.zero_grad(set_to_none=True)
        alg.meta_step(m, batch)
        for n, p in m.named_parameters():  # each dataset's stem and head: weights[i] * g_i / k
            for name in ("grey", "rgb"):
                if f"stems.{name}" in n or f"heads.{name}" in n:
                    torch.testing.assert_close(p.grad, own[name][n] / 2)
    m = small_model(sharing="soft", heads="per_dataset", out_features=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MultiTask(cfg, "pcgrad", ["grey", "rgb"]).meta_step(m, batch)
    assert any("found no parameter shared" in str(w.message) for w in caught)


@pytest.mark.parametrize("nested", [False, True])
def test_validation_on_a_mixture_of_different_ways_scores_each_setting_and_averages_all_episodes(nested):
    """``tasks.ways`` above one dataset's validation classes gives its val sampler fewer ways: the
    first validation refused the mixed settings and the run lost its training.  A nested mixture
    (whose outer source reads its first dataset's setting) was still refused."""
    learner = make_learner("equal")
    val = MixedTasks([EpisodeSampler(toy("grey", 1, 12), 3, 1, 2, seed=5),
                      EpisodeSampler(toy("rgb", 3, 24, classes=30, seed=1), 4, 1, 2, seed=5)], seed=5)
    val = MixedTasks([val], seed=7) if nested else val
    history = learner.fit(mixed(), iterations=2, meta_batch_size=2, val_tasks=val, val_every=2, val_episodes=6,
                          progress=False)
    row = next(r for r in history if "val/accuracy" in r)
    eps = [val.episode(i) for i in range(6)]
    assert {e.ways for e in eps} == {3, 4}
    per = [learner.evaluate([e], progress=False) for e in eps]
    assert row["val/accuracy"] == pytest.approx(sum(r.accuracy for r in per) / 6)
    assert row["val/loss"] == pytest.approx(sum(r.loss for r in per) / 6)


def test_a_centring_head_never_borrows_another_datasets_mean():
    """With only grey's mean (rgb's never computed, or dropped by a fit on grey alone), rgb episodes
    were silently centred with grey's mean, a feature of another stem."""
    alg = build_algorithm("multitask", base=base_cfg(), datasets=list(SHAPES))
    learner = MetaLearner(small_model(out_features=3), alg, device="cpu")
    grey, rgb = EpisodeSampler(toy("grey", 1, 12), 3, 1, 2), EpisodeSampler(toy("rgb", 3, 24, seed=1), 3, 1, 2)
    learner.compute_feature_mean(grey)
    assert learner.feature_mean("rgb") is None and learner.feature_mean() is not None
    assert torch.equal(learner.feature_mean("grey"), learner.feature_means["grey"])
    ep = rgb.episode(0)
    sx, qx = ep.support_x.float() / 255, ep.query_x.float() / 255
    for call in (lambda: learner.evaluate(rgb, 2, head="simpleshot", progress=False),
                 lambda: learner.predict(sx, ep.support_y, qx, head="simpleshot", dataset="rgb")):
        with pytest.raises(InputError, match=r"\['grey'\] and none for 'rgb': call learner.compute_feature_mean"):
            call()
    assert learner.evaluate(grey, 2, head="simpleshot", progress=False).episodes == 2


def test_a_test_set_named_other_than_a_training_dataset_is_routed_by_shape_in_evaluate_as_in_predict():
    """``rgb_test`` episodes: predict routed them by shape, while evaluate (per-dataset heads, a
    centring head) and Ensemble.evaluate refused them with an InputError."""
    from metamtl.ensemble import Ensemble

    rgb = toy("rgb", 3, 24, classes=30, seed=1)
    named, other = EpisodeSampler(rgb, 3, 1, 2, name="rgb"), EpisodeSampler(rgb, 3, 1, 2, name="rgb_test")
    alg = build_algorithm("multitask", base={"name": "anil", "steps": 1, "lr": 0.3}, datasets=list(SHAPES))
    learner = MetaLearner(small_model(heads="per_dataset", out_features=3), alg, device="cpu")
    expected = learner.evaluate(named, 3, progress=False)
    assert learner.evaluate(other, 3, progress=False).per_episode_loss == expected.per_episode_loss
    assert Ensemble([learner]).evaluate(other, 3, progress=False).accuracy == pytest.approx(expected.accuracy)
    learner.compute_feature_mean(MixedTasks([EpisodeSampler(toy("grey", 1, 12), 3, 1, 2), named]))
    simpleshot = learner.evaluate(named, 3, progress=False, head="simpleshot")
    assert learner.evaluate(other, 3, progress=False, head="simpleshot").per_episode_loss == simpleshot.per_episode_loss


@pytest.mark.parametrize("head", [None, {"name": "simpleshot", "center": False}])
def test_images_of_another_shape_than_their_dataset_label_are_an_input_error_in_evaluate_and_fit(head):
    """RGB images under the label ``grey`` reached grey's 1-channel stem: a bare torch RuntimeError
    from the convolution in evaluate and fit, where predict(dataset="grey") gave an InputError."""
    learner = make_learner("equal")
    grey, rgb = toy("grey", 1, 12), toy("rgb", 3, 24, classes=30, seed=1)
    message = r"shape \[3, 24, 24\] run as dataset 'grey', which takes \[1, 12, 12\]"
    with pytest.raises(InputError, match=message):
        learner.evaluate(EpisodeSampler(rgb, 3, 1, 2, name="grey"), 2, head=head, progress=False)
    if head is None:
        swapped = MixedTasks([EpisodeSampler(grey, 3, 1, 2, name="rgb"), EpisodeSampler(rgb, 3, 1, 2, name="grey")])
        before = [p.detach().clone() for p in learner.model.parameters()]
        with pytest.raises(InputError, match=r"run as dataset '(grey|rgb)', which takes"):
            learner.fit(swapped, iterations=1, meta_batch_size=2, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))


def test_feature_means_of_a_nested_mixture_are_one_per_dataset():
    """A nested MixedTasks trains; compute_feature_mean refused it ('needs training tasks or a
    ClassDataset, got MixedTasks') and a refresh after fit dropped the inner datasets' means."""
    learner = make_learner("equal")
    grey, rgb = EpisodeSampler(toy("grey", 1, 12), 3, 1, 2), EpisodeSampler(toy("rgb", 3, 24, seed=1), 3, 1, 2)
    nested = MixedTasks([grey, MixedTasks([rgb])])
    flat = learner.compute_feature_mean(MixedTasks([grey, rgb]))
    means = learner.compute_feature_mean(nested)
    assert sorted(means) == ["grey", "rgb"] and all(torch.equal(means[k], flat[k]) for k in flat)
    learner.fit(nested, iterations=1, meta_batch_size=2, progress=False)
    assert sorted(learner.feature_means) == ["grey", "rgb"]
    assert not torch.equal(learner.feature_means["rgb"], flat["rgb"])


def test_a_multitask_run_gives_a_base_the_settings_it_takes_from_the_data():
    """``base: {name: transfer}`` failed ('transfer needs num_classes'): a run filled in only the
    top-level algorithm's declared settings, and multitask declared the datasets alone."""
    from metamtl.algorithms import with_data_settings

    data = {"num_classes": lambda: 42, "datasets": lambda: list(SHAPES)}

    def built(base):
        return build_algorithm(**with_data_settings({"name": "multitask", "base": base}, data))

    assert built({"name": "transfer", "steps": 1, "head_init": "proto"}).base.num_classes == 42
    assert built("transfer").base.num_classes == 42
    assert built({"name": "transfer", "num_classes": 7}).base.num_classes == 7  # the config's own value stays
    assert "num_classes" not in built("anil").base.config()  # a base that takes none is given none
