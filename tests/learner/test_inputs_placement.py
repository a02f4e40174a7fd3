"""Input coercion for adapt/predict, episode checks and placement (device, precision, layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metamtl.errors import ConfigError, InputError
from metamtl.inputs import check_int, model_input, support_labels
from metamtl.models import build_model
from metamtl.placement import Placement

from .conftest import sine_learner


def test_support_labels_checks_classes_and_counts_ways():
    y, ways = support_labels([0, 1, 1, 2], 4, "classification", torch.device("cpu"))
    assert ways == 3 and y.dtype == torch.long and y.tolist() == [0, 1, 1, 2]
    assert support_labels(np.array([0.0, 1.0]), 2, "classification", torch.device("cpu"))[1] == 2
    for bad, match in [([0, 2], r"class\(es\) \[1\] have no support"), ([0.5, 1], "integer class labels"),
                       ([0, 1], "has 3 examples but support_y has 2"), ([[0, 1]], "1-D tensor")]:
        with pytest.raises(InputError, match=match):
            support_labels(bad, 3 if "3 examples" in match else len(bad), "classification", torch.device("cpu"))
    y, ways = support_labels([0.5, -1.0], 2, "regression", torch.device("cpu"))
    assert ways == 1 and y.shape == (2, 1) and y.dtype == torch.float32



def test_support_labels_with_a_huge_class_id_are_refused_at_once():
    """Missing classes were listed from a set of range(max label + 1): time and memory grew with
    the largest id (a MemoryError, or a hang, for database keys or synset numbers)."""
    import time

    start = time.perf_counter()
    for big in (10**7, 2**40):
        with pytest.raises(InputError, match=rf"cover every class 0..{big}; .*\[2, 3, 4,.*relabel"):
            support_labels([0, 1, big], 3, "classification", torch.device("cpu"))
    assert time.perf_counter() - start < 1.0

def test_model_input_takes_floats_uint8_images_and_arrays(tmp_path):
    from metamtl.data import Preprocessing

    model = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=1, out_features=None)
    prep = Preprocessing(size=(8, 8), channels=1, mean=(0.5,), std=(0.25,))
    place = Placement.create("cpu", channels_last=True)
    x = model_input(torch.zeros(2, 1, 8, 8), "x", model=model, placement=place, preprocessing=prep)
    assert x.is_contiguous(memory_format=torch.channels_last)
    raw = model_input(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8), "x", model=model, placement=place,
                      preprocessing=prep)
    assert raw.dtype == torch.float32 and torch.allclose(raw, torch.full_like(raw, 2.0))  # (1 - 0.5) / 0.25
    with pytest.raises(InputError, match="x contains NaN"):
        model_input(torch.full((1, 1, 8, 8), float("nan")), "x", model=model, placement=place, preprocessing=prep)
    with pytest.raises(InputError, match="query_x must be float model input"):
        model_input(torch.zeros(1, 1, 8, 8, dtype=torch.long), "query_x", model=model, placement=place,
                    preprocessing=prep)
    with pytest.raises(ConfigError, match="no preprocessing"):
        model_input(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "x", model=model, placement=place, preprocessing=None)
    learner = sine_learner()  # regression, no preprocessing: float arrays are model input
    assert learner.model_input(np.zeros((3, 1)), "x").shape == (3, 1)


def test_placement_settings_are_checked_and_autocast_follows_precision():
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        Placement.create("cpu", precision="fp8")
    with pytest.raises(ConfigError, match="channels_last must be true, false or null"):
        Placement.create("cpu", channels_last="yes")
    with Placement.create("cpu", precision="bf16").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with Placement.create("cpu").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert check_int("n", np.int64(3), 1) == 3
    with pytest.raises(ConfigError, match="n must be an integer >= 1, got True"):
        check_int("n", True, 1)


def test_inference_settings_override_per_call_and_round_trip_through_a_checkpoint_entry():
    from metamtl.heads import NearestCentroid
    from metamtl.inference import InferenceSettings

    inf = InferenceSettings.create({"copies": 3}, "simpleshot", {"toy": torch.ones(4)})
    assert inf.augment().copies == 3 and inf.augment(False) is None and inf.augment({"copies": 2}).copies == 2
    assert inf.classifier() == NearestCentroid() and inf.classifier("algorithm") is None
    assert torch.equal(inf.feature_mean("other"), torch.ones(4))  # the only mean serves any dataset
    back = InferenceSettings.from_state(inf.state())
    assert back.head == inf.head and back.support_augment.config() == inf.support_augment.config()
    assert torch.equal(back.feature_means["toy"], torch.ones(4))
    assert InferenceSettings.from_state(None) == InferenceSettings()
    with pytest.raises(ConfigError, match="unknown support_augment key 'copy'"):
        InferenceSettings.create({"copy": 3})


@pytest.mark.parametrize("name, kw", [("anil", {"steps": 1, "lr": 0.1, "head_init": "proto"}),
                                      ("maml", {"steps": 1, "lr": 0.1, "head_init": "proto", "adapt": "head"})])
def test_an_adapted_predictor_answers_each_new_batch_not_a_cached_one(name, kw):
    """Head-only predictors cache trunk features per input; a freed batch's memory reused by the next
    batch used to return the old batch's logits."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm

    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", hidden=4, out_features=None), build_algorithm(name, **kw), device="cpu")
    sx, sy = torch.randn(5, 1, 28, 28), torch.arange(5)
    predictor = learner.adapt(sx, sy)
    for q in [torch.randn(4, 1, 28, 28) for _ in range(6)]:
        torch.testing.assert_close(predictor(q * 1.0), learner.adapt(sx, sy)(q.clone()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, kw", [("anil", {"steps": 1, "lr": 0.1, "head_init": "proto"}),
                                      ("maml", {"steps": 1, "lr": 0.1, "head_init": "proto", "adapt": "head"})])
def test_head_only_predictors_take_queries_made_under_inference_mode(name, kw):
    """Inference tensors have no version counter to key the trunk-feature cache on: head-only
    algorithms used to raise a bare RuntimeError under ``torch.inference_mode()``."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm

    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", hidden=4, out_features=None), build_algorithm(name, **kw), device="cpu")
    sx, sy, q = torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(4, 1, 28, 28)
    expected = learner.predict(sx, sy, q)
    with torch.inference_mode():
        torch.testing.assert_close(learner.predict(sx, sy, q), expected)
        predictor, inference_q = learner.adapt(sx, sy), q.clone()
        torch.testing.assert_close(predictor(inference_q), expected)
    torch.testing.assert_close(predictor(inference_q), expected)  # an inference tensor, used outside the mode
    torch.testing.assert_close(predictor(q), expected)


@pytest.mark.parametrize("algorithm, kw", [("maml", {"steps": 1, "lr": 0.1}), ("protonet", {})])
def test_a_float64_model_fits_evaluates_and_predicts_uint8_images_and_float32_inputs(algorithm, kw):
    """Inputs are cast to the model's dtype, wherever they enter (episodes, predict)."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.data.base import ClassDataset
    from metamtl.tasks import EpisodeSampler

    g = torch.Generator().manual_seed(0)
    ds = ClassDataset(torch.randint(0, 256, (36, 1, 8, 8), generator=g, dtype=torch.uint8),
                      torch.arange(6).repeat_interleave(6), [f"c{i}" for i in range(6)], name="tiny")
    tasks = EpisodeSampler(ds, ways=3, shots=1, queries=2, seed=0)
    model = build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2,
                        out_features=None if algorithm == "protonet" else 3).double()
    learner = MetaLearner(model, build_algorithm(algorithm, **kw), device="cpu", channels_last=False)
    learner.fit(tasks, iterations=1, meta_batch_size=1, progress=False)
    assert learner.evaluate(tasks, episodes=1, progress=False).accuracy >= 0
    ep = tasks.episode(0)
    probs = learner.predict(ep.support_x.float() / 255, ep.support_y, ep.query_x.float() / 255)
    assert probs.shape[0] == len(ep.query_y) and torch.isfinite(probs).all()
    assert all(p.dtype == torch.float64 for p in learner.model.parameters())


def test_a_float64_regression_learner_adapts_and_predicts_in_float64(monkeypatch):
    """adapt/predict rounded regression targets and numpy float64 inputs to float32 (three distinct
    inputs became one) and returned float32 outputs; fit/evaluate kept float64."""
    import torch.nn.functional as F

    import metamtl.adaptation.settings as settings
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm

    seen, mse_loss = [], F.mse_loss

    def spy(a, b, *args, **kwargs):
        seen.append((a.dtype, b.dtype))
        return mse_loss(a, b, *args, **kwargs)

    monkeypatch.setattr(settings.F, "mse_loss", spy)
    torch.manual_seed(0)
    model = build_model("mlp", in_features=1, hidden=[8], out_features=1).double()
    learner = MetaLearner(model, build_algorithm("maml", lr=0.01, steps=1), device="cpu", task="regression")
    x = torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    y = torch.tensor([1e8, 1e8 + 1, 1e8 + 2, 1e8 + 3, 1e8 + 5], dtype=torch.float64)
    out = learner.predict(x, y, x)
    monkeypatch.undo()
    assert seen == [(torch.float64, torch.float64)] and out.dtype == torch.float64
    xn = np.array([[1e8], [1e8 + 1], [1e8 + 2]])
    assert learner.model_input(xn, "x").squeeze().tolist() == [1e8, 1e8 + 1, 1e8 + 2]
    assert learner.model_input(np.array([[2 ** 30 + 1]]), "x").item() == 2 ** 30 + 1  # integer arrays too
    classifier = MetaLearner(build_model("mlp", in_features=1, hidden=[8], out_features=2).double(),
                             build_algorithm("maml", lr=0.1, steps=1), device="cpu")
    assert classifier.model_input(xn, "x").squeeze().tolist() == [1e8, 1e8 + 1, 1e8 + 2]
    assert classifier.predict(x[:2], [0, 1], x).dtype == torch.float64


def test_torch_compiled_trunks_and_models_run_uncompiled_with_a_warning_and_save_portable_checkpoints(tmp_path):
    """Before: a compiled trunk failed second-order MAML with torch's raw "donated buffers ...
    create_graph" error, and a learner saved from one (``_orig_mod.`` keys) did not load into the
    uncompiled model ("does not match this metamtl version")."""
    from metamtl import MetaLearner
    from metamtl.data import ClassDataset
    from metamtl.models import TrunkHead
    from metamtl.tasks import EpisodeSampler

    def model():
        torch.manual_seed(0)
        return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3)

    g = torch.Generator().manual_seed(0)
    ds = ClassDataset(torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g),
                      torch.arange(6).repeat_interleave(4), [f"c{i}" for i in range(6)], name="tiny")
    tasks = EpisodeSampler(ds, 3, 1, 2, seed=0)
    plain = model()
    with pytest.warns(UserWarning, match="the trunk was wrapped by torch.compile"):
        wrapped = TrunkHead(torch.compile(plain.trunk), plain.head, config=plain.config)
    assert wrapped.trunk is plain.trunk and not any("_orig_mod" in k for k in wrapped.state_dict())
    learner = MetaLearner(wrapped, "maml", device="cpu", preprocessing=ds.preprocessing)  # second order
    learner.fit(tasks, iterations=1, meta_batch_size=2, progress=False)
    learner.save(tmp_path / "l.pt")
    loaded = MetaLearner.load(tmp_path / "l.pt", device="cpu", model=model())
    ep = tasks.episode(7)
    assert torch.allclose(loaded.predict(ep.support_x, ep.support_y, ep.query_x),
                          learner.predict(ep.support_x, ep.support_y, ep.query_x))
    whole = model()
    with pytest.warns(UserWarning, match="the model was wrapped by torch.compile"):
        assert MetaLearner(torch.compile(whole), "protonet", device="cpu").model is whole


def test_a_loaded_learner_computes_in_the_memory_layout_the_saved_one_had_chosen(tmp_path):
    """An automatic layout (conv model on the CPU) that the layout probe had set to NCHW was not saved:
    the loaded learner computed in channels_last again, and predicted ~1e-4 differently."""
    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.fit_loop import use_layout

    torch.manual_seed(0)
    learner = MetaLearner(build_model("conv4", hidden=8, out_features=None),
                          build_algorithm("maml", steps=3, lr=0.5, head_init="proto"), device="cpu")
    assert learner.placement.automatic and learner.channels_last
    use_layout(learner, False)  # what fit's layout probe chooses where NCHW is faster
    loaded = MetaLearner.load(learner.save(tmp_path / "l.pt"), device="cpu")
    assert loaded.channels_last is False and loaded.placement.automatic  # still automatic for later fits
    g = torch.Generator().manual_seed(1)
    sx, sy, q = torch.randn(25, 1, 28, 28, generator=g), torch.arange(5).repeat(5), torch.randn(20, 1, 28, 28, generator=g)
    assert torch.equal(loaded.predict(sx, sy, q), learner.predict(sx, sy, q))
    forced = MetaLearner(build_model("conv4", hidden=8, out_features=None), "protonet", device="cpu", channels_last=True)
    assert MetaLearner.load(forced.save(tmp_path / "f.pt"), device="cpu").channels_last is True
    from metamtl.checkpoint import safe_load

    assert safe_load(tmp_path / "l.pt")["channels_last"] is False and safe_load(tmp_path / "f.pt")["channels_last"] is None


def test_load_into_a_torch_compiled_model_loads_into_the_module_inside_it(tmp_path):
    """MetaLearner.load(path, model=torch.compile(model)) failed with "does not match this metamtl
    version's models" (the wrapper's ``_orig_mod.`` keys), though a learner takes compiled models."""
    from metamtl import MetaLearner

    def model():
        torch.manual_seed(0)
        return build_model("conv4", in_channels=1, hidden=4, image_size=8, blocks=2, out_features=3)

    learner = MetaLearner(model(), "maml", device="cpu", channels_last=False)
    path = learner.save(tmp_path / "l.pt")
    inner = model()
    with pytest.warns(UserWarning, match="the model was wrapped by torch.compile"):
        loaded = MetaLearner.load(path, device="cpu", model=torch.compile(inner))
    assert loaded.model is inner
    x, y = torch.randn(3, 1, 8, 8), torch.arange(3)
    assert torch.equal(loaded.predict(x, y, x), learner.predict(x, y, x))
    with pytest.raises(ConfigError, match=r"model=...\) takes the TrunkHead .* got Linear"):
        MetaLearner.load(path, device="cpu", model=torch.nn.Linear(2, 2))


def test_bf16_is_refused_for_a_float64_model_and_auto_resolves_to_fp32(monkeypatch):
    """Autocast leaves float64 ops alone: precision 'bf16' (or 'auto' resolving to it) computed in
    float64 while the learner reported bf16."""
    import metamtl.placement as placement

    model = build_model("mlp", in_features=1, hidden=[8], out_features=1).double()
    with pytest.raises(ConfigError, match=r"precision 'bf16' .* are float64, .* use precision 'fp32'"):
        Placement.create("cpu", "bf16", model=model)
    monkeypatch.setattr(placement, "native_bf16", lambda device: True)
    auto = Placement.create("cpu", "auto", model=model)
    assert auto.precision == "fp32" and auto.precision_setting == "auto"
    assert Placement.create("cpu", "auto", model=model.float()).precision == "bf16"


def test_a_trunk_returning_a_tuple_is_the_documented_config_error_with_a_learned_head_too():
    from torch import nn

    from metamtl import MetaLearner
    from metamtl.algorithms import build_algorithm
    from metamtl.models import TrunkHead

    class Trunk(nn.Module):
        out_features = 8

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 8)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return h, h.pow(2).mean()

    for head, head_init in ((nn.Linear(8, 3), "learned"), (None, "zero")):
        learner = MetaLearner(TrunkHead(Trunk(), head), build_algorithm("maml", steps=1, lr=0.1, head_init=head_init),
                              device="cpu")
        with pytest.raises(ConfigError, match="the trunk Trunk gives features of shape tuple"):
            learner.predict(torch.randn(6, 2), torch.arange(3).repeat(2), torch.randn(4, 2))
